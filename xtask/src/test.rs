//! `cargo xtask test`: the README's test command and what CI runs.

use anyhow::{Result, bail};
use clap::Args;

use crate::{
    setup::{self, Purpose, SetupArgs},
    util::{self, step},
};

#[derive(Args, Debug)]
pub struct TestArgs {
    /// Skip the integration tests (no root needed).
    #[arg(long)]
    pub unit_only: bool,
    /// Skip formatting and clippy checks.
    #[arg(long)]
    pub no_lint: bool,
    /// Only integration tests whose name contains this filter.
    pub filter: Option<String>,
}

pub fn run(args: &TestArgs) -> Result<()> {
    let purpose = if args.unit_only { None } else { Some(Purpose::Test) };
    setup::run(&SetupArgs { purpose })?;

    if !args.no_lint {
        step("format check");
        util::run(util::cargo().args(["fmt", "--all", "--check"]))?;
        step("clippy (warnings are errors)");
        util::run(util::cargo().args(["clippy", "--all-targets", "--", "-D", "warnings"]))?;
        step("clippy on the kernel programs (bpfel-unknown-none)");
        util::run(&mut kernel_clippy())?;
    }

    step("build");
    util::run(util::cargo().args(["build", "--all-targets"]))?;

    step("unit tests");
    util::run(util::cargo().args(["test", "-p", "agent-common", "-p", "watchscope", "-p", "xtask"]))?;

    if args.unit_only {
        return Ok(());
    }
    if !util::is_root() {
        bail!(
            "the integration tests load eBPF programs and need root: run `sudo -E cargo xtask test`, or `cargo xtask test --unit-only`"
        );
    }
    step("integration tests on real programs");
    let mut cmd = util::cargo();
    // Every suite runs even when one fails: a CI log then shows every
    // failure of the run, not the first.
    cmd.args(["test", "--no-fail-fast", "-p", "watchscope-integration-tests", "--"]);
    if let Some(f) = &args.filter {
        cmd.arg(f);
    }
    // One at a time: each test owns real processes, ports and probes, and the
    // machine has two cores; parallel tests would measure each other.
    cmd.args(["--test-threads", "1"]);
    util::run(&mut cmd)
}

/// Clippy for agent-ebpf, which only builds for the BPF target (through
/// agent/build.rs otherwise): core from source on the stable toolchain, and
/// the architecture cfg aya-build would set for this host.
fn kernel_clippy() -> std::process::Command {
    let arch = if cfg!(target_arch = "aarch64") { "aarch64" } else { "x86_64" };
    let mut cmd = util::cargo();
    cmd.args(["clippy", "-p", "agent-ebpf", "--release", "--target", "bpfel-unknown-none", "-Z", "build-std=core"])
        .args(["--", "-D", "warnings"])
        .env("RUSTC_BOOTSTRAP", "1")
        .env("RUSTFLAGS", format!("--cfg bpf_target_arch=\"{arch}\""));
    cmd
}
