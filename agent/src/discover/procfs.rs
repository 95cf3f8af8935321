//! Processes from /proc: their command name and the identity of the file
//! they execute. The executable is reached through `/proc/<pid>/exe`, which
//! names the exact file the process runs even inside another mount
//! namespace (a container) and even after the path was replaced on disk.

use std::path::PathBuf;

use crate::host::HostRoot;

/// Identity of an executable file: a new inode (an upgraded etcd at the same
/// path) is a new identity; size and mtime catch in-place rewrites. It is the
/// inspector's own identity type, so the tracker's keys and the inspector
/// cache's keys are one thing; it keeps mtime as seconds and nanoseconds,
/// because seconds × 10^9 overflows i64 for times past 2262 (a clock set
/// wrong, a crafted file) and would then panic or make two times collide.
pub use crate::inspect::FileIdentity as FileIdent;

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
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

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

    /// The identity of a file whose mtime is set to `t`.
    fn ident_at(file: &std::fs::File, t: SystemTime) -> FileIdent {
        file.set_modified(t).expect("set mtime");
        FileIdent::of(&file.metadata().expect("stat"))
    }

    #[test]
    fn mtimes_past_2262_and_before_1970_stay_distinct() {
        let dir = tempfile::tempdir().expect("tmp");
        let file = std::fs::File::create(dir.path().join("etcd")).expect("create");
        // 10^10 s is the year 2286: seconds × 10^9 no longer fits an i64
        // (the limit is 2262-04-11), yet ext4 and tmpfs store it.
        let far = UNIX_EPOCH + Duration::from_secs(10_000_000_000);
        let a = ident_at(&file, far);
        let b = ident_at(&file, far + Duration::from_nanos(1));
        assert_eq!((a.mtime_sec, a.mtime_nsec), (10_000_000_000, 0));
        assert_eq!((b.mtime_sec, b.mtime_nsec), (10_000_000_000, 1));
        assert!(a != b && a < b, "{a:?} {b:?}");
        // 1.5 s before 1970: stat says -2 s + 0.5 s (nanoseconds are never
        // negative), and it orders before 0.5 s before 1970.
        let c = ident_at(&file, UNIX_EPOCH - Duration::from_millis(1500));
        let d = ident_at(&file, UNIX_EPOCH - Duration::from_millis(500));
        assert_eq!((c.mtime_sec, c.mtime_nsec), (-2, 500_000_000));
        assert_eq!((d.mtime_sec, d.mtime_nsec), (-1, 500_000_000));
        assert!(c < d && d < a, "{c:?} {d:?}");
    }
}
