//! Least privilege: the agent with only CAP_BPF, CAP_PERFMON and
//! CAP_SYS_PTRACE (the DaemonSet's capabilities) in every set — bounding,
//! effective, permitted, inheritable, ambient — still attaches to etcd and
//! counts every watch event.

use std::{process::Command, time::Duration};

use watchscope_integration_tests::{Agent, debug_probes, etcd::Etcd, wait_until};

const KEEP: &str = "cap_bpf,cap_perfmon,cap_sys_ptrace";

/// Every capability of this kernel but the three, by name (`capsh --decode`).
fn others() -> String {
    let last: u32 = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .expect("cap_last_cap")
        .trim()
        .parse()
        .expect("a number");
    (0..=last)
        .filter_map(|i| {
            let out = Command::new("capsh").arg(format!("--decode={:x}", 1u64 << i)).output().expect("capsh (libcap2-bin)");
            let text = String::from_utf8_lossy(&out.stdout);
            let name = text.trim().rsplit_once('=')?.1.to_string();
            (!KEEP.split(',').any(|k| k == name)).then_some(name)
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// `capsh` drops every other capability from the bounding set (first, while
/// it still has CAP_SETPCAP), then sets the three as permitted, effective,
/// inheritable and ambient, and execs the agent through a shell.
fn capsh_wrapper(drop: &str) -> Vec<String> {
    vec![
        "capsh".into(),
        format!("--drop={drop}"),
        format!("--caps={KEEP}+eip"),
        format!("--inh={KEEP}"),
        format!("--addamb={KEEP}"),
        "--".into(),
        "-c".into(),
        "exec \"$0\" \"$@\"".into(),
    ]
}

fn status_caps(pid: u32) -> Vec<(String, String)> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with("Cap"))
        .filter_map(|l| {
            let (k, v) = l.split_once(':')?;
            Some((k.to_string(), v.trim().to_string()))
        })
        .collect()
}

#[test]
fn three_capabilities_are_enough_to_time_every_watch_event() {
    const N: usize = 15;
    let (server, client) = ("wse-caps", "wsc-caps");
    let wrapper = capsh_wrapper(&others());
    let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
    let agent = Agent::start_wrapped(&wrapper, &["--comm", &format!("{server},{client}")]);

    // The agent really runs with the three and nothing else.
    let want = format!("{:016x}", (1u64 << 39) | (1u64 << 38) | (1u64 << 19));
    for (set, value) in status_caps(agent.pid()) {
        assert_eq!(value, want, "{set} of the agent");
    }

    let etcd = Etcd::start(server, client);
    let watch = etcd.watch("/caps/");
    let attached = wait_until(Duration::from_secs(10), || {
        let bins = debug_probes(&agent)["binaries"].as_array().cloned().unwrap_or_default();
        [etcd.pid(), watch.pid()].iter().all(|pid| {
            bins.iter().any(|b| {
                b["attached"] == true
                    && b["processes"].as_array().is_some_and(|p| p.iter().any(|p| p.as_u64() == Some(u64::from(*pid))))
            })
        })
    });
    assert!(attached, "not attached with three capabilities:\n{}\n{}", debug_probes(&agent), agent.log_text());
    std::thread::sleep(Duration::from_millis(300));
    for i in 0..N {
        etcd.put(&format!("/caps/{i}"), "v");
    }
    assert_eq!(watch.wait_count(|l| l == "PUT", N, Duration::from_secs(10)), N);
    let sample = |side: &str, comm: &str| format!("watchscope_watch_events_total{{side=\"{side}\",comm=\"{comm}\"}}");
    agent.wait_for_sample(&sample("client", client), N as f64, Duration::from_secs(5));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(agent.sample(&sample("server", server)), N as f64, "{}", agent.metrics());
    assert_eq!(agent.sample(&sample("client", client)), N as f64, "{}", agent.metrics());
    // The kernel statistics work without CAP_SYS_ADMIN too.
    assert!(agent.sample("watchscope_program_runs_total{program=\"etcd_notify\"}") >= N as f64, "{}", agent.metrics());
}
