//! The "export" stage: metric families (declared once, in [`families`]) and
//! the HTTP endpoints Prometheus scrapes.

pub mod families;
pub mod server;

pub use families::{FAMILIES, Family, render};
