//! Shared definitions for the etcd watch path: stages, probe configuration
//! (where each argument and struct field lives, filled in by user space from
//! the inspector's catalog), and map keys.

/// The stages watchscope times, in the kernel, for every watch event.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// notify (commit fan-out) → per-watcher queue (`watcher.send`).
    CommitToEnqueue = 0,
    /// per-watcher queue → gRPC `Send`.
    EnqueueToSend = 1,
    /// notify → gRPC `Send`.
    CommitToSend = 2,
    /// notify → a client on the same node hands the event to its watcher.
    CommitToDispatch = 3,
}

impl Stage {
    pub const COUNT: u32 = 4;
    pub const ALL: [Stage; 4] =
        [Stage::CommitToEnqueue, Stage::EnqueueToSend, Stage::CommitToSend, Stage::CommitToDispatch];

    pub fn name(self) -> &'static str {
        match self {
            Stage::CommitToEnqueue => "commit_to_enqueue",
            Stage::EnqueueToSend => "enqueue_to_send",
            Stage::CommitToSend => "commit_to_send",
            Stage::CommitToDispatch => "commit_to_dispatch",
        }
    }
}

/// Which side counted a watch event.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// Events etcd sent to watchers (per watcher: one event to two watchers is two).
    Server = 0,
    /// Events a client dispatched to its watchers.
    Client = 1,
}

impl Side {
    pub const COUNT: u32 = 2;
}

/// Label slots: every watched process maps to one slot (its label set, e.g.
/// its comm), so histogram and counter arrays have a fixed, bounded size.
/// Slot 0 collects processes past the cap.
pub const MAX_SLOTS: u32 = 64;
pub const OVERFLOW_SLOT: u32 = 0;

/// Most events timed from one watch response (a bpf_loop bound); the rest
/// are counted as events and as `EventsOverCap`, not timed.
pub const MAX_EVENTS_PER_RESPONSE: u32 = 4096;

/// Where a Go function argument lives at the probed instruction.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ArgLoc {
    /// `ARG_NONE`, `ARG_REG` (then `off` is a `Reg` number) or `ARG_STACK`
    /// (then `off` is the byte offset above the stack pointer at entry).
    pub kind: u32,
    pub off: u32,
}

pub const ARG_NONE: u32 = 0;
pub const ARG_REG: u32 = 1;
pub const ARG_STACK: u32 = 2;

/// Register-ABI integer argument slots, in Go's order, named by their amd64
/// register (arm64 uses R0–R8 in the same order, and R28 for g); `R14` is
/// the slot of the current goroutine `g`.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reg {
    Rax = 0,
    Rbx = 1,
    Rcx = 2,
    Rdi = 3,
    Rsi = 4,
    R8 = 5,
    R9 = 6,
    R10 = 7,
    R11 = 8,
    R14 = 9,
}

/// What one attached watch-path probe reads. Indexed by the uprobe's attach
/// cookie in the `WS_WATCH_CONFIG` array.
///
/// Arguments by role:
/// - notify(rev, evs): `args[0]` rev, `args[1]` evs.ptr, `args[2]` evs.len;
/// - watcher.send(wr): `args[0]` WatchID, `args[1]` Events.ptr, `args[2]` Events.len;
/// - Send(m) and dispatchEvent(pbresp): `args[0]` the *WatchResponse.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WatchProbeConfig {
    pub args: [ArgLoc; 3],
    /// etcdserverpb.WatchResponse: offset of `Header *ResponseHeader`.
    pub resp_header_off: u32,
    /// ResponseHeader.MemberId and .Revision.
    pub hdr_member_off: u32,
    pub hdr_rev_off: u32,
    /// WatchResponse.WatchId.
    pub resp_watch_id_off: u32,
    /// WatchResponse.Events (slice: ptr at this offset, len 8 bytes later).
    pub resp_events_off: u32,
    /// Bytes between consecutive elements of the events slice
    /// (8 for `[]*mvccpb.Event`, 24 for `[]mvccpb.Event`).
    pub event_stride: u32,
    /// 1 when the slice holds pointers to events.
    pub events_indirect: u32,
    /// mvccpb.Event.Kv and mvccpb.KeyValue.ModRevision.
    pub event_kv_off: u32,
    pub kv_mod_rev_off: u32,
    /// How to tell, at the probed stack-check jump, that this hit is the
    /// one that calls morestack (and re-enters): one of the `GUARD_*`.
    pub guard: u32,
}

/// Entry probes sit on the conditional jump of the function's stack check:
/// the kernel emulates a jump with one trap, where the instruction after it
/// would be single-stepped (two traps, ~10x the cost on some VMs). When the
/// flags say the jump to morestack will be taken, the function re-enters
/// afterwards, so that hit is skipped and every call is counted once.
pub const GUARD_NONE: u32 = 0;
/// amd64 `jbe`: taken when CF or ZF.
pub const GUARD_X86_JBE: u32 = 1;
/// amd64 `jb`: taken when CF.
pub const GUARD_X86_JB: u32 = 2;
/// arm64 `b.ls`: taken when C is clear or Z is set.
pub const GUARD_ARM64_LS: u32 = 3;

/// Whether the guarded jump is taken, given the flags register (x86 EFLAGS
/// or arm64 PSTATE).
#[inline(always)]
pub fn guard_taken(guard: u32, flags: u64) -> bool {
    const CF: u64 = 1 << 0;
    const ZF: u64 = 1 << 6;
    const PSTATE_Z: u64 = 1 << 30;
    const PSTATE_C: u64 = 1 << 29;
    match guard {
        GUARD_X86_JBE => flags & (CF | ZF) != 0,
        GUARD_X86_JB => flags & CF != 0,
        GUARD_ARM64_LS => flags & PSTATE_C == 0 || flags & PSTATE_Z != 0,
        _ => false,
    }
}

/// (process or member, revision).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RevKey {
    /// tgid for server-local maps, member id for the cross-process map.
    pub id: u64,
    pub rev: i64,
}

/// One watcher's copy of one event, between its enqueue and its gRPC send.
///
/// Watch ids are only unique per gRPC stream (two clients both have watch 0),
/// so (tgid, watch id, revision) alone would mix two watchers. etcd's send
/// loop passes `&evs[i]` — the address of the event inside the slice that was
/// queued to that watcher — so the event's address tells the copies apart;
/// with the revision in the key too, a reused address cannot match an old
/// entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WatchRevKey {
    pub tgid: u64,
    pub watch_id: i64,
    pub rev: i64,
    pub event_addr: u64,
}

/// One event's path, for `watchscope record`-style views (ring buffer; only
/// produced while a recorder asks for it). Zero timestamps: stage not seen.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WatchRecord {
    /// Side::Server (at gRPC send) or Side::Client (at dispatch).
    pub side: u32,
    pub tgid: u32,
    pub member: u64,
    pub rev: i64,
    pub watch_id: i64,
    pub commit_ns: u64,
    pub enqueue_ns: u64,
    /// Send time (server) or dispatch time (client).
    pub at_ns: u64,
    /// The goroutine that sent or dispatched (`g` pointer): joins a client
    /// event to the window (`WindowRecord`) open on that goroutine.
    pub g: u64,
}

/// Index of (slot, stage) in the watch histogram array.
#[inline(always)]
pub fn hist_index(slot: u32, stage: Stage) -> u32 {
    slot * Stage::COUNT + stage as u32
}

/// Index of (slot, side) in the watch event counter array.
#[inline(always)]
pub fn events_index(slot: u32, side: Side) -> u32 {
    slot * Side::COUNT + side as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guards_follow_the_condition_codes() {
        assert!(guard_taken(GUARD_X86_JBE, 1) && guard_taken(GUARD_X86_JBE, 1 << 6));
        assert!(!guard_taken(GUARD_X86_JBE, 0x202));
        assert!(guard_taken(GUARD_X86_JB, 0x203) && !guard_taken(GUARD_X86_JB, 0x242));
        assert!(guard_taken(GUARD_ARM64_LS, 0) && guard_taken(GUARD_ARM64_LS, (1 << 29) | (1 << 30)));
        assert!(!guard_taken(GUARD_ARM64_LS, 1 << 29));
        assert!(!guard_taken(GUARD_NONE, u64::MAX));
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: repr(C) plain data.
    unsafe impl aya::Pod for super::WatchProbeConfig {}
    unsafe impl aya::Pod for super::RevKey {}
    unsafe impl aya::Pod for super::WatchRevKey {}
    unsafe impl aya::Pod for super::WatchRecord {}
}
