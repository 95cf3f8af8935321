//! `watchscope inspect`: the CLI side of the inspector (printing, exit codes).

use std::{path::PathBuf, process::ExitCode};

use anyhow::Result;
use clap::Args;

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// The binary to inspect.
    #[arg(required_unless_present = "pid", conflicts_with = "pid")]
    pub path: Option<PathBuf>,
    /// Inspect the executable of this running process (/proc/PID/exe).
    #[arg(long)]
    pub pid: Option<u32>,
    /// Print JSON (the contract other tools and the tests use).
    #[arg(long)]
    pub json: bool,
    /// Also list the functions whose names match this regular expression.
    #[arg(long)]
    pub functions: Option<String>,
}

pub fn run(_args: InspectArgs) -> Result<ExitCode> {
    anyhow::bail!("inspect is not implemented yet")
}
