//! pclntab header, function table, records, names and pc-value tables.
#![no_main]

use libfuzzer_sys::fuzz_target;
use watchscope_fuzz::inspect::pclntab::Pclntab;

fuzz_target!(|data: &[u8]| {
    let Ok(t) = Pclntab::parse(data) else { return };
    // Walk a bounded number of functions (a table may claim many).
    for i in 0..t.nfunc().min(4096) {
        let _ = t.name(i);
        if let Ok(f) = t.func(i) {
            let _ = t.pcsp_size(&f);
        }
    }
    let _ = t.entry_raw(t.nfunc());
});
