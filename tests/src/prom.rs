//! Real Prometheus servers for the tests: bookworm's 2.42 (`prometheus` on
//! PATH) and sid's 3.5 (from the cache), scraping the agent every second,
//! each with its TSDB in a temporary directory.

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use crate::{free_port, http_get, stop_child, wait_until};

/// Which Prometheus, and how it scrapes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavour {
    /// bookworm's Prometheus 2.42: OpenMetrics text, classic histograms.
    Bookworm,
    /// Prometheus 3.5 with native histograms and exemplar storage on, asking
    /// for protobuf only (so every histogram comes in native).
    Native3,
    /// Prometheus 3.5 with exemplar storage on, scraping as it ships: text
    /// formats (OpenMetrics first), classic histograms.
    Classic3,
}

/// A Prometheus server on loopback.
pub struct Prometheus {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

/// sid's Prometheus 3.5, extracted by `cargo xtask setup --for test`.
pub fn prometheus3() -> PathBuf {
    crate::debcache::file("prometheus", "3.5", "usr/bin/prometheus")
}

impl Prometheus {
    /// Starts a server scraping `127.0.0.1:<target_port>` every second (job
    /// `watchscope`) and waits until it is ready.
    pub fn start(flavour: Flavour, target_port: u16) -> Prometheus {
        let dir = tempfile::tempdir().expect("temp dir");
        let config = dir.path().join("prometheus.yml");
        let protocols = match flavour {
            Flavour::Native3 => "    scrape_protocols: [PrometheusProto]\n",
            _ => "",
        };
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: watchscope\n\
                 {protocols}    static_configs:\n      - targets: ['127.0.0.1:{target_port}']\n"
            ),
        )
        .expect("write config");
        let port = free_port();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).expect("log");
        let bin = match flavour {
            Flavour::Bookworm => PathBuf::from("prometheus"),
            Flavour::Native3 | Flavour::Classic3 => prometheus3(),
        };
        let mut cmd = Command::new(&bin);
        cmd.arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"));
        match flavour {
            // Releases from 3.8 on take `scrape_native_histograms: true` in
            // the scrape config instead.
            Flavour::Native3 => cmd.arg("--enable-feature=native-histograms,exemplar-storage"),
            Flavour::Classic3 => cmd.arg("--enable-feature=exemplar-storage"),
            Flavour::Bookworm => &mut cmd,
        };
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("{} (cargo xtask setup --for test): {e}", bin.display()));
        let p = Prometheus { child, port, dir };
        assert!(
            wait_until(Duration::from_secs(30), || matches!(http_get(&p.url("/-/ready")), Ok((200, _)))),
            "prometheus not ready:\n{}",
            p.log()
        );
        p
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// An instant query; the result vector (empty on any error).
    pub fn query(&self, promql: &str) -> Vec<serde_json::Value> {
        self.query_at(promql, None)
    }

    /// An instant query evaluated at `time` (Unix seconds) when given.
    pub fn query_at(&self, promql: &str, time: Option<f64>) -> Vec<serde_json::Value> {
        let mut url = format!("{}?query={}", self.url("/api/v1/query"), encode(promql));
        if let Some(t) = time {
            url.push_str(&format!("&time={t:.3}"));
        }
        let Ok((200, body)) = http_get(&url) else { return Vec::new() };
        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        v["data"]["result"].as_array().cloned().unwrap_or_default()
    }

    /// The newest sample of the one native histogram series `selector`
    /// picks in the last 10 s: (timestamp, count).
    pub fn latest_native(&self, selector: &str) -> Option<(f64, f64)> {
        let r = self.query(&format!("{selector}[10s]"));
        let last = r.first()?["histograms"].as_array()?.last()?.clone();
        Some((last[0].as_f64()?, last[1]["count"].as_str()?.parse().ok()?))
    }

    /// The exemplars stored for `selector` between `start` and `end` (Unix
    /// seconds): (labels, value, timestamp) of every series' exemplars.
    pub fn exemplars(&self, selector: &str, start: f64, end: f64) -> Vec<(serde_json::Value, f64, f64)> {
        let url =
            format!("{}?query={}&start={start:.3}&end={end:.3}", self.url("/api/v1/query_exemplars"), encode(selector));
        let Ok((200, body)) = http_get(&url) else { return Vec::new() };
        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        let mut out = Vec::new();
        for series in v["data"].as_array().into_iter().flatten() {
            for e in series["exemplars"].as_array().into_iter().flatten() {
                let value = e["value"].as_str().and_then(|v| v.parse().ok()).unwrap_or(f64::NAN);
                out.push((e["labels"].clone(), value, e["timestamp"].as_f64().unwrap_or(0.0)));
            }
        }
        out
    }

    /// The number of series in the TSDB head (`/api/v1/status/tsdb`).
    pub fn head_series(&self) -> u64 {
        let Ok((200, body)) = http_get(&self.url("/api/v1/status/tsdb")) else { return 0 };
        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        v["data"]["headStats"]["numSeries"].as_u64().unwrap_or(0)
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        stop_child(&mut self.child);
    }
}

/// A float sample's value in a query result entry.
pub fn value(r: &serde_json::Value) -> Option<f64> {
    r["value"][1].as_str()?.parse().ok()
}

/// A native histogram sample as the query API returns it.
#[derive(Clone, Debug)]
pub struct NativeSample {
    pub timestamp: f64,
    pub count: f64,
    /// (lower, upper, count) per bucket; positive buckets are (lower, upper].
    pub buckets: Vec<(f64, f64, f64)>,
}

/// The native histogram sample of a query result entry.
pub fn native_histogram(r: &serde_json::Value) -> Option<NativeSample> {
    let h = &r["histogram"];
    let num = |v: &serde_json::Value| v.as_str().and_then(|s| s.parse::<f64>().ok());
    let buckets = h[1]["buckets"]
        .as_array()
        .map(|bs| bs.iter().filter_map(|b| Some((num(&b[1])?, num(&b[2])?, num(&b[3])?))).collect())
        .unwrap_or_default();
    Some(NativeSample { timestamp: h[0].as_f64()?, count: num(&h[1]["count"])?, buckets })
}

/// Percent-encodes a query parameter.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}
