//! The agent against real Prometheus tools (Debian's `prometheus` package):
//! `promtool check metrics` on the text format, and a Prometheus server that
//! scrapes the agent and answers the p99 query of the README's dashboard.

use std::{
    io::Write as _,
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use watchscope_integration_tests::{Agent, etcd::Etcd, free_port, http_get, stop_child, wait_attached, wait_until};

/// etcd, an `etcdctl watch` on `/p/`, and the agent watching both: every
/// put then shows in all four stages.
fn workload(server: &str, client: &str) -> (Agent, Etcd, watchscope_integration_tests::etcd::LineReader) {
    let agent = Agent::start(&["--comm", &format!("{server},{client}")]);
    let etcd = Etcd::start(server, client);
    let watch = etcd.watch("/p/");
    wait_attached(&agent, &[etcd.pid(), watch.pid()]);
    std::thread::sleep(Duration::from_millis(300));
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

/// A Prometheus server on loopback, its TSDB in a temporary directory.
struct Prometheus {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    fn start(target_port: u16) -> Prometheus {
        let dir = tempfile::tempdir().expect("temp dir");
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: watchscope\n    \
                 static_configs:\n      - targets: ['127.0.0.1:{target_port}']\n"
            ),
        )
        .expect("write config");
        let port = free_port();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).expect("log");
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("prometheus (apt-get install prometheus)");
        let p = Prometheus { child, port, _dir: dir };
        assert!(
            wait_until(Duration::from_secs(30), || matches!(http_get(&p.url("/-/ready")), Ok((200, _)))),
            "prometheus not ready:\n{}",
            p.log()
        );
        p
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// An instant query; the result vector.
    fn query(&self, promql: &str) -> Vec<serde_json::Value> {
        let url = format!("{}?query={}", self.url("/api/v1/query"), encode(promql));
        let Ok((200, body)) = http_get(&url) else { return Vec::new() };
        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        v["data"]["result"].as_array().cloned().unwrap_or_default()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        stop_child(&mut self.child);
    }
}

/// Percent-encodes a query parameter.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[test]
fn a_prometheus_server_scrapes_the_agent_and_answers_the_p99_query() {
    let (agent, etcd, watch) = workload("wsp-prom", "wspc-prom");
    let prom = Prometheus::start(agent.port);

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
