//! Cardinality: every labelled family has at most `--max-series` series.
//!
//! A series is *admitted* the first time it is seen while its family has
//! room, and stays admitted for the agent's life; past the cap an
//! observation gets no series and is counted in
//! `watchscope_series_dropped_total{family}` instead. The counter stays
//! monotonic: a series that was refused is refused on every scrape (the set
//! of admitted series only grows), so its value keeps counting as dropped.
//!
//! Kernel slots are few, so the series of a label set whose last process has
//! exited are *folded* here ([`Series::fold`]) before the slot is reused:
//! admitted ones keep their values in user space (and are summed with the
//! live series if the label set comes back), refused ones add to the
//! overflow count.

use std::collections::{HashMap, HashSet};

use agent_common::Histogram;

use super::{LabelledHistogram, Snapshot};

pub type Labels = Vec<(&'static str, String)>;

/// One labelled counter value as exported.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LabelledCount {
    pub labels: Labels,
    pub value: u64,
}

impl LabelledCount {
    pub fn new(labels: Labels, value: u64) -> Self {
        Self { labels, value }
    }
}

/// The admitted series, what was folded out of recycled kernel slots, and
/// what was refused, per family.
#[derive(Debug)]
pub struct Series {
    max: usize,
    admitted: HashMap<&'static str, HashSet<Labels>>,
    hists: HashMap<&'static str, HashMap<Labels, Histogram>>,
    counts: HashMap<&'static str, HashMap<Labels, u64>>,
    /// Observations of refused series whose slots were recycled.
    overflow: HashMap<&'static str, u64>,
}

impl Series {
    pub fn new(max_series: usize) -> Self {
        Self {
            max: max_series,
            admitted: HashMap::new(),
            hists: HashMap::new(),
            counts: HashMap::new(),
            overflow: HashMap::new(),
        }
    }

    /// Admits `labels` into `family` if it is (or can still be) admitted.
    fn admit(&mut self, family: &'static str, labels: &Labels) -> bool {
        let set = self.admitted.entry(family).or_default();
        if set.contains(labels) {
            return true;
        }
        if set.len() < self.max {
            set.insert(labels.clone());
            return true;
        }
        false
    }

    /// Keeps the kernel counts of a recycled slot (`part` holds only that
    /// slot's series) in user space.
    pub fn fold(&mut self, mut part: Snapshot) {
        for (family, series) in part.hist_families() {
            for h in std::mem::take(series) {
                if self.admit(family, &h.labels) {
                    self.hists.entry(family).or_default().entry(h.labels).or_insert(Histogram::ZERO).merge(&h.hist);
                } else {
                    *self.overflow.entry(family).or_default() += h.hist.count();
                }
            }
        }
        for (family, series) in part.count_families() {
            for c in std::mem::take(series) {
                if self.admit(family, &c.labels) {
                    *self.counts.entry(family).or_default().entry(c.labels).or_default() += c.value;
                } else {
                    *self.overflow.entry(family).or_default() += c.value;
                }
            }
        }
    }

    /// Adds the folded series to a live snapshot, then drops the series past
    /// each family's cap and counts their observations in
    /// `snapshot.series_dropped`.
    pub fn apply(&mut self, snapshot: &mut Snapshot) {
        let mut dropped: Vec<(&'static str, u64)> = Vec::new();
        for (family, series) in snapshot.hist_families() {
            if let Some(kept) = self.hists.get(family) {
                merge_hists(series, kept);
            }
            let mut n = self.overflow.get(family).copied().unwrap_or(0);
            let mut keep = Vec::with_capacity(series.len());
            for h in std::mem::take(series) {
                if self.admit(family, &h.labels) {
                    keep.push(h);
                } else {
                    n += h.hist.count();
                }
            }
            *series = keep;
            dropped.push((family, n));
        }
        for (family, series) in snapshot.count_families() {
            if let Some(kept) = self.counts.get(family) {
                merge_counts(series, kept);
            }
            let mut n = self.overflow.get(family).copied().unwrap_or(0);
            let mut keep = Vec::with_capacity(series.len());
            for c in std::mem::take(series) {
                if self.admit(family, &c.labels) {
                    keep.push(c);
                } else {
                    n += c.value;
                }
            }
            *series = keep;
            dropped.push((family, n));
        }
        snapshot.series_dropped.extend(dropped);
        snapshot.series_dropped.sort();
    }
}

fn merge_hists(series: &mut Vec<LabelledHistogram>, kept: &HashMap<Labels, Histogram>) {
    let mut sorted: Vec<_> = kept.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(b.0));
    for (labels, hist) in sorted {
        match series.iter_mut().find(|h| h.labels == *labels) {
            Some(live) => live.hist.merge(hist),
            None => series.push(LabelledHistogram { labels: labels.clone(), hist: *hist, exemplar: None }),
        }
    }
}

fn merge_counts(series: &mut Vec<LabelledCount>, kept: &HashMap<Labels, u64>) {
    let mut sorted: Vec<_> = kept.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(b.0));
    for (labels, value) in sorted {
        match series.iter_mut().find(|c| c.labels == *labels) {
            Some(live) => live.value += value,
            None => series.push(LabelledCount::new(labels.clone(), *value)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::families;

    fn events(comm: &str, n: u64) -> LabelledCount {
        LabelledCount::new(vec![("side", "server".into()), ("comm", comm.into())], n)
    }

    fn dropped(s: &Snapshot, family: &str) -> u64 {
        s.series_dropped.iter().find(|(f, _)| *f == family).map(|(_, n)| *n).unwrap_or(0)
    }

    #[test]
    fn caps_every_family_and_keeps_the_dropped_count_monotonic() {
        let fam = families::WATCH_EVENTS.name;
        let mut series = Series::new(2);
        let mut s =
            Snapshot { watch_events: vec![events("a", 1), events("b", 2), events("c", 5)], ..Default::default() };
        series.apply(&mut s);
        assert_eq!(s.watch_events, vec![events("a", 1), events("b", 2)]);
        assert_eq!(dropped(&s, fam), 5);
        // "c" is gone from the kernel (slot recycled) with 7 counted; "a" too.
        series.fold(Snapshot { watch_events: vec![events("c", 7), events("a", 3)], ..Default::default() });
        // A new label set took a slot: still refused. "a" is retained.
        let mut s = Snapshot { watch_events: vec![events("b", 4), events("d", 1)], ..Default::default() };
        series.apply(&mut s);
        assert_eq!(s.watch_events, vec![events("b", 4), events("a", 3)]);
        assert_eq!(dropped(&s, fam), 8, "7 folded + 1 live");
        // "a" comes back in a new slot: its series continues from 3; "d"'s
        // slot was recycled in between.
        series.fold(Snapshot { watch_events: vec![events("d", 1)], ..Default::default() });
        let mut s = Snapshot { watch_events: vec![events("a", 1), events("b", 4)], ..Default::default() };
        series.apply(&mut s);
        assert_eq!(s.watch_events, vec![events("a", 4), events("b", 4)]);
        assert_eq!(dropped(&s, fam), 8);
    }
}
