//! Real etcd for the tests: Debian's etcd builds (bookworm's 3.4.23 from the
//! system, trixie's 3.5.16 and sid's 3.5.30 from the setup's cache) on
//! loopback ports with a temporary data directory, a real `etcdctl watch` of
//! the same version, and the slow gateway watcher fixture. Each test runs
//! copies of the binaries under names of its own, so the agent's per-comm
//! series count only that test's processes.

use std::{
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use crate::{free_port, stop_child};

/// Copies `src` to `dir/name` (a fresh inode, a comm of our choosing).
pub fn copy_binary(src: impl AsRef<Path>, dir: &Path, name: &str) -> PathBuf {
    let src = src.as_ref();
    assert!(name.len() <= 15, "comm names are at most 15 bytes: {name}");
    let dst = dir.join(name);
    std::fs::copy(src, &dst)
        .unwrap_or_else(|e| panic!("copy {}: {e} (is etcd-server/etcd-client installed?)", src.display()));
    dst
}

/// Runs each named test function `fn(Build)` on the etcd builds named, as
/// one `#[test]` per build in a module per build (`Build` must be in scope
/// where it is used):
/// `on_builds!([etcd_3_4_23, Bookworm3423], [etcd_3_5_30, Sid3530]: [a_test, another]);`
#[macro_export]
macro_rules! on_builds {
    ($([$module:ident, $build:ident]),* : $tests:tt) => {
        $($crate::on_builds!(@one $module, $build, $tests);)*
    };
    (@one $module:ident, $build:ident, [$($test:ident),* $(,)?]) => {
        mod $module {
            $(#[test] fn $test() { super::$test(super::Build::$build) })*
        }
    };
}

/// An etcd build the tests run: server and etcdctl of one version.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Build {
    /// Debian bookworm's etcd 3.4.23 (Go 1.19), installed in the system.
    Bookworm3423,
    /// Debian trixie's etcd 3.5.16 (Go 1.24, GOPATH build: no `/v3` names).
    Trixie3516,
    /// Debian sid's etcd 3.5.30 (Go 1.26, GOPATH build).
    Sid3530,
    /// Debian bullseye's etcd 3.3.25 (Go 1.15: arguments on the stack;
    /// `github.com/coreos/etcd` names; gogo `XXX_` fields).
    Bullseye3325,
}

impl Build {
    pub fn server(self) -> PathBuf {
        match self {
            Build::Bookworm3423 => PathBuf::from("/usr/bin/etcd"),
            Build::Trixie3516 => crate::debcache::file("etcd-server", "3.5.16", "usr/bin/etcd"),
            Build::Sid3530 => crate::debcache::file("etcd-server", "3.5.30", "usr/bin/etcd"),
            Build::Bullseye3325 => crate::debcache::file("etcd-server", "3.3.25", "usr/bin/etcd"),
        }
    }

    pub fn ctl(self) -> PathBuf {
        match self {
            Build::Bookworm3423 => PathBuf::from("/usr/bin/etcdctl"),
            Build::Trixie3516 => crate::debcache::file("etcd-client", "3.5.16", "usr/bin/etcdctl"),
            Build::Sid3530 => crate::debcache::file("etcd-client", "3.5.30", "usr/bin/etcdctl"),
            Build::Bullseye3325 => crate::debcache::file("etcd-client", "3.3.25", "usr/bin/etcdctl"),
        }
    }

    /// Whether its Go passes arguments and `g` in registers (Go >= 1.17):
    /// the Go runtime probes and handler windows need it.
    pub fn register_abi(self) -> bool {
        self != Build::Bullseye3325
    }

    /// A short tag for comm names (15 bytes at most in all).
    pub fn tag(self) -> &'static str {
        match self {
            Build::Bookworm3423 => "34",
            Build::Trixie3516 => "516",
            Build::Sid3530 => "530",
            Build::Bullseye3325 => "33",
        }
    }

    /// Where etcd's JSON gateway serves the v3 API (3.3 only has the beta
    /// prefix).
    pub fn gateway_prefix(self) -> &'static str {
        match self {
            Build::Bullseye3325 => "/v3beta",
            _ => "/v3",
        }
    }

    /// `base` made this build's own comm name.
    pub fn comm(self, base: &str) -> String {
        format!("{base}{}", self.tag())
    }
}

pub struct Etcd {
    child: Option<Child>,
    pub build: Build,
    pub bin: PathBuf,
    pub ctl: PathBuf,
    pub dir: tempfile::TempDir,
    pub client_port: u16,
    pub peer_port: u16,
    /// Extra server flags, kept across restarts.
    flags: Vec<String>,
}

impl Etcd {
    /// Starts bookworm's etcd as `server_comm`, with `etcdctl` copied as
    /// `client_comm`.
    pub fn start(server_comm: &str, client_comm: &str) -> Etcd {
        Etcd::start_build(Build::Bookworm3423, server_comm, client_comm)
    }

    /// Starts `build`'s etcd as `server_comm`, with its `etcdctl` copied as
    /// `client_comm`.
    pub fn start_build(build: Build, server_comm: &str, client_comm: &str) -> Etcd {
        Etcd::start_with(build, server_comm, client_comm, &[])
    }

    /// As [`Etcd::start_build`], with extra server flags.
    pub fn start_with(build: Build, server_comm: &str, client_comm: &str, flags: &[&str]) -> Etcd {
        let dir = tempfile::tempdir().expect("temp dir");
        let bin = copy_binary(build.server(), dir.path(), server_comm);
        let ctl = copy_binary(build.ctl(), dir.path(), client_comm);
        let flags = flags.iter().map(|f| f.to_string()).collect();
        let mut etcd =
            Etcd { child: None, build, bin, ctl, dir, client_port: free_port(), peer_port: free_port(), flags };
        etcd.spawn();
        etcd
    }

    fn spawn(&mut self) {
        let client = self.endpoint();
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("etcd.log"))
            .expect("etcd log");
        let child = Command::new(&self.bin)
            .args([
                "--name=t",
                &format!("--data-dir={}", self.dir.path().join("data").display()),
                &format!("--listen-client-urls={client}"),
                &format!("--advertise-client-urls={client}"),
                &format!("--listen-peer-urls={peer}"),
                &format!("--initial-advertise-peer-urls={peer}"),
                &format!("--initial-cluster=t={peer}"),
            ])
            .args(&self.flags)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start etcd");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if self.ctl_ok(&["endpoint", "health"]) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("etcd not healthy: {}", std::fs::read_to_string(self.dir.path().join("etcd.log")).unwrap_or_default());
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    /// Sends `sig` to the etcd server (SIGSTOP / SIGCONT).
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        let rc = unsafe { libc::kill(self.pid() as i32, sig) };
        assert_eq!(rc, 0, "kill({}, {sig})", self.pid());
    }

    fn ctl(&self) -> Command {
        let mut c = Command::new(&self.ctl);
        // etcdctl 3.3 speaks the v2 API unless told otherwise.
        c.env("ETCDCTL_API", "3");
        c.arg(format!("--endpoints={}", self.endpoint()));
        c
    }

    fn ctl_ok(&self, args: &[&str]) -> bool {
        self.ctl().args(args).stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success())
    }

    pub fn put(&self, key: &str, value: &str) {
        let out = self.ctl().args(["put", key, value]).output().expect("etcdctl put");
        assert!(out.status.success(), "put {key}: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// A put that waits up to `timeout` for etcd (etcdctl's own limit is
    /// 5 s): for a put issued while etcd is stopped.
    pub fn put_waiting(&self, key: &str, value: &str, timeout: Duration) {
        let out = self
            .ctl()
            .arg(format!("--command-timeout={}s", timeout.as_secs().max(1)))
            .args(["put", key, value])
            .output()
            .expect("etcdctl put");
        assert!(out.status.success(), "put {key}: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// Puts `n` keys `{prefix}0..n`, each a value of `bytes` bytes: large
    /// values fill a slow watcher's stream, sockets and HTTP/2 windows after
    /// a dozen events. etcdctl reads each value from stdin (too large for an
    /// argument).
    pub fn put_large(&self, prefix: &str, n: usize, bytes: usize) {
        let mut i = 0;
        self.put_large_until(prefix, bytes, n, || {
            i += 1;
            i >= n
        });
    }

    /// Puts large values (`{prefix}0`, `{prefix}1`, ...) one at a time until
    /// `done()` says so after a put, at most `max`; returns how many. The
    /// number it takes to fill a slow watcher's buffers depends on the
    /// machine, so tests put until the agent reports the send blocked.
    pub fn put_large_until(&self, prefix: &str, bytes: usize, max: usize, mut done: impl FnMut() -> bool) -> usize {
        let file = self.dir.path().join("value");
        std::fs::write(&file, "v".repeat(bytes)).expect("value file");
        for i in 0..max {
            let status = self
                .ctl()
                .args(["put", &format!("{prefix}{i}")])
                .stdin(std::fs::File::open(&file).expect("open value"))
                .stdout(Stdio::null())
                .status()
                .expect("etcdctl put");
            assert!(status.success(), "put {prefix}{i}");
            if done() {
                return i + 1;
            }
        }
        max
    }

    /// One transaction of several puts (one revision, several events).
    pub fn txn_puts(&self, kvs: &[(&str, &str)]) {
        // etcdctl txn reads: compares, blank line, success ops, blank line,
        // failure ops, blank line.
        let mut script = String::from("\n");
        for (k, v) in kvs {
            script.push_str(&format!("put {k} {v}\n"));
        }
        script.push_str("\n\n");
        let mut child = self
            .ctl()
            .arg("txn")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("etcdctl txn");
        child.stdin.take().expect("stdin").write_all(script.as_bytes()).expect("write txn");
        let out = child.wait_with_output().expect("txn");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && text.contains("SUCCESS"),
            "txn failed: {text} {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Stops etcd (SIGTERM) and starts it again on the same data and ports.
    pub fn restart(&mut self) {
        if let Some(mut c) = self.child.take() {
            stop_child(&mut c);
        }
        self.spawn();
    }

    /// Starts `etcdctl watch --prefix <prefix>` (a real clientv3 client).
    pub fn watch(&self, prefix: &str) -> LineReader {
        self.watch_with(prefix, &[])
    }

    /// Watchers etcd itself has registered (`etcd_debugging_mvcc_watcher_total`
    /// on its /metrics): what a test waits on before it writes, instead of
    /// sleeping while a client sets its watches up.
    pub fn watchers(&self) -> u64 {
        let text = crate::http_get(&format!("{}/metrics", self.endpoint())).map(|(_, b)| b).unwrap_or_default();
        crate::sample_value(&text, "etcd_debugging_mvcc_watcher_total").unwrap_or(0.0) as u64
    }

    /// etcd's current revision (`etcd_debugging_mvcc_current_revision`).
    pub fn revision(&self) -> i64 {
        let text = crate::http_get(&format!("{}/metrics", self.endpoint())).map(|(_, b)| b).unwrap_or_default();
        crate::sample_value(&text, "etcd_debugging_mvcc_current_revision").unwrap_or(0.0) as i64
    }

    /// `etcdctl watch -i`, its stdin and stdout piped: watches are added by
    /// writing `watch ...` lines.
    pub fn spawn_interactive(&self) -> Child {
        self.ctl()
            .args(["watch", "-i"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("etcdctl watch -i")
    }

    /// An `etcdctl` command against this etcd, to add arguments to.
    pub fn ctl_command(&self) -> Command {
        self.ctl()
    }

    /// Waits until etcd has at least `n` watchers registered.
    pub fn wait_watchers(&self, n: u64, timeout: Duration) {
        let ok = crate::wait_until(timeout, || self.watchers() >= n);
        assert!(ok, "etcd has {} watchers, not {n}, after {timeout:?}", self.watchers());
    }

    /// `etcdctl watch` with extra flags (e.g. `--progress-notify`).
    pub fn watch_with(&self, prefix: &str, flags: &[&str]) -> LineReader {
        let child = self
            .ctl()
            .args(["watch", "--prefix", prefix])
            .args(flags)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("etcdctl watch");
        LineReader::new(child)
    }

    /// `etcdctl watch -i` watching `prefix`: each [`LineReader::send`] of
    /// `progress` then sends one progress request on the watch stream, the
    /// request the API server sends while a read waits for its cache.
    pub fn watch_interactive(&self, prefix: &str) -> LineReader {
        let mut r = LineReader::new(self.spawn_interactive());
        r.send(&format!("watch --prefix {prefix}"));
        r
    }

    /// Starts the slow gateway watcher fixture on `prefix`.
    pub fn slow_watcher(&self, prefix: &str) -> LineReader {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/etcd/slow_watcher.py");
        let child = Command::new("python3")
            .arg(script)
            .args(["--port", &self.client_port.to_string(), "--prefix", prefix])
            .args(["--api", self.build.gateway_prefix()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("slow watcher");
        let r = LineReader::new(child);
        assert!(
            r.wait_for(|l| l == "watching", Duration::from_secs(10)),
            "slow watcher did not start: {:?}",
            r.lines()
        );
        r
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            stop_child(&mut c);
        }
    }
}

/// A child whose stdout lines are collected in the background.
pub struct LineReader {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Arc<Mutex<Vec<String>>>,
    /// The thread collecting stdout: done once the pipe reached its end.
    reader: Option<std::thread::JoinHandle<()>>,
}

impl LineReader {
    /// Collects `child`'s stdout (which must be piped) line by line.
    pub fn new(mut child: Child) -> Self {
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stdout = child.stdout.take().expect("piped stdout");
        let sink = lines.clone();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                sink.lock().expect("lines").push(line);
            }
        });
        let stdin = child.stdin.take();
        Self { child, stdin, lines, reader: Some(reader) }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().expect("lines").clone()
    }

    pub fn count(&self, pred: impl Fn(&str) -> bool) -> usize {
        self.lines().iter().filter(|l| pred(l)).count()
    }

    /// Waits until a line satisfies `pred`.
    pub fn wait_for(&self, pred: impl Fn(&str) -> bool, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.lines().iter().any(|l| pred(l)) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// Waits until at least `n` lines satisfy `pred`.
    pub fn wait_count(&self, pred: impl Fn(&str) -> bool, n: usize, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        loop {
            let c = self.count(&pred);
            if c >= n || Instant::now() >= deadline {
                return c;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until the child has exited (its stdout then has every line).
    pub fn wait_exit(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                // Every line is in once the reader reached the pipe's end.
                if let Some(r) = self.reader.take() {
                    let _ = r.join();
                }
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// Sends a command line to the child's stdin.
    pub fn send(&mut self, line: &str) {
        if let Some(s) = self.stdin.as_mut() {
            let _ = writeln!(s, "{line}");
            let _ = s.flush();
        }
    }
}

impl Drop for LineReader {
    fn drop(&mut self) {
        stop_child(&mut self.child);
    }
}

/// Events the agent saw queued to a watcher (`commit_to_enqueue`) but not
/// yet handed to gRPC (`commit_to_send`) on server `comm`, from exposition
/// text: while a watcher's stream is blocked, its events pile up here.
pub fn unsent(text: &str, comm: &str) -> f64 {
    let count = |stage: &str| {
        crate::Buckets::parse(text, "watchscope_watch_stage_seconds", &format!("stage=\"{stage}\",comm=\"{comm}\""))
            .count()
    };
    count("commit_to_enqueue") - count("commit_to_send")
}
