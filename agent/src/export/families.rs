//! Every metric family watchscope exports, declared once: name, type, help.
//! The dashboard and documentation tests check their metric names against
//! [`FAMILIES`], and [`render`] is the only place a snapshot becomes text.

use agent_common::{Counter, hist};
use prometheus_client::{
    collector::Collector,
    encoding::{
        DescriptorEncoder, EncodeMetric, MetricEncoder, NativeHistogram, NativeHistogramBuckets, NoLabelSet,
        prometheus_protobuf,
    },
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
    registry::Registry,
};

use super::buckets::{self, ClassicBuckets};
use crate::collect::{LabelledCount, LabelledHistogram, Snapshot, exemplars::Exemplar};

/// A metric family's declaration. `name` is without the `watchscope_` prefix
/// and, for counters, without the `_total` suffix the encoder adds.
#[derive(Clone, Copy, Debug)]
pub struct Family {
    pub name: &'static str,
    pub kind: MetricType,
    pub help: &'static str,
}

pub const PREFIX: &str = "watchscope";

pub const EXECS: Family = Family {
    name: "execs",
    kind: MetricType::Counter,
    help: "Processes that called exec on this node (all of them, counted in the kernel).",
};
pub const PROCESS_EXECS: Family = Family {
    name: "process_execs",
    kind: MetricType::Counter,
    help: "Execs of processes the agent watches (after --pid/--comm/--exclude-comm), by comm.",
};
pub const DROPPED: Family = Family {
    name: "dropped",
    kind: MetricType::Counter,
    help: "Events the agent could not record, by reason; nothing is lost without being counted here.",
};
pub const SERIES_DROPPED: Family = Family {
    name: "series_dropped",
    kind: MetricType::Counter,
    help: "Observations not given their own series because the family reached --max-series.",
};
pub const PROBES_ATTACHED: Family = Family {
    name: "probes_attached",
    kind: MetricType::Gauge,
    help: "eBPF programs currently attached, by kind (tracepoint, uprobe).",
};
pub const PROGRAM_RUNS: Family = Family {
    name: "program_runs",
    kind: MetricType::Counter,
    help: "Times each of the agent's eBPF programs ran, from the kernel's BPF statistics (on with \
           --bpf-stats, or the node's kernel.bpf_stats_enabled=1).",
};
pub const PROGRAM_RUN_SECONDS: Family = Family {
    name: "program_run_seconds",
    kind: MetricType::Counter,
    help: "Time each of the agent's eBPF programs ran in total, from the kernel's BPF statistics.",
};
pub const PROGRAM_MISSES: Family = Family {
    name: "program_misses",
    kind: MetricType::Counter,
    help: "Runs of each of the agent's eBPF programs the kernel skipped: it runs a perf-event or \
           uprobe program only while no other BPF program or BPF syscall holds the CPU (recursion_misses).",
};
pub const BPF_MAP_BYTES: Family = Family {
    name: "bpf_map_bytes",
    kind: MetricType::Gauge,
    help: "Kernel memory each of the agent's eBPF maps holds, as the kernel accounts it (memlock in the map's \
           fdinfo). Counter and histogram arrays are shared by the CPUs: little of it grows with them.",
};
pub const UPROBE_HIT_COST: Family = Family {
    name: "uprobe_hit_cost_seconds",
    kind: MetricType::Gauge,
    help: "What one uprobe hit costs on this node with an empty program, measured at the agent's start on its own \
           code in a tight loop (a best case: a busy program's hits find the caches cold): on an instruction the \
           kernel emulates in its one trap (where Go entry probes sit) and on one it single-steps (a RET site).",
};
pub const RINGBUF_HIGH_WATER: Family = Family {
    name: "ringbuf_high_water_bytes",
    kind: MetricType::Gauge,
    help: "The most bytes seen waiting in each of the agent's ring buffers right after a record was submitted \
           (since the agent started): how close it came to full between two drains (full: dropped_total).",
};
pub const RINGBUF_SIZE: Family =
    Family { name: "ringbuf_size_bytes", kind: MetricType::Gauge, help: "Each of the agent's ring buffers' size." };
pub const BUILD_INFO: Family =
    Family { name: "build_info", kind: MetricType::Gauge, help: "Always 1; labels give the agent's version." };

pub const WATCH_STAGE_SECONDS: Family = Family {
    name: "watch_stage_seconds",
    kind: MetricType::Histogram,
    help: "Time each watch event spent per stage, from etcd's commit (notify) to per-watcher enqueue, gRPC send \
           and dispatch in an etcd client on this node; in a Kubernetes API server to its watch cache and to each \
           watcher's result channel and HTTP stream; in a client-go reflector to its informer's queue, to the informer's processing and \
           to each handler's start; by stage and process.",
};
pub const WATCH_EVENTS: Family = Family {
    name: "watch_events",
    kind: MetricType::Counter,
    help: "Watch events (not responses): sent by etcd to each watcher, dispatched by an etcd client, taken by an \
           API server's watch cache, put in each of its watchers' result channels (live) or replayed from its \
           history to a new watch, written to each watcher's HTTP stream (live), decoded off its stream by a \
           client-go watch client, queued by a client-go reflector, taken off the queue by its informer, started \
           on by each of its handlers; by side and process.",
};
pub const WATCH_PROGRESS: Family = Family {
    name: "watch_progress",
    kind: MetricType::Counter,
    help: "Watch progress that carries no event, never counted as events: etcd responses without events that are \
           progress notifications (periodic, or answers to progress requests such as the API server's), sent or \
           dispatched; and the bookmarks an API server puts in its watchers' result channels.",
};
pub const WATCHERS_TERMINATED: Family = Family {
    name: "apiserver_watchers_terminated",
    kind: MetricType::Counter,
    help: "Watchers a Kubernetes API server terminated for being unresponsive (their queue stayed full past the \
           dispatch budget: \"Forcing ... watcher close due to unresponsiveness\"), by API server process.",
};

pub const WATCH_CHAINS: Family = Family {
    name: "watch_chains",
    kind: MetricType::Counter,
    help: "Watch events followed from commit to the clients on this node, judged per revision: complete, slow \
           (a stage over 100 ms), or broken (a client on this node that had received the stream's earlier events \
           did not dispatch this one within 5 s).",
};

pub const WATCH_CHAINS_ELSEWHERE: Family = Family {
    name: "watch_chains_elsewhere",
    kind: MetricType::Counter,
    help: "Of the judged watch event chains, those whose commit this node did not see (etcd runs on another \
           node): they begin at the first stage seen here (an API server's watch cache, a client's decode).",
};

pub const WATCH_CHAINS_PENDING: Family = Family {
    name: "watch_chains_pending",
    kind: MetricType::Gauge,
    help: "Watch event chains waiting to be judged (each waits its timeout, 5 s), and so held in the agent's \
           memory: at most 65,536, the oldest evicted past it.",
};

pub const WATCH_CHAIN_HOP_BYTES: Family = Family {
    name: "watch_chain_hop_bytes",
    kind: MetricType::Gauge,
    help: "Bytes of the hops (a send, a dispatch, an API server stage: one per watcher) the pending chains \
           hold, their vectors' grown room included: at most 64 MiB, the oldest chains evicted past it, so that events to thousands of watchers \
           leave the agent's memory bounded too.",
};

pub const SIDECAR_SECONDS: Family = Family {
    name: "sidecar_seconds",
    kind: MetricType::Histogram,
    help: "Time a request (downstream read to upstream write) or a response (upstream read to downstream write) \
           spent inside a proxy, by direction and proxy process.",
};
pub const SIDECAR_CROSSINGS: Family = Family {
    name: "sidecar_crossings",
    kind: MetricType::Counter,
    help: "Requests and responses seen crossing a proxy, by direction.",
};
pub const SIDECAR_UNMATCHED: Family = Family {
    name: "sidecar_unmatched",
    kind: MetricType::Counter,
    help: "Messages a proxy read but that could not be paired with their write (answered by the proxy itself, \
           handed to another thread, or cut short).",
};
pub const SIDECAR_RETRANSMITS: Family = Family {
    name: "sidecar_retransmits",
    kind: MetricType::Counter,
    help: "TCP retransmissions on a proxy's sockets.",
};

pub const GO_MAP_SECONDS: Family = Family {
    name: "go_map_seconds",
    kind: MetricType::Histogram,
    help: "Time in Go runtime map operations (assign, access, delete: with --go-maps=all) and in map growth, \
           per goroutine call, by operation and process.",
};
pub const GO_GC_ASSIST_SECONDS: Family = Family {
    name: "go_gc_assist_seconds",
    kind: MetricType::Histogram,
    help: "Time user goroutines spent assisting the garbage collector (runtime.gcAssistAlloc), by process.",
};
pub const GO_MAP_GROW_EVENTS: Family = Family {
    name: "go_map_grow_events",
    kind: MetricType::Counter,
    help: "Calls of Go map growth functions (hashGrow, growWork, evacuate; Swiss: growToSmall, growToTable, \
           rehash, grow, split), nested ones included.",
};
pub const WINDOW_SECONDS: Family = Family {
    name: "window_seconds",
    kind: MetricType::Histogram,
    help: "Duration of windows: a stretch of work on one goroutine (the etcd client's dispatchEvent, \
           client-go's delta handler, or --window NAME=SYMBOL), by window and process.",
};
pub const WINDOW_INNER_SECONDS: Family = Family {
    name: "window_inner_seconds",
    kind: MetricType::Histogram,
    help: "What each window spent inside it, by kind (map, map_grow, gc_assist, off_cpu, runqueue): one \
           observation per window, so its count matches watchscope_window_seconds bucket for bucket.",
};
pub const WINDOW_INNER_EVENTS: Family = Family {
    name: "window_inner_events",
    kind: MetricType::Counter,
    help: "Events inside closed windows, by kind: map calls (map, map_grow, gc_assist), times the goroutine \
           or its thread went off CPU (off_cpu), and waits for a CPU (runqueue).",
};

pub const FAMILIES: &[Family] = &[
    GO_MAP_SECONDS,
    GO_GC_ASSIST_SECONDS,
    GO_MAP_GROW_EVENTS,
    WINDOW_SECONDS,
    WINDOW_INNER_SECONDS,
    WINDOW_INNER_EVENTS,
    EXECS,
    PROCESS_EXECS,
    WATCH_STAGE_SECONDS,
    WATCH_EVENTS,
    WATCH_PROGRESS,
    WATCHERS_TERMINATED,
    WATCH_CHAINS,
    WATCH_CHAINS_ELSEWHERE,
    WATCH_CHAINS_PENDING,
    WATCH_CHAIN_HOP_BYTES,
    SIDECAR_SECONDS,
    SIDECAR_CROSSINGS,
    SIDECAR_UNMATCHED,
    SIDECAR_RETRANSMITS,
    DROPPED,
    SERIES_DROPPED,
    PROBES_ATTACHED,
    PROGRAM_RUNS,
    PROGRAM_RUN_SECONDS,
    PROGRAM_MISSES,
    BPF_MAP_BYTES,
    UPROBE_HIT_COST,
    RINGBUF_HIGH_WATER,
    RINGBUF_SIZE,
    BUILD_INFO,
];

impl Family {
    /// The sample names this family produces in the exposition.
    pub fn sample_names(&self) -> Vec<String> {
        let base = format!("{PREFIX}_{}", self.name);
        match self.kind {
            MetricType::Counter => vec![format!("{base}_total")],
            MetricType::Histogram => ["_bucket", "_sum", "_count"].iter().map(|s| format!("{base}{s}")).collect(),
            _ => vec![base],
        }
    }
}

type Labels<'a> = [(&'static str, &'a str)];

/// Renders a snapshot as OpenMetrics text: histograms in classic buckets.
pub fn render(snapshot: Snapshot, classic: ClassicBuckets) -> Result<String, std::fmt::Error> {
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &registry(snapshot, classic))?;
    Ok(out)
}

/// Why a snapshot could not be encoded.
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error("encoding metrics: {0}")]
    Fmt(#[from] std::fmt::Error),
    #[error("encoding protobuf: {0}")]
    Protobuf(#[from] prost::EncodeError),
}

/// A watch stage series that carries an exemplar: (series position in the
/// family, labels, exemplar).
type StageExemplar = (usize, Vec<(String, String)>, Exemplar);

fn stage_exemplars(snapshot: &Snapshot) -> Vec<StageExemplar> {
    snapshot
        .watch_stages
        .iter()
        .enumerate()
        .filter_map(|(i, h)| {
            let labels = h.labels.iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
            Some((i, labels, h.exemplar.clone()?))
        })
        .collect()
}

/// Renders a snapshot as OpenMetrics text with exemplars: each watch stage
/// series' slowest recent event on the classic bucket it fell in.
///
/// prometheus-client writes exemplars only for histograms it owns (its
/// `Exemplar` has no public constructor), so they are added to its output
/// here: the family's series come out in snapshot order, each as `_sum`,
/// `_count`, then its buckets in order, which places an exemplar by
/// position alone. If the text does not have that shape, no exemplar is
/// written rather than one on the wrong series.
pub fn render_openmetrics(snapshot: Snapshot, classic: ClassicBuckets) -> Result<String, std::fmt::Error> {
    let exemplars = stage_exemplars(&snapshot);
    let series = snapshot.watch_stages.len();
    let text = render(snapshot, classic)?;
    if exemplars.is_empty() {
        return Ok(text);
    }
    let base = format!("{PREFIX}_{}", WATCH_STAGE_SECONDS.name);
    let (sum, bucket) = (format!("{base}_sum{{"), format!("{base}_bucket{{"));
    if text.lines().filter(|l| l.starts_with(&sum)).count() != series {
        return Ok(text);
    }
    let mut out = String::with_capacity(text.len() + 128 * exemplars.len());
    let (mut k, mut j) = (None::<usize>, 0usize);
    for line in text.lines() {
        out.push_str(line);
        if line.starts_with(&sum) {
            k = Some(k.map_or(0, |k| k + 1));
            j = 0;
        } else if line.starts_with(&bucket) {
            let here = k.and_then(|k| exemplars.iter().find(|(i, _, _)| *i == k));
            if let Some((_, _, x)) = here.filter(|(_, _, x)| classic.index_of(x.value_ns) == j) {
                out.push_str(&openmetrics_exemplar(x));
            }
            j += 1;
        }
        out.push('\n');
    }
    Ok(out)
}

/// ` # {revision="..",watcher=".."} <seconds> <unix seconds>`.
fn openmetrics_exemplar(x: &Exemplar) -> String {
    let labels: Vec<String> = x.labels().iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    let at = x.at.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0);
    // One correctly rounded division: 0.026921, not 0.026921000000000002.
    format!(" # {{{}}} {} {at:.3}", labels.join(","), x.value_ns as f64 / 1e9)
}

/// Renders a snapshot as length-delimited Prometheus protobuf: histograms
/// native (schema 2, every kernel bucket) and classic side by side; watch
/// stage series carry their exemplar on the classic bucket it fell in and
/// in the native histogram's own list (Prometheus takes a native
/// histogram's exemplars from there, timestamps required).
pub fn render_protobuf(snapshot: Snapshot, classic: ClassicBuckets) -> Result<Vec<u8>, RenderError> {
    use prometheus_protobuf::prometheus_data_model as pb;
    use prost::Message;
    let exemplars = stage_exemplars(&snapshot);
    let mut families = prometheus_protobuf::encode(&registry(snapshot, classic))?;
    let base = format!("{PREFIX}_{}", WATCH_STAGE_SECONDS.name);
    for m in families.iter_mut().filter(|f| f.name == base).flat_map(|f| f.metric.iter_mut()) {
        let labels: Vec<(String, String)> = m.label.iter().map(|l| (l.name.clone(), l.value.clone())).collect();
        let Some((_, _, x)) = exemplars.iter().find(|(_, l, _)| *l == labels) else { continue };
        let Some(h) = m.histogram.as_mut() else { continue };
        let at = x.at.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        let e = pb::Exemplar {
            label: x.labels().into_iter().map(|(k, v)| pb::LabelPair { name: k.to_string(), value: v }).collect(),
            value: x.value_ns as f64 / 1e9,
            timestamp: Some(prost_types::Timestamp { seconds: at.as_secs() as i64, nanos: at.subsec_nanos() as i32 }),
        };
        if let Some(b) = h.bucket.get_mut(classic.index_of(x.value_ns)) {
            b.exemplar = Some(e.clone());
        }
        h.exemplars.push(e);
    }
    // Prometheus (3.5) reads a native histogram's exemplars by a position
    // it resets per family, not per series: only the first series of a
    // family would keep its exemplar. So each stage series that carries one
    // goes out as a family of its own (same name, help and type; the format
    // allows a name to repeat), the rest together.
    let mut out = Vec::new();
    for mut f in families {
        if f.name == base && f.metric.iter().any(|m| m.histogram.as_ref().is_some_and(|h| !h.exemplars.is_empty())) {
            let (with, without): (Vec<_>, Vec<_>) = std::mem::take(&mut f.metric)
                .into_iter()
                .partition(|m| m.histogram.as_ref().is_some_and(|h| !h.exemplars.is_empty()));
            for m in with {
                pb::MetricFamily { metric: vec![m], ..f.clone() }.encode_length_delimited(&mut out)?;
            }
            if !without.is_empty() {
                pb::MetricFamily { metric: without, ..f }.encode_length_delimited(&mut out)?;
            }
            continue;
        }
        f.encode_length_delimited(&mut out)?;
    }
    Ok(out)
}

fn registry(snapshot: Snapshot, classic: ClassicBuckets) -> Registry {
    let mut registry = Registry::with_prefix(PREFIX);
    registry.register_collector(Box::new(SnapshotCollector { snapshot, classic }));
    registry
}

#[derive(Debug)]
struct SnapshotCollector {
    snapshot: Snapshot,
    classic: ClassicBuckets,
}

impl Collector for SnapshotCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = &self.snapshot;
        let histograms = |enc: &mut DescriptorEncoder, fam: &Family, series: &[LabelledHistogram]| {
            histograms(enc, fam, series, self.classic)
        };
        counter(&mut enc, &EXECS, &[(&[], s.kernel(Counter::ExecSeen))])?;
        counts(&mut enc, &PROCESS_EXECS, &s.watched_execs)?;
        histograms(&mut enc, &WATCH_STAGE_SECONDS, &s.watch_stages)?;
        counts(&mut enc, &WATCH_EVENTS, &s.watch_events)?;
        counts(&mut enc, &WATCH_PROGRESS, &s.watch_progress)?;
        counts(&mut enc, &WATCHERS_TERMINATED, &s.watchers_terminated)?;
        let chains: Vec<_> = crate::collect::chains::Outcome::ALL
            .iter()
            .map(|o| ([("outcome", o.name())], s.watch_chains.get(*o)))
            .collect();
        counter(&mut enc, &WATCH_CHAINS, &chains.iter().map(|(l, n)| (&l[..], *n)).collect::<Vec<_>>())?;
        counter(&mut enc, &WATCH_CHAINS_ELSEWHERE, &[(&[], s.watch_chains.elsewhere)])?;
        let held = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        gauge(&mut enc, &WATCH_CHAINS_PENDING, &[(&[], held(s.watch_chains.pending))])?;
        gauge(&mut enc, &WATCH_CHAIN_HOP_BYTES, &[(&[], held(s.watch_chains.hop_bytes))])?;
        histograms(&mut enc, &GO_MAP_SECONDS, &s.go_maps)?;
        histograms(&mut enc, &GO_GC_ASSIST_SECONDS, &s.gc_assist)?;
        counts(&mut enc, &GO_MAP_GROW_EVENTS, &s.grow_events)?;
        histograms(&mut enc, &WINDOW_SECONDS, &s.windows)?;
        histograms(&mut enc, &WINDOW_INNER_SECONDS, &s.window_inner)?;
        counts(&mut enc, &WINDOW_INNER_EVENTS, &s.window_inner_events)?;
        histograms(&mut enc, &SIDECAR_SECONDS, &s.sidecar)?;
        counts(&mut enc, &SIDECAR_CROSSINGS, &s.sidecar_crossings)?;
        counts(&mut enc, &SIDECAR_UNMATCHED, &s.sidecar_unmatched)?;
        counts(&mut enc, &SIDECAR_RETRANSMITS, &s.sidecar_retransmits)?;
        let mut dropped: Vec<([(&str, &str); 1], u64)> =
            Counter::ALL.iter().filter_map(|c| Some(([("reason", c.drop_reason()?)], s.kernel(*c)))).collect();
        dropped.push(([("reason", "decode_error")], s.decode_errors));
        let c = &s.watch_chains;
        dropped.push(([("reason", "chain_evicted")], c.evicted));
        dropped.push(([("reason", "chain_late")], c.late));
        dropped.push(([("reason", "chain_window_evicted")], c.windows_evicted));
        dropped.push(([("reason", "chain_hops_over_cap")], c.hops_dropped));
        counter(&mut enc, &DROPPED, &dropped.iter().map(|(l, n)| (&l[..], *n)).collect::<Vec<_>>())?;
        let dropped: Vec<_> = s.series_dropped.iter().map(|(f, n)| ([("family", *f)], *n)).collect();
        counter(&mut enc, &SERIES_DROPPED, &dropped.iter().map(|(l, n)| (&l[..], *n)).collect::<Vec<_>>())?;
        let probes: Vec<_> = s.probes_attached.iter().map(|(k, n)| ([("kind", *k)], *n as i64)).collect();
        gauge(&mut enc, &PROBES_ATTACHED, &probes.iter().map(|(l, n)| (&l[..], *n)).collect::<Vec<_>>())?;
        let runs: Vec<_> = s.programs.iter().map(|p| ([("program", p.program.as_str())], p.runs)).collect();
        counter(&mut enc, &PROGRAM_RUNS, &runs.iter().map(|(l, n)| (&l[..], *n)).collect::<Vec<_>>())?;
        let misses: Vec<_> = s.programs.iter().map(|p| ([("program", p.program.as_str())], p.misses)).collect();
        counter(&mut enc, &PROGRAM_MISSES, &misses.iter().map(|(l, n)| (&l[..], *n)).collect::<Vec<_>>())?;
        let mut m =
            enc.encode_descriptor(PROGRAM_RUN_SECONDS.name, PROGRAM_RUN_SECONDS.help, None, PROGRAM_RUN_SECONDS.kind)?;
        for p in &s.programs {
            ConstCounter::new(p.run_ns as f64 * 1e-9).encode(m.encode_family(&[("program", p.program.as_str())])?)?;
        }
        let maps: Vec<_> = s
            .map_bytes
            .iter()
            .map(|m| ([("map", m.name.as_str())], i64::try_from(m.bytes).unwrap_or(i64::MAX)))
            .collect();
        gauge(&mut enc, &BPF_MAP_BYTES, &maps.iter().map(|(l, n)| (&l[..], *n)).collect::<Vec<_>>())?;
        // Declared always, like every family; no series when not measured.
        let mut m = enc.encode_descriptor(UPROBE_HIT_COST.name, UPROBE_HIT_COST.help, None, UPROBE_HIT_COST.kind)?;
        for (instruction, secs) in &s.uprobe_hit_cost {
            ConstGauge::new(*secs).encode(m.encode_family(&[("instruction", *instruction)])?)?;
        }
        let rings: Vec<_> = s
            .ring_fill
            .iter()
            .map(|(r, n)| ([("ring", r.name())], i64::try_from(*n).unwrap_or(i64::MAX), i64::from(r.bytes())))
            .collect();
        gauge(&mut enc, &RINGBUF_HIGH_WATER, &rings.iter().map(|(l, n, _)| (&l[..], *n)).collect::<Vec<_>>())?;
        gauge(&mut enc, &RINGBUF_SIZE, &rings.iter().map(|(l, _, b)| (&l[..], *b)).collect::<Vec<_>>())?;
        gauge(&mut enc, &BUILD_INFO, &[(&[("version", env!("CARGO_PKG_VERSION"))], 1)])?;
        Ok(())
    }
}

/// Histograms in the one bucket layout (agent_common::hist), in seconds:
/// native (protobuf only; the text encoder writes the classic part) and
/// classic `le` buckets chosen by `classic`; `_count` = the sum of the
/// buckets.
fn histograms(
    enc: &mut DescriptorEncoder,
    fam: &Family,
    series: &[LabelledHistogram],
    classic: ClassicBuckets,
) -> Result<(), std::fmt::Error> {
    let mut m = enc.encode_descriptor(fam.name, fam.help, None, fam.kind)?;
    for h in series {
        let labels: Vec<(&str, &str)> = h.labels.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let sparse = buckets::native(&h.hist);
        let native = NativeHistogram {
            schema: hist::SCHEMA,
            zero_threshold: hist::ZERO_THRESHOLD_SECONDS,
            zero_count: h.hist.buckets[0],
            negative: NativeHistogramBuckets { spans: &[], deltas: &[] },
            positive: NativeHistogramBuckets { spans: &sparse.spans, deltas: &sparse.deltas },
            created: None,
        };
        m.encode_family(&labels)?.encode_histogram_with_native::<NoLabelSet>(
            h.hist.sum_ns as f64 * 1e-9,
            h.hist.count(),
            &classic.buckets(&h.hist),
            None,
            native,
        )?;
    }
    Ok(())
}

/// A counter family of labelled series (the per-process families).
fn counts(enc: &mut DescriptorEncoder, fam: &Family, series: &[LabelledCount]) -> Result<(), std::fmt::Error> {
    let mut m = enc.encode_descriptor(fam.name, fam.help, None, fam.kind)?;
    for c in series {
        let labels: Vec<(&str, &str)> = c.labels.iter().map(|(k, v)| (*k, v.as_str())).collect();
        ConstCounter::new(c.value).encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

fn counter(enc: &mut DescriptorEncoder, fam: &Family, series: &[(&Labels<'_>, u64)]) -> Result<(), std::fmt::Error> {
    encode_series(enc, fam, series, |v, m| ConstCounter::new(*v).encode(m))
}

fn gauge(enc: &mut DescriptorEncoder, fam: &Family, series: &[(&Labels<'_>, i64)]) -> Result<(), std::fmt::Error> {
    encode_series(enc, fam, series, |v, m| ConstGauge::new(*v).encode(m))
}

/// Writes one family's descriptor and its series. A single series without
/// labels is written bare (`name 1`, not `name{} 1`).
fn encode_series<V>(
    enc: &mut DescriptorEncoder,
    fam: &Family,
    series: &[(&Labels<'_>, V)],
    mut value: impl FnMut(&V, MetricEncoder<'_>) -> Result<(), std::fmt::Error>,
) -> Result<(), std::fmt::Error> {
    let mut m = enc.encode_descriptor(fam.name, fam.help, None, fam.kind)?;
    if let [(labels, v)] = series
        && labels.is_empty()
    {
        return value(v, m);
    }
    for (labels, v) in series {
        value(v, m.encode_family(labels)?)?;
    }
    Ok(())
}

/// Finds a sample's value in exposition text: `name{labels}` exactly as
/// rendered (labels in declaration order). For tests and the CLI.
pub fn sample_value(text: &str, sample: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(sample)?;
        let rest = rest.strip_prefix(' ')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{attach::slots::LabelSet, collect::ProgramStats};

    const WHO: &str = "namespace=\"\",pod=\"\",container=\"\",comm=\"etcd\"";

    fn snapshot() -> Snapshot {
        let mut s = Snapshot::default();
        s.kernel[Counter::ExecSeen as usize] = 12;
        s.kernel[Counter::EventsRingbufFull as usize] = 3;
        let who = |c: &str| LabelSet::comm(c);
        s.watched_execs =
            vec![LabelledCount::new(who("etcd").pairs(&[]), 2), LabelledCount::new(who("we\"ird").pairs(&[]), 1)];
        s.series_dropped = vec![("process_execs", 4)];
        s.probes_attached = vec![("tracepoint", 1)];
        s.programs = vec![ProgramStats { program: "sched_process_exec".into(), runs: 9, run_ns: 1_500, misses: 2 }];
        let mut h = agent_common::Histogram::ZERO;
        h.observe(1_500); // 1.5 µs: bucket (1.5, 1.75] µs
        h.observe(3_000_000_000);
        s.watch_stages = vec![LabelledHistogram {
            labels: who("etcd").pairs(&[("stage", "commit_to_send".into())]),
            hist: h,
            exemplar: None,
        }];
        s.watch_events = vec![LabelledCount::new(who("etcd").pairs(&[("side", "server".into())]), 2)];
        s.watch_chains.broken = 7;
        s.uprobe_hit_cost = vec![("emulated", 3.7e-7), ("single_step", 2.8e-6)];
        s
    }

    #[test]
    fn renders_every_family_with_help_and_values() {
        let text = render(snapshot(), ClassicBuckets::Fine).unwrap();
        for f in FAMILIES {
            assert!(text.contains(&format!("# HELP {PREFIX}_{} ", f.name)), "{}", f.name);
        }
        assert_eq!(sample_value(&text, "watchscope_execs_total"), Some(12.0));
        assert_eq!(sample_value(&text, &format!("watchscope_process_execs_total{{{WHO}}}")), Some(2.0));
        assert_eq!(sample_value(&text, "watchscope_dropped_total{reason=\"ringbuf_full\"}"), Some(3.0));
        assert_eq!(sample_value(&text, "watchscope_series_dropped_total{family=\"process_execs\"}"), Some(4.0));
        assert_eq!(sample_value(&text, "watchscope_probes_attached{kind=\"tracepoint\"}"), Some(1.0));
        assert_eq!(sample_value(&text, "watchscope_program_runs_total{program=\"sched_process_exec\"}"), Some(9.0));
        assert_eq!(sample_value(&text, "watchscope_program_misses_total{program=\"sched_process_exec\"}"), Some(2.0));
        assert_eq!(
            sample_value(&text, "watchscope_program_run_seconds_total{program=\"sched_process_exec\"}"),
            Some(0.0000015)
        );
        assert!(text.ends_with("# EOF\n"));
        let h = "watchscope_watch_stage_seconds";
        let l = format!("stage=\"commit_to_send\",{WHO}");
        assert_eq!(sample_value(&text, &format!("{h}_count{{{l}}}")), Some(2.0));
        assert_eq!(sample_value(&text, &format!("{h}_sum{{{l}}}")), Some(3.0000015));
        // Cumulative buckets; 1.5 µs lands in (2^-19.5, 2^-19.25] s = (1.349, 1.604] µs.
        let bucket = |le: f64| {
            text.lines().find_map(|line| {
                let rest = line.strip_prefix(&format!("{h}_bucket{{le=\""))?;
                let (bound, rest) = rest.split_once('"')?;
                let value = rest.strip_prefix(&format!(",{l}}} "))?;
                (bound.parse::<f64>().ok()? == le).then(|| value.parse::<f64>().ok())?
            })
        };
        assert_eq!(bucket(hist::bucket_upper_bound_seconds(2)), Some(0.0));
        assert_eq!(bucket(hist::bucket_upper_bound_seconds(3)), Some(1.0));
        assert_eq!(bucket(4.0), Some(2.0), "3 s is in (2, 4] s");
        assert_eq!(sample_value(&text, &format!("{h}_bucket{{le=\"+Inf\",{l}}}")), Some(2.0));
        assert_eq!(text.matches(&format!("{h}_bucket{{le=")).count(), 106);
        let coarse = render(snapshot(), ClassicBuckets::Coarse).unwrap();
        assert_eq!(coarse.matches(&format!("{h}_bucket{{le=")).count(), 28);
        assert_eq!(sample_value(&text, &format!("watchscope_watch_events_total{{side=\"server\",{WHO}}}")), Some(2.0));
        assert_eq!(sample_value(&text, "watchscope_watch_chains_total{outcome=\"broken\"}"), Some(7.0));
        assert_eq!(sample_value(&text, "watchscope_watch_chains_total{outcome=\"complete\"}"), Some(0.0));
    }

    #[test]
    fn protobuf_carries_native_and_classic_buckets() {
        use prost::Message;
        let bytes = render_protobuf(snapshot(), ClassicBuckets::Coarse).unwrap();
        let mut buf = &bytes[..];
        let mut families = vec![];
        while !buf.is_empty() {
            families.push(
                prometheus_protobuf::prometheus_data_model::MetricFamily::decode_length_delimited(&mut buf).unwrap(),
            );
        }
        let stage = families.iter().find(|f| f.name == "watchscope_watch_stage_seconds").unwrap();
        let h = stage.metric[0].histogram.as_ref().unwrap();
        assert_eq!((h.sample_count, h.sample_sum), (2, 3.0000015));
        assert_eq!((h.schema, h.zero_threshold, h.zero_count), (2, hist::ZERO_THRESHOLD_SECONDS, 0));
        // 1.5 µs is native bucket -77, 3 s is native bucket 7: (2^1.5, 2^1.75] s.
        let spans: Vec<_> = h.positive_span.iter().map(|s| (s.offset, s.length)).collect();
        assert_eq!(spans, vec![(-77, 1), (83, 1)]);
        assert_eq!(h.positive_delta, vec![1, 0]);
        assert_eq!(h.bucket.len(), 28, "coarse classic buckets ride along");
        let counter = families.iter().find(|f| f.name == "watchscope_execs_total").unwrap();
        assert_eq!(counter.metric[0].counter.as_ref().unwrap().value, 12.0);
    }

    fn with_exemplar() -> Snapshot {
        let mut s = snapshot();
        s.watch_stages[0].exemplar = Some(Exemplar {
            value_ns: 3_000_000_000,
            revision: 42,
            watcher: Some("7".into()),
            at: std::time::UNIX_EPOCH + std::time::Duration::from_millis(1_700_000_000_250),
        });
        s
    }

    #[test]
    fn openmetrics_puts_the_exemplar_on_its_bucket_only() {
        let text = render_openmetrics(with_exemplar(), ClassicBuckets::Fine).unwrap();
        let lines: Vec<&str> = text.lines().filter(|l| l.contains(" # {")).collect();
        assert_eq!(lines.len(), 1, "{text}");
        // 3 s is in (2^1.5, 2^1.75] s: the bucket whose bound is 2^1.75.
        let le = hist::bucket_upper_bound_seconds(hist::bucket_index(3_000_000_000) as usize);
        assert!(lines[0].starts_with(&format!("watchscope_watch_stage_seconds_bucket{{le=\"{le}")), "{}", lines[0]);
        assert!(lines[0].ends_with(" 2 # {revision=\"42\",watcher=\"7\"} 3 1700000000.250"), "{}", lines[0]);
        // Without exemplars the text is what render() writes; 0.0.4 never has them.
        assert_eq!(
            render_openmetrics(snapshot(), ClassicBuckets::Fine).unwrap(),
            render(snapshot(), ClassicBuckets::Fine).unwrap()
        );
    }

    #[test]
    fn protobuf_carries_the_exemplar_on_the_native_and_classic_histogram() {
        use prost::Message;
        let bytes = render_protobuf(with_exemplar(), ClassicBuckets::Coarse).unwrap();
        let mut buf = &bytes[..];
        let mut stage = None;
        while !buf.is_empty() {
            let f =
                prometheus_protobuf::prometheus_data_model::MetricFamily::decode_length_delimited(&mut buf).unwrap();
            if f.name == "watchscope_watch_stage_seconds" {
                stage = Some(f);
            }
        }
        let h = stage.unwrap().metric[0].histogram.clone().unwrap();
        assert_eq!(h.exemplars.len(), 1);
        let e = &h.exemplars[0];
        assert_eq!(e.value, 3.0);
        let labels: Vec<(&str, &str)> = e.label.iter().map(|l| (l.name.as_str(), l.value.as_str())).collect();
        assert_eq!(labels, vec![("revision", "42"), ("watcher", "7")]);
        assert_eq!(e.timestamp.map(|t| (t.seconds, t.nanos)), Some((1_700_000_000, 250_000_000)));
        // Coarse classic: (2, 4] s holds 3 s.
        let with: Vec<f64> = h.bucket.iter().filter(|b| b.exemplar.is_some()).map(|b| b.upper_bound).collect();
        assert_eq!(with, vec![4.0]);
    }

    #[test]
    fn family_names_are_unique_and_snake_case() {
        let mut names: Vec<_> = FAMILIES.iter().map(|f| f.name).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), FAMILIES.len());
        assert!(names.iter().all(|n| n.chars().all(|c| c.is_ascii_lowercase() || c == '_')));
    }
}

#[cfg(test)]
mod readme {
    use super::*;

    /// The README's metric reference must name every family we export.
    #[test]
    fn readme_lists_every_family() {
        let readme = include_str!("../../../README.md");
        for f in FAMILIES {
            let base = format!("{PREFIX}_{}", f.name);
            assert!(readme.contains(&base), "README.md does not document {base}");
        }
    }
}
