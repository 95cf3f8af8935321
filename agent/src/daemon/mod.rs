//! `watchscope run`: the pipeline wired together — discover, inspect,
//! attach, collect, export — until SIGINT or SIGTERM, then every probe
//! detached.

mod records;
pub mod tracker;

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex, atomic::Ordering},
    time::Duration,
};

use agent_common::{
    counters::Ring,
    events::{EVENT_EXEC, EVENT_EXIT},
};
use anyhow::{Context, Result};
use aya::maps::{MapData, RingBuf};
use tokio::{io::unix::AsyncFd, signal::unix::SignalKind};
use tracing::{debug, info, warn};

use crate::{
    attach::{AttachedProbe, Probes, slots::Slots},
    collect::{
        KernelMaps, Series, Snapshot, UserCounters,
        chains::{ChainSettings, Chains},
        stats::BpfStats,
    },
    discover::{ProcessFilter, exec},
    export::{
        server::{self, MetricsSource},
        web_config::WebConfig,
    },
    host::HostRoot,
    k8s::{kubelet::KubeletConfig, resolve::Resolver},
};
pub use tracker::{GoSettings, SidecarFilter};
use tracker::{Labelling, Status, Tracker};

/// How often /proc is reconciled with what the agent tracks: a backstop for
/// exec/exit events lost to a full ring buffer (those are counted).
const RECONCILE_EVERY: Duration = Duration::from_secs(10);

#[derive(Clone, Debug)]
pub struct RunConfig {
    pub listen: SocketAddr,
    pub filter: ProcessFilter,
    pub sidecar: SidecarFilter,
    pub go: GoSettings,
    /// How etcd's watch path is probed (`--etcd-notify-probe`).
    pub watch: crate::attach::watch::WatchOptions,
    pub max_series: usize,
    pub root: HostRoot,
    /// Append a `pid` label to every per-process series (`--label-pid`).
    pub label_pid: bool,
    /// Where to fetch pod metadata; None outside Kubernetes.
    pub kubelet: Option<KubeletConfig>,
    /// TLS and basic auth (`--web-config-file`).
    pub web: WebConfig,
    /// Keep the kernel's per-program run statistics on (`--bpf-stats`).
    pub bpf_stats: bool,
    /// How uprobes are made (`--uprobe-attach`).
    pub uprobe_mode: crate::attach::uprobes::UprobeMode,
    /// Uprobe programs not to load (`--disable-program`).
    pub disabled_programs: Vec<String>,
    /// The classic `le` layout of every histogram (`--classic-buckets`).
    pub classic_buckets: crate::export::ClassicBuckets,
    /// How long a stage series keeps its slowest event as its exemplar.
    pub exemplar_window: std::time::Duration,
}

struct Agent {
    maps: Arc<Mutex<KernelMaps>>,
    user: Arc<UserCounters>,
    slots: Arc<Mutex<Slots>>,
    sidecar_slots: Arc<Mutex<Slots>>,
    series: Arc<Mutex<Series>>,
    stats: BpfStats,
    windows: Vec<String>,
    tracepoints: Vec<AttachedProbe>,
    status: Arc<Status>,
    chains: Arc<Mutex<Chains>>,
    /// The maps' kernel memory, measured once they all exist.
    map_bytes: Vec<crate::collect::mapmem::MapBytes>,
    /// What a uprobe hit costs on this node, measured at start.
    uprobe_hit_cost: Vec<(&'static str, f64)>,
    classic_buckets: crate::export::ClassicBuckets,
    /// Uprobe programs not loaded, and why.
    unavailable: crate::attach::Unavailable,
}

impl Agent {
    /// Per ring buffer, the records the kernel submitted and user space
    /// read: when `read` has caught up with `submitted`, everything the
    /// kernel produced until then has been consumed (tests wait on this
    /// rather than on time).
    fn rings_json(&self) -> serde_json::Value {
        let submitted = self.maps.lock().unwrap_or_else(|p| p.into_inner()).ring_submitted();
        let rings: Vec<_> = submitted
            .iter()
            .map(|(r, n)| {
                let read = self.user.ring_read[*r as usize].load(Ordering::Relaxed);
                serde_json::json!({"ring": r.name(), "submitted": n, "read": read})
            })
            .collect();
        serde_json::Value::Array(rings)
    }
}

impl MetricsSource for Agent {
    fn snapshot(&self) -> Snapshot {
        let list = |m: &Mutex<Slots>| -> Vec<(u32, crate::attach::slots::LabelSet)> {
            let s = m.lock().unwrap_or_else(|p| p.into_inner());
            s.all().map(|(i, l)| (i, l.clone())).collect()
        };
        let sidecar_slots = list(&self.sidecar_slots);
        // Held until the folded series are merged in: a slot recycled in
        // between would be counted twice (lock order: slots, maps, series).
        let slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        let live: Vec<_> = slots.all().map(|(i, l)| (i, l.clone())).collect();
        let mut snap = {
            let mut maps = self.maps.lock().unwrap_or_else(|p| p.into_inner());
            // Each read of /metrics ends an exemplar interval.
            maps.close_exemplar_interval();
            Snapshot::take(&maps, &self.user, &live, &sidecar_slots, &self.windows)
        };
        self.series.lock().unwrap_or_else(|p| p.into_inner()).apply(&mut snap);
        drop(slots);
        let tracepoints = self.tracepoints.len()
            + self.status.sidecar_tracepoints.load(Ordering::Relaxed)
            + self.status.sched_tracepoints.load(Ordering::Relaxed);
        snap.probes_attached = vec![
            ("tracepoint", tracepoints as u64),
            ("uprobe", self.status.uprobes_attached.load(Ordering::Relaxed) as u64),
        ];
        snap.programs = self.stats.read();
        snap.map_bytes = self.map_bytes.clone();
        snap.uprobe_hit_cost = self.uprobe_hit_cost.clone();
        snap.watch_chains = self.chains.lock().unwrap_or_else(|p| p.into_inner()).counts();
        snap
    }

    fn ready(&self) -> bool {
        self.status.scanned.load(Ordering::Relaxed)
    }

    fn classic_buckets(&self) -> crate::export::ClassicBuckets {
        self.classic_buckets
    }

    fn probes_json(&self) -> serde_json::Value {
        let binaries: Vec<_> = match self.status.binaries.lock() {
            Ok(b) => b.values().cloned().collect(),
            Err(p) => p.into_inner().values().cloned().collect(),
        };
        // Proxies found by name, and forked workers the kernel added (whose
        // ports are registered too): each with the ports timed for it.
        let ports = self.status.sidecar_ports.lock().map(|p| p.clone()).unwrap_or_default();
        let comms = self.status.sidecars.lock().map(|s| s.clone()).unwrap_or_default();
        let pids: std::collections::BTreeSet<u32> = comms.keys().chain(ports.keys()).copied().collect();
        let sidecars: Vec<_> = pids
            .iter()
            .map(|pid| {
                let listening: Vec<u16> = ports.get(pid).map(|p| p.iter().copied().collect()).unwrap_or_default();
                serde_json::json!({"pid": pid, "comm": comms.get(pid), "ports": listening})
            })
            .collect();
        serde_json::json!({
            "probes": self.tracepoints,
            "uprobes_attached": self.status.uprobes_attached.load(Ordering::Relaxed),
            "uprobe_mechanism": *self.status.uprobe_mechanism.lock().unwrap_or_else(|p| p.into_inner()),
            "uprobe_links": self.status.uprobe_links.load(Ordering::Relaxed),
            "ret_sites": self.status.ret_sites.lock().map(|r| r.clone()).unwrap_or_default(),
            "sidecar_tracepoints_attached": self.status.sidecar_tracepoints.load(Ordering::Relaxed),
            "sched_tracepoints_attached": self.status.sched_tracepoints.load(Ordering::Relaxed),
            "binaries": binaries,
            "sidecars": sidecars,
            "label_slots": self.slots.lock().unwrap_or_else(|p| p.into_inner()).usage(),
            "rings": self.rings_json(),
            // Chains of watch events not judged yet (each is, at the latest,
            // when its timeout passes).
            "chains_pending": self.chains.lock().unwrap_or_else(|p| p.into_inner()).pending(),
            "unavailable_programs": self.unavailable,
            // Per program, the instructions its verification took.
            "verified_insns": self.stats.verified().into_iter().collect::<std::collections::BTreeMap<_, _>>(),
        })
    }
}

/// The pipeline, started: kernel programs loaded, the first /proc scan
/// done and probes attached, exec/exit events and watch records consumed.
/// `run` serves it over HTTP; `record` reads it directly.
pub struct Pipeline {
    agent: Arc<Agent>,
    chains: Arc<Mutex<Chains>>,
    events_stop: tokio::sync::oneshot::Sender<()>,
    events_task: tokio::task::JoinHandle<usize>,
    records_stop: records::RecordsStop,
    records_task: tokio::task::JoinHandle<()>,
    n_tracepoints: usize,
}

impl Pipeline {
    /// Starts everything but the HTTP server; call inside a tokio runtime.
    pub fn start(cfg: &RunConfig, chain_settings: ChainSettings) -> Result<Pipeline> {
        let mut probes = Probes::load_and_attach(&cfg.root, cfg.go.sched, cfg.uprobe_mode, &cfg.disabled_programs)
            .context("attaching the kernel programs")?;
        let maps = KernelMaps::take(&mut probes.ebpf, cfg.exemplar_window).context("opening the kernel maps")?;
        let events = probes.ebpf.take_map("WS_EVENTS").context("the eBPF object has no WS_EVENTS map")?;
        let events = RingBuf::try_from(events).context("opening the event ring buffer")?;
        let records = records::RecordRings::take(&mut probes.ebpf)?;
        let maps = Arc::new(Mutex::new(maps));
        let user = Arc::new(UserCounters::new(cfg.max_series));
        let chains = Arc::new(Mutex::new(Chains::new(chain_settings)));
        let slots = Arc::new(Mutex::new(Slots::default()));
        let sidecar_slots = Arc::new(Mutex::new(Slots::with_capacity(agent_common::sidecar::MAX_SIDECAR_SLOTS)));
        let series = Arc::new(Mutex::new(Series::new(cfg.max_series)));
        let status = Arc::new(Status::default());
        let ret_sites = match crate::attach::features::context_writes() {
            Ok(mode) => mode.name().to_string(),
            Err(e) => format!("single-step ({e})"),
        };
        info!(ret_sites = %ret_sites, "how RET probes return");
        *status.ret_sites.lock().unwrap_or_else(|p| p.into_inner()) = ret_sites;
        // Nodes differ most in what a trap costs (a VM's may go through its
        // hypervisor): priced once, before anything is probed.
        let uprobe_hit_cost = match crate::attach::features::trap_cost(crate::collect::stats::run_count) {
            Ok(c) => {
                info!(
                    emulated_us = c.emulated_ns / 1000.0,
                    single_step_us = c.single_step_ns / 1000.0,
                    "what a uprobe hit costs here (an empty program, in a tight loop)"
                );
                vec![("emulated", c.emulated_ns * 1e-9), ("single_step", c.single_step_ns * 1e-9)]
            }
            Err(e) => {
                warn!("what a uprobe hit costs here is not measured: {e}");
                Vec::new()
            }
        };
        let tracepoints = probes.attached.clone();
        let n_tracepoints = tracepoints.len();
        let windows = cfg.go.windows.names().to_vec();
        // Pod metadata: a refresher thread of its own; nothing waits for it.
        let pods = match &cfg.kubelet {
            Some(k) => {
                info!(url = %k.url, "reading pod metadata from the kubelet");
                Some(
                    crate::k8s::kubelet::Kubelet::new(k.clone())
                        .spawn_refresher()
                        .context("starting the kubelet client")?,
                )
            }
            None => None,
        };
        let labelling = Labelling {
            resolver: Resolver::new(cfg.root.clone(), pods, cfg.label_pid),
            maps: maps.clone(),
            series: series.clone(),
            windows: windows.clone(),
        };

        let unavailable = probes.unavailable;
        let mut tracker = Tracker::new(
            cfg.root.clone(),
            cfg.filter.clone(),
            cfg.sidecar.clone(),
            cfg.go.clone(),
            cfg.watch,
            probes.ebpf,
            slots.clone(),
            sidecar_slots.clone(),
            status.clone(),
            labelling,
            cfg.uprobe_mode,
            probes.multi,
            unavailable.clone(),
            probes.sock.as_ref().map(|_| ()),
        )?;
        // Every program is loaded by now (uprobe programs are loaded at start
        // and attached per binary later).
        let stats = BpfStats::enable(tracker.ebpf(), tracker.multi_programs(), cfg.bpf_stats);
        let agent = Arc::new(Agent {
            maps,
            user: user.clone(),
            slots,
            sidecar_slots,
            series,
            stats,
            windows,
            tracepoints,
            status,
            chains: chains.clone(),
            map_bytes: crate::collect::mapmem::measured(),
            uprobe_hit_cost,
            classic_buckets: cfg.classic_buckets,
            unavailable,
        });
        // The initial scan: processes that were running before the agent.
        tracker.reconcile();
        agent.status.scanned.store(true, Ordering::Relaxed);

        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
        let events_task = tokio::spawn(event_loop(events, cfg.filter.clone(), user.clone(), tracker, stop_rx));
        let (records_loop, records_stop) = records::RecordsLoop::new(records);
        let rec_chains = chains.clone();
        let records_task = tokio::task::spawn_blocking(move || records_loop.run(rec_chains, user));
        Ok(Pipeline { agent, chains, events_stop: stop_tx, records_stop, events_task, records_task, n_tracepoints })
    }

    pub fn source(&self) -> Arc<dyn MetricsSource> {
        self.agent.clone()
    }

    pub fn snapshot(&self) -> Snapshot {
        self.agent.snapshot()
    }

    pub fn chains(&self) -> Arc<Mutex<Chains>> {
        self.chains.clone()
    }

    /// Stops the loops and detaches every probe; returns how many.
    pub async fn stop(self) -> usize {
        let _ = self.events_stop.send(());
        self.records_stop.stop();
        if let Err(e) = self.records_task.await {
            warn!("record loop ended abnormally: {e}");
        }
        let detached = match self.events_task.await {
            Ok(n) => n,
            Err(e) => {
                warn!("event loop ended abnormally: {e}");
                0
            }
        };
        // The tracker dropped the object: tracepoints and uprobes are detached.
        self.n_tracepoints + detached
    }
}

pub async fn run(cfg: RunConfig) -> Result<()> {
    // Bind first: a port in use fails before anything is loaded into the kernel.
    let listener = server::bind(cfg.listen).await.with_context(|| format!("cannot listen on {}", cfg.listen))?;
    // Before anything is attached: a signal during start-up stops us cleanly.
    let stop = shutdown_signal();
    let pipeline = Pipeline::start(&cfg, ChainSettings::default())?;
    serve_endpoints(listener, pipeline.source(), &cfg.web, stop).await?;
    let probes = pipeline.stop().await;
    info!(probes, "detached every probe; exiting");
    Ok(())
}

/// Serves `/metrics` and the other endpoints of `source` on `listener` until
/// `stop` resolves, with the TLS and basic auth `web` asks for. `run` and
/// `record --listen` both serve through here, so a web config protects
/// either the same way.
pub async fn serve_endpoints(
    listener: tokio::net::TcpListener,
    source: Arc<dyn MetricsSource>,
    web: &WebConfig,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let bound = listener.local_addr().context("reading the bound address")?;
    let scheme = if web.tls.is_some() { "https" } else { "http" };
    info!(basic_auth = web.auth.is_some(), "serving metrics on {scheme}://{bound}/metrics");
    server::serve(listener, server::router(source), web, stop).await.context("HTTP server failed")
}

/// Listens for SIGINT and SIGTERM from the moment it is called (the
/// handlers are installed here, not when the future is first polled), so a
/// signal during start-up — loading programs, the first /proc scan — stops
/// the agent cleanly instead of killing it with its default action.
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    let term = tokio::signal::unix::signal(SignalKind::terminate());
    let int = tokio::signal::unix::signal(SignalKind::interrupt());
    async move {
        match (term, int) {
            (Ok(mut term), Ok(mut int)) => tokio::select! {
                _ = int.recv() => info!("SIGINT received"),
                _ = term.recv() => info!("SIGTERM received"),
            },
            (Ok(mut term), Err(e)) => {
                warn!("cannot listen for SIGINT ({e}); stop the agent with SIGTERM");
                term.recv().await;
            }
            (Err(e), Ok(mut int)) => {
                warn!("cannot listen for SIGTERM ({e}); stop the agent with SIGINT");
                int.recv().await;
            }
            (Err(e), Err(_)) => {
                warn!("cannot listen for SIGINT or SIGTERM ({e}); stop the agent with SIGKILL");
                std::future::pending::<()>().await;
            }
        }
    }
}

/// Drains exec and exit events as they arrive (the ring buffer's fd becomes
/// readable when the kernel submits a record), reconciles with /proc now and
/// then, and on stop detaches everything. Returns the uprobes detached.
async fn event_loop(
    ring: RingBuf<MapData>,
    filter: ProcessFilter,
    user: Arc<UserCounters>,
    mut tracker: Tracker,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) -> usize {
    // SAFETY: the ring buffer owns its fd and keeps it open for as long as
    // the AsyncFd (which owns the ring buffer) lives.
    let registered = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) };
    let mut fd = match registered {
        Ok(fd) => Some(fd),
        Err(e) => {
            warn!("cannot poll the event ring buffer: {e}; discovery falls back to /proc scans");
            None
        }
    };
    let mut tick = tokio::time::interval(RECONCILE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Proxies bind their listening sockets after exec: look for them often.
    let mut ports_tick = tokio::time::interval(Duration::from_secs(1));
    ports_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = &mut stop => break,
            _ = tick.tick() => tracker.reconcile(),
            _ = ports_tick.tick() => {
                tracker.refresh_sidecar_ports();
                tracker.expire_map_operations();
                tracker.refresh_labels();
                tracker.recycle_slots();
            }
            ready = async { fd.as_mut().expect("guarded by the if").readable_mut().await }, if fd.is_some() => {
                let mut guard = match ready {
                    Ok(g) => g,
                    Err(e) => {
                        warn!("event ring buffer poll failed: {e}; discovery falls back to /proc scans");
                        fd = None;
                        continue;
                    }
                };
                let ring = guard.get_inner_mut();
                while let Some(item) = ring.next() {
                    handle_record(&item, &filter, &user, &mut tracker);
                    user.read_from(Ring::Events, 1);
                }
                guard.clear_ready();
            }
        }
    }
    tracker.shutdown()
}

fn handle_record(bytes: &[u8], filter: &ProcessFilter, user: &UserCounters, tracker: &mut Tracker) {
    match exec::record_kind(bytes) {
        Some(EVENT_EXEC) => match exec::decode(bytes) {
            Ok(ev) => {
                if filter.matches(ev.tgid, &ev.comm) {
                    debug!(pid = ev.tgid, comm = %ev.comm, file = %ev.filename, "exec");
                    // The first sight of this process: its labels are resolved now.
                    let labels = tracker.resolver().resolve(ev.tgid, &ev.comm).labels;
                    let mut counts = user.watched_execs.lock().unwrap_or_else(|p| p.into_inner());
                    counts.add(&labels, 1);
                }
                tracker.on_exec(ev.tgid);
            }
            Err(e) => {
                debug!("event ring: {e}");
                user.decode_errors.fetch_add(1, Ordering::Relaxed);
            }
        },
        Some(EVENT_EXIT) => match exec::decode_exit(bytes) {
            Ok(tgid) => tracker.on_exit(tgid),
            Err(e) => {
                debug!("event ring: {e}");
                user.decode_errors.fetch_add(1, Ordering::Relaxed);
            }
        },
        _ => {
            user.decode_errors.fetch_add(1, Ordering::Relaxed);
        }
    }
}
