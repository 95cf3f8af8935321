//! Module data search and validation against a well-formed table of each
//! layout, over fuzzer-chosen memory.
#![no_main]

use libfuzzer_sys::fuzz_target;
use watchscope_fuzz::inspect::{
    elf::SliceMemory,
    moduledata::{self, Expect},
    pclntab::{PclnVersion, Pclntab, synthesize},
};

const PCLN: u64 = 0x50_0000;
const BASE: u64 = 0x60_0000;

fuzz_target!(|data: &[u8]| {
    let Some((&sel, mem)) = data.split_first() else { return };
    let version = [PclnVersion::Go12, PclnVersion::Go116, PclnVersion::Go118, PclnVersion::Go120][usize::from(sel % 4)];
    let table = synthesize(version, 0x40_1000, &[("main.a", 10), ("main.b", 20), ("main.c", 300)]);
    let Ok(t) = Pclntab::parse(&table) else { return };
    let (Ok(first_raw), Ok(end_raw)) = (t.entry_raw(0), t.entry_raw(t.nfunc())) else { return };
    let e = Expect { pcln_vaddr: PCLN, layout: t.layout, first_raw, end_raw };
    let m = SliceMemory { base: BASE, data: mem };
    let mut cands = moduledata::scan_words(&m, BASE, mem.len() as u64, 8, PCLN);
    // Also misaligned and out-of-range candidates.
    cands.extend([BASE, BASE + 1, BASE + mem.len() as u64, u64::MAX - 4]);
    for md in moduledata::find(&m, cands, &e) {
        assert!(md.text <= md.minpc && md.minpc <= md.maxpc && md.maxpc <= md.etext);
    }
});
