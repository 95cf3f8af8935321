//! The kubelet client against a local HTTPS kubelet stand-in: a throwaway CA
//! and serving certificate made here, a rustls server thread that enforces a
//! bearer token and serves the recorded pod list (tests/fixtures/k8s/
//! pods.json). No root, no network beyond 127.0.0.1.

use std::{
    io::{BufRead, BufReader, Write},
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use watchscope::k8s::{
    Labels, PodRef,
    kubelet::{Kubelet, KubeletConfig, KubeletError, PodCache},
};

const TOKEN: &str = "eyJhbGciOiJSUzI1NiJ9.watchscope-test.c2lnbmF0dXJl";

fn pods_json() -> Vec<u8> {
    std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/k8s/pods.json")).expect("recorded pod list")
}

/// A CA and a serving certificate it signed for `sans`.
struct Pki {
    ca_pem: String,
    cert: CertificateDer<'static>,
    key: Vec<u8>,
}

fn pki(sans: &[&str]) -> Pki {
    let ca_key = KeyPair::generate().expect("CA key");
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, "watchscope test kubelet CA");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let ca_cert = ca.self_signed(&ca_key).expect("self-sign CA");
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().expect("serving key");
    // rcgen turns "127.0.0.1" into an IP SAN, as kubelet serving certs have.
    let mut leaf = CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).expect("params");
    leaf.distinguished_name.push(DnType::CommonName, "system:node:node-1");
    let cert = leaf.signed_by(&key, &issuer).expect("sign serving cert");
    Pki { ca_pem: ca_cert.pem(), cert: cert.der().clone(), key: key.serialize_der() }
}

/// A kubelet stand-in on 127.0.0.1: `GET /pods` with the right bearer token
/// gets `body`; a wrong or missing token gets 401, like a kubelet with
/// webhook authentication.
struct FakeKubelet {
    port: u16,
    body: Arc<Mutex<Vec<u8>>>,
    /// Requests that completed a TLS handshake and were answered.
    served: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl FakeKubelet {
    fn start(pki: &Pki, token: &str, body: Vec<u8>) -> FakeKubelet {
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pki.key.clone()));
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_no_client_auth()
            .with_single_cert(vec![pki.cert.clone()], key)
            .expect("server certificate");
        let config = Arc::new(config);
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("local addr").port();
        let body = Arc::new(Mutex::new(body));
        let served = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (b, s, st, want) = (body.clone(), served.clone(), stop.clone(), format!("Bearer {token}"));
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if st.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(tcp) = conn else { continue };
                // A handshake the client refuses ends here with an error: fine.
                let _ = serve_one(&config, tcp, &want, &b, &s);
            }
        });
        FakeKubelet { port, body, served, stop, thread: Some(thread) }
    }

    fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    fn served(&self) -> usize {
        self.served.load(Ordering::SeqCst)
    }
}

impl Drop for FakeKubelet {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve_one(
    config: &Arc<rustls::ServerConfig>,
    tcp: TcpStream,
    want_auth: &str,
    body: &Mutex<Vec<u8>>,
    served: &AtomicUsize,
) -> std::io::Result<()> {
    tcp.set_read_timeout(Some(Duration::from_secs(5)))?;
    tcp.set_write_timeout(Some(Duration::from_secs(5)))?;
    let conn = rustls::ServerConnection::new(config.clone()).map_err(std::io::Error::other)?;
    let mut tls = BufReader::new(rustls::StreamOwned::new(conn, tcp));
    let mut request_line = String::new();
    tls.read_line(&mut request_line)?;
    let mut auth = None;
    loop {
        let mut line = String::new();
        if tls.read_line(&mut line)? == 0 || line == "\r\n" {
            break;
        }
        if let Some((name, value)) = line.split_once(':')
            && name.eq_ignore_ascii_case("authorization")
        {
            auth = Some(value.trim().to_string());
        }
    }
    let (status, payload) = if !request_line.starts_with("GET /pods ") {
        ("404 Not Found", b"404 page not found\n".to_vec())
    } else if auth.as_deref() != Some(want_auth) {
        ("401 Unauthorized", b"Unauthorized\n".to_vec())
    } else {
        ("200 OK", body.lock().map(|b| b.clone()).unwrap_or_default())
    };
    let stream = tls.get_mut();
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        payload.len()
    );
    stream.write_all(head.as_bytes())?;
    stream.write_all(&payload)?;
    stream.conn.send_close_notify();
    stream.flush()?;
    served.fetch_add(1, Ordering::SeqCst);
    Ok(())
}

/// The token and CA files a pod would have mounted.
struct Secrets {
    dir: tempfile::TempDir,
}

impl Secrets {
    fn new(token: &str, ca_pem: &str) -> Secrets {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("token"), token).expect("token");
        std::fs::write(dir.path().join("ca.crt"), ca_pem).expect("ca");
        Secrets { dir }
    }

    fn token(&self) -> PathBuf {
        self.dir.path().join("token")
    }

    fn config(&self, url: String) -> KubeletConfig {
        KubeletConfig {
            url,
            token_file: self.token(),
            ca_file: self.dir.path().join("ca.crt"),
            timeout: Duration::from_secs(5),
            ..KubeletConfig::default()
        }
    }
}

fn labels(ns: &str, pod: &str, container: &str) -> Option<Labels> {
    Some(Labels { namespace: ns.into(), pod: pod.into(), container: container.into() })
}

/// Real cgroup lines of the recorded pods' containers, one per format.
const GATEWAY_V2_SYSTEMD: &str = "0::/kubepods.slice/kubepods-burstable.slice/\
    kubepods-burstable-pod55bdf5c3_1877_482c_b45c_65bd00063809.slice/\
    cri-containerd-1db931c38638893dec55d0314092ac0189599d8c6b41f6b909b43c9b0d9134f0.scope\n";
const WORKER_V1_CGROUPFS: &str = "12:memory:/kubepods/pod8ecc233d-5d69-478e-b4c4-f196b81221cc/\
    9bbe04f2126ac0516a3fc274ed329cdd6a722b97be41326facf75ca234bf4eb0\n\
    1:name=systemd:/kubepods/pod8ecc233d-5d69-478e-b4c4-f196b81221cc/\
    9bbe04f2126ac0516a3fc274ed329cdd6a722b97be41326facf75ca234bf4eb0\n";
const ETCD_STATIC_V2: &str = "0::/kubepods.slice/kubepods-burstable.slice/\
    kubepods-burstable-podcde09445eeb6ea79dd474d76375f5458.slice/\
    cri-containerd-1f0cb42a309eb44c478d08389a9e419346460ed6dbfab3c77222a94625eaa7a8.scope\n";

fn wait_for(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn fetches_the_pod_list_over_verified_tls_and_maps_cgroup_lines() {
    let pki = pki(&["127.0.0.1"]);
    let kubelet = FakeKubelet::start(&pki, TOKEN, pods_json());
    // A token file as mounted has a trailing newline on some setups.
    let secrets = Secrets::new(&format!("{TOKEN}\n"), &pki.ca_pem);

    let index = Kubelet::new(secrets.config(kubelet.url())).fetch().expect("fetch /pods");
    assert_eq!(index.len(), 3);
    assert_eq!(kubelet.served(), 1);

    let cache = Kubelet::new(secrets.config(kubelet.url())).spawn_refresher().expect("refresher");
    wait_for("the first fetch", Duration::from_secs(10), || cache.generation() >= 1);
    assert_eq!(cache.status().pods, 3);
    assert_eq!(cache.status().last_error, None);
    assert_eq!(
        cache.lookup_cgroup(GATEWAY_V2_SYSTEMD),
        labels("default", "api-gateway-7d9f8b6c5d-x2kqp", "istio-proxy")
    );
    assert_eq!(cache.lookup_cgroup(WORKER_V1_CGROUPFS), labels("team-a", "orders-worker-0", "worker"));
    assert_eq!(cache.lookup_cgroup(ETCD_STATIC_V2), labels("kube-system", "etcd-node-1", "etcd"));
    assert_eq!(cache.lookup_cgroup("0::/user.slice/user-1000.slice/session-4.scope\n"), None);
}

#[test]
fn a_wrong_token_is_surfaced_and_leaves_labels_empty() {
    let pki = pki(&["127.0.0.1"]);
    let kubelet = FakeKubelet::start(&pki, TOKEN, pods_json());
    let secrets = Secrets::new("not-the-token", &pki.ca_pem);
    let cfg = secrets.config(kubelet.url());

    let err = Kubelet::new(cfg.clone()).fetch().expect_err("wrong token must fail");
    assert!(matches!(err, KubeletError::Unauthenticated { .. }), "{err}");
    assert_eq!(err.kind(), "unauthenticated");
    assert!(err.to_string().contains("401"), "{err}");

    // The refresher reports it and lookups find nothing, at once.
    let cache = Kubelet::new(KubeletConfig { refresh_every: Duration::from_millis(50), ..cfg.clone() })
        .spawn_refresher()
        .expect("refresher");
    wait_for("the first error", Duration::from_secs(10), || cache.status().last_error.is_some());
    assert_eq!(cache.generation(), 0);
    assert!(cache.status().last_error.unwrap_or_default().contains("401"));
    let t = Instant::now();
    assert_eq!(cache.lookup_cgroup(GATEWAY_V2_SYSTEMD), None);
    assert!(t.elapsed() < Duration::from_millis(50), "lookup took {:?}", t.elapsed());

    // The token is read for every request: a rotated (now right) token is
    // picked up by the same client and by the running refresher.
    std::fs::write(secrets.token(), TOKEN).expect("rotate token");
    assert_eq!(Kubelet::new(cfg).fetch().map(|i| i.len()).ok(), Some(3));
    // Every 50 ms: the miss above asked for an early fetch, which must never
    // push the periodic one back to miss_refresh_min (5 s by default).
    wait_for("the refresher to recover", Duration::from_secs(2), || cache.generation() >= 1);
    assert_eq!(cache.status().last_error, None);
    assert_eq!(
        cache.lookup_cgroup(GATEWAY_V2_SYSTEMD),
        labels("default", "api-gateway-7d9f8b6c5d-x2kqp", "istio-proxy")
    );
}

#[test]
fn a_wrong_ca_or_name_is_refused_unless_verification_is_off() {
    let served_pki = pki(&["127.0.0.1"]);
    let kubelet = FakeKubelet::start(&served_pki, TOKEN, pods_json());
    let other_ca = pki(&["127.0.0.1"]).ca_pem;
    let secrets = Secrets::new(TOKEN, &other_ca);
    let cfg = secrets.config(kubelet.url());

    let err = Kubelet::new(cfg.clone()).fetch().expect_err("unknown CA must fail");
    assert_eq!(err.kind(), "tls", "{err}");
    assert!(err.to_string().contains("--kubelet-insecure-skip-verify"), "{err}");
    assert_eq!(kubelet.served(), 0, "no request may be sent over an unverified connection");

    // Right CA, but the certificate names another address.
    let misnamed = pki(&["node-2.example", "10.9.9.9"]);
    let kubelet2 = FakeKubelet::start(&misnamed, TOKEN, pods_json());
    let secrets2 = Secrets::new(TOKEN, &misnamed.ca_pem);
    let err = Kubelet::new(secrets2.config(kubelet2.url())).fetch().expect_err("wrong name must fail");
    assert_eq!(err.kind(), "tls", "{err}");
    assert_eq!(kubelet2.served(), 0);

    // --kubelet-insecure-skip-verify: the same wrong CA is accepted.
    let insecure = KubeletConfig { insecure_skip_verify: true, ..cfg };
    assert_eq!(Kubelet::new(insecure).fetch().map(|i| i.len()).ok(), Some(3));
    assert_eq!(kubelet.served(), 1);
}

#[test]
fn no_kubelet_listening_is_a_connect_error() {
    let pki = pki(&["127.0.0.1"]);
    let secrets = Secrets::new(TOKEN, &pki.ca_pem);
    let port = TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("port");
    let err = Kubelet::new(secrets.config(format!("https://127.0.0.1:{port}"))).fetch().expect_err("nothing there");
    assert_eq!(err.kind(), "connect", "{err}");
}

#[test]
fn a_miss_refreshes_early_but_at_most_once_per_interval() {
    let pki = pki(&["127.0.0.1"]);
    // The node starts with no pods; the recorded ones appear later.
    let kubelet = FakeKubelet::start(&pki, TOKEN, br#"{"kind":"PodList","apiVersion":"v1","items":null}"#.to_vec());
    let secrets = Secrets::new(TOKEN, &pki.ca_pem);
    let min = Duration::from_millis(300);
    let cfg = KubeletConfig {
        // Only misses may cause fetches after the first in this test.
        refresh_every: Duration::from_secs(3600),
        miss_refresh_min: min,
        ..secrets.config(kubelet.url())
    };
    let cache: PodCache = Kubelet::new(cfg).spawn_refresher().expect("refresher");
    wait_for("the first fetch", Duration::from_secs(10), || cache.generation() >= 1);
    assert_eq!(kubelet.served(), 1);
    assert_eq!(cache.status().pods, 0);

    if let Ok(mut b) = kubelet.body.lock() {
        *b = pods_json();
    }
    // Hammer lookups of a pod that is not in the snapshot yet.
    let start = Instant::now();
    let mut resolved_after = None;
    while start.elapsed() < Duration::from_millis(1500) {
        if cache.lookup_cgroup(ETCD_STATIC_V2).is_some() && resolved_after.is_none() {
            resolved_after = Some(start.elapsed());
        }
        let unknown = PodRef { pod_uid: "00000000-0000-0000-0000-000000000000".into(), container_id: "0".repeat(64) };
        assert_eq!(cache.lookup(&unknown), None);
        std::thread::sleep(Duration::from_millis(1));
    }
    let resolved_after = resolved_after.expect("the miss led to a fetch that found the pod");
    // The first miss came right after the first fetch: the early fetch waits
    // for `min` after it, then the pod is there.
    assert!(resolved_after < min + Duration::from_millis(700), "resolved after {resolved_after:?}");
    // ~1500 misses in 1.5 s: one fetch per 300 ms at most (+1 for the first,
    // +1 for the interval in progress when the loop ended).
    let n = kubelet.served();
    assert!((3..=7).contains(&n), "{n} requests");

    // Dropping the last handle stops the refresher.
    drop(cache);
    std::thread::sleep(min + Duration::from_millis(300));
    let after_drop = kubelet.served();
    std::thread::sleep(min * 2);
    assert_eq!(kubelet.served(), after_drop, "the refresher kept fetching after its cache was dropped");
}

#[test]
fn periodic_refresh_follows_pod_churn() {
    let pki = pki(&["127.0.0.1"]);
    let kubelet = FakeKubelet::start(&pki, TOKEN, pods_json());
    let secrets = Secrets::new(TOKEN, &pki.ca_pem);
    let cfg = KubeletConfig { refresh_every: Duration::from_millis(100), ..secrets.config(kubelet.url()) };
    let cache = Kubelet::new(cfg).spawn_refresher().expect("refresher");
    wait_for("the first fetch", Duration::from_secs(10), || cache.generation() >= 1);
    assert!(cache.lookup_cgroup(WORKER_V1_CGROUPFS).is_some());
    // The worker pod is deleted: the next periodic fetch forgets it.
    let mut list: serde_json::Value = serde_json::from_slice(&pods_json()).expect("json");
    if let Some(items) = list["items"].as_array_mut() {
        items.retain(|p| p["metadata"]["name"] != "orders-worker-0");
    }
    if let Ok(mut b) = kubelet.body.lock() {
        *b = serde_json::to_vec(&list).expect("json");
    }
    wait_for("the pod to be forgotten", Duration::from_secs(10), || cache.status().pods == 2);
    assert_eq!(cache.lookup_cgroup(WORKER_V1_CGROUPFS), None);
    assert!(cache.lookup_cgroup(GATEWAY_V2_SYSTEMD).is_some());
}
