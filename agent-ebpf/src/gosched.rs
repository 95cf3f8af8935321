//! Kernel-side scheduling of the threads that run a window's goroutine:
//! when such a thread is switched out (a blocking syscall, a page fault,
//! preemption by another task), the time until it is woken is the window's
//! off-CPU time and the time from wake-up to running again its run-queue
//! time. The Go-side half (goroutines parked and made ready by the Go
//! scheduler) is in `goruntime::go_sched`; `THREAD_G` joins the two.
//!
//! Both programs run on every context switch of the node, so each starts
//! with one lookup and returns when it misses. They are attached only while
//! some binary has window probes.
//!
//! They are raw tracepoints (`BPF_RAW_TRACEPOINT_OPEN`), not perf-event
//! ones: a perf-event tracepoint formats its record before the program
//! runs, and is skipped whenever any other perf-event or kprobe-type BPF
//! program, or a bpf() map syscall of the agent itself, holds the CPU's
//! `bpf_prog_active` (3-7 skipped wake-ups per 300 windows, 4 when idle
//! here: their run-queue time was then charged as off-CPU). A raw
//! tracepoint only guards against its own recursion. Its arguments are the
//! tracepoint's prototype (`sched_switch(preempt, prev, next, prev_state)`,
//! Linux 5.18+; `sched_wakeup(p)`), so tasks are known by their
//! `task_struct` address, which keys `THREAD_OFF`: no field offsets to
//! read, and `bpf_get_current_task` gives the same key in a uprobe.

use agent_common::{
    counters::Counter,
    goruntime::{GoroutineKey, Inner, SCHED_RUNNING, ThreadOff},
};
use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_get_current_task, bpf_ktime_get_ns},
    macros::{map, raw_tracepoint},
    maps::LruHashMap,
    programs::RawTracePointContext,
};

use crate::{
    goruntime::{THREAD_G, add_inner, open_window_ptr},
    maps::count,
};

/// `prev_state` bits of a task that is gone (`EXIT_DEAD`, `EXIT_ZOMBIE`,
/// `TASK_DEAD`): it will not run again, so nothing waits for its switch-in.
const STATE_EXITING: u64 = 0x10 | 0x20 | 0x80;

/// Threads off CPU while running a window's goroutine, by `task_struct`
/// address.
#[map(name = "WS_GO_THREAD_OFF")]
static THREAD_OFF: LruHashMap<u64, ThreadOff> = LruHashMap::with_max_entries(8192, 0);

#[raw_tracepoint(tracepoint = "sched_switch")]
pub fn go_sched_switch(ctx: RawTracePointContext) -> u32 {
    let preempt: u64 = ctx.arg(0);
    let prev: u64 = ctx.arg(1);
    let next: u64 = ctx.arg(2);
    let prev_state: u64 = ctx.arg(3);
    // SAFETY: no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    // The tracepoint fires on `prev`, before the switch: the current task.
    let prev_tid = bpf_get_current_pid_tgid() as u32;
    if prev_tid != 0 {
        switched_out(prev_tid, prev, preempt & 1 != 0, prev_state, now);
    }
    switched_in(next, now);
    0
}

#[inline(always)]
fn switched_out(tid: u32, task: u64, preempt: bool, state: u64, now: u64) {
    // SAFETY: lookup of a plain key; the value is copied at once.
    let Some(gk) = (unsafe { THREAD_G.get(tid) }).copied() else { return };
    // It was running until now: a wait still open was never switched in.
    running_unseen(task, now);
    let Some(w) = open_window_ptr(&gk) else { return };
    // SAFETY: map value valid during this run.
    if unsafe { (*w).sched } != SCHED_RUNNING || state & STATE_EXITING != 0 {
        return;
    }
    // Preempted, or gave the CPU up while runnable (sched_yield): it waits
    // for a CPU. Any other state is a block (a syscall, a fault, a lock).
    let kind = if preempt || state == 0 { Inner::Runqueue } else { Inner::OffCpu };
    let off = ThreadOff { g: gk.g, tgid: gk.tgid, kind: kind as u32, since: now };
    let _ = THREAD_OFF.insert(task, off, 0);
}

#[inline(always)]
fn switched_in(task: u64, now: u64) {
    // SAFETY: lookup of a plain key; the value is copied at once.
    let Some(off) = (unsafe { THREAD_OFF.get(task) }).copied() else { return };
    let _ = THREAD_OFF.remove(task);
    charge(&off, now);
}

/// The current thread, as `THREAD_OFF` knows it (from a uprobe).
#[inline(always)]
pub(crate) fn current_task() -> u64 {
    // SAFETY: no preconditions.
    unsafe { bpf_get_current_task() }
}

/// `task` is running now (a probe hit on it, or its switch-out): a wait
/// still recorded for it ended without the kernel reporting the switch-in
/// (see `Counter::SchedSwitchInUnseen`). It is charged up to now, the
/// first moment the thread is known to run again, so no more than the
/// thread's run since then is counted as waiting; left alone, the whole
/// wait would vanish from its window. Whether there was one (a window may
/// have been charged).
#[inline(always)]
pub(crate) fn running_unseen(task: u64, now: u64) -> bool {
    // SAFETY: lookup of a plain key; the value is copied at once.
    let Some(off) = (unsafe { THREAD_OFF.get(task) }).copied() else { return false };
    let _ = THREAD_OFF.remove(task);
    charge(&off, now);
    count(Counter::SchedSwitchInUnseen);
    true
}

/// Adds the span since `off.since` to the window still open on its goroutine.
#[inline(always)]
fn charge(off: &ThreadOff, now: u64) {
    let gk = GoroutineKey { g: off.g, tgid: off.tgid, _pad: 0 };
    if let Some(w) = open_window_ptr(&gk) {
        let kind = if off.kind == Inner::OffCpu as u32 { Inner::OffCpu } else { Inner::Runqueue };
        add_inner(w, kind, now.saturating_sub(off.since));
    }
}

#[raw_tracepoint(tracepoint = "sched_wakeup")]
pub fn go_sched_wakeup(ctx: RawTracePointContext) -> u32 {
    let task: u64 = ctx.arg(0);
    let Some(off) = THREAD_OFF.get_ptr_mut(task) else { return 0 };
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
