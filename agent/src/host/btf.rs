//! Where a field of a kernel struct lies on this kernel, read from the
//! kernel's own description of its types (BTF, `/sys/kernel/btf/vmlinux`).
//!
//! Only what the kernel programs need: a named struct's member offset and
//! size, looking through anonymous unions and structs. The kernel programs
//! cannot relocate field accesses themselves (aya's Rust programs carry no
//! CO-RE relocations), so user space reads the offsets here and hands them
//! over as globals; a layout it cannot identify is refused, never guessed.
//!
//! Why not a crate: aya-obj parses BTF but keeps its type accessors private,
//! and the one BTF reader on crates.io (btf-rs) is LGPL, which this
//! MIT/Apache binary does not link. The file is untrusted input to a parser,
//! so `fuzz/fuzz_targets/btf.rs` feeds it garbage; it never panics.

use std::{borrow::Cow, path::Path};

use thiserror::Error;

/// The kernel's BTF, as the kernel exposes it (under the host root).
pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

const MAGIC: u16 = 0xeb9f;
const HEADER_LEN: usize = 24;
const TYPE_LEN: usize = 12;
/// Nesting allowed through anonymous members and type modifiers: the
/// kernel's own structs need 3; the limit stops cycles in a crafted file.
const MAX_DEPTH: u32 = 16;
/// Members one lookup may visit (`struct sock_common` needs about 40).
const MAX_VISITS: u32 = 1 << 16;

#[derive(Debug, Error)]
pub enum BtfError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("not BTF of this machine's byte order (magic {0:#06x})")]
    Magic(u16),
    #[error("BTF truncated at byte {0}")]
    Truncated(usize),
    #[error("BTF type {id} has unknown kind {kind}")]
    UnknownKind { id: u32, kind: u32 },
    #[error("BTF refers to type {0}, which it does not hold")]
    NoType(u32),
    #[error("no struct `{0}` in the kernel's BTF")]
    NoStruct(String),
    #[error("struct `{strukt}` has no member `{member}`")]
    NoMember { strukt: String, member: String },
    #[error("`{strukt}.{member}` is a bit field")]
    BitField { strukt: String, member: String },
    #[error("BTF types nest deeper than {MAX_DEPTH}, or a lookup visits over {MAX_VISITS} members")]
    TooDeep,
    #[error("`{strukt}.{member}` is {found} bytes, expected {expected}")]
    Size { strukt: String, member: String, found: u64, expected: u64 },
}

/// Where a member lies in its struct.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Member {
    pub offset: u32,
    pub size: u64,
}

/// A parsed BTF blob: the type section indexed by type id.
pub struct Btf {
    data: Vec<u8>,
    strings: std::ops::Range<usize>,
    /// Byte offset in `data` of each type; type id `i` is `types[i - 1]`
    /// (id 0 is `void`).
    types: Vec<usize>,
}

// Kinds (include/uapi/linux/btf.h).
const INT: u32 = 1;
const PTR: u32 = 2;
const ARRAY: u32 = 3;
const STRUCT: u32 = 4;
const UNION: u32 = 5;
const ENUM: u32 = 6;
const FWD: u32 = 7;
const TYPEDEF: u32 = 8;
const VOLATILE: u32 = 9;
const CONST: u32 = 10;
const RESTRICT: u32 = 11;
const FUNC: u32 = 12;
const FUNC_PROTO: u32 = 13;
const VAR: u32 = 14;
const DATASEC: u32 = 15;
const FLOAT: u32 = 16;
const DECL_TAG: u32 = 17;
const TYPE_TAG: u32 = 18;
const ENUM64: u32 = 19;

impl Btf {
    /// A BTF file: [`VMLINUX_BTF`] under the host root for the kernel's.
    pub fn load(path: &Path) -> Result<Self, BtfError> {
        let data = std::fs::read(path).map_err(|source| BtfError::Io { path: path.display().to_string(), source })?;
        Self::parse(data)
    }

    pub fn parse(data: Vec<u8>) -> Result<Self, BtfError> {
        let magic = u16::from_ne_bytes(read::<2>(&data, 0)?);
        if magic != MAGIC {
            return Err(BtfError::Magic(magic));
        }
        let hdr_len = u32_at(&data, 4)? as usize;
        let section = |off: usize, len: usize| -> Result<std::ops::Range<usize>, BtfError> {
            let start = hdr_len.checked_add(u32_at(&data, off)? as usize).ok_or(BtfError::Truncated(off))?;
            let end = start.checked_add(u32_at(&data, len)? as usize).ok_or(BtfError::Truncated(off))?;
            if hdr_len < HEADER_LEN || end > data.len() {
                return Err(BtfError::Truncated(end));
            }
            Ok(start..end)
        };
        let type_sec = section(8, 12)?;
        let strings = section(16, 20)?;
        let mut types = Vec::new();
        let mut at = type_sec.start;
        while at < type_sec.end {
            let id = types.len() as u32 + 1;
            let info = u32_at(&data, at + 4)?;
            let (kind, vlen) = ((info >> 24) & 0x1f, (info & 0xffff) as usize);
            let extra = match kind {
                PTR | FWD | TYPEDEF | VOLATILE | CONST | RESTRICT | FUNC | FLOAT | TYPE_TAG => 0,
                INT | VAR | DECL_TAG => 4,
                ARRAY => 12,
                STRUCT | UNION | DATASEC | ENUM64 => 12 * vlen,
                ENUM | FUNC_PROTO => 8 * vlen,
                _ => return Err(BtfError::UnknownKind { id, kind }),
            };
            types.push(at);
            at += TYPE_LEN + extra;
        }
        if at > type_sec.end {
            return Err(BtfError::Truncated(type_sec.end));
        }
        Ok(Self { data, strings, types })
    }

    /// `strukt.member`'s offset and size; `member` may sit inside anonymous
    /// unions or structs, as most of `struct sock_common`'s do.
    pub fn member(&self, strukt: &str, member: &str) -> Result<Member, BtfError> {
        let id = (1..=self.types.len() as u32)
            .find(|&id| {
                self.kind_vlen(id).is_ok_and(|(k, vlen)| k == STRUCT && vlen > 0)
                    && self.name(id).is_ok_and(|n| n == strukt)
            })
            .ok_or_else(|| BtfError::NoStruct(strukt.to_string()))?;
        let mut budget = MAX_VISITS;
        match self.find_member(id, member, 0, &mut budget)? {
            Some(Found::At(m)) => Ok(m),
            Some(Found::BitField) => Err(BtfError::BitField { strukt: strukt.to_string(), member: member.to_string() }),
            None => Err(BtfError::NoMember { strukt: strukt.to_string(), member: member.to_string() }),
        }
    }

    /// Like [`Self::member`], and the member must be `size` bytes: a field
    /// whose type changed is as unknown as a missing one.
    pub fn member_sized(&self, strukt: &str, member: &str, size: u64) -> Result<u32, BtfError> {
        let m = self.member(strukt, member)?;
        if m.size != size {
            return Err(BtfError::Size {
                strukt: strukt.to_string(),
                member: member.to_string(),
                found: m.size,
                expected: size,
            });
        }
        Ok(m.offset)
    }

    fn find_member(&self, id: u32, member: &str, depth: u32, budget: &mut u32) -> Result<Option<Found>, BtfError> {
        if depth > MAX_DEPTH {
            return Err(BtfError::TooDeep);
        }
        let (_, vlen) = self.kind_vlen(id)?;
        let kind_flag = u32_at(&self.data, self.at(id)? + 4)? >> 31 == 1;
        for i in 0..vlen {
            // Anonymous members can share types: without a bound, a crafted
            // file makes the search exponential in the depth.
            *budget = budget.checked_sub(1).ok_or(BtfError::TooDeep)?;
            let m = self.at(id)? + TYPE_LEN + 12 * i;
            let (name_off, ty, raw_off) =
                (u32_at(&self.data, m)?, u32_at(&self.data, m + 4)?, u32_at(&self.data, m + 8)?);
            // With kind_flag the offset word also holds a bit-field size.
            let (bit_off, bits) = if kind_flag { (raw_off & 0xff_ffff, raw_off >> 24) } else { (raw_off, 0) };
            let name = self.string(name_off)?;
            if name == member {
                if bits != 0 || bit_off % 8 != 0 {
                    return Ok(Some(Found::BitField));
                }
                return Ok(Some(Found::At(Member { offset: bit_off / 8, size: self.size(ty, depth + 1)? })));
            }
            if name.is_empty() {
                let inner = self.resolve(ty, depth + 1)?;
                if matches!(self.kind_vlen(inner)?.0, STRUCT | UNION)
                    && let Some(found) = self.find_member(inner, member, depth + 1, budget)?
                {
                    return Ok(Some(match found {
                        Found::At(f) => Found::At(Member {
                            offset: f.offset.checked_add(bit_off / 8).ok_or(BtfError::TooDeep)?,
                            size: f.size,
                        }),
                        b => b,
                    }));
                }
            }
        }
        Ok(None)
    }

    /// The type under typedefs and qualifiers.
    fn resolve(&self, mut id: u32, depth: u32) -> Result<u32, BtfError> {
        for _ in depth..=MAX_DEPTH {
            match self.kind_vlen(id)?.0 {
                TYPEDEF | VOLATILE | CONST | RESTRICT | TYPE_TAG => id = u32_at(&self.data, self.at(id)? + 8)?,
                _ => return Ok(id),
            }
        }
        Err(BtfError::TooDeep)
    }

    /// A type's size in bytes.
    fn size(&self, id: u32, depth: u32) -> Result<u64, BtfError> {
        if depth > MAX_DEPTH {
            return Err(BtfError::TooDeep);
        }
        let id = self.resolve(id, depth)?;
        let at = self.at(id)?;
        Ok(match self.kind_vlen(id)?.0 {
            PTR => size_of::<usize>() as u64,
            ARRAY => {
                // struct btf_array { type, index_type, nelems }
                let (elem, n) = (u32_at(&self.data, at + TYPE_LEN)?, u32_at(&self.data, at + TYPE_LEN + 8)?);
                self.size(elem, depth + 1)?.saturating_mul(u64::from(n))
            }
            _ => u64::from(u32_at(&self.data, at + 8)?),
        })
    }

    fn at(&self, id: u32) -> Result<usize, BtfError> {
        id.checked_sub(1).and_then(|i| self.types.get(i as usize)).copied().ok_or(BtfError::NoType(id))
    }

    fn kind_vlen(&self, id: u32) -> Result<(u32, usize), BtfError> {
        let info = u32_at(&self.data, self.at(id)? + 4)?;
        Ok(((info >> 24) & 0x1f, (info & 0xffff) as usize))
    }

    fn name(&self, id: u32) -> Result<Cow<'_, str>, BtfError> {
        self.string(u32_at(&self.data, self.at(id)?)?)
    }

    fn string(&self, off: u32) -> Result<Cow<'_, str>, BtfError> {
        let start = self.strings.start.saturating_add(off as usize);
        let bytes = self.data.get(start..self.strings.end).ok_or(BtfError::Truncated(start))?;
        let end = bytes.iter().position(|&b| b == 0).ok_or(BtfError::Truncated(self.strings.end))?;
        Ok(String::from_utf8_lossy(&bytes[..end]))
    }
}

enum Found {
    At(Member),
    BitField,
}

fn read<const N: usize>(data: &[u8], at: usize) -> Result<[u8; N], BtfError> {
    data.get(at..at.saturating_add(N)).and_then(|b| b.try_into().ok()).ok_or(BtfError::Truncated(at))
}

fn u32_at(data: &[u8], at: usize) -> Result<u32, BtfError> {
    Ok(u32::from_ne_bytes(read::<4>(data, at)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A BTF blob built by hand: `struct outer { int a; union { int b;
    /// struct { char c[16]; }; }; int bf:3; }`.
    fn sample() -> Vec<u8> {
        let strings = b"\0int\0outer\0a\0b\0c\0char\0bf\0";
        let s = |name: &str| {
            strings
                .windows(name.len() + 1)
                .position(|w| &w[..name.len()] == name.as_bytes() && w[name.len()] == 0)
                .unwrap() as u32
        };
        let mut t: Vec<u32> = Vec::new();
        let info = |kind: u32, vlen: u32, kflag: bool| (u32::from(kflag) << 31) | (kind << 24) | vlen;
        // 1: int (4 bytes)
        t.extend([s("int"), info(INT, 0, false), 4, 32]);
        // 2: char
        t.extend([s("char"), info(INT, 0, false), 1, 8]);
        // 3: char[16]
        t.extend([0, info(ARRAY, 0, false), 0, 2, 1, 16]);
        // 4: anonymous struct { char c[16]; }
        t.extend([0, info(STRUCT, 1, false), 16, s("c"), 3, 0]);
        // 5: anonymous union { int b; struct {...}; }
        t.extend([0, info(UNION, 2, false), 16, s("b"), 1, 0, 0, 4, 0]);
        // 6: const union (a qualifier to look through)
        t.extend([0, info(CONST, 0, false), 5]);
        // 7: struct outer, kind_flag set for the bit field
        t.extend([s("outer"), info(STRUCT, 3, true), 24, s("a"), 1, 0, 0, 6, 32, s("bf"), 1, (3 << 24) | 160]);
        blob(&t, strings)
    }

    /// A BTF file of `types` (words) and `strings`, in this machine's byte
    /// order.
    fn blob(types: &[u32], strings: &[u8]) -> Vec<u8> {
        let types: Vec<u8> = types.iter().flat_map(|w| w.to_ne_bytes()).collect();
        let mut blob = Vec::new();
        blob.extend(MAGIC.to_ne_bytes());
        blob.extend([1, 0]);
        for w in [HEADER_LEN as u32, 0, types.len() as u32, types.len() as u32, strings.len() as u32] {
            blob.extend(w.to_ne_bytes());
        }
        blob.extend(types);
        blob.extend(strings);
        blob
    }

    #[test]
    fn finds_members_through_anonymous_unions_and_qualifiers() {
        let btf = Btf::parse(sample()).expect("parse");
        assert_eq!(btf.member("outer", "a").expect("a"), Member { offset: 0, size: 4 });
        assert_eq!(btf.member("outer", "b").expect("b"), Member { offset: 4, size: 4 });
        assert_eq!(btf.member("outer", "c").expect("c"), Member { offset: 4, size: 16 });
        assert!(matches!(btf.member("outer", "bf"), Err(BtfError::BitField { .. })));
        assert!(matches!(btf.member("outer", "zz"), Err(BtfError::NoMember { .. })));
        assert!(matches!(btf.member("inner", "a"), Err(BtfError::NoStruct(_))));
        assert!(matches!(btf.member_sized("outer", "c", 4), Err(BtfError::Size { found: 16, .. })));
    }

    #[test]
    fn garbage_is_an_error_never_a_panic() {
        let blob = sample();
        for cut in 0..blob.len() {
            let _ = Btf::parse(blob[..cut].to_vec()).map(|b| b.member("outer", "c"));
        }
        let mut bad = blob.clone();
        bad[0] ^= 0xff;
        assert!(matches!(Btf::parse(bad), Err(BtfError::Magic(_))));
        // A member whose type is itself: caught by the depth limit.
        let mut cyc = blob;
        let at = HEADER_LEN + 4 * (4 + 4 + 6 + 6 + 9);
        cyc[at + 8..at + 12].copy_from_slice(&6u32.to_ne_bytes());
        let btf = Btf::parse(cyc).expect("parse");
        assert!(matches!(btf.member("outer", "c"), Err(BtfError::TooDeep)));
    }

    /// Levels of structs whose anonymous members all share the next level's
    /// type: a search for a missing member would visit 8^12 members; the
    /// budget ends it.
    #[test]
    fn a_wide_deep_anonymous_nesting_is_cut_short() {
        const LEVELS: u32 = 12;
        const WIDTH: u32 = 8;
        let strings = b"\0top\0";
        let mut t: Vec<u32> = Vec::new();
        for level in 0..LEVELS {
            let name = if level == 0 { 1 } else { 0 };
            t.extend([name, (STRUCT << 24) | WIDTH, 8]);
            for _ in 0..WIDTH {
                // Type ids start at 1: level `l` is id l + 1, and its
                // members are the next level, anonymous; the last level's
                // are named (and of the first level's type).
                if level + 1 == LEVELS {
                    t.extend([1, 1, 0]);
                } else {
                    t.extend([0, level + 2, 0]);
                }
            }
        }
        let btf = Btf::parse(blob(&t, strings)).expect("parse");
        assert!(matches!(btf.member("top", "missing"), Err(BtfError::TooDeep)));
    }

    #[test]
    fn reads_this_kernels_sock_common() {
        let Ok(btf) = Btf::load(Path::new(VMLINUX_BTF)) else { return };
        assert_eq!(btf.member_sized("sock_common", "skc_daddr", 4).expect("daddr"), 0);
        assert_eq!(btf.member_sized("sock_common", "skc_family", 2).expect("family"), 16);
    }
}
