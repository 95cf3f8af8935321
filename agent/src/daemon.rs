//! `watchscope run`: the pipeline wired together — attach, discover, collect,
//! export — until SIGINT or SIGTERM, then every probe detached.

use std::{net::SocketAddr, sync::Arc};

use anyhow::{Context, Result};
use aya::maps::RingBuf;
use tokio::{io::unix::AsyncFd, signal::unix::SignalKind};
use tracing::{debug, info, warn};

use crate::{
    attach::{AttachedProbe, Probes},
    collect::{KernelMaps, Snapshot, UserCounters},
    discover::{ProcessFilter, exec},
    export::server::{self, MetricsSource},
    host::HostRoot,
};

#[derive(Clone, Debug)]
pub struct RunConfig {
    pub listen: SocketAddr,
    pub filter: ProcessFilter,
    pub max_series: usize,
    pub root: HostRoot,
}

struct Agent {
    maps: KernelMaps,
    user: Arc<UserCounters>,
    probes: Vec<AttachedProbe>,
}

impl MetricsSource for Agent {
    fn snapshot(&self) -> Snapshot {
        Snapshot::take(&self.maps, &self.user, self.probes.len())
    }

    fn probes_json(&self) -> serde_json::Value {
        serde_json::json!({ "probes": self.probes })
    }
}

pub async fn run(cfg: RunConfig) -> Result<()> {
    // Bind first: a port in use fails before anything is loaded into the kernel.
    let listener = server::bind(cfg.listen)
        .await
        .with_context(|| format!("cannot listen on {}", cfg.listen))?;
    let bound = listener.local_addr().context("reading the bound address")?;
    let mut probes = Probes::load_and_attach(&cfg.root).context("attaching the kernel programs")?;
    let maps = KernelMaps::take(&mut probes.ebpf).context("opening the kernel maps")?;
    let events = probes
        .ebpf
        .take_map("WS_EVENTS")
        .context("the eBPF object has no WS_EVENTS map")?;
    let events = RingBuf::try_from(events).context("opening the event ring buffer")?;
    let user = Arc::new(UserCounters::new(cfg.max_series));
    let agent = Arc::new(Agent {
        maps,
        user: user.clone(),
        probes: probes.attached.clone(),
    });

    info!("serving metrics on http://{bound}/metrics");
    let events_task = tokio::spawn(read_exec_events(events, cfg.filter.clone(), user));
    let shutdown = shutdown_signal();
    let app = server::router(agent);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
        .context("HTTP server failed")?;

    events_task.abort();
    let n = probes.attached.len();
    // Dropping the object closes every link: the programs are detached.
    drop(probes);
    info!(probes = n, "detached every probe; exiting");
    Ok(())
}

async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            warn!("cannot listen for SIGTERM ({e}); stop the agent with SIGINT");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => info!("SIGINT received"),
        _ = term.recv() => info!("SIGTERM received"),
    }
}

/// Drains exec events as they arrive: the ring buffer's fd becomes readable
/// when the kernel submits a record.
async fn read_exec_events(
    ring: RingBuf<aya::maps::MapData>,
    filter: ProcessFilter,
    user: Arc<UserCounters>,
) {
    // SAFETY: the ring buffer owns its fd and keeps it open for as long as
    // the AsyncFd (which owns the ring buffer) lives.
    let registered =
        unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) };
    let mut fd = match registered {
        Ok(fd) => fd,
        Err(e) => {
            warn!(
                "cannot poll the event ring buffer: {}; exec discovery is off",
                e
            );
            return;
        }
    };
    loop {
        let mut guard = match fd.readable_mut().await {
            Ok(g) => g,
            Err(e) => {
                warn!("event ring buffer poll failed: {e}; exec discovery is off");
                return;
            }
        };
        let ring = guard.get_inner_mut();
        while let Some(item) = ring.next() {
            match exec::decode(&item) {
                Some(ev) if filter.matches(ev.tgid, &ev.comm) => {
                    debug!(pid = ev.tgid, comm = %ev.comm, file = %ev.filename, "exec");
                    let mut counts = user.watched_execs.lock().unwrap_or_else(|p| p.into_inner());
                    counts.add(&ev.comm, 1);
                }
                Some(_) => {}
                None => {
                    user.decode_errors
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
        }
        guard.clear_ready();
    }
}
