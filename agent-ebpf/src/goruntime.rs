//! Go runtime timing inside the programs we watch: map operations, map
//! growth, GC assist, and windows — a stretch of work on one goroutine
//! between a window function's entry and its return — with what happened
//! inside them.
//!
//! Everything is keyed by the goroutine (`g`, in R14 on amd64 / R28 on
//! arm64, the same pointer for a goroutine's whole life, whichever thread
//! runs it and however often its stack moves): a goroutine that migrates to
//! another thread mid-window keeps its attribution, and another goroutine
//! on the same thread never gets it. Returns are probed on every RET
//! instruction the inspector decoded (uretprobes would break on Go's moving
//! stacks); entries on the stack-check jump, skipping the pass that calls
//! morestack (see `watch::GUARD_*`). The kernel single-steps a probed RET
//! (a second trap), so a window ends in its callers where it can
//! (`WINDOW_END_CALLER`): on the first branch after each direct call, an
//! instruction the kernel emulates, once the goroutine runs there above the
//! call's frame.

use agent_common::{
    Counter, Histogram,
    counters::Ring,
    goruntime::{
        GoCall, GoCallKey, GoClass, GoProbeConfig, GoroutineKey, Inner, MAX_GO_SLOTS, MAX_WINDOWS, SCHED_PARKED,
        SCHED_RUNNABLE, SCHED_RUNNING, SchedPoint, WINDOW_END_CALLER, WINDOW_END_NEXT_ENTRY, WINDOW_END_RET, Window,
        WindowCaller, WindowRecord, class_index, inner_index, window_index,
    },
    watch::guard_taken,
};
use aya_ebpf::{
    EbpfContext,
    helpers::{bpf_get_attach_cookie, bpf_get_current_pid_tgid, bpf_ktime_get_ns},
    macros::{map, uprobe},
    maps::{Array, HashMap, LruHashMap, RingBuf},
    programs::ProbeContext,
};

use crate::{
    gosched::{current_task, running_unseen},
    maps::{add, count, current_slot, observe, record_on, submit_record},
    regs::{G_SLOT, flags, instruction_pointer, read_u64, reg, stack_pointer},
};

/// `g.stack.hi`: `runtime.g` starts with `stack struct{ lo, hi uintptr }`
/// in every Go version.
const G_STACK_HI: u64 = 8;

#[map(name = "WS_GO_CONFIG")]
static CONFIG: Array<GoProbeConfig> = Array::with_max_entries(1024, 0);

/// Calls in progress, per (goroutine, class), and each goroutine's last
/// call of a class, kept closed (depth 0) so that its next call is written
/// in place rather than inserted and deleted (as `WINDOWS`). Per-CPU LRU
/// lists: an insert (a goroutine's first call of a class) never takes a
/// map-wide lock (measured here: 300 → 216 ns per go_entry run).
#[map(name = "WS_GO_CALLS")]
static CALLS: LruHashMap<GoCallKey, GoCall> =
    LruHashMap::with_max_entries(16384, aya_ebpf::bindings::BPF_F_NO_COMMON_LRU);

/// Direct call sites of `WINDOW_END_CALLER` window functions (written by
/// the loader): a call returning anywhere else is not timed.
#[map(name = "WS_GO_WINDOW_CALLERS")]
static WINDOW_CALLERS: HashMap<WindowCaller, u32> = HashMap::with_max_entries(1024, 0);

/// Windows, per goroutine: open ones, and closed ones (`start == 0`)
/// kept for the goroutine's next window, which reuses the entry in place.
/// A window function runs again and again on the same goroutine (a watch
/// stream's dispatch loop, an informer's handler loop), and an LRU hash
/// delete at each end and insert at each entry cost about 200 ns per
/// window together (mapwork handler window: entry 500 -> 377 ns, end 527 ->
/// 420 ns in BPF statistics); the LRU evicts the entries of goroutines
/// gone. Read them through [`open_window_ptr`].
#[map(name = "WS_GO_WINDOWS")]
pub(crate) static WINDOWS: LruHashMap<GoroutineKey, Window> = LruHashMap::with_max_entries(8192, 0);

/// Goroutine `gk`'s open window, if it has one.
#[inline(always)]
pub(crate) fn open_window_ptr(gk: &GoroutineKey) -> Option<*mut Window> {
    WINDOWS.get_ptr_mut(gk).filter(|w| is_open(*w))
}

/// Whether a window entry is open (not kept closed for reuse).
#[inline(always)]
fn is_open(w: *mut Window) -> bool {
    // SAFETY: a map value, valid during this run.
    unsafe { (*w).start != 0 }
}

/// A copy of a window entry.
#[inline(always)]
fn copy_of(w: *mut Window) -> Window {
    // SAFETY: a map value, valid during this run; copied at once.
    unsafe { *w }
}

/// Closes a window (found by a lookup of this run): its entry stays, for
/// the goroutine's next one.
#[inline(always)]
fn mark_closed(w: *mut Window) {
    // SAFETY: a map value, valid during this run.
    unsafe { (*w).start = 0 };
}

/// Goroutine `gk`'s open window if a RET-ended call opened it. A RET-ended
/// call opens a window only where none is open (one window per goroutine
/// at a time): inside a window that ends in its caller or at its loop's
/// next call, it must leave that one alone, at its RET and when it is found
/// stale or unended.
#[inline(always)]
fn open_ret_window(gk: &GoroutineKey) -> Option<*mut Window> {
    open_window_ptr(gk).filter(|w| copy_of(*w).end == WINDOW_END_RET)
}

/// Thread (task pid) → the window goroutine it runs now. Kernel-side
/// scheduling events carry only the thread, so this map is how a thread's
/// off-CPU time finds its goroutine (see `gosched.rs`). It is kept by the
/// Go runtime's own scheduler probes (`runtime.execute` sets it, `gopark`
/// and `goschedImpl` clear it) rather than by reading `g` from the thread's
/// TLS through the task's fsbase at each context switch: the TLS slot of `g`
/// moves with the linker (internal linking: -8(FS); cgo/external linking:
/// an offset in the ELF TLS segment, only known from the stripped symbol
/// `runtime.tlsg`), and arm64 keeps `g` in a register with no TLS copy at
/// all; `execute` is where every goroutine starts running on a thread, on
/// every Go version and architecture, with `gp` as its first argument.
/// Only goroutines with an open window are entered, so the map stays small.
#[map(name = "WS_GO_THREAD_G")]
pub(crate) static THREAD_G: LruHashMap<u32, GoroutineKey> = LruHashMap::with_max_entries(8192, 0);

/// Inner events per window, by `inner_index(slot, window, inner)`: map
/// calls, parks, thread switches... (the counts behind the inner time).
#[map(name = "WS_WINDOW_INNER_EVENTS")]
static INNER_EVENTS: Array<u64> = Array::with_max_entries(MAX_GO_SLOTS * MAX_WINDOWS * Inner::COUNT, 0);

/// Map operation and GC assist durations, by `class_index(slot, class)`.
#[map(name = "WS_GO_HIST")]
static GO_HIST: Array<Histogram> = Array::with_max_entries(MAX_GO_SLOTS * GoClass::TIMED, 0);

/// Window durations, by `window_index(slot, window)`.
#[map(name = "WS_WINDOW_HIST")]
static WINDOW_HIST: Array<Histogram> = Array::with_max_entries(MAX_GO_SLOTS * MAX_WINDOWS, 0);

/// What each window spent inside, by `inner_index(slot, window, inner)`:
/// one observation per window per inner kind (zeros included), so every
/// inner histogram has the window histogram's count, bucket for bucket.
#[map(name = "WS_WINDOW_INNER_HIST")]
static INNER_HIST: Array<Histogram> = Array::with_max_entries(MAX_GO_SLOTS * MAX_WINDOWS * Inner::COUNT, 0);

/// Entries of map growth functions (every call, nested ones too): the
/// count a tracer counting the same offsets sees.
#[map(name = "WS_GO_GROW_EVENTS")]
static GROW_EVENTS: Array<u64> = Array::with_max_entries(MAX_GO_SLOTS, 0);

/// Closed windows for `watchscope record` (only while `WS_RECORD_ON`).
#[map(name = "WS_WINDOW_RECORDS")]
static WINDOW_RECORDS: RingBuf = RingBuf::with_byte_size(Ring::Windows.bytes(), 0);

struct Hit {
    cookie: u32,
    slot: u32,
    tgid: u32,
    g: u64,
    cfg: GoProbeConfig,
    now: u64,
}

#[inline(always)]
fn begin(ctx: &ProbeContext) -> Option<Hit> {
    // First: is this process watched at all?
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    let slot = current_slot(tgid)?;
    let slot = if slot < MAX_GO_SLOTS { slot } else { 0 };
    // SAFETY: the helper reads the cookie of the current attachment.
    let cookie = unsafe { bpf_get_attach_cookie(ctx.as_ptr()) } as u32;
    let cfg = *CONFIG.get(cookie)?;
    // SAFETY: the probe's own register context.
    let regs = unsafe { &*ctx.regs };
    if cfg.is_ret == 0 && guard_taken(cfg.guard, flags(regs)) {
        return None;
    }
    let g = reg(regs, G_SLOT)?;
    // SAFETY: no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    Some(Hit { cookie, slot, tgid, g, cfg, now })
}

#[uprobe]
pub fn go_entry(ctx: ProbeContext) -> u32 {
    let Some(h) = begin(&ctx) else { return 0 };
    if h.cfg.class == GoClass::MapGrow as u32 {
        add(&GROW_EVENTS, h.slot, 1);
    }
    let window = h.cfg.class == GoClass::Window as u32;
    if window && (h.cfg.end == WINDOW_END_CALLER || h.cfg.end == WINDOW_END_NEXT_ENTRY) {
        caller_window_entry(&ctx, &h);
        return 0;
    }
    // A RET-ended window's call depth (see GoCall::frame_depth).
    // SAFETY: the probe's own register context.
    let depth = if window { frame_depth(h.g, stack_pointer(unsafe { &*ctx.regs })).unwrap_or(0) } else { 0 };
    let key = GoCallKey { g: h.g, tgid: h.tgid, class: h.cfg.class };
    match CALLS.get_ptr_mut(key) {
        // The goroutine's entry for this class, kept from its last call
        // (see CALLS): reused in place.
        // SAFETY: map value valid during this run.
        Some(call) => unsafe {
            let goid = goid_of(&h);
            if (*call).depth > 0 {
                match abandoned(call, goid, depth) {
                    // Nested call of the same class: the outermost span is timed.
                    None => {
                        (*call).depth += 1;
                        return 0;
                    }
                    // The open call is gone: this one starts afresh.
                    Some(why) => drop_ret_window(&h, why),
                }
            }
            (*call).start = h.now;
            (*call).depth = 1;
            (*call).goid = goid;
            (*call).frame_depth = depth;
        },
        None => {
            let fresh = GoCall { start: h.now, depth: 1, goid: goid_of(&h), frame_depth: depth };
            if CALLS.insert(key, fresh, 0).is_err() {
                return 0;
            }
        }
    }
    if h.cfg.class == GoClass::Window as u32 && h.cfg.window < MAX_WINDOWS {
        let gk = GoroutineKey { g: h.g, tgid: h.tgid, _pad: 0 };
        let entry = WINDOWS.get_ptr_mut(gk);
        if !entry.is_some_and(is_open) {
            open_window(&h, gk, entry, WINDOW_END_RET, 0, 0);
        }
    }
    0
}

/// Opens a window on goroutine `gk`, in `entry`, its closed window's entry
/// (see `WINDOWS`), or in a new one.
#[inline(always)]
fn open_window(h: &Hit, gk: GoroutineKey, entry: Option<*mut Window>, end: u32, frame_depth: u64, goid: u32) {
    let w = Window {
        start: h.now,
        window: h.cfg.window,
        slot: h.slot,
        end,
        sched: SCHED_RUNNING,
        sched_since: h.now,
        inner: [0; 5],
        inner_n: [0; 5],
        goid,
        frame_depth,
    };
    match entry {
        // SAFETY: map value valid during this run.
        Some(old) => unsafe { *old = w },
        None => {
            let _ = WINDOWS.insert(gk, w, 0);
        }
    }
    // The goroutine is running on this thread right now (only the
    // scheduler programs read this).
    if sched_on() {
        let _ = THREAD_G.insert(current_tid(), gk, 0);
    }
}

/// How deep the frame whose return-address slot is at `sp` sits on
/// goroutine `g`'s stack, from the top (see `Window::frame_depth`).
#[inline(always)]
fn frame_depth(g: u64, sp: u64) -> Option<u64> {
    Some(read_u64(g.wrapping_add(G_STACK_HI))?.wrapping_sub(sp))
}

/// The low 32 bits of the running goroutine's id, where the site checks it
/// (`GoProbeConfig::goid_off`), else 0. Ids only grow, so two goroutines a
/// `g` serves 2^32 goroutines apart are all this could confuse.
#[inline(always)]
fn goid_of(h: &Hit) -> u32 {
    if h.cfg.goid_off == 0 {
        return 0;
    }
    read_u64(h.g.wrapping_add(h.cfg.goid_off as u64)).map_or(0, |id| id as u32)
}

/// Why an open RET-ended window call on this `g` will never see its RET,
/// if it will not: another goroutine opened it and ended inside it (its id
/// differs: `WindowStale`), or this goroutine calls the window again at the
/// same depth or shallower, so the first call unwound in a panic recovered
/// above it (`WindowUnended`; a deeper call is a recursion). Left alone,
/// the goroutine's calls would only nest in it and never be timed again.
///
/// # Safety
/// `call` is a value of `CALLS`, valid during this run.
#[inline(always)]
unsafe fn abandoned(call: *mut GoCall, goid: u32, depth: u64) -> Option<Counter> {
    // SAFETY: per the caller.
    let (was_goid, was_depth) = unsafe { ((*call).goid, (*call).frame_depth) };
    if was_goid != 0 && goid != 0 && was_goid != goid {
        return Some(Counter::WindowStale);
    }
    if was_depth != 0 && depth != 0 && depth <= was_depth {
        return Some(Counter::WindowUnended);
    }
    None
}

/// Drops the window of an abandoned RET-ended call (if it opened one),
/// counted as `why`, never observed.
#[inline(always)]
fn drop_ret_window(h: &Hit, why: Counter) {
    let gk = GoroutineKey { g: h.g, tgid: h.tgid, _pad: 0 };
    if let Some(w) = open_ret_window(&gk) {
        mark_closed(w);
    }
    count(why);
}

/// Drops an open window (`entry`, a copy of it in `w`) another goroutine
/// on the same `g` opened (it ended inside it), counted and never
/// observed; whether it did. Only where both ids were read (a window whose
/// sites do not check has 0).
#[inline(always)]
fn drop_if_stale(entry: *mut Window, w: &Window, goid: u32) -> bool {
    if w.goid == 0 || goid == 0 || w.goid == goid {
        return false;
    }
    mark_closed(entry);
    count(Counter::WindowStale);
    true
}

/// The entry of a window that ends in its callers (`WINDOW_END_CALLER`):
/// opens it if the call comes from a call site with an end site. A window
/// still open on this goroutine at the same or a smaller depth never
/// reached its end (its call unwound in a panic recovered above it): it is
/// dropped and counted, never observed (`WINDOW_END_NEXT_ENTRY`, a bench
/// mode without end sites, observes it: that is its end). One another
/// goroutine opened on this `g` is dropped as stale.
#[inline(always)]
fn caller_window_entry(ctx: &ProbeContext, h: &Hit) {
    if h.cfg.window >= MAX_WINDOWS {
        return;
    }
    // SAFETY: the probe's own register context.
    let regs = unsafe { &*ctx.regs };
    // At the entry site (the stack-check jump, before the prologue moves
    // the stack) the stack pointer holds the caller's return address.
    let sp = stack_pointer(regs);
    let Some(ret) = read_u64(sp) else { return };
    let bias = instruction_pointer(regs).wrapping_sub(h.cfg.site_addr);
    let caller = WindowCaller { entry: h.cookie, _pad: 0, return_address: ret.wrapping_sub(bias) };
    // SAFETY: lookup of a plain key.
    if unsafe { WINDOW_CALLERS.get(caller) }.is_none() {
        count(Counter::WindowIndirectCall);
        return;
    }
    let Some(depth) = frame_depth(h.g, sp) else { return };
    let gk = GoroutineKey { g: h.g, tgid: h.tgid, _pad: 0 };
    seen_running(h.now);
    let goid = goid_of(h);
    let entry = WINDOWS.get_ptr_mut(gk);
    if let Some(ptr) = entry.filter(|w| is_open(*w)) {
        let open = copy_of(ptr);
        if open.end != h.cfg.end {
            // A call inside another kind of window: it goes on.
            return;
        }
        // One gone with its goroutine is dropped: this call opens afresh.
        if !drop_if_stale(ptr, &open, goid) {
            if open.frame_depth < depth {
                // A recursive call (deeper): the outer window goes on.
                return;
            }
            if h.cfg.end == WINDOW_END_NEXT_ENTRY {
                observe_window(&gk, &open, h.now);
            } else {
                count(Counter::WindowUnended);
            }
        }
    }
    open_window(h, gk, entry, h.cfg.end, depth, goid);
}

/// An end site of a `WINDOW_END_CALLER` window, in a caller after the
/// call: the goroutine runs there above the window's frame, so the call
/// has returned. (A deeper activation of the same caller, recursing
/// through the window, finds its depth too large and leaves it open.)
#[inline(always)]
fn caller_window_end(ctx: &ProbeContext, h: &Hit) {
    let gk = GoroutineKey { g: h.g, tgid: h.tgid, _pad: 0 };
    // One lookup: the end reads, and closes, the entry it found.
    let Some(ptr) = open_window_ptr(&gk) else { return };
    let w = copy_of(ptr);
    if w.end != WINDOW_END_CALLER || w.window != h.cfg.window {
        return;
    }
    // SAFETY: the probe's own register context.
    let Some(depth) = frame_depth(h.g, stack_pointer(unsafe { &*ctx.regs })) else { return };
    if depth >= w.frame_depth {
        return;
    }
    if drop_if_stale(ptr, &w, goid_of(h)) {
        return;
    }
    // Copied again if it may have been charged.
    let w = if seen_running(h.now) { copy_of(ptr) } else { w };
    mark_closed(ptr);
    observe_window(&gk, &w, h.now);
    if sched_on() {
        let _ = THREAD_G.remove(current_tid());
    }
}

#[inline(always)]
fn current_tid() -> u32 {
    bpf_get_current_pid_tgid() as u32
}

/// Adds `d` ns and one event to a window's `inner` accumulator.
#[inline(always)]
pub(crate) fn add_inner(w: *mut Window, inner: Inner, d: u64) {
    let i = inner as usize;
    // SAFETY: a map value, valid during this run; indexes bounded by the enum.
    unsafe {
        if let Some(acc) = (*w).inner.get_mut(i) {
            *acc += d;
        }
        if let Some(n) = (*w).inner_n.get_mut(i) {
            *n += 1;
        }
    }
}

/// The Go scheduler's view of a window's goroutine: parked → ready is
/// off-CPU (waiting on a channel, timer, lock or the network), ready →
/// execute is run-queue time. Entry probes only (the functions run on the
/// scheduler's g0 or end in a stack switch; their returns are not needed).
#[uprobe]
pub fn go_sched(ctx: ProbeContext) -> u32 {
    let Some(h) = begin(&ctx) else { return 0 };
    // SAFETY: the probe's own register context.
    let regs = unsafe { &*ctx.regs };
    let tid = current_tid();
    let point = h.cfg.window;
    // Park is called on the goroutine itself (g register); the others
    // run on the scheduler and take the goroutine as their first argument.
    let gp = if point == SchedPoint::Park as u32 { h.g } else { reg(regs, 0).unwrap_or(0) };
    let gk = GoroutineKey { g: gp, tgid: h.tgid, _pad: 0 };
    // This thread runs the scheduler now.
    running_unseen(current_task(), h.now);
    let w = open_window_ptr(&gk);
    if point == SchedPoint::Execute as u32 {
        let Some(w) = w else {
            // Another goroutine takes the thread: no window time from now.
            let _ = THREAD_G.remove(tid);
            return 0;
        };
        // SAFETY: map value valid during this run.
        let (state, since) = unsafe { ((*w).sched, (*w).sched_since) };
        let d = h.now.saturating_sub(since);
        if state == SCHED_RUNNABLE {
            add_inner(w, Inner::Runqueue, d);
        } else if state == SCHED_PARKED {
            // Made runnable without `ready` (netpoll's injectglist): the
            // whole wait counts as off-CPU.
            add_inner(w, Inner::OffCpu, d);
        }
        // SAFETY: as above.
        unsafe {
            (*w).sched = SCHED_RUNNING;
            (*w).sched_since = h.now;
        }
        let _ = THREAD_G.insert(tid, gk, 0);
        return 0;
    }
    if point == SchedPoint::Park as u32 || point == SchedPoint::Yield as u32 {
        // The goroutine leaves this thread: the thread's own sleeps from now
        // on (an idle M in futex) are not the goroutine's.
        let _ = THREAD_G.remove(tid);
    }
    let Some(w) = w else { return 0 };
    // SAFETY: map value valid during this run.
    unsafe {
        let state = (*w).sched;
        if point == SchedPoint::Park as u32 {
            (*w).sched = SCHED_PARKED;
            (*w).sched_since = h.now;
        } else if point == SchedPoint::Ready as u32 {
            if state == SCHED_PARKED {
                add_inner(w, Inner::OffCpu, h.now.saturating_sub((*w).sched_since));
                (*w).sched = SCHED_RUNNABLE;
                (*w).sched_since = h.now;
            }
        } else if point == SchedPoint::Yield as u32 && state == SCHED_RUNNING {
            (*w).sched = SCHED_RUNNABLE;
            (*w).sched_since = h.now;
        }
    }
    0
}

#[uprobe]
pub fn go_ret(ctx: ProbeContext) -> u32 {
    let Some(h) = begin(&ctx) else { return 0 };
    if h.cfg.end == WINDOW_END_CALLER {
        caller_window_end(&ctx, &h);
        return 0;
    }
    let key = GoCallKey { g: h.g, tgid: h.tgid, class: h.cfg.class };
    let Some(call) = CALLS.get_ptr_mut(key) else {
        // The call began before the probes were attached.
        return 0;
    };
    // SAFETY: map value valid during this run.
    let (start, depth) = unsafe {
        if (*call).depth == 0 {
            // No call open (this one began before the probes were
            // attached): the entry is the goroutine's last one, kept.
            return 0;
        }
        (*call).depth -= 1;
        ((*call).start, (*call).depth)
    };
    if depth > 0 {
        return 0;
    }
    // The entry stays, closed (depth 0), for the goroutine's next call.
    let d = h.now.saturating_sub(start);
    let gk = GoroutineKey { g: h.g, tgid: h.tgid, _pad: 0 };
    if h.cfg.class == GoClass::Window as u32 {
        seen_running(h.now);
        close_window(&gk, h.now, d);
        if sched_on() {
            let _ = THREAD_G.remove(current_tid());
        }
        return 0;
    }
    observe(&GO_HIST, class_index(h.slot, h.cfg.class), d);
    if let Some(w) = open_window_ptr(&gk) {
        let inner = match h.cfg.class {
            c if c == GoClass::MapGrow as u32 => Inner::MapGrow,
            c if c == GoClass::GcAssist as u32 => Inner::GcAssist,
            _ => Inner::Map,
        };
        add_inner(w, inner, d);
    }
    0
}

/// 0 when the agent runs without scheduler probes (`--go-sched=false`):
/// windows then have no off-CPU or run-queue share to observe, and an
/// observed 0 would claim they had none. Set by the loader.
#[unsafe(no_mangle)]
static GO_SCHED: u32 = 1;

/// The current thread runs a window's end or entry now: a wait it still
/// has open was never reported switched in (see `gosched::running_unseen`).
/// Waits exist only with scheduler probes. Whether one was charged.
#[inline(always)]
fn seen_running(now: u64) -> bool {
    sched_on() && running_unseen(current_task(), now)
}

#[inline(always)]
fn sched_on() -> bool {
    // SAFETY: a plain read of a constant the loader may have rewritten.
    unsafe { core::ptr::read_volatile(&GO_SCHED) != 0 }
}

#[inline(always)]
fn close_window(gk: &GoroutineKey, now: u64, d: u64) {
    let Some(ptr) = open_ret_window(gk) else { return };
    let w = copy_of(ptr);
    mark_closed(ptr);
    record_window(gk, &w, now, d);
}

/// Observes a window (already removed from `WINDOWS`) that ends at `now`.
#[inline(always)]
fn observe_window(gk: &GoroutineKey, w: &Window, now: u64) {
    record_window(gk, w, now, now.saturating_sub(w.start));
}

#[inline(always)]
fn record_window(gk: &GoroutineKey, w: &Window, now: u64, d: u64) {
    if w.window >= MAX_WINDOWS || w.slot >= MAX_GO_SLOTS {
        return;
    }
    observe(&WINDOW_HIST, window_index(w.slot, w.window), d);
    let sched = sched_on();
    let mut i = 0;
    while i < Inner::COUNT {
        if !sched && (i == Inner::OffCpu as u32 || i == Inner::Runqueue as u32) {
            i += 1;
            continue;
        }
        let v = w.inner.get(i as usize).copied().unwrap_or(0);
        observe(&INNER_HIST, inner_index(w.slot, w.window, i), v);
        let n = w.inner_n.get(i as usize).copied().unwrap_or(0);
        if n > 0 {
            add(&INNER_EVENTS, inner_index(w.slot, w.window, i), n as u64);
        }
        i += 1;
    }
    if record_on() {
        if let Some(mut e) = WINDOW_RECORDS.reserve::<WindowRecord>(0) {
            e.write(WindowRecord {
                tgid: gk.tgid,
                window: w.window,
                g: gk.g,
                start_ns: now.saturating_sub(d),
                end_ns: now,
                inner: w.inner,
            });
            submit_record(e, &WINDOW_RECORDS, Ring::Windows);
        } else {
            count(Counter::EventsRingbufFull);
        }
    }
}

/// Does nothing: `cargo xtask bench gomap` attaches it at the very sites of
/// `go_entry`/`go_ret` (hidden flag `--bench-empty-probes`) to measure the
/// floor, what any uprobe there costs before a program does any work.
#[uprobe]
pub fn go_empty(_ctx: ProbeContext) -> u32 {
    0
}
