//! Rare events the kernel sends to user space through the ring buffer.
//! Hot paths never use these: they aggregate in per-CPU maps instead.

/// Longest executable path carried in an exec event; longer paths are cut
/// and user space falls back to /proc/<pid>/exe.
pub const EXEC_FILENAME_LEN: usize = 256;
pub const COMM_LEN: usize = 16;

/// First field of every ring buffer record, so one buffer carries all kinds.
pub const EVENT_EXEC: u32 = 1;
pub const EVENT_EXIT: u32 = 2;

/// A process called execve(): sent from `sched:sched_process_exec`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
#[cfg_attr(feature = "pod", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct ExecEvent {
    /// `EVENT_EXEC`.
    pub kind: u32,
    pub _pad: u32,
    /// Kernel time (CLOCK_MONOTONIC, ns): the one clock every event uses.
    pub ktime_ns: u64,
    pub tgid: u32,
    /// The pid before exec (differs from tgid when a non-leader thread execs).
    pub old_pid: u32,
    pub comm: [u8; COMM_LEN],
    /// NUL-terminated (or cut) path the kernel executed.
    pub filename: [u8; EXEC_FILENAME_LEN],
}

/// A watched process exited (its thread-group leader did): user space drops
/// its per-process state and, with the last user of a binary, its probes.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
#[cfg_attr(feature = "pod", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct ExitEvent {
    /// `EVENT_EXIT`.
    pub kind: u32,
    pub tgid: u32,
    pub ktime_ns: u64,
}

const _: () = assert!(size_of::<ExecEvent>() == 296);
const _: () = assert!(size_of::<ExitEvent>() == 16);

#[cfg(feature = "user")]
aya_pod!(ExecEvent, ExitEvent);
