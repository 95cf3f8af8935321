//! `watchscope record`: attach like `run`, record for a while, detach, and
//! report what the watch path did during exactly that time — per stage and
//! window histograms (end snapshot minus start snapshot), where the windows'
//! time went, and the worst watch event chains — as terminal text and,
//! with `--html`, as one self-contained page.

pub mod html;
pub mod report;

use std::{
    io::{IsTerminal as _, Write as _},
    net::SocketAddr,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use tracing::{info, warn};

use crate::{
    collect::chains::{self, ChainSettings},
    daemon::{Pipeline, RunConfig, serve_endpoints, shutdown_signal},
    export::server,
};
use report::Report;

#[derive(Clone, Debug)]
pub struct RecordConfig {
    /// What to attach to, as for `run` (its `listen` and `web` are used only
    /// with `listen`).
    pub run: RunConfig,
    pub duration: Duration,
    pub warn: Duration,
    pub error: Duration,
    pub chain_timeout: Duration,
    pub top: usize,
    pub html: Option<PathBuf>,
    /// Also serve /metrics while recording (with `run.web`'s TLS and basic
    /// auth).
    pub listen: Option<SocketAddr>,
}

/// How long the server of `--listen` may take to close its connections
/// once the recording ends, before it is cut off.
const SERVER_STOP_GRACE: Duration = Duration::from_secs(2);

fn ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Records, prints the report on stdout, writes the HTML file if asked.
pub async fn record(cfg: RecordConfig) -> Result<Report> {
    let settings = ChainSettings {
        warn_ns: ns(cfg.warn),
        error_ns: ns(cfg.error),
        timeout_ns: ns(cfg.chain_timeout),
        keep: cfg.top.max(1),
        ..ChainSettings::default()
    };
    let listener = match cfg.listen {
        Some(addr) => Some(server::bind(addr).await.with_context(|| format!("cannot listen on {addr}"))?),
        None => None,
    };
    let pipeline = Pipeline::start(&cfg.run, settings)?;
    let (stop_server, server_stopped) = tokio::sync::oneshot::channel::<()>();
    let server_task = listener.map(|l| {
        let (source, web) = (pipeline.source(), cfg.run.web.clone());
        tokio::spawn(async move {
            serve_endpoints(l, source, &web, async {
                let _ = server_stopped.await;
            })
            .await
        })
    });
    let start = pipeline.snapshot();
    let began = Instant::now();
    info!(duration = ?cfg.duration, "recording");

    let tty = std::io::stderr().is_terminal();
    let progress = |line: &str| {
        let mut e = std::io::stderr();
        if tty {
            let _ = write!(e, "\r\x1b[K{line}");
        } else {
            let _ = writeln!(e, "{line}");
        }
        let _ = e.flush();
    };
    let chains = pipeline.chains();
    let counts = || chains.lock().unwrap_or_else(|p| p.into_inner()).counts();
    let stop = shutdown_signal();
    tokio::pin!(stop);
    let mut tick = tokio::time::interval(if tty { Duration::from_secs(1) } else { Duration::from_secs(5) });
    let end_at = tokio::time::Instant::now() + cfg.duration;
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(end_at) => break,
            _ = &mut stop => break,
            _ = tick.tick() => {
                let left = cfg.duration.saturating_sub(began.elapsed());
                let c = counts();
                progress(&format!(
                    "recording: {}s left · {} chains judged ({} slow, {} broken)",
                    left.as_secs_f64().ceil() as u64,
                    c.complete + c.slow + c.broken,
                    c.slow,
                    c.broken
                ));
            }
        }
    }
    let end = pipeline.snapshot();
    let duration = began.elapsed();

    // Chains started before the end may still wait for a dispatch: give
    // them up to their timeout; no new chain starts now.
    chains.lock().unwrap_or_else(|p| p.into_inner()).close();
    let finish_by = Instant::now() + cfg.chain_timeout + Duration::from_millis(200);
    loop {
        let left = chains.lock().unwrap_or_else(|p| p.into_inner()).finish_ready(&chains::process_alive);
        if left == 0 || Instant::now() >= finish_by {
            break;
        }
        progress(&format!(
            "finishing: {left} chains wait for a dispatch (at most {}s)",
            finish_by.saturating_duration_since(Instant::now()).as_secs_f64().ceil() as u64
        ));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if tty {
        progress("");
    }
    if let Some(mut t) = server_task {
        let _ = stop_server.send(());
        match tokio::time::timeout(SERVER_STOP_GRACE, &mut t).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => warn!("{e:#}"),
            Ok(Err(e)) => warn!("the metrics server ended abnormally: {e}"),
            Err(_) => t.abort(),
        }
    }
    let (counts, kept, max) = {
        let c = chains.lock().unwrap_or_else(|p| p.into_inner());
        (c.counts(), c.kept(), c.record_max().clone())
    };
    let probes = pipeline.stop().await;
    info!(probes, "detached every probe");
    let report = Report::build(duration, &start, &end, cfg.run.go.windows.names(), &max, counts, kept, settings);
    print!("{}", report::render_text(&report, cfg.top, std::io::stdout().is_terminal()));
    if let Some(path) = &cfg.html {
        std::fs::write(path, html::render_html(&report, cfg.top))
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("HTML report written to {}", path.display());
    }
    Ok(report)
}
