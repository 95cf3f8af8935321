//! The report as one self-contained HTML page: inline CSS and SVG, no
//! scripts, no external assets (it is mailed around and opened offline).

use std::fmt::Write as _;

use agent_common::{NBUCKETS, goruntime::Inner, hist};

use super::report::{Report, Row, RowKind, drop_list, edge_label, fmt_ns, stage_text};
use crate::collect::chains::{Mark, VIEW_STAGES, view_columns};

const CSS: &str = r#"
body { font: 14px/1.4 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px; color: #1f2328; background: #fff; }
h1 { font-size: 22px; margin: 0 0 4px; }
h2 { font-size: 17px; margin: 28px 0 10px; border-bottom: 1px solid #d0d7de; padding-bottom: 4px; }
.sub { color: #59636e; margin-bottom: 12px; }
.pills span { display: inline-block; padding: 3px 10px; border-radius: 12px; margin-right: 8px; font-weight: 600; }
.p-complete { background: #dafbe1; color: #116329; }
.p-slow { background: #fff8c5; color: #7d4e00; }
.p-broken { background: #ffebe9; color: #a40e26; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(540px, 1fr)); gap: 14px; }
.card { border: 1px solid #d0d7de; border-radius: 8px; padding: 10px 12px; }
.card h3 { margin: 0 0 2px; font-size: 15px; font-family: ui-monospace, monospace; }
.card .stats { color: #59636e; font-size: 12.5px; margin-bottom: 4px; }
.card .stats b { color: #1f2328; }
svg text { font: 11px ui-monospace, monospace; fill: #59636e; }
table { border-collapse: collapse; font-size: 13px; }
th, td { padding: 4px 10px; text-align: right; border-bottom: 1px solid #eaeef2; white-space: nowrap; }
th { background: #f6f8fa; font-weight: 600; }
td.l, th.l { text-align: left; }
td.mono { font-family: ui-monospace, monospace; }
td.warn { background: #fff8c5; color: #7d4e00; font-weight: 600; }
td.error { background: #ffd8d3; color: #a40e26; font-weight: 700; }
td.broken { background: #cf222e; color: #fff; font-weight: 700; }
.bar { display: flex; height: 16px; width: 360px; border-radius: 3px; overflow: hidden; background: #eaeef2; }
.bar div { height: 100%; }
.legend span { display: inline-block; margin-right: 14px; font-size: 12.5px; }
.legend i { display: inline-block; width: 11px; height: 11px; border-radius: 2px; margin-right: 4px; vertical-align: -1px; }
"#;

/// Colours of the inner kinds, then "other".
const INNER_COLORS: [&str; 6] = ["#0969da", "#8250df", "#bf3989", "#d1242f", "#bc4c00", "#8c959f"];

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// One histogram on the shared bucket range, as an SVG bar chart.
fn svg_histogram(r: &Report, row: &Row, layout: (usize, usize, usize)) -> String {
    let bars = r.bars(row, layout);
    let (lo, _, g) = layout;
    let (w, h, left, bottom, top) = (520.0_f64, 130.0_f64, 36.0_f64, 22.0_f64, 8.0_f64);
    let plot_w = w - left - 8.0;
    let plot_h = h - bottom - top;
    let n = bars.len().max(1) as f64;
    let bw = plot_w / n;
    let peak = bars.iter().copied().max().unwrap_or(0).max(1) as f64;
    let color = match row.kind {
        RowKind::Stage => "#0969da",
        RowKind::Window => "#8250df",
    };
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg class="hist" data-name="{}" data-count="{}" width="{w}" height="{h}" viewBox="0 0 {w} {h}" xmlns="http://www.w3.org/2000/svg" role="img">"#,
        esc(&row.name),
        row.count()
    );
    let _ = write!(
        s,
        r##"<line x1="{left}" y1="{y}" x2="{x2}" y2="{y}" stroke="#d0d7de"/>"##,
        y = top + plot_h,
        x2 = left + plot_w
    );
    let _ = write!(s, r#"<text x="{}" y="{}" text-anchor="end">{}</text>"#, left - 4.0, top + 9.0, peak as u64);
    let _ = write!(s, r#"<text x="{}" y="{}" text-anchor="end">0</text>"#, left - 4.0, top + plot_h);
    for (i, b) in bars.iter().enumerate() {
        if *b == 0 {
            continue;
        }
        let bh = (*b as f64 / peak * plot_h).max(1.5);
        let x = left + i as f64 * bw;
        let first = lo + i * g;
        let title = format!(
            "{} in [{}, {})",
            b,
            edge_label(hist::bucket_lower_bound_seconds(first)),
            edge_label(hist::bucket_upper_bound_seconds((first + g - 1).min(NBUCKETS - 1)))
        );
        let _ = write!(
            s,
            r#"<rect class="bucket" x="{x:.1}" y="{:.1}" width="{:.1}" height="{bh:.1}" fill="{color}" rx="1"><title>{}</title></rect>"#,
            top + plot_h - bh,
            (bw - 1.0).max(1.0),
            esc(&title)
        );
    }
    // Axis labels: a few bucket edges across the shared range.
    let ticks = 5usize;
    for t in 0..=ticks {
        let i = ((bars.len() * t) / ticks).min(bars.len());
        let edge = hist::bucket_lower_bound_seconds((lo + i * g).min(NBUCKETS - 1));
        let x = left + i as f64 * bw;
        let anchor = if t == 0 {
            "start"
        } else if t == ticks {
            "end"
        } else {
            "middle"
        };
        let _ = write!(s, r#"<text x="{x:.1}" y="{}" text-anchor="{anchor}">{}</text>"#, h - 6.0, edge_label(edge));
    }
    s.push_str("</svg>");
    s
}

pub fn render_html(r: &Report, top: usize) -> String {
    let c = &r.counts;
    let mut o = String::new();
    o.push_str("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>watchscope record</title>");
    let _ = write!(o, "<style>{CSS}</style></head><body>");
    let _ = write!(
        o,
        "<h1>watchscope record</h1><div class=\"sub\">{:.1} s recording · warn &gt; {} · error &gt; {} · broken: not \
         dispatched within {}</div>",
        r.duration.as_secs_f64(),
        fmt_ns(r.settings.warn_ns as f64),
        fmt_ns(r.settings.error_ns as f64),
        fmt_ns(r.settings.timeout_ns as f64)
    );
    let _ = write!(
        o,
        "<div class=\"pills\"><span class=\"p-complete\">{} complete</span><span class=\"p-slow\">{} slow</span>\
         <span class=\"p-broken\">{} broken</span></div>",
        c.complete, c.slow, c.broken
    );

    o.push_str("<h2>Per stage and window</h2>");
    match r.bar_layout(64) {
        Some(layout) => {
            o.push_str("<div class=\"grid\">");
            for row in &r.rows {
                let q = |p| row.quantile_text(p);
                let max = row.max_text();
                let kind = if row.kind == RowKind::Window { " (window)" } else { "" };
                let _ = write!(
                    o,
                    "<div class=\"card\"><h3>{}{kind}</h3><div class=\"stats\">count <b>{}</b> · p50 <b>{}</b> · \
                     p90 <b>{}</b> · p99 <b>{}</b> · max <b>{}</b></div>{}</div>",
                    esc(&row.name),
                    row.count(),
                    q(0.5),
                    q(0.9),
                    q(0.99),
                    max,
                    svg_histogram(r, row, layout)
                );
            }
            o.push_str("</div>");
        }
        None => o.push_str("<p>No watch events or windows during the recording.</p>"),
    }

    if !r.breakdown.is_empty() {
        o.push_str("<h2>Where did the time go</h2><div class=\"legend\">");
        for (i, name) in Inner::ALL.iter().map(|i| i.name()).chain(["other"]).enumerate() {
            let _ = write!(o, "<span><i style=\"background:{}\"></i>{name}</span>", INNER_COLORS[i]);
        }
        o.push_str("</div><table><tr><th class=\"l\">window</th><th>count</th><th>total</th>");
        for i in Inner::ALL {
            let _ = write!(o, "<th>{}</th>", i.name());
        }
        o.push_str("<th>other</th><th class=\"l\">share</th></tr>");
        for b in &r.breakdown {
            let shares: Vec<f64> =
                Inner::ALL.iter().map(|i| b.share(*i).unwrap_or(0.0)).chain([b.other_share()]).collect();
            let _ = write!(
                o,
                "<tr><td class=\"l mono\">{}</td><td>{}</td><td>{}</td>",
                esc(&b.window),
                b.count,
                fmt_ns(b.total_ns as f64)
            );
            for s in &shares {
                let _ = write!(o, "<td>{:.1}%</td>", 100.0 * s);
            }
            o.push_str("<td class=\"l\"><div class=\"bar\">");
            for (i, s) in shares.iter().enumerate() {
                if *s > 0.0 {
                    let _ = write!(o, "<div style=\"width:{:.2}%;background:{}\"></div>", 100.0 * s, INNER_COLORS[i]);
                }
            }
            o.push_str("</div></td></tr>");
        }
        o.push_str("</table>");
    }

    let shown: Vec<_> = r.chains.iter().take(top).collect();
    let _ = write!(
        o,
        "<h2>Slowest chains</h2><div class=\"sub\">{} of {} chains, worst first; times since commit</div>",
        shown.len(),
        c.complete + c.slow + c.broken
    );
    o.push_str("<table class=\"chains\"><tr><th>rev</th><th class=\"l\">outcome</th><th>watchers</th><th>clients</th>");
    let columns = view_columns(&shown);
    for &i in &columns {
        let _ = write!(o, "<th class=\"l\">{}</th>", VIEW_STAGES[i]);
    }
    o.push_str("</tr>");
    for ch in shown {
        let worst = ch.worst(&r.settings);
        let _ = write!(
            o,
            "<tr><td class=\"mono\">{}</td><td class=\"l {}\">{}</td><td>{}</td><td>{}</td>",
            ch.rev,
            class(worst),
            ch.outcome.name(),
            ch.watchers(),
            ch.clients()
        );
        let v = ch.view(&r.settings);
        for s in columns.iter().map(|&i| v[i]) {
            let _ = write!(o, "<td class=\"l mono {}\">{}</td>", class(s.mark), esc(&stage_text(&s, "–")));
        }
        o.push_str("</tr>");
    }
    o.push_str("</table>");
    let drops = drop_list(r);
    if !drops.is_empty() {
        let _ = write!(o, "<p class=\"sub\">Not recorded or not joined: {}</p>", esc(&drops.join(", ")));
    }
    o.push_str("</body></html>\n");
    o
}

fn class(m: Mark) -> &'static str {
    match m {
        Mark::Ok => "",
        Mark::Warn => "warn",
        Mark::Error => "error",
        Mark::Broken => "broken",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_svg_per_row_no_scripts_no_external_assets() {
        let r = crate::record::report::tests::sample_report();
        let h = render_html(&r, 10);
        assert_eq!(h.matches("<svg class=\"hist\"").count(), r.rows.len());
        assert!(h.contains("data-name=\"commit_to_send\" data-count=\"26\""));
        assert!(!h.contains("<script") && !h.contains("src=") && !h.contains("href="));
        assert!(h.contains("<td class=\"l mono broken\">broken</td>"));
        assert!(h.contains("class=\"l mono error\">+4.10s error</td>"));
        assert!(h.contains("25.0%"));
    }
}
