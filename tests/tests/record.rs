//! `watchscope record` and the watch event chains on each real etcd build
//! (3.4.23, 3.5.16, 3.5.30, 3.3.25) with its own etcdctl: exact counts per
//! stage and chain, a slow watcher marked in its send stage, a stopped
//! client's chains broken (and counted exactly on a `run` agent's /metrics),
//! and the HTML report parsed and rendered by a real headless Chromium.

use std::{
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use watchscope_integration_tests::{
    Agent, debug_probes,
    etcd::{Build, Etcd, unsent},
    free_port, http_get, on_builds, probes_cover, require_root, sample_value, wait_until, watchscope_bin,
};

/// A `watchscope record` running in the background.
struct Recording {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl Recording {
    fn start(duration: &str, comms: &str, extra: &[&str]) -> Recording {
        require_root();
        let dir = tempfile::tempdir().expect("tmp");
        let port = free_port();
        let child = Command::new(watchscope_bin())
            .args(["record", "--duration", duration, "--comm", comms, "--log", "warn"])
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .arg("--html")
            .arg(dir.path().join("report.html"))
            .args(extra)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(dir.path().join("stdout")).expect("stdout"))
            .stderr(std::fs::File::create(dir.path().join("stderr")).expect("stderr"))
            .spawn()
            .expect("start watchscope record");
        Recording { child, port, dir }
    }

    /// Waits until the recorder has probes on these processes.
    fn wait_attached(&self, pids: &[u32]) {
        let url = format!("http://127.0.0.1:{}/debug/probes", self.port);
        let ok = wait_until(Duration::from_secs(20), || {
            let v: serde_json::Value =
                http_get(&url).ok().and_then(|(_, b)| serde_json::from_str(&b).ok()).unwrap_or_default();
            probes_cover(&v, pids)
        });
        assert!(ok, "record did not attach to {pids:?}: {}", self.stderr());
    }

    fn metrics(&self) -> String {
        http_get(&format!("http://127.0.0.1:{}/metrics", self.port)).map(|(_, b)| b).unwrap_or_default()
    }

    /// Chains the recorder has judged so far (complete, slow or broken).
    fn chains_judged(&self) -> f64 {
        let text = self.metrics();
        ["complete", "slow", "broken"]
            .iter()
            .map(|o| sample_value(&text, &format!("watchscope_watch_chains_total{{outcome=\"{o}\"}}")).unwrap_or(0.0))
            .sum()
    }

    /// Ends the recording the way a user does, with Ctrl-C, once the
    /// recorder has judged `chains` chains: the report then holds the whole
    /// workload however long attaching and the workload took.
    fn stop_after_chains(&mut self, chains: u64, timeout: Duration) {
        let ok = wait_until(timeout, || self.chains_judged() >= chains as f64);
        assert!(ok, "record judged {} of {chains} chains: {}", self.chains_judged(), self.stderr());
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr")).unwrap_or_default()
    }

    /// Waits for the recorder to exit and returns its report (stdout).
    fn finish(&mut self, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                assert!(status.success(), "record failed ({status}): {}", self.stderr());
                break;
            }
            assert!(Instant::now() < deadline, "record still running after {timeout:?}: {}", self.stderr());
            std::thread::sleep(Duration::from_millis(100));
        }
        std::fs::read_to_string(self.dir.path().join("stdout")).expect("report")
    }

    fn html_path(&self) -> std::path::PathBuf {
        self.dir.path().join("report.html")
    }
}

impl Drop for Recording {
    fn drop(&mut self) {
        watchscope_integration_tests::stop_child(&mut self.child);
    }
}

/// The count column of a stage's row in the report.
fn stage_count(report: &str, stage: &str) -> u64 {
    report
        .lines()
        .find(|l| l.split_whitespace().next() == Some(stage))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// (complete, slow, broken) from the report's `chains:` line.
fn chain_counts(report: &str) -> (u64, u64, u64) {
    let line = report.lines().find(|l| l.starts_with("chains: ")).unwrap_or_else(|| panic!("no chains line: {report}"));
    let n: Vec<u64> = line
        .trim_start_matches("chains: ")
        .split(',')
        .take(3)
        .map(|p| p.split_whitespace().next().and_then(|n| n.parse().ok()).unwrap_or(u64::MAX))
        .collect();
    (n[0], n[1], n[2])
}

/// "4.10s", "150ms", "31.2µs", "812ns" in seconds.
fn secs(t: &str) -> Option<f64> {
    let t = t.trim_start_matches('+');
    for (unit, f) in [("ns", 1e-9), ("µs", 1e-6), ("ms", 1e-3), ("s", 1.0)] {
        if let Some(v) = t.strip_suffix(unit) {
            return v.parse::<f64>().ok().map(|v| v * f);
        }
    }
    None
}

/// One chain row: (rev, outcome, [(seconds since commit, mark)] for
/// enqueue, send, dispatch, handler).
type ChainRow = (i64, String, Vec<(Option<f64>, String)>);

fn chain_rows(report: &str) -> Vec<ChainRow> {
    let mut rows = Vec::new();
    let mut on = false;
    for line in report.lines() {
        if line.starts_with("slowest chains") {
            on = true;
            continue;
        }
        if !on || line.trim().is_empty() {
            if on && !rows.is_empty() {
                break;
            }
            continue;
        }
        let toks: Vec<&str> = line.split_whitespace().collect();
        let Some(rev) = toks.first().and_then(|r| r.parse::<i64>().ok()) else { continue };
        let mut cells = Vec::new();
        let mut i = 4;
        while i < toks.len() {
            let t = toks[i];
            if t == "broken" || t == "-" {
                cells.push((None, if t == "broken" { "broken".to_string() } else { "ok".into() }));
                i += 1;
            } else {
                let mark = match toks.get(i + 1) {
                    Some(m @ (&"warn" | &"error")) => {
                        i += 1;
                        m.to_string()
                    }
                    _ => "ok".to_string(),
                };
                cells.push((secs(t), mark));
                i += 1;
            }
        }
        rows.push((rev, toks[1].to_string(), cells));
    }
    rows
}

on_builds!(
    [etcd_3_4_23, Bookworm3423], [etcd_3_5_16, Trixie3516], [etcd_3_5_30, Sid3530], [etcd_3_3_25, Bullseye3325]: [
    record_counts_every_stage_and_chain_and_writes_a_page_chromium_renders,
    a_slow_watcher_marks_its_chains_slow_in_the_send_stage,
]);

// A stack-ABI etcd (3.3) keeps g in thread-local storage: its records carry
// no goroutine, its watch streams cannot be told apart, so no client is
// ever expected of them and a stopped client cannot break a chain there
// (chains::tests::a_server_without_goroutines_is_never_paired).
on_builds!([etcd_3_4_23_client, Bookworm3423], [etcd_3_5_16_client, Trixie3516], [etcd_3_5_30_client, Sid3530]: [
    a_stopped_client_breaks_exactly_the_chains_it_did_not_dispatch,
]);

fn record_counts_every_stage_and_chain_and_writes_a_page_chromium_renders(build: Build) {
    const N: u64 = 20;
    let (server, client) = (build.comm("wse-rec"), build.comm("wsc-rec"));
    let (server, client) = (server.as_str(), client.as_str());
    let etcd = Etcd::start_build(build, server, client);
    let watch = etcd.watch("/rec/");
    // A duration far past the workload: the test ends it with SIGINT.
    let mut rec = Recording::start("10m", &format!("{server},{client}"), &[]);
    rec.wait_attached(&[etcd.pid(), watch.pid()]);
    for i in 0..N {
        etcd.put(&format!("/rec/{i}"), "v");
    }
    etcd.put("/elsewhere/not-watched", "x");
    assert_eq!(watch.wait_count(|l| l == "PUT", N as usize, Duration::from_secs(10)), N as usize);
    rec.stop_after_chains(N, Duration::from_secs(20));
    let report = rec.finish(Duration::from_secs(40));
    println!("{report}");

    // One watcher: each server stage once per event, the client once per event.
    for stage in ["commit_to_enqueue", "enqueue_to_send", "commit_to_send", "commit_to_dispatch"] {
        assert_eq!(stage_count(&report, stage), N, "{stage}:\n{report}");
    }
    assert_eq!(chain_counts(&report), (N, 0, 0), "{report}");
    let rows = chain_rows(&report);
    assert_eq!(rows.len(), 10, "--top defaults to 10:\n{report}");
    for (rev, outcome, cells) in &rows {
        assert_eq!(outcome, "complete");
        // Every stage reached, in order, within a second of the commit.
        let t: Vec<f64> = cells.iter().map(|(t, _)| t.unwrap_or(f64::NAN)).collect();
        assert_eq!(t.len(), 4, "rev {rev}: {cells:?}");
        assert!(t[0] <= t[1] && t[1] <= t[2] && t[2] < 1.0, "rev {rev}: {t:?}");
        if build.register_abi() {
            // ... and the handler window the dispatch ran in.
            assert!(t[2] <= t[3] && t[3] < 1.0, "rev {rev}: {t:?}");
        } else {
            // No handler window on a stack-ABI client: not measured, shown as such.
            assert_eq!(cells[3].0, None, "rev {rev}: {cells:?}");
        }
    }

    // The page: one SVG histogram per stage with its observations.
    let html = std::fs::read_to_string(rec.html_path()).expect("--html written");
    assert!(!html.contains("<script") && !html.contains("src=\"http"), "self-contained");
    for stage in ["commit_to_enqueue", "enqueue_to_send", "commit_to_send", "commit_to_dispatch"] {
        let tag = format!("<svg class=\"hist\" data-name=\"{stage}\" data-count=\"{N}\"");
        assert_eq!(html.matches(&tag).count(), 1, "{stage}");
        // ... with bars whose counts add up to N.
        let svg = &html[html.find(&tag).expect("svg")..];
        let svg = &svg[..svg.find("</svg>").expect("end of svg")];
        let bars: u64 =
            svg.split("<title>").skip(1).filter_map(|t| t.split_whitespace().next()?.parse::<u64>().ok()).sum();
        assert_eq!(bars, N, "{stage}: {svg}");
    }

    // A real browser renders it: a PNG that is not blank.
    let png = rec.dir.path().join("report.png");
    screenshot(&rec.html_path(), &png);
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&png).expect("png")));
    let mut reader = decoder.read_info().expect("png header");
    let mut buf = vec![0; reader.output_buffer_size().expect("png size")];
    let info = reader.next_frame(&mut buf).expect("png frame");
    assert_eq!((info.width, info.height), (1200, 2000));
    let px = info.color_type.samples() * (info.bit_depth as usize).div_ceil(8);
    let pixels = &buf[..info.buffer_size()];
    let first = &pixels[..px];
    let differing = pixels.chunks(px).filter(|p| p != &first).count();
    assert!(differing > 10_000, "the screenshot is (nearly) blank: {differing} pixels differ");
    // Keep a copy to look at.
    let _ = std::fs::copy(&png, std::env::temp_dir().join(format!("watchscope-record-report-{}.png", build.tag())));
}

fn screenshot(html: &Path, png: &Path) {
    let profile = tempfile::tempdir().expect("profile dir");
    let out = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(format!("--screenshot={}", png.display()))
        .arg("--window-size=1200,2000")
        .arg(format!("file://{}", html.display()))
        .stdin(Stdio::null())
        .output()
        .expect("chromium (apt-get install chromium)");
    assert!(png.is_file(), "no screenshot: {}", String::from_utf8_lossy(&out.stderr));
    let size = std::fs::metadata(png).map(|m| m.len()).unwrap_or(0);
    assert!(size > 20_000, "screenshot of {size} bytes");
}

fn a_slow_watcher_marks_its_chains_slow_in_the_send_stage(build: Build) {
    // How long the slow watcher's stream stays blocked once the recorder
    // sees it blocked (see etcd_watch.rs for the method).
    const D: f64 = 3.0;
    const STUCK: f64 = 3.0;
    const MAX_PUTS: usize = 200;
    let (server, client) = (build.comm("wse-recslow"), build.comm("wsc-recslow"));
    let (server, client) = (server.as_str(), client.as_str());
    let etcd = Etcd::start_build(build, server, client);
    let fast = etcd.watch("/slow/");
    let mut slow = etcd.slow_watcher("/slow/");
    let mut rec = Recording::start("10m", &format!("{server},{client}"), &["--top", "40"]);
    rec.wait_attached(&[etcd.pid(), fast.pid()]);

    slow.send("pause");
    assert!(slow.wait_for(|l| l.starts_with("paused"), Duration::from_secs(5)));
    let paused = Instant::now();
    let mut stuck = 0.0;
    let puts = etcd.put_large_until("/slow/", 300_000, MAX_PUTS, || {
        stuck = unsent(&rec.metrics(), server);
        stuck >= STUCK
    });
    assert!(stuck >= STUCK, "after {puts} puts only {stuck} events wait for their send");
    std::thread::sleep(Duration::from_secs_f64(D));
    let stuck = unsent(&rec.metrics(), server);
    slow.send("resume");
    println!("{puts} puts filled the buffers; {stuck} events blocked for {D}s");
    // No event can have waited longer than the whole pause.
    let longest = paused.elapsed().as_secs_f64();
    assert_eq!(slow.wait_count(|l| l.starts_with("event "), puts, Duration::from_secs(60)), puts);
    assert_eq!(fast.wait_count(|l| l == "PUT", puts, Duration::from_secs(10)), puts);
    rec.stop_after_chains(puts as u64, Duration::from_secs(30));
    let report = rec.finish(Duration::from_secs(40));
    println!("{report}");

    // Two watchers: server stages twice per event; etcdctl once.
    assert_eq!(stage_count(&report, "commit_to_send"), 2 * puts as u64, "{report}");
    assert_eq!(stage_count(&report, "commit_to_dispatch"), puts as u64, "{report}");
    let (complete, slow_n, broken) = chain_counts(&report);
    assert_eq!(complete + slow_n + broken, puts as u64, "{report}");
    // The gateway watcher is in etcd itself (no clientv3 dispatch): never
    // expected on this node, so nothing is broken.
    assert_eq!(broken, 0, "{report}");
    // Each event blocked through the pause is a slow chain.
    assert!(slow_n as f64 >= stuck, "{slow_n} slow chains, {stuck} events were blocked:\n{report}");
    let rows = chain_rows(&report);
    let (rev, outcome, cells) = &rows[0];
    assert_eq!(outcome, "slow", "worst first:\n{report}");
    // The worst chain waited in the send stage through the block (marked
    // error: over 1 s), and no longer than the pause lasted plus the time
    // the resumed stream takes to drain. The fan-out (enqueue) was fast.
    let (send_t, send_mark) = &cells[1];
    assert_eq!(send_mark, "error", "rev {rev}: {cells:?}");
    assert!(send_t.is_some_and(|t| (D..=longest + 1.0).contains(&t)), "rev {rev} sent at {send_t:?}: {report}");
    assert!(cells[0].0.is_some_and(|t| t < D / 2.0) && cells[0].1 == "ok", "rev {rev}: {cells:?}");
    // Every row listed as slow has a marked stage. Those blocked are slow
    // in send; a loaded machine may also delay an etcdctl dispatch past
    // the warn threshold (CI once saw 383 ms), and the report rightly
    // calls that chain slow too, marked in dispatch.
    let slow_rows: Vec<_> = rows.iter().filter(|r| r.1 == "slow").collect();
    for (rev, outcome, cells) in &slow_rows {
        assert!(cells.iter().any(|c| c.1 != "ok"), "rev {rev} {outcome}: {cells:?}");
    }
    let slow_in_send = slow_rows.iter().filter(|r| r.2[1].1 == "error").count();
    assert!(slow_in_send as f64 >= stuck.min(40.0), "{slow_in_send} slow in send, {stuck} blocked:\n{report}");
}

fn a_stopped_client_breaks_exactly_the_chains_it_did_not_dispatch(build: Build) {
    const K: usize = 6;
    let (server, client) = (build.comm("wse-broken"), build.comm("wsc-broken"));
    let (server, client) = (server.as_str(), client.as_str());
    let agent = Agent::start(&["--comm", &format!("{server},{client}")]);
    let etcd = Etcd::start_build(build, server, client);
    let watch = etcd.watch("/b/");
    let ok = wait_until(Duration::from_secs(15), || {
        let bins = debug_probes(&agent)["binaries"].as_array().cloned().unwrap_or_default();
        [etcd.pid(), watch.pid()].iter().all(|pid| {
            bins.iter()
                .any(|b| b["attached"] == true && b["processes"].as_array().is_some_and(|p| p.iter().any(|p| p == pid)))
        })
    });
    assert!(ok, "not attached: {}", agent.log_text());
    etcd.wait_watchers(1, Duration::from_secs(20));
    // One event the client dispatches: it pairs etcd's stream with this client.
    etcd.put("/b/first", "v");
    assert_eq!(watch.wait_count(|l| l == "PUT", 1, Duration::from_secs(10)), 1);
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(watch.pid() as i32, libc::SIGSTOP) };
    // Each put's commit comes after the put starts: a chain may be judged
    // broken only once the timeout has passed since then. Checked while the
    // chains wait, however slowly this machine runs the puts.
    const TIMEOUT: Duration = Duration::from_secs(5);
    let mut started = Vec::new();
    for i in 0..K {
        started.push(Instant::now());
        etcd.put(&format!("/b/{i}"), "v");
    }
    let broken = "watchscope_watch_chains_total{outcome=\"broken\"}";
    let deadline = Instant::now() + TIMEOUT + Duration::from_secs(10);
    let got = loop {
        let got = agent.sample(broken);
        let now = Instant::now();
        let may = started.iter().filter(|t| now.duration_since(**t) >= TIMEOUT).count();
        assert!(got <= may as f64, "{got} chains broken, only {may} puts started {TIMEOUT:?} ago");
        if got >= K as f64 || now >= deadline {
            break got;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    // Every chain judged: nothing more can be judged afterwards.
    let judged = wait_until(Duration::from_secs(20), || debug_probes(&agent)["chains_pending"] == 0);
    assert!(judged, "chains still pending: {}", debug_probes(&agent));
    let text = agent.metrics();
    // Nothing waits, so nothing is held: the chains' memory is given back.
    assert_eq!(sample_value(&text, "watchscope_watch_chains_pending"), Some(0.0), "{text}");
    assert_eq!(sample_value(&text, "watchscope_watch_chain_hop_bytes"), Some(0.0), "{text}");
    // SAFETY: as above.
    unsafe { libc::kill(watch.pid() as i32, libc::SIGCONT) };
    assert_eq!(got, K as f64, "{text}");
    assert_eq!(agent.sample(broken), K as f64, "{text}");
    assert_eq!(agent.sample("watchscope_watch_chains_total{outcome=\"complete\"}"), 1.0, "{text}");
    assert_eq!(agent.sample_present("watchscope_watch_chains_total{outcome=\"slow\"}"), 0.0, "{text}");
}

/// `record` across processes: `N` updates of a custom resource go from a
/// real etcd 3.5.30 through a real API server to a curl watcher, kubectl
/// and the operator. Each revision is one chain: etcd's enqueue and send, the API
/// server's etcd dispatch, watch cache, result channels and writes, the
/// operator's decode, processing and handler, every column filled. The
/// handler column is the operator's own work: its `main.handleUpdate`
/// window (`--window`), joined to the handler call it ran in. Ground truth:
/// the handler sleeps `D` = 150 ms per update (the updates are sent one
/// after another, so none queues behind another), and each chain's handler
/// column ends at least `D` after the handler started, marked `warn` (over
/// 100 ms): each chain is slow there and nowhere else.
/// The per-event records agree with the histograms: each stage's slowest
/// recorded event falls in the histogram's highest bucket (the report then
/// prints its maximum exactly, not as "≤ bound").
#[test]
fn record_chains_follow_each_revision_through_the_api_server_to_the_operators_handler() {
    use watchscope_integration_tests::kube::{ApiServer, event_type};
    const N: u64 = 10;
    const API: &str = "wsk-apiserver";
    const OP: &str = "wsk-operator";
    let etcd = Etcd::start_build(Build::Sid3530, "wse-k8s", "wsc-k8sctl");
    let api = ApiServer::start(&etcd, API);
    let rv0 = api.create("main");
    const D: f64 = 0.150;
    let op = api.operator(OP, &[&format!("-delay-us={}", (D * 1e6) as u64)]);
    let w = api.watch("wsk-watch1", rv0);
    let kubectl = api.kubectl_watch("wsk-kubectl");
    let mut rec = Recording::start(
        "10m",
        &format!("wse-k8s,{API},{OP},wsk-kubectl"),
        &["--top", "20", "--chain-timeout", "2s", "--window", "update=main.handleUpdate"],
    );
    rec.wait_attached(&[etcd.pid(), api.pid(), op.pid(), kubectl.pid()]);
    let handled = |l: &str| l.starts_with("handled update main ");
    for i in 0..N {
        api.patch_size("main", i + 1);
        let n = i as usize + 1;
        assert_eq!(op.wait_count(handled, n, Duration::from_secs(30)), n, "{:?}", op.lines());
    }
    let modified = |l: &str| event_type(l).as_deref() == Some("MODIFIED");
    assert_eq!(w.wait_count(modified, N as usize, Duration::from_secs(30)), N as usize);
    assert_eq!(kubectl.wait_count(|l| l.contains("main"), N as usize, Duration::from_secs(30)), N as usize);
    // The record rings held at least one record (64 bytes and the ring's
    // 8-byte header; a window record is 72) and never came near full.
    let text = rec.metrics();
    for (ring, one) in [("watch_records", 72.0), ("window_records", 80.0)] {
        let size = sample_value(&text, &format!("watchscope_ringbuf_size_bytes{{ring=\"{ring}\"}}"));
        let high = sample_value(&text, &format!("watchscope_ringbuf_high_water_bytes{{ring=\"{ring}\"}}"));
        assert!(high.is_some_and(|h| h >= one && h < size.unwrap_or(0.0) / 2.0), "{ring}: {high:?} of {size:?}");
    }
    rec.stop_after_chains(N, Duration::from_secs(30));
    let report = rec.finish(Duration::from_secs(40));
    println!("{report}");

    // Three watchers of the API server (curl, kubectl, the operator's
    // reflector); two client-go clients decode (kubectl has no informer).
    for (stage, n) in [
        ("commit_to_cache", N),
        ("commit_to_watcher", 3 * N),
        ("commit_to_write", 3 * N),
        ("commit_to_decode", 2 * N),
        ("commit_to_process", N),
        ("commit_to_handler", N),
        ("cache_to_watcher", 3 * N),
        ("cache_to_write", 3 * N),
        ("decode_to_process", N),
        ("process_to_handler", N),
    ] {
        assert_eq!(stage_count(&report, stage), n, "{stage}: {report}");
        let max = report
            .lines()
            .find(|l| l.split_whitespace().next() == Some(stage))
            .and_then(|l| l.split_whitespace().nth(5))
            .unwrap_or_default();
        assert!(
            secs(max).is_some(),
            "{stage}: the records' maximum is not in the histogram's top bucket: {max}\n{report}"
        );
    }
    let window = report.lines().find(|l| l.starts_with("update (window)")).unwrap_or_default();
    assert_eq!(window.split_whitespace().nth(2), Some(N.to_string().as_str()), "the handler window: {report}");
    let (complete, slow, broken) = chain_counts(&report);
    assert_eq!((complete, slow, broken), (0, N, 0), "{report}");
    let rows = chain_rows(&report);
    assert_eq!(rows.len(), N as usize, "{report}");
    let header = report.lines().find(|l| l.trim_start().starts_with("rev ")).expect("chain header");
    assert!(header.contains("cache") && header.contains("write") && header.contains("process"), "{header}");
    assert!(!report.contains("another node"), "etcd runs here: {report}");
    for (rev, outcome, cells) in &rows {
        assert_eq!(cells.len(), 9, "rev {rev} {outcome}: {cells:?}");
        // etcd's send to the API server and its three result channels; the
        // API server's etcd client, the operator and kubectl (each decoded
        // its frame; the curl watcher is no client-go client).
        let line = report.lines().find(|l| l.split_whitespace().next() == Some(&rev.to_string())).expect("row");
        let t: Vec<&str> = line.split_whitespace().collect();
        assert_eq!((t[2], t[3]), ("4", "3"), "rev {rev}: watchers and clients: {line}");
        assert!(cells.iter().all(|c| c.0.is_some()), "rev {rev}: every stage reached: {cells:?}\n{report}");
        // Path order: each column is reached no earlier than the cache.
        let t: Vec<f64> = cells.iter().filter_map(|c| c.0).collect();
        assert!(t[3..].iter().all(|x| *x >= t[3]), "rev {rev}: {t:?}");
        // The handler's work ends at least D after the informer took the
        // event off its queue (less the report's rounding to three
        // digits), and within a second, marked slow.
        assert!(t[8] >= (t[7] + D) * 0.995 && t[8] < t[7] + 1.0, "rev {rev}: {t:?}");
        assert_ne!(cells[8].1, "ok", "rev {rev}: {line}");
    }
}

/// A watcher the API server terminates for unresponsiveness (stopped while
/// 256 KB updates flow): the events the cacher offered to it that never
/// reached its result channel end their chains `broken` at the `watcher`
/// stage. Ground truth from the watcher itself: once continued, it reads
/// everything the API server had put in its stream, and the broken
/// revisions are exactly the ones after the last it received, consecutive;
/// none before it is broken.
#[test]
fn a_terminated_api_server_watcher_breaks_exactly_the_chains_it_never_got() {
    use watchscope_integration_tests::kube::{ApiServer, event_type};
    const BLOB: usize = 256 * 1024;
    const API: &str = "wsk-apiserver";
    let etcd = Etcd::start_build(Build::Sid3530, "wse-k8s", "wsc-k8sctl");
    let api = ApiServer::start(&etcd, API);
    let rv0 = api.create("main");
    let mut slow = api.watch_http1("wsk-slow", rv0);
    let fast = api.watch("wsk-watch1", rv0);
    let mut rec = Recording::start("10m", &format!("wse-k8s,{API}"), &["--top", "400"]);
    rec.wait_attached(&[etcd.pid(), api.pid()]);
    let modified = |l: &str| event_type(l).as_deref() == Some("MODIFIED");
    let first = api.patch_size("main", 1);
    for w in [&slow, &fast] {
        assert_eq!(w.wait_count(modified, 1, Duration::from_secs(20)), 1, "{:?}", w.lines());
    }
    // SAFETY: kill(2) on our own child.
    assert_eq!(unsafe { libc::kill(slow.pid() as i32, libc::SIGSTOP) }, 0);
    let mut n = 0;
    let mut last = first;
    while api.terminated_watchers() == 0.0 {
        n += 1;
        assert!(n <= 300, "the API server never gave up on the stopped watcher:\n{}", api.log());
        last = api.patch_blob("main", n, BLOB);
    }
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(slow.pid() as i32, libc::SIGCONT) }, 0);
    // It reads what the API server wrote, then its stream ends.
    assert!(slow.wait_exit(Duration::from_secs(60)), "the terminated watch never ended");
    let rv_of = |l: &String| -> Option<i64> {
        let v: serde_json::Value = serde_json::from_str(l).ok()?;
        v["object"]["metadata"]["resourceVersion"].as_str()?.parse().ok()
    };
    let got: Vec<i64> = slow.lines().iter().filter(|l| modified(l)).filter_map(rv_of).collect();
    let received = *got.last().expect("the slow watcher received the first update");
    assert_eq!(fast.wait_count(modified, 1 + n as usize, Duration::from_secs(30)), 1 + n as usize);
    rec.stop_after_chains(1 + n, Duration::from_secs(60));
    let report = rec.finish(Duration::from_secs(40));
    println!("{report}");
    let rows = chain_rows(&report);
    assert_eq!(rows.len(), 1 + n as usize, "every update listed: {report}");
    let broken: Vec<i64> = {
        let mut b: Vec<i64> = rows.iter().filter(|r| r.1 == "broken").map(|r| r.0).collect();
        b.sort();
        b
    };
    println!("{n} updates (revisions {first}..={last}); the watcher received up to {received}; broken: {broken:?}");
    assert!(!broken.is_empty(), "{report}");
    let expected: Vec<i64> = (received + 1..received + 1 + broken.len() as i64).collect();
    assert_eq!(broken, expected, "the revisions right after the last one it received: {report}");
    assert!(*broken.last().unwrap() <= last as i64);
    for (rev, outcome, cells) in &rows {
        if outcome == "broken" {
            assert_eq!(cells[4].1, "broken", "rev {rev}: broken at the watcher stage: {cells:?}");
        } else {
            assert!(*rev <= received || *rev > *broken.last().unwrap(), "rev {rev} {outcome}: {report}");
        }
    }
    let (_, _, b) = chain_counts(&report);
    assert_eq!(b, broken.len() as u64, "{report}");
}

/// The exemplar Prometheus 3 stores for the slowest event of a run names
/// the revision `watchscope record` lists as its slowest chain: a panel's
/// spike leads to the chain. One event is made slow on purpose: its watcher
/// is stopped for D while etcd commits it.
#[test]
fn prometheus_3_exemplars_name_the_revision_record_shows_slowest() {
    use watchscope_integration_tests::prom::{Flavour, Prometheus};
    const BEFORE: usize = 10;
    const AFTER: usize = 10;
    const D: Duration = Duration::from_millis(400);
    let (server, client) = ("wse-exemplar", "wsc-exemplar");
    let etcd = Etcd::start(server, client);
    let watch = etcd.watch("/x/");
    let mut rec = Recording::start("10m", &format!("{server},{client}"), &[]);
    rec.wait_attached(&[etcd.pid(), watch.pid()]);
    etcd.wait_watchers(1, Duration::from_secs(10));
    let prom = Prometheus::start(Flavour::Native3, rec.port);
    let text = Prometheus::start(Flavour::Classic3, rec.port);
    let start =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0);

    for i in 0..BEFORE {
        etcd.put(&format!("/x/{i}"), "v");
    }
    assert_eq!(watch.wait_count(|l| l == "PUT", BEFORE, Duration::from_secs(10)), BEFORE);
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(watch.pid() as i32, libc::SIGSTOP) };
    etcd.put("/x/slow", "v");
    let slow_rev = etcd.revision();
    // The injected delay, not a wait for state: the watcher stays stopped.
    std::thread::sleep(D);
    // SAFETY: as above.
    unsafe { libc::kill(watch.pid() as i32, libc::SIGCONT) };
    for i in 0..AFTER {
        etcd.put(&format!("/x/after/{i}"), "v");
    }
    let total = BEFORE + 1 + AFTER;
    assert_eq!(watch.wait_count(|l| l == "PUT", total, Duration::from_secs(20)), total);

    // Prometheus has scraped every dispatch.
    let sel = "watchscope_watch_stage_seconds{stage=\"commit_to_dispatch\"}";
    let scraped =
        wait_until(Duration::from_secs(30), || prom.latest_native(sel).is_some_and(|(_, c)| c == total as f64));
    assert!(scraped, "Prometheus never saw {total} dispatches:\n{}", prom.log());
    let end =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0);
    let mut stored = Vec::new();
    let found = wait_until(Duration::from_secs(10), || {
        stored = prom.exemplars(sel, start - 60.0, end + 60.0);
        stored.iter().any(|(_, v, _)| *v >= D.as_secs_f64())
    });
    assert!(found, "no exemplar of the slow dispatch: {stored:?}\n{}", prom.log());
    let (labels, value, _) = stored.iter().max_by(|a, b| a.1.total_cmp(&b.1)).cloned().expect("exemplars");
    // The same exemplar through the OpenMetrics text, on a classic bucket.
    let mut classic = Vec::new();
    let found = wait_until(Duration::from_secs(30), || {
        classic = text.exemplars(&sel.replace("seconds{", "seconds_bucket{"), start - 60.0, end + 60.0);
        classic.iter().any(|(_, v, _)| *v >= D.as_secs_f64())
    });
    assert!(found, "no exemplar of the slow dispatch over OpenMetrics: {classic:?}\n{}", text.log());
    let (text_labels, text_value, _) = classic.iter().max_by(|a, b| a.1.total_cmp(&b.1)).cloned().expect("exemplars");
    assert_eq!((&text_labels, text_value), (&labels, value));

    rec.stop_after_chains(total as u64, Duration::from_secs(30));
    let report = rec.finish(Duration::from_secs(40));
    let rows = chain_rows(&report);
    assert_eq!(rows.first().map(|r| r.0), Some(slow_rev), "slowest chain first:\n{report}");
    assert_eq!(labels["revision"].as_str(), Some(slow_rev.to_string().as_str()), "{labels} ({value} s)\n{report}");
    // etcd's watch id on the client side names the watcher.
    assert!(labels["watcher"].as_str().is_some_and(|w| w.parse::<i64>().is_ok()), "{labels}");
    assert!(value >= D.as_secs_f64() && value < 10.0, "{value}");
}
