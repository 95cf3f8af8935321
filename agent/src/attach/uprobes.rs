//! Uprobe attachments, one set per executable file: a uprobe lives on the
//! file's inode, so one attachment serves every process running that binary
//! (50 pods of one image: one attachment). Per-process filtering happens in
//! the kernel (the `WS_PROC_SLOT` lookup every program does first). When the
//! last process of a binary exits, its probes are detached.
//!
//! Three ways to make uprobes (`--uprobe-attach`):
//! - uprobe_multi links ([`super::multi`], Linux 6.6+): one link per binary
//!   and program for all its sites, released with one RCU wait; no
//!   CAP_SYS_ADMIN needed;
//! - the uprobe PMU through aya: one perf link per site;
//! - a tracefs uprobe event per site ([`super::probe_events`]), which works
//!   without CAP_SYS_ADMIN on the kernels that require it for the PMU.
//!
//! `auto` uses uprobe_multi where the kernel loads programs for it, else the
//! PMU, and moves to tracefs for good on the PMU's first refusal.

use std::{
    collections::{BTreeSet, HashMap},
    os::fd::AsFd as _,
    path::Path,
};

use agent_common::{
    goruntime::{GoProbeConfig, WindowCaller},
    watch::WatchProbeConfig,
};
use aya::{
    Ebpf,
    maps::{Array, HashMap as BpfHashMap, MapData},
    programs::{
        UProbe,
        uprobe::{UProbeAttachLocation, UProbeAttachPoint, UProbeLink, UProbeLinkId, UProbeScope},
    },
};
use thiserror::Error;

use super::{
    multi::{MultiError, MultiLink, MultiPrograms},
    probe_events::{ProbeEvent, ProbeEventError, ProbeEvents},
};
use crate::{
    discover::procfs::FileIdent,
    host::{HostRoot, tracefs::Tracefs},
};

/// Cookies index the per-attach config arrays; their sizes in the kernel object.
pub const MAX_WATCH_COOKIES: u32 = 256;
pub const MAX_GO_COOKIES: u32 = 1024;

#[derive(Debug, Error)]
pub enum UprobeError {
    #[error("program `{0}` is missing from the eBPF object")]
    MissingProgram(&'static str),
    #[error("its probes need `{program}`, which is not loaded: {why}")]
    Unavailable { program: &'static str, why: String },
    #[error(
        "no free probe configuration slot (at most {MAX_WATCH_COOKIES} watch-path and {MAX_GO_COOKIES} Go runtime probe sites at once)"
    )]
    NoCookie,
    #[error("writing the probe configuration: {0}")]
    Config(#[source] aya::maps::MapError),
    #[error("attaching `{program}` at file offset {offset:#x} of {path}: {source}")]
    Attach {
        program: &'static str,
        offset: u64,
        path: String,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    #[error("attaching `{program}` at file offset {offset:#x} of {path} through tracefs: {source}")]
    Event {
        program: &'static str,
        offset: u64,
        path: String,
        #[source]
        source: Box<ProbeEventError>,
    },
    #[error("uprobes through tracefs: {0}")]
    NoTracefs(#[source] crate::host::tracefs::TracefsError),
    #[error(transparent)]
    Multi(#[from] MultiError),
    #[error("loading uprobe program `{program}`: {source}")]
    Load {
        program: &'static str,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
}

/// How uprobes are made (`--uprobe-attach`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum UprobeMode {
    /// uprobe_multi links where the kernel has them (6.6+); else the uprobe
    /// PMU, and tracefs from its first permission refusal on.
    #[default]
    Auto,
    /// uprobe_multi links only: one per binary and program (Linux 6.6+).
    #[value(name = "uprobe-multi")]
    Multi,
    /// The uprobe PMU only (perf_event_open; CAP_SYS_ADMIN on Linux 6.16+).
    Perf,
    /// tracefs uprobe events only (tracefs must be writable).
    Tracefs,
}

impl UprobeMode {
    /// The mechanism's name, as `/debug/probes` reports it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Multi => "uprobe-multi",
            Self::Perf => "perf",
            Self::Tracefs => "tracefs",
        }
    }
}

/// Placed probes: a PMU link owned by its aya program, a tracefs event we
/// own (one site each), or a uprobe_multi link (many sites).
enum Link {
    Pmu(&'static str, UProbeLinkId),
    Event(ProbeEvent),
    Multi(MultiLink),
}

impl Link {
    fn sites(&self) -> usize {
        match self {
            Link::Pmu(..) | Link::Event(_) => 1,
            Link::Multi(l) => l.sites(),
        }
    }
}

/// A probe taken out of its owner: dropping it detaches.
#[expect(dead_code, reason = "held only to be dropped, which detaches")]
enum Detached {
    Pmu(UProbeLink),
    Event(ProbeEvent),
    Multi(MultiLink),
}

/// One probe to place: which program, where in the file, what it reads.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Site {
    /// The role it serves (e.g. "etcd.server.notify"), for reports.
    pub role: String,
    pub symbol: String,
    pub program: &'static str,
    pub file_offset: u64,
    #[serde(skip)]
    pub config: SiteConfig,
    /// A `WINDOW_END_CALLER` window's entry: the link-time return
    /// addresses of its direct calls (`WS_GO_WINDOW_CALLERS`, keyed by
    /// this site's cookie).
    #[serde(skip)]
    pub window_callers: Vec<u64>,
}

/// What the kernel program at a site reads: its config array entry.
#[derive(Clone, Copy, Debug)]
pub enum SiteConfig {
    Watch(WatchProbeConfig),
    Go(GoProbeConfig),
}

struct Attached {
    links: Vec<Link>,
    cookies: Vec<Cookie>,
    /// Entries written to `WS_GO_WINDOW_CALLERS` for these sites.
    callers: Vec<WindowCaller>,
    /// Per-operation map probes (`--go-maps=all`): detached by themselves
    /// once `--go-maps-window` has passed since they were attached, with
    /// their cookies.
    temporary: Vec<(Link, Vec<Cookie>)>,
    attached_at: std::time::Instant,
    users: BTreeSet<u32>,
    /// Since when no process runs the file (probes are kept a while: a
    /// restarted program is picked up at once, with nothing to re-attach).
    idle_since: Option<std::time::Instant>,
}

/// How long probes stay on a file nobody runs.
pub const IDLE_GRACE: std::time::Duration = std::time::Duration::from_secs(30);

#[derive(Clone, Copy)]
enum Cookie {
    Watch(u32),
    Go(u32),
}

/// All uprobe attachments of the agent.
pub struct Uprobes {
    watch_config: Array<MapData, WatchProbeConfig>,
    go_config: Array<MapData, GoProbeConfig>,
    window_callers: BpfHashMap<MapData, WindowCaller, u32>,
    free_watch: Vec<u32>,
    free_go: Vec<u32>,
    by_file: HashMap<FileIdent, Attached>,
    mode: UprobeMode,
    root: HostRoot,
    /// Made on first use of tracefs (stale events are deleted then).
    events: Option<ProbeEvents>,
    /// The uprobe programs loaded for multi links (`Multi` mode only).
    multi: Option<MultiPrograms>,
    /// Programs not loaded: a binary needing one is refused.
    unavailable: super::Unavailable,
}

impl Uprobes {
    pub fn new(
        watch_config: Array<MapData, WatchProbeConfig>,
        go_config: Array<MapData, GoProbeConfig>,
        window_callers: BpfHashMap<MapData, WindowCaller, u32>,
        mode: UprobeMode,
        root: HostRoot,
        multi: Option<MultiPrograms>,
        unavailable: super::Unavailable,
    ) -> Self {
        // Multi links need the programs loaded for them: with them, that is
        // the mode; without them, `auto` starts with the PMU.
        let mode = match (&multi, mode) {
            (Some(_), _) => UprobeMode::Multi,
            (None, UprobeMode::Multi) => UprobeMode::Auto,
            (None, mode) => mode,
        };
        Self {
            watch_config,
            go_config,
            window_callers,
            free_watch: (0..MAX_WATCH_COOKIES).rev().collect(),
            free_go: (0..MAX_GO_COOKIES).rev().collect(),
            by_file: HashMap::new(),
            mode,
            root,
            events: None,
            multi,
            unavailable,
        }
    }

    /// How uprobes are made now (in `auto` mode, tracefs from the PMU's
    /// first refusal on).
    pub fn mechanism(&self) -> &'static str {
        match self.mode {
            UprobeMode::Auto => UprobeMode::Perf.name(),
            mode => mode.name(),
        }
    }

    /// The programs loaded for multi links, if that is the mode.
    pub fn multi_programs(&self) -> Option<&MultiPrograms> {
        self.multi.as_ref()
    }

    /// Whether `file` already has its probes.
    pub fn is_attached(&self, file: &FileIdent) -> bool {
        self.by_file.contains_key(file)
    }

    /// Attaches every site to the file reached through `open_path`. All or
    /// nothing: if one site fails, the ones already placed are removed.
    pub fn attach(
        &mut self,
        ebpf: &mut Ebpf,
        file: FileIdent,
        open_path: &Path,
        sites: &[Site],
    ) -> Result<(), UprobeError> {
        if self.by_file.contains_key(&file) {
            return Ok(());
        }
        if let Some((program, why)) =
            sites.iter().find_map(|s| self.unavailable.get_key_value(s.program).map(|(p, w)| (*p, w.clone())))
        {
            return Err(UprobeError::Unavailable { program, why });
        }
        let mut done = Attached {
            links: Vec::new(),
            cookies: Vec::new(),
            callers: Vec::new(),
            temporary: Vec::new(),
            attached_at: std::time::Instant::now(),
            users: BTreeSet::new(),
            idle_since: None,
        };
        let placed = if self.multi.is_some() {
            self.attach_multi(open_path, sites, &mut done)
        } else {
            sites.iter().try_for_each(|site| self.attach_site(ebpf, open_path, site, &mut done))
        };
        if let Err(e) = placed {
            self.release(ebpf, done);
            return Err(e);
        }
        self.by_file.insert(file, done);
        Ok(())
    }

    /// Places `sites` with one multi link per program (and one more per
    /// program for the per-operation map probes, which detach on their own).
    fn attach_multi(&mut self, open_path: &Path, sites: &[Site], done: &mut Attached) -> Result<(), UprobeError> {
        let mut groups: Vec<((&'static str, bool), Vec<&Site>)> = Vec::new();
        for site in sites {
            let key = (site.program, site.is_map_operation());
            match groups.iter_mut().find(|(k, _)| *k == key) {
                Some((_, members)) => members.push(site),
                None => groups.push((key, vec![site])),
            }
        }
        for ((program, temporary), members) in groups {
            let mut cookies = Vec::with_capacity(members.len());
            let mut offsets = Vec::with_capacity(members.len());
            for site in &members {
                let cookie = match self.take_cookie(site, &mut done.callers) {
                    Ok(c) => c,
                    Err(e) => {
                        done.cookies.extend(cookies);
                        return Err(e);
                    }
                };
                cookies.push(cookie);
                offsets.push(site.file_offset);
            }
            let ids: Vec<u64> = cookies.iter().map(|c| u64::from(c.id())).collect();
            let prog = self.multi.as_ref().and_then(|m| m.fd(program)).ok_or(UprobeError::MissingProgram(program));
            let link = prog.and_then(|prog| Ok(MultiLink::attach(program, prog, open_path, &offsets, &ids)?));
            match link {
                Ok(link) if temporary => done.temporary.push((Link::Multi(link), cookies)),
                Ok(link) => {
                    done.links.push(Link::Multi(link));
                    done.cookies.extend(cookies);
                }
                Err(e) => {
                    done.cookies.extend(cookies);
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// Takes a free cookie for a site and writes its configuration there
    /// (and its window callers, noted in `callers`).
    fn take_cookie(&mut self, site: &Site, callers: &mut Vec<WindowCaller>) -> Result<Cookie, UprobeError> {
        let config = site.config;
        let cookie = match config {
            SiteConfig::Watch(_) => Cookie::Watch(self.free_watch.pop().ok_or(UprobeError::NoCookie)?),
            SiteConfig::Go(_) => Cookie::Go(self.free_go.pop().ok_or(UprobeError::NoCookie)?),
        };
        let written = match (config, cookie) {
            (SiteConfig::Watch(cfg), Cookie::Watch(c)) => self.watch_config.set(c, cfg, 0),
            (SiteConfig::Go(cfg), Cookie::Go(c)) => self.go_config.set(c, cfg, 0),
            _ => Ok(()),
        };
        if let Err(e) = written {
            self.release_cookies(vec![cookie]);
            return Err(UprobeError::Config(e));
        }
        for &return_address in &site.window_callers {
            let key = WindowCaller { entry: cookie.id(), _pad: 0, return_address };
            if let Err(e) = self.window_callers.insert(key, 0, 0) {
                self.release_cookies(vec![cookie]);
                return Err(UprobeError::Config(e));
            }
            callers.push(key);
        }
        Ok(cookie)
    }

    /// Removes window callers written for sites that are gone (before their
    /// cookies can be reused).
    fn forget_callers(&mut self, callers: Vec<WindowCaller>) {
        for key in callers {
            if let Err(e) = self.window_callers.remove(&key) {
                tracing::warn!("removing a window caller: {e}");
            }
        }
    }

    fn attach_site(
        &mut self,
        ebpf: &mut Ebpf,
        open_path: &Path,
        site: &Site,
        done: &mut Attached,
    ) -> Result<(), UprobeError> {
        let cookie = self.take_cookie(site, &mut done.callers)?;
        // Held at once, so an error below still gives it back.
        done.cookies.push(cookie);
        let link = self.place(ebpf, open_path, site, cookie)?;
        if site.is_map_operation() {
            // Its cookie moves with the link: both go when the window ends.
            done.cookies.pop();
            done.temporary.push((link, vec![cookie]));
        } else {
            done.links.push(link);
        }
        Ok(())
    }

    /// Makes one uprobe, the way `mode` says.
    fn place(&mut self, ebpf: &mut Ebpf, open_path: &Path, site: &Site, cookie: Cookie) -> Result<Link, UprobeError> {
        if self.mode != UprobeMode::Tracefs {
            let prog = loaded(ebpf, site.program)?;
            let point = UProbeAttachPoint {
                location: UProbeAttachLocation::AbsoluteOffset(site.file_offset),
                cookie: Some(u64::from(cookie.id())),
            };
            match prog.attach(point, open_path, UProbeScope::AllProcesses) {
                Ok(id) => return Ok(Link::Pmu(site.program, id)),
                Err(e) if self.mode == UprobeMode::Auto && permission_denied(&e) => {
                    tracing::info!(
                        "the uprobe PMU refused ({e}: CAP_SYS_ADMIN is required for it on Linux 6.16+); \
                         making uprobes through tracefs uprobe_events from now on"
                    );
                    self.mode = UprobeMode::Tracefs;
                }
                Err(e) => {
                    return Err(UprobeError::Attach {
                        program: site.program,
                        offset: site.file_offset,
                        path: open_path.display().to_string(),
                        source: Box::new(e),
                    });
                }
            }
        }
        let events = match &mut self.events {
            Some(events) => events,
            None => {
                let events = ProbeEvents::new(Tracefs::find(&self.root).map_err(UprobeError::NoTracefs)?);
                let stale = events.remove_stale(&self.root);
                if stale > 0 {
                    tracing::info!("deleted {stale} uprobe events left by agents no longer running");
                }
                self.events.insert(events)
            }
        };
        let path = || open_path.display().to_string();
        let (program_name, offset) = (site.program, site.file_offset);
        let fd = loaded(ebpf, site.program)?.fd().map_err(|e| UprobeError::Attach {
            program: program_name,
            offset,
            path: path(),
            source: Box::new(e),
        })?;
        let event = events
            .attach(fd.as_fd(), open_path, offset, u64::from(cookie.id()))
            .map_err(|e| UprobeError::Event { program: program_name, offset, path: path(), source: Box::new(e) })?;
        Ok(Link::Event(event))
    }

    /// Detaches the per-operation map probes of every file attached for
    /// `window` or longer. Returns the number of probes detached.
    pub fn expire_map_operations(&mut self, ebpf: &mut Ebpf, window: std::time::Duration) -> usize {
        let now = std::time::Instant::now();
        let mut ids = Vec::new();
        let mut cookies = Vec::new();
        for a in self.by_file.values_mut() {
            if a.temporary.is_empty() || now.duration_since(a.attached_at) < window {
                continue;
            }
            for (link, cookie) in a.temporary.drain(..) {
                ids.push(link);
                cookies.extend(cookie);
            }
        }
        let n = ids.iter().map(Link::sites).sum();
        self.release_cookies(cookies);
        drop(drop_in_background(take_links(ebpf, ids)));
        n
    }

    /// Records that process `tgid` runs `file` (which must be attached).
    pub fn add_user(&mut self, file: &FileIdent, tgid: u32) {
        if let Some(a) = self.by_file.get_mut(file) {
            a.users.insert(tgid);
            a.idle_since = None;
        }
    }

    /// Forgets process `tgid`. A file whose last process exited keeps its
    /// probes for `IDLE_GRACE` (see `detach_idle`). Returns how many files
    /// became idle.
    pub fn remove_user(&mut self, tgid: u32) -> usize {
        let mut n = 0;
        for a in self.by_file.values_mut() {
            if a.users.remove(&tgid) && a.users.is_empty() {
                a.idle_since = Some(std::time::Instant::now());
                n += 1;
            }
        }
        n
    }

    /// Detaches the probes of files nobody has run for `IDLE_GRACE`.
    /// Unregistering a uprobe waits for RCU grace periods (tens of ms each
    /// here), so the links are dropped on threads of their own: the event
    /// loop keeps picking up new processes meanwhile. Returns the number of
    /// probes detached.
    pub fn detach_idle(&mut self, ebpf: &mut Ebpf) -> usize {
        let now = std::time::Instant::now();
        let (n, links) = self.take(ebpf, |a| a.idle_since.is_some_and(|t| now.duration_since(t) >= IDLE_GRACE));
        drop(drop_in_background(links));
        n
    }

    /// Starts detaching every probe (shutdown): returns their number and the
    /// threads releasing them, to join once the rest is released too (all
    /// releases then share their grace periods).
    pub fn detach_all(&mut self, ebpf: &mut Ebpf) -> (usize, Vec<std::thread::JoinHandle<()>>) {
        let (n, links) = self.take(ebpf, |_| true);
        (n, drop_in_background(links))
    }

    /// Takes the links of the files `which` selects out of their owners.
    fn take(&mut self, ebpf: &mut Ebpf, which: impl Fn(&Attached) -> bool) -> (usize, Vec<Detached>) {
        let files: Vec<FileIdent> = self.by_file.iter().filter(|(_, a)| which(a)).map(|(f, _)| *f).collect();
        let mut ids = Vec::new();
        for file in files {
            if let Some(mut a) = self.by_file.remove(&file) {
                self.forget_callers(std::mem::take(&mut a.callers));
                let (links, cookies) = a.into_parts();
                ids.extend(links);
                self.release_cookies(cookies);
            }
        }
        let n = ids.iter().map(Link::sites).sum();
        (n, take_links(ebpf, ids))
    }

    fn release(&mut self, ebpf: &mut Ebpf, mut a: Attached) {
        self.forget_callers(std::mem::take(&mut a.callers));
        let (links, cookies) = a.into_parts();
        drop(take_links(ebpf, links));
        self.release_cookies(cookies);
    }

    fn release_cookies(&mut self, cookies: Vec<Cookie>) {
        for c in cookies {
            match c {
                Cookie::Watch(c) => self.free_watch.push(c),
                Cookie::Go(c) => self.free_go.push(c),
            }
        }
    }

    /// Number of uprobes (sites) attached now.
    pub fn count(&self) -> usize {
        self.by_file
            .values()
            .flat_map(|a| a.links.iter().chain(a.temporary.iter().map(|(l, _)| l)))
            .map(Link::sites)
            .sum()
    }

    /// Number of links (or tracefs events) holding them.
    pub fn links(&self) -> usize {
        self.by_file.values().map(|a| a.links.len() + a.temporary.len()).sum()
    }
}

impl Attached {
    /// Every link (temporary ones included) and every cookie it holds.
    fn into_parts(self) -> (Vec<Link>, Vec<Cookie>) {
        let (mut links, mut cookies) = (self.links, self.cookies);
        for (link, cookie) in self.temporary {
            links.push(link);
            cookies.extend(cookie);
        }
        (links, cookies)
    }
}

impl Cookie {
    fn id(self) -> u32 {
        match self {
            Cookie::Watch(c) | Cookie::Go(c) => c,
        }
    }
}

/// Takes links out of their programs, so that dropping them detaches (see
/// `drop_in_background`).
fn take_links(ebpf: &mut Ebpf, ids: Vec<Link>) -> Vec<Detached> {
    let mut links = Vec::new();
    for link in ids {
        match link {
            Link::Pmu(name, id) => {
                match program(ebpf, name).and_then(|p| p.take_link(id).map_err(|_| UprobeError::MissingProgram(name))) {
                    Ok(link) => links.push(Detached::Pmu(link)),
                    Err(e) => tracing::warn!("detaching {name}: {e}"),
                }
            }
            Link::Event(event) => links.push(Detached::Event(event)),
            Link::Multi(link) => links.push(Detached::Multi(link)),
        }
    }
    links
}

/// Whether a PMU attach failed for want of privilege (EACCES or EPERM
/// anywhere in its causes).
pub fn permission_denied(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>()
            && matches!(io.raw_os_error(), Some(libc::EACCES) | Some(libc::EPERM))
        {
            return true;
        }
        source = s.source();
    }
    false
}

/// Drops uprobe links off the caller's thread; returns the threads. Each
/// release waits for a grace period; concurrent waiters share
/// one, so the links are dropped from several threads at once (multi links
/// do overlap; the kernel serialises perf-link releases on a lock, about
/// 100 ms each here, which is why multi links are the default).
fn drop_in_background<T: Send + 'static>(mut links: Vec<T>) -> Vec<std::thread::JoinHandle<()>> {
    const THREADS: usize = 32;
    let per_thread = links.len().div_ceil(THREADS).max(1);
    let mut threads = Vec::new();
    while !links.is_empty() {
        let chunk: Vec<_> = links.drain(..links.len().min(per_thread)).collect();
        threads.push(std::thread::spawn(move || drop(chunk)));
    }
    threads
}

impl Site {
    /// A per-operation map probe (assign, access, delete): the probes
    /// `--go-maps-window` bounds in time.
    fn is_map_operation(&self) -> bool {
        use agent_common::goruntime::GoClass;
        matches!(self.config, SiteConfig::Go(c) if matches!(
            GoClass::from_u32(c.class),
            Some(GoClass::MapAssign | GoClass::MapAccess | GoClass::MapDelete)
        ))
    }
}

fn program<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut UProbe, UprobeError> {
    ebpf.program_mut(name).and_then(|p| <&mut UProbe>::try_from(p).ok()).ok_or(UprobeError::MissingProgram(name))
}

/// The aya program `name`, loaded now if it was not (with multi links at
/// start, aya's copies are loaded only if a forced mode ever needs them).
fn loaded<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut UProbe, UprobeError> {
    let prog = program(ebpf, name)?;
    if prog.fd().is_err() {
        prog.load().map_err(|e| UprobeError::Load { program: name, source: Box::new(e) })?;
    }
    Ok(prog)
}
