//! What `watchscope record` reports: per stage and window, the recording's
//! own histogram (end snapshot minus start snapshot) with percentiles read
//! from the shared bucket layout; where each window's time went; the worst
//! watch event chains. Rendered here as terminal text; `html.rs` renders the
//! same `Report` as a page.

use std::{collections::BTreeMap, fmt::Write as _, time::Duration};

use agent_common::{Counter, Histogram, NBUCKETS, goruntime::Inner, hist, watch::Stage};

use crate::collect::{
    LabelledHistogram, Snapshot,
    chains::{Chain, ChainCounts, ChainSettings, Mark, RecordMax, StageView, VIEW_STAGES, view_columns},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RowKind {
    Stage,
    Window,
}

/// One stage or window over the recording.
#[derive(Clone, Debug)]
pub struct Row {
    pub name: String,
    pub kind: RowKind,
    pub hist: Histogram,
    /// The longest observation: exact from the records when they cover the
    /// histogram's top bucket, else that bucket's upper bound.
    pub max_ns: Option<u64>,
    pub max_exact: bool,
}

impl Row {
    pub fn count(&self) -> u64 {
        self.hist.count()
    }

    /// The `q` quantile in nanoseconds, never above the known maximum.
    pub fn quantile_ns(&self, q: f64) -> Option<f64> {
        let v = quantile_ns(&self.hist, q)?;
        Some(match self.max_ns {
            Some(m) if self.max_exact => v.min(m as f64),
            _ => v,
        })
    }

    /// The `q` quantile as a report cell ("-" when empty).
    pub fn quantile_text(&self, q: f64) -> String {
        self.quantile_ns(q).map(fmt_ns).unwrap_or_else(|| "-".into())
    }

    /// The maximum as a report cell: exact, or "≤" its bucket's bound.
    pub fn max_text(&self) -> String {
        match self.max_ns {
            Some(m) if self.max_exact => fmt_ns(m as f64),
            Some(m) => format!("≤{}", fmt_ns(m as f64)),
            None => "-".into(),
        }
    }
}

/// The `q` quantile (0..=1) of a histogram in nanoseconds: the observation
/// of rank ceil(q·n), placed by linear interpolation inside its bucket (as
/// Prometheus' histogram_quantile does). The +Inf bucket answers its lower
/// bound. None for an empty histogram.
pub fn quantile_ns(h: &Histogram, q: f64) -> Option<f64> {
    let n = h.count();
    if n == 0 {
        return None;
    }
    let rank = (q.clamp(0.0, 1.0) * n as f64).ceil().max(1.0);
    let mut below = 0.0;
    for (i, &b) in h.buckets.iter().enumerate() {
        if b == 0 {
            continue;
        }
        let b = b as f64;
        if below + b >= rank {
            // Every bucket is bounded (the last reaches past u64::MAX ns).
            let lo = hist::bucket_lower_bound_seconds(i) * 1e9;
            let hi = hist::bucket_upper_bound_seconds(i) * 1e9;
            return Some(lo + (hi - lo) * (rank - below) / b);
        }
        below += b;
    }
    None
}

/// A window's total time and what it was spent on.
#[derive(Clone, Debug)]
pub struct Breakdown {
    pub window: String,
    pub count: u64,
    pub total_ns: u64,
    /// None: not measured (off-CPU and run queue without scheduler probes).
    pub inner_ns: [Option<u64>; Inner::COUNT as usize],
}

impl Breakdown {
    /// Share of the total in `inner` (0..=1), if it was measured.
    pub fn share(&self, i: Inner) -> Option<f64> {
        let ns = self.inner_ns[i as usize]?;
        Some(if self.total_ns == 0 { 0.0 } else { ns as f64 / self.total_ns as f64 })
    }

    /// What the measured kinds do not explain (running its own code, and
    /// the kinds not measured).
    pub fn other_share(&self) -> f64 {
        let known: f64 = Inner::ALL.iter().filter_map(|i| self.share(*i)).sum();
        (1.0 - known).max(0.0)
    }
}

#[derive(Clone, Debug)]
pub struct Report {
    pub duration: Duration,
    pub rows: Vec<Row>,
    pub breakdown: Vec<Breakdown>,
    pub counts: ChainCounts,
    pub chains: Vec<Chain>,
    pub settings: ChainSettings,
    /// Kernel drop counters that moved during the recording (reason, n).
    pub dropped: Vec<(&'static str, u64)>,
}

/// `end - start` for the series of one family, summed per value of `label`
/// (other labels — process, pod — folded together).
fn diff_by(start: &[LabelledHistogram], end: &[LabelledHistogram], label: &[&str]) -> BTreeMap<Vec<String>, Histogram> {
    let mut out: BTreeMap<Vec<String>, Histogram> = BTreeMap::new();
    for e in end {
        let mut h = e.hist;
        if let Some(s) = start.iter().find(|s| s.labels == e.labels) {
            for (a, b) in h.buckets.iter_mut().zip(s.hist.buckets.iter()) {
                *a = a.saturating_sub(*b);
            }
            h.sum_ns = h.sum_ns.saturating_sub(s.hist.sum_ns);
        }
        let key: Vec<String> = label
            .iter()
            .map(|l| e.labels.iter().find(|(k, _)| k == l).map(|(_, v)| v.clone()).unwrap_or_default())
            .collect();
        out.entry(key).or_default().merge(&h);
    }
    out
}

fn top_bucket(h: &Histogram) -> Option<usize> {
    h.buckets.iter().rposition(|b| *b > 0)
}

fn row(name: String, kind: RowKind, h: Histogram, recorded_max: Option<u64>) -> Row {
    let top = top_bucket(&h);
    let (max_ns, max_exact) = match (top, recorded_max) {
        (None, _) => (None, false),
        (Some(t), Some(m)) if m > 0 && hist::bucket_index(m) as usize == t => (Some(m), true),
        (Some(t), _) => {
            let ub = hist::bucket_upper_bound_seconds(t);
            let ub = if ub.is_finite() { ub } else { hist::bucket_lower_bound_seconds(t) };
            (Some((ub * 1e9) as u64), false)
        }
    };
    Row { name, kind, hist: h, max_ns, max_exact }
}

impl Report {
    #[allow(clippy::too_many_arguments)]
    pub fn build(
        duration: Duration,
        start: &Snapshot,
        end: &Snapshot,
        window_names: &[String],
        max: &RecordMax,
        counts: ChainCounts,
        chains: Vec<Chain>,
        settings: ChainSettings,
    ) -> Report {
        let mut rows = Vec::new();
        let stages = diff_by(&start.watch_stages, &end.watch_stages, &["stage"]);
        for stage in Stage::ALL {
            if let Some(h) = stages.get(&vec![stage.name().to_string()])
                && h.count() > 0
            {
                rows.push(row(stage.name().into(), RowKind::Stage, *h, Some(max.stages[stage as usize])));
            }
        }
        let windows = diff_by(&start.windows, &end.windows, &["window"]);
        let inner = diff_by(&start.window_inner, &end.window_inner, &["window", "inner"]);
        let mut breakdown = Vec::new();
        for (w, name) in window_names.iter().enumerate() {
            let Some(h) = windows.get(&vec![name.clone()]).filter(|h| h.count() > 0) else { continue };
            rows.push(row(name.clone(), RowKind::Window, *h, max.windows.get(&(w as u32)).copied()));
            let mut inner_ns = [None; Inner::COUNT as usize];
            for i in Inner::ALL {
                // A kind observed in none of this recording's windows was
                // not measured at all (every window observes every kind it
                // measures, zeros included).
                inner_ns[i as usize] = inner
                    .get(&vec![name.clone(), i.name().to_string()])
                    .filter(|ih| ih.count() > 0)
                    .map(|ih| ih.sum_ns);
            }
            breakdown.push(Breakdown { window: name.clone(), count: h.count(), total_ns: h.sum_ns, inner_ns });
        }
        let dropped = Counter::ALL
            .iter()
            .filter_map(|c| Some((c.drop_reason()?, end.kernel(*c).saturating_sub(start.kernel(*c)))))
            .filter(|(_, n)| *n > 0)
            .collect();
        Report { duration, rows, breakdown, counts, chains, settings, dropped }
    }

    /// The bucket range every row's bars share: (first, last) non-empty
    /// bucket over all rows, and how many buckets one bar holds so that at
    /// most `max_bars` bars are drawn.
    pub fn bar_layout(&self, max_bars: usize) -> Option<(usize, usize, usize)> {
        let lo = self.rows.iter().filter_map(|r| r.hist.buckets.iter().position(|b| *b > 0)).min()?;
        let hi = self.rows.iter().filter_map(|r| top_bucket(&r.hist)).max()?;
        let width = hi - lo + 1;
        let group = width.div_ceil(max_bars.max(1));
        Some((lo, hi, group))
    }

    /// Counts per bar for one row, on the shared layout.
    pub fn bars(&self, r: &Row, layout: (usize, usize, usize)) -> Vec<u64> {
        let (lo, hi, group) = layout;
        (lo..=hi).step_by(group).map(|s| r.hist.buckets[s..(s + group).min(hi + 1)].iter().sum()).collect()
    }
}

/// Human durations: 812ns, 31.2µs, 4.05ms, 1.20s.
pub fn fmt_ns(ns: f64) -> String {
    if ns < 1e3 {
        format!("{ns:.0}ns")
    } else if ns < 1e6 {
        trim3(ns / 1e3) + "µs"
    } else if ns < 1e9 {
        trim3(ns / 1e6) + "ms"
    } else {
        trim3(ns / 1e9) + "s"
    }
}

/// Three significant digits.
fn trim3(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// Seconds bound of a bucket edge for axis labels.
pub fn edge_label(secs: f64) -> String {
    fmt_ns(secs * 1e9)
}

const SPARK: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];

/// Terminal rendering; `color` adds ANSI colours (only on a terminal).
pub fn render_text(r: &Report, top: usize, color: bool) -> String {
    let paint = |s: &str, m: Mark| -> String {
        if !color {
            return s.to_string();
        }
        let code = match m {
            Mark::Ok => return s.to_string(),
            Mark::Warn => "33",
            Mark::Error | Mark::Broken => "31;1",
        };
        format!("\x1b[{code}m{s}\x1b[0m")
    };
    let bold = |s: &str| if color { format!("\x1b[1m{s}\x1b[0m") } else { s.to_string() };
    let mut o = String::new();
    let c = &r.counts;
    let _ = writeln!(o, "{}", bold(&format!("watchscope record: {:.1}s", r.duration.as_secs_f64())));
    let elsewhere =
        if c.elsewhere > 0 { format!(", {} of them committed on another node", c.elsewhere) } else { String::new() };
    let _ = writeln!(
        o,
        "chains: {} complete, {} slow, {} broken{elsewhere}  (warn > {}, error > {}, broken: not dispatched within {})",
        c.complete,
        c.slow,
        c.broken,
        fmt_ns(r.settings.warn_ns as f64),
        fmt_ns(r.settings.error_ns as f64),
        fmt_ns(r.settings.timeout_ns as f64)
    );
    let _ = writeln!(o);
    let _ = writeln!(o, "{}", bold("per stage and window (this recording only)"));
    let layout = r.bar_layout(40);
    let mut head =
        format!("{:<24} {:>8} {:>9} {:>9} {:>9} {:>9}  ", "stage / window", "count", "p50", "p90", "p99", "max");
    if let Some((lo, hi, g)) = layout {
        let n = (hi - lo) / g + 1;
        let left = edge_label(hist::bucket_lower_bound_seconds(lo));
        let right = edge_label(hist::bucket_upper_bound_seconds((lo + n * g - 1).min(NBUCKETS - 1)));
        let pad = (n + 2).saturating_sub(left.len() + right.len());
        head.push_str(&format!("{left}{}{right}", " ".repeat(pad)));
    }
    let _ = writeln!(o, "{}", head.trim_end());
    for row in &r.rows {
        let q = |p| row.quantile_text(p);
        let max = row.max_text();
        let name = match row.kind {
            RowKind::Stage => row.name.clone(),
            RowKind::Window => format!("{} (window)", row.name),
        };
        let mut line = format!("{name:<24} {:>8} {:>9} {:>9} {:>9} {:>9}  ", row.count(), q(0.5), q(0.9), q(0.99), max);
        if let Some(l) = layout {
            let bars = r.bars(row, l);
            let peak = bars.iter().copied().max().unwrap_or(0).max(1);
            line.push('▕');
            for b in bars {
                line.push(if b == 0 { ' ' } else { SPARK[((b * 7).div_ceil(peak) as usize).min(7)] });
            }
            line.push('▏');
        }
        let _ = writeln!(o, "{line}");
    }
    if r.rows.is_empty() {
        let _ = writeln!(o, "(no watch events or windows during the recording)");
    }
    if !r.breakdown.is_empty() {
        let _ = writeln!(o);
        let _ = writeln!(o, "{}", bold("where did the time go (share of each window's total time)"));
        let mut h = format!("{:<24} {:>8} {:>9}", "window", "count", "total");
        for i in Inner::ALL {
            h.push_str(&format!(" {:>9}", i.name()));
        }
        h.push_str(&format!(" {:>9}", "other"));
        let _ = writeln!(o, "{h}");
        for b in &r.breakdown {
            let mut l = format!("{:<24} {:>8} {:>9}", b.window, b.count, fmt_ns(b.total_ns as f64));
            for i in Inner::ALL {
                match b.share(i) {
                    Some(s) => l.push_str(&format!(" {:>8.1}%", 100.0 * s)),
                    None => l.push_str(&format!(" {:>9}", "-")),
                }
            }
            l.push_str(&format!(" {:>8.1}%", 100.0 * b.other_share()));
            let _ = writeln!(o, "{l}");
        }
    }
    let _ = writeln!(o);
    let shown: Vec<&Chain> = r.chains.iter().take(top).collect();
    let _ = writeln!(
        o,
        "{}",
        bold(&format!("slowest chains ({} of {}; time since commit)", shown.len(), c.complete + c.slow + c.broken))
    );
    let columns = view_columns(&shown);
    let mut head = format!("{:>10} {:<9} {:>8} {:>8}  ", "rev", "outcome", "watchers", "clients");
    for &i in &columns {
        head.push_str(&format!("{:<18}", VIEW_STAGES[i]));
    }
    let _ = writeln!(o, "{}", head.trim_end());
    for ch in shown {
        let v = ch.view(&r.settings);
        let outcome = paint(&format!("{:<9}", ch.outcome.name()), ch.worst(&r.settings));
        let mut l = format!("{:>10} {outcome} {:>8} {:>8}  ", ch.rev, ch.watchers(), ch.clients());
        for &i in &columns {
            let s = v[i];
            l.push_str(&paint(&format!("{:<18}", stage_text(&s, "-")), s.mark));
        }
        let _ = writeln!(o, "{}", l.trim_end());
    }
    let drops = drop_list(r);
    if !drops.is_empty() {
        let _ = writeln!(o);
        let _ = writeln!(o, "not recorded or not joined: {}", drops.join(", "));
    }
    o
}

/// One chain cell: the time since commit and its mark, `missing` when the
/// stage was not reached (the terminal and the HTML report differ only there).
pub fn stage_text(s: &StageView, missing: &str) -> String {
    match (s.at_ns, s.mark) {
        (_, Mark::Broken) => "broken".to_string(),
        (None, _) => missing.to_string(),
        (Some(t), Mark::Ok) => format!("+{}", fmt_ns(t as f64)),
        (Some(t), m) => format!("+{} {}", fmt_ns(t as f64), m.name()),
    }
}

/// What the recording could not record or join, as `reason=n` items.
pub fn drop_list(r: &Report) -> Vec<String> {
    let c = &r.counts;
    r.dropped
        .iter()
        .map(|(k, n)| format!("{k}={n}"))
        .chain(
            [("chain_evicted", c.evicted), ("chain_late", c.late)]
                .iter()
                .filter(|(_, n)| *n > 0)
                .map(|(k, n)| format!("{k}={n}")),
        )
        .collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::collect::chains::{DispatchHop, Outcome, SendHop};

    const MS: u64 = 1_000_000;

    #[test]
    fn quantiles_interpolate_inside_the_shared_buckets() {
        let mut h = Histogram::ZERO;
        // 1 ms falls in (2^-10, 2^-9.75] s = (976.6, 1161.3] µs.
        for _ in 0..90 {
            h.observe(MS);
        }
        // 5 s: (2^2.25, 2^2.5] s = (4.757, 5.657] s.
        for _ in 0..10 {
            h.observe(5_000 * MS);
        }
        let b1 = hist::bucket_index(MS) as usize;
        let (lo, hi) = (hist::bucket_lower_bound_seconds(b1) * 1e9, hist::bucket_upper_bound_seconds(b1) * 1e9);
        assert_eq!((lo, hi), (976_562.5, 2f64.powf(-9.75) * 1e9));
        // p50: rank 50 of 90 in the first bucket.
        let p50 = quantile_ns(&h, 0.5).unwrap();
        assert!((p50 - (lo + (hi - lo) * 50.0 / 90.0)).abs() < 1e-6, "{p50}");
        // p90: rank 90, the last of the first bucket: its upper bound.
        assert!((quantile_ns(&h, 0.9).unwrap() - hi).abs() < 1e-6);
        // p99: rank 99, 9th of 10 in the 5 s bucket.
        let b2 = hist::bucket_index(5_000 * MS) as usize;
        let (lo2, hi2) = (hist::bucket_lower_bound_seconds(b2) * 1e9, hist::bucket_upper_bound_seconds(b2) * 1e9);
        assert!((quantile_ns(&h, 0.99).unwrap() - (lo2 + (hi2 - lo2) * 0.9)).abs() < 1e-3);
        assert_eq!(quantile_ns(&Histogram::ZERO, 0.5), None);
        // No bucket is unbounded: the longest duration answers inside its own.
        let mut long = Histogram::ZERO;
        long.observe(u64::MAX);
        let q = quantile_ns(&long, 0.5).unwrap();
        assert!(q >= u64::MAX as f64 && q <= hist::bucket_upper_bound_seconds(NBUCKETS - 1) * 1e9, "{q}");
        // A known maximum caps the interpolation.
        let r = row("x".into(), RowKind::Stage, h, Some(5_000 * MS));
        assert!(r.max_exact);
        assert_eq!(r.quantile_ns(1.0), Some(5_000.0 * MS as f64));
        // A maximum from another bucket (records lost) is not trusted.
        let r = row("x".into(), RowKind::Stage, h, Some(MS));
        assert!(!r.max_exact);
        assert_eq!(r.max_ns, Some((hi2) as u64));
    }

    #[test]
    fn durations_print_with_three_digits() {
        assert_eq!(fmt_ns(812.0), "812ns");
        assert_eq!(fmt_ns(31_234.0), "31.2µs");
        assert_eq!(fmt_ns(4_051_000.0), "4.05ms");
        assert_eq!(fmt_ns(1_204_000_000.0), "1.20s");
        assert_eq!(fmt_ns(150_000_000.0), "150ms");
    }

    pub(crate) fn sample_report() -> Report {
        let mut send = Histogram::ZERO;
        let mut disp = Histogram::ZERO;
        for i in 0..25 {
            send.observe(40_000 + i * 1000);
            disp.observe(900_000 + i * 10_000);
        }
        send.observe(4_100 * MS);
        let mut w = Histogram::ZERO;
        w.observe(20_000);
        let settings = ChainSettings { keep: 10, ..ChainSettings::default() };
        let slow = Chain {
            member: 1,
            rev: 42,
            commit_ns: 1_000 * MS,
            origin_ns: 1_000 * MS,
            sends: vec![SendHop { stream: (1, 2), watch_id: 0, enqueue_ns: 1_000 * MS + 30_000, at_ns: 5_100 * MS }],
            dispatches: vec![DispatchHop { stream: (3, 4), watch_id: 0, at_ns: 5_101 * MS, window: None }],
            kube: vec![],
            missing: vec![],
            outcome: Outcome::Slow,
        };
        let broken = Chain {
            rev: 43,
            dispatches: vec![],
            missing: vec![crate::collect::chains::Missing { client: (3, 4), watch_id: 0, count: 1, column: 2 }],
            outcome: Outcome::Broken,
            ..slow.clone()
        };
        Report {
            duration: Duration::from_secs(30),
            rows: vec![
                row("commit_to_send".into(), RowKind::Stage, send, Some(4_100 * MS)),
                row("commit_to_dispatch".into(), RowKind::Stage, disp, None),
                row("etcd_dispatch".into(), RowKind::Window, w, Some(20_000)),
            ],
            breakdown: vec![Breakdown {
                window: "etcd_dispatch".into(),
                count: 1,
                total_ns: 20_000,
                inner_ns: [Some(5_000), Some(0), Some(0), Some(10_000), Some(1_000)],
            }],
            counts: ChainCounts { complete: 24, slow: 1, broken: 1, ..ChainCounts::default() },
            chains: vec![broken, slow],
            settings,
            dropped: vec![("ringbuf_full", 3)],
        }
    }

    #[test]
    fn text_report_has_aligned_rows_bars_breakdown_and_marked_chains() {
        let r = sample_report();
        let t = render_text(&r, 10, false);
        assert!(t.contains("chains: 24 complete, 1 slow, 1 broken"), "{t}");
        let line = |start: &str| t.lines().find(|l| l.starts_with(start)).unwrap_or_else(|| panic!("{start}: {t}"));
        let send = line("commit_to_send ");
        let disp = line("commit_to_dispatch ");
        let win = line("etcd_dispatch (window)");
        assert_eq!(send.split_whitespace().nth(1), Some("26"));
        assert!(send.contains("4.10s"), "exact max from the records: {send}");
        assert!(disp.contains('≤'), "max from the bucket bound: {disp}");
        // Bars start and end in the same column on every row.
        let col = |l: &str| (l.chars().position(|c| c == '▕'), l.chars().position(|c| c == '▏'));
        assert_eq!(col(send), col(disp));
        assert_eq!(col(send), col(win));
        assert!(col(send).0.is_some());
        let b = t.lines().rfind(|l| l.starts_with("etcd_dispatch ")).unwrap_or_default();
        assert!(b.contains("25.0%") && b.contains("50.0%") && b.contains("5.0%") && b.contains("20.0%"), "{b}");
        let broken = line("        43");
        assert!(broken.contains("broken") && !broken.contains("+4.10s warn"), "{broken}");
        let slow = line("        42");
        assert!(slow.contains("+4.10s error"), "{slow}");
        assert!(t.contains("ringbuf_full=3"));
        assert!(!t.contains('\x1b'));
        let colored = render_text(&r, 10, true);
        assert!(colored.contains("\x1b[31;1m"));
    }

    #[test]
    fn kinds_not_measured_print_a_dash_and_fall_into_other() {
        // Without scheduler probes off-CPU and run queue were not measured:
        // "-", not "0.0%", and their time stays in "other".
        let mut r = sample_report();
        r.breakdown[0].inner_ns = [Some(5_000), Some(0), Some(0), None, None];
        let t = render_text(&r, 10, false);
        let b = t.lines().rfind(|l| l.starts_with("etcd_dispatch ")).unwrap_or_default();
        let cells: Vec<&str> = b.split_whitespace().skip(3).collect();
        assert_eq!(cells, ["25.0%", "0.0%", "0.0%", "-", "-", "75.0%"], "{b}");
    }
}
