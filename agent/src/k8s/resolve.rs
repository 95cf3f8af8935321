//! The label set of a process: its comm, its pod (cgroup → kubelet pod list)
//! and, when asked, its pid. Called when a process is first tracked, never
//! per event (see the module docs of [`crate::k8s`]).

use crate::{
    attach::slots::LabelSet,
    host::HostRoot,
    k8s::{PodRef, cgroup, kubelet::PodCache},
};

/// Resolves processes to label sets.
#[derive(Clone, Debug)]
pub struct Resolver {
    root: HostRoot,
    /// None when the agent runs outside Kubernetes: namespace, pod and
    /// container stay empty.
    pods: Option<PodCache>,
    label_pid: bool,
}

/// A process's labels, and what to look up again if its pod was not known.
#[derive(Clone, Debug)]
pub struct Resolved {
    pub labels: LabelSet,
    /// The process runs in a pod (or container) the pod cache did not know
    /// yet: look it up again once the cache's generation moves.
    pub pending: Option<PodRef>,
}

impl Resolver {
    pub fn new(root: HostRoot, pods: Option<PodCache>, label_pid: bool) -> Self {
        Self { root, pods, label_pid }
    }

    /// The pod cache's generation (0 without Kubernetes): when it moves,
    /// pending processes are worth another lookup.
    pub fn generation(&self) -> u64 {
        self.pods.as_ref().map(PodCache::generation).unwrap_or(0)
    }

    /// Reads the process's cgroup once and looks its pod up in the cache.
    pub fn resolve(&self, tgid: u32, comm: &str) -> Resolved {
        let mut labels = LabelSet::comm(comm);
        labels.pid = self.label_pid.then_some(tgid);
        let Some(pods) = &self.pods else { return Resolved { labels, pending: None } };
        let Some(pod_ref) = cgroup::read_pid(&self.root, tgid) else { return Resolved { labels, pending: None } };
        let pending = self.fill(&mut labels, pods, &pod_ref);
        Resolved { labels, pending: pending.then_some(pod_ref) }
    }

    /// Looks a pending process up again: Some(resolved) when it resolved
    /// further than `current` (then the caller moves it to the new labels).
    pub fn retry(&self, current: &LabelSet, pod_ref: &PodRef) -> Option<Resolved> {
        let pods = self.pods.as_ref()?;
        let mut labels = current.clone();
        let pending = self.fill(&mut labels, pods, pod_ref);
        (labels != *current).then(|| Resolved { labels, pending: pending.then(|| pod_ref.clone()) })
    }

    /// Fills namespace, pod and container; true while the container is
    /// still unknown.
    fn fill(&self, labels: &mut LabelSet, pods: &PodCache, pod_ref: &PodRef) -> bool {
        match pods.lookup(pod_ref) {
            Some(k) => {
                let pending = k.container.is_empty();
                labels.namespace = k.namespace;
                labels.pod = k.pod;
                labels.container = k.container;
                pending
            }
            None => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::k8s::kubelet::{PodEntry, PodIndex};

    const UID: &str = "1e2a9b6f-4c3d-4e2a-9f1b-2c3d4e5f6a7b";
    const CID: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn root_with_cgroup(pid: u32) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(format!("proc/{pid}"));
        std::fs::create_dir_all(&p).unwrap();
        let line =
            format!("0::/kubepods.slice/kubepods-pod{}.slice/cri-containerd-{CID}.scope\n", UID.replace('-', "_"));
        std::fs::write(p.join("cgroup"), line).unwrap();
        dir
    }

    #[test]
    fn a_pod_process_gets_its_labels_and_pid_only_when_asked() {
        let dir = root_with_cgroup(42);
        let mut index = PodIndex::default();
        let mut entry = PodEntry { namespace: "kube-system".into(), name: "etcd-node1".into(), ..Default::default() };
        entry.containers.insert(CID.into(), "etcd".into());
        index.pods.insert(UID.into(), entry);
        let r = Resolver::new(HostRoot::new(dir.path()), Some(PodCache::fixed(index)), true);
        let got = r.resolve(42, "etcd");
        assert_eq!(
            got.labels,
            LabelSet {
                namespace: "kube-system".into(),
                pod: "etcd-node1".into(),
                container: "etcd".into(),
                comm: "etcd".into(),
                pid: Some(42)
            }
        );
        assert!(got.pending.is_none());
        // A process outside a pod (no cgroup file here): empty k8s labels.
        let r = Resolver::new(HostRoot::new(dir.path()), None, false);
        assert_eq!(r.resolve(43, "sh").labels, LabelSet::comm("sh"));
    }

    #[test]
    fn an_unknown_pod_stays_pending_until_the_cache_knows_it() {
        let dir = root_with_cgroup(42);
        let empty = Resolver::new(HostRoot::new(dir.path()), Some(PodCache::fixed(PodIndex::default())), false);
        let got = empty.resolve(42, "etcd");
        assert_eq!(got.labels, LabelSet::comm("etcd"));
        let pending = got.pending.expect("pending");
        assert!(empty.retry(&got.labels, &pending).is_none(), "nothing new");
        let mut index = PodIndex::default();
        index.pods.insert(UID.into(), PodEntry { namespace: "ns".into(), name: "p".into(), ..Default::default() });
        let known = Resolver::new(HostRoot::new(dir.path()), Some(PodCache::fixed(index)), false);
        let again = known.retry(&got.labels, &pending).expect("resolved further");
        assert_eq!((again.labels.namespace.as_str(), again.labels.pod.as_str()), ("ns", "p"));
        assert!(again.pending.is_some(), "container still unknown");
    }
}
