//! Go's function table (`runtime.pclntab`): names, entries and sizes.
//!
//! Four layouts exist, told apart by the magic in the first word:
//! 0xfffffffb (Go 1.2–1.15), 0xfffffffa (1.16–1.17), 0xfffffff0 (1.18–1.19)
//! and 0xfffffff1 (1.20+). From 1.18 on, entries are 32-bit offsets from the
//! module's text start, which the header's `textStart` word held until Go
//! 1.26 stopped writing it (it is 0 there; the runtime module data has it).
//! This module only reads the table: which text start to add is decided by
//! the caller, from the header, the module data and the symbol table.
//!
//! Every read is bounds-checked: the table comes from an untrusted file.

use serde::Serialize;

use super::elf::{read_u32, read_uint};

pub const MAGIC_GO12: u32 = 0xffff_fffb;
pub const MAGIC_GO116: u32 = 0xffff_fffa;
pub const MAGIC_GO118: u32 = 0xffff_fff0;
pub const MAGIC_GO120: u32 = 0xffff_fff1;

/// Longest function name accepted (generic instantiations can be long).
const MAX_NAME: usize = 1 << 16;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PclnError {
    #[error("unknown pclntab magic {0:#010x}")]
    UnknownMagic(u32),
    #[error("{0}")]
    Corrupt(String),
}

fn corrupt<T>(msg: impl Into<String>) -> Result<T, PclnError> {
    Err(PclnError::Corrupt(msg.into()))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum PclnVersion {
    #[serde(rename = "go1.2")]
    Go12,
    #[serde(rename = "go1.16")]
    Go116,
    #[serde(rename = "go1.18")]
    Go118,
    #[serde(rename = "go1.20")]
    Go120,
}

impl PclnVersion {
    pub fn from_magic(magic: u32) -> Option<PclnVersion> {
        match magic {
            MAGIC_GO12 => Some(PclnVersion::Go12),
            MAGIC_GO116 => Some(PclnVersion::Go116),
            MAGIC_GO118 => Some(PclnVersion::Go118),
            MAGIC_GO120 => Some(PclnVersion::Go120),
            _ => None,
        }
    }
    /// Entries are offsets from the text start (1.18+), not addresses.
    pub fn relative_entries(self) -> bool {
        matches!(self, PclnVersion::Go118 | PclnVersion::Go120)
    }
    pub fn describe(self) -> &'static str {
        match self {
            PclnVersion::Go12 => "Go 1.2-1.15",
            PclnVersion::Go116 => "Go 1.16-1.17",
            PclnVersion::Go118 => "Go 1.18-1.19",
            PclnVersion::Go120 => "Go 1.20+",
        }
    }
}

/// Where the parts of the table are, as offsets from its start. Plain data,
/// so it can be stored beside the file bytes and re-applied without parsing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PclnLayout {
    pub version: PclnVersion,
    pub magic: u32,
    pub quantum: u8,
    pub ptr_size: u8,
    pub nfunc: usize,
    /// Offset of the header's textStart word (1.18+), whose in-file value
    /// may need a relocation (PIE) or be 0 (Go 1.26+).
    pub text_start_word: Option<usize>,
    /// In-file value of that word.
    pub text_start_raw: u64,
    pub funcnametab: usize,
    pub cutab: usize,
    pub filetab: usize,
    pub pctab: usize,
    /// Base that `funcoff` in the function table is relative to.
    pub funcdata: usize,
    pub functab: usize,
    /// Size of one functab field: 4 from 1.18 on, a pointer before.
    pub field: usize,
    /// Offsets of the header words, for cross-checking the module data.
    pub header_offsets: [u64; 5],
}

/// A function table read from `data` (which starts at the magic).
#[derive(Debug, Clone, Copy)]
pub struct Pclntab<'a> {
    pub layout: PclnLayout,
    data: &'a [u8],
}

/// One function's raw record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawFunc {
    /// Address (before 1.18) or offset from the text start (1.18+).
    pub entry_raw: u64,
    /// The next function's entry (or the table's end), same units.
    pub next_raw: u64,
    pub name_off: u32,
    pub pcsp: u32,
}

impl<'a> Pclntab<'a> {
    /// Parses and validates the header and the function table (entries must
    /// be sorted and every record must be in bounds).
    pub fn parse(data: &'a [u8]) -> Result<Pclntab<'a>, PclnError> {
        let Some(magic) = read_u32(data, 0) else {
            return corrupt("table shorter than its magic");
        };
        let version = PclnVersion::from_magic(magic).ok_or(PclnError::UnknownMagic(magic))?;
        let (Some(&pad1), Some(&pad2), Some(&quantum), Some(&ptr_size)) =
            (data.get(4), data.get(5), data.get(6), data.get(7))
        else {
            return corrupt("header truncated");
        };
        if pad1 != 0 || pad2 != 0 {
            return corrupt("header padding is not zero");
        }
        if !matches!(quantum, 1 | 2 | 4) {
            return corrupt(format!("bad instruction quantum {quantum}"));
        }
        if !matches!(ptr_size, 4 | 8) {
            return corrupt(format!("bad pointer size {ptr_size}"));
        }
        let ps = usize::from(ptr_size);
        let word = |i: usize| -> Result<u64, PclnError> {
            let at = i.checked_mul(ps).and_then(|o| o.checked_add(8));
            at.and_then(|at| data.get(at..))
                .and_then(|b| read_uint(b, ptr_size))
                .ok_or_else(|| PclnError::Corrupt("header truncated".into()))
        };
        let off = |v: u64, what: &str| -> Result<usize, PclnError> {
            match usize::try_from(v) {
                Ok(o) if o <= data.len() => Ok(o),
                _ => corrupt(format!("{what} offset {v:#x} is past the table's end ({:#x})", data.len())),
            }
        };
        let nfunc_raw = word(0)?;
        let layout = match version {
            PclnVersion::Go12 => {
                let functab = 8 + ps;
                PclnLayout {
                    version,
                    magic,
                    quantum,
                    ptr_size,
                    nfunc: 0,
                    text_start_word: None,
                    text_start_raw: 0,
                    funcnametab: 0,
                    cutab: 0,
                    filetab: 0,
                    pctab: 0,
                    funcdata: 0,
                    functab,
                    field: ps,
                    header_offsets: [0; 5],
                }
            }
            PclnVersion::Go116 => {
                let h = [word(2)?, word(3)?, word(4)?, word(5)?, word(6)?];
                let pcln = off(h[4], "function table")?;
                PclnLayout {
                    version,
                    magic,
                    quantum,
                    ptr_size,
                    nfunc: 0,
                    text_start_word: None,
                    text_start_raw: 0,
                    funcnametab: off(h[0], "name table")?,
                    cutab: off(h[1], "compilation unit table")?,
                    filetab: off(h[2], "file table")?,
                    pctab: off(h[3], "pc-value table")?,
                    funcdata: pcln,
                    functab: pcln,
                    field: ps,
                    header_offsets: h,
                }
            }
            PclnVersion::Go118 | PclnVersion::Go120 => {
                let h = [word(3)?, word(4)?, word(5)?, word(6)?, word(7)?];
                let pcln = off(h[4], "function table")?;
                PclnLayout {
                    version,
                    magic,
                    quantum,
                    ptr_size,
                    nfunc: 0,
                    text_start_word: Some(8 + 2 * ps),
                    text_start_raw: word(2)?,
                    funcnametab: off(h[0], "name table")?,
                    cutab: off(h[1], "compilation unit table")?,
                    filetab: off(h[2], "file table")?,
                    pctab: off(h[3], "pc-value table")?,
                    funcdata: pcln,
                    functab: pcln,
                    field: 4,
                    header_offsets: h,
                }
            }
        };
        // Each function needs at least two functab fields; a count larger than
        // that bound is corruption, and checking it first keeps the
        // arithmetic below from overflowing.
        let max_funcs = data.len() / (2 * layout.field);
        let nfunc = match usize::try_from(nfunc_raw) {
            Ok(n) if n > 0 && n <= max_funcs => n,
            _ => return corrupt(format!("implausible function count {nfunc_raw}")),
        };
        let layout = PclnLayout { nfunc, ..layout };
        let functab_len = (2 * nfunc + 1) * layout.field;
        match layout.functab.checked_add(functab_len) {
            Some(end) if end <= data.len() => {}
            _ => return corrupt(format!("function table of {nfunc} entries runs past the table's end")),
        }
        let t = Pclntab { layout, data };
        // Sorted entries are what makes sizes and address lookups meaningful;
        // one pass over the (small) table catches most corruption early.
        let mut prev = t.entry_raw(0)?;
        for i in 1..=nfunc {
            let e = t.entry_raw(i)?;
            if e < prev {
                return corrupt(format!("function table is not sorted at entry {i}"));
            }
            prev = e;
        }
        Ok(t)
    }

    /// Re-applies a layout from a previous `parse` of the same bytes.
    pub fn from_layout(data: &'a [u8], layout: PclnLayout) -> Pclntab<'a> {
        Pclntab { layout, data }
    }

    pub fn data(&self) -> &'a [u8] {
        self.data
    }

    pub fn nfunc(&self) -> usize {
        self.layout.nfunc
    }

    fn field_at(&self, at: usize) -> Result<u64, PclnError> {
        let v = if self.layout.field == 4 {
            read_u32(self.data, at).map(u64::from)
        } else {
            self.data.get(at..).and_then(|b| read_uint(b, self.layout.ptr_size))
        };
        v.ok_or_else(|| PclnError::Corrupt(format!("read past the table's end at {at:#x}")))
    }

    /// Entry `i` of the function table (`i == nfunc` is the end of the text).
    pub fn entry_raw(&self, i: usize) -> Result<u64, PclnError> {
        let at = i
            .checked_mul(2 * self.layout.field)
            .and_then(|o| o.checked_add(self.layout.functab))
            .ok_or_else(|| PclnError::Corrupt("entry index overflows".into()))?;
        self.field_at(at)
    }

    fn funcoff(&self, i: usize) -> Result<usize, PclnError> {
        let at = i
            .checked_mul(2)
            .and_then(|o| o.checked_add(1))
            .and_then(|o| o.checked_mul(self.layout.field))
            .and_then(|o| o.checked_add(self.layout.functab))
            .ok_or_else(|| PclnError::Corrupt("entry index overflows".into()))?;
        let off = self.field_at(at)?;
        usize::try_from(off)
            .ok()
            .and_then(|o| o.checked_add(self.layout.funcdata))
            .filter(|&o| o < self.data.len())
            .ok_or_else(|| PclnError::Corrupt(format!("function {i}: record offset {off:#x} out of bounds")))
    }

    /// The `_func` record of function `i`, cross-checked against the table.
    pub fn func(&self, i: usize) -> Result<RawFunc, PclnError> {
        if i >= self.layout.nfunc {
            return corrupt(format!("function index {i} out of range"));
        }
        let entry_raw = self.entry_raw(i)?;
        let next_raw = self.entry_raw(i + 1)?;
        let base = self.funcoff(i)?;
        // The record repeats the entry: a mismatch means a wrong funcoff.
        let rec_entry = if self.layout.version.relative_entries() {
            read_u32(self.data, base).map(u64::from)
        } else {
            self.data.get(base..).and_then(|b| read_uint(b, self.layout.ptr_size))
        };
        match rec_entry {
            Some(e) if e == entry_raw => {}
            Some(e) => {
                return corrupt(format!("function {i}: record entry {e:#x} disagrees with table entry {entry_raw:#x}"));
            }
            None => return corrupt(format!("function {i}: record truncated")),
        }
        let first = if self.layout.version.relative_entries() { 4 } else { usize::from(self.layout.ptr_size) };
        let field = |n: usize| -> Result<u32, PclnError> {
            base.checked_add(first + (n - 1) * 4)
                .and_then(|at| read_u32(self.data, at))
                .ok_or_else(|| PclnError::Corrupt(format!("function {i}: record truncated")))
        };
        Ok(RawFunc { entry_raw, next_raw, name_off: field(1)?, pcsp: field(4)? })
    }

    /// The NUL-terminated name at `name_off` in the name table.
    pub fn name_bytes(&self, name_off: u32) -> Result<&'a [u8], PclnError> {
        let start = usize::try_from(name_off)
            .ok()
            .and_then(|o| o.checked_add(self.layout.funcnametab))
            .ok_or_else(|| PclnError::Corrupt("name offset overflows".into()))?;
        let rest = self
            .data
            .get(start..)
            .ok_or_else(|| PclnError::Corrupt(format!("name offset {name_off:#x} out of bounds")))?;
        let window = rest.get(..MAX_NAME.min(rest.len())).unwrap_or(rest);
        let len = window
            .iter()
            .position(|&b| b == 0)
            .ok_or_else(|| PclnError::Corrupt(format!("name at {name_off:#x} is not terminated")))?;
        Ok(window.get(..len).unwrap_or_default())
    }

    pub fn name(&self, i: usize) -> Result<&'a str, PclnError> {
        let f = self.func(i)?;
        let b = self.name_bytes(f.name_off)?;
        std::str::from_utf8(b).map_err(|_| PclnError::Corrupt(format!("function {i}: name is not UTF-8")))
    }

    /// The function's code size from its SP-delta pc-value table: the table
    /// covers exactly the function's instructions, so its last pc is the
    /// size the linker recorded (alignment padding to the next function is
    /// not included). `None` when the function has no such table.
    pub fn pcsp_size(&self, f: &RawFunc) -> Result<Option<u64>, PclnError> {
        if f.pcsp == 0 {
            return Ok(None);
        }
        let start = usize::try_from(f.pcsp)
            .ok()
            .and_then(|o| o.checked_add(self.layout.pctab))
            .ok_or_else(|| PclnError::Corrupt("pc-value offset overflows".into()))?;
        let mut p = self
            .data
            .get(start..)
            .ok_or_else(|| PclnError::Corrupt(format!("pc-value table at {:#x} out of bounds", f.pcsp)))?;
        let quantum = u64::from(self.layout.quantum);
        let mut pc: u64 = 0;
        let mut first = true;
        loop {
            let (uv, n) = read_varint(p)?;
            if uv == 0 && !first {
                return Ok(Some(pc));
            }
            first = false;
            p = p.get(n..).unwrap_or_default();
            let (pcdelta, n) = read_varint(p)?;
            p = p.get(n..).unwrap_or_default();
            pc = u64::from(pcdelta)
                .checked_mul(quantum)
                .and_then(|d| pc.checked_add(d))
                .ok_or_else(|| PclnError::Corrupt("pc-value table overflows".into()))?;
        }
    }
}

/// Go's pc-value varint (at most 5 bytes for a 32-bit value).
fn read_varint(p: &[u8]) -> Result<(u32, usize), PclnError> {
    let mut v: u32 = 0;
    for (i, &b) in p.iter().enumerate().take(5) {
        v |= u32::from(b & 0x7f) << (7 * i as u32);
        if b & 0x80 == 0 {
            return Ok((v, i + 1));
        }
    }
    corrupt("pc-value table ends inside a number")
}

/// Builds a well-formed table of the given layout (pointer size 8, quantum
/// of one byte) with functions of the given names and sizes laid out back
/// to back from `text` (32-byte aligned), as the Go linker of that era
/// writes it.
/// For unit tests and fuzz seeds: no toolchain for the pre-1.18 layouts is
/// at hand, so those are checked against this construction.
pub fn synthesize(version: PclnVersion, text: u64, funcs: &[(&str, u64)]) -> Vec<u8> {
    let n = funcs.len();
    let rel = version.relative_entries();
    let mut entries = Vec::with_capacity(n + 1);
    let mut pc = 0u64;
    for (_, size) in funcs {
        entries.push(if rel { pc } else { text + pc });
        pc += size.div_ceil(32) * 32;
    }
    entries.push(if rel { pc } else { text + pc });

    let mut names = Vec::new();
    let mut name_offs = Vec::new();
    for (name, _) in funcs {
        name_offs.push(names.len() as u64);
        names.extend_from_slice(name.as_bytes());
        names.push(0);
    }
    // Offset 0 means "no table", so start with a pad byte. Each function's
    // SP table: value +1 (zig-zag 2) for `size` bytes, then the end marker.
    let mut pctab = vec![0u8];
    let mut pcsp_offs = Vec::new();
    for (_, size) in funcs {
        pcsp_offs.push(pctab.len() as u64);
        pctab.push(2);
        let mut v = *size;
        loop {
            let b = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                pctab.push(b);
                break;
            }
            pctab.push(b | 0x80);
        }
        pctab.push(0);
    }

    let (magic, hdr_words, field, first) = match version {
        PclnVersion::Go12 => (MAGIC_GO12, 1, 8usize, 8usize),
        PclnVersion::Go116 => (MAGIC_GO116, 7, 8, 8),
        PclnVersion::Go118 => (MAGIC_GO118, 8, 4, 4),
        PclnVersion::Go120 => (MAGIC_GO120, 8, 4, 4),
    };
    // header | functab (+ a 4-byte file table offset) | records | names | pctab
    let functab = 8 + 8 * hdr_words;
    let rec_len = first + 4 * 10;
    let records = functab + (2 * n + 1) * field + 4;
    let names_at = records + n * rec_len;
    let pctab_at = names_at + names.len();
    // Go 1.2 measures every offset from the table start.
    let go12 = version == PclnVersion::Go12;
    let func_base = if go12 { 0 } else { functab };
    let (name_base, pc_base) = if go12 { (names_at as u64, pctab_at as u64) } else { (0, 0) };

    let mut t = Vec::new();
    t.extend_from_slice(&magic.to_le_bytes());
    t.extend_from_slice(&[0, 0, 1, 8]);
    let words: Vec<u64> = match version {
        PclnVersion::Go12 => vec![n as u64],
        PclnVersion::Go116 => vec![n as u64, 0, names_at as u64, 0, 0, pctab_at as u64, functab as u64],
        _ => vec![n as u64, 0, text, names_at as u64, 0, 0, pctab_at as u64, functab as u64],
    };
    for w in words {
        t.extend_from_slice(&w.to_le_bytes());
    }
    let put = |t: &mut Vec<u8>, v: u64| {
        if field == 4 {
            t.extend_from_slice(&(v as u32).to_le_bytes());
        } else {
            t.extend_from_slice(&v.to_le_bytes());
        }
    };
    for (i, e) in entries.iter().take(n).enumerate() {
        put(&mut t, *e);
        put(&mut t, (records + i * rec_len - func_base) as u64);
    }
    put(&mut t, entries[n]);
    t.extend_from_slice(&0u32.to_le_bytes());
    for i in 0..n {
        let start = t.len();
        if first == 4 {
            t.extend_from_slice(&(entries[i] as u32).to_le_bytes());
        } else {
            t.extend_from_slice(&entries[i].to_le_bytes());
        }
        for v in [name_base + name_offs[i], 0, 0, pc_base + pcsp_offs[i]] {
            t.extend_from_slice(&(v as u32).to_le_bytes());
        }
        t.resize(start + rec_len, 0);
    }
    t.extend_from_slice(&names);
    t.extend_from_slice(&pctab);
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    const VERSIONS: [PclnVersion; 4] = [PclnVersion::Go12, PclnVersion::Go116, PclnVersion::Go118, PclnVersion::Go120];
    const FUNCS: &[(&str, u64)] = &[("runtime.text.x", 5), ("main.main", 300), ("main.(*T).M", 0x4000)];

    #[test]
    fn every_layout_reads_back() {
        for v in VERSIONS {
            let data = synthesize(v, 0x401000, FUNCS);
            let t = Pclntab::parse(&data).unwrap_or_else(|e| panic!("{v:?}: {e}"));
            assert_eq!(t.nfunc(), 3);
            assert_eq!(t.layout.version, v);
            let base = if v.relative_entries() { 0x401000 } else { 0 };
            if v.relative_entries() {
                assert_eq!(t.layout.text_start_raw, 0x401000);
            }
            let mut want_entry = 0x401000;
            for (i, (name, size)) in FUNCS.iter().enumerate() {
                let f = t.func(i).unwrap();
                assert_eq!(t.name(i).unwrap(), *name, "{v:?}");
                assert_eq!(base + f.entry_raw, want_entry, "{v:?} {name}");
                assert_eq!(t.pcsp_size(&f).unwrap(), Some(*size), "{v:?} {name}");
                want_entry += size.div_ceil(32) * 32;
            }
        }
    }

    #[test]
    fn truncations_and_flips_never_panic() {
        for v in VERSIONS {
            let data = synthesize(v, 0x401000, FUNCS);
            let walk = |d: &[u8]| {
                if let Ok(t) = Pclntab::parse(d) {
                    for i in 0..t.nfunc() {
                        let _ = t.name(i);
                        let _ = t.func(i).map(|f| t.pcsp_size(&f));
                    }
                }
            };
            for cut in 0..data.len() {
                walk(&data[..cut]);
            }
            for at in 0..data.len() {
                let mut d = data.clone();
                d[at] ^= 0xff;
                walk(&d);
            }
        }
    }

    #[test]
    fn rejects_unknown_magic_and_unsorted_tables() {
        let mut bad = synthesize(PclnVersion::Go120, 0x401000, FUNCS);
        bad[0] = 0xf7;
        assert_eq!(Pclntab::parse(&bad).unwrap_err(), PclnError::UnknownMagic(0xffff_fff7));
        let mut unsorted = synthesize(PclnVersion::Go120, 0x401000, FUNCS);
        let functab = 8 + 8 * 8;
        unsorted[functab..functab + 4].copy_from_slice(&0x7000u32.to_le_bytes());
        assert!(matches!(Pclntab::parse(&unsorted), Err(PclnError::Corrupt(_))));
    }
}
