//! Sidecar (proxy) probes: syscall tracepoints, attached only while at least
//! one proxy process is watched, so a node without proxies pays nothing; and
//! while they are attached, every other process pays one map lookup per
//! traced syscall (the programs' first action is the pid filter).

use aya::{
    Ebpf,
    maps::{HashMap as BpfHashMap, MapData},
    programs::{TracePoint, trace_point::TracePointLinkId},
};
use thiserror::Error;

use super::TracepointSpec;

/// The proxy comms watched unless `--sidecar-comm` says otherwise.
pub const DEFAULT_SIDECAR_COMMS: &[&str] = &["envoy", "haproxy", "nginx", "linkerd2-proxy"];

macro_rules! syscall_pairs {
    ($($name:literal => $enter:literal, $exit:literal;)*) => {
        &[$(
            TracepointSpec { program: $enter, category: "syscalls", name: concat!("sys_enter_", $name) },
            TracepointSpec { program: $exit, category: "syscalls", name: concat!("sys_exit_", $name) },
        )*]
    };
}

/// Every tracepoint of the sidecar programs.
pub const SIDECAR_TRACEPOINTS: &[TracepointSpec] = &[
    TracepointSpec { program: "sc_exit_accept4", category: "syscalls", name: "sys_exit_accept4" },
    TracepointSpec { program: "sc_exit_accept", category: "syscalls", name: "sys_exit_accept" },
    TracepointSpec { program: "sc_enter_close", category: "syscalls", name: "sys_enter_close" },
    TracepointSpec { program: "sc_task_newtask", category: "task", name: "task_newtask" },
    TracepointSpec { program: "sc_process_exit", category: "sched", name: "sched_process_exit" },
];

pub const SIDECAR_IO_TRACEPOINTS: &[TracepointSpec] = syscall_pairs! {
    "read" => "sc_enter_read", "sc_exit_read";
    "readv" => "sc_enter_readv", "sc_exit_readv";
    "recvfrom" => "sc_enter_recvfrom", "sc_exit_recvfrom";
    "recvmsg" => "sc_enter_recvmsg", "sc_exit_recvmsg";
    "write" => "sc_enter_write", "sc_exit_write";
    "writev" => "sc_enter_writev", "sc_exit_writev";
    "sendto" => "sc_enter_sendto", "sc_exit_sendto";
    "sendmsg" => "sc_enter_sendmsg", "sc_exit_sendmsg";
    "sendfile64" => "sc_enter_sendfile", "sc_exit_sendfile";
    "splice" => "sc_enter_splice", "sc_exit_splice";
    "connect" => "sc_enter_connect", "sc_exit_connect";
};

/// All sidecar tracepoints, for `watchscope check`.
pub fn all_tracepoints() -> impl Iterator<Item = &'static TracepointSpec> {
    SIDECAR_TRACEPOINTS.iter().chain(SIDECAR_IO_TRACEPOINTS)
}

#[derive(Debug, Error)]
pub enum SidecarError {
    #[error("program `{0}` is missing from the eBPF object")]
    MissingProgram(&'static str),
    #[error("{program} on {category}:{name}: {source}")]
    Attach {
        program: &'static str,
        category: &'static str,
        name: &'static str,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
}

pub struct SidecarProbes {
    slots: BpfHashMap<MapData, u32, u32>,
    links: Vec<(&'static str, TracePointLinkId)>,
}

impl SidecarProbes {
    /// Loads (but does not attach) the sidecar programs.
    pub fn load(ebpf: &mut Ebpf, slots: BpfHashMap<MapData, u32, u32>) -> Result<Self, SidecarError> {
        for spec in all_tracepoints() {
            let p = program(ebpf, spec)?;
            p.load().map_err(|e| attach_err(spec, e))?;
        }
        Ok(Self { slots, links: Vec::new() })
    }

    pub fn attached(&self) -> usize {
        self.links.len()
    }

    /// Registers a proxy process (attaching the programs if it is the first).
    pub fn watch(&mut self, ebpf: &mut Ebpf, tgid: u32, slot: u32) -> Result<(), SidecarError> {
        if self.links.is_empty() {
            for spec in all_tracepoints() {
                match program(ebpf, spec)
                    .and_then(|p| p.attach(spec.category, spec.name).map_err(|e| attach_err(spec, e)))
                {
                    Ok(link) => self.links.push((spec.program, link)),
                    Err(e) => {
                        self.detach_all(ebpf);
                        return Err(e);
                    }
                }
            }
        }
        if let Err(e) = self.slots.insert(tgid, slot, 0) {
            tracing::warn!(pid = tgid, "cannot register the proxy with the kernel programs: {e}");
        }
        Ok(())
    }

    /// Forgets a proxy process.
    pub fn unwatch(&mut self, tgid: u32) {
        let _ = self.slots.remove(&tgid);
    }

    /// Proxies the kernel currently watches (including forked workers it
    /// added by itself).
    pub fn watched(&self) -> Vec<u32> {
        self.slots.keys().filter_map(Result::ok).collect()
    }

    pub fn detach_all(&mut self, ebpf: &mut Ebpf) {
        for (name, link) in self.links.drain(..) {
            if let Some(p) = ebpf.program_mut(name).and_then(|p| <&mut TracePoint>::try_from(p).ok())
                && let Err(e) = p.detach(link)
            {
                tracing::warn!("detaching {name}: {e}");
            }
        }
    }
}

fn program<'a>(ebpf: &'a mut Ebpf, spec: &TracepointSpec) -> Result<&'a mut TracePoint, SidecarError> {
    ebpf.program_mut(spec.program)
        .and_then(|p| <&mut TracePoint>::try_from(p).ok())
        .ok_or(SidecarError::MissingProgram(spec.program))
}

fn attach_err(spec: &TracepointSpec, e: aya::programs::ProgramError) -> SidecarError {
    SidecarError::Attach { program: spec.program, category: spec.category, name: spec.name, source: Box::new(e) }
}
