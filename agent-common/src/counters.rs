//! Indices of the kernel's self-counters (an array of u64). Every place
//! a kernel program can lose or skip something has its own counter, so that
//! nothing is lost silently; user space exports them by name.

#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// sched_process_exec hits (every exec on the node).
    ExecSeen = 0,
    /// Exec events that could not be queued because the ring buffer was full.
    EventsRingbufFull = 1,
    /// A map insert failed (the map was full), or a watcher's queued copy
    /// of an event was pushed out of the enqueue ring before its send.
    MapFull = 2,
    /// Per-watcher enqueue of an event whose commit (notify) was not seen.
    EnqueueCommitMiss = 3,
    /// gRPC send of an event whose commit was not seen.
    SendCommitMiss = 4,
    /// gRPC send of an event whose per-watcher enqueue was not seen.
    SendEnqueueMiss = 5,
    /// Client dispatch of an event whose commit was not seen on this node
    /// (expected when etcd runs on another node).
    DispatchCommitMiss = 6,
    /// Events past MAX_EVENTS_PER_RESPONSE in one response: counted, not timed.
    EventsOverCap = 7,
    /// Reading the watched process's memory failed (bad offset or paged out).
    ReadError = 8,
    /// Process-exit events lost because the ring buffer was full.
    ExitRingbufFull = 9,
    /// An API server's watch cache took an event whose commit its etcd
    /// client did not see on this node (expected when etcd runs elsewhere).
    CacheCommitMiss = 10,
    /// An event reached a watcher's result channel without a commit seen
    /// on this node.
    WatcherCommitMiss = 11,
    /// An event reached a watcher's result channel without its watch-cache
    /// time (the cache stamp aged out, or an initial event replayed from
    /// before the agent started).
    WatcherCacheMiss = 12,
    /// A client-go reflector decoded an event whose commit was not seen
    /// through an API server on this node (expected when the API server or
    /// etcd runs elsewhere).
    DecodeCommitMiss = 13,
    /// A reflector's resourceVersion was not a decimal revision (or could
    /// not be read): the event is counted, never guessed at.
    RvUnreadable = 14,
    /// An event was written to a watcher's HTTP stream without its commit
    /// time (the API server's etcd client did not see the commit, or its
    /// stamp aged out).
    WriteCommitMiss = 15,
    /// A client-go handler started on an event that cannot be timed from
    /// its commit: the commit was not seen on this node, or the informer
    /// popped the object before its reflector recorded the revision and
    /// another listener's early start was already waiting for it.
    HandlerCommitMiss = 16,
    /// A window function that ends in its callers (`WINDOW_END_CALLER`)
    /// was called from no call site the inspector decoded (a function
    /// value or an interface): that call is not timed.
    WindowIndirectCall = 17,
    /// A thread of a window's goroutine was seen running again (a probe
    /// hit, or its next switch-out) with no switch-in reported since it
    /// went off CPU: the kernel emitted neither `sched_wakeup` nor a
    /// `sched_switch` into it (seen on 6.18, 0-4 times per 300 windows, with plain and
    /// raw tracepoints alike, and by bpftrace too). Its wait is charged up
    /// to that sighting, the first moment it is known to be running.
    SchedSwitchInUnseen = 18,
    /// A window still open on a goroutine `g` that a probe found running
    /// a different goroutine (its id changed: the runtime reuses `g`s):
    /// the goroutine that opened it ended inside it, so it has no end to
    /// time. Dropped, never observed (where the goroutine id is read: every
    /// window's entry, and a loop's next call, where the binary's Go version
    /// gives its offset).
    WindowStale = 19,
    /// A window its goroutine left without reaching its end: the
    /// goroutine called the window function again at the same depth or
    /// shallower (the first call unwound in a panic that a caller
    /// recovered). Dropped, never observed: its end is not known.
    WindowUnended = 20,
}

impl Counter {
    /// Number of slots the counter array must have (keep in sync with the enum).
    pub const COUNT: u32 = 21;

    pub const ALL: [Counter; Self::COUNT as usize] = [
        Counter::ExecSeen,
        Counter::EventsRingbufFull,
        Counter::MapFull,
        Counter::EnqueueCommitMiss,
        Counter::SendCommitMiss,
        Counter::SendEnqueueMiss,
        Counter::DispatchCommitMiss,
        Counter::EventsOverCap,
        Counter::ReadError,
        Counter::ExitRingbufFull,
        Counter::CacheCommitMiss,
        Counter::WatcherCommitMiss,
        Counter::WatcherCacheMiss,
        Counter::DecodeCommitMiss,
        Counter::RvUnreadable,
        Counter::WriteCommitMiss,
        Counter::HandlerCommitMiss,
        Counter::WindowIndirectCall,
        Counter::SchedSwitchInUnseen,
        Counter::WindowStale,
        Counter::WindowUnended,
    ];

    /// The `reason` label this counter is exported under in
    /// `watchscope_dropped_total`, or None for counters exported elsewhere.
    pub fn drop_reason(self) -> Option<&'static str> {
        Some(match self {
            Counter::ExecSeen => return None,
            Counter::EventsRingbufFull => "ringbuf_full",
            Counter::MapFull => "map_full",
            Counter::EnqueueCommitMiss => "enqueue_commit_miss",
            Counter::SendCommitMiss => "send_commit_miss",
            Counter::SendEnqueueMiss => "send_enqueue_miss",
            Counter::DispatchCommitMiss => "dispatch_commit_miss",
            Counter::EventsOverCap => "events_over_cap",
            Counter::ReadError => "read_error",
            Counter::ExitRingbufFull => "exit_ringbuf_full",
            Counter::CacheCommitMiss => "cache_commit_miss",
            Counter::WatcherCommitMiss => "watcher_commit_miss",
            Counter::WatcherCacheMiss => "watcher_cache_miss",
            Counter::DecodeCommitMiss => "decode_commit_miss",
            Counter::RvUnreadable => "rv_unreadable",
            Counter::WriteCommitMiss => "write_commit_miss",
            Counter::HandlerCommitMiss => "handler_commit_miss",
            Counter::WindowIndirectCall => "window_indirect_call",
            Counter::SchedSwitchInUnseen => "sched_switch_in_unseen",
            Counter::WindowStale => "window_stale",
            Counter::WindowUnended => "window_unended",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_lists_every_counter_in_index_order() {
        for (i, c) in Counter::ALL.iter().enumerate() {
            assert_eq!(*c as usize, i);
        }
    }
}

/// The kernel's ring buffers: how large each is, and the index of its
/// high-water mark (`WS_RING_FILL`, the most bytes seen waiting in it
/// right after a record was submitted).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ring {
    /// Process exec and exit events.
    Events = 0,
    /// Per-event watch records (while recording).
    Watch = 1,
    /// Closed windows (while recording).
    Windows = 2,
}

impl Ring {
    pub const COUNT: u32 = 3;
    pub const ALL: [Ring; Self::COUNT as usize] = [Ring::Events, Ring::Watch, Ring::Windows];

    /// The `ring` label.
    pub fn name(self) -> &'static str {
        match self {
            Ring::Events => "events",
            Ring::Watch => "watch_records",
            Ring::Windows => "window_records",
        }
    }

    /// Its size in bytes (a power of two, as the kernel requires).
    pub const fn bytes(self) -> u32 {
        match self {
            Ring::Events => 256 * 1024,
            Ring::Watch => 1 << 20,
            Ring::Windows => 512 * 1024,
        }
    }
}
