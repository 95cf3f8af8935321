//! `.go.buildinfo`: the Go version and the module lines (`go version -m`).
//!
//! The blob starts with the 14-byte magic `\xff Go buildinf:`, a pointer-size
//! byte and a flags byte. Go 1.18+ sets flag bit 1 and stores the version and
//! module info inline after a 32-byte header, each as a uvarint length and the
//! bytes. Before 1.18 the header holds two pointers to Go string headers
//! (`{ptr, len}`) elsewhere in the data, which in PIE binaries may only be
//! known through relocations: hence the `Memory` abstraction.

use serde::Serialize;

use super::elf::Memory;

pub const MAGIC: &[u8; 14] = b"\xff Go buildinf:";
const FLAG_BIG_ENDIAN: u8 = 1;
const FLAG_INLINE: u8 = 2;
/// Upper bounds for strings read from the file (a corrupt length must not
/// turn into a huge allocation).
const MAX_VERSION: u64 = 1 << 10;
const MAX_MODINFO: u64 = 16 << 20;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BuildInfoError {
    #[error("no build info magic at {0:#x}")]
    NoMagic(u64),
    #[error("{0}")]
    Corrupt(String),
}

fn corrupt<T>(msg: impl Into<String>) -> Result<T, BuildInfoError> {
    Err(BuildInfoError::Corrupt(msg.into()))
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Module {
    pub path: String,
    pub version: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sum: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replace: Option<Box<Module>>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct BuildInfo {
    /// As written by the toolchain, e.g. `go1.19.8`.
    pub go_version: String,
    /// The `path` line: the main package's import path.
    pub path: Option<String>,
    /// The `mod` line: the main module.
    pub main: Option<Module>,
    pub deps: Vec<Module>,
    /// `build` lines, in order (`CGO_ENABLED`, `-trimpath`, `-ldflags`, ...).
    pub settings: Vec<(String, String)>,
}

impl BuildInfo {
    pub fn setting(&self, key: &str) -> Option<&str> {
        self.settings.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }
}

/// Parses the build info blob at `vaddr`.
pub fn parse(mem: &dyn Memory, vaddr: u64) -> Result<BuildInfo, BuildInfoError> {
    let hdr = mem.bytes(vaddr, 32).ok_or(BuildInfoError::NoMagic(vaddr))?;
    if hdr.get(..14) != Some(&MAGIC[..]) {
        return Err(BuildInfoError::NoMagic(vaddr));
    }
    let (Some(&ptr_size), Some(&flags)) = (hdr.get(14), hdr.get(15)) else {
        return corrupt("header truncated");
    };
    let (version, modinfo) = if flags & FLAG_INLINE != 0 {
        let mut at = vaddr.checked_add(32).ok_or_else(|| BuildInfoError::Corrupt("address overflows".into()))?;
        let version = inline_string(mem, &mut at, MAX_VERSION)?;
        let modinfo = inline_string(mem, &mut at, MAX_MODINFO)?;
        (version, modinfo)
    } else {
        if flags & FLAG_BIG_ENDIAN != 0 {
            return corrupt("big-endian build info (only little-endian targets are supported)");
        }
        if !matches!(ptr_size, 4 | 8) {
            return corrupt(format!("bad pointer size {ptr_size}"));
        }
        let ps = u64::from(ptr_size);
        let (Some(v_at), Some(m_at)) = (vaddr.checked_add(16), vaddr.checked_add(16 + ps)) else {
            return corrupt("address overflows");
        };
        let version = pointed_string(mem, v_at, ptr_size, MAX_VERSION)?;
        let modinfo = pointed_string(mem, m_at, ptr_size, MAX_MODINFO)?;
        (version, modinfo)
    };
    if version.is_empty() {
        return corrupt("empty Go version");
    }
    let go_version =
        String::from_utf8(version).map_err(|_| BuildInfoError::Corrupt("Go version is not UTF-8".into()))?;
    if !go_version.starts_with("go") && !go_version.starts_with("devel") {
        return corrupt(format!("implausible Go version {go_version:?}"));
    }
    let mut info = parse_modinfo(&modinfo);
    info.go_version = go_version;
    Ok(info)
}

fn inline_string(mem: &dyn Memory, at: &mut u64, max: u64) -> Result<Vec<u8>, BuildInfoError> {
    let mut len: u64 = 0;
    let mut shift = 0u32;
    loop {
        let Some(&b) = mem.bytes(*at, 1).and_then(|b| b.first()) else {
            return corrupt("inline string length truncated");
        };
        *at = at.checked_add(1).ok_or_else(|| BuildInfoError::Corrupt("address overflows".into()))?;
        if shift > 63 {
            return corrupt("inline string length overflows");
        }
        len |= u64::from(b & 0x7f).checked_shl(shift).unwrap_or(0);
        if b & 0x80 == 0 {
            break;
        }
        shift += 7;
    }
    if len > max {
        return corrupt(format!("inline string of {len} bytes is implausibly long"));
    }
    let bytes =
        mem.bytes(*at, len).ok_or_else(|| BuildInfoError::Corrupt("inline string runs past the data".into()))?;
    *at = at.checked_add(len).ok_or_else(|| BuildInfoError::Corrupt("inline string overflows".into()))?;
    Ok(bytes.to_vec())
}

/// A Go string whose header `{ptr, len}` is pointed to by the word at `at`.
fn pointed_string(mem: &dyn Memory, at: u64, ps: u8, max: u64) -> Result<Vec<u8>, BuildInfoError> {
    let hdr = mem.ptr(at, ps).ok_or_else(|| BuildInfoError::Corrupt(format!("pointer at {at:#x} unreadable")))?;
    // A string variable nothing initialised at link time (Go 1.15 GOPATH
    // builds leave `runtime.modinfo` so) lives in .bss: it is empty.
    if hdr == 0 || mem.zero_filled(hdr, u64::from(ps) * 2) {
        return Ok(Vec::new());
    }
    let data =
        mem.ptr(hdr, ps).ok_or_else(|| BuildInfoError::Corrupt(format!("string header at {hdr:#x} unreadable")))?;
    let len = hdr
        .checked_add(u64::from(ps))
        .and_then(|a| mem.ptr(a, ps))
        .ok_or_else(|| BuildInfoError::Corrupt(format!("string header at {hdr:#x} unreadable")))?;
    if len > max {
        return corrupt(format!("string of {len} bytes is implausibly long"));
    }
    if len == 0 {
        return Ok(Vec::new());
    }
    mem.bytes(data, len)
        .map(<[u8]>::to_vec)
        .ok_or_else(|| BuildInfoError::Corrupt(format!("string at {data:#x} unreadable")))
}

/// Parses the module text (`path`, `mod`, `dep`, `=>`, `build` lines). The
/// text is framed by two 16-byte sentinels, which are stripped when present.
pub fn parse_modinfo(raw: &[u8]) -> BuildInfo {
    let n = raw.len();
    let text = if n >= 33 && raw.get(n - 17) == Some(&b'\n') { raw.get(16..n - 16).unwrap_or_default() } else { raw };
    let text = String::from_utf8_lossy(text);
    let mut info = BuildInfo::default();
    // `=>` replaces the module on the line before it: the main module or the last dep.
    let mut last_is_main = false;
    for line in text.lines() {
        let mut f = line.split('\t');
        let kind = f.next().unwrap_or_default();
        let module = |f: &mut std::str::Split<'_, char>| -> Option<Module> {
            let path = f.next().filter(|p| !p.is_empty())?.to_string();
            let version = f.next().filter(|v| !v.is_empty()).map(str::to_string);
            let sum = f.next().filter(|s| !s.is_empty()).map(str::to_string);
            Some(Module { path, version, sum, replace: None })
        };
        match kind {
            "path" => info.path = f.next().map(str::to_string),
            "mod" => {
                info.main = module(&mut f);
                last_is_main = true;
            }
            "dep" => {
                if let Some(m) = module(&mut f) {
                    info.deps.push(m);
                    last_is_main = false;
                }
            }
            "=>" => {
                let target = if last_is_main { info.main.as_mut() } else { info.deps.last_mut() };
                if let (Some(t), Some(r)) = (target, module(&mut f)) {
                    t.replace = Some(Box::new(r));
                }
            }
            "build" => {
                let rest = line.get(6..).unwrap_or_default();
                if let Some((k, v)) = rest.split_once('=') {
                    info.settings.push((unquote(k), unquote(v)));
                }
            }
            _ => {}
        }
    }
    info
}

/// Undoes Go's `strconv.Quote` for the simple escapes build settings use.
fn unquote(s: &str) -> String {
    let Some(inner) = s.strip_prefix('"').and_then(|s| s.strip_suffix('"')) else {
        return s.to_string();
    };
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => out.push('\n'),
            Some('t') => out.push('\t'),
            Some(other) => out.push(other),
            None => out.push('\\'),
        }
    }
    out
}

/// A parsed Go release version (`go1.19.8`, `go1.21rc2`, `go1.27.3`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct GoVersion {
    pub major: u32,
    pub minor: u32,
    pub patch: u32,
}

impl GoVersion {
    /// `None` for development builds or anything else unrecognised.
    pub fn parse(s: &str) -> Option<GoVersion> {
        let rest = s.strip_prefix("go")?;
        // Drop suffixes such as `rc2`, `beta1`, ` X:nocoverageredesign` or `-20240101`.
        let end = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(rest.len());
        let mut it = rest.get(..end)?.split('.');
        let major = it.next()?.parse().ok()?;
        let minor = it.next().and_then(|m| m.parse().ok()).unwrap_or(0);
        let patch = it.next().and_then(|p| p.parse().ok()).unwrap_or(0);
        Some(GoVersion { major, minor, patch })
    }

    pub fn at_least(&self, major: u32, minor: u32) -> bool {
        (self.major, self.minor) >= (major, minor)
    }
}

impl std::fmt::Display for GoVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "go{}.{}.{}", self.major, self.minor, self.patch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inspect::elf::SliceMemory;

    fn inline_blob(version: &str, modinfo: &[u8]) -> Vec<u8> {
        let mut b = MAGIC.to_vec();
        b.extend_from_slice(&[8, FLAG_INLINE]);
        b.resize(32, 0);
        for s in [version.as_bytes(), modinfo] {
            let mut n = s.len();
            loop {
                let byte = (n & 0x7f) as u8;
                n >>= 7;
                if n == 0 {
                    b.push(byte);
                    break;
                }
                b.push(byte | 0x80);
            }
            b.extend_from_slice(s);
        }
        b
    }

    fn framed(text: &str) -> Vec<u8> {
        let mut v = b"0w\xaf\x0c\x92t\x08\x02A\xe1\xc1\x07\xe6\xd6\x18\xe6".to_vec();
        v.extend_from_slice(text.as_bytes());
        v.extend_from_slice(b"\xf92C1\x86\x18 r\x00\x82B\x10A\x16\xd8\xf2");
        v
    }

    #[test]
    fn inline_format() {
        let text = "path\tgo.etcd.io/etcd\nmod\tgo.etcd.io/etcd\t(devel)\t\ndep\tgithub.com/a/b\tv1.2.3\th1:xyz=\n=>\t../b\t\t\nbuild\t-trimpath=true\nbuild\tCGO_ENABLED=1\nbuild\t-ldflags=\"-linkmode=external -s\"\n";
        let blob = inline_blob("go1.19.8", &framed(text));
        let info = parse(&SliceMemory { base: 0x1000, data: &blob }, 0x1000).unwrap();
        assert_eq!(info.go_version, "go1.19.8");
        assert_eq!(info.path.as_deref(), Some("go.etcd.io/etcd"));
        assert_eq!(info.main.as_ref().unwrap().version.as_deref(), Some("(devel)"));
        assert_eq!(info.deps.len(), 1);
        assert_eq!(info.deps[0].replace.as_ref().unwrap().path, "../b");
        assert_eq!(info.setting("CGO_ENABLED"), Some("1"));
        assert_eq!(info.setting("-ldflags"), Some("-linkmode=external -s"));
    }

    #[test]
    fn pointer_format() {
        // Header at 0x1000, string headers at 0x1020/0x1030, bytes at 0x1040.
        let mut b = MAGIC.to_vec();
        b.extend_from_slice(&[8, 0]);
        b.extend_from_slice(&0x1020u64.to_le_bytes());
        b.extend_from_slice(&0x1030u64.to_le_bytes());
        let text = framed("path\texample.com/x\nmod\texample.com/x\tv1.0.0\t\n");
        b.extend_from_slice(&0x1040u64.to_le_bytes());
        b.extend_from_slice(&7u64.to_le_bytes());
        b.extend_from_slice(&0x1047u64.to_le_bytes());
        b.extend_from_slice(&(text.len() as u64).to_le_bytes());
        b.extend_from_slice(b"go1.16.");
        b.extend_from_slice(&text);
        let info = parse(&SliceMemory { base: 0x1000, data: &b }, 0x1000).unwrap();
        assert_eq!(info.go_version, "go1.16.");
        assert_eq!(info.main.unwrap().version.as_deref(), Some("v1.0.0"));
    }

    #[test]
    fn versions() {
        assert_eq!(GoVersion::parse("go1.19.8"), Some(GoVersion { major: 1, minor: 19, patch: 8 }));
        assert_eq!(GoVersion::parse("go1.21rc2").map(|v| v.minor), Some(21));
        assert_eq!(GoVersion::parse("go1.27.3 X:foo").map(|v| v.patch), Some(3));
        assert_eq!(GoVersion::parse("devel go1.23-abc"), None);
    }
}
