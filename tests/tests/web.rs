//! `--web-config-file`: HTTPS with a generated certificate, and basic auth
//! with a bcrypt hash, exactly as Prometheus's exporter-toolkit file says;
//! for `run` and for `record --listen` alike.

use std::{
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use base64::Engine as _;
use watchscope_integration_tests::{Agent, free_port, require_root, stop_child, wait_until, watchscope_bin};

struct Tls {
    _dir: tempfile::TempDir,
    config: std::path::PathBuf,
    ca_pem: String,
}

/// A self-signed certificate for 127.0.0.1, and a web config that serves it
/// with one user `prometheus` / `s3cret`.
fn web_config() -> Tls {
    let dir = tempfile::tempdir().expect("temp dir");
    let ck = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string(), "localhost".to_string()]).expect("cert");
    let cert = dir.path().join("tls.crt");
    let key = dir.path().join("tls.key");
    std::fs::write(&cert, ck.cert.pem()).expect("write cert");
    std::fs::write(&key, ck.signing_key.serialize_pem()).expect("write key");
    let hash = bcrypt::hash("s3cret", 6).expect("bcrypt");
    let config = dir.path().join("web.yml");
    std::fs::write(
        &config,
        format!(
            "tls_server_config:\n  cert_file: {}\n  key_file: {}\nbasic_auth_users:\n  prometheus: '{hash}'\n",
            cert.display(),
            key.display()
        ),
    )
    .expect("write web config");
    Tls { _dir: dir, config, ca_pem: ck.cert.pem() }
}

/// An HTTPS client that trusts only the test's certificate.
fn client(ca_pem: &str) -> ureq::Agent {
    let certs: Vec<_> = ureq::tls::parse_pem(ca_pem.as_bytes())
        .filter_map(|i| match i {
            Ok(ureq::tls::PemItem::Certificate(c)) => Some(c),
            _ => None,
        })
        .collect();
    let tls = ureq::tls::TlsConfig::builder().root_certs(ureq::tls::RootCerts::new_with_certs(&certs)).build();
    ureq::Agent::new_with_config(
        ureq::Agent::config_builder()
            .tls_config(tls)
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(5)))
            .build(),
    )
}

fn get(client: &ureq::Agent, url: &str, auth: Option<(&str, &str)>) -> Result<(u16, String), String> {
    let mut req = client.get(url);
    if let Some((u, p)) = auth {
        let b64 = base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"));
        req = req.header("Authorization", format!("Basic {b64}"));
    }
    let mut resp = req.call().map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    Ok((status, resp.body_mut().read_to_string().map_err(|e| e.to_string())?))
}

#[test]
fn https_with_basic_auth_lets_only_the_right_password_in() {
    let tls = web_config();
    let config = tls.config.display().to_string();
    let mut agent = Agent::spawn_wrapped(&[], &["--comm", "wsnone", "--web-config-file", &config]);
    let https = client(&tls.ca_pem);
    let url = format!("https://127.0.0.1:{}/metrics", agent.port);
    let up = wait_until(Duration::from_secs(20), || get(&https, &url, None).is_ok());
    assert!(up && agent.running(), "no HTTPS answer:\n{}", agent.log_text());

    let (status, _) = get(&https, &url, None).expect("no auth");
    assert_eq!(status, 401, "no credentials");
    let (status, _) = get(&https, &url, Some(("prometheus", "wrong"))).expect("wrong password");
    assert_eq!(status, 401, "wrong password");
    let (status, _) = get(&https, &url, Some(("nobody", "s3cret"))).expect("unknown user");
    assert_eq!(status, 401, "unknown user");
    let (status, body) = get(&https, &url, Some(("prometheus", "s3cret"))).expect("right password");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("# TYPE watchscope_execs_total counter"), "{body}");
    // The same port does not speak plain HTTP.
    assert!(!matches!(watchscope_integration_tests::http_get(&agent.url("/metrics")), Ok((200, _))));
    // A client that does not trust the certificate is refused at the handshake.
    let untrusting = ureq::Agent::new_with_config(ureq::Agent::config_builder().http_status_as_error(false).build());
    assert!(get(&untrusting, &url, None).is_err());
}

#[test]
fn a_bad_web_config_is_a_clear_startup_error() {
    let dir = tempfile::tempdir().expect("temp dir");
    let cases = [
        ("missing.yml", None, "cannot read the web config file"),
        ("typo.yml", Some("tls_server_config:\n  cert: x\n"), "unknown field `cert`"),
        ("plain.yml", Some("basic_auth_users:\n  u: hunter2\n"), "basic_auth_users.u is not a bcrypt hash"),
        (
            "nokey.yml",
            Some("tls_server_config:\n  cert_file: /nonexistent/tls.crt\n  key_file: /nonexistent/tls.key\n"),
            "/nonexistent/tls.crt",
        ),
    ];
    for (name, text, want) in cases {
        let path = dir.path().join(name);
        if let Some(text) = text {
            std::fs::write(&path, text).expect("write");
        }
        let out = Command::new(watchscope_bin())
            .args(["run", "--listen", "127.0.0.1:0", "--web-config-file"])
            .arg(&path)
            .output()
            .expect("run watchscope");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{name}: {err}");
        assert!(err.contains("--web-config-file") && err.contains(want), "{name}: {err}");
    }
}

/// A `watchscope record` in the background, stopped on drop.
struct Recorder {
    child: Child,
    dir: tempfile::TempDir,
}

impl Recorder {
    fn output(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default()
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        stop_child(&mut self.child);
    }
}

#[test]
fn record_listen_serves_behind_the_same_web_config() {
    require_root();
    let tls = web_config();
    let port = free_port();
    let dir = tempfile::tempdir().expect("temp dir");
    // The real recorder, loading the real probes: it watches no process
    // (`wsnone`), so it starts as fast as `run` does in the test above.
    let child = Command::new(watchscope_bin())
        .args(["record", "--duration", "120s", "--comm", "wsnone", "--log", "info"])
        .args(["--listen", &format!("127.0.0.1:{port}"), "--web-config-file"])
        .arg(&tls.config)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(dir.path().join("stdout")).expect("stdout"))
        .stderr(std::fs::File::create(dir.path().join("stderr")).expect("stderr"))
        .spawn()
        .expect("start watchscope record");
    let mut rec = Recorder { child, dir };
    let https = client(&tls.ca_pem);
    let url = format!("https://127.0.0.1:{port}/metrics");
    let up = wait_until(Duration::from_secs(20), || get(&https, &url, None).is_ok());
    assert!(up, "record serves no HTTPS:\n{}", rec.output("stderr"));

    let (status, _) = get(&https, &url, None).expect("no auth");
    assert_eq!(status, 401, "no credentials");
    let (status, _) = get(&https, &url, Some(("prometheus", "wrong"))).expect("wrong password");
    assert_eq!(status, 401, "wrong password");
    let (status, body) = get(&https, &url, Some(("prometheus", "s3cret"))).expect("right password");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("# TYPE watchscope_watch_chains_total counter"), "{body}");
    let probes = format!("https://127.0.0.1:{port}/debug/probes");
    assert_eq!(get(&https, &probes, None).expect("probes").0, 401);
    // Plain HTTP gets nothing from the TLS port.
    let plain = format!("http://127.0.0.1:{port}/metrics");
    assert!(!matches!(watchscope_integration_tests::http_get(&plain), Ok((200, _))));
    assert!(rec.output("stderr").contains(&format!("serving metrics on https://127.0.0.1:{port}/metrics")));

    // Ctrl-C ends the recording as usual: report printed, exit 0.
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(rec.child.id() as i32, libc::SIGINT) };
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Ok(Some(status)) = rec.child.try_wait() {
            break status;
        }
        assert!(Instant::now() < deadline, "record still running:\n{}", rec.output("stderr"));
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "record failed ({status}):\n{}", rec.output("stderr"));
    assert!(rec.output("stdout").contains("watchscope record:"), "{}", rec.output("stdout"));
}

#[test]
fn record_refuses_a_web_config_it_would_not_use_or_cannot_read() {
    // Without --listen there is no server to protect: a usage error.
    let out = Command::new(watchscope_bin())
        .args(["record", "--web-config-file", "/nonexistent/web.yml"])
        .output()
        .expect("run watchscope");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("--listen"), "{err}");
    // A bad file fails as it does for `run`, before anything is loaded.
    let out = Command::new(watchscope_bin())
        .args(["record", "--listen", "127.0.0.1:0", "--web-config-file", "/nonexistent/web.yml"])
        .output()
        .expect("run watchscope");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("--web-config-file /nonexistent/web.yml") && err.contains("cannot read the web config file"),
        "{err}"
    );
}
