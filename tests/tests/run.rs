//! `watchscope run`: the daemon skeleton on the real kernel.

use std::{
    process::Command,
    time::{Duration, Instant},
};

use watchscope_integration_tests::{Agent, free_port, http_get, http_get_with, watchscope_bin};

/// A copy of /bin/true under a name nobody else on the machine uses, so the
/// agent's per-comm count can be compared with an exact number.
fn unique_true() -> (tempfile::TempDir, std::path::PathBuf, String) {
    let dir = tempfile::tempdir().expect("temp dir");
    // comm is at most 15 bytes.
    let name = format!("wst{}", std::process::id() % 1_000_000_000);
    let path = dir.path().join(&name);
    std::fs::copy("/bin/true", &path).expect("copy /bin/true");
    (dir, path, name)
}

#[test]
fn exec_counter_counts_each_exec_of_our_children() {
    const N: u32 = 40;
    let (_dir, path, comm) = unique_true();
    let agent = Agent::start(&["--comm", &comm]);
    let watched = format!("watchscope_process_execs_total{{comm=\"{comm}\"}}");
    let all_before = agent.sample("watchscope_execs_total");
    // No exec of the name yet: no series.
    assert_eq!(watchscope_integration_tests::sample_value(&agent.metrics(), &watched), None);

    for _ in 0..N {
        let status = Command::new(&path).status().expect("run true copy");
        assert!(status.success());
    }

    // Exec events are read from a ring buffer, asynchronously: once the
    // agent has read every record submitted so far, the count is exactly N
    // (no loss, no double count).
    agent.wait_drained();
    assert_eq!(agent.sample(&watched), f64::from(N), "{}", agent.metrics());
    // The drain the test waited on is the agent's own account: the kernel
    // submits an event for every exec on the node (user space matches the
    // names), so the N execs and whatever else the machine ran meanwhile
    // (a fresh CI machine ran 3 more in these few seconds) went through
    // the ring, and the agent read every one.
    let probes = watchscope_integration_tests::debug_probes(&agent);
    let events = probes["rings"].as_array().and_then(|r| r.iter().find(|r| r["ring"] == "events")).cloned();
    let count = |k: &str| events.as_ref().and_then(|e| e[k].as_u64());
    let (submitted, read) = (count("submitted").expect("submitted"), count("read").expect("read"));
    assert!(submitted >= u64::from(N) && read == submitted, "{probes}");
    let all_after = agent.sample("watchscope_execs_total");
    assert!(all_after - all_before >= f64::from(N), "kernel exec counter grew by {} < {N}", all_after - all_before);
    assert_eq!(agent.sample_present("watchscope_dropped_total{reason=\"ringbuf_full\"}"), 0.0);
    assert_eq!(agent.sample_present("watchscope_dropped_total{reason=\"decode_error\"}"), 0.0);
}

#[test]
fn serves_health_metrics_and_probe_list() {
    // Nothing to watch, whatever other tests run on the machine.
    let agent = Agent::start(&["--comm", "wsnone", "--sidecar-comm", "wsnone"]);
    let (status, body) = http_get(&agent.url("/healthz")).expect("healthz");
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    let (status, body) = http_get(&agent.url("/readyz")).expect("readyz");
    assert_eq!((status, body.as_str()), (200, "ready\n"));
    // Without an Accept header: the Prometheus text format 0.0.4.
    let (status, ctype, text) = http_get_with(&agent.url("/metrics"), &[]).expect("metrics");
    assert_eq!((status, ctype.as_str()), (200, "text/plain; version=0.0.4; charset=utf-8"));
    assert!(text.contains("# HELP watchscope_execs_total "), "{text}");
    assert!(text.contains("# TYPE watchscope_execs_total counter\n"), "{text}");
    assert!(!text.contains("# EOF"));
    // A scraper that asks for OpenMetrics gets it.
    let accept = "application/openmetrics-text;version=1.0.0;q=0.5,text/plain;version=0.0.4;q=0.4";
    let (status, ctype, om) = http_get_with(&agent.url("/metrics"), &[("Accept", accept)]).expect("metrics");
    assert_eq!((status, ctype.as_str()), (200, "application/openmetrics-text; version=1.0.0; charset=utf-8"));
    assert!(om.contains("# TYPE watchscope_execs counter\n") && om.ends_with("# EOF\n"), "{om}");
    // sched_process_exec and sched_process_exit; no Go program is watched.
    assert_eq!(agent.sample("watchscope_probes_attached{kind=\"tracepoint\"}"), 2.0);
    assert_eq!(agent.sample_present("watchscope_probes_attached{kind=\"uprobe\"}"), 0.0);
    let (status, json) = http_get(&agent.url("/debug/probes")).expect("probes");
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_str(&json).expect("probes JSON");
    let targets: Vec<&str> =
        v["probes"].as_array().expect("probes").iter().filter_map(|p| p["target"].as_str()).collect();
    assert_eq!(targets, ["sched:sched_process_exec", "sched:sched_process_exit"]);
    let (status, _) = http_get(&agent.url("/nope")).expect("404");
    assert_eq!(status, 404);
}

#[test]
fn sigterm_and_sigint_detach_and_exit_zero() {
    for signal in [libc::SIGTERM, libc::SIGINT] {
        let mut agent = Agent::start(&[]);
        let pid = agent.pid();
        let links_before = bpf_fds(pid);
        assert!(links_before > 0, "a running agent holds bpf fds");
        let started = Instant::now();
        let status = agent.stop_with(signal, Duration::from_secs(10));
        assert!(status.success(), "exit status {status} after signal {signal}");
        assert!(started.elapsed() < Duration::from_secs(5));
        let log = agent.log_text();
        assert!(log.contains("detached every probe"), "{log}");
    }
}

/// Counts bpf-related file descriptors (programs, maps, links) of a process.
fn bpf_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| std::fs::read_link(e.path()).map(|t| t.to_string_lossy().contains("bpf")).unwrap_or(false))
                .count()
        })
        .unwrap_or(0)
}

#[test]
fn flags_come_from_the_environment_too() {
    let port = free_port();
    let mut child = Command::new(watchscope_bin())
        .arg("run")
        .env("WATCHSCOPE_LISTEN", format!("127.0.0.1:{port}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start");
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut ok = false;
    while Instant::now() < deadline {
        if matches!(http_get(&format!("http://127.0.0.1:{port}/healthz")), Ok((200, _))) {
            ok = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().expect("wait");
    assert!(ok, "agent did not listen on WATCHSCOPE_LISTEN's port");
    assert!(status.success());
}

#[test]
fn bad_flags_exit_2_with_a_clear_message() {
    /// (arguments, environment, what stderr must mention)
    type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a str);
    let cases: &[Case] = &[
        (&["run", "--listen", "not-an-address"], &[], "--listen"),
        (&["run", "--max-series", "0"], &[], "--max-series"),
        (&["run", "--no-such-flag"], &[], "--no-such-flag"),
        (&["run"], &[("WATCHSCOPE_LISTEN", "nope")], "--listen"),
        (&["frobnicate"], &[], "frobnicate"),
    ];
    for (args, env, mention) in cases {
        let out = Command::new(watchscope_bin()).args(*args).envs(env.iter().copied()).output().expect("run");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(mention), "{args:?}: stderr does not mention {mention}: {stderr}");
    }
}

#[test]
fn port_in_use_is_a_clear_error_not_a_panic() {
    let holder = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = holder.local_addr().expect("addr");
    let out = Command::new(watchscope_bin()).args(["run", "--listen", &addr.to_string()]).output().expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(&format!("cannot listen on {addr}")), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}
