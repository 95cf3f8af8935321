//! The kernel programs' per-CPU cache of their last process → slot lookup
//! (`WS_PROC_SLOT`), packed in one word.
//!
//! A uprobe program may be preempted (it runs with migration, not
//! preemption, disabled), and another program on the same CPU may then
//! update the cache. One aligned 64-bit load or store cannot tear, so a
//! program reads either the old entry or the new one, each whole; a
//! multi-word entry could pair one process's id with another's slot.
//!
//! The word: bit 63 set when valid, bits 55..63 the slot (`NOT_WATCHED` for
//! a process that is not watched), bits 33..55 the tgid (Linux caps pids
//! below 2^22), bits 0..33 the sum of both change counts of `WS_PROC_SLOT`
//! (user space's and the exit program's) when the lookup was made. Both
//! counts only grow, so a change of either changes the sum; an entry is
//! taken only at the sum it was made at, which recurs only after 2^33
//! changes.

use crate::watch::MAX_SLOTS;

/// The slot value of a process that is not watched.
pub const NOT_WATCHED: u32 = 0xff;
const VALID: u64 = 1 << 63;
const SLOT_SHIFT: u32 = 55;
const TGID_SHIFT: u32 = 33;
const TGID_MASK: u64 = (1 << 22) - 1;
const EPOCH_MASK: u64 = (1 << TGID_SHIFT) - 1;

const _: () = assert!(MAX_SLOTS < NOT_WATCHED);

/// The change count an entry is made and checked at.
#[inline(always)]
pub fn epoch(user: u64, kernel: u64) -> u64 {
    user.wrapping_add(kernel) & EPOCH_MASK
}

/// An entry: `slot` (or `NOT_WATCHED`) of `tgid` at `epoch`. None for a
/// tgid the word cannot hold (not a Linux pid): such a process is looked up
/// every time.
#[inline(always)]
pub fn pack(tgid: u32, slot: u32, epoch: u64) -> Option<u64> {
    if u64::from(tgid) > TGID_MASK || slot > NOT_WATCHED {
        return None;
    }
    Some(VALID | (u64::from(slot) << SLOT_SHIFT) | (u64::from(tgid) << TGID_SHIFT) | (epoch & EPOCH_MASK))
}

/// The slot an entry holds for `tgid` at `epoch` (`NOT_WATCHED` included),
/// or None when it holds another process, another epoch, or nothing.
#[inline(always)]
pub fn cached(word: u64, tgid: u32, epoch: u64) -> Option<u32> {
    let hit = word & VALID != 0
        && (word >> TGID_SHIFT) & TGID_MASK == u64::from(tgid)
        && word & EPOCH_MASK == epoch & EPOCH_MASK;
    if hit { Some(((word >> SLOT_SHIFT) & 0xff) as u32) } else { None }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_is_taken_for_its_process_at_its_epoch_only() {
        let e = epoch(7, 3);
        let w = pack(4_194_303, 63, e).expect("the largest pid fits");
        assert_eq!(cached(w, 4_194_303, e), Some(63));
        assert_eq!(cached(w, 4_194_302, e), None, "another process");
        assert_eq!(cached(w, 4_194_303, epoch(8, 3)), None, "user space changed the map");
        assert_eq!(cached(w, 4_194_303, epoch(7, 4)), None, "the exit program changed the map");
        assert_eq!(cached(0, 0, 0), None, "an empty word is no entry, even for tgid 0 at epoch 0");
        let unwatched = pack(1, NOT_WATCHED, e).expect("fits");
        assert_eq!(cached(unwatched, 1, e), Some(NOT_WATCHED));
    }

    #[test]
    fn fields_do_not_bleed_into_each_other() {
        for (tgid, slot, ep) in
            [(0, 0, 0), (1, 0, EPOCH_MASK), (TGID_MASK as u32, NOT_WATCHED, 0), (12345, 17, 1 << 32)]
        {
            let w = pack(tgid, slot, ep).expect("fits");
            assert_eq!(cached(w, tgid, ep), Some(slot), "{tgid} {slot} {ep}");
        }
        // Epochs wrap at 2^33 changes, in the sum as in the entry.
        assert_eq!(epoch(EPOCH_MASK, 1), 0);
        assert_eq!(cached(pack(5, 2, epoch(EPOCH_MASK, 1)).expect("fits"), 5, 0), Some(2));
    }

    #[test]
    fn what_the_word_cannot_hold_is_not_cached() {
        assert_eq!(pack(1 << 22, 0, 0), None);
        assert_eq!(pack(1, NOT_WATCHED + 1, 0), None);
    }
}
