//! Timestamp rings: fixed arrays of `STAMP_WAYS`-way sets, keyed by revision (see
//! `agent_common::watch::STAMP_SETS` for why not LRU hash maps).
//!
//! Writers and readers on different CPUs meet through each entry's sequence
//! lock; two writers racing for one entry can lose one stamp, which the
//! reader then counts as a miss, as it would an evicted LRU entry.

use core::ptr::{read_volatile, write_volatile};

use agent_common::watch::{STAMP_WAYS, Stamp, stamp_empty, victim_way};
use aya_ebpf::maps::Array;

/// What `insert_first` did.
#[derive(PartialEq, Eq)]
pub enum Inserted<K> {
    New,
    /// Stored over an entry still in use (every way of its set was): its key.
    Evicted(K),
    /// The key was there already; its first time is kept.
    Exists,
}

/// The entry of `set` (its first entry) holding `key`, and its time.
#[inline(always)]
pub fn find<K: Copy + PartialEq>(ring: &Array<Stamp<K>>, set: u32, key: &K) -> Option<(u32, u64)> {
    for way in 0..STAMP_WAYS {
        let idx = set + way;
        let e = ring.get_ptr_mut(idx)?;
        // SAFETY: the pointer comes from the map and stays valid for the run;
        // volatile keeps the compiler from merging or reordering the reads
        // around the two sequence loads.
        unsafe {
            let s1 = read_volatile(&(*e).seq);
            if s1 & 1 != 0 {
                continue;
            }
            let k = read_volatile(&(*e).key);
            let ts = read_volatile(&(*e).ts);
            if read_volatile(&(*e).seq) == s1 && !stamp_empty(s1, ts) && k == *key {
                return Some((idx, ts));
            }
        }
    }
    None
}

/// Stores `key` at `ts` unless it is already there (the first time wins),
/// in the set's first empty way, else its oldest.
#[inline(always)]
pub fn insert_first<K: Copy + PartialEq>(ring: &Array<Stamp<K>>, set: u32, key: &K, ts: u64) -> Option<Inserted<K>> {
    if find(ring, set, key).is_some() {
        return Some(Inserted::Exists);
    }
    insert(ring, set, key, ts)
}

/// The time stored for `key`, or else `ts`, stored for it now: the first
/// time wins, as with `insert_first`, whose lookup this shares.
#[inline(always)]
pub fn first_time<K: Copy + PartialEq>(ring: &Array<Stamp<K>>, set: u32, key: &K, ts: u64) -> Option<u64> {
    if let Some((_, first)) = find(ring, set, key) {
        return Some(first);
    }
    insert(ring, set, key, ts).map(|_| ts)
}

/// Stores `key` at `ts`, known not to be in the set, in its first empty
/// way, else its oldest.
#[inline(always)]
fn insert<K: Copy + PartialEq>(ring: &Array<Stamp<K>>, set: u32, key: &K, ts: u64) -> Option<Inserted<K>> {
    let mut times = [0u64; STAMP_WAYS as usize];
    let mut seqs = [0u64; STAMP_WAYS as usize];
    for way in 0..STAMP_WAYS {
        let e = ring.get_ptr_mut(set + way)?;
        // SAFETY: as in `find`.
        (times[way as usize], seqs[way as usize]) = unsafe { (read_volatile(&(*e).ts), read_volatile(&(*e).seq)) };
    }
    let way = victim_way(times, seqs);
    // The victim is an empty way if there is one: a live entry is pushed
    // out only when the victim is not empty. Read at the victim's index,
    // not tracked per way in the loop (nor the key looked for there, in one
    // pass with `find`): each branch per way doubles the paths the verifier
    // walks, and the one-pass form took `kube_queue` from 6,000 verified
    // instructions to 78,000 and `etcd_enqueue` from 8,500 to 25,500.
    let live = matches!((times.get(way as usize), seqs.get(way as usize)), (Some(&t), Some(&q)) if !stamp_empty(q, t));
    let e = ring.get_ptr_mut(set + way)?;
    // SAFETY: as in `find`. The key pushed out is read whether or not it
    // was live: a branch here would double the verifier's paths again.
    let old = unsafe { read_volatile(&(*e).key) };
    // SAFETY: as in `find`.
    write_locked(e, |e| unsafe {
        write_volatile(&mut (*e).key, *key);
        write_volatile(&mut (*e).ts, ts);
    });
    Some(if live { Inserted::Evicted(old) } else { Inserted::New })
}

/// Empties entry `idx` (found by `find`).
#[inline(always)]
pub fn remove<K>(ring: &Array<Stamp<K>>, idx: u32) {
    if let Some(e) = ring.get_ptr_mut(idx) {
        // SAFETY: as in `find`.
        write_locked(e, |e| unsafe { write_volatile(&mut (*e).ts, 0) });
    }
}

/// Runs `write` on entry `e` with its sequence odd, then even again, so
/// that a reader on another CPU sees the change (see `find`).
#[inline(always)]
fn write_locked<K>(e: *mut Stamp<K>, write: impl FnOnce(*mut Stamp<K>)) {
    // SAFETY: `e` comes from the map and stays valid for the run.
    unsafe {
        let odd = (read_volatile(&(*e).seq) + 1) | 1;
        write_volatile(&mut (*e).seq, odd);
        write(e);
        write_volatile(&mut (*e).seq, odd + 1);
    }
}
