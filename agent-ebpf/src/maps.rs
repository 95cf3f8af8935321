//! Maps shared by every program in the object.

use agent_common::Counter;
use agent_common::{Histogram, watch::MAX_SLOTS};
use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, PerCpuArray, RingBuf},
};

/// Self-counters, one slot per `agent_common::Counter`; per-CPU so that the
/// hot path never contends on a cache line.
#[map(name = "WS_COUNTERS")]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Counter::COUNT, 0);

/// Rare events for user space (exec today). 256 KiB holds about 900 exec
/// events, far more than a node produces between two polls; when it is full
/// the event is counted in `EventsRingbufFull`, never dropped silently.
#[map(name = "WS_EVENTS")]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(256 * 1024, 0);

#[inline(always)]
pub fn count(c: Counter) {
    if let Some(slot) = COUNTERS.get_ptr_mut(c as u32) {
        // A plain add on this CPU's own slot. Tracing programs do not nest on
        // one CPU (the kernel's recursion guard skips the inner one and counts
        // it as a miss), so the read-modify-write is not interleaved there;
        // the BPF target offers no 64-bit atomics in `core` anyway.
        // SAFETY: the pointer comes from the map and stays valid for the run.
        unsafe { *slot += 1 };
    }
}

/// Most processes watched at once (etcd servers and clients, Go programs).
pub const MAX_PROCS: u32 = 4096;

/// Watched processes: tgid → label slot. Programs on shared binaries return
/// at once for processes not in here (excluded by the user's filters).
/// Written by user space on discovery, cleared by sched_process_exit.
#[map(name = "WS_PROC_SLOT")]
pub static PROC_SLOT: HashMap<u32, u32> = HashMap::with_max_entries(MAX_PROCS, 0);

/// Slot of the current process, if it is watched.
#[inline(always)]
pub fn current_slot(tgid: u32) -> Option<u32> {
    // SAFETY: lookup of a plain key; the value is copied out at once.
    let slot = unsafe { PROC_SLOT.get(tgid) }.copied()?;
    // Keep every index derived from a slot in bounds for the verifier.
    if slot < MAX_SLOTS { Some(slot) } else { Some(0) }
}

/// Adds one duration to histogram `idx` of `hists`.
#[inline(always)]
pub fn observe(hists: &PerCpuArray<Histogram>, idx: u32, ns: u64) {
    if let Some(h) = hists.get_ptr_mut(idx) {
        let b = agent_common::hist::bucket_index(ns) as usize;
        // SAFETY: per-CPU value owned by the map; the bound check keeps the
        // verifier (and us) inside the array.
        unsafe {
            if b < agent_common::NBUCKETS {
                (*h).buckets[b] += 1;
            }
            (*h).sum_ns += ns;
        }
    }
}

/// Adds `n` to slot `idx` of a per-CPU counter array.
#[inline(always)]
pub fn add(counters: &PerCpuArray<u64>, idx: u32, n: u64) {
    if let Some(c) = counters.get_ptr_mut(idx) {
        // SAFETY: see `count`.
        unsafe { *c += n };
    }
}

/// Whether a recorder wants per-event records (index 0: 0 = off): watch
/// event records and closed windows. Histograms never depend on it.
#[map(name = "WS_RECORD_ON")]
pub static RECORD_ON: Array<u32> = Array::with_max_entries(1, 0);

#[inline(always)]
pub fn record_on() -> bool {
    RECORD_ON.get(0).is_some_and(|v| *v != 0)
}
