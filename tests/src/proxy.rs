//! Proxies for the sidecar tests: Debian's haproxy and nginx as reverse
//! proxies on loopback in front of a backend with a known service time, and
//! the delay-injecting fixture. Real binaries are copied under names of the
//! test's own (their comm), so the agent measures only them.

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::{etcd::copy_binary, free_port, stop_child};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/proxy").join(name)
}

/// Starts a fixture that prints `listening <port>` and returns the port.
fn start_listening(cmd: &mut Command) -> (Child, u16) {
    let mut child =
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().expect("start fixture");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line).expect("read");
    let port = line.trim().strip_prefix("listening ").and_then(|p| p.parse().ok()).expect("listening <port>");
    (child, port)
}

/// The HTTP backend fixture.
pub struct Backend {
    child: Child,
    pub port: u16,
}

impl Backend {
    pub fn start(service_ms: f64, body_bytes: usize) -> Backend {
        let (child, port) = start_listening(Command::new("python3").arg(fixture("backend.py")).args([
            "--service-ms",
            &service_ms.to_string(),
            "--body-bytes",
            &body_bytes.to_string(),
        ]));
        Backend { child, port }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        stop_child(&mut self.child);
    }
}

/// A running proxy process (restartable).
pub struct Proxy {
    child: Option<Child>,
    cmd: Vec<String>,
    pub port: u16,
    pub dir: tempfile::TempDir,
}

impl Proxy {
    fn spawn(&mut self) {
        let child = Command::new(&self.cmd[0])
            .args(&self.cmd[1..])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start proxy");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "proxy did not listen on {}", self.port);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    /// Stops the proxy and starts it again (a new process, the same comm).
    pub fn restart(&mut self) {
        if let Some(mut c) = self.child.take() {
            stop_child(&mut c);
        }
        // Until the kernel has released the listening port (a proxy's
        // workers may hold it a moment after the master exits).
        let free = crate::wait_until(Duration::from_secs(10), || {
            std::net::TcpListener::bind(("127.0.0.1", self.port)).is_ok()
        });
        assert!(free, "port {} still held after the proxy stopped", self.port);
        self.spawn();
    }

    /// haproxy with `threads` threads, under the comm `name`.
    pub fn haproxy(name: &str, backend_port: u16, threads: u32) -> Proxy {
        let dir = tempfile::tempdir().expect("tmp");
        let bin = copy_binary("/usr/sbin/haproxy", dir.path(), name);
        let port = free_port();
        let cfg = dir.path().join("haproxy.cfg");
        std::fs::write(
            &cfg,
            format!(
                "global\n  nbthread {threads}\ndefaults\n  mode http\n  timeout connect 2s\n  timeout client 10s\n  \
                 timeout server 10s\nfrontend f\n  bind 127.0.0.1:{port}\n  default_backend b\nbackend b\n  \
                 server s1 127.0.0.1:{backend_port}\n"
            ),
        )
        .expect("config");
        let cmd = vec![bin.display().to_string(), "-f".into(), cfg.display().to_string(), "-db".into()];
        let mut p = Proxy { child: None, cmd, port, dir };
        p.spawn();
        p
    }

    /// nginx with `workers` worker processes, under the comm `name`.
    pub fn nginx(name: &str, backend_port: u16, workers: u32) -> Proxy {
        let dir = tempfile::tempdir().expect("tmp");
        let bin = copy_binary("/usr/sbin/nginx", dir.path(), name);
        let port = free_port();
        let d = dir.path().display().to_string();
        let cfg = dir.path().join("nginx.conf");
        std::fs::write(
            &cfg,
            format!(
                "worker_processes {workers};\ndaemon off;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
                 events {{ worker_connections 256; }}\nhttp {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  \
                 proxy_temp_path {d}/proxy;\n  upstream be {{ server 127.0.0.1:{backend_port}; keepalive 8; }}\n  \
                 server {{\n    listen 127.0.0.1:{port};\n    location / {{ proxy_pass http://be; proxy_http_version 1.1; \
                 proxy_set_header Connection \"\"; }}\n  }}\n}}\n"
            ),
        )
        .expect("config");
        let cmd = vec![bin.display().to_string(), "-c".into(), cfg.display().to_string(), "-p".into(), d];
        let mut p = Proxy { child: None, cmd, port, dir };
        p.spawn();
        p
    }

    /// The delay-injecting fixture (comm `python3`; measure it by pid).
    pub fn delay(backend_port: u16, delay_ms: f64) -> Proxy {
        let dir = tempfile::tempdir().expect("tmp");
        let port = free_port();
        let cmd = vec![
            "python3".to_string(),
            fixture("delay_proxy.py").display().to_string(),
            "--port".into(),
            port.to_string(),
            "--upstream-port".into(),
            backend_port.to_string(),
            "--delay-ms".into(),
            delay_ms.to_string(),
        ];
        let mut p = Proxy { child: None, cmd, port, dir };
        p.spawn();
        p
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            stop_child(&mut c);
        }
    }
}

/// Sends `n` requests through `port`: over one keep-alive connection, or a
/// new connection each (`Connection: close`), with a body of `body` bytes
/// (POST) or none (GET). Panics on any failure.
pub fn requests(port: u16, n: usize, keep_alive: bool, body: usize) {
    let agent: ureq::Agent = ureq::Agent::config_builder().timeout_global(Some(Duration::from_secs(10))).build().into();
    let url = format!("http://127.0.0.1:{port}/");
    let payload = vec![b'p'; body];
    for i in 0..n {
        let resp = if body > 0 {
            let mut r = agent.post(&url);
            if !keep_alive {
                r = r.header("Connection", "close");
            }
            r.send(&payload[..])
        } else {
            let mut r = agent.get(&url);
            if !keep_alive {
                r = r.header("Connection", "close");
            }
            r.call()
        };
        let mut resp = resp.unwrap_or_else(|e| panic!("request {i} through {port}: {e}"));
        resp.body_mut().read_to_vec().expect("read body");
    }
}

/// A network namespace of the test's own, with its loopback up; deleted on
/// drop. Traffic in it never leaves it.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(name: &str) -> Netns {
        let _ = Command::new("ip").args(["netns", "del", name]).status();
        let ok = Command::new("ip").args(["netns", "add", name]).status().is_ok_and(|s| s.success());
        assert!(ok, "ip netns add {name} (iproute2 needed)");
        let ns = Netns { name: name.to_string() };
        assert!(ns.cmd("ip").args(["link", "set", "lo", "up"]).status().is_ok_and(|s| s.success()));
        ns
    }

    /// `program` run inside the namespace (`ip netns exec` execs it: the
    /// child's pid is the program's).
    pub fn cmd(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }

    /// Starts a fixture inside the namespace; returns it and the port it printed.
    pub fn start_listening(&self, program: impl AsRef<std::ffi::OsStr>, args: &[&str]) -> (Child, u16) {
        start_listening(self.cmd(program).args(args))
    }

    /// Runs `nft` inside the namespace.
    pub fn nft(&self, args: &[&str]) {
        let out = self.cmd("nft").args(args).output().expect("nft (apt-get install nftables)");
        assert!(out.status.success(), "nft {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

/// A child process killed on drop.
pub struct Running(pub Child);

impl Drop for Running {
    fn drop(&mut self) {
        stop_child(&mut self.0);
    }
}

/// Where the fixtures live, for tests that start them their own way.
pub fn fixture_path(name: &str) -> PathBuf {
    fixture(name)
}
