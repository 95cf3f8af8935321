//! The etcd watch path's probe plan for one binary: which kernel program
//! goes where, and the `WatchProbeConfig` that tells it how to read its
//! arguments. Where an argument lives (register or stack slot) comes from
//! the catalog's signatures and the binary's calling convention; every
//! struct offset and stride comes from the binary's identified layout
//! (`inspect::layout`), and the catalog's own offsets are only checked
//! against it.
//!
//! The plan refuses, and says why, whenever a read is not known to be right
//! for this binary: a layout not identified or not verified for this ABI,
//! an unrecognised prologue, another architecture. A wrong offset gives
//! wrong numbers (reads go through bpf_probe_read_user), and a wrong *probe
//! address* would land a breakpoint mid-instruction and crash etcd: neither
//! is ever guessed.

use agent_common::watch::{ARG_REG, ARG_STACK, ArgLoc, Reg as WatchReg, WatchProbeConfig};
use serde::Serialize;

use super::uprobes::{Site, SiteConfig};
use crate::inspect::{
    Inspection, Probe,
    catalog::{Abi, ArgRead, ArgSource, Reg, Role, STREAMING_DECODE},
    elf::Arch,
    layout::{EtcdLayout, Fact},
    prologue,
};

/// The roles of the watch path, the kernel program serving each, and whether
/// it belongs to the server or the client side.
const ROLES: [(Role, &str, bool); 4] = [
    (Role::EtcdServerNotify, "etcd_notify", true),
    (Role::EtcdServerWatcherSend, "etcd_enqueue", true),
    (Role::EtcdServerGrpcSend, "etcd_send", true),
    (Role::EtcdClientDispatch, "etcd_dispatch", false),
];

/// A Kubernetes API server's roles (behind its etcd client, whose dispatch
/// is the `etcd_dispatch` role above) and their kernel programs.
const KUBE_ROLES: [(Role, &str); 3] = [
    (Role::KubeCacheProcessEvent, "kube_cache"),
    (Role::KubeWatcherQueue, "kube_queue"),
    (Role::KubeWatcherSent, "kube_watcher"),
];

/// The API server's HTTP watch handler: an event's encoding starts, then
/// its write is recorded, on the handler's goroutine: both or neither.
const KUBE_WRITE_ROLES: [(Role, &str); 2] =
    [(Role::KubeWatchEncode, "kube_encode"), (Role::KubeWatchWritten, "kube_write")];

/// client-go's reflector → informer queue: both roles or neither.
const INFORMER_ROLES: [(Role, &str); 2] =
    [(Role::ClientGoFifoQueue, "informer_queue"), (Role::ClientGoReflectorRv, "informer_rv")];

/// Where a Go closure's context holds its first captured variable (after
/// the function pointer).
const CLOSURE_FIRST_CAPTURE: u64 = 8;

/// The cacher's per-event struct, whose fields the watcher probes read.
const CACHE_EVENT_TYPE: &str = "cacher.watchCacheEvent";
const CACHE_EVENT_PKG: &str = "k8s.io/apiserver/pkg/storage/cacher";

/// One role's outcome, for logs and `/debug/probes`.
#[derive(Clone, Debug, Serialize)]
pub struct SiteStatus {
    pub role: Role,
    pub symbol: Option<String>,
    pub file_offset: Option<u64>,
    pub planned: bool,
    pub reason: Option<String>,
}

/// How the watch path is probed (`--etcd-notify-probe`).
#[derive(Clone, Copy, Debug)]
pub struct WatchOptions {
    /// Probe etcd's commit fan-out (`notify`), which runs at every commit,
    /// to stamp every revision's commit. Without it a commit is stamped when
    /// the fan-out hands the revision to its first watcher (the enqueue
    /// probe, told apart from catch-up and retry sends by its return
    /// address): one trap per put fewer (5.12 µs of etcd's CPU per put
    /// inside the probes' trap against 5.33 in `cargo xtask bench etcd`,
    /// paced), but a revision no synced watcher
    /// received is never stamped: a catch-up from an older revision, and a
    /// lone slow watcher's backlog (etcd takes a watcher whose queue is full
    /// out of the fan-out until it caught up), count as commit misses.
    pub notify_probe: bool,
    /// Read each watcher's filters at the enqueue (`--etcd-filtered-watches`),
    /// so that a watch with etcd's own filters is timed from enqueue to send
    /// (see `agent_common::watch::filtered_copy_slot`). Off by default: the
    /// read is one more access to etcd's memory at every enqueue, for a
    /// feature etcd's main client, the Kubernetes API server, does not use.
    pub filtered_watches: bool,
}

impl Default for WatchOptions {
    fn default() -> Self {
        Self { notify_probe: true, filtered_watches: false }
    }
}

#[derive(Clone, Debug, Default)]
pub struct WatchPlan {
    pub sites: Vec<Site>,
    pub statuses: Vec<SiteStatus>,
    /// Set when the binary has watch-path roles but must not be probed.
    pub refusal: Option<String>,
}

impl WatchPlan {
    /// Records one role's outcome at `symbol`: its site, or why it has none.
    /// True when the site is planned.
    fn record(&mut self, role: Role, symbol: Option<String>, result: Result<Site, String>) -> bool {
        let mut status = SiteStatus { role, symbol, file_offset: None, planned: false, reason: None };
        let planned = match result {
            Ok(s) => {
                status.file_offset = Some(s.file_offset);
                status.planned = true;
                self.sites.push(s);
                true
            }
            Err(why) => {
                status.reason = Some(why);
                false
            }
        };
        self.statuses.push(status);
        planned
    }

    /// Takes back the planned sites of a group of roles that only work
    /// together, once one of them could not be planned, saying `why`.
    fn withdraw(&mut self, group: &[(Role, &str)], why: &str) {
        self.sites.retain(|s| !group.iter().any(|(_, program)| s.program == *program));
        for st in self.statuses.iter_mut().filter(|st| group.iter().any(|(r, _)| *r == st.role)) {
            if st.planned {
                st.planned = false;
                st.file_offset = None;
                st.reason = Some(why.into());
            }
        }
    }

    /// True for binaries with none of the watch path's functions.
    pub fn is_unrelated(&self) -> bool {
        self.statuses.iter().all(|s| s.symbol.is_none())
    }
}

/// Plans the watch-path probes of one inspected binary.
pub fn plan(insp: &Inspection, opts: WatchOptions) -> WatchPlan {
    let mut plan = WatchPlan::default();
    let found: Vec<Option<&Probe>> = ROLES.iter().map(|(role, _, _)| insp.probes_for(*role).next()).collect();
    let kube_found = KUBE_ROLES.iter().any(|(role, _)| insp.probes_for(*role).next().is_some());
    let informer_found = INFORMER_ROLES.iter().all(|(role, _)| insp.probes_for(*role).next().is_some());
    let decode_found = insp.probes_for(Role::ClientGoWatchDecode).next().is_some();
    let etcd_found = found.iter().any(Option::is_some);
    if !etcd_found && !kube_found && !informer_found && !decode_found {
        // Nothing known resolved. A binary that nonetheless looks like etcd
        // is a build the catalog does not cover yet: say so (once, in the
        // log and in /debug/probes) rather than ignore it silently.
        plan.refusal = looks_like_etcd(insp).map(|why| {
            format!("{why}, but none of the watch-path functions in the catalog resolve: an etcd build watchscope does not know; nothing attached")
        });
        plan.statuses = ROLES
            .iter()
            .map(|(role, _, _)| SiteStatus {
                role: *role,
                symbol: None,
                file_offset: None,
                planned: false,
                reason: Some("not in this binary".into()),
            })
            .collect();
        return plan;
    }
    // The etcd layout matters only to binaries that have etcd's code (an
    // operator has client-go alone).
    let refusal = binary_refusal(insp).or_else(|| if etcd_found { layout_refusal(insp) } else { None });
    // Clients link etcd's generated gRPC server code too; without the
    // commit fan-out a binary is no etcd server, so its server roles would
    // never fire: they are left out, not refused.
    let is_server = found.first().is_some_and(Option::is_some);
    // Each role's probe (none for a server role of a binary that is no
    // server) and its site, or why it has none.
    let planned: Vec<(Option<&Probe>, Result<Site, String>)> = ROLES
        .iter()
        .zip(found)
        .map(|((role, program, server), probe)| {
            let probe = if *server && !is_server { None } else { probe };
            let result = match (probe, &refusal) {
                (None, _) if *server && !is_server => Err("not an etcd server (no commit fan-out)".to_string()),
                (None, _) => Err("not in this binary".to_string()),
                (Some(_), Some(why)) => Err(why.clone()),
                (Some(p), None) => match &insp.etcd_layout {
                    Some(layout) => site(insp, layout, p, *role, program),
                    None => Err("no etcd layout was identified for this binary".to_string()),
                },
            };
            (probe, result)
        })
        .collect();
    // Where the commit is stamped: at the fan-out's entry (a probe on
    // `notify`), or when it hands the event to its first watcher (the
    // enqueue probe, counting only calls from `notify`'s code: catch-up
    // and retry sends carry older revisions). Only where the enqueue probe
    // is placed; the return address is read at the stack pointer: amd64 only.
    let of = |role: Role| ROLES.iter().zip(&planned).find(|((r, _, _), _)| *r == role).map(|(_, p)| p);
    let enqueue_placed = of(Role::EtcdServerWatcherSend).is_some_and(|(_, r)| r.is_ok());
    let fanout = match of(Role::EtcdServerNotify) {
        Some((Some(n), Ok(_))) if enqueue_placed && !opts.notify_probe && insp.arch == Arch::X86_64 && n.size > 0 => {
            Some((n.address, n.address + n.size))
        }
        _ => None,
    };
    for ((role, _, _), (probe, result)) in ROLES.iter().zip(planned) {
        let mut status = SiteStatus {
            role: *role,
            symbol: probe.map(|p| p.symbol.clone()),
            file_offset: None,
            planned: false,
            reason: None,
        };
        let result = match result {
            Ok(_) if *role == Role::EtcdServerNotify && fanout.is_some() => {
                // Placeable, and left unprobed: its code range serves the
                // enqueue probe.
                status.reason = Some(
                    "not probed (--etcd-notify-probe=false): commits are stamped at the first \
                     watcher's enqueue from here"
                        .into(),
                );
                plan.statuses.push(status);
                continue;
            }
            Ok(mut s) if *role == Role::EtcdServerWatcherSend => {
                if let SiteConfig::Watch(c) = &mut s.config {
                    if let Some((lo, hi)) = fanout {
                        c.caller_lo = lo;
                        c.caller_hi = hi;
                    }
                    // Whether a watcher has filters: without the receiver or
                    // its type descriptor, every watcher is taken as
                    // unfiltered. Looked up only when asked for.
                    if let (true, Some(p)) = (opts.filtered_watches, probe)
                        && let (Ok(w), Some(off)) =
                            (catalog_read(p, "watcher").and_then(direct), watcher_filters_len(insp))
                    {
                        c.args[3] = w;
                        c.watcher_fcs_len_off = off;
                    }
                }
                Ok(s)
            }
            r => r,
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
                if *role == Role::EtcdServerNotify && probe.is_some() {
                    plan.refusal
                        .get_or_insert_with(|| format!("{role}: {}", status.reason.clone().unwrap_or_default()));
                }
            }
        }
        plan.statuses.push(status);
    }
    if kube_found {
        plan_kube(insp, &mut plan);
        // The watch cache finds commit times through this binary's own etcd
        // client: only then does its dispatch republish them.
        if plan.sites.iter().any(|s| s.program == "kube_cache") {
            for s in plan.sites.iter_mut().filter(|s| s.program == "etcd_dispatch") {
                if let SiteConfig::Watch(c) = &mut s.config {
                    c.publish_commit = 1;
                }
            }
        }
    }
    if informer_found {
        plan_informer(insp, &mut plan);
    }
    if decode_found {
        plan_watch_decode(insp, kube_found, &mut plan);
    }
    if let Some(why) = &refusal {
        plan.refusal = Some(why.clone());
    }
    if plan.refusal.is_some() {
        plan.sites.clear();
    }
    plan
}

/// The API server's sites. They read the revision the binary's own etcd
/// client dispatched, so the binary's refusals (architecture, ABI, its etcd
/// layout) hold for them too; the cacher's struct offsets come only from
/// the binary's type descriptor: without it, nothing is read.
fn plan_kube(insp: &Inspection, plan: &mut WatchPlan) {
    let layout = cache_event_layout(insp);
    let mut planned = 0;
    for (role, program) in KUBE_ROLES {
        let probe = insp.probes_for(role).next();
        let result = match (probe, &layout) {
            (None, _) => Err("not in this binary".to_string()),
            (Some(_), Err(why)) => Err(why.clone()),
            (Some(p), Ok((type_off, rv_off))) => kube_site(insp, p, role, program, *type_off, *rv_off),
        };
        if plan.record(role, probe.map(|p| p.symbol.clone()), result) {
            planned += 1;
        }
    }
    if planned == KUBE_ROLES.len() {
        plan_kube_write(insp, plan);
        plan_kube_terminated(insp, plan);
    }
    // The queue and result-channel probes only make sense together (an
    // event is live when it was queued): all three sites or none.
    if planned != KUBE_ROLES.len() {
        // Nothing else to probe in this binary: say why, for the whole of it.
        let first = plan.statuses.iter().find(|st| KUBE_ROLES.iter().any(|(r, _)| *r == st.role) && !st.planned);
        if plan.sites.len() == planned
            && let Some(st) = first
        {
            plan.refusal.get_or_insert_with(|| {
                format!("{}: {}", st.role, st.reason.clone().unwrap_or_else(|| "not planned".into()))
            });
        }
        plan.withdraw(&KUBE_ROLES, "the API server's other watch-path functions cannot be probed");
    }
}

/// The cacher's close of an unresponsive watcher. Optional: counted when
/// present. It names the watcher it closes (for the chains of the events
/// that watcher will never get) only where this binary's code was seen to
/// load the closure's first capture, `c *cacheWatcher`, from the context
/// register.
fn plan_kube_terminated(insp: &Inspection, plan: &mut WatchPlan) {
    let Some(p) = insp.probes_for(Role::KubeWatcherTerminated).next() else { return };
    let mut cfg = WatchProbeConfig { g_in_reg: u32::from(insp.g_register.is_some()), ..WatchProbeConfig::default() };
    let code = insp.bytes_at(p.file_offset, p.size.clamp(1, 64) as usize);
    if insp.arch == Arch::X86_64
        && insp.abi == Some(Abi::Register)
        && code.is_some_and(|c| prologue::amd64_loads_context(c, p.address, CLOSURE_FIRST_CAPTURE))
    {
        cfg.args[0] = ArgLoc { kind: ARG_REG, off: WatchReg::Rdx as u32 };
        cfg.closure_watcher_off = CLOSURE_FIRST_CAPTURE as u32;
    }
    let site = entry_watch_site(insp, p, Role::KubeWatcherTerminated, "kube_terminated", cfg);
    plan.record(Role::KubeWatcherTerminated, Some(p.symbol.clone()), site);
}

/// The watch handler's writes, joined to the dispatched event by the object
/// the cacher hands every watcher: the per-watcher queue probe then
/// publishes that object (`publish_sent`), at `watchCacheEvent` offsets
/// from the binary's type descriptor.
fn plan_kube_write(insp: &Inspection, plan: &mut WatchPlan) {
    let objects = cache_event_objects(insp);
    let mut ok = true;
    for (role, program) in KUBE_WRITE_ROLES {
        let probe = insp.probes_for(role).next();
        let result = match (probe, &objects) {
            (None, _) => Err("not in this binary".to_string()),
            (Some(_), Err(why)) => Err(why.clone()),
            (Some(_), Ok(_)) if insp.g_register.is_none() => {
                // Encode and its write are joined by goroutine.
                Err("the goroutine is not in a register in this binary (stack ABI)".to_string())
            }
            (Some(p), Ok(_)) => {
                kube_write_config(p, role).and_then(|cfg| entry_watch_site(insp, p, role, program, cfg))
            }
        };
        ok &= plan.record(role, probe.map(|p| p.symbol.clone()), result);
    }
    match (ok, objects) {
        (true, Ok((obj_off, prev_off))) => {
            for s in plan.sites.iter_mut().filter(|s| s.program == "kube_queue") {
                if let SiteConfig::Watch(c) = &mut s.config {
                    c.publish_sent = 1;
                    c.cache_event_obj_off = obj_off;
                    c.cache_event_prev_off = prev_off;
                }
            }
        }
        _ => plan.withdraw(&KUBE_WRITE_ROLES, "the watch handler's other function cannot be probed"),
    }
}

/// A client-go reflector's queue pushes (every variant present) and its
/// resourceVersion updates, joined per goroutine: both kinds or none.
fn plan_informer(insp: &Inspection, plan: &mut WatchPlan) {
    let mut ok = true;
    for (role, program) in INFORMER_ROLES {
        for p in insp.probes_for(role) {
            ok &= plan.record(role, Some(p.symbol.clone()), informer_site(insp, p, role, program));
        }
    }
    if ok {
        plan_informer_process(insp, plan);
    } else {
        plan.withdraw(&INFORMER_ROLES, "the reflector's other functions cannot be probed");
    }
}

/// The informer's pops (`handleDeltas`, `handleBatchDeltas`), where the
/// objects its reflector queued come off the queue: timed by object, so only
/// with the binary's own `cache.Delta` layout.
fn plan_informer_process(insp: &Inspection, plan: &mut WatchPlan) {
    let layout = delta_layout(insp);
    let mut planned = false;
    for p in insp.probes_for(Role::ClientGoHandleDeltas) {
        let result = layout.clone().and_then(|(stride, obj_off)| {
            let mut cfg =
                WatchProbeConfig { event_stride: stride, delta_obj_off: obj_off, ..WatchProbeConfig::default() };
            if p.symbol.ends_with(").handleDeltas") {
                // `obj interface{}` boxes the Deltas slice: its data word.
                cfg.args[0] = loc(&catalog_read(p, "deltas")?.source)?;
                cfg.deltas_boxed = 1;
            } else if p.symbol.ends_with(").handleBatchDeltas") {
                cfg.args[0] = direct(catalog_read(p, "deltas_ptr")?)?;
                cfg.args[1] = direct(catalog_read(p, "deltas")?)?;
            } else {
                return Err(format!("{}: no verified signature for the informer's pops", p.symbol));
            }
            entry_watch_site(insp, p, Role::ClientGoHandleDeltas, "informer_process", cfg)
        });
        planned |= plan.record(Role::ClientGoHandleDeltas, Some(p.symbol.clone()), result);
    }
    if planned {
        plan_informer_handlers(insp, plan);
    }
}

/// The listeners' calls of the user's handlers, timed by the object the
/// informer processed: only behind a planned pop, which hands the object
/// over.
fn plan_informer_handlers(insp: &Inspection, plan: &mut WatchPlan) {
    for p in insp.probes_for(Role::ClientGoHandler) {
        let result = catalog_read(p, "obj").and_then(direct).and_then(|obj| {
            // The goroutine joins a record of the handler's start to the
            // user's window that runs on it.
            let mut cfg = WatchProbeConfig { g_in_reg: u32::from(insp.g_register.is_some()), ..Default::default() };
            cfg.args[0] = obj;
            entry_watch_site(insp, p, Role::ClientGoHandler, "informer_handler", cfg)
        });
        plan.record(Role::ClientGoHandler, Some(p.symbol.clone()), result);
    }
}

/// Any client-go watch client's frames (an informer's reflector, kubectl,
/// any user of `Watch`), read where the JSON serializer starts on one. The
/// serializer decodes every JSON body of the process (lists, gets, and in an
/// API server every request): the kernel counts a call only when its return
/// address is in the streaming decoder, which reads watch frames alone.
fn plan_watch_decode(insp: &Inspection, api_server: bool, plan: &mut WatchPlan) {
    for p in insp.probes_for(Role::ClientGoWatchDecode) {
        let result = if api_server {
            // Its own loopback watches are not the path timed; every request
            // body it decodes would cost a probe hit.
            Err("a Kubernetes API server: its JSON decodes are requests".to_string())
        } else {
            watch_decode_site(insp, p)
        };
        plan.record(Role::ClientGoWatchDecode, Some(p.symbol.clone()), result);
    }
}

fn watch_decode_site(insp: &Inspection, p: &Probe) -> Result<Site, String> {
    if insp.arch != Arch::X86_64 {
        return Err("the caller check reads the return address at the stack pointer (amd64 only)".into());
    }
    let caller = insp.function(STREAMING_DECODE).ok_or_else(|| {
        format!("{STREAMING_DECODE} is not in this binary: watch frames cannot be told from other JSON")
    })?;
    let mut cfg = WatchProbeConfig {
        g_in_reg: u32::from(insp.g_register.is_some()),
        caller_lo: caller.address,
        caller_hi: caller.address + caller.size,
        ..WatchProbeConfig::default()
    };
    cfg.args[0] = direct(catalog_read(p, "frame_ptr")?)?;
    cfg.args[1] = direct(catalog_read(p, "frame_len")?)?;
    entry_watch_site(insp, p, Role::ClientGoWatchDecode, "client_decode", cfg)
}

/// `sizeof(cache.Delta)` and where its `Object`'s data word is, from the
/// binary's type descriptor.
fn delta_layout(insp: &Inspection) -> Result<(u32, u32), String> {
    let l = insp
        .struct_layout_in("cache.Delta", Some("k8s.io/client-go/tools/cache"))
        .map_err(|e| format!("no readable type descriptor for cache.Delta ({e}): its layout is not identified"))?;
    let obj = l.field("Object").ok_or("cache.Delta has no field Object in this binary")?;
    if obj.size != 16 || !obj.type_name.starts_with("interface") {
        return Err(format!(
            "cache.Delta.Object is a {} of {} bytes in this binary, not an interface",
            obj.type_name, obj.size
        ));
    }
    Ok((narrow(l.size)?, narrow(obj.offset + 8)?))
}

fn informer_site(insp: &Inspection, p: &Probe, role: Role, program: &'static str) -> Result<Site, String> {
    if insp.g_register.is_none() {
        // The push and the resourceVersion are joined by goroutine.
        return Err("the goroutine is not in a register in this binary (stack ABI)".into());
    }
    let mut cfg = WatchProbeConfig { g_in_reg: 1, ..WatchProbeConfig::default() };
    if role == Role::ClientGoReflectorRv {
        let get = |name: &str| catalog_read(p, name);
        cfg.args[0] = direct(get("rv_ptr")?)?;
        cfg.args[1] = direct(get("rv_len")?)?;
    } else {
        cfg.args[0] = direct(catalog_read(p, "obj")?)?;
    }
    entry_watch_site(insp, p, role, program, cfg)
}

/// `watchCacheEvent.Type` and `.ResourceVersion` from the binary's type
/// descriptor, checked for the field types the kernel reads.
pub fn cache_event_layout(insp: &Inspection) -> Result<(u32, u32), String> {
    let [ty, rv] = cache_event_fields(insp, [("Type", "watch.EventType", 16), ("ResourceVersion", "uint64", 8)])?;
    Ok((ty, rv))
}

/// What the watch handler's probes read: `Encode` the event's object (its
/// interface words), the write nothing; both the goroutine.
fn kube_write_config(p: &Probe, role: Role) -> Result<WatchProbeConfig, String> {
    let mut cfg = WatchProbeConfig { g_in_reg: 1, ..WatchProbeConfig::default() };
    if role == Role::KubeWatchEncode {
        cfg.args[0] = direct(catalog_read(p, "obj_type")?)?;
        cfg.args[1] = direct(catalog_read(p, "obj")?)?;
    }
    Ok(cfg)
}

/// `watchCacheEvent.Object` and `.PrevObject`, both `runtime.Object`
/// interfaces, from the binary's type descriptor.
pub fn cache_event_objects(insp: &Inspection) -> Result<(u32, u32), String> {
    let [obj, prev] =
        cache_event_fields(insp, [("Object", "runtime.Object", 16), ("PrevObject", "runtime.Object", 16)])?;
    Ok((obj, prev))
}

/// The offsets of `watchCacheEvent` fields (name, Go type, size) from the
/// binary's type descriptor, each checked to have the type and size the
/// kernel reads.
fn cache_event_fields<const N: usize>(insp: &Inspection, want: [(&str, &str, u64); N]) -> Result<[u32; N], String> {
    let l = insp.struct_layout_in(CACHE_EVENT_TYPE, Some(CACHE_EVENT_PKG)).map_err(|e| {
        format!("no readable type descriptor for {CACHE_EVENT_TYPE} ({e}): its layout is not identified")
    })?;
    let mut out = [0; N];
    for (o, (name, type_name, size)) in out.iter_mut().zip(want) {
        let f = l.field(name).ok_or_else(|| format!("{CACHE_EVENT_TYPE} has no field {name} in this binary"))?;
        if f.type_name != type_name || f.size != size {
            return Err(format!(
                "{CACHE_EVENT_TYPE}.{name} is a {} of {} bytes in this binary, not a {type_name}",
                f.type_name, f.size
            ));
        }
        *o = narrow(f.offset)?;
    }
    Ok(out)
}

fn kube_site(
    insp: &Inspection,
    p: &Probe,
    role: Role,
    program: &'static str,
    type_off: u32,
    rv_off: u32,
) -> Result<Site, String> {
    let get = |name: &str| catalog_read(p, name);
    let mut cfg = WatchProbeConfig {
        g_in_reg: u32::from(insp.g_register.is_some()),
        cache_event_type_off: type_off,
        cache_event_rv_off: rv_off,
        ..WatchProbeConfig::default()
    };
    match role {
        Role::KubeCacheProcessEvent => cfg.args[0] = direct(get("rev")?)?,
        _ => {
            cfg.args[0] = direct(get("watcher")?)?;
            // The event pointer itself; the catalog's read chases it to the
            // revision for `inspect`, at the offset the binary must agree on.
            let rev = get("rev")?;
            if rev.derefs != [u64::from(rv_off)] {
                return Err(format!(
                    "`rev` of {}: the catalog reads at {:?} but the binary's {CACHE_EVENT_TYPE} has it at {rv_off}",
                    p.symbol, rev.derefs
                ));
            }
            cfg.args[1] = loc(&rev.source)?;
        }
    }
    entry_watch_site(insp, p, role, program, cfg)
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

/// The etcd layout's refusal: every role reads its structs, so a layout
/// that is not identified, or not verified for this ABI, refuses them all.
fn layout_refusal(insp: &Inspection) -> Option<String> {
    match &insp.etcd_layout {
        None => Some("no etcd layout was identified for this binary".into()),
        Some(l) => l.refusal.as_ref().map(|why| format!("etcd struct layout: {why}")),
    }
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

fn site(insp: &Inspection, layout: &EtcdLayout, p: &Probe, role: Role, program: &'static str) -> Result<Site, String> {
    let get = |name: &str| catalog_read(p, name);
    let fact = |f: Fact| -> Result<u32, String> {
        layout.get(f).ok_or_else(|| format!("{} is not known for this binary", f.describe())).and_then(narrow)
    };
    // The catalog writes the 3.4 offsets into its reads (for `inspect` and
    // tracefs); the binary's layout decides. Were they to differ, one of the
    // two is wrong about this binary, and nothing is read.
    let agree = |a: &ArgRead, facts: &[Fact]| -> Result<(), String> {
        let want: Vec<u64> = facts.iter().map(|f| fact(*f).map(u64::from)).collect::<Result<_, _>>()?;
        if a.derefs == want {
            Ok(())
        } else {
            Err(format!(
                "`{}` of {}: the catalog reads at {:?} but the binary's layout ({}) puts it at {want:?}",
                a.name,
                p.symbol,
                a.derefs,
                layout.profile.unwrap_or("?")
            ))
        }
    };
    let mut cfg = WatchProbeConfig {
        event_kv_off: fact(Fact::EventKv)?,
        kv_mod_rev_off: fact(Fact::KvModRevision)?,
        resp_created_off: fact(Fact::RespCreated)?,
        resp_canceled_off: fact(Fact::RespCanceled)?,
        resp_compact_rev_off: fact(Fact::RespCompactRevision)?,
        g_in_reg: u32::from(insp.g_register.is_some()),
        ..WatchProbeConfig::default()
    };
    match role {
        Role::EtcdServerNotify => {
            cfg.args[0] = direct(get("rev")?)?;
        }
        Role::EtcdServerWatcherSend => {
            // The flattened `mvcc.WatchResponse` argument: its field order is
            // part of the identified layout.
            cfg.args[0] = direct(get("watch_id")?)?;
            cfg.args[1] = direct(get("events_ptr")?)?;
            cfg.args[2] = direct(get("events")?)?;
            cfg.event_stride = fact(Fact::EventSize)?;
        }
        _ => {
            // Send(m) and dispatchEvent(pbresp): everything hangs off the
            // *WatchResponse, so take its location from one read and the
            // field offsets from the layout.
            let wid = get("watch_id")?;
            agree(wid, &[Fact::RespWatchId])?;
            agree(get("member_id")?, &[Fact::RespHeader, Fact::HdrMemberId])?;
            agree(get("events_ptr")?, &[Fact::RespEvents])?;
            cfg.args[0] = loc(&wid.source)?;
            cfg.resp_watch_id_off = fact(Fact::RespWatchId)?;
            cfg.resp_header_off = fact(Fact::RespHeader)?;
            cfg.hdr_member_off = fact(Fact::HdrMemberId)?;
            cfg.hdr_rev_off = fact(Fact::HdrRevision)?;
            cfg.resp_events_off = fact(Fact::RespEvents)?;
            // `[]*mvccpb.Event`: a slice of pointers, len one word after ptr.
            cfg.event_stride = 8;
            cfg.events_indirect = 1;
        }
    }
    entry_watch_site(insp, p, role, program, cfg)
}

/// Where an etcd `mvcc.watcher` holds the length of its filters (`fcs
/// []FilterFunc`): from the binary's type descriptor (3.5.30 added a field
/// before it), checked to be a slice.
fn watcher_filters_len(insp: &Inspection) -> Option<u32> {
    let l = insp.struct_layout("mvcc.watcher").ok()?;
    let f = l.field("fcs")?;
    if f.size != 24 || !f.type_name.starts_with("[]") {
        return None;
    }
    // The slice's length word, after its pointer: never at offset 0, which
    // the kernel reads as "not known".
    narrow(f.offset + 8).ok()
}

/// The catalog's read `name` of a probed function.
fn catalog_read<'a>(p: &'a Probe, name: &str) -> Result<&'a ArgRead, String> {
    p.args.iter().find(|a| a.name == name).ok_or_else(|| format!("the catalog has no `{name}` read for {}", p.symbol))
}

/// A watch-path site at `p`'s entry probe (see [`entry_site`]) with `cfg`.
fn entry_watch_site(
    insp: &Inspection,
    p: &Probe,
    role: Role,
    program: &'static str,
    mut cfg: WatchProbeConfig,
) -> Result<Site, String> {
    let at = entry_site(insp, &p.symbol, p.address, p.file_offset, p.size)?;
    cfg.guard = at.guard;
    // The probed instruction in the file's own layout: a caller check
    // (`caller_lo..caller_hi`) takes the load bias from it.
    cfg.site_addr = p.address + at.offset;
    Ok(Site {
        role: role.to_string(),
        symbol: p.symbol.clone(),
        program,
        file_offset: p.file_offset + at.offset,
        config: SiteConfig::Watch(cfg),
        window_callers: Vec::new(),
    })
}

/// An argument read with no pointer chase, as a kernel `ArgLoc`.
fn direct(a: &ArgRead) -> Result<ArgLoc, String> {
    if !a.derefs.is_empty() {
        return Err(format!("`{}` is expected to be a plain argument", a.name));
    }
    loc(&a.source)
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
