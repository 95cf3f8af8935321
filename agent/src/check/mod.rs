//! `watchscope check`: can this node run the agent? One line per item, each
//! with what to do when it is missing. Files are read through [`HostRoot`],
//! so a test can point the check at a fabricated /proc and /sys.

use std::fmt;

use aya::{maps::MapType, programs::ProgramType};

use crate::{
    attach::TRACEPOINTS,
    host::{
        HostRoot,
        caps::{Cap, CapSet},
        kernel::KernelVersion,
        tracefs::Tracefs,
    },
};

/// Oldest kernel the agent runs on: the newest BPF helper its kernel programs
/// call. The agent loads every program at start, so one helper the verifier
/// does not know fails the whole start, not just one feature.
pub const MIN_KERNEL: KernelVersion = KernelVersion::new(5, 17, 0);
/// What sets [`MIN_KERNEL`], in the words the check prints. The other helpers
/// are older: `bpf_get_attach_cookie` (5.15, the probe configs are looked up
/// by cookie), ring buffers and CAP_BPF (5.8).
pub const MIN_KERNEL_REASON: &str = "bpf_loop, which times each event of a watch response, needs Linux 5.17; \
                                     bpf_get_attach_cookie needs 5.15";
/// From 5.11 BPF memory is charged to the memory cgroup, not RLIMIT_MEMLOCK.
const MEMCG_ACCOUNTING: KernelVersion = KernelVersion::new(5, 11, 0);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Ok,
    /// Needed by the agent and absent: the check fails.
    Missing,
    /// Absent but optional (the agent degrades, e.g. slower without JIT).
    Warn,
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Status::Ok => "ok",
            Status::Missing => "missing",
            Status::Warn => "warn",
        })
    }
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct Item {
    pub name: String,
    #[serde(serialize_with = "ser_status")]
    pub status: Status,
    pub detail: String,
    /// What to do about it; empty when ok.
    pub fix: String,
}

fn ser_status<S: serde::Serializer>(s: &Status, ser: S) -> Result<S::Ok, S::Error> {
    ser.serialize_str(&s.to_string())
}

impl Item {
    fn new(name: impl Into<String>, status: Status, detail: impl Into<String>, fix: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            status,
            detail: detail.into(),
            fix: if status == Status::Ok { String::new() } else { fix.into() },
        }
    }
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct Report {
    pub items: Vec<Item>,
}

impl Report {
    /// True when nothing the agent needs is missing (warnings allowed).
    pub fn ready(&self) -> bool {
        self.items.iter().all(|i| i.status != Status::Missing)
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let width = self.items.iter().map(|i| i.name.len()).max().unwrap_or(0);
        for i in &self.items {
            write!(f, "{:<7} {:<width$}  {}", i.status.to_string(), i.name, i.detail)?;
            if !i.fix.is_empty() {
                write!(f, " — fix: {}", i.fix)?;
            }
            writeln!(f)?;
        }
        let verdict =
            if self.ready() { "ready: this node can run watchscope" } else { "not ready: fix the missing items above" };
        writeln!(f, "{verdict}")
    }
}

/// Runs every check. Syscall-based checks (bpf()) run against the live kernel
/// even with a fabricated root; file-based checks read under `root`.
pub fn run(root: &HostRoot) -> Report {
    let mut items = Vec::new();
    let kernel = kernel_item(root, &mut items);
    btf_item(root, &mut items);
    bpf_items(&mut items);
    jit_item(root, &mut items);
    tracefs_items(root, &mut items);
    cap_items(root, &mut items);
    memlock_item(root, kernel, &mut items);
    map_memory_item(root, &mut items);
    Report { items }
}

fn kernel_item(root: &HostRoot, items: &mut Vec<Item>) -> Option<KernelVersion> {
    let path = root.path("/proc/sys/kernel/osrelease");
    let release = std::fs::read_to_string(&path).unwrap_or_default();
    let version = KernelVersion::parse(&release);
    let fix = format!("run a kernel >= {MIN_KERNEL}");
    items.push(match version {
        Some(v) if v >= MIN_KERNEL => Item::new(
            "kernel",
            Status::Ok,
            format!("{} (>= {MIN_KERNEL} needed: {MIN_KERNEL_REASON})", release.trim()),
            "",
        ),
        Some(_) => Item::new(
            "kernel",
            Status::Missing,
            format!("{} is older than {MIN_KERNEL} ({MIN_KERNEL_REASON})", release.trim()),
            fix,
        ),
        None => Item::new("kernel", Status::Missing, format!("cannot read the release from {}", path.display()), fix),
    });
    version
}

fn btf_item(root: &HostRoot, items: &mut Vec<Item>) {
    let path = root.path(crate::host::btf::VMLINUX_BTF);
    items.push(if path.is_file() {
        // The socket layout the proxy retransmission program reads; without
        // it only that count is missing.
        match crate::attach::sidecar::sock_offsets(root) {
            Ok(o) => Item::new(
                "btf",
                Status::Ok,
                format!("{} (struct sock: peer at {}, local port at {})", path.display(), o.daddr, o.num),
                "",
            ),
            Err(e) => Item::new(
                "btf",
                Status::Warn,
                format!("{}: {e}; proxy retransmissions will not be counted", path.display()),
                "",
            ),
        }
    } else {
        Item::new(
            "btf",
            Status::Missing,
            format!("{} not found", path.display()),
            "use a kernel built with CONFIG_DEBUG_INFO_BTF=y",
        )
    });
}

fn bpf_items(items: &mut Vec<Item>) {
    let fix = "run as root or with CAP_BPF+CAP_PERFMON, and check kernel.unprivileged_bpf_disabled / seccomp";
    let probes: [(&str, Result<bool, String>); 3] = [
        (
            "bpf() tracepoint programs",
            aya::sys::is_program_supported(ProgramType::TracePoint).map_err(|e| e.to_string()),
        ),
        ("bpf() uprobe programs", aya::sys::is_program_supported(ProgramType::KProbe).map_err(|e| e.to_string())),
        ("bpf() ring buffer maps", aya::sys::is_map_supported(MapType::RingBuf).map_err(|e| e.to_string())),
    ];
    for (name, res) in probes {
        items.push(match res {
            Ok(true) => Item::new(name, Status::Ok, "loaded a test object", ""),
            Ok(false) => Item::new(name, Status::Missing, "the kernel refused a test object", fix),
            Err(e) => Item::new(name, Status::Missing, format!("bpf() failed: {e}"), fix),
        });
    }
    items.push(match crate::attach::features::uprobe_multi() {
        Ok(()) => Item::new(
            "uprobe_multi links",
            Status::Ok,
            "one link per binary and program; a stop releases them together",
            "",
        ),
        Err(e) => Item::new(
            "uprobe_multi links",
            Status::Warn,
            format!("{e}: one perf link per uprobe site, released one after another (about 0.1 s each)"),
            "Linux 6.6+ has them",
        ),
    });
    items.push(match crate::attach::features::context_writes() {
        Ok(mode @ crate::attach::features::RetMode::SingleStep) => Item::new(
            "ret sites",
            Status::Ok,
            format!(
                "{}: this kernel refuses uprobe programs' register writes, so a RET probe costs two traps",
                mode.name()
            ),
            "",
        ),
        Ok(mode) => Item::new("ret sites", Status::Ok, mode.name(), ""),
        Err(e) => Item::new("ret sites", Status::Warn, e, ""),
    });
    items.push(match crate::attach::features::trap_cost(crate::collect::stats::run_count) {
        Ok(c) => Item::new(
            "uprobe cost",
            Status::Ok,
            format!(
                "per hit with an empty program, measured here in a tight loop: {:.2} µs on an \
                 emulated jump (a Go function's entry probe), {:.2} µs on a single-stepped \
                 instruction (a RET site); a best case: a busy program's hits find the caches \
                 cold, and the programs' own work comes on top",
                c.emulated_ns / 1000.0,
                c.single_step_ns / 1000.0
            ),
            "",
        ),
        Err(e) => Item::new("uprobe cost", Status::Warn, format!("not measured: {e}"), ""),
    });
}

fn jit_item(root: &HostRoot, items: &mut Vec<Item>) {
    let path = root.path("/proc/sys/net/core/bpf_jit_enable");
    let value = std::fs::read_to_string(&path).unwrap_or_default();
    items.push(match value.trim() {
        "1" | "2" => Item::new("bpf jit", Status::Ok, "enabled", ""),
        "0" => Item::new(
            "bpf jit",
            Status::Warn,
            "disabled: programs run in the interpreter, several times slower",
            "sysctl net.core.bpf_jit_enable=1",
        ),
        // Kernels with CONFIG_BPF_JIT_ALWAYS_ON may hide the knob.
        _ => Item::new("bpf jit", Status::Warn, format!("{} not readable", path.display()), "check CONFIG_BPF_JIT"),
    });
}

fn tracefs_items(root: &HostRoot, items: &mut Vec<Item>) {
    let pmu = root.path("/sys/bus/event_source/devices/uprobe/type");
    items.push(if pmu.is_file() {
        Item::new("uprobe pmu", Status::Ok, format!("{}", pmu.display()), "")
    } else {
        Item::new(
            "uprobe pmu",
            Status::Missing,
            format!("{} not found", pmu.display()),
            "use a kernel with CONFIG_UPROBE_EVENTS=y",
        )
    });
    let tracefs = match Tracefs::find(root) {
        Ok(t) => {
            items.push(Item::new("tracefs", Status::Ok, format!("{}", t.dir.display()), ""));
            t
        }
        Err(_) => {
            items.push(Item::new(
                "tracefs",
                Status::Missing,
                "not mounted at /sys/kernel/tracing or /sys/kernel/debug/tracing",
                "mount -t tracefs nodev /sys/kernel/tracing",
            ));
            return;
        }
    };
    let ue = tracefs.uprobe_events();
    items.push(if ue.is_file() {
        Item::new("uprobes", Status::Ok, format!("{}", ue.display()), "")
    } else {
        Item::new(
            "uprobes",
            Status::Missing,
            format!("{} not found", ue.display()),
            "use a kernel with CONFIG_UPROBE_EVENTS=y",
        )
    });
    for tp in TRACEPOINTS
        .iter()
        .copied()
        .chain(crate::attach::sidecar::all_tracepoints())
        .chain(crate::attach::sched::SCHED_TRACEPOINTS.iter().copied())
    {
        let name = format!("tracepoint {}:{}", tp.category, tp.name);
        items.push(match tracefs.tracepoint_exists(tp.category, tp.name) {
            Ok(()) => Item::new(name, Status::Ok, "present", ""),
            Err(e) => {
                Item::new(name, Status::Missing, e.to_string(), "use a kernel with this tracepoint (CONFIG_FTRACE)")
            }
        });
    }
}

fn cap_items(root: &HostRoot, items: &mut Vec<Item>) {
    let set = match CapSet::of_self(root) {
        Ok(Some(set)) => set,
        Ok(None) | Err(_) => {
            items.push(Item::new(
                "capabilities",
                Status::Missing,
                "cannot read CapEff from /proc/self/status",
                "check that /proc is mounted",
            ));
            return;
        }
    };
    // CAP_SYS_ADMIN implies what CAP_BPF and CAP_PERFMON grant.
    let admin = set.has(Cap::SysAdmin);
    // Without CAP_SYS_ADMIN uprobes are tracefs uprobe events: opening the
    // control file for writing (no write) says whether that can work.
    let events_writable =
        Tracefs::find(root).is_ok_and(|t| std::fs::OpenOptions::new().append(true).open(t.uprobe_events()).is_ok());
    for cap in Cap::ALL {
        let (status, detail, fix) = match cap {
            _ if set.has(cap) => (Status::Ok, "held".to_string(), String::new()),
            Cap::Bpf | Cap::Perfmon if admin => (Status::Ok, "not held; CAP_SYS_ADMIN covers it".into(), String::new()),
            Cap::Bpf | Cap::Perfmon => {
                (Status::Missing, "not held: needed to load and attach programs".into(), format!("grant {cap}"))
            }
            Cap::SysPtrace => (
                Status::Missing,
                "not held: needed to read other processes' executables and memory maps".into(),
                format!("grant {cap}"),
            ),
            // Linux 6.16 (and stable kernels with the backport) went back to
            // CAP_SYS_ADMIN for uprobes made through perf_event_open.
            // The agent then makes uprobes as tracefs uprobe events instead.
            Cap::SysAdmin if events_writable => (
                Status::Ok,
                "not held: uprobes are made as tracefs uprobe events where the uprobe PMU needs it \
                 (Linux 6.16+); per-program statistics need kernel.bpf_stats_enabled=1"
                    .into(),
                String::new(),
            ),
            Cap::SysAdmin => (
                Status::Warn,
                "not held, and tracefs uprobe_events is not writable: Linux 6.16+ (and stable kernels with \
                 the same change) then refuse uprobes; tracepoints and exec counting work"
                    .into(),
                format!("mount tracefs read-write for the agent, or grant {cap}"),
            ),
        };
        items.push(Item::new(cap.name(), status, detail, fix));
    }
}

/// The kernel memory the agent's maps will hold on this node, projected
/// from the embedded object for its possible CPUs (what per-CPU maps are
/// sized by), and at 96 for comparison with the design bound.
fn map_memory_item(root: &HostRoot, items: &mut Vec<Item>) {
    use crate::collect::mapmem;
    let path = root.path("/sys/devices/system/cpu/possible");
    let cpus = std::fs::read_to_string(&path).ok().as_deref().and_then(mapmem::possible_cpus);
    let maps = match mapmem::agent_maps() {
        Ok(m) => m,
        Err(e) => {
            items.push(Item::new("map memory", Status::Missing, e.to_string(), "rebuild the agent"));
            return;
        }
    };
    let at = |n: u64| maps.iter().map(|m| mapmem::projected(m, n)).sum::<u64>();
    let per_cpu = maps.iter().filter(|m| mapmem::per_cpu(m)).map(|m| m.name.as_str()).collect::<Vec<_>>().join(", ");
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    let at96 = format!("{:.1} MiB at 96 CPUs (bound {} MiB)", mib(at(96)), mapmem::BOUND_AT_96_CPUS >> 20);
    items.push(match cpus {
        Some(n) => Item::new(
            "map memory",
            Status::Ok,
            format!("{:.1} MiB on this node's {n} possible CPUs, {at96}; per CPU: {per_cpu}", mib(at(n))),
            "",
        ),
        None => Item::new("map memory", Status::Warn, format!("cannot read {}; {at96}", path.display()), ""),
    });
}

fn memlock_item(root: &HostRoot, kernel: Option<KernelVersion>, items: &mut Vec<Item>) {
    let path = root.path("/proc/self/limits");
    let limits = std::fs::read_to_string(&path).unwrap_or_default();
    let soft = limits
        .lines()
        .find(|l| l.starts_with("Max locked memory"))
        .and_then(|l| l.split_whitespace().nth(3))
        .map(str::to_string);
    let memcg = kernel.is_some_and(|k| k >= MEMCG_ACCOUNTING);
    items.push(match soft.as_deref() {
        Some("unlimited") => Item::new("memlock", Status::Ok, "unlimited", ""),
        Some(v) if memcg => Item::new(
            "memlock",
            Status::Ok,
            format!("{v} bytes (not used: kernel >= 5.11 charges BPF memory to the cgroup)"),
            "",
        ),
        Some(v) => match v.parse::<u64>() {
            Ok(n) if n >= 64 << 20 => Item::new("memlock", Status::Ok, format!("{n} bytes"), ""),
            _ => Item::new(
                "memlock",
                Status::Missing,
                format!("{v} bytes: too small for the agent's maps on this kernel"),
                "ulimit -l unlimited, or run with CAP_SYS_RESOURCE so the agent can raise it",
            ),
        },
        None => {
            Item::new("memlock", Status::Warn, format!("cannot read {}", path.display()), "check that /proc is mounted")
        }
    });
}
