//! Go runtime timing on Go fixtures built here with Debian's Go 1.19
//! (classic maps) and Go 1.27 (Swiss tables), stripped: map growth counted
//! against the kernel's own uprobes on the very same instructions, windows
//! and their inner map time, exact map operation counts, and a program that
//! keeps copying its stack under every probe.

use std::{
    io::Write,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use watchscope_integration_tests::{
    Agent, Buckets, Piped, debug_probes,
    go::{Toolchain, go119, go127},
    go_sites, wait_until,
};

/// Builds the mapwork fixture, stripped, as `dir/name` (its comm).
fn build(t: &Toolchain, dir: &Path, name: &str) -> PathBuf {
    let out = dir.join(name);
    t.build_program("mapwork", &out, true);
    out
}

/// A fixture process that waits for a line before working.
struct Fixture(Piped);

impl Fixture {
    fn start(bin: &Path, args: &[&str]) -> Fixture {
        let mut cmd = Command::new(bin);
        cmd.args(args);
        let f = Fixture(Piped::spawn(cmd));
        assert_eq!(f.next(), "ready");
        f
    }

    fn next(&self) -> String {
        self.0.next(Duration::from_secs(120))
    }

    /// Starts the work and returns the fixture's result line.
    fn run(&mut self) -> String {
        self.0.send("go");
        let done = self.next();
        assert!(done.starts_with("done "), "{done}");
        done
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        self.0.send_quietly("exit");
    }
}

/// Counts hits of plain tracefs uprobes (the kernel's own, no BPF) at
/// `offsets` of `bin`, skipping the morestack pass the way the agent does.
struct TracefsCount {
    inst: PathBuf,
    group: String,
}

impl TracefsCount {
    fn start(bin: &Path, sites: &[(u64, u64)]) -> TracefsCount {
        let t = Path::new("/sys/kernel/tracing");
        // A group of its own per counter: several tests run in one process.
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let group = format!("wsg{}_{}", std::process::id(), N.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
        let mut defs = String::new();
        for (i, (off, _)) in sites.iter().enumerate() {
            defs.push_str(&format!("p:{group}/s{i} {}:{off:#x} fl=%flags:u64\n", bin.display()));
        }
        let mut f = std::fs::OpenOptions::new().append(true).open(t.join("uprobe_events")).expect("uprobe_events");
        f.write_all(defs.as_bytes()).expect("define uprobes");
        let inst = t.join("instances").join(&group);
        let _ = std::fs::remove_dir(&inst);
        std::fs::create_dir(&inst).expect("instance");
        std::fs::write(inst.join("buffer_size_kb"), "65536").expect("buffer");
        for (i, (_, guard)) in sites.iter().enumerate() {
            let ev = inst.join("events").join(&group).join(format!("s{i}"));
            // GUARD_X86_JBE = 1 (CF|ZF), GUARD_X86_JB = 2 (CF).
            let filter = match guard {
                1 => "!(fl & 65)",
                2 => "!(fl & 1)",
                _ => "0 == 0",
            };
            std::fs::write(ev.join("filter"), filter).expect("filter");
            std::fs::write(ev.join("enable"), "1").expect("enable");
        }
        TracefsCount { inst, group }
    }

    fn stop(self) -> f64 {
        let _ = std::fs::write(self.inst.join("events").join(&self.group).join("enable"), "0");
        let trace = std::fs::read_to_string(self.inst.join("trace")).unwrap_or_default();
        let lost: u64 = (0..64)
            .filter_map(|c| std::fs::read_to_string(self.inst.join(format!("per_cpu/cpu{c}/stats"))).ok())
            .filter_map(|s| s.lines().find_map(|l| l.strip_prefix("overrun: ")?.trim().parse::<u64>().ok()))
            .sum();
        assert_eq!(lost, 0, "the tracefs buffer overflowed; the ground truth is incomplete");
        trace.lines().filter(|l| l.contains(&format!("{}: (", "s")) || l.contains(": (0x")).count() as f64
    }
}

impl Drop for TracefsCount {
    fn drop(&mut self) {
        // Events must be off and their instance gone before the kernel lets
        // their definitions go.
        let _ = std::fs::write(self.inst.join("events").join(&self.group).join("enable"), "0");
        for _ in 0..50 {
            if std::fs::remove_dir(&self.inst).is_ok() || !self.inst.exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let t = Path::new("/sys/kernel/tracing/uprobe_events");
        for _ in 0..50 {
            let current = std::fs::read_to_string(t).unwrap_or_default();
            let ours: Vec<String> = current
                .lines()
                .filter_map(|l| l.split_whitespace().next()?.split_once(':').map(|(_, n)| n.to_string()))
                .filter(|n| n.starts_with(&format!("{}/", self.group)))
                .collect();
            if ours.is_empty() {
                return;
            }
            for name in ours {
                // One write() per command: tracefs parses each write on its
                // own, and writeln! may split a line into several.
                if let Ok(mut f) = std::fs::OpenOptions::new().append(true).open(t) {
                    let _ = f.write_all(format!("-:{name}\n").as_bytes());
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Every call of a planned growth function, counted by watchscope and by
/// the kernel's own uprobes (tracefs) on the same instructions. `evacuation`:
/// with `--go-maps=evacuation`, which adds a classic map's incremental
/// evacuations to where its growths start.
fn growth_matches_tracefs(t: &Toolchain, name: &str, evacuation: bool) {
    let dir = tempfile::tempdir().expect("tmp");
    let bin = build(t, dir.path(), name);
    let mut args = vec!["--go-comm", name];
    if evacuation {
        args.extend(["--go-maps", "evacuation"]);
    }
    let agent = Agent::start(&args);
    let mut fx = Fixture::start(&bin, &["grow", "200000"]);
    let sites = go_sites(&agent, &bin);
    let whats: &[&str] = if evacuation { &["go_map_grow", "go_map_evacuate"] } else { &["go_map_grow"] };
    let grow: Vec<(u64, u64)> = sites
        .iter()
        .filter(|s| whats.contains(&s["what"].as_str().unwrap_or("")) && s["planned"] == true)
        .filter_map(|s| Some((s["entry_offset"].as_u64()?, s["guard"].as_u64()?)))
        .collect();
    assert!(!grow.is_empty(), "no growth function planned: {sites:?}");
    let evacuations = sites.iter().filter(|s| s["what"] == "go_map_evacuate").count();
    assert_eq!(evacuations > 0, evacuation && t.name == "go1.19", "{sites:?}");
    let truth = TracefsCount::start(&bin, &grow);
    fx.run();
    let truth = truth.stop();
    let seen = agent.sample(&format!("watchscope_go_map_grow_events_total{{comm=\"{name}\"}}"));
    assert!(truth > 0.0, "no growth happened");
    assert_eq!(
        seen, truth,
        "{} ({}): watchscope counted {seen} growth calls, the kernel's own uprobes {truth}",
        name, t.version
    );
    // Each outermost growth span is timed once.
    let text = agent.metrics();
    let spans = Buckets::parse(&text, "watchscope_go_map_seconds", &format!("op=\"grow\",comm=\"{name}\""));
    assert!(spans.count() > 0.0 && spans.count() <= seen, "{text}");
    if !evacuation && t.name == "go1.19" {
        // A classic growth start is timed exactly once: nothing nests in
        // hashGrow (Swiss growth functions do nest).
        assert_eq!(spans.count(), seen, "{text}");
    }
}

#[test]
fn map_growth_calls_match_the_kernels_own_uprobes_go119() {
    growth_matches_tracefs(go119(), "wsg-grow119", false);
}

#[test]
fn map_evacuations_match_the_kernels_own_uprobes_go119() {
    growth_matches_tracefs(go119(), "wsg-evac119", true);
}

#[test]
fn map_growth_calls_match_the_kernels_own_uprobes_go127_swiss() {
    growth_matches_tracefs(go127(), "wsg-grow127", false);
}

fn window_and_maps(t: &Toolchain, name: &str) {
    const R: usize = 12;
    const K: usize = 3000;
    // 20.48 ms is a bucket bound, so "every window >= S" is an exact check.
    const S_US: usize = 20_480;
    let dir = tempfile::tempdir().expect("tmp");
    let bin = build(t, dir.path(), name);
    let agent = Agent::start(&["--go-comm", name, "--go-maps", "all", "--window", "handler=main.window"]);
    let mut fx = Fixture::start(&bin, &["window", &R.to_string(), &K.to_string(), &S_US.to_string()]);
    go_sites(&agent, &bin);
    let done = fx.run();
    assert_eq!(done, format!("done {}", R * K));
    // The fixture prints `done` after its last window returned, and every
    // probe counts in the kernel as it fires: the counts are final now.
    let text = agent.metrics();
    let w = Buckets::parse(&text, "watchscope_window_seconds", &format!("window=\"handler\",comm=\"{name}\""));
    assert_eq!(w.count(), R as f64, "{text}");
    assert_eq!(w.below(S_US as f64 * 1e-6), 0.0, "a window shorter than its sleep: {:?}", w.cumulative);
    let sum = |fam: &str, labels: &str| {
        watchscope_integration_tests::sample_value(&text, &format!("{fam}_sum{{{labels}}}")).unwrap_or(0.0)
    };
    let window_sum = sum("watchscope_window_seconds", &format!("window=\"handler\",comm=\"{name}\""));
    let inner = format!("window=\"handler\",inner=\"map\",comm=\"{name}\"");
    let map_sum = sum("watchscope_window_inner_seconds", &inner);
    let m = Buckets::parse(&text, "watchscope_window_inner_seconds", &inner);
    assert_eq!(m.count(), R as f64, "one inner observation per window: {text}");
    assert!(map_sum > 0.0 && map_sum <= window_sum, "inner map {map_sum} s vs window {window_sum} s");
    // Every assign the fixture made, counted once: K per window.
    let assigns = Buckets::parse(&text, "watchscope_go_map_seconds", &format!("op=\"assign\",comm=\"{name}\""));
    assert_eq!(assigns.count(), (R * K) as f64, "{text}");
}

#[test]
fn a_window_holds_its_map_work_go119() {
    window_and_maps(go119(), "wsg-win119");
}

#[test]
fn a_window_holds_its_map_work_go127_swiss() {
    window_and_maps(go127(), "wsg-win127");
}

#[test]
fn stack_copies_under_every_probe_change_nothing() {
    for (t, name) in [(go119(), "wsg-deep119"), (go127(), "wsg-deep127")] {
        let dir = tempfile::tempdir().expect("tmp");
        let bin = build(t, dir.path(), name);
        // Unprobed run: the checksum to expect.
        let mut plain = Fixture::start(&bin, &["recurse", "30", "2000"]);
        let want = plain.run();
        drop(plain);
        let agent = Agent::start(&["--go-comm", name, "--go-maps", "all", "--window", "deep=main.recurseWindow"]);
        let mut fx = Fixture::start(&bin, &["recurse", "30", "2000"]);
        go_sites(&agent, &bin);
        assert_eq!(fx.run(), want, "{name}: checksum changed under probes");
        let w = agent.sample(&format!("watchscope_window_seconds_count{{window=\"deep\",comm=\"{name}\"}}"));
        assert_eq!(w, 30.0, "{name}: every window counted once despite stack copies");
    }
}

/// The events a window counted inside, by kind.
fn inner_events(agent: &Agent, window: &str, inner: &str, comm: &str) -> f64 {
    agent.sample(&format!(
        "watchscope_window_inner_events_total{{window=\"{window}\",inner=\"{inner}\",comm=\"{comm}\"}}"
    ))
}

/// GOMAXPROCS=2, both goroutines yielding every 64 inserts so they keep
/// trading threads: the window's inner map calls are exactly the windowed
/// goroutine's own inserts, none of the other goroutine's ten times more.
fn attribution_under_migration(t: &Toolchain, name: &str) {
    const R: usize = 40;
    const K: usize = 2000;
    let dir = tempfile::tempdir().expect("tmp");
    let bin = build(t, dir.path(), name);
    let agent =
        Agent::start(&["--go-comm", name, "--go-maps", "all", "--go-sched", "--window", "mig=main.migrateWindow"]);
    let mut fx = Fixture::start(&bin, &["migrate", &R.to_string(), &K.to_string()]);
    go_sites(&agent, &bin);
    let done = fx.run();
    let counts: Vec<f64> = done.split_whitespace().skip(1).filter_map(|v| v.parse().ok()).collect();
    let [inside, outside] = counts[..] else { panic!("unexpected fixture output {done}") };
    assert_eq!((inside, outside), ((R * K) as f64, (10 * R * K) as f64));
    // Final: every window returned before the fixture printed.
    let windows = agent.sample(&format!("watchscope_window_seconds_count{{window=\"mig\",comm=\"{name}\"}}"));
    assert_eq!(windows, R as f64, "{}", agent.metrics());
    let in_windows = inner_events(&agent, "mig", "map", name);
    assert_eq!(
        in_windows / inside,
        1.0,
        "{name}: the windows counted {in_windows} map calls; their goroutine made {inside} (the other one {outside})"
    );
    // Every assign of both goroutines was seen (the runtime makes a few of its own).
    let assigns =
        Buckets::parse(&agent.metrics(), "watchscope_go_map_seconds", &format!("op=\"assign\",comm=\"{name}\""));
    assert!(assigns.count() >= inside + outside, "{} assigns seen", assigns.count());
    // The yields inside the windows were seen as waits for a CPU.
    assert!(inner_events(&agent, "mig", "runqueue", name) >= 1.0, "{}", agent.metrics());
}

#[test]
fn attribution_survives_goroutine_migration_go119() {
    attribution_under_migration(go119(), "wsg-mig119");
}

#[test]
fn attribution_survives_goroutine_migration_go127_swiss() {
    attribution_under_migration(go127(), "wsg-mig127");
}

/// A window blocked on a channel (the Go scheduler parks the goroutine; its
/// thread runs others or sleeps) and one blocked in nanosleep(2) (the thread
/// itself sleeps in the kernel) both show off-CPU inner time >= the wait.
fn off_cpu_inside_windows(t: &Toolchain, name: &str) {
    const R: usize = 8;
    // 20.48 ms is a bucket bound: "every window's off-CPU time >= S" is exact.
    const S_US: usize = 20_480;
    let dir = tempfile::tempdir().expect("tmp");
    let bin = build(t, dir.path(), name);
    let agent =
        Agent::start(&["--go-comm", name, "--go-sched", "--window", "blk=main.blockWindow;sys=main.syscallWindow"]);
    for (mode, window) in [("block", "blk"), ("syscall", "sys")] {
        let mut fx = Fixture::start(&bin, &[mode, &R.to_string(), &S_US.to_string()]);
        let sites = go_sites(&agent, &bin);
        assert!(sites.iter().any(|s| s["what"] == "go_sched_execute" && s["planned"] == true), "{sites:?}");
        assert_eq!(fx.run(), format!("done {R}"));
        drop(fx);
        // Final: every window returned before the fixture printed.
        let text = agent.metrics();
        let labels = |inner: &str| format!("window=\"{window}\",inner=\"{inner}\",comm=\"{name}\"");
        let w = Buckets::parse(&text, "watchscope_window_seconds", &format!("window=\"{window}\",comm=\"{name}\""));
        assert_eq!(w.count(), R as f64, "{mode}: {text}");
        let wait = S_US as f64 * 1e-6;
        assert_eq!(w.below(wait), 0.0, "{mode}: a window shorter than its wait: {:?}", w.cumulative);
        let off = Buckets::parse(&text, "watchscope_window_inner_seconds", &labels("off_cpu"));
        let rq = Buckets::parse(&text, "watchscope_window_inner_seconds", &labels("runqueue"));
        assert_eq!(off.count(), R as f64, "{mode}: one off_cpu observation per window");
        assert_eq!(rq.count(), R as f64, "{mode}: one runqueue observation per window");
        // Every wait is in each window's off-CPU or run-queue time. Not in
        // the off-CPU time alone: each wait's timer starts a little before
        // the goroutine parks or its thread sleeps, and a preemption in
        // between (Go's, at gopark's stack check; or the kernel's, before
        // nanosleep switches out) is run-queue time: 2-5 ms of a 20.48 ms
        // wait under load, traced. bpftrace, timing gopark to ready in 600
        // such windows under load, saw no wait shorter than 20.48 ms.
        // (A whole nanosleep once went missing in CI: the kernel reported
        // neither the thread's wake-up nor its switch-in, which the agent
        // now charges at the next sighting of the thread; see
        // `sched_switch_in_unseen`.)
        //
        // Per window: off + runqueue >= wait, less the few µs between the
        // timer's start and the park or sleep. From the two histograms,
        // that means a window at or under an off-CPU bound `le` has at
        // least wait - le on the run queue: no more windows fall under
        // `le` than have run-queue time above the bound below wait - le.
        // On an idle machine this is the plain "off-CPU >= wait".
        const TIMER_TO_PARK: f64 = 20e-6;
        for &(le, n) in off.cumulative.iter().filter(|(le, _)| le.is_finite()) {
            let need = wait - TIMER_TO_PARK - le;
            let queued_longer = if need <= 0.0 {
                R as f64
            } else {
                R as f64 - rq.cumulative.iter().rev().find(|(b, _)| *b < need).map_or(0.0, |(_, c)| *c)
            };
            assert!(
                n <= queued_longer,
                "{mode}: {n} windows off CPU for at most {le} s, but only {queued_longer} on a run queue for \
                 {need} s or more: off-CPU {:?}, run queue {:?}",
                off.cumulative,
                rq.cumulative
            );
        }
        // And in total.
        let sum = |inner: &str| {
            watchscope_integration_tests::sample_value(
                &text,
                &format!("watchscope_window_inner_seconds_sum{{{}}}", labels(inner)),
            )
            .unwrap_or(0.0)
        };
        let (off_s, rq_s) = (sum("off_cpu"), sum("runqueue"));
        let unseen = agent.sample_present("watchscope_dropped_total{reason=\"sched_switch_in_unseen\"}");
        eprintln!("{mode}: {R} windows, off-CPU {off_s:.6} s, run queue {rq_s:.6} s, switch-ins unseen {unseen}");
        assert!(
            off_s + rq_s >= R as f64 * (wait - TIMER_TO_PARK),
            "{mode}: off-CPU {off_s} s + run queue {rq_s} s < {R} waits of {wait} s"
        );
        assert!(inner_events(&agent, window, "off_cpu", name) >= R as f64, "{mode}: {text}");
    }
}

/// Without `--go-sched` (the default of `run`) no scheduler probe is
/// planned, and windows have no off-CPU or run-queue series at all, rather
/// than zeros that would say they never waited; their count and their map
/// share are still there.
#[test]
fn without_go_sched_windows_have_no_scheduler_probes_and_no_off_cpu_series() {
    const R: usize = 8;
    const S_US: usize = 20_480;
    let name = "wsg-nosched";
    let dir = tempfile::tempdir().expect("tmp");
    let bin = build(go127(), dir.path(), name);
    let agent = Agent::start(&["--go-comm", name, "--window", "blk=main.blockWindow"]);
    let mut fx = Fixture::start(&bin, &["block", &R.to_string(), &S_US.to_string()]);
    let sites = go_sites(&agent, &bin);
    assert!(!sites.iter().any(|s| s["what"].as_str().is_some_and(|w| w.starts_with("go_sched"))), "{sites:?}");
    assert!(sites.iter().any(|s| s["what"] == "window blk" && s["planned"] == true), "{sites:?}");
    assert_eq!(fx.run(), format!("done {R}"));
    drop(fx);
    let text = agent.metrics();
    let w = Buckets::parse(&text, "watchscope_window_seconds", &format!("window=\"blk\",comm=\"{name}\""));
    assert_eq!(w.count(), R as f64, "{text}");
    let map = Buckets::parse(
        &text,
        "watchscope_window_inner_seconds",
        &format!("window=\"blk\",inner=\"map\",comm=\"{name}\""),
    );
    assert_eq!(map.count(), R as f64, "{text}");
    for kind in ["off_cpu", "runqueue"] {
        assert!(!text.contains(&format!("inner=\"{kind}\"")), "{kind} series without scheduler probes:\n{text}");
    }
}

#[test]
fn off_cpu_time_inside_windows_go119() {
    off_cpu_inside_windows(go119(), "wsg-off119");
}

#[test]
fn off_cpu_time_inside_windows_go127() {
    off_cpu_inside_windows(go127(), "wsg-off127");
}

/// `--go-maps=all` is bounded in time: after `--go-maps-window` the
/// per-operation probes detach by themselves; growth probes stay.
#[test]
fn per_operation_probes_detach_after_the_window() {
    let name = "wsg-mapwin";
    let dir = tempfile::tempdir().expect("tmp");
    let bin = build(go119(), dir.path(), name);
    // Only the fixture: the probe count below is the agent's total, which
    // an etcd running elsewhere on the machine (watched by default) would
    // add to.
    let agent = Agent::start(&["--comm", "wsnone", "--go-comm", name, "--go-maps", "all", "--go-maps-window", "3s"]);
    let mut fx = Fixture::start(&bin, &["grow", "200000"]);
    let sites = go_sites(&agent, &bin);
    let per_op = sites
        .iter()
        .filter(|s| {
            s["planned"] == true
                && ["go_map_assign", "go_map_access", "go_map_delete"].contains(&s["what"].as_str().unwrap_or(""))
        })
        .map(|s| 1 + s["return_offsets"].as_array().map_or(0, Vec::len))
        .sum::<usize>();
    assert!(per_op > 0, "no per-operation probe planned: {sites:?}");
    // Read from the plan, not from the probe count: on a slow machine the
    // window may be over by the time the count is read.
    let before: usize = sites
        .iter()
        .filter(|s| s["planned"] == true)
        .map(|s| 1 + s["return_offsets"].as_array().map_or(0, Vec::len))
        .sum();
    let attached = || debug_probes(&agent)["uprobes_attached"].as_u64().unwrap_or(0) as usize;
    assert!(
        wait_until(Duration::from_secs(10), || attached() + per_op == before),
        "{per_op} per-operation probes of {before} should have gone; {} left:\n{}",
        attached(),
        agent.log_text()
    );
    let done = fx.run();
    assert_eq!(done, "done 200000");
    let text = agent.metrics();
    let assigns = Buckets::parse(&text, "watchscope_go_map_seconds", &format!("op=\"assign\",comm=\"{name}\""));
    assert_eq!(assigns.count(), 0.0, "assigns timed after the window: {text}");
    let grows = agent.sample(&format!("watchscope_go_map_grow_events_total{{comm=\"{name}\"}}"));
    assert!(grows > 0.0, "growth probes must stay: {text}");
}

/// The window sites `agent` planned on `bin`.
fn window_site(agent: &Agent, bin: &Path, what: &str) -> serde_json::Value {
    let sites = go_sites(agent, bin);
    sites.iter().find(|s| s["what"] == what).cloned().unwrap_or_else(|| panic!("no `{what}` site: {sites:?}"))
}

/// Windows ending in their caller (one emulated trap on the first branch
/// after the call) against the same windows ending on their RETs (each
/// single-stepped), measured at once by two agents on one fixture: each
/// window holds K map inserts and a 20.48 ms sleep (a park inside the
/// window, which must not end it). Both count every window, none is
/// shorter than its sleep, and the caller end is later than the RET by only
/// the RET's own trap and the few instructions after it.
fn caller_ends_agree_with_ret_ends(t: &Toolchain, name: &str) {
    const R: usize = 40;
    const K: usize = 200;
    const S_US: usize = 20_480;
    let dir = tempfile::tempdir().expect("tmp");
    let bin = build(t, dir.path(), name);
    let window = "handler=main.window";
    let by_ret = Agent::start(&["--go-comm", name, "--window", window, "--window-end", "ret"]);
    let by_caller = Agent::start(&["--go-comm", name, "--window", window]);
    let mut fx = Fixture::start(&bin, &["window", &R.to_string(), &K.to_string(), &S_US.to_string()]);
    let c = window_site(&by_caller, &bin, "window handler");
    assert_eq!(c["ends"], "caller", "{c}");
    assert!(c["return_offsets"].as_array().is_some_and(Vec::is_empty), "no RET probe: {c}");
    assert_eq!(c["end_offsets"].as_array().map(Vec::len), Some(1), "one call site, one end site: {c}");
    let r = window_site(&by_ret, &bin, "window handler");
    assert_eq!(r["ends"], "ret", "{r}");
    assert!(r["return_offsets"].as_array().is_some_and(|o| !o.is_empty()), "{r}");
    assert_eq!(fx.run(), format!("done {}", R * K));
    // Both ends come before the loop's next iteration, so before `done`.
    let labels = format!("window=\"handler\",comm=\"{name}\"");
    let mut sums = Vec::new();
    for (how, agent) in [("ret", &by_ret), ("caller", &by_caller)] {
        let text = agent.metrics();
        let w = Buckets::parse(&text, "watchscope_window_seconds", &labels);
        assert_eq!(w.count(), R as f64, "{how}: {text}");
        assert_eq!(w.below(S_US as f64 * 1e-6), 0.0, "{how}: a window shorter than its sleep: {:?}", w.cumulative);
        let sum =
            watchscope_integration_tests::sample_value(&text, &format!("watchscope_window_seconds_sum{{{labels}}}"));
        sums.push(sum.unwrap_or_else(|| panic!("{how}: no sum: {text}")));
        assert_eq!(
            agent.sample_present("watchscope_dropped_total{reason=\"window_indirect_call\"}"),
            0.0,
            "{how}: every call is direct"
        );
    }
    let later_us = (sums[1] - sums[0]) / R as f64 * 1e6;
    eprintln!(
        "{name}: mean window {:.1} µs ending on RETs, {:.1} µs ending in the caller: {later_us:+.2} µs",
        sums[0] / R as f64 * 1e6,
        sums[1] / R as f64 * 1e6
    );
    // The two agents' entry programs run on one trap, in either order:
    // their starts differ by well under a microsecond.
    assert!(later_us > -1.0, "the caller end came before the RET: {later_us} µs per window");
    // What lies between: the other agent's RET trap and single-step and the
    // caller's next instructions (44-45 µs per window on a quiet machine,
    // 107 µs once in a loaded CI run, where a preemption there counts
    // whole). The bound only has to tell a stray end (one that took in
    // the next window's 20.48 ms sleep) from that; a missed end site shows
    // in the count instead: the last window would never close.
    let sleep_us = S_US as f64;
    assert!(later_us < sleep_us / 2.0, "the caller end came {later_us} µs per window after the RET");
}

#[test]
fn windows_ending_in_the_caller_agree_with_ret_ends_go119() {
    caller_ends_agree_with_ret_ends(go119(), "wsg-end119");
}

#[test]
fn windows_ending_in_the_caller_agree_with_ret_ends_go127() {
    caller_ends_agree_with_ret_ends(go127(), "wsg-end127");
}

/// A million windows on four goroutines that trade two threads, each
/// recursing up to 97 deep and every 64th 2000 deep (the stack grows and is
/// copied under open windows), ended in the caller and on RETs: the
/// fixture's checksum is the unprobed one, every direct call is one window,
/// and every call through a function value (1 in 100) is counted as such
/// when the window ends in the caller (it has no call site to end at), and
/// timed when it ends on its RETs.
fn a_million_windows(t: &Toolchain, name: &str) {
    const W: usize = 1_000_000;
    let args = ["churn", &W.to_string(), "2000"].map(String::from);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let dir = tempfile::tempdir().expect("tmp");
    let bin = build(t, dir.path(), name);
    let mut plain = Fixture::start(&bin, &args);
    let want = plain.run();
    drop(plain);
    let indirect = W / 100;
    for (end, windows, dropped) in [("auto", W - indirect, indirect), ("ret", W, 0)] {
        let agent =
            Agent::start(&["--go-comm", name, "--go-sched", "--window", "churn=main.churnWindow", "--window-end", end]);
        let mut fx = Fixture::start(&bin, &args);
        let site = window_site(&agent, &bin, "window churn");
        assert_eq!(site["ends"], if end == "auto" { "caller" } else { "ret" }, "{site}");
        assert_eq!(fx.run(), want, "{name}, ends {end}: the checksum changed under probes");
        // Every window ended before its goroutine's next call, so before
        // the fixture printed.
        let n = agent.sample(&format!("watchscope_window_seconds_count{{window=\"churn\",comm=\"{name}\"}}"));
        assert_eq!(n, windows as f64, "{name}, ends {end}");
        let d = agent.sample_present("watchscope_dropped_total{reason=\"window_indirect_call\"}");
        assert_eq!(d, dropped as f64, "{name}, ends {end}: calls through the function value");
    }
}

#[test]
fn a_million_windows_through_stack_copies_and_migration_keep_the_checksum_go119() {
    a_million_windows(go119(), "wsg-churn119");
}

#[test]
fn a_million_windows_through_stack_copies_and_migration_keep_the_checksum_go127() {
    a_million_windows(go127(), "wsg-churn127");
}

/// A window on a function called from everywhere (`runtime.newobject`:
/// hundreds of call sites) keeps its RET probes, and says why, rather than
/// placing a probe after each call.
#[test]
fn a_window_called_from_too_many_places_ends_on_its_rets() {
    let name = "wsg-many119";
    let dir = tempfile::tempdir().expect("tmp");
    let bin = build(go119(), dir.path(), name);
    let agent = Agent::start(&["--go-comm", name, "--window", "alloc=runtime.newobject"]);
    let fx = Fixture::start(&bin, &["calls", "10"]);
    let site = window_site(&agent, &bin, "window alloc");
    assert_eq!(site["ends"], "ret", "{site}");
    let why = site["ends_on_ret_because"].as_str().unwrap_or_default();
    assert!(why.contains("direct calls of it"), "{site}");
    assert!(site["return_offsets"].as_array().is_some_and(|r| !r.is_empty()), "{site}");
    drop(fx);
}

fn sum(agent: &Agent, labels: &str) -> f64 {
    agent.sample_present(&format!("watchscope_window_seconds_sum{{{labels}}}"))
}

/// A window its call leaves without reaching its end, R times, each
/// followed `GAP_MS` later by a call on the same `g` that returns: the
/// fixture command `command` (`mapwork goexit|panic R S G`), the window on
/// `symbol`, counted as `reason`.
struct Unended {
    command: &'static str,
    symbol: &'static str,
    reason: &'static str,
    rounds: u64,
}

/// Ended in the caller and on the RETs: every call that returned is exactly
/// one window, at least its 2 ms of sleep and nowhere near the 300 ms gap a
/// wrong read would span, and the windows left behind are counted.
fn unended_windows(t: &Toolchain, name: &str, case: Unended) -> Vec<f64> {
    const SLEEP_US: u64 = 2_000;
    const GAP_MS: u64 = 300;
    let r = case.rounds;
    let dir = tempfile::tempdir().expect("tmp");
    let bin = build(t, dir.path(), name);
    let args = [case.command, &r.to_string(), &SLEEP_US.to_string(), &GAP_MS.to_string()].map(String::from);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut dropped = Vec::new();
    for (end, ends) in [("auto", "caller"), ("ret", "ret")] {
        let window = format!("w={}", case.symbol);
        let agent = Agent::start(&["--go-comm", name, "--window", &window, "--window-end", end]);
        let mut fx = Fixture::start(&bin, &args);
        let site = window_site(&agent, &bin, "window w");
        assert_eq!(site["ends"], ends, "{site}");
        assert_eq!(fx.run(), format!("done {r}"), "{name}, ends {end}");
        let labels = format!("window=\"w\",comm=\"{name}\"");
        let windows = || Buckets::parse(&agent.metrics(), "watchscope_window_seconds", &labels);
        let counted = || agent.sample_present(&format!("watchscope_dropped_total{{reason=\"{}\"}}", case.reason));
        wait_until(Duration::from_secs(10), || windows().count() >= r as f64 && counted() >= 1.0);
        let w = windows();
        let n = counted();
        eprintln!("{name}, ends {end}: {} windows, {n} {}, sum {:.4} s", w.count(), case.reason, sum(&agent, &labels));
        assert_eq!(w.count(), r as f64, "{name}, ends {end}: one window per call that returned");
        assert_eq!(w.below(GAP_MS as f64 / 2e3), w.count(), "{name}, ends {end}: a window spans the gap");
        assert_eq!(w.from_bucket_of(SLEEP_US as f64 / 1e6), w.count(), "{name}, ends {end}: {:?}", w.cumulative);
        dropped.push(n);
    }
    dropped
}

/// A goroutine that ends inside a window (`runtime.Goexit`) never reaches
/// its end, and the runtime gives its `g` to the next goroutine it starts
/// (one P, freed `g`s reused first). That goroutine's call must neither
/// close the dead one's window (a wrong read) nor nest in it (no window
/// timed on that `g` again): the entry reads the goroutine id, drops the
/// dead one's window and counts it as `window_stale`.
fn goroutines_ending_inside_windows(t: &Toolchain, name: &str) {
    const R: u64 = 6;
    let case = Unended { command: "goexit", symbol: "main.exitWindow", reason: "window_stale", rounds: R };
    for stale in unended_windows(t, name, case) {
        // Each ended goroutine's g is reused by the next (one P); at least
        // one reuse must have been seen for the check to have been tested.
        assert!((1.0..=R as f64).contains(&stale), "{name}: {stale} stale windows");
    }
}

#[test]
fn goroutines_ending_inside_windows_leave_no_stale_window_go119() {
    goroutines_ending_inside_windows(go119(), "wsg-exit119");
}

#[test]
fn goroutines_ending_inside_windows_leave_no_stale_window_go127() {
    goroutines_ending_inside_windows(go127(), "wsg-exit127");
}

/// A window whose call unwinds in a panic that a caller recovers never
/// reaches its end (the branch after the call, or its RET). The same
/// goroutine's next call at the same depth must neither close it nor nest
/// in it: it is dropped and counted as `window_unended`.
fn windows_unwound_by_a_panic(t: &Toolchain, name: &str) {
    const R: u64 = 5;
    let case = Unended { command: "panic", symbol: "main.panicWindow", reason: "window_unended", rounds: R };
    for unended in unended_windows(t, name, case) {
        assert_eq!(unended, R as f64, "{name}: one unended window per panic");
    }
}

#[test]
fn windows_unwound_by_a_recovered_panic_are_dropped_go119() {
    windows_unwound_by_a_panic(go119(), "wsg-panic119");
}

#[test]
fn windows_unwound_by_a_recovered_panic_are_dropped_go127() {
    windows_unwound_by_a_panic(go127(), "wsg-panic127");
}

/// One window per goroutine at a time: a window called inside another is
/// not timed, and whichever of the two ends on its RETs must not close the
/// other. Both ways round: the inner window on its RETs inside the outer
/// one ended in its caller, and the inner one ended in its caller inside
/// the outer one on its RETs. Every outer call is one window of at least
/// the 2 ms it sleeps after the inner call returned; the inner one is never
/// timed.
#[test]
fn a_window_inside_another_leaves_the_outer_one_alone() {
    const R: u64 = 20;
    const SLEEP_US: u64 = 2_000;
    let name = "wsg-nest119";
    let dir = tempfile::tempdir().expect("tmp");
    let bin = build(go119(), dir.path(), name);
    let args = ["nested", &R.to_string(), &SLEEP_US.to_string()].map(String::from);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    for (outer, inner) in [("main.nestedOuter", "main.nestedInner@ret"), ("main.nestedOuter@ret", "main.nestedInner")] {
        let (o, i) = (format!("outer={outer}"), format!("inner={inner}"));
        let agent = Agent::start(&["--go-comm", name, "--window", &o, "--window", &i]);
        let mut fx = Fixture::start(&bin, &args);
        window_site(&agent, &bin, "window inner");
        fx.run();
        let labels = format!("window=\"outer\",comm=\"{name}\"");
        let windows = || Buckets::parse(&agent.metrics(), "watchscope_window_seconds", &labels);
        wait_until(Duration::from_secs(10), || windows().count() >= R as f64);
        let w = windows();
        // No inner series at all (the family is the outer one's, read above).
        let inner_n = agent.sample(&format!("watchscope_window_seconds_count{{window=\"inner\",comm=\"{name}\"}}"));
        eprintln!("{outer} / {inner}: {} outer windows, sum {:.4} s; {inner_n} inner", w.count(), sum(&agent, &labels));
        assert_eq!(w.count(), R as f64, "{outer} / {inner}");
        assert_eq!(w.from_bucket_of(SLEEP_US as f64 / 1e6), w.count(), "{outer} / {inner}: {:?}", w.cumulative);
        assert_eq!(inner_n, 0.0, "{outer} / {inner}: a window inside another is not timed");
    }
}
