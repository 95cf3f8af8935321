//! `cargo xtask fuzz --seconds N [TARGET...]`: runs each cargo-fuzz target of
//! the untrusted-input parsers and the ring record decoder for N seconds
//! (installing cargo-fuzz if needed).

use std::process::Command;

use anyhow::{Result, bail};
use clap::Args;

use crate::util::{self, step};

#[derive(Args, Debug)]
pub struct FuzzArgs {
    /// Seconds per target.
    #[arg(long, default_value_t = 60)]
    pub seconds: u64,
    /// Targets to run (default: every target in fuzz/).
    pub targets: Vec<String>,
}

pub fn run(args: &FuzzArgs) -> Result<()> {
    step("cargo-fuzz");
    if !util::succeeds(util::cargo().args(["fuzz", "--version"])) {
        util::run(util::cargo().args(["install", "--locked", "cargo-fuzz"]))?;
    }
    let targets = if args.targets.is_empty() {
        let list = util::output(fuzz_cmd().arg("list"));
        list.lines().map(str::to_string).filter(|l| !l.is_empty()).collect()
    } else {
        args.targets.clone()
    };
    if targets.is_empty() {
        bail!("no fuzz targets found in fuzz/");
    }
    for t in &targets {
        step(&format!("fuzz {t} for {} s", args.seconds));
        // The working corpus grows in corpus/<t> (not committed); the seeds
        // in seeds/<t> (committed) are read as a second corpus directory.
        let corpus = format!("corpus/{t}");
        std::fs::create_dir_all(std::path::Path::new("fuzz").join(&corpus))?;
        let seeds = format!("seeds/{t}");
        let mut cmd = fuzz_cmd();
        cmd.args(["run", t, &corpus]);
        if std::path::Path::new("fuzz").join(&seeds).is_dir() {
            cmd.arg(&seeds);
        }
        util::run(cmd.args(["--", &format!("-max_total_time={}", args.seconds)]))?;
    }
    step(&format!("fuzzed {} targets, {} s each, no crash", targets.len(), args.seconds));
    Ok(())
}

/// cargo-fuzz needs -Z flags: the stable toolchain accepts them with
/// RUSTC_BOOTSTRAP=1, as the eBPF build does.
fn fuzz_cmd() -> Command {
    let mut c = util::cargo();
    c.arg("fuzz").current_dir("fuzz").env("RUSTC_BOOTSTRAP", "1");
    c
}
