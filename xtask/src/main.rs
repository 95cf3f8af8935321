//! `cargo xtask ...`: everything beyond `cargo build` — installing the
//! toolchain, the real programs tests run against, the demo, benchmarks and
//! fuzzing. Each step prints what it does, so a failure names its step.

mod bench;
mod debcache;
mod demo;
mod fuzz;
mod setup;
mod soak;
mod test;
mod trap;
mod util;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "watchscope development tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what is missing (and nothing else): the eBPF toolchain, and
    /// with --for, the real programs the tests or the demo run.
    Setup(setup::SetupArgs),
    /// Setup, lint, build, unit tests, then integration tests on real
    /// programs (needs root). The README's test command.
    Test(test::TestArgs),
    /// Setup, then a real etcd, a watcher, a put loop and the agent, with
    /// metrics on a port; Ctrl-C cleans everything up.
    Demo(demo::DemoArgs),
    /// Benchmarks: speed goals live here, never in unit tests.
    Bench(bench::BenchArgs),
    /// Run the cargo-fuzz targets of the binary parsers, the ring record
    /// decoder and the watch frame scanner.
    Fuzz(fuzz::FuzzArgs),
    /// Minutes of etcd under puts, many watches and process churn, watched
    /// by the agent; fails unless every event and exec is accounted for.
    Soak(soak::SoakArgs),
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    util::cd_workspace_root()?;
    match cli.task {
        Task::Setup(a) => setup::run(&a),
        Task::Test(a) => test::run(&a),
        Task::Demo(a) => demo::run(&a),
        Task::Bench(a) => bench::run(&a),
        Task::Fuzz(a) => fuzz::run(&a),
        Task::Soak(a) => soak::run(&a),
    }
}
