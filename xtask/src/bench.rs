//! `cargo xtask bench <name>`: speed and cost measurements, with targets
//! printed as ratios.

use anyhow::Result;
use clap::{Args, ValueEnum};

use crate::util::{self, step};

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Which benchmark.
    #[arg(value_enum)]
    pub which: Bench,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Bench {
    /// Inspect Debian's etcd and resolve the probe catalog; cache hits.
    Inspect,
}

pub fn run(args: &BenchArgs) -> Result<()> {
    match args.which {
        Bench::Inspect => {
            step("bench inspect (release build)");
            util::run(util::cargo().args(["bench", "-p", "watchscope", "--bench", "inspect"]))
        }
    }
}
