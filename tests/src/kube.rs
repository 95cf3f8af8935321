//! A real Kubernetes API server on loopback for the watch-path tests:
//! `apiextensions-apiserver` (generic apiserver, etcd3 storage, watch
//! cache, HTTP watch: the code kube-apiserver 1.36 runs) built from Debian
//! sid's 0.36 sources ([`clientgo::apiserver`]), in front of a real etcd,
//! serving one custom resource definition (`etcdclusters.ws.example.com`,
//! cluster-scoped). Clients authenticate with a certificate in the
//! `system:masters` group, which is always authorized, so the server needs
//! no kube-apiserver to ask.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use crate::{
    clientgo,
    etcd::{Etcd, LineReader, copy_binary},
    free_port, stop_child, wait_until,
};

pub const GROUP: &str = "ws.example.com";
pub const PLURAL: &str = "etcdclusters";

pub struct ApiServer {
    child: Option<Child>,
    pub bin: PathBuf,
    pub dir: tempfile::TempDir,
    pub port: u16,
    etcd: String,
}

impl ApiServer {
    /// Starts the API server as `comm` against `etcd`, and waits until it
    /// serves the custom resource.
    pub fn start(etcd: &Etcd, comm: &str) -> ApiServer {
        let dir = tempfile::tempdir().expect("temp dir");
        let bin = copy_binary(clientgo::apiserver(), dir.path(), comm);
        certificates(dir.path());
        let mut s = ApiServer { child: None, bin, dir, port: free_port(), etcd: etcd.endpoint() };
        s.spawn();
        s.create_crd();
        s
    }

    fn spawn(&mut self) {
        let d = self.dir.path();
        let log = std::fs::OpenOptions::new().create(true).append(true).open(d.join("apiserver.log")).expect("log");
        std::fs::write(d.join("kubeconfig"), self.kubeconfig()).expect("kubeconfig");
        let kc = d.join("kubeconfig").display().to_string();
        let child = Command::new(&self.bin)
            .args([
                &format!("--etcd-servers={}", self.etcd),
                "--bind-address=127.0.0.1",
                &format!("--secure-port={}", self.port),
                &format!("--cert-dir={}", d.join("serving").display()),
                &format!("--client-ca-file={}", d.join("ca.crt").display()),
                &format!("--kubeconfig={kc}"),
                &format!("--authentication-kubeconfig={kc}"),
                &format!("--authorization-kubeconfig={kc}"),
                "--authentication-skip-lookup",
                "--authentication-tolerate-lookup-failure",
                "--enable-priority-and-fairness=false",
                "--disable-admission-plugins=NamespaceLifecycle,MutatingAdmissionWebhook,ValidatingAdmissionWebhook,ValidatingAdmissionPolicy,MutatingAdmissionPolicy",
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start the API server");
        self.child = Some(child);
        let ok = wait_until(Duration::from_secs(60), || {
            self.request("GET", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", None).0 == 200
        });
        assert!(ok, "API server not serving:\n{}", self.log());
    }

    fn kubeconfig(&self) -> String {
        let d = self.dir.path().display();
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: ws\n  cluster:\n    server: https://127.0.0.1:{}\n    \
             insecure-skip-tls-verify: true\nusers:\n- name: admin\n  user:\n    client-certificate: {d}/admin.crt\n    \
             client-key: {d}/admin.key\ncontexts:\n- name: ws\n  context:\n    cluster: ws\n    user: admin\n\
             current-context: ws\n",
            self.port
        )
    }

    /// Stops the server (SIGTERM) and starts it again on the same port,
    /// and waits until the custom resource's watch cache serves watches
    /// again (until then they are refused: "storage is (re)initializing").
    pub fn restart(&mut self) {
        self.restart_spawn();
        self.wait_serving();
    }

    /// Stops the API server and starts a new one, without waiting for it.
    pub fn restart_spawn(&mut self) {
        if let Some(mut c) = self.child.take() {
            stop_child(&mut c);
        }
        self.spawn();
    }

    /// Waits until a (re)started API server serves watches again.
    pub fn wait_serving(&self) {
        let ok = wait_until(Duration::from_secs(30), || {
            let (code, body) = self.request("GET", &format!("{}?watch=1&timeoutSeconds=1", self.collection()), None);
            code == 200 && !body.contains("TooManyRequests")
        });
        assert!(ok, "the restarted API server never served a watch:\n{}", self.log());
    }

    pub fn kubeconfig_path(&self) -> PathBuf {
        self.dir.path().join("kubeconfig")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("apiserver.log")).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    fn curl(&self) -> Command {
        let d = self.dir.path();
        let mut c = Command::new("curl");
        c.args(["-sk", "--cert"]).arg(d.join("admin.crt")).arg("--key").arg(d.join("admin.key"));
        c
    }

    /// One request; (HTTP status, body).
    pub fn request(&self, method: &str, path: &str, body: Option<(&str, &str)>) -> (u16, String) {
        let mut c = self.curl();
        c.args(["-X", method, "-w", "\n%{http_code}"]);
        if let Some((ctype, data)) = body {
            c.args(["-H", &format!("Content-Type: {ctype}"), "--data-binary", data]);
        }
        let o = c.arg(format!("https://127.0.0.1:{}{path}", self.port)).output().expect("curl");
        let text = String::from_utf8_lossy(&o.stdout).to_string();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
        (code.trim().parse().unwrap_or(0), body.to_string())
    }

    fn create_crd(&self) {
        let crd = format!(
            r#"{{"apiVersion":"apiextensions.k8s.io/v1","kind":"CustomResourceDefinition",
            "metadata":{{"name":"{PLURAL}.{GROUP}"}},
            "spec":{{"group":"{GROUP}","scope":"Cluster",
              "names":{{"plural":"{PLURAL}","singular":"etcdcluster","kind":"EtcdCluster","listKind":"EtcdClusterList"}},
              "versions":[{{"name":"v1","served":true,"storage":true,
                "schema":{{"openAPIV3Schema":{{"type":"object","x-kubernetes-preserve-unknown-fields":true}}}}}}]}}}}"#
        );
        let (code, body) = self.request(
            "POST",
            "/apis/apiextensions.k8s.io/v1/customresourcedefinitions",
            Some(("application/json", &crd)),
        );
        assert!(code == 201 || code == 409, "creating the CRD: {code} {body}");
        let ok = wait_until(Duration::from_secs(30), || self.request("GET", &self.collection(), None).0 == 200);
        assert!(ok, "custom resource not served:\n{}", self.log());
    }

    /// The custom resources' collection path.
    pub fn collection(&self) -> String {
        format!("/apis/{GROUP}/v1/{PLURAL}")
    }

    /// Creates custom resource `name`; returns its resourceVersion.
    pub fn create(&self, name: &str) -> u64 {
        let obj = format!(
            r#"{{"apiVersion":"{GROUP}/v1","kind":"EtcdCluster","metadata":{{"name":"{name}"}},"spec":{{"size":0}}}}"#
        );
        let (code, body) = self.request("POST", &self.collection(), Some(("application/json", &obj)));
        assert_eq!(code, 201, "creating {name}: {body}");
        resource_version(&body)
    }

    /// Sets `spec.size` of `name` (one etcd write); returns the new resourceVersion.
    pub fn patch_size(&self, name: &str, size: u64) -> u64 {
        let patch = format!(r#"{{"spec":{{"size":{size}}}}}"#);
        let (code, body) = self.request(
            "PATCH",
            &format!("{}/{name}", self.collection()),
            Some(("application/merge-patch+json", &patch)),
        );
        assert_eq!(code, 200, "patching {name}: {body}");
        resource_version(&body)
    }

    /// Sets `spec.size` of `name` and a `spec.blob` of `bytes` bytes (a
    /// large event); the body goes through a file, past argv's limits.
    pub fn patch_blob(&self, name: &str, size: u64, bytes: usize) -> u64 {
        let body = self.dir.path().join("blob.json");
        std::fs::write(&body, format!(r#"{{"spec":{{"size":{size},"blob":"{}"}}}}"#, "x".repeat(bytes))).expect("body");
        let (code, out) = self.request(
            "PATCH",
            &format!("{}/{name}", self.collection()),
            Some(("application/merge-patch+json", &format!("@{}", body.display()))),
        );
        assert_eq!(code, 200, "patching {name}: {}", &out[..out.len().min(500)]);
        resource_version(&out)
    }

    /// Sets annotation `ws.example.com/pad` of `name` to `bytes` bytes: its
    /// frames then carry that much before `metadata.resourceVersion`
    /// (annotations sort first in a custom resource's JSON).
    pub fn patch_annotation(&self, name: &str, bytes: usize) -> u64 {
        let body = self.dir.path().join("annotation.json");
        let patch = format!(r#"{{"metadata":{{"annotations":{{"ws.example.com/pad":"{}"}}}}}}"#, "p".repeat(bytes));
        std::fs::write(&body, patch).expect("body");
        let (code, out) = self.request(
            "PATCH",
            &format!("{}/{name}", self.collection()),
            Some(("application/merge-patch+json", &format!("@{}", body.display()))),
        );
        assert_eq!(code, 200, "annotating {name}: {}", &out[..out.len().min(500)]);
        resource_version(&out)
    }

    /// The API server's own count of watchers it terminated for being
    /// unresponsive (`apiserver_terminated_watchers_total`, all resources).
    pub fn terminated_watchers(&self) -> f64 {
        let (code, text) = self.request("GET", "/metrics", None);
        assert_eq!(code, 200, "GET /metrics");
        text.lines()
            .filter(|l| l.starts_with("apiserver_terminated_watchers_total"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// A plain HTTP/1.1 watch, as [`ApiServer::watch`]: one TCP stream per
    /// watch, so a stopped client's buffers fill and stay full.
    pub fn watch_http1(&self, comm: &str, rv: u64) -> LineReader {
        self.watch_with(comm, rv, &["--http1.1"])
    }

    /// The operator fixture as `comm`, with extra flags, once it has synced.
    pub fn operator(&self, comm: &str, flags: &[&str]) -> LineReader {
        let op = self.operator_spawn(comm, flags);
        assert!(op.wait_for(|l| l == "synced", Duration::from_secs(30)), "operator never synced: {:?}", op.lines());
        op
    }

    /// The operator fixture as `comm`, started (not yet synced). A restart
    /// runs the same file again, as a restarted pod does.
    pub fn operator_spawn(&self, comm: &str, flags: &[&str]) -> LineReader {
        let mut bin = self.dir.path().join(comm);
        if !bin.exists() {
            bin = copy_binary(clientgo::operator(), self.dir.path(), comm);
        }
        lines_of(Command::new(bin).arg(format!("-kubeconfig={}", self.kubeconfig_path().display())).args(flags))
    }

    /// `kubectl get etcdclusters --watch-only -o name` (sid's kubectl 1.36:
    /// client-go, but no informer) as `comm`: one line per event.
    pub fn kubectl_watch(&self, comm: &str) -> LineReader {
        let kubectl = crate::debcache::file("kubectl", "1.36", "usr/bin/kubectl");
        let bin = copy_binary(kubectl, self.dir.path(), comm);
        lines_of(Command::new(bin).arg(format!("--kubeconfig={}", self.kubeconfig_path().display())).args([
            "get",
            PLURAL,
            "--watch-only",
            "-o",
            "name",
        ]))
    }

    /// A plain HTTP watch of the collection from `rv`, run as `comm` (a
    /// copy of curl): one JSON event per line.
    pub fn watch(&self, comm: &str, rv: u64) -> LineReader {
        self.watch_with(comm, rv, &[])
    }

    /// A plain HTTP/1.1 watch from `rv` by a Python client whose socket
    /// receive buffer is fixed at `rcvbuf` bytes (no autotuning): once it
    /// stops reading (SIGSTOP), the API server's writes to it block after a
    /// few events, not after megabytes. One JSON event per line.
    pub fn watch_small_window(&self, rv: u64, rcvbuf: u32) -> LineReader {
        let d = self.dir.path();
        lines_of(Command::new("python3").args(["-u", "-c", SMALL_WINDOW_WATCH]).args([
            "127.0.0.1".to_string(),
            self.port.to_string(),
            format!("{}?watch=1&resourceVersion={rv}", self.collection()),
            d.join("admin.crt").display().to_string(),
            d.join("admin.key").display().to_string(),
            rcvbuf.to_string(),
        ]))
    }

    fn watch_with(&self, comm: &str, rv: u64, flags: &[&str]) -> LineReader {
        let curl = copy_binary(which("curl"), self.dir.path(), comm);
        let d = self.dir.path();
        lines_of(
            Command::new(curl)
                .args(flags)
                .args(["-skN", "--cert"])
                .arg(d.join("admin.crt"))
                .arg("--key")
                .arg(d.join("admin.key"))
                .arg(format!("https://127.0.0.1:{}{}?watch=1&resourceVersion={rv}", self.port, self.collection())),
        )
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            stop_child(&mut c);
        }
    }
}

/// `cmd` started with its stdout collected line by line (stdin and stderr
/// closed).
/// A watch client with a fixed receive buffer: the buffer is set before
/// `connect`, so the window it advertises stays that small; the body's
/// chunked framing is undone, events go to stdout as they arrive.
const SMALL_WINDOW_WATCH: &str = r#"
import socket, ssl, sys
host, port, path, crt, key, rcvbuf = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5], int(sys.argv[6])
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
ctx.load_cert_chain(crt, key)
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
s.connect((host, port))
t = ctx.wrap_socket(s)
t.sendall(("GET %s HTTP/1.1\r\nHost: %s\r\nAccept: application/json\r\n\r\n" % (path, host)).encode())
f = t.makefile("rb")
while f.readline() not in (b"\r\n", b""):
    pass
while True:
    size = int(f.readline().strip() or b"0", 16)
    if size == 0:
        break
    sys.stdout.buffer.write(f.read(size))
    sys.stdout.flush()
    f.readline()
"#;

fn lines_of(cmd: &mut Command) -> LineReader {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    LineReader::new(child)
}

/// `metadata.resourceVersion` of a JSON object.
pub fn resource_version(body: &str) -> u64 {
    let v: serde_json::Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"));
    v["metadata"]["resourceVersion"].as_str().and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("no rv: {body}"))
}

/// The type of one watch line (`ADDED`, `MODIFIED`, `BOOKMARK`, ...).
pub fn event_type(line: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    v["type"].as_str().map(str::to_string)
}

fn which(name: &str) -> PathBuf {
    for dir in std::env::var("PATH").unwrap_or_default().split(':') {
        let p = Path::new(dir).join(name);
        if p.is_file() {
            return p;
        }
    }
    panic!("{name} not on PATH");
}

/// A CA, and a client certificate signed by it in `system:masters`.
fn certificates(dir: &Path) {
    let run = |args: &[&str]| {
        let o = Command::new("openssl").current_dir(dir).args(args).output().expect("openssl");
        assert!(o.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&o.stderr));
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "2",
        "-subj",
        "/CN=ws-ca",
    ]);
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "admin.key",
        "-out",
        "admin.csr",
        "-subj",
        "/O=system:masters/CN=admin",
    ]);
    run(&[
        "x509",
        "-req",
        "-in",
        "admin.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "admin.crt",
        "-days",
        "2",
    ]);
}
