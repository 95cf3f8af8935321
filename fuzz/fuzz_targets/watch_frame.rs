//! A watch frame's scan (`agent_common::jsonscan`), the kernel's per-byte
//! state machine, on any bytes: it never panics, stops when it says it is
//! done, and a result read after any prefix is one it can give.
#![no_main]

use agent_common::jsonscan::{Frame, FrameScan, SCAN_MAX, scan};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let whole = scan(data);
    // The kernel scans at most SCAN_MAX bytes, one step each, and stops at
    // the first `false`: the same outcome as the whole-slice form.
    let mut s = FrameScan::new();
    for &b in data.iter().take(SCAN_MAX) {
        if !s.step(b) {
            // Done stays done.
            assert!(!s.step(b'"'));
            break;
        }
    }
    if data.len() <= SCAN_MAX {
        assert_eq!(s.frame(), whole);
    }
    if let Frame::Event(Some(rv)) = whole {
        assert!(rv >= 0);
    }
});
