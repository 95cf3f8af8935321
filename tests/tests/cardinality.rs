//! `--max-series` caps every labelled family: 10,000 short-lived watched
//! processes, each its own label set (`--label-pid`), against a cap of 100.

use std::{collections::BTreeSet, process::Command, time::Duration};

use watchscope::export::{FAMILIES, families::PREFIX};
use watchscope_integration_tests::{Agent, samples};

const EXECS: u64 = 10_000;
const CAP: u64 = 100;

/// Distinct label sets of a family in exposition text (histograms by their
/// `_count` samples).
fn series_count(text: &str, family: &watchscope::export::Family) -> usize {
    let Some(sample) = family.sample_names().pop() else { return 0 };
    samples(text, &sample).into_iter().map(|(labels, _)| labels).collect::<BTreeSet<_>>().len()
}

#[test]
fn ten_thousand_processes_stay_within_the_cap_and_the_overflow_is_exact() {
    let dir = tempfile::tempdir().expect("temp dir");
    // A name nobody else on the machine execs (comm is at most 15 bytes).
    let comm = format!("wsc{}", std::process::id() % 1_000_000_000);
    let path = dir.path().join(&comm);
    std::fs::copy("/bin/true", &path).expect("copy /bin/true");
    let agent = Agent::start(&["--comm", &comm, "--label-pid", "--max-series", &CAP.to_string()]);

    // In batches through one shell: 10,000 Command::spawn calls from here
    // would take minutes; a shell loop forks and execs the copy directly.
    let script = format!("i=0; while [ $i -lt {EXECS} ]; do {}; i=$((i+1)); done", path.display());
    let status = Command::new("/bin/sh").args(["-c", &script]).status().expect("run the exec loop");
    assert!(status.success());

    let dropped = format!("{PREFIX}_series_dropped_total{{family=\"process_execs\"}}");
    let want_dropped = (EXECS - CAP) as f64;
    // Every exec event read (the loop has finished): the counts are final.
    agent.wait_drained();
    let text = agent.metrics();
    assert_eq!(
        agent.sample_present(&format!("{PREFIX}_dropped_total{{reason=\"ringbuf_full\"}}")),
        0.0,
        "exec events were lost: the ground truth below cannot hold"
    );
    assert_eq!(agent.sample(&dropped), want_dropped, "{text}");

    // The cap holds for every family, and process_execs is full: every one
    // of its series is one of our processes, counted once.
    for family in FAMILIES {
        let n = series_count(&text, family);
        assert!(n as u64 <= CAP, "{}: {n} series > {CAP}", family.name);
    }
    let execs = samples(&text, &format!("{PREFIX}_process_execs_total"));
    assert_eq!(execs.len() as u64, CAP);
    for (labels, value) in &execs {
        assert_eq!(labels.get("comm"), Some(&comm), "{labels:?}");
        assert!(labels.contains_key("pid"), "{labels:?}");
        assert_eq!(*value, 1.0, "{labels:?}");
    }
    // The whole text stays small: no series was made for the other 9,900.
    assert!(text.len() < 1 << 20, "{} bytes", text.len());
}

/// More watch clients, one after the other, than the kernel has label slots
/// (63 besides the overflow slot): each exited client's slot is folded into
/// user space and reused, so every client keeps its own exact series and
/// nothing lands in the overflow slot.
#[test]
fn label_slots_are_recycled_as_processes_come_and_go() {
    const WATCHERS: usize = 80;
    let (server, client) = ("wse-recycle", "wsc-recycle");
    // 200: room for every client's watch_events series, while the Go
    // runtime histograms (one per process and window) stay bounded.
    let agent = Agent::start(&["--comm", &format!("{server},{client}"), "--label-pid", "--max-series", "200"]);
    let etcd = watchscope_integration_tests::etcd::Etcd::start(server, client);
    let in_probes = |pid: u32| {
        watchscope_integration_tests::debug_probes(&agent)["binaries"].as_array().is_some_and(|bins| {
            bins.iter().any(|b| {
                b["attached"] == true
                    && b["processes"].as_array().is_some_and(|p| p.iter().any(|p| p.as_u64() == Some(u64::from(pid))))
            })
        })
    };
    assert!(watchscope_integration_tests::wait_until(Duration::from_secs(10), || in_probes(etcd.pid())));
    let events = |pid: u32| {
        agent.sample(&format!("{PREFIX}_watch_events_total{{side=\"client\",comm=\"{client}\",pid=\"{pid}\"}}"))
    };
    let mut pids = Vec::new();
    let started = std::time::Instant::now();
    for i in 0..WATCHERS {
        let watch = etcd.watch(&format!("/r{i}/"));
        let pid = watch.pid();
        assert!(watchscope_integration_tests::wait_until(Duration::from_secs(10), || in_probes(pid)), "watcher {i}");
        // The watch stream may not be open yet: put until the watcher sees one.
        let mut seen = 0;
        for _ in 0..20 {
            etcd.put(&format!("/r{i}/k"), "v");
            seen = watch.wait_count(|l| l == "PUT", 1, Duration::from_millis(500));
            if seen > 0 {
                break;
            }
        }
        assert!(seen > 0, "watcher {i} saw no event");
        // The client counts an event in the kernel before it prints it.
        let truth = watch.count(|l| l == "PUT") as f64;
        pids.push((pid, truth));
        eprintln!(
            "watcher {i} at {:?}: {}",
            started.elapsed(),
            watchscope_integration_tests::debug_probes(&agent)["label_slots"]
        );
        drop(watch);
    }
    // Let the last slots be recycled too (every exit read, no slot left
    // idle), then check every series.
    agent.wait_drained();
    let recycled = watchscope_integration_tests::wait_until(Duration::from_secs(30), || {
        watchscope_integration_tests::debug_probes(&agent)["label_slots"]["idle"] == 0
    });
    assert!(recycled, "slots never recycled: {}", watchscope_integration_tests::debug_probes(&agent)["label_slots"]);
    let text = agent.metrics();
    for (i, (pid, truth)) in pids.iter().enumerate() {
        assert_eq!(events(*pid), *truth, "watcher {i} (pid {pid})\n{text}");
    }
    let clients: Vec<_> = samples(&text, &format!("{PREFIX}_watch_events_total"))
        .into_iter()
        .filter(|(l, _)| l.get("side").map(String::as_str) == Some("client"))
        .collect();
    assert_eq!(clients.len(), WATCHERS, "{clients:?}");
    // The watch path never fell back to the overflow slot. (The Go runtime
    // arrays have only the first 32 slots: a client that got a higher one
    // has its Go timing in `comm="_other"`, as documented.)
    for family in ["watch_events_total", "watch_stage_seconds_count"] {
        let other = samples(&text, &format!("{PREFIX}_{family}"))
            .into_iter()
            .filter(|(l, _)| l.get("comm").map(String::as_str) == Some("_other"))
            .count();
        assert_eq!(other, 0, "{family}: a label set fell into the overflow slot:\n{text}");
    }
    let server_events = samples(&text, &format!("{PREFIX}_watch_events_total"))
        .into_iter()
        .filter(|(l, _)| l.get("side").map(String::as_str) == Some("server"))
        .map(|(_, v)| v)
        .sum::<f64>();
    assert_eq!(server_events, pids.iter().map(|(_, t)| t).sum::<f64>());
}
