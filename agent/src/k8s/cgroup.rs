//! Which pod and container a process belongs to, from the text of
//! `/proc/<pid>/cgroup`.
//!
//! The kubelet puts every container in a cgroup below its pod's cgroup, and
//! names both after IDs the kubelet's `/pods` API also reports: the pod UID
//! and the runtime's container ID. Only the spelling differs by cgroup driver
//! and runtime:
//!
//! | driver  | pod segment                                   | container segment |
//! |---------|-----------------------------------------------|-------------------|
//! | systemd | `kubepods-burstable-pod1e2a9b6f_4c3d_….slice` (the UID with `_`, because `-` separates systemd slice levels; no QoS part for guaranteed pods) | `cri-containerd-<id>.scope`, `crio-<id>.scope`, `docker-<id>.scope` |
//! | cgroupfs| `pod1e2a9b6f-4c3d-…` (under `kubepods/[burstable\|besteffort]`) | `<id>`, `crio-<id>` |
//!
//! cgroup v1 repeats the path once per hierarchy (`12:memory:/kubepods/…`),
//! v2 has one line (`0::/kubepods.slice/…`); both are read the same way.
//!
//! Only the two segments are looked at, never what is above or below them:
//! a kubelet started with another `--cgroup-root` (kind: `kubelet.slice/
//! kubelet-kubepods.slice/…`), or a reader in its own cgroup namespace, which
//! sees other pods' paths relative to its own (`0::/../../kubepods-…`), still
//! parse; so does a container that made sub-cgroups of its own. CRI-O's
//! `crio-conmon-<id>` cgroup holds the runtime's monitor process, not the
//! container, and is not taken for it.
//!
//! The text comes from other processes (and, in tests, from anywhere): the
//! parser never indexes or unwraps, and accepts only UIDs and container IDs
//! of the exact shapes above.

use crate::host::HostRoot;

/// A process's pod and container, as the kubelet names them.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PodRef {
    /// The pod's `metadata.uid`, lowercase with dashes
    /// (`1e2a9b6f-4c3d-4e2a-9f1b-2c3d4e5f6a7b`), or for a static pod the
    /// 32-hex hash the kubelet uses as its UID.
    pub pod_uid: String,
    /// The runtime's container ID (64 lowercase hex digits), as the kubelet
    /// reports it after the `containerd://` / `cri-o://` / `docker://` scheme.
    pub container_id: String,
}

/// The pod and container in `/proc/<pid>/cgroup` text, or None for a process
/// outside any Kubernetes container (or text of no known format).
pub fn parse(text: &str) -> Option<PodRef> {
    text.lines().find_map(parse_line)
}

/// Reads `/proc/<pid>/cgroup` under `root` and parses it; None when the
/// process is gone or not in a container.
pub fn read_pid(root: &HostRoot, pid: u32) -> Option<PodRef> {
    let text = std::fs::read_to_string(root.path(format!("/proc/{pid}/cgroup"))).ok()?;
    parse(&text)
}

/// One line: `hierarchy-id:controllers:path` (v2: `0::path`).
fn parse_line(line: &str) -> Option<PodRef> {
    let mut fields = line.splitn(3, ':');
    let _hierarchy = fields.next()?;
    let _controllers = fields.next()?;
    let path = fields.next()?;
    let mut segments = path.split('/');
    // The container is the segment right below the pod; anything deeper is
    // the container's own business.
    let pod_uid = segments.by_ref().find_map(pod_segment)?;
    let container_id = container_segment(segments.next()?)?;
    Some(PodRef { pod_uid, container_id })
}

/// `pod<uid>` (cgroupfs) or `…kubepods…-pod<uid with _>.slice` (systemd).
fn pod_segment(seg: &str) -> Option<String> {
    if let Some(stem) = seg.strip_suffix(".slice") {
        // Slice names spell out their whole ancestry, so a pod slice always
        // contains "kubepods" (with any --cgroup-root prefix before it).
        let (ancestry, uid) = stem.rsplit_once("-pod")?;
        if !ancestry.contains("kubepods") {
            return None;
        }
        return pod_uid(uid, '_');
    }
    pod_uid(seg.strip_prefix("pod")?, '-')
}

/// Validates a pod UID written with `sep` between its groups and returns it
/// with dashes: a UUID (8-4-4-4-12 hex), or a static pod's 32-hex hash.
fn pod_uid(raw: &str, sep: char) -> Option<String> {
    const GROUPS: [usize; 5] = [8, 4, 4, 4, 12];
    let is_hex = |s: &str| s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if raw.len() == 32 && is_hex(raw) {
        return Some(raw.to_string());
    }
    let mut n = 0;
    for (i, group) in raw.split(sep).enumerate() {
        if GROUPS.get(i) != Some(&group.len()) || !is_hex(group) {
            return None;
        }
        n = i + 1;
    }
    (n == GROUPS.len()).then(|| raw.replace(sep, "-"))
}

/// The runtime prefixes before a container ID in its cgroup's name: systemd
/// scopes `cri-containerd-<id>.scope`, `crio-<id>.scope`, `docker-<id>.scope`;
/// cgroupfs `crio-<id>` or the bare `<id>` (containerd, Docker).
const RUNTIME_PREFIXES: [&str; 3] = ["cri-containerd-", "crio-", "docker-"];

fn container_segment(seg: &str) -> Option<String> {
    let stem = seg.strip_suffix(".scope").unwrap_or(seg);
    // conmon, CRI-O's per-container monitor, lives beside the container in
    // the pod's cgroup, named after the container it watches.
    if stem.starts_with("crio-conmon-") {
        return None;
    }
    let id = RUNTIME_PREFIXES.iter().find_map(|p| stem.strip_prefix(p)).unwrap_or(stem);
    let ok = id.len() == 64 && id.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    ok.then(|| id.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "1e2a9b6f-4c3d-4e2a-9f1b-2c3d4e5f6a7b";
    const UID_: &str = "1e2a9b6f_4c3d_4e2a_9f1b_2c3d4e5f6a7b";
    const ID: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn want() -> Option<PodRef> {
        Some(PodRef { pod_uid: UID.into(), container_id: ID.into() })
    }

    #[test]
    fn v2_systemd_containerd_burstable() {
        let line = format!(
            "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{ID}.scope\n"
        );
        assert_eq!(parse(&line), want());
    }

    #[test]
    fn v2_systemd_crio_besteffort_and_its_conmon() {
        let base = format!("0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice");
        assert_eq!(parse(&format!("{base}/crio-{ID}.scope")), want());
        // conmon runs in the pod's cgroup next to the container, named after it.
        assert_eq!(parse(&format!("{base}/crio-conmon-{ID}.scope")), None);
        // crun/runc may put the container's processes one level down.
        assert_eq!(parse(&format!("{base}/crio-{ID}.scope/container")), want());
    }

    #[test]
    fn v2_systemd_guaranteed_has_no_qos_level() {
        let line = format!("0::/kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-{ID}.scope");
        assert_eq!(parse(&line), want());
    }

    #[test]
    fn v1_cgroupfs_docker_every_hierarchy() {
        // A whole v1 file: named systemd hierarchy first, then controllers.
        let text = format!(
            "12:memory:/kubepods/burstable/pod{UID}/{ID}\n\
             11:cpu,cpuacct:/kubepods/burstable/pod{UID}/{ID}\n\
             4:pids:/kubepods/burstable/pod{UID}/{ID}\n\
             1:name=systemd:/kubepods/burstable/pod{UID}/{ID}\n"
        );
        assert_eq!(parse(&text), want());
        assert_eq!(parse(&format!("9:freezer:/kubepods/pod{UID}/{ID}")), want(), "guaranteed");
        assert_eq!(parse(&format!("9:freezer:/kubepods/besteffort/pod{UID}/{ID}")), want());
    }

    #[test]
    fn v1_cgroupfs_crio() {
        assert_eq!(parse(&format!("7:memory:/kubepods/besteffort/pod{UID}/crio-{ID}")), want());
        assert_eq!(parse(&format!("7:memory:/kubepods/besteffort/pod{UID}/crio-conmon-{ID}")), None);
    }

    #[test]
    fn v1_systemd_docker_guaranteed() {
        let text = format!(
            "11:memory:/kubepods.slice/kubepods-pod{UID_}.slice/docker-{ID}.scope\n\
             1:name=systemd:/kubepods.slice/kubepods-pod{UID_}.slice/docker-{ID}.scope\n"
        );
        assert_eq!(parse(&text), want());
    }

    #[test]
    fn v1_systemd_containerd_besteffort() {
        let line = format!(
            "5:cpuset:/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/cri-containerd-{ID}.scope"
        );
        assert_eq!(parse(&line), want());
    }

    #[test]
    fn hybrid_v1_v2_file() {
        // systemd's hybrid mode: v1 controllers plus an empty-controller v2 line.
        let text = format!(
            "12:blkio:/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{ID}.scope\n\
             0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{ID}.scope\n"
        );
        assert_eq!(parse(&text), want());
    }

    #[test]
    fn static_pod_uid_is_a_32_hex_hash() {
        // kubeadm's etcd and kube-apiserver are static pods: their UID is the
        // hash of the manifest, without dashes.
        let hash = "5b9d0a1e2c3f4a5b6c7d8e9f0a1b2c3d";
        let line = format!(
            "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{hash}.slice/cri-containerd-{ID}.scope"
        );
        assert_eq!(parse(&line), Some(PodRef { pod_uid: hash.into(), container_id: ID.into() }));
        assert_eq!(parse(&format!("0::/kubepods/burstable/pod{hash}/{ID}")).map(|p| p.pod_uid), Some(hash.into()));
    }

    #[test]
    fn other_cgroup_roots_and_namespaced_readers() {
        // kind: the kubelet runs with --cgroup-root=/kubelet.
        let kind = format!(
            "0::/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod{UID_}.slice/cri-containerd-{ID}.scope"
        );
        assert_eq!(parse(&kind), want());
        assert_eq!(parse(&format!("0::/kubelet/kubepods/besteffort/pod{UID}/{ID}")), want());
        // Read from inside another container's cgroup namespace.
        assert_eq!(parse(&format!("0::/../../kubepods-besteffort-pod{UID_}.slice/cri-containerd-{ID}.scope")), want());
        assert_eq!(parse(&format!("0::/../../pod{UID}/{ID}")), want());
        // Docker-in-Docker style prefix (minikube's docker driver).
        assert_eq!(parse(&format!("0::/docker/{ID}/kubepods/burstable/pod{UID}/{ID}")), want());
    }

    #[test]
    fn uppercase_or_escaped_ids_do_not_pass() {
        assert_eq!(parse(&format!("0::/kubepods/pod{}/{ID}", UID.to_uppercase())), None);
        assert_eq!(parse(&format!("0::/kubepods/pod{UID}/{}", ID.to_uppercase())), None);
    }

    #[test]
    fn not_kubernetes() {
        assert_eq!(parse("0::/user.slice/user-1000.slice/session-3.scope\n"), None);
        assert_eq!(parse("0::/init.scope"), None);
        assert_eq!(parse("0::/\n"), None);
        assert_eq!(parse(&format!("0::/system.slice/docker-{ID}.scope")), None, "plain Docker");
        assert_eq!(parse("0::/system.slice/containerd.service"), None);
        assert_eq!(parse(&format!("0::/machine.slice/libpod-{ID}.scope")), None, "podman");
        // A slice that merely ends like a pod slice, outside kubepods.
        assert_eq!(parse(&format!("0::/user.slice/app-pod{UID_}.slice/docker-{ID}.scope")), None);
        // The pod's own cgroup, no container below it (v1 allows processes there).
        assert_eq!(parse(&format!("4:pids:/kubepods/burstable/pod{UID}")), None);
        assert_eq!(parse(&format!("4:pids:/kubepods/burstable/pod{UID}/")), None);
    }

    #[test]
    fn malformed_text_never_panics() {
        let long = "a".repeat(1 << 16);
        let cases = [
            "",
            ":",
            "::",
            "0:",
            "0::",
            "\n\n\n",
            "0::/kubepods/pod",
            "0::/kubepods/pod-/x",
            "0::/kubepods.slice/kubepods-pod.slice/cri-containerd-.scope",
            "0::/kubepods.slice/-pod.slice/x",
            "0::/kubepods/pod1e2a9b6f-4c3d-4e2a-9f1b-2c3d4e5f6a7b-extra/x",
            "0::/kubepods/pod1e2a9b6f-4c3d-4e2a-9f1b/x",
            "0::/kubepods/podé1e2a9b6f-4c3d-4e2a-9f1b-2c3d4e5f6a7/x",
            "0::/kubepods.slice/kubepods-podé.slice/ü.scope",
            long.as_str(),
        ];
        for c in cases {
            assert_eq!(parse(c), None, "{c:.80}");
        }
        // Multi-byte text right where the parser slices must not split a char.
        let uid_with_utf8 = "1e2a9b6f-4c3d-4e2a-9f1b-2c3d4e5f6a7é";
        assert_eq!(parse(&format!("0::/kubepods/pod{uid_with_utf8}/{ID}")), None);
        let id_with_utf8 = format!("{}é", &ID[..62]);
        assert_eq!(parse(&format!("0::/kubepods/pod{UID}/{id_with_utf8}")), None);
    }

    #[test]
    fn reads_a_process_file_under_a_root() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("proc/42")).unwrap();
        std::fs::write(dir.path().join("proc/42/cgroup"), format!("0::/kubepods/pod{UID}/{ID}\n")).unwrap();
        let root = HostRoot::new(dir.path());
        assert_eq!(read_pid(&root, 42), want());
        assert_eq!(read_pid(&root, 43), None);
        // This test process itself, on the real /proc: not in a pod here.
        let me = std::fs::read_to_string("/proc/self/cgroup").unwrap();
        assert_eq!(read_pid(&HostRoot::default(), std::process::id()), parse(&me));
    }
}
