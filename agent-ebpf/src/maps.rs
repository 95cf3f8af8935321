//! Maps shared by every program in the object.

#[cfg(bpf_target_arch = "x86_64")]
use agent_common::procslot;
use agent_common::{Counter, counters::Ring};
use agent_common::{Histogram, watch::MAX_SLOTS};
#[cfg(bpf_target_arch = "x86_64")]
use core::ptr::{read_volatile, write_volatile};

use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    macros::map,
    maps::{Array, HashMap, PerCpuArray, RingBuf, ring_buf::RingBufEntry},
};

/// Self-counters, one slot per `agent_common::Counter`: shared by every
/// CPU (atomic adds), like every counter and histogram array of the object,
/// so the agent's kernel memory does not grow with the CPU count; they
/// count rare events (drops, misses), never a hot path's every hit.
#[map(name = "WS_COUNTERS")]
pub static COUNTERS: Array<u64> = Array::with_max_entries(Counter::COUNT, 0);

/// Rare events for user space (exec today). 256 KiB holds about 900 exec
/// events, far more than a node produces between two polls; when it is full
/// the event is counted in `EventsRingbufFull`, never dropped silently.
#[map(name = "WS_EVENTS")]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(Ring::Events.bytes(), 0);

/// Per ring (`agent_common::counters::Ring`), per CPU: at `ring`, the most
/// bytes seen waiting in it right after a submit (how close it came to full
/// between two drains); at `Ring::COUNT + ring`, the records submitted to it.
/// User space counts the records it reads, so a test (or an operator) can
/// tell that everything the kernel produced so far has been consumed. Per
/// CPU, so neither the max nor the count needs an atomic; six words per CPU.
#[map(name = "WS_RING_FILL")]
pub static RING_FILL: PerCpuArray<u64> = PerCpuArray::with_max_entries(2 * Ring::COUNT, 0);

/// Submits a record to a ring user space reads on a timer (the record
/// rings): without a wakeup, which would queue an irq_work (a self-IPI, a
/// VM exit here) per record, unless the ring is past half full: then its
/// reader is woken at once, so a burst (an event to 1,000 watchers is 1,000
/// records) is read before the ring fills. Notes the fill, as `note_fill`.
#[inline(always)]
pub fn submit_record<T>(e: RingBufEntry<T>, ring: &RingBuf, which: Ring) {
    // The producer position already counts the reserved record.
    let waiting = ring.query(BPF_RB_AVAIL_DATA as u64);
    let flags = if waiting > u64::from(which.bytes() / 2) { BPF_RB_FORCE_WAKEUP } else { BPF_RB_NO_WAKEUP };
    e.submit(flags as u64);
    fill_was(waiting, which);
}

/// Notes how full `ring` is now and counts the record (call right after a
/// submit to it).
#[inline(always)]
pub fn note_fill(ring: &RingBuf, which: Ring) {
    fill_was(ring.query(BPF_RB_AVAIL_DATA as u64), which);
}

/// Notes `waiting` bytes in ring `which` right after a submit, and counts
/// the record.
#[inline(always)]
fn fill_was(waiting: u64, which: Ring) {
    if let Some(m) = RING_FILL.get_ptr_mut(which as u32) {
        // SAFETY: this CPU's value; programs do not nest on one CPU.
        unsafe {
            if waiting > *m {
                *m = waiting;
            }
        }
    }
    if let Some(n) = RING_FILL.get_ptr_mut(Ring::COUNT + which as u32) {
        // SAFETY: as above.
        unsafe { *n += 1 }
    }
}

#[inline(always)]
pub fn count(c: Counter) {
    add(&COUNTERS, c as u32, 1);
}

/// Most processes watched at once (etcd servers and clients, Go programs).
pub const MAX_PROCS: u32 = 4096;

/// Watched processes: tgid → label slot. Programs on shared binaries return
/// at once for processes not in here (excluded by the user's filters).
/// Written by user space on discovery, cleared by sched_process_exit.
#[map(name = "WS_PROC_SLOT")]
pub static PROC_SLOT: HashMap<u32, u32> = HashMap::with_max_entries(MAX_PROCS, 0);

/// How often the exit program changed `WS_PROC_SLOT` (atomic adds, after
/// each removal).
#[map(name = "WS_SLOT_EPOCH")]
pub static SLOT_EPOCH: Array<u64> = Array::with_max_entries(1, 0);

/// Per CPU: at 0, the last `WS_PROC_SLOT` lookup on this CPU, packed with
/// the change counts it was made at (`agent_common::procslot`); at 1, user
/// space's count of its own changes to `WS_PROC_SLOT` (it alone adds, moves
/// and forgets processes there), which it writes to every CPU's value after
/// each change, zeroing the lookup. The kernel copies a per-CPU value from
/// user space a word at a time, so a program reads the old count or the
/// new one, never a mix (a plain array's value is copied with `memcpy`).
/// Both counts are read before the lookup, and each writer counts after
/// its change: a cached lookup is used only while neither moved since.
///
/// A hash lookup read three cold cache lines (the table, a bucket, an
/// element) at every probe hit: 0.2 to 0.28 µs of each program's run on
/// this VM, at a put rate where etcd's own work evicts them between hits.
/// Probe hits on one CPU come in runs from one process. amd64 only: the
/// order of those reads and writes rests on its ordered loads and locked
/// adds.
#[map(name = "WS_SLOT_CACHE")]
static SLOT_CACHE: PerCpuArray<[u64; 2]> = PerCpuArray::with_max_entries(1, 0);

/// Slot of the current process, if it is watched.
#[inline(always)]
pub fn current_slot(tgid: u32) -> Option<u32> {
    let slot = watched_slot(tgid)?;
    // Keep every index derived from a slot in bounds for the verifier.
    if slot < MAX_SLOTS { Some(slot) } else { Some(0) }
}

/// The current process's slot, through this CPU's last lookup.
#[cfg(bpf_target_arch = "x86_64")]
#[inline(always)]
fn watched_slot(tgid: u32) -> Option<u32> {
    let cache = SLOT_CACHE.get_ptr_mut(0)?;
    // SAFETY: values of the maps, valid for the program's run; volatile:
    // read before the lookup (see SLOT_CACHE). This CPU's words are written
    // whole, by one store or by the kernel's word copy.
    let (word, user, kernel) = unsafe {
        let kernel = SLOT_EPOCH.get_ptr(0).map(|e| read_volatile(e)).unwrap_or(0);
        (read_volatile(&(*cache)[0]), read_volatile(&(*cache)[1]), kernel)
    };
    let epoch = procslot::epoch(user, kernel);
    let slot = match procslot::cached(word, tgid, epoch) {
        Some(slot) => slot,
        None => {
            let slot = lookup_slot(tgid).unwrap_or(procslot::NOT_WATCHED);
            if let Some(w) = procslot::pack(tgid, slot, epoch) {
                // SAFETY: this CPU's value; one aligned store.
                unsafe { write_volatile(&raw mut (*cache)[0], w) };
            }
            slot
        }
    };
    (slot != procslot::NOT_WATCHED).then_some(slot)
}

#[cfg(not(bpf_target_arch = "x86_64"))]
#[inline(always)]
fn watched_slot(tgid: u32) -> Option<u32> {
    lookup_slot(tgid)
}

#[inline(always)]
fn lookup_slot(tgid: u32) -> Option<u32> {
    // SAFETY: lookup of a plain key; the value is copied out at once.
    unsafe { PROC_SLOT.get(tgid) }.copied()
}

/// Counts a change the kernel made to `WS_PROC_SLOT` (see `SLOT_EPOCH`).
#[inline(always)]
pub fn proc_slot_changed() {
    add(&SLOT_EPOCH, 0, 1);
}

/// Adds one duration to histogram `idx` of `hists`.
#[inline(always)]
pub fn observe(hists: &Array<Histogram>, idx: u32, ns: u64) {
    if let Some(h) = hists.get_ptr_mut(idx) {
        let b = agent_common::hist::bucket_index(ns) as usize;
        // SAFETY: a value of the map, valid for the program's run; the bound
        // check keeps the verifier (and us) inside the array.
        unsafe {
            if b < agent_common::NBUCKETS {
                atomic_add(&raw mut (*h).buckets[b], 1);
            }
            atomic_add(&raw mut (*h).sum_ns, ns);
        }
    }
}

/// `*p += v` as one atomic instruction. Histograms are shared by every CPU,
/// so their memory does not grow with the CPU count (a per-CPU histogram
/// array would: 856 bytes per histogram and CPU).
///
/// # Safety
/// `p` points into a map value.
#[inline(always)]
unsafe fn atomic_add(p: *mut u64, v: u64) {
    use core::intrinsics::{AtomicOrdering, atomic_xadd};
    // SAFETY: per the caller; the result (the old value) is unused, so the
    // backend emits the plain atomic add every BPF kernel has.
    let _ = unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(p, v) };
}

/// Adds `n` to slot `idx` of a counter array (shared: an atomic add).
#[inline(always)]
pub fn add(counters: &Array<u64>, idx: u32, n: u64) {
    if let Some(c) = counters.get_ptr_mut(idx) {
        // SAFETY: a value of the map, valid for the program's run.
        unsafe { atomic_add(c, n) };
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
