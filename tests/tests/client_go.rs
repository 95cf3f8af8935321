//! client-go 0.36 (Debian sid's sources, built here in GOPATH mode with Go
//! 1.27): the informer's delta handler is found under its 0.36 names
//! (`handleDeltas(logger, obj, isInInitialList)` and `handleBatchDeltas`),
//! the catalog's `deltas` read is checked against the kernel's own tracefs
//! uprobes on a program that knows how many deltas it fed, and the agent's
//! built-in `informer_handle_deltas` window counts every pop and ends at the
//! informer loop's next pop. The window's end is also checked on trixie's
//! client-go 0.32 (DeltaFIFO, `HandleDeltas`, Go 1.24).

use std::{collections::HashMap, path::Path, process::Command, time::Duration};

use serde_json::Value;
use watchscope_integration_tests::{
    Agent, Buckets, Piped, clientgo, go_sites, require_root,
    tracefs::{Uprobes, fetch},
    wait_attached, wait_until, watchscope_bin,
};

const HANDLE_DELTAS: &str = "k8s.io/client-go/tools/cache.(*sharedIndexInformer).handleDeltas";
const HANDLE_BATCH_DELTAS: &str = "k8s.io/client-go/tools/cache.(*sharedIndexInformer).handleBatchDeltas";
const HANDLE_DELTAS_032: &str = "k8s.io/client-go/tools/cache.(*sharedIndexInformer).HandleDeltas";

/// The informer fixture (tests/fixtures/go-k8s/src/informer), driven line by line.
struct Informer(Piped);

impl Informer {
    fn start(bin: &Path, delay_us: u64) -> Informer {
        let mut cmd = Command::new(bin);
        cmd.arg(format!("-delay-us={delay_us}"));
        let f = Informer(Piped::spawn(cmd));
        // The first object was added and handled before the program reads stdin.
        assert_eq!(f.next(), "ready handled 1");
        f
    }

    fn next(&self) -> String {
        self.0.next(Duration::from_secs(60))
    }

    /// Sends one command and returns the handler calls made so far.
    fn command(&mut self, line: &str) -> u64 {
        self.0.send(line);
        let reply = self.next();
        reply
            .strip_prefix("handled ")
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("`{line}`: unexpected reply `{reply}`"))
    }
}

fn inspect_json(bin: &Path) -> Value {
    let o = Command::new(watchscope_bin()).arg("inspect").arg("--json").arg(bin).output().expect("watchscope inspect");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).expect("inspect JSON")
}

fn probe<'a>(j: &'a Value, symbol: &str) -> &'a Value {
    j["probes"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["role"] == "client_go_handle_deltas" && p["symbol"] == symbol))
        .unwrap_or_else(|| panic!("{symbol} not resolved for client_go_handle_deltas: {}", j["unresolved"]))
}

/// The `deltas` read of a probe, checked to be the only one and marked verified.
fn deltas_arg(p: &Value) -> &Value {
    let args = p["args"].as_array().expect("args");
    let a = args.iter().find(|a| a["name"] == "deltas").unwrap_or_else(|| panic!("no deltas read: {p}"));
    assert_eq!(a["verified"], true, "{p}");
    a
}

/// Tracefs fetchargs for a delta handler whose `obj` boxes a `Deltas`
/// slice: the catalog's `deltas` read (+8(obj.data), the boxed slice
/// header's len), and through the same header's pointer word the first
/// `Delta`'s type length and its ConfigMap's name and resourceVersion
/// lengths. `obj` and `rv_ptr` tell one call from the next: a probe on a
/// function's entry fires twice for a call that grows its stack (morestack
/// runs the function again from its entry), with the same arguments.
fn boxed_deltas_fetchargs(handler: &Value) -> String {
    let count = fetch(deltas_arg(handler));
    let header = count.strip_prefix("+8(").and_then(|s| s.strip_suffix(')')).expect("len at +8 of the header");
    let first = format!("+0({header})");
    let object = format!("+24({first})");
    format!(
        "deltas={count}:s64 type_len=+8({first}):s64 name_len=+40({object}):s64 rv_len=+120({object}):s64 \
         obj={object}:u64 rv_ptr=+112({object}):u64"
    )
}

const SERIAL: u64 = 5;
const BURST: u64 = 20;

/// Runs the informer through `serial SERIAL` and `burst BURST`, with 2 ms
/// in the index function per object (the burst queues up behind the first
/// pops); the handler calls made.
fn serial_then_burst(bin: &Path) -> u64 {
    let mut inf = Informer::start(bin, 2000);
    assert_eq!(inf.command(&format!("serial {SERIAL}")), 1 + SERIAL);
    let handled = inf.command(&format!("burst {BURST}"));
    assert_eq!(handled, 1 + SERIAL + BURST);
    handled
}

/// The calls among the hits of the `single` event (fetchargs from
/// [`boxed_deltas_fetchargs`]): a call's second hit after a stack growth
/// carries the same object and resourceVersion string (the same slice).
/// Each update is a new object with a new resourceVersion, so two calls
/// never match.
fn single_calls(up: &Uprobes) -> Vec<HashMap<String, i64>> {
    let mut singles = up.hits("single");
    singles.dedup_by(|b, a| a.get("obj") == b.get("obj") && a.get("rv_ptr") == b.get("rv_ptr"));
    singles
}

/// The catalog's `deltas` reads give exactly the deltas the informer
/// handled. The count alone cannot tell a right read from a wrong one on
/// `handleDeltas` (RealFIFO passes one delta per call, and what the
/// pre-0.36 slot, RCX, points at also reads 1 here), so each hit also
/// follows the same slice header to its first `Delta` (Type string at +0,
/// Object's data word at +24) and into the ConfigMap (Name at +32,
/// ResourceVersion at +112): their lengths must be the ones the program
/// used ("Updated"/"Added", "serial"/"burst-N", one- or two-digit RVs).
#[test]
fn handle_deltas_reads_match_tracefs() {
    require_root();
    let bin = clientgo::informer();
    let j = inspect_json(bin);
    assert_eq!(j["go_version"], "go1.27.3");
    let single = probe(&j, HANDLE_DELTAS);
    let batch = probe(&j, HANDLE_BATCH_DELTAS);
    assert_eq!(single["name_verified"], true);
    assert_eq!(batch["name_verified"], true);

    let single_args = boxed_deltas_fetchargs(single);
    // handleBatchDeltas: deltas = the []Delta's len register; its pointer
    // is the register before it (the catalog's slice is ptr, len, cap).
    let batch_count = fetch(deltas_arg(batch));
    let mut up = Uprobes::new("wscg");
    up.add("single", bin, single["file_offset"].as_u64().expect("offset"), &single_args);
    let batch_ptr = batch["args"]
        .as_array()
        .and_then(|a| a.iter().find(|a| a["name"] == "deltas_ptr"))
        .map(fetch)
        .unwrap_or_else(|| panic!("no deltas_ptr read: {batch}"));
    up.add(
        "batch",
        bin,
        batch["file_offset"].as_u64().expect("offset"),
        &format!("deltas={batch_count}:s64 ptr={batch_ptr}:u64"),
    );
    up.enable();

    // Later pops of the burst take several objects (handleBatchDeltas).
    let handled = serial_then_burst(bin);
    let singles = single_calls(&up);
    let mut batches = up.hits("batch");
    batches.dedup_by(|b, a| a.get("ptr") == b.get("ptr") && a.get("deltas") == b.get("deltas"));
    let get = |h: &HashMap<String, i64>, k: &str| *h.get(k).unwrap_or_else(|| panic!("no {k} in {h:?}"));
    // RealFIFO hands handleDeltas one delta per call.
    assert!(singles.iter().all(|h| get(h, "deltas") == 1), "{singles:?}");
    // At startup the empty initial list reaches the informer as one
    // ReplacedAll delta, whose object is no ConfigMap; then the first
    // ConfigMap's Added, then every Updated of `serial N`.
    assert_eq!(get(&singles[0], "type_len"), "ReplacedAll".len() as i64, "{singles:?}");
    let cm: Vec<(i64, i64, i64)> =
        singles[1..].iter().map(|h| (get(h, "type_len"), get(h, "name_len"), get(h, "rv_len"))).collect();
    assert_eq!(cm[0], ("Added".len() as i64, "serial".len() as i64, 1), "{singles:?}");
    for (i, got) in cm[1..=SERIAL as usize].iter().enumerate() {
        // ResourceVersions 3..=7: one digit.
        assert_eq!(*got, ("Updated".len() as i64, "serial".len() as i64, 1), "update {i}: {singles:?}");
    }
    // The burst's objects, each counted once whichever way it was popped.
    let burst_single: Vec<&(i64, i64, i64)> = cm[1 + SERIAL as usize..].iter().collect();
    assert!(burst_single.iter().all(|(t, n, _)| *t == "Added".len() as i64 && *n >= 7), "{singles:?}");
    let in_batches: i64 = batches.iter().map(|h| get(h, "deltas")).sum();
    assert_eq!(burst_single.len() as i64 + in_batches, BURST as i64, "single {singles:?} batch {batches:?}");
    assert!(batches.iter().any(|h| get(h, "deltas") > 1), "no batch pop: {batches:?}");
    // Every delta the handlers saw went through one of the two, once.
    let all: i64 = singles[1..].iter().map(|h| get(h, "deltas")).sum::<i64>() + in_batches;
    assert_eq!(all as u64, handled);
    eprintln!(
        "handleDeltas hits {}, handleBatchDeltas hits {} carrying {in_batches} deltas, handler calls {handled}",
        singles.len(),
        batches.len()
    );
}

/// The same on client-go 0.32 (DeltaFIFO): `HandleDeltas(obj,
/// isInInitialList)`, whose `obj` boxes one object's `Deltas`. There is no
/// `ReplacedAll` at startup (the empty list queues nothing) and no batch
/// pop: the first hit is the first ConfigMap's Added, then every Updated of
/// `serial N`, then one Added per object of the burst, one delta each.
#[test]
fn handle_deltas_032_reads_match_tracefs() {
    require_root();
    let bin = clientgo::informer_032();
    let j = inspect_json(bin);
    assert!(j["go_version"].as_str().is_some_and(|v| v.starts_with("go1.24")), "{}", j["go_version"]);
    let single = probe(&j, HANDLE_DELTAS_032);
    assert_eq!(single["name_verified"], true);
    let mut up = Uprobes::new("wscg");
    up.add("single", bin, single["file_offset"].as_u64().expect("offset"), &boxed_deltas_fetchargs(single));
    up.enable();
    let handled = serial_then_burst(bin);
    let singles = single_calls(&up);
    let get = |h: &HashMap<String, i64>, k: &str| *h.get(k).unwrap_or_else(|| panic!("no {k} in {h:?}"));
    let seen: Vec<(i64, i64, i64, i64)> =
        singles.iter().map(|h| (get(h, "deltas"), get(h, "type_len"), get(h, "name_len"), get(h, "rv_len"))).collect();
    let added = "Added".len() as i64;
    let serial = "serial".len() as i64;
    assert_eq!(seen.len() as u64, handled, "{seen:?}");
    assert_eq!(seen[0], (1, added, serial, 1), "{seen:?}");
    for (i, got) in seen[1..=SERIAL as usize].iter().enumerate() {
        // ResourceVersions 3..=7: one digit.
        assert_eq!(*got, (1, "Updated".len() as i64, serial, 1), "update {i}: {seen:?}");
    }
    for got in &seen[1 + SERIAL as usize..] {
        // "burst-N", ResourceVersions 8..=27.
        assert!(got.0 == 1 && got.1 == added && got.2 >= 7 && (1..=2).contains(&got.3), "{seen:?}");
    }
}

/// The informer fixture (index delay `delay_us`) under an agent timing its
/// Go runtime, attached: (binary, agent, informer, the label set of its
/// `informer_handle_deltas` window).
fn watched_informer(delay_us: u64) -> (&'static Path, Agent, Informer, String) {
    require_root();
    let bin = clientgo::informer();
    let comm = bin.file_name().and_then(|n| n.to_str()).expect("fixture name");
    let agent = Agent::start(&["--go-comm", comm]);
    let inf = Informer::start(bin, delay_us);
    wait_attached(&agent, &[inf.0.pid()]);
    (bin, agent, inf, format!("window=\"informer_handle_deltas\",comm=\"{comm}\""))
}

/// The delta handler's calls, as the kernel's own uprobes on the agent's
/// entry sites (the stack-check jump) count them, with the flags: a call
/// that grows its stack runs that jump twice, and the pass that goes to
/// morestack is not a call (a probe on the function's first byte once
/// counted such a call twice here).
struct Pops {
    up: Uprobes,
    guards: HashMap<&'static str, u64>,
}

impl Pops {
    fn count(agent: &Agent, bin: &Path) -> Pops {
        let statuses = go_sites(agent, bin);
        let entry = |symbol: &str| {
            let s = statuses.iter().find(|s| s["symbol"] == symbol).unwrap_or_else(|| panic!("{symbol}: {statuses:?}"));
            (s["entry_offset"].as_u64().expect("entry offset"), s["guard"].as_u64().expect("guard"))
        };
        let mut up = Uprobes::new("wscg");
        let mut guards = HashMap::new();
        for (event, symbol) in [("single", HANDLE_DELTAS), ("batch", HANDLE_BATCH_DELTAS)] {
            let (offset, guard) = entry(symbol);
            up.add(event, bin, offset, "fl=%flags:u64");
            guards.insert(event, guard);
        }
        up.enable();
        Pops { up, guards }
    }

    /// (handleDeltas calls, handleBatchDeltas calls, morestack passes) so far.
    fn calls(&self) -> (usize, usize, usize) {
        // GUARD_X86_JBE = 1 jumps on CF|ZF (0x41), GUARD_X86_JB = 2 on CF.
        let calls = |event: &str| {
            let mask = match self.guards[event] {
                1 => 0x41,
                2 => 0x1,
                _ => 0,
            };
            self.up.hits(event).iter().filter(|h| h.get("fl").is_some_and(|fl| fl & mask == 0)).count()
        };
        let (singles, batches) = (calls("single"), calls("batch"));
        (singles, batches, self.up.hits("single").len() + self.up.hits("batch").len() - singles - batches)
    }
}

/// The built-in `informer_handle_deltas` window: one per pop, each at least
/// as long as the work the informer did inside it. `serial N` sends each
/// update after the previous one was handled, so every pop carries one
/// delta and the window count must equal the handler calls exactly. A burst
/// is popped partly in batches (handleBatchDeltas): there the windows must
/// equal the pops the kernel's own uprobes saw on both functions.
#[test]
fn informer_window_counts_every_handled_pop() {
    // 20.48 ms is a bucket bound, so "no window below it" is an exact check.
    const DELAY_US: u64 = 20_480;
    const N: u64 = 8;
    const BURST: u64 = 12;
    let (bin, agent, mut inf, labels) = watched_informer(DELAY_US);
    let windows = || Buckets::parse(&agent.metrics(), "watchscope_window_seconds", &labels);
    // The agent may or may not have caught the startup pops (the empty
    // list's ReplacedAll, which does no indexing, and the first Added):
    // everything below is counted from here on.
    let delay = DELAY_US as f64 * 1e-6;
    let w0 = windows();
    let (before, short_before) = (w0.count(), w0.below(delay));
    let handled = inf.command(&format!("serial {N}"));
    assert_eq!(handled, 1 + N);
    // The last window closes when the informer calls Pop again, after the
    // handler answered: wait for the count, then it must be exact.
    wait_until(Duration::from_secs(10), || windows().count() >= before + N as f64);
    let w = windows();
    assert_eq!(w.count() - before, N as f64, "windows before {before}, after {}:\n{}", w.count(), agent.metrics());
    assert_eq!(w.below(delay), short_before, "a window shorter than the index delay: {:?}", w.cumulative);

    let pops = Pops::count(&agent, bin);
    let before_burst = windows().count();
    assert_eq!(inf.command(&format!("burst {BURST}")), 1 + N + BURST);
    // Every pop had entered its function before its handler answered, so
    // the tracefs hits are complete; the windows close as the informer pops
    // again.
    let (singles, batches, morestack) = pops.calls();
    assert!(batches > 0, "the burst was never popped as a batch");
    wait_until(Duration::from_secs(10), || windows().count() >= before_burst + (singles + batches) as f64);
    let w = windows();
    assert_eq!(
        w.count() - before_burst,
        (singles + batches) as f64,
        "tracefs: {singles} handleDeltas, {batches} handleBatchDeltas ({morestack} morestack passes)"
    );
    assert_eq!(w.below(delay), short_before, "{:?}", w.cumulative);
    // The buckets that gained windows: (upper bound, windows in it).
    let filled: Vec<(f64, f64)> =
        w.cumulative.windows(2).filter(|p| p[1].1 > p[0].1).map(|p| (p[1].0, p[1].1 - p[0].1)).collect();
    eprintln!(
        "windows: {before} at startup, {N} for serial {N}, {} for burst {BURST} ({singles} single + {batches} \
         batch pops); filled buckets (le s, count) {filled:?}",
        w.count() - before_burst,
    );
}

/// The informer's delta handler is called by closures that return right
/// after the call (0.36), or by the method value `HandleDeltas-fm` (0.32),
/// so its window cannot end in its callers; it ends where the informer's
/// loop enters the queue's `Pop`/`PopBatch` again (one emulated trap
/// instead of a single-stepped RET). Measured at once by two agents on one
/// informer, one ending the windows there and one on the handler's RETs:
/// both count every pop, none is shorter than the work injected inside, and
/// the loop end is later than the RET end by only the RET's own trap and
/// the pop's tail.
#[test]
fn informer_window_ends_at_the_next_pop_and_agrees_with_ret_ends() {
    loop_ends_agree_with_ret_ends(clientgo::informer(), &[HANDLE_DELTAS, HANDLE_BATCH_DELTAS]);
}

/// The same on client-go 0.32 (DeltaFIFO, `HandleDeltas`), built with Go
/// 1.24, whose goroutine-id offset in `runtime.g` this also puts to use.
#[test]
fn informer_032_window_ends_at_the_next_pop_and_agrees_with_ret_ends() {
    loop_ends_agree_with_ret_ends(clientgo::informer_032(), &[HANDLE_DELTAS_032]);
}

fn loop_ends_agree_with_ret_ends(bin: &Path, handlers: &[&str]) {
    require_root();
    let comm = bin.file_name().and_then(|n| n.to_str()).expect("fixture name");
    let by_ret = Agent::start(&["--go-comm", comm, "--window-end", "ret"]);
    let by_loop = Agent::start(&["--go-comm", comm]);
    const DELAY_US: u64 = 20_480;
    const N: u64 = 10;
    let mut inf = Informer::start(bin, DELAY_US);
    wait_attached(&by_ret, &[inf.0.pid()]);
    wait_attached(&by_loop, &[inf.0.pid()]);

    // Where the loop end sites are: on the queue pops' entries, one in each.
    let pops: Vec<(u64, u64)> = inspect_json(bin)["probes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["role"] == "client_go_queue_pop")
        .map(|p| (p["file_offset"].as_u64().expect("offset"), p["size"].as_u64().expect("size")))
        .collect();
    assert!(!pops.is_empty(), "no queue pop in {}", bin.display());
    let (loop_sites, ret_sites) = (go_sites(&by_loop, bin), go_sites(&by_ret, bin));
    for &symbol in handlers {
        let find = |all: &[Value]| all.iter().find(|s| s["symbol"] == symbol).cloned().expect("window site");
        let l = find(&loop_sites);
        assert_eq!(l["ends"], "loop", "{l}");
        assert!(l["return_offsets"].as_array().is_some_and(Vec::is_empty), "no RET probe: {l}");
        let ends: Vec<u64> = l["end_offsets"].as_array().into_iter().flatten().filter_map(Value::as_u64).collect();
        for &(at, size) in &pops {
            assert_eq!(ends.iter().filter(|&&e| e >= at && e < at + size).count(), 1, "pop at {at:#x}: {l}");
        }
        assert_eq!(ends.len(), pops.len(), "{l}");
        let r = find(&ret_sites);
        assert_eq!(r["ends"], "ret", "{r}");
        assert!(r["return_offsets"].as_array().is_some_and(|o| !o.is_empty()), "{r}");
    }

    let labels = format!("window=\"informer_handle_deltas\",comm=\"{comm}\"");
    let read = |agent: &Agent| {
        let text = agent.metrics();
        let w = Buckets::parse(&text, "watchscope_window_seconds", &labels);
        let sum =
            watchscope_integration_tests::sample_value(&text, &format!("watchscope_window_seconds_sum{{{labels}}}"));
        (w, sum.unwrap_or(0.0))
    };
    // Either agent may or may not have caught the startup pops: counted
    // from here on.
    let delay = DELAY_US as f64 * 1e-6;
    let before = [read(&by_ret), read(&by_loop)];
    assert_eq!(inf.command(&format!("serial {N}")), 1 + N);
    let mut means = Vec::new();
    for ((how, agent), (w0, sum0)) in [("ret", &by_ret), ("loop", &by_loop)].into_iter().zip(&before) {
        wait_until(Duration::from_secs(10), || read(agent).0.count() >= w0.count() + N as f64);
        let (w, sum) = read(agent);
        assert_eq!(w.count() - w0.count(), N as f64, "{how}: {:?}", w.cumulative);
        assert_eq!(w.below(delay), w0.below(delay), "{how}: a window shorter than the work inside: {:?}", w.cumulative);
        means.push((sum - sum0) / N as f64 * 1e6);
    }
    for reason in ["window_indirect_call", "window_stale"] {
        let sample = format!("watchscope_dropped_total{{reason=\"{reason}\"}}");
        assert_eq!(by_loop.sample_present(&sample), 0.0, "{reason}");
    }
    let later_us = means[1] - means[0];
    eprintln!("mean window {:.1} µs ending on RETs, {:.1} µs at the next pop: {later_us:+.2} µs", means[0], means[1]);
    // The two agents' entry programs run on one trap, in either order.
    assert!(later_us > -1.0, "the loop end came before the RET: {later_us} µs per window");
    // Between the two: the other agent's RET trap and single-step, and the
    // closures' returns, Pop's tail and the loop's context check. The
    // bound tells a stray end (one that took in the next pop's wait, or
    // the next window's work) from that.
    assert!(later_us < DELAY_US as f64 / 2.0, "the loop end came {later_us} µs per window after the RET");
}

/// An informer stopped while its delta handler runs leaves that window
/// open: its loop never pops again. The runtime gives the loop's `g` to a
/// later goroutine, here (on one P, likely) the loop of the next informer,
/// 500 ms later; its first pop must not close the old window as a
/// 500 ms-long one. The windows' goroutine ids tell them apart: every pop
/// that returned is one window, none is longer than its work, and each
/// interrupted one is dropped as `window_stale` when its `g` comes back.
#[test]
fn an_informer_stopped_inside_its_handler_leaves_no_stale_window() {
    const DELAY_US: u64 = 20_480;
    const R: u64 = 6;
    let (bin, agent, mut inf, labels) = watched_informer(DELAY_US);
    let windows = || Buckets::parse(&agent.metrics(), "watchscope_window_seconds", &labels);
    let stale = || agent.sample_present("watchscope_dropped_total{reason=\"window_stale\"}");
    let pops = Pops::count(&agent, bin);
    let before = windows().count();
    let reply = inf.command(&format!("restart {R}"));
    // Each new informer pops its (empty) list and one Added event; the last
    // one's windows close as its loop pops again.
    let (singles, batches, _) = pops.calls();
    let popped = (singles + batches) as u64;
    assert!(popped >= 3 * R, "{singles} + {batches} pops for {R} restarts");
    let returned = (popped - R) as f64;
    wait_until(Duration::from_secs(10), || windows().count() >= before + returned);
    let w = windows();
    let dropped = stale();
    eprintln!(
        "{R} restarts (reply {reply}): {popped} pops, {} windows, {dropped} stale; buckets {:?}",
        w.count() - before,
        w.cumulative
    );
    assert_eq!(w.count() - before, returned, "{:?}", w.cumulative);
    // Two objects' work at most (a pop of the list and an event), far
    // from the 500 ms a stale window would span.
    assert_eq!(w.below(0.25), w.count(), "a window longer than 250 ms: {:?}", w.cumulative);
    assert!(dropped >= 1.0 && dropped <= R as f64, "{dropped} stale windows for {R} interrupted pops");
}
