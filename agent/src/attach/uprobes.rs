//! Uprobe attachments, one set per executable file: a uprobe lives on the
//! file's inode, so one attachment serves every process running that binary
//! (50 pods of one image: one attachment). Per-process filtering happens in
//! the kernel (the `WS_PROC_SLOT` lookup every program does first). When the
//! last process of a binary exits, its probes are detached.

use std::{
    collections::{BTreeSet, HashMap},
    path::Path,
};

use agent_common::{goruntime::GoProbeConfig, watch::WatchProbeConfig};
use aya::{
    Ebpf,
    maps::{Array, MapData},
    programs::{
        UProbe,
        uprobe::{UProbeAttachLocation, UProbeAttachPoint, UProbeLink, UProbeLinkId, UProbeScope},
    },
};
use thiserror::Error;

use crate::discover::procfs::FileIdent;

/// Cookies index the per-attach config arrays; their sizes in the kernel object.
pub const MAX_WATCH_COOKIES: u32 = 256;
pub const MAX_GO_COOKIES: u32 = 1024;

#[derive(Debug, Error)]
pub enum UprobeError {
    #[error("program `{0}` is missing from the eBPF object")]
    MissingProgram(&'static str),
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
}

/// What the kernel program at a site reads: its config array entry.
#[derive(Clone, Copy, Debug)]
pub enum SiteConfig {
    Watch(WatchProbeConfig),
    Go(GoProbeConfig),
}

struct Attached {
    links: Vec<(&'static str, UProbeLinkId)>,
    cookies: Vec<Cookie>,
    /// Per-operation map probes (`--go-maps=all`): detached by themselves
    /// once `--go-maps-window` has passed since they were attached.
    temporary: Vec<(&'static str, UProbeLinkId, Cookie)>,
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
    free_watch: Vec<u32>,
    free_go: Vec<u32>,
    by_file: HashMap<FileIdent, Attached>,
}

impl Uprobes {
    pub fn new(watch_config: Array<MapData, WatchProbeConfig>, go_config: Array<MapData, GoProbeConfig>) -> Self {
        Self {
            watch_config,
            go_config,
            free_watch: (0..MAX_WATCH_COOKIES).rev().collect(),
            free_go: (0..MAX_GO_COOKIES).rev().collect(),
            by_file: HashMap::new(),
        }
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
        let mut done = Attached {
            links: Vec::new(),
            cookies: Vec::new(),
            temporary: Vec::new(),
            attached_at: std::time::Instant::now(),
            users: BTreeSet::new(),
            idle_since: None,
        };
        for site in sites {
            if let Err(e) = self.attach_site(ebpf, open_path, site, &mut done) {
                self.release(ebpf, done);
                return Err(e);
            }
        }
        self.by_file.insert(file, done);
        Ok(())
    }

    fn attach_site(
        &mut self,
        ebpf: &mut Ebpf,
        open_path: &Path,
        site: &Site,
        done: &mut Attached,
    ) -> Result<(), UprobeError> {
        let cookie = match site.config {
            SiteConfig::Watch(cfg) => {
                let c = self.free_watch.pop().ok_or(UprobeError::NoCookie)?;
                // Held at once, so an error below still gives it back.
                done.cookies.push(Cookie::Watch(c));
                self.watch_config.set(c, cfg, 0).map_err(UprobeError::Config)?;
                Cookie::Watch(c)
            }
            SiteConfig::Go(cfg) => {
                let c = self.free_go.pop().ok_or(UprobeError::NoCookie)?;
                done.cookies.push(Cookie::Go(c));
                self.go_config.set(c, cfg, 0).map_err(UprobeError::Config)?;
                Cookie::Go(c)
            }
        };
        let prog = program(ebpf, site.program)?;
        let point = UProbeAttachPoint {
            location: UProbeAttachLocation::AbsoluteOffset(site.file_offset),
            cookie: Some(u64::from(cookie.id())),
        };
        let link = prog.attach(point, open_path, UProbeScope::AllProcesses).map_err(|e| UprobeError::Attach {
            program: site.program,
            offset: site.file_offset,
            path: open_path.display().to_string(),
            source: Box::new(e),
        })?;
        if site.is_map_operation() {
            // Its cookie moves with the link: both go when the window ends.
            done.cookies.pop();
            done.temporary.push((site.program, link, cookie));
        } else {
            done.links.push((site.program, link));
        }
        Ok(())
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
            for (name, id, cookie) in a.temporary.drain(..) {
                ids.push((name, id));
                cookies.push(cookie);
            }
        }
        let n = ids.len();
        self.release_cookies(cookies);
        drop_in_background(take_links(ebpf, ids), false);
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

    /// Detaches the probes of files nobody has run for `IDLE_GRACE` (or at
    /// all, with `all`). Unregistering a uprobe waits for RCU grace periods
    /// (tens of ms each here), so the links are dropped on a thread of their
    /// own: the event loop keeps picking up new processes meanwhile.
    /// Returns the number of probes detached.
    pub fn detach_idle(&mut self, ebpf: &mut Ebpf, all: bool) -> usize {
        let now = std::time::Instant::now();
        let idle: Vec<FileIdent> = self
            .by_file
            .iter()
            .filter(|(_, a)| all || a.idle_since.is_some_and(|t| now.duration_since(t) >= IDLE_GRACE))
            .map(|(f, _)| *f)
            .collect();
        let mut ids = Vec::new();
        for file in idle {
            if let Some(a) = self.by_file.remove(&file) {
                let (links, cookies) = a.into_parts();
                ids.extend(links);
                self.release_cookies(cookies);
            }
        }
        let n = ids.len();
        drop_in_background(take_links(ebpf, ids), all);
        n
    }

    fn release(&mut self, ebpf: &mut Ebpf, a: Attached) {
        let (links, cookies) = a.into_parts();
        for (name, link) in links {
            if let Ok(p) = program(ebpf, name)
                && let Err(e) = p.detach(link)
            {
                tracing::warn!("detaching {name}: {e}");
            }
        }
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

    /// Number of uprobes attached now.
    pub fn count(&self) -> usize {
        self.by_file.values().map(|a| a.links.len() + a.temporary.len()).sum()
    }
}

impl Attached {
    /// Every link (temporary ones included) and every cookie it holds.
    fn into_parts(self) -> (Vec<(&'static str, UProbeLinkId)>, Vec<Cookie>) {
        let (mut links, mut cookies) = (self.links, self.cookies);
        for (name, id, cookie) in self.temporary {
            links.push((name, id));
            cookies.push(cookie);
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
fn take_links(ebpf: &mut Ebpf, ids: Vec<(&'static str, UProbeLinkId)>) -> Vec<UProbeLink> {
    let mut links = Vec::new();
    for (name, id) in ids {
        match program(ebpf, name).and_then(|p| p.take_link(id).map_err(|_| UprobeError::MissingProgram(name))) {
            Ok(link) => links.push(link),
            Err(e) => tracing::warn!("detaching {name}: {e}"),
        }
    }
    links
}

/// Drops uprobe links off the caller's thread (or waits for them, with
/// `wait`). Each unregistration waits for a grace period; concurrent
/// waiters share one, so the links are dropped from several threads at once.
fn drop_in_background<T: Send + 'static>(mut links: Vec<T>, wait: bool) {
    let mut threads = Vec::new();
    while !links.is_empty() {
        let chunk: Vec<_> = links.drain(..links.len().min(4)).collect();
        threads.push(std::thread::spawn(move || drop(chunk)));
    }
    if wait {
        for t in threads {
            let _ = t.join();
        }
    }
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
