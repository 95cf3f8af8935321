//! `cargo bench -p watchscope --bench inspect` (or `cargo xtask bench inspect`):
//! how long the inspector takes on Debian's etcd (~21 MB, stripped, 27k
//! functions) to parse it and resolve the whole probe catalog, and how long
//! a cache hit takes. Targets: under 150 ms and under 1 ms. Prints the
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

fn main() {
    // `cargo bench` passes `--bench`; a path argument overrides the binary.
    let path = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with("--"))
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/etcd"));
    if !Path::new(&path).is_file() {
        println!("inspect bench: {} not found (install Debian's etcd-server); FAIL", path.display());
        return;
    }
    // Warm the page cache and check the result once.
    let first = match inspect::inspect_path(&path) {
        Ok(i) => i,
        Err(e) => {
            println!("inspect bench: {e}; FAIL");
            return;
        }
    };
    println!(
        "{}: {} functions, {} probes resolved, {} roles unresolved",
        path.display(),
        first.pclntab.functions,
        first.probes.len(),
        first.unresolved.len()
    );
    drop(first);

    let mut full = Vec::new();
    for _ in 0..30 {
        let t = Instant::now();
        let i = inspect::inspect_path(&path).expect("inspect");
        full.push(t.elapsed());
        std::hint::black_box(&i);
    }
    let ok_full = report("inspect + whole catalog", full, TARGET_INSPECT);

    // Resolving one more symbol afterwards (the attach stage's user windows).
    let i = inspect::inspect_path(&path).expect("inspect");
    let mut one = Vec::new();
    for _ in 0..200 {
        let t = Instant::now();
        let r = i.resolve("go.etcd.io/etcd/mvcc.(*watchableStore).notify");
        one.push(t.elapsed());
        std::hint::black_box(&r);
    }
    let (_, median, _) = stats(one);
    println!("resolve one symbol on an inspection: median {median:.3?}");

    let cache = Cache::new();
    cache.inspect(&path).expect("inspect");
    let mut hits = Vec::new();
    for _ in 0..1000 {
        let t = Instant::now();
        let r = cache.inspect(&path).expect("cache hit");
        hits.push(t.elapsed());
        std::hint::black_box(&r);
    }
    let ok_hit = report("cache hit", hits, TARGET_HIT);
    let s = cache.stats();
    println!("cache: {} hits, {} misses", s.hits, s.misses);
    println!("inspect bench: {}", if ok_full && ok_hit { "PASS" } else { "FAIL" });
}
