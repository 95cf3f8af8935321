//! Return-site scan of one function body (x86-64 decoding, arm64 words),
//! and the x86 scans for a window's end sites (call sites, first branch).
#![no_main]

use libfuzzer_sys::fuzz_target;
use watchscope_fuzz::inspect::{disasm, elf::Arch};

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else { return };
    let (addr, code) = match rest.split_first_chunk::<8>() {
        Some((a, code)) => (u64::from_le_bytes(*a), code),
        None => (0x40_1000, rest),
    };
    let arch = if sel & 1 == 0 { Arch::X86_64 } else { Arch::Aarch64 };
    if let Ok(rets) = disasm::return_offsets(arch, code, addr) {
        // Every reported site is inside the body, in order.
        assert!(rets.windows(2).all(|w| w[0] < w[1]));
        assert!(rets.iter().all(|&r| (r as usize) < code.len()));
    }
    if arch == Arch::X86_64 {
        if let Ok(off) = disasm::x86_first_branch(code, addr, 24) {
            assert!((off as usize) < code.len());
        }
        let _ = disasm::x86_calls_at(code, addr, addr.wrapping_add(u64::from(sel)), addr);
    }
});
