//! The Go runtime probe plan of one binary: map growth and GC assist (always),
//! map operations (`--go-maps=all`), and windows — the etcd client's
//! dispatchEvent, client-go's delta handler, and `--window NAME=SYMBOL` —
//! each timed from its entry (on the stack-check jump) to every RET the
//! inspector decoded. Functions whose RETs could not all be decoded are
//! refused: a missed return would leave a call open forever.

use agent_common::goruntime::{GoClass, GoProbeConfig, MAX_WINDOWS, SchedPoint};
use serde::Serialize;

use super::{
    uprobes::{Site, SiteConfig},
    watch::{binary_refusal, entry_site},
};
use crate::inspect::{
    Inspection,
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

/// A user-named window: `--window NAME=SYMBOL`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WindowSpec {
    pub name: String,
    pub symbol: String,
}

impl std::str::FromStr for WindowSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (name, symbol) = s.split_once('=').ok_or_else(|| format!("`{s}` is not NAME=SYMBOL"))?;
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(format!("window name `{name}` must be letters, digits and _"));
        }
        if symbol.is_empty() {
            return Err("the window's symbol is empty".into());
        }
        Ok(WindowSpec { name: name.into(), symbol: symbol.into() })
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
}

impl WindowTable {
    pub fn new(user: &[WindowSpec]) -> Result<Self, String> {
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
        Ok(Self { names, user: user.to_vec() })
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
            let r = timed(insp, &p.symbol, p.address, p.file_offset, p.size, &p.return_offsets, class, window);
            plan.push(role.name(), &p.symbol, p.file_offset, r);
        }
    }
    for w in &windows.user {
        let Some(id) = windows.id(&w.name) else { continue };
        match insp.resolve(&w.symbol) {
            Ok(f) => {
                let r = timed(insp, &f.name, f.address, f.file_offset, f.size, &f.return_offsets, GoClass::Window, id);
                plan.push(&format!("window {}", w.name), &w.symbol, f.file_offset, r);
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
            }),
        }
    }
    // Window goroutines' off-CPU and run-queue time: the scheduler points,
    // only where a window can open (each is hit per goroutine switch).
    if sched && plan.sites.iter().any(|s| matches!(s.config, SiteConfig::Go(c) if c.class == GoClass::Window as u32)) {
        for &(role, point) in SCHED_ROLES {
            for p in insp.probes_for(role) {
                let r = entry_only(insp, &p.symbol, p.address, p.file_offset, p.size, point);
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

    fn push(&mut self, what: &str, symbol: &str, function_offset: u64, r: Result<Vec<Site>, String>) {
        let mut st = GoSiteStatus {
            what: what.into(),
            symbol: symbol.into(),
            planned: false,
            reason: None,
            function_offset: Some(function_offset),
            entry_offset: None,
            guard: None,
            return_offsets: Vec::new(),
        };
        match r {
            Ok(sites) => {
                for s in &sites {
                    if let SiteConfig::Go(c) = s.config {
                        if c.is_ret == 0 {
                            st.entry_offset = Some(s.file_offset);
                            st.guard = Some(c.guard);
                        } else {
                            st.return_offsets.push(s.file_offset);
                        }
                    }
                }
                self.sites.extend(sites);
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
fn entry_only(
    insp: &Inspection,
    symbol: &str,
    address: u64,
    file_offset: u64,
    size: u64,
    point: SchedPoint,
) -> Result<Vec<Site>, String> {
    let at = entry_site(insp, symbol, address, file_offset, size)?;
    let cfg = GoProbeConfig { class: GoClass::Sched as u32, is_ret: 0, window: point as u32, guard: at.guard };
    Ok(vec![Site {
        role: format!("{point:?}"),
        symbol: symbol.to_string(),
        program: "go_sched",
        file_offset: file_offset + at.offset,
        config: SiteConfig::Go(cfg),
    }])
}

#[allow(clippy::too_many_arguments)]
fn timed(
    insp: &Inspection,
    symbol: &str,
    address: u64,
    file_offset: u64,
    size: u64,
    rets: &[u64],
    class: GoClass,
    window: u32,
) -> Result<Vec<Site>, String> {
    if rets.is_empty() {
        return Err(format!("{symbol}: no RET instruction decoded, so its calls cannot be timed"));
    }
    let at = entry_site(insp, symbol, address, file_offset, size)?;
    let cfg = GoProbeConfig { class: class as u32, is_ret: 0, window, guard: at.guard };
    let role = format!("{class:?}");
    let mut sites = vec![Site {
        role: role.clone(),
        symbol: symbol.to_string(),
        program: "go_entry",
        file_offset: file_offset + at.offset,
        config: SiteConfig::Go(cfg),
    }];
    for r in rets {
        sites.push(Site {
            role: role.clone(),
            symbol: symbol.to_string(),
            program: "go_ret",
            file_offset: *r,
            config: SiteConfig::Go(GoProbeConfig { is_ret: 1, guard: 0, ..cfg }),
        });
    }
    Ok(sites)
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
        let t = WindowTable::new(std::slice::from_ref(&w)).unwrap();
        assert_eq!(t.id("etcd_dispatch"), Some(0));
        assert_eq!(t.id("handler"), Some(BUILTIN_WINDOWS.len() as u32));
        assert!(WindowTable::new(&[w.clone(), w]).is_err());
    }
}
