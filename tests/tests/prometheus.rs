//! The agent against real Prometheus tools (Debian's `prometheus` package):
//! `promtool check metrics` on the text format, and a Prometheus server that
//! scrapes the agent and answers the p99 query of the README's dashboard.

use std::{
    io::Write as _,
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use watchscope_integration_tests::{
    Agent,
    etcd::Etcd,
    http_get,
    prom::{Flavour, Prometheus},
    wait_attached, wait_until,
};

/// etcd, an `etcdctl watch` on `/p/`, and the agent watching both: every
/// put then shows in all four stages.
fn workload(server: &str, client: &str) -> (Agent, Etcd, watchscope_integration_tests::etcd::LineReader) {
    let agent = Agent::start(&["--comm", &format!("{server},{client}")]);
    let etcd = Etcd::start(server, client);
    let watch = etcd.watch("/p/");
    wait_attached(&agent, &[etcd.pid(), watch.pid()]);
    etcd.wait_watchers(1, Duration::from_secs(10));
    (agent, etcd, watch)
}

fn stage_count(agent: &Agent, stage: &str) -> f64 {
    watchscope_integration_tests::samples(&agent.metrics(), "watchscope_watch_stage_seconds_count")
        .iter()
        .filter(|(l, _)| l.get("stage").map(String::as_str) == Some(stage))
        .map(|(_, v)| v)
        .sum::<f64>()
}

#[test]
fn promtool_finds_nothing_wrong_in_the_text_format() {
    const N: usize = 10;
    let (agent, etcd, watch) = workload("wsp-lint", "wspc-lint");
    for i in 0..N {
        etcd.put(&format!("/p/{i}"), "v");
    }
    assert_eq!(watch.wait_count(|l| l == "PUT", N, Duration::from_secs(10)), N);
    let ok = wait_until(Duration::from_secs(5), || {
        ["commit_to_enqueue", "enqueue_to_send", "commit_to_send", "commit_to_dispatch"]
            .iter()
            .all(|s| stage_count(&agent, s) >= N as f64)
    });
    assert!(ok, "not every stage has observations:\n{}", agent.metrics());

    let text = agent.metrics();
    assert!(text.contains("watchscope_watch_stage_seconds_bucket{"), "no histogram to check:\n{text}");
    promtool_accepts(&text);
}

/// `promtool check metrics` finds nothing to say about `text`.
fn promtool_accepts(text: &str) {
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (apt-get install prometheus; `cargo xtask setup --for test` does)");
    promtool.stdin.take().expect("stdin").write_all(text.as_bytes()).expect("feed promtool");
    let out = promtool.wait_with_output().expect("promtool");
    let report = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && report.trim().is_empty(), "promtool check metrics:\n{report}");
}

#[test]
fn a_prometheus_server_scrapes_the_agent_and_answers_the_p99_query() {
    let (agent, etcd, watch) = workload("wsp-prom", "wspc-prom");
    let prom = Prometheus::start(Flavour::Bookworm, agent.port);

    // Puts go on in the background while Prometheus scrapes every second.
    let stop = Arc::new(AtomicBool::new(false));
    let etcd = Arc::new(etcd);
    let writer = {
        let (stop, etcd) = (stop.clone(), etcd.clone());
        std::thread::spawn(move || {
            let mut i = 0u64;
            let deadline = Instant::now() + Duration::from_secs(90);
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                etcd.put(&format!("/p/{i}"), "v");
                i += 1;
                std::thread::sleep(Duration::from_millis(50));
            }
            i
        })
    };

    let up = wait_until(Duration::from_secs(20), || {
        prom.query("up{job=\"watchscope\"}").first().and_then(|r| r["value"][1].as_str().map(|v| v == "1"))
            == Some(true)
    });
    assert!(up, "Prometheus does not see the agent up:\n{}", prom.log());

    let q = "histogram_quantile(0.99, sum by (le, stage) (rate(watchscope_watch_stage_seconds_bucket[1m])))";
    let stages = ["commit_to_enqueue", "enqueue_to_send", "commit_to_send", "commit_to_dispatch"];
    let mut last = Vec::new();
    let answered = wait_until(Duration::from_secs(60), || {
        last = prom.query(q);
        stages.iter().all(|stage| {
            last.iter().any(|r| {
                r["metric"]["stage"].as_str() == Some(*stage)
                    && r["value"][1]
                        .as_str()
                        .and_then(|v| v.parse::<f64>().ok())
                        .is_some_and(|v| v.is_finite() && v > 0.0)
            })
        })
    });
    stop.store(true, Ordering::Relaxed);
    let puts = writer.join().expect("writer");
    assert!(answered, "p99 per stage after {puts} puts: {last:?}\n{}", prom.log());
    // On an idle loopback every stage's p99 is far under a second.
    for r in &last {
        let v: f64 = r["value"][1].as_str().and_then(|v| v.parse().ok()).unwrap_or(f64::NAN);
        assert!(v < 1.0, "{r}");
    }
    assert!(watch.count(|l| l == "PUT") > 0);
    // Prometheus asked for OpenMetrics and parsed it: the scrape succeeded
    // and brought the families with their types.
    let meta: serde_json::Value =
        serde_json::from_str(&http_get(&prom.url("/api/v1/metadata")).expect("metadata").1).expect("JSON");
    let kind = |name: &str| meta["data"][name][0]["type"].as_str().map(str::to_owned);
    let events = kind("watchscope_watch_events").or_else(|| kind("watchscope_watch_events_total"));
    assert_eq!(events.as_deref(), Some("counter"), "{meta}");
    assert_eq!(kind("watchscope_watch_stage_seconds").as_deref(), Some("histogram"), "{meta}");
}

/// Prometheus 3.5 with native histograms scrapes the agent over protobuf
/// while watch events flow through etcd and requests through a delaying
/// proxy; a second Prometheus 3.5 scrapes the same agent's classic buckets
/// as text. The native stage histograms count every event (N puts, with
/// `histogram_count(increase(..))`), their p99 agrees with the classic one
/// within a bucket, an injected delay lands in the native bucket that holds
/// it, and the native TSDB holds a fraction of the classic one's series.
#[test]
fn prometheus_3_scrapes_native_histograms_that_count_every_event() {
    use watchscope_integration_tests::{
        prom::{native_histogram, value},
        proxy::{Backend, Proxy, requests},
    };
    const N: usize = 50;
    const REQUESTS: usize = 40;
    const D: f64 = 0.020;
    let (server, client) = ("wsn-etcd", "wsnc-watch");
    let backend = Backend::start(0.0, 64);
    let proxy = Proxy::delay(backend.port, D * 1000.0);
    let agent = Agent::start(&[
        "--comm",
        &format!("{server},{client}"),
        "--sidecar-comm",
        "none",
        "--sidecar-pid",
        &proxy.pid().to_string(),
    ]);
    let etcd = Etcd::start(server, client);
    let watch = etcd.watch("/p/");
    wait_attached(&agent, &[etcd.pid(), watch.pid()]);
    etcd.wait_watchers(1, Duration::from_secs(10));
    let sidecar_watched = wait_until(Duration::from_secs(10), || {
        http_get(&agent.url("/debug/probes"))
            .ok()
            .and_then(|(_, b)| serde_json::from_str::<serde_json::Value>(&b).ok())
            .is_some_and(|v| v["sidecars"].as_array().is_some_and(|s| s.iter().any(|p| p["pid"] == proxy.pid())))
    });
    assert!(sidecar_watched, "proxy not watched:\n{}", agent.log_text());

    // One put first, so every stage's series exists before the N counted ones.
    etcd.put("/p/first", "v");
    assert_eq!(watch.wait_count(|l| l == "PUT", 1, Duration::from_secs(10)), 1);
    let stages = ["commit_to_enqueue", "enqueue_to_send", "commit_to_send", "commit_to_dispatch"];
    let all_at =
        |want: f64| wait_until(Duration::from_secs(10), || stages.iter().all(|s| stage_count(&agent, s) >= want));
    assert!(all_at(1.0), "{}", agent.metrics());

    let native = Prometheus::start(Flavour::Native3, agent.port);
    let classic = Prometheus::start(Flavour::Classic3, agent.port);
    let sel = |stage: &str| format!("watchscope_watch_stage_seconds{{stage=\"{stage}\"}}");
    // t0: a scrape of the native histograms that saw the first put only.
    let mut t0 = None;
    let scraped = wait_until(Duration::from_secs(30), || {
        t0 = native.latest_native(&sel("commit_to_dispatch")).filter(|(_, c)| *c == 1.0).map(|(t, _)| t);
        t0.is_some()
    });
    assert!(scraped, "no native histogram scraped:\n{}", native.log());
    let t0 = t0.unwrap_or_default();

    for i in 0..N {
        etcd.put(&format!("/p/{i}"), "v");
    }
    assert_eq!(watch.wait_count(|l| l == "PUT", N + 1, Duration::from_secs(30)), N + 1);
    assert!(all_at((N + 1) as f64), "{}", agent.metrics());
    requests(proxy.port, REQUESTS, true, 0);

    // t1: a later scrape that saw everything (the requests included).
    let mut t1 = None;
    let scraped = wait_until(Duration::from_secs(30), || {
        let req = "watchscope_sidecar_seconds{direction=\"request\"}";
        let done = native.latest_native(req).is_some_and(|(_, c)| c == REQUESTS as f64);
        t1 = native
            .latest_native(&sel("commit_to_dispatch"))
            .filter(|(_, c)| done && *c == (N + 1) as f64)
            .map(|(t, _)| t);
        t1.is_some()
    });
    assert!(scraped, "the native scrapes never saw {N} + 1 events and {REQUESTS} requests:\n{}", native.log());
    let t1 = t1.unwrap_or_default();

    // Evaluated at t1 over a range that starts 1 ms before t0, increase()
    // spans exactly the two scrapes: it extrapolates by that 1 ms only
    // (N · 0.001 / (t1 - t0) of an event, under 0.5), never by a scrape
    // interval.
    let range_ms = ((t1 - t0) * 1000.0).round() as u64 + 1;
    for stage in stages {
        let q = format!("histogram_count(increase({}[{range_ms}ms]))", sel(stage));
        let got = native.query_at(&q, Some(t1)).first().and_then(value);
        let got = got.unwrap_or_else(|| panic!("{q}: no answer"));
        // Prometheus' own extrapolation, exactly: N · (S + 1 ms) / S.
        let extrapolated = N as f64 * (t1 - t0 + 0.001) / (t1 - t0);
        assert!(got.round() == N as f64 && (got - extrapolated).abs() < 1e-6, "{stage}: {q} = {got}, want {N}");
        let total = native.query_at(&format!("histogram_count({})", sel(stage)), Some(t1));
        assert_eq!(total.first().and_then(value), Some((N + 1) as f64), "{stage}");

        // p99 of everything, native and classic: within one native bucket
        // (the classic bounds are native bounds), so within a factor 2^(1/4).
        let qn = native.query_at(&format!("histogram_quantile(0.99, {})", sel(stage)), Some(t1));
        let qc = classic
            .query(&format!("histogram_quantile(0.99, watchscope_watch_stage_seconds_bucket{{stage=\"{stage}\"}})"));
        let (qn, qc) = (qn.first().and_then(value), qc.first().and_then(value));
        let (Some(qn), Some(qc)) = (qn, qc) else { panic!("{stage}: p99 native {qn:?}, classic {qc:?}") };
        let width = 2f64.powf(0.25);
        assert!(qn > 0.0 && qc > 0.0 && qn / qc <= width && qc / qn <= width, "{stage}: p99 native {qn}, classic {qc}");
    }

    // The injected delay: every request at least D, so in D's native bucket
    // (2^(-5.75), 2^(-5.5)] s = (18.6, 22.1] ms or above; nearly all in it.
    let req = native.query_at("watchscope_sidecar_seconds{direction=\"request\"}", Some(t1));
    let sample = req.first().and_then(native_histogram).expect("native request histogram");
    assert_eq!(sample.count, REQUESTS as f64);
    let buckets = sample.buckets;
    let (lo, hi) = (2f64.powf(-5.75), 2f64.powf(-5.5));
    let holding = buckets.iter().find(|(l, u, _)| *l < D && D <= *u).map(|b| b.2).unwrap_or(0.0);
    assert!(buckets.iter().all(|(_, u, _)| *u > D), "requests under {D} s: {buckets:?}");
    assert!(buckets.iter().any(|(l, u, _)| (*l - lo).abs() < 1e-12 && (*u - hi).abs() < 1e-12), "{buckets:?}");
    assert!(holding >= 0.9 * REQUESTS as f64, "{holding} of {REQUESTS} in D's bucket: {buckets:?}");

    // Every sample of every scrape was taken: no series twice in one scrape.
    for p in [&native, &classic] {
        assert!(!p.log().contains("Error on ingesting"), "{}", p.log());
    }

    // Series: one per native histogram against ~108 per classic one.
    let histogram_series = |p: &Prometheus, re: &str| {
        p.query(&format!("count({{__name__=~\"{re}\"}})")).first().and_then(value).unwrap_or(0.0)
    };
    let n_hist = histogram_series(&native, "watchscope_.*_seconds");
    let c_hist = histogram_series(&classic, "watchscope_.*_seconds_(bucket|sum|count)");
    let (n_head, c_head) = (native.head_series(), classic.head_series());
    eprintln!(
        "series: histograms {c_hist} classic / {n_hist} native = {:.0}x; TSDB head {c_head} / {n_head} = {:.1}x",
        c_hist / n_hist,
        c_head as f64 / n_head as f64
    );
    assert!(n_hist >= 6.0 && c_hist >= 20.0 * n_hist, "histogram series: classic {c_hist}, native {n_hist}");
    assert!(c_head > n_head, "TSDB head: classic {c_head}, native {n_head}");

    // The dashboard's queries of what this workload fills answer: the
    // native forms on the native Prometheus, the classic ones on the other.
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/grafana/watchscope.json"))
            .expect("dashboard"),
    )
    .expect("dashboard JSON");
    let mut asked = 0;
    for panel in dashboard["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .flat_map(|p| std::iter::once(p).chain(p["panels"].as_array().into_iter().flatten()))
    {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let Some(expr) = target["expr"].as_str() else { continue };
            let ours = expr.contains("watchscope_sidecar_seconds")
                || (expr.contains("watchscope_watch_stage_seconds")
                    && (!expr.contains("stage=\"") || stages.iter().any(|s| expr.contains(&format!("stage=\"{s}\"")))));
            if !ours {
                continue;
            }
            let q = expr
                .replace("$__rate_interval", "1m")
                .replace("$namespace", ".*")
                .replace("$pod", ".*")
                .replace("$comm", ".*");
            let is_classic = ["_seconds_bucket", "_seconds_sum", "_seconds_count"].iter().any(|s| q.contains(s));
            let prom = if is_classic { &classic } else { &native };
            assert!(!prom.query(&q).is_empty(), "{}: no answer to {q}", panel["title"]);
            asked += 1;
        }
    }
    assert!(asked >= 12, "{asked} dashboard queries asked");
}

/// The series a node costs Prometheus, at the cardinality fixture's
/// workload: `W` watch clients at once, each its own labelled series
/// (`--label-pid`, as each pod of a node has its own), scraped by two
/// Prometheus 3.5 at once, one taking native histograms over protobuf and
/// one the classic text. Counted from each TSDB head once both hold every
/// watcher's histogram: the native head holds at least 20 times fewer series
/// (the agent's own ~160 self series are in both), and the text exposition
/// of this workload passes `promtool check metrics`.
#[test]
fn native_histograms_cut_the_series_per_node_twentyfold() {
    use watchscope_integration_tests::prom::value;
    const W: usize = 56;
    const K: usize = 3;
    let (server, client) = ("wsn-card", "wsnc-card");
    let agent = Agent::start(&["--comm", &format!("{server},{client}"), "--label-pid", "--max-series", "400"]);
    let etcd = Etcd::start(server, client);
    let watches: Vec<_> = (0..W).map(|_| etcd.watch("/c/")).collect();
    let pids: Vec<u32> = std::iter::once(etcd.pid()).chain(watches.iter().map(|w| w.pid())).collect();
    wait_attached(&agent, &pids);
    etcd.wait_watchers(W as u64, Duration::from_secs(30));
    let native = Prometheus::start(Flavour::Native3, agent.port);
    let classic = Prometheus::start(Flavour::Classic3, agent.port);
    for i in 0..K {
        etcd.put(&format!("/c/{i}"), "v");
    }
    for w in &watches {
        assert_eq!(w.wait_count(|l| l == "PUT", K, Duration::from_secs(30)), K);
    }
    // Every watcher's dispatch histogram is in its own series.
    let dispatch = format!("stage=\"commit_to_dispatch\",comm=\"{client}\"");
    let in_text = |t: &str| {
        watchscope_integration_tests::samples(t, "watchscope_watch_stage_seconds_count")
            .iter()
            .filter(|(l, v)| l.get("stage").map(String::as_str) == Some("commit_to_dispatch") && *v == K as f64)
            .count()
    };
    assert!(wait_until(Duration::from_secs(10), || in_text(&agent.metrics()) == W), "{}", agent.metrics());
    // Both TSDBs hold a scrape of all of them.
    let stored = |p: &Prometheus, q: &str| p.query(q).first().and_then(value).unwrap_or(0.0);
    let both = wait_until(Duration::from_secs(30), || {
        stored(&native, &format!("count(histogram_count(watchscope_watch_stage_seconds{{{dispatch}}}) == {K})"))
            == W as f64
            && stored(&classic, &format!("count(watchscope_watch_stage_seconds_count{{{dispatch}}} == {K})"))
                == W as f64
    });
    assert!(both, "not every watcher's histogram stored:\n{}\n{}", native.log(), classic.log());
    let (n_head, c_head) = (native.head_series(), classic.head_series());
    let text = agent.metrics();
    let histograms = watchscope_integration_tests::samples(&text, "watchscope_watch_stage_seconds_count").len();
    eprintln!(
        "{W} watchers, {histograms} stage histograms: TSDB head {c_head} classic / {n_head} native = {:.1}x",
        c_head as f64 / n_head as f64
    );
    assert!(n_head > 0 && c_head >= 20 * n_head, "TSDB head: classic {c_head}, native {n_head}");
    for p in [&native, &classic] {
        assert!(!p.log().contains("Error on ingesting"), "{}", p.log());
    }
    promtool_accepts(&text);
}
