//! Shared harness for the integration tests: find the agent binary, start it
//! on a free port, scrape it, stop it. The tests run real programs and load
//! real eBPF programs, so they need root (`cargo xtask test` checks).

pub mod clientgo;
pub mod debcache;
pub mod etcd;
pub mod go;
pub mod kube;
pub mod pod;
pub mod prom;
pub mod proxy;
pub mod soak;
pub mod tracefs;

use std::{
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

/// The `watchscope` binary: `$WATCHSCOPE_BIN`, or the one cargo built next to
/// this test executable (target/<profile>/watchscope).
pub fn watchscope_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("WATCHSCOPE_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> → target/<profile>/watchscope
    let bin = exe
        .parent()
        .and_then(|deps| deps.parent())
        .map(|profile| profile.join("watchscope"))
        .expect("test executable lives in target/<profile>/deps");
    assert!(
        bin.is_file(),
        "{} not found: build it first (`cargo build -p watchscope`; `cargo xtask test` does)",
        bin.display()
    );
    bin
}

/// Fails the test early with a clear message when not root.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(euid, 0, "this test loads eBPF programs and needs root (run `sudo -E cargo xtask test`)");
}

/// Stops a child: SIGTERM, up to 5 s to exit, then SIGKILL.
pub fn stop_child(child: &mut Child) {
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// A child process driven line by line: commands go to its stdin, and its
/// stdout lines are read in the background. Stopped (SIGTERM, then SIGKILL)
/// on drop.
pub struct Piped {
    pub child: std::process::Child,
    stdin: std::process::ChildStdin,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Piped {
    /// Spawns `cmd` with its stdin and stdout piped.
    pub fn spawn(mut cmd: std::process::Command) -> Piped {
        use std::{io::BufRead, process::Stdio};
        let mut child =
            cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap_or_else(|e| panic!("start {cmd:?}: {e}"));
        let stdin = child.stdin.take().expect("piped stdin");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for l in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(l);
            }
        });
        Piped { child, stdin, lines }
    }

    /// Writes `line` and a newline in one write(2).
    pub fn send(&mut self, line: &str) {
        use std::io::Write;
        self.stdin.write_all(format!("{line}\n").as_bytes()).and_then(|_| self.stdin.flush()).expect("child stdin");
    }

    /// As [`Piped::send`], ignoring a child that is already gone.
    pub fn send_quietly(&mut self, line: &str) {
        use std::io::Write;
        let _ = self.stdin.write_all(format!("{line}\n").as_bytes()).and_then(|_| self.stdin.flush());
    }

    /// The next stdout line; panics after `timeout` or at end of output.
    pub fn next(&self, timeout: Duration) -> String {
        self.lines.recv_timeout(timeout).unwrap_or_else(|e| panic!("no output line within {timeout:?}: {e}"))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Piped {
    fn drop(&mut self) {
        stop_child(&mut self.child);
    }
}

/// `/debug/probes` of a running agent (null when it cannot be read).
pub fn debug_probes(agent: &Agent) -> serde_json::Value {
    http_get(&agent.url("/debug/probes")).ok().and_then(|(_, b)| serde_json::from_str(&b).ok()).unwrap_or_default()
}

/// The Go runtime sites the agent planned for `bin` (`/debug/probes`
/// `go_runtime`), once it has attached to it.
pub fn go_sites(agent: &Agent, bin: &Path) -> Vec<serde_json::Value> {
    let mut sites = Vec::new();
    let ok = wait_until(Duration::from_secs(10), || {
        let v = debug_probes(agent);
        let found = v["binaries"].as_array().and_then(|bins| {
            bins.iter().find(|b| b["path"].as_str() == bin.to_str() && b["attached"] == true).cloned()
        });
        if let Some(b) = found {
            sites = b["go_runtime"].as_array().cloned().unwrap_or_default();
            true
        } else {
            false
        }
    });
    assert!(ok, "{} not attached:\n{}", bin.display(), agent.log_text());
    sites
}

/// A port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("bind an ephemeral port")
}

/// The largest response body the harness reads.
const MAX_BODY: u64 = 256 << 20;

/// GET a URL; returns (status, body).
pub fn http_get(url: &str) -> Result<(u16, String), String> {
    http_get_with(url, &[]).map(|(status, _, body)| (status, body))
}

/// GET a URL with request headers; returns (status, content type, body).
pub fn http_get_with(url: &str, headers: &[(&str, &str)]) -> Result<(u16, String, String), String> {
    let mut req = ureq::get(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let mut resp = req
        .config()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(5)))
        .build()
        .call()
        .map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let ctype = resp.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
    // An agent with --label-pid and many processes exports megabytes (a
    // histogram series is 109 samples): above ureq's 10 MB default.
    let body = resp.body_mut().with_config().limit(MAX_BODY).read_to_string().map_err(|e| e.to_string())?;
    Ok((status, ctype, body))
}

/// A running `watchscope run`, stopped (SIGTERM, then SIGKILL) on drop.
pub struct Agent {
    child: Option<Child>,
    pub port: u16,
    pub log: tempfile::NamedTempFile,
}

impl Agent {
    /// Starts `watchscope run --listen 127.0.0.1:<free port> <args>` and waits
    /// until /healthz answers.
    pub fn start(args: &[&str]) -> Agent {
        Self::start_wrapped(&[], args)
    }

    /// [`Agent::start`] through a wrapper command: `wrapper[0] wrapper[1..]
    /// <watchscope> run ...` (e.g. a shell that drops capabilities first).
    pub fn start_wrapped(wrapper: &[&str], args: &[&str]) -> Agent {
        let mut agent = Self::spawn_wrapped(wrapper, args);
        agent.wait_ready(Duration::from_secs(20));
        agent
    }

    /// Starts the agent without waiting for it (for an agent that serves
    /// HTTPS, which `/healthz` polling over HTTP cannot reach).
    pub fn spawn_wrapped(wrapper: &[&str], args: &[&str]) -> Agent {
        require_root();
        let port = free_port();
        let log = tempfile::NamedTempFile::new().expect("log file");
        let out = log.reopen().expect("reopen log");
        let err = log.reopen().expect("reopen log");
        let mut cmd = match wrapper.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(watchscope_bin());
                c
            }
            None => Command::new(watchscope_bin()),
        };
        let child = cmd
            .args(["run", "--listen", &format!("127.0.0.1:{port}"), "--log", "info"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("start watchscope");
        Agent { child: Some(child), port, log }
    }

    /// Whether the agent process is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    fn wait_ready(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!("watchscope exited early ({status}):\n{}", self.log_text());
            }
            if matches!(http_get(&self.url("/healthz")), Ok((200, _))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("watchscope not ready after {timeout:?}:\n{}", self.log_text());
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    pub fn metrics(&self) -> String {
        match http_get(&self.url("/metrics")) {
            Ok((200, body)) => body,
            other => panic!("GET /metrics failed: {other:?}\n{}", self.log_text()),
        }
    }

    /// One sample's value (0 when absent), e.g. `watchscope_execs_total` or
    /// `watchscope_process_execs_total{comm="x"}` (see [`sample_value`]).
    pub fn sample(&self, sample: &str) -> f64 {
        sample_value(&self.metrics(), sample).unwrap_or(0.0)
    }

    /// A sample that must exist, as a negative assertion needs it to: a zero
    /// read from a series that is not there (renamed, never exported) would
    /// pass for the wrong reason. Panics with the scrape when it is absent.
    pub fn sample_present(&self, sample: &str) -> f64 {
        present(&self.metrics(), sample)
    }

    /// Polls until `sample` reaches at least `want` or the timeout passes;
    /// returns the last value seen.
    pub fn wait_for_sample(&self, sample: &str, want: f64, timeout: Duration) -> f64 {
        let deadline = Instant::now() + timeout;
        loop {
            let v = self.sample(sample);
            if v >= want || Instant::now() >= deadline {
                return v;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until the agent has read every record its kernel programs had
    /// submitted to its ring buffers when this was called (exec and exit
    /// events; watch and window records while recording), as
    /// `/debug/probes` reports them: a scrape then includes everything the
    /// workload produced until now. The barrier for counts user space
    /// makes from ring records; kernel-side counts need none.
    pub fn wait_drained(&self) {
        let rings = |j: &serde_json::Value| -> Vec<(String, u64, u64)> {
            j["rings"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|r| {
                            let n = |k: &str| r[k].as_u64().unwrap_or(0);
                            (r["ring"].as_str().unwrap_or("").to_string(), n("submitted"), n("read"))
                        })
                        .collect()
                })
                .unwrap_or_default()
        };
        let want = rings(&debug_probes(self));
        assert!(!want.is_empty(), "/debug/probes lists no rings: {}", debug_probes(self));
        let mut last = Vec::new();
        let ok = wait_until(Duration::from_secs(20), || {
            last = rings(&debug_probes(self));
            want.iter().all(|(name, submitted, _)| last.iter().any(|(n, _, read)| n == name && read >= submitted))
        });
        assert!(ok, "rings not drained: submitted then {want:?}, now {last:?}\n{}", self.log_text());
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }

    /// Sends `signal` and waits for the exit status.
    pub fn stop_with(&mut self, signal: i32, timeout: Duration) -> ExitStatus {
        let mut child = self.child.take().expect("agent running");
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(child.id() as i32, signal) };
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return status;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("watchscope did not exit within {timeout:?} of signal {signal}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Agent {
    /// Sends `signal` and returns the exit status and how long the exit
    /// took, measured by a blocking wait (no poll interval in it).
    pub fn stop_timed(&mut self, signal: i32, timeout: Duration) -> (ExitStatus, Duration) {
        let mut child = self.child.take().expect("agent running");
        let pid = child.id() as i32;
        let (tx, rx) = std::sync::mpsc::channel();
        let start = Instant::now();
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(pid, signal) };
        std::thread::spawn(move || {
            let status = child.wait();
            let _ = tx.send((status, start.elapsed()));
        });
        match rx.recv_timeout(timeout) {
            Ok((Ok(status), took)) => (status, took),
            Ok((Err(e), _)) => panic!("waiting for watchscope: {e}"),
            Err(_) => {
                // SAFETY: kill(2) on our own child, not reaped yet.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                panic!("watchscope did not exit within {timeout:?} of signal {signal}");
            }
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if self.child.is_some() {
            // Unregistering uprobes waits for RCU grace periods: with one
            // perf link per site (`--uprobe-attach perf`), about 0.1 s per
            // site on this VM, one after another.
            self.stop_with(libc::SIGTERM, Duration::from_secs(30));
        }
    }
}

/// `sample`'s value in `text`, which must hold it (see
/// [`Agent::sample_present`]).
pub fn present(text: &str, sample: &str) -> f64 {
    sample_value(text, sample).unwrap_or_else(|| panic!("no sample {sample} in the scrape:\n{text}"))
}

/// Finds `sample` (`name` or `name{label="value",...}`) in exposition text.
/// Labels match as a set, whatever their order, and a label with an empty
/// value is the same as no label (as in Prometheus): so
/// `x{comm="etcd"}` finds `x{namespace="",pod="",container="",comm="etcd"}`,
/// but not a series that also has `pid="42"` or `pod="p"`.
pub fn sample_value(text: &str, sample: &str) -> Option<f64> {
    let (name, want) = parse_sample(sample)?;
    text.lines().find_map(|line| {
        if line.starts_with('#') {
            return None;
        }
        let (series, value) = line.rsplit_once(' ')?;
        let (n, labels) = parse_sample(series)?;
        (n == name && labels == want).then(|| value.parse().ok()).flatten()
    })
}

/// Every sample of metric `name` as (labels without empty ones, value).
pub fn samples(text: &str, name: &str) -> Vec<(std::collections::BTreeMap<String, String>, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (n, labels) = parse_sample(series)?;
            (n == name).then(|| Some((labels, value.parse().ok()?))).flatten()
        })
        .collect()
}

/// `name{a="x",b="y"}` → (name, {a: x, b: y}), empty values dropped;
/// escapes (`\"`, `\\`, `\n`) in values undone.
pub fn parse_sample(s: &str) -> Option<(&str, std::collections::BTreeMap<String, String>)> {
    let mut labels = std::collections::BTreeMap::new();
    let Some((name, rest)) = s.split_once('{') else { return Some((s.trim(), labels)) };
    let mut rest = rest.strip_suffix('}')?;
    while !rest.is_empty() {
        let (key, after) = rest.split_once("=\"")?;
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            let (i, c) = chars.next()?;
            match c {
                '\\' => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                '"' => break i,
                c => value.push(c),
            }
        };
        if !value.is_empty() {
            labels.insert(key.trim_start_matches(',').to_string(), value);
        }
        rest = after[end + 1..].trim_start_matches(',');
    }
    Some((name, labels))
}

/// A histogram read back from exposition text: cumulative counts per `le`.
#[derive(Clone, Debug, Default)]
pub struct Buckets {
    /// (upper bound in seconds, cumulative count), ascending; +Inf last.
    pub cumulative: Vec<(f64, f64)>,
}

impl Buckets {
    /// Parses `<family>_bucket{le="..",<labels>}` lines; `labels` is the rest
    /// of the label set exactly as rendered (e.g. `stage="x",comm="y"`).
    pub fn parse(text: &str, family: &str, labels: &str) -> Buckets {
        let Some((_, want)) = parse_sample(&format!("x{{{labels}}}")) else { return Buckets::default() };
        let mut cumulative: Vec<(f64, f64)> = samples(text, &format!("{family}_bucket"))
            .into_iter()
            .filter_map(|(mut l, v)| {
                let le = l.remove("le")?;
                (l == want).then(|| (if le == "+Inf" { f64::INFINITY } else { le.parse().unwrap_or(f64::NAN) }, v))
            })
            .collect();
        cumulative.sort_by(|a, b| a.0.total_cmp(&b.0));
        Buckets { cumulative }
    }

    pub fn count(&self) -> f64 {
        self.cumulative.last().map(|(_, c)| *c).unwrap_or(0.0)
    }

    /// Observations certainly >= `secs`: those above the first bound >= secs.
    pub fn at_least(&self, secs: f64) -> f64 {
        let below = self.cumulative.iter().find(|(le, _)| *le >= secs).map(|(_, c)| *c).unwrap_or(0.0);
        self.count() - below
    }

    /// Observations in the bucket that holds `secs` or above it: what a
    /// delay of at least `secs` must land in, whatever the bucket bounds.
    pub fn from_bucket_of(&self, secs: f64) -> f64 {
        let below = self.cumulative.iter().rev().find(|(le, _)| *le < secs).map(|(_, c)| *c).unwrap_or(0.0);
        self.count() - below
    }

    /// Observations certainly < `secs`: those under the last bound <= secs.
    pub fn below(&self, secs: f64) -> f64 {
        self.cumulative.iter().rev().find(|(le, _)| *le <= secs).map(|(_, c)| *c).unwrap_or(0.0)
    }
}

/// What `watchscope inspect <bin>` prints.
pub fn inspect_text(bin: &std::path::Path) -> String {
    let o = Command::new(watchscope_bin()).arg("inspect").arg(bin).output().expect("watchscope inspect");
    String::from_utf8_lossy(&o.stdout).to_string()
}

/// The node's `kernel.bpf_stats_enabled`, set for as long as this lives and
/// put back as it was after, however the test or benchmark round ends.
pub struct BpfStatsSysctl(String);

impl BpfStatsSysctl {
    const PATH: &str = "/proc/sys/kernel/bpf_stats_enabled";

    pub fn set(on: bool) -> std::io::Result<Self> {
        let old = std::fs::read_to_string(Self::PATH)?;
        std::fs::write(Self::PATH, if on { "1" } else { "0" })?;
        Ok(BpfStatsSysctl(old.trim().to_string()))
    }
}

impl Drop for BpfStatsSysctl {
    fn drop(&mut self) {
        let _ = std::fs::write(Self::PATH, &self.0);
    }
}

/// Waits until `f` returns true or the timeout passes; returns the last result.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Whether a `/debug/probes` document shows attached probes on the binary of
/// every one of `pids`.
pub fn probes_cover(probes: &serde_json::Value, pids: &[u32]) -> bool {
    let bins = probes["binaries"].as_array().cloned().unwrap_or_default();
    pids.iter().all(|pid| {
        bins.iter().any(|b| {
            b["attached"] == true
                && b["processes"].as_array().is_some_and(|p| p.iter().any(|p| p.as_u64() == Some(u64::from(*pid))))
        })
    })
}

/// Waits until the agent has probes on the binaries of these processes.
pub fn wait_attached(agent: &Agent, pids: &[u32]) {
    let ok = wait_until(Duration::from_secs(10), || probes_cover(&debug_probes(agent), pids));
    assert!(ok, "probes not attached for {pids:?}:\n{}", agent.log_text());
}

/// Names of the tracefs uprobe events agent `pid` defined
/// (`watchscope/ws<pid>_<n>` in uprobe_events).
pub fn uprobe_events_of(pid: u32) -> Vec<String> {
    let text = std::fs::read_to_string("/sys/kernel/tracing/uprobe_events").unwrap_or_default();
    let prefix = format!("ws{pid}_");
    text.lines()
        .filter_map(|l| l.split_whitespace().next()?.strip_prefix("p:watchscope/").map(str::to_string))
        .filter(|name| name.starts_with(&prefix))
        .collect()
}
