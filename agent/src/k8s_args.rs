//! `watchscope run`'s kubelet flags, and how the kubelet is found when they
//! are not given.

use std::path::{Path, PathBuf};

use anyhow::Result;
use clap::Args;
use watchscope::k8s::kubelet::{DEFAULT_CA_FILE, DEFAULT_TOKEN_FILE, KubeletConfig};

#[derive(Debug, Args)]
pub struct KubeletArgs {
    /// The kubelet to read pod metadata from (`https://HOST:10250`). Unset:
    /// in a pod (the service account token exists) with HOST_IP (or NODE_IP)
    /// or NODE_NAME in the environment (from the downward API),
    /// `https://$HOST_IP:10250` (else `https://$NODE_NAME:10250`); otherwise
    /// no Kubernetes labels. `none` turns the lookup off.
    #[arg(long, env = "WATCHSCOPE_KUBELET_URL")]
    kubelet_url: Option<String>,
    /// Accept any kubelet serving certificate (a self-signed one, as kubeadm
    /// sets up unless serverTLSBootstrap is on).
    #[arg(long, env = "WATCHSCOPE_KUBELET_INSECURE_SKIP_VERIFY", default_value_t = false,
          action = clap::ArgAction::Set, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    kubelet_insecure_skip_verify: bool,
    /// The bearer token sent to the kubelet (read again for every request).
    #[arg(long, env = "WATCHSCOPE_KUBELET_TOKEN_FILE", default_value = DEFAULT_TOKEN_FILE)]
    kubelet_token_file: PathBuf,
    /// The CA that signed the kubelet's serving certificate.
    #[arg(long, env = "WATCHSCOPE_KUBELET_CA_FILE", default_value = DEFAULT_CA_FILE)]
    kubelet_ca_file: PathBuf,
}

impl KubeletArgs {
    /// The kubelet client's configuration, or None when there is no kubelet to ask.
    pub fn config(&self) -> Result<Option<KubeletConfig>> {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let url = match self.kubelet_url.as_deref() {
            Some("none") => return Ok(None),
            Some(url) => {
                anyhow::ensure!(
                    url.starts_with("https://") || url.starts_with("http://"),
                    "--kubelet-url {url:?}: expected https://HOST:PORT"
                );
                url.to_string()
            }
            None => match default_url(&self.kubelet_token_file, env("HOST_IP").or(env("NODE_IP")), env("NODE_NAME")) {
                Some(url) => url,
                None => return Ok(None),
            },
        };
        Ok(Some(KubeletConfig {
            url,
            token_file: self.kubelet_token_file.clone(),
            ca_file: self.kubelet_ca_file.clone(),
            insecure_skip_verify: self.kubelet_insecure_skip_verify,
            ..KubeletConfig::default()
        }))
    }
}

/// In a pod (a token file) that knows its node: the node's kubelet.
fn default_url(token_file: &Path, host_ip: Option<String>, node_name: Option<String>) -> Option<String> {
    if !token_file.is_file() {
        return None;
    }
    let host = host_ip.map(|ip| if ip.contains(':') { format!("[{ip}]") } else { ip }).or(node_name)?;
    Some(format!("https://{host}:10250"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        k: KubeletArgs,
    }

    #[test]
    fn insecure_skip_verify_takes_an_explicit_value() {
        let parse = |args: &[&str]| Cli::try_parse_from(std::iter::once("x").chain(args.iter().copied())).map(|c| c.k);
        assert!(!parse(&[]).unwrap().kubelet_insecure_skip_verify);
        assert!(parse(&["--kubelet-insecure-skip-verify"]).unwrap().kubelet_insecure_skip_verify);
        assert!(parse(&["--kubelet-insecure-skip-verify=true"]).unwrap().kubelet_insecure_skip_verify);
        assert!(!parse(&["--kubelet-insecure-skip-verify=false"]).unwrap().kubelet_insecure_skip_verify);
        assert!(parse(&["--kubelet-insecure-skip-verify=maybe"]).is_err());
        let none = parse(&["--kubelet-url", "none"]).unwrap();
        assert!(none.config().unwrap().is_none());
        let url = parse(&["--kubelet-url", "https://10.0.0.1:10250"]).unwrap().config().unwrap().unwrap();
        assert_eq!(url.url, "https://10.0.0.1:10250");
        assert!(parse(&["--kubelet-url", "10.0.0.1"]).unwrap().config().is_err());
    }

    #[test]
    fn the_default_needs_a_token_and_a_node_address() {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        assert_eq!(default_url(&token, Some("10.1.2.3".into()), None), None, "no token: not in a pod");
        std::fs::write(&token, "t").unwrap();
        assert_eq!(default_url(&token, None, None), None);
        assert_eq!(default_url(&token, Some("10.1.2.3".into()), Some("n1".into())).unwrap(), "https://10.1.2.3:10250");
        assert_eq!(default_url(&token, Some("fd00::1".into()), None).unwrap(), "https://[fd00::1]:10250");
        assert_eq!(default_url(&token, None, Some("n1".into())).unwrap(), "https://n1:10250");
    }
}
