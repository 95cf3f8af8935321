//! The "attach" stage: load the embedded kernel object, fill in the values
//! only known at run time, and attach programs. Every attachment is owned by
//! [`Probes`]; dropping it (on shutdown, or when the process dies) closes the
//! link file descriptors, which detaches everything: nothing is left behind
//! in the kernel, not even after SIGKILL.

pub mod features;
pub mod goruntime;
pub mod multi;
pub mod probe_events;
pub mod sched;
pub mod sidecar;
pub mod slots;
pub mod uprobes;
pub mod watch;

use agent_common::sidecar::SockOffsets;
use aya::{
    Ebpf, EbpfLoader,
    programs::{TracePoint, UProbe},
};
use thiserror::Error;
use tracing::{debug, info, warn};

use crate::host::{
    HostRoot,
    btf::BtfError,
    tracefs::{Tracefs, TracefsError},
};

/// The kernel object built from `agent-ebpf`, embedded at build time.
pub(crate) static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/watchscope"));

/// A tracepoint a kernel program attaches to.
#[derive(Clone, Copy, Debug)]
pub struct TracepointSpec {
    /// Program name in the object (the function name in agent-ebpf).
    pub program: &'static str,
    pub category: &'static str,
    pub name: &'static str,
}

/// Every tracepoint the agent attaches; `watchscope check` verifies each.
pub const TRACEPOINTS: &[TracepointSpec] = &[
    TracepointSpec { program: "sched_process_exec", category: "sched", name: "sched_process_exec" },
    TracepointSpec { program: "sched_process_exit", category: "sched", name: "sched_process_exit" },
];

/// Uprobe programs: loaded at start (so a verifier problem shows at once),
/// attached per binary later by the discover → inspect → attach lifecycle.
pub const UPROBE_PROGRAMS: &[&str] = &[
    "etcd_notify",
    "etcd_enqueue",
    "etcd_send",
    "etcd_dispatch",
    "kube_cache",
    "kube_queue",
    "kube_watcher",
    "kube_terminated",
    "kube_encode",
    "kube_write",
    "informer_queue",
    "informer_rv",
    "informer_process",
    "informer_handler",
    "client_decode",
    "go_entry",
    "go_ret",
    "go_sched",
    "go_empty",
];

#[derive(Debug, Error)]
pub enum AttachError {
    #[error("loading uprobe program `{program}`: {source}")]
    Uprobe { program: &'static str, source: Box<aya::programs::ProgramError> },
    #[error("uprobe_multi links (--uprobe-attach=uprobe-multi, Linux 6.6+): {0}")]
    Multi(#[source] Box<multi::MultiError>),
    #[error("this binary was built without its eBPF object (AYA_BUILD_SKIP); rebuild it normally")]
    NoObject,
    #[error(transparent)]
    Tracefs(#[from] TracefsError),
    #[error("loading the eBPF object failed: {0}")]
    Load(#[from] Box<aya::EbpfError>),
    #[error("program `{0}` is missing from the eBPF object")]
    MissingProgram(&'static str),
    #[error("--disable-program {0}: not a uprobe program (those are: {list})", list = UPROBE_PROGRAMS.join(", "))]
    NotUprobeProgram(String),
    #[error("program `{program}` ({category}:{name}): {source}")]
    Program {
        program: &'static str,
        category: &'static str,
        name: &'static str,
        source: Box<aya::programs::ProgramError>,
    },
}

/// Uprobe programs that are not loaded, and why: the kernel's verifier
/// refused them, or `--disable-program`. A binary whose plan needs one is
/// not probed (its refusal names the program); everything else runs.
pub type Unavailable = std::collections::BTreeMap<&'static str, String>;

/// One attached probe, as `/debug/probes` and the metrics report it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct AttachedProbe {
    pub kind: &'static str,
    pub program: &'static str,
    pub target: String,
}

/// The loaded object and everything attached from it.
pub struct Probes {
    pub ebpf: Ebpf,
    pub attached: Vec<AttachedProbe>,
    /// The uprobe programs loaded for uprobe_multi links (`None`: the
    /// kernel has none, or another mechanism was asked for; aya's copies
    /// are loaded then).
    pub multi: Option<multi::MultiPrograms>,
    /// Where `struct sock`'s fields lie (set in the object), or why that is
    /// unknown: the sidecar retransmission program needs them.
    pub sock: Result<SockOffsets, BtfError>,
    /// Uprobe programs not loaded, and why.
    pub unavailable: Unavailable,
}

impl Probes {
    /// Loads the object and attaches every tracepoint in [`TRACEPOINTS`].
    /// `go_sched`: whether windows get scheduler probes (their off-CPU and
    /// run-queue shares are observed only then).
    /// `disabled`: uprobe programs not to load (`--disable-program`).
    pub fn load_and_attach(
        root: &HostRoot,
        go_sched: bool,
        mode: uprobes::UprobeMode,
        disabled: &[String],
    ) -> Result<Self, AttachError> {
        if let Some(bad) = disabled.iter().find(|d| !UPROBE_PROGRAMS.contains(&d.as_str())) {
            return Err(AttachError::NotUprobeProgram(bad.clone()));
        }
        let mut unavailable: Unavailable = UPROBE_PROGRAMS
            .iter()
            .filter(|p| disabled.iter().any(|d| d == *p))
            .map(|p| (*p, "disabled by --disable-program".to_string()))
            .collect();
        let to_load: Vec<&'static str> =
            UPROBE_PROGRAMS.iter().copied().filter(|p| !unavailable.contains_key(p)).collect();
        if OBJECT.is_empty() {
            return Err(AttachError::NoObject);
        }
        raise_memlock_rlimit();
        let tracefs = Tracefs::find(root)?;
        // Record layouts come from tracefs, not from constants in the program.
        let filename_off = tracefs.field_offset("sched", "sched_process_exec", "filename")?;
        let old_pid_off = tracefs.field_offset("sched", "sched_process_exec", "old_pid")?;
        let sock = sidecar::sock_offsets(root);
        let mut ebpf = EbpfLoader::new()
            .override_global("SOCK_OFFSETS", sock.as_ref().unwrap_or(&SockOffsets::default()), true)
            .override_global("EXEC_FILENAME_LOC_OFFSET", &filename_off, true)
            .override_global("EXEC_OLD_PID_OFFSET", &old_pid_off, true)
            .override_global("GO_SCHED", &u32::from(go_sched), true)
            .load(OBJECT)
            .map_err(Box::new)?;
        if let Err(e) = aya_log::EbpfLogger::init(&mut ebpf) {
            // The object only logs when built with logging; absence is normal.
            debug!("no eBPF logger: {e}");
        }
        let mut attached = Vec::new();
        for spec in TRACEPOINTS {
            attach_tracepoint(&mut ebpf, spec)?;
            attached.push(AttachedProbe {
                kind: "tracepoint",
                program: spec.program,
                target: format!("{}:{}", spec.category, spec.name),
            });
        }
        let multi = match mode {
            uprobes::UprobeMode::Auto | uprobes::UprobeMode::Multi => {
                match multi::MultiPrograms::load(OBJECT, &ebpf, &to_load) {
                    Ok(m) => {
                        unavailable.extend(m.failed().iter().map(|(k, v)| (*k, v.clone())));
                        Some(m)
                    }
                    Err(e) if mode == uprobes::UprobeMode::Auto => {
                        info!("no uprobe_multi links on this kernel ({e}); one perf link per uprobe site");
                        None
                    }
                    Err(e) => return Err(AttachError::Multi(Box::new(e))),
                }
            }
            uprobes::UprobeMode::Perf | uprobes::UprobeMode::Tracefs => None,
        };
        // With multi links, aya's copies of the programs are not loaded
        // (each load is a verifier run); they would be if a forced mode
        // ever needs them.
        let (mut loaded, mut first) = (0, None);
        for &name in to_load.iter().filter(|_| multi.is_none()) {
            let prog: &mut UProbe = ebpf
                .program_mut(name)
                .ok_or(AttachError::MissingProgram(name))?
                .try_into()
                .map_err(|e| AttachError::Uprobe { program: name, source: Box::new(e) })?;
            // A program the verifier refuses costs the binaries that need
            // it, not the agent.
            match prog.load() {
                Ok(()) => loaded += 1,
                Err(e) => {
                    let e = AttachError::Uprobe { program: name, source: Box::new(e) };
                    unavailable.insert(name, e.to_string());
                    first.get_or_insert(e);
                }
            }
        }
        // None loads at all (no capability, memlock, a kernel refusing
        // everything): the agent would serve nothing; say so at start.
        if let (0, Some(e)) = (loaded, first) {
            return Err(e);
        }
        for (name, why) in &unavailable {
            warn!(program = name, "uprobe program not loaded; binaries that need it are not probed: {why}");
        }
        info!(
            probes = attached.len(),
            uprobes = if multi.is_some() { "uprobe_multi" } else { "one perf link per site" },
            "eBPF programs attached"
        );
        Ok(Self { ebpf, attached, multi, sock, unavailable })
    }
}

fn attach_tracepoint(ebpf: &mut Ebpf, spec: &TracepointSpec) -> Result<(), AttachError> {
    let err = |source| AttachError::Program {
        program: spec.program,
        category: spec.category,
        name: spec.name,
        source: Box::new(source),
    };
    let prog: &mut TracePoint =
        ebpf.program_mut(spec.program).ok_or(AttachError::MissingProgram(spec.program))?.try_into().map_err(err)?;
    prog.load().map_err(err)?;
    prog.attach(spec.category, spec.name).map_err(err)?;
    Ok(())
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK; newer ones use the
/// memory cgroup and ignore it. Raising it is harmless either way.
fn raise_memlock_rlimit() {
    let rlim = libc::rlimit { rlim_cur: libc::RLIM_INFINITY, rlim_max: libc::RLIM_INFINITY };
    // SAFETY: plain syscall with a valid pointer to a stack value.
    let ret = unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rlim) };
    if ret != 0 {
        debug!("could not raise RLIMIT_MEMLOCK: {}", std::io::Error::last_os_error());
    }
}
