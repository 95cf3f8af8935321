//! The "collect" stage: read what the kernel aggregated, plus what user space
//! counted, into one [`Snapshot`] per scrape. Nothing here is on a hot path:
//! the kernel already aggregated per CPU; we only sum the CPUs.

pub mod chains;

use std::{
    collections::HashMap,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use agent_common::{
    Counter, Histogram,
    sidecar::{Direction, SidecarCount},
    watch::{Side, Stage, events_index, hist_index},
};
use aya::{
    Ebpf,
    maps::{MapData, PerCpuArray},
};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum CollectError {
    #[error("map `{0}` is missing from the eBPF object")]
    MissingMap(&'static str),
    #[error("map `{name}`: {source}")]
    Map { name: &'static str, source: aya::maps::MapError },
}

/// Handles on the kernel maps read at scrape time.
pub struct KernelMaps {
    counters: PerCpuArray<MapData, u64>,
    watch_hist: PerCpuArray<MapData, Histogram>,
    watch_events: PerCpuArray<MapData, u64>,
    sidecar_hist: PerCpuArray<MapData, Histogram>,
    sidecar_counts: PerCpuArray<MapData, u64>,
    go_hist: PerCpuArray<MapData, Histogram>,
    window_hist: PerCpuArray<MapData, Histogram>,
    inner_hist: PerCpuArray<MapData, Histogram>,
    grow_events: PerCpuArray<MapData, u64>,
}

fn take_per_cpu<V: aya::Pod>(ebpf: &mut Ebpf, name: &'static str) -> Result<PerCpuArray<MapData, V>, CollectError> {
    let map = ebpf.take_map(name).ok_or(CollectError::MissingMap(name))?;
    PerCpuArray::try_from(map).map_err(|source| CollectError::Map { name, source })
}

impl KernelMaps {
    pub fn take(ebpf: &mut Ebpf) -> Result<Self, CollectError> {
        Ok(Self {
            counters: take_per_cpu(ebpf, "WS_COUNTERS")?,
            watch_hist: take_per_cpu(ebpf, "WS_WATCH_HIST")?,
            watch_events: take_per_cpu(ebpf, "WS_WATCH_EVENTS")?,
            sidecar_hist: take_per_cpu(ebpf, "WS_SIDECAR_HIST")?,
            sidecar_counts: take_per_cpu(ebpf, "WS_SIDECAR_COUNTS")?,
            go_hist: take_per_cpu(ebpf, "WS_GO_HIST")?,
            window_hist: take_per_cpu(ebpf, "WS_WINDOW_HIST")?,
            inner_hist: take_per_cpu(ebpf, "WS_WINDOW_INNER_HIST")?,
            grow_events: take_per_cpu(ebpf, "WS_GO_GROW_EVENTS")?,
        })
    }

    pub fn watch_histogram(&self, slot: u32, stage: Stage) -> Histogram {
        merged(&self.watch_hist, hist_index(slot, stage))
    }

    pub fn watch_events(&self, slot: u32, side: Side) -> u64 {
        summed(&self.watch_events, events_index(slot, side))
    }

    pub fn sidecar_histogram(&self, slot: u32, dir: Direction) -> Histogram {
        merged(&self.sidecar_hist, agent_common::sidecar::hist_index(slot, dir))
    }

    pub fn sidecar_count(&self, slot: u32, c: SidecarCount) -> u64 {
        summed(&self.sidecar_counts, agent_common::sidecar::count_index(slot, c))
    }

    /// Kernel self-counters summed over CPUs, indexed by `Counter as usize`.
    pub fn counters(&self) -> [u64; Counter::COUNT as usize] {
        let mut out = [0u64; Counter::COUNT as usize];
        for c in Counter::ALL {
            if let Ok(per_cpu) = self.counters.get(&(c as u32), 0) {
                out[c as usize] = per_cpu.iter().copied().fold(0u64, u64::wrapping_add);
            }
        }
        out
    }
}

/// The Go runtime part of a snapshot.
#[derive(Default)]
struct GoSnapshot {
    maps: Vec<LabelledHistogram>,
    gc_assist: Vec<LabelledHistogram>,
    grow_events: Vec<(String, u64)>,
    windows: Vec<LabelledHistogram>,
    window_inner: Vec<LabelledHistogram>,
}

impl KernelMaps {
    fn go_snapshot(&self, slots: &[(u32, String)], window_names: &[String]) -> GoSnapshot {
        use agent_common::goruntime::{GoClass, Inner, MAX_GO_SLOTS, class_index, inner_index, window_index};
        let mut out = GoSnapshot::default();
        // The kernel folds watch-path slots past its Go cap into slot 0.
        for (slot, comm) in slots.iter().filter(|(s, _)| *s < MAX_GO_SLOTS) {
            for class in GoClass::ALL {
                let hist = merged(&self.go_hist, class_index(*slot, class as u32));
                if hist.count() == 0 {
                    continue;
                }
                match class.map_op() {
                    Some(op) => out
                        .maps
                        .push(LabelledHistogram { labels: vec![("op", op.into()), ("comm", comm.clone())], hist }),
                    None => out.gc_assist.push(LabelledHistogram { labels: vec![("comm", comm.clone())], hist }),
                }
            }
            let grows = summed(&self.grow_events, *slot);
            if grows > 0 {
                out.grow_events.push((comm.clone(), grows));
            }
            for (w, name) in window_names.iter().enumerate() {
                let w = w as u32;
                let hist = merged(&self.window_hist, window_index(*slot, w));
                if hist.count() == 0 {
                    continue;
                }
                out.windows
                    .push(LabelledHistogram { labels: vec![("window", name.clone()), ("comm", comm.clone())], hist });
                for inner in Inner::ALL {
                    out.window_inner.push(LabelledHistogram {
                        labels: vec![("window", name.clone()), ("inner", inner.name().into()), ("comm", comm.clone())],
                        hist: merged(&self.inner_hist, inner_index(*slot, w, inner as u32)),
                    });
                }
            }
        }
        out
    }
}

/// One histogram of a per-CPU array, its CPUs merged.
fn merged(map: &PerCpuArray<MapData, Histogram>, idx: u32) -> Histogram {
    let mut h = Histogram::ZERO;
    if let Ok(per_cpu) = map.get(&idx, 0) {
        for cpu in per_cpu.iter() {
            h.merge(cpu);
        }
    }
    h
}

/// One counter of a per-CPU array, its CPUs summed.
fn summed(map: &PerCpuArray<MapData, u64>, idx: u32) -> u64 {
    map.get(&idx, 0).map(|v| v.iter().copied().fold(0u64, u64::wrapping_add)).unwrap_or(0)
}

/// Per-label counts with a cap on the number of series: past the cap a new
/// label value is not created and the overflow is counted instead, so a node
/// with 10,000 short-lived process names cannot blow up the scrape.
#[derive(Debug)]
pub struct CappedCounts {
    max_series: usize,
    counts: HashMap<String, u64>,
    overflow: u64,
}

impl CappedCounts {
    pub fn new(max_series: usize) -> Self {
        Self { max_series, counts: HashMap::new(), overflow: 0 }
    }

    pub fn add(&mut self, label: &str, n: u64) {
        if let Some(v) = self.counts.get_mut(label) {
            *v += n;
        } else if self.counts.len() < self.max_series {
            self.counts.insert(label.to_string(), n);
        } else {
            self.overflow += n;
        }
    }

    /// Sorted by label, so scrapes are stable.
    pub fn series(&self) -> Vec<(String, u64)> {
        let mut v: Vec<_> = self.counts.iter().map(|(k, v)| (k.clone(), *v)).collect();
        v.sort();
        v
    }

    pub fn overflow(&self) -> u64 {
        self.overflow
    }
}

/// What user space counts itself.
#[derive(Debug)]
pub struct UserCounters {
    /// Execs of processes the filter watches, by comm.
    pub watched_execs: Mutex<CappedCounts>,
    /// Ring buffer records that did not decode.
    pub decode_errors: AtomicU64,
}

impl UserCounters {
    pub fn new(max_series: usize) -> Self {
        Self { watched_execs: Mutex::new(CappedCounts::new(max_series)), decode_errors: AtomicU64::new(0) }
    }
}

/// One labelled histogram as exported.
#[derive(Clone, Debug)]
pub struct LabelledHistogram {
    pub labels: Vec<(&'static str, String)>,
    pub hist: Histogram,
}

/// Everything one scrape exports.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub kernel: [u64; Counter::COUNT as usize],
    /// watch stage histograms with at least one observation.
    pub watch_stages: Vec<LabelledHistogram>,
    /// (side, comm, events).
    pub watch_events: Vec<(&'static str, String, u64)>,
    /// Proxy crossing histograms (direction, comm) with observations.
    pub sidecar: Vec<LabelledHistogram>,
    /// (direction, comm, crossings).
    pub sidecar_crossings: Vec<(&'static str, String, u64)>,
    /// (comm, unmatched, retransmits).
    pub sidecar_other: Vec<(String, u64, u64)>,
    /// Go map operation histograms (op, comm).
    pub go_maps: Vec<LabelledHistogram>,
    /// GC assist histograms (comm).
    pub gc_assist: Vec<LabelledHistogram>,
    /// (comm, growth function entries).
    pub grow_events: Vec<(String, u64)>,
    /// Window durations (window, comm) and their inner breakdown (window, inner, comm).
    pub windows: Vec<LabelledHistogram>,
    pub window_inner: Vec<LabelledHistogram>,
    pub watched_execs: Vec<(String, u64)>,
    pub series_dropped: Vec<(&'static str, u64)>,
    pub decode_errors: u64,
    pub probes_attached: u64,
    /// Watch event chains judged so far (`chains::Chains`).
    pub watch_chains: chains::ChainCounts,
}

impl Snapshot {
    /// Reads everything; `slots` lists (slot, comm) of the label slots in use.
    pub fn take(
        maps: &KernelMaps,
        user: &UserCounters,
        slots: &[(u32, String)],
        sidecar_slots: &[(u32, String)],
        window_names: &[String],
        probes_attached: usize,
    ) -> Self {
        let go = maps.go_snapshot(slots, window_names);
        let mut sidecar = Vec::new();
        let mut sidecar_crossings = Vec::new();
        let mut sidecar_other = Vec::new();
        for (slot, comm) in sidecar_slots {
            let mut seen = false;
            for (dir, count) in [
                (Direction::Request, SidecarCount::RequestCrossings),
                (Direction::Response, SidecarCount::ResponseCrossings),
            ] {
                let hist = maps.sidecar_histogram(*slot, dir);
                let n = maps.sidecar_count(*slot, count);
                if hist.count() > 0 {
                    sidecar.push(LabelledHistogram {
                        labels: vec![("direction", dir.name().to_string()), ("comm", comm.clone())],
                        hist,
                    });
                }
                if n > 0 {
                    sidecar_crossings.push((dir.name(), comm.clone(), n));
                    seen = true;
                }
            }
            let unmatched = maps.sidecar_count(*slot, SidecarCount::Unmatched);
            let retrans = maps.sidecar_count(*slot, SidecarCount::Retransmits);
            if seen || unmatched > 0 || retrans > 0 {
                sidecar_other.push((comm.clone(), unmatched, retrans));
            }
        }
        let mut watch_stages = Vec::new();
        let mut watch_events = Vec::new();
        for (slot, comm) in slots {
            for stage in Stage::ALL {
                let hist = maps.watch_histogram(*slot, stage);
                // A series appears with its first observation and, since
                // slots are never reused, keeps its meaning from then on.
                if hist.count() > 0 {
                    watch_stages.push(LabelledHistogram {
                        labels: vec![("stage", stage.name().to_string()), ("comm", comm.clone())],
                        hist,
                    });
                }
            }
            for (side, name) in [(Side::Server, "server"), (Side::Client, "client")] {
                let n = maps.watch_events(*slot, side);
                if n > 0 {
                    watch_events.push((name, comm.clone(), n));
                }
            }
        }
        let (watched_execs, overflow) = match user.watched_execs.lock() {
            Ok(c) => (c.series(), c.overflow()),
            Err(poisoned) => {
                let c = poisoned.into_inner();
                (c.series(), c.overflow())
            }
        };
        Self {
            kernel: maps.counters(),
            watch_stages,
            watch_events,
            sidecar,
            sidecar_crossings,
            sidecar_other,
            go_maps: go.maps,
            gc_assist: go.gc_assist,
            grow_events: go.grow_events,
            windows: go.windows,
            window_inner: go.window_inner,
            watched_execs,
            series_dropped: vec![("process_execs", overflow)],
            decode_errors: user.decode_errors.load(Ordering::Relaxed),
            probes_attached: probes_attached as u64,
            watch_chains: chains::ChainCounts::default(),
        }
    }

    pub fn kernel(&self, c: Counter) -> u64 {
        self.kernel[c as usize]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cap_holds_and_counts_overflow() {
        let mut c = CappedCounts::new(2);
        c.add("a", 1);
        c.add("b", 1);
        c.add("c", 5);
        c.add("a", 2);
        assert_eq!(c.series(), vec![("a".into(), 3), ("b".into(), 1)]);
        assert_eq!(c.overflow(), 5);
    }
}
