//! Shared definitions for Go runtime timing: map operations, map growth, GC
//! assist, and windows (stretches of work on one goroutine, e.g. the etcd
//! client's dispatchEvent) with what happened inside them.

/// What a probed Go function is, for timing.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GoClass {
    MapAssign = 0,
    MapAccess = 1,
    MapDelete = 2,
    MapGrow = 3,
    GcAssist = 4,
    /// A window function (its id is in the probe config).
    Window = 5,
    /// A scheduler point of the Go runtime (`SchedPoint` in the config's
    /// `window` field): entry only, no timing of its own.
    Sched = 6,
}

impl GoClass {
    /// Classes with a histogram of their own (all but Window).
    pub const TIMED: u32 = 5;
    pub const ALL: [GoClass; 5] =
        [GoClass::MapAssign, GoClass::MapAccess, GoClass::MapDelete, GoClass::MapGrow, GoClass::GcAssist];

    pub fn from_u32(v: u32) -> Option<GoClass> {
        Some(match v {
            0 => GoClass::MapAssign,
            1 => GoClass::MapAccess,
            2 => GoClass::MapDelete,
            3 => GoClass::MapGrow,
            4 => GoClass::GcAssist,
            5 => GoClass::Window,
            6 => GoClass::Sched,
            _ => return None,
        })
    }

    /// The `op` label of watchscope_go_map_seconds, or None (GC assist, windows).
    pub fn map_op(self) -> Option<&'static str> {
        Some(match self {
            GoClass::MapAssign => "assign",
            GoClass::MapAccess => "access",
            GoClass::MapDelete => "delete",
            GoClass::MapGrow => "grow",
            _ => return None,
        })
    }

    /// The window accumulator this class adds to.
    pub fn inner(self) -> Option<Inner> {
        match self {
            GoClass::MapAssign | GoClass::MapAccess | GoClass::MapDelete => Some(Inner::Map),
            GoClass::MapGrow => Some(Inner::MapGrow),
            GoClass::GcAssist => Some(Inner::GcAssist),
            GoClass::Window | GoClass::Sched => None,
        }
    }
}

/// What a window's time is broken down into.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Inner {
    Map = 0,
    MapGrow = 1,
    GcAssist = 2,
    OffCpu = 3,
    Runqueue = 4,
}

impl Inner {
    pub const COUNT: u32 = 5;
    pub const ALL: [Inner; 5] = [Inner::Map, Inner::MapGrow, Inner::GcAssist, Inner::OffCpu, Inner::Runqueue];

    pub fn name(self) -> &'static str {
        match self {
            Inner::Map => "map",
            Inner::MapGrow => "map_grow",
            Inner::GcAssist => "gc_assist",
            Inner::OffCpu => "off_cpu",
            Inner::Runqueue => "runqueue",
        }
    }
}

/// Where the Go scheduler moves a goroutine, probed at function entry.
/// Together they give a window's goroutine-level off-CPU time (parked until
/// made ready) and run-queue time (ready until a thread runs it), and keep
/// the thread → goroutine map the kernel-side sched programs need.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SchedPoint {
    /// `runtime.execute(gp, inheritTime)`: gp starts running on this thread.
    Execute = 0,
    /// `runtime.gopark(...)`: the running goroutine blocks (channel, timer,
    /// lock, network).
    Park = 1,
    /// `runtime.ready(gp, ...)`: a parked gp becomes runnable.
    Ready = 2,
    /// `runtime.goschedImpl(gp, ...)`: gp yields or is preempted, runnable.
    Yield = 3,
}

impl SchedPoint {
    pub const ALL: [SchedPoint; 4] = [SchedPoint::Execute, SchedPoint::Park, SchedPoint::Ready, SchedPoint::Yield];
}

/// A window ends on a RET of its function (every RET instruction probed,
/// each hit single-stepped by the kernel: ~4.7 µs here).
pub const WINDOW_END_RET: u32 = 0;
/// A window ends without RET probes, in its caller: on the first branch
/// after each direct call of the function (which the kernel emulates in one
/// trap), when the goroutine runs there at the depth of the call, which it
/// can only do once the call has returned. A call from elsewhere (a
/// function value, an interface) has no such site: its return address is
/// not in `WS_GO_WINDOW_CALLERS`, and it opens no window.
pub const WINDOW_END_CALLER: u32 = 1;
/// `cargo xtask bench gomap` only (`--window-end entry`): no end sites; a
/// window ends at the goroutine's next call of the function, which prices
/// the entry alone.
pub const WINDOW_END_NEXT_ENTRY: u32 = 2;

/// A direct call site of a window function (`WINDOW_END_CALLER`): the
/// function's entry site (its config index, one per binary and function)
/// and the link-time address the call returns to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "pod", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct WindowCaller {
    pub entry: u32,
    pub _pad: u32,
    pub return_address: u64,
}

/// A window goroutine's scheduling state (`Window::sched`).
pub const SCHED_RUNNING: u32 = 0;
pub const SCHED_PARKED: u32 = 1;
pub const SCHED_RUNNABLE: u32 = 2;

/// A thread that went off CPU while running a window's goroutine: what to
/// charge the time to when it runs again (kernel-side scheduling, e.g. a
/// blocking syscall or preemption by another process).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "pod", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct ThreadOff {
    pub g: u64,
    pub tgid: u32,
    /// `Inner::OffCpu` while asleep, `Inner::Runqueue` once woken.
    pub kind: u32,
    pub since: u64,
}

/// Most distinct windows (built-in and `--window`).
pub const MAX_WINDOWS: u32 = 8;
/// Label slots for Go timing histograms (shared with the watch path's slots,
/// capped lower because each slot holds windows × inner histograms).
pub const MAX_GO_SLOTS: u32 = 32;

/// One probed site of a Go function: its entry (on the stack-check jump,
/// see `watch::GUARD_*`) or one of its RET instructions.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "pod", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct GoProbeConfig {
    /// `GoClass as u32`.
    pub class: u32,
    /// 1 on a RET site, 0 on the entry.
    pub is_ret: u32,
    /// For `GoClass::Window`: which window.
    pub window: u32,
    /// Entry only: `watch::GUARD_*`.
    pub guard: u32,
    /// Window sites: `WINDOW_END_*` (on a `WINDOW_END_CALLER` window's
    /// end sites, `is_ret` is 1 too).
    pub end: u32,
    /// Window sites that check the goroutine's id (its offset in
    /// `runtime.g`; 0: no check): a window opened by a goroutine that ended
    /// inside it (`runtime.Goexit`, a cancelled loop) must be neither
    /// closed nor continued by the next goroutine the runtime gives the
    /// same `g`. Every window's entry checks, where the offset is known for
    /// the binary's Go version; of the end sites, only a loop's next call
    /// (`Role::loop_next`), which a goroutine reaches without entering the
    /// window first.
    pub goid_off: u32,
    /// Link-time address of the probed instruction: the probe's runtime
    /// address less this is the load bias (`WINDOW_END_CALLER` entries).
    pub site_addr: u64,
}

/// A call in progress on one goroutine: (process, g, class) → start and
/// depth, so nested calls of one class (growWork → evacuate) time the
/// outermost span. The process is part of the key because `g` addresses
/// repeat across processes of one binary (Go's heap layout is
/// deterministic): 50 pods of one image share them.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "pod", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct GoCallKey {
    pub g: u64,
    pub tgid: u32,
    pub class: u32,
}

/// A goroutine of a process: the key of open windows.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "pod", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct GoroutineKey {
    pub g: u64,
    pub tgid: u32,
    pub _pad: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "pod", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct GoCall {
    pub start: u64,
    /// Calls of the class open on the goroutine (0: none; the entry is
    /// kept for its next call).
    pub depth: u32,
    /// A RET-ended window's: the low 32 bits of the goroutine id that
    /// opened it, where the entry site checks it (`GoProbeConfig::goid_off`),
    /// else 0.
    pub goid: u32,
    /// A RET-ended window's: how deep its call is (see
    /// `Window::frame_depth`); a call of the window at this depth or
    /// shallower finds the first one gone without its RET (a panic
    /// recovered above it). 0 for other classes.
    pub frame_depth: u64,
}

/// An open window on one goroutine.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "pod", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct Window {
    pub start: u64,
    pub window: u32,
    pub slot: u32,
    /// `WINDOW_END_*`.
    pub end: u32,
    /// `SCHED_*`: the goroutine's state as the runtime probes saw it.
    pub sched: u32,
    /// When `sched` last changed.
    pub sched_since: u64,
    /// Nanoseconds per `Inner`.
    pub inner: [u64; 5],
    /// Events per `Inner` (map calls, parks, thread switches...).
    pub inner_n: [u32; 5],
    /// The low 32 bits of the opening goroutine's id, where its sites
    /// check it (`GoProbeConfig::goid_off`), else 0.
    pub goid: u32,
    /// `WINDOW_END_CALLER`: how deep the call is, as the distance from the
    /// top of the goroutine's stack to the slot of its return address
    /// (`g.stack.hi` - SP at entry: unchanged when the runtime copies the
    /// stack, which keeps the used part at the top). Code running at a
    /// smaller depth runs after the call returned.
    pub frame_depth: u64,
}

/// A closed window, for `watchscope record` (ring buffer `WS_WINDOW_RECORDS`,
/// only produced while `WS_RECORD_ON` is set, like `watch::WatchRecord`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "pod", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct WindowRecord {
    pub tgid: u32,
    /// Index into the agent's window table (`--window` names).
    pub window: u32,
    pub g: u64,
    pub start_ns: u64,
    pub end_ns: u64,
    /// Nanoseconds per `Inner`.
    pub inner: [u64; 5],
}

#[inline(always)]
pub fn class_index(slot: u32, class: u32) -> u32 {
    slot * GoClass::TIMED + class
}

#[inline(always)]
pub fn window_index(slot: u32, window: u32) -> u32 {
    slot * MAX_WINDOWS + window
}

#[inline(always)]
pub fn inner_index(slot: u32, window: u32, inner: u32) -> u32 {
    (slot * MAX_WINDOWS + window) * Inner::COUNT + inner
}

const _: () = assert!(size_of::<ThreadOff>() == 24);
const _: () = assert!(size_of::<WindowCaller>() == 16);
const _: () = assert!(size_of::<GoProbeConfig>() == 32);
const _: () = assert!(size_of::<GoCallKey>() == 16);
const _: () = assert!(size_of::<GoroutineKey>() == 16);
const _: () = assert!(size_of::<GoCall>() == 24);
const _: () = assert!(size_of::<Window>() == 104);
const _: () = assert!(size_of::<WindowRecord>() == 72);

#[cfg(feature = "user")]
aya_pod!(GoProbeConfig, GoCallKey, GoroutineKey, GoCall, Window, WindowRecord, ThreadOff, WindowCaller);
