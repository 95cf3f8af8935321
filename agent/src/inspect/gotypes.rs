//! Go struct layouts from the runtime's type descriptors.
//!
//! A stripped binary still carries a descriptor for every type the program
//! can reflect on or put in an interface (the runtime needs them for the
//! garbage collector, maps, interfaces and `reflect`): size, kind, name,
//! and for a struct every field's name, type and offset. Reading those is
//! how the agent learns, e.g., that etcd's `mvccpb.Event` is 24 bytes in one
//! build and 56 in another, without trusting version metadata.
//!
//! Layouts are from `internal/abi/type.go` (Go 1.21+) and `reflect/type.go`
//! / `runtime/type.go` before it. What changed between releases and matters
//! here: names carry a 2-byte big-endian length before Go 1.17 and a varint
//! from 1.17; a struct field's third word is `offset<<1 | embedded` before
//! 1.19 and the plain offset from 1.19 (the embedded bit moved to the
//! name's flags); the module data lists typelinked descriptors as `[]int32`
//! offsets before 1.27 and lays them out back to back from 1.27.
//!
//! Everything read is checked: descriptors, names and field arrays must lie
//! in `[types, etypes)`, offsets and counts are bounded, and a struct's
//! fields must be in order, aligned and inside the struct. Anything that
//! does not hold is a [`TypeError`], never a best guess.

use std::collections::{HashMap, HashSet, VecDeque};

use serde::Serialize;

use super::{
    buildinfo::GoVersion,
    elf::Memory,
    moduledata::{self, ModuleData, TypeRoots, TypeTables, TypesEra},
    pclntab::PclnVersion,
};

/// Why a type or layout cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TypeError {
    #[error("type descriptors unavailable: {0}")]
    Unavailable(String),
    #[error("no type named {0:?} among the type descriptors")]
    NotFound(String),
    #[error("{name} is a {kind}, not a struct")]
    NotStruct { name: String, kind: &'static str },
    #[error("{count} types are named {name:?} (package paths: {}); give the package path", pkg_paths.join(", "))]
    Ambiguous { name: String, count: usize, pkg_paths: Vec<String> },
    #[error("corrupt type descriptor at {addr:#x}: {reason}")]
    Corrupt { addr: u64, reason: String },
    #[error("type graph exceeds a bound: {0}")]
    Limit(String),
}

fn corrupt(addr: u64, reason: impl Into<String>) -> TypeError {
    TypeError::Corrupt { addr, reason: reason.into() }
}

/// More types than this is not a real program (etcd 3.5 has ~25k).
pub const MAX_TYPES: usize = 1 << 20;
/// Fields of one struct, methods of one type, parameters of one function.
pub const MAX_MEMBERS: u64 = 1 << 16;
/// Longest name accepted (anonymous struct types with tags can be long).
pub const MAX_NAME: u64 = 1 << 20;

/// The encodings that differ between Go releases.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Format {
    /// Names carry a varint length (1.17+), not 2 bytes big-endian.
    pub varint_names: bool,
    /// Field offsets are stored `offset<<1 | embedded` (before 1.19).
    pub shifted_offsets: bool,
    /// Size of the map type's descriptor struct, where known: needed only
    /// to walk the back-to-back descriptors of Go 1.27+.
    pub map_type_size: Option<u64>,
}

/// The type tables and the encodings to read them with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct TypeSetup {
    pub tables: TypeTables,
    pub format: Format,
}

/// Finds the type tables in module data `md` and the encodings for this
/// binary. The table format narrows the era; where two releases share a
/// table format but not an encoding, the Go version decides, and without
/// it the answer is an error (1.16/1.17 names, 1.18/1.19 field offsets).
/// A Go 1.20+ table is read with each module data shape its version may
/// have (all three when the version is unknown, and 1.20's and 1.26's for
/// 1.25, which this was not checked against): exactly one must fit.
pub fn setup(
    mem: &dyn Memory,
    md: &ModuleData,
    ptr_size: u8,
    pcln: PclnVersion,
    version: Option<GoVersion>,
) -> Result<TypeSetup, TypeError> {
    if ptr_size != 8 {
        return Err(TypeError::Unavailable(format!("{ptr_size}-byte pointers (only 64-bit layouts are known)")));
    }
    let minor = match version {
        Some(v) if v.major != 1 => return Err(TypeError::Unavailable(format!("unknown Go major version in {v}"))),
        Some(v) => Some(v.minor),
        None => None,
    };
    let need = |what: &str| TypeError::Unavailable(format!("Go version unknown and {what}"));
    let (eras, varint_names, shifted_offsets): (&[TypesEra], bool, bool) = match pcln {
        PclnVersion::Go12 => (&[TypesEra::Go115], false, true),
        PclnVersion::Go116 => {
            let m = minor.ok_or_else(|| need("Go 1.16 and 1.17 encode names differently"))?;
            (&[TypesEra::Go116], m >= 17, true)
        }
        PclnVersion::Go118 => {
            let m = minor.ok_or_else(|| need("Go 1.18 and 1.19 encode field offsets differently"))?;
            (&[TypesEra::Go118], true, m < 19)
        }
        PclnVersion::Go120 => match minor {
            Some(m) if m >= 27 => (&[TypesEra::Go127], true, false),
            Some(26) => (&[TypesEra::Go126], true, false),
            Some(25) => (&[TypesEra::Go120, TypesEra::Go126], true, false),
            Some(_) => (&[TypesEra::Go120], true, false),
            None => (&[TypesEra::Go120, TypesEra::Go126, TypesEra::Go127], true, false),
        },
    };
    let mut fits = Vec::new();
    let mut why = Vec::new();
    for &era in eras {
        match moduledata::type_tables(mem, md, ptr_size, era) {
            Ok(t) => fits.push(t),
            Err(e) => why.push(format!("{era:?}: {e}")),
        }
    }
    let tables = match fits.as_slice() {
        [one] => *one,
        [] => return Err(TypeError::Unavailable(format!("module data has no type tables ({})", why.join("; ")))),
        many => {
            let eras: Vec<String> = many.iter().map(|t| format!("{:?}", t.era)).collect();
            return Err(TypeError::Unavailable(format!(
                "the module data fits more than one layout ({}); refusing to pick",
                eras.join(", ")
            )));
        }
    };
    // From internal/abi/map.go of Go 1.27; a later release may add fields.
    let map_type_size = match (tables.era, minor) {
        (TypesEra::Go127, Some(27)) => Some(136),
        _ => None,
    };
    Ok(TypeSetup { tables, format: Format { varint_names, shifted_offsets, map_type_size } })
}

/// A type's kind (`abi.Kind`, the low 5 bits of the kind byte).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Bool,
    Int,
    Int8,
    Int16,
    Int32,
    Int64,
    Uint,
    Uint8,
    Uint16,
    Uint32,
    Uint64,
    Uintptr,
    Float32,
    Float64,
    Complex64,
    Complex128,
    Array,
    Chan,
    Func,
    Interface,
    Map,
    Pointer,
    Slice,
    String,
    Struct,
    UnsafePointer,
}

const KINDS: [Kind; 26] = [
    Kind::Bool,
    Kind::Int,
    Kind::Int8,
    Kind::Int16,
    Kind::Int32,
    Kind::Int64,
    Kind::Uint,
    Kind::Uint8,
    Kind::Uint16,
    Kind::Uint32,
    Kind::Uint64,
    Kind::Uintptr,
    Kind::Float32,
    Kind::Float64,
    Kind::Complex64,
    Kind::Complex128,
    Kind::Array,
    Kind::Chan,
    Kind::Func,
    Kind::Interface,
    Kind::Map,
    Kind::Pointer,
    Kind::Slice,
    Kind::String,
    Kind::Struct,
    Kind::UnsafePointer,
];

impl Kind {
    fn from_byte(b: u8) -> Option<Kind> {
        // Bit 5 was kindDirectIface and bit 6 kindGCProg in older releases.
        let k = usize::from(b & 0x1f);
        KINDS.get(k.checked_sub(1)?).copied()
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Bool => "bool",
            Kind::Int => "int",
            Kind::Int8 => "int8",
            Kind::Int16 => "int16",
            Kind::Int32 => "int32",
            Kind::Int64 => "int64",
            Kind::Uint => "uint",
            Kind::Uint8 => "uint8",
            Kind::Uint16 => "uint16",
            Kind::Uint32 => "uint32",
            Kind::Uint64 => "uint64",
            Kind::Uintptr => "uintptr",
            Kind::Float32 => "float32",
            Kind::Float64 => "float64",
            Kind::Complex64 => "complex64",
            Kind::Complex128 => "complex128",
            Kind::Array => "array",
            Kind::Chan => "chan",
            Kind::Func => "func",
            Kind::Interface => "interface",
            Kind::Map => "map",
            Kind::Pointer => "pointer",
            Kind::Slice => "slice",
            Kind::String => "string",
            Kind::Struct => "struct",
            Kind::UnsafePointer => "unsafe.Pointer",
        }
    }
}

// The common header (`abi.Type`, 64-bit): size, ptrdata, hash u32, tflag,
// align, fieldAlign, kind, equal, gcdata, str nameOff, ptrToThis typeOff.
const HEADER: u64 = 48;
const OFF_TFLAG: u64 = 20;
const OFF_ALIGN: u64 = 21;
const OFF_FIELD_ALIGN: u64 = 22;
const OFF_KIND: u64 = 23;
const OFF_STR: u64 = 40;
const OFF_PTR_TO_THIS: u64 = 44;
const TFLAG_UNCOMMON: u8 = 1 << 0;
const TFLAG_EXTRA_STAR: u8 = 1 << 1;
const TFLAG_NAMED: u8 = 1 << 2;
/// Flags above bit 5 (TFlagDirectIface, 1.26+) are unknown: a descriptor
/// that sets them is not one this reader understands.
const TFLAG_KNOWN: u8 = 0x3f;
const UNCOMMON: u64 = 16;
const METHOD: u64 = 16;
const IMETHOD: u64 = 8;
const FIELD: u64 = 24;

/// The decoded common header of one descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub addr: u64,
    pub size: u64,
    pub tflag: u8,
    pub align: u8,
    pub field_align: u8,
    pub kind: Kind,
    pub str_off: i32,
    pub ptr_to_this: i32,
}

/// A type found by name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TypeInfo {
    pub name: String,
    /// Import path of the defining package (named types only).
    pub pkg_path: Option<String>,
    pub kind: Kind,
    pub size: u64,
    /// Address of the descriptor (link-time).
    pub address: u64,
}

/// A struct's layout as the compiler laid it out for this binary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StructLayout {
    /// As Go prints it, e.g. `mvccpb.Event`.
    pub name: String,
    pub pkg_path: Option<String>,
    pub size: u64,
    pub align: u8,
    pub fields: Vec<FieldLayout>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FieldLayout {
    pub name: String,
    pub offset: u64,
    pub size: u64,
    pub type_name: String,
    pub embedded: bool,
}

impl StructLayout {
    pub fn field(&self, name: &str) -> Option<&FieldLayout> {
        self.fields.iter().find(|f| f.name == name)
    }
}

/// A decoded name (`abi.Name`).
struct Name {
    text: String,
    embedded: bool,
}

/// Reads descriptors of one binary.
pub struct Reader<'a> {
    pub mem: &'a dyn Memory,
    pub setup: TypeSetup,
}

impl Reader<'_> {
    fn types(&self) -> u64 {
        self.setup.tables.types
    }
    fn etypes(&self) -> u64 {
        self.setup.tables.etypes
    }

    /// `len` bytes at `addr`, which must lie inside `[types, etypes)`.
    fn bytes(&self, addr: u64, len: u64, what: &str) -> Result<&[u8], TypeError> {
        let end = addr.checked_add(len).ok_or_else(|| corrupt(addr, format!("{what}: address overflows")))?;
        if addr < self.types() || end > self.etypes() {
            return Err(corrupt(addr, format!("{what} ({len} bytes) is outside the type section")));
        }
        self.mem.bytes(addr, len).ok_or_else(|| corrupt(addr, format!("{what} is not in the file")))
    }

    fn u8_at(&self, addr: u64, what: &str) -> Result<u8, TypeError> {
        self.bytes(addr, 1, what)?.first().copied().ok_or_else(|| corrupt(addr, what.to_string()))
    }

    fn u16_at(&self, addr: u64, what: &str) -> Result<u16, TypeError> {
        let b = self.bytes(addr, 2, what)?;
        Ok(u16::from_le_bytes([b.first().copied().unwrap_or(0), b.get(1).copied().unwrap_or(0)]))
    }

    fn u32_at(&self, addr: u64, what: &str) -> Result<u32, TypeError> {
        let b = self.bytes(addr, 4, what)?;
        let a: [u8; 4] = b.try_into().map_err(|_| corrupt(addr, what.to_string()))?;
        Ok(u32::from_le_bytes(a))
    }

    /// A pointer-sized word (relocation-aware: PIE data holds zeros there).
    fn word(&self, addr: u64, what: &str) -> Result<u64, TypeError> {
        self.bytes(addr, 8, what)?;
        self.mem.ptr(addr, 8).ok_or_else(|| corrupt(addr, format!("{what} is unreadable")))
    }

    /// A `*Type` field: must point at a descriptor in the section.
    fn type_ptr(&self, addr: u64, what: &str) -> Result<u64, TypeError> {
        let p = self.word(addr, what)?;
        self.check_type_addr(p).map_err(|r| corrupt(addr, format!("{what} {p:#x}: {r}")))?;
        Ok(p)
    }

    fn check_type_addr(&self, p: u64) -> Result<(), String> {
        let in_range = p >= self.types() && p.checked_add(HEADER).is_some_and(|e| e <= self.etypes());
        if !in_range {
            return Err("not a descriptor in the type section".into());
        }
        if !p.is_multiple_of(8) {
            return Err("misaligned descriptor".into());
        }
        Ok(())
    }

    /// A nameOff/typeOff relative to `types`; `None` for 0 and -1 (the
    /// linker's "none" and "unreachable method").
    fn resolve_off(&self, off: i32) -> Option<u64> {
        if off == 0 || off == -1 {
            return None;
        }
        let off = u64::try_from(off).ok()?;
        self.types().checked_add(off).filter(|&a| a < self.etypes())
    }

    pub fn header(&self, addr: u64) -> Result<Header, TypeError> {
        self.check_type_addr(addr).map_err(|r| corrupt(addr, r))?;
        let b = self.bytes(addr, HEADER, "type header")?;
        let byte = |o: u64| b.get(o as usize).copied().unwrap_or(0);
        let i32_at = |o: u64| {
            let o = o as usize;
            b.get(o..o + 4).and_then(|s| s.try_into().ok()).map(i32::from_le_bytes).unwrap_or(0)
        };
        let size = self.word(addr, "type size")?;
        let kind_byte = byte(OFF_KIND);
        let kind = Kind::from_byte(kind_byte).ok_or_else(|| corrupt(addr, format!("invalid kind {kind_byte:#x}")))?;
        let tflag = byte(OFF_TFLAG);
        if tflag & !TFLAG_KNOWN != 0 {
            return Err(corrupt(addr, format!("unknown tflag bits {tflag:#x}")));
        }
        let (align, field_align) = (byte(OFF_ALIGN), byte(OFF_FIELD_ALIGN));
        if !align.is_power_of_two() || !field_align.is_power_of_two() {
            return Err(corrupt(addr, format!("alignment {align}/{field_align} is not a power of two")));
        }
        let str_off = i32_at(OFF_STR);
        if self.resolve_off(str_off).is_none() {
            return Err(corrupt(addr, format!("name offset {str_off:#x} is outside the type section")));
        }
        let ptr_to_this = i32_at(OFF_PTR_TO_THIS);
        if ptr_to_this != 0 && self.resolve_off(ptr_to_this).is_none() {
            return Err(corrupt(addr, format!("ptrToThis {ptr_to_this:#x} is outside the type section")));
        }
        Ok(Header { addr, size, tflag, align, field_align, kind, str_off, ptr_to_this })
    }

    /// The name at `addr` (an `abi.Name`'s bytes).
    fn name_at(&self, addr: u64) -> Result<Name, TypeError> {
        let flags = self.u8_at(addr, "name flags")?;
        let (len, header) = if self.setup.format.varint_names {
            let mut len: u64 = 0;
            let mut n: u64 = 0;
            loop {
                let at = addr.checked_add(1 + n).ok_or_else(|| corrupt(addr, "name overflows"))?;
                let x = self.u8_at(at, "name length")?;
                len |= u64::from(x & 0x7f) << (7 * n);
                n += 1;
                if x & 0x80 == 0 {
                    break;
                }
                if n >= 4 {
                    return Err(corrupt(addr, "name length varint is too long"));
                }
            }
            (len, 1 + n)
        } else {
            let b =
                self.bytes(addr.checked_add(1).ok_or_else(|| corrupt(addr, "name overflows"))?, 2, "name length")?;
            (u64::from(u16::from_be_bytes([b.first().copied().unwrap_or(0), b.get(1).copied().unwrap_or(0)])), 3)
        };
        if len > MAX_NAME {
            return Err(corrupt(addr, format!("name of {len} bytes")));
        }
        let start = addr.checked_add(header).ok_or_else(|| corrupt(addr, "name overflows"))?;
        let text = std::str::from_utf8(self.bytes(start, len, "name")?)
            .map_err(|_| corrupt(addr, "name is not UTF-8"))?
            .to_string();
        Ok(Name { text, embedded: flags & (1 << 3) != 0 })
    }

    fn name_off(&self, off: i32, owner: u64) -> Result<String, TypeError> {
        let a = self.resolve_off(off).ok_or_else(|| corrupt(owner, format!("name offset {off:#x} out of range")))?;
        Ok(self.name_at(a)?.text)
    }

    /// The type's string as Go prints it (`mvccpb.Event`, `[]uint8`).
    pub fn type_string(&self, h: &Header) -> Result<String, TypeError> {
        let s = self.name_off(h.str_off, h.addr)?;
        if h.tflag & TFLAG_EXTRA_STAR != 0 {
            return s
                .strip_prefix('*')
                .map(str::to_string)
                .ok_or_else(|| corrupt(h.addr, "extra-star name without '*'"));
        }
        Ok(s)
    }

    /// Size of the kind-specific struct (where the uncommon type follows).
    fn base_size(&self, k: Kind) -> Option<u64> {
        Some(match k {
            Kind::Array => HEADER + 24,
            Kind::Chan => HEADER + 16,
            Kind::Func => HEADER + 8,
            Kind::Interface | Kind::Struct => HEADER + 32,
            Kind::Pointer | Kind::Slice => HEADER + 8,
            Kind::Map => return self.setup.format.map_type_size,
            _ => HEADER,
        })
    }

    /// The uncommon type's address, when it has one and it can be placed.
    fn uncommon(&self, h: &Header) -> Option<u64> {
        if h.tflag & TFLAG_UNCOMMON == 0 {
            return None;
        }
        h.addr.checked_add(self.base_size(h.kind)?)
    }

    /// Import path of a named type's package.
    pub fn pkg_path(&self, h: &Header) -> Result<Option<String>, TypeError> {
        if let Some(u) = self.uncommon(h) {
            let off = self.u32_at(u, "uncommon pkgPath")? as i32;
            if off != 0 {
                return Ok(Some(self.name_off(off, h.addr)?));
            }
        }
        // Structs also record the package of their unexported fields.
        if h.kind == Kind::Struct {
            let p = self.word(h.addr + HEADER, "struct pkgPath")?;
            if p != 0 {
                return Ok(Some(self.name_at(p)?.text));
            }
        }
        Ok(None)
    }

    /// A `{ptr, len, cap}` header of an array of `elem`-byte records in the section.
    fn slice(&self, at: u64, elem: u64, what: &str) -> Result<(u64, u64), TypeError> {
        let (p, l, c) = (self.word(at, what)?, self.word(at + 8, what)?, self.word(at + 16, what)?);
        if l != c || l > MAX_MEMBERS {
            return Err(corrupt(at, format!("{what}: len {l}, cap {c}")));
        }
        if l > 0 {
            self.bytes(p, l * elem, what)?;
        }
        Ok((p, l))
    }

    /// Descriptors this one refers to directly.
    fn edges(&self, h: &Header, out: &mut Vec<u64>) -> Result<(), TypeError> {
        let a = h.addr;
        if let Some(p) = self.resolve_off(h.ptr_to_this) {
            out.push(p);
        }
        match h.kind {
            Kind::Pointer | Kind::Slice | Kind::Chan => out.push(self.type_ptr(a + HEADER, "elem")?),
            Kind::Array => {
                out.push(self.type_ptr(a + HEADER, "array elem")?);
                out.push(self.type_ptr(a + HEADER + 8, "array slice")?);
            }
            Kind::Map => {
                out.push(self.type_ptr(a + HEADER, "map key")?);
                out.push(self.type_ptr(a + HEADER + 8, "map elem")?);
            }
            Kind::Struct => {
                let (p, n) = self.slice(a + HEADER + 8, FIELD, "struct fields")?;
                for i in 0..n {
                    out.push(self.type_ptr(p + i * FIELD + 8, "field type")?);
                }
            }
            Kind::Func => {
                let n_in = u64::from(self.u16_at(a + HEADER, "func inCount")?);
                let n_out = u64::from(self.u16_at(a + HEADER + 2, "func outCount")? & 0x7fff);
                let params = a + HEADER + 8 + if h.tflag & TFLAG_UNCOMMON != 0 { UNCOMMON } else { 0 };
                for i in 0..n_in + n_out {
                    out.push(self.type_ptr(params + i * 8, "func parameter")?);
                }
            }
            Kind::Interface => {
                let (p, n) = self.slice(a + HEADER + 8, IMETHOD, "interface methods")?;
                for i in 0..n {
                    let off = self.u32_at(p + i * IMETHOD + 4, "imethod type")? as i32;
                    out.extend(self.resolve_off(off));
                }
            }
            _ => {}
        }
        if let Some(u) = self.uncommon(h) {
            let mcount = u64::from(self.u16_at(u + 4, "uncommon mcount")?);
            let moff = u64::from(self.u32_at(u + 8, "uncommon moff")?);
            let m = u.checked_add(moff).ok_or_else(|| corrupt(a, "method offset overflows"))?;
            if mcount > 0 {
                self.bytes(m, mcount * METHOD, "methods")?;
            }
            for i in 0..mcount {
                let off = self.u32_at(m + i * METHOD + 4, "method type")? as i32;
                out.extend(self.resolve_off(off));
            }
        }
        Ok(())
    }

    /// Total size of a descriptor laid out back to back (Go 1.27+ typelinks
    /// region; `abi.Type.DescriptorSize`), checking that its trailing
    /// arrays are where that layout puts them.
    fn descriptor_size(&self, h: &Header) -> Result<u64, TypeError> {
        let a = h.addr;
        let base = self.base_size(h.kind).ok_or_else(|| {
            TypeError::Unavailable(format!("map descriptor size unknown for this Go release (map type at {a:#x})"))
        })?;
        let unc = if h.tflag & TFLAG_UNCOMMON != 0 { UNCOMMON } else { 0 };
        let data = a + base + unc;
        let add = match h.kind {
            Kind::Func => {
                let n_in = u64::from(self.u16_at(a + HEADER, "func inCount")?);
                let n_out = u64::from(self.u16_at(a + HEADER + 2, "func outCount")? & 0x7fff);
                (n_in + n_out) * 8
            }
            Kind::Struct | Kind::Interface => {
                let rec = if h.kind == Kind::Struct { FIELD } else { IMETHOD };
                let (p, n) = self.slice(a + HEADER + 8, rec, "members")?;
                if n > 0 && p != data {
                    return Err(corrupt(a, format!("members at {p:#x}, not right after the descriptor ({data:#x})")));
                }
                n * rec
            }
            _ => 0,
        };
        let mut size = base + unc + add;
        if unc != 0 {
            let mcount = u64::from(self.u16_at(a + base + 4, "uncommon mcount")?);
            let moff = u64::from(self.u32_at(a + base + 8, "uncommon moff")?);
            if mcount > 0 && moff != UNCOMMON + add {
                return Err(corrupt(a, format!("methods at uncommon+{moff:#x}, expected +{:#x}", UNCOMMON + add)));
            }
            size += mcount * METHOD;
        }
        Ok(size)
    }

    /// The descriptors the module data lists (the graph's roots).
    fn roots(&self) -> Result<Vec<u64>, TypeError> {
        let types = self.types();
        match self.setup.tables.roots {
            TypeRoots::Typelinks { addr, len } => {
                let b = self
                    .mem
                    .bytes(addr, len.saturating_mul(4))
                    .ok_or_else(|| corrupt(addr, "typelinks are not in the file"))?;
                let mut out = Vec::with_capacity(b.len() / 4);
                for c in b.chunks_exact(4) {
                    let off = i32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                    let a = u64::try_from(off).ok().and_then(|o| types.checked_add(o));
                    match a {
                        Some(a) if a < self.etypes() => out.push(a),
                        _ => return Err(corrupt(addr, format!("typelink offset {off:#x} outside the type section"))),
                    }
                }
                Ok(out)
            }
            TypeRoots::Descriptors { len } => {
                let end = types.checked_add(len).ok_or_else(|| corrupt(types, "typedesclen overflows"))?;
                let mut td = types + 8;
                let mut out = Vec::new();
                while td < end {
                    td = td.checked_add(7).map(|x| x & !7).ok_or_else(|| corrupt(td, "overflow"))?;
                    if td >= end {
                        break;
                    }
                    if out.len() >= MAX_TYPES {
                        return Err(TypeError::Limit(format!("more than {MAX_TYPES} typelinked descriptors")));
                    }
                    let h = self
                        .header(td)
                        .map_err(|e| corrupt(td, format!("walk of the typelinked descriptors lost step: {e}")))?;
                    out.push(td);
                    let size = self.descriptor_size(&h)?;
                    td = td.checked_add(size).ok_or_else(|| corrupt(td, "descriptor size overflows"))?;
                }
                if td != end {
                    return Err(corrupt(
                        td,
                        format!("walk of the typelinked descriptors ends at {td:#x}, not {end:#x}"),
                    ));
                }
                Ok(out)
            }
        }
    }

    /// Every descriptor reachable from the roots, by type string.
    pub fn index(&self) -> Result<TypeIndex, TypeError> {
        let mut queue: VecDeque<u64> = self.roots()?.into();
        let mut seen: HashSet<u64> = queue.iter().copied().collect();
        let mut by_name: HashMap<String, Vec<u64>> = HashMap::new();
        let mut edges = Vec::new();
        while let Some(a) = queue.pop_front() {
            let h = self.header(a)?;
            by_name.entry(self.type_string(&h)?).or_default().push(a);
            edges.clear();
            self.edges(&h, &mut edges)?;
            for &e in &edges {
                if seen.insert(e) {
                    if seen.len() > MAX_TYPES {
                        return Err(TypeError::Limit(format!("more than {MAX_TYPES} reachable types")));
                    }
                    queue.push_back(e);
                }
            }
        }
        Ok(TypeIndex { by_name, count: seen.len() })
    }

    pub fn info(&self, addr: u64) -> Result<TypeInfo, TypeError> {
        let h = self.header(addr)?;
        Ok(TypeInfo {
            name: self.type_string(&h)?,
            pkg_path: if h.tflag & TFLAG_NAMED != 0 { self.pkg_path(&h)? } else { None },
            kind: h.kind,
            size: h.size,
            address: addr,
        })
    }

    /// The layout of the struct type at `addr`.
    pub fn struct_at(&self, addr: u64) -> Result<StructLayout, TypeError> {
        let h = self.header(addr)?;
        let name = self.type_string(&h)?;
        if h.kind != Kind::Struct {
            return Err(TypeError::NotStruct { name, kind: h.kind.as_str() });
        }
        let (p, n) = self.slice(addr + HEADER + 8, FIELD, "struct fields")?;
        let mut fields = Vec::with_capacity(n as usize);
        let mut end = 0u64;
        for i in 0..n {
            let f = p + i * FIELD;
            let name_ptr = self.word(f, "field name")?;
            let fname = self.name_at(name_ptr)?;
            let th = self.header(self.type_ptr(f + 8, "field type")?)?;
            let raw = self.word(f + 16, "field offset")?;
            let (offset, embedded) =
                if self.setup.format.shifted_offsets { (raw >> 1, raw & 1 != 0) } else { (raw, fname.embedded) };
            let fend = offset.checked_add(th.size).ok_or_else(|| corrupt(addr, "field end overflows"))?;
            // The compiler lays fields out in order, aligned, inside the struct.
            if offset < end || fend > h.size || offset % u64::from(th.field_align) != 0 {
                return Err(corrupt(
                    addr,
                    format!(
                        "field {} at {offset}+{} (align {}) does not fit after {end} in a {}-byte struct",
                        fname.text, th.size, th.field_align, h.size
                    ),
                ));
            }
            end = fend;
            fields.push(FieldLayout {
                name: fname.text,
                offset,
                size: th.size,
                type_name: self.type_string(&th)?,
                embedded,
            });
        }
        Ok(StructLayout { name, pkg_path: self.pkg_path(&h)?, size: h.size, align: h.align, fields })
    }
}

/// Descriptor addresses by type string.
#[derive(Debug, Clone, Default)]
pub struct TypeIndex {
    by_name: HashMap<String, Vec<u64>>,
    count: usize,
}

impl TypeIndex {
    /// How many descriptors were reached.
    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    pub fn addrs(&self, name: &str) -> &[u64] {
        self.by_name.get(name).map(Vec::as_slice).unwrap_or_default()
    }

    /// The one struct named `name` (in `pkg_path`, if given).
    pub fn struct_layout(&self, r: &Reader<'_>, name: &str, pkg_path: Option<&str>) -> Result<StructLayout, TypeError> {
        let mut found = Vec::new();
        for &a in self.addrs(name) {
            let info = r.info(a)?;
            if pkg_path.is_none_or(|p| info.pkg_path.as_deref() == Some(p)) {
                found.push(info);
            }
        }
        match found.as_slice() {
            [] => Err(TypeError::NotFound(match pkg_path {
                Some(p) => format!("{name} in {p}"),
                None => name.to_string(),
            })),
            [one] => r.struct_at(one.address),
            many => Err(TypeError::Ambiguous {
                name: name.to_string(),
                count: many.len(),
                pkg_paths: many.iter().map(|i| i.pkg_path.clone().unwrap_or_else(|| "(none)".into())).collect(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inspect::elf::SliceMemory;

    const TYPES: u64 = 0x10_0000;

    /// A little type section written by hand, as the linker would.
    struct Section {
        data: Vec<u8>,
    }

    impl Section {
        fn new() -> Section {
            // Start with one pointer of padding, as runtime.types does.
            Section { data: vec![0; 8] }
        }
        fn addr(&self) -> u64 {
            TYPES + self.data.len() as u64
        }
        fn align(&mut self) {
            while !self.data.len().is_multiple_of(8) {
                self.data.push(0);
            }
        }
        fn name(&mut self, s: &str, varint: bool, flags: u8) -> u64 {
            let a = self.addr();
            self.data.push(flags);
            if varint {
                let mut n = s.len();
                loop {
                    let b = (n & 0x7f) as u8;
                    n >>= 7;
                    self.data.push(if n > 0 { b | 0x80 } else { b });
                    if n == 0 {
                        break;
                    }
                }
            } else {
                self.data.extend((s.len() as u16).to_be_bytes());
            }
            self.data.extend(s.as_bytes());
            a
        }
        fn off(a: u64) -> i32 {
            (a - TYPES) as i32
        }
        fn word(&mut self, w: u64) {
            self.data.extend(w.to_le_bytes());
        }
        #[allow(clippy::too_many_arguments)]
        fn header(&mut self, size: u64, tflag: u8, align: u8, kind: u8, str_name: u64, ptr_to_this: i32) -> u64 {
            self.align();
            let a = self.addr();
            self.word(size);
            self.word(0);
            self.data.extend(0u32.to_le_bytes());
            self.data.extend([tflag, align, align, kind]);
            self.word(0);
            self.word(0);
            self.data.extend(Self::off(str_name).to_le_bytes());
            self.data.extend(ptr_to_this.to_le_bytes());
            a
        }
        fn set_i32(&mut self, at: u64, v: i32) {
            let o = (at - TYPES) as usize;
            self.data[o..o + 4].copy_from_slice(&v.to_le_bytes());
        }
    }

    /// `type Event struct { Type int32; Kv *KeyValue }` plus `*Event` and
    /// `KeyValue { Key []byte; ModRevision int64 }`, in package mvccpb.
    fn build(f: Format) -> (Vec<u8>, u64, u64) {
        let v = f.varint_names;
        let mut s = Section::new();
        let n_int32 = s.name("int32", v, 0);
        let n_int64 = s.name("int64", v, 0);
        let n_uint8 = s.name("uint8", v, 0);
        let n_bytes = s.name("[]uint8", v, 0);
        let n_kv = s.name("*mvccpb.KeyValue", v, 0);
        let n_ev = s.name("*mvccpb.Event", v, 0);
        let n_pkg = s.name("go.etcd.io/etcd/mvccpb", v, 0);
        let f_type = s.name("Type", v, 1);
        let f_kv = s.name("Kv", v, 1);
        let f_key = s.name("Key", v, 1);
        let f_mod = s.name("ModRevision", v, 1);
        let off = |o: u64| if f.shifted_offsets { o << 1 } else { o };

        let t_int32 = s.header(4, TFLAG_NAMED, 4, 5, n_int32, 0);
        let t_int64 = s.header(8, TFLAG_NAMED, 8, 6, n_int64, 0);
        let t_uint8 = s.header(1, TFLAG_NAMED, 1, 8, n_uint8, 0);
        let t_bytes = s.header(24, 0, 8, 23, n_bytes, 0);
        s.word(t_uint8);
        // KeyValue (named struct with uncommon), then *KeyValue.
        let t_kv = s.header(32, TFLAG_NAMED | TFLAG_UNCOMMON | TFLAG_EXTRA_STAR, 8, 25, n_kv, 0);
        s.word(0);
        let kv_fields_at = s.addr() + 24 + UNCOMMON;
        s.word(kv_fields_at);
        s.word(2);
        s.word(2);
        s.data.extend(Section::off(n_pkg).to_le_bytes());
        s.data.extend([0u8; 12]);
        for (name, t, o) in [(f_key, t_bytes, 0), (f_mod, t_int64, 24)] {
            s.word(name);
            s.word(t);
            s.word(off(o));
        }
        let p_kv = s.header(8, 0, 8, 22, n_kv, 0);
        s.word(t_kv);
        s.set_i32(t_kv + OFF_PTR_TO_THIS, Section::off(p_kv));
        // Event.
        let t_ev = s.header(16, TFLAG_NAMED | TFLAG_UNCOMMON | TFLAG_EXTRA_STAR, 8, 25, n_ev, 0);
        s.word(0);
        let ev_fields_at = s.addr() + 24 + UNCOMMON;
        s.word(ev_fields_at);
        s.word(2);
        s.word(2);
        s.data.extend(Section::off(n_pkg).to_le_bytes());
        s.data.extend([0u8; 12]);
        for (name, t, o) in [(f_type, t_int32, 0), (f_kv, p_kv, 8)] {
            s.word(name);
            s.word(t);
            s.word(off(o));
        }
        let p_ev = s.header(8, 0, 8, 22, n_ev, 0);
        s.word(t_ev);
        s.set_i32(t_ev + OFF_PTR_TO_THIS, Section::off(p_ev));
        (s.data, p_ev, t_ev)
    }

    fn reader<'a>(mem: &'a SliceMemory<'a>, len: usize, root: u64, f: Format) -> (Reader<'a>, Vec<u8>) {
        // One typelink: *Event, as a 4-byte offset stored after the section.
        let links = (Section::off(root)).to_le_bytes().to_vec();
        let tables = TypeTables {
            era: TypesEra::Go120,
            types: TYPES,
            etypes: TYPES + len as u64,
            roots: TypeRoots::Typelinks { addr: TYPES + len as u64, len: 1 },
        };
        (Reader { mem, setup: TypeSetup { tables, format: f } }, links)
    }

    const FORMATS: [Format; 3] = [
        Format { varint_names: false, shifted_offsets: true, map_type_size: Some(88) },
        Format { varint_names: true, shifted_offsets: true, map_type_size: Some(88) },
        Format { varint_names: true, shifted_offsets: false, map_type_size: Some(112) },
    ];

    #[test]
    fn reads_a_struct_layout_in_every_encoding() {
        for f in FORMATS {
            let (mut data, p_ev, _) = build(f);
            let len = data.len();
            data.extend(Section::off(p_ev).to_le_bytes());
            let mem = SliceMemory { base: TYPES, data: &data };
            let (r, _) = reader(&mem, len, p_ev, f);
            let idx = r.index().unwrap();
            assert_eq!(idx.len(), 8, "{f:?}");
            let ev = idx.struct_layout(&r, "mvccpb.Event", None).unwrap();
            assert_eq!((ev.size, ev.pkg_path.as_deref()), (16, Some("go.etcd.io/etcd/mvccpb")));
            let kv = ev.field("Kv").unwrap();
            assert_eq!((kv.offset, kv.size, kv.type_name.as_str()), (8, 8, "*mvccpb.KeyValue"), "{f:?}");
            let kvl = idx.struct_layout(&r, "mvccpb.KeyValue", Some("go.etcd.io/etcd/mvccpb")).unwrap();
            assert_eq!(kvl.field("ModRevision").map(|f| f.offset), Some(24));
            assert_eq!(kvl.field("Key").map(|f| f.type_name.as_str()), Some("[]uint8"));
            assert!(matches!(idx.struct_layout(&r, "mvccpb.KeyValue", Some("other")), Err(TypeError::NotFound(_))));
            assert!(matches!(idx.struct_layout(&r, "*mvccpb.Event", None), Err(TypeError::NotStruct { .. })));
            assert!(matches!(idx.struct_layout(&r, "nope", None), Err(TypeError::NotFound(_))));
        }
    }

    #[test]
    fn the_wrong_offset_encoding_is_refused() {
        // Shifted offsets read as plain put ModRevision at 48 in a 32-byte struct.
        let (mut data, p_ev, _) = build(FORMATS[1]);
        let len = data.len();
        data.extend(Section::off(p_ev).to_le_bytes());
        let mem = SliceMemory { base: TYPES, data: &data };
        let (r, _) = reader(&mem, len, p_ev, FORMATS[2]);
        let idx = r.index().unwrap();
        assert!(matches!(idx.struct_layout(&r, "mvccpb.KeyValue", None), Err(TypeError::Corrupt { .. })));
    }

    #[test]
    fn two_packages_with_one_name_are_ambiguous() {
        let f = FORMATS[2];
        let (mut data, p_ev, t_ev) = build(f);
        let len = data.len();
        data.extend(Section::off(p_ev).to_le_bytes());
        let mem = SliceMemory { base: TYPES, data: &data };
        let (r, _) = reader(&mem, len, p_ev, f);
        let mut idx = r.index().unwrap();
        // The same descriptor listed twice stands in for a second package.
        idx.by_name.get_mut("mvccpb.Event").unwrap().push(t_ev);
        assert!(matches!(idx.struct_layout(&r, "mvccpb.Event", None), Err(TypeError::Ambiguous { count: 2, .. })));
    }

    #[test]
    fn damaged_bytes_are_errors_not_panics() {
        let f = FORMATS[2];
        let (mut data, p_ev, _) = build(f);
        let len = data.len();
        data.extend(Section::off(p_ev).to_le_bytes());
        for i in 0..data.len() {
            for bit in [0x01u8, 0x10, 0x80] {
                let mut bad = data.clone();
                bad[i] ^= bit;
                let mem = SliceMemory { base: TYPES, data: &bad };
                let (r, _) = reader(&mem, len, p_ev, f);
                if let Ok(idx) = r.index() {
                    let _ = idx.struct_layout(&r, "mvccpb.Event", None);
                    let _ = idx.struct_layout(&r, "mvccpb.KeyValue", None);
                }
            }
        }
    }

    #[test]
    fn walks_back_to_back_descriptors() {
        // Go 1.27+: the typelinked descriptors (here *int and a struct
        // with inline fields) follow runtime.types' first word.
        let f = FORMATS[2];
        let mut s = Section::new();
        let p_int = s.header(8, 0, 8, 22, TYPES, 0);
        let t_int_at = s.addr() + 8 + 80 + 24;
        s.word(t_int_at);
        let st = s.header(8, 0, 8, 25, TYPES, 0);
        s.word(0);
        s.word(s.addr() + 24);
        s.word(1);
        s.word(1);
        let field_at = s.addr();
        s.word(0);
        s.word(t_int_at);
        s.word(0);
        let desclen = s.addr() - TYPES;
        let t_int = s.header(8, TFLAG_NAMED, 8, 2, TYPES, 0);
        assert_eq!(t_int, t_int_at);
        assert_eq!(p_int, TYPES + 8);
        for (t, n) in [(p_int, "*int"), (st, "struct { A int }"), (t_int, "int")] {
            let a = s.name(n, true, 0);
            s.set_i32(t + OFF_STR, Section::off(a));
        }
        let f_a = s.name("A", true, 1);
        let o = (field_at - TYPES) as usize;
        s.data[o..o + 8].copy_from_slice(&f_a.to_le_bytes());
        let mem = SliceMemory { base: TYPES, data: &s.data };
        let tables = TypeTables {
            era: TypesEra::Go127,
            types: TYPES,
            etypes: TYPES + s.data.len() as u64,
            roots: TypeRoots::Descriptors { len: desclen },
        };
        let r = Reader { mem: &mem, setup: TypeSetup { tables, format: f } };
        assert_eq!(r.roots().unwrap(), vec![p_int, st]);
        let l = r.index().unwrap().struct_layout(&r, "struct { A int }", None).unwrap();
        assert_eq!((l.size, l.fields[0].name.as_str(), l.fields[0].type_name.as_str()), (8, "A", "int"));
        // A length that ends inside a descriptor loses step: an error.
        let tables = TypeTables { roots: TypeRoots::Descriptors { len: desclen - 8 }, ..tables };
        let r = Reader { mem: &mem, setup: TypeSetup { tables, format: f } };
        assert!(r.roots().is_err());
    }
}
