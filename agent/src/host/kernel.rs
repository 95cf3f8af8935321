//! Kernel release parsing ("6.18.44-fc-v669" → 6.18.44).

use std::fmt;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct KernelVersion {
    pub major: u32,
    pub minor: u32,
    pub patch: u32,
}

impl KernelVersion {
    pub const fn new(major: u32, minor: u32, patch: u32) -> Self {
        Self { major, minor, patch }
    }

    /// Parses the leading "X.Y[.Z]" of a release string; the rest (distro
    /// suffixes) is ignored.
    pub fn parse(release: &str) -> Option<Self> {
        let mut parts = release.trim().split(|c: char| !c.is_ascii_digit());
        let major = parts.next()?.parse().ok()?;
        let minor = parts.next()?.parse().ok()?;
        let patch = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
        Some(Self { major, minor, patch })
    }
}

impl fmt::Display for KernelVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_distro_releases() {
        assert_eq!(KernelVersion::parse("6.18.44-fc-v669"), Some(KernelVersion::new(6, 18, 44)));
        assert_eq!(KernelVersion::parse("5.15.0-91-generic\n"), Some(KernelVersion::new(5, 15, 0)));
        assert_eq!(KernelVersion::parse("6.1"), Some(KernelVersion::new(6, 1, 0)));
        assert_eq!(KernelVersion::parse("linux"), None);
        assert!(KernelVersion::new(5, 8, 0) < KernelVersion::new(5, 15, 0));
    }
}
