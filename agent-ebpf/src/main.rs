//! watchscope's kernel programs. One object, embedded in the agent binary.
//!
//! Layout follows the pipeline: `discover` holds the process-lifecycle
//! tracepoints; later stages add their programs as modules beside it. Shared
//! state (self-counters, the event ring buffer) lives in `maps`.
#![no_std]
#![no_main]
// The BPF target has no `core::sync::atomic` integers: the histograms' shared
// adds use the intrinsic the atomic types are built on (BPF_ATOMIC add).
// The kernel crate builds with -Z build-std, so on RUSTC_BOOTSTRAP anyway.
#![allow(internal_features)]
#![feature(core_intrinsics)]

mod discover;
mod etcd;
mod goruntime;
mod gosched;
mod maps;
mod regs;
mod sidecar;
mod stamps;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any program that could reach here; this only
    // satisfies the compiler.
    loop {}
}

/// GPL-compatible licence: needed for bpf_probe_read_* and ring buffer helpers.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
