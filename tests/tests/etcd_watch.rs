//! The etcd watch path on a real etcd 3.4 with real clients: exact event
//! counts, a slow watcher that shows up in the right stage, restarts and
//! upgrades, SIGKILL of the agent, and a binary the catalog does not know.

use std::{process::Command, time::Duration};

use watchscope_integration_tests::{
    Agent, Buckets, debug_probes,
    etcd::{Etcd, unsent},
    sample_value, uprobe_events_of, wait_attached, wait_until,
};

const FAMILY: &str = "watchscope_watch_stage_seconds";

fn stage_labels(stage: &str, comm: &str) -> String {
    format!("stage=\"{stage}\",comm=\"{comm}\"")
}

fn events(agent: &Agent, side: &str, comm: &str) -> f64 {
    agent.sample(&format!("watchscope_watch_events_total{{side=\"{side}\",comm=\"{comm}\"}}"))
}

fn dropped(text: &str, reason: &str) -> f64 {
    sample_value(text, &format!("watchscope_dropped_total{{reason=\"{reason}\"}}")).unwrap_or(0.0)
}

#[test]
fn counts_are_exact_for_puts_and_a_txn() {
    const N: usize = 25;
    const K: usize = 3;
    let (server, client) = ("wse-count", "wsc-count");
    let agent = Agent::start(&["--comm", &format!("{server},{client}")]);
    // etcd starts after the agent: found through its exec event.
    let etcd = Etcd::start(server, client);
    let watch = etcd.watch("/count/");
    wait_attached(&agent, &[etcd.pid(), watch.pid()]);
    std::thread::sleep(Duration::from_millis(500));

    for i in 0..N {
        etcd.put(&format!("/count/{i}"), "v");
    }
    let kvs: Vec<(String, String)> = (0..K).map(|i| (format!("/count/txn{i}"), "t".to_string())).collect();
    let kv_refs: Vec<(&str, &str)> = kvs.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    etcd.txn_puts(&kv_refs);
    etcd.put("/other/not-watched", "x");

    let want = (N + K) as f64;
    assert_eq!(watch.wait_count(|l| l == "PUT", N + K, Duration::from_secs(10)), N + K, "etcdctl saw every event");
    wait_until(Duration::from_secs(5), || events(&agent, "client", client) >= want);
    std::thread::sleep(Duration::from_millis(300));

    let text = agent.metrics();
    assert_eq!(events(&agent, "server", server), want, "{text}");
    assert_eq!(events(&agent, "client", client), want, "{text}");
    for stage in ["commit_to_enqueue", "enqueue_to_send", "commit_to_send"] {
        let b = Buckets::parse(&text, FAMILY, &stage_labels(stage, server));
        assert_eq!(b.count(), want, "{stage}: {text}");
    }
    let d = Buckets::parse(&text, FAMILY, &stage_labels("commit_to_dispatch", client));
    assert_eq!(d.count(), want, "{text}");
    // On an idle loopback every stage is far under a second.
    assert_eq!(d.below(1.0), want);
    for reason in [
        "enqueue_commit_miss",
        "send_commit_miss",
        "send_enqueue_miss",
        "dispatch_commit_miss",
        "map_full",
        "read_error",
        "events_over_cap",
    ] {
        assert_eq!(dropped(&text, reason), 0.0, "{reason}: {text}");
    }
}

#[test]
fn a_slow_watcher_shows_in_its_send_stages_and_not_in_the_fast_client() {
    // The known delay: how long the slow watcher's stream stays blocked
    // once the agent sees it blocked.
    const D: f64 = 4.0;
    // Events the agent must see queued but not sent before the block counts.
    const STUCK: f64 = 3.0;
    const MAX_PUTS: usize = 200;
    let (server, client) = ("wse-slow", "wsc-slow");
    // etcd and the watchers start before the agent: found by the /proc scan.
    let etcd = Etcd::start(server, client);
    let fast = etcd.watch("/slow/");
    let mut slow = etcd.slow_watcher("/slow/");
    let agent = Agent::start(&["--comm", &format!("{server},{client}")]);
    wait_attached(&agent, &[etcd.pid(), fast.pid()]);

    // Large values fill the gateway's HTTP stream, the sockets and the
    // HTTP/2 windows, then etcd's gRPC send for that stream blocks. How
    // many puts that takes depends on the machine: put until the agent
    // itself sees events queued to a watcher and not sent.
    slow.send("pause");
    assert!(slow.wait_for(|l| l.starts_with("paused"), Duration::from_secs(5)));
    let mut stuck = 0.0;
    let puts = etcd.put_large_until("/slow/", 300_000, MAX_PUTS, || {
        stuck = unsent(&agent.metrics(), server);
        stuck >= STUCK
    });
    assert!(stuck >= STUCK, "after {puts} puts only {stuck} events wait for their send:\n{}", agent.metrics());
    // Every event still unsent now was committed before this point and
    // waits at least D more.
    std::thread::sleep(Duration::from_secs_f64(D));
    let stuck = unsent(&agent.metrics(), server);
    slow.send("resume");
    println!("{puts} puts filled the buffers; {stuck} events blocked for {D}s");
    assert_eq!(fast.wait_count(|l| l == "PUT", puts, Duration::from_secs(10)), puts);
    assert_eq!(slow.wait_count(|l| l.starts_with("event "), puts, Duration::from_secs(60)), puts, "{:?}", slow.lines());
    let want = (2 * puts) as f64;
    wait_until(Duration::from_secs(5), || events(&agent, "server", server) >= want);
    wait_until(Duration::from_secs(5), || {
        Buckets::parse(&agent.metrics(), FAMILY, &stage_labels("commit_to_send", server)).count() >= want
    });

    let text = agent.metrics();
    assert_eq!(events(&agent, "server", server), want, "{text}");
    for stage in ["enqueue_to_send", "commit_to_send"] {
        let b = Buckets::parse(&text, FAMILY, &stage_labels(stage, server));
        assert_eq!(b.count(), want, "{stage}: {text}");
        // Each event that was stuck through the block waited D or more.
        let slow_ones = b.from_bucket_of(D);
        assert!(slow_ones >= stuck, "{stage}: {slow_ones} observations from {D}s, {stuck} were blocked\n{text}");
        // ... and the fast watcher's events did not wait for the slow one.
        assert!(b.below(D / 2.0) >= puts as f64, "{stage}: fast watcher's events waited\n{text}");
    }
    // The fan-out itself was never slow: the stage that was slow is send.
    let enq = Buckets::parse(&text, FAMILY, &stage_labels("commit_to_enqueue", server));
    assert_eq!(enq.below(D / 2.0), want, "{text}");
    // The etcdctl watcher on the same etcd was not held up by the slow one
    // (a loaded machine may delay a dispatch by a few hundred ms, never by
    // the block).
    let d = Buckets::parse(&text, FAMILY, &stage_labels("commit_to_dispatch", client));
    assert_eq!(d.count(), puts as f64, "{text}");
    assert_eq!(d.below(D / 2.0), puts as f64, "etcdctl's commit_to_dispatch waited for the slow watcher: {text}");
}

#[test]
fn etcd_restart_and_upgrade_are_picked_up_and_counts_stay_exact() {
    let (server, client) = ("wse-restart", "wsc-restart");
    let agent = Agent::start(&["--comm", &format!("{server},{client}")]);
    let mut etcd = Etcd::start(server, client);
    let watch = etcd.watch("/r/");
    wait_attached(&agent, &[etcd.pid(), watch.pid()]);
    std::thread::sleep(Duration::from_millis(300));
    for i in 0..5 {
        etcd.put(&format!("/r/a{i}"), "v");
    }
    assert_eq!(watch.wait_count(|l| l == "PUT", 5, Duration::from_secs(10)), 5);

    // Restart on the same binary, then "upgrade": a new file (new inode) at
    // the same path, as a package upgrade would leave it.
    for upgrade in [false, true] {
        if upgrade {
            let tmp = etcd.bin.with_extension("new");
            std::fs::copy("/usr/bin/etcd", &tmp).expect("copy");
            std::fs::rename(&tmp, &etcd.bin).expect("rename over");
        }
        etcd.restart();
        // etcd answered: the agent has one second from here.
        let started = std::time::Instant::now();
        let ok = wait_until(Duration::from_secs(5), || {
            debug_probes(&agent)["binaries"].as_array().is_some_and(|bins| {
                bins.iter().any(|b| {
                    b["attached"] == true
                        && b["processes"].as_array().is_some_and(|p| p.iter().any(|p| *p == etcd.pid()))
                })
            })
        });
        assert!(ok, "restarted etcd (upgrade={upgrade}) not re-attached\n{}", agent.log_text());
        let took = started.elapsed();
        assert!(took < Duration::from_secs(1), "re-attached {took:?} after etcd was up (upgrade={upgrade})");
    }
    // etcdctl reconnects by itself; give it the moment it needs.
    std::thread::sleep(Duration::from_secs(2));
    for i in 0..5 {
        etcd.put(&format!("/r/b{i}"), "v");
    }
    assert_eq!(watch.wait_count(|l| l == "PUT", 10, Duration::from_secs(20)), 10);
    wait_until(Duration::from_secs(5), || events(&agent, "client", client) >= 10.0);
    std::thread::sleep(Duration::from_millis(300));
    let text = agent.metrics();
    assert_eq!(events(&agent, "server", server), 10.0, "{text}");
    assert_eq!(events(&agent, "client", client), 10.0, "{text}");
    let b = Buckets::parse(&text, FAMILY, &stage_labels("commit_to_send", server));
    assert_eq!(b.count(), 10.0, "{text}");
}

fn bpftool_json(what: &str) -> Vec<serde_json::Value> {
    let out = Command::new("bpftool").args(["-j", what, "show"]).output().expect("bpftool (apt-get install bpftool)");
    serde_json::from_slice(&out.stdout).unwrap_or_default()
}

/// Programs of ours still loaded, and links still attaching them. The kernel
/// shows program names cut to 15 bytes.
fn our_programs_and_links() -> (usize, usize) {
    const OURS: [&str; 6] =
        ["etcd_notify", "etcd_enqueue", "etcd_send", "etcd_dispatch", "sched_process_e", "sched_process_exit"];
    let progs: Vec<u64> = bpftool_json("prog")
        .iter()
        .filter(|p| p["name"].as_str().is_some_and(|n| OURS.iter().any(|o| o.starts_with(n) && n.len() >= 9)))
        .filter_map(|p| p["id"].as_u64())
        .collect();
    let links =
        bpftool_json("link").iter().filter(|l| l["prog_id"].as_u64().is_some_and(|id| progs.contains(&id))).count();
    (progs.len(), links)
}

/// SIGKILL: the kernel closes the agent's descriptors, which detaches every
/// program and uprobe. With tracefs uprobe events the definitions stay (a
/// definition nobody opened registers nothing), and the next agent deletes
/// them.
fn sigkill_leaves_no_probe_behind(mechanism: &str, server: &str, client: &str) {
    let etcd = Etcd::start(server, client);
    let comms = format!("{server},{client}");
    let args = ["--comm", comms.as_str(), "--uprobe-attach", mechanism];
    let mut agent = Agent::start(&args);
    wait_attached(&agent, &[etcd.pid()]);
    assert_eq!(debug_probes(&agent)["uprobe_mechanism"], mechanism);
    let pid = agent.pid();
    let (progs, links) = our_programs_and_links();
    assert!(progs >= 5 && links >= 5, "expected our programs and links while running: {progs} programs, {links} links");
    let status = agent.stop_with(libc::SIGKILL, Duration::from_secs(5));
    assert!(!status.success());
    // The kernel closes a dead process's fds asynchronously: allow a moment.
    let clean = wait_until(Duration::from_secs(5), || our_programs_and_links() == (0, 0));
    assert!(clean, "left after SIGKILL of {pid}: (programs, links) = {:?}", our_programs_and_links());
    let left = uprobe_events_of(pid);
    if mechanism == "perf" {
        assert_eq!(left, Vec::<String>::new());
    } else {
        assert!(!left.is_empty(), "tracefs definitions expected after SIGKILL");
        for name in &left {
            let enable = std::fs::read_to_string(format!("/sys/kernel/tracing/events/watchscope/{name}/enable"));
            assert_eq!(enable.map(|t| t.trim().to_string()).ok().as_deref(), Some("0"), "{name}");
        }
        let next = Agent::start(&args);
        wait_attached(&next, &[etcd.pid()]);
        assert_eq!(uprobe_events_of(pid), Vec::<String>::new(), "the next agent deletes a killed one's definitions");
    }
    etcd.put("/kill/after", "still serving");
}

#[test]
fn sigkill_leaves_no_probe_behind_and_etcd_keeps_serving() {
    sigkill_leaves_no_probe_behind("perf", "wse-kill", "wsc-kill");
}

#[test]
fn sigkill_with_tracefs_uprobes_leaves_nothing_attached_and_the_next_agent_cleans_up() {
    sigkill_leaves_no_probe_behind("tracefs", "wse-killt", "wsc-killt");
}

#[test]
fn an_unknown_etcd_build_is_reported_once_and_left_alone() {
    let dir = tempfile::tempdir().expect("tmp");
    let bin = dir.path().join("ws-unknownetcd");
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/go/unknown-etcd");
    let out = watchscope_integration_tests::go::go119()
        .cmd()
        .args(["build", "-o"])
        .arg(&bin)
        .arg(".")
        .current_dir(&src)
        .output()
        .expect("go build");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let agent = Agent::start(&["--comm", "ws-unknownetcd"]);
    let start = || {
        let mut c = Command::new(&bin).stdout(std::process::Stdio::piped()).spawn().expect("start fixture");
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(c.stdout.take().expect("stdout")), &mut line)
            .expect("read");
        assert_eq!(line.trim(), "ready 1");
        c
    };
    let mut first = start();
    let mut second = start();
    let listed = wait_until(Duration::from_secs(10), || {
        debug_probes(&agent)["binaries"].as_array().is_some_and(|bins| {
            bins.iter().any(|b| {
                b["path"].as_str().is_some_and(|p| p.ends_with("ws-unknownetcd"))
                    && b["attached"] == false
                    && b["reason"].as_str().is_some_and(|r| r.contains("etcd build watchscope does not know"))
                    && b["processes"].as_array().is_some_and(|p| p.len() == 2)
            })
        })
    });
    let _ = first.kill();
    let _ = second.kill();
    let _ = first.wait();
    let _ = second.wait();
    assert!(
        listed,
        "not reported in /debug/probes: {:?}",
        watchscope_integration_tests::http_get(&agent.url("/debug/probes"))
    );
    // Only the two tracepoints: nothing attached to the unknown build.
    assert_eq!(agent.sample("watchscope_probes_attached{kind=\"tracepoint\"}"), 2.0);
    assert_eq!(agent.sample("watchscope_probes_attached{kind=\"uprobe\"}"), 0.0);
    let log = agent.log_text();
    assert_eq!(log.matches("etcd build watchscope does not know").count(), 1, "reported once:\n{log}");
}
