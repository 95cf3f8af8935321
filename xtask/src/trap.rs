//! What a probed process spends inside the uprobe breakpoint trap, from
//! perf's CPU-clock samples of that process.
//!
//! Paired rounds with and without the agent measure everything the agent
//! adds, but on a small shared VM a round's CPU per put varies by ±7 %
//! (±10 µs of etcd's 150), so twelve pairs bound the difference only to
//! ±3.5 µs. The trap's share of the process's own samples in a round is a
//! proportion instead: 10,000 samples bound a 2.4 % share to ±0.3 of a
//! point (±12 %), and twelve rounds' mean to about ±0.2 µs per put. It
//! counts what runs under the trap — the
//! kernel's uprobe lookup, our programs, the probed instruction's
//! emulation, the return to user space — and not what the probes cost
//! the program afterwards through its caches, which only the paired
//! rounds see, and what runs with interrupts off on the way back to user
//! space (the CPU clock samples from a timer interrupt, so that is charged
//! to the user code the trap returns to). It is the probes' own CPU, not a
//! bound of the whole either way: a server that has idle time blocks less
//! often when the probes keep it busier (etcd paced at 4,000 puts/s:
//! 5.8 to 6.0 µs per put inside the trap, but its CPU per put rose by 1.5
//! to 3.3 µs, and its voluntary context switches per put fell by a quarter
//! to a half).

use std::{
    collections::HashMap,
    os::unix::process::ExitStatusExt,
    path::Path,
    process::{Child, Command, Output, Stdio},
};

use anyhow::{Context, Result, bail};

/// Kernel frames that put a sample inside the trap. On x86-64 every
/// sample taken from the breakpoint's entry to the return to user space
/// has `asm_exc_int3` on its kernel stack (the handler and our programs
/// run from `uprobe_notify_resume`, called on that exception's way out);
/// `uprobe_notify_resume` alone covers the handler on other architectures.
const TRAP_FRAMES: &[&str] = &["asm_exc_int3", "uprobe_notify_resume"];

/// One process's samples: all of them, and those inside the trap.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TrapShare {
    pub samples: u64,
    pub in_trap: u64,
}

impl TrapShare {
    /// The trap's CPU per operation (µs), from the process's CPU per
    /// operation in the same round.
    pub fn per_op(&self, cpu_us_per_op: f64) -> Option<f64> {
        (self.samples > 0).then(|| self.in_trap as f64 / self.samples as f64 * cpu_us_per_op)
    }

    /// Adds another round's samples.
    pub fn add(&mut self, other: TrapShare) {
        self.samples += other.samples;
        self.in_trap += other.in_trap;
    }
}

/// Whether `perf` can sample here, installing Debian's `linux-perf` when
/// it is missing (the benchmark's other tools come with `setup --for test`).
pub fn ensure_perf() -> Result<()> {
    if perf_runs() {
        return Ok(());
    }
    crate::setup::apt_packages(&["linux-perf"])?;
    if !perf_runs() {
        bail!("perf is installed but cannot run here");
    }
    Ok(())
}

fn perf_runs() -> bool {
    crate::util::succeeds(Command::new("perf").args(["--version"]))
}

/// Samples `pids` (every thread, user and kernel stacks) at `hz` while
/// `during` runs, and returns what `during` returned and each pid's share.
/// `perf` is the command to run perf with (the caller pins it off the
/// measured CPU); `data` is its output file, removed first so that a perf
/// that failed early can never be read in the last round's place.
pub fn profile<T>(
    mut perf: Command,
    pids: &[u32],
    hz: u32,
    data: &Path,
    during: impl FnOnce() -> Result<T>,
) -> Result<(T, HashMap<u32, TrapShare>)> {
    let _ = std::fs::remove_file(data);
    let list = pids.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
    let child = perf
        .args(["record", "-q", "-e", "cpu-clock", "-F", &hz.to_string(), "-g", "-p", &list, "-o"])
        .arg(data)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting perf record")?;
    let mut recording = Recording(Some(child));
    let result = during();
    let out = recording.stop()?;
    let value = result?;
    // perf record exits 0 on SIGINT, or by the signal it raises again.
    let stopped = out.status.success() || out.status.signal() == Some(libc::SIGINT);
    if !stopped || !data.exists() {
        bail!("perf record failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    let script = Command::new("perf")
        .args(["script", "-F", "pid,ip,sym", "-i"])
        .arg(data)
        .output()
        .context("running perf script")?;
    if !script.status.success() {
        bail!("perf script failed: {}", String::from_utf8_lossy(&script.stderr).trim());
    }
    Ok((value, shares(&String::from_utf8_lossy(&script.stdout), pids)))
}

/// A running `perf record`, ended (SIGINT: it then writes its file) when
/// stopped or dropped, so an error or a panic in the measured work never
/// leaves it sampling.
struct Recording(Option<Child>);

impl Recording {
    fn stop(&mut self) -> Result<Output> {
        let child = self.0.take().context("perf record already stopped")?;
        // SAFETY: signalling our own child by its pid.
        unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
        child.wait_with_output().context("waiting for perf record")
    }
}

impl Drop for Recording {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// Counts `perf script -F pid,ip,sym` output: one block per sample, its pid
/// on the first line, then one frame per line; blocks end at a blank line.
pub fn shares(script: &str, pids: &[u32]) -> HashMap<u32, TrapShare> {
    let mut out: HashMap<u32, TrapShare> = pids.iter().map(|p| (*p, TrapShare::default())).collect();
    let mut lines = script.lines().peekable();
    while lines.peek().is_some() {
        let Some(head) = lines.by_ref().find(|l| !l.trim().is_empty()) else { break };
        let pid = head.split_whitespace().next().and_then(|p| p.parse::<u32>().ok());
        let mut in_trap = false;
        for frame in lines.by_ref().take_while(|l| !l.trim().is_empty()) {
            in_trap |= frame.split_whitespace().any(|w| TRAP_FRAMES.contains(&w));
        }
        if let Some(s) = pid.and_then(|p| out.get_mut(&p)) {
            s.samples += 1;
            s.in_trap += u64::from(in_trap);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The layout perf 6.1 prints for `-F pid,ip,sym` of a `-g` recording:
    /// frames (address, symbol) indented by a tab, a blank line after each
    /// sample.
    const SCRIPT: &str = "\
 20167 
\tffffffff82242f24 irqentry_exit_to_user_mode
\tffffffff81000c55 asm_exc_int3
\t  574a98 [unknown]

 20167 
\t  574a98 [unknown]
\t  574a98 [unknown]

 20167 
\tffffffffc0002119 bpf_prog_13211c15643c3081_etcd_enqueue
\tffffffff814cf4d6 uprobe_prog_run
\tffffffff8159f5da uprobe_notify_resume
\tffffffff82242f24 irqentry_exit_to_user_mode
\tffffffff81000c55 asm_exc_int3
\t  574a98 [unknown]

 30001 
\tffffffff81000c55 asm_exc_int3

 999 
\tffffffff81000c55 asm_exc_int3
";

    #[test]
    fn a_sample_is_in_the_trap_when_its_stack_holds_the_trap_entry() {
        let s = shares(SCRIPT, &[20167, 30001]);
        assert_eq!(s[&20167], TrapShare { samples: 3, in_trap: 2 });
        assert_eq!(s[&30001], TrapShare { samples: 1, in_trap: 1 });
        // A pid not asked for is not counted anywhere.
        assert_eq!(s.len(), 2);
    }

    #[test]
    fn the_trap_cpu_is_its_share_of_the_samples_times_the_cpu_per_operation() {
        let s = TrapShare { samples: 30_000, in_trap: 690 };
        assert!((s.per_op(150.0).expect("samples") - 3.45).abs() < 1e-9);
        assert_eq!(TrapShare::default().per_op(150.0), None);
    }
}
