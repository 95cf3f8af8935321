//! The Go runtime probe plan of one binary: map growth and GC assist (always),
//! map operations (`--go-maps=all`), and windows — the etcd client's
//! dispatchEvent, client-go's delta handler, and `--window NAME=SYMBOL` —
//! each timed from its entry (on the stack-check jump) to every RET the
//! inspector decoded. Functions whose RETs could not all be decoded are
//! refused: a missed return would leave a call open forever.
//!
//! A window ends more cheaply in its callers where the code allows it
//! (`WindowEnd::Auto`): a probed RET is single-stepped by the kernel (two
//! traps, ~4.7 µs here), a probe on the first branch after each call is
//! emulated (one trap). That needs every direct call site to have such a
//! branch. Where the callers are wrappers that return right after the call,
//! a window called in a loop ends where the loop's next iteration enters a
//! function the catalog names ([`Role::loop_next`]: client-go's delta
//! handler ends at the next queue pop); otherwise the window keeps its RET
//! probes.

use agent_common::goruntime::{
    GoClass, GoProbeConfig, MAX_WINDOWS, SchedPoint, WINDOW_END_CALLER, WINDOW_END_NEXT_ENTRY,
};
use serde::Serialize;

use super::{
    uprobes::{Site, SiteConfig},
    watch::{binary_refusal, entry_site},
};
use crate::inspect::{
    EndSite, Inspection, Probe,
    catalog::{Abi, Role},
};

/// Which map operations to time. Every map operation is a few tens of
/// nanoseconds and a probe hit costs far more, so by default only growth
/// (rare, and where the time goes) is probed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum GoMaps {
    /// Map growth and GC assist: where growths start (a classic map's
    /// hashGrow, a Swiss table's whole growth), once per growth.
    #[default]
    Growth,
    /// Also a classic map's incremental evacuations (Go <= 1.23), one probe
    /// hit per insert while a map grows; `record` turns it on.
    Evacuation,
    /// Also every map assign, access and delete (costly; bounded by --go-maps-window).
    All,
}

/// Where windows end.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum WindowEnd {
    /// In the callers, on the first branch after each direct call, where
    /// every call site has one, or where the loop around the calls enters
    /// its next call (client-go's delta handler: the next queue pop); calls
    /// through a function value or an interface are then not timed, and
    /// counted as dropped with reason `window_indirect_call`. On every RET
    /// otherwise.
    #[default]
    Auto,
    /// On every RET of the function (single-stepped: ~4.7 µs more per call).
    Ret,
    /// `cargo xtask bench gomap` only: as `auto` without the end sites, so a
    /// window closes at the next call of its function at the same depth
    /// (the entry's cost alone, to tell what an end costs).
    #[value(hide = true)]
    Entry,
}

/// A user-named window: `--window NAME=SYMBOL` (`NAME=SYMBOL@ret` to end it
/// on its RETs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WindowSpec {
    pub name: String,
    pub symbol: String,
    pub end: WindowEnd,
}

impl std::str::FromStr for WindowSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (name, symbol) = s.split_once('=').ok_or_else(|| format!("`{s}` is not NAME=SYMBOL"))?;
        let (symbol, end) = match symbol.rsplit_once('@') {
            Some((symbol, "ret")) => (symbol, WindowEnd::Ret),
            Some((_, other)) => return Err(format!("`@{other}`: the only window option is `@ret`")),
            None => (symbol, WindowEnd::Auto),
        };
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(format!("window name `{name}` must be letters, digits and _"));
        }
        if symbol.is_empty() {
            return Err("the window's symbol is empty".into());
        }
        Ok(WindowSpec { name: name.into(), symbol: symbol.into(), end })
    }
}

/// Built-in windows: (catalog role, window name).
pub const BUILTIN_WINDOWS: &[(Role, &str)] =
    &[(Role::EtcdClientDispatch, "etcd_dispatch"), (Role::ClientGoHandleDeltas, "informer_handle_deltas")];

/// Window names and their fixed ids (the kernel's histogram index).
#[derive(Clone, Debug)]
pub struct WindowTable {
    names: Vec<String>,
    user: Vec<WindowSpec>,
    /// `--window-end`: `Ret` ends every window on its RETs.
    end: WindowEnd,
}

impl WindowTable {
    pub fn new(user: &[WindowSpec], end: WindowEnd) -> Result<Self, String> {
        let mut names: Vec<String> = BUILTIN_WINDOWS.iter().map(|(_, n)| n.to_string()).collect();
        for w in user {
            if names.contains(&w.name) {
                return Err(format!("window `{}` is defined twice", w.name));
            }
            names.push(w.name.clone());
        }
        if names.len() as u32 > MAX_WINDOWS {
            return Err(format!("at most {} user windows", MAX_WINDOWS as usize - BUILTIN_WINDOWS.len()));
        }
        Ok(Self { names, user: user.to_vec(), end })
    }

    /// How a window ends: `Ret` where its spec says so, else `--window-end`.
    fn end_of(&self, name: &str) -> WindowEnd {
        match self.user.iter().find(|w| w.name == name) {
            Some(w) if w.end == WindowEnd::Ret => WindowEnd::Ret,
            _ => self.end,
        }
    }

    pub fn id(&self, name: &str) -> Option<u32> {
        self.names.iter().position(|n| n == name).map(|i| i as u32)
    }

    pub fn names(&self) -> &[String] {
        &self.names
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct GoSiteStatus {
    pub what: String,
    pub symbol: String,
    pub planned: bool,
    pub reason: Option<String>,
    /// File offset of the function and of its entry probe (on the stack
    /// check's jump), and the jump's guard (`watch::GUARD_*`), so another
    /// tracer can probe the very same instruction.
    pub function_offset: Option<u64>,
    pub entry_offset: Option<u64>,
    pub guard: Option<u32>,
    pub return_offsets: Vec<u64>,
    /// Windows: "ret" or "caller" (see `WindowEnd`), and why not "caller"
    /// when it could not be.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ends: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ends_on_ret_because: Option<String>,
    /// A "caller" window's end sites (file offsets in its callers).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub end_offsets: Vec<u64>,
}

#[derive(Clone, Debug, Default)]
pub struct GoPlan {
    pub sites: Vec<Site>,
    pub statuses: Vec<GoSiteStatus>,
    pub refusal: Option<String>,
}

/// Plans the Go runtime probes of one binary.
pub fn plan(insp: &Inspection, maps: GoMaps, windows: &WindowTable, sched: bool) -> GoPlan {
    let mut plan = GoPlan::default();
    if let Some(why) = binary_refusal(insp) {
        plan.refusal = Some(why);
        return plan;
    }
    if insp.abi != Some(Abi::Register) || insp.g_register.is_none() {
        // With the stack ABI (Go < 1.17 on amd64) g lives in thread-local
        // storage, not in a register the probe can read.
        plan.refusal = Some("Go runtime timing needs the register ABI (Go >= 1.17 on amd64, >= 1.18 on arm64)".into());
        return plan;
    }
    let mut roles: Vec<(Role, GoClass, u32)> =
        vec![(Role::GoMapGrow, GoClass::MapGrow, 0), (Role::GoGcAssist, GoClass::GcAssist, 0)];
    if maps >= GoMaps::Evacuation {
        roles.push((Role::GoMapEvacuate, GoClass::MapGrow, 0));
    }
    if maps == GoMaps::All {
        roles.extend([
            (Role::GoMapAssign, GoClass::MapAssign, 0),
            (Role::GoMapAccess, GoClass::MapAccess, 0),
            (Role::GoMapDelete, GoClass::MapDelete, 0),
        ]);
    }
    // An etcd server links clientv3 for its in-process JSON gateway, so it
    // has the client's dispatch function too. That window would only time
    // the gateway, and it would bring the scheduler probes (below) onto
    // every goroutine switch of the server: +90 µs of etcd CPU per put in
    // `cargo xtask bench etcd`. Clients keep it.
    let server = insp.probes_for(Role::EtcdServerNotify).next().is_some();
    let mut loop_next: Vec<&Probe> = Vec::new();
    for &(role, name) in BUILTIN_WINDOWS {
        if server && role == Role::EtcdClientDispatch {
            continue;
        }
        if let Some(id) = windows.id(name) {
            roles.push((role, GoClass::Window, id));
        }
    }
    for (role, class, window) in roles {
        for p in insp.probes_for(role) {
            let f = Fn::of(p);
            let r = if class == GoClass::Window {
                let end = windows.names.get(window as usize).map_or(WindowEnd::Ret, |n| windows.end_of(n));
                loop_next.clear();
                loop_next.extend(role.loop_next().into_iter().flat_map(|r| insp.probes_for(r)));
                timed_window(insp, &f, &p.return_offsets, window, end, &loop_next)
            } else {
                timed(insp, &f, &p.return_offsets, class, window).map(Planned::ret)
            };
            plan.push(role.name(), &p.symbol, p.file_offset, r);
        }
    }
    for w in &windows.user {
        let Some(id) = windows.id(&w.name) else { continue };
        match insp.resolve(&w.symbol) {
            Ok(rf) => {
                let f = Fn { symbol: &rf.name, address: rf.address, file_offset: rf.file_offset, size: rf.size };
                let r = timed_window(insp, &f, &rf.return_offsets, id, windows.end_of(&w.name), &[]);
                plan.push(&format!("window {}", w.name), &w.symbol, rf.file_offset, r);
            }
            // A user window names one program's function; other binaries
            // simply do not have it.
            Err(e) => plan.statuses.push(GoSiteStatus {
                what: format!("window {}", w.name),
                symbol: w.symbol.clone(),
                planned: false,
                reason: Some(e.to_string()),
                function_offset: None,
                entry_offset: None,
                guard: None,
                return_offsets: Vec::new(),
                ends: None,
                ends_on_ret_because: None,
                end_offsets: Vec::new(),
            }),
        }
    }
    // Window goroutines' off-CPU and run-queue time: the scheduler points,
    // only where a window can open (each is hit per goroutine switch).
    if sched && plan.sites.iter().any(|s| matches!(s.config, SiteConfig::Go(c) if c.class == GoClass::Window as u32)) {
        for &(role, point) in SCHED_ROLES {
            for p in insp.probes_for(role) {
                let f = Fn::of(p);
                let r = entry_only(insp, &f, point);
                plan.push(role.name(), &p.symbol, p.file_offset, r);
            }
        }
    }
    plan
}

impl GoPlan {
    /// Whether the plan has scheduler points (which need the kernel's
    /// sched_switch/sched_wakeup programs too).
    pub fn has_sched(&self) -> bool {
        self.refusal.is_none()
            && self.sites.iter().any(|s| matches!(s.config, SiteConfig::Go(c) if c.class == GoClass::Sched as u32))
    }

    fn push(&mut self, what: &str, symbol: &str, function_offset: u64, r: Result<Planned, String>) {
        let mut st = GoSiteStatus {
            what: what.into(),
            symbol: symbol.into(),
            planned: false,
            reason: None,
            function_offset: Some(function_offset),
            entry_offset: None,
            guard: None,
            return_offsets: Vec::new(),
            ends: None,
            ends_on_ret_because: None,
            end_offsets: Vec::new(),
        };
        match r {
            Ok(Planned { sites, ends, why_ret }) => {
                for s in &sites {
                    if let SiteConfig::Go(c) = s.config {
                        if c.class == GoClass::Window as u32 {
                            st.ends = Some(ends);
                        }
                        if c.is_ret == 0 {
                            st.entry_offset = Some(s.file_offset);
                            st.guard = Some(c.guard);
                        } else if c.end == WINDOW_END_CALLER {
                            st.end_offsets.push(s.file_offset);
                        } else {
                            st.return_offsets.push(s.file_offset);
                        }
                    }
                }
                st.ends_on_ret_because = why_ret;
                // Two windows ending at one loop's next call share its end
                // sites (client-go's handleDeltas and handleBatchDeltas at
                // each pop): one probe each is enough.
                for s in sites {
                    let same = |o: &Site| {
                        o.program == s.program
                            && o.file_offset == s.file_offset
                            && matches!((o.config, s.config), (SiteConfig::Go(a), SiteConfig::Go(b)) if a == b)
                    };
                    if !self.sites.iter().any(same) {
                        self.sites.push(s);
                    }
                }
                st.planned = true;
            }
            Err(e) => st.reason = Some(e),
        }
        self.statuses.push(st);
    }
}

/// The Go scheduler's points a window's goroutine passes (see
/// `agent-ebpf/src/goruntime.rs`, `go_sched`).
const SCHED_ROLES: &[(Role, SchedPoint)] = &[
    (Role::GoSchedExecute, SchedPoint::Execute),
    (Role::GoSchedPark, SchedPoint::Park),
    (Role::GoSchedReady, SchedPoint::Ready),
    (Role::GoSchedYield, SchedPoint::Yield),
];

/// An entry probe alone (scheduler points are events, not spans).
fn entry_only(insp: &Inspection, f: &Fn<'_>, point: SchedPoint) -> Result<Planned, String> {
    let (cfg, at) = f.entry(insp, GoClass::Sched, point as u32)?;
    Ok(Planned::ret(vec![go_site(format!("{point:?}"), f.symbol, "go_sched", at, cfg)]))
}

/// A function to time.
struct Fn<'a> {
    symbol: &'a str,
    address: u64,
    file_offset: u64,
    size: u64,
}

impl<'a> Fn<'a> {
    fn of(p: &'a Probe) -> Self {
        Fn { symbol: &p.symbol, address: p.address, file_offset: p.file_offset, size: p.size }
    }

    /// The entry probe's configuration (on the stack-check jump, see
    /// `entry_site`) and its file offset.
    fn entry(&self, insp: &Inspection, class: GoClass, window: u32) -> Result<(GoProbeConfig, u64), String> {
        let at = entry_site(insp, self.symbol, self.address, self.file_offset, self.size)?;
        let cfg = GoProbeConfig {
            class: class as u32,
            window,
            guard: at.guard,
            site_addr: self.address + at.offset,
            ..GoProbeConfig::default()
        };
        Ok((cfg, self.file_offset + at.offset))
    }
}

/// A Go runtime probe site.
fn go_site(role: String, symbol: &str, program: &'static str, file_offset: u64, config: GoProbeConfig) -> Site {
    Site {
        role,
        symbol: symbol.to_string(),
        program,
        file_offset,
        config: SiteConfig::Go(config),
        window_callers: Vec::new(),
    }
}

/// Planned sites, and for a window: where it ends (`/debug/probes`
/// `ends`), and when that is its RETs although it was free to end
/// elsewhere, why.
struct Planned {
    sites: Vec<Site>,
    ends: &'static str,
    why_ret: Option<String>,
}

impl Planned {
    fn ret(sites: Vec<Site>) -> Self {
        Planned { sites, ends: ENDS_RET, why_ret: None }
    }
}

/// `/debug/probes` `ends` of a window: on its RETs, in its callers (the
/// first branch after each call), or at the entry of the function its
/// loop calls next ([`Role::loop_next`]).
const ENDS_RET: &str = "ret";
const ENDS_CALLER: &str = "caller";
const ENDS_LOOP: &str = "loop";

/// Entry and RET sites of a timed call.
fn timed(insp: &Inspection, f: &Fn<'_>, rets: &[u64], class: GoClass, window: u32) -> Result<Vec<Site>, String> {
    if rets.is_empty() {
        return Err(format!("{}: no RET instruction decoded, so its calls cannot be timed", f.symbol));
    }
    let (cfg, at) = f.entry(insp, class, window)?;
    // A window's entry checks the goroutine id (see GoProbeConfig::goid_off).
    let cfg =
        if class == GoClass::Window { GoProbeConfig { goid_off: goid_offset(insp).unwrap_or(0), ..cfg } } else { cfg };
    let role = format!("{class:?}");
    let mut sites = vec![go_site(role.clone(), f.symbol, "go_entry", at, cfg)];
    for &r in rets {
        let ret = GoProbeConfig { is_ret: 1, guard: 0, site_addr: 0, goid_off: 0, ..cfg };
        sites.push(go_site(role.clone(), f.symbol, "go_ret", r, ret));
    }
    Ok(sites)
}

/// Where this binary's `runtime.g` keeps the goroutine id, when known.
fn goid_offset(insp: &Inspection) -> Option<u32> {
    insp.goid.and_then(|g| u32::try_from(g.offset).ok())
}

/// Most call sites a window ends at in its callers: each is a probe, and an
/// entry in `WS_GO_WINDOW_CALLERS` (1,024 for the node). A function called
/// from more places (a user window on a utility) keeps its RET probes.
const MAX_CALLER_SITES: usize = 32;

/// A window's sites: ending in its callers where every direct call has an
/// emulated branch after it, else at the entries of `loop_next` (the
/// functions the loop around the calls enters next, see
/// [`Role::loop_next`]), else (or where `end` says so) on its RETs.
fn timed_window(
    insp: &Inspection,
    f: &Fn<'_>,
    rets: &[u64],
    window: u32,
    end: WindowEnd,
    loop_next: &[&Probe],
) -> Result<Planned, String> {
    let on_rets = |why: String| {
        timed(insp, f, rets, GoClass::Window, window).map(|sites| Planned { why_ret: Some(why), ..Planned::ret(sites) })
    };
    if end == WindowEnd::Ret {
        return timed(insp, f, rets, GoClass::Window, window).map(Planned::ret);
    }
    let calls = match insp.direct_calls(f.address, MAX_CALLER_SITES) {
        Ok(c) if c.is_empty() => return on_rets("no direct call of it in the binary".into()),
        Ok(c) => c,
        Err(why) => return on_rets(why),
    };
    // (symbol, end site) of every end.
    let (ends, end_sites, goid_off): (&'static str, Vec<(&str, EndSite)>, u32) = match calls
        .iter()
        .find_map(|c| c.end.as_ref().err())
    {
        None => {
            (ENDS_CALLER, calls.iter().filter_map(|c| Some((c.caller.as_str(), *c.end.as_ref().ok()?))).collect(), 0)
        }
        Some(why) if loop_next.is_empty() => return on_rets(why.clone()),
        Some(why) => {
            // A loop's goroutine may end inside a window (its context
            // cancelled mid-call), and the runtime gives its `g` to a
            // later goroutine, which may run the same loop: its next
            // call must not close the old window. The goroutine id
            // tells them apart.
            let Some(goid) = goid_offset(insp) else {
                return on_rets(format!(
                    "{why}, and the goroutine id's offset in runtime.g is not known for this Go version (an end \
                         at the loop's next call needs it)"
                ));
            };
            let mut sites = Vec::new();
            for p in loop_next {
                match entry_site(insp, &p.symbol, p.address, p.file_offset, p.size) {
                    Ok(at) => sites.push((
                        p.symbol.as_str(),
                        EndSite {
                            address: p.address.saturating_add(at.offset),
                            file_offset: p.file_offset.saturating_add(at.offset),
                        },
                    )),
                    Err(e) => return on_rets(format!("{why}, and the loop's next call has no entry site: {e}")),
                }
            }
            (ENDS_LOOP, sites, goid)
        }
    };
    let (entry, at) = f.entry(insp, GoClass::Window, window)?;
    // The entry checks the goroutine id wherever its offset is known; a
    // caller's end site is reached only after an entry on the goroutine,
    // so only a loop's end checks it too.
    let entry_goid = goid_offset(insp).unwrap_or(0);
    let end_code = if end == WindowEnd::Entry { WINDOW_END_NEXT_ENTRY } else { WINDOW_END_CALLER };
    let cfg = GoProbeConfig { end: end_code, goid_off: entry_goid, ..entry };
    let role = format!("{:?}", GoClass::Window);
    let mut first = go_site(role.clone(), f.symbol, "go_entry", at, cfg);
    first.window_callers = calls.iter().map(|c| c.return_address).collect();
    let mut sites = vec![first];
    if end != WindowEnd::Entry {
        for (symbol, e) in end_sites {
            let cfg = GoProbeConfig { is_ret: 1, guard: 0, site_addr: e.address, goid_off, ..cfg };
            sites.push(go_site(role.clone(), symbol, "go_ret", e.file_offset, cfg));
        }
    }
    Ok(Planned { sites, ends, why_ret: None })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_specs_and_table() {
        let w: WindowSpec = "handler=main.(*cache).apply".parse().unwrap();
        assert_eq!(w.symbol, "main.(*cache).apply");
        assert!("nope".parse::<WindowSpec>().is_err());
        assert!("bad name=x".parse::<WindowSpec>().is_err());
        assert_eq!(w.end, WindowEnd::Auto);
        let r: WindowSpec = "h2=main.(*cache).apply@ret".parse().unwrap();
        assert_eq!((r.symbol.as_str(), r.end), ("main.(*cache).apply", WindowEnd::Ret));
        assert!("h3=main.f@park".parse::<WindowSpec>().is_err());
        let t = WindowTable::new(&[w.clone(), r.clone()], WindowEnd::Auto).unwrap();
        assert_eq!(t.id("etcd_dispatch"), Some(0));
        assert_eq!(t.id("handler"), Some(BUILTIN_WINDOWS.len() as u32));
        assert_eq!(
            (t.end_of("handler"), t.end_of("h2"), t.end_of("etcd_dispatch")),
            (WindowEnd::Auto, WindowEnd::Ret, WindowEnd::Auto)
        );
        let all_ret = WindowTable::new(std::slice::from_ref(&w), WindowEnd::Ret).unwrap();
        assert_eq!(all_ret.end_of("handler"), WindowEnd::Ret);
        assert!(WindowTable::new(&[w.clone(), w], WindowEnd::Auto).is_err());
    }
}
