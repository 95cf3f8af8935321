//! Kubernetes metadata for the processes the agent watches: which namespace,
//! pod and container each one runs in.
//!
//! Two halves, joined by the IDs the kubelet and the kernel both use:
//!
//! - [`cgroup::parse`] reads a process's `/proc/<pid>/cgroup` text into a
//!   [`PodRef`] (pod UID, container ID), for cgroup v1 and v2, the kubelet's
//!   systemd and cgroupfs drivers, and containerd, CRI-O and Docker. Pure,
//!   no I/O; [`cgroup::read_pid`] adds the file read.
//! - [`kubelet`] fetches the node's pod list from the kubelet
//!   (`GET https://<node>:10250/pods`, service account bearer token, TLS) and
//!   keeps it in a [`kubelet::PodCache`] that maps a [`PodRef`] to
//!   [`Labels`].
//!
//! # How the agent is meant to use it
//!
//! - **Startup** (`daemon::run`, before the first /proc scan), only when the
//!   agent runs in Kubernetes (the token file exists, or a flag says so):
//!
//!   ```no_run
//!   # use watchscope::k8s::kubelet::{Kubelet, KubeletConfig};
//!   # fn main() -> Result<(), watchscope::k8s::kubelet::KubeletError> {
//!   let cfg = KubeletConfig { url: "https://10.0.0.11:10250".into(), ..KubeletConfig::default() };
//!   let pods = Kubelet::new(cfg).spawn_refresher()?; // returns at once
//!   # Ok(()) }
//!   ```
//!
//!   The refresher thread fetches at once, then every 30 s; failures (no
//!   kubelet, 401/403, bad TLS) are logged once per kind and leave the labels
//!   empty. Nothing waits for it: the agent attaches probes whether or not
//!   the kubelet answers.
//! - **Per process** (discover/attach, when a process is first tracked: the
//!   initial scan, an exec event): `cgroup::read_pid(&root, pid)` once — a
//!   process never changes pod — and keep the `PodRef` with the process.
//!   Then `pods.lookup(&pod_ref)` gives `Option<Labels>`; it reads a snapshot
//!   under a read lock and returns at once.
//! - **Misses**: a lookup that finds no pod, or the pod but not the
//!   container (a container started after the last fetch), asks the
//!   refresher for an early fetch (at most one per 5 s) and returns what it
//!   has. Keep unresolved `PodRef`s and look them up again when
//!   `pods.generation()` has moved on — in collect, before a snapshot is
//!   rendered, is a good place: the labels then appear on the next scrape.
//! - **Export**: `namespace`, `pod`, `container` labels come from the
//!   `Labels` kept per tracked process (empty strings when unknown), never
//!   from a lookup per event: the kernel aggregates per process slot, and the
//!   slot's labels are resolved in user space.

pub mod cgroup;
pub mod kubelet;
pub mod resolve;

pub use cgroup::PodRef;

/// The Kubernetes identity of a process, as exported in metric labels.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Labels {
    pub namespace: String,
    pub pod: String,
    /// Empty when the pod is known but the container is not (yet).
    pub container: String,
}
