//! The etcd watch path on real etcd builds (3.4.23, 3.5.16, 3.5.30) with
//! their own etcdctl: exact event counts, progress notifications apart from
//! events, a slow watcher that shows up in the right stage, restarts and
//! upgrades, SIGKILL of the agent; and binaries whose layout or names are
//! not known, refused.

use std::{
    process::{Command, Stdio},
    time::Duration,
};

use watchscope_integration_tests::{
    Agent, Buckets, clientgo, debug_probes,
    etcd::{Build, Etcd, LineReader, unsent},
    on_builds, sample_value, uprobe_events_of, wait_attached, wait_until,
};

const FAMILY: &str = "watchscope_watch_stage_seconds";

fn stage_labels(stage: &str, comm: &str) -> String {
    format!("stage=\"{stage}\",comm=\"{comm}\"")
}

fn events(agent: &Agent, side: &str, comm: &str) -> f64 {
    agent.sample(&format!("watchscope_watch_events_total{{side=\"{side}\",comm=\"{comm}\"}}"))
}

/// For a test that runs two ways: the server's and the client's comm
/// names in one of them (`base` and a one-letter `tag`), and the agent's
/// `--comm` list naming both.
fn mode_comms(build: Build, base: &str, tag: &str) -> (String, String, String) {
    let (server, client) = (build.comm(&format!("wse-{base}{tag}")), build.comm(&format!("wsc-{base}{tag}")));
    let comms = format!("{server},{client}");
    (server, client, comms)
}

fn dropped(text: &str, reason: &str) -> f64 {
    watchscope_integration_tests::present(text, &format!("watchscope_dropped_total{{reason=\"{reason}\"}}"))
}

on_builds!(
    [etcd_3_4_23, Bookworm3423], [etcd_3_5_16, Trixie3516], [etcd_3_5_30, Sid3530], [etcd_3_3_25, Bullseye3325]: [
    counts_are_exact_for_puts_and_a_txn,
    a_slow_watcher_shows_in_its_send_stages_and_not_in_the_fast_client,
    etcd_restart_and_upgrade_are_picked_up_and_counts_stay_exact,
    sigkill_leaves_no_probe_behind_and_etcd_keeps_serving,
    sigkill_with_tracefs_uprobes_leaves_nothing_attached_and_the_next_agent_cleans_up,
    a_watch_from_an_old_revision_is_timed_from_its_commit_or_counted_as_missed,
    a_filtered_watch_is_timed_from_enqueue_to_send_like_any_other,
]);

// The Go runtime probes need the register ABI (Go 1.17+): not 3.3.25.
on_builds!([stop_3_4_23, Bookworm3423], [stop_3_5_16, Trixie3516], [stop_3_5_30, Sid3530]: [
    sigterm_stops_within_half_a_second_and_takes_every_probe_away,
]);

// etcd 3.3 queues 1,024 responses per watch stream before it takes a
// watcher out of its fan-out; 3.4.23 and 3.5 queue 128.
on_builds!([lone_3_4_23, Bookworm3423], [lone_3_5_16, Trixie3516], [lone_3_5_30, Sid3530]: [
    a_lone_slow_watchers_backlog_is_timed_from_its_commits,
]);

// Progress requests arrived in etcd 3.4 (3.3's etcdctl has no `progress`).
on_builds!([progress_3_4_23, Bookworm3423], [progress_3_5_16, Trixie3516], [progress_3_5_30, Sid3530]: [
    progress_notifications_are_counted_apart_from_events,
]);

fn counts_are_exact_for_puts_and_a_txn(build: Build) {
    const N: usize = 25;
    const K: usize = 3;
    let (server, client) = (build.comm("wse-count"), build.comm("wsc-count"));
    let (server, client) = (server.as_str(), client.as_str());
    let agent = Agent::start(&["--comm", &format!("{server},{client}")]);
    // etcd starts after the agent: found through its exec event.
    let etcd = Etcd::start_build(build, server, client);
    let watch = etcd.watch("/count/");
    wait_attached(&agent, &[etcd.pid(), watch.pid()]);
    etcd.wait_watchers(1, Duration::from_secs(10));

    for i in 0..N {
        etcd.put(&format!("/count/{i}"), "v");
    }
    let kvs: Vec<(String, String)> = (0..K).map(|i| (format!("/count/txn{i}"), "t".to_string())).collect();
    let kv_refs: Vec<(&str, &str)> = kvs.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    etcd.txn_puts(&kv_refs);
    etcd.put("/other/not-watched", "x");

    let want = (N + K) as f64;
    assert_eq!(watch.wait_count(|l| l == "PUT", N + K, Duration::from_secs(10)), N + K, "etcdctl saw every event");
    // etcd counted each event before sending it, and the client as its
    // dispatch began, before it printed: the counts should be final now.
    // The bounded wait only turns a missing count into a clear message;
    // then every count must be exact.
    dispatched(&agent, client, want);

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

/// With `--etcd-notify-probe=false`, a revision's commit is stamped when
/// etcd's fan-out hands it to its first watcher. A watch from an old revision gets
/// events committed while nobody watched, sent by etcd's catch-up loop,
/// not the fan-out: taking them as committed then would be a wrong read, so
/// they count as commit misses (the enqueue probe tells the callers apart
/// by its return address). Probing the fan-out (the default) stamps every
/// commit, and the same events are timed from their commit, a known pause
/// before the watch began. Live events are timed either way.
fn a_watch_from_an_old_revision_is_timed_from_its_commit_or_counted_as_missed(build: Build) {
    const OLD: usize = 6;
    const LIVE: usize = 4;
    const PAUSE: Duration = Duration::from_millis(600);
    for notify_probe in [false, true] {
        let tag = if notify_probe { "n" } else { "f" };
        let (server, client, comms) = mode_comms(build, "old", tag);
        let mode = format!("--etcd-notify-probe={notify_probe}");
        let args = ["--comm", comms.as_str(), mode.as_str()];
        let agent = Agent::start(&args);
        let etcd = Etcd::start_build(build, &server, &client);
        wait_attached(&agent, &[etcd.pid()]);
        let from = etcd.revision() + 1;
        for i in 0..OLD {
            etcd.put(&format!("/old/{i}"), "v");
        }
        // The known age of the old events when the watch asks for them.
        std::thread::sleep(PAUSE);
        let watch = etcd.watch_with("/old/", &[&format!("--rev={from}")]);
        assert_eq!(watch.wait_count(|l| l == "PUT", OLD, Duration::from_secs(10)), OLD, "the catch-up");
        etcd.wait_watchers(1, Duration::from_secs(10));
        for i in 0..LIVE {
            etcd.put(&format!("/old/live{i}"), "v");
        }
        let want = (OLD + LIVE) as f64;
        assert_eq!(watch.wait_count(|l| l == "PUT", OLD + LIVE, Duration::from_secs(10)), OLD + LIVE);
        wait_until(Duration::from_secs(5), || events(&agent, "server", &server) >= want);
        let text = agent.metrics();
        assert_eq!(events(&agent, "server", &server), want, "{text}");
        let stage = |name: &str| Buckets::parse(&text, FAMILY, &stage_labels(name, &server));
        // Queue time is the watcher's own, for every copy.
        assert_eq!(stage("enqueue_to_send").count(), want, "{text}");
        assert_eq!(dropped(&text, "send_enqueue_miss"), 0.0, "{text}");
        for name in ["commit_to_enqueue", "commit_to_send"] {
            let b = stage(name);
            if notify_probe {
                assert_eq!(b.count(), want, "{name} with the fan-out probed: {text}");
                assert!(b.from_bucket_of(PAUSE.as_secs_f64()) >= OLD as f64, "{name}: the old events' age: {text}");
            } else {
                assert_eq!(b.count(), LIVE as f64, "{name}: only the live events: {text}");
                assert_eq!(b.from_bucket_of(PAUSE.as_secs_f64()), 0.0, "{name}: a catch-up taken as a commit: {text}");
            }
        }
        let missed = if notify_probe { 0.0 } else { OLD as f64 };
        assert_eq!(dropped(&text, "enqueue_commit_miss"), missed, "{text}");
        assert_eq!(dropped(&text, "send_commit_miss"), missed, "{text}");
    }
}

/// etcd applies a watch's own filters (NOPUT, NODELETE: etcd's Go client
/// asks for them, etcdctl cannot) on the server, where `watcher.send`
/// copies the events the watcher keeps into a new slice before it queues
/// them: the gRPC send then transmits addresses the enqueue never saw.
/// With `--etcd-filtered-watches` the agent reads the watcher's filters at
/// the enqueue and joins such a watcher's copies by their `Kv` pointer,
/// which the filter copies along. A watch without deletes and an
/// unfiltered one on the same keys: with the flag, every event either gets
/// is timed at every stage once, the deletes the filter dropped at none,
/// and nothing is counted missing; without it (the default), the filtered
/// watch's events are timed from commit to send and each is counted as a
/// `send_enqueue_miss`, never joined wrongly.
fn a_filtered_watch_is_timed_from_enqueue_to_send_like_any_other(build: Build) {
    const N: usize = 12;
    const M: usize = 5;
    for on in [true, false] {
        let tag = if on { "y" } else { "n" };
        let (server, client, comms) = mode_comms(build, "filt", tag);
        let mode = format!("--etcd-filtered-watches={on}");
        let agent = Agent::start(&["--comm", comms.as_str(), mode.as_str()]);
        let etcd = Etcd::start_build(build, &server, &client);
        let all = etcd.watch("/filt/");
        let puts = LineReader::new(
            Command::new(clientgo::etcd_watch())
                .args([&format!("-endpoint={}", etcd.endpoint()), "-prefix=/filt/", "-filter=delete"])
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .expect("etcdwatch"),
        );
        assert!(puts.wait_for(|l| l == "CREATED", Duration::from_secs(20)), "the filtered watch started");
        wait_attached(&agent, &[etcd.pid(), all.pid()]);
        etcd.wait_watchers(2, Duration::from_secs(10));
        for i in 0..N {
            let key = format!("/filt/{i}");
            etcd.put(&key, "v");
            if i < M {
                let out = etcd.ctl_command().args(["del", &key]).output().expect("etcdctl del");
                assert!(out.status.success(), "del {key}");
            }
        }
        assert_eq!(puts.wait_count(|l| l.starts_with("PUT "), N, Duration::from_secs(10)), N, "the filtered watch");
        assert_eq!(all.wait_count(|l| l == "PUT", N, Duration::from_secs(10)), N);
        assert_eq!(all.wait_count(|l| l == "DELETE", M, Duration::from_secs(10)), M);
        assert_eq!(puts.count(|l| l.starts_with("DELETE ")), 0, "etcd filtered the deletes out");
        // Sent: each put twice, each delete once.
        let want = (2 * N + M) as f64;
        wait_until(Duration::from_secs(5), || events(&agent, "server", &server) >= want);
        let text = agent.metrics();
        assert_eq!(events(&agent, "server", &server), want, "{text}");
        let stage = |name: &str| Buckets::parse(&text, FAMILY, &stage_labels(name, &server));
        assert_eq!(stage("commit_to_send").count(), want, "{text}");
        assert_eq!(stage("commit_to_send").below(1.0), want, "on an idle loopback: {text}");
        for reason in ["enqueue_commit_miss", "send_commit_miss", "map_full", "read_error"] {
            assert_eq!(dropped(&text, reason), 0.0, "{reason}: {text}");
        }
        if on {
            for name in ["commit_to_enqueue", "enqueue_to_send"] {
                assert_eq!(stage(name).count(), want, "{name}: {text}");
                assert_eq!(stage(name).below(1.0), want, "{name} on an idle loopback: {text}");
            }
            assert_eq!(unsent(&text, &server), 0.0, "{text}");
            assert_eq!(dropped(&text, "send_enqueue_miss"), 0.0, "{text}");
        } else {
            // etcdctl's copies only; the filtered watch's sends are misses.
            assert_eq!(stage("enqueue_to_send").count(), (N + M) as f64, "{text}");
            assert_eq!(dropped(&text, "send_enqueue_miss"), N as f64, "{text}");
        }
    }
}

/// Pauses the slow watcher and puts large values under `prefix` until its
/// stream blocks: they fill the gateway's HTTP stream, the sockets and the
/// HTTP/2 windows, then etcd's gRPC send for that stream blocks. How many
/// puts that takes depends on the machine: put until the agent itself sees
/// events queued to a watcher and not sent. The puts made.
fn block_stream(agent: &Agent, etcd: &Etcd, slow: &mut LineReader, server: &str, prefix: &str) -> usize {
    // Events the agent must see queued but not sent before the block counts.
    const STUCK: f64 = 3.0;
    const MAX_PUTS: usize = 200;
    slow.send("pause");
    assert!(slow.wait_for(|l| l.starts_with("paused"), Duration::from_secs(5)));
    let mut stuck = 0.0;
    let puts = etcd.put_large_until(prefix, 300_000, MAX_PUTS, || {
        stuck = unsent(&agent.metrics(), server);
        stuck >= STUCK
    });
    assert!(stuck >= STUCK, "after {puts} puts only {stuck} events wait for their send:\n{}", agent.metrics());
    puts
}

/// A slow watcher alone on its keys. Once its stream blocks, etcd's queue
/// for it fills (128 responses), etcd takes it out of the fan-out, and once
/// it reads again sends it what it missed from its catch-up loop. Probing
/// the fan-out (the default), every event of that backlog is timed from its
/// commit: the ones committed before the known pause waited through it.
/// With `--etcd-notify-probe=false` no watcher received the revisions
/// committed while it was out of the fan-out, so they have no commit time
/// and count as misses, never timed from the catch-up.
fn a_lone_slow_watchers_backlog_is_timed_from_its_commits(build: Build) {
    const D: f64 = 2.0;
    // Small puts once its stream is blocked: past etcd's queue of 128.
    const MORE: usize = 200;
    for notify_probe in [true, false] {
        let tag = if notify_probe { "n" } else { "f" };
        let (server, client, comms) = mode_comms(build, "lone", tag);
        let etcd = Etcd::start_build(build, &server, &client);
        let mut slow = etcd.slow_watcher("/lone/");
        let mode = format!("--etcd-notify-probe={notify_probe}");
        let agent = Agent::start(&["--comm", &comms, &mode]);
        wait_attached(&agent, &[etcd.pid()]);
        etcd.wait_watchers(1, Duration::from_secs(10));
        let large = block_stream(&agent, &etcd, &mut slow, &server, "/lone/large");
        for i in 0..MORE {
            etcd.put(&format!("/lone/small{i}"), "v");
        }
        // The known pause: every event so far was committed before it.
        std::thread::sleep(Duration::from_secs_f64(D));
        slow.send("resume");
        let total = large + MORE;
        assert_eq!(
            slow.wait_count(|l| l.starts_with("event "), total, Duration::from_secs(60)),
            total,
            "{:?}",
            slow.lines()
        );
        let want = total as f64;
        wait_until(Duration::from_secs(5), || events(&agent, "server", &server) >= want);
        let text = agent.metrics();
        assert_eq!(events(&agent, "server", &server), want, "{text}");
        let sent = Buckets::parse(&text, FAMILY, &stage_labels("commit_to_send", &server));
        let (send_miss, enqueue_miss) = (dropped(&text, "send_commit_miss"), dropped(&text, "enqueue_commit_miss"));
        assert_eq!(sent.count() + send_miss, want, "every send is timed or counted: {text}");
        println!(
            "--etcd-notify-probe={notify_probe}: {large} large and {MORE} small puts; {} sends timed ({} through \
             the pause), {send_miss} commit misses",
            sent.count(),
            sent.from_bucket_of(D)
        );
        if notify_probe {
            assert_eq!((send_miss, enqueue_miss), (0.0, 0.0), "{text}");
            assert!(sent.from_bucket_of(D) >= MORE as f64, "the backlog waited through the pause: {text}");
        } else {
            assert!(send_miss >= 20.0, "revisions committed while it was out of the fan-out: {send_miss}\n{text}");
            assert_eq!(enqueue_miss, send_miss, "a catch-up copy found no commit at its enqueue either: {text}");
        }
    }
}

fn progress(agent: &Agent, side: &str, comm: &str) -> Option<f64> {
    sample_value(&agent.metrics(), &format!("watchscope_watch_progress_total{{side=\"{side}\",comm=\"{comm}\"}}"))
}

/// Progress requests (what the API server sends every 100 ms while a read
/// waits for its watch cache) interleaved with puts: every response without
/// events that etcd sends for them is counted as progress, and the event
/// counts stay exact.
fn progress_notifications_are_counted_apart_from_events(build: Build) {
    const ROUNDS: usize = 8;
    let (server, client) = (build.comm("wse-prog"), build.comm("wsc-prog"));
    let (server, client) = (server.as_str(), client.as_str());
    let agent = Agent::start(&["--comm", &format!("{server},{client}")]);
    let etcd = Etcd::start_build(build, server, client);
    let mut watch = etcd.watch_interactive("/prog/");
    wait_attached(&agent, &[etcd.pid(), watch.pid()]);
    let notified = |w: &watchscope_integration_tests::etcd::LineReader| w.count(|l| l.starts_with("progress notify"));
    // etcdctl prints nothing when its watch is created. etcd handles a
    // stream's requests in order, so the answer to a first progress request
    // says the watch exists: puts from then on are the watcher's.
    watch.send("progress");
    assert_eq!(watch.wait_count(|l| l.starts_with("progress notify"), 1, Duration::from_secs(10)), 1);
    for i in 0..ROUNDS {
        etcd.put(&format!("/prog/{i}"), "v");
        assert_eq!(watch.wait_count(|l| l == "PUT", i + 1, Duration::from_secs(10)), i + 1);
        watch.send("progress");
        assert_eq!(watch.wait_count(|l| l.starts_with("progress notify"), i + 2, Duration::from_secs(10)), i + 2);
    }
    let (want, progress_want) = (ROUNDS as f64, (ROUNDS + 1) as f64);
    wait_until(Duration::from_secs(5), || {
        events(&agent, "client", client) >= want
            && progress(&agent, "server", server) >= Some(progress_want)
            && progress(&agent, "client", client) >= Some(progress_want)
    });
    let text = agent.metrics();
    // etcdctl printed one line per progress response etcd sent it.
    assert_eq!(notified(&watch), ROUNDS + 1);
    assert_eq!(progress(&agent, "server", server), Some(progress_want), "{text}");
    // The client: clientv3 hands each progress response to dispatchEvent
    // (3.4 and 3.5 alike, here with watch id -1 from 3.5.13 on).
    assert_eq!(progress(&agent, "client", client), Some(progress_want), "{text}");
    // ... and none of it is an event, a stage observation or a drop.
    assert_eq!(events(&agent, "server", server), want, "{text}");
    assert_eq!(events(&agent, "client", client), want, "{text}");
    for stage in ["commit_to_enqueue", "enqueue_to_send", "commit_to_send"] {
        assert_eq!(Buckets::parse(&text, FAMILY, &stage_labels(stage, server)).count(), want, "{stage}: {text}");
    }
    assert_eq!(Buckets::parse(&text, FAMILY, &stage_labels("commit_to_dispatch", client)).count(), want, "{text}");
    for reason in ["send_commit_miss", "send_enqueue_miss", "dispatch_commit_miss", "read_error"] {
        assert_eq!(dropped(&text, reason), 0.0, "{reason}: {text}");
    }
}

fn a_slow_watcher_shows_in_its_send_stages_and_not_in_the_fast_client(build: Build) {
    // The known delay: how long the slow watcher's stream stays blocked
    // once the agent sees it blocked.
    const D: f64 = 4.0;
    let (server, client) = (build.comm("wse-slow"), build.comm("wsc-slow"));
    let (server, client) = (server.as_str(), client.as_str());
    // etcd and the watchers start before the agent: found by the /proc scan.
    let etcd = Etcd::start_build(build, server, client);
    let fast = etcd.watch("/slow/");
    let mut slow = etcd.slow_watcher("/slow/");
    let agent = Agent::start(&["--comm", &format!("{server},{client}")]);
    wait_attached(&agent, &[etcd.pid(), fast.pid()]);

    let puts = block_stream(&agent, &etcd, &mut slow, server, "/slow/");
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

fn etcd_restart_and_upgrade_are_picked_up_and_counts_stay_exact(build: Build) {
    let (server, client) = (build.comm("wse-rst"), build.comm("wsc-rst"));
    let (server, client) = (server.as_str(), client.as_str());
    let agent = Agent::start(&["--comm", &format!("{server},{client}")]);
    let mut etcd = Etcd::start_build(build, server, client);
    let watch = etcd.watch("/r/");
    wait_attached(&agent, &[etcd.pid(), watch.pid()]);
    etcd.wait_watchers(1, Duration::from_secs(10));
    for i in 0..5 {
        etcd.put(&format!("/r/a{i}"), "v");
    }
    assert_eq!(watch.wait_count(|l| l == "PUT", 5, Duration::from_secs(10)), 5);

    // Restart on the same binary, then "upgrade": a new file (new inode) at
    // the same path, as a package upgrade would leave it.
    for upgrade in [false, true] {
        if upgrade {
            let tmp = etcd.bin.with_extension("new");
            std::fs::copy(build.server(), &tmp).expect("copy");
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
    // etcdctl reconnects by itself: once the new etcd has its watcher.
    etcd.wait_watchers(1, Duration::from_secs(20));
    for i in 0..5 {
        etcd.put(&format!("/r/b{i}"), "v");
    }
    assert_eq!(watch.wait_count(|l| l == "PUT", 10, Duration::from_secs(20)), 10);
    dispatched(&agent, client, 10.0);
    let text = agent.metrics();
    assert_eq!(events(&agent, "server", server), 10.0, "{text}");
    assert_eq!(events(&agent, "client", client), 10.0, "{text}");
    let b = Buckets::parse(&text, FAMILY, &stage_labels("commit_to_send", server));
    assert_eq!(b.count(), 10.0, "{text}");
}

/// Waits until `client` has counted and timed `want` dispatches.
fn dispatched(agent: &Agent, client: &str, want: f64) {
    let ok = wait_until(Duration::from_secs(10), || {
        let text = agent.metrics();
        let timed = Buckets::parse(&text, FAMILY, &stage_labels("commit_to_dispatch", client)).count();
        sample_value(&text, &format!("watchscope_watch_events_total{{side=\"client\",comm=\"{client}\"}}"))
            .is_some_and(|n| n >= want)
            && timed >= want
    });
    assert!(ok, "{client} did not count {want} dispatches:\n{}", agent.metrics());
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
fn sigkill_leaves_no_probe_behind(build: Build, mechanism: &str, server: &str, client: &str) {
    let (server, client) = (build.comm(server), build.comm(client));
    let (server, client) = (server.as_str(), client.as_str());
    let etcd = Etcd::start_build(build, server, client);
    let comms = format!("{server},{client}");
    let args = ["--comm", comms.as_str(), "--uprobe-attach", mechanism];
    let mut agent = Agent::start(&args);
    wait_attached(&agent, &[etcd.pid()]);
    assert_eq!(debug_probes(&agent)["uprobe_mechanism"], mechanism);
    let pid = agent.pid();
    let (progs, links) = our_programs_and_links();
    // Links: at least etcd's enqueue and send, and the two process
    // tracepoints (the fan-out is not probed with --etcd-notify-probe=false).
    assert!(progs >= 5 && links >= 4, "expected our programs and links while running: {progs} programs, {links} links");
    let status = agent.stop_with(libc::SIGKILL, Duration::from_secs(5));
    assert!(!status.success());
    // The kernel closes a dead process's fds asynchronously, and frees a
    // uprobe's program only after an RCU-tasks-trace grace period, which
    // takes seconds on a loaded machine (CI saw 5 programs left after 5 s):
    // the bound is generous, the wait ends as soon as they are gone.
    let clean = wait_until(Duration::from_secs(30), || our_programs_and_links() == (0, 0));
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

/// The bpf objects agent `pid` holds, by kernel id: (programs, links), from
/// the `prog_id` and `link_id` lines of its fds' fdinfo.
fn bpf_ids_of(pid: u32) -> (Vec<u64>, Vec<u64>) {
    let (mut progs, mut links) = (Vec::new(), Vec::new());
    let dir = std::fs::read_dir(format!("/proc/{pid}/fdinfo")).expect("agent fdinfo");
    for entry in dir.flatten() {
        let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
        for line in text.lines() {
            let id = |key: &str| line.strip_prefix(key).and_then(|v| v.trim().parse::<u64>().ok());
            if let Some(id) = id("link_id:") {
                links.push(id);
            } else if let Some(id) = id("prog_id:")
                && !text.contains("link_id:")
            {
                progs.push(id);
            }
        }
    }
    progs.sort_unstable();
    progs.dedup();
    (progs, links)
}

/// Which of `ids` bpftool still lists among `what` (prog or link).
fn still_listed(what: &str, ids: &[u64]) -> Vec<u64> {
    bpftool_json(what).iter().filter_map(|o| o["id"].as_u64()).filter(|id| ids.contains(id)).collect()
}

/// The byte process `pid` has in memory at `file_offset` of its executable:
/// a uprobe shows as its breakpoint (0xCC) there, in every process that maps
/// the file.
fn text_byte(pid: u32, file_offset: u64) -> u8 {
    use std::os::unix::fs::FileExt as _;
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).expect("exe");
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).expect("maps");
    let vaddr = maps
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 6 && std::path::Path::new(f[5]) == exe && f[1].contains('x')).then_some(())?;
            let (start, end) = f[0].split_once('-')?;
            let (start, end) = (u64::from_str_radix(start, 16).ok()?, u64::from_str_radix(end, 16).ok()?);
            let off = u64::from_str_radix(f[2], 16).ok()?;
            (off..off + (end - start)).contains(&file_offset).then_some(start + (file_offset - off))
        })
        .next()
        .unwrap_or_else(|| panic!("offset {file_offset:#x} is not in {}'s text:\n{maps}", exe.display()));
    let mem = std::fs::File::open(format!("/proc/{pid}/mem")).expect("open mem");
    let mut b = [0u8];
    mem.read_exact_at(&mut b, vaddr).expect("read mem");
    b[0]
}

/// The planned file offsets of `pid`'s binary: watch-path sites and Go
/// runtime entries.
fn planned_offsets(probes: &serde_json::Value, pid: u32) -> Vec<u64> {
    let bins = probes["binaries"].as_array().cloned().unwrap_or_default();
    let bin = bins
        .iter()
        .find(|b| b["processes"].as_array().is_some_and(|p| p.iter().any(|p| p.as_u64() == Some(u64::from(pid)))))
        .unwrap_or_else(|| panic!("no binary for {pid}: {probes}"));
    let planned = |key: &str, field: &str| -> Vec<u64> {
        bin[key]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|s| s["planned"] == true)
            .filter_map(|s| s[field].as_u64())
            .collect::<Vec<_>>()
    };
    let mut offsets = planned("sites", "file_offset");
    let runtime = planned("go_runtime", "entry_offset");
    assert!(!runtime.is_empty(), "no Go runtime probe planned for {pid}: {bin}");
    offsets.extend(runtime);
    // And every return site: the RETs, and a window's end sites in its
    // callers (the client's dispatch window ends there).
    for list in ["return_offsets", "end_offsets"] {
        let sites = bin["go_runtime"].as_array().into_iter().flatten().filter(|s| s["planned"] == true);
        offsets.extend(sites.flat_map(|s| s[list].as_array().into_iter().flatten().filter_map(|o| o.as_u64())));
    }
    offsets.sort_unstable();
    offsets.dedup();
    offsets
}

/// SIGTERM with the watch path and the Go runtime probes on etcd and two
/// etcdctl watchers: the agent exits within 0.5 s, and nothing of it is
/// left: no link, no program, no breakpoint in the watched processes'
/// text. One uprobe_multi link per binary and program makes this possible:
/// with a perf link per site the kernel releases them one after another
/// behind an RCU grace period each (5.9 s for these 56 sites here).
fn sigterm_stops_within_half_a_second_and_takes_every_probe_away(build: Build) {
    const N: usize = 5;
    let (server, client) = (build.comm("wse-stop"), build.comm("wsc-stop"));
    let (server, client) = (server.as_str(), client.as_str());
    let etcd = Etcd::start_build(build, server, client);
    let comms = format!("{server},{client}");
    // With every evacuation probe too: the most runtime sites a default-cost
    // mode places.
    let mut agent = Agent::start(&["--comm", &comms, "--go-comm", &comms, "--go-maps", "evacuation", "--bpf-stats"]);
    let (first, second) = (etcd.watch("/stop/"), etcd.watch("/stop/"));
    let pids = [etcd.pid(), first.pid(), second.pid()];
    wait_attached(&agent, &pids);
    etcd.wait_watchers(2, Duration::from_secs(10));
    let probes = debug_probes(&agent);
    assert_eq!(probes["uprobe_mechanism"], "uprobe-multi", "{probes}");
    // This kernel refuses register writes from uprobe programs.
    assert_eq!(probes["ret_sites"], "single-step", "{probes}");
    let (sites, links) =
        (probes["uprobes_attached"].as_u64().unwrap_or(0), probes["uprobe_links"].as_u64().unwrap_or(0));
    assert!(links > 0 && sites >= 4 * links, "{sites} sites in {links} links: {probes}");

    // The probes placed through multi links time every event.
    for i in 0..N {
        etcd.put(&format!("/stop/{i}"), "v");
    }
    for w in [&first, &second] {
        assert_eq!(w.wait_count(|l| l == "PUT", N, Duration::from_secs(10)), N);
    }
    dispatched(&agent, client, (2 * N) as f64);
    assert_eq!(events(&agent, "server", server), (2 * N) as f64, "{}", agent.metrics());
    assert_eq!(events(&agent, "client", client), (2 * N) as f64, "{}", agent.metrics());
    // The programs loaded for multi links are the ones whose runs are counted.
    let runs = agent.sample("watchscope_program_runs_total{program=\"etcd_enqueue\"}");
    assert!(runs >= N as f64, "{}", agent.metrics());

    // The client's dispatch window ends in its caller: no RET probe.
    let dispatch: Vec<serde_json::Value> = probes["binaries"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|b| {
            b["processes"].as_array().is_some_and(|p| p.iter().any(|p| p.as_u64() == Some(u64::from(first.pid()))))
        })
        .flat_map(|b| b["go_runtime"].as_array().cloned().unwrap_or_default())
        .filter(|s| s["what"] == "etcd_client_dispatch")
        .collect();
    assert!(
        !dispatch.is_empty() && dispatch.iter().all(|s| s["ends"] == "caller" && s["end_offsets"].is_array()),
        "{dispatch:?}"
    );

    // Every planned site is a breakpoint in each process's text now.
    let offsets: Vec<(u32, u64, u8)> = pids
        .iter()
        .flat_map(|&pid| {
            let file = std::fs::read(format!("/proc/{pid}/exe")).expect("read exe");
            planned_offsets(&probes, pid).into_iter().map(move |o| (pid, o, file[o as usize]))
        })
        .collect();
    for &(pid, offset, _) in &offsets {
        assert_eq!(text_byte(pid, offset), 0xCC, "no breakpoint at {offset:#x} in {pid}");
    }
    let (progs, links) = bpf_ids_of(agent.pid());
    assert!(progs.len() >= 5 && !links.is_empty(), "programs {progs:?}, links {links:?}");

    let (status, took) = agent.stop_timed(libc::SIGTERM, Duration::from_secs(30));
    eprintln!("SIGTERM to exit: {took:?} ({sites} uprobe sites; {n} bpf links)", n = links.len());
    assert!(status.success(), "{status:?}\n{}", agent.log_text());
    assert!(took < Duration::from_millis(500), "stop took {took:?}\n{}", agent.log_text());

    // A link is gone when its release returns (before the exit); a program
    // is freed after a further grace period (seconds on a loaded machine).
    assert_eq!(still_listed("link", &links), Vec::<u64>::new());
    let freed = wait_until(Duration::from_secs(30), || still_listed("prog", &progs).is_empty());
    assert!(freed, "programs left: {:?}", still_listed("prog", &progs));
    for &(pid, offset, original) in &offsets {
        assert_eq!(text_byte(pid, offset), original, "{offset:#x} in {pid} not restored");
    }
    assert_eq!(uprobe_events_of(agent.pid()), Vec::<String>::new());
    // The watched programs go on serving.
    etcd.put("/stop/after", "v");
    assert_eq!(first.wait_count(|l| l == "PUT", N + 1, Duration::from_secs(10)), N + 1);
}

fn sigkill_leaves_no_probe_behind_and_etcd_keeps_serving(build: Build) {
    sigkill_leaves_no_probe_behind(build, "perf", "wse-kill", "wsc-kill");
}

fn sigkill_with_tracefs_uprobes_leaves_nothing_attached_and_the_next_agent_cleans_up(build: Build) {
    sigkill_leaves_no_probe_behind(build, "tracefs", "wse-killt", "wsc-killt");
}

#[test]
fn an_unknown_etcd_build_is_reported_once_and_left_alone() {
    let dir = tempfile::tempdir().expect("tmp");
    let bin = dir.path().join("ws-unknownetcd");
    watchscope_integration_tests::go::go119().build_program("unknown-etcd", &bin, false);

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
    assert_eq!(agent.sample_present("watchscope_probes_attached{kind=\"uprobe\"}"), 0.0);
    let log = agent.log_text();
    assert_eq!(log.matches("etcd build watchscope does not know").count(), 1, "reported once:\n{log}");
}

#[test]
fn a_binary_with_etcd_names_and_another_layout_is_refused_naming_the_field() {
    // The catalog's names resolve (`go.etcd.io/etcd/mvcc.(*watchableStore).notify`
    // and `(*watcher).send`), but `mvccpb.Event` is 32 bytes.
    let dir = tempfile::tempdir().expect("tmp");
    let bin = dir.path().join("ws-fakeetcd");
    watchscope_integration_tests::go::go119().build_program("fake-etcd", &bin, false);

    // What `inspect` says: the roles resolve, the layout is refused.
    let text = watchscope_integration_tests::inspect_text(&bin);
    assert!(
        text.contains("etcd_server_notify") && text.contains("go.etcd.io/etcd/mvcc.(*watchableStore).notify"),
        "{text}"
    );
    assert!(text.contains("REFUSED") && text.contains("sizeof(mvccpb.Event) is 32"), "{text}");

    let agent = Agent::start(&["--comm", "ws-fakeetcd"]);
    let mut child = Command::new(&bin)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("start fixture");
    let mut stdin = child.stdin.take().expect("stdin");
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(child.stdout.take().expect("stdout")));
    assert_eq!(lines.next().and_then(Result::ok).as_deref(), Some("ready"));
    let refused = wait_until(Duration::from_secs(10), || {
        debug_probes(&agent)["binaries"].as_array().is_some_and(|bins| {
            bins.iter().any(|b| {
                b["path"].as_str().is_some_and(|p| p.ends_with("ws-fakeetcd"))
                    && b["attached"] == false
                    && b["reason"].as_str().is_some_and(|r| r.contains("sizeof(mvccpb.Event) is 32"))
            })
        })
    });
    // Commits through the probed functions: none may be counted.
    const N: usize = 20;
    for i in 0..N {
        std::io::Write::write_all(&mut stdin, b"put\n").expect("write");
        assert_eq!(lines.next().and_then(Result::ok), Some(format!("sent {}", i + 1)));
    }
    drop(stdin);
    let _ = child.wait();
    assert!(
        refused,
        "not refused for its layout: {:?}",
        watchscope_integration_tests::http_get(&agent.url("/debug/probes"))
    );
    let text = agent.metrics();
    assert_eq!(sample_value(&text, "watchscope_probes_attached{kind=\"uprobe\"}"), Some(0.0), "{text}");
    assert!(!text.contains("watchscope_watch_events_total{"), "no event may be counted: {text}");
    assert!(!text.contains("watchscope_watch_stage_seconds_bucket{"), "no stage may be timed: {text}");
    let log = agent.log_text();
    assert!(log.contains("sizeof(mvccpb.Event) is 32"), "the log names the field:\n{log}");
}
