//! Per-program kernel statistics, in the style of ebpf_exporter: how often
//! each eBPF program ran and how long it ran in total.
//!
//! The kernel counts both only while someone holds a
//! `BPF_ENABLE_STATS(BPF_STATS_RUN_TIME)` file descriptor (each run then
//! costs two more clock reads, for every BPF program on the node: see
//! README, "The agent's own metrics"), so [`BpfStats::enable`] keeps one
//! for the agent's life only with `--bpf-stats`; without it the series are
//! there while the node's `kernel.bpf_stats_enabled` is 1. The values are
//! read from `/proc/self/fdinfo/<fd>` of a duplicate of each program's fd
//! (`run_cnt`, `run_time_ns`): that needs no privilege beyond owning the
//! fd, unlike walking every program on the host by id (CAP_SYS_ADMIN), and
//! it works after the `Ebpf` object has moved to the event loop.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use aya::Ebpf;

use crate::attach::multi::MultiPrograms;
use tracing::{debug, warn};

use super::ProgramStats;

pub struct BpfStats {
    /// Statistics stay on while this is open (`--bpf-stats`); without it
    /// they are counted while the node's sysctl has them on.
    enabled: Option<OwnedFd>,
    programs: Vec<(String, OwnedFd)>,
}

impl std::fmt::Debug for BpfStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BpfStats")
            .field("ours", &self.enabled.is_some())
            .field("programs", &self.programs.len())
            .finish()
    }
}

impl BpfStats {
    /// Turns statistics on (when `enable`) and remembers every loaded
    /// program of `ebpf` and of `multi` (their verifier figures are read
    /// either way). A kernel that refuses only loses the run metrics.
    pub fn enable(ebpf: &Ebpf, multi: Option<&MultiPrograms>, enable: bool) -> Self {
        // BPF_ENABLE_STATS needs CAP_SYS_ADMIN; without it, the node's
        // `kernel.bpf_stats_enabled` sysctl may have them on for everyone.
        let enabled = match enable.then(|| aya::sys::enable_stats(aya::sys::Stats::RunTime)) {
            None => None,
            Some(Ok(fd)) => Some(fd),
            Some(Err(e)) => {
                if !sysctl_on() {
                    warn!(
                        "cannot enable eBPF run-time statistics ({e}: it needs CAP_SYS_ADMIN, or the sysctl \
                         kernel.bpf_stats_enabled=1 on the node); watchscope_program_* will be missing"
                    );
                }
                None
            }
        };
        let mut programs = Vec::new();
        for (name, prog) in ebpf.programs() {
            // Not loaded (a program this kernel or configuration does not use).
            let Ok(fd) = prog.fd() else { continue };
            match fd.as_fd().try_clone_to_owned() {
                Ok(fd) => programs.push((name.to_string(), fd)),
                Err(e) => debug!(program = name, "cannot duplicate the program fd: {e}"),
            }
        }
        for (name, fd) in multi.into_iter().flat_map(MultiPrograms::iter) {
            match fd.try_clone_to_owned() {
                Ok(fd) => programs.push((name.to_string(), fd)),
                Err(e) => debug!(program = name, "cannot duplicate the program fd: {e}"),
            }
        }
        programs.sort_by(|a, b| a.0.cmp(&b.0));
        Self { enabled, programs }
    }

    /// Run counts and times now (none while statistics are off: the
    /// node's sysctl is read again, as someone may turn it on or off).
    pub fn read(&self) -> Vec<ProgramStats> {
        if self.enabled.is_none() && !sysctl_on() {
            return Vec::new();
        }
        self.programs
            .iter()
            .filter_map(|(name, fd)| {
                let (runs, run_ns, misses) = parse_fdinfo(&fdinfo(fd.as_fd())?)?;
                Some(ProgramStats { program: name.clone(), runs, run_ns, misses })
            })
            .collect()
    }

    /// Instructions the verifier processed to load each program
    /// (`verified_insns`, Linux 5.16+): how far each is from the kernel's
    /// limit of 1,000,000, which a kernel update can move programs towards.
    pub fn verified(&self) -> Vec<(String, u64)> {
        self.programs
            .iter()
            .filter_map(|(name, fd)| Some((name.clone(), fdinfo_field(&fdinfo(fd.as_fd())?, "verified_insns")?)))
            .collect()
    }
}

fn fdinfo(fd: BorrowedFd<'_>) -> Option<String> {
    std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd())).ok()
}

/// How many times a program ran while statistics were on (`run_cnt`).
pub fn run_count(prog: BorrowedFd<'_>) -> Option<u64> {
    fdinfo_field(&fdinfo(prog)?, "run_cnt")
}

fn sysctl_on() -> bool {
    std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled").is_ok_and(|v| v.trim() == "1")
}

/// `run_cnt`, `run_time_ns` and `recursion_misses` (Linux 5.12+; 0 before)
/// out of a BPF program fd's fdinfo text.
fn parse_fdinfo(text: &str) -> Option<(u64, u64, u64)> {
    Some((
        fdinfo_field(text, "run_cnt")?,
        fdinfo_field(text, "run_time_ns")?,
        fdinfo_field(text, "recursion_misses").unwrap_or(0),
    ))
}

/// A numeric `key:\tvalue` line of a BPF object fd's fdinfo text.
pub(super) fn fdinfo_field(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| l.strip_prefix(key)?.strip_prefix(':')?.trim().parse::<u64>().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_kernel_fdinfo_fields() {
        let text = "pos:\t0\nflags:\t02000002\nmnt_id:\t16\nino:\t2077\nprog_type:\t5\nprog_jited:\t1\n\
                    prog_tag:\t0123456789abcdef\nmemlock:\t4096\nprog_id:\t93\nrun_time_ns:\t123456\nrun_cnt:\t42\n\
                    recursion_misses:\t3\nverified_insns:\t120\n";
        assert_eq!(parse_fdinfo(text), Some((42, 123456, 3)));
        assert_eq!(parse_fdinfo("prog_id:\t1\n"), None);
    }
}
