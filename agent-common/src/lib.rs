//! `#[repr(C)]` types and constants shared by the kernel programs (`agent-ebpf`)
//! and the user-space agent. Everything here is `no_std` and allocation-free so
//! the same code runs in the BPF verifier's world and in unit tests.
//!
//! Every shared type has a compile-time size assert beside it: the kernel
//! object and the agent are built separately, and a field added on one side
//! only must stop the build, not shift every field the other side reads.
#![cfg_attr(not(test), no_std)]

/// `aya::Pod` (how aya reads and writes map values) for types that
/// `bytemuck::Pod` has proven plain — `repr(C)`, no padding, every field
/// valid for any bytes — so the unsafe impl rests on a compiler check rather
/// than on a comment that a later field could make false.
#[cfg(feature = "user")]
macro_rules! aya_pod {
    ($($t:ty),* $(,)?) => {$(
        const _: () = {
            const fn proven<T: bytemuck::Pod>() {}
            proven::<$t>()
        };
        // SAFETY: $t is bytemuck::Pod (checked just above), which is what
        // aya::Pod asks for: plain data, any bit pattern valid.
        unsafe impl aya::Pod for $t {}
    )*};
}

pub mod counters;
#[cfg(feature = "pod")]
pub mod decode;
pub mod events;
pub mod goruntime;
pub mod hist;
pub mod jsonscan;
pub mod procslot;
pub mod sidecar;
pub mod watch;

pub use counters::Counter;
pub use events::ExecEvent;
pub use hist::{Histogram, NBUCKETS};
