//! The whole inspection of a file image: ELF headers, segment mapping,
//! relocations, table search, text start, catalog resolution, window end
//! sites in the callers, report.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use watchscope_fuzz::inspect;

fuzz_target!(|data: &[u8]| {
    let Ok(i) = inspect::inspect_bytes(Path::new("fuzz"), data.to_vec()) else { return };
    let _ = i.resolve("main.main");
    for f in i.functions().take(64) {
        let _ = i.resolve(&f.name);
    }
    for f in i.functions().take(4) {
        let _ = i.direct_calls(f.address, 32);
    }
    let _ = serde_json::to_string(&i.report(None));
});
