//! Sidecar (proxy) probes: syscall tracepoints, attached only while at least
//! one proxy process is watched, so a node without proxies pays nothing; and
//! while they are attached, every other process pays one map lookup per
//! traced syscall (the programs' first action is the pid filter).

use agent_common::sidecar::SockOffsets;
use aya::{
    Ebpf,
    maps::{HashMap as BpfHashMap, MapData},
    programs::{RawTracePoint, TracePoint, raw_trace_point::RawTracePointLinkId, trace_point::TracePointLinkId},
};
use thiserror::Error;

use super::TracepointSpec;
use crate::host::{
    HostRoot,
    btf::{Btf, BtfError, VMLINUX_BTF},
};

/// The proxy comms watched unless `--sidecar-comm` says otherwise.
pub const DEFAULT_SIDECAR_COMMS: &[&str] = &["envoy", "haproxy", "nginx", "linkerd2-proxy"];

/// Raw tracepoints (the category is only for `watchscope check`: a raw
/// tracepoint is named without it): one syscall exit program serves every
/// syscall the state machine follows; retransmissions come from softirqs,
/// where a perf-event tracepoint would be skipped (see the program).
pub const SIDECAR_RAW_TRACEPOINTS: &[TracepointSpec] =
    &[TracepointSpec { program: "sc_sys_exit", category: "raw_syscalls", name: "sys_exit" }, RETRANSMIT];

/// The retransmission program, which reads `struct sock` at the offsets
/// [`sock_offsets`] found, and is left out when there are none.
const RETRANSMIT: TracepointSpec =
    TracepointSpec { program: "sc_tcp_retransmit", category: "tcp", name: "tcp_retransmit_skb" };

/// Regular tracepoints of the sidecar programs (rare events: forks, exits).
pub const SIDECAR_TRACEPOINTS: &[TracepointSpec] = &[
    // close() at its entry, while the fd number is still the closer's (see
    // the kernel program for the race this avoids).
    TracepointSpec { program: "sc_close_enter", category: "syscalls", name: "sys_enter_close" },
    TracepointSpec { program: "sc_task_newtask", category: "task", name: "task_newtask" },
    TracepointSpec { program: "sc_process_exit", category: "sched", name: "sched_process_exit" },
];

/// Every tracepoint the sidecar programs use, for `watchscope check`.
pub fn all_tracepoints() -> impl Iterator<Item = TracepointSpec> {
    SIDECAR_RAW_TRACEPOINTS.iter().chain(SIDECAR_TRACEPOINTS).copied()
}

/// Where `struct sock`'s peer address, peer port, local port and family lie
/// on this kernel, from its BTF (under `root`). Every field must be there at
/// the size the program reads: a wrong read would count other sockets'
/// retransmissions.
pub fn sock_offsets(root: &HostRoot) -> Result<SockOffsets, BtfError> {
    sock_offsets_in(&Btf::load(&root.path(VMLINUX_BTF))?)
}

fn sock_offsets_in(btf: &Btf) -> Result<SockOffsets, BtfError> {
    // The tracepoint hands over a `struct sock *`; its `sock_common` is
    // `__sk_common`, at offset 0 on every kernel so far, but read anyway.
    let common = btf.member("sock", "__sk_common")?.offset;
    let at = |member, size| {
        let o = btf.member_sized("sock_common", member, size)?;
        common.checked_add(o).ok_or(BtfError::TooDeep)
    };
    Ok(SockOffsets {
        daddr: at("skc_daddr", 4)?,
        dport: at("skc_dport", 2)?,
        num: at("skc_num", 2)?,
        family: at("skc_family", 2)?,
        // A kernel without IPv6 has no such field: IPv4 is still counted.
        v6_daddr: match at("skc_v6_daddr", 16) {
            Err(BtfError::NoMember { .. }) => 0,
            other => other?,
        },
    })
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

enum Link {
    Tp(&'static str, TracePointLinkId),
    Raw(&'static str, RawTracePointLinkId),
}

pub struct SidecarProbes {
    slots: BpfHashMap<MapData, u32, u32>,
    listen: BpfHashMap<MapData, u16, u32>,
    links: Vec<Link>,
    /// Whether retransmissions are counted (the socket layout is known).
    retransmits: bool,
}

impl SidecarProbes {
    /// Loads (but does not attach) the sidecar programs. `sock`: whether
    /// the object's `SOCK_OFFSETS` were set from the kernel's BTF, or why
    /// not; without them retransmissions are not counted, and the log says
    /// why.
    pub fn load(
        ebpf: &mut Ebpf,
        slots: BpfHashMap<MapData, u32, u32>,
        listen: BpfHashMap<MapData, u16, u32>,
        sock: Result<(), &BtfError>,
    ) -> Result<Self, SidecarError> {
        if let Err(e) = sock {
            tracing::warn!("proxy retransmissions are not counted: the kernel's socket layout is unknown ({e})");
        }
        let retransmits = sock.is_ok();
        for spec in SIDECAR_TRACEPOINTS {
            program(ebpf, spec)?.load().map_err(|e| attach_err(spec, e))?;
        }
        for spec in raw_specs(retransmits) {
            raw_program(ebpf, spec.program)?.load().map_err(|e| attach_err(spec, e))?;
        }
        Ok(Self { slots, listen, links: Vec::new(), retransmits })
    }

    fn attach_all(&mut self, ebpf: &mut Ebpf) -> Result<(), SidecarError> {
        for spec in SIDECAR_TRACEPOINTS {
            let link = program(ebpf, spec)?.attach(spec.category, spec.name).map_err(|e| attach_err(spec, e))?;
            self.links.push(Link::Tp(spec.program, link));
        }
        for spec in raw_specs(self.retransmits) {
            let link = raw_program(ebpf, spec.program)?.attach(spec.name).map_err(|e| attach_err(spec, e))?;
            self.links.push(Link::Raw(spec.program, link));
        }
        Ok(())
    }

    pub fn attached(&self) -> usize {
        self.links.len()
    }

    /// Registers a proxy process (attaching the programs if it is the first).
    pub fn watch(&mut self, ebpf: &mut Ebpf, tgid: u32, slot: u32) -> Result<(), SidecarError> {
        if self.links.is_empty()
            && let Err(e) = self.attach_all(ebpf)
        {
            self.detach_all(ebpf);
            return Err(e);
        }
        if let Err(e) = self.slots.insert(tgid, slot, 0) {
            tracing::warn!(pid = tgid, "cannot register the proxy with the kernel programs: {e}");
        }
        Ok(())
    }

    /// Registers the ports a proxy listens on (its downstream side), so
    /// retransmissions on its accepted sockets are attributed to it; returns
    /// the ports the kernel took.
    pub fn listen_ports(&mut self, ports: impl IntoIterator<Item = u16>, slot: u32) -> std::collections::BTreeSet<u16> {
        ports
            .into_iter()
            .filter(|&port| match self.listen.insert(port, slot, 0) {
                Ok(()) => true,
                Err(e) => {
                    tracing::debug!(port, "cannot register a proxy's listening port: {e}");
                    false
                }
            })
            .collect()
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
        for link in self.links.drain(..) {
            let (name, res) = match link {
                Link::Tp(name, id) => (name, program_named(ebpf, name).map(|p| p.detach(id))),
                Link::Raw(name, id) => (name, raw_program(ebpf, name).ok().map(|p| p.detach(id))),
            };
            if let Some(Err(e)) = res {
                tracing::warn!("detaching {name}: {e}");
            }
        }
    }
}

fn program<'a>(ebpf: &'a mut Ebpf, spec: &TracepointSpec) -> Result<&'a mut TracePoint, SidecarError> {
    program_named(ebpf, spec.program).ok_or(SidecarError::MissingProgram(spec.program))
}

fn program_named<'a>(ebpf: &'a mut Ebpf, name: &str) -> Option<&'a mut TracePoint> {
    ebpf.program_mut(name).and_then(|p| <&mut TracePoint>::try_from(p).ok())
}

fn raw_program<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut RawTracePoint, SidecarError> {
    ebpf.program_mut(name)
        .and_then(|p| <&mut RawTracePoint>::try_from(p).ok())
        .ok_or(SidecarError::MissingProgram(name))
}

/// The raw tracepoints to load and attach: all, or all but the
/// retransmission program when the socket layout is unknown.
fn raw_specs(retransmits: bool) -> impl Iterator<Item = &'static TracepointSpec> {
    SIDECAR_RAW_TRACEPOINTS.iter().filter(move |s| retransmits || s.program != RETRANSMIT.program)
}

fn attach_err(spec: &TracepointSpec, e: aya::programs::ProgramError) -> SidecarError {
    SidecarError::Attach { program: spec.program, category: spec.category, name: spec.name, source: Box::new(e) }
}
