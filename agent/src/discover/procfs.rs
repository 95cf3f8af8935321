//! Processes from /proc: their command name and the identity of the file
//! they execute. The executable is reached through `/proc/<pid>/exe`, which
//! names the exact file the process runs even inside another mount
//! namespace (a container) and even after the path was replaced on disk.

use std::{os::unix::fs::MetadataExt, path::PathBuf};

use crate::host::HostRoot;

/// Identity of an executable file: a new inode (an upgraded etcd at the same
/// path) is a new identity; size and mtime catch in-place rewrites.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
pub struct FileIdent {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime_ns: i64,
}

impl FileIdent {
    pub fn of(meta: &std::fs::Metadata) -> Self {
        Self {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime_ns: meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
        }
    }
}

/// A running process as discovery sees it.
#[derive(Clone, Debug)]
pub struct ProcInfo {
    pub tgid: u32,
    pub comm: String,
    /// The path the process was started from (for messages; may be stale).
    pub exe_path: PathBuf,
    /// A path that opens the very file the process runs: `/proc/<pid>/exe`.
    pub exe_open: PathBuf,
    pub exe: FileIdent,
}

/// Reads one process; None when it vanished or has no executable (kernel threads).
pub fn read_proc(root: &HostRoot, tgid: u32) -> Option<ProcInfo> {
    let base = root.path(format!("/proc/{tgid}"));
    let comm = std::fs::read_to_string(base.join("comm")).ok()?.trim_end_matches('\n').to_string();
    let exe_open = base.join("exe");
    let exe_path = std::fs::read_link(&exe_open).ok()?;
    let meta = std::fs::metadata(&exe_open).ok()?;
    Some(ProcInfo { tgid, comm, exe_path, exe_open, exe: FileIdent::of(&meta) })
}

/// Every process with an executable, at this moment.
pub fn scan(root: &HostRoot) -> Vec<ProcInfo> {
    let Ok(dir) = std::fs::read_dir(root.path("/proc")) else {
        return Vec::new();
    };
    dir.filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|tgid| read_proc(root, tgid))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_itself() {
        let me = std::process::id();
        let p = read_proc(&HostRoot::default(), me).expect("own /proc entry");
        assert_eq!(p.tgid, me);
        assert!(!p.comm.is_empty());
        let direct = std::fs::metadata(std::env::current_exe().unwrap()).unwrap();
        assert_eq!(p.exe, FileIdent::of(&direct));
        assert!(scan(&HostRoot::default()).iter().any(|p| p.tgid == me));
        assert!(read_proc(&HostRoot::default(), u32::MAX).is_none());
    }
}
