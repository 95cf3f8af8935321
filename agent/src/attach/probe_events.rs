//! Uprobes made through tracefs (`uprobe_events`) rather than the uprobe PMU.
//!
//! Why: Linux 6.16, and the stable kernels that took the fix for
//! CVE-2025-38466 ("perf: Revert to requiring CAP_SYS_ADMIN for uprobes"),
//! refuse `perf_event_open` on the uprobe PMU without CAP_SYS_ADMIN. The
//! check sits in the PMU only: a uprobe *event* defined in tracefs is opened
//! as a tracepoint perf event, which CAP_PERFMON allows, and a BPF link to
//! that perf event carries the attach cookie just like aya's PMU links. The
//! kernel runs the same uprobe consumer either way, so a hit costs the same.
//!
//! What it needs instead: tracefs mounted and writable by the agent (root
//! owns `uprobe_events`; no capability is involved), and BPF perf links
//! (5.15+, which cookies need anyway).
//!
//! Lifetime: an event is defined, opened and linked; dropping the
//! [`ProbeEvent`] closes both descriptors (which unregisters the uprobe) and
//! then deletes the definition. A definition left by an agent killed with
//! SIGKILL costs nothing (a uprobe event without a consumer is not
//! registered in any file), and the next agent deletes it at start
//! ([`ProbeEvents::remove_stale`]). Names carry the agent's pid for that.

use std::{
    io::Write as _,
    os::fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
    path::{Path, PathBuf},
};

use aya_obj::generated::{PERF_FLAG_FD_CLOEXEC, bpf_attach_type, bpf_attr, bpf_cmd, perf_event_attr, perf_type_id};
use thiserror::Error;

use crate::host::{HostRoot, tracefs::Tracefs};

/// The tracefs group every event of ours is defined in.
pub const GROUP: &str = "watchscope";

#[derive(Debug, Error)]
pub enum ProbeEventError {
    #[error("{0:?} contains white space, which a uprobe_events definition cannot name")]
    Path(PathBuf),
    #[error(
        "defining a uprobe in {control} (`{definition}`): {source}{detail}; tracefs must be mounted \
         writable for the agent (e.g. a read-write hostPath of /sys/kernel/tracing)"
    )]
    Define { control: PathBuf, definition: String, detail: String, source: std::io::Error },
    #[error("reading the id of uprobe event {path}: {source}")]
    Id { path: PathBuf, source: std::io::Error },
    #[error("perf_event_open on tracefs uprobe event {name} (id {id}): {source}")]
    Open { name: String, id: u64, source: std::io::Error },
    #[error(
        "linking the program to uprobe event {name}: {source} (BPF links to perf events, with \
         cookies, need Linux 5.15+)"
    )]
    Link { name: String, source: std::io::Error },
}

/// Creates uprobe events under [`GROUP`] in one tracefs.
pub struct ProbeEvents {
    tracefs: Tracefs,
    /// `ws<pid>_`: whose events these are.
    prefix: String,
    next: u64,
}

/// One attached uprobe event: its perf event, the BPF link on it, and the
/// definition to delete once both are closed.
pub struct ProbeEvent {
    link: Option<OwnedFd>,
    perf: Option<OwnedFd>,
    name: String,
    control: PathBuf,
}

impl ProbeEvents {
    pub fn new(tracefs: Tracefs) -> Self {
        Self { tracefs, prefix: format!("ws{}_", std::process::id()), next: 0 }
    }

    /// Deletes the definitions of agents that are no longer running (see the
    /// module comment). Returns how many went.
    pub fn remove_stale(&self, root: &HostRoot) -> usize {
        let control = self.tracefs.uprobe_events();
        let Ok(text) = std::fs::read_to_string(&control) else { return 0 };
        let me = std::process::id();
        let mut n = 0;
        for name in text.lines().filter_map(our_event) {
            let owner = owner_pid(name);
            let alive = owner.is_some_and(|p| p == me || root.path(format!("/proc/{p}")).exists());
            if !alive && delete(&control, name).is_ok() {
                n += 1;
            }
        }
        n
    }

    /// Defines a uprobe at `offset` of the file `path` reaches, and links the
    /// (loaded, kprobe-type) program `prog` to it with `cookie`.
    pub fn attach(
        &mut self,
        prog: BorrowedFd<'_>,
        path: &Path,
        offset: u64,
        cookie: u64,
    ) -> Result<ProbeEvent, ProbeEventError> {
        let shown = path.to_string_lossy();
        if shown.chars().any(char::is_whitespace) {
            return Err(ProbeEventError::Path(path.to_path_buf()));
        }
        let control = self.tracefs.uprobe_events();
        // A name in use (an agent of the same pid in another pid namespace)
        // is skipped, never reused: its owner would lose its probe.
        let mut tries = 0;
        let name = loop {
            let name = format!("{}{}", self.prefix, self.next);
            self.next += 1;
            let definition = definition(&name, &shown, offset);
            match write_command(&control, &definition) {
                Ok(()) => break name,
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) && tries < 8 => tries += 1,
                Err(source) => {
                    let detail = self.last_error().map(|l| format!(" (tracefs error_log: {l})")).unwrap_or_default();
                    return Err(ProbeEventError::Define { control, definition, detail, source });
                }
            }
        };
        // From here on, dropping `event` deletes the definition.
        let mut event = ProbeEvent { link: None, perf: None, name, control };
        let id_path = self.tracefs.dir.join("events").join(GROUP).join(&event.name).join("id");
        let id = std::fs::read_to_string(&id_path)
            .and_then(|t| t.trim().parse::<u64>().map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e)))
            .map_err(|source| ProbeEventError::Id { path: id_path, source })?;
        let perf =
            open_tracepoint(id).map_err(|source| ProbeEventError::Open { name: event.name.clone(), id, source })?;
        let link = link_create(prog, perf.as_raw_fd(), cookie)
            .map_err(|source| ProbeEventError::Link { name: event.name.clone(), source })?;
        event.perf = Some(perf);
        event.link = Some(link);
        Ok(event)
    }

    /// The kernel's explanation of the last refused definition: the
    /// `error_log` line after the command (e.g. "Invalid file offset").
    fn last_error(&self) -> Option<String> {
        let text = std::fs::read_to_string(self.tracefs.dir.join("error_log")).ok()?;
        last_error_line(&text)
    }
}

impl ProbeEvent {
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for ProbeEvent {
    fn drop(&mut self) {
        // The link holds the perf event; closing both unregisters the uprobe
        // (waiting for an RCU grace period), after which the definition is
        // no longer busy.
        drop(self.link.take());
        drop(self.perf.take());
        let mut result = delete(&self.control, &self.name);
        for _ in 0..20 {
            match &result {
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    std::thread::sleep(std::time::Duration::from_millis(5));
                    result = delete(&self.control, &self.name);
                }
                _ => break,
            }
        }
        if let Err(e) = result {
            tracing::warn!("deleting uprobe event {GROUP}/{}: {e}", self.name);
        }
    }
}

/// `p:watchscope/NAME PATH:0xOFFSET`, the uprobe_events syntax.
fn definition(name: &str, path: &str, offset: u64) -> String {
    format!("p:{GROUP}/{name} {path}:{offset:#x}")
}

/// The event name of a uprobe_events line defining one of ours
/// (`p:watchscope/ws12_3 /proc/9/exe:0x0000000000450e20`).
fn our_event(line: &str) -> Option<&str> {
    let head = line.split_whitespace().next()?;
    let (_, event) = head.split_once(':')?;
    let name = event.strip_prefix(GROUP)?.strip_prefix('/')?;
    owner_pid(name).map(|_| name)
}

/// The agent pid in an event name `ws<pid>_<n>`.
fn owner_pid(name: &str) -> Option<u32> {
    let (pid, n) = name.strip_prefix("ws")?.split_once('_')?;
    n.parse::<u64>().ok()?;
    pid.parse().ok()
}

/// The last complaint in tracefs `error_log`: the lines are
/// `[time] trace_uprobe: error: REASON`, then the command and a caret line.
fn last_error_line(text: &str) -> Option<String> {
    text.lines().rev().find_map(|l| l.split_once("error: ").map(|(_, reason)| reason.trim().to_string()))
}

/// One command, one write: tracefs parses each write on its own.
fn write_command(control: &Path, command: &str) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new().append(true).open(control)?;
    f.write_all(format!("{command}\n").as_bytes())
}

fn delete(control: &Path, name: &str) -> std::io::Result<()> {
    write_command(control, &format!("-:{GROUP}/{name}"))
}

/// A tracepoint perf event on every process of CPU 0: for a tracepoint the
/// BPF program runs wherever the event fires, the CPU only names the perf
/// event's buffer (unused here). CAP_PERFMON allows it.
fn open_tracepoint(id: u64) -> std::io::Result<OwnedFd> {
    // SAFETY: perf_event_attr is plain data; all-zero is its documented default.
    let mut attr: perf_event_attr = unsafe { std::mem::zeroed() };
    attr.type_ = perf_type_id::PERF_TYPE_TRACEPOINT as u32;
    attr.size = std::mem::size_of::<perf_event_attr>() as u32;
    attr.config = id;
    attr.__bindgen_anon_2.wakeup_events = 1;
    // SAFETY: a valid attr pointer for the duration of the call; the result
    // is a new descriptor we own, or -1.
    let fd = unsafe {
        libc::syscall(libc::SYS_perf_event_open, &attr as *const perf_event_attr, -1, 0, -1, PERF_FLAG_FD_CLOEXEC)
    };
    owned(fd)
}

/// BPF_LINK_CREATE of `prog` on the perf event `perf`, with `cookie`
/// (what `bpf_get_attach_cookie` returns in the program).
fn link_create(prog: BorrowedFd<'_>, perf: i32, cookie: u64) -> std::io::Result<OwnedFd> {
    // SAFETY: bpf_attr is a plain-data union; the kernel requires unused bytes zero.
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    attr.link_create.__bindgen_anon_1.prog_fd = prog.as_raw_fd() as u32;
    attr.link_create.__bindgen_anon_2.target_fd = perf as u32;
    attr.link_create.attach_type = bpf_attach_type::BPF_PERF_EVENT as u32;
    attr.link_create.__bindgen_anon_3.perf_event.bpf_cookie = cookie;
    // SAFETY: a valid attr pointer and its size; the result is a new
    // descriptor we own, or -1.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            bpf_cmd::BPF_LINK_CREATE as libc::c_int,
            &attr as *const bpf_attr,
            std::mem::size_of::<bpf_attr>() as u32,
        )
    };
    owned(fd)
}

fn owned(ret: libc::c_long) -> std::io::Result<OwnedFd> {
    if ret < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let fd = i32::try_from(ret).map_err(|_| std::io::Error::other("descriptor out of range"))?;
    // SAFETY: the kernel just returned this descriptor to us; nobody else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_our_event_lines_only() {
        assert_eq!(our_event("p:watchscope/ws12_3 /proc/9/exe:0x0000000000450e20"), Some("ws12_3"));
        assert_eq!(our_event("p:uprobes/p_bash_0x4245c0 /bin/bash:0x00000000000f45c0"), None);
        assert_eq!(our_event("p:watchscope/other /bin/x:0x1"), None);
        assert_eq!(our_event("r:watchscope/ws1_x /bin/x:0x1"), None);
        assert_eq!(our_event(""), None);
        assert_eq!(owner_pid("ws4242_17"), Some(4242));
        assert_eq!(owner_pid("ws_1"), None);
    }

    #[test]
    fn writes_the_uprobe_events_syntax() {
        assert_eq!(definition("ws1_0", "/proc/9/exe", 0x450e20), "p:watchscope/ws1_0 /proc/9/exe:0x450e20");
    }

    #[test]
    fn finds_the_kernel_complaint() {
        let log = "[  113.2] trace_uprobe: error: Failed to parse address or file.\n  Command: p:watchscope/ws1_0 /nope:0x1\n                               ^\n";
        assert_eq!(last_error_line(log).as_deref(), Some("Failed to parse address or file."));
        assert_eq!(last_error_line(""), None);
    }
}
