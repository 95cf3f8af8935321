//! Maps shared by every program in the object.

use agent_common::Counter;
use aya_ebpf::{
    macros::map,
    maps::{PerCpuArray, RingBuf},
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
