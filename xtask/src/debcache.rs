//! Real programs from other Debian suites (etcd 3.5 from trixie and sid,
//! etcd 3.3 from bullseye, Prometheus 3.5 from sid), for the tests that prove watchscope on the
//! versions clusters run. They are downloaded with a private apt state and
//! extracted into a cache directory: the system's apt sources never name
//! those suites, so no later `apt-get install` can pull sid's libc or
//! systemd into the machine.
//!
//! Layout (`$WATCHSCOPE_CACHE`, default `/var/cache/watchscope`):
//! `apt/` (sources.list, lists, archives), `debs/` (downloaded packages),
//! `pkgs/<package>_<version>_<arch>/` (each package extracted on its own).
//! Everything is kept between runs; a package already extracted is not
//! fetched again, so a second setup costs one directory listing.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

use crate::util::{self, step};

/// (package, suite): what the tests run from outside bookworm.
pub const PACKAGES: &[(&str, &str)] = &[
    // etcd 3.5.30, Go 1.26 (GOPATH build: symbols without /v3).
    ("etcd-server", "sid"),
    ("etcd-client", "sid"),
    // etcd 3.5.16, Go 1.24.
    ("etcd-server", "trixie"),
    ("etcd-client", "trixie"),
    // etcd 3.3.25, Go 1.15 (stack ABI, github.com/coreos/etcd paths).
    ("etcd-server", "bullseye"),
    ("etcd-client", "bullseye"),
    // Go 1.24 (the toolchain of trixie's etcd): the type-descriptor ground
    // truth is checked on fixtures built with it. The tests join the two
    // packages into one GOROOT (tests/src/go.rs).
    ("golang-1.24-go", "trixie"),
    ("golang-1.24-src", "trixie"),
    // kubectl 1.36: a real, non-informer watch client of the API server
    // the Kubernetes watch-path tests build.
    ("kubectl", "sid"),
    // Prometheus 3.5: native histograms (protobuf scrapes) and exemplar
    // storage, next to bookworm's Prometheus 2.42 in the tests.
    ("prometheus", "sid"),
];

const SUITES: &[&str] = &["sid", "trixie", "bullseye"];
const KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";

pub fn root() -> PathBuf {
    std::env::var_os("WATCHSCOPE_CACHE").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/var/cache/watchscope"))
}

pub fn run() -> Result<()> {
    step("real programs from other Debian suites (private apt state, extracted into the cache)");
    let root = root();
    let pkgs = root.join("pkgs");
    let missing: Vec<&(&str, &str)> = PACKAGES.iter().filter(|(p, s)| !extracted(&pkgs, p, s)).collect();
    if missing.is_empty() {
        println!("    all in {}", pkgs.display());
        return Ok(());
    }
    if !util::is_root() {
        bail!("{} is incomplete: run `sudo cargo xtask setup --for test`", pkgs.display());
    }
    let debs = root.join("debs");
    for dir in [debs.clone(), pkgs.clone()] {
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let apt_args = private_apt(&root)?;
    for (package, suite) in missing {
        let before = deb_files(&debs)?;
        util::run(
            Command::new("apt-get")
                .current_dir(&debs)
                .args(&apt_args)
                .arg("download")
                .arg(format!("{package}/{suite}")),
        )
        .with_context(|| format!("downloading {package} from {suite}"))?;
        let new: Vec<PathBuf> = deb_files(&debs)?.into_iter().filter(|d| !before.contains(d)).collect();
        // A package already downloaded earlier (but not extracted) is the
        // newest file of that name.
        let deb = match new.first() {
            Some(d) => d.clone(),
            None => newest_deb(&debs, package, suite)?,
        };
        let name = deb.file_stem().context("deb file name")?.to_string_lossy().to_string();
        let dest = pkgs.join(&name);
        let tmp = pkgs.join(format!(".{name}.partial"));
        let _ = std::fs::remove_dir_all(&tmp);
        util::run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&tmp))?;
        // Renamed into place only when whole: an interrupted setup leaves
        // nothing that looks extracted.
        std::fs::write(tmp.join(".suite"), suite)?;
        std::fs::rename(&tmp, &dest).with_context(|| format!("moving {} into place", dest.display()))?;
        println!("    {package} ({suite}) → {}", dest.display());
    }
    Ok(())
}

/// A GOPATH root: the Go sources (`golang-*-dev`) of some top packages of
/// one suite and of their dependency closure, all extracted into one
/// directory whose `usr/share/gocode` is the GOPATH.
pub struct GoRoot {
    /// Directory under the cache root.
    dir: &'static str,
    suite: &'static str,
    tops: &'static [&'static str],
    what: &'static str,
}

/// What a GOPATH-mode build of a client-go program or of a real Kubernetes
/// API server (`k8s.io/apiextensions-apiserver`: generic apiserver, etcd3
/// storage, watch cache, HTTP watch) needs, from sid (0.36).
pub const GOPATH_K8S: GoRoot = GoRoot {
    dir: "gopath-k8s",
    suite: "sid",
    tops: &["golang-k8s-client-go-dev", "golang-k8s-apiextensions-apiserver-dev", "golang-etcd-server-dev"],
    what: "client-go and apiextensions-apiserver 0.36 sources from sid (GOPATH root for the Kubernetes fixtures)",
};

/// client-go 0.32 from trixie (89 source packages): the informer of the
/// DeltaFIFO era, whose delta handler is `HandleDeltas`.
pub const GOPATH_K8S_032: GoRoot = GoRoot {
    dir: "gopath-k8s-032",
    suite: "trixie",
    tops: &["golang-k8s-client-go-dev"],
    what: "client-go 0.32 sources from trixie (GOPATH root for the pre-0.36 informer)",
};

/// Extracts a root's Go sources into `<cache root>/<dir>`. The toolchain is
/// not among them: the fixtures build with a Go the tests already have.
/// Cached: the root is renamed into place only when complete, so a second
/// setup is one directory check.
pub fn gopath(r: &GoRoot) -> Result<()> {
    step(r.what);
    let root = root();
    let dest = root.join(r.dir);
    let listed = std::fs::read_to_string(dest.join(".packages")).unwrap_or_default();
    if r.tops.iter().all(|top| listed.lines().any(|l| l.starts_with(&format!("{top}=")))) {
        println!("    in {}", dest.display());
        return Ok(());
    }
    if !util::is_root() {
        bail!("{} is missing: run `sudo cargo xtask setup --for test`", dest.display());
    }
    let t0 = std::time::Instant::now();
    let apt_args = private_apt(&root)?;
    // The closure as apt resolves it for an empty system; only the Go
    // source packages matter (libc and the like come along because the
    // private status is empty).
    let sim = Command::new("apt-get")
        .args(&apt_args)
        .args(["-s", "-t", r.suite, "install", "--no-install-recommends"])
        .args(r.tops)
        .output()
        .context("apt-get -s install")?;
    if !sim.status.success() {
        bail!("resolving {} in {} failed: {}", r.tops.join(" "), r.suite, String::from_utf8_lossy(&sim.stderr));
    }
    let wanted = go_sources(&String::from_utf8_lossy(&sim.stdout));
    for top in r.tops {
        if !wanted.iter().any(|w| w.starts_with(&format!("{top}="))) {
            bail!("apt resolved no {top} in {}", r.suite);
        }
    }
    let t_resolve = t0.elapsed();
    let debs = root.join("debs").join(r.dir);
    std::fs::create_dir_all(&debs).with_context(|| format!("creating {}", debs.display()))?;
    util::run(Command::new("apt-get").current_dir(&debs).args(&apt_args).arg("download").args(&wanted))
        .with_context(|| format!("downloading the Go sources of {}", r.dir))?;
    let t_download = t0.elapsed();
    let tmp = root.join(format!(".{}.partial", r.dir));
    let _ = std::fs::remove_dir_all(&tmp);
    for deb in deb_files(&debs)? {
        // Only this closure's files: the directory may keep older versions.
        let name = deb.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
        if !wanted.iter().any(|w| deb_matches(&name, w)) {
            continue;
        }
        let status = Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&tmp).status().context("dpkg-deb")?;
        if !status.success() {
            bail!("dpkg-deb -x {} failed ({status})", deb.display());
        }
    }
    std::fs::write(tmp.join(".packages"), wanted.join("\n") + "\n")?;
    // An older, smaller root is replaced whole.
    let _ = std::fs::remove_dir_all(&dest);
    std::fs::rename(&tmp, &dest).with_context(|| format!("moving {} into place", dest.display()))?;
    println!(
        "    {} packages → {} (apt update and resolve {:.1} s, download {:.1} s, extract {:.1} s)",
        wanted.len(),
        dest.display(),
        t_resolve.as_secs_f64(),
        (t_download - t_resolve).as_secs_f64(),
        (t0.elapsed() - t_download).as_secs_f64()
    );
    Ok(())
}

/// `package=version` for every Go source package (`golang-*-dev`) in the
/// `Inst` lines of `apt-get -s install`.
fn go_sources(simulation: &str) -> Vec<String> {
    simulation
        .lines()
        .filter_map(|l| {
            let mut w = l.strip_prefix("Inst ")?.split_whitespace();
            let package = w.next()?;
            let version = w.next()?.strip_prefix('(')?;
            (package.starts_with("golang-") && package.ends_with("-dev")).then(|| format!("{package}={version}"))
        })
        .collect()
}

/// Whether a downloaded file is `package=version` (apt names it
/// `<package>_<version with ':' as %3a>_<arch>.deb`).
fn deb_matches(file: &str, wanted: &str) -> bool {
    let Some((package, version)) = wanted.split_once('=') else { return false };
    file.starts_with(&format!("{package}_{}_", version.replace(':', "%3a")))
}

/// Creates the private apt state under `<root>/apt` (sources naming the
/// three suites, lists, archives), refreshes its lists and returns the
/// options that make apt use it.
fn private_apt(root: &Path) -> Result<Vec<String>> {
    let apt = root.join("apt");
    for dir in [apt.join("lists/partial"), apt.join("archives/partial")] {
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let sources: String =
        SUITES.iter().map(|s| format!("deb [signed-by={KEYRING}] http://deb.debian.org/debian {s} main\n")).collect();
    std::fs::write(apt.join("sources.list"), sources).context("writing the private sources.list")?;
    let apt_args = private_apt_args(&apt);
    util::run(Command::new("apt-get").args(&apt_args).args(["update", "-qq"]))?;
    Ok(apt_args)
}

/// Options that give apt its own sources, lists, cache and an empty
/// package status: nothing of the system's apt state is read or written.
fn private_apt_args(apt: &Path) -> Vec<String> {
    let d = apt.display();
    vec![
        "-o".into(),
        format!("Dir::Etc::SourceList={d}/sources.list"),
        "-o".into(),
        "Dir::Etc::SourceParts=/dev/null".into(),
        "-o".into(),
        format!("Dir::State::Lists={d}/lists"),
        "-o".into(),
        format!("Dir::Cache={d}"),
        "-o".into(),
        "Dir::State::status=/dev/null".into(),
        // Downloads into a root-owned directory.
        "-o".into(),
        "APT::Sandbox::User=root".into(),
    ]
}

fn extracted(pkgs: &Path, package: &str, suite: &str) -> bool {
    let prefix = format!("{package}_");
    std::fs::read_dir(pkgs).into_iter().flatten().filter_map(Result::ok).any(|e| {
        e.file_name().to_string_lossy().starts_with(&prefix)
            && std::fs::read_to_string(e.path().join(".suite")).is_ok_and(|s| s.trim() == suite)
    })
}

fn deb_files(dir: &Path) -> Result<Vec<PathBuf>> {
    Ok(std::fs::read_dir(dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "deb"))
        .collect())
}

fn newest_deb(dir: &Path, package: &str, suite: &str) -> Result<PathBuf> {
    let prefix = format!("{package}_");
    deb_files(dir)?
        .into_iter()
        .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with(&prefix)))
        .max_by_key(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
        .with_context(|| format!("apt-get download {package}/{suite} left no .deb in {}", dir.display()))
}
