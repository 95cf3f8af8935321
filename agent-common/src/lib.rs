//! `#[repr(C)]` types and constants shared by the kernel programs (`agent-ebpf`)
//! and the user-space agent. Everything here is `no_std` and allocation-free so
//! the same code runs in the BPF verifier's world and in unit tests.
#![cfg_attr(not(test), no_std)]

pub mod counters;
pub mod events;
pub mod goruntime;
pub mod hist;
pub mod sidecar;
pub mod watch;

pub use counters::Counter;
pub use events::ExecEvent;
pub use hist::{Histogram, NBUCKETS};
