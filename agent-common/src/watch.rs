//! Shared definitions for the etcd watch path: stages, probe configuration
//! (where each argument and struct field lives, filled in by user space from
//! the inspector's catalog), and map keys.

/// The stages watchscope times, in the kernel, for every watch event.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// notify (commit fan-out) → per-watcher queue (`watcher.send`).
    CommitToEnqueue = 0,
    /// per-watcher queue → gRPC `Send`.
    EnqueueToSend = 1,
    /// notify → gRPC `Send`.
    CommitToSend = 2,
    /// notify → a client on the same node hands the event to its watcher.
    CommitToDispatch = 3,
    /// notify → a Kubernetes API server's watch cache takes the event
    /// (`watchCache.processEvent`), joined by revision through the API
    /// server's own etcd client.
    CommitToCache = 4,
    /// notify → the event is in one watcher's result channel, ready to be
    /// written to its HTTP stream (per watcher): SIG Scalability's watch
    /// latency SLI.
    CommitToWatcher = 5,
    /// watch cache → one watcher's result channel (per watcher; timed also
    /// when the commit happened on another node).
    CacheToWatcher = 6,
    /// notify → a client-go reflector has decoded the event and queued it
    /// for its informer (per process), joined by the object's
    /// resourceVersion as the API server's watch cache saw it.
    CommitToDecode = 7,
    /// notify → the informer takes the event off its queue and starts
    /// processing it (`handleDeltas`: its indexer, then the hand-off to the
    /// user's handlers), per process.
    CommitToProcess = 8,
    /// The reflector queued the event → the informer starts processing it:
    /// the informer queue's wait.
    DecodeToProcess = 9,
    /// notify → one of the informer's handlers starts on the event (client-go's
    /// `ResourceEventHandlerFuncs`: the user's add/update/delete function),
    /// per handler, joined by object.
    CommitToHandler = 10,
    /// The informer started processing the event → the handler starts on
    /// it: the wait in the handler's listener queue (a slow handler makes
    /// the next events wait here).
    ProcessToHandler = 11,
    /// notify → the API server has written the event to one watcher's HTTP
    /// stream (the watch handler's encoder returned: the bytes are in the
    /// response, and in the socket unless the connection is blocked), per
    /// watcher.
    CommitToWrite = 12,
    /// watch cache → written to one watcher's HTTP stream, per watcher (also
    /// when the commit happened on another node).
    CacheToWrite = 13,
}

impl Stage {
    pub const COUNT: u32 = 14;
    pub const ALL: [Stage; 14] = [
        Stage::CommitToEnqueue,
        Stage::EnqueueToSend,
        Stage::CommitToSend,
        Stage::CommitToDispatch,
        Stage::CommitToCache,
        Stage::CommitToWatcher,
        Stage::CacheToWatcher,
        Stage::CommitToDecode,
        Stage::CommitToProcess,
        Stage::DecodeToProcess,
        Stage::CommitToHandler,
        Stage::ProcessToHandler,
        Stage::CommitToWrite,
        Stage::CacheToWrite,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Stage::CommitToEnqueue => "commit_to_enqueue",
            Stage::EnqueueToSend => "enqueue_to_send",
            Stage::CommitToSend => "commit_to_send",
            Stage::CommitToDispatch => "commit_to_dispatch",
            Stage::CommitToCache => "commit_to_cache",
            Stage::CommitToWatcher => "commit_to_watcher",
            Stage::CacheToWatcher => "cache_to_watcher",
            Stage::CommitToDecode => "commit_to_decode",
            Stage::CommitToProcess => "commit_to_process",
            Stage::DecodeToProcess => "decode_to_process",
            Stage::CommitToHandler => "commit_to_handler",
            Stage::ProcessToHandler => "process_to_handler",
            Stage::CommitToWrite => "commit_to_write",
            Stage::CacheToWrite => "cache_to_write",
        }
    }
}

/// Which side counted a watch event.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// Events etcd sent to watchers (per watcher: one event to two watchers is two).
    Server = 0,
    /// Events a client dispatched to its watchers.
    Client = 1,
    /// Events a Kubernetes API server's watch cache took in.
    ApiserverCache = 2,
    /// Events an API server put in a watcher's result channel (per watcher).
    ApiserverWatcher = 3,
    /// Events a watcher received from the watch cache's history (the
    /// initial events of a new watch): not live, so never timed.
    ApiserverReplay = 4,
    /// Events a client-go reflector decoded and queued for its informer
    /// (bookmarks apart).
    Informer = 5,
    /// Events an informer took off its queue that its reflector had queued
    /// (joined by object).
    InformerProcessed = 6,
    /// Watchers an API server terminated for being unresponsive (their
    /// queue stayed full past the dispatch budget): not events, exported in
    /// their own family.
    ApiserverTerminated = 7,
    /// Events an informer's handler started on (per handler), joined by
    /// object to one its reflector queued.
    InformerHandled = 8,
    /// Events an API server wrote to a watcher's HTTP stream (per watcher),
    /// joined by object to a live event its cacher dispatched.
    ApiserverWritten = 9,
    /// Events an API server's cacher offered to a watcher's queue (per
    /// watcher, first offers): more than reach the result channels when a
    /// watcher's filter rejects some, or the watcher is terminated.
    ApiserverOffered = 10,
    /// Watch events a client-go watch client (an informer's reflector,
    /// kubectl, any user of `Watch`) decoded off its HTTP stream: JSON
    /// frames of ADDED, MODIFIED and DELETED events, bookmarks apart.
    ClientDecoded = 11,
}

impl Side {
    pub const COUNT: u32 = 12;
    pub const ALL: [Side; 12] = [
        Side::Server,
        Side::Client,
        Side::ApiserverCache,
        Side::ApiserverWatcher,
        Side::ApiserverReplay,
        Side::Informer,
        Side::InformerProcessed,
        Side::ApiserverTerminated,
        Side::InformerHandled,
        Side::ApiserverWritten,
        Side::ApiserverOffered,
        Side::ClientDecoded,
    ];

    /// The `side` label.
    pub fn name(self) -> &'static str {
        match self {
            Side::Server => "server",
            Side::Client => "client",
            Side::ApiserverCache => "apiserver_cache",
            Side::ApiserverWatcher => "apiserver_watcher",
            Side::ApiserverReplay => "apiserver_replayed",
            Side::Informer => "informer",
            Side::InformerProcessed => "informer_processed",
            Side::ApiserverTerminated => "apiserver_terminated",
            Side::InformerHandled => "informer_handled",
            Side::ApiserverWritten => "apiserver_written",
            Side::ApiserverOffered => "apiserver_offered",
            Side::ClientDecoded => "client_decoded",
        }
    }
}

/// Label slots: every watched process maps to one slot (its label set, e.g.
/// its comm), so histogram and counter arrays have a fixed, bounded size.
/// Slot 0 collects processes past the cap.
pub const MAX_SLOTS: u32 = 64;
pub const OVERFLOW_SLOT: u32 = 0;

/// Most events timed from one watch response (a bpf_loop bound); the rest
/// are counted as events and as `EventsOverCap`, not timed.
pub const MAX_EVENTS_PER_RESPONSE: u32 = 4096;

/// Where a Go function argument lives at the probed instruction.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "pod", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct ArgLoc {
    /// `ARG_NONE`, `ARG_REG` (then `off` is a `Reg` number) or `ARG_STACK`
    /// (then `off` is the byte offset above the stack pointer at entry).
    pub kind: u32,
    pub off: u32,
}

pub const ARG_NONE: u32 = 0;
pub const ARG_REG: u32 = 1;
pub const ARG_STACK: u32 = 2;

/// Register-ABI integer argument slots, in Go's order, named by their amd64
/// register (arm64 uses R0–R8 in the same order, and R28 for g); `R14` is
/// the slot of the current goroutine `g`.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reg {
    Rax = 0,
    Rbx = 1,
    Rcx = 2,
    Rdi = 3,
    Rsi = 4,
    R8 = 5,
    R9 = 6,
    R10 = 7,
    R11 = 8,
    R14 = 9,
    /// A closure's context register (its captured variables): RDX on
    /// amd64, R26 on arm64.
    Rdx = 10,
}

/// What one attached watch-path probe reads. Indexed by the uprobe's attach
/// cookie in the `WS_WATCH_CONFIG` array.
///
/// Arguments by role:
/// - notify(rev, evs): `args[0]` rev, `args[1]` evs.ptr, `args[2]` evs.len;
/// - watcher.send(wr): `args[0]` WatchID, `args[1]` Events.ptr, `args[2]` Events.len;
/// - Send(m) and dispatchEvent(pbresp): `args[0]` the *WatchResponse;
/// - the API server's watchCache.processEvent: `args[0]` the resourceVersion;
/// - its cacheWatcher.nonblockingAdd(event) and .markBookmarkAfterRvSent(event):
///   `args[0]` the *cacheWatcher, `args[1]` the *watchCacheEvent;
/// - client-go's Reflector.setLastSyncResourceVersion(v): `args[0]` v.ptr,
///   `args[1]` v.len; the FIFO's Add/Update/Delete(obj): `args[0]` obj's
///   data word; the informer's handleDeltas / handleBatchDeltas: see
///   `deltas_boxed`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "pod", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct WatchProbeConfig {
    pub args: [ArgLoc; 4],
    /// etcdserverpb.WatchResponse: offset of `Header *ResponseHeader`.
    pub resp_header_off: u32,
    /// ResponseHeader.MemberId and .Revision.
    pub hdr_member_off: u32,
    pub hdr_rev_off: u32,
    /// WatchResponse.WatchId.
    pub resp_watch_id_off: u32,
    /// WatchResponse.Events (slice: ptr at this offset, len 8 bytes later).
    pub resp_events_off: u32,
    /// Bytes between consecutive elements of the events slice
    /// (8 for `[]*mvccpb.Event`, 24 for `[]mvccpb.Event`).
    pub event_stride: u32,
    /// 1 when the slice holds pointers to events.
    pub events_indirect: u32,
    /// mvccpb.Event.Kv and mvccpb.KeyValue.ModRevision.
    pub event_kv_off: u32,
    pub kv_mod_rev_off: u32,
    /// WatchResponse.Created, .Canceled (bools) and .CompactRevision: a
    /// response without events is a progress notification only when none
    /// is set (a watch's creation, cancellation and compaction responses
    /// carry no events either).
    pub resp_created_off: u32,
    pub resp_canceled_off: u32,
    pub resp_compact_rev_off: u32,
    /// 1 when the goroutine `g` is in a register (Go's register ABI, and
    /// arm64 always); 0 with amd64's stack ABI, where it lives in
    /// thread-local storage and the register slot holds anything.
    pub g_in_reg: u32,
    /// How to tell, at the probed stack-check jump, that this hit is the
    /// one that calls morestack (and re-enters): one of the `GUARD_*`.
    pub guard: u32,
    /// The API server's `cacher.watchCacheEvent`: `Type` (a string: its
    /// length and first byte tell a BOOKMARK) and `ResourceVersion`.
    pub cache_event_type_off: u32,
    pub cache_event_rv_off: u32,
    /// An informer's deltas: `cache.Delta.Object`'s data word (`Delta` is
    /// `{Type string; Object interface{}}`), and 1 when `args[0]` is the
    /// `Deltas` slice boxed in an interface (handleDeltas) rather than the
    /// slice's pointer and length in `args[0]`, `args[1]` (handleBatchDeltas).
    /// `event_stride` is `sizeof(Delta)`.
    pub delta_obj_off: u32,
    pub deltas_boxed: u32,
    /// 1 on an etcd client's dispatch in a binary whose later stages (a
    /// Kubernetes API server's watch cache) look the commit up by (process,
    /// revision): the dispatch then republishes it there.
    pub publish_commit: u32,
    /// `watchCacheEvent.Object` and `.PrevObject` (interfaces: type word,
    /// then data word), read by the per-watcher queue probe when
    /// `publish_sent` is 1: the watch handler's writes are then joined to
    /// the dispatched event by object.
    pub cache_event_obj_off: u32,
    pub cache_event_prev_off: u32,
    pub publish_sent: u32,
    /// On the cacher's close of an unresponsive watcher (a closure): where
    /// the closure's context (`args[0]`) holds the captured `*cacheWatcher`,
    /// so the record names the watcher. Only set when the binary's code was
    /// seen to load it from there.
    pub closure_watcher_off: u32,
    /// etcd's enqueue (`watcher.send`, its receiver in `args[3]`): where
    /// the `mvcc.watcher` holds the length of its filters (`fcs`), from the
    /// binary's type descriptor; 0 when not known, and every watcher is
    /// then taken as unfiltered. A watcher with filters queues a new slice
    /// of the events it keeps, so its copies are told apart by the event's
    /// `Kv` pointer, which the filter copies along, not by the event's
    /// address (`agent_common::watch::filtered_copy_slot`).
    pub watcher_fcs_len_off: u32,
    /// A probe that only counts when called from one function (a JSON
    /// decode of a watch frame, not every JSON decode), or etcd's enqueue,
    /// which stamps a revision's commit when called from the commit fan-out
    /// (`notify`): the probed instruction's address in the file's own
    /// layout, and the caller's range there, `[caller_lo, caller_hi)`. The
    /// kernel compares the return address less the load bias (the probe's
    /// runtime address less `site_addr`). 0s: any caller, and the enqueue
    /// stamps no commit.
    pub site_addr: u64,
    pub caller_lo: u64,
    pub caller_hi: u64,
}

/// Entry probes sit on the conditional jump of the function's stack check:
/// the kernel emulates a jump with one trap, where the instruction after it
/// would be single-stepped (two traps, ~10x the cost on some VMs). When the
/// flags say the jump to morestack will be taken, the function re-enters
/// afterwards, so that hit is skipped and every call is counted once.
pub const GUARD_NONE: u32 = 0;
/// amd64 `jbe`: taken when CF or ZF.
pub const GUARD_X86_JBE: u32 = 1;
/// amd64 `jb`: taken when CF.
pub const GUARD_X86_JB: u32 = 2;
/// arm64 `b.ls`: taken when C is clear or Z is set.
pub const GUARD_ARM64_LS: u32 = 3;

/// Whether the guarded jump is taken, given the flags register (x86 EFLAGS
/// or arm64 PSTATE).
#[inline(always)]
pub fn guard_taken(guard: u32, flags: u64) -> bool {
    const CF: u64 = 1 << 0;
    const ZF: u64 = 1 << 6;
    const PSTATE_Z: u64 = 1 << 30;
    const PSTATE_C: u64 = 1 << 29;
    match guard {
        GUARD_X86_JBE => flags & (CF | ZF) != 0,
        GUARD_X86_JB => flags & CF != 0,
        GUARD_ARM64_LS => flags & PSTATE_C == 0 || flags & PSTATE_Z != 0,
        _ => false,
    }
}

/// (process or member, revision).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "pod", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct RevKey {
    /// tgid for server-local maps, member id for the cross-process map.
    pub id: u64,
    pub rev: i64,
}

/// One watcher's copy of one event, between its enqueue and its gRPC send.
///
/// Watch ids are only unique per gRPC stream (two clients both have watch 0),
/// so (tgid, watch id, revision) alone would mix two watchers. etcd's send
/// loop passes `&evs[i]` — the address of the event inside the slice that was
/// queued to that watcher — so the event's address tells the copies apart;
/// with the revision in the key too, a reused address cannot match an old
/// entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "pod", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct WatchRevKey {
    pub tgid: u64,
    pub watch_id: i64,
    pub rev: i64,
    pub event_addr: u64,
}

/// Sets in each timestamp ring (a power of two); each set holds
/// `STAMP_WAYS` entries.
///
/// Why rings and not LRU hash maps: an LRU insert takes a spinlock with
/// interrupts off and, once the map is full, evicts under it; it cost etcd
/// about 1.2 µs per commit here, most of each probe's run time. A ring
/// entry is found by arithmetic, written in place, and aged out by the
/// revisions that follow, which is the order etcd produces them in.
///
/// Why four ways: a live copy is pushed out of the enqueue ring when its
/// set already holds `STAMP_WAYS` live ones. Copies take sets by their
/// event's address (`watch_rev_slot`), and live copies are live objects,
/// so a set overflows only where addresses of waiting copies meet modulo
/// the ring (256 KiB). Placed at random, `n` waiting copies overflow a set
/// `(n / STAMP_SETS)^2 / 2` times per enqueue with two ways and
/// `(n / STAMP_SETS)^4 / 24` with four: a backlog of 1,000 copies (clients
/// stalled for a moment) lost one copy in 2,000 enqueues with two ways, and
/// fewer than one in a million with four (unit test
/// `a_backlog_of_copies_stays_in_the_ring`). By address (`watch_rev_slot`),
/// copies allocated one after another never meet each other, and a model
/// of etcd's allocations pushes out no more than random placement does
/// (`copies_by_address_are_pushed_out_no_more_than_at_random`). The rings
/// by revision keep `STAMP_ENTRIES` consecutive revisions either way. More ways would cost
/// every lookup that misses (each way is one more entry read).
pub const STAMP_SETS: u32 = 16384;
pub const STAMP_WAYS: u32 = 4;
/// Entries per ring.
pub const STAMP_ENTRIES: u32 = STAMP_SETS * STAMP_WAYS;

/// A timestamp keyed by `K`, as stored in a ring. `seq` is a sequence
/// lock: odd while an entry is being written, so a reader on another CPU
/// that raced a writer sees the change and treats the entry as a miss
/// (x86 keeps stores in order; eBPF has no fences to say so elsewhere).
/// `seq == 0` or `ts == 0`: empty.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stamp<K> {
    pub seq: u64,
    pub ts: u64,
    pub key: K,
}

/// splitmix64's finaliser: spreads ids (pids, member ids, addresses) over
/// the ring so that two of them rarely start at nearby sets.
#[inline(always)]
pub fn mix(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// First entry of the set that holds `(id, rev)`. Consecutive revisions
/// of one id take consecutive sets, so an etcd never evicts its own commit
/// time until `STAMP_ENTRIES` revisions later (each set holds
/// `STAMP_WAYS` generations, the oldest replaced first), and each id
/// starts at its own offset so that two members on one node (a kind
/// cluster) share few sets.
#[inline(always)]
pub fn rev_entry(key: &RevKey) -> u32 {
    set_entry((key.rev as u64).wrapping_add(mix(key.id)))
}

/// Where the enqueue ring keeps a watcher's copy of an event: the first
/// entry of its set, and the 64-bit fingerprint stored for its key in place
/// of the key's 32 bytes, which made the ring twice as large (3 MiB,
/// against the agent's 32 MiB bound at 96 CPUs).
///
/// The set follows the event's address within its page (`by_address`),
/// not a hash of the whole address: etcd copies each event into a slice
/// per watcher, one allocation after another, so the copies of one put lie
/// in few stretches of sets (enqueued in the order of a Go map, not of the
/// allocations), and with one watcher the next put's copy is mostly in the
/// cache lines and the page of the ring the last one touched. A hash of
/// the address read a cold set of the 1.5 MiB ring at every enqueue, a
/// cache and TLB miss that took a third of `etcd_enqueue`'s time (perf on
/// etcd under puts). The
/// watch id cannot place a copy: ids are only unique per gRPC stream (50
/// streams of 20 watches have 20 ids), and copies of one event to watches
/// with one id would share a set. The fingerprint hashes every field; two
/// copies waiting in one set match by mistake with odds of about 2^-61
/// (its lowest bit is `OFFER_MARK`).
#[inline(always)]
pub fn watch_rev_slot(key: &WatchRevKey) -> (u32, u64) {
    (set_entry(by_address(key.event_addr, key.tgid)), fingerprint(key) & !OFFER_MARK)
}

/// An address's place in a ring: its 16-byte step within its 8 KiB page
/// (a Go span of small objects), from an offset hashed from the page and
/// `offset`. Within a span, one allocation after another takes
/// neighbouring sets; spans start anywhere. Unhashed, a span could only
/// start at one of 32 places (the ring spans 256 KiB), and spans meeting
/// there pushed out three times as many copies as random placement under a
/// backlog of 10,000 (`copies_by_address_are_pushed_out_no_more_than_at_random`).
#[inline(always)]
fn by_address(addr: u64, offset: u64) -> u64 {
    ((addr >> 4) & 511).wrapping_add(mix(offset ^ (addr >> 13)))
}

#[inline(always)]
fn fingerprint(key: &WatchRevKey) -> u64 {
    let who = mix(key.tgid ^ mix(key.watch_id as u64 ^ mix(key.event_addr)));
    mix(who ^ mix(key.rev as u64))
}

/// The fingerprint bit that marks an API server's offer to one of its
/// watchers (`kube_queue`) in the enqueue ring, which it shares with
/// etcd's copies. Many offers are never removed: the events a watcher's
/// filter rejects never reach its result channel, and their entries are
/// left to age out, so an offer pushed out is not counted (if it was still
/// live, its result-channel probe finds nothing and counts the event as
/// replayed, untimed). An etcd copy leaves at its send, so one pushed out
/// is counted (`map_full`): a send that will miss. An etcd watcher with
/// filters (`filtered_copy_slot`) is marked the same way: the copies its
/// filters drop are never sent. (A watch cancelled with copies queued
/// leaves its copies to age out too, and pushing those out is then
/// overcounted.)
pub const OFFER_MARK: u64 = 1;

/// Where the enqueue ring keeps an API server's offer of one event to one
/// watcher (`watch_id`: the `*cacheWatcher`), marked as an offer. The
/// event (`*watchCacheEvent`) is one object for every watcher it is
/// offered to, so each watcher takes the events' addresses from an offset
/// of its own.
#[inline(always)]
pub fn offer_slot(key: &WatchRevKey) -> (u32, u64) {
    (set_entry(by_address(key.event_addr, mix(key.tgid ^ mix(key.watch_id as u64)))), fingerprint(key) | OFFER_MARK)
}

/// Where the enqueue ring keeps an etcd watcher's copy of an event when
/// the watcher has filters (`key.event_addr` holds the event's `Kv`
/// pointer). etcd's `watcher.send` copies the events its filters keep into
/// a new slice before queueing them, so the address the gRPC send
/// transmits is not the one the enqueue saw; the `Kv` pointer is copied
/// along. One event's copies to every watcher share that pointer, so each
/// watcher takes it from an offset of its own, as an offer does; marked,
/// as an offer is: the copies the filters drop are left to age out.
#[inline(always)]
pub fn filtered_copy_slot(key: &WatchRevKey) -> (u32, u64) {
    offer_slot(key)
}

/// Whether an entry pushed out of the enqueue ring while live (its
/// fingerprint) is a loss to count (`map_full`): an etcd copy, not an offer
/// nor a filtered watcher's copy.
#[inline(always)]
pub fn pushed_out_a_copy(fp: u64) -> bool {
    fp & OFFER_MARK == 0
}

#[inline(always)]
fn set_entry(h: u64) -> u32 {
    (h & (STAMP_SETS as u64 - 1)) as u32 * STAMP_WAYS
}

/// Whether a ring entry holds nothing: never written, or removed.
#[inline(always)]
pub fn stamp_empty(seq: u64, ts: u64) -> bool {
    seq == 0 || ts == 0
}

/// Which way of a set a new entry replaces: the first empty one, else the
/// oldest.
#[inline(always)]
pub fn victim_way(ts: [u64; STAMP_WAYS as usize], seq: [u64; STAMP_WAYS as usize]) -> u32 {
    let mut victim = 0;
    let mut oldest = u64::MAX;
    for way in 0..STAMP_WAYS as usize {
        if stamp_empty(seq[way], ts[way]) {
            return way as u32;
        }
        if ts[way] < oldest {
            oldest = ts[way];
            victim = way as u32;
        }
    }
    victim
}

/// One event's path, for `watchscope record`-style views (ring buffer; only
/// produced while a recorder asks for it). Zero timestamps: stage not seen.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "pod", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct WatchRecord {
    /// Side::Server (at gRPC send) or Side::Client (at dispatch).
    pub side: u32,
    pub tgid: u32,
    pub member: u64,
    pub rev: i64,
    pub watch_id: i64,
    pub commit_ns: u64,
    pub enqueue_ns: u64,
    /// Send time (server) or dispatch time (client).
    pub at_ns: u64,
    /// The goroutine that sent or dispatched (`g` pointer): joins a client
    /// event to the window (`WindowRecord`) open on that goroutine.
    pub g: u64,
}

/// The most digits of a resourceVersion watchscope reads (an int64 has 19).
pub const RV_DIGITS: usize = 19;

/// The revision in the first `n` bytes of `buf`, a Kubernetes
/// resourceVersion as client-go holds it (a decimal string); `None` for
/// anything else (empty, too long, not digits, past `i64::MAX`), which is
/// never guessed at. Loop-bounded for the BPF verifier.
#[inline(always)]
pub fn parse_rv(buf: &[u8; RV_DIGITS + 1], n: usize) -> Option<i64> {
    if n == 0 || n > RV_DIGITS {
        return None;
    }
    // 19 digits never overflow a u64 (checked multiplication would need
    // 128-bit helpers the BPF backend lacks); the range check is at the end.
    let mut v: u64 = 0;
    for (i, &b) in buf.iter().enumerate().take(RV_DIGITS) {
        if i >= n {
            break;
        }
        if !b.is_ascii_digit() {
            return None;
        }
        v = v * 10 + (b - b'0') as u64;
    }
    i64::try_from(v).ok()
}

/// An address in one process: an object (a reflector queued it, the
/// informer's queue keeps the pointer it was given; the cacher dispatched
/// it) or a goroutine (`g`: Go heaps are laid out alike, so two processes
/// can have goroutines at the same address).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ObjKey {
    pub tgid: u64,
    pub obj: u64,
}

/// An object's join not made yet: the informer took the object off its
/// queue before its reflector recorded the event's revision.
pub const REV_PENDING: i64 = -1;
/// The reflector's resourceVersion was not a decimal revision.
pub const REV_UNREADABLE: i64 = -2;

/// An object's event: its revision (or `REV_PENDING`, `REV_UNREADABLE`),
/// when it was committed (0: not seen on this node), and a time whose
/// meaning is the map's (when the informer took it off its queue).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ObjStamp {
    pub rev: i64,
    pub commit_ns: u64,
    pub queued_ns: u64,
}

/// A handler that started on an object whose revision its reflector had not
/// recorded yet (the informer popped it first): timed when the revision
/// arrives.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EarlyHandler {
    /// When the handler started.
    pub start_ns: u64,
    /// Its goroutine (a window on it joins the handler's hop).
    pub g: u64,
    /// When the informer took the object off its queue.
    pub popped_ns: u64,
}

/// An object the cacher dispatched (a `cachingObject`, shared by every
/// watcher of the event): the interface's type word, which the watch
/// handler's write must show too, and the event's revision.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SentObj {
    pub itab: u64,
    pub rev: i64,
}

/// A reflector's queue push on one goroutine, waiting for the revision the
/// reflector records next.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pending {
    pub queued_ns: u64,
    pub obj: u64,
}

/// Most deltas timed from one informer pop (a bpf_loop bound).
pub const MAX_DELTAS_PER_POP: u32 = 1024;

/// The slowest observation of one stage histogram (same index) in the
/// current exemplar interval: what `/metrics` attaches to that series as an
/// exemplar, so a spike on a panel names its event's revision.
///
/// The kernel writes it without a lock (one program run is a few
/// instructions; a lock would cost every observation): `check` is cleared
/// first and written last as a checksum of the other fields, so a reader
/// that copies the entry while a writer is halfway, or while two CPUs write
/// it at once, sees a mismatch and takes no exemplar rather than a wrong
/// one. User space closes an interval by bumping the epoch in
/// `WS_EXEMPLAR_EPOCH`; an entry of an older epoch is overwritten by the
/// next observation whatever its length.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "pod", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct StageExemplar {
    pub epoch: u64,
    pub ns: u64,
    pub rev: i64,
    /// The watcher, when the stage has one: etcd's watch id, or the API
    /// server's `*cacheWatcher` (see `flags`).
    pub watcher: u64,
    /// When the observation ended (bpf_ktime_get_ns: CLOCK_MONOTONIC).
    pub at_ns: u64,
    pub flags: u64,
    pub check: u64,
}

const _: () = assert!(size_of::<StageExemplar>() == 56);

impl StageExemplar {
    /// `watcher` holds an etcd watch id.
    pub const WATCH_ID: u64 = 1;
    /// `watcher` holds an API server's `*cacheWatcher` address.
    pub const CACHE_WATCHER: u64 = 2;

    /// A checksum of the fields, never 0 (0 marks an entry being written).
    #[inline(always)]
    pub fn checksum(epoch: u64, ns: u64, rev: i64, watcher: u64, at_ns: u64, flags: u64) -> u64 {
        // Multiply-xor mixing: a field from another write changes it.
        let mut h = 0x9e37_79b9_7f4a_7c15u64;
        for v in [epoch, ns, rev as u64, watcher, at_ns, flags] {
            h = (h ^ v).wrapping_mul(0x1000_0000_01b3);
            h ^= h >> 29;
        }
        h | 1
    }

    /// Whether the entry is whole (not torn by a concurrent write).
    pub fn is_whole(&self) -> bool {
        self.check != 0
            && self.check == Self::checksum(self.epoch, self.ns, self.rev, self.watcher, self.at_ns, self.flags)
    }
}

/// Index of (slot, stage) in the watch histogram array.
#[inline(always)]
pub fn hist_index(slot: u32, stage: Stage) -> u32 {
    slot * Stage::COUNT + stage as u32
}

/// Index of (slot, side) in the watch event counter array.
#[inline(always)]
pub fn events_index(slot: u32, side: Side) -> u32 {
    slot * Side::COUNT + side as u32
}

const _: () = assert!(size_of::<ArgLoc>() == 8);
const _: () = assert!(size_of::<WatchProbeConfig>() == 152);
const _: () = assert!(size_of::<SentObj>() == 16);
const _: () = assert!(size_of::<EarlyHandler>() == 24);
const _: () = assert!(size_of::<RevKey>() == 16);
const _: () = assert!(size_of::<WatchRevKey>() == 32);
const _: () = assert!(size_of::<Stamp<RevKey>>() == 32);
const _: () = assert!(size_of::<Stamp<u64>>() == 24);
const _: () = assert!(size_of::<WatchRecord>() == 64);

#[cfg(feature = "user")]
aya_pod!(WatchProbeConfig, RevKey, WatchRevKey, WatchRecord, StageExemplar);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guards_follow_the_condition_codes() {
        assert!(guard_taken(GUARD_X86_JBE, 1) && guard_taken(GUARD_X86_JBE, 1 << 6));
        assert!(!guard_taken(GUARD_X86_JBE, 0x202));
        assert!(guard_taken(GUARD_X86_JB, 0x203) && !guard_taken(GUARD_X86_JB, 0x242));
        assert!(guard_taken(GUARD_ARM64_LS, 0) && guard_taken(GUARD_ARM64_LS, (1 << 29) | (1 << 30)));
        assert!(!guard_taken(GUARD_ARM64_LS, 1 << 29));
        assert!(!guard_taken(GUARD_NONE, u64::MAX));
    }

    /// The kernel's ring (agent-ebpf `stamps`) without its sequence
    /// lock: the same sets, the same victim, for counting what stays.
    struct Ring<K> {
        e: Vec<Stamp<K>>,
        clock: u64,
    }

    impl<K: Copy + PartialEq + Default> Ring<K> {
        fn new() -> Self {
            Ring { e: vec![Stamp::default(); STAMP_ENTRIES as usize], clock: 0 }
        }

        fn find(&self, set: u32, key: &K) -> Option<usize> {
            (set..set + STAMP_WAYS)
                .map(|i| i as usize)
                .find(|&i| !stamp_empty(self.e[i].seq, self.e[i].ts) && self.e[i].key == *key)
        }

        /// Stores `key`; the key of the live entry it pushed out, if any.
        fn insert(&mut self, set: u32, key: K) -> Option<K> {
            self.clock += 1;
            let ways = &self.e[set as usize..(set + STAMP_WAYS) as usize];
            let way = victim_way(std::array::from_fn(|w| ways[w].ts), std::array::from_fn(|w| ways[w].seq));
            let v = &mut self.e[(set + way) as usize];
            let out = (!stamp_empty(v.seq, v.ts)).then_some(v.key);
            *v = Stamp { seq: 2, ts: self.clock, key };
            out
        }
    }

    #[test]
    fn one_etcd_keeps_a_full_ring_of_consecutive_revisions() {
        // Consecutive revisions of one process take consecutive sets.
        for rev in 1_000_000..1_000_000 + i64::from(STAMP_SETS) {
            let e = rev_entry(&RevKey { id: 4242, rev });
            assert!(e < STAMP_ENTRIES && e.is_multiple_of(STAMP_WAYS));
            assert_eq!(
                e,
                rev_entry(&RevKey { id: 4242, rev: 1_000_000 }).wrapping_add(((rev - 1_000_000) as u32) * STAMP_WAYS)
                    % STAMP_ENTRIES
            );
        }
        // The ring keeps STAMP_ENTRIES of them; the next replaces the oldest.
        let mut ring = Ring::new();
        let key = |rev| RevKey { id: 4242, rev };
        let revs = 1_000_000..1_000_000 + i64::from(STAMP_ENTRIES);
        for rev in revs.clone() {
            assert!(ring.insert(rev_entry(&key(rev)), key(rev)).is_none(), "rev {rev} pushed one out");
        }
        assert!(revs.clone().all(|rev| ring.find(rev_entry(&key(rev)), &key(rev)).is_some()));
        let next = revs.end;
        assert!(ring.insert(rev_entry(&key(next)), key(next)).is_some());
        assert!(ring.find(rev_entry(&key(revs.start)), &key(revs.start)).is_none());
        assert!(ring.find(rev_entry(&key(revs.start + 1)), &key(revs.start + 1)).is_some());
    }

    #[test]
    fn fingerprints_tell_copies_apart_by_every_field() {
        let base = WatchRevKey { tgid: 4242, watch_id: 3, rev: 1_000_000, event_addr: 0xc000_1000 };
        let mut seen = std::collections::HashSet::new();
        seen.insert(watch_rev_slot(&base).1);
        for n in 1..1000u64 {
            let i = n as i64;
            for k in [
                WatchRevKey { tgid: base.tgid + n, ..base },
                WatchRevKey { watch_id: base.watch_id + i, ..base },
                WatchRevKey { rev: base.rev + i, ..base },
                WatchRevKey { event_addr: base.event_addr + 8 * n, ..base },
            ] {
                assert!(seen.insert(watch_rev_slot(&k).1), "{k:?} shares a fingerprint");
            }
        }
    }

    #[test]
    fn a_backlog_of_copies_stays_in_the_ring() {
        // 5 watchers, 4 events per revision to each, every copy at a new
        // address, at random (8-byte aligned: every set in use); a backlog
        // of 1,000 copies waiting for their send (50 puts: clients stalled
        // for a moment; a soak on this VM keeps at most 3). Each send frees
        // the oldest copy. Over a million enqueues, two ways (32768 sets)
        // pushed out 475 live copies; four push out none here.
        let mut ring = Ring::new();
        let mut waiting = std::collections::VecDeque::new();
        let (mut pushed_out, mut sent) = (0u32, 0u32);
        let mut addr = 0xc000_0000u64;
        for n in 0..1_000_000u64 {
            let key = WatchRevKey { tgid: 4242, watch_id: (n % 5) as i64, rev: (n / 20) as i64 + 1, event_addr: addr };
            addr = mix(addr) & 0x00ff_ffff_fff8 | 0xc000_0000_0000;
            let (set, fp) = watch_rev_slot(&key);
            pushed_out += u32::from(ring.insert(set, fp).is_some());
            waiting.push_back(key);
            if waiting.len() > 1000
                && let Some(k) = waiting.pop_front()
                && let (set, fp) = watch_rev_slot(&k)
                && let Some(i) = ring.find(set, &fp)
            {
                ring.e[i].ts = 0;
                sent += 1;
            }
        }
        assert!(pushed_out <= 5, "{pushed_out} copies pushed out");
        assert_eq!(u64::from(sent + pushed_out), 1_000_000 - 1000);
    }

    /// How etcd's allocator hands out the per-watcher event slices: one
    /// after another from a span, `size` bytes apart, a new span past 8 KiB.
    fn go_heap(start: u64, size: u64) -> impl FnMut() -> u64 {
        let mut next = start;
        move || {
            let at = next;
            next += size;
            if next % 8192 + size > 8192 {
                next = mix(next) & 0x3f_ffff_e000 | 0xc0_0000_0000;
            }
            at
        }
    }

    #[test]
    fn copies_allocated_one_after_another_take_neighbouring_sets() {
        // What keeps an enqueue's set in the cache lines the last one
        // touched: the next copy's set is the next or the one after.
        let mut alloc = go_heap(0xc000_1000, 24);
        let mut last = None;
        for rev in 1_000..1_100i64 {
            let (set, _) = watch_rev_slot(&WatchRevKey { tgid: 4242, watch_id: 0, rev, event_addr: alloc() });
            if let Some(l) = last {
                assert!((set + STAMP_ENTRIES - l) % STAMP_ENTRIES <= 2 * STAMP_WAYS, "{l} then {set}");
            }
            last = Some(set);
        }
        // Another process with the same addresses starts elsewhere (every
        // Go heap starts at 0xc000000000).
        let k = WatchRevKey { tgid: 4242, watch_id: 0, rev: 1, event_addr: 0xc000_1000 };
        assert_ne!(watch_rev_slot(&k).0, watch_rev_slot(&WatchRevKey { tgid: 4243, ..k }).0);
    }

    /// Puts to 1,000 watches on 50 gRPC streams of 20 (the long soak's
    /// shape: 20 watch ids), every fourth a txn of three events (one slice
    /// of three per watcher, the 80-byte size class) when `txn`, with
    /// `backlog` copies waiting for their send; the copies `place`
    /// pushed out of a ring, and the enqueues.
    fn soak_shape(backlog: usize, txn: bool, place: fn(&WatchRevKey) -> u32) -> (u32, u32) {
        let mut ring = Ring::new();
        let (mut one, mut three) = (go_heap(0xc000_0000, 24), go_heap(0xc080_0000, 80));
        let mut waiting = std::collections::VecDeque::new();
        let (mut pushed_out, mut enqueued) = (0, 0);
        for rev in 1..=2_000i64 {
            for w in 0..1_000i64 {
                let (slice, n) = if txn && rev % 4 == 0 { (three(), 3) } else { (one(), 1) };
                for i in 0..n {
                    let key = WatchRevKey { tgid: 4242, watch_id: w % 20, rev, event_addr: slice + 24 * i };
                    pushed_out += u32::from(ring.insert(place(&key), watch_rev_slot(&key).1).is_some());
                    enqueued += 1;
                    waiting.push_back(key);
                }
            }
            while waiting.len() > backlog {
                let k = waiting.pop_front().expect("waiting");
                if let Some(i) = ring.find(place(&k), &watch_rev_slot(&k).1) {
                    ring.e[i].ts = 0;
                }
            }
        }
        (pushed_out, enqueued)
    }

    #[test]
    fn a_thousand_watches_on_fifty_streams_keep_every_copy() {
        // The last put's copies waiting: none pushed out. Placing copies by
        // watch id put 50 copies in one set (2.3 million of 2.56 million
        // pushed out in the long soak).
        assert_eq!(soak_shape(1_000, true, |k| watch_rev_slot(k).0).0, 0);
    }

    #[test]
    fn copies_by_address_are_pushed_out_no_more_than_at_random() {
        // Backlogs of 3 and 10 puts, with and without txns. Measured (of 2
        // or 3 million enqueues): by page offset 23, 252, 7,319, 13,805;
        // at random 143, 445, 8,607, 15,346; by the unhashed address 0,
        // 505, 24,617, 46,799.
        let random: fn(&WatchRevKey) -> u32 = |k| set_entry(mix(k.event_addr ^ mix(k.tgid)));
        for (backlog, txn) in [(3_000, false), (3_000, true), (10_000, false), (10_000, true)] {
            let (ours, n) = soak_shape(backlog, txn, |k| watch_rev_slot(k).0);
            let (at_random, _) = soak_shape(backlog, txn, random);
            assert!(ours <= at_random, "backlog {backlog}, txn {txn}: {ours} of {n} pushed out, {at_random} at random");
        }
    }

    #[test]
    fn a_revision_of_hundreds_of_events_stays_with_the_backlog_behind_it() {
        // A lease that expires deletes its keys at one revision: one
        // watcher is queued 300 events of revision 100 at once (one slice),
        // then one event per revision for 2,000 revisions, and sends
        // nothing yet (a stalled client). Nothing is pushed out; every copy
        // is found.
        let mut ring = Ring::new();
        let mut copies = Vec::new();
        let key = |rev, addr| WatchRevKey { tgid: 4242, watch_id: 1, rev, event_addr: addr };
        for i in 0..300u64 {
            copies.push(key(100, 0xc000_0000 + 24 * i));
        }
        let mut alloc = go_heap(0xc000_4000, 24);
        for rev in 101..2_101i64 {
            copies.push(key(rev, alloc()));
        }
        for k in &copies {
            let (set, fp) = watch_rev_slot(k);
            assert!(ring.insert(set, fp).is_none(), "{k:?} pushed a copy out");
        }
        assert!(copies.iter().all(|k| {
            let (set, fp) = watch_rev_slot(k);
            ring.find(set, &fp).is_some()
        }));
    }

    #[test]
    fn an_offer_pushed_out_is_no_loss_and_an_etcd_copy_is() {
        // An etcd on a control-plane node shares the enqueue ring with its
        // API server, whose offers to filtering watchers are never removed.
        // An etcd copy landing on a set full of them pushes one out: no
        // loss. A set full of etcd copies waiting for their send: a loss.
        let key = |addr| WatchRevKey { tgid: 4242, watch_id: 9, rev: 77, event_addr: addr };
        let (set, copy) = watch_rev_slot(&key(0xc000_1000));
        let offer = |addr| offer_slot(&key(addr)).1;
        assert!(!pushed_out_a_copy(offer(0xc000_1000)) && pushed_out_a_copy(copy));
        // Offers and copies of one event to one watch id differ by the mark
        // alone, and both fingerprints still tell events apart.
        assert_eq!(copy | OFFER_MARK, offer(0xc000_1000));
        let mut ring = Ring::new();
        for w in 0..u64::from(STAMP_WAYS) {
            assert!(ring.insert(set, offer(0xc100_0000 + 16 * w)).is_none());
        }
        let out = ring.insert(set, copy).expect("the set was full");
        assert!(!pushed_out_a_copy(out), "an offer is no loss");
        for w in 1..u64::from(STAMP_WAYS) {
            ring.insert(set, watch_rev_slot(&key(0xc200_0000 + 16 * w)).1);
        }
        let out = ring.insert(set, offer(0xc300_0000)).expect("the set was full");
        assert!(pushed_out_a_copy(out), "an etcd copy is a loss");
        assert_eq!(out, copy, "the oldest way goes first");
    }

    /// A filtered etcd watcher's copies (keyed by the event's `Kv` pointer,
    /// which every watcher's copy of one event shares) take a set per
    /// watcher, and are marked: the ones its filters drop age out
    /// uncounted. An unfiltered copy of the same event is found elsewhere.
    #[test]
    fn a_filtered_watchers_copies_are_marked_and_placed_per_watcher() {
        let key = |watch_id: i64, addr: u64| WatchRevKey { tgid: 42, watch_id, rev: 7, event_addr: addr };
        let (set_a, fp_a) = filtered_copy_slot(&key(1, 0xc000_2000));
        let (set_b, fp_b) = filtered_copy_slot(&key(2, 0xc000_2000));
        assert!(!pushed_out_a_copy(fp_a) && !pushed_out_a_copy(fp_b));
        assert_ne!(fp_a, fp_b);
        assert_ne!(set_a, set_b, "two watchers' copies of one event share a set");
        let (_, plain) = watch_rev_slot(&key(1, 0xc000_2000));
        assert!(pushed_out_a_copy(plain));
        assert_ne!(plain, fp_a);
    }

    #[test]
    fn members_of_one_cluster_start_far_apart() {
        // Three members with the same revisions (one cluster on one node):
        // their runs of sets begin at distinct, distant offsets.
        let ids = [0x8e9e_05c5_2164_694d_u64, 0x91bc_3c39_8fb3_c146, 0xfd42_2379_fda5_0e66];
        let starts: Vec<i64> = ids.iter().map(|&id| i64::from(rev_entry(&RevKey { id, rev: 0 }))).collect();
        for (i, a) in starts.iter().enumerate() {
            for b in &starts[i + 1..] {
                let d = (a - b).rem_euclid(i64::from(STAMP_ENTRIES));
                let d = d.min(i64::from(STAMP_ENTRIES) - d);
                assert!(d > 1000, "offsets {starts:?}");
            }
        }
    }

    #[test]
    fn watchers_of_one_event_spread_over_sets() {
        // 1000 watchers' copies of one revision: few share a set, and no
        // set gets more than its two ways.
        let mut per_set = std::collections::HashMap::<u32, u32>::new();
        for w in 0..1000u64 {
            let key = WatchRevKey { tgid: 77, watch_id: w as i64, rev: 5, event_addr: 0xc000_1000 + 64 * w };
            *per_set.entry(watch_rev_slot(&key).0).or_default() += 1;
        }
        let crowded = per_set.values().filter(|&&n| n > STAMP_WAYS).count();
        assert!(per_set.len() > 950 && crowded == 0, "{} sets, {crowded} crowded", per_set.len());
    }

    fn rv(s: &str) -> Option<i64> {
        let mut buf = [0u8; RV_DIGITS + 1];
        let n = s.len().min(RV_DIGITS + 1);
        buf[..n].copy_from_slice(&s.as_bytes()[..n]);
        parse_rv(&buf, s.len())
    }

    #[test]
    fn resource_versions_are_decimal_revisions_or_nothing() {
        assert_eq!(rv("1"), Some(1));
        assert_eq!(rv("123456"), Some(123_456));
        assert_eq!(rv("9223372036854775807"), Some(i64::MAX));
        for bad in ["", "9223372036854775808", "99999999999999999999", "12a", "-5", " 1", "1.0"] {
            assert_eq!(rv(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_new_entry_takes_the_first_empty_way_else_the_oldest() {
        assert_eq!(victim_way([0; 4], [0; 4]), 0);
        assert_eq!(victim_way([5, 0, 0, 0], [2, 0, 0, 0]), 1);
        assert_eq!(victim_way([5, 3, 7, 4], [2, 2, 2, 2]), 1);
        assert_eq!(victim_way([3, 5, 7, 4], [2, 2, 2, 2]), 0);
        assert_eq!(victim_way([6, 5, 7, 4], [2, 2, 2, 2]), 3);
        // A removed entry (ts 0) is empty whatever its sequence.
        assert_eq!(victim_way([9, 8, 0, 1], [2, 2, 4, 2]), 2);
    }
}
