//! A soak: etcd under as many puts as a few writers make, many watches
//! on a few streams, and a watched client process that starts and exits
//! per put (each put is its own `etcdctl`), all watched by the agent. At the
//! end every family is accounted for against independent counts: etcd's own
//! revision counter, what each watcher printed, the execs the soak made.
//! On top, processes start and exit at a fixed rate (a watched copy of
//! `/bin/true`), each to be counted as one exec.
//! The integration test runs a short form; `cargo xtask soak` the long one.

use std::{
    io::{BufRead, BufReader},
    process::{Child, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use crate::{
    Agent,
    etcd::{Build, Etcd},
    sample_value, wait_attached, wait_until,
};

#[derive(Clone, Copy, Debug)]
pub struct SoakConfig {
    pub seconds: u64,
    /// `etcdctl watch -i` processes: one gRPC stream each.
    pub streams: usize,
    /// Watches on each stream, all on the soak's prefix.
    pub watches_per_stream: usize,
    /// Threads running `etcdctl put` one after another.
    pub writers: usize,
    /// Short-lived processes started per second besides the puts (a watched
    /// copy of `/bin/true`, paced: behind schedule, the next starts at once).
    pub execs_per_second: u32,
    /// Run those processes in a pod's cgroup, with the agent pointed at a
    /// kubelet that accepts connections and never answers: every new
    /// process's pod lookup meets a hung kubelet.
    pub stalled_kubelet: bool,
}

/// What the soak counted, independently of the agent and by it.
#[derive(Clone, Debug, Default)]
pub struct SoakResult {
    pub seconds: f64,
    /// Puts that succeeded (etcdctl exited 0).
    pub puts: u64,
    /// etcd's own revision counter, after less before.
    pub revisions: u64,
    /// Events the watchers printed, all streams.
    pub received: u64,
    /// `etcdctl put` processes the soak started (failed ones included).
    pub execs: u64,
    /// Paced processes started, and counted by the agent.
    pub churn_execs: u64,
    pub churn_counted: f64,
    /// Connections the agent opened to the hung kubelet.
    pub kubelet_connections: u64,
    /// The agent's counts.
    pub server_events: f64,
    pub client_events: f64,
    pub process_execs: f64,
    /// Observations of the stages every sent or dispatched event is timed
    /// at: `commit_to_send` and `enqueue_to_send` on the server,
    /// `commit_to_dispatch` on the clients.
    pub commit_to_send: f64,
    pub enqueue_to_send: f64,
    pub commit_to_dispatch: f64,
    /// Every `watchscope_dropped_total` reason with a non-zero value.
    pub dropped: Vec<(String, f64)>,
    pub ring_high_water: Vec<(String, f64)>,
    /// The agent's CPU (user + system) over the soak, and its peak RSS.
    pub agent_cpu_seconds: f64,
    pub agent_peak_rss_kib: u64,
}

impl SoakResult {
    pub fn watches(&self, cfg: &SoakConfig) -> u64 {
        (cfg.streams * cfg.watches_per_stream) as u64
    }

    /// A `dropped_total` reason's count (0 when it never occurred).
    pub fn dropped(&self, reason: &str) -> f64 {
        self.dropped.iter().find(|(r, _)| r == reason).map_or(0.0, |(_, n)| *n)
    }

    /// The accounting, each check with its name: independent counts equal
    /// the agent's, and every event is timed at each of its stages or
    /// counted as dropped there, by reason.
    pub fn checks(&self, cfg: &SoakConfig) -> Vec<(&'static str, bool)> {
        let w = self.watches(cfg);
        let sent = self.server_events;
        vec![
            ("every put applied once (etcd's revision counter)", self.revisions == self.puts),
            ("every watch printed every put", self.received == self.puts * w),
            ("sends counted = revisions x watches", sent == (self.revisions * w) as f64),
            ("dispatches counted = events printed", self.client_events == self.received as f64),
            ("execs counted = processes started", self.process_execs == self.execs as f64),
            ("paced execs counted = paced processes started", self.churn_counted == self.churn_execs as f64),
            ("the hung kubelet was asked", !cfg.stalled_kubelet || self.kubelet_connections > 0),
            (
                "commit_to_send + send_commit_miss = sends",
                self.commit_to_send + self.dropped("send_commit_miss") == sent,
            ),
            (
                "enqueue_to_send + send_enqueue_miss = sends",
                self.enqueue_to_send + self.dropped("send_enqueue_miss") == sent,
            ),
            (
                "commit_to_dispatch + dispatch_commit_miss = dispatches",
                self.commit_to_dispatch + self.dropped("dispatch_commit_miss") == self.client_events,
            ),
            ("no ring buffer overflowed", self.dropped("ringbuf_full") == 0.0),
            // Sends that found no enqueue stamp (their copy pushed out of
            // the ring, or never matched): a few under a long backlog, never
            // a share (placing copies by watch id once lost 2.3 million of
            // 2.5 million).
            ("sends without their enqueue stamp <= 1 in 100,000", self.dropped("send_enqueue_miss") <= sent / 1e5),
        ]
    }
}

/// An `etcdctl watch -i` stream with `watches` watches, counting the events
/// it prints (`PUT` lines) without keeping them.
struct Stream {
    child: Child,
    received: Arc<AtomicU64>,
}

impl Stream {
    fn start(etcd: &Etcd, prefix: &str, watches: usize) -> Stream {
        let mut child = etcd.spawn_interactive();
        {
            use std::io::Write as _;
            let stdin = child.stdin.as_mut().expect("stdin");
            for _ in 0..watches {
                writeln!(stdin, "watch --prefix {prefix}").expect("watch command");
            }
            stdin.flush().expect("flush");
        }
        let received = Arc::new(AtomicU64::new(0));
        let out = child.stdout.take().expect("stdout");
        let counter = received.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if line == "PUT" {
                    counter.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        Stream { child, received }
    }

    fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        crate::stop_child(&mut self.child);
    }
}

/// The fields of `/proc/PID/stat` after the command (which may hold spaces
/// and parentheses): state, parent pid, ...; none for a process gone.
pub fn stat_fields(pid: u32) -> Vec<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    rest.split_whitespace().map(String::from).collect()
}

/// utime + stime of a process, in seconds.
pub fn cpu_seconds(pid: u32) -> f64 {
    // After the command: utime is the 12th field, stime the 13th.
    let f = stat_fields(pid);
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (ticks(11) + ticks(12)) / hz
}

/// A process's peak resident set (VmHWM), in KiB.
pub fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// A kubelet that accepts connections and never answers, holding them open:
/// what an agent meets when its node's kubelet hangs.
struct HungKubelet {
    port: u16,
    accepted: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl HungKubelet {
    fn start() -> HungKubelet {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let (accepted, stop) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicBool::new(false)));
        let (a, s) = (accepted.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut held = Vec::new();
            for conn in listener.incoming() {
                if s.load(Ordering::SeqCst) {
                    return;
                }
                if let Ok(c) = conn {
                    held.push(c);
                    a.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        HungKubelet { port, accepted, stop }
    }
}

impl Drop for HungKubelet {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = std::net::TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// Starts `rate` copies of `bin` per second until `stop`, each waited for;
/// returns how many were started. Paced against the start time, so a slow
/// spawn is made up by the next ones rather than lowering the rate. With
/// `cgroup_procs`, each child moves itself into that cgroup before its exec.
fn churn(
    bin: std::path::PathBuf,
    rate: u32,
    stop: Arc<AtomicBool>,
    cgroup_procs: Option<std::path::PathBuf>,
) -> std::thread::JoinHandle<u64> {
    let procs = cgroup_procs.map(|p| std::ffi::CString::new(p.into_os_string().into_encoded_bytes()).expect("path"));
    std::thread::spawn(move || {
        let started = Instant::now();
        let mut n = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let due = started + Duration::from_secs_f64(n as f64 / f64::from(rate.max(1)));
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                // Pacing to a rate, not a wait for state.
                std::thread::sleep(wait);
            }
            let mut cmd = std::process::Command::new(&bin);
            cmd.stdout(Stdio::null()).stderr(Stdio::null());
            if let Some(procs) = procs.clone() {
                use std::os::unix::process::CommandExt as _;
                // SAFETY: between fork and exec only open, write and close
                // run (async-signal-safe), on a path built before the fork.
                unsafe {
                    cmd.pre_exec(move || {
                        let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                        let ok = fd >= 0 && libc::write(fd, b"0".as_ptr().cast(), 1) == 1;
                        if fd >= 0 {
                            libc::close(fd);
                        }
                        if ok { Ok(()) } else { Err(std::io::Error::last_os_error()) }
                    });
                }
            }
            // Counted once it ran: a refused spawn is no exec.
            if cmd.status().is_ok() {
                n += 1;
            }
        }
        n
    })
}

/// The comm of the paced short-lived processes.
pub const CHURN_COMM: &str = "wsx-soak-churn";

/// Runs the soak; `server`/`client` are the comms etcd and etcdctl run as.
pub fn run(cfg: SoakConfig, server: &str, client: &str) -> SoakResult {
    const PREFIX: &str = "/soak/";
    let dir = tempfile::tempdir().expect("temp dir");
    let churn_bin = crate::etcd::copy_binary("/bin/true", dir.path(), CHURN_COMM);
    let kubelet = cfg.stalled_kubelet.then(HungKubelet::start);
    let pod = cfg.stalled_kubelet.then(|| {
        let id = std::process::id();
        crate::pod::PodCgroup::create(
            &format!("50a4c0de-0000-4000-8000-{id:012x}"),
            &format!("{:064x}", u128::from(id) * 7919),
        )
    });
    let token = dir.path().join("token");
    std::fs::write(&token, "soak-token").expect("token");
    let comms = format!("{server},{client},{CHURN_COMM}");
    let mut args = vec!["--comm".to_string(), comms];
    if let Some(k) = &kubelet {
        args.extend([
            "--kubelet-url".to_string(),
            format!("https://127.0.0.1:{}", k.port),
            "--kubelet-insecure-skip-verify=true".into(),
            "--kubelet-token-file".into(),
            token.display().to_string(),
        ]);
    }
    let agent = Agent::start(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let etcd = Arc::new(Etcd::start_build(Build::Bookworm3423, server, client));
    let streams: Vec<Stream> = (0..cfg.streams).map(|_| Stream::start(&etcd, PREFIX, cfg.watches_per_stream)).collect();
    let mut pids = vec![etcd.pid()];
    pids.extend(streams.iter().map(|s| s.child.id()));
    wait_attached(&agent, &pids);
    let watches = (cfg.streams * cfg.watches_per_stream) as u64;
    etcd.wait_watchers(watches, Duration::from_secs(60));

    let text = agent.metrics();
    let side = |text: &str, side: &str, comm: &str| {
        sample_value(text, &format!("watchscope_watch_events_total{{side=\"{side}\",comm=\"{comm}\"}}")).unwrap_or(0.0)
    };
    let execs_of =
        |text: &str| sample_value(text, &format!("watchscope_process_execs_total{{comm=\"{client}\"}}")).unwrap_or(0.0);
    let churned_of = |text: &str| {
        sample_value(text, &format!("watchscope_process_execs_total{{comm=\"{CHURN_COMM}\"}}")).unwrap_or(0.0)
    };
    let stage = |text: &str, stage: &str, comm: &str| {
        crate::Buckets::parse(text, "watchscope_watch_stage_seconds", &format!("stage=\"{stage}\",comm=\"{comm}\""))
            .count()
    };
    let stages = |text: &str| {
        [
            stage(text, "commit_to_send", server),
            stage(text, "enqueue_to_send", server),
            stage(text, "commit_to_dispatch", client),
        ]
    };
    let (server0, client0, execs0) = (side(&text, "server", server), side(&text, "client", client), execs_of(&text));
    let churned0 = churned_of(&text);
    let stages0 = stages(&text);
    let rev0 = etcd.revision();
    let cpu0 = cpu_seconds(agent.pid());

    let started = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let (puts, spawned) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let writers: Vec<_> = (0..cfg.writers)
        .map(|w| {
            let (etcd, stop, puts, spawned) = (etcd.clone(), stop.clone(), puts.clone(), spawned.clone());
            std::thread::spawn(move || {
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    spawned.fetch_add(1, Ordering::Relaxed);
                    let ok = etcd
                        .ctl_command()
                        .args(["put", &format!("{PREFIX}w{w}-{i}"), "v"])
                        .stdout(Stdio::null())
                        .stderr(Stdio::null())
                        .status()
                        .is_ok_and(|s| s.success());
                    if ok {
                        puts.fetch_add(1, Ordering::Relaxed);
                    }
                    i += 1;
                }
            })
        })
        .collect();
    let churner = churn(churn_bin, cfg.execs_per_second, stop.clone(), pod.as_ref().map(|p| p.procs_file()));
    while started.elapsed() < Duration::from_secs(cfg.seconds) {
        std::thread::sleep(Duration::from_millis(100));
    }
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        let _ = w.join();
    }
    let churn_execs = churner.join().unwrap_or(0);
    let seconds = started.elapsed().as_secs_f64();
    let puts = puts.load(Ordering::Relaxed);
    let revisions = etcd.revision() - rev0;
    // Every watch prints every put: wait for the streams to catch up.
    let want = puts * cfg.watches_per_stream as u64;
    let caught_up = wait_until(Duration::from_secs(120), || streams.iter().all(|s| s.received() >= want));
    assert!(
        caught_up,
        "the watchers printed {:?} of {want} events each",
        streams.iter().map(Stream::received).collect::<Vec<_>>()
    );
    let received: u64 = streams.iter().map(Stream::received).sum();
    // etcd counts an event before it sends it, and a client as its
    // dispatch begins, before it prints it: with every event printed, the
    // watch counts are final. Execs are counted off the exec ring: once the
    // agent has read every record submitted, those are final too.
    agent.wait_drained();
    let text = agent.metrics();
    let timed = stages(&text);
    let family = |name: &str, label: &str| -> Vec<(String, f64)> {
        crate::samples(&text, name)
            .into_iter()
            .filter_map(|(labels, v)| Some((labels.get(label)?.clone(), v)))
            .collect()
    };
    SoakResult {
        seconds,
        puts,
        revisions: revisions as u64,
        received,
        execs: spawned.load(Ordering::Relaxed),
        server_events: side(&text, "server", server) - server0,
        client_events: side(&text, "client", client) - client0,
        process_execs: execs_of(&text) - execs0,
        churn_execs,
        churn_counted: churned_of(&text) - churned0,
        kubelet_connections: kubelet.as_ref().map_or(0, |k| k.accepted.load(Ordering::Relaxed)),
        commit_to_send: timed[0] - stages0[0],
        enqueue_to_send: timed[1] - stages0[1],
        commit_to_dispatch: timed[2] - stages0[2],
        dropped: family("watchscope_dropped_total", "reason").into_iter().filter(|(_, v)| *v > 0.0).collect(),
        ring_high_water: family("watchscope_ringbuf_high_water_bytes", "ring"),
        agent_cpu_seconds: cpu_seconds(agent.pid()) - cpu0,
        agent_peak_rss_kib: peak_rss_kib(agent.pid()),
    }
}
