//! Exemplars of the watch stage histograms: per stage series, the slowest
//! event of each interval, named by its revision (and watcher), so that a
//! spike on a panel leads to `watchscope record`'s chain of that revision.
//!
//! The kernel keeps, per stage histogram, the slowest observation of the
//! current interval (`WS_WATCH_EXEMPLAR`, see `StageExemplar`). Each read of
//! `/metrics` closes the interval: the epoch is bumped, and each whole entry
//! of the closed epoch is a candidate for its series. A series keeps its
//! exemplar for `--exemplar-window` unless a slower candidate comes: the
//! exemplar is the slowest event of about the last window, whoever scrapes
//! and however often (with one interval per scrape, two scrapers would
//! otherwise each miss the other's slow events). Candidates come from
//! successive intervals, so a series' exemplar timestamps only increase, as
//! Prometheus' exemplar storage requires.

use std::{
    collections::HashMap,
    time::{Duration, SystemTime},
};

use agent_common::watch::{MAX_SLOTS, StageExemplar};
use aya::maps::{Array, MapData};

use super::CollectError;

/// One exemplar as exported.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Exemplar {
    pub value_ns: u64,
    pub revision: i64,
    /// etcd's watch id (decimal) or an API server's watcher (hex address).
    pub watcher: Option<String>,
    /// When the observation ended, on the wall clock.
    pub at: SystemTime,
}

impl Exemplar {
    /// The exemplar's labels, in the order they are written.
    pub fn labels(&self) -> Vec<(&'static str, String)> {
        let mut l = vec![("revision", self.revision.to_string())];
        if let Some(w) = &self.watcher {
            l.push(("watcher", w.clone()));
        }
        l
    }

    /// From a whole kernel entry; `wall_minus_mono_ns`: the wall clock less
    /// CLOCK_MONOTONIC, both in nanoseconds, at about the same instant.
    fn from_kernel(e: &StageExemplar, wall_minus_mono_ns: i128) -> Option<Exemplar> {
        let watcher = match e.flags {
            StageExemplar::WATCH_ID => Some((e.watcher as i64).to_string()),
            StageExemplar::CACHE_WATCHER => Some(format!("{:#x}", e.watcher)),
            _ => None,
        };
        let wall_ns = u64::try_from(i128::from(e.at_ns) + wall_minus_mono_ns).ok()?;
        Some(Exemplar {
            value_ns: e.ns,
            revision: e.rev,
            watcher,
            at: SystemTime::UNIX_EPOCH + Duration::from_nanos(wall_ns),
        })
    }
}

/// Whether candidate `new` (from a later interval) replaces `kept`: when it
/// is at least as slow, or `kept` is older than the window.
fn replaces(kept: &Exemplar, new: &Exemplar, now: SystemTime, window: Duration) -> bool {
    new.value_ns >= kept.value_ns || now.duration_since(kept.at).is_ok_and(|age| age > window)
}

/// The kernel's exemplar arrays and what user space keeps of them.
pub struct ExemplarMaps {
    entries: Array<MapData, StageExemplar>,
    epoch: Array<MapData, u64>,
    current: u64,
    kept: HashMap<u32, Exemplar>,
    window: Duration,
}

/// How long a series keeps its slowest event against faster ones.
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(30);

impl ExemplarMaps {
    pub fn new(entries: Array<MapData, StageExemplar>, epoch: Array<MapData, u64>, window: Duration) -> Self {
        Self { entries, epoch, current: 0, kept: HashMap::new(), window }
    }

    /// Closes the current interval and keeps its whole entries. An entry
    /// torn by a write in progress is skipped: a missed exemplar, never a
    /// wrong one.
    pub fn close_interval(&mut self) {
        let closed = self.current;
        let next = closed.wrapping_add(1);
        if self.epoch.set(0, next, 0).is_err() {
            return;
        }
        self.current = next;
        let wall = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_nanos() as i128);
        let offset = wall.unwrap_or(0) - i128::from(super::chains::monotonic_now_ns());
        for idx in 0..self.entries.len() {
            let Ok(e) = self.entries.get(&idx, 0) else { continue };
            if e.epoch != closed || !e.is_whole() {
                continue;
            }
            if let Some(x) = Exemplar::from_kernel(&e, offset) {
                let now = SystemTime::now();
                match self.kept.get(&idx) {
                    Some(k) if !replaces(k, &x, now, self.window) => {}
                    _ => {
                        self.kept.insert(idx, x);
                    }
                }
            }
        }
    }

    /// The exemplar kept for histogram `idx`.
    pub fn get(&self, idx: u32) -> Option<&Exemplar> {
        self.kept.get(&idx)
    }

    /// Forgets slot `slot`'s exemplars, in the kernel and here, before the
    /// slot serves another label set.
    pub fn zero_slot(&mut self, slot: u32) -> Result<(), CollectError> {
        let per_slot = self.entries.len() / MAX_SLOTS;
        for idx in slot * per_slot..(slot + 1) * per_slot {
            self.entries
                .set(idx, StageExemplar::default(), 0)
                .map_err(|source| CollectError::Map { name: "WS_WATCH_EXEMPLAR", source })?;
            self.kept.remove(&idx);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(flags: u64, watcher: u64) -> StageExemplar {
        let (epoch, ns, rev, at) = (3, 150_000_000, 42, 1_000_000_000);
        let check = StageExemplar::checksum(epoch, ns, rev, watcher, at, flags);
        StageExemplar { epoch, ns, rev, watcher, at_ns: at, flags, check }
    }

    #[test]
    fn a_whole_entry_becomes_an_exemplar_with_its_watcher() {
        let e = entry(StageExemplar::WATCH_ID, 7);
        assert!(e.is_whole());
        let x = Exemplar::from_kernel(&e, 1_700_000_000_000_000_000).unwrap();
        assert_eq!((x.value_ns, x.revision), (150_000_000, 42));
        assert_eq!(x.labels(), vec![("revision", "42".to_string()), ("watcher", "7".to_string())]);
        assert_eq!(x.at, SystemTime::UNIX_EPOCH + Duration::from_nanos(1_700_000_001_000_000_000));
        let api = Exemplar::from_kernel(&entry(StageExemplar::CACHE_WATCHER, 0xc000_1234), 0).unwrap();
        assert_eq!(api.watcher.as_deref(), Some("0xc0001234"));
        assert_eq!(Exemplar::from_kernel(&entry(0, 0), 0).unwrap().labels().len(), 1);
    }

    #[test]
    fn the_slowest_event_stays_for_the_window() {
        let at = |s: u64| SystemTime::UNIX_EPOCH + Duration::from_secs(s);
        let x = |ns: u64, s: u64| Exemplar { value_ns: ns, revision: s as i64, watcher: None, at: at(s) };
        let w = Duration::from_secs(30);
        // A faster event does not push out a slow one inside the window...
        assert!(!replaces(&x(400, 100), &x(10, 101), at(110), w));
        // ...a slower one does, and so does anything once the window passed.
        assert!(replaces(&x(400, 100), &x(500, 101), at(110), w));
        assert!(replaces(&x(400, 100), &x(10, 131), at(131), w));
    }

    #[test]
    fn a_torn_entry_is_not_whole() {
        let mut e = entry(StageExemplar::WATCH_ID, 7);
        // Another CPU's revision landed after this one's checksum.
        e.rev = 43;
        assert!(!e.is_whole());
        let mut e = entry(StageExemplar::WATCH_ID, 7);
        // A writer is halfway: it cleared the checksum first.
        e.check = 0;
        assert!(!e.is_whole());
        assert!(!StageExemplar::default().is_whole());
    }
}
