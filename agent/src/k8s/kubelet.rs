//! The kubelet's pod list, fetched off the hot path and read from a snapshot.
//!
//! [`Kubelet`] makes one request: `GET <url>/pods` with the service account's
//! bearer token, over TLS checked against a CA file (or not checked, when
//! asked). [`PodIndex`] is what the answer says, keyed the way cgroups name
//! things (pod UID, container ID). [`PodCache`] holds the current index for
//! lookups and is refreshed by a thread of its own, every
//! [`KubeletConfig::refresh_every`] and, when a lookup misses, sooner — but
//! at most once per [`KubeletConfig::miss_refresh_min`]: a lookup never
//! waits for the network.

use std::{
    collections::{HashMap, HashSet},
    io,
    path::PathBuf,
    sync::{
        Arc, PoisonError, RwLock,
        atomic::{AtomicU64, Ordering},
        mpsc::{Receiver, RecvTimeoutError, SyncSender},
    },
    time::{Duration, Instant},
};

use serde::Deserialize;
use tracing::{debug, info, warn};

use super::{
    Labels,
    cgroup::{self, PodRef},
};

/// The kubelet of this node as seen from the node itself (the agent run
/// outside Kubernetes, or a `hostNetwork: true` pod). A pod on the pod
/// network reaches it at the node's IP instead: the DaemonSet passes
/// `https://$(NODE_IP):10250`.
pub const DEFAULT_URL: &str = "https://127.0.0.1:10250";
/// Where Kubernetes mounts the pod's service account token (a projected
/// token the kubelet rotates: it is read again for every request).
pub const DEFAULT_TOKEN_FILE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";
/// The cluster CA next to the token. It verifies the kubelet only where the
/// kubelet's serving certificate is signed by the cluster CA
/// (`serverTLSBootstrap: true`, and most managed clusters); a kubelet with a
/// self-signed certificate needs `insecure_skip_verify`.
pub const DEFAULT_CA_FILE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt";

/// The largest pod list read (110 pods with full specs is a few MB).
const MAX_BODY: u64 = 64 << 20;

#[derive(Clone, Debug)]
pub struct KubeletConfig {
    /// Base URL; `/pods` is appended.
    pub url: String,
    pub token_file: PathBuf,
    pub ca_file: PathBuf,
    /// Accept any server certificate (the CA file is then not read).
    pub insecure_skip_verify: bool,
    /// How often the pod list is fetched without being asked.
    pub refresh_every: Duration,
    /// The least time between two fetches triggered by lookup misses.
    pub miss_refresh_min: Duration,
    /// Whole-request deadline, connect to last body byte.
    pub timeout: Duration,
}

impl Default for KubeletConfig {
    fn default() -> Self {
        Self {
            url: DEFAULT_URL.to_string(),
            token_file: PathBuf::from(DEFAULT_TOKEN_FILE),
            ca_file: PathBuf::from(DEFAULT_CA_FILE),
            insecure_skip_verify: false,
            refresh_every: Duration::from_secs(30),
            miss_refresh_min: Duration::from_secs(5),
            timeout: Duration::from_secs(10),
        }
    }
}

/// Why a pod list could not be had. [`KubeletError::kind`] names the kind,
/// for logging each kind once.
#[derive(Debug, thiserror::Error)]
pub enum KubeletError {
    #[error("cannot read the service account token {path}: {cause}")]
    Token { path: PathBuf, cause: io::Error },
    #[error("the service account token file {path} is empty")]
    EmptyToken { path: PathBuf },
    #[error("cannot read the kubelet CA file {path}: {cause}")]
    CaFile { path: PathBuf, cause: io::Error },
    #[error("no usable PEM certificate in the kubelet CA file {path}")]
    CaEmpty { path: PathBuf },
    #[error(
        "TLS with the kubelet at {url} failed: {cause} (is its serving certificate signed by the CA file and valid \
         for this address? a self-signed kubelet certificate needs --kubelet-insecure-skip-verify)"
    )]
    Tls { url: String, cause: ureq::Error },
    #[error(
        "the kubelet at {url} rejected the bearer token (HTTP 401): is webhook authentication on \
         (--authentication-token-webhook), and the token current?"
    )]
    Unauthenticated { url: String },
    #[error(
        "the kubelet at {url} refused the pod list (HTTP 403): the service account needs `get` on nodes/pods \
         (Kubernetes 1.33+) or nodes/proxy"
    )]
    Forbidden { url: String },
    #[error("the kubelet at {url} answered HTTP {status}")]
    Status { url: String, status: u16 },
    #[error("cannot reach the kubelet at {url}: {cause}")]
    Connect { url: String, cause: ureq::Error },
    #[error("bad pod list from the kubelet: {0}")]
    PodList(#[from] serde_json::Error),
    #[error("cannot start the kubelet refresher thread: {0}")]
    Spawn(io::Error),
}

impl KubeletError {
    /// A stable short name of the kind of failure.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Token { .. } | Self::EmptyToken { .. } => "token",
            Self::CaFile { .. } | Self::CaEmpty { .. } => "ca_file",
            Self::Tls { .. } => "tls",
            Self::Unauthenticated { .. } => "unauthenticated",
            Self::Forbidden { .. } => "forbidden",
            Self::Status { .. } => "status",
            Self::Connect { .. } => "connect",
            Self::PodList(_) => "pod_list",
            Self::Spawn(_) => "spawn",
        }
    }
}

/// A client of one kubelet's read-only pod list.
#[derive(Clone, Debug)]
pub struct Kubelet {
    cfg: KubeletConfig,
}

impl Kubelet {
    pub fn new(cfg: KubeletConfig) -> Self {
        Self { cfg }
    }

    pub fn config(&self) -> &KubeletConfig {
        &self.cfg
    }

    /// One `GET /pods`, blocking up to [`KubeletConfig::timeout`]. The token
    /// and the CA are read afresh each time: both are rotated in place.
    pub fn fetch(&self) -> Result<PodIndex, KubeletError> {
        let cfg = &self.cfg;
        let url = format!("{}/pods", cfg.url.trim_end_matches('/'));
        let token = std::fs::read_to_string(&cfg.token_file)
            .map_err(|cause| KubeletError::Token { path: cfg.token_file.clone(), cause })?;
        let token = token.trim();
        if token.is_empty() {
            return Err(KubeletError::EmptyToken { path: cfg.token_file.clone() });
        }
        let mut tls = ureq::tls::TlsConfig::builder();
        if cfg.insecure_skip_verify {
            tls = tls.disable_verification(true);
        } else {
            tls = tls.root_certs(ureq::tls::RootCerts::new_with_certs(&read_ca(&cfg.ca_file)?));
        }
        let agent = ureq::Agent::new_with_config(
            ureq::Agent::config_builder()
                .tls_config(tls.build())
                // The kubelet is on this node: never through HTTPS_PROXY.
                .proxy(None)
                // Nothing legitimate redirects here; a redirect must not carry the token elsewhere.
                .max_redirects(0)
                .http_status_as_error(false)
                .timeout_global(Some(cfg.timeout))
                .build(),
        );
        let mut resp = agent
            .get(&url)
            .header("Authorization", format!("Bearer {token}"))
            .header("Accept", "application/json")
            .call()
            .map_err(|cause| classify(&url, cause))?;
        match resp.status().as_u16() {
            200 => {}
            401 => return Err(KubeletError::Unauthenticated { url }),
            403 => return Err(KubeletError::Forbidden { url }),
            status => return Err(KubeletError::Status { url, status }),
        }
        let body =
            resp.body_mut().with_config().limit(MAX_BODY).read_to_vec().map_err(|cause| classify(&url, cause))?;
        PodIndex::from_json(&body)
    }

    /// Starts the refresher thread and returns the cache it keeps current.
    /// The first fetch starts at once, on that thread; until it succeeds,
    /// lookups find nothing. The thread ends when the last clone of the
    /// returned cache is dropped (after its request in flight, if any).
    pub fn spawn_refresher(self) -> Result<PodCache, KubeletError> {
        let shared = Arc::new(Shared::default());
        // One pending request is enough: the fetch it causes answers every
        // miss seen before it.
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let thread_shared = shared.clone();
        std::thread::Builder::new()
            .name("kubelet-pods".into())
            .spawn(move || refresh_loop(self, &thread_shared, &rx))
            .map_err(KubeletError::Spawn)?;
        Ok(PodCache { shared, refresh: Some(tx) })
    }
}

fn read_ca(path: &PathBuf) -> Result<Vec<ureq::tls::Certificate<'static>>, KubeletError> {
    let pem = std::fs::read(path).map_err(|cause| KubeletError::CaFile { path: path.clone(), cause })?;
    // Every certificate in the bundle; keys or garbage between them are skipped.
    let certs: Vec<_> = ureq::tls::parse_pem(&pem)
        .filter_map(|item| match item {
            Ok(ureq::tls::PemItem::Certificate(c)) => Some(c),
            _ => None,
        })
        .collect();
    if certs.is_empty() {
        return Err(KubeletError::CaEmpty { path: path.clone() });
    }
    Ok(certs)
}

/// TLS failures arrive as rustls errors, or as I/O errors of kind
/// InvalidData wrapping one (how rustls reports a failed handshake through
/// a stream); everything else is "cannot reach".
fn classify(url: &str, cause: ureq::Error) -> KubeletError {
    let tls = match &cause {
        ureq::Error::Rustls(_) | ureq::Error::Tls(_) | ureq::Error::Pem(_) => true,
        ureq::Error::Io(e) => e.kind() == io::ErrorKind::InvalidData,
        _ => false,
    };
    let url = url.to_string();
    if tls { KubeletError::Tls { url, cause } } else { KubeletError::Connect { url, cause } }
}

/// One pod as the cache keeps it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodEntry {
    pub namespace: String,
    pub name: String,
    /// Container ID (without the runtime scheme) → container name, for
    /// init, regular and ephemeral containers that have started.
    pub containers: HashMap<String, String>,
}

/// The pods the kubelet runs, by UID.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodIndex {
    pub pods: HashMap<String, PodEntry>,
}

impl PodIndex {
    /// Parses a `v1.PodList` (what the kubelet's `/pods` returns). Pods
    /// without a UID are skipped; containers without an ID yet (still
    /// waiting to be created) are left out.
    pub fn from_json(json: &[u8]) -> Result<PodIndex, KubeletError> {
        let list: wire::PodList = serde_json::from_slice(json)?;
        if let Some(kind) = list.kind.as_deref().filter(|k| *k != "PodList") {
            return Err(KubeletError::PodList(serde::de::Error::custom(format_args!("kind {kind:?}, not PodList"))));
        }
        let items = list.items.unwrap_or_default();
        let mut pods = HashMap::with_capacity(items.len());
        for pod in items {
            if pod.metadata.uid.is_empty() {
                continue;
            }
            let s = pod.status;
            let containers = [s.init_container_statuses, s.container_statuses, s.ephemeral_container_statuses]
                .into_iter()
                .flatten() // the Options
                .flatten() // the statuses
                .filter_map(|c| Some((strip_scheme(&c.container_id)?.to_string(), c.name)))
                .collect();
            let entry = PodEntry { namespace: pod.metadata.namespace, name: pod.metadata.name, containers };
            pods.insert(pod.metadata.uid.to_ascii_lowercase(), entry);
        }
        Ok(PodIndex { pods })
    }

    /// The labels of a pod's container. A known pod with an unknown
    /// container (its sandbox "pause" process, or a container started after
    /// this index was made) still gets its namespace and pod, with an empty
    /// container name.
    pub fn get(&self, r: &PodRef) -> Option<Labels> {
        let pod = self.pods.get(&r.pod_uid)?;
        Some(Labels {
            namespace: pod.namespace.clone(),
            pod: pod.name.clone(),
            container: pod.containers.get(&r.container_id).cloned().unwrap_or_default(),
        })
    }

    pub fn len(&self) -> usize {
        self.pods.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pods.is_empty()
    }
}

/// `containerd://<id>`, `cri-o://<id>`, `docker://<id>` → `<id>`; None for
/// an empty or scheme-less ID.
fn strip_scheme(id: &str) -> Option<&str> {
    let (_, id) = id.split_once("://")?;
    (!id.is_empty()).then_some(id)
}

/// The few fields of `v1.PodList` that are read; everything else is ignored.
mod wire {
    use super::Deserialize;

    #[derive(Deserialize)]
    pub struct PodList {
        /// "PodList" when present; anything else is not a pod list.
        #[serde(default)]
        pub kind: Option<String>,
        /// Go writes an empty list as `null`.
        #[serde(default)]
        pub items: Option<Vec<Pod>>,
    }

    #[derive(Deserialize)]
    pub struct Pod {
        #[serde(default)]
        pub metadata: Metadata,
        #[serde(default)]
        pub status: Status,
    }

    #[derive(Deserialize, Default)]
    pub struct Metadata {
        #[serde(default)]
        pub name: String,
        #[serde(default)]
        pub namespace: String,
        #[serde(default)]
        pub uid: String,
    }

    #[derive(Deserialize, Default)]
    #[serde(rename_all = "camelCase")]
    pub struct Status {
        // `null` is what Go's encoder writes for an empty slice in some
        // versions: Option, then flattened.
        #[serde(default)]
        pub init_container_statuses: Option<Vec<ContainerStatus>>,
        #[serde(default)]
        pub container_statuses: Option<Vec<ContainerStatus>>,
        #[serde(default)]
        pub ephemeral_container_statuses: Option<Vec<ContainerStatus>>,
    }

    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct ContainerStatus {
        #[serde(default)]
        pub name: String,
        #[serde(default, rename = "containerID")]
        pub container_id: String,
    }
}

/// What the lookups read and the refresher writes.
#[derive(Default)]
struct Shared {
    index: RwLock<Arc<PodIndex>>,
    /// Successful fetches so far.
    generation: AtomicU64,
    last_error: RwLock<Option<String>>,
}

/// The current pod index, kept fresh by [`Kubelet::spawn_refresher`]. Cheap
/// to clone; every method returns at once.
#[derive(Clone)]
pub struct PodCache {
    shared: Arc<Shared>,
    refresh: Option<SyncSender<()>>,
}

impl std::fmt::Debug for PodCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PodCache").field("status", &self.status()).finish()
    }
}

/// How the refresher is doing, for logs and debug endpoints.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CacheStatus {
    /// Successful fetches so far (0: no pod list yet).
    pub generation: u64,
    pub pods: usize,
    /// The last fetch's error, cleared by the next success.
    pub last_error: Option<String>,
}

impl PodCache {
    /// A cache that holds `index` and is never refreshed (tests, and callers
    /// that fetch by themselves).
    pub fn fixed(index: PodIndex) -> Self {
        let shared = Shared { index: RwLock::new(Arc::new(index)), ..Shared::default() };
        shared.generation.store(1, Ordering::Relaxed);
        Self { shared: Arc::new(shared), refresh: None }
    }

    /// The labels of the container `r` names. A miss (unknown pod, or known
    /// pod with an unknown container) asks the refresher for an early fetch,
    /// without waiting for it: look up again after [`Self::generation`]
    /// changes.
    pub fn lookup(&self, r: &PodRef) -> Option<Labels> {
        let found = self.index().get(r);
        if found.as_ref().is_none_or(|l| l.container.is_empty())
            && let Some(tx) = &self.refresh
        {
            // Full: a fetch is already asked for. Disconnected: the
            // refresher is gone; the snapshot stays as it was. Neither waits.
            let _ = tx.try_send(());
        }
        found
    }

    /// [`Self::lookup`] for a process's `/proc/<pid>/cgroup` text; None for a
    /// process outside any pod.
    pub fn lookup_cgroup(&self, cgroup_text: &str) -> Option<Labels> {
        self.lookup(&cgroup::parse(cgroup_text)?)
    }

    /// Successful fetches so far: a caller that saw a miss looks up again
    /// once this has moved on.
    pub fn generation(&self) -> u64 {
        self.shared.generation.load(Ordering::Acquire)
    }

    pub fn status(&self) -> CacheStatus {
        CacheStatus {
            generation: self.generation(),
            pods: self.index().len(),
            last_error: self.shared.last_error.read().unwrap_or_else(PoisonError::into_inner).clone(),
        }
    }

    /// The current snapshot (the lock is held only to clone the `Arc`).
    pub fn index(&self) -> Arc<PodIndex> {
        self.shared.index.read().unwrap_or_else(PoisonError::into_inner).clone()
    }
}

/// Fetch now, then every `refresh_every`, or on a miss no sooner than
/// `miss_refresh_min` after the previous fetch; until every sender is gone.
fn refresh_loop(kubelet: Kubelet, shared: &Shared, rx: &Receiver<()>) {
    let cfg = kubelet.config().clone();
    // Kinds already logged at warn level since the last success.
    let mut logged: HashSet<&'static str> = HashSet::new();
    loop {
        let started = Instant::now();
        match kubelet.fetch() {
            Ok(index) => {
                let pods = index.len();
                *shared.index.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(index);
                let generation = shared.generation.fetch_add(1, Ordering::AcqRel) + 1;
                *shared.last_error.write().unwrap_or_else(PoisonError::into_inner) = None;
                if generation == 1 || !logged.is_empty() {
                    info!(url = %cfg.url, pods, "kubelet pod list fetched");
                } else {
                    debug!(url = %cfg.url, pods, "kubelet pod list refreshed");
                }
                logged.clear();
            }
            Err(e) => {
                // The last good index stays: pod UIDs and container IDs are
                // never reused, so a stale entry cannot label the wrong pod.
                if logged.insert(e.kind()) {
                    warn!(kind = e.kind(), "kubelet pod list unavailable, Kubernetes labels stay empty: {e}");
                } else {
                    debug!(kind = e.kind(), "kubelet pod list still unavailable: {e}");
                }
                *shared.last_error.write().unwrap_or_else(PoisonError::into_inner) = Some(e.to_string());
            }
        }
        // Misses seen while fetching were answered by this fetch (as well as
        // it can be): drop them.
        while rx.try_recv().is_ok() {}
        match rx.recv_timeout(cfg.refresh_every.saturating_sub(started.elapsed())) {
            Ok(()) => {
                // Never later than the periodic fetch would have been.
                let earliest = started + cfg.miss_refresh_min.min(cfg.refresh_every);
                std::thread::sleep(earliest.saturating_duration_since(Instant::now()));
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PODS: &str = include_str!("../../../tests/fixtures/k8s/pods.json");

    fn labels(ns: &str, pod: &str, container: &str) -> Option<Labels> {
        Some(Labels { namespace: ns.into(), pod: pod.into(), container: container.into() })
    }

    #[test]
    fn errors_and_cache_cross_threads() {
        // The daemon keeps the cache in its tokio tasks and wraps errors in anyhow.
        fn send_sync<T: Send + Sync + 'static>() {}
        send_sync::<KubeletError>();
        send_sync::<PodCache>();
        send_sync::<Kubelet>();
    }

    #[test]
    fn indexes_the_recorded_pod_list() {
        let idx = PodIndex::from_json(PODS.as_bytes()).unwrap();
        assert_eq!(idx.len(), 3);
        let gw = &idx.pods["55bdf5c3-1877-482c-b45c-65bd00063809"];
        assert_eq!((gw.namespace.as_str(), gw.name.as_str()), ("default", "api-gateway-7d9f8b6c5d-x2kqp"));
        let mut names: Vec<_> = gw.containers.values().map(String::as_str).collect();
        names.sort();
        assert_eq!(names, ["gateway", "istio-init", "istio-proxy"]);
        assert_eq!(
            gw.containers.get("1db931c38638893dec55d0314092ac0189599d8c6b41f6b909b43c9b0d9134f0").map(String::as_str),
            Some("istio-proxy")
        );
        // The static pod keeps its 32-hex UID.
        assert_eq!(idx.pods["cde09445eeb6ea79dd474d76375f5458"].name, "etcd-node-1");
        // A restarted container: the current ID only, not lastState's.
        let w = &idx.pods["8ecc233d-5d69-478e-b4c4-f196b81221cc"];
        assert_eq!(w.containers.len(), 1);
        assert!(w.containers.contains_key("9bbe04f2126ac0516a3fc274ed329cdd6a722b97be41326facf75ca234bf4eb0"));
    }

    #[test]
    fn looks_up_cgroup_lines() {
        let cache = PodCache::fixed(PodIndex::from_json(PODS.as_bytes()).unwrap());
        let line = "0::/kubepods.slice/kubepods-burstable.slice/\
                    kubepods-burstable-pod55bdf5c3_1877_482c_b45c_65bd00063809.slice/\
                    cri-containerd-55d63a84455e0ffd2f752f1b035ae777cad32500ba78cfcd57bd442491f8ff64.scope\n";
        assert_eq!(cache.lookup_cgroup(line), labels("default", "api-gateway-7d9f8b6c5d-x2kqp", "gateway"));
        let guaranteed = "0::/kubepods.slice/kubepods-pod8ecc233d_5d69_478e_b4c4_f196b81221cc.slice/\
                          cri-containerd-9bbe04f2126ac0516a3fc274ed329cdd6a722b97be41326facf75ca234bf4eb0.scope";
        assert_eq!(cache.lookup_cgroup(guaranteed), labels("team-a", "orders-worker-0", "worker"));
        let etcd = "0::/kubepods/burstable/podcde09445eeb6ea79dd474d76375f5458/\
                    1f0cb42a309eb44c478d08389a9e419346460ed6dbfab3c77222a94625eaa7a8";
        assert_eq!(cache.lookup_cgroup(etcd), labels("kube-system", "etcd-node-1", "etcd"));
        // The pod's sandbox (pause) container: pod known, container not.
        let pause = "0::/kubepods/burstable/pod55bdf5c3-1877-482c-b45c-65bd00063809/\
                     aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
        assert_eq!(cache.lookup_cgroup(pause), labels("default", "api-gateway-7d9f8b6c5d-x2kqp", ""));
        // A pod this kubelet does not run, and a process in no pod.
        let other = "0::/kubepods/burstable/pod00000000-0000-0000-0000-000000000000/\
                     aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
        assert_eq!(cache.lookup_cgroup(other), None);
        assert_eq!(cache.lookup_cgroup("0::/user.slice/user-1000.slice/session-2.scope"), None);
        assert_eq!(cache.status(), CacheStatus { generation: 1, pods: 3, last_error: None });
    }

    #[test]
    fn tolerates_sparse_and_null_fields() {
        let json = br#"{"items":[
            {"metadata":{"name":"a","namespace":"n","uid":"U1"},"status":{"containerStatuses":null}},
            {"metadata":{"name":"b","namespace":"n","uid":"u2"},"status":{"containerStatuses":[
                {"name":"waiting","containerID":""},{"name":"noscheme","containerID":"abc"},
                {"name":"c","containerID":"cri-o://abc"},{"name":"d","containerID":"docker://def"}]}},
            {"metadata":{"name":"nouid","namespace":"n"}},
            {}
        ]}"#;
        let idx = PodIndex::from_json(json).unwrap();
        assert_eq!(idx.len(), 2);
        assert!(idx.pods["u1"].containers.is_empty(), "UIDs are matched lowercase");
        let b = &idx.pods["u2"].containers;
        assert_eq!(b.len(), 2);
        assert_eq!(b.get("abc").map(String::as_str), Some("c"));
        assert_eq!(b.get("def").map(String::as_str), Some("d"));
        assert_eq!(PodIndex::from_json(b"{}").map(|i| i.len()).ok(), Some(0));
        assert_eq!(PodIndex::from_json(br#"{"kind":"PodList","items":null}"#).map(|i| i.len()).ok(), Some(0));
        let bad_cases =
            [&b""[..], b"{\"items\":{}}", b"\xff", b"{\"items\":[{\"metadata\":7}]}", b"{\"kind\":\"Status\"}"];
        for bad in bad_cases {
            let err = PodIndex::from_json(bad).unwrap_err();
            assert_eq!(err.kind(), "pod_list", "{err}");
        }
    }

    #[test]
    fn missing_token_and_ca_files_are_reported_before_any_request() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = KubeletConfig {
            // A port nothing listens on: the checks below must fail first.
            url: "https://127.0.0.1:9".into(),
            token_file: dir.path().join("token"),
            ca_file: dir.path().join("ca.crt"),
            ..KubeletConfig::default()
        };
        assert_eq!(Kubelet::new(cfg.clone()).fetch().unwrap_err().kind(), "token");
        std::fs::write(&cfg.token_file, "  \n").unwrap();
        assert!(matches!(Kubelet::new(cfg.clone()).fetch(), Err(KubeletError::EmptyToken { .. })));
        std::fs::write(&cfg.token_file, "t0ken\n").unwrap();
        assert_eq!(Kubelet::new(cfg.clone()).fetch().unwrap_err().kind(), "ca_file");
        std::fs::write(&cfg.ca_file, "not a certificate\n").unwrap();
        assert!(matches!(Kubelet::new(cfg.clone()).fetch(), Err(KubeletError::CaEmpty { .. })));
        cfg.insecure_skip_verify = true;
        let err = Kubelet::new(cfg).fetch().unwrap_err();
        assert_eq!(err.kind(), "connect", "{err}");
    }

    #[test]
    fn refresher_without_kubelet_never_blocks_lookups() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = KubeletConfig {
            url: "https://127.0.0.1:9".into(),
            token_file: dir.path().join("absent"),
            refresh_every: Duration::from_millis(20),
            miss_refresh_min: Duration::from_millis(10),
            ..KubeletConfig::default()
        };
        let cache = Kubelet::new(cfg).spawn_refresher().unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while cache.status().last_error.is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        let st = cache.status();
        assert_eq!((st.generation, st.pods), (0, 0));
        assert!(st.last_error.as_deref().unwrap_or("").contains("service account token"), "{st:?}");
        let t = Instant::now();
        for _ in 0..1000 {
            let r = PodRef { pod_uid: "u".into(), container_id: "c".into() };
            assert_eq!(cache.lookup(&r), None);
        }
        assert!(t.elapsed() < Duration::from_secs(1), "1000 missing lookups took {:?}", t.elapsed());
    }
}
