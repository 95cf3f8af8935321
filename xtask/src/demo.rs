//! `cargo xtask demo`: a real etcd on loopback, a real watcher (`etcdctl
//! watch`), a loop of puts, and the agent serving /metrics. Ctrl-C (or
//! --duration) stops everything and removes the temporary data directory.

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

use crate::{
    setup::{self, Purpose, SetupArgs},
    util::{self, step},
};

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

pub fn run(args: &DemoArgs) -> Result<()> {
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
