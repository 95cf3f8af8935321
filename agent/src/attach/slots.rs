//! Label slots: the kernel keeps histograms in fixed arrays indexed by a
//! small slot number per label set (namespace, pod, container, comm and,
//! with `--label-pid`, the pid). A slot is handed out when the first process
//! of a label set is tracked and counts the processes that use it; when the
//! last one has exited the slot becomes *idle*, and after a grace period the
//! daemon folds its kernel counts into user space (`collect::series`), zeroes
//! the kernel entries and returns the slot here for reuse. So a node where
//! pods churn for months never runs out of the 64 kernel slots, and a series
//! keeps its meaning: a slot holds one label set from allocation to release.
//! Past the cap every new label set shares the overflow slot 0 (exported as
//! `comm="_other"`) and is counted.

use std::{
    collections::{BTreeSet, HashMap},
    time::{Duration, Instant},
};

use agent_common::watch::{MAX_SLOTS, OVERFLOW_SLOT};

pub const OVERFLOW_LABEL: &str = "_other";

/// The labels of one process as exported on every per-process series, in
/// this order: `namespace`, `pod`, `container`, `comm`, then `pid` (only with
/// `--label-pid`). The first three are empty outside a pod.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LabelSet {
    pub namespace: String,
    pub pod: String,
    pub container: String,
    pub comm: String,
    pub pid: Option<u32>,
}

impl LabelSet {
    /// A process outside any pod (or before its pod is known).
    pub fn comm(comm: &str) -> Self {
        Self { comm: comm.to_string(), ..Self::default() }
    }

    /// The overflow slot's label set.
    pub fn overflow() -> Self {
        Self::comm(OVERFLOW_LABEL)
    }

    /// `first` (the family's own labels), then this set's labels in order.
    pub fn pairs(&self, first: &[(&'static str, String)]) -> Vec<(&'static str, String)> {
        let mut v = Vec::with_capacity(first.len() + 5);
        v.extend(first.iter().cloned());
        v.push(("namespace", self.namespace.clone()));
        v.push(("pod", self.pod.clone()));
        v.push(("container", self.container.clone()));
        v.push(("comm", self.comm.clone()));
        if let Some(pid) = self.pid {
            v.push(("pid", pid.to_string()));
        }
        v
    }
}

#[derive(Debug)]
struct SlotState {
    labels: LabelSet,
    /// Tracked processes whose tgid maps to this slot in the kernel.
    users: u32,
    /// When `users` last dropped to 0.
    idle_since: Option<Instant>,
}

#[derive(Debug)]
pub struct Slots {
    by_label: HashMap<LabelSet, u32>,
    /// Indexed by slot; `None` for a slot that was released.
    slots: Vec<Option<SlotState>>,
    /// Released slots (their kernel entries zeroed), reused first, lowest
    /// first: the Go runtime arrays have only the first `MAX_GO_SLOTS`.
    free: BTreeSet<u32>,
    max: u32,
    /// Label sets that did not get a slot of their own.
    pub overflowed: u64,
}

impl Default for Slots {
    fn default() -> Self {
        Self::with_capacity(MAX_SLOTS)
    }
}

impl Slots {
    /// A table of `max` slots (the size of the kernel arrays it indexes).
    pub fn with_capacity(max: u32) -> Self {
        let overflow = SlotState { labels: LabelSet::overflow(), users: 0, idle_since: None };
        Self { by_label: HashMap::new(), slots: vec![Some(overflow)], free: BTreeSet::new(), max, overflowed: 0 }
    }

    /// The slot for `labels`, allocating one if there is room, without
    /// counting a user (for tables whose users the kernel tracks itself).
    pub fn slot(&mut self, labels: &LabelSet) -> u32 {
        if let Some(s) = self.by_label.get(labels) {
            return *s;
        }
        let s = if let Some(s) = self.free.pop_first() {
            s
        } else if (self.slots.len() as u32) < self.max {
            self.slots.push(None);
            self.slots.len() as u32 - 1
        } else {
            self.overflowed += 1;
            return OVERFLOW_SLOT;
        };
        self.slots[s as usize] = Some(SlotState { labels: labels.clone(), users: 0, idle_since: Some(Instant::now()) });
        self.by_label.insert(labels.clone(), s);
        s
    }

    /// The slot for one more process with `labels`.
    pub fn acquire(&mut self, labels: &LabelSet) -> u32 {
        let s = self.slot(labels);
        if let Some(Some(st)) = self.slots.get_mut(s as usize) {
            st.users += 1;
            st.idle_since = None;
        }
        s
    }

    /// No slot left for a new label set without recycling an idle one.
    pub fn full(&self) -> bool {
        self.free.is_empty() && self.slots.len() as u32 >= self.max
    }

    /// One process of `slot` is gone (exited, or moved to another label set).
    pub fn release(&mut self, slot: u32) {
        if let Some(Some(st)) = self.slots.get_mut(slot as usize) {
            st.users = st.users.saturating_sub(1);
            if st.users == 0 {
                st.idle_since = Some(Instant::now());
            }
        }
    }

    /// Slots with no process for at least `grace` (never the overflow slot),
    /// with their labels: the caller folds their kernel counts into user
    /// space, zeroes them, then calls [`Self::free`].
    pub fn idle(&self, grace: Duration) -> Vec<(u32, LabelSet)> {
        self.slots
            .iter()
            .enumerate()
            .skip(1)
            .filter_map(|(i, st)| {
                let st = st.as_ref()?;
                let idle = st.users == 0 && st.idle_since.is_some_and(|t| t.elapsed() >= grace);
                idle.then(|| (i as u32, st.labels.clone()))
            })
            .collect()
    }

    /// Returns `slot` for reuse: its kernel entries must be zero by now.
    pub fn free(&mut self, slot: u32) {
        if slot == OVERFLOW_SLOT {
            return;
        }
        if let Some(entry) = self.slots.get_mut(slot as usize)
            && let Some(st) = entry.take()
        {
            self.by_label.remove(&st.labels);
            self.free.insert(slot);
        }
    }

    /// For /debug/probes: slots with processes, idle ones awaiting recycling,
    /// free ones, and label sets that got the overflow slot.
    pub fn usage(&self) -> serde_json::Value {
        let live = self.slots.iter().skip(1).flatten();
        let busy = live.clone().filter(|s| s.users > 0).count();
        let idle = live.filter(|s| s.users == 0).count();
        serde_json::json!({
            "capacity": self.max,
            "busy": busy,
            "idle": idle,
            "free": self.free.len() + (self.max as usize).saturating_sub(self.slots.len()),
            "overflowed": self.overflowed,
        })
    }

    /// (slot, labels) for every slot in use, overflow first.
    pub fn all(&self) -> impl Iterator<Item = (u32, &LabelSet)> {
        self.slots.iter().enumerate().filter_map(|(i, st)| Some((i as u32, &st.as_ref()?.labels)))
    }
}

/// The kernel's process → slot map (`WS_PROC_SLOT`) and the count of user
/// space's changes to it, which the programs' per-CPU caches of their last
/// lookup keep beside it (`WS_SLOT_CACHE[1]` on every CPU): written after
/// each change, with the cached lookup zeroed, so a cache that held the
/// old state misses (`agent_common::procslot`). The tracker is the only
/// user-space writer.
pub struct ProcSlotMap {
    map: aya::maps::HashMap<aya::maps::MapData, u32, u32>,
    cache: aya::maps::PerCpuArray<aya::maps::MapData, [u64; 2]>,
    cpus: usize,
    changes: u64,
}

impl ProcSlotMap {
    pub fn new(
        map: aya::maps::HashMap<aya::maps::MapData, u32, u32>,
        cache: aya::maps::PerCpuArray<aya::maps::MapData, [u64; 2]>,
    ) -> Result<Self, std::io::Error> {
        let cpus = aya::util::nr_cpus().map_err(|(what, e)| std::io::Error::new(e.kind(), format!("{what}: {e}")))?;
        Ok(Self { map, cache, cpus, changes: 0 })
    }

    /// Watches process `tgid` under `slot` (or moves it there).
    pub fn insert(&mut self, tgid: u32, slot: u32) -> Result<(), aya::maps::MapError> {
        let r = self.map.insert(tgid, slot, 0);
        self.changed();
        r
    }

    /// Stops watching process `tgid`.
    pub fn remove(&mut self, tgid: u32) {
        let _ = self.map.remove(&tgid);
        self.changed();
    }

    fn changed(&mut self) {
        self.changes += 1;
        let set = match aya::maps::PerCpuValues::try_from(vec![[0, self.changes]; self.cpus]) {
            Ok(v) => self.cache.set(0, v, 0).map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        if let Err(e) = set {
            // The programs would keep a stale lookup: say so loudly.
            tracing::error!("cannot count a change of WS_PROC_SLOT for the probes' caches: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stable_and_capped() {
        let mut s = Slots::default();
        let a = s.acquire(&LabelSet::comm("etcd"));
        assert_eq!(a, 1);
        assert_eq!(s.acquire(&LabelSet::comm("etcdctl")), 2);
        assert_eq!(s.acquire(&LabelSet::comm("etcd")), a);
        for i in 0..MAX_SLOTS {
            s.acquire(&LabelSet::comm(&format!("p{i}")));
        }
        assert_eq!(s.acquire(&LabelSet::comm("late")), OVERFLOW_SLOT);
        assert!(s.overflowed > 0);
        assert_eq!(s.all().count() as u32, MAX_SLOTS);
    }

    #[test]
    fn a_slot_is_reused_only_after_its_last_user_left_and_it_was_freed() {
        let mut s = Slots::with_capacity(3);
        let pod =
            |p: &str| LabelSet { namespace: "ns".into(), pod: p.into(), comm: "etcd".into(), ..LabelSet::default() };
        let a = s.acquire(&pod("a"));
        assert_eq!(s.acquire(&pod("a")), a);
        let b = s.acquire(&pod("b"));
        assert!(s.full());
        assert_eq!(s.acquire(&pod("c")), OVERFLOW_SLOT);
        s.release(a);
        assert!(s.idle(Duration::ZERO).iter().all(|(i, _)| *i != a), "one user left");
        s.release(a);
        assert_eq!(s.idle(Duration::ZERO), vec![(a, pod("a"))]);
        assert!(s.idle(Duration::from_secs(60)).is_empty(), "grace period");
        s.free(a);
        assert!(!s.full());
        assert_eq!(s.acquire(&pod("c")), a, "the freed slot is reused");
        assert_eq!(
            s.all().map(|(i, l)| (i, l.pod.clone())).collect::<Vec<_>>(),
            vec![(0, String::new()), (a, "c".into()), (b, "b".into())]
        );
    }

    #[test]
    fn labels_in_order_with_pid_last() {
        let l =
            LabelSet { namespace: "n".into(), pod: "p".into(), container: "c".into(), comm: "x".into(), pid: Some(7) };
        let names: Vec<_> = l.pairs(&[("stage", "s".into())]).into_iter().map(|(k, _)| k).collect();
        assert_eq!(names, ["stage", "namespace", "pod", "container", "comm", "pid"]);
    }
}
