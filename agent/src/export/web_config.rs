//! `--web-config-file`: TLS and basic auth for the HTTP endpoints, from the
//! same YAML file the Prometheus exporter-toolkit reads (node_exporter's
//! `--web.config.file`), so one file serves every exporter on a node:
//!
//! ```yaml
//! tls_server_config:
//!   cert_file: /etc/watchscope/tls.crt
//!   key_file: /etc/watchscope/tls.key
//!   client_auth_type: RequireAndVerifyClientCert   # optional
//!   client_ca_file: /etc/watchscope/ca.crt         # with client_auth_type
//! basic_auth_users:
//!   prometheus: $2y$10$...   # bcrypt hash (htpasswd -nBC 10 "" | tr -d ':\n')
//! ```
//!
//! Everything is read and checked at startup: a missing file, an unknown
//! key, a certificate that does not parse or does not match its key, or a
//! password that is not a bcrypt hash is a startup error naming the problem.

use std::{
    collections::{HashMap, HashSet},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use rustls::{
    ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::WebPkiClientVerifier,
};
use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum WebConfigError {
    #[error("cannot read the web config file {path}: {cause}")]
    Read { path: PathBuf, cause: std::io::Error },
    #[error("bad web config file {path}: {cause}")]
    Parse { path: PathBuf, cause: serde_norway::Error },
    #[error("web config: tls_server_config needs both cert_file and key_file")]
    MissingTlsFile,
    #[error("web config: cannot read {what} {path}: {cause}")]
    Pem { what: &'static str, path: PathBuf, cause: rustls::pki_types::pem::Error },
    #[error("web config: no certificate in {0}")]
    NoCert(PathBuf),
    #[error(
        "web config: client_auth_type {0:?} is not supported (use NoClientCert, VerifyClientCertIfGiven or \
         RequireAndVerifyClientCert)"
    )]
    ClientAuthType(String),
    #[error("web config: client_auth_type {0} needs client_ca_file")]
    MissingClientCa(String),
    #[error("web config: TLS setup failed: {0}")]
    Tls(#[from] rustls::Error),
    #[error("web config: client CA: {0}")]
    ClientCa(#[from] rustls::server::VerifierBuilderError),
    #[error("web config: TLS version {0} is not supported (TLS12 or TLS13)")]
    TlsVersion(String),
    #[error("web config: the password of basic_auth_users.{0} is not a bcrypt hash")]
    NotBcrypt(String),
}

/// The file as written (exporter-toolkit's key names; unknown keys refused).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    tls_server_config: Option<TlsFile>,
    #[serde(default)]
    basic_auth_users: HashMap<String, String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct TlsFile {
    #[serde(default)]
    cert_file: Option<PathBuf>,
    #[serde(default)]
    key_file: Option<PathBuf>,
    #[serde(default)]
    client_auth_type: Option<String>,
    #[serde(default)]
    client_ca_file: Option<PathBuf>,
    /// `TLS12` or `TLS13` (exporter-toolkit's names); cipher suites and
    /// curves are rustls's safe defaults and cannot be chosen (such keys
    /// are refused, not ignored).
    #[serde(default)]
    min_version: Option<String>,
    #[serde(default)]
    max_version: Option<String>,
}

/// What the server does with the file.
#[derive(Clone, Default)]
pub struct WebConfig {
    pub tls: Option<Arc<ServerConfig>>,
    pub auth: Option<Arc<BasicAuth>>,
}

impl std::fmt::Debug for WebConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebConfig").field("tls", &self.tls.is_some()).field("auth", &self.auth.is_some()).finish()
    }
}

impl WebConfig {
    pub fn load(path: &Path) -> Result<Self, WebConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|cause| WebConfigError::Read { path: path.to_path_buf(), cause })?;
        // An empty file is a valid, empty configuration (as in exporter-toolkit).
        let file: File = if text.trim().is_empty() {
            File::default()
        } else {
            serde_norway::from_str(&text).map_err(|cause| WebConfigError::Parse { path: path.to_path_buf(), cause })?
        };
        let tls = file.tls_server_config.map(tls_config).transpose()?;
        let auth = if file.basic_auth_users.is_empty() {
            None
        } else {
            for (user, hash) in &file.basic_auth_users {
                // Parsing the hash checks its shape without the cost of a verify.
                if hash.parse::<bcrypt::HashParts>().is_err() {
                    return Err(WebConfigError::NotBcrypt(user.clone()));
                }
            }
            Some(Arc::new(BasicAuth { users: file.basic_auth_users, verified: Mutex::new(HashSet::new()) }))
        };
        Ok(Self { tls, auth })
    }
}

fn tls_config(t: TlsFile) -> Result<Arc<ServerConfig>, WebConfigError> {
    let (Some(cert), Some(key)) = (t.cert_file, t.key_file) else { return Err(WebConfigError::MissingTlsFile) };
    let pem = |what, path: &Path, cause| WebConfigError::Pem { what, path: path.to_path_buf(), cause };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cert)
        .map_err(|e| pem("cert_file", &cert, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| pem("cert_file", &cert, e))?;
    if certs.is_empty() {
        return Err(WebConfigError::NoCert(cert));
    }
    let key = PrivateKeyDer::from_pem_file(&key).map_err(|e| pem("key_file", &key, e))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let version = |v: &Option<String>, default| match v.as_deref() {
        None => Ok(default),
        Some("TLS12") => Ok(2),
        Some("TLS13") => Ok(3),
        Some(other) => Err(WebConfigError::TlsVersion(other.to_string())),
    };
    let (min, max) = (version(&t.min_version, 2)?, version(&t.max_version, 3)?);
    let versions: Vec<&'static rustls::SupportedProtocolVersion> =
        [(2, &rustls::version::TLS12), (3, &rustls::version::TLS13)]
            .into_iter()
            .filter(|(v, _)| (min..=max).contains(v))
            .map(|(_, p)| p)
            .collect();
    if versions.is_empty() {
        return Err(WebConfigError::TlsVersion(format!("min_version {min:?} above max_version {max:?}")));
    }
    let builder = ServerConfig::builder_with_provider(provider.clone()).with_protocol_versions(&versions)?;
    let kind = t.client_auth_type.unwrap_or_else(|| "NoClientCert".into());
    let builder = match kind.as_str() {
        "NoClientCert" => builder.with_no_client_auth(),
        "VerifyClientCertIfGiven" | "RequireAndVerifyClientCert" => {
            let Some(ca) = t.client_ca_file else { return Err(WebConfigError::MissingClientCa(kind)) };
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_file_iter(&ca).map_err(|e| pem("client_ca_file", &ca, e))? {
                roots.add(c.map_err(|e| pem("client_ca_file", &ca, e))?)?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            let verifier = if kind == "VerifyClientCertIfGiven" { verifier.allow_unauthenticated() } else { verifier };
            builder.with_client_cert_verifier(verifier.build()?)
        }
        _ => return Err(WebConfigError::ClientAuthType(kind)),
    };
    // with_single_cert checks that the key matches the certificate.
    let mut config = builder.with_single_cert(certs, key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// `basic_auth_users`: user → bcrypt hash.
pub struct BasicAuth {
    users: HashMap<String, String>,
    /// Digests of (user, password) pairs that verified: bcrypt is slow by
    /// design (tens of ms), and a scraper sends the same pair every time.
    verified: Mutex<HashSet<[u8; 32]>>,
}

impl BasicAuth {
    /// Whether an `Authorization` header value carries a valid user and password.
    pub fn check(&self, header: Option<&str>) -> bool {
        use base64::Engine as _;
        let Some(encoded) = header.and_then(|h| h.strip_prefix("Basic ").or_else(|| h.strip_prefix("basic "))) else {
            return false;
        };
        let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(encoded.trim()) else { return false };
        let Ok(pair) = String::from_utf8(decoded) else { return false };
        let Some((user, password)) = pair.split_once(':') else { return false };
        let Some(hash) = self.users.get(user) else { return false };
        let digest = {
            let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
            ctx.update(user.as_bytes());
            ctx.update(&[0]);
            ctx.update(password.as_bytes());
            ctx.update(&[0]);
            ctx.update(hash.as_bytes());
            let mut out = [0u8; 32];
            out.copy_from_slice(ctx.finish().as_ref());
            out
        };
        if self.verified.lock().map(|v| v.contains(&digest)).unwrap_or(false) {
            return true;
        }
        let ok = bcrypt::verify(password, hash).unwrap_or(false);
        if ok && let Ok(mut v) = self.verified.lock() {
            // Bounded: only pairs that verified, and users are few.
            if v.len() < 1024 {
                v.insert(digest);
            }
        }
        ok
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::File::create(&p).unwrap().write_all(text.as_bytes()).unwrap();
        p
    }

    #[test]
    fn basic_auth_checks_bcrypt_and_rejects_the_rest() {
        use base64::Engine as _;
        let dir = tempfile::tempdir().unwrap();
        let hash = bcrypt::hash("s3cret", 4).unwrap();
        let cfg = write(dir.path(), "web.yml", &format!("basic_auth_users:\n  prom: '{hash}'\n"));
        let web = WebConfig::load(&cfg).unwrap();
        assert!(web.tls.is_none());
        let auth = web.auth.unwrap();
        let header = |u: &str, p: &str| {
            format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}")))
        };
        assert!(auth.check(Some(&header("prom", "s3cret"))));
        assert!(auth.check(Some(&header("prom", "s3cret"))), "cached");
        assert!(!auth.check(Some(&header("prom", "wrong"))));
        assert!(!auth.check(Some(&header("other", "s3cret"))));
        assert!(!auth.check(None));
        assert!(!auth.check(Some("Bearer x")));
    }

    #[test]
    fn bad_files_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let missing = WebConfig::load(&dir.path().join("nope.yml")).unwrap_err();
        assert!(missing.to_string().contains("cannot read the web config file"), "{missing}");
        let typo = write(dir.path(), "typo.yml", "tls_server_config:\n  cert_fil: x\n");
        assert!(WebConfig::load(&typo).unwrap_err().to_string().contains("cert_fil"));
        let plain = write(dir.path(), "plain.yml", "basic_auth_users:\n  u: hunter2\n");
        assert!(matches!(WebConfig::load(&plain), Err(WebConfigError::NotBcrypt(u)) if u == "u"));
        let nocert = write(
            dir.path(),
            "nocert.yml",
            "tls_server_config:\n  cert_file: /nonexistent.crt\n  key_file: /nonexistent.key\n",
        );
        assert!(WebConfig::load(&nocert).unwrap_err().to_string().contains("/nonexistent.crt"));
        let empty = write(dir.path(), "empty.yml", "");
        assert!(WebConfig::load(&empty).unwrap().tls.is_none());
    }
}
