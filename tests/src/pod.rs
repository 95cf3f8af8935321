//! A pod's container cgroup, named the way the kubelet's cgroupfs driver
//! names it, for tests that put processes "in a pod".

use std::path::PathBuf;

/// A cgroup at kubepods/burstable/pod<uid>/<container id>, as the kubelet's
/// cgroupfs driver makes them; removed (after its processes are gone) on drop.
pub struct PodCgroup {
    dirs: Vec<PathBuf>,
}

impl PodCgroup {
    pub fn create(uid: &str, cid: &str) -> PodCgroup {
        // cgroup v1 (the pids hierarchy), or v2 mounted alone or beside v1.
        let base = ["/sys/fs/cgroup/pids", "/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
            .iter()
            .map(PathBuf::from)
            .find(|b| b.join("cgroup.procs").exists())
            .expect("a cgroup hierarchy to create the pod's cgroup in");
        let dirs = vec![
            base.join("kubepods"),
            base.join("kubepods/burstable"),
            base.join(format!("kubepods/burstable/pod{uid}")),
            base.join(format!("kubepods/burstable/pod{uid}/{cid}")),
        ];
        for d in &dirs {
            let _ = std::fs::create_dir(d);
        }
        PodCgroup { dirs }
    }

    /// The container cgroup's `cgroup.procs`: a process writing `0` to it
    /// moves itself in.
    pub fn procs_file(&self) -> PathBuf {
        self.dirs.last().expect("dirs").join("cgroup.procs")
    }

    pub fn enter(&self, pid: u32) {
        let procs = self.procs_file();
        std::fs::write(&procs, pid.to_string()).unwrap_or_else(|e| panic!("move {pid} into {}: {e}", procs.display()));
    }
}

impl Drop for PodCgroup {
    fn drop(&mut self) {
        for d in self.dirs.iter().rev() {
            // Shared parents stay while other tests' pods use them.
            let _ = std::fs::remove_dir(d);
        }
    }
}
