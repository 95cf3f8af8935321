//! `cargo xtask demo`: the incident, on loopback. etcd 3.5.30, a real
//! Kubernetes API server (apiextensions-apiserver 0.36) serving a custom
//! resource, an operator whose update handler grows a `map[int][256]byte`,
//! `kubectl get -w`, and a loop of updates of the custom resource, all
//! watched by `watchscope record`, which serves /metrics meanwhile and, at
//! the end (or on Ctrl-C), prints where the time went. The real programs
//! are the integration tests' (`tests/src/kube.rs`): one harness, so the
//! demo shows what the tests assert.
//!
//! `--etcd-only`: the quick demo — bookworm's etcd, `etcdctl watch`, a put
//! loop and `watchscope run`.

use std::{
    fs::File,
    path::Path,
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use clap::Args;

use watchscope_integration_tests as harness;

use crate::{
    setup::{self, Purpose, SetupArgs},
    util::{self, step},
};

/// The integration tests' harness for the real programs.
mod kube_demo {
    pub use super::harness::{
        etcd::{Build, Etcd},
        kube::ApiServer,
    };
}

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Port for the agent's /metrics.
    #[arg(long, default_value_t = 9478)]
    pub port: u16,
    /// etcd client port on 127.0.0.1 (the peer port is this + 10).
    #[arg(long, default_value_t = 23790)]
    pub etcd_port: u16,
    /// Stop by itself after this many seconds (default: run until Ctrl-C).
    #[arg(long)]
    pub duration: Option<u64>,
    /// Only etcd, `etcdctl watch` and the agent (no Kubernetes API server,
    /// no operator, nothing to build).
    #[arg(long)]
    pub etcd_only: bool,
    /// Map keys the operator's update handler adds per update (the
    /// incident's growing `map[int][256]byte`).
    #[arg(long, default_value_t = 20_000)]
    pub grow: u32,
}

/// Children are stopped in reverse start order when this drops.
struct Processes(Vec<(String, Child)>);

impl Processes {
    fn spawn(&mut self, name: &str, cmd: &mut Command, log: &Path) -> Result<()> {
        let out = File::create(log).with_context(|| format!("create {}", log.display()))?;
        let err = out.try_clone()?;
        println!("    $ {}   (log: {})", util::show(cmd), log.display());
        let child =
            cmd.stdin(Stdio::null()).stdout(out).stderr(err).spawn().with_context(|| format!("cannot start {name}"))?;
        self.0.push((name.to_string(), child));
        Ok(())
    }

    fn check_alive(&mut self) -> Result<()> {
        for (name, child) in &mut self.0 {
            if let Some(status) = child.try_wait()? {
                bail!("{name} exited early ({status}); see its log");
            }
        }
        Ok(())
    }
}

impl Drop for Processes {
    fn drop(&mut self) {
        for (name, child) in self.0.iter_mut().rev() {
            // SIGTERM first: the agent detaches its probes on SIGTERM.
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
            println!("    stopped {name}");
        }
    }
}

/// Setup, the release agent, and a flag Ctrl-C sets: what both demos start with.
fn prepare() -> Result<(std::path::PathBuf, Arc<AtomicBool>)> {
    setup::run(&SetupArgs { purpose: Some(Purpose::Demo) })?;
    if !util::is_root() {
        bail!("the agent loads eBPF programs and needs root: run `sudo -E cargo xtask demo`");
    }
    step("build the agent (release)");
    util::run(util::cargo().args(["build", "--release", "-p", "watchscope"]))?;
    let agent = util::workspace_root().join("target/release/watchscope");
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    ctrlc::set_handler(move || s.store(true, Ordering::SeqCst)).context("installing the Ctrl-C handler")?;
    Ok((agent, stop))
}

pub fn run(args: &DemoArgs) -> Result<()> {
    if args.etcd_only {
        return etcd_only(args);
    }
    let (agent, stop) = prepare()?;

    let dir = tempfile::Builder::new().prefix("watchscope-demo-").tempdir()?;
    // The recording lasts as long as the demo, which ends it with SIGINT
    // (on Ctrl-C the terminal sends it too): it then prints its report.
    step("start `watchscope record` (serves /metrics meanwhile; prints its report at the end)");
    let mut record = Command::new(&agent)
        .args(["record", "--duration", "24h", "--listen", &format!("127.0.0.1:{}", args.port)])
        .args(["--comm", "etcd,kube-apiserver,operator,kubectl"])
        // The operator's own per-update work, as a user names theirs.
        .args(["--window", "operator_update=main.handleUpdate"])
        .stdin(Stdio::null())
        .stderr(File::create(dir.path().join("record.log"))?)
        .spawn()
        .context("cannot start watchscope record")?;
    println!("    log: {}", dir.path().join("record.log").display());

    step("start etcd 3.5.30 (Debian sid) on loopback");
    let etcd = kube_demo::Etcd::start_build(kube_demo::Build::Sid3530, "etcd", "etcdctl");
    step("build and start a Kubernetes API server (apiextensions-apiserver 0.36; the first build takes minutes)");
    let api = kube_demo::ApiServer::start(&etcd, "kube-apiserver");
    println!("    https://127.0.0.1:{}  (kubeconfig: {})", api.port, api.kubeconfig_path().display());
    api.create("demo");
    step(&format!(
        "start the operator (a typed informer on EtcdCluster; its update handler adds {} map[int][256]byte keys)",
        args.grow
    ));
    let operator = api.operator("operator", &[&format!("-grow={}", args.grow)]);
    step("start a second watcher: kubectl get etcdclusters -w (kubectl 1.36)");
    let kubectl = api.kubectl_watch("kubectl");

    let url = format!("http://127.0.0.1:{}/metrics", args.port);
    step(&format!("metrics: {url}   (curl -s {url} | grep watchscope_watch)"));
    println!("    updating etcdclusters/demo every 500 ms; Ctrl-C stops and prints the report");
    let start = Instant::now();
    let mut n = 0u64;
    while !stop.load(Ordering::SeqCst) && args.duration.is_none_or(|d| start.elapsed() < Duration::from_secs(d)) {
        if let Some(status) = record.try_wait()? {
            bail!("watchscope record exited early ({status}); see its log");
        }
        n += 1;
        api.patch_size("demo", n);
        std::thread::sleep(Duration::from_millis(500));
    }
    step(&format!(
        "stopping after {n} updates (the operator handled {}, kubectl saw {})",
        operator.count(|l| l.starts_with("handled update")),
        kubectl.lines().len()
    ));
    // SAFETY: kill(2) on our own child's pid: record prints its report.
    unsafe { libc::kill(record.id() as i32, libc::SIGINT) };
    let status = record.wait()?;
    drop((kubectl, operator, api, etcd, dir));
    if !status.success() {
        bail!("watchscope record failed ({status})");
    }
    Ok(())
}

/// The quick demo: bookworm's etcd, `etcdctl watch`, puts, `watchscope run`.
fn etcd_only(args: &DemoArgs) -> Result<()> {
    let (agent, stop) = prepare()?;

    let dir = tempfile::Builder::new().prefix("watchscope-demo-").tempdir()?;
    let d = dir.path();
    let client = format!("http://127.0.0.1:{}", args.etcd_port);
    let peer = format!("http://127.0.0.1:{}", args.etcd_port + 10);
    let mut procs = Processes(Vec::new());

    step("start the agent");
    procs.spawn(
        "watchscope",
        Command::new(&agent).args(["run", "--listen", &format!("127.0.0.1:{}", args.port)]),
        &d.join("watchscope.log"),
    )?;

    step("start etcd on loopback");
    procs.spawn(
        "etcd",
        Command::new("etcd").args([
            "--name=demo",
            &format!("--data-dir={}", d.join("etcd").display()),
            &format!("--listen-client-urls={client}"),
            &format!("--advertise-client-urls={client}"),
            &format!("--listen-peer-urls={peer}"),
            &format!("--initial-advertise-peer-urls={peer}"),
            &format!("--initial-cluster=demo={peer}"),
        ]),
        &d.join("etcd.log"),
    )?;
    wait_for_etcd(&client, &mut procs)?;

    step("start a watcher (etcdctl watch --prefix /demo/)");
    procs.spawn(
        "etcdctl watch",
        Command::new("etcdctl").args([&format!("--endpoints={client}"), "watch", "--prefix", "/demo/"]),
        &d.join("watch.log"),
    )?;

    let url = format!("http://127.0.0.1:{}/metrics", args.port);
    step(&format!("metrics: {url}   (curl -s {url} | grep watchscope_)"));
    println!("    putting a key every 500 ms; Ctrl-C stops everything");
    let start = Instant::now();
    let mut n = 0u64;
    while !stop.load(Ordering::SeqCst) {
        if args.duration.is_some_and(|secs| start.elapsed() >= Duration::from_secs(secs)) {
            break;
        }
        procs.check_alive()?;
        n += 1;
        let ok = util::succeeds(Command::new("etcdctl").args([
            &format!("--endpoints={client}"),
            "put",
            &format!("/demo/key-{}", n % 50),
            &format!("value-{n}"),
        ]));
        if !ok {
            eprintln!("    put {n} failed");
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    step(&format!("stopping after {n} puts"));
    drop(procs);
    Ok(())
}

fn wait_for_etcd(client: &str, procs: &mut Processes) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        procs.check_alive()?;
        if util::succeeds(Command::new("etcdctl").args([&format!("--endpoints={client}"), "endpoint", "health"])) {
            println!("    etcd is healthy at {client}");
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    bail!("etcd did not become healthy within 20 s")
}
