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
//! Every program starts with the same check: is the calling process a
//! watched proxy (`WS_SIDECAR_SLOT`)? Every other process on the node pays
//! that one lookup and nothing else.

use agent_common::{
    Histogram,
    sidecar::{
        Direction, FdKey, FdState, IO_CONNECT, IO_READ, IO_SPLICE, IO_WRITE, MAX_SIDECAR_SLOTS, PHASE_AWAITING,
        PHASE_FORWARDED, PHASE_IDLE, PHASE_READING, PHASE_RESPONDING, PendingIo, ROLE_DOWNSTREAM, ROLE_UPSTREAM,
        SidecarCount, ThreadState, count_index, hist_index,
    },
};
use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns},
    macros::{map, tracepoint},
    maps::{HashMap, LruHashMap, PerCpuArray},
    programs::TracePointContext,
};

use crate::maps::{add, observe};

/// Watched proxy processes: tgid → label slot.
#[map(name = "WS_SIDECAR_SLOT")]
static SIDECAR_SLOT: HashMap<u32, u32> = HashMap::with_max_entries(4096, 0);

/// Role and phase of each proxy socket. LRU: sockets of processes that died
/// without closing them age out.
#[map(name = "WS_SIDECAR_FD")]
static FDS: LruHashMap<FdKey, FdState> = LruHashMap::with_max_entries(65536, 0);

/// Crossings in progress, per thread.
#[map(name = "WS_SIDECAR_THREAD")]
static THREADS: LruHashMap<u64, ThreadState> = LruHashMap::with_max_entries(16384, 0);

/// The syscall each proxy thread is in, from enter to exit.
#[map(name = "WS_SIDECAR_PENDING")]
static PENDING: LruHashMap<u64, PendingIo> = LruHashMap::with_max_entries(16384, 0);

#[map(name = "WS_SIDECAR_HIST")]
static HIST: PerCpuArray<Histogram> = PerCpuArray::with_max_entries(MAX_SIDECAR_SLOTS * Direction::COUNT, 0);

#[map(name = "WS_SIDECAR_COUNTS")]
static COUNTS: PerCpuArray<u64> = PerCpuArray::with_max_entries(MAX_SIDECAR_SLOTS * SidecarCount::COUNT, 0);

/// The early filter: (pid_tgid, slot) of a watched proxy, None otherwise.
#[inline(always)]
fn proxy() -> Option<(u64, u32)> {
    let pid_tgid = bpf_get_current_pid_tgid();
    // SAFETY: lookup of a plain key; the value is copied at once.
    let slot = unsafe { SIDECAR_SLOT.get(&((pid_tgid >> 32) as u32)) }.copied()?;
    Some((pid_tgid, if slot < MAX_SIDECAR_SLOTS { slot } else { 0 }))
}

/// syscalls:sys_enter_* records: arguments are 8-byte slots from offset 16.
#[inline(always)]
fn arg(ctx: &TracePointContext, n: usize) -> i64 {
    // SAFETY: reading the tracepoint record at a fixed offset.
    unsafe { ctx.read_at::<i64>(16 + 8 * n) }.unwrap_or(-1)
}

/// syscalls:sys_exit_* records: the return value at offset 16.
#[inline(always)]
fn ret(ctx: &TracePointContext) -> i64 {
    // SAFETY: as above.
    unsafe { ctx.read_at::<i64>(16) }.unwrap_or(-1)
}

#[inline(always)]
fn bump(slot: u32, c: SidecarCount) {
    add(&COUNTS, count_index(slot, c), 1);
}

#[inline(always)]
fn enter(ctx: &TracePointContext, kind: u32, fd_arg: usize, out_arg: Option<usize>) -> u32 {
    let Some((pid_tgid, _)) = proxy() else { return 0 };
    let io = PendingIo {
        kind,
        fd: arg(ctx, fd_arg) as i32,
        fd_out: out_arg.map(|a| arg(ctx, a) as i32).unwrap_or(-1),
        _pad: 0,
    };
    let _ = PENDING.insert(&pid_tgid, &io, 0);
    0
}

#[inline(always)]
fn exit(ctx: &TracePointContext) -> u32 {
    let Some((pid_tgid, slot)) = proxy() else { return 0 };
    // SAFETY: lookup of a plain key; the value is copied at once.
    let Some(io) = (unsafe { PENDING.get(&pid_tgid) }).copied() else { return 0 };
    let _ = PENDING.remove(&pid_tgid);
    let r = ret(ctx);
    let tgid = (pid_tgid >> 32) as u32;
    match io.kind {
        // A non-blocking connect returns -EINPROGRESS and completes later.
        IO_CONNECT if r == 0 || r == -115 => set_role(tgid, io.fd, ROLE_UPSTREAM),
        IO_READ if r > 0 => on_read(pid_tgid, slot, tgid, io.fd),
        IO_WRITE if r > 0 => on_write(pid_tgid, slot, tgid, io.fd),
        IO_SPLICE if r > 0 => {
            on_read(pid_tgid, slot, tgid, io.fd);
            on_write(pid_tgid, slot, tgid, io.fd_out);
        }
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
    let _ = FDS.insert(&FdKey { tgid, fd: fd as u32 }, &FdState { role, phase: PHASE_IDLE }, 0);
}

#[inline(always)]
fn fd_state(tgid: u32, fd: i32) -> Option<(FdKey, *mut FdState)> {
    if fd < 0 {
        return None;
    }
    let key = FdKey { tgid, fd: fd as u32 };
    let p = FDS.get_ptr_mut(&key)?;
    Some((key, p))
}

#[inline(always)]
fn thread(pid_tgid: u64) -> Option<*mut ThreadState> {
    if let Some(p) = THREADS.get_ptr_mut(&pid_tgid) {
        return Some(p);
    }
    let _ = THREADS.insert(&pid_tgid, &ThreadState::default(), 0);
    THREADS.get_ptr_mut(&pid_tgid)
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

macro_rules! io_tracepoints {
    ($( $enter:ident / $exit:ident = $name:literal : $kind:expr, fd $fd:literal $(, out $out:literal)? ;)*) => {$(
        // Attached to syscalls:sys_enter_<name> by user space (attach::sidecar).
        #[tracepoint]
        pub fn $enter(ctx: TracePointContext) -> u32 {
            enter(&ctx, $kind, $fd, io_tracepoints!(@out $($out)?))
        }

        #[tracepoint]
        pub fn $exit(ctx: TracePointContext) -> u32 {
            exit(&ctx)
        }
    )*};
    (@out) => { None };
    (@out $out:literal) => { Some($out) };
}

io_tracepoints! {
    sc_enter_read / sc_exit_read = "read": IO_READ, fd 0;
    sc_enter_readv / sc_exit_readv = "readv": IO_READ, fd 0;
    sc_enter_recvfrom / sc_exit_recvfrom = "recvfrom": IO_READ, fd 0;
    sc_enter_recvmsg / sc_exit_recvmsg = "recvmsg": IO_READ, fd 0;
    sc_enter_write / sc_exit_write = "write": IO_WRITE, fd 0;
    sc_enter_writev / sc_exit_writev = "writev": IO_WRITE, fd 0;
    sc_enter_sendto / sc_exit_sendto = "sendto": IO_WRITE, fd 0;
    sc_enter_sendmsg / sc_exit_sendmsg = "sendmsg": IO_WRITE, fd 0;
    // sendfile64(out_fd, in_fd, ...): a write to out_fd.
    sc_enter_sendfile / sc_exit_sendfile = "sendfile64": IO_WRITE, fd 0;
    // splice(fd_in, off_in, fd_out, ...).
    sc_enter_splice / sc_exit_splice = "splice": IO_SPLICE, fd 0, out 2;
    sc_enter_connect / sc_exit_connect = "connect": IO_CONNECT, fd 0;
}

/// accept/accept4 return the new downstream socket.
#[tracepoint(category = "syscalls", name = "sys_exit_accept4")]
pub fn sc_exit_accept4(ctx: TracePointContext) -> u32 {
    accepted(&ctx)
}

#[tracepoint(category = "syscalls", name = "sys_exit_accept")]
pub fn sc_exit_accept(ctx: TracePointContext) -> u32 {
    accepted(&ctx)
}

#[inline(always)]
fn accepted(ctx: &TracePointContext) -> u32 {
    let Some((pid_tgid, _)) = proxy() else { return 0 };
    let fd = ret(ctx);
    if fd >= 0 {
        set_role((pid_tgid >> 32) as u32, fd as i32, ROLE_DOWNSTREAM);
    }
    0
}

/// close() forgets the socket; a request still being read is unmatched.
#[tracepoint(category = "syscalls", name = "sys_enter_close")]
pub fn sc_enter_close(ctx: TracePointContext) -> u32 {
    let Some((pid_tgid, slot)) = proxy() else { return 0 };
    let tgid = (pid_tgid >> 32) as u32;
    let fd = arg(&ctx, 0) as i32;
    if let Some((key, st)) = fd_state(tgid, fd) {
        // SAFETY: map value valid during this run.
        if unsafe { (*st).role == ROLE_DOWNSTREAM && (*st).phase == PHASE_READING } {
            bump(slot, SidecarCount::Unmatched);
        }
        let _ = FDS.remove(&key);
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
        let _ = SIDECAR_SLOT.insert(&(child as u32), &slot, 0);
    }
    0
}

/// A proxy process exits: forget it (its sockets age out of the LRU map).
#[tracepoint(category = "sched", name = "sched_process_exit")]
pub fn sc_process_exit(_ctx: TracePointContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    if pid_tgid as u32 == tgid {
        let _ = SIDECAR_SLOT.remove(&tgid);
    }
    0
}
