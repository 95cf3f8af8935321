//! Kubernetes labels end to end: etcd runs in a cgroup named the way the
//! kubelet's cgroupfs driver names a pod's container, a kubelet stand-in
//! serves the pod list over HTTPS, and the agent's watch series get the
//! pod's namespace, pod and container — first empty while the kubelet does
//! not list the pod, then, once it does, on the next scrape.

use std::{
    io::{BufRead, BufReader, Write},
    net::{TcpListener, TcpStream},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use watchscope_integration_tests::{Agent, debug_probes, etcd::Etcd, pod::PodCgroup, wait_until};

const TOKEN: &str = "watchscope-labels-test-token";

/// A kubelet stand-in on 127.0.0.1 with a self-signed certificate (the agent
/// runs with --kubelet-insecure-skip-verify): `GET /pods` with the token
/// gets the current body.
struct Kubelet {
    port: u16,
    body: Arc<Mutex<String>>,
    stop: Arc<AtomicBool>,
}

impl Kubelet {
    fn start(body: String) -> Kubelet {
        let ck = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).expect("cert");
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(ck.signing_key.serialize_der().into());
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(vec![ck.cert.der().clone()], key)
            .expect("server cert");
        let config = Arc::new(config);
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let body = Arc::new(Mutex::new(body));
        let stop = Arc::new(AtomicBool::new(false));
        let (b, st) = (body.clone(), stop.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if st.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(tcp) = conn else { continue };
                let _ = serve(&config, tcp, &b);
            }
        });
        Kubelet { port, body, stop }
    }

    fn set(&self, body: String) {
        *self.body.lock().expect("body") = body;
    }
}

impl Drop for Kubelet {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

fn serve(config: &Arc<rustls::ServerConfig>, tcp: TcpStream, body: &Mutex<String>) -> std::io::Result<()> {
    tcp.set_read_timeout(Some(Duration::from_secs(5)))?;
    let conn = rustls::ServerConnection::new(config.clone()).map_err(std::io::Error::other)?;
    let mut tls = BufReader::new(rustls::StreamOwned::new(conn, tcp));
    let mut request = String::new();
    tls.read_line(&mut request)?;
    let mut authorized = false;
    loop {
        let mut line = String::new();
        if tls.read_line(&mut line)? == 0 || line == "\r\n" {
            break;
        }
        authorized |= line.trim().eq_ignore_ascii_case(&format!("authorization: Bearer {TOKEN}"));
    }
    let (status, payload) = match (request.starts_with("GET /pods "), authorized) {
        (true, true) => ("200 OK", body.lock().map(|b| b.clone()).unwrap_or_default()),
        (true, false) => ("401 Unauthorized", String::new()),
        _ => ("404 Not Found", String::new()),
    };
    let stream = tls.get_mut();
    write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{payload}",
        payload.len()
    )?;
    stream.conn.send_close_notify();
    stream.flush()
}

fn pod_list(pods: &[(&str, &str, &str, &str, &str)]) -> String {
    let items: Vec<serde_json::Value> = pods
        .iter()
        .map(|(uid, ns, name, container, cid)| {
            serde_json::json!({
                "metadata": {"uid": uid, "namespace": ns, "name": name},
                "status": {"containerStatuses": [{"name": container, "containerID": format!("containerd://{cid}")}]}
            })
        })
        .collect();
    serde_json::json!({"kind": "PodList", "apiVersion": "v1", "items": items}).to_string()
}

#[test]
fn watch_series_get_the_pod_labels_once_the_kubelet_lists_the_pod() {
    const N: usize = 10;
    let uid = format!("5b0e3c2a-7d41-4f0e-9a8b-{:012x}", std::process::id());
    let cid = format!("{:064x}", u128::from(std::process::id()) * 0x9e37_79b9_7f4a_7c15);
    let (server, client) = ("wse-k8s", "wsc-k8s");
    let kubelet = Kubelet::start(pod_list(&[]));
    let secrets = tempfile::tempdir().expect("temp dir");
    let token = secrets.path().join("token");
    std::fs::write(&token, TOKEN).expect("token");

    let cgroup = PodCgroup::create(&uid, &cid);
    let etcd = Etcd::start(server, client);
    cgroup.enter(etcd.pid());
    let cgroup_text = std::fs::read_to_string(format!("/proc/{}/cgroup", etcd.pid())).expect("cgroup");
    assert!(cgroup_text.contains(&format!("pod{uid}/{cid}")), "{cgroup_text}");

    let agent = Agent::start(&[
        "--comm",
        &format!("{server},{client}"),
        "--kubelet-url",
        &format!("https://127.0.0.1:{}", kubelet.port),
        "--kubelet-insecure-skip-verify=true",
        "--kubelet-token-file",
        token.to_str().expect("path"),
    ]);
    let watch = etcd.watch("/k/");
    let attached = wait_until(Duration::from_secs(10), || {
        let bins = debug_probes(&agent)["binaries"].as_array().cloned().unwrap_or_default();
        [etcd.pid(), watch.pid()].iter().all(|pid| {
            bins.iter().any(|b| {
                b["attached"] == true
                    && b["processes"].as_array().is_some_and(|p| p.iter().any(|p| p.as_u64() == Some(u64::from(*pid))))
            })
        })
    });
    assert!(attached, "{}", agent.log_text());
    etcd.wait_watchers(1, Duration::from_secs(10));

    // The kubelet does not list the pod yet: the labels stay empty.
    let bare = format!("watchscope_watch_events_total{{side=\"server\",comm=\"{server}\"}}");
    let in_pod = format!(
        "watchscope_watch_events_total{{side=\"server\",namespace=\"etcd-ns\",pod=\"etcd-0\",container=\"etcd\",\
         comm=\"{server}\"}}"
    );
    for i in 0..3 {
        etcd.put(&format!("/k/a{i}"), "v");
    }
    assert_eq!(agent.wait_for_sample(&bare, 3.0, Duration::from_secs(5)), 3.0, "{}", agent.metrics());

    // Now it does: the agent looks the pending process up again when the
    // pod cache has fetched since (a miss asks for a fetch at most every 5 s).
    kubelet.set(pod_list(&[(&uid, "etcd-ns", "etcd-0", "etcd", &cid)]));
    let mut puts = 3;
    let labelled = wait_until(Duration::from_secs(40), || {
        etcd.put(&format!("/k/b{puts}"), "v");
        puts += 1;
        std::thread::sleep(Duration::from_millis(500));
        agent.sample(&in_pod) >= 1.0
    });
    assert!(labelled, "no pod labels after {puts} puts:\n{}\n{}", agent.metrics(), agent.log_text());
    // etcd sends (and counts) an event after the put returns: once the
    // watcher printed every put, the counts are final.
    assert_eq!(watch.wait_count(|l| l == "PUT", puts, Duration::from_secs(10)), puts);
    let (before_pod, before_bare) = (agent.sample(&in_pod), agent.sample(&bare));
    for i in 0..N {
        etcd.put(&format!("/k/c{i}"), "v");
    }
    let total = (puts + N) as f64;
    assert_eq!(watch.wait_count(|l| l == "PUT", puts + N, Duration::from_secs(10)), puts + N);
    agent.wait_for_sample(&in_pod, before_pod + N as f64, Duration::from_secs(5));
    let text = agent.metrics();
    assert_eq!(agent.sample(&in_pod), before_pod + N as f64, "{text}");
    assert_eq!(agent.sample(&bare), before_bare, "the old series stops growing: {text}");
    assert_eq!(agent.sample(&in_pod) + agent.sample(&bare), total, "every event counted once: {text}");
    // The etcdctl client is not in a pod: its labels stay empty.
    let client_events = format!("watchscope_watch_events_total{{side=\"client\",comm=\"{client}\"}}");
    assert_eq!(agent.sample(&client_events), total, "{text}");
    // Label order on the wire: the family's, then namespace, pod, container, comm.
    let line = format!(
        "watchscope_watch_events_total{{side=\"server\",namespace=\"etcd-ns\",pod=\"etcd-0\",container=\"etcd\",\
         comm=\"{server}\"}} "
    );
    assert!(text.lines().any(|l| l.starts_with(&line)), "{text}");
    drop(watch);
    drop(etcd);
    drop(cgroup);
}
