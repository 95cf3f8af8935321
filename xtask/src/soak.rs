//! `cargo xtask soak`: the soak of `tests/src/soak.rs` at length (the
//! integration tests run a 10 s form). Prints what was counted on each
//! side and fails unless every family is accounted for exactly.

use anyhow::{Result, bail};
use clap::Args;
use watchscope_integration_tests::soak::{self, SoakConfig};

use crate::{
    setup::{self, Purpose, SetupArgs},
    util::{self, step},
};

#[derive(Args, Debug)]
pub struct SoakArgs {
    #[arg(long, default_value_t = 120)]
    pub seconds: u64,
    /// `etcdctl watch -i` streams.
    #[arg(long, default_value_t = 50)]
    pub streams: usize,
    /// Watches per stream.
    #[arg(long, default_value_t = 20)]
    pub watches: usize,
    /// Threads running `etcdctl put` one after another (each put is a
    /// watched process that starts and exits).
    #[arg(long, default_value_t = 4)]
    pub writers: usize,
}

pub fn run(args: &SoakArgs) -> Result<()> {
    setup::run(&SetupArgs { purpose: Some(Purpose::Test) })?;
    if !util::is_root() {
        bail!("the agent loads eBPF programs and needs root: run `sudo -E cargo xtask soak`");
    }
    step("build the agent (release)");
    util::run(util::cargo().args(["build", "--release", "-p", "watchscope"]))?;
    // SAFETY: set before any thread of ours reads the environment.
    unsafe { std::env::set_var("WATCHSCOPE_BIN", util::workspace_root().join("target/release/watchscope")) };
    let cfg = SoakConfig {
        seconds: args.seconds,
        streams: args.streams,
        watches_per_stream: args.watches,
        writers: args.writers,
    };
    step(&format!(
        "soak for {} s: {} watches on {} streams, {} writers, each put its own etcdctl",
        cfg.seconds,
        cfg.streams * cfg.watches_per_stream,
        cfg.streams,
        cfg.writers
    ));
    let r = soak::run(cfg, "wse-soak", "wsc-soak");
    step("results");
    println!(
        "    puts {} ({:.0}/s, each a process), etcd revisions {}",
        r.puts,
        r.puts as f64 / r.seconds,
        r.revisions
    );
    println!(
        "    events: printed by the watchers {}, counted by the agent: sent {} dispatched {}",
        r.received, r.server_events, r.client_events
    );
    println!("    execs: started {}, counted {}", r.execs, r.process_execs);
    println!("    dropped: {:?}", r.dropped);
    println!("    ring high-water marks (bytes): {:?}", r.ring_high_water);
    println!(
        "    agent: {:.1} s of CPU over {:.0} s ({:.1} % of a core), peak RSS {} MiB",
        r.agent_cpu_seconds,
        r.seconds,
        100.0 * r.agent_cpu_seconds / r.seconds,
        r.agent_peak_rss_kib / 1024
    );
    println!(
        "    timed: commit_to_send {}, enqueue_to_send {}, commit_to_dispatch {}",
        r.commit_to_send, r.enqueue_to_send, r.commit_to_dispatch
    );
    let checks = r.checks(&cfg);
    let mut failed = 0;
    for (what, ok) in checks {
        println!("    {} {what}", if ok { "PASS" } else { "FAIL" });
        failed += usize::from(!ok);
    }
    if failed > 0 {
        bail!("{failed} accounting checks failed");
    }
    Ok(())
}
