//! Shared definitions for sidecar (proxy) latency: the time a request or a
//! response spends inside a proxy, between reading it on one socket and
//! writing it on the other.

/// The two directions a message crosses a proxy.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Read from a downstream (accepted) socket → written to an upstream (dialed) one.
    Request = 0,
    /// Read from upstream → written downstream.
    Response = 1,
}

impl Direction {
    pub const COUNT: u32 = 2;
    pub const ALL: [Direction; 2] = [Direction::Request, Direction::Response];

    pub fn name(self) -> &'static str {
        match self {
            Direction::Request => "request",
            Direction::Response => "response",
        }
    }
}

/// Per-slot counters of the sidecar programs.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SidecarCount {
    RequestCrossings = 0,
    ResponseCrossings = 1,
    /// A message read but never seen leaving (answered by the proxy itself,
    /// handed to another thread, or overwritten by the next one).
    Unmatched = 2,
    /// TCP retransmissions on the proxy's sockets.
    Retransmits = 3,
}

impl SidecarCount {
    pub const COUNT: u32 = 4;
}

/// Label slots for proxies (like the watch path's, a fixed array).
pub const MAX_SIDECAR_SLOTS: u32 = 32;

/// A proxy's socket, as the syscall programs key it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "pod", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct FdKey {
    pub tgid: u32,
    pub fd: u32,
}

/// Role and message phase of one proxy socket.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "pod", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct FdState {
    /// `ROLE_DOWNSTREAM` or `ROLE_UPSTREAM`.
    pub role: u32,
    /// `PHASE_*`: where the socket's current message is.
    pub phase: u32,
}

pub const ROLE_DOWNSTREAM: u32 = 1;
pub const ROLE_UPSTREAM: u32 = 2;

/// No message in flight: the next read starts one.
pub const PHASE_IDLE: u32 = 0;
/// Downstream: a request is being read, not yet forwarded.
pub const PHASE_READING: u32 = 1;
/// Downstream: the request was forwarded; reads are its body until the
/// response has been written back.
pub const PHASE_FORWARDED: u32 = 2;
/// Upstream: a request was written; the next read starts its response.
pub const PHASE_AWAITING: u32 = 3;
/// Upstream: the response is being read; further reads are its body.
pub const PHASE_RESPONDING: u32 = 4;

/// Per-thread crossings in progress (the join key of an event-loop proxy).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "pod", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct ThreadState {
    pub req_start: u64,
    pub req_fd: u32,
    pub resp_fd: u32,
    pub resp_start: u64,
}

/// A proxy's upstream peer, as connect() named it: how retransmissions,
/// which the kernel reports from softirq context with no process, are
/// attributed to the proxy's upstream sockets.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "pod", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct PeerKey {
    /// IPv4 in the first 4 bytes (rest zero), or IPv6.
    pub addr: [u8; 16],
    /// Host byte order.
    pub port: u16,
    /// AF_INET (2) or AF_INET6 (10).
    pub family: u16,
    pub _pad: u32,
}

#[inline(always)]
pub fn hist_index(slot: u32, dir: Direction) -> u32 {
    slot * Direction::COUNT + dir as u32
}

#[inline(always)]
pub fn count_index(slot: u32, c: SidecarCount) -> u32 {
    slot * SidecarCount::COUNT + c as u32
}

const _: () = assert!(size_of::<FdKey>() == 8);
const _: () = assert!(size_of::<FdState>() == 8);
const _: () = assert!(size_of::<ThreadState>() == 24);
const _: () = assert!(size_of::<PeerKey>() == 24);

/// Where the retransmission program reads a `struct sock`'s peer and local
/// port on the running kernel: byte offsets from the socket's start, which
/// user space reads from the kernel's BTF (the program cannot relocate
/// field accesses itself). All zero: not identified, the program does
/// nothing.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "pod", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct SockOffsets {
    /// `skc_daddr`: the IPv4 peer (network byte order).
    pub daddr: u32,
    /// `skc_dport`: the peer's port (network byte order).
    pub dport: u32,
    /// `skc_num`: the local port (host byte order).
    pub num: u32,
    /// `skc_family`.
    pub family: u32,
    /// `skc_v6_daddr`: the IPv6 peer (0: the kernel has no IPv6).
    pub v6_daddr: u32,
}

const _: () = assert!(size_of::<SockOffsets>() == 20);

#[cfg(feature = "user")]
aya_pod!(FdKey, FdState, ThreadState, PeerKey, SockOffsets);
