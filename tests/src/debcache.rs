//! Real programs from other Debian suites (trixie, sid, bullseye), which
//! `cargo xtask setup --for test` downloads with a private apt state and
//! extracts under `/var/cache/watchscope/pkgs/<package>_<version>_<arch>/`
//! (or `$WATCHSCOPE_CACHE/pkgs`), never installing them into the system.

use std::path::PathBuf;

/// The cache root (`$WATCHSCOPE_CACHE`, default `/var/cache/watchscope`).
pub fn root() -> PathBuf {
    std::env::var_os("WATCHSCOPE_CACHE").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/var/cache/watchscope"))
}

/// `rel` (e.g. `usr/bin/etcd`) inside the extracted package whose directory
/// name starts with `<package>_<version_prefix>` (e.g. `etcd-server`,
/// `3.5.30`). Panics with the setup command when it is not there: a test
/// that needs a real program never passes without it.
pub fn file(package: &str, version_prefix: &str, rel: &str) -> PathBuf {
    let prefix = format!("{package}_{version_prefix}");
    let pkgs = root().join("pkgs");
    let found = std::fs::read_dir(&pkgs)
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .map(|e| e.path().join(rel))
        .find(|p| p.exists());
    found.unwrap_or_else(|| panic!("{prefix}*/{rel} not under {}: run `cargo xtask setup --for test`", pkgs.display()))
}
