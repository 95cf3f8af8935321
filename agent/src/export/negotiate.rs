//! Content negotiation on `/metrics`: the Prometheus protobuf format (the
//! only one that carries native histograms) for a scraper that asks for it
//! (Prometheus with native histograms on), OpenMetrics 1.0 for a scraper that
//! asks for it in `Accept` (Prometheus does by default), the Prometheus text
//! format 0.0.4 for everyone else (curl, older scrapers, `promtool check
//! metrics`).
//!
//! prometheus-client encodes only OpenMetrics, so the 0.0.4 text is made from
//! it line by line. The two formats differ, for what watchscope exports, in:
//! - a counter family is named by its sample name: `# TYPE x counter` over
//!   `x_total` samples in OpenMetrics is `# TYPE x_total counter` in 0.0.4
//!   (Prometheus would otherwise see `x_total` as an untyped metric);
//! - 0.0.4 has no `# UNIT` and no `# EOF` line;
//! - `# HELP` escapes only `\` and newline in 0.0.4 (OpenMetrics also `"`).
//!
//! Label values, histogram samples and numbers are written the same way.

pub const OPENMETRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
pub const TEXT_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
pub const PROTOBUF_CONTENT_TYPE: &str =
    "application/vnd.google.protobuf; proto=io.prometheus.client.MetricFamily; encoding=delimited";

/// The exposition formats `/metrics` serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// Length-delimited `io.prometheus.client.MetricFamily` messages.
    Protobuf,
    OpenMetrics,
    Text004,
}

impl Format {
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Protobuf => PROTOBUF_CONTENT_TYPE,
            Format::OpenMetrics => OPENMETRICS_CONTENT_TYPE,
            Format::Text004 => TEXT_CONTENT_TYPE,
        }
    }
}

/// The format for an `Accept` header: protobuf when a media range names
/// `application/vnd.google.protobuf` for `io.prometheus.client.MetricFamily`
/// delimited, OpenMetrics when one names `application/openmetrics-text` (any
/// version we can serve: 1.0.0, or none given), each with a non-zero q,
/// else the 0.0.4 text. Prometheus sends e.g.
/// `application/openmetrics-text;version=1.0.0;q=0.5,text/plain;version=0.0.4;q=0.4,*/*;q=0.1`,
/// and with native histograms on it puts the protobuf range first. The
/// highest q wins; on a tie protobuf, then OpenMetrics.
pub fn choose(accept: Option<&str>) -> Format {
    let Some(accept) = accept else { return Format::Text004 };
    let (mut pb, mut om, mut text) = (None::<f32>, None::<f32>, None::<f32>);
    for range in accept.split(',') {
        let mut parts = range.split(';').map(str::trim);
        let media = parts.next().unwrap_or_default().to_ascii_lowercase();
        let mut q = 1.0f32;
        let (mut version, mut proto, mut encoding) = (None, None, None);
        for p in parts {
            if let Some((k, v)) = p.split_once('=') {
                let v = Some(v.trim().to_string());
                match k.trim().to_ascii_lowercase().as_str() {
                    "q" => q = v.and_then(|v| v.parse().ok()).unwrap_or(0.0),
                    "version" => version = v,
                    "proto" => proto = v,
                    "encoding" => encoding = v,
                    _ => {}
                }
            }
        }
        if q <= 0.0 {
            continue;
        }
        match media.as_str() {
            "application/vnd.google.protobuf"
                if proto.as_deref() == Some("io.prometheus.client.MetricFamily")
                    && encoding.as_deref() == Some("delimited") =>
            {
                pb = Some(pb.map_or(q, |p| p.max(q)));
            }
            "application/openmetrics-text" if version.as_deref().is_none_or(|v| v.starts_with("1.0")) => {
                om = Some(om.map_or(q, |o| o.max(q)));
            }
            "text/plain" | "*/*" | "text/*" => text = Some(text.map_or(q, |t| t.max(q))),
            _ => {}
        }
    }
    let best = |q: Option<f32>, others: &[Option<f32>]| q.is_some_and(|q| others.iter().flatten().all(|o| q >= *o));
    if best(pb, &[om, text]) {
        Format::Protobuf
    } else if best(om, &[text]) {
        Format::OpenMetrics
    } else {
        Format::Text004
    }
}

/// OpenMetrics text (as prometheus-client writes it) → Prometheus text 0.0.4.
pub fn to_text_004(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    // Counter families seen in `# TYPE` lines; their HELP came first.
    let counters = counter_families(openmetrics);
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            let name = if counters.contains(&name) { format!("{name}_total") } else { name.to_string() };
            out.push_str(&format!("# HELP {name} {}\n", help_004(help)));
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            match rest.split_once(' ') {
                Some((name, "counter")) => out.push_str(&format!("# TYPE {name}_total counter\n")),
                // Types without a 0.0.4 equivalent (info, stateset,
                // gaugehistogram) are not exported by watchscope.
                _ => out.push_str(&format!("{line}\n")),
            }
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

fn counter_families(text: &str) -> Vec<&str> {
    text.lines().filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter")).collect()
}

/// OpenMetrics HELP escaping (`\\`, `\n`, `\"`) → 0.0.4 (`\\`, `\n`).
fn help_004(help: &str) -> String {
    help.replace("\\\"", "\"")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        attach::slots::LabelSet,
        collect::{LabelledCount, LabelledHistogram, Snapshot},
        export::render,
    };

    #[test]
    fn chooses_by_accept() {
        let prom = "application/openmetrics-text;version=1.0.0;q=0.5,application/openmetrics-text;version=0.0.1;q=0.4,\
                    text/plain;version=0.0.4;q=0.3,*/*;q=0.2";
        assert_eq!(choose(Some(prom)), Format::OpenMetrics);
        assert_eq!(choose(Some("application/openmetrics-text")), Format::OpenMetrics);
        assert_eq!(choose(None), Format::Text004);
        assert_eq!(choose(Some("*/*")), Format::Text004);
        assert_eq!(choose(Some("text/plain;version=0.0.4")), Format::Text004);
        assert_eq!(choose(Some("application/openmetrics-text;q=0")), Format::Text004);
        assert_eq!(choose(Some("application/openmetrics-text;version=2.0.0")), Format::Text004);
        assert_eq!(choose(Some("text/plain;q=0.9, application/openmetrics-text;q=0.1")), Format::Text004);
        // What Prometheus 3 sends with native histograms on.
        let native = "application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily;encoding=delimited;q=0.5,\
                      application/openmetrics-text;version=1.0.0;q=0.4,text/plain;version=0.0.4;q=0.3,*/*;q=0.2";
        assert_eq!(choose(Some(native)), Format::Protobuf);
        // A protobuf range for another message or encoding is not ours.
        assert_eq!(choose(Some("application/vnd.google.protobuf;proto=x.Y;encoding=delimited")), Format::Text004);
        assert_eq!(
            choose(Some("application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily;encoding=text")),
            Format::Text004
        );
        assert_eq!(
            choose(Some(
                "application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily;encoding=delimited;q=0.1,\
                 application/openmetrics-text;q=0.5"
            )),
            Format::OpenMetrics
        );
    }

    #[test]
    fn converts_counters_help_and_trailer() {
        let om = "# HELP x_execs Processes that \\\"exec\\\".\n# TYPE x_execs counter\n# UNIT x_execs seconds\n\
                  x_execs_total 3\n# HELP x_up Up.\n# TYPE x_up gauge\nx_up 1\n# EOF\n";
        let want = "# HELP x_execs_total Processes that \"exec\".\n# TYPE x_execs_total counter\nx_execs_total 3\n\
                    # HELP x_up Up.\n# TYPE x_up gauge\nx_up 1\n";
        assert_eq!(to_text_004(om), want);
    }

    #[test]
    fn renders_a_whole_snapshot_both_ways() {
        let mut h = agent_common::Histogram::ZERO;
        h.observe(2_000);
        let who =
            LabelSet { namespace: "ns".into(), pod: "p".into(), container: "c".into(), comm: "etcd".into(), pid: None };
        let s = Snapshot {
            watch_stages: vec![LabelledHistogram {
                labels: who.pairs(&[("stage", "commit_to_send".into())]),
                hist: h,
                exemplar: None,
            }],
            watch_events: vec![LabelledCount::new(who.pairs(&[("side", "server".into())]), 5)],
            ..Snapshot::default()
        };
        let om = render(s, crate::export::ClassicBuckets::Fine).unwrap();
        assert!(om.ends_with("# EOF\n"));
        assert!(om.contains("# TYPE watchscope_watch_events counter\n"));
        let text = to_text_004(&om);
        assert!(!text.contains("# EOF") && !text.contains("# UNIT"));
        assert!(text.contains("# TYPE watchscope_watch_events_total counter\n"), "{text}");
        assert!(text.contains("# HELP watchscope_watch_events_total "));
        assert!(text.contains("# TYPE watchscope_watch_stage_seconds histogram\n"));
        let sample =
            "watchscope_watch_events_total{side=\"server\",namespace=\"ns\",pod=\"p\",container=\"c\",comm=\"etcd\"} 5";
        assert!(text.lines().any(|l| l == sample), "{text}");
        // Every counter is typed under its sample name.
        for line in text.lines().filter(|l| l.starts_with("# TYPE ") && l.ends_with(" counter")) {
            assert!(line.split(' ').nth(2).unwrap().ends_with("_total"), "{line}");
        }
    }
}
