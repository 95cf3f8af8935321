//! client-go fixtures: Go programs built in GOPATH mode against Debian sid's
//! client-go 0.36 sources, which `cargo xtask setup --for test` extracts into
//! one root (`$WATCHSCOPE_CACHE/gopath-k8s`, GOPATH `usr/share/gocode`).
//! The toolchain is Go 1.27 from PyPI ([`go::go127`]), the version sid
//! builds client-go with. The informer is also built against trixie's
//! client-go 0.32 (`gopath-k8s-032`) with trixie's Go 1.24. A build takes about a minute on a cold Go cache,
//! so the stripped binary is kept next to the test executables, keyed by a
//! hash of the fixture's source, the Go version and the list of Debian
//! packages in the root.

use std::{
    collections::hash_map::DefaultHasher,
    hash::{Hash, Hasher},
    path::{Path, PathBuf},
    sync::OnceLock,
};

use crate::{debcache, go};

/// A client-go version to build against: its GOPATH root under the cache
/// and the toolchain its Debian suite builds it with.
#[derive(Clone, Copy)]
pub struct ClientGo {
    root: &'static str,
    go: fn() -> &'static go::Toolchain,
}

/// sid's client-go 0.36 (RealFIFO, batch pops, `handleDeltas`), Go 1.27.
pub const V036: ClientGo = ClientGo { root: "gopath-k8s", go: go::go127 };
/// trixie's client-go 0.32 (DeltaFIFO, `HandleDeltas`), Go 1.24.
pub const V032: ClientGo = ClientGo { root: "gopath-k8s-032", go: go::go124 };

/// The GOPATH root with client-go 0.36's sources (panics with the setup
/// command when it is missing: these tests never pass without the real
/// sources).
pub fn gopath_root() -> PathBuf {
    V036.gopath_root()
}

impl ClientGo {
    fn gopath_root(self) -> PathBuf {
        let root = debcache::root().join(self.root);
        assert!(
            root.join("usr/share/gocode/src/k8s.io/client-go").is_dir(),
            "client-go sources not under {}: run `cargo xtask setup --for test`",
            root.display()
        );
        root
    }
}

/// `tests/fixtures/go-k8s/src/informer`, built stripped as `wsc-informer`
/// (also its comm), once per test process and cached across runs.
pub fn informer() -> &'static Path {
    static B: OnceLock<PathBuf> = OnceLock::new();
    B.get_or_init(|| build("informer", "wsc-informer"))
}

/// The same informer built against client-go 0.32, as `wsc-informer32`.
pub fn informer_032() -> &'static Path {
    static B: OnceLock<PathBuf> = OnceLock::new();
    B.get_or_init(|| build_with(V032, "informer", "wsc-informer32"))
}

/// `tests/fixtures/go-k8s/src/operator`: an informer on the custom
/// resource (typed `EtcdCluster` objects; Unstructured with `-dynamic`)
/// whose update handler grows a `map[int][256]byte`, built stripped as
/// `wsk-operator`.
pub fn operator() -> &'static Path {
    static B: OnceLock<PathBuf> = OnceLock::new();
    B.get_or_init(|| build("operator", "wsk-operator"))
}

/// `tests/fixtures/go-k8s/src/apiserver`: a real Kubernetes API server
/// (apiextensions-apiserver with discovery on), built stripped as
/// `wsk-apiserver`. The first build takes minutes (about 4 on 2 cores with
/// a warm Go cache in the Debian cache directory, 8 cold).
pub fn apiserver() -> &'static Path {
    static B: OnceLock<PathBuf> = OnceLock::new();
    B.get_or_init(|| build("apiserver", "wsk-apiserver"))
}

/// `tests/fixtures/go-k8s/src/etcdwatch`: a watch through etcd's Go client
/// with one of etcd's own watch filters, built stripped as
/// `wsc-etcdwatch`.
pub fn etcd_watch() -> &'static Path {
    static B: OnceLock<PathBuf> = OnceLock::new();
    B.get_or_init(|| build("etcdwatch", "wsc-etcdwatch"))
}

fn fixture_gopath() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/go-k8s")
}

fn build(package: &str, name: &str) -> PathBuf {
    build_with(V036, package, name)
}

fn build_with(v: ClientGo, package: &str, name: &str) -> PathBuf {
    let root = v.gopath_root();
    let t = (v.go)();
    let src = fixture_gopath().join("src").join(package);
    let mut h = DefaultHasher::new();
    t.version.hash(&mut h);
    std::fs::read_to_string(root.join(".packages")).unwrap_or_default().hash(&mut h);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&src)
        .unwrap_or_else(|e| panic!("{}: {e}", src.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    files.sort();
    for f in files {
        f.file_name().hash(&mut h);
        std::fs::read(&f).unwrap_or_default().hash(&mut h);
    }
    let base = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().and_then(Path::parent).map(|p| p.join("client-go-fixtures")))
        .unwrap_or_else(|| std::env::temp_dir().join("watchscope-client-go-fixtures"));
    let dir = base.join(format!("{package}-{:016x}", h.finish()));
    let out = dir.join(name);
    if out.is_file() {
        return out;
    }
    // Built aside and renamed into place: a binary under `dir` is complete.
    let tmp = base.join(format!(".{package}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).expect("fixture build dir");
    let gopath = std::env::join_paths([root.join("usr/share/gocode"), fixture_gopath()]).expect("GOPATH");
    let started = std::time::Instant::now();
    let o = t
        .cmd()
        .env("GO111MODULE", "off")
        .env("GOPATH", gopath)
        // With the Debian cache: it survives `cargo clean` and fresh clones.
        .env("GOCACHE", debcache::root().join("gocache"))
        .env("CGO_ENABLED", "0")
        .args(["build", "-ldflags=-s -w", "-o"])
        .arg(tmp.join(name))
        .arg(package)
        .output()
        .expect("go build");
    assert!(o.status.success(), "go build {package}: {}", String::from_utf8_lossy(&o.stderr));
    eprintln!("built {package} against client-go in {:.1} s", started.elapsed().as_secs_f64());
    if std::fs::rename(&tmp, &dir).is_err() {
        // Another test process got there first with the same content.
        let _ = std::fs::remove_dir_all(&tmp);
    }
    out
}
