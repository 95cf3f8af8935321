//! `cargo bench -p watchscope --bench inspect` (or `cargo xtask bench inspect`):
//! how long the inspector takes on Debian's etcd builds (bookworm's 3.4.23,
//! ~21 MB, stripped, 27k functions; sid's 3.5.30 from the setup's cache,
//! 36k functions) to parse each, resolve the whole probe catalog and
//! identify its etcd struct layout from the type descriptors, and how long a
//! cache hit takes. Targets: under 150 ms and under 1 ms. Prints the
//! numbers, their ratio to the targets and PASS/FAIL lines; no asserts.
//!
//! The file is in the page cache after the first run: the number measured
//! is the inspector's own work (mmap, parse, index names, disassemble the
//! probed functions), not disk reads.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use watchscope::inspect::{self, Cache};

const TARGET_INSPECT: Duration = Duration::from_millis(150);
const TARGET_HIT: Duration = Duration::from_millis(1);

fn stats(mut v: Vec<Duration>) -> (Duration, Duration, Duration) {
    v.sort();
    let n = v.len();
    (v[0], v[n / 2], v[(n * 9 / 10).min(n - 1)])
}

fn report(what: &str, samples: Vec<Duration>, target: Duration) -> bool {
    let (min, median, p90) = stats(samples);
    let ratio = median.as_secs_f64() / target.as_secs_f64();
    let pass = median < target;
    println!(
        "{what}: min {min:.3?}, median {median:.3?}, p90 {p90:.3?}; target {target:?}, median/target = {ratio:.3} → {}",
        if pass { "PASS" } else { "FAIL" }
    );
    pass
}

/// sid's etcd 3.5.30 as `cargo xtask setup --for test` extracts it.
fn sid_etcd() -> Option<PathBuf> {
    let root =
        std::env::var_os("WATCHSCOPE_CACHE").map_or_else(|| PathBuf::from("/var/cache/watchscope"), PathBuf::from);
    std::fs::read_dir(root.join("pkgs"))
        .ok()?
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with("etcd-server_3.5.30"))
        .map(|e| e.path().join("usr/bin/etcd"))
        .find(|p| p.is_file())
}

fn main() {
    // `cargo bench` passes `--bench`; path arguments override the binaries.
    let mut paths: Vec<PathBuf> =
        std::env::args().skip(1).filter(|a| !a.starts_with("--")).map(PathBuf::from).collect();
    if paths.is_empty() {
        paths.push(PathBuf::from("/usr/bin/etcd"));
        match sid_etcd() {
            Some(p) => paths.push(p),
            None => println!("inspect bench: sid's etcd 3.5.30 not in the cache (cargo xtask setup --for test); FAIL"),
        }
    }
    let mut ok = true;
    for path in &paths {
        ok &= bench(path);
    }
    println!("inspect bench: {}", if ok { "PASS" } else { "FAIL" });
}

fn bench(path: &Path) -> bool {
    if !path.is_file() {
        println!("inspect bench: {} not found (install Debian's etcd-server); FAIL", path.display());
        return false;
    }
    // Warm the page cache and check the result once.
    let first = match inspect::inspect_path(path) {
        Ok(i) => i,
        Err(e) => {
            println!("inspect bench: {e}; FAIL");
            return false;
        }
    };
    let layout = first.etcd_layout.as_ref().map_or_else(
        || "no etcd layout".to_string(),
        |l| match (&l.profile, &l.refusal) {
            (Some(p), None) => format!("etcd layout {p} ({})", l.how),
            (_, Some(why)) => format!("etcd layout refused: {why}"),
            (None, None) => "no etcd layout".to_string(),
        },
    );
    println!(
        "{}: {} functions, {} probes resolved, {} roles unresolved, {layout}",
        path.display(),
        first.pclntab.functions,
        first.probes.len(),
        first.unresolved.len()
    );
    let symbol = first.probes.first().map(|p| p.symbol.clone()).unwrap_or_else(|| "runtime.mapassign".into());
    drop(first);

    let mut full = Vec::new();
    for _ in 0..30 {
        let t = Instant::now();
        let i = inspect::inspect_path(path).expect("inspect");
        full.push(t.elapsed());
        std::hint::black_box(&i);
    }
    let ok_full = report("inspect + whole catalog + etcd layout", full, TARGET_INSPECT);

    // Resolving one more symbol afterwards (the attach stage's user windows).
    let i = inspect::inspect_path(path).expect("inspect");
    let mut one = Vec::new();
    for _ in 0..200 {
        let t = Instant::now();
        let r = i.resolve(&symbol);
        one.push(t.elapsed());
        std::hint::black_box(&r);
    }
    let (_, median, _) = stats(one);
    println!("resolve one symbol on an inspection: median {median:.3?}");

    let cache = Cache::new();
    cache.inspect(path).expect("inspect");
    let mut hits = Vec::new();
    for _ in 0..1000 {
        let t = Instant::now();
        let r = cache.inspect(path).expect("cache hit");
        hits.push(t.elapsed());
        std::hint::black_box(&r);
    }
    let ok_hit = report("cache hit", hits, TARGET_HIT);
    let s = cache.stats();
    println!("cache: {} hits, {} misses", s.hits, s.misses);
    ok_full && ok_hit
}
