//! Facts about the node the agent runs on: where /proc, /sys and tracefs are,
//! which capabilities the agent holds, the kernel version. Every path goes
//! through [`HostRoot`], so `watchscope check --root DIR` and the tests can
//! point the agent at a fabricated tree without touching the machine.

pub mod btf;
pub mod caps;
pub mod kernel;
pub mod tracefs;

use std::path::{Path, PathBuf};

/// The filesystem root under which /proc and /sys are read ("/" normally).
#[derive(Clone, Debug)]
pub struct HostRoot {
    root: PathBuf,
}

impl Default for HostRoot {
    fn default() -> Self {
        Self { root: PathBuf::from("/") }
    }
}

impl HostRoot {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// `path` (absolute, like "/proc/self/status") under this root.
    pub fn path(&self, path: impl AsRef<Path>) -> PathBuf {
        let p = path.as_ref();
        self.root.join(p.strip_prefix("/").unwrap_or(p))
    }

    pub fn is_real(&self) -> bool {
        self.root == Path::new("/")
    }
}
