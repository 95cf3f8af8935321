//! `watchscope check`: the live node passes; a fabricated /proc+/sys tree
//! with an item removed makes it fail, naming the item.

use std::{path::Path, process::Command};

use watchscope_integration_tests::watchscope_bin;

fn check(root: Option<&Path>) -> (i32, String) {
    let mut cmd = Command::new(watchscope_bin());
    cmd.arg("check");
    if let Some(r) = root {
        cmd.arg("--root").arg(r);
    }
    let out = cmd.output().expect("run watchscope check");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A node tree where everything the agent needs is present.
fn fake_node(dir: &Path, cap_eff: u64) {
    let files: &[(&str, String)] = &[
        ("proc/sys/kernel/osrelease", "6.1.0-13-amd64\n".into()),
        ("proc/self/status", format!("Name:\twatchscope\nCapEff:\t{cap_eff:016x}\n")),
        ("proc/self/limits", "Max locked memory         8388608              8388608              bytes\n".into()),
        ("proc/sys/net/core/bpf_jit_enable", "1\n".into()),
        ("sys/kernel/btf/vmlinux", "BTF".into()),
        ("sys/bus/event_source/devices/uprobe/type", "9\n".into()),
        ("sys/kernel/tracing/uprobe_events", String::new()),
    ];
    // Every tracepoint the agent uses, as the live check lists them.
    let live = Command::new(watchscope_bin()).args(["check", "--json"]).output().expect("run");
    let live: serde_json::Value = serde_json::from_slice(&live.stdout).expect("JSON");
    let tracepoints: Vec<(String, String)> = live["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter_map(|i| {
            i["name"].as_str()?.strip_prefix("tracepoint ")?.split_once(':').map(|(c, n)| (c.into(), n.into()))
        })
        .collect();
    assert!(!tracepoints.is_empty());
    let files: Vec<(String, String)> = files
        .iter()
        .map(|(p, c)| (p.to_string(), c.clone()))
        .chain(tracepoints.iter().map(|(c, n)| (format!("sys/kernel/tracing/events/{c}/{n}/id"), "1\n".to_string())))
        .collect();
    for (p, content) in &files {
        let path = dir.join(p);
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        std::fs::write(&path, content).expect("write");
    }
}

const ALL_CAPS: u64 = 0x1ff_ffff_ffff;

fn line<'a>(out: &'a str, name: &str) -> &'a str {
    out.lines()
        .find(|l| l.split_whitespace().skip(1).collect::<Vec<_>>().join(" ").starts_with(name))
        .unwrap_or_else(|| panic!("no line for {name} in:\n{out}"))
}

#[test]
fn this_node_is_ready() {
    let (code, out) = check(None);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("ready: this node can run watchscope"), "{out}");
    assert!(line(&out, "tracepoint sched:sched_process_exec").starts_with("ok"));
    // Kernel 6.18 here: a test program and link prove uprobe_multi.
    assert!(line(&out, "uprobe_multi links").starts_with("ok"), "{out}");
    // Its verifier refuses a uprobe program's register writes (a test
    // program storing to pt_regs.ip): RET sites are single-stepped.
    let ret = line(&out, "ret sites");
    assert!(ret.starts_with("ok") && ret.contains("single-step") && ret.contains("refuses"), "{ret}");
}

#[test]
fn fabricated_complete_node_is_ready_and_read_from_the_override() {
    let dir = tempfile::tempdir().expect("tmp");
    fake_node(dir.path(), ALL_CAPS);
    let (code, out) = check(Some(dir.path()));
    assert_eq!(code, 0, "{out}");
    // The kernel line shows the fabricated release, proving the override is read.
    assert!(line(&out, "kernel").contains("6.1.0-13-amd64"), "{out}");
}

#[test]
fn missing_btf_fails_and_says_what_to_do() {
    let dir = tempfile::tempdir().expect("tmp");
    fake_node(dir.path(), ALL_CAPS);
    std::fs::remove_file(dir.path().join("sys/kernel/btf/vmlinux")).expect("rm");
    let (code, out) = check(Some(dir.path()));
    assert_eq!(code, 1, "{out}");
    let btf = line(&out, "btf");
    assert!(btf.starts_with("missing"), "{btf}");
    assert!(btf.contains("CONFIG_DEBUG_INFO_BTF"), "{btf}");
    assert!(out.contains("not ready"), "{out}");
}

/// A BTF file without the socket layout (here not BTF at all) only warns:
/// the agent runs, and the report names the one count it loses.
#[test]
fn btf_without_the_socket_layout_warns_and_names_what_is_lost() {
    let dir = tempfile::tempdir().expect("tmp");
    fake_node(dir.path(), ALL_CAPS);
    let (code, out) = check(Some(dir.path()));
    assert_eq!(code, 0, "{out}");
    let btf = line(&out, "btf");
    assert!(btf.starts_with("warn") && btf.contains("retransmissions will not be counted"), "{btf}");
    // This machine's own BTF has it.
    let (_, out) = check(None);
    let btf = line(&out, "btf");
    assert!(btf.starts_with("ok") && btf.contains("struct sock: peer at 0, local port at 14"), "{btf}");
}

#[test]
fn each_missing_item_is_named() {
    // (what to break, the line that must say missing)
    let cases: &[(&str, &str)] = &[
        ("sys/kernel/tracing/events/sched/sched_process_exec/id", "tracepoint sched:sched_process_exec"),
        ("sys/bus/event_source/devices/uprobe/type", "uprobe pmu"),
        ("sys/kernel/tracing/uprobe_events", "uprobes"),
        ("proc/sys/kernel/osrelease", "kernel"),
    ];
    for (remove, name) in cases {
        let dir = tempfile::tempdir().expect("tmp");
        fake_node(dir.path(), ALL_CAPS);
        std::fs::remove_file(dir.path().join(remove)).expect("rm");
        let (code, out) = check(Some(dir.path()));
        assert_eq!(code, 1, "removing {remove}:\n{out}");
        assert!(line(&out, name).starts_with("missing"), "removing {remove}:\n{out}");
    }
}

#[test]
fn old_kernel_and_missing_capabilities_fail() {
    let dir = tempfile::tempdir().expect("tmp");
    // Only CAP_SYS_PTRACE: no CAP_BPF, CAP_PERFMON or CAP_SYS_ADMIN.
    fake_node(dir.path(), 1 << 19);
    std::fs::write(dir.path().join("proc/sys/kernel/osrelease"), "5.4.0-150-generic\n").expect("write");
    let (code, out) = check(Some(dir.path()));
    assert_eq!(code, 1, "{out}");
    assert!(line(&out, "kernel").starts_with("missing"), "{out}");
    assert!(line(&out, "CAP_BPF").starts_with("missing"), "{out}");
    assert!(line(&out, "CAP_PERFMON").starts_with("missing"), "{out}");
    assert!(line(&out, "CAP_SYS_PTRACE").starts_with("ok"), "{out}");
    // Below 5.11 a small memlock limit matters.
    assert!(line(&out, "memlock").starts_with("missing"), "{out}");
}

#[test]
fn the_kernel_floor_is_the_newest_helper_the_programs_call() {
    // bpf_get_attach_cookie arrived in 5.15 and bpf_loop in 5.17: every
    // program is loaded at start, so anything older than 5.17 cannot run
    // the agent, whatever else it has.
    for (release, ready) in
        [("5.15.0-91-generic", false), ("5.16.20", false), ("5.17.0", true), ("6.1.0-13-amd64", true)]
    {
        let dir = tempfile::tempdir().expect("tmp");
        fake_node(dir.path(), ALL_CAPS);
        std::fs::write(dir.path().join("proc/sys/kernel/osrelease"), format!("{release}\n")).expect("write");
        let (code, out) = check(Some(dir.path()));
        let kernel = line(&out, "kernel");
        assert!(kernel.contains(release) && kernel.contains("5.17.0") && kernel.contains("bpf_loop"), "{out}");
        if ready {
            assert_eq!(code, 0, "{release}:\n{out}");
            assert!(kernel.starts_with("ok"), "{release}:\n{out}");
        } else {
            assert_eq!(code, 1, "{release}:\n{out}");
            assert!(kernel.starts_with("missing") && kernel.contains("older than 5.17.0"), "{release}:\n{out}");
            assert!(out.contains("not ready"), "{out}");
        }
    }
}

#[test]
fn without_cap_sys_admin_uprobes_need_a_writable_uprobe_events() {
    // CAP_BPF, CAP_PERFMON and CAP_SYS_PTRACE, as the DaemonSet grants.
    let three = (1u64 << 39) | (1 << 38) | (1 << 19);
    let dir = tempfile::tempdir().expect("tmp");
    fake_node(dir.path(), three);
    let (_, out) = check(Some(dir.path()));
    let admin = line(&out, "CAP_SYS_ADMIN");
    assert!(admin.starts_with("ok") && admin.contains("tracefs uprobe events"), "{out}");
    std::fs::remove_file(dir.path().join("sys/kernel/tracing/uprobe_events")).expect("rm");
    let (_, out) = check(Some(dir.path()));
    let admin = line(&out, "CAP_SYS_ADMIN");
    assert!(admin.starts_with("warn") && admin.contains("mount tracefs read-write"), "{out}");
}

#[test]
fn json_report_parses() {
    let out = Command::new(watchscope_bin()).args(["check", "--json"]).output().expect("run");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let items = v["items"].as_array().expect("items");
    assert!(items.iter().any(|i| i["name"] == "btf" && i["status"] == "ok"));
}

/// `check` prices a uprobe hit on this node with an empty program on two
/// functions of its own binary, and leaves no probe behind.
#[test]
fn a_uprobe_hit_is_priced_on_this_node_and_nothing_is_left_attached() {
    let stats = || std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled").expect("bpf_stats_enabled");
    let stats_before = stats();
    let out = Command::new(watchscope_bin()).args(["check", "--json"]).output().expect("run");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let item = v["items"].as_array().expect("items").iter().find(|i| i["name"] == "uprobe cost").expect("uprobe cost");
    // ok: the kernel counted the probe's runs, one per call, before the
    // calls were timed (a miscount is a warning naming it).
    assert_eq!(item["status"], "ok", "{item}");
    let detail = item["detail"].as_str().expect("detail");
    // "... 0.71 µs on an emulated jump ..., 4.72 µs on a single-stepped instruction ..."
    let costs: Vec<f64> = detail
        .split_whitespace()
        .zip(detail.split_whitespace().skip(1))
        .filter(|(_, unit)| *unit == "µs")
        .map(|(n, _)| n.parse().expect("a cost"))
        .collect();
    assert_eq!(costs.len(), 2, "{detail}");
    assert!(costs.iter().all(|c| *c > 0.0), "{detail}");
    // The statistics it counted with are off again (they cost every
    // program on the node while on).
    assert_eq!(stats(), stats_before);
    // The test program is gone with `check` (its link is released with
    // the process; the kernel may free both a moment after the exit).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let progs = Command::new("bpftool").args(["prog", "show", "--json"]).output().expect("bpftool");
        let progs: serde_json::Value = serde_json::from_slice(&progs.stdout).expect("bpftool JSON");
        let left = progs.as_array().expect("programs").iter().any(|p| p["name"] == "ws_trap_cost");
        if !left {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "ws_trap_cost still loaded after check exited");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}
