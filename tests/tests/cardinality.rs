//! `--max-series` caps every labelled family: 10,000 short-lived watched
//! processes, each its own label set (`--label-pid`), against a cap of 100.

use std::{collections::BTreeSet, process::Command, time::Duration};

use watchscope::export::{FAMILIES, families::PREFIX};
use watchscope_integration_tests::{Agent, samples};

const EXECS: u64 = 10_000;
const CAP: u64 = 100;

/// Distinct label sets of a family in exposition text (histograms by their
/// `_count` samples).
fn series_count(text: &str, family: &watchscope::export::Family) -> usize {
    let Some(sample) = family.sample_names().pop() else { return 0 };
    samples(text, &sample).into_iter().map(|(labels, _)| labels).collect::<BTreeSet<_>>().len()
}

#[test]
fn ten_thousand_processes_stay_within_the_cap_and_the_overflow_is_exact() {
    let dir = tempfile::tempdir().expect("temp dir");
    // A name nobody else on the machine execs (comm is at most 15 bytes).
    let comm = format!("wsc{}", std::process::id() % 1_000_000_000);
    let path = dir.path().join(&comm);
    std::fs::copy("/bin/true", &path).expect("copy /bin/true");
    let agent = Agent::start(&["--comm", &comm, "--label-pid", "--max-series", &CAP.to_string()]);

    // In batches through one shell: 10,000 Command::spawn calls from here
    // would take minutes; a shell loop forks and execs the copy directly.
    let script = format!("i=0; while [ $i -lt {EXECS} ]; do {}; i=$((i+1)); done", path.display());
    let status = Command::new("/bin/sh").args(["-c", &script]).status().expect("run the exec loop");
    assert!(status.success());

    let dropped = format!("{PREFIX}_series_dropped_total{{family=\"process_execs\"}}");
    let want_dropped = (EXECS - CAP) as f64;
    let got = agent.wait_for_sample(&dropped, want_dropped, Duration::from_secs(30));
    std::thread::sleep(Duration::from_millis(500));
    let text = agent.metrics();
    assert_eq!(
        agent.sample(&format!("{PREFIX}_dropped_total{{reason=\"ringbuf_full\"}}")),
        0.0,
        "exec events were lost: the ground truth below cannot hold"
    );
    assert_eq!(agent.sample(&dropped), want_dropped, "first poll saw {got}");

    // The cap holds for every family, and process_execs is full: every one
    // of its series is one of our processes, counted once.
    for family in FAMILIES {
        let n = series_count(&text, family);
        assert!(n as u64 <= CAP, "{}: {n} series > {CAP}", family.name);
    }
    let execs = samples(&text, &format!("{PREFIX}_process_execs_total"));
    assert_eq!(execs.len() as u64, CAP);
    for (labels, value) in &execs {
        assert_eq!(labels.get("comm"), Some(&comm), "{labels:?}");
        assert!(labels.contains_key("pid"), "{labels:?}");
        assert_eq!(*value, 1.0, "{labels:?}");
    }
    // The whole text stays small: no series was made for the other 9,900.
    assert!(text.len() < 1 << 20, "{} bytes", text.len());
}
