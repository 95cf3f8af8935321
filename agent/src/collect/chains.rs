//! Watch event chains: the per-event records of `WS_WATCH_RECORDS` and the
//! closed windows of `WS_WINDOW_RECORDS`, joined per revision into one path
//! per watch event — commit → enqueue → send (per watcher, on a server on
//! this node) → dispatch (per client process on this node) → handler window
//! (the `etcd_dispatch` window on the dispatching goroutine) — and on through
//! a Kubernetes API server to each client-go informer's handler, whose user
//! window (`--window`) joins the handler call it ran in (the latest handler
//! start on its goroutine: a listener runs its handlers one at a time) —
//! and judged `complete`, `slow` or `broken`.
//!
//! Pure logic: no kernel, no clock of its own (every call takes `now` in
//! CLOCK_MONOTONIC nanoseconds, the clock of `bpf_ktime_get_ns`), so it is
//! unit-tested with synthetic records.
//!
//! # Joining
//!
//! A chain is keyed by (member, revision). Both sides read `member` from the
//! same `WatchResponse.Header.MemberId` (etcd.rs `response`): the server at
//! its gRPC `Send`, the client when it decodes that very response, so the
//! server's and the client's records of one event carry the same member and
//! the event's own `kv.ModRevision`. A transaction's several events share
//! one revision and so one chain (each watcher gets one send per event).
//!
//! # When a chain is broken: who should have received it
//!
//! `watch_id` alone does not name a watcher: etcd numbers watchers per gRPC
//! stream, so every client's first watcher is watch 0. What names a stream
//! is the goroutine each side runs it on, which every record carries (`g`):
//! on the server, one `sendLoop` goroutine per stream calls `Send`; on the
//! client, one `watchGrpcStream.run` goroutine per stream calls
//! `dispatchEvent`. So a server stream is (server tgid, g) and a client
//! stream is (client tgid, g), and the two ends are **paired** by evidence:
//! when a client stream dispatches (member, rev, watch W) and exactly one
//! server stream sent (member, rev, watch W), those two streams are one
//! connection. (Two server streams that both sent (rev, W) are ambiguous and
//! teach nothing; a later, unambiguous revision does.)
//!
//! The rule: **a send from a server stream paired with a client stream on
//! this node expects one dispatch of the same (member, rev, watch id) from
//! that client stream.** A chain is `broken` when, `timeout` after its
//! commit, an expected dispatch has not arrived. Everything else cannot be
//! broken: a send on a stream never paired (a watcher on another node, the
//! in-process JSON gateway, a client that has not dispatched anything yet)
//! expects nothing here, and a dispatch whose server runs elsewhere has
//! nothing upstream on this node to miss. Pairings are forgotten when the
//! client process is gone (checked when a chain would be judged broken), so
//! a goroutine address reused by a new server stream towards another node
//! does not inherit a dead client.
//!
//! # Judging, and bounds
//!
//! A chain is judged once, at commit + `timeout` (its first record's time
//! when the commit was not seen here): by then every stage that was going to
//! happen inside the timeout has happened. Records of a judged chain that
//! arrive later are counted as `late`, never start a second chain. Pending
//! chains are capped (`max_pending`), and so are the bytes of the hops they
//! hold in all (`max_hop_bytes`: a chain holds a hop per watcher, and an
//! event to a thousand watchers holds a thousand): past either cap the
//! oldest chain is dropped
//! unjudged and counted as `evicted`; so are windows waiting for their
//! dispatch record (the two ring buffers are read one after the other, so a
//! window can arrive before the dispatch it contains).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};

use agent_common::{
    goruntime::{Inner, WindowRecord},
    watch::{Side, Stage, WatchRecord},
};

/// Index of the etcd client's `dispatchEvent` window in the agent's window
/// table (`attach::goruntime::BUILTIN_WINDOWS[0]`).
pub const DISPATCH_WINDOW: u32 = 0;

/// Most sends or dispatches kept per chain (a revision sent to thousands of
/// watchers is still judged on the first ones; the rest are counted).
const MAX_HOPS: usize = 1024;
/// Most (member, revision) keys remembered after judgement, to recognise
/// late records.
const MAX_JUDGED: usize = 65536;
/// Most windows waiting for their dispatch record.
const MAX_ORPHAN_WINDOWS: usize = 4096;
/// Most stream pairings.
const MAX_PAIRS: usize = 4096;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChainSettings {
    /// A stage longer than this marks the chain `slow` (`warn`).
    pub warn_ns: u64,
    /// A stage longer than this is marked `error` (the chain is `slow`).
    pub error_ns: u64,
    /// How long after its commit an expected dispatch may arrive.
    pub timeout_ns: u64,
    pub max_pending: usize,
    /// Most bytes of hops (40 to 96 each) held by all pending chains
    /// together, so that the memory chains hold is bounded by this and
    /// `max_pending` (a `Vec` holds up to twice what it uses), not by
    /// watchers times events. The long soak holds 29 MB: 43 puts a second
    /// to 1,000 watches, a send and a dispatch each, for 5 s.
    pub max_hop_bytes: usize,
    /// Judged chains kept for a report (the worst ones); 0 in `run`.
    pub keep: usize,
}

impl Default for ChainSettings {
    fn default() -> Self {
        Self {
            warn_ns: 100_000_000,
            error_ns: 1_000_000_000,
            timeout_ns: 5_000_000_000,
            max_pending: 65536,
            max_hop_bytes: 64 << 20,
            keep: 0,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Outcome {
    Complete,
    Slow,
    Broken,
}

impl Outcome {
    pub const ALL: [Outcome; 3] = [Outcome::Complete, Outcome::Slow, Outcome::Broken];

    pub fn name(self) -> &'static str {
        match self {
            Outcome::Complete => "complete",
            Outcome::Slow => "slow",
            Outcome::Broken => "broken",
        }
    }
}

/// How one stage of a chain went, worst last.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub enum Mark {
    #[default]
    Ok,
    Warn,
    Error,
    Broken,
}

impl Mark {
    pub fn name(self) -> &'static str {
        match self {
            Mark::Ok => "ok",
            Mark::Warn => "warn",
            Mark::Error => "error",
            Mark::Broken => "broken",
        }
    }
}

/// (process, goroutine): one end of a watch stream.
pub type Stream = (u32, u64);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SendHop {
    pub stream: Stream,
    pub watch_id: i64,
    /// 0 when the per-watcher enqueue was not seen.
    pub enqueue_ns: u64,
    pub at_ns: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WindowSpan {
    pub start_ns: u64,
    pub end_ns: u64,
    pub inner: [u64; Inner::COUNT as usize],
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DispatchHop {
    pub stream: Stream,
    pub watch_id: i64,
    pub at_ns: u64,
    /// The handler window the dispatch ran in, once its record arrived.
    pub window: Option<WindowSpan>,
}

/// A hop of the Kubernetes watch path, from a record joined by revision
/// alone (the API server and its clients know no etcd member).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum KubeKind {
    /// The API server's watch cache took the event.
    Cache,
    /// Offered to one watcher's queue (not shown: it says which watchers
    /// should have received the event).
    Offer,
    /// In one watcher's result channel.
    Watcher,
    /// Written to one watcher's HTTP stream.
    Write,
    /// A client-go watch client decoded it off its stream (an informer's
    /// reflector queued it, where the frame was not JSON).
    Decode,
    /// Its informer took it off the queue.
    Process,
    /// One of the informer's handlers started on it.
    Handler,
}

impl KubeKind {
    pub fn of(side: u32) -> Option<KubeKind> {
        Some(match side {
            s if s == Side::ApiserverCache as u32 => KubeKind::Cache,
            s if s == Side::ApiserverOffered as u32 => KubeKind::Offer,
            s if s == Side::ApiserverWatcher as u32 => KubeKind::Watcher,
            s if s == Side::ApiserverWritten as u32 => KubeKind::Write,
            // A watch stream's frame, or (protobuf) the reflector's queueing.
            s if s == Side::Informer as u32 || s == Side::ClientDecoded as u32 => KubeKind::Decode,
            s if s == Side::InformerProcessed as u32 => KubeKind::Process,
            s if s == Side::InformerHandled as u32 => KubeKind::Handler,
            _ => return None,
        })
    }

    /// Its column in `VIEW_STAGES` (none for an offer).
    fn column(self) -> Option<usize> {
        Some(match self {
            KubeKind::Offer => return None,
            KubeKind::Cache => 3,
            KubeKind::Watcher => WATCHER,
            KubeKind::Write => 5,
            KubeKind::Decode => 6,
            KubeKind::Process => 7,
            KubeKind::Handler => HANDLER,
        })
    }

    /// The per-hop stage a record's `enqueue_ns` starts (the kernel puts
    /// the hop's own start there).
    fn hop_stage(self) -> Option<Stage> {
        match self {
            KubeKind::Watcher => Some(Stage::CacheToWatcher),
            KubeKind::Write => Some(Stage::CacheToWrite),
            KubeKind::Process => Some(Stage::DecodeToProcess),
            KubeKind::Handler => Some(Stage::ProcessToHandler),
            _ => None,
        }
    }

    /// The stage whose per-event maximum a record of this hop gives.
    fn stage(self) -> Option<Stage> {
        Some(match self {
            KubeKind::Offer => return None,
            KubeKind::Cache => Stage::CommitToCache,
            KubeKind::Watcher => Stage::CommitToWatcher,
            KubeKind::Write => Stage::CommitToWrite,
            KubeKind::Decode => Stage::CommitToDecode,
            KubeKind::Process => Stage::CommitToProcess,
            KubeKind::Handler => Stage::CommitToHandler,
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KubeHop {
    pub kind: KubeKind,
    pub tgid: u32,
    pub g: u64,
    /// The watcher (`cacheWatcher` address) of a `Watcher` hop, else 0.
    pub watcher: i64,
    pub at_ns: u64,
    /// A `Handler` hop's user window (`--window`) that ran inside that
    /// handler call, the longest where several did.
    pub window: Option<WindowSpan>,
}

/// A dispatch (or an API server watcher's result-channel send) that was
/// expected and did not arrive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Missing {
    /// The client stream; for an API server watcher, (API server, 0).
    pub client: Stream,
    /// etcd's watch id, or the API server's watcher address.
    pub watch_id: i64,
    pub count: u32,
    /// The `VIEW_STAGES` column the chain broke at.
    pub column: usize,
}

/// One watch event's path through this node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chain {
    pub member: u64,
    pub rev: i64,
    /// etcd's notify time of the revision, 0 when not seen on this node.
    pub commit_ns: u64,
    /// The time stages are shown relative to: the commit, or the first record.
    pub origin_ns: u64,
    pub sends: Vec<SendHop>,
    pub dispatches: Vec<DispatchHop>,
    /// The Kubernetes path's hops, in arrival order.
    pub kube: Vec<KubeHop>,
    pub missing: Vec<Missing>,
    pub outcome: Outcome,
}

/// The stages of a chain as a trace view shows them: the latest time each
/// stage was reached (relative to the origin) and how its worst hop went.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StageView {
    /// Relative time of the latest arrival at this stage, if any arrived.
    pub at_ns: Option<u64>,
    /// The longest hop into this stage (from the stage before it).
    pub hop_ns: u64,
    pub mark: Mark,
}

/// Columns of the chain view, in path order: etcd's, then the Kubernetes
/// path's (through an API server to its clients), then the handler (etcd
/// client's dispatch window, or an informer's handler start).
pub const VIEW_STAGES: [&str; 9] =
    ["enqueue", "send", "dispatch", "cache", "watcher", "write", "decode", "process", "handler"];
/// The columns only the Kubernetes path fills.
const KUBE_COLUMNS: std::ops::Range<usize> = 3..8;
const DISPATCH: usize = 2;
const WATCHER: usize = 4;
const HANDLER: usize = 8;

/// The `VIEW_STAGES` columns a table of these chains shows: etcd's always,
/// the Kubernetes path's when one of them went through an API server.
pub fn view_columns(chains: &[&Chain]) -> Vec<usize> {
    let kube = chains.iter().any(|c| !c.kube.is_empty());
    (0..VIEW_STAGES.len()).filter(|i| kube || !KUBE_COLUMNS.contains(i)).collect()
}

impl Chain {
    fn mark(hop: u64, s: &ChainSettings) -> Mark {
        if hop > s.error_ns {
            Mark::Error
        } else if hop > s.warn_ns {
            Mark::Warn
        } else {
            Mark::Ok
        }
    }

    /// One `StageView` per `VIEW_STAGES`.
    pub fn view(&self, s: &ChainSettings) -> [StageView; 9] {
        let mut v = [StageView::default(); 9];
        let rel = |t: u64| t.saturating_sub(self.origin_ns);
        let mut put = |i: usize, at: u64, hop: Option<u64>| {
            let e: &mut StageView = &mut v[i];
            e.at_ns = Some(e.at_ns.map_or(rel(at), |a| a.max(rel(at))));
            if let Some(h) = hop {
                e.hop_ns = e.hop_ns.max(h);
                e.mark = e.mark.max(Self::mark(h, s));
            }
        };
        let commit = (self.commit_ns != 0).then_some(self.commit_ns);
        // (watch id, send time), sorted: a dispatch finds its watch id's
        // latest earlier send by binary search, not a pass over every send.
        let mut sent_at: Vec<(i64, u64)> = self.sends.iter().map(|x| (x.watch_id, x.at_ns)).collect();
        sent_at.sort_unstable();
        for send in &self.sends {
            let enq = (send.enqueue_ns != 0).then_some(send.enqueue_ns);
            if let Some(e) = enq {
                put(0, e, commit.map(|c| e.saturating_sub(c)));
            }
            put(1, send.at_ns, enq.or(commit).map(|p| send.at_ns.saturating_sub(p)));
        }
        for d in &self.dispatches {
            // The hop into dispatch starts at the send of the same watch id
            // that preceded it (the server's side of this copy), else at the
            // commit.
            let after = sent_at.partition_point(|&x| x <= (d.watch_id, d.at_ns));
            let sent = after
                .checked_sub(1)
                .and_then(|i| sent_at.get(i))
                .filter(|(w, _)| *w == d.watch_id)
                .map(|(_, at)| *at)
                .or(commit);
            put(2, d.at_ns, sent.map(|p| d.at_ns.saturating_sub(p)));
            if let Some(w) = d.window {
                put(HANDLER, w.end_ns, Some(w.end_ns.saturating_sub(w.start_ns)));
            }
        }
        // Each Kubernetes hop starts at the latest earlier hop it follows
        // from (in the same process where the path stays in one), else at
        // the commit. A write is not tied to one watcher (the handler's
        // goroutine is not the cacher's), so it starts at the process's
        // latest result-channel send before it: never longer than it was.
        let latest = |kind: KubeKind, tgid: Option<u32>, before: u64| {
            self.kube
                .iter()
                .filter(|h| h.kind == kind && tgid.is_none_or(|t| h.tgid == t) && h.at_ns <= before)
                .map(|h| h.at_ns)
                .max()
        };
        for h in &self.kube {
            let Some(column) = h.kind.column() else { continue };
            let (at, me) = (h.at_ns, Some(h.tgid));
            let from = match h.kind {
                KubeKind::Offer => None,
                KubeKind::Cache => {
                    self.dispatches.iter().filter(|d| d.stream.0 == h.tgid && d.at_ns <= at).map(|d| d.at_ns).max()
                }
                KubeKind::Watcher => latest(KubeKind::Cache, me, at),
                KubeKind::Write => latest(KubeKind::Watcher, me, at).or_else(|| latest(KubeKind::Cache, me, at)),
                KubeKind::Decode => latest(KubeKind::Write, None, at)
                    .or_else(|| latest(KubeKind::Watcher, None, at))
                    .or_else(|| latest(KubeKind::Cache, None, at)),
                KubeKind::Process => latest(KubeKind::Decode, me, at),
                KubeKind::Handler => latest(KubeKind::Process, me, at),
            }
            .or(commit);
            put(column, at, from.map(|f| at.saturating_sub(f)));
            // The handler's own work, as an etcd client's dispatch window.
            if let Some(w) = h.window {
                put(HANDLER, w.end_ns, Some(w.end_ns.saturating_sub(w.start_ns)));
            }
        }
        for m in &self.missing {
            v[m.column].mark = Mark::Broken;
        }
        v
    }

    /// Watchers the event went to on this node: etcd's sends and an API
    /// server's result channels.
    pub fn watchers(&self) -> usize {
        self.sends.len() + self.kube.iter().filter(|h| h.kind == KubeKind::Watcher).count()
    }

    /// Clients that received it on this node: etcd client streams that
    /// dispatched it, and client-go processes that decoded it.
    pub fn clients(&self) -> usize {
        let streams: BTreeSet<Stream> = self.dispatches.iter().map(|d| d.stream).collect();
        let decoders: BTreeSet<u32> = self.kube.iter().filter(|h| h.kind == KubeKind::Decode).map(|h| h.tgid).collect();
        streams.len() + decoders.len()
    }

    /// Worst mark over the whole chain.
    pub fn worst(&self, s: &ChainSettings) -> Mark {
        self.view(s).iter().map(|v| v.mark).max().unwrap_or_default()
    }

    /// Time from origin to the last stage reached.
    pub fn span_ns(&self) -> u64 {
        let last = self
            .sends
            .iter()
            .map(|x| x.at_ns)
            .chain(self.dispatches.iter().map(|d| d.window.map_or(d.at_ns, |w| w.end_ns.max(d.at_ns))))
            .chain(self.kube.iter().map(|h| h.window.map_or(h.at_ns, |w| w.end_ns.max(h.at_ns))))
            .max()
            .unwrap_or(self.origin_ns);
        last.saturating_sub(self.origin_ns)
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ChainCounts {
    pub complete: u64,
    pub slow: u64,
    pub broken: u64,
    /// Pending chains dropped unjudged at the cap.
    pub evicted: u64,
    /// Records of chains already judged.
    pub late: u64,
    /// Windows dropped while waiting for their dispatch record.
    pub windows_evicted: u64,
    /// Sends or dispatches past a chain's MAX_HOPS (counted, not kept).
    pub hops_dropped: u64,
    /// Judged chains whose commit this node did not see (etcd runs on
    /// another node): they begin at the first stage seen here.
    pub elsewhere: u64,
    /// Chains waiting to be judged, and the bytes of the hops they hold,
    /// when counted.
    pub pending: usize,
    pub hop_bytes: usize,
}

impl ChainCounts {
    pub fn get(&self, o: Outcome) -> u64 {
        match o {
            Outcome::Complete => self.complete,
            Outcome::Slow => self.slow,
            Outcome::Broken => self.broken,
        }
    }
}

/// Maxima seen in the records (the histograms only know buckets).
#[derive(Clone, Debug, Default)]
pub struct RecordMax {
    pub stages: [u64; Stage::COUNT as usize],
    /// Per window index.
    pub windows: BTreeMap<u32, u64>,
}

struct Pending {
    chain: Chain,
    deadline: u64,
    /// Who sent the event under each watch id, for pairing dispatches.
    senders: Senders,
}

/// The one server stream that sent a chain's event under a watch id, or
/// none once two streams did: what a dispatch pairs with. A small chain
/// scans its sends; past `Senders::INDEX_FROM` sends the chain keeps an
/// index, so that a chain of 1,000 watchers does not scan 1,000 sends for
/// each of its 1,000 dispatches. (An index in every chain cost `bench
/// etcd`'s agent 6 MB: 30,000 chains of one watcher wait at once; boxed,
/// the field is one word in each, the size of a `HashMap` six.)
#[derive(Default)]
#[expect(clippy::box_collection, reason = "one word in every pending chain instead of six")]
struct Senders(Option<Box<HashMap<i64, Option<Stream>>>>);

impl Senders {
    const INDEX_FROM: usize = 16;

    /// Notes a send kept in `sends` (the send just pushed is the last).
    fn sent(&mut self, sends: &[SendHop]) {
        let note = |m: &mut HashMap<i64, Option<Stream>>, s: &SendHop| {
            m.entry(s.watch_id).and_modify(|o| *o = o.filter(|o| *o == s.stream)).or_insert(Some(s.stream));
        };
        match &mut self.0 {
            Some(m) => {
                if let Some(s) = sends.last() {
                    note(m, s);
                }
            }
            None if sends.len() >= Self::INDEX_FROM => {
                let mut m = Box::new(HashMap::new());
                sends.iter().for_each(|s| note(&mut m, s));
                self.0 = Some(m);
            }
            None => {}
        }
    }

    /// The one stream that sent under `watch_id`, if exactly one did.
    fn only(&self, sends: &[SendHop], watch_id: i64) -> Option<Stream> {
        match &self.0 {
            Some(m) => m.get(&watch_id).copied().flatten(),
            None => {
                let mut senders = sends.iter().filter(|s| s.watch_id == watch_id).map(|s| s.stream);
                let first = senders.next()?;
                senders.all(|s| s == first).then_some(first)
            }
        }
    }
}

/// Adds a hop to a chain's hops of its kind, unless it holds `MAX_HOPS`
/// already (then the hop is counted in `dropped`), and adds its size to
/// `held` (bytes); whether it was added.
/// The first hop gets room for one, not the four a `Vec` starts with: most
/// chains hold one hop of a kind (one watcher), and every chain waits its
/// timeout (at 6,700 events/s, 33,000 chains at once: Vec's four were
/// 13 MB of the agent's 74 MB).
fn push_hop<T>(hops: &mut Vec<T>, hop: T, held: &mut usize, dropped: &mut u64) -> bool {
    if hops.len() >= MAX_HOPS {
        *dropped += 1;
        return false;
    }
    let room = hops.capacity();
    if room == 0 {
        hops.reserve_exact(1);
    }
    hops.push(hop);
    // What the vector holds, grown room included (up to twice its hops).
    *held += (hops.capacity() - room) * size_of::<T>();
    true
}

/// The bytes a chain's hops hold (their vectors' room).
fn chain_hop_bytes(c: &Chain) -> usize {
    c.sends.capacity() * size_of::<SendHop>()
        + c.dispatches.capacity() * size_of::<DispatchHop>()
        + c.kube.capacity() * size_of::<KubeHop>()
}

/// A dispatch waiting for its window: (dispatch time, member, rev, index
/// in the chain's dispatches). Ordered by time first, so that a window
/// takes the range it spans.
type Awaiting = (u64, u64, i64, usize);

pub struct Chains {
    settings: ChainSettings,
    /// Boxed: a table with inserts and removes all the time holds two to
    /// four buckets per live entry (hashbrown grows rather than reuse its
    /// removed slots while over half full), and a chain inline is 168
    /// bytes: 33,000 chains waiting at 6,700 events/s took 22 MB of
    /// buckets, and 33 MB while the table grew.
    pending: HashMap<(u64, i64), Box<Pending>>,
    /// Bytes of the hops the pending chains hold (at most `max_hop_bytes`,
    /// but for the hops of the one chain a record adds to).
    hop_bytes: usize,
    /// Pending keys by deadline (deadline, key): judged and evicted in order.
    order: BTreeMap<(u64, u64, i64), ()>,
    judged: HashSet<(u64, i64)>,
    judged_order: VecDeque<(u64, i64)>,
    /// server stream → client stream, learned from joined events.
    pairs: HashMap<Stream, Stream>,
    /// API server watchers (API server, watcher address) the API server
    /// terminated for being unresponsive: the events offered to them that
    /// they never sent are lost. Looked up per offer when a chain is
    /// judged; `terminated_order` bounds it, oldest out first.
    terminated: HashSet<(u32, i64)>,
    terminated_order: VecDeque<(u32, i64)>,
    /// Revision → the member of its chain (pending or judged), for records
    /// that know only the revision (the Kubernetes path). One cluster per
    /// node, as in the kernel.
    by_rev: HashMap<i64, u64>,
    orphan_windows: VecDeque<(Stream, WindowSpan)>,
    /// Dispatches still waiting for their window, by the dispatching stream,
    /// ordered by time: (dispatch time, member, rev). A window takes the
    /// range it spans, so each record costs O(log n), not a pass over every
    /// pending chain (that pass cost the agent 38 % of a core at 2,500
    /// events/s in `cargo xtask bench etcd`).
    awaiting_window: HashMap<Stream, BTreeSet<Awaiting>>,
    /// Per informer listener goroutine, its latest handler call in a
    /// pending chain: (start, chain key). At most one per goroutine, gone
    /// when the chain is judged.
    handler_calls: HashMap<Stream, (u64, (u64, i64))>,
    counts: ChainCounts,
    /// The worst judged chains (at most `settings.keep`).
    kept: Vec<Chain>,
    max: RecordMax,
    /// Records that would start a new chain are ignored (a recording ended).
    closed: bool,
}

impl Chains {
    pub fn new(settings: ChainSettings) -> Self {
        Self {
            settings,
            pending: HashMap::new(),
            hop_bytes: 0,
            order: BTreeMap::new(),
            judged: HashSet::new(),
            judged_order: VecDeque::new(),
            pairs: HashMap::new(),
            by_rev: HashMap::new(),
            terminated: HashSet::new(),
            terminated_order: VecDeque::new(),
            orphan_windows: VecDeque::new(),
            awaiting_window: HashMap::new(),
            handler_calls: HashMap::new(),
            counts: ChainCounts::default(),
            kept: Vec::new(),
            max: RecordMax::default(),
            closed: false,
        }
    }

    pub fn settings(&self) -> &ChainSettings {
        &self.settings
    }

    /// The counts so far, with the chains and hops held now.
    pub fn counts(&self) -> ChainCounts {
        ChainCounts { pending: self.pending.len(), hop_bytes: self.hop_bytes, ..self.counts }
    }

    pub fn record_max(&self) -> &RecordMax {
        &self.max
    }

    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// The worst judged chains, worst first.
    pub fn kept(&self) -> Vec<Chain> {
        let mut k = self.kept.clone();
        self.sort_worst_first(&mut k);
        k
    }

    fn sort_worst_first(&self, v: &mut [Chain]) {
        let s = self.settings;
        v.sort_by(|a, b| {
            (b.outcome, b.worst(&s), b.span_ns(), a.rev).cmp(&(a.outcome, a.worst(&s), a.span_ns(), b.rev))
        });
    }

    /// Stops new chains from starting (records of pending ones still join).
    pub fn close(&mut self) {
        self.closed = true;
    }

    /// One record of `WS_WATCH_RECORDS`.
    pub fn on_watch(&mut self, r: &WatchRecord) {
        if r.side == Side::ApiserverTerminated as u32 {
            // About a watcher, not one event.
            let w = (r.tgid, r.watch_id);
            if self.terminated.insert(w) {
                self.terminated_order.push_back(w);
                if self.terminated_order.len() > MAX_PAIRS
                    && let Some(old) = self.terminated_order.pop_front()
                {
                    self.terminated.remove(&old);
                }
            }
            return;
        }
        let kube = KubeKind::of(r.side);
        // A Kubernetes hop joins the chain of its revision, whichever etcd
        // member it came through; without one (etcd runs on another node)
        // it starts a chain of its own at the first stage seen here.
        let member = match kube {
            Some(_) => self.by_rev.get(&r.rev).copied().unwrap_or(r.member),
            None => r.member,
        };
        let key = (member, r.rev);
        if !self.closed {
            self.note_max(r);
        }
        if self.judged.contains(&key) {
            self.counts.late += 1;
            return;
        }
        if !self.pending.contains_key(&key) {
            if self.closed {
                return;
            }
            if self.pending.len() >= self.settings.max_pending.max(1) {
                self.evict_oldest();
            }
            let origin = if r.commit_ns != 0 { r.commit_ns } else { r.at_ns };
            let deadline = origin.saturating_add(self.settings.timeout_ns);
            let chain = Chain {
                member,
                rev: r.rev,
                commit_ns: r.commit_ns,
                origin_ns: origin,
                sends: Vec::new(),
                dispatches: Vec::new(),
                kube: Vec::new(),
                missing: Vec::new(),
                outcome: Outcome::Complete,
            };
            self.pending.insert(key, Box::new(Pending { chain, deadline, senders: Senders::default() }));
            self.by_rev.entry(r.rev).or_insert(member);
            self.order.insert((deadline, key.0, key.1), ());
        }
        // Room for the hop this record adds: older chains go first, never
        // the one it joins.
        while self.hop_bytes >= self.settings.max_hop_bytes && self.evict_oldest_but(key) {}
        let Some(p) = self.pending.get_mut(&key) else { return };
        let senders = &mut p.senders;
        let c = &mut p.chain;
        if c.commit_ns == 0 && r.commit_ns != 0 {
            // A later record saw the commit: show stages relative to it. The
            // deadline stays: it only ever moves later by waiting.
            c.commit_ns = r.commit_ns;
            c.origin_ns = c.origin_ns.min(r.commit_ns);
        }
        let stream = (r.tgid, r.g);
        if let Some(kind) = kube {
            let hop = KubeHop { kind, tgid: r.tgid, g: r.g, watcher: r.watch_id, at_ns: r.at_ns, window: None };
            if push_hop(&mut c.kube, hop, &mut self.hop_bytes, &mut self.counts.hops_dropped) {
                // The latest handler call on its goroutine: a user window
                // that starts on it from now on ran inside this call
                // (a listener runs its handlers one after another).
                if kind == KubeKind::Handler
                    && r.g != 0
                    && self.handler_calls.get(&stream).is_none_or(|(at, _)| *at <= r.at_ns)
                {
                    self.handler_calls.insert(stream, (r.at_ns, key));
                }
            }
            return;
        }
        if r.side == Side::Server as u32 {
            let hop = SendHop { stream, watch_id: r.watch_id, enqueue_ns: r.enqueue_ns, at_ns: r.at_ns };
            if push_hop(&mut c.sends, hop, &mut self.hop_bytes, &mut self.counts.hops_dropped) {
                senders.sent(&c.sends);
            }
            return;
        }
        // A client dispatch: pair the streams when one server stream alone
        // sent this (rev, watch id). A server whose records carry no
        // goroutine (g 0: a stack-ABI build, g in thread-local storage)
        // cannot tell its streams apart, so none of them is ever paired:
        // pairing would expect this client's dispatches from the server's
        // other streams too, and judge their chains broken wrongly.
        if let Some(first) = senders.only(&c.sends, r.watch_id)
            && first.1 != 0
            && (self.pairs.len() < MAX_PAIRS || self.pairs.contains_key(&first))
        {
            self.pairs.insert(first, stream);
        }
        let window = find_window(&self.orphan_windows, stream, r.at_ns);
        let index = c.dispatches.len();
        let hop = DispatchHop { stream, watch_id: r.watch_id, at_ns: r.at_ns, window };
        if push_hop(&mut c.dispatches, hop, &mut self.hop_bytes, &mut self.counts.hops_dropped) && window.is_none() {
            self.awaiting_window.entry(stream).or_default().insert((r.at_ns, key.0, key.1, index));
        }
    }

    /// One record of `WS_WINDOW_RECORDS`.
    pub fn on_window(&mut self, w: &WindowRecord) {
        let d = w.end_ns.saturating_sub(w.start_ns);
        let m = self.max.windows.entry(w.window).or_default();
        *m = (*m).max(d);
        let stream = (w.tgid, w.g);
        let span = WindowSpan { start_ns: w.start_ns, end_ns: w.end_ns, inner: w.inner };
        if w.window != DISPATCH_WINDOW {
            self.join_handler_window(stream, span);
            return;
        }
        // Its dispatches may already be in pending chains (the usual order).
        // A window that ends before it starts (a corrupt record: the kernel
        // stamps both with one monotonic clock) contains no dispatch, and
        // must not reach `range`, which panics on an inverted range.
        let mut joined = false;
        let inside: Vec<Awaiting> = self
            .awaiting_window
            .get(&stream)
            .filter(|_| span.start_ns <= span.end_ns)
            .map(|set| {
                set.range((span.start_ns, 0, i64::MIN, 0)..=(span.end_ns, u64::MAX, i64::MAX, usize::MAX))
                    .copied()
                    .collect()
            })
            .unwrap_or_default();
        for entry @ (at, m, r, index) in inside {
            if let Some(d) = self.pending.get_mut(&(m, r)).and_then(|p| p.chain.dispatches.get_mut(index))
                && d.window.is_none()
                && d.stream == stream
                && d.at_ns == at
            {
                d.window = Some(span);
                joined = true;
            }
            self.forget_awaiting(stream, entry);
        }
        if !joined {
            if self.orphan_windows.len() >= MAX_ORPHAN_WINDOWS {
                self.orphan_windows.pop_front();
                self.counts.windows_evicted += 1;
            }
            self.orphan_windows.push_back((stream, span));
        }
    }

    /// A user window joins the informer handler call it ran in: the latest
    /// handler hop on its goroutine that started before it.
    fn join_handler_window(&mut self, stream: Stream, span: WindowSpan) {
        let Some(&(at, key)) = self.handler_calls.get(&stream) else { return };
        if at > span.start_ns || span.start_ns > span.end_ns {
            return;
        }
        let Some(p) = self.pending.get_mut(&key) else { return };
        let len = |w: &WindowSpan| w.end_ns - w.start_ns;
        for h in
            p.chain.kube.iter_mut().filter(|h| h.kind == KubeKind::Handler && (h.tgid, h.g) == stream && h.at_ns == at)
        {
            if h.window.is_none_or(|w| len(&w) < len(&span)) {
                h.window = Some(span);
            }
        }
    }

    fn note_max(&mut self, r: &WatchRecord) {
        let m = &mut self.max.stages;
        let mut put = |s: Stage, from: u64, to: u64| {
            if from != 0 && to >= from {
                let i = s as usize;
                m[i] = m[i].max(to - from);
            }
        };
        if let Some(kind) = KubeKind::of(r.side) {
            if let Some(s) = kind.stage() {
                put(s, r.commit_ns, r.at_ns);
            }
            if let Some(s) = kind.hop_stage() {
                put(s, r.enqueue_ns, r.at_ns);
            }
        } else if r.side == Side::Server as u32 {
            put(Stage::CommitToEnqueue, r.commit_ns, r.enqueue_ns);
            put(Stage::EnqueueToSend, r.enqueue_ns, r.at_ns);
            put(Stage::CommitToSend, r.commit_ns, r.at_ns);
        } else {
            put(Stage::CommitToDispatch, r.commit_ns, r.at_ns);
        }
    }

    /// Judges every chain whose deadline passed. `alive` says whether a
    /// client process still exists (a dead one's pairings are dropped and
    /// expect nothing).
    pub fn expire(&mut self, now_ns: u64, alive: &dyn Fn(u32) -> bool) {
        if self.order.keys().next().is_some_and(|&(deadline, _, _)| deadline <= now_ns) {
            self.forget_dead_clients(alive);
        }
        while let Some((&(deadline, m, r), _)) = self.order.iter().next() {
            if deadline > now_ns {
                break;
            }
            self.order.remove(&(deadline, m, r));
            if let Some(p) = self.take_pending((m, r)) {
                self.judge(*p);
            }
        }
        // Windows older than any chain could still wait for.
        let horizon = now_ns.saturating_sub(self.settings.timeout_ns.saturating_mul(2));
        while self.orphan_windows.front().is_some_and(|(_, w)| w.end_ns < horizon) {
            self.orphan_windows.pop_front();
        }
    }

    /// At the end of a recording: judges at once every pending chain that
    /// has all it expects (a later record could still only make it slower),
    /// and returns how many still wait for an expected dispatch.
    pub fn finish_ready(&mut self, alive: &dyn Fn(u32) -> bool) -> usize {
        self.forget_dead_clients(alive);
        let ready: Vec<(u64, i64)> =
            self.pending.iter().filter(|(_, p)| self.missing(&p.chain).is_empty()).map(|(k, _)| *k).collect();
        for key in ready {
            if let Some(p) = self.take_pending(key) {
                self.order.remove(&(p.deadline, key.0, key.1));
                self.judge(*p);
            }
        }
        self.pending.len()
    }

    /// Drops the pairings of client processes that exited. Once per call,
    /// not once per chain, and once per process, not per pairing: each check
    /// is a /proc lookup, and 50 clients of 20 watches each are 1,000
    /// pairings (the long soak's drains spent 15–25 ms here).
    fn forget_dead_clients(&mut self, alive: &dyn Fn(u32) -> bool) {
        let mut known: HashMap<u32, bool> = HashMap::new();
        self.pairs.retain(|_, client| *known.entry(client.0).or_insert_with(|| alive(client.0)));
    }

    /// Expected dispatches that did not arrive. The pairings of dead clients
    /// were dropped by the caller (`expire`, `finish_ready`).
    fn missing(&self, c: &Chain) -> Vec<Missing> {
        // Expected dispatches per (client stream, watch id), and those seen.
        let mut want: BTreeMap<(Stream, i64), i64> = BTreeMap::new();
        for s in &c.sends {
            if let Some(client) = self.pairs.get(&s.stream) {
                *want.entry((*client, s.watch_id)).or_default() += 1;
            }
        }
        for d in &c.dispatches {
            if let Some(n) = want.get_mut(&(d.stream, d.watch_id)) {
                *n -= 1;
            }
        }
        let mut missing: Vec<Missing> = want
            .into_iter()
            .filter(|(_, n)| *n > 0)
            .map(|((client, watch_id), n)| Missing { client, watch_id, count: n as u32, column: DISPATCH })
            .collect();
        // An API server watcher it terminated: the events offered to it that
        // never reached its result channel. (A watcher whose filter rejects
        // an event is offered it too, and never sends it: only a terminated
        // one counts.)
        let sent: BTreeSet<(u32, i64)> =
            c.kube.iter().filter(|h| h.kind == KubeKind::Watcher).map(|h| (h.tgid, h.watcher)).collect();
        let lost: BTreeSet<(u32, i64)> = c
            .kube
            .iter()
            .filter(|h| h.kind == KubeKind::Offer)
            .map(|h| (h.tgid, h.watcher))
            .filter(|w| !sent.contains(w) && self.terminated.contains(w))
            .collect();
        missing.extend(lost.into_iter().map(|(tgid, w)| Missing {
            client: (tgid, 0),
            watch_id: w,
            count: 1,
            column: WATCHER,
        }));
        missing
    }

    fn judge(&mut self, p: Pending) {
        let mut c = p.chain;
        self.forget_windows(&c);
        c.missing = self.missing(&c);
        c.outcome = if !c.missing.is_empty() {
            Outcome::Broken
        } else if c.worst(&self.settings) >= Mark::Warn {
            Outcome::Slow
        } else {
            Outcome::Complete
        };
        match c.outcome {
            Outcome::Complete => self.counts.complete += 1,
            Outcome::Slow => self.counts.slow += 1,
            Outcome::Broken => self.counts.broken += 1,
        }
        if c.commit_ns == 0 {
            self.counts.elsewhere += 1;
        }
        let key = (c.member, c.rev);
        if self.judged.insert(key) {
            self.judged_order.push_back(key);
            if self.judged_order.len() > MAX_JUDGED
                && let Some(old) = self.judged_order.pop_front()
            {
                self.judged.remove(&old);
                self.forget_rev(old);
            }
        }
        if self.settings.keep > 0 {
            self.kept.push(c);
            if self.kept.len() >= 2 * self.settings.keep {
                let mut k = std::mem::take(&mut self.kept);
                self.sort_worst_first(&mut k);
                k.truncate(self.settings.keep);
                self.kept = k;
            }
        }
    }

    fn evict_oldest(&mut self) {
        if let Some(&(d, m, r)) = self.order.keys().next() {
            self.evict((d, m, r));
        }
    }

    /// Evicts the oldest pending chain other than `key`'s; whether there
    /// was one.
    fn evict_oldest_but(&mut self, key: (u64, i64)) -> bool {
        match self.order.keys().find(|&&(_, m, r)| (m, r) != key) {
            Some(&oldest) => {
                self.evict(oldest);
                true
            }
            None => false,
        }
    }

    /// Drops a pending chain unjudged, by its `order` entry.
    fn evict(&mut self, (d, m, r): (u64, u64, i64)) {
        self.order.remove(&(d, m, r));
        if let Some(p) = self.take_pending((m, r)) {
            self.forget_windows(&p.chain);
        }
        self.forget_rev((m, r));
        self.counts.evicted += 1;
    }

    /// Removes a pending chain, and its hops from those held.
    fn take_pending(&mut self, key: (u64, i64)) -> Option<Box<Pending>> {
        let p = self.pending.remove(&key)?;
        self.hop_bytes = self.hop_bytes.saturating_sub(chain_hop_bytes(&p.chain));
        Some(p)
    }

    fn forget_rev(&mut self, (member, rev): (u64, i64)) {
        if self.by_rev.get(&rev) == Some(&member) {
            self.by_rev.remove(&rev);
        }
    }

    /// A chain leaves: its dispatches and handler calls no longer wait for
    /// a window.
    fn forget_windows(&mut self, c: &Chain) {
        for (index, d) in c.dispatches.iter().enumerate().filter(|(_, d)| d.window.is_none()) {
            self.forget_awaiting(d.stream, (d.at_ns, c.member, c.rev, index));
        }
        for h in c.kube.iter().filter(|h| h.kind == KubeKind::Handler) {
            let stream = (h.tgid, h.g);
            if self.handler_calls.get(&stream).is_some_and(|(_, key)| *key == (c.member, c.rev)) {
                self.handler_calls.remove(&stream);
            }
        }
    }

    fn forget_awaiting(&mut self, stream: Stream, entry: Awaiting) {
        if let Some(set) = self.awaiting_window.get_mut(&stream) {
            set.remove(&entry);
            if set.is_empty() {
                self.awaiting_window.remove(&stream);
            }
        }
    }
}

/// The window of `stream` that contains `at`, among those that arrived
/// before their dispatch record (one window holds every event of a response).
fn find_window(orphans: &VecDeque<(Stream, WindowSpan)>, stream: Stream, at: u64) -> Option<WindowSpan> {
    let i = orphans.iter().position(|(s, w)| *s == stream && w.start_ns <= at && at <= w.end_ns)?;
    orphans.get(i).map(|(_, w)| *w)
}

/// CLOCK_MONOTONIC now, in nanoseconds: the clock of `bpf_ktime_get_ns`.
pub fn monotonic_now_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64).saturating_mul(1_000_000_000).saturating_add(ts.tv_nsec as u64)
}

/// Whether a process exists (in this pid namespace's /proc).
pub fn process_alive(tgid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{tgid}")).exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;
    const M: u64 = 0xabc;
    const SERVER: Stream = (100, 0x1000);
    const CLIENT: Stream = (200, 0x2000);

    fn send(stream: Stream, rev: i64, watch_id: i64, commit: u64, enq: u64, at: u64) -> WatchRecord {
        WatchRecord {
            side: Side::Server as u32,
            tgid: stream.0,
            member: M,
            rev,
            watch_id,
            commit_ns: commit,
            enqueue_ns: enq,
            at_ns: at,
            g: stream.1,
        }
    }

    fn dispatch(stream: Stream, rev: i64, watch_id: i64, commit: u64, at: u64) -> WatchRecord {
        WatchRecord {
            side: Side::Client as u32,
            tgid: stream.0,
            member: M,
            rev,
            watch_id,
            commit_ns: commit,
            enqueue_ns: 0,
            at_ns: at,
            g: stream.1,
        }
    }

    fn window(stream: Stream, start: u64, end: u64) -> WindowRecord {
        WindowRecord {
            tgid: stream.0,
            window: DISPATCH_WINDOW,
            g: stream.1,
            start_ns: start,
            end_ns: end,
            inner: [0; 5],
        }
    }

    fn settings() -> ChainSettings {
        ChainSettings { keep: 100, ..ChainSettings::default() }
    }

    const ALIVE: &dyn Fn(u32) -> bool = &|_| true;

    /// One put at `t`, sent at t+1ms, dispatched at t+2ms.
    fn event(c: &mut Chains, rev: i64, t: u64) {
        c.on_watch(&send(SERVER, rev, 0, t, t + MS / 2, t + MS));
        c.on_watch(&dispatch(CLIENT, rev, 0, t, t + 2 * MS));
    }

    /// Every event waits its timeout in the table, so what one chain of
    /// one watcher holds is what the agent's memory grows with the event
    /// rate: room for one hop of each kind seen, none of the others.
    #[test]
    fn a_chain_of_one_watcher_holds_room_for_one_hop_of_each_kind() {
        let mut c = Chains::new(settings());
        event(&mut c, 1, 10 * MS);
        let p = &c.pending[&(M, 1)];
        assert_eq!((p.chain.sends.len(), p.chain.sends.capacity()), (1, 1));
        assert_eq!((p.chain.dispatches.len(), p.chain.dispatches.capacity()), (1, 1));
        assert_eq!(p.chain.kube.capacity() + p.chain.missing.capacity(), 0);
        // A second watcher's hops still fit, at Vec's growth from there.
        c.on_watch(&send(SERVER, 1, 1, 10 * MS, 11 * MS, 12 * MS));
        assert_eq!(c.pending[&(M, 1)].chain.sends.len(), 2);
    }

    #[test]
    fn fast_events_are_complete_after_the_timeout_only() {
        let mut c = Chains::new(settings());
        for rev in 1..=10 {
            event(&mut c, rev, rev as u64 * 10 * MS);
        }
        c.expire(5_095 * MS, ALIVE);
        assert_eq!(c.counts().complete, 9, "rev 10's deadline is 5.1 s");
        c.expire(200 * MS + 5_000 * MS, ALIVE);
        assert_eq!(c.counts(), ChainCounts { complete: 10, ..ChainCounts::default() });
        let k = c.kept();
        assert_eq!(k.len(), 10);
        let v = k[0].view(c.settings());
        assert_eq!(v[0].at_ns, Some(MS / 2));
        assert_eq!(v[1].at_ns, Some(MS));
        assert_eq!(v[2].at_ns, Some(2 * MS));
        assert_eq!(v[2].hop_ns, MS, "dispatch hop starts at the send");
        assert!(v.iter().all(|s| s.mark == Mark::Ok));
    }

    #[test]
    fn a_slow_send_is_warn_and_a_very_slow_one_error() {
        let mut c = Chains::new(settings());
        c.on_watch(&send(SERVER, 1, 0, 0, MS, 150 * MS));
        c.on_watch(&send(SERVER, 2, 0, 10, 20, 2_000 * MS));
        c.expire(10_000 * MS, ALIVE);
        assert_eq!(c.counts().slow, 2);
        let k = c.kept();
        assert_eq!(k[0].rev, 2, "worst first");
        assert_eq!(k[0].view(c.settings())[1].mark, Mark::Error);
        assert_eq!(k[1].view(c.settings())[1].mark, Mark::Warn);
        assert_eq!(k[1].view(c.settings())[1].hop_ns, 149 * MS);
        assert_eq!(c.record_max().stages[Stage::EnqueueToSend as usize], 2_000 * MS - 20);
    }

    #[test]
    fn a_client_that_stops_reading_breaks_later_chains_exactly() {
        let mut c = Chains::new(settings());
        event(&mut c, 1, 0); // pairs SERVER with CLIENT
        for rev in 2..=6 {
            c.on_watch(&send(SERVER, rev, 0, rev as u64 * MS, 0, rev as u64 * MS + 10));
        }
        c.expire(4_999 * MS, ALIVE);
        assert_eq!(c.counts().broken, 0, "not before the timeout");
        c.expire(5_005 * MS, ALIVE);
        assert_eq!(c.counts().broken, 4, "revs 2..5: deadline 5.002..5.005 s");
        c.expire(7_000 * MS, ALIVE);
        // rev 1, committed at 0 here, reads as "commit not seen".
        assert_eq!(c.counts(), ChainCounts { complete: 1, broken: 5, elsewhere: 1, ..ChainCounts::default() });
        let k = c.kept();
        assert_eq!(k[0].outcome, Outcome::Broken);
        assert_eq!(k[0].missing, vec![Missing { client: CLIENT, watch_id: 0, count: 1, column: DISPATCH }]);
        assert_eq!(k[0].view(c.settings())[2].mark, Mark::Broken);
        assert_eq!(k[0].view(c.settings())[2].at_ns, None);
    }

    #[test]
    fn a_watcher_elsewhere_is_never_broken() {
        let mut c = Chains::new(settings());
        event(&mut c, 1, 0);
        // Another stream of the same server (a client on another node, or
        // the JSON gateway) with the same watch id 0: never paired.
        let remote: Stream = (100, 0x3000);
        for rev in 2..=4 {
            c.on_watch(&send(remote, rev, 0, rev as u64 * MS, 0, rev as u64 * MS + 10));
        }
        // A client on this node whose server runs elsewhere: nothing here to miss.
        c.on_watch(&WatchRecord { member: 77, ..dispatch((300, 0x4000), 9, 0, 0, 50 * MS) });
        c.expire(60_000 * MS, ALIVE);
        // rev 1 at 0 and the dispatch of rev 9, whose server runs elsewhere.
        assert_eq!(c.counts(), ChainCounts { complete: 5, elsewhere: 2, ..ChainCounts::default() });
    }

    #[test]
    fn a_server_without_goroutines_is_never_paired() {
        let mut c = Chains::new(settings());
        let coarse: Stream = (100, 0);
        // Two connections of a stack-ABI server look like one stream: the
        // client on this node dispatches, the other connection's watcher
        // never will.
        c.on_watch(&send(coarse, 1, 0, MS, MS, 2 * MS));
        c.on_watch(&dispatch(CLIENT, 1, 0, MS, 3 * MS));
        for rev in 2..=4 {
            c.on_watch(&send(coarse, rev, 0, rev as u64 * MS, 0, rev as u64 * MS + 10));
        }
        c.expire(60_000 * MS, ALIVE);
        assert_eq!(c.counts(), ChainCounts { complete: 4, ..ChainCounts::default() });
    }

    #[test]
    fn an_ambiguous_send_teaches_nothing_and_a_dead_client_expects_nothing() {
        let mut c = Chains::new(settings());
        let other: Stream = (100, 0x3000);
        // Both streams sent (rev 1, watch 0): which one reached CLIENT is unknown.
        c.on_watch(&send(SERVER, 1, 0, 1, 2, 3));
        c.on_watch(&send(other, 1, 0, 1, 2, 3));
        c.on_watch(&dispatch(CLIENT, 1, 0, 1, 5));
        c.on_watch(&send(SERVER, 2, 0, 10, 11, 12));
        c.expire(60_000 * MS, ALIVE);
        assert_eq!(c.counts().broken, 0);
        // Paired now; but the client process has exited by the deadline.
        event(&mut c, 3, 61_000 * MS);
        c.on_watch(&send(SERVER, 4, 0, 62_000 * MS, 0, 62_000 * MS + 1));
        c.expire(70_000 * MS, &|tgid| tgid != CLIENT.0);
        assert_eq!(c.counts().broken, 0);
        assert_eq!(c.counts().complete, 4);
    }

    #[test]
    fn txn_events_share_a_chain_and_count_per_copy() {
        let mut c = Chains::new(settings());
        for _ in 0..3 {
            c.on_watch(&send(SERVER, 5, 7, 1, 2, 3));
        }
        for _ in 0..3 {
            c.on_watch(&dispatch(CLIENT, 5, 7, 1, 4));
        }
        c.expire(60_000 * MS, ALIVE);
        assert_eq!(c.counts().complete, 1);
        // Next txn: 3 sends, 2 dispatches → one copy missing.
        for _ in 0..3 {
            c.on_watch(&send(SERVER, 6, 7, 70_000 * MS, 0, 70_000 * MS + 1));
        }
        c.on_watch(&dispatch(CLIENT, 6, 7, 0, 70_000 * MS + 2));
        c.on_watch(&dispatch(CLIENT, 6, 7, 0, 70_000 * MS + 2));
        c.expire(80_000 * MS, ALIVE);
        assert_eq!(c.counts().broken, 1);
        assert_eq!(c.kept()[0].missing[0].count, 1);
    }

    #[test]
    fn windows_join_whichever_ring_is_read_first() {
        let mut c = Chains::new(settings());
        // Usual order: dispatch, then its window.
        event(&mut c, 1, 0);
        c.on_window(&window(CLIENT, 2 * MS - 10, 2 * MS + 300 * MS));
        // The window ring read first: the window waits for its dispatch.
        c.on_window(&window(CLIENT, 20 * MS, 21 * MS));
        event(&mut c, 2, 18 * MS + 100); // dispatch at 20 ms + 100 ns
        // A window of another goroutine joins nothing.
        c.on_window(&window((200, 0x9999), 0, 100 * MS));
        c.expire(60_000 * MS, ALIVE);
        let k = c.kept();
        assert_eq!(k[0].rev, 1);
        assert_eq!(k[0].outcome, Outcome::Slow, "300 ms in the handler");
        let v = k[0].view(c.settings());
        assert_eq!(v[8].mark, Mark::Warn);
        assert_eq!(v[8].hop_ns, 300 * MS + 10);
        // Commit time 0 = not seen: stages are relative to the first record (the send at 1 ms).
        assert_eq!(v[8].at_ns, Some(301 * MS));
        let w2 = k[1].dispatches[0].window.expect("joined");
        assert_eq!((w2.start_ns, w2.end_ns), (20 * MS, 21 * MS));
        assert_eq!(c.record_max().windows[&DISPATCH_WINDOW], 300 * MS + 10);
    }

    #[test]
    fn a_large_chain_pairs_its_streams_as_a_small_one_does() {
        // `n` watches on one server stream, watch 0 also sent by a second
        // stream (ambiguous: it teaches nothing); the next event misses
        // one dispatch. Scanned (4 sends) or indexed (40), the same result.
        const SERVER2: Stream = (101, 0x1100);
        for n in [4, 40] {
            let mut c = Chains::new(settings());
            for w in 0..n {
                c.on_watch(&send(SERVER, 1, w, MS, 2 * MS, 3 * MS));
            }
            c.on_watch(&send(SERVER2, 1, 0, MS, 2 * MS, 3 * MS));
            for w in 0..n {
                c.on_watch(&dispatch(CLIENT, 1, w, MS, 4 * MS));
            }
            c.expire(60_000 * MS, ALIVE);
            assert_eq!(c.pairs.get(&SERVER), Some(&CLIENT), "{n} watches");
            assert!(!c.pairs.contains_key(&SERVER2), "{n} watches");
            let t = 70_000 * MS;
            for w in 0..n {
                c.on_watch(&send(SERVER, 2, w, t, t + MS, t + 2 * MS));
            }
            for w in 1..n {
                c.on_watch(&dispatch(CLIENT, 2, w, t, t + 3 * MS));
            }
            c.expire(80_000 * MS, ALIVE);
            assert_eq!((c.counts().complete, c.counts().broken), (1, 1), "{n} watches");
            let broken = c.kept().into_iter().find(|ch| ch.rev == 2).expect("judged");
            assert_eq!((broken.missing.len(), broken.missing[0].watch_id), (1, 0), "{n} watches");
        }
    }

    #[test]
    fn one_window_joins_every_copy_its_response_dispatched() {
        // A txn's three events (one revision) in one response: three
        // dispatches at the same time on one stream, then their window;
        // and the dispatch of a later response on the stream, which it does
        // not span.
        let mut c = Chains::new(settings());
        for _ in 0..3 {
            c.on_watch(&send(SERVER, 5, 7, MS, 2 * MS, 3 * MS));
            c.on_watch(&dispatch(CLIENT, 5, 7, MS, 4 * MS));
        }
        c.on_watch(&send(SERVER, 6, 7, 5 * MS, 0, 6 * MS));
        c.on_watch(&dispatch(CLIENT, 6, 7, 5 * MS, 9 * MS));
        c.on_window(&window(CLIENT, 4 * MS - 10, 8 * MS));
        c.expire(60_000 * MS, ALIVE);
        let k = c.kept();
        let txn = k.iter().find(|ch| ch.rev == 5).expect("judged");
        assert_eq!(txn.dispatches.len(), 3);
        assert!(txn.dispatches.iter().all(|d| d.window.is_some_and(|w| w.end_ns == 8 * MS)));
        let later = k.iter().find(|ch| ch.rev == 6).expect("judged");
        assert_eq!(later.dispatches[0].window, None);
        // The dispatch hop starts at the send of its watch id before it.
        assert_eq!(txn.view(c.settings())[2].hop_ns, MS);
        assert_eq!(later.view(c.settings())[2].hop_ns, 3 * MS);
    }

    #[test]
    fn a_window_that_ends_before_it_starts_joins_nothing_and_does_not_panic() {
        // Found by the `records` fuzz target: a dispatch awaiting its window,
        // then a corrupt window record of the same goroutine whose end is
        // before its start, panicked in BTreeSet::range.
        let mut c = Chains::new(settings());
        event(&mut c, 1, 0);
        c.on_window(&window(CLIENT, 3 * MS, MS));
        c.expire(60_000 * MS, ALIVE);
        let k = c.kept();
        assert_eq!(k.len(), 1);
        assert_eq!(k[0].dispatches[0].window, None);
        assert_eq!(c.record_max().windows[&DISPATCH_WINDOW], 0);
    }

    #[test]
    fn pending_chains_are_capped_and_evictions_counted() {
        let mut c = Chains::new(ChainSettings { max_pending: 3, ..settings() });
        for rev in 1..=5 {
            event(&mut c, rev, rev as u64 * MS);
        }
        assert_eq!(c.pending(), 3);
        assert_eq!(c.counts().evicted, 2);
        c.expire(u64::MAX, ALIVE);
        assert_eq!(c.counts().complete, 3);
        assert_eq!(c.kept().iter().map(|k| k.rev).min(), Some(3), "the oldest went first");
    }

    /// An event sent to many watchers holds a hop per watcher: the bytes of
    /// hops held in all are capped, the oldest chains go first (counted), and
    /// the chain a record joins is never the one evicted for it.
    #[test]
    fn the_hops_all_chains_hold_are_capped_oldest_chain_first() {
        const SEND: usize = size_of::<SendHop>();
        let mut c = Chains::new(ChainSettings { max_hop_bytes: 100 * SEND, ..settings() });
        // Ten events of 30 watchers each: 300 sends.
        for rev in 1..=10 {
            let t = rev as u64 * MS;
            for w in 0..30 {
                c.on_watch(&send(SERVER, rev, w, t, t, t + MS));
            }
        }
        // The count is the room the vectors hold, grown room included, and
        // stays under the cap but for the last growth; the oldest chains went.
        let held: usize = c.pending.values().map(|p| chain_hop_bytes(&p.chain)).sum();
        assert_eq!(c.counts().hop_bytes, held);
        assert!(held <= 100 * SEND + 32 * SEND, "{held}");
        assert!((6..10).contains(&c.counts().evicted), "{:?}", c.counts());
        assert_eq!(c.pending() as u64 + c.counts().evicted, 10);
        assert!(c.pending.keys().all(|&(_, rev)| rev as u64 > c.counts().evicted), "oldest first");
        assert_eq!(c.counts().hops_dropped, 0);
        assert!(c.pending.contains_key(&(M, 10)), "the newest chain stays");
        assert_eq!(c.pending[&(M, 10)].chain.sends.len(), 30, "and keeps every hop");
        c.expire(u64::MAX, ALIVE);
        assert_eq!(c.counts().hop_bytes, 0);
        assert_eq!(c.counts().complete + c.counts().evicted, 10);
        // One chain larger than the cap alone still takes every hop (up
        // to MAX_HOPS): there is nothing older to evict.
        let mut c = Chains::new(ChainSettings { max_hop_bytes: 10 * SEND, ..settings() });
        for w in 0..50 {
            c.on_watch(&send(SERVER, 1, w, MS, MS, 2 * MS));
        }
        assert_eq!((c.counts().hop_bytes, c.counts().evicted), (c.pending[&(M, 1)].chain.sends.capacity() * SEND, 0));
    }

    #[test]
    fn late_records_do_not_start_a_second_chain_and_closing_stops_new_ones() {
        let mut c = Chains::new(settings());
        event(&mut c, 1, 0);
        c.expire(10_000 * MS, ALIVE);
        c.on_watch(&send((100, 0x5), 1, 0, 0, 0, 9_000 * MS));
        assert_eq!(c.counts().late, 1);
        assert_eq!(c.pending(), 0);
        c.close();
        event(&mut c, 2, 20_000 * MS);
        assert_eq!(c.pending(), 0);
    }

    #[test]
    fn finish_ready_judges_what_has_all_it_expects() {
        let mut c = Chains::new(settings());
        event(&mut c, 1, 0);
        event(&mut c, 2, MS);
        c.on_watch(&send(SERVER, 3, 0, 2 * MS, 0, 2 * MS + 5));
        assert_eq!(c.finish_ready(ALIVE), 1, "rev 3 still waits for CLIENT");
        assert_eq!(c.counts().complete, 2);
        c.expire(u64::MAX, ALIVE);
        assert_eq!(c.counts().broken, 1);
    }

    /// A Kubernetes hop's record: the revision only (member 0).
    fn hop(side: Side, tgid: u32, rev: i64, commit: u64, at: u64) -> WatchRecord {
        WatchRecord {
            side: side as u32,
            tgid,
            member: 0,
            rev,
            watch_id: 0,
            commit_ns: commit,
            enqueue_ns: 0,
            at_ns: at,
            g: 0,
        }
    }

    #[test]
    fn the_kubernetes_path_joins_the_etcd_chain_of_its_revision() {
        const API: u32 = 300;
        const OP: u32 = 400;
        let mut c = Chains::new(settings());
        // etcd sends to the API server's etcd client, which dispatches.
        c.on_watch(&send(SERVER, 7, 0, 0, MS / 2, MS));
        c.on_watch(&dispatch((API, 0x30), 7, 0, 0, 2 * MS));
        c.on_watch(&hop(Side::ApiserverCache, API, 7, 0, 3 * MS));
        c.on_watch(&hop(Side::ApiserverWatcher, API, 7, 0, 4 * MS));
        c.on_watch(&hop(Side::ApiserverWatcher, API, 7, 0, 4 * MS + 10));
        c.on_watch(&hop(Side::ApiserverWritten, API, 7, 0, 5 * MS));
        // The second watcher's client stopped reading: its write is late.
        c.on_watch(&hop(Side::ApiserverWritten, API, 7, 0, 1_500 * MS));
        c.on_watch(&hop(Side::Informer, OP, 7, 0, 6 * MS));
        c.on_watch(&hop(Side::InformerProcessed, OP, 7, 0, 7 * MS));
        c.on_watch(&hop(Side::InformerHandled, OP, 7, 0, 8 * MS));
        assert_eq!(c.pending(), 1, "one chain for the revision");
        c.expire(u64::MAX, ALIVE);
        let k = c.kept();
        assert_eq!(k.len(), 1);
        let ch = &k[0];
        assert_eq!((ch.member, ch.outcome), (M, Outcome::Slow));
        assert_eq!((ch.watchers(), ch.clients()), (1 + 2, 1 + 1), "etcd's send and two result channels; two clients");
        let v = ch.view(&settings());
        // No commit seen: times are relative to the first record (the send at 1 ms).
        let at = |i: usize| v[i].at_ns.map(|t| t + MS);
        assert_eq!(at(3), Some(3 * MS), "cache");
        assert_eq!(at(4), Some(4 * MS + 10), "the latest watcher");
        assert_eq!((at(5), v[5].mark), (Some(1_500 * MS), Mark::Error), "the late write, from its result channel");
        assert_eq!(v[5].hop_ns, 1_500 * MS - (4 * MS + 10));
        assert_eq!((at(6), at(7), at(8)), (Some(6 * MS), Some(7 * MS), Some(8 * MS)));
        // The decode follows the latest write before it, not the late one.
        assert_eq!(v[6].hop_ns, MS);
        assert_eq!(view_columns(&[ch]).len(), 9);
        assert_eq!(c.record_max().stages[Stage::CommitToWrite as usize], 0, "no commit time in these records");
    }

    #[test]
    fn a_revision_committed_on_another_node_starts_at_the_api_server() {
        let mut c = Chains::new(settings());
        c.on_watch(&hop(Side::ApiserverCache, 300, 9, 0, 10 * MS));
        c.on_watch(&hop(Side::ApiserverWatcher, 300, 9, 0, 11 * MS));
        c.expire(u64::MAX, ALIVE);
        let k = c.kept();
        assert_eq!((k.len(), k[0].member, k[0].origin_ns, k[0].outcome), (1, 0, 10 * MS, Outcome::Complete));
        assert_eq!(c.counts().elsewhere, 1, "counted as begun elsewhere");
        // A late record of it joins no second chain.
        c.on_watch(&hop(Side::Informer, 400, 9, 0, 12 * MS));
        assert_eq!((c.pending(), c.counts().late), (0, 1));
        // etcd-only chains keep etcd's columns.
        let mut e = Chains::new(settings());
        event(&mut e, 1, 0);
        e.expire(u64::MAX, ALIVE);
        assert_eq!(view_columns(&[&e.kept()[0]]), vec![0, 1, 2, 8]);
    }

    #[test]
    fn an_event_offered_to_a_watcher_the_api_server_terminated_breaks_its_chain() {
        const API: u32 = 300;
        let offer =
            |rev: i64, w: i64, at: u64| WatchRecord { watch_id: w, ..hop(Side::ApiserverOffered, API, rev, 0, at) };
        let sent =
            |rev: i64, w: i64, at: u64| WatchRecord { watch_id: w, ..hop(Side::ApiserverWatcher, API, rev, 0, at) };
        let mut c = Chains::new(settings());
        for rev in [1, 2] {
            let t = rev as u64 * MS;
            c.on_watch(&hop(Side::ApiserverCache, API, rev, 0, t));
            // Three watchers offered the event: 0xa sends it, 0xb filters
            // it out (never sends), 0xc is stuck and is terminated.
            for w in [0xa, 0xb, 0xc] {
                c.on_watch(&offer(rev, w, t + 1));
            }
            c.on_watch(&sent(rev, 0xa, t + 2));
        }
        c.on_watch(&WatchRecord { watch_id: 0xc, ..hop(Side::ApiserverTerminated, API, 0, 0, 3 * MS) });
        // Offered to 0xc after its termination? Not offered at all: not broken.
        c.on_watch(&hop(Side::ApiserverCache, API, 3, 0, 4 * MS));
        c.on_watch(&offer(3, 0xa, 4 * MS + 1));
        c.on_watch(&sent(3, 0xa, 4 * MS + 2));
        c.expire(u64::MAX, ALIVE);
        assert_eq!((c.counts().broken, c.counts().complete), (2, 1));
        let k = c.kept();
        let broken: Vec<i64> = k.iter().filter(|ch| ch.outcome == Outcome::Broken).map(|ch| ch.rev).collect();
        assert_eq!(broken, vec![1, 2]);
        assert_eq!(k[0].missing, vec![Missing { client: (API, 0), watch_id: 0xc, count: 1, column: WATCHER }]);
        let v = k[0].view(&settings());
        assert_eq!((v[WATCHER].mark, v[WATCHER].at_ns.is_some()), (Mark::Broken, true));
        assert_eq!(k[0].watchers(), 1, "offers are not watchers reached");
    }

    #[test]
    fn a_user_window_joins_the_informer_handler_call_it_ran_in() {
        const OP: u32 = 400;
        const LISTENER: u64 = 0x40;
        let handler = |rev: i64, at: u64| WatchRecord { g: LISTENER, ..hop(Side::InformerHandled, OP, rev, 0, at) };
        let user = |start: u64, end: u64, win: u32| WindowRecord { window: win, ..window((OP, LISTENER), start, end) };
        let mut c = Chains::new(settings());
        // Rev 1: the handler starts at 5 ms; its `handleUpdate` window runs
        // 5.1 → 305 ms (an inner window 6 → 7 ms first), then rev 2's
        // handler starts at 306 ms on the same listener.
        c.on_watch(&hop(Side::InformerProcessed, OP, 1, MS, 4 * MS));
        c.on_watch(&handler(1, 5 * MS));
        c.on_window(&user(6 * MS, 7 * MS, 2));
        c.on_window(&user(5 * MS + 100, 305 * MS, 1));
        c.on_watch(&hop(Side::InformerProcessed, OP, 2, 305 * MS, 305 * MS + 1));
        c.on_watch(&handler(2, 306 * MS));
        // A window on another goroutine of the operator, or one that began
        // before the handler call, is not the handler's.
        c.on_window(&WindowRecord { g: 0x99, ..user(307 * MS, 900 * MS, 1) });
        c.on_window(&user(305 * MS, 308 * MS, 1));
        // The etcd client's dispatch window never joins a handler.
        c.on_window(&user(306 * MS, 2_000 * MS, DISPATCH_WINDOW));
        c.on_window(&user(306 * MS + 10, 310 * MS, 1));
        c.expire(u64::MAX, ALIVE);
        let k = c.kept();
        let of = |rev: i64| k.iter().find(|ch| ch.rev == rev).expect("chain");
        let win = |rev: i64| of(rev).kube.iter().find(|h| h.kind == KubeKind::Handler).and_then(|h| h.window);
        assert_eq!(win(1).map(|w| (w.start_ns, w.end_ns)), Some((5 * MS + 100, 305 * MS)), "the longest window");
        assert_eq!(win(2).map(|w| (w.start_ns, w.end_ns)), Some((306 * MS + 10, 310 * MS)));
        // The handler column ends with the window and is marked by its
        // length: 300 ms is slow (warn at 100 ms), 4 ms is not.
        let v = of(1).view(&settings());
        assert_eq!((v[HANDLER].at_ns, v[HANDLER].mark), (Some(304 * MS), Mark::Warn));
        assert_eq!(v[HANDLER].hop_ns, 300 * MS - 100);
        assert_eq!(of(1).span_ns(), 304 * MS);
        let v = of(2).view(&settings());
        assert_eq!((v[HANDLER].at_ns, v[HANDLER].mark), (Some(5 * MS), Mark::Ok));
        assert_eq!((of(1).outcome, of(2).outcome), (Outcome::Slow, Outcome::Complete));
        // Both chains judged: nothing is left waiting for a window.
        assert!(c.handler_calls.is_empty());
    }
}
