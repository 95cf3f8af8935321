//! Effective capabilities of a process, from /proc/<pid>/status (`CapEff`).

use std::fmt;

use super::HostRoot;

/// Capabilities watchscope cares about, with their bit numbers
/// (include/uapi/linux/capability.h).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cap {
    SysPtrace = 19,
    SysAdmin = 21,
    Perfmon = 38,
    Bpf = 39,
}

impl Cap {
    pub const ALL: [Cap; 4] = [Cap::Bpf, Cap::Perfmon, Cap::SysPtrace, Cap::SysAdmin];

    pub fn name(self) -> &'static str {
        match self {
            Cap::SysPtrace => "CAP_SYS_PTRACE",
            Cap::SysAdmin => "CAP_SYS_ADMIN",
            Cap::Perfmon => "CAP_PERFMON",
            Cap::Bpf => "CAP_BPF",
        }
    }
}

impl fmt::Display for Cap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A capability set as the kernel prints it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CapSet(pub u64);

impl CapSet {
    pub fn has(self, cap: Cap) -> bool {
        self.0 & (1u64 << cap as u32) != 0
    }

    /// Parses the `CapEff:` line of a /proc/<pid>/status text.
    pub fn from_status(status: &str) -> Option<CapSet> {
        status
            .lines()
            .find_map(|l| l.strip_prefix("CapEff:"))
            .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
            .map(CapSet)
    }

    /// The agent's own effective set (through the host root).
    pub fn of_self(root: &HostRoot) -> std::io::Result<Option<CapSet>> {
        let status = std::fs::read_to_string(root.path("/proc/self/status"))?;
        Ok(Self::from_status(&status))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_root_and_reduced_sets() {
        let root = "Name:\tx\nCapEff:\t000001ffffffffff\n";
        let set = CapSet::from_status(root).unwrap();
        assert!(Cap::ALL.iter().all(|c| set.has(*c)));
        // CAP_BPF + CAP_PERFMON + CAP_SYS_PTRACE only.
        let reduced = format!("CapEff:\t{:016x}\n", (1u64 << 39) | (1 << 38) | (1 << 19));
        let set = CapSet::from_status(&reduced).unwrap();
        assert!(set.has(Cap::Bpf) && set.has(Cap::Perfmon) && set.has(Cap::SysPtrace));
        assert!(!set.has(Cap::SysAdmin));
        assert_eq!(CapSet::from_status("CapEff:\tzz\n"), None);
        assert_eq!(CapSet::from_status(""), None);
    }
}
