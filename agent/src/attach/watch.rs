//! The etcd watch path's probe plan for one binary: which kernel program
//! goes where, and the `WatchProbeConfig` that tells it how to read its
//! arguments. Everything comes from the inspector's catalog (argument
//! registers or stack slots, struct field offsets) except the per-event
//! layout of `mvccpb.Event`/`KeyValue`, which is below, with how it was
//! checked.
//!
//! The plan refuses, and says why, whenever a read is not known to be right
//! for this binary: an unverified layout, an unrecognised prologue, another
//! architecture. A wrong offset would only give wrong numbers here (reads go
//! through bpf_probe_read_user), but a wrong *probe address* would land a
//! breakpoint mid-instruction and crash etcd, so addresses are never guessed.

use agent_common::watch::{ARG_REG, ARG_STACK, ArgLoc, WatchProbeConfig};
use serde::Serialize;

use super::uprobes::{Site, SiteConfig};
use crate::inspect::{
    Inspection, Probe,
    catalog::{Abi, ArgRead, ArgSource, Reg},
    elf::Arch,
    prologue,
};

/// `mvccpb.Event{Type int32; Kv, PrevKv *KeyValue}` and
/// `mvccpb.KeyValue{Key []byte; CreateRevision, ModRevision, ...}`:
/// Kv at 8, ModRevision at 32; a value `[]Event` has a 24-byte stride.
/// Measured on etcd 3.4.23 (go1.19.8, amd64) with tracefs uprobes: at
/// `watcher.send` `+32(+8(%cx))` and at `Send` `+32(+8(+0(+56(%bx))))` gave
/// the revision etcdctl reported, and the queued `&Events[0]` equalled the
/// pointer `Send` transmitted.
const EVENT_KV_OFF: u32 = 8;
const KV_MOD_REV_OFF: u32 = 32;
const EVENT_VALUE_STRIDE: u32 = 24;

/// The roles of the watch path, the kernel program serving each, and whether
/// it belongs to the server or the client side.
const ROLES: [(&str, &str, bool); 4] = [
    ("etcd_server_notify", "etcd_notify", true),
    ("etcd_server_watcher_send", "etcd_enqueue", true),
    ("etcd_server_grpc_send", "etcd_send", true),
    ("etcd_client_dispatch", "etcd_dispatch", false),
];

/// One role's outcome, for logs and `/debug/probes`.
#[derive(Clone, Debug, Serialize)]
pub struct SiteStatus {
    pub role: &'static str,
    pub symbol: Option<String>,
    pub file_offset: Option<u64>,
    pub planned: bool,
    pub reason: Option<String>,
}

#[derive(Clone, Debug, Default)]
pub struct WatchPlan {
    pub sites: Vec<Site>,
    pub statuses: Vec<SiteStatus>,
    /// Set when the binary has watch-path roles but must not be probed.
    pub refusal: Option<String>,
}

impl WatchPlan {
    /// True for binaries with none of the watch path's functions.
    pub fn is_unrelated(&self) -> bool {
        self.statuses.iter().all(|s| s.symbol.is_none())
    }
}

/// Plans the watch-path probes of one inspected binary.
pub fn plan(insp: &Inspection) -> WatchPlan {
    let mut plan = WatchPlan::default();
    let found: Vec<Option<&Probe>> = ROLES.iter().map(|(role, _, _)| insp.probes_for(role).next()).collect();
    if found.iter().all(Option::is_none) {
        // Nothing known resolved. A binary that nonetheless looks like etcd
        // is a build the catalog does not cover yet: say so (once, in the
        // log and in /debug/probes) rather than ignore it silently.
        plan.refusal = looks_like_etcd(insp).map(|why| {
            format!("{why}, but none of the watch-path functions in the catalog resolve: an etcd build watchscope does not know; nothing attached")
        });
        plan.statuses = ROLES
            .iter()
            .map(|(role, _, _)| SiteStatus {
                role,
                symbol: None,
                file_offset: None,
                planned: false,
                reason: Some("not in this binary".into()),
            })
            .collect();
        return plan;
    }
    let refusal = binary_refusal(insp);
    // Clients link etcd's generated gRPC server code too; without the
    // commit fan-out a binary is no etcd server, so its server roles would
    // never fire: they are left out, not refused.
    let is_server = found.first().is_some_and(Option::is_some);
    for ((role, program, server), probe) in ROLES.iter().zip(found) {
        let probe = if *server && !is_server { None } else { probe };
        let mut status = SiteStatus {
            role,
            symbol: probe.map(|p| p.symbol.clone()),
            file_offset: None,
            planned: false,
            reason: None,
        };
        let result = match (probe, &refusal) {
            (None, _) if *server && !is_server => Err("not an etcd server (no commit fan-out)".to_string()),
            (None, _) => Err("not in this binary".to_string()),
            (Some(_), Some(why)) => Err(why.clone()),
            (Some(p), None) => site(insp, p, role, program),
        };
        match result {
            Ok(s) => {
                status.file_offset = Some(s.file_offset);
                status.planned = true;
                plan.sites.push(s);
            }
            Err(why) => {
                status.reason = Some(why);
                // The server side is useless without its commit timestamps.
                if *server && *role == "etcd_server_notify" && probe.is_some() {
                    plan.refusal
                        .get_or_insert_with(|| format!("{role}: {}", status.reason.clone().unwrap_or_default()));
                }
            }
        }
        plan.statuses.push(status);
    }
    if let Some(why) = &refusal {
        plan.refusal = Some(why.clone());
    }
    if plan.refusal.is_some() {
        plan.sites.clear();
    }
    plan
}

/// Evidence that a binary is some etcd server build, if there is any.
fn looks_like_etcd(insp: &Inspection) -> Option<String> {
    let module =
        insp.build_info.as_ref().and_then(|b| b.main.as_ref().map(|m| m.path.clone()).or_else(|| b.path.clone()));
    if let Some(m) = module.filter(|m| m.starts_with("go.etcd.io/etcd") || m.starts_with("github.com/coreos/etcd")) {
        return Some(format!("main module {m} looks like etcd"));
    }
    let re = regex::Regex::new(r"\(\*watchableStore\)\.notify$").ok()?;
    insp.functions_matching(&re).first().map(|f| format!("it has {}", f.name))
}

/// Reasons that rule out the whole binary.
pub fn binary_refusal(insp: &Inspection) -> Option<String> {
    let host = if cfg!(target_arch = "x86_64") { Arch::X86_64 } else { Arch::Aarch64 };
    if insp.arch != host {
        return Some(format!("binary is {} but the agent runs on {}", insp.arch.as_str(), host.as_str()));
    }
    if insp.abi.is_none() {
        return Some("Go version unknown, so its calling convention is unknown".into());
    }
    None
}

fn site(insp: &Inspection, p: &Probe, role: &'static str, program: &'static str) -> Result<Site, String> {
    let get = |name: &str| -> Result<&ArgRead, String> {
        let a = p
            .args
            .iter()
            .find(|a| a.name == name)
            .ok_or_else(|| format!("the catalog has no `{name}` read for {}", p.symbol))?;
        if !a.verified {
            return Err(format!(
                "`{name}` of {} is not verified for this build ({} {}); refusing to guess",
                p.symbol,
                insp.arch.as_str(),
                insp.abi.map(Abi::as_str).unwrap_or("?")
            ));
        }
        Ok(a)
    };
    let mut cfg =
        WatchProbeConfig { event_kv_off: EVENT_KV_OFF, kv_mod_rev_off: KV_MOD_REV_OFF, ..WatchProbeConfig::default() };
    match role {
        "etcd_server_notify" => {
            cfg.args[0] = direct(get("rev")?)?;
        }
        "etcd_server_watcher_send" => {
            cfg.args[0] = direct(get("watch_id")?)?;
            cfg.args[1] = direct(get("events_ptr")?)?;
            cfg.args[2] = direct(get("events")?)?;
            cfg.event_stride = EVENT_VALUE_STRIDE;
        }
        _ => {
            // Send(m) and dispatchEvent(pbresp): everything hangs off the
            // *WatchResponse, so take its location from one read and the
            // field offsets from the reads' pointer chases.
            let wid = get("watch_id")?;
            cfg.args[0] = loc(&wid.source)?;
            cfg.resp_watch_id_off = one_deref(wid)?;
            let member = get("member_id")?;
            let [hdr, mem] = member.derefs[..] else {
                return Err(format!("member_id read of {} is not a two-step pointer chase", p.symbol));
            };
            cfg.resp_header_off = narrow(hdr)?;
            cfg.hdr_member_off = narrow(mem)?;
            cfg.resp_events_off = one_deref(get("events_ptr")?)?;
            let len_off = one_deref(get("events")?)?;
            if len_off != cfg.resp_events_off + 8 {
                return Err(format!("events len of {} is not 8 bytes after its pointer", p.symbol));
            }
            cfg.event_stride = 8;
            cfg.events_indirect = 1;
        }
    }
    let at = entry_site(insp, &p.symbol, p.address, p.file_offset, p.size)?;
    cfg.guard = at.guard;
    Ok(Site {
        role: role.to_string(),
        symbol: p.symbol.clone(),
        program,
        file_offset: p.file_offset + at.offset,
        config: SiteConfig::Watch(cfg),
    })
}

/// An argument read with no pointer chase, as a kernel `ArgLoc`.
fn direct(a: &ArgRead) -> Result<ArgLoc, String> {
    if !a.derefs.is_empty() {
        return Err(format!("`{}` is expected to be a plain argument", a.name));
    }
    loc(&a.source)
}

fn one_deref(a: &ArgRead) -> Result<u32, String> {
    match a.derefs[..] {
        [off] => narrow(off),
        _ => Err(format!("`{}` is expected to be one field of the response", a.name)),
    }
}

fn narrow(off: u64) -> Result<u32, String> {
    u32::try_from(off).map_err(|_| format!("field offset {off:#x} is out of range"))
}

fn loc(src: &ArgSource) -> Result<ArgLoc, String> {
    Ok(match src {
        ArgSource::Register(r) => ArgLoc {
            kind: ARG_REG,
            off: reg_slot(*r).ok_or_else(|| format!("register {r} is not an argument register"))?,
        },
        ArgSource::Stack(off) => ArgLoc { kind: ARG_STACK, off: narrow(*off)? },
    })
}

/// The kernel program's register slot (Go register-ABI order; 9 = g).
fn reg_slot(r: Reg) -> Option<u32> {
    Some(match r {
        Reg::Rax | Reg::X(0) => 0,
        Reg::Rbx | Reg::X(1) => 1,
        Reg::Rcx | Reg::X(2) => 2,
        Reg::Rdi | Reg::X(3) => 3,
        Reg::Rsi | Reg::X(4) => 4,
        Reg::R8 | Reg::X(5) => 5,
        Reg::R9 | Reg::X(6) => 6,
        Reg::R10 | Reg::X(7) => 7,
        Reg::R11 | Reg::X(8) => 8,
        Reg::R14 | Reg::X(28) => 9,
        Reg::X(_) => return None,
    })
}

/// Where in a function its entry probe goes (see `inspect::prologue`),
/// from the function's first bytes in the inspection's own mapping of the
/// file (no second read of the binary).
pub fn entry_site(
    insp: &Inspection,
    symbol: &str,
    address: u64,
    file_offset: u64,
    size: u64,
) -> Result<prologue::ProbeSite, String> {
    let len = size.clamp(1, 64) as usize;
    let code = insp
        .bytes_at(file_offset, len)
        .ok_or_else(|| format!("{symbol}: {len} bytes at file offset {file_offset:#x} are outside the file"))?;
    let register_abi = insp.abi == Some(Abi::Register);
    let site = match insp.arch {
        Arch::X86_64 => prologue::amd64_probe_site(code, address, register_abi),
        Arch::Aarch64 => prologue::arm64_probe_site(code),
    };
    site.map_err(|e| format!("{symbol}: {e}; refusing to place an entry probe"))
}
