//! The agent's own metrics: per-program run counts and times from the
//! kernel's BPF statistics, probes by kind.

use std::{process::Command, time::Duration};

use watchscope_integration_tests::{Agent, BpfStatsSysctl, wait_until};

const EXEC_RUNS: &str = "watchscope_program_runs_total{program=\"sched_process_exec\"}";
const EXEC_TIME: &str = "watchscope_program_run_seconds_total{program=\"sched_process_exec\"}";

#[test]
fn the_exec_program_run_count_grows_by_at_least_the_execs() {
    const N: u32 = 200;
    let agent = Agent::start(&["--comm", "wsnone", "--sidecar-comm", "wsnone", "--bpf-stats"]);
    let before = agent.sample(EXEC_RUNS);
    let time_before = agent.sample(EXEC_TIME);
    for _ in 0..N {
        assert!(Command::new("/bin/true").status().expect("run true").success());
    }
    // Other processes on the machine exec too: at least N, never fewer.
    let grew = wait_until(Duration::from_secs(5), || agent.sample(EXEC_RUNS) - before >= f64::from(N));
    let runs = agent.sample(EXEC_RUNS) - before;
    assert!(grew, "sched_process_exec ran {runs} times for {N} execs");
    let secs = agent.sample(EXEC_TIME) - time_before;
    // Some time, and under 100 µs a run (it is a few hundred ns here).
    assert!(secs > 0.0 && secs / runs < 100e-6, "{secs} s over {runs} runs");
    // The kernel exec counter agrees.
    assert!(agent.sample("watchscope_execs_total") >= f64::from(N));
}

/// Every kernel program loads with room to spare under the verifier's limit
/// of 1,000,000 processed instructions. A kernel update once took two of
/// them past it (the per-event loops, see agent-ebpf's `Callback`): the
/// agent then refused to start, and every test failed the same way; this
/// one names the program and its figure, and warns at a quarter of the
/// limit. Read from the running agent, with statistics off (the figure
/// does not need them).
#[test]
fn every_kernel_program_verifies_well_under_the_limit() {
    let agent = Agent::start(&["--comm", "wsnone", "--sidecar-comm", "wsnone"]);
    let probes = watchscope_integration_tests::debug_probes(&agent);
    let verified = probes["verified_insns"].as_object().expect("verified_insns");
    for name in
        watchscope::attach::UPROBE_PROGRAMS.iter().chain(&["sc_sys_exit", "sc_tcp_retransmit", "go_sched_switch"])
    {
        let n = verified.get(*name).and_then(|v| v.as_u64());
        assert!(n.is_some_and(|n| n > 0), "{name} not loaded: {probes}");
    }
    let over: Vec<_> = verified.iter().filter(|(_, n)| n.as_u64().is_none_or(|n| n > 250_000)).collect();
    assert!(over.is_empty(), "programs over a quarter of the verifier's limit: {over:?}");
}

/// Statistics cost every BPF program on the node two clock reads per run,
/// so the agent turns them on only when asked (`--bpf-stats`).
#[test]
fn bpf_stats_are_off_unless_asked() {
    let agent = Agent::start(&["--comm", "wsnone", "--sidecar-comm", "wsnone"]);
    for _ in 0..10 {
        assert!(Command::new("/bin/true").status().expect("run true").success());
    }
    // The exec programs ran (they are done when exec returns), and their
    // events have been read.
    agent.wait_drained();
    let text = agent.metrics();
    assert!(text.contains("# TYPE watchscope_program_runs_total counter"), "the family is declared");
    assert!(!text.contains("watchscope_program_runs_total{"), "no series without statistics:\n{text}");
}

/// Without `--bpf-stats`, the node's `kernel.bpf_stats_enabled=1` gives
/// the series (what the DaemonSet without CAP_SYS_ADMIN relies on), and
/// they go when it is turned off again.
#[test]
fn the_nodes_sysctl_alone_gives_the_run_metrics_while_it_is_on() {
    let agent = Agent::start(&["--comm", "wsnone", "--sidecar-comm", "wsnone"]);
    let on = BpfStatsSysctl::set(true).expect("turn the sysctl on");
    let before = agent.sample(EXEC_RUNS);
    for _ in 0..10 {
        assert!(Command::new("/bin/true").status().expect("run true").success());
    }
    assert!(wait_until(Duration::from_secs(5), || agent.sample(EXEC_RUNS) - before >= 10.0), "{}", agent.metrics());
    drop(on);
    let _off = BpfStatsSysctl::set(false).expect("turn the sysctl off");
    assert!(!agent.metrics().contains("watchscope_program_runs_total{"), "no series once it is off");
}

/// The agent's map memory, as the kernel accounts it, is what `check`
/// projects for this node from the object's map definitions (within 3 %),
/// and stays within the design bound projected to 96 CPUs.
#[test]
fn the_map_memory_reported_is_what_check_projects_and_stays_bounded() {
    use watchscope::collect::mapmem;
    let agent = Agent::start(&["--comm", "wsnone", "--sidecar-comm", "wsnone"]);
    let text = agent.metrics();
    let maps: Vec<(String, f64)> = text
        .lines()
        .filter_map(|l| l.strip_prefix("watchscope_bpf_map_bytes{map=\""))
        .filter_map(|l| {
            let (name, rest) = l.split_once("\"}")?;
            Some((name.to_string(), rest.trim().parse::<f64>().ok()?))
        })
        .collect();
    let defs = mapmem::agent_maps().expect("the agent's object");
    // Every map of the object is held, under its own full name (the kernel
    // keeps 15 bytes of it: two maps would share one), once; plus what the
    // loader adds (.rodata).
    for d in &defs {
        assert_eq!(maps.iter().filter(|(n, _)| *n == d.name).count(), 1, "{} not reported once: {maps:?}", d.name);
    }
    let mut names: Vec<&String> = maps.iter().map(|(n, _)| n).collect();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), maps.len(), "a map name twice: {maps:?}");
    let measured: f64 = maps.iter().filter(|(n, _)| defs.iter().any(|d| d.name == *n)).map(|m| m.1).sum();
    let cpus = std::fs::read_to_string("/sys/devices/system/cpu/possible")
        .ok()
        .as_deref()
        .and_then(mapmem::possible_cpus)
        .expect("possible CPUs");
    let projected = defs.iter().map(|d| mapmem::projected(d, cpus)).sum::<u64>() as f64;
    assert!((measured - projected).abs() / measured < 0.03, "measured {measured}, projected {projected}");
    let at96 = defs.iter().map(|d| mapmem::projected(d, 96)).sum::<u64>();
    assert!(at96 <= mapmem::BOUND_AT_96_CPUS, "{at96} bytes at 96 CPUs");
}

/// The agent prices a uprobe hit on its node at start (an empty program on
/// two functions of its own binary, its runs counted once per call before
/// the calls are timed: see `check`) and exports both costs; the kernel's
/// statistics it counted with are as they were before.
#[test]
fn what_a_uprobe_hit_costs_here_is_measured_at_start_and_exported() {
    let sysctl = || std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled").expect("bpf_stats_enabled");
    let before = sysctl();
    let agent = Agent::start(&["--comm", "wsnone", "--sidecar-comm", "wsnone"]);
    let text = agent.metrics();
    let cost = |instruction: &str| {
        let series = format!("watchscope_uprobe_hit_cost_seconds{{instruction=\"{instruction}\"}} ");
        text.lines().find_map(|l| l.strip_prefix(series.as_str())?.trim().parse::<f64>().ok())
    };
    for instruction in ["emulated", "single_step"] {
        let c = cost(instruction).unwrap_or_else(|| panic!("no {instruction} cost:\n{text}"));
        // A trap or two: neither nothing (a probe that never fired is not
        // priced at all) nor a stall.
        assert!((1e-8..1e-3).contains(&c), "{instruction}: {c} s per hit");
    }
    assert_eq!(sysctl(), before, "the statistics are as they were");
}
