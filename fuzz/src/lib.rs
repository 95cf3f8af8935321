//! The agent's modules that parse untrusted bytes, compiled on their own for
//! fuzzing: they depend only on crates listed here, never on the rest of the
//! agent (nor on its eBPF build).
#![allow(dead_code)]

/// The kernel BTF reader (struct member offsets for the kernel programs).
#[path = "../../agent/src/host/btf.rs"]
pub mod btf;
/// Watch event chains, fed the records the `records` target decodes.
#[path = "../../agent/src/collect/chains.rs"]
pub mod chains;
/// The exec ring's decoders.
#[path = "../../agent/src/discover/exec.rs"]
pub mod exec;
#[path = "../../agent/src/inspect/mod.rs"]
pub mod inspect;
