//! Faults on the watch path, on a register-ABI etcd 3.4 and 3.5: the agent
//! SIGKILLed mid-stream and restarted, the watched etcd stopped for 5 s and
//! continued, and etcd's binary replaced while it runs. Each counts every
//! event exactly afterwards, with nothing dropped and nothing left over.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use watchscope_integration_tests::{
    Agent, Buckets, debug_probes,
    etcd::{Build, Etcd},
    http_get, on_builds, sample_value, wait_attached, wait_until,
};

on_builds!([etcd_3_4_23, Bookworm3423], [etcd_3_5_30, Sid3530]: [
    an_agent_killed_mid_stream_and_restarted_counts_exactly,
    etcd_stopped_for_5s_and_continued_loses_nothing,
    a_binary_replaced_while_it_runs_keeps_its_probes,
]);

const FAMILY: &str = "watchscope_watch_stage_seconds";
const STAGES: [&str; 3] = ["commit_to_enqueue", "enqueue_to_send", "commit_to_send"];
const DROPS: [&str; 6] =
    ["enqueue_commit_miss", "send_commit_miss", "send_enqueue_miss", "dispatch_commit_miss", "map_full", "read_error"];

/// Every count the watch path keeps for one server and one client.
#[derive(Debug, PartialEq)]
struct Counts {
    server: f64,
    client: f64,
    /// The server stages, then `commit_to_dispatch`.
    stages: [f64; 4],
    dropped: f64,
}

fn counts(agent: &Agent, server: &str, client: &str) -> Counts {
    let text = agent.metrics();
    let events = |side: &str, comm: &str| {
        sample_value(&text, &format!("watchscope_watch_events_total{{side=\"{side}\",comm=\"{comm}\"}}")).unwrap_or(0.0)
    };
    let stage =
        |stage: &str, comm: &str| Buckets::parse(&text, FAMILY, &format!("stage=\"{stage}\",comm=\"{comm}\"")).count();
    Counts {
        server: events("server", server),
        client: events("client", client),
        stages: [
            stage(STAGES[0], server),
            stage(STAGES[1], server),
            stage(STAGES[2], server),
            stage("commit_to_dispatch", client),
        ],
        dropped: DROPS
            .iter()
            .map(|r| {
                watchscope_integration_tests::present(&text, &format!("watchscope_dropped_total{{reason=\"{r}\"}}"))
            })
            .sum(),
    }
}

/// Puts `n` keys and waits until the watcher printed them and the agent
/// counted them on both sides; returns the counts then.
fn put_and_count(
    agent: &Agent,
    etcd: &Etcd,
    watch: &watchscope_integration_tests::etcd::LineReader,
    prefix: &str,
    n: usize,
    server: &str,
    client: &str,
) -> Counts {
    let before = counts(agent, server, client);
    let seen = watch.count(|l| l == "PUT");
    for i in 0..n {
        etcd.put(&format!("{prefix}{i}"), "v");
    }
    assert_eq!(watch.wait_count(|l| l == "PUT", seen + n, Duration::from_secs(20)), seen + n);
    let want = before.client + n as f64;
    wait_until(Duration::from_secs(10), || {
        let c = counts(agent, server, client);
        c.client >= want && c.stages[2] >= before.stages[2] + n as f64
    });
    counts(agent, server, client)
}

/// Asserts that every count grew by exactly `n` and nothing was dropped.
fn grew_by(before: &Counts, after: &Counts, n: usize) {
    let n = n as f64;
    assert_eq!(
        Counts {
            server: after.server - before.server,
            client: after.client - before.client,
            stages: std::array::from_fn(|i| after.stages[i] - before.stages[i]),
            dropped: after.dropped - before.dropped,
        },
        Counts { server: n, client: n, stages: [n; 4], dropped: 0.0 },
        "before {before:?}, after {after:?}"
    );
}

/// Puts in a background thread until stopped: by [`Writer::stop`], or when
/// dropped, so a failing test stops it too (a writer left running would
/// keep its etcd alive past the test).
struct Writer {
    stop: Arc<AtomicBool>,
    done: Arc<AtomicUsize>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Writer {
    fn start(etcd: Arc<Etcd>, prefix: &'static str) -> Writer {
        let (stop, done) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicUsize::new(0)));
        let thread = {
            let (stop, done) = (stop.clone(), done.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let i = done.load(Ordering::Relaxed);
                    etcd.put(&format!("{prefix}{i}"), "v");
                    done.fetch_add(1, Ordering::Relaxed);
                }
            })
        };
        Writer { stop, done, thread: Some(thread) }
    }

    fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().expect("the writer's puts");
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn an_agent_killed_mid_stream_and_restarted_counts_exactly(build: Build) {
    const N: usize = 15;
    let (server, client) = (build.comm("wsf-kill"), build.comm("wsfc-kill"));
    let (server, client) = (server.as_str(), client.as_str());
    let etcd = Arc::new(Etcd::start_build(build, server, client));
    let watch = etcd.watch("/fk/");
    let comms = format!("{server},{client}");
    let mut first = Agent::start(&["--comm", &comms]);
    wait_attached(&first, &[etcd.pid(), watch.pid()]);

    // Puts keep flowing while the agent is killed and another one starts.
    let writer = Writer::start(etcd.clone(), "/fk/stream");
    let done = writer.done.clone();
    assert!(wait_until(Duration::from_secs(20), || done.load(Ordering::Relaxed) >= 5), "no puts flowing");
    // A killed process exits only once the kernel has closed its files,
    // and each perf uprobe link waits for an RCU grace period there
    // (seconds with a few dozen probes on a loaded VM).
    let status = first.stop_with(libc::SIGKILL, Duration::from_secs(30));
    assert!(!status.success());
    let second = Agent::start(&["--comm", &comms]);
    wait_attached(&second, &[etcd.pid(), watch.pid()]);
    let during = done.load(Ordering::Relaxed);
    assert!(wait_until(Duration::from_secs(20), || done.load(Ordering::Relaxed) >= during + 5), "puts stalled");
    writer.stop();
    // etcd served throughout: the watcher saw every put.
    let total = done.load(Ordering::Relaxed);
    assert_eq!(watch.wait_count(|l| l == "PUT", total, Duration::from_secs(20)), total);

    // The stream is quiet: etcd counts an event before it sends it and the
    // client as its dispatch begins, before etcdctl prints it, so every
    // count is final now. From here the new agent counts every event
    // exactly.
    let before = counts(&second, server, client);
    let after = put_and_count(&second, &etcd, &watch, "/fk/after", N, server, client);
    grew_by(&before, &after, N);
    let bins = debug_probes(&second)["binaries"].as_array().cloned().unwrap_or_default();
    assert!(bins.iter().all(|b| b["attached"] == true), "{bins:?}");
}

fn etcd_stopped_for_5s_and_continued_loses_nothing(build: Build) {
    const N: usize = 10;
    let (server, client) = (build.comm("wsf-stop"), build.comm("wsfc-stop"));
    let (server, client) = (server.as_str(), client.as_str());
    let agent = Agent::start(&["--comm", &format!("{server},{client}")]);
    let etcd = Arc::new(Etcd::start_build(build, server, client));
    let watch = etcd.watch("/fs/");
    wait_attached(&agent, &[etcd.pid(), watch.pid()]);
    let start = counts(&agent, server, client);
    let first = put_and_count(&agent, &etcd, &watch, "/fs/a", N, server, client);
    grew_by(&start, &first, N);

    etcd.signal(libc::SIGSTOP);
    // A put issued while etcd is stopped waits for it.
    let pending = {
        let etcd = etcd.clone();
        std::thread::spawn(move || etcd.put_waiting("/fs/while-stopped", "v", Duration::from_secs(60)))
    };
    // The fault itself: etcd stays stopped this long.
    std::thread::sleep(Duration::from_secs(5));
    etcd.signal(libc::SIGCONT);
    pending.join().expect("the put issued while etcd was stopped");
    assert_eq!(watch.wait_count(|l| l == "PUT", N + 1, Duration::from_secs(20)), N + 1);
    assert!(
        wait_until(Duration::from_secs(10), || counts(&agent, server, client).client >= first.client + 1.0),
        "{:?}",
        counts(&agent, server, client)
    );
    let resumed = counts(&agent, server, client);
    grew_by(&first, &resumed, 1);
    let last = put_and_count(&agent, &etcd, &watch, "/fs/b", N, server, client);
    grew_by(&resumed, &last, N);
    assert!(matches!(http_get(&agent.url("/healthz")), Ok((200, _))), "the agent stayed healthy");
}

fn a_binary_replaced_while_it_runs_keeps_its_probes(build: Build) {
    const N: usize = 10;
    let (server, client) = (build.comm("wsf-repl"), build.comm("wsfc-repl"));
    let (server, client) = (server.as_str(), client.as_str());
    let agent = Agent::start(&["--comm", &format!("{server},{client}")]);
    let mut etcd = Etcd::start_build(build, server, client);
    let watch = etcd.watch("/fr/");
    wait_attached(&agent, &[etcd.pid(), watch.pid()]);
    let start = counts(&agent, server, client);
    let first = put_and_count(&agent, &etcd, &watch, "/fr/a", N, server, client);
    grew_by(&start, &first, N);

    // A package upgrade while etcd runs: a new file (new inode) renamed over
    // the path. The running process keeps the old file mapped, and its
    // probes with it.
    let tmp = etcd.bin.with_extension("new");
    std::fs::copy(build.server(), &tmp).expect("copy");
    std::fs::rename(&tmp, &etcd.bin).expect("rename over");
    let replaced = put_and_count(&agent, &etcd, &watch, "/fr/b", N, server, client);
    grew_by(&first, &replaced, N);

    // Restarted from the new file: attached again, counts go on.
    etcd.restart();
    wait_attached(&agent, &[etcd.pid()]);
    // etcdctl reconnects by itself; a put it sees says it has.
    let seen = watch.count(|l| l == "PUT");
    let mut probes = 0;
    assert!(
        wait_until(Duration::from_secs(20), || {
            etcd.put("/fr/probe", "v");
            probes += 1;
            watch.count(|l| l == "PUT") > seen
        }),
        "etcdctl did not reconnect"
    );
    // The watch resumes from the last revision it saw, so each probe put
    // reaches it once; when it has printed them all, nothing is in flight
    // and every count is final (see above).
    assert_eq!(watch.wait_count(|l| l == "PUT", seen + probes, Duration::from_secs(20)), seen + probes);
    let before = counts(&agent, server, client);
    let after = put_and_count(&agent, &etcd, &watch, "/fr/c", N, server, client);
    grew_by(&before, &after, N);
}

/// A uprobe program that is not loaded (the kernel's verifier refused it;
/// here `--disable-program`, which takes the same path) costs only the
/// binaries that need it: etcd, whose send probe it is, is not probed and
/// says why, while the agent runs and the watcher, on other programs, still
/// counts every event.
#[test]
fn a_program_that_is_not_loaded_costs_only_the_binaries_that_need_it() {
    const N: usize = 12;
    let build = Build::Bookworm3423;
    let (server, client) = (build.comm("wsf-off"), build.comm("wsfc-off"));
    let etcd = Etcd::start_build(build, &server, &client);
    let watch = etcd.watch("/off/");
    let agent = Agent::start(&["--comm", &format!("{server},{client}"), "--disable-program", "etcd_send"]);
    wait_attached(&agent, &[watch.pid()]);
    let probes = debug_probes(&agent);
    assert_eq!(probes["unavailable_programs"]["etcd_send"], "disabled by --disable-program", "{probes}");
    let bins = probes["binaries"].as_array().cloned().unwrap_or_default();
    let server_bin = bins
        .iter()
        .find(|b| b["processes"].as_array().is_some_and(|p| p.iter().any(|x| *x == etcd.pid())))
        .unwrap_or_else(|| panic!("etcd not listed: {probes}"));
    assert_eq!(server_bin["attached"], false, "{server_bin}");
    assert!(server_bin["reason"].as_str().is_some_and(|r| r.contains("`etcd_send`")), "{server_bin}");

    for i in 0..N {
        etcd.put(&format!("/off/{i}"), "v");
    }
    assert_eq!(watch.wait_count(|l| l == "PUT", N, Duration::from_secs(20)), N);
    let events = |side: &str, comm: &str| {
        agent.sample(&format!("watchscope_watch_events_total{{side=\"{side}\",comm=\"{comm}\"}}"))
    };
    let counted = wait_until(Duration::from_secs(10), || events("client", &client) >= N as f64);
    assert!(counted, "the watcher counted {} of {N}", events("client", &client));
    assert_eq!(events("client", &client), N as f64);
    assert_eq!(events("server", &server), 0.0);
}
