//! The Kubernetes watch path on a real API server (apiextensions-apiserver
//! 0.36, the generic apiserver code of kube-apiserver 1.36) in front of a
//! real etcd 3.5.30: every update of a custom resource is timed from etcd's
//! commit into the API server's watch cache and into each watcher's result
//! channel, joined by revision; counts are exact per watcher; initial
//! events replayed to a new watch and bookmarks are counted apart, never
//! timed.

use std::time::Duration;

use watchscope_integration_tests::{
    Agent, Buckets,
    etcd::{Build, Etcd},
    kube::{ApiServer, event_type},
    sample_value, wait_attached, wait_until,
};

const FAMILY: &str = "watchscope_watch_stage_seconds";
const API: &str = "wsk-apiserver";
const OPERATOR: &str = "wsk-operator";
const DYNAMIC_OPERATOR: &str = "wsk-dynop";
const KUBECTL: &str = "wsk-kubectl";

fn events(text: &str, side: &str, comm: &str) -> f64 {
    sample_value(text, &format!("watchscope_watch_events_total{{side=\"{side}\",comm=\"{comm}\"}}")).unwrap_or(0.0)
}

fn stage(text: &str, stage: &str, comm: &str) -> Buckets {
    Buckets::parse(text, FAMILY, &format!("stage=\"{stage}\",comm=\"{comm}\""))
}

fn dropped(text: &str, reason: &str) -> f64 {
    watchscope_integration_tests::present(text, &format!("watchscope_dropped_total{{reason=\"{reason}\"}}"))
}

/// What the API server's stages have counted so far.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Counts {
    cache: f64,
    watcher: f64,
    replayed: f64,
    commit_to_cache: f64,
    commit_to_watcher: f64,
    cache_to_watcher: f64,
    dispatch: f64,
    /// The operator's informer (typed objects).
    op: Informer,
    /// A second operator's dynamic informer (Unstructured objects), where
    /// a test starts one.
    dynop: Informer,
    /// kubectl's watch (no informer), where a test starts one.
    kubectl: Informer,
    written: f64,
    offered: f64,
    commit_to_write: f64,
    cache_to_write: f64,
}

impl Counts {
    fn of(text: &str) -> Counts {
        Counts {
            cache: events(text, "apiserver_cache", API),
            watcher: events(text, "apiserver_watcher", API),
            replayed: events(text, "apiserver_replayed", API),
            commit_to_cache: stage(text, "commit_to_cache", API).count(),
            commit_to_watcher: stage(text, "commit_to_watcher", API).count(),
            cache_to_watcher: stage(text, "cache_to_watcher", API).count(),
            dispatch: events(text, "client", API),
            op: Informer::of(text, OPERATOR),
            dynop: Informer::of(text, DYNAMIC_OPERATOR),
            kubectl: Informer::of(text, KUBECTL),
            written: events(text, "apiserver_written", API),
            offered: events(text, "apiserver_offered", API),
            commit_to_write: stage(text, "commit_to_write", API).count(),
            cache_to_write: stage(text, "cache_to_write", API).count(),
        }
    }
}

/// What one client-go informer's stages have counted so far.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Informer {
    /// Frames its watch streams decoded (any client-go watch client).
    client_decoded: f64,
    informer: f64,
    commit_to_decode: f64,
    processed: f64,
    commit_to_process: f64,
    decode_to_process: f64,
    handled: f64,
    commit_to_handler: f64,
    process_to_handler: f64,
}

impl Informer {
    fn of(text: &str, comm: &str) -> Informer {
        Informer {
            client_decoded: events(text, "client_decoded", comm),
            informer: events(text, "informer", comm),
            commit_to_decode: stage(text, "commit_to_decode", comm).count(),
            processed: events(text, "informer_processed", comm),
            commit_to_process: stage(text, "commit_to_process", comm).count(),
            decode_to_process: stage(text, "decode_to_process", comm).count(),
            handled: events(text, "informer_handled", comm),
            commit_to_handler: stage(text, "commit_to_handler", comm).count(),
            process_to_handler: stage(text, "process_to_handler", comm).count(),
        }
    }

    /// Each count of `self` less the one of `before`.
    fn since(&self, before: &Informer) -> Informer {
        Informer {
            client_decoded: self.client_decoded - before.client_decoded,
            informer: self.informer - before.informer,
            commit_to_decode: self.commit_to_decode - before.commit_to_decode,
            processed: self.processed - before.processed,
            commit_to_process: self.commit_to_process - before.commit_to_process,
            decode_to_process: self.decode_to_process - before.decode_to_process,
            handled: self.handled - before.handled,
            commit_to_handler: self.commit_to_handler - before.commit_to_handler,
            process_to_handler: self.process_to_handler - before.process_to_handler,
        }
    }

    /// `n` of each: every event decoded, processed and handled once, and
    /// timed at each stage.
    fn each(n: f64) -> Informer {
        Informer {
            client_decoded: n,
            informer: n,
            commit_to_decode: n,
            processed: n,
            commit_to_process: n,
            decode_to_process: n,
            handled: n,
            commit_to_handler: n,
            process_to_handler: n,
        }
    }
}

/// The counts once nothing is left in flight. Every client-side stage
/// counts before the client prints the event (a frame's decode, the
/// reflector, the pop, a handler's start), so callers first wait for the
/// clients' output. The API server records a write when it returns, which
/// may be after the client read it: so wait until every live event it
/// offered a watcher has been put in that watcher's result channel and
/// written to its stream (replayed events are counted apart and never
/// offered).
fn settled(agent: &Agent) -> Counts {
    let mut last = Counts::of(&agent.metrics());
    let ok = wait_until(Duration::from_secs(10), || {
        last = Counts::of(&agent.metrics());
        last.watcher == last.offered && last.written == last.offered
    });
    assert!(ok, "the API server never caught up with the events it offered: {last:?}");
    last
}

#[test]
fn every_update_is_timed_from_commit_to_cache_and_to_each_watcher() {
    const N: u64 = 20;
    let agent = Agent::start(&["--comm", &format!("wse-k8s,{API},{OPERATOR},{DYNAMIC_OPERATOR},{KUBECTL}")]);
    let etcd = Etcd::start_build(Build::Sid3530, "wse-k8s", "wsc-k8sctl");
    let api = ApiServer::start(&etcd, API);
    wait_attached(&agent, &[etcd.pid(), api.pid()]);

    let rv0 = api.create("main");
    // Five watchers: two plain HTTP watches from the creation's revision,
    // kubectl, and two operators' informers (list, then watch), one typed
    // and one dynamic. The first update tells that all are registered
    // with the cacher.
    let w1 = api.watch("wsk-watch1", rv0);
    let w2 = api.watch("wsk-watch2", rv0);
    let op = api.operator(OPERATOR, &["-grow=64"]);
    let dynop = api.operator(DYNAMIC_OPERATOR, &["-dynamic"]);
    let kubectl = api.kubectl_watch(KUBECTL);
    wait_attached(&agent, &[op.pid(), dynop.pid(), kubectl.pid()]);
    api.patch_size("main", 1000);
    let modified = |l: &str| event_type(l).as_deref() == Some("MODIFIED");
    let handled = |l: &str| l.starts_with("handled update main ");
    for w in [&w1, &w2] {
        assert_eq!(w.wait_count(modified, 1, Duration::from_secs(20)), 1, "{:?}\n{}", w.lines(), api.log());
    }
    for o in [&op, &dynop] {
        assert_eq!(o.wait_count(handled, 1, Duration::from_secs(20)), 1, "{:?}", o.lines());
    }
    // kubectl lists, then watches from the list's revision: the first
    // update may reach it live or replayed, but once it printed it, its
    // watch is registered.
    assert_eq!(kubectl.wait_count(|l| l.contains("main"), 1, Duration::from_secs(20)), 1, "{:?}", kubectl.lines());
    let before = settled(&agent);
    assert!(before.commit_to_watcher >= 3.0, "the first update reached every watcher: {before:?}");

    for i in 0..N {
        api.patch_size("main", i);
    }
    for w in [&w1, &w2] {
        assert_eq!(w.wait_count(modified, 1 + N as usize, Duration::from_secs(30)), 1 + N as usize);
    }
    for o in [&op, &dynop] {
        assert_eq!(o.wait_count(handled, 1 + N as usize, Duration::from_secs(30)), 1 + N as usize);
    }
    assert_eq!(kubectl.wait_count(|l| l.contains("main"), 1 + N as usize, Duration::from_secs(30)), 1 + N as usize);
    assert!(wait_until(Duration::from_secs(10), || {
        Counts::of(&agent.metrics()).watcher >= before.watcher + 5.0 * N as f64
    }));
    let after = settled(&agent);
    let text = agent.metrics();
    eprintln!("before {before:?}\nafter  {after:?}");
    let n = N as f64;
    // Exactly one cache event per update, one result per update and
    // watcher, each timed from its commit (the API server's etcd client
    // saw every one).
    assert_eq!(after.dispatch - before.dispatch, n, "{after:?} {before:?}");
    assert_eq!(after.cache - before.cache, n, "{after:?} {before:?}");
    assert_eq!(after.commit_to_cache - before.commit_to_cache, n, "{after:?} {before:?}");
    // Five watchers: two curl, kubectl, the operators' informers.
    assert_eq!(after.watcher - before.watcher, 5.0 * n, "{after:?} {before:?}");
    // No watcher filters: each was offered each event once.
    assert_eq!(after.offered - before.offered, 5.0 * n, "{after:?} {before:?}");
    assert_eq!(after.commit_to_watcher - before.commit_to_watcher, 5.0 * n, "{after:?} {before:?}");
    assert_eq!(after.cache_to_watcher - before.cache_to_watcher, 5.0 * n, "{after:?} {before:?}");
    // ... and written to each one's HTTP stream (HTTP/1.1 for curl, HTTP/2
    // for client-go), joined by the object the cacher dispatched.
    assert_eq!(after.written - before.written, 5.0 * n, "{after:?} {before:?}");
    assert_eq!(after.commit_to_write - before.commit_to_write, 5.0 * n, "{after:?} {before:?}");
    assert_eq!(after.cache_to_write - before.cache_to_write, 5.0 * n, "{after:?} {before:?}");
    // Each operator's watch stream decoded each update's frame once (timed
    // from its commit there, by the revision in the frame), its reflector
    // queued each once (no second decode observation), its informer took
    // each off the queue once (joined by object) and its one handler
    // started on each once: the typed operator's `EtcdCluster` objects and
    // the dynamic one's Unstructured alike, the revision read from the
    // frame and the reflector, never from the object.
    assert_eq!(after.op.since(&before.op), Informer::each(n), "typed: {after:?} {before:?}");
    assert_eq!(after.dynop.since(&before.dynop), Informer::each(n), "dynamic: {after:?} {before:?}");
    // kubectl watches without an informer: each frame decoded and timed,
    // nothing counted at the informer's stages.
    let k = after.kubectl.since(&before.kubectl);
    assert_eq!((k.client_decoded, k.commit_to_decode), (n, n), "kubectl: {after:?} {before:?}");
    assert_eq!(after.kubectl.informer + after.kubectl.processed + after.kubectl.handled, 0.0, "{after:?}");
    assert_eq!(after.replayed, before.replayed, "no watch started: nothing replayed");
    for reason in [
        "cache_commit_miss",
        "watcher_commit_miss",
        "watcher_cache_miss",
        "decode_commit_miss",
        "rv_unreadable",
        "write_commit_miss",
        "handler_commit_miss",
        "read_error",
        "map_full",
    ] {
        assert_eq!(dropped(&text, reason), 0.0, "{reason}: {text}");
    }
    // On an idle loopback each stage is far under a second.
    assert_eq!(stage(&text, "commit_to_watcher", API).below(1.0), after.commit_to_watcher);

    // A third watcher from the same old revision gets the history replayed:
    // counted as replayed, never timed as watch latency.
    let w3 = api.watch("wsk-watch3", rv0);
    assert_eq!(w3.wait_count(modified, 1 + N as usize, Duration::from_secs(20)), 1 + N as usize);
    assert!(wait_until(Duration::from_secs(10), || Counts::of(&agent.metrics()).replayed >= before.replayed + 1.0 + n));
    let replay = settled(&agent);
    assert_eq!(replay.replayed - after.replayed, 1.0 + n, "{replay:?}");
    assert_eq!(replay.watcher, after.watcher, "{replay:?}");
    assert_eq!(replay.commit_to_watcher, after.commit_to_watcher, "{replay:?}");
    // Its replayed events are written too, but are no live events: none
    // joins (they are copies of the cache's objects).
    assert_eq!(replay.written, after.written, "{replay:?}");
    assert_eq!(replay.commit_to_write, after.commit_to_write, "{replay:?}");

    // A frame whose resourceVersion lies past the 4 KiB the kernel scans (a
    // 5 KB annotation sorts before it): each client-go client decodes it
    // and says it could not read the revision; kubectl's decode is then not
    // timed, never guessed, while each informer times it at its reflector,
    // which read the revision from the object's own field.
    api.patch_annotation("main", 5000);
    for o in [&op, &dynop] {
        assert_eq!(o.wait_count(handled, 2 + N as usize, Duration::from_secs(30)), 2 + N as usize);
    }
    assert_eq!(kubectl.wait_count(|l| l.contains("main"), 2 + N as usize, Duration::from_secs(30)), 2 + N as usize);
    let unreadable = settled(&agent);
    let text = agent.metrics();
    assert_eq!(dropped(&text, "rv_unreadable"), 3.0, "typed, dynamic and kubectl: {text}");
    for (who, now, then) in [("typed", unreadable.op, replay.op), ("dynamic", unreadable.dynop, replay.dynop)] {
        assert_eq!(now.since(&then), Informer::each(1.0), "{who}: {unreadable:?}");
    }
    let k = unreadable.kubectl.since(&replay.kubectl);
    assert_eq!((k.client_decoded, k.commit_to_decode), (1.0, 0.0), "kubectl: {unreadable:?}");
    assert_eq!(dropped(&text, "decode_commit_miss"), 0.0, "{text}");
}

/// Ground truth: the operator is stopped (SIGSTOP) for `D` while one update
/// is committed. Its reflector decodes the event at least `D` after the
/// commit, and the histogram says so in the decode stage, while the API
/// server put it in the operator's result channel at once.
#[test]
fn a_stopped_operator_shows_in_its_decode_stage_and_not_in_the_api_server() {
    const D: f64 = 1.5;
    let agent = Agent::start(&["--comm", &format!("wse-k8s,{API},{OPERATOR}")]);
    let etcd = Etcd::start_build(Build::Sid3530, "wse-k8s", "wsc-k8sctl");
    let api = ApiServer::start(&etcd, API);
    api.create("main");
    let op = api.operator(OPERATOR, &[]);
    wait_attached(&agent, &[etcd.pid(), api.pid(), op.pid()]);
    let handled = |l: &str| l.starts_with("handled update main ");
    api.patch_size("main", 1);
    assert_eq!(op.wait_count(handled, 1, Duration::from_secs(20)), 1, "{:?}", op.lines());
    let before = settled(&agent);
    let text0 = agent.metrics();

    // SAFETY: kill(2) on our own child.
    assert_eq!(unsafe { libc::kill(op.pid() as i32, libc::SIGSTOP) }, 0);
    api.patch_size("main", 2);
    // The PATCH answered after etcd's commit: D from here is at least D
    // from the commit.
    let committed = std::time::Instant::now();
    // The API server has put the event in the operator's result channel.
    assert!(wait_until(Duration::from_secs(10), || Counts::of(&agent.metrics()).watcher > before.watcher));
    while committed.elapsed() < Duration::from_secs_f64(D) {
        std::thread::sleep(Duration::from_millis(50));
    }
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(op.pid() as i32, libc::SIGCONT) }, 0);
    assert_eq!(op.wait_count(handled, 2, Duration::from_secs(20)), 2, "{:?}", op.lines());
    assert!(wait_until(Duration::from_secs(10), || Counts::of(&agent.metrics()).op.informer > before.op.informer));
    let after = settled(&agent);
    let text = agent.metrics();
    assert_eq!(after.op.informer - before.op.informer, 1.0, "{after:?}");
    assert_eq!(after.watcher - before.watcher, 1.0, "{after:?}");
    let decode = |t: &str| stage(t, "commit_to_decode", OPERATOR);
    let watcher = |t: &str| stage(t, "commit_to_watcher", API);
    // The one new decode took at least D; the API server's part did not.
    assert_eq!(decode(&text).from_bucket_of(D) - decode(&text0).from_bucket_of(D), 1.0, "{text}");
    assert_eq!(decode(&text).count() - decode(&text0).count(), 1.0);
    let process = |t: &str| stage(t, "commit_to_process", OPERATOR);
    assert_eq!(process(&text).from_bucket_of(D) - process(&text0).from_bucket_of(D), 1.0, "{text}");
    assert_eq!(watcher(&text).below(D) - watcher(&text0).below(D), 1.0, "{text}");
}

/// Ground truth: the operator's update handler sleeps `D` per call, and
/// two objects are updated at once. The listener hands the second event to
/// the handler only when the first call returned: its `commit_to_handler`
/// and `process_to_handler` hold `D` (less the time between the two
/// commits, which the test measures), the first's do not, the handler
/// window (`main.handleUpdate`) holds `D` for both, and the API server put
/// both in the operator's result channel at once.
#[test]
fn a_slow_handler_shows_in_the_handler_stages_and_its_window_not_in_the_api_server() {
    const D: f64 = 0.5;
    let agent = Agent::start(&[
        "--comm",
        &format!("wse-k8s,{API},{OPERATOR}"),
        "--go-comm",
        OPERATOR,
        "--window",
        "update=main.handleUpdate",
    ]);
    let etcd = Etcd::start_build(Build::Sid3530, "wse-k8s", "wsc-k8sctl");
    let api = ApiServer::start(&etcd, API);
    api.create("a");
    api.create("b");
    let delay = format!("-delay-us={}", (D * 1e6) as u64);
    let op = api.operator(OPERATOR, &[&delay]);
    wait_attached(&agent, &[etcd.pid(), api.pid(), op.pid()]);
    let handled = |l: &str| l.starts_with("handled update ");
    api.patch_size("a", 1);
    assert_eq!(op.wait_count(handled, 1, Duration::from_secs(20)), 1, "{:?}", op.lines());
    let before = settled(&agent);
    let text0 = agent.metrics();

    // Both commits happen inside `spread`: each PATCH answers after its
    // commit, and neither starts before `start`.
    let start = std::time::Instant::now();
    std::thread::scope(|s| {
        s.spawn(|| api.patch_size("a", 2));
        s.spawn(|| api.patch_size("b", 2));
    });
    let spread = start.elapsed().as_secs_f64();
    assert!(spread < D / 2.0, "two PATCHes took {spread} s: no ground truth for D = {D}");
    assert_eq!(op.wait_count(handled, 3, Duration::from_secs(20)), 3, "{:?}", op.lines());
    assert!(wait_until(Duration::from_secs(10), || Counts::of(&agent.metrics()).op.handled >= before.op.handled + 2.0));
    let after = settled(&agent);
    let text = agent.metrics();
    eprintln!("before {before:?}\nafter  {after:?}\nspread {spread:.3} s");
    assert_eq!(after.op.handled - before.op.handled, 2.0, "{after:?}");
    assert_eq!(after.watcher - before.watcher, 2.0, "{after:?}");
    let new = |t: &str, name: &str, f: &dyn Fn(&Buckets) -> f64| {
        f(&stage(t, name, OPERATOR)) - f(&stage(&text0, name, OPERATOR))
    };
    for name in ["commit_to_handler", "process_to_handler"] {
        assert_eq!(new(&text, name, &|b| b.count()), 2.0, "{name}");
        // The second waited for the first call: at least D − spread (less
        // the few ms from a PATCH's answer to the informer's pop).
        assert_eq!(new(&text, name, &|b| b.from_bucket_of(D - spread - 0.05)), 1.0, "{name}: {text}");
        // ... and not for two calls.
        assert_eq!(new(&text, name, &|b| b.below(2.0 * D)), 2.0, "{name}: {text}");
    }
    // The informer itself took both off its queue at once.
    assert_eq!(new(&text, "commit_to_process", &|b| b.below(D / 2.0)), 2.0, "{text}");
    // Each handler window slept D.
    let window =
        |t: &str| Buckets::parse(t, "watchscope_window_seconds", &format!("window=\"update\",comm=\"{OPERATOR}\""));
    assert_eq!(window(&text).from_bucket_of(D) - window(&text0).from_bucket_of(D), 2.0, "{text}");
    // The API server's part stayed short.
    let watcher = |t: &str| stage(t, "commit_to_watcher", API).below(D / 4.0);
    assert_eq!(watcher(&text) - watcher(&text0), 2.0, "{text}");
}

/// Ground truth: one of two watchers stops reading (SIGSTOP; a 16 KB receive
/// buffer, so the API server's writes to it block after a few events) while
/// `K` large updates are committed, for `D` after the last commit. Every
/// write to it that was still pending when it resumed lands at ≥ `D` in
/// `commit_to_write`; every other write (all of the reading watcher's, and
/// the stopped one's that fitted in the socket buffers) stays under `D`/2,
/// and the cacher put every event in both result channels at once.
#[test]
fn a_watcher_that_stops_reading_shows_in_its_writes_and_not_in_the_others() {
    const D: f64 = 2.0;
    const BLOB: u64 = 256 << 10;
    // Enough to fill the API server's socket send buffer at its largest
    // (`tcp_wmem`'s maximum: the kernel grows it on its own) and the
    // client's 16 KB: then writes block. The cacher's queues for the watcher
    // (10 events each at least) hold the rest, so it is not terminated.
    let wmem_max: u64 = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_wmem")
        .ok()
        .and_then(|s| s.split_whitespace().nth(2).and_then(|v| v.parse().ok()))
        .expect("tcp_wmem");
    let k = wmem_max.div_ceil(BLOB) + 2;
    assert!(k <= 24, "tcp_wmem's maximum {wmem_max} needs {k} events: the watcher would be terminated first");
    let agent = Agent::start(&["--comm", &format!("wse-k8s,{API}")]);
    let etcd = Etcd::start_build(Build::Sid3530, "wse-k8s", "wsc-k8sctl");
    let api = ApiServer::start(&etcd, API);
    wait_attached(&agent, &[etcd.pid(), api.pid()]);
    let rv0 = api.create("main");
    let fast = api.watch("wsk-watch1", rv0);
    let slow = api.watch_small_window(rv0, 16 << 10);
    // The first update may reach a watch that registered after its commit
    // as a replayed event; once both printed it, both are registered.
    let modified = |l: &str| event_type(l).as_deref() == Some("MODIFIED");
    for size in [1, 2] {
        api.patch_size("main", size);
        for w in [&fast, &slow] {
            let n = size as usize;
            assert_eq!(w.wait_count(modified, n, Duration::from_secs(20)), n, "{:?}\n{}", w.lines(), api.log());
        }
    }
    let before = settled(&agent);
    let text0 = agent.metrics();

    // SAFETY: kill(2) on our own child.
    assert_eq!(unsafe { libc::kill(slow.pid() as i32, libc::SIGSTOP) }, 0);
    for i in 0..k {
        api.patch_blob("main", 3 + i, BLOB as usize);
    }
    // Every commit happened before this instant (each PATCH answered after it).
    let committed = std::time::Instant::now();
    assert_eq!(fast.wait_count(modified, 2 + k as usize, Duration::from_secs(30)), 2 + k as usize);
    assert!(wait_until(Duration::from_secs(10), || Counts::of(&agent.metrics()).written >= before.written + k as f64));
    while committed.elapsed() < Duration::from_secs_f64(D) {
        std::thread::sleep(Duration::from_millis(50));
    }
    // The writes done while the client was stopped; the rest wait for it.
    let held = Counts::of(&agent.metrics());
    let pending = 2.0 * k as f64 - (held.written - before.written);
    assert!(pending >= 1.0, "no write to the stopped watcher blocked (socket buffers held it all): {held:?}");
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(slow.pid() as i32, libc::SIGCONT) }, 0);
    assert_eq!(slow.wait_count(modified, 2 + k as usize, Duration::from_secs(30)), 2 + k as usize);
    assert!(wait_until(Duration::from_secs(10), || {
        Counts::of(&agent.metrics()).written >= before.written + 2.0 * k as f64
    }));
    let after = settled(&agent);
    let text = agent.metrics();
    eprintln!("before {before:?}\nheld   {held:?}\nafter  {after:?}\npending {pending}");
    let k2 = 2.0 * k as f64;
    assert_eq!(after.written - before.written, k2, "{after:?}");
    assert_eq!(after.commit_to_write - before.commit_to_write, k2, "{after:?}");
    let write = |t: &str| stage(t, "commit_to_write", API);
    assert_eq!(write(&text).from_bucket_of(D) - write(&text0).from_bucket_of(D), pending, "{text}");
    assert_eq!(write(&text).below(D / 2.0) - write(&text0).below(D / 2.0), k2 - pending, "{text}");
    // The cacher's part was quick for both: the result channels had room.
    let watcher = |t: &str| stage(t, "commit_to_watcher", API).below(D / 2.0);
    assert_eq!(watcher(&text) - watcher(&text0), k2, "{text}");
    let terminated = format!("watchscope_apiserver_watchers_terminated_total{{comm=\"{API}\"}}");
    assert_eq!(sample_value(&text, &terminated).unwrap_or(0.0), 0.0, "{text}");
}

/// The incident, reproduced: two operators handle the same updates, one
/// growing its `map[int][256]byte` by `K_SMALL` keys per update, the other
/// by `K_LARGE`. Every update reaches both handlers (exact window counts);
/// the handler window's map-growth time rises with K, and for the large
/// one it is the largest part of what the window spent inside, as `run`
/// measures it by default (map growth and GC assist; with `--go-sched` the
/// run-queue share was 0.6-0.8 of the growth here: the GC's mark worker
/// taking the handler's P, on 2 CPUs).
#[test]
fn the_handlers_map_growth_rises_with_its_growth_and_dominates_the_window() {
    const N: u64 = 10;
    const K_SMALL: u64 = 1_000;
    const K_LARGE: u64 = 16_000;
    const SMALL: &str = "wsk-op-small";
    const LARGE: &str = "wsk-op-large";
    let agent = Agent::start(&[
        "--comm",
        &format!("wse-k8s,{API},{SMALL},{LARGE}"),
        "--go-comm",
        &format!("{SMALL},{LARGE}"),
        "--window",
        "update=main.handleUpdate",
    ]);
    let etcd = Etcd::start_build(Build::Sid3530, "wse-k8s", "wsc-k8sctl");
    let api = ApiServer::start(&etcd, API);
    api.create("main");
    let handled = |l: &str| l.starts_with("handled update main ");
    let text0 = agent.metrics();
    // One operator after the other, so that neither waits for a CPU the
    // other holds; one update at a time, so each window holds one update's
    // growth.
    for (comm, k) in [(SMALL, K_SMALL), (LARGE, K_LARGE)] {
        let op = api.operator(comm, &[&format!("-grow={k}")]);
        wait_attached(&agent, &[etcd.pid(), api.pid(), op.pid()]);
        for i in 0..N as usize {
            api.patch_size("main", (i + 1) as u64);
            assert_eq!(op.wait_count(handled, i + 1, Duration::from_secs(30)), i + 1, "{:?}", op.lines());
        }
        drop(op);
    }
    let windows = |comm: &str| {
        let labels = format!("window=\"update\",comm=\"{comm}\"");
        Buckets::parse(&agent.metrics(), "watchscope_window_seconds", &labels).count()
            - Buckets::parse(&text0, "watchscope_window_seconds", &labels).count()
    };
    assert!(wait_until(Duration::from_secs(10), || windows(SMALL) >= N as f64 && windows(LARGE) >= N as f64));
    let text = agent.metrics();
    let sum = |fam: &str, labels: &str| {
        let at = |t: &str| sample_value(t, &format!("{fam}_sum{{{labels}}}")).unwrap_or(0.0);
        at(&text) - at(&text0)
    };
    let inner = |comm: &str, kind: &str| {
        sum("watchscope_window_inner_seconds", &format!("window=\"update\",inner=\"{kind}\",comm=\"{comm}\""))
    };
    for comm in [SMALL, LARGE] {
        let total = sum("watchscope_window_seconds", &format!("window=\"update\",comm=\"{comm}\""));
        eprintln!(
            "{comm}: {} windows, {total:.4} s; map_grow {:.4} s, gc_assist {:.4} s, off_cpu {:.4} s, runqueue {:.4} s",
            windows(comm),
            inner(comm, "map_grow"),
            inner(comm, "gc_assist"),
            inner(comm, "off_cpu"),
            inner(comm, "runqueue"),
        );
    }
    assert_eq!(windows(SMALL), N as f64, "{text}");
    assert_eq!(windows(LARGE), N as f64, "{text}");
    let (grow_small, grow_large) = (inner(SMALL, "map_grow"), inner(LARGE, "map_grow"));
    assert!(grow_large > 2.0 * grow_small, "map growth {grow_large} s at K={K_LARGE}, {grow_small} s at K={K_SMALL}");
    let gc = inner(LARGE, "gc_assist");
    assert!(grow_large > gc, "map_grow {grow_large} s vs gc_assist {gc} s");
    // Not measured without the scheduler probes: no series, not zeros.
    assert!(!text.contains("inner=\"runqueue\""), "{text}");
}

/// The API server and the operator restarted between two batches of
/// updates: each new process is picked up within a second of its start
/// (same binaries, probes kept) and counts stay exact.
#[test]
fn an_api_server_and_operator_restart_are_picked_up_within_a_second_and_counts_stay_exact() {
    const N: u64 = 10;
    let agent = Agent::start(&["--comm", &format!("wse-k8s,{API},{OPERATOR}")]);
    let etcd = Etcd::start_build(Build::Sid3530, "wse-k8s", "wsc-k8sctl");
    let mut api = ApiServer::start(&etcd, API);
    let rv = api.create("main");
    wait_attached(&agent, &[etcd.pid(), api.pid()]);
    let mut op = api.operator(OPERATOR, &[]);
    wait_attached(&agent, &[op.pid()]);
    let modified = |l: &str| event_type(l).as_deref() == Some("MODIFIED");
    let handled = |l: &str| l.starts_with("handled update main ");
    // Picked up: the agent reports probes on `pid` within a second.
    let within_a_second = |pid: u32| {
        let t0 = std::time::Instant::now();
        let ok = wait_until(Duration::from_secs(1), || {
            watchscope_integration_tests::probes_cover(&watchscope_integration_tests::debug_probes(&agent), &[pid])
        });
        assert!(ok, "process {pid} not attached within a second:\n{}", agent.log_text());
        t0.elapsed()
    };
    let mut rv = rv;
    let mut total = 0.0;
    for round in 0..2 {
        let before = settled(&agent);
        let w = api.watch("wsk-watch1", rv);
        // The first update registers the watch (live or replayed), the
        // next N are counted.
        rv = api.patch_size("main", 1000);
        assert_eq!(w.wait_count(modified, 1, Duration::from_secs(20)), 1, "round {round}: {:?}", w.lines());
        assert_eq!(op.wait_count(handled, 1, Duration::from_secs(20)), 1, "round {round}: {:?}", op.lines());
        let mid = settled(&agent);
        for i in 0..N {
            rv = api.patch_size("main", i);
        }
        assert_eq!(w.wait_count(modified, 1 + N as usize, Duration::from_secs(20)), 1 + N as usize);
        assert_eq!(op.wait_count(handled, 1 + N as usize, Duration::from_secs(20)), 1 + N as usize);
        assert!(wait_until(Duration::from_secs(10), || {
            let c = Counts::of(&agent.metrics());
            c.watcher >= mid.watcher + 2.0 * N as f64 && c.op.handled >= mid.op.handled + N as f64
        }));
        let after = settled(&agent);
        let n = N as f64;
        assert_eq!(after.cache - mid.cache, n, "round {round}: {after:?} {mid:?}");
        // Two watchers: curl and the operator's reflector.
        assert_eq!(after.watcher - mid.watcher, 2.0 * n, "round {round}: {after:?} {mid:?}");
        assert_eq!(after.commit_to_watcher - mid.commit_to_watcher, 2.0 * n, "round {round}: {after:?} {mid:?}");
        assert_eq!(after.written - mid.written, 2.0 * n, "round {round}: {after:?} {mid:?}");
        for (what, d) in [
            ("informer", after.op.informer - mid.op.informer),
            ("commit_to_decode", after.op.commit_to_decode - mid.op.commit_to_decode),
            ("processed", after.op.processed - mid.op.processed),
            ("handled", after.op.handled - mid.op.handled),
            ("commit_to_handler", after.op.commit_to_handler - mid.op.commit_to_handler),
        ] {
            assert_eq!(d, n, "round {round} {what}: {after:?} {mid:?}");
        }
        total += after.cache - before.cache;
        drop(w);
        if round == 0 {
            let old = api.pid();
            api.restart_spawn();
            assert_ne!(api.pid(), old);
            let api_pickup = within_a_second(api.pid());
            api.wait_serving();
            drop(op);
            op = api.operator_spawn(OPERATOR, &[]);
            let op_pickup = within_a_second(op.pid());
            assert!(op.wait_for(|l| l == "synced", Duration::from_secs(30)), "{:?}", op.lines());
            eprintln!("picked up: API server after {api_pickup:?}, operator after {op_pickup:?}");
        }
    }
    assert_eq!(total, 2.0 * (N as f64 + 1.0));
    let text = agent.metrics();
    for reason in ["cache_commit_miss", "watcher_commit_miss", "watcher_cache_miss", "decode_commit_miss", "read_error"]
    {
        assert_eq!(dropped(&text, reason), 0.0, "{reason}: {text}");
    }
}

/// A Go program with the API server's watch-cache names and a
/// `watchCacheEvent` whose ResourceVersion is a string: refused, naming
/// the field, in `inspect`, in `/debug/probes` and by attaching nothing.
#[test]
fn a_binary_with_the_api_servers_names_and_another_layout_is_refused_naming_the_field() {
    use std::io::{BufRead, Write};
    let dir = tempfile::tempdir().expect("tmp");
    let bin = dir.path().join("ws-fakeapi");
    watchscope_integration_tests::go::go119().build_program("fake-apiserver", &bin, false);
    let why = "cacher.watchCacheEvent.ResourceVersion is a string of 16 bytes in this binary, not a uint64";

    let text = watchscope_integration_tests::inspect_text(&bin);
    assert!(
        text.contains("apiserver_cache_process_event") && text.contains("REFUSED: ") && text.contains(why),
        "{text}"
    );

    let agent = Agent::start(&["--comm", "ws-fakeapi"]);
    let mut child = std::process::Command::new(&bin)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("start fixture");
    let mut stdin = child.stdin.take().expect("stdin");
    let mut lines = std::io::BufReader::new(child.stdout.take().expect("stdout")).lines();
    assert_eq!(lines.next().and_then(Result::ok).as_deref(), Some("ready"));
    let refused = wait_until(Duration::from_secs(10), || {
        watchscope_integration_tests::debug_probes(&agent)["binaries"].as_array().is_some_and(|bins| {
            bins.iter().any(|b| {
                b["path"].as_str().is_some_and(|p| p.ends_with("ws-fakeapi"))
                    && b["attached"] == false
                    && b["reason"].as_str().is_some_and(|r| r.contains(why))
            })
        })
    });
    // Events through the probed functions: none may be counted.
    for i in 0..20 {
        stdin.write_all(b"event\n").expect("write");
        assert_eq!(lines.next().and_then(Result::ok), Some(format!("sent {}", i + 1)));
    }
    drop(stdin);
    let _ = child.wait();
    assert!(refused, "not refused for its layout: {}", agent.log_text());
    assert_eq!(agent.sample_present("watchscope_probes_attached{kind=\"uprobe\"}"), 0.0);
    let text = agent.metrics();
    assert!(!text.contains("side=\"apiserver_"), "{text}");
    assert!(!text.contains("stage=\"commit_to_cache\""), "{text}");
}

/// A watcher that stops reading (SIGSTOP) while large updates flow: its
/// stream, then its queues fill, and the API server terminates it. The
/// agent counts every termination the API server's own
/// `apiserver_terminated_watchers_total` reports.
#[test]
fn a_watcher_the_api_server_terminates_for_unresponsiveness_is_counted() {
    const BLOB: usize = 256 * 1024;
    let agent = Agent::start(&["--comm", &format!("wse-k8s,{API}")]);
    let etcd = Etcd::start_build(Build::Sid3530, "wse-k8s", "wsc-k8sctl");
    let api = ApiServer::start(&etcd, API);
    wait_attached(&agent, &[etcd.pid(), api.pid()]);
    let rv0 = api.create("main");
    let slow = api.watch_http1("wsk-slow", rv0);
    api.patch_size("main", 1);
    let modified = |l: &str| event_type(l).as_deref() == Some("MODIFIED");
    assert_eq!(slow.wait_count(modified, 1, Duration::from_secs(20)), 1, "{:?}", slow.lines());
    let terminated = || agent.sample(&format!("watchscope_apiserver_watchers_terminated_total{{comm=\"{API}\"}}"));
    assert_eq!(terminated(), 0.0);
    assert_eq!(api.terminated_watchers(), 0.0);

    // SAFETY: kill(2) on our own child.
    assert_eq!(unsafe { libc::kill(slow.pid() as i32, libc::SIGSTOP) }, 0);
    let mut n = 0;
    while api.terminated_watchers() == 0.0 {
        n += 1;
        assert!(n <= 300, "the API server never gave up on the stopped watcher:\n{}", api.log());
        api.patch_blob("main", n, BLOB);
    }
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(slow.pid() as i32, libc::SIGCONT) }, 0);
    let truth = api.terminated_watchers();
    eprintln!("the API server terminated {truth} watcher(s) after {n} updates of {BLOB} bytes");
    assert!(wait_until(Duration::from_secs(10), || terminated() >= truth), "{}", agent.metrics());
    assert_eq!(terminated(), truth, "after {n} updates of {BLOB} bytes");
    // Terminations are watchers, never events.
    assert_eq!(
        agent.sample(&format!("watchscope_watch_events_total{{side=\"apiserver_terminated\",comm=\"{API}\"}}")),
        0.0
    );
}
