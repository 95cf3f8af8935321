//! The "collect" stage: read what the kernel aggregated, plus what user space
//! counted, into one [`Snapshot`] per scrape. Nothing here is on a hot path:
//! the kernel already aggregated, in arrays shared by the CPUs; we only read.

pub mod chains;
pub mod exemplars;
pub mod mapmem;
pub mod series;
pub mod stats;

use std::{
    collections::HashMap,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use agent_common::{
    Counter, Histogram,
    counters::Ring,
    sidecar::{Direction, SidecarCount},
    watch::{Side, Stage, events_index, hist_index},
};
use aya::{
    Ebpf,
    maps::{Array, MapData, PerCpuArray},
};
use thiserror::Error;

pub use self::series::{LabelledCount, Series};
use crate::{attach::slots::LabelSet, export::families as fam};

#[derive(Debug, Error)]
pub enum CollectError {
    #[error("map `{0}` is missing from the eBPF object")]
    MissingMap(&'static str),
    #[error("map `{name}`: {source}")]
    Map { name: &'static str, source: aya::maps::MapError },
}

/// Handles on the kernel maps read at scrape time.
pub struct KernelMaps {
    counters: Array<MapData, u64>,
    watch_hist: Array<MapData, Histogram>,
    watch_events: Array<MapData, u64>,
    watch_progress: Array<MapData, u64>,
    sidecar_hist: Array<MapData, Histogram>,
    sidecar_counts: Array<MapData, u64>,
    go_hist: Array<MapData, Histogram>,
    window_hist: Array<MapData, Histogram>,
    inner_hist: Array<MapData, Histogram>,
    inner_events: Array<MapData, u64>,
    grow_events: Array<MapData, u64>,
    /// Per ring, per CPU: the most bytes seen waiting after a submit.
    ring_fill: PerCpuArray<MapData, u64>,
    exemplars: exemplars::ExemplarMaps,
}

/// Takes map `name` out of the object as its typed handle. The counter and
/// histogram arrays are shared by every CPU (the kernel adds atomically:
/// their memory does not grow with the CPU count).
fn take<M: TryFrom<aya::maps::Map, Error = aya::maps::MapError>>(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<M, CollectError> {
    let map = ebpf.take_map(name).ok_or(CollectError::MissingMap(name))?;
    M::try_from(map).map_err(|source| CollectError::Map { name, source })
}

impl KernelMaps {
    /// `exemplar_window`: how long a stage series keeps its slowest event.
    pub fn take(ebpf: &mut Ebpf, exemplar_window: std::time::Duration) -> Result<Self, CollectError> {
        Ok(Self {
            counters: take(ebpf, "WS_COUNTERS")?,
            watch_hist: take(ebpf, "WS_WATCH_HIST")?,
            watch_events: take(ebpf, "WS_WATCH_EVENTS")?,
            watch_progress: take(ebpf, "WS_WATCH_PROGRESS")?,
            sidecar_hist: take(ebpf, "WS_SIDECAR_HIST")?,
            sidecar_counts: take(ebpf, "WS_SIDECAR_COUNTS")?,
            go_hist: take(ebpf, "WS_GO_HIST")?,
            window_hist: take(ebpf, "WS_WINDOW_HIST")?,
            inner_hist: take(ebpf, "WS_WINDOW_INNER_HIST")?,
            inner_events: take(ebpf, "WS_WINDOW_INNER_EVENTS")?,
            grow_events: take(ebpf, "WS_GO_GROW_EVENTS")?,
            ring_fill: take(ebpf, "WS_RING_FILL")?,
            exemplars: exemplars::ExemplarMaps::new(
                take(ebpf, "WS_WATCH_EXEMPLAR")?,
                take(ebpf, "WS_EXEMPLAR_EPOCH")?,
                exemplar_window,
            ),
        })
    }

    /// Ends the exemplar interval: each stage series' slowest event since
    /// the last call becomes its exemplar (see [`exemplars`]).
    pub fn close_exemplar_interval(&mut self) {
        self.exemplars.close_interval();
    }

    pub fn watch_histogram(&self, slot: u32, stage: Stage) -> Histogram {
        merged(&self.watch_hist, hist_index(slot, stage))
    }

    pub fn watch_events(&self, slot: u32, side: Side) -> u64 {
        summed(&self.watch_events, events_index(slot, side))
    }

    pub fn watch_progress(&self, slot: u32, side: Side) -> u64 {
        summed(&self.watch_progress, events_index(slot, side))
    }

    pub fn sidecar_histogram(&self, slot: u32, dir: Direction) -> Histogram {
        merged(&self.sidecar_hist, agent_common::sidecar::hist_index(slot, dir))
    }

    pub fn sidecar_count(&self, slot: u32, c: SidecarCount) -> u64 {
        summed(&self.sidecar_counts, agent_common::sidecar::count_index(slot, c))
    }

    /// Each ring buffer's high-water mark in bytes (the largest of the
    /// CPUs' own), by ring.
    pub fn ring_fill(&self) -> Vec<(Ring, u64)> {
        Ring::ALL
            .iter()
            .map(|&r| {
                let max = self.ring_fill.get(&(r as u32), 0).map(|v| v.iter().copied().max().unwrap_or(0));
                (r, max.unwrap_or(0))
            })
            .collect()
    }

    /// Records each ring buffer has been given so far (summed over CPUs),
    /// by ring: with `UserCounters::ring_read`, what is still waiting.
    pub fn ring_submitted(&self) -> Vec<(Ring, u64)> {
        Ring::ALL
            .iter()
            .map(|&r| (r, self.ring_fill.get(&(Ring::COUNT + r as u32), 0).map(|v| v.iter().sum()).unwrap_or(0)))
            .collect()
    }

    /// Kernel self-counters, indexed by `Counter as usize`.
    pub fn counters(&self) -> [u64; Counter::COUNT as usize] {
        let mut out = [0u64; Counter::COUNT as usize];
        for c in Counter::ALL {
            out[c as usize] = summed(&self.counters, c as u32);
        }
        out
    }
}

/// The Go runtime part of a snapshot.
#[derive(Default)]
struct GoSnapshot {
    maps: Vec<LabelledHistogram>,
    gc_assist: Vec<LabelledHistogram>,
    grow_events: Vec<LabelledCount>,
    windows: Vec<LabelledHistogram>,
    window_inner: Vec<LabelledHistogram>,
    window_inner_events: Vec<LabelledCount>,
}

impl KernelMaps {
    fn go_snapshot(&self, slots: &[(u32, LabelSet)], window_names: &[String]) -> GoSnapshot {
        use agent_common::goruntime::{GoClass, Inner, MAX_GO_SLOTS, class_index, inner_index, window_index};
        let mut out = GoSnapshot::default();
        // The kernel folds watch-path slots past its Go cap into slot 0.
        for (slot, who) in slots.iter().filter(|(s, _)| *s < MAX_GO_SLOTS) {
            for class in GoClass::ALL {
                let hist = merged(&self.go_hist, class_index(*slot, class as u32));
                if hist.count() == 0 {
                    continue;
                }
                match class.map_op() {
                    Some(op) => out.maps.push(LabelledHistogram {
                        labels: who.pairs(&[("op", op.into())]),
                        hist,
                        exemplar: None,
                    }),
                    None => out.gc_assist.push(LabelledHistogram { labels: who.pairs(&[]), hist, exemplar: None }),
                }
            }
            let grows = summed(&self.grow_events, *slot);
            if grows > 0 {
                out.grow_events.push(LabelledCount::new(who.pairs(&[]), grows));
            }
            for (w, name) in window_names.iter().enumerate() {
                let w = w as u32;
                let hist = merged(&self.window_hist, window_index(*slot, w));
                if hist.count() == 0 {
                    continue;
                }
                out.windows.push(LabelledHistogram {
                    labels: who.pairs(&[("window", name.clone())]),
                    hist,
                    exemplar: None,
                });
                for inner in Inner::ALL {
                    let idx = inner_index(*slot, w, inner as u32);
                    let hist = merged(&self.inner_hist, idx);
                    // Not observed at all (off-CPU and run queue without
                    // scheduler probes): no series, rather than a 0 that
                    // would say the windows never waited.
                    if hist.count() == 0 {
                        continue;
                    }
                    out.window_inner.push(LabelledHistogram {
                        labels: who.pairs(&[("window", name.clone()), ("inner", inner.name().into())]),
                        hist,
                        exemplar: None,
                    });
                    out.window_inner_events.push(LabelledCount::new(
                        who.pairs(&[("window", name.clone()), ("inner", inner.name().into())]),
                        summed(&self.inner_events, idx),
                    ));
                }
            }
        }
        out
    }

    /// Zeroes every kernel entry of watch-path slot `slot` (the watch and Go
    /// arrays), before the slot is given to another label set.
    ///
    /// Why this is safe without racing a writer: the caller only zeroes a
    /// slot no tracked process maps to, and only after a grace period since
    /// the last one left. Programs find a slot through `WS_PROC_SLOT` (tgid →
    /// slot), which the kernel clears at the process's exit and user space
    /// when it forgets a process; after that no program run can start with
    /// this slot, and the ones that started before finished long before the
    /// grace period ended (a program run is microseconds). The one leftover
    /// is per-goroutine state in LRU maps keyed by (tgid, g): a new process
    /// that reuses the pid *and* the goroutine address before the LRU entry
    /// is evicted could close a stale window into the new slot — one
    /// observation at worst, in a series of the same pid.
    pub fn zero_slot(&mut self, slot: u32) -> Result<(), CollectError> {
        use agent_common::{goruntime::MAX_GO_SLOTS, watch::MAX_SLOTS};
        zero_range(&mut self.watch_hist, "WS_WATCH_HIST", slot, MAX_SLOTS)?;
        zero_range(&mut self.watch_events, "WS_WATCH_EVENTS", slot, MAX_SLOTS)?;
        zero_range(&mut self.watch_progress, "WS_WATCH_PROGRESS", slot, MAX_SLOTS)?;
        self.exemplars.zero_slot(slot)?;
        if slot < MAX_GO_SLOTS {
            zero_range(&mut self.go_hist, "WS_GO_HIST", slot, MAX_GO_SLOTS)?;
            zero_range(&mut self.window_hist, "WS_WINDOW_HIST", slot, MAX_GO_SLOTS)?;
            zero_range(&mut self.inner_hist, "WS_WINDOW_INNER_HIST", slot, MAX_GO_SLOTS)?;
            zero_range(&mut self.inner_events, "WS_WINDOW_INNER_EVENTS", slot, MAX_GO_SLOTS)?;
            zero_range(&mut self.grow_events, "WS_GO_GROW_EVENTS", slot, MAX_GO_SLOTS)?;
        }
        Ok(())
    }
}

/// Zeroes the entries of `slot` in an array laid out slot-major (every
/// `*_index(slot, ..)` in agent-common is `slot * per_slot + ..`).
fn zero_range<V: aya::Pod + Default>(
    map: &mut Array<MapData, V>,
    name: &'static str,
    slot: u32,
    slots: u32,
) -> Result<(), CollectError> {
    let per_slot = map.len() / slots;
    for idx in slot * per_slot..(slot + 1) * per_slot {
        map.set(idx, V::default(), 0).map_err(|source| CollectError::Map { name, source })?;
    }
    Ok(())
}

/// One histogram of a shared array (zero if it cannot be read).
fn merged(map: &Array<MapData, Histogram>, idx: u32) -> Histogram {
    map.get(&idx, 0).unwrap_or(Histogram::ZERO)
}

/// One counter of a shared array (zero if it cannot be read).
fn summed(map: &Array<MapData, u64>, idx: u32) -> u64 {
    map.get(&idx, 0).unwrap_or(0)
}

/// Per-label counts with a cap on the number of series: past the cap a new
/// label set is not created and the overflow is counted instead, so a node
/// with 10,000 short-lived process names cannot blow up the scrape (nor the
/// agent's memory: the refused label sets are not kept).
#[derive(Debug)]
pub struct CappedCounts {
    max_series: usize,
    counts: HashMap<LabelSet, u64>,
    overflow: u64,
}

impl CappedCounts {
    pub fn new(max_series: usize) -> Self {
        Self { max_series, counts: HashMap::new(), overflow: 0 }
    }

    pub fn add(&mut self, labels: &LabelSet, n: u64) {
        if let Some(v) = self.counts.get_mut(labels) {
            *v += n;
        } else if self.counts.len() < self.max_series {
            self.counts.insert(labels.clone(), n);
        } else {
            self.overflow += n;
        }
    }

    /// Sorted by labels, so scrapes are stable.
    pub fn series(&self) -> Vec<LabelledCount> {
        let mut v: Vec<_> = self.counts.iter().collect();
        v.sort();
        v.into_iter().map(|(k, n)| LabelledCount::new(k.pairs(&[]), *n)).collect()
    }

    pub fn overflow(&self) -> u64 {
        self.overflow
    }
}

/// What user space counts itself.
#[derive(Debug)]
pub struct UserCounters {
    /// Execs of processes the filter watches, by label set.
    pub watched_execs: Mutex<CappedCounts>,
    /// Ring buffer records that did not decode.
    pub decode_errors: AtomicU64,
    /// Records read from each ring buffer (decoded or not), indexed by
    /// `Ring as usize`.
    pub ring_read: [AtomicU64; Ring::COUNT as usize],
}

impl UserCounters {
    pub fn new(max_series: usize) -> Self {
        Self {
            watched_execs: Mutex::new(CappedCounts::new(max_series)),
            decode_errors: AtomicU64::new(0),
            ring_read: Default::default(),
        }
    }

    /// Counts `n` records read from `ring`.
    pub fn read_from(&self, ring: Ring, n: u64) {
        self.ring_read[ring as usize].fetch_add(n, std::sync::atomic::Ordering::Relaxed);
    }
}

/// One labelled histogram as exported.
#[derive(Clone, Debug)]
pub struct LabelledHistogram {
    pub labels: series::Labels,
    pub hist: Histogram,
    /// The series' slowest recent event (watch stages only).
    pub exemplar: Option<exemplars::Exemplar>,
}

/// The kernel's run count and run time of one eBPF program, and the runs
/// it skipped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProgramStats {
    pub program: String,
    pub runs: u64,
    pub run_ns: u64,
    /// `recursion_misses`: runs skipped because the CPU was already in BPF.
    pub misses: u64,
}

/// Everything one scrape exports.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub kernel: [u64; Counter::COUNT as usize],
    /// watch stage histograms with at least one observation.
    pub watch_stages: Vec<LabelledHistogram>,
    /// Watch events by side and process.
    pub watch_events: Vec<LabelledCount>,
    pub watch_progress: Vec<LabelledCount>,
    pub watchers_terminated: Vec<LabelledCount>,
    /// Proxy crossing histograms (direction, process) with observations.
    pub sidecar: Vec<LabelledHistogram>,
    pub sidecar_crossings: Vec<LabelledCount>,
    pub sidecar_unmatched: Vec<LabelledCount>,
    pub sidecar_retransmits: Vec<LabelledCount>,
    /// Go map operation histograms (op, process).
    pub go_maps: Vec<LabelledHistogram>,
    /// GC assist histograms (process).
    pub gc_assist: Vec<LabelledHistogram>,
    /// Growth function entries (process).
    pub grow_events: Vec<LabelledCount>,
    /// Window durations (window, process) and their inner breakdown (window, inner, process).
    pub windows: Vec<LabelledHistogram>,
    pub window_inner: Vec<LabelledHistogram>,
    /// Events inside windows (window, inner, process).
    pub window_inner_events: Vec<LabelledCount>,
    pub watched_execs: Vec<LabelledCount>,
    pub series_dropped: Vec<(&'static str, u64)>,
    pub decode_errors: u64,
    /// Attached programs by kind (`tracepoint`, `uprobe`).
    pub probes_attached: Vec<(&'static str, u64)>,
    /// Per-program kernel statistics (empty unless --bpf-stats or the
    /// node's kernel.bpf_stats_enabled=1).
    pub programs: Vec<ProgramStats>,
    /// The agent's maps and the kernel memory each holds.
    pub map_bytes: Vec<mapmem::MapBytes>,
    /// Seconds per uprobe hit with an empty program, by the kind of
    /// instruction probed (`emulated`, `single_step`); empty when not measured.
    pub uprobe_hit_cost: Vec<(&'static str, f64)>,
    /// Each ring buffer's high-water mark in bytes.
    pub ring_fill: Vec<(Ring, u64)>,
    /// Watch event chains judged so far (`chains::Chains`).
    pub watch_chains: chains::ChainCounts,
}

impl Snapshot {
    /// Reads everything the kernel and user space counted; `slots` lists
    /// (slot, labels) of the watch-path label slots in use, `sidecar_slots`
    /// the proxies'.
    pub fn take(
        maps: &KernelMaps,
        user: &UserCounters,
        slots: &[(u32, LabelSet)],
        sidecar_slots: &[(u32, LabelSet)],
        window_names: &[String],
    ) -> Self {
        let mut s = Self::kernel_part(maps, slots, sidecar_slots, window_names);
        let (watched_execs, overflow) = match user.watched_execs.lock() {
            Ok(c) => (c.series(), c.overflow()),
            Err(poisoned) => {
                let c = poisoned.into_inner();
                (c.series(), c.overflow())
            }
        };
        s.kernel = maps.counters();
        s.ring_fill = maps.ring_fill();
        s.watched_execs = watched_execs;
        s.series_dropped = vec![(fam::PROCESS_EXECS.name, overflow)];
        s.decode_errors = user.decode_errors.load(Ordering::Relaxed);
        s
    }

    /// The per-slot series of the kernel arrays (what a recycled slot folds).
    pub fn kernel_part(
        maps: &KernelMaps,
        slots: &[(u32, LabelSet)],
        sidecar_slots: &[(u32, LabelSet)],
        window_names: &[String],
    ) -> Self {
        let go = maps.go_snapshot(slots, window_names);
        let mut s = Self {
            go_maps: go.maps,
            gc_assist: go.gc_assist,
            grow_events: go.grow_events,
            windows: go.windows,
            window_inner: go.window_inner,
            window_inner_events: go.window_inner_events,
            ..Self::default()
        };
        for (slot, who) in sidecar_slots {
            let mut seen = false;
            for (dir, count) in [
                (Direction::Request, SidecarCount::RequestCrossings),
                (Direction::Response, SidecarCount::ResponseCrossings),
            ] {
                let hist = maps.sidecar_histogram(*slot, dir);
                let n = maps.sidecar_count(*slot, count);
                let labels = who.pairs(&[("direction", dir.name().to_string())]);
                if hist.count() > 0 {
                    s.sidecar.push(LabelledHistogram { labels: labels.clone(), hist, exemplar: None });
                }
                if n > 0 {
                    s.sidecar_crossings.push(LabelledCount::new(labels, n));
                    seen = true;
                }
            }
            let unmatched = maps.sidecar_count(*slot, SidecarCount::Unmatched);
            let retrans = maps.sidecar_count(*slot, SidecarCount::Retransmits);
            if seen || unmatched > 0 || retrans > 0 {
                s.sidecar_unmatched.push(LabelledCount::new(who.pairs(&[]), unmatched));
                s.sidecar_retransmits.push(LabelledCount::new(who.pairs(&[]), retrans));
            }
        }
        for (slot, who) in slots {
            for stage in Stage::ALL {
                let hist = maps.watch_histogram(*slot, stage);
                // A series appears with its first observation.
                if hist.count() > 0 {
                    s.watch_stages.push(LabelledHistogram {
                        labels: who.pairs(&[("stage", stage.name().to_string())]),
                        hist,
                        exemplar: maps.exemplars.get(hist_index(*slot, stage)).cloned(),
                    });
                }
            }
            for side in Side::ALL {
                let name = side.name();
                if side == Side::ApiserverTerminated {
                    // Watchers, not events: their own family.
                    let n = maps.watch_events(*slot, side);
                    if n > 0 {
                        s.watchers_terminated.push(LabelledCount::new(who.pairs(&[]), n));
                    }
                    continue;
                }
                let n = maps.watch_events(*slot, side);
                if n > 0 {
                    s.watch_events.push(LabelledCount::new(who.pairs(&[("side", name.to_string())]), n));
                }
                let n = maps.watch_progress(*slot, side);
                if n > 0 {
                    s.watch_progress.push(LabelledCount::new(who.pairs(&[("side", name.to_string())]), n));
                }
            }
        }
        s
    }

    pub fn kernel(&self, c: Counter) -> u64 {
        self.kernel[c as usize]
    }

    /// The labelled histogram families, by family name.
    pub fn hist_families(&mut self) -> [(&'static str, &mut Vec<LabelledHistogram>); 6] {
        [
            (fam::WATCH_STAGE_SECONDS.name, &mut self.watch_stages),
            (fam::SIDECAR_SECONDS.name, &mut self.sidecar),
            (fam::GO_MAP_SECONDS.name, &mut self.go_maps),
            (fam::GO_GC_ASSIST_SECONDS.name, &mut self.gc_assist),
            (fam::WINDOW_SECONDS.name, &mut self.windows),
            (fam::WINDOW_INNER_SECONDS.name, &mut self.window_inner),
        ]
    }

    /// The labelled per-process counter families, by family name
    /// (`process_execs` is capped as it is counted).
    pub fn count_families(&mut self) -> [(&'static str, &mut Vec<LabelledCount>); 8] {
        [
            (fam::WATCH_EVENTS.name, &mut self.watch_events),
            (fam::WATCH_PROGRESS.name, &mut self.watch_progress),
            (fam::WATCHERS_TERMINATED.name, &mut self.watchers_terminated),
            (fam::SIDECAR_CROSSINGS.name, &mut self.sidecar_crossings),
            (fam::SIDECAR_UNMATCHED.name, &mut self.sidecar_unmatched),
            (fam::SIDECAR_RETRANSMITS.name, &mut self.sidecar_retransmits),
            (fam::GO_MAP_GROW_EVENTS.name, &mut self.grow_events),
            (fam::WINDOW_INNER_EVENTS.name, &mut self.window_inner_events),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cap_holds_and_counts_overflow() {
        let mut c = CappedCounts::new(2);
        let l = LabelSet::comm;
        c.add(&l("a"), 1);
        c.add(&l("b"), 1);
        c.add(&l("c"), 5);
        c.add(&l("a"), 2);
        let got: Vec<_> = c.series().into_iter().map(|s| (s.labels[3].1.clone(), s.value)).collect();
        assert_eq!(got, vec![("a".into(), 3), ("b".into(), 1)]);
        assert_eq!(c.overflow(), 5);
    }
}
