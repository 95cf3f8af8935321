//! Kernel-side scheduling of the threads that run a window's goroutine:
//! when such a thread is switched out (a blocking syscall, a page fault,
//! preemption by another task), the time until it is woken is the window's
//! off-CPU time and the time from wake-up to running again its run-queue
//! time. The Go-side half (goroutines parked and made ready by the Go
//! scheduler) is in `goruntime::go_sched`; `THREAD_G` joins the two.
//!
//! Both programs run on every context switch of the node, so each starts
//! with one lookup keyed by the thread and returns when it misses. They are
//! attached only while some binary has window probes.

use core::ptr::read_volatile;

use agent_common::{
    counters::Counter,
    goruntime::{GoroutineKey, Inner, SCHED_RUNNING, ThreadOff},
};
use aya_ebpf::{
    helpers::bpf_ktime_get_ns,
    macros::{map, tracepoint},
    maps::LruHashMap,
    programs::TracePointContext,
};

use crate::{
    goruntime::{THREAD_G, WINDOWS, add_inner},
    maps::count,
};

// Record layouts, from tracefs at load time (these are the 6.x values).
#[unsafe(no_mangle)]
static SWITCH_PREV_PID_OFFSET: u32 = 24;
#[unsafe(no_mangle)]
static SWITCH_PREV_STATE_OFFSET: u32 = 32;
#[unsafe(no_mangle)]
static SWITCH_NEXT_PID_OFFSET: u32 = 56;
#[unsafe(no_mangle)]
static WAKEUP_PID_OFFSET: u32 = 24;

/// `prev_state` of a task switched out while still runnable: 0, or
/// TASK_REPORT_MAX (0x100) when it was preempted; sleeping states are the
/// low bits.
const STATE_REPORT_MASK: i64 = 0xff;

/// Threads off CPU while running a window's goroutine.
#[map(name = "WS_GO_THREAD_OFF")]
static THREAD_OFF: LruHashMap<u32, ThreadOff> = LruHashMap::with_max_entries(8192, 0);

#[inline(always)]
fn offset(v: &u32) -> usize {
    // SAFETY: a plain read of a constant the loader may have rewritten.
    unsafe { read_volatile(v) as usize }
}

#[tracepoint(category = "sched", name = "sched_switch")]
pub fn go_sched_switch(ctx: TracePointContext) -> u32 {
    // SAFETY: offsets come from this tracepoint's format; reads are checked.
    let (prev, next) = unsafe {
        (
            ctx.read_at::<u32>(offset(&SWITCH_PREV_PID_OFFSET)).unwrap_or(0),
            ctx.read_at::<u32>(offset(&SWITCH_NEXT_PID_OFFSET)).unwrap_or(0),
        )
    };
    // SAFETY: no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    if prev != 0 {
        switched_out(&ctx, prev, now);
    }
    if next != 0 {
        switched_in(next, now);
    }
    0
}

#[inline(always)]
fn switched_out(ctx: &TracePointContext, tid: u32, now: u64) {
    // SAFETY: lookup of a plain key; the value is copied at once.
    let Some(gk) = (unsafe { THREAD_G.get(tid) }).copied() else { return };
    // It was running until now: a wait still open was never switched in.
    running_unseen(tid, now);
    // SAFETY: as above.
    let Some(w) = (unsafe { WINDOWS.get(gk) }) else { return };
    if w.sched != SCHED_RUNNING {
        return;
    }
    // SAFETY: offset from the tracepoint's format.
    let state = unsafe { ctx.read_at::<i64>(offset(&SWITCH_PREV_STATE_OFFSET)) }.unwrap_or(1);
    let kind = if state & STATE_REPORT_MASK == 0 { Inner::Runqueue } else { Inner::OffCpu };
    let off = ThreadOff { g: gk.g, tgid: gk.tgid, kind: kind as u32, since: now };
    let _ = THREAD_OFF.insert(tid, off, 0);
}

#[inline(always)]
fn switched_in(tid: u32, now: u64) {
    // SAFETY: lookup of a plain key; the value is copied at once.
    let Some(off) = (unsafe { THREAD_OFF.get(tid) }).copied() else { return };
    let _ = THREAD_OFF.remove(tid);
    charge(&off, now);
}

/// `tid` is running now (a probe hit on it, or its switch-out): a wait
/// still recorded for it ended without the kernel reporting the switch-in
/// (see `Counter::SchedSwitchInUnseen`). It is charged up to now, the
/// first moment the thread is known to run again, so no more than the
/// thread's run since then is counted as waiting; left alone, the whole
/// wait would vanish from its window.
#[inline(always)]
pub(crate) fn running_unseen(tid: u32, now: u64) {
    // SAFETY: lookup of a plain key; the value is copied at once.
    let Some(off) = (unsafe { THREAD_OFF.get(tid) }).copied() else { return };
    let _ = THREAD_OFF.remove(tid);
    charge(&off, now);
    count(Counter::SchedSwitchInUnseen);
}

/// Adds the span since `off.since` to the window still open on its goroutine.
#[inline(always)]
fn charge(off: &ThreadOff, now: u64) {
    let gk = GoroutineKey { g: off.g, tgid: off.tgid, _pad: 0 };
    if let Some(w) = WINDOWS.get_ptr_mut(gk) {
        let kind = if off.kind == Inner::OffCpu as u32 { Inner::OffCpu } else { Inner::Runqueue };
        add_inner(w, kind, now.saturating_sub(off.since));
    }
}

#[tracepoint(category = "sched", name = "sched_wakeup")]
pub fn go_sched_wakeup(ctx: TracePointContext) -> u32 {
    // SAFETY: offset from the tracepoint's format.
    let tid = unsafe { ctx.read_at::<u32>(offset(&WAKEUP_PID_OFFSET)) }.unwrap_or(0);
    if tid == 0 {
        return 0;
    }
    let Some(off) = THREAD_OFF.get_ptr_mut(tid) else { return 0 };
    // SAFETY: map value valid during this run.
    let o = unsafe { *off };
    if o.kind != Inner::OffCpu as u32 {
        return 0;
    }
    // SAFETY: no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    charge(&o, now);
    // Woken: from now on it waits for a CPU.
    // SAFETY: as above.
    unsafe {
        (*off).kind = Inner::Runqueue as u32;
        (*off).since = now;
    }
    0
}
