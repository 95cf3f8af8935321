//! Sidecar latency from syscall tracepoints: how long each request and each
//! response sits inside a proxy process.
//!
//! accept/accept4 mark a socket downstream, connect marks it upstream. Then
//! a per-socket phase and a per-thread state machine: the first read of a
//! new message on a downstream socket starts a request crossing; the first
//! write to an upstream socket on the same thread ends it. Upstream read →
//! downstream write is a response crossing. Reads and writes that continue a
//! message (bodies larger than one read) change nothing.
//!
//! Why the thread (`pid_tgid`) is the join key: event-loop proxies (Envoy
//! workers, haproxy threads, nginx workers) read a request and write it
//! upstream in the same loop iteration on the same thread. A proxy that
//! hands a message to another thread leaves the first thread's crossing
//! open; it is counted as unmatched when the thread starts another message,
//! when the proxy answers it itself, or when the socket closes — never
//! attributed to a different message.
//!
//! The syscalls are seen through the raw syscall exit tracepoint
//! (`raw_syscalls:sys_exit`, where the saved registers still hold every
//! argument, so no entry program is needed) rather than one `syscalls:*`
//! tracepoint per syscall: the latter feed BPF through the perf path, which
//! builds a record of every argument before the program can look at the
//! pid — measured here at ~300 ns added to every read and write of every
//! process on the node; the raw form hands over the registers as they are.
//!
//! Every program starts with the same check: is the calling process a
//! watched proxy (`WS_SIDECAR_SLOT`)? Every other process on the node pays
//! that one lookup and nothing else.

use agent_common::{
    Histogram,
    sidecar::{
        Direction, FdKey, FdState, MAX_SIDECAR_SLOTS, PHASE_AWAITING, PHASE_FORWARDED, PHASE_IDLE, PHASE_READING,
        PHASE_RESPONDING, PeerKey, ROLE_DOWNSTREAM, ROLE_UPSTREAM, SidecarCount, SockOffsets, ThreadState, count_index,
        hist_index,
    },
};
use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel, bpf_probe_read_user},
    macros::{map, raw_tracepoint, tracepoint},
    maps::{Array, HashMap, LruHashMap},
    programs::{RawTracePointContext, TracePointContext},
};

use crate::maps::{add, observe};

/// Watched proxy processes: tgid → label slot.
#[map(name = "WS_SIDECAR_SLOT")]
static SIDECAR_SLOT: HashMap<u32, u32> = HashMap::with_max_entries(4096, 0);

/// Role and phase of each proxy socket. LRU: sockets of processes that died
/// without closing them age out.
#[map(name = "WS_SIDECAR_FD")]
static FDS: LruHashMap<FdKey, FdState> = LruHashMap::with_max_entries(32768, 0);

/// Crossings in progress, per thread.
#[map(name = "WS_SIDECAR_THREAD")]
static THREADS: LruHashMap<u64, ThreadState> = LruHashMap::with_max_entries(16384, 0);

/// Upstream peers of watched proxies (from their connect calls).
#[map(name = "WS_SIDECAR_PEERS")]
static PEERS: LruHashMap<PeerKey, u32> = LruHashMap::with_max_entries(8192, 0);

/// Listening ports of watched proxies (their downstream side), written by
/// user space from /proc.
#[map(name = "WS_SIDECAR_LISTEN")]
static LISTEN: HashMap<u16, u32> = HashMap::with_max_entries(1024, 0);

#[map(name = "WS_SIDECAR_HIST")]
static HIST: Array<Histogram> = Array::with_max_entries(MAX_SIDECAR_SLOTS * Direction::COUNT, 0);

#[map(name = "WS_SIDECAR_COUNTS")]
static COUNTS: Array<u64> = Array::with_max_entries(MAX_SIDECAR_SLOTS * SidecarCount::COUNT, 0);

/// The early filter: (pid_tgid, slot) of a watched proxy, None otherwise.
#[inline(always)]
fn proxy() -> Option<(u64, u32)> {
    let pid_tgid = bpf_get_current_pid_tgid();
    // SAFETY: lookup of a plain key; the value is copied at once.
    let slot = unsafe { SIDECAR_SLOT.get((pid_tgid >> 32) as u32) }.copied()?;
    Some((pid_tgid, if slot < MAX_SIDECAR_SLOTS { slot } else { 0 }))
}

/// The syscall numbers the programs care about, per architecture.
#[cfg(bpf_target_arch = "x86_64")]
mod nr {
    pub const READ: u64 = 0;
    pub const WRITE: u64 = 1;
    pub const READV: u64 = 19;
    pub const WRITEV: u64 = 20;
    pub const SENDFILE: u64 = 40;
    pub const CONNECT: u64 = 42;
    pub const ACCEPT: u64 = 43;
    pub const SENDTO: u64 = 44;
    pub const RECVFROM: u64 = 45;
    pub const SENDMSG: u64 = 46;
    pub const RECVMSG: u64 = 47;
    pub const SPLICE: u64 = 275;
    pub const ACCEPT4: u64 = 288;
}

#[cfg(bpf_target_arch = "aarch64")]
mod nr {
    pub const READ: u64 = 63;
    pub const WRITE: u64 = 64;
    pub const READV: u64 = 65;
    pub const WRITEV: u64 = 66;
    pub const SENDFILE: u64 = 71;
    pub const SPLICE: u64 = 76;
    pub const ACCEPT: u64 = 202;
    pub const CONNECT: u64 = 203;
    pub const SENDTO: u64 = 206;
    pub const RECVFROM: u64 = 207;
    pub const SENDMSG: u64 = 211;
    pub const RECVMSG: u64 = 212;
    pub const ACCEPT4: u64 = 242;
}

/// The n-th argument (0..=2) of the task's current syscall, from the user
/// registers the kernel saved at entry. At sys_exit only the return
/// register has changed (x86_64 rax; arm64 x0, whose entry value the kernel
/// keeps in orig_x0), so one program at the exit sees the whole call.
#[cfg(bpf_target_arch = "x86_64")]
#[inline(always)]
fn sys_arg(regs: *const u8, n: usize) -> i64 {
    // struct pt_regs: rdx at 96, rsi at 104, rdi at 112.
    const OFF: [usize; 3] = [112, 104, 96];
    read_kernel_u64(regs, OFF[if n < 3 { n } else { 2 }]) as i64
}

#[cfg(bpf_target_arch = "aarch64")]
#[inline(always)]
fn sys_arg(regs: *const u8, n: usize) -> i64 {
    // struct pt_regs: regs[1], regs[2] at 8·n; orig_x0 after the 34 words
    // of user_pt_regs.
    let off = if n == 0 { 272 } else { 8 * if n < 3 { n } else { 2 } };
    read_kernel_u64(regs, off) as i64
}

/// The task's current syscall number.
#[cfg(bpf_target_arch = "x86_64")]
#[inline(always)]
fn syscall_nr(regs: *const u8) -> u64 {
    // struct pt_regs: orig_rax at 120.
    read_kernel_u64(regs, 120)
}

#[cfg(bpf_target_arch = "aarch64")]
#[inline(always)]
fn syscall_nr(regs: *const u8) -> u64 {
    // struct pt_regs: s32 syscallno after orig_x0.
    read_kernel_u64(regs, 280) as u32 as i32 as i64 as u64
}

#[inline(always)]
fn read_kernel_u64(base: *const u8, off: usize) -> u64 {
    // SAFETY: bpf_probe_read_kernel faults safely; `base` is the
    // tracepoint's own pt_regs argument.
    unsafe { bpf_probe_read_kernel(base.wrapping_add(off) as *const u64) }.unwrap_or(u64::MAX)
}

#[inline(always)]
fn bump(slot: u32, c: SidecarCount) {
    add(&COUNTS, count_index(slot, c), 1);
}

/// raw_syscalls:sys_exit(regs, ret): one program for every syscall the
/// state machine follows, run once per syscall.
#[raw_tracepoint(tracepoint = "sys_exit")]
pub fn sc_sys_exit(ctx: RawTracePointContext) -> u32 {
    let Some((pid_tgid, slot)) = proxy() else { return 0 };
    let regs: *const u8 = ctx.arg(0);
    let r: i64 = ctx.arg(1);
    let tgid = (pid_tgid >> 32) as u32;
    let fd = sys_arg(regs, 0) as i32;
    match syscall_nr(regs) {
        nr::ACCEPT | nr::ACCEPT4 if r >= 0 => set_role(tgid, r as i32, ROLE_DOWNSTREAM),
        // A non-blocking connect returns -EINPROGRESS and completes later.
        nr::CONNECT if r == 0 || r == -115 => {
            set_role(tgid, fd, ROLE_UPSTREAM);
            remember_peer(sys_arg(regs, 1) as u64, slot);
        }
        nr::READ | nr::READV | nr::RECVFROM | nr::RECVMSG if r > 0 => on_read(pid_tgid, slot, tgid, fd),
        // sendfile(out_fd, in_fd, ...) writes to its first argument.
        nr::WRITE | nr::WRITEV | nr::SENDTO | nr::SENDMSG | nr::SENDFILE if r > 0 => on_write(pid_tgid, slot, tgid, fd),
        // splice(fd_in, off_in, fd_out, ...): a read and a write.
        nr::SPLICE if r > 0 => {
            on_read(pid_tgid, slot, tgid, fd);
            on_write(pid_tgid, slot, tgid, sys_arg(regs, 2) as i32);
        }
        // close() is handled at its entry (sc_close_enter), never here.
        _ => {}
    }
    0
}

#[inline(always)]
fn set_role(tgid: u32, fd: i32, role: u32) {
    if fd < 0 {
        return;
    }
    // A reused fd number starts over: accept/connect always reset the state.
    let _ = FDS.insert(FdKey { tgid, fd: fd as u32 }, FdState { role, phase: PHASE_IDLE }, 0);
}

#[inline(always)]
fn fd_state(tgid: u32, fd: i32) -> Option<(FdKey, *mut FdState)> {
    if fd < 0 {
        return None;
    }
    let key = FdKey { tgid, fd: fd as u32 };
    let p = FDS.get_ptr_mut(key)?;
    Some((key, p))
}

#[inline(always)]
fn thread(pid_tgid: u64) -> Option<*mut ThreadState> {
    if let Some(p) = THREADS.get_ptr_mut(pid_tgid) {
        return Some(p);
    }
    let _ = THREADS.insert(pid_tgid, ThreadState::default(), 0);
    THREADS.get_ptr_mut(pid_tgid)
}

#[inline(always)]
fn on_read(pid_tgid: u64, slot: u32, tgid: u32, fd: i32) {
    let Some((_, st)) = fd_state(tgid, fd) else { return };
    let Some(t) = thread(pid_tgid) else { return };
    // SAFETY: map values owned by the maps, valid during this program run.
    unsafe {
        let now = bpf_ktime_get_ns();
        match ((*st).role, (*st).phase) {
            (ROLE_DOWNSTREAM, PHASE_IDLE) => {
                // First read of a new request.
                if (*t).req_start != 0 {
                    bump(slot, SidecarCount::Unmatched);
                }
                (*st).phase = PHASE_READING;
                (*t).req_start = now;
                (*t).req_fd = fd as u32;
            }
            (ROLE_UPSTREAM, PHASE_AWAITING) => {
                // First read of the response to a forwarded request.
                if (*t).resp_start != 0 {
                    bump(slot, SidecarCount::Unmatched);
                }
                (*st).phase = PHASE_RESPONDING;
                (*t).resp_start = now;
                (*t).resp_fd = fd as u32;
            }
            // The rest of a message already being timed.
            _ => {}
        }
    }
}

#[inline(always)]
fn on_write(pid_tgid: u64, slot: u32, tgid: u32, fd: i32) {
    let Some((_, st)) = fd_state(tgid, fd) else { return };
    let Some(t) = thread(pid_tgid) else { return };
    // SAFETY: as in on_read.
    unsafe {
        let now = bpf_ktime_get_ns();
        match (*st).role {
            ROLE_UPSTREAM if (*t).req_start != 0 => {
                // A request leaves: one request crossing.
                observe(&HIST, hist_index(slot, Direction::Request), now.saturating_sub((*t).req_start));
                bump(slot, SidecarCount::RequestCrossings);
                if let Some((_, d)) = fd_state(tgid, (*t).req_fd as i32) {
                    (*d).phase = PHASE_FORWARDED;
                }
                (*st).phase = PHASE_AWAITING;
                (*t).req_start = 0;
            }
            ROLE_DOWNSTREAM if (*t).resp_start != 0 => {
                // A response leaves: one response crossing; the downstream
                // socket is ready for its next request.
                observe(&HIST, hist_index(slot, Direction::Response), now.saturating_sub((*t).resp_start));
                bump(slot, SidecarCount::ResponseCrossings);
                (*st).phase = PHASE_IDLE;
                (*t).resp_start = 0;
            }
            ROLE_DOWNSTREAM if (*st).phase == PHASE_READING => {
                // The proxy answered a request it never forwarded (an error
                // page, a cache hit): the request crossed nothing.
                bump(slot, SidecarCount::Unmatched);
                (*st).phase = PHASE_IDLE;
                if (*t).req_fd == fd as u32 {
                    (*t).req_start = 0;
                }
            }
            ROLE_DOWNSTREAM if (*st).phase == PHASE_FORWARDED && (*t).resp_start == 0 => {
                // More of a response body, or a response whose first read
                // happened on another thread: nothing to time here.
            }
            _ => {}
        }
    }
}

/// Records the address a proxy connected to (a user-space sockaddr).
#[inline(always)]
fn remember_peer(sockaddr: u64, slot: u32) {
    // SAFETY: bpf_probe_read_user faults safely.
    let Ok(head) = (unsafe { bpf_probe_read_user(sockaddr as *const [u8; 8]) }) else { return };
    let family = u16::from_ne_bytes([head[0], head[1]]);
    let port = u16::from_be_bytes([head[2], head[3]]);
    let mut key = PeerKey { addr: [0; 16], port, family, _pad: 0 };
    match family {
        AF_INET => key.addr[..4].copy_from_slice(&head[4..8]),
        AF_INET6 => match unsafe { bpf_probe_read_user((sockaddr + 8) as *const [u8; 16]) } {
            Ok(a) => key.addr = a,
            Err(_) => return,
        },
        _ => return,
    }
    let _ = PEERS.insert(key, slot, 0);
}

const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;

/// Where a `struct sock`'s peer and local port lie on this kernel, set by
/// user space from the kernel's BTF before loading (zero: unknown).
#[unsafe(no_mangle)]
static SOCK_OFFSETS: SockOffsets = SockOffsets { daddr: 0, dport: 0, num: 0, family: 0, v6_daddr: 0 };

/// tcp_retransmit_skb(sk, skb, ...), raw, from softirq or timer context (no
/// process): a retransmission counts for a proxy when its socket's local
/// port is one the proxy listens on, or its peer is one the proxy connected
/// to. Ports and addresses are compared without the network namespace, so
/// two proxies listening on the same port in different namespaces share
/// their counts.
///
/// Why raw and not the `tcp:tcp_retransmit_skb` perf-event tracepoint (whose
/// record would spare the struct offsets): a perf-event program is skipped
/// whenever anything on the CPU holds `bpf_prog_active`, and a
/// retransmission timer is a softirq that can interrupt the agent's own map
/// syscalls, or a uprobe program, on that CPU. A CI run lost 1 of 4 that
/// way (watchscope 3, tracefs 4). A raw tracepoint only guards against its
/// own recursion.
#[raw_tracepoint(tracepoint = "tcp_retransmit_skb")]
pub fn sc_tcp_retransmit(ctx: RawTracePointContext) -> u32 {
    // SAFETY: a global only user space writes, before load.
    let off = unsafe { core::ptr::read_volatile(&SOCK_OFFSETS) };
    if off.family == 0 {
        return 0;
    }
    let sk: *const u8 = ctx.arg(0);
    let field = |o: u32| sk.wrapping_add(o as usize);
    // SAFETY: bpf_probe_read_kernel faults safely; the offsets are the
    // kernel's own (BTF), and `sk` is the tracepoint's socket.
    let (Ok(num), Ok(dport), Ok(family)) = (unsafe {
        (
            bpf_probe_read_kernel(field(off.num) as *const u16),
            bpf_probe_read_kernel(field(off.dport) as *const u16),
            bpf_probe_read_kernel(field(off.family) as *const u16),
        )
    }) else {
        return 0;
    };
    // SAFETY: lookups of plain keys; values copied at once.
    if let Some(slot) = unsafe { LISTEN.get(num) }.copied() {
        bump(slot.min(MAX_SIDECAR_SLOTS - 1), SidecarCount::Retransmits);
        return 0;
    }
    let mut key = PeerKey { addr: [0; 16], port: u16::from_be(dport), family, _pad: 0 };
    // SAFETY: as above.
    let ok = match family {
        AF_INET => unsafe { bpf_probe_read_kernel(field(off.daddr) as *const [u8; 4]) }
            .map(|a| key.addr[..4].copy_from_slice(&a))
            .is_ok(),
        AF_INET6 if off.v6_daddr != 0 => {
            unsafe { bpf_probe_read_kernel(field(off.v6_daddr) as *const [u8; 16]) }.map(|a| key.addr = a).is_ok()
        }
        _ => false,
    };
    if ok && let Some(slot) = unsafe { PEERS.get(key) }.copied() {
        bump(slot.min(MAX_SIDECAR_SLOTS - 1), SidecarCount::Retransmits);
    }
    0
}

/// syscalls:sys_enter_close: close() forgets the socket; a request still
/// being read is unmatched.
///
/// Why at the entry and not in `sc_sys_exit` with the other calls: the
/// kernel frees the fd number inside close(), and closing a TCP socket takes
/// a while (0.7-1.8 ms measured on haproxy's sockets here). Meanwhile
/// another thread of the proxy can accept or connect a new socket under the
/// same number; its state, written at that call's exit, was then removed by
/// the old close's exit, and the new socket's request went uncounted and
/// unexplained (1 in 60 haproxy requests). At the entry the number still
/// belongs to the closing thread, so nothing else can hold it yet. Only
/// close() pays for this tracepoint, not every syscall.
#[tracepoint(category = "syscalls", name = "sys_enter_close")]
pub fn sc_close_enter(ctx: TracePointContext) -> u32 {
    let Some((pid_tgid, slot)) = proxy() else { return 0 };
    // SAFETY: the syscall tracepoints' fixed record layout: the syscall
    // number at 8, then each argument as a 64-bit word from 16.
    let Ok(fd) = (unsafe { ctx.read_at::<u64>(16) }) else { return 0 };
    let tgid = (pid_tgid >> 32) as u32;
    let fd = fd as i32;
    if let Some((key, st)) = fd_state(tgid, fd) {
        // SAFETY: map value valid during this run.
        if unsafe { (*st).role == ROLE_DOWNSTREAM && (*st).phase == PHASE_READING } {
            bump(slot, SidecarCount::Unmatched);
        }
        let _ = FDS.remove(key);
    }
    0
}

/// A proxy forks a worker process (nginx): the child inherits the watch.
/// Threads (CLONE_THREAD) share the tgid and need nothing.
#[tracepoint(category = "task", name = "task_newtask")]
pub fn sc_task_newtask(ctx: TracePointContext) -> u32 {
    let Some((_, slot)) = proxy() else { return 0 };
    const CLONE_THREAD: u64 = 0x0001_0000;
    // SAFETY: reading the record at the offsets of its format file.
    let flags = unsafe { ctx.read_at::<u64>(32) }.unwrap_or(CLONE_THREAD);
    let child = unsafe { ctx.read_at::<i32>(8) }.unwrap_or(0);
    if flags & CLONE_THREAD == 0 && child > 0 {
        let _ = SIDECAR_SLOT.insert(child as u32, slot, 0);
    }
    0
}

/// A proxy process exits: forget it (its sockets age out of the LRU map).
#[tracepoint(category = "sched", name = "sched_process_exit")]
pub fn sc_process_exit(_ctx: TracePointContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    if pid_tgid as u32 == tgid {
        let _ = SIDECAR_SLOT.remove(tgid);
    }
    0
}
