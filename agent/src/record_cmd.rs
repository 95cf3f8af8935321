//! `watchscope record` flags.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use anyhow::Result;
use clap::Args;
use watchscope::{
    attach::goruntime::{GoMaps, WindowSpec, WindowTable},
    daemon::{self, RunConfig},
    discover::ProcessFilter,
    host::HostRoot,
    record::{self, RecordConfig},
};

#[derive(Debug, Args)]
pub struct RecordArgs {
    /// How long to record (e.g. `30s`, `2m`).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Watch only these processes (repeatable, or comma-separated).
    #[arg(long = "pid", value_delimiter = ',')]
    pids: Vec<u32>,
    /// Watch only processes with this command name (repeatable, or comma-separated).
    #[arg(long = "comm", value_delimiter = ',')]
    comms: Vec<String>,
    /// Never watch processes with this command name (wins over --comm).
    #[arg(long = "exclude-comm", value_delimiter = ',')]
    exclude_comms: Vec<String>,
    /// Also time the Go runtime in these programs (by command name).
    #[arg(long = "go-comm", value_delimiter = ',')]
    go_comms: Vec<String>,
    /// A window to time: NAME=SYMBOL (as for `run`).
    #[arg(long = "window", value_delimiter = ';')]
    windows: Vec<WindowSpec>,
    /// Also write the report as one self-contained HTML file.
    #[arg(long)]
    html: Option<PathBuf>,
    /// A stage longer than this marks its chain slow (`warn`).
    #[arg(long, default_value = "100ms", value_parser = humantime::parse_duration)]
    warn: Duration,
    /// A stage longer than this is marked `error`.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    error: Duration,
    /// How long after its commit a client on this node may take to dispatch
    /// an event before its chain is `broken`.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    chain_timeout: Duration,
    /// How many of the slowest chains to list.
    #[arg(long, default_value_t = 10)]
    top: usize,
    /// Also serve /metrics on this address while recording.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// TLS and basic auth for `--listen`, from a Prometheus exporter-toolkit
    /// web config file (as for `run`).
    #[arg(long, requires = "listen")]
    web_config_file: Option<PathBuf>,
    /// Split window time into off-CPU and run-queue shares (scheduler
    /// probes). On by default here: a recording is short and asks where the
    /// time went; `--go-sched=false` leaves those columns empty.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set,
          num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    go_sched: bool,
    /// How to make uprobes: `perf`, `tracefs` or `auto` (as for `run`).
    #[arg(long, value_enum, default_value = "auto")]
    uprobe_attach: watchscope::attach::uprobes::UprobeMode,
    /// Where windows end: `auto` or `ret` (as for `run`).
    #[arg(long, value_enum, default_value = "auto")]
    window_end: watchscope::attach::goruntime::WindowEnd,
}

pub fn run(args: RecordArgs) -> Result<ExitCode> {
    let cfg = RecordConfig {
        run: RunConfig {
            listen: args.listen.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0))),
            filter: ProcessFilter { pids: args.pids, comms: args.comms, exclude_comms: args.exclude_comms },
            sidecar: daemon::SidecarFilter {
                comms: watchscope::attach::sidecar::DEFAULT_SIDECAR_COMMS.iter().map(|s| s.to_string()).collect(),
                pids: Vec::new(),
            },
            go: daemon::GoSettings {
                // An incident recording is bounded in time: it may pay a
                // probe hit per insert of a growing classic map to time
                // every evacuation, as it turns on the scheduler probes.
                maps: GoMaps::Evacuation,
                maps_window: None,
                sched: args.go_sched,
                empty_probes: false,
                windows: WindowTable::new(&args.windows, args.window_end)
                    .map_err(|e| anyhow::anyhow!("--window: {e}"))?,
                comms: args.go_comms,
                pids: Vec::new(),
            },
            watch: watchscope::attach::watch::WatchOptions::default(),
            max_series: 2000,
            root: HostRoot::default(),
            // The report names processes by comm; pod labels are for /metrics.
            label_pid: false,
            kubelet: None,
            web: crate::web_config(args.web_config_file.as_deref())?,
            bpf_stats: false,
            uprobe_mode: args.uprobe_attach,
            disabled_programs: Vec::new(),
            classic_buckets: Default::default(),
            exemplar_window: watchscope::collect::exemplars::DEFAULT_WINDOW,
        },
        duration: args.duration,
        warn: args.warn,
        error: args.error,
        chain_timeout: args.chain_timeout,
        top: args.top,
        html: args.html,
        listen: args.listen,
    };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(record::record(cfg))?;
    Ok(ExitCode::SUCCESS)
}
