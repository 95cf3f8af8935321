//! The "export" stage: metric families (declared once, in [`families`]) and
//! the HTTP endpoints Prometheus scrapes.

pub mod buckets;
pub mod families;
pub mod negotiate;
pub mod server;
pub mod web_config;

pub use buckets::ClassicBuckets;
pub use families::{FAMILIES, Family, render, render_openmetrics, render_protobuf};
