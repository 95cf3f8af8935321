//! The process lifecycle: discover → inspect → attach, per process.
//!
//! Processes come from a /proc scan at start, from exec and exit events, and
//! from a periodic reconcile (a backstop for events lost to a full ring
//! buffer, which are counted). Each executable is inspected once per file
//! identity (the inspector's cache); a binary whose roles resolve gets one
//! set of uprobes serving every process that runs it; each watched process
//! gets a label slot in the kernel's `WS_PROC_SLOT` map, which the kernel
//! clears again when the process exits.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
};

use aya::{Ebpf, maps::HashMap as BpfHashMap};
use serde::Serialize;
use tracing::{debug, info, warn};

use crate::{
    attach::{
        goruntime,
        sched::SchedProbes,
        sidecar::SidecarProbes,
        slots::{LabelSet, Slots},
        uprobes::Uprobes,
        watch,
    },
    collect::{KernelMaps, Series, Snapshot},
    discover::{
        ProcessFilter,
        procfs::{self, FileIdent, ProcInfo},
    },
    host::HostRoot,
    inspect,
    k8s::{PodRef, resolve::Resolver},
};

/// How long a label slot stays idle (no process left) before its counts are
/// folded into user space and the slot is reused: far longer than any
/// program run (microseconds, even if preempted for a while) that looked the
/// slot up before the last process left.
const SLOT_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

/// How processes get their labels, and where a recycled slot's counts go.
pub struct Labelling {
    pub resolver: Resolver,
    pub maps: Arc<Mutex<KernelMaps>>,
    pub series: Arc<Mutex<Series>>,
    pub windows: Vec<String>,
}

/// What `/debug/probes` shows about one executable.
#[derive(Clone, Debug, Serialize)]
pub struct BinaryStatus {
    pub path: String,
    pub file: FileIdent,
    pub go_version: Option<String>,
    /// Probes attached to this file (one set shared by all its processes).
    pub attached: bool,
    pub sites: Vec<watch::SiteStatus>,
    pub go_runtime: Vec<goruntime::GoSiteStatus>,
    /// Why nothing was attached, when nothing was.
    pub reason: Option<String>,
    pub processes: Vec<u32>,
}

/// Shared with the HTTP side.
#[derive(Debug, Default)]
pub struct Status {
    pub binaries: Mutex<BTreeMap<FileIdent, BinaryStatus>>,
    pub uprobes_attached: AtomicUsize,
    /// How uprobes are made now: "uprobe-multi", "perf" or "tracefs".
    pub uprobe_mechanism: Mutex<&'static str>,
    /// The links (or tracefs events) holding the uprobes.
    pub uprobe_links: AtomicUsize,
    /// How RET sites return (`features::RetMode`), probed at start.
    pub ret_sites: Mutex<String>,
    pub sidecar_tracepoints: AtomicUsize,
    /// sched_switch/sched_wakeup programs attached for window scheduling time.
    pub sched_tracepoints: AtomicUsize,
    /// Proxy processes watched (pid → comm).
    pub sidecars: Mutex<BTreeMap<u32, String>>,
    /// The listening ports registered for each watched proxy process
    /// (forked workers included): a connection to one is timed.
    pub sidecar_ports: Mutex<BTreeMap<u32, std::collections::BTreeSet<u16>>>,
    /// The first /proc scan is done (what /readyz waits for).
    pub scanned: std::sync::atomic::AtomicBool,
}

/// Which processes are proxies whose latency to measure.
#[derive(Clone, Debug, Default)]
pub struct SidecarFilter {
    pub comms: Vec<String>,
    pub pids: Vec<u32>,
}

impl SidecarFilter {
    pub fn matches(&self, tgid: u32, comm: &str) -> bool {
        self.pids.contains(&tgid) || self.comms.iter().any(|c| c == comm)
    }
}

struct Tracked {
    file: FileIdent,
    slot: u32,
    labels: LabelSet,
    /// A pod (or container) the pod cache did not know yet.
    pending: Option<PodRef>,
}

pub struct Tracker {
    root: HostRoot,
    filter: ProcessFilter,
    sidecar_filter: SidecarFilter,
    sidecar: SidecarProbes,
    sidecar_slots: Arc<Mutex<Slots>>,
    /// sched_switch/sched_wakeup, while some binary has window probes.
    sched: SchedProbes,
    ebpf: Ebpf,
    uprobes: Uprobes,
    proc_slot: crate::attach::slots::ProcSlotMap,
    slots: Arc<Mutex<Slots>>,
    cache: inspect::Cache,
    procs: HashMap<u32, Tracked>,
    status: Arc<Status>,
    /// Files already reported as unusable (logged once, not per process).
    reported: HashSet<FileIdent>,
    /// Verdicts per executable file (see `plan_for`).
    plans: HashMap<(FileIdent, bool), Verdict>,
    go: GoSettings,
    watch_options: watch::WatchOptions,
    /// Attached files with scheduler probes (the sched programs stay while
    /// any of them is attached).
    sched_files: HashSet<FileIdent>,
    labelling: Labelling,
    /// The pod cache generation pending processes were last looked up at.
    pending_generation: u64,
    /// Labels of the proxies (and their forked workers) measured.
    sidecar_labels: HashMap<u32, LabelSet>,
}

/// What one executable means to the agent: None when nothing.
type Verdict = Option<(Arc<inspect::Inspection>, Arc<BinaryPlan>)>;

/// Everything planned for one binary.
pub struct BinaryPlan {
    pub watch: watch::WatchPlan,
    pub go: goruntime::GoPlan,
}

impl BinaryPlan {
    /// Sites to attach: each part's, unless that part was refused.
    fn sites(&self) -> Vec<crate::attach::uprobes::Site> {
        let mut v = Vec::new();
        if self.watch.refusal.is_none() {
            v.extend(self.watch.sites.iter().cloned());
        }
        if self.go.refusal.is_none() {
            v.extend(self.go.sites.iter().cloned());
        }
        v
    }

    /// Why nothing at all can be attached, if so.
    fn refusal(&self) -> Option<String> {
        let usable =
            |sites: &[crate::attach::uprobes::Site], refusal: &Option<String>| refusal.is_none() && !sites.is_empty();
        if usable(&self.watch.sites, &self.watch.refusal) || usable(&self.go.sites, &self.go.refusal) {
            return None;
        }
        self.watch.refusal.clone().or_else(|| self.go.refusal.clone()).or_else(|| Some("nothing to probe".into()))
    }
}

/// Go runtime timing settings (`--go-maps`, `--go-comm`, `--go-pid`, `--window`).
#[derive(Clone, Debug)]
pub struct GoSettings {
    pub maps: goruntime::GoMaps,
    /// How long per-operation map probes stay (None: for good).
    pub maps_window: Option<std::time::Duration>,
    /// Scheduler probes in binaries with windows (off-CPU and run-queue
    /// time inside windows).
    pub sched: bool,
    /// Benchmarks only: attach an empty program at every Go runtime and
    /// watch-path site (the floor any uprobe there costs).
    pub empty_probes: bool,
    pub windows: goruntime::WindowTable,
    pub comms: Vec<String>,
    pub pids: Vec<u32>,
}

impl GoSettings {
    fn named(&self, tgid: u32, comm: &str) -> bool {
        self.pids.contains(&tgid) || self.comms.iter().any(|c| c == comm)
    }
}

/// Most executables whose verdict is remembered.
const MAX_KNOWN_FILES: usize = 16384;

impl Tracker {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        root: HostRoot,
        filter: ProcessFilter,
        sidecar_filter: SidecarFilter,
        go: GoSettings,
        watch_options: watch::WatchOptions,
        mut ebpf: Ebpf,
        slots: Arc<Mutex<Slots>>,
        sidecar_slots: Arc<Mutex<Slots>>,
        status: Arc<Status>,
        labelling: Labelling,
        uprobe_mode: crate::attach::uprobes::UprobeMode,
        multi: Option<crate::attach::multi::MultiPrograms>,
        unavailable: crate::attach::Unavailable,
        sock: Result<(), &crate::host::btf::BtfError>,
    ) -> anyhow::Result<Self> {
        use anyhow::Context as _;
        let sc_map = ebpf.take_map("WS_SIDECAR_SLOT").context("the eBPF object has no WS_SIDECAR_SLOT map")?;
        let listen = ebpf.take_map("WS_SIDECAR_LISTEN").context("the eBPF object has no WS_SIDECAR_LISTEN map")?;
        let sidecar = SidecarProbes::load(
            &mut ebpf,
            BpfHashMap::try_from(sc_map).context("WS_SIDECAR_SLOT")?,
            BpfHashMap::try_from(listen).context("WS_SIDECAR_LISTEN")?,
            sock,
        )
        .context("loading the sidecar programs")?;
        let sched = SchedProbes::load(&mut ebpf).context("loading the scheduler programs")?;
        let go_config = ebpf.take_map("WS_GO_CONFIG").context("the eBPF object has no WS_GO_CONFIG map")?;
        let callers =
            ebpf.take_map("WS_GO_WINDOW_CALLERS").context("the eBPF object has no WS_GO_WINDOW_CALLERS map")?;
        let config = ebpf.take_map("WS_WATCH_CONFIG").context("the eBPF object has no WS_WATCH_CONFIG map")?;
        let proc_slot = ebpf.take_map("WS_PROC_SLOT").context("the eBPF object has no WS_PROC_SLOT map")?;
        let slot_cache = ebpf.take_map("WS_SLOT_CACHE").context("the eBPF object has no WS_SLOT_CACHE map")?;
        Ok(Self {
            root: root.clone(),
            filter,
            sidecar_filter,
            sidecar,
            sidecar_slots,
            sched,
            ebpf,
            uprobes: Uprobes::new(
                aya::maps::Array::try_from(config).context("WS_WATCH_CONFIG")?,
                aya::maps::Array::try_from(go_config).context("WS_GO_CONFIG")?,
                BpfHashMap::try_from(callers).context("WS_GO_WINDOW_CALLERS")?,
                uprobe_mode,
                root,
                multi,
                unavailable,
            ),
            proc_slot: crate::attach::slots::ProcSlotMap::new(
                BpfHashMap::try_from(proc_slot).context("WS_PROC_SLOT")?,
                aya::maps::PerCpuArray::try_from(slot_cache).context("WS_SLOT_CACHE")?,
            )
            .context("counting the possible CPUs")?,
            slots,
            cache: inspect::Cache::default(),
            procs: HashMap::new(),
            status,
            reported: HashSet::new(),
            plans: HashMap::new(),
            go,
            watch_options,
            sched_files: HashSet::new(),
            pending_generation: labelling.resolver.generation(),
            labelling,
            sidecar_labels: HashMap::new(),
        })
    }

    /// The uprobe programs loaded for multi links (for their statistics).
    pub fn multi_programs(&self) -> Option<&crate::attach::multi::MultiPrograms> {
        self.uprobes.multi_programs()
    }

    /// The loaded object (for reading its programs' statistics).
    pub fn ebpf(&self) -> &Ebpf {
        &self.ebpf
    }

    pub fn resolver(&self) -> &Resolver {
        &self.labelling.resolver
    }

    /// Looks the processes whose pod was unknown up again, once the pod
    /// cache has fetched since; a process that resolved further moves to the
    /// slot of its new label set (its labels appear on the next scrape).
    pub fn refresh_labels(&mut self) {
        let generation = self.labelling.resolver.generation();
        if generation == self.pending_generation {
            return;
        }
        self.pending_generation = generation;
        let mut moved = Vec::new();
        for (tgid, t) in &mut self.procs {
            let Some(pod_ref) = &t.pending else { continue };
            let Some(resolved) = self.labelling.resolver.retry(&t.labels, pod_ref) else { continue };
            t.pending = resolved.pending;
            moved.push((*tgid, t.slot, resolved.labels));
        }
        let Ok(mut slots) = self.slots.lock() else { return };
        for (tgid, old, labels) in moved {
            let slot = slots.acquire(&labels);
            slots.release(old);
            if let Err(e) = self.proc_slot.insert(tgid, slot) {
                warn!(pid = tgid, "cannot move the process to its pod's label slot: {e}");
            }
            if let Some(t) = self.procs.get_mut(&tgid) {
                debug!(pid = tgid, namespace = %labels.namespace, pod = %labels.pod, "pod labels resolved");
                t.slot = slot;
                t.labels = labels;
            }
        }
    }

    /// Gives the slots of label sets whose last process left back: their
    /// kernel counts go to user space (still capped by --max-series), the
    /// kernel entries are zeroed, and the slot can serve another label set.
    pub fn recycle_slots(&mut self) {
        let Ok(mut slots) = self.slots.lock() else { return };
        let idle = slots.idle(SLOT_GRACE);
        if idle.is_empty() {
            return;
        }
        let Ok(mut maps) = self.labelling.maps.lock() else { return };
        let Ok(mut series) = self.labelling.series.lock() else { return };
        for (slot, labels) in idle {
            let part = Snapshot::kernel_part(&maps, &[(slot, labels)], &[], &self.labelling.windows);
            // Fold only what was zeroed: a failed zeroing keeps the slot
            // (idle) and its counts in the kernel, for the next try.
            match maps.zero_slot(slot) {
                Ok(()) => {
                    series.fold(part);
                    slots.free(slot);
                    debug!(slot, "label slot recycled");
                }
                Err(e) => warn!(slot, "cannot recycle a label slot: {e}"),
            }
        }
    }

    /// Considers every running process; forgets tracked ones that are gone.
    pub fn reconcile(&mut self) {
        let detached = self.uprobes.detach_idle(&mut self.ebpf);
        if detached > 0 {
            info!(probes = detached, "detached the probes of binaries no process has run for a while");
        }
        self.sched_files.retain(|f| self.uprobes.is_attached(f));
        if self.sched_files.is_empty() && self.sched.attached() > 0 {
            self.sched.detach(&mut self.ebpf);
            info!("no window probes left; scheduler programs detached");
        }
        let running = procfs::scan(&self.root);
        let alive: HashSet<u32> = running.iter().map(|p| p.tgid).collect();
        self.reconcile_sidecars(&alive);
        let gone: Vec<u32> = self.procs.keys().copied().filter(|t| !alive.contains(t)).collect();
        for tgid in gone {
            self.on_exit(tgid);
        }
        for p in running {
            let known = self.procs.get(&p.tgid).is_some_and(|t| t.file == p.exe);
            if !known {
                self.consider(p);
            }
        }
    }

    /// A process called exec: it may now run a different binary.
    pub fn on_exec(&mut self, tgid: u32) {
        if self.procs.contains_key(&tgid) {
            self.forget(tgid);
        }
        if let Some(p) = procfs::read_proc(&self.root, tgid) {
            self.consider(p);
        }
    }

    /// A watched process exited (the kernel already cleared its slot).
    pub fn on_exit(&mut self, tgid: u32) {
        self.forget(tgid);
        if let Ok(mut s) = self.status.sidecars.lock() {
            s.remove(&tgid);
        }
    }

    fn forget(&mut self, tgid: u32) {
        let Some(t) = self.procs.remove(&tgid) else { return };
        self.proc_slot.remove(tgid);
        if let Ok(mut slots) = self.slots.lock() {
            slots.release(t.slot);
        }
        let idle = self.uprobes.remove_user(tgid);
        if idle > 0 {
            debug!(pid = tgid, "last process of a binary exited; its probes stay for a while");
        }
        if let Ok(mut bins) = self.status.binaries.lock()
            && let Some(b) = bins.get_mut(&t.file)
        {
            b.processes.retain(|p| *p != tgid);
            if b.processes.is_empty() {
                bins.remove(&t.file);
            }
        }
        self.publish_count();
    }

    fn consider(&mut self, p: ProcInfo) {
        if self.filter.exclude_comms.contains(&p.comm) {
            return;
        }
        self.consider_sidecar(&p);
        let go_named = self.go.named(p.tgid, &p.comm);
        if !self.filter.matches(p.tgid, &p.comm) && !go_named {
            return;
        }
        let Some((inspection, plan)) = self.plan_for(&p, go_named) else { return };
        let mut reason = plan.refusal();
        let sites = plan.sites();
        if reason.is_none() && !self.uprobes.is_attached(&p.exe) {
            match self.uprobes.attach(&mut self.ebpf, p.exe, &p.exe_open, &sites) {
                Ok(()) => info!(
                    pid = p.tgid,
                    comm = %p.comm,
                    exe = %p.exe_path.display(),
                    watch_path = plan.watch.sites.len(),
                    go_runtime = plan.go.sites.len(),
                    "attached probes"
                ),
                Err(e) => reason = Some(attach_error(&e)),
            }
            if reason.is_none() && plan.go.has_sched() {
                if let Err(e) = self.sched.ensure(&mut self.ebpf) {
                    warn!("window off-CPU and run-queue time unavailable: {e}");
                } else {
                    self.sched_files.insert(p.exe);
                }
            }
        }
        if let Some(why) = &reason {
            if self.reported.insert(p.exe) {
                warn!(exe = %p.exe_path.display(), "not attaching: {why}");
            }
        } else {
            self.uprobes.add_user(&p.exe, p.tgid);
            // Labels are resolved once, when the process is first tracked.
            let resolved = self.labelling.resolver.resolve(p.tgid, &p.comm);
            // Out of slots: recycle idle ones now rather than on the next tick.
            if self.slots.lock().is_ok_and(|s| s.full()) {
                self.recycle_slots();
            }
            let slot = self.slots.lock().map(|mut s| s.acquire(&resolved.labels)).unwrap_or(0);
            if let Err(e) = self.proc_slot.insert(p.tgid, slot) {
                warn!(pid = p.tgid, "cannot register the process with the kernel programs: {e}");
            }
            let tracked = Tracked { file: p.exe, slot, labels: resolved.labels, pending: resolved.pending };
            if let Some(old) = self.procs.insert(p.tgid, tracked)
                && let Ok(mut slots) = self.slots.lock()
            {
                slots.release(old.slot);
            }
            // A short-lived process may have exited before it was in
            // WS_PROC_SLOT: the kernel then sent no exit event, and only the
            // next reconcile would free its slot. Checked after the insert,
            // so either the kernel saw the entry at exit or this sees the exit.
            if exited(&self.root, p.tgid) {
                self.forget(p.tgid);
            }
        }
        if let Ok(mut bins) = self.status.binaries.lock() {
            let b = bins.entry(p.exe).or_insert_with(|| BinaryStatus {
                path: p.exe_path.display().to_string(),
                file: p.exe,
                go_version: inspection.go_version.clone(),
                attached: false,
                sites: plan.watch.statuses.clone(),
                go_runtime: plan.go.statuses.clone(),
                reason: None,
                processes: Vec::new(),
            });
            b.attached = self.uprobes.is_attached(&p.exe);
            b.reason = reason;
            if !b.processes.contains(&p.tgid) {
                b.processes.push(p.tgid);
            }
        }
        self.publish_count();
    }

    /// The inspection and watch plan of a process's executable, computed
    /// once per file identity (negative answers too: a node execs the same
    /// shell and `true` thousands of times). None: nothing to do for it.
    fn plan_for(&mut self, p: &ProcInfo, go_named: bool) -> Verdict {
        let key = (p.exe, go_named);
        if let Some(known) = self.plans.get(&key) {
            return known.clone();
        }
        if self.plans.len() >= MAX_KNOWN_FILES {
            // Bounded memory on nodes that exec endless distinct files.
            self.plans.clear();
        }
        let verdict = match self.cache.inspect(&p.exe_open) {
            // The process is gone (or its file unreadable right now): say
            // nothing about the file, so its next process is looked at.
            Err(inspect::InspectError::Io { .. }) => return None,
            // Not a Go binary, or not one we can read: common and uninteresting.
            Err(_) => None,
            Ok(insp) => {
                let mut watch = watch::plan(&insp, self.watch_options);
                let related = !watch.is_unrelated() || watch.refusal.is_some();
                // Go runtime timing for the watch path's programs the
                // catalog recognised (not for a refused, unknown build: the
                // user was promised nothing would be attached to it) and for
                // the programs the user named.
                let recognised = !watch.sites.is_empty() && watch.refusal.is_none();
                // Not for servers (etcd, a Kubernetes API server) unless
                // named: their map growth is per request, and a probe hit
                // per growth call cost the API server 2.2 ms of CPU per
                // custom-resource update (`cargo xtask bench k8s`: 0.57 of
                // its throughput). Their watch-path stages are timed anyway;
                // the clients' handler windows are where the incident is.
                let server =
                    watch.sites.iter().any(|s| matches!(s.program, "etcd_notify" | "etcd_enqueue" | "kube_cache"));
                let plan = if !related && !go_named {
                    // A Go program without any watch-path role, not named by --go-*.
                    None
                } else {
                    let mut go = if (recognised && !server) || go_named {
                        goruntime::plan(&insp, self.go.maps, &self.go.windows, self.go.sched)
                    } else {
                        goruntime::GoPlan::default()
                    };
                    if self.go.empty_probes {
                        go.sites.iter_mut().for_each(|s| s.program = "go_empty");
                        watch.sites.iter_mut().for_each(|s| s.program = "go_empty");
                    }
                    Some(Arc::new(BinaryPlan { watch, go }))
                };
                insp.release_pages();
                plan.map(|plan| (insp, plan))
            }
        };
        self.plans.insert(key, verdict.clone());
        verdict
    }

    /// A proxy to measure: register it with the sidecar programs.
    fn consider_sidecar(&mut self, p: &ProcInfo) {
        if !self.sidecar_filter.matches(p.tgid, &p.comm) {
            return;
        }
        let known = self.status.sidecars.lock().map(|s| s.contains_key(&p.tgid)).unwrap_or(false);
        if known {
            return;
        }
        let labels = self.labelling.resolver.resolve(p.tgid, &p.comm).labels;
        let slot = self.sidecar_slots.lock().map(|mut s| s.slot(&labels)).unwrap_or(0);
        self.sidecar_labels.insert(p.tgid, labels);
        match self.sidecar.watch(&mut self.ebpf, p.tgid, slot) {
            Ok(()) => {
                info!(pid = p.tgid, comm = %p.comm, "measuring proxy latency");
                if let Ok(mut s) = self.status.sidecars.lock() {
                    s.insert(p.tgid, p.comm.clone());
                }
            }
            Err(e) => warn!(pid = p.tgid, comm = %p.comm, "cannot measure this proxy: {e}"),
        }
        self.publish_count();
    }

    /// Detaches per-operation map probes whose `--go-maps-window` is over.
    pub fn expire_map_operations(&mut self) {
        let Some(window) = self.go.maps_window else { return };
        let n = self.uprobes.expire_map_operations(&mut self.ebpf, window);
        if n > 0 {
            info!(probes = n, window = ?window, "--go-maps-window over: per-operation map probes detached");
            self.publish_count();
        }
    }

    /// Registers the listening ports of every watched proxy (forked workers
    /// included): a proxy binds after its exec, so this runs now and then.
    pub fn refresh_sidecar_ports(&mut self) {
        let pids = self.sidecar.watched();
        if pids.is_empty() {
            return;
        }
        let slots: Vec<(u32, u32)> = {
            for pid in &pids {
                // Forked workers the kernel added: resolved once, like any process.
                if !self.sidecar_labels.contains_key(pid)
                    && let Some(p) = procfs::read_proc(&self.root, *pid)
                {
                    let labels = self.labelling.resolver.resolve(*pid, &p.comm).labels;
                    self.sidecar_labels.insert(*pid, labels);
                }
            }
            let mut table = match self.sidecar_slots.lock() {
                Ok(t) => t,
                Err(_) => return,
            };
            pids.iter().map(|pid| (*pid, self.sidecar_labels.get(pid).map(|l| table.slot(l)).unwrap_or(0))).collect()
        };
        for (pid, slot) in slots {
            let ports = crate::discover::sockets::listening_ports(&self.root, pid);
            let registered = self.sidecar.listen_ports(ports, slot);
            if let Ok(mut known) = self.status.sidecar_ports.lock() {
                known.insert(pid, registered);
            }
        }
    }

    /// Forgets proxies that exited; detaches the syscall programs when no
    /// proxy is left (forked workers the kernel added count too).
    fn reconcile_sidecars(&mut self, alive: &HashSet<u32>) {
        let mut known = match self.status.sidecars.lock() {
            Ok(s) => s,
            Err(_) => return,
        };
        known.retain(|pid, _| alive.contains(pid));
        if let Ok(mut ports) = self.status.sidecar_ports.lock() {
            ports.retain(|pid, _| alive.contains(pid));
        }
        self.sidecar_labels.retain(|pid, _| alive.contains(pid));
        for pid in self.sidecar.watched() {
            if !alive.contains(&pid) {
                self.sidecar.unwatch(pid);
            }
        }
        if known.is_empty() && self.sidecar.watched().is_empty() && self.sidecar.attached() > 0 {
            self.sidecar.detach_all(&mut self.ebpf);
            info!("no proxy left to measure; syscall programs detached");
        }
        drop(known);
        self.publish_count();
    }

    fn publish_count(&self) {
        self.status.uprobes_attached.store(self.uprobes.count(), Ordering::Relaxed);
        *self.status.uprobe_mechanism.lock().unwrap_or_else(|p| p.into_inner()) = self.uprobes.mechanism();
        self.status.uprobe_links.store(self.uprobes.links(), Ordering::Relaxed);
        self.status.sidecar_tracepoints.store(self.sidecar.attached(), Ordering::Relaxed);
        self.status.sched_tracepoints.store(self.sched.attached(), Ordering::Relaxed);
    }

    /// Detaches everything (shutdown), and counts it. Every release waits
    /// for an RCU grace period (about 80 ms here); released one after
    /// another, 2 tracepoints and 9 multi links took 0.27 s, so all are
    /// released at once: the uprobe links on their threads, and every
    /// program (its tracepoint links with it) on one thread each.
    pub fn shutdown(mut self) -> usize {
        let tracepoints = self.sidecar.attached() + self.sched.attached();
        let (uprobes, releasing) = self.uprobes.detach_all(&mut self.ebpf);
        std::thread::scope(|s| {
            for (name, prog) in self.ebpf.programs_mut() {
                s.spawn(move || {
                    // Not loaded (unused here) is the only expected refusal.
                    let unloaded = match prog {
                        aya::programs::Program::TracePoint(p) => p.unload(),
                        aya::programs::Program::RawTracePoint(p) => p.unload(),
                        aya::programs::Program::UProbe(p) => p.unload(),
                        _ => Ok(()),
                    };
                    if let Err(e) = unloaded {
                        debug!(program = name, "unloading: {e}");
                    }
                });
            }
        });
        for t in releasing {
            let _ = t.join();
        }
        tracepoints + uprobes
    }
}

/// An attach error with its causes (aya's "`perf_event_open` failed" says
/// nothing without its OS error), and what to do about a refusal.
fn attach_error(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let part = s.to_string();
        if !text.ends_with(&part) {
            text.push_str(&format!(": {part}"));
        }
        source = s.source();
    }
    if crate::attach::uprobes::permission_denied(e) && text.contains("perf_event_open") {
        // Linux 6.16 (and the stable kernels it was backported to) went back
        // to requiring CAP_SYS_ADMIN for uprobes made through perf_event_open
        // ("perf: Revert to requiring CAP_SYS_ADMIN for uprobes"). Only a
        // forced `--uprobe-attach=perf` gets here: `auto` moves to tracefs.
        text.push_str(
            " (the uprobe PMU needs CAP_SYS_ADMIN on Linux 6.16+ and kernels with that change backported; \
             --uprobe-attach=tracefs works without it)",
        );
    }
    text
}

/// The process is gone or a zombie (it ran its exit already).
fn exited(root: &HostRoot, tgid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(root.path(format!("/proc/{tgid}/stat"))) else { return true };
    // The state follows the command name, which may itself contain ')'.
    let state = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next());
    matches!(state, Some("Z") | Some("X") | None)
}
