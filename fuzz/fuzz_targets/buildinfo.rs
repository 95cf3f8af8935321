//! `.go.buildinfo`: both formats, through a memory image (pointers of the
//! old format resolve into the same bytes).
#![no_main]

use libfuzzer_sys::fuzz_target;
use watchscope_fuzz::inspect::{buildinfo, elf::SliceMemory};

fuzz_target!(|data: &[u8]| {
    // As is, and with a valid magic so the fuzzer spends its time past it:
    // the first two input bytes become the pointer size and flags.
    let mem = SliceMemory { base: 0x1000, data };
    let _ = buildinfo::parse(&mem, 0x1000);
    if let [ptr_size, flags, rest @ ..] = data {
        let mut blob = buildinfo::MAGIC.to_vec();
        blob.extend_from_slice(&[*ptr_size, *flags]);
        blob.extend_from_slice(rest);
        let mem = SliceMemory { base: 0x1000, data: &blob };
        if let Ok(info) = buildinfo::parse(&mem, 0x1000) {
            let _ = info.setting("CGO_ENABLED");
            let _ = buildinfo::GoVersion::parse(&info.go_version);
        }
    }
    let _ = buildinfo::parse_modinfo(data);
});
