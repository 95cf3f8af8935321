//! The `watchscope` command: a thin CLI over the library.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::{Context as _, Result};
use clap::{Args, Parser, Subcommand};
use watchscope::{check, daemon, discover::ProcessFilter, export::web_config::WebConfig, host::HostRoot};

mod inspect_cmd;
mod k8s_args;
mod record_cmd;

#[derive(Debug, Parser)]
#[command(name = "watchscope", version, about = "Explains why Kubernetes/etcd watches are late, from the kernel")]
struct Cli {
    /// Log filter (tracing syntax, e.g. `info`, `watchscope=debug`).
    #[arg(long, env = "WATCHSCOPE_LOG", default_value = "info", global = true)]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Report whether this node can run the agent (exit 0 only if it can).
    Check(CheckArgs),
    /// Run the agent: attach probes and serve /metrics until SIGINT/SIGTERM.
    Run(Box<RunArgs>),
    /// Inspect a Go binary: version, ABI, functions, and the probe plan.
    Inspect(inspect_cmd::InspectArgs),
    /// Attach for a while, then report stages, windows and the slowest watch event chains.
    Record(record_cmd::RecordArgs),
}

#[derive(Debug, Args)]
struct CheckArgs {
    /// Read /proc and /sys under this directory instead of / (for tests and
    /// for checking a node's files from a container that mounts them elsewhere).
    #[arg(long, env = "WATCHSCOPE_ROOT", default_value = "/")]
    root: PathBuf,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct RunArgs {
    /// Address for /metrics, /healthz and /debug/probes.
    #[arg(long, env = "WATCHSCOPE_LISTEN", default_value = "0.0.0.0:9478")]
    listen: SocketAddr,
    /// Watch only these processes (repeatable, or comma-separated).
    #[arg(long = "pid", env = "WATCHSCOPE_PID", value_delimiter = ',')]
    pids: Vec<u32>,
    /// Watch only processes with this command name (repeatable, or comma-separated).
    #[arg(long = "comm", env = "WATCHSCOPE_COMM", value_delimiter = ',')]
    comms: Vec<String>,
    /// Never watch processes with this command name (wins over --comm).
    #[arg(long = "exclude-comm", env = "WATCHSCOPE_EXCLUDE_COMM", value_delimiter = ',')]
    exclude_comms: Vec<String>,
    /// Proxies whose added latency to measure, by command name (repeatable,
    /// or comma-separated).
    #[arg(long = "sidecar-comm", env = "WATCHSCOPE_SIDECAR_COMM", value_delimiter = ',',
          default_values_t = watchscope::attach::sidecar::DEFAULT_SIDECAR_COMMS.iter().map(|s| s.to_string()).collect::<Vec<_>>())]
    sidecar_comms: Vec<String>,
    /// Proxies to measure, by pid (repeatable, or comma-separated).
    #[arg(long = "sidecar-pid", env = "WATCHSCOPE_SIDECAR_PID", value_delimiter = ',')]
    sidecar_pids: Vec<u32>,
    /// Which Go map operations to time: `growth` (where map growths start,
    /// and GC assist; cheap), `evacuation` (also each incremental evacuation
    /// of a growing classic map, Go <= 1.23: a probe hit per insert while it
    /// grows) or `all` (every assign, access and delete too; costly).
    #[arg(long, env = "WATCHSCOPE_GO_MAPS", value_enum, default_value = "growth")]
    go_maps: watchscope::attach::goruntime::GoMaps,
    /// With `--go-maps=all`: how long the per-operation map probes stay
    /// attached to a binary before they detach by themselves (growth and GC
    /// assist probes stay). `0` keeps them for good.
    #[arg(long, env = "WATCHSCOPE_GO_MAPS_WINDOW", default_value = "30s", value_parser = humantime::parse_duration)]
    go_maps_window: std::time::Duration,
    /// Split window time into off-CPU and run-queue shares with probes on
    /// the Go scheduler. Off by default: every goroutine switch of a program
    /// with a window then costs a uprobe hit (about 1 µs), whether a window
    /// is open or not. `watchscope record` turns it on for its duration.
    #[arg(long, env = "WATCHSCOPE_GO_SCHED", default_value_t = false, action = clap::ArgAction::Set,
          num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    go_sched: bool,
    /// Probe etcd's commit fan-out (`notify`), which runs at every commit:
    /// every revision's commit is stamped, so a watcher's backlog is timed
    /// from its commits. `=false` stamps a commit where the fan-out hands it
    /// to its first watcher instead: one trap per put fewer (etcd's CPU per
    /// put inside the probes' trap 5.12 µs against 5.33 in `cargo xtask
    /// bench etcd`, within the runs' noise), but a revision that
    /// reached no watcher at its commit is never stamped, and its events
    /// count as commit misses: a watch catching up from an older revision,
    /// and the backlog of a watcher etcd took out of the fan-out because its
    /// queue was full, when no other watcher has its keys.
    #[arg(long, env = "WATCHSCOPE_ETCD_NOTIFY_PROBE", default_value_t = true, action = clap::ArgAction::Set,
          num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    etcd_notify_probe: bool,
    /// Time watches that use etcd's own filters (`NOPUT`, `NODELETE`:
    /// clientv3's `WithFilterPut`/`WithFilterDelete`) from enqueue to send:
    /// the enqueue probe then reads each watcher's filters, which cost
    /// 0.1 µs per enqueue in `cargo xtask bench etcd`. Off, such a watch's
    /// events are timed from commit to send, and each counts as a
    /// `send_enqueue_miss`.
    #[arg(long, env = "WATCHSCOPE_ETCD_FILTERED_WATCHES", default_value_t = false, action = clap::ArgAction::Set,
          num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    etcd_filtered_watches: bool,
    /// `cargo xtask bench gomap` and `bench etcd` only: an empty program at
    /// every Go runtime and watch-path probe site (the floor any uprobe
    /// there costs).
    #[arg(long, hide = true)]
    bench_empty_probes: bool,
    /// Also time the Go runtime in these programs (by command name).
    #[arg(long = "go-comm", env = "WATCHSCOPE_GO_COMM", value_delimiter = ',')]
    go_comms: Vec<String>,
    /// Also time the Go runtime in these processes.
    #[arg(long = "go-pid", env = "WATCHSCOPE_GO_PID", value_delimiter = ',')]
    go_pids: Vec<u32>,
    /// A window to time, with what happens inside it: NAME=SYMBOL, the Go
    /// function (as `go tool nm` names it) whose calls are the window;
    /// NAME=SYMBOL@ret ends it on its RETs (see --window-end).
    #[arg(long = "window", env = "WATCHSCOPE_WINDOW", value_delimiter = ';')]
    windows: Vec<watchscope::attach::goruntime::WindowSpec>,
    /// Where windows end: `auto` in their callers, on the first branch after
    /// each direct call (one trap; calls through a function value or an
    /// interface are then not timed, counted as dropped), where every call
    /// site allows it, else on their RETs; `ret` always on their RETs
    /// (single-stepped: ~4.7 µs more per call).
    #[arg(long, env = "WATCHSCOPE_WINDOW_END", value_enum, default_value = "auto")]
    window_end: watchscope::attach::goruntime::WindowEnd,
    /// Most series one labelled family may have; past it, observations are
    /// counted in watchscope_series_dropped_total instead.
    #[arg(long, env = "WATCHSCOPE_MAX_SERIES", default_value_t = 2000, value_parser = clap::value_parser!(u32).range(1..))]
    max_series: u32,
    /// Append a `pid` label to every per-process series (many more series).
    #[arg(long, env = "WATCHSCOPE_LABEL_PID")]
    label_pid: bool,
    #[command(flatten)]
    k8s: k8s_args::KubeletArgs,
    /// TLS and basic auth, from a Prometheus exporter-toolkit web config file
    /// (tls_server_config, basic_auth_users).
    #[arg(long, env = "WATCHSCOPE_WEB_CONFIG_FILE")]
    web_config_file: Option<PathBuf>,
    /// Turn the kernel's per-program run statistics on (watchscope_program_*;
    /// also there when the node's kernel.bpf_stats_enabled is 1). Off by
    /// default: every run of every BPF program on the node, not only the
    /// agent's, then costs two more clock reads (~80 ns on a kvm-clock VM).
    #[arg(long, env = "WATCHSCOPE_BPF_STATS", default_value_t = false, action = clap::ArgAction::Set,
          num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    bpf_stats: bool,
    /// How to make uprobes: `perf` (the uprobe PMU; needs CAP_SYS_ADMIN on
    /// Linux 6.16+), `tracefs` (uprobe events; needs tracefs writable), or
    /// `auto` (the PMU, then tracefs from its first refusal on).
    #[arg(long, env = "WATCHSCOPE_UPROBE_ATTACH", value_enum, default_value = "auto")]
    uprobe_attach: watchscope::attach::uprobes::UprobeMode,
    /// Uprobe programs not to load (repeatable; e.g. `etcd_send`): binaries
    /// whose probes need one are then not probed, and say so in
    /// /debug/probes. A program this kernel's verifier refuses is left out
    /// the same way, by itself.
    #[arg(long = "disable-program", value_name = "PROGRAM")]
    disable_program: Vec<String>,
    /// The classic `le` buckets of every histogram, for text scrapers and
    /// Prometheus without native histograms: `fine` (four per power of two,
    /// 0.95 µs to 64 s: 106 series per histogram) or `coarse` (one per power
    /// of two: 28). Native histograms (protobuf) always carry every bucket.
    #[arg(long, env = "WATCHSCOPE_CLASSIC_BUCKETS", value_enum, default_value = "fine")]
    classic_buckets: watchscope::export::ClassicBuckets,
    /// How long each watch stage series keeps its slowest event as its
    /// exemplar against faster ones: at least the scrape interval, so every
    /// scraper sees each slow event.
    #[arg(long, env = "WATCHSCOPE_EXEMPLAR_WINDOW", default_value = "30s", value_parser = humantime::parse_duration)]
    exemplar_window: std::time::Duration,
}

fn main() -> ExitCode {
    // clap exits with code 2 and a usage message on bad flags.
    let cli = Cli::parse();
    init_logging(&cli.log);
    match dispatch(cli.command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("watchscope: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn dispatch(command: Command) -> Result<ExitCode> {
    match command {
        Command::Check(args) => {
            let report = check::run(&HostRoot::new(args.root));
            if args.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{report}");
            }
            Ok(if report.ready() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }
        Command::Inspect(args) => inspect_cmd::run(args),
        Command::Record(args) => record_cmd::run(args),
        Command::Run(args) => {
            let cfg = daemon::RunConfig {
                listen: args.listen,
                filter: ProcessFilter { pids: args.pids, comms: args.comms, exclude_comms: args.exclude_comms },
                sidecar: daemon::SidecarFilter { comms: args.sidecar_comms, pids: args.sidecar_pids },
                go: daemon::GoSettings {
                    maps: args.go_maps,
                    maps_window: (!args.go_maps_window.is_zero()).then_some(args.go_maps_window),
                    sched: args.go_sched,
                    empty_probes: args.bench_empty_probes,
                    windows: watchscope::attach::goruntime::WindowTable::new(&args.windows, args.window_end)
                        .map_err(|e| anyhow::anyhow!("--window: {e}"))?,
                    comms: args.go_comms,
                    pids: args.go_pids,
                },
                watch: watchscope::attach::watch::WatchOptions {
                    notify_probe: args.etcd_notify_probe,
                    filtered_watches: args.etcd_filtered_watches,
                },
                max_series: args.max_series as usize,
                root: HostRoot::default(),
                label_pid: args.label_pid,
                kubelet: args.k8s.config()?,
                web: web_config(args.web_config_file.as_deref())?,
                bpf_stats: args.bpf_stats,
                uprobe_mode: args.uprobe_attach,
                disabled_programs: args.disable_program,
                classic_buckets: args.classic_buckets,
                exemplar_window: args.exemplar_window,
            };
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
            rt.block_on(daemon::run(cfg))?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `--web-config-file` of `run` and of `record --listen`: one loader, so
/// both serve the same TLS and basic auth and refuse a bad file alike.
fn web_config(path: Option<&Path>) -> Result<WebConfig> {
    match path {
        Some(path) => WebConfig::load(path).with_context(|| format!("--web-config-file {}", path.display())),
        None => Ok(WebConfig::default()),
    }
}

fn init_logging(filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter).unwrap_or_else(|e| {
        eprintln!("watchscope: bad --log filter `{filter}` ({e}); using `info`");
        tracing_subscriber::EnvFilter::new("info")
    });
    use std::io::IsTerminal as _;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
}
