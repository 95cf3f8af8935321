//! watchscope: explains why Kubernetes/etcd watches are late, from the kernel.
//!
//! The modules follow the pipeline, in order:
//! [`discover`] (which processes) → [`inspect`] (where in their binaries to
//! probe) → [`attach`] (load and attach kernel
//! programs) → [`collect`] (read what the kernel aggregated) → [`export`]
//! (Prometheus). [`host`] holds facts about the node, [`check`] the readiness
//! report, and [`daemon`] wires the stages into `watchscope run`.

pub mod attach;
pub mod check;
pub mod collect;
pub mod daemon;
pub mod discover;
pub mod export;
pub mod host;
pub mod inspect;
pub mod k8s;
pub mod record;
