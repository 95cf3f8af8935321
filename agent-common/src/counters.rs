//! Indices of the kernel's self-counters (a per-CPU array of u64). Every place
//! a kernel program can lose or skip something has its own counter, so that
//! nothing is lost silently; user space exports them by name.

#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// sched_process_exec hits (every exec on the node).
    ExecSeen = 0,
    /// Exec events that could not be queued because the ring buffer was full.
    EventsRingbufFull = 1,
}

impl Counter {
    /// Number of slots the counter array must have (keep in sync with the enum).
    pub const COUNT: u32 = 2;

    pub const ALL: [Counter; Self::COUNT as usize] =
        [Counter::ExecSeen, Counter::EventsRingbufFull];
}
