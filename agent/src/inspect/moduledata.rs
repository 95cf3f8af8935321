//! The runtime's module data (`runtime.firstmoduledata`): the one place that
//! always knows the text start the function table is relative to.
//!
//! Go 1.26+ leaves pclntab's textStart word 0, and cgo/external links move
//! Go's text away from the `.text` section start, so when the header cannot
//! be trusted the module data decides. It lives in `.go.module` (Go 1.26+),
//! otherwise in `.noptrdata`; without section headers we look for it in the
//! writable segments: a pointer-aligned word equal to the pclntab address
//! (or a relocation with that value, in PIE), followed by slice headers that
//! point exactly at the table's parts. Only a candidate where every one of
//! those pointers, the function count and minpc/maxpc agree is accepted.

use serde::Serialize;

use super::{
    elf::Memory,
    pclntab::{PclnLayout, PclnVersion},
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModuleData {
    pub addr: u64,
    pub text: u64,
    pub etext: u64,
    pub minpc: u64,
    pub maxpc: u64,
}

/// What the candidate must agree with, taken from the parsed pclntab.
#[derive(Debug, Clone, Copy)]
pub struct Expect {
    pub pcln_vaddr: u64,
    pub layout: PclnLayout,
    /// Functab entry 0 and the end entry, raw (offsets from 1.18 on).
    pub first_raw: u64,
    pub end_raw: u64,
}

/// Validates a module data candidate at `at`.
pub fn validate_at(mem: &dyn Memory, at: u64, e: &Expect) -> Option<ModuleData> {
    let ps = e.layout.ptr_size;
    let w = u64::from(ps);
    let word = |i: u64| -> Option<u64> { mem.ptr(at.checked_add(i.checked_mul(w)?)?, ps) };
    let p = e.pcln_vaddr;
    let nfunc = u64::try_from(e.layout.nfunc).ok()?;
    let off = |i: usize| -> Option<u64> { p.checked_add(*e.layout.header_offsets.get(i)?) };
    // Word indexes of the fields, from runtime/symtab.go of each era.
    let (text_word, minpc_word) = match e.layout.version {
        PclnVersion::Go12 => {
            // pclntable []byte, ftab []functab, filetab []uint32, findfunctab,
            // minpc, maxpc, text, etext.
            let ftab = p.checked_add(8)?.checked_add(w)?;
            if word(0)? != p || word(3)? != ftab || word(4)? != nfunc.checked_add(1)? {
                return None;
            }
            (12, 10)
        }
        PclnVersion::Go116 | PclnVersion::Go118 | PclnVersion::Go120 => {
            // pcHeader, funcnametab, cutab, filetab, pctab, pclntable, ftab
            // (slices), findfunctab, minpc, maxpc, text, etext.
            if word(0)? != p
                || word(1)? != off(0)?
                || word(4)? != off(1)?
                || word(7)? != off(2)?
                || word(10)? != off(3)?
                || word(13)? != off(4)?
                || word(16)? != off(4)?
                || word(17)? != nfunc.checked_add(1)?
            {
                return None;
            }
            (22, 20)
        }
    };
    let md = ModuleData {
        addr: at,
        minpc: word(minpc_word)?,
        maxpc: word(minpc_word + 1)?,
        text: word(text_word)?,
        etext: word(text_word + 1)?,
    };
    let base = if e.layout.version.relative_entries() { md.text } else { 0 };
    if md.minpc != base.checked_add(e.first_raw)?
        || md.maxpc != base.checked_add(e.end_raw)?
        || md.text > md.minpc
        || md.etext < md.maxpc
    {
        return None;
    }
    Some(md)
}

/// Which `moduledata` struct the runtime of the binary declares: the word
/// indexes of `types`/`etypes`/`typelinks` move between eras (from
/// runtime/symtab.go of go1.15, go1.16, go1.18, go1.20 and go1.27, and for
/// 1.26 from the module data of a Go 1.26.4 binary).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum TypesEra {
    /// Go 1.15 and before (pclntab 1.2 format): types at word 25, typelinks at 30.
    Go115,
    /// Go 1.16-1.17: pcHeader and its slices first; types at 35, typelinks at 40.
    Go116,
    /// Go 1.18-1.19: `rodata` and `gofunc` after etypes; typelinks at 42.
    Go118,
    /// Go 1.20-1.25: `covctrs`/`ecovctrs` before `end`; types at 37, typelinks at 44.
    Go120,
    /// Go 1.26: `epclntab` after `gofunc`, so typelinks at 45.
    Go126,
    /// Go 1.27+: no typelinks slice; `types, typedesclen, etypes` at 37-39,
    /// the typelinked descriptors laid out back to back first in the section.
    Go127,
}

/// Where the type descriptors are, per the module data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct TypeTables {
    pub era: TypesEra,
    /// `[types, etypes)`: every nameOff/typeOff is relative to `types`.
    pub types: u64,
    pub etypes: u64,
    pub roots: TypeRoots,
}

/// The entry points into the type graph.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum TypeRoots {
    /// `typelinks []int32`: `len` offsets from `types`, at `addr`.
    Typelinks { addr: u64, len: u64 },
    /// Go 1.27+: descriptors from `types + ptrsize` to `types + len`, back to back.
    Descriptors { len: u64 },
}

/// More typelinks than this is not a real program (etcd has ~10k).
pub const MAX_TYPELINKS: u64 = 1 << 22;

/// Reads the type tables of module data `md` for one era, checking that
/// the words have the shape the era's struct gives them: a slice whose
/// len and cap differ, or a range that runs backwards, is the wrong era
/// (or not module data) and an error, never a guess.
pub fn type_tables(mem: &dyn Memory, md: &ModuleData, ptr_size: u8, era: TypesEra) -> Result<TypeTables, String> {
    let w = u64::from(ptr_size);
    let word = |i: u64| -> Result<u64, String> {
        i.checked_mul(w)
            .and_then(|o| md.addr.checked_add(o))
            .and_then(|a| mem.ptr(a, ptr_size))
            .ok_or_else(|| format!("module data word {i} is unreadable"))
    };
    // A slice header {ptr, len, cap} as the linker writes it: len == cap.
    let slice = |i: u64| -> Result<(u64, u64), String> {
        let (p, l, c) = (word(i)?, word(i + 1)?, word(i + 2)?);
        if l != c {
            return Err(format!("module data words {i}..{} are not a slice header (len {l} != cap {c})", i + 3));
        }
        Ok((p, l))
    };
    let (types_word, textsect_word) = match era {
        TypesEra::Go115 => (25, 27),
        TypesEra::Go116 => (35, 37),
        TypesEra::Go118 => (35, 39),
        TypesEra::Go120 => (37, 41),
        TypesEra::Go126 => (37, 42),
        TypesEra::Go127 => (37, 45),
    };
    let types = word(types_word)?;
    let (etypes, roots) = if era == TypesEra::Go127 {
        let (desclen, etypes) = (word(types_word + 1)?, word(types_word + 2)?);
        let span = etypes.checked_sub(types).ok_or("etypes is below types")?;
        if desclen < w || desclen > span {
            return Err(format!("typedesclen {desclen:#x} does not fit types..etypes ({span:#x} bytes)"));
        }
        (etypes, TypeRoots::Descriptors { len: desclen })
    } else {
        let etypes = word(types_word + 1)?;
        let (addr, len) = slice(textsect_word + 3)?;
        if len > MAX_TYPELINKS {
            return Err(format!("{len} typelinks is more than the {MAX_TYPELINKS} allowed"));
        }
        let bytes = len.checked_mul(4).ok_or("typelinks length overflows")?;
        if len > 0 && mem.bytes(addr, bytes).is_none() {
            return Err(format!("typelinks {addr:#x}+{bytes:#x} are not in the file"));
        }
        (etypes, TypeRoots::Typelinks { addr, len })
    };
    if types == 0 || etypes <= types || etypes - types > u64::from(u32::MAX) {
        return Err(format!("types {types:#x}..{etypes:#x} is not a plausible range"));
    }
    if mem.bytes(types, etypes - types).is_none() {
        return Err(format!("types {types:#x}..{etypes:#x} is not file-backed"));
    }
    // The text section map comes right before typelinks (after the types
    // fields in 1.27+): at least one section.
    let (tsm, tsm_len) = slice(textsect_word)?;
    if tsm_len == 0 || tsm_len > 4096 || tsm == 0 {
        return Err(format!("module data word {textsect_word} is not the text section map ({tsm_len} entries)"));
    }
    Ok(TypeTables { era, types, etypes, roots })
}

/// Tries each candidate address; returns every valid module data found
/// (more than one distinct text start is an ambiguity the caller reports).
pub fn find(mem: &dyn Memory, candidates: impl IntoIterator<Item = u64>, e: &Expect) -> Vec<ModuleData> {
    let mut found: Vec<ModuleData> = Vec::new();
    for at in candidates {
        if let Some(md) = validate_at(mem, at, e)
            && !found.iter().any(|f| f.addr == md.addr)
        {
            found.push(md);
        }
    }
    found
}

/// Pointer-aligned addresses in `[start, start+len)` whose word equals `value`.
pub fn scan_words(mem: &dyn Memory, start: u64, len: u64, ptr_size: u8, value: u64) -> Vec<u64> {
    let w = u64::from(ptr_size.max(1));
    let mut out = Vec::new();
    let Some(bytes) = mem.bytes(start, len) else { return out };
    let skip = usize::try_from((w - start % w) % w).unwrap_or(0);
    let Some(aligned) = bytes.get(skip..) else { return out };
    let needle = value.to_le_bytes();
    let needle = needle.get(..usize::from(ptr_size)).unwrap_or_default();
    for (i, chunk) in aligned.chunks_exact(usize::from(ptr_size.max(1))).enumerate() {
        if chunk == needle
            && let Some(a) = (i as u64).checked_mul(w).and_then(|o| o.checked_add(start + skip as u64))
        {
            out.push(a);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inspect::{
        elf::SliceMemory,
        pclntab::{Pclntab, synthesize},
    };

    /// A module data record for `table` at `pcln` as the linker writes it.
    fn record(t: &Pclntab<'_>, pcln: u64, text: u64) -> Vec<u64> {
        let l = t.layout;
        let n = l.nfunc as u64;
        let base = if l.version.relative_entries() { text } else { 0 };
        let (minpc, maxpc) = (base + t.entry_raw(0).unwrap(), base + t.entry_raw(l.nfunc).unwrap());
        let mut w = match l.version {
            PclnVersion::Go12 => vec![pcln, 1, 1, pcln + 16, n + 1, n + 1, 0, 0, 0, 0],
            _ => {
                let mut w = vec![pcln];
                for off in &l.header_offsets {
                    w.extend([pcln + off, 1, 1]);
                }
                w.extend([pcln + l.header_offsets[4], n + 1, n + 1, 0]);
                w
            }
        };
        w.extend([minpc, maxpc, text, maxpc]);
        w
    }

    #[test]
    fn finds_the_record_that_points_at_the_table() {
        for v in [PclnVersion::Go12, PclnVersion::Go116, PclnVersion::Go118, PclnVersion::Go120] {
            let table = synthesize(v, 0x401000, &[("main.a", 10), ("main.b", 20)]);
            let t = Pclntab::parse(&table).unwrap();
            let (pcln, md_at) = (0x50_0000u64, 0x60_0010u64);
            let mut mem = vec![0u8; 0x200];
            // A decoy: right first word, wrong rest.
            mem[0..8].copy_from_slice(&pcln.to_le_bytes());
            for (i, w) in record(&t, pcln, 0x401000).iter().enumerate() {
                mem[0x10 + 8 * i..0x18 + 8 * i].copy_from_slice(&w.to_le_bytes());
            }
            let m = SliceMemory { base: 0x60_0000, data: &mem };
            let e = Expect {
                pcln_vaddr: pcln,
                layout: t.layout,
                first_raw: t.entry_raw(0).unwrap(),
                end_raw: t.entry_raw(t.nfunc()).unwrap(),
            };
            let cands = scan_words(&m, 0x60_0000, mem.len() as u64, 8, pcln);
            assert!(cands.contains(&0x60_0000) && cands.contains(&md_at), "{v:?}: {cands:x?}");
            let found = find(&m, cands, &e);
            assert_eq!(found.len(), 1, "{v:?}");
            assert_eq!((found[0].addr, found[0].text), (md_at, 0x401000), "{v:?}");
            // Any word changed makes it invalid (or at least never a different text).
            for word in 0..20 {
                let mut bad = mem.clone();
                bad[0x10 + 8 * word] ^= 0x40;
                let m = SliceMemory { base: 0x60_0000, data: &bad };
                let found = find(&m, [md_at], &e);
                assert!(found.iter().all(|f| f.text == 0x401000), "{v:?} word {word}");
            }
        }
    }
}
