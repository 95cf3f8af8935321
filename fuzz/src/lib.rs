//! The agent's inspector module, compiled on its own for fuzzing: it depends
//! only on crates listed here, never on the rest of the agent.
#![allow(dead_code)]

#[path = "../../agent/src/inspect/mod.rs"]
pub mod inspect;
