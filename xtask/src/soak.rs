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
    /// Other watched processes started (and exiting) per second.
    #[arg(long, default_value_t = 200)]
    pub execs_per_second: u32,
    /// Run those processes in a pod whose kubelet accepts connections and
    /// never answers (`--stalled-kubelet=false`: no kubelet at all).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, num_args = 0..=1, require_equals = true,
          default_missing_value = "true")]
    pub stalled_kubelet: bool,
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
        execs_per_second: args.execs_per_second,
        stalled_kubelet: args.stalled_kubelet,
    };
    step(&format!(
        "soak for {} s: {} watches on {} streams, {} writers, each put its own etcdctl, {} other execs/s",
        cfg.seconds,
        cfg.streams * cfg.watches_per_stream,
        cfg.streams,
        cfg.writers,
        cfg.execs_per_second
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
    println!(
        "    paced execs: started {} ({:.0}/s), counted {}",
        r.churn_execs,
        r.churn_execs as f64 / r.seconds,
        r.churn_counted
    );
    if cfg.stalled_kubelet {
        println!("    the hung kubelet: {} connections from the agent, none answered", r.kubelet_connections);
    }
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
