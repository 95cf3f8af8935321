//! The "discover" stage: which processes exist and which the agent watches.
//! Exec events arrive from the kernel through the ring buffer; the
//! [`ProcessFilter`] narrows them with the user's `--pid`, `--comm` and
//! `--exclude-comm`.

pub mod exec;
pub mod procfs;
pub mod sockets;

pub use exec::ExecInfo;

/// What the user asked to watch. Empty include lists mean "everything".
#[derive(Clone, Debug, Default)]
pub struct ProcessFilter {
    pub pids: Vec<u32>,
    pub comms: Vec<String>,
    pub exclude_comms: Vec<String>,
}

impl ProcessFilter {
    /// Whether a process with this tgid and comm is watched. A process named
    /// by `--pid` is watched whatever its comm; otherwise `--comm` (if given)
    /// must match, and `--exclude-comm` always wins over `--comm`.
    pub fn matches(&self, tgid: u32, comm: &str) -> bool {
        if self.exclude_comms.iter().any(|c| c == comm) {
            return false;
        }
        if self.pids.is_empty() && self.comms.is_empty() {
            return true;
        }
        self.pids.contains(&tgid) || self.comms.iter().any(|c| c == comm)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_semantics() {
        let all = ProcessFilter::default();
        assert!(all.matches(1, "etcd"));
        let f = ProcessFilter { pids: vec![42], comms: vec!["etcd".into()], exclude_comms: vec!["etcdctl".into()] };
        assert!(f.matches(42, "bash"));
        assert!(f.matches(7, "etcd"));
        assert!(!f.matches(7, "bash"));
        assert!(!f.matches(42, "etcdctl"));
        let ex = ProcessFilter { exclude_comms: vec!["sh".into()], ..Default::default() };
        assert!(ex.matches(1, "etcd") && !ex.matches(1, "sh"));
    }
}
