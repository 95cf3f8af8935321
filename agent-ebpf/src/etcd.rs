//! etcd's watch path, timed per event in the kernel.
//!
//! Four uprobes, placed by user space at the first instruction after each
//! function's stack-check prologue (so a `morestack` re-entry cannot fire
//! them twice) and configured through `WS_WATCH_CONFIG[cookie]`:
//!
//! - `etcd_notify`   `(*watchableStore).notify(rev, evs)`: commit time per (tgid, rev),
//!   unless `--etcd-notify-probe=false`;
//! - `etcd_enqueue`  `(*watcher).send(wr)`: per-watcher queue time per event copy;
//!   called from `notify` and no probe there, the first watcher's copy of a
//!   revision stamps its commit (one trap per put fewer; a revision that no
//!   watcher received at its commit then has no stamp);
//! - `etcd_send`     `(*watchWatchServer).Send(m)`: gRPC send, per event;
//! - `etcd_dispatch` clientv3 `(*watchGrpcStream).dispatchEvent(pbresp)`: client side.
//!
//! And a Kubernetes API server's half of the path, behind its etcd client:
//!
//! - `kube_cache`   `(*watchCache).processEvent(event, resourceVersion, ...)`: the watch cache takes the event;
//! - `kube_queue`   `(*cacheWatcher).nonblockingAdd(event)`: the event is offered to one watcher's queue;
//! - `kube_watcher` `(*cacheWatcher).markBookmarkAfterRvSent(event)`: it is in that watcher's result
//!   channel (called only after the channel send succeeded).
//!
//! An API server never sees etcd's commit, only revisions. Its own etcd
//! client (`etcd_dispatch`, same process) knows both the member and the
//! revision, so it republishes the commit time under (its tgid, revision),
//! where the API server's stages find it.
//!
//! Each event is timed by its own `kv.ModRevision`, not the response header's
//! revision, so catch-up responses that batch several revisions still join.
//! Latencies go straight into in-kernel histograms; nothing per event crosses
//! to user space unless a recorder switched the record stream on.

use core::ffi::c_void;

use agent_common::{
    Counter, Histogram,
    counters::Ring,
    jsonscan::{Frame, FrameScan, SCAN_MAX},
    watch::{
        ARG_NONE, EarlyHandler, MAX_DELTAS_PER_POP, MAX_EVENTS_PER_RESPONSE, MAX_SLOTS, ObjKey, ObjStamp, Pending,
        REV_PENDING, REV_UNREADABLE, RV_DIGITS, RevKey, STAMP_ENTRIES, SentObj, Side, Stage, StageExemplar, Stamp,
        WatchProbeConfig, WatchRecord, WatchRevKey, events_index, filtered_copy_slot, guard_taken, hist_index,
        offer_slot, parse_rv, pushed_out_a_copy, rev_entry, watch_rev_slot,
    },
};
use aya_ebpf::{
    EbpfContext,
    bindings::BPF_NOEXIST,
    helpers::{
        bpf_get_attach_cookie, bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_loop, bpf_probe_read_user,
        bpf_probe_read_user_buf,
    },
    macros::{map, uprobe},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
    programs::ProbeContext,
};

use crate::{
    maps::{add, count, current_slot, observe, record_on, submit_record},
    regs::{G_SLOT, arg, entry_return_address, flags, instruction_pointer, read_u64, reg},
    stamps::{self, Inserted},
};

/// Per-attach configuration, indexed by the attach cookie.
#[map(name = "WS_WATCH_CONFIG")]
static CONFIG: Array<WatchProbeConfig> = Array::with_max_entries(256, 0);

/// Commit (notify) time per (tgid, revision). A ring of 32 Ki revisions
/// per process: at 10,000 commits/s a watcher may lag 3 s before its
/// events count as misses.
#[map(name = "WS_NOTIFY_TS")]
static NOTIFY_TS: Array<Stamp<RevKey>> = Array::with_max_entries(STAMP_ENTRIES, 0);

/// Commit time per (member id, revision), for clients on this node: the
/// server publishes it at gRPC send, when it knows its member id.
#[map(name = "WS_COMMIT_TS")]
static COMMIT_TS: Array<Stamp<RevKey>> = Array::with_max_entries(STAMP_ENTRIES, 0);

/// Enqueue time of each watcher's copy of each event, until it is sent,
/// by the fingerprint of its key (`watch_rev_slot`).
#[map(name = "WS_ENQ_TS")]
static ENQ_TS: Array<Stamp<u64>> = Array::with_max_entries(STAMP_ENTRIES, 0);

/// Stage histograms, indexed by `hist_index(slot, stage)`.
#[map(name = "WS_WATCH_HIST")]
static WATCH_HIST: Array<Histogram> = Array::with_max_entries(MAX_SLOTS * Stage::COUNT, 0);

/// The slowest observation per stage histogram in the current exemplar
/// interval (same index as `WATCH_HIST`).
#[map(name = "WS_WATCH_EXEMPLAR")]
static EXEMPLARS: Array<StageExemplar> = Array::with_max_entries(MAX_SLOTS * Stage::COUNT, 0);

/// The current exemplar interval; user space bumps it to close one.
#[map(name = "WS_EXEMPLAR_EPOCH")]
static EXEMPLAR_EPOCH: Array<u64> = Array::with_max_entries(1, 0);

/// No watcher to name in an exemplar.
const NO_WATCHER: (u64, u64) = (0, 0);

/// An API server's watcher (`*cacheWatcher`) to name in an exemplar.
#[inline(always)]
fn cache_watcher(watcher: u64) -> (u64, u64) {
    (watcher, StageExemplar::CACHE_WATCHER)
}

/// Adds one stage duration of revision `rev`'s event, which ended at `at`,
/// to its histogram, and keeps it as the stage's exemplar when it is the
/// slowest of the interval. `watcher`: (id, `StageExemplar` flag).
#[inline(always)]
fn observe_stage(slot: u32, stage: Stage, ns: u64, rev: i64, watcher: (u64, u64), at: u64) {
    let idx = hist_index(slot, stage);
    observe(&WATCH_HIST, idx, ns);
    if rev < 0 {
        return;
    }
    let epoch = EXEMPLAR_EPOCH.get(0).copied().unwrap_or(0);
    let Some(e) = EXEMPLARS.get_ptr_mut(idx) else { return };
    // SAFETY: a value of the map, valid for the program's run. Volatile
    // stores keep `check` cleared before the fields and set after them.
    unsafe {
        if (*e).check != 0 && (*e).epoch == epoch && ns <= (*e).ns {
            return;
        }
        core::ptr::write_volatile(&raw mut (*e).check, 0);
        (*e).epoch = epoch;
        (*e).ns = ns;
        (*e).rev = rev;
        (*e).watcher = watcher.0;
        (*e).at_ns = at;
        (*e).flags = watcher.1;
        let sum = StageExemplar::checksum(epoch, ns, rev, watcher.0, at, watcher.1);
        core::ptr::write_volatile(&raw mut (*e).check, sum);
    }
}

/// Watch events counted per (slot, side).
#[map(name = "WS_WATCH_EVENTS")]
static WATCH_EVENTS: Array<u64> = Array::with_max_entries(MAX_SLOTS * Side::COUNT, 0);

/// Progress notifications (responses without events that neither create,
/// cancel nor compact a watch) per (slot, side): never watch events.
#[map(name = "WS_WATCH_PROGRESS")]
static WATCH_PROGRESS: Array<u64> = Array::with_max_entries(MAX_SLOTS * Side::COUNT, 0);

/// Per-event records for `watchscope record`; histograms never depend on it.
#[map(name = "WS_WATCH_RECORDS")]
static RECORDS: RingBuf = RingBuf::with_byte_size(Ring::Watch.bytes(), 0);

/// What every watch probe starts from: who is running, and how to read.
struct Call {
    tgid: u32,
    slot: u32,
    now: u64,
    /// The attachment's configuration, in place in its map (a copy would
    /// take stack the per-event loops need: the verifier allows 512 bytes
    /// for a program and its callback together).
    cfg: &'static WatchProbeConfig,
}

#[inline(always)]
fn begin(ctx: &ProbeContext) -> Option<Call> {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    // First: is this process watched at all? Unwatched processes that run a
    // probed binary pay only this lookup.
    let slot = current_slot(tgid)?;
    // SAFETY: the helper reads the cookie of the current attachment.
    let cookie = unsafe { bpf_get_attach_cookie(ctx.as_ptr()) } as u32;
    let cfg = CONFIG.get(cookie)?;
    // On a stack-check jump: skip the pass that goes to morestack (the
    // function re-enters and this probe fires again).
    // SAFETY: the probe's own register context.
    if guard_taken(cfg.guard, flags(unsafe { &*ctx.regs })) {
        return None;
    }
    // SAFETY: no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    Some(Call { tgid, slot, now, cfg })
}

/// Keeps the first time seen for (id, rev).
#[inline(always)]
fn insert_first(ring: &Array<Stamp<RevKey>>, key: &RevKey, ts: u64) {
    let _ = stamps::insert_first(ring, rev_entry(key), key, ts);
}

/// The time stored for (id, rev).
#[inline(always)]
fn stamp_of(ring: &Array<Stamp<RevKey>>, key: &RevKey) -> Option<u64> {
    stamps::find(ring, rev_entry(key), key).map(|(_, ts)| ts)
}

#[inline(always)]
fn emit(rec: WatchRecord) {
    if let Some(mut e) = RECORDS.reserve::<WatchRecord>(0) {
        e.write(rec);
        submit_record(e, &RECORDS, Ring::Watch);
    } else {
        count(Counter::EventsRingbufFull);
    }
}

/// A Kubernetes hop's record (for `watchscope record`'s chains): joined
/// there by revision alone, as the API server and its clients know it.
/// `enqueue_ns` holds the hop's per-hop start: the watch cache's time for
/// a result channel or a write, the decode for a pop, the pop for a
/// handler.
#[inline(always)]
fn emit_hop(rec: WatchRecord) {
    if record_on() {
        emit(WatchRecord { member: NODE_CLUSTER, ..rec });
    }
}

/// A hop's record without goroutine, watcher or per-hop start.
#[inline(always)]
fn hop(side: Side, tgid: u32, rev: i64, commit_ns: u64, at_ns: u64) -> WatchRecord {
    WatchRecord { side: side as u32, tgid, rev, commit_ns, at_ns, ..WatchRecord::default() }
}

/// Event `i` of a slice: its address, its `Kv` pointer and its
/// `kv.ModRevision`.
#[inline(always)]
fn event_at(l: &EventLayout, base: u64, i: u32) -> Option<EventAt> {
    let mut ev = base.wrapping_add(i as u64 * l.stride as u64);
    if l.indirect != 0 {
        ev = read_u64(ev)?;
    }
    let kv = read_u64(ev.wrapping_add(l.kv_off as u64))?;
    let rev = read_u64(kv.wrapping_add(l.mod_rev_off as u64))? as i64;
    Some(EventAt { addr: ev, kv, rev })
}

struct EventAt {
    addr: u64,
    kv: u64,
    rev: i64,
}

/// Where the enqueue ring keeps a watcher's copy of an event: by the
/// event's address, or by its `Kv` pointer for a watcher with filters
/// (whose queued slice is a new one: see `filtered_copy_slot`).
#[inline(always)]
fn copy_slot(tgid: u32, watch_id: i64, e: &EventAt, filtered: bool) -> (u32, u64) {
    if filtered {
        filtered_copy_slot(&WatchRevKey { tgid: tgid as u64, watch_id, rev: e.rev, event_addr: e.kv })
    } else {
        watch_rev_slot(&WatchRevKey { tgid: tgid as u64, watch_id, rev: e.rev, event_addr: e.addr })
    }
}

/// What the per-event callbacks read of an attachment's configuration:
/// 20 bytes of its 152, so the loop state leaves stack for the rest (the
/// verifier allows 512 bytes for a probe and its callback together).
#[repr(C)]
#[derive(Clone, Copy)]
struct EventLayout {
    stride: u32,
    indirect: u32,
    kv_off: u32,
    mod_rev_off: u32,
    publish_commit: u32,
}

impl EventLayout {
    #[inline(always)]
    fn of(cfg: &WatchProbeConfig) -> Self {
        EventLayout {
            stride: cfg.event_stride,
            indirect: cfg.events_indirect,
            kv_off: cfg.event_kv_off,
            mod_rev_off: cfg.kv_mod_rev_off,
            publish_commit: cfg.publish_commit,
        }
    }
}

#[uprobe]
pub fn etcd_notify(ctx: ProbeContext) -> u32 {
    let _ = try_notify(&ctx);
    0
}

#[inline(always)]
fn try_notify(ctx: &ProbeContext) -> Option<()> {
    let c = begin(ctx)?;
    let rev = arg(ctx, &c.cfg.args[0])? as i64;
    insert_first(&NOTIFY_TS, &RevKey { id: c.tgid as u64, rev }, c.now);
    Some(())
}

/// State shared by a probe and its per-event `bpf_loop` callback. The
/// callback's work is verified once, whatever the number of events (see
/// [`Callback`]); an unrolled or bounded loop of map updates and histogram
/// math exceeds the verifier's budget after a few dozen events.
#[repr(C)]
struct EventLoop {
    tgid: u32,
    slot: u32,
    now: u64,
    layout: EventLayout,
    /// Start of the events slice.
    events: u64,
    member: u64,
    watch_id: i64,
    recording: u32,
    /// 1 on an enqueue from etcd's commit fan-out when the agent does not
    /// probe the fan-out itself: the first watcher's enqueue of a revision
    /// stamps its commit.
    fanout: u32,
    /// 1 on an enqueue to a watcher with filters (see `copy_slot`).
    filtered: u32,
    /// Events processed.
    n: u64,
    /// The goroutine running the probe (for records).
    g: u64,
}

impl EventLoop {
    /// The watch an exemplar of this response's events names.
    #[inline(always)]
    fn watcher(&self) -> (u64, u64) {
        (self.watch_id as u64, StageExemplar::WATCH_ID)
    }

    /// Counts one more event of a response and starts its record.
    #[inline(always)]
    fn next_record(&mut self, side: Side, rev: i64) -> WatchRecord {
        self.n += 1;
        WatchRecord {
            side: side as u32,
            tgid: self.tgid,
            member: self.member,
            rev,
            watch_id: self.watch_id,
            at_ns: self.now,
            g: self.g,
            ..WatchRecord::default()
        }
    }
}

/// A `bpf_loop` callback: `(index, the caller's loop state)`.
///
/// Each callback only hands its arguments to a global function (`ws_*`,
/// `#[no_mangle]`: global linkage in the object's BTF) that does the work.
/// The verifier checks a global function once, on its own, with its
/// pointer argument as possibly null memory of the pointee's size; the
/// body of a static callback it re-verifies for every loop state it
/// cannot prove equal to one already seen. On Linux 6.18.44 that took
/// `etcd_send` and `etcd_dispatch` past the 1,000,000-instruction limit
/// (they loaded on the kernels before), `informer_process` to 732,000 and
/// `etcd_enqueue` to 341,000; with global functions the four take 7,700 to
/// 16,300 (`/debug/probes` lists every program's figure, and a test keeps
/// each under a quarter of the limit). The state pointer is the caller's
/// stack struct (the kernel passes back what `bpf_loop` was given); the
/// null check is for the verifier.
type Callback = unsafe extern "C" fn(u64, *mut c_void) -> i64;

/// Runs `cb` over `len` events (at most MAX_EVENTS_PER_RESPONSE; the rest
/// are counted) and adds the processed count to `side`'s event counter.
#[inline(always)]
fn for_each_event(state: &mut EventLoop, len: u64, cb: Callback, side: Option<Side>) {
    let cap = MAX_EVENTS_PER_RESPONSE as u64;
    let n = if len > cap { cap } else { len };
    // SAFETY: the callback only touches `state` through the pointer the
    // kernel passes back, during this call.
    unsafe { bpf_loop(n as u32, cb as *mut c_void, (state as *mut EventLoop).cast(), 0) };
    let over = len.saturating_sub(cap);
    if over > 0 {
        add_counter(Counter::EventsOverCap, over);
    }
    if let Some(side) = side {
        // Events over the cap are still events: counted, just not timed.
        add(&WATCH_EVENTS, events_index(state.slot, side), state.n + over);
    }
}

#[uprobe]
pub fn etcd_enqueue(ctx: ProbeContext) -> u32 {
    let _ = try_enqueue(&ctx);
    0
}

#[inline(always)]
fn try_enqueue(ctx: &ProbeContext) -> Option<()> {
    let c = begin(ctx)?;
    let watch_id = arg(ctx, &c.cfg.args[0])? as i64;
    let events = arg(ctx, &c.cfg.args[1])?;
    let len = arg(ctx, &c.cfg.args[2])?;
    // Catch-up and retry sends (not from the fan-out) carry revisions
    // committed earlier: they only look their commit up.
    let fanout = c.cfg.caller_hi != 0 && called_from_caller(ctx, c.cfg).unwrap_or(false);
    let filtered = has_filters(ctx, c.cfg);
    let mut st = EventLoop {
        tgid: c.tgid,
        slot: c.slot,
        now: c.now,
        layout: EventLayout::of(c.cfg),
        events,
        member: 0,
        watch_id,
        recording: 0,
        fanout: u32::from(fanout),
        filtered: u32::from(filtered),
        n: 0,
        g: 0,
    };
    for_each_event(&mut st, len, enqueue_event, None);
    Some(())
}

/// Whether the watcher (`args[3]`) has filters (`len(w.fcs) != 0`). Not
/// known (no offset for this binary, a failed read): taken as none, and
/// the copies of a filtered watcher then miss at their send, counted.
#[inline(always)]
fn has_filters(ctx: &ProbeContext, cfg: &WatchProbeConfig) -> bool {
    if cfg.watcher_fcs_len_off == 0 {
        return false;
    }
    let Some(w) = arg(ctx, &cfg.args[3]) else { return false };
    read_u64(w.wrapping_add(cfg.watcher_fcs_len_off as u64)).is_some_and(|n| n != 0)
}

#[inline(never)]
unsafe extern "C" fn enqueue_event(i: u64, ctx: *mut c_void) -> i64 {
    ws_enqueue_event(ctx.cast(), i);
    // 0: go on. The verifier knows nothing of a global function's result,
    // and a callback's must be 0 or 1.
    0
}

/// One iteration of [`enqueue_event`]'s loop (a global function: see [`Callback`]).
#[unsafe(no_mangle)]
#[inline(never)]
extern "C" fn ws_enqueue_event(st: *mut EventLoop, i: u64) -> i64 {
    // SAFETY: see Callback.
    let Some(st) = (unsafe { st.as_mut() }) else { return 0 };
    let Some(e) = event_at(&st.layout, st.events, i as u32) else { return 0 };
    let rev = e.rev;
    st.n += 1;
    // A retry of a queue-full watcher (a "victim") is the same copy: keep
    // the first time, time it once.
    let (set, fp) = copy_slot(st.tgid, st.watch_id, &e, st.filtered != 0);
    let inserted = stamps::insert_first(&ENQ_TS, set, &fp, st.now);
    count_copy_pushed_out(&inserted);
    if !matches!(inserted, Some(Inserted::New | Inserted::Evicted(_))) {
        return 0;
    }
    let commit = RevKey { id: st.tgid as u64, rev };
    let first = if st.fanout != 0 {
        stamps::first_time(&NOTIFY_TS, rev_entry(&commit), &commit, st.now)
    } else if st.filtered != 0 {
        None
    } else {
        stamp_of(&NOTIFY_TS, &commit)
    };
    if st.filtered != 0 {
        // Its filters may drop this copy: its wait is timed at its send,
        // if it is sent, so the stage counts what the watcher got (the
        // fan-out's first enqueue still stamps the commit, above).
        return 0;
    }
    match first {
        Some(t) => observe_stage(st.slot, Stage::CommitToEnqueue, st.now.saturating_sub(t), rev, st.watcher(), st.now),
        None => count(Counter::EnqueueCommitMiss),
    }
    0
}

/// Counts an etcd copy that an insert into the enqueue ring (etcd's or an
/// API server's) pushed out while live: a send that will miss. An offer
/// pushed out may have been left to age out (`OFFER_MARK`): no loss.
#[inline(always)]
fn count_copy_pushed_out(inserted: &Option<Inserted<u64>>) {
    if let Some(Inserted::Evicted(out)) = inserted
        && pushed_out_a_copy(*out)
    {
        count(Counter::MapFull);
    }
}

#[inline(always)]
fn add_counter(c: Counter, n: u64) {
    add(&crate::maps::COUNTERS, c as u32, n);
}

/// The parts of an etcdserverpb.WatchResponse both send and dispatch read.
struct Response {
    member: u64,
    watch_id: i64,
    events: u64,
    len: u64,
}

/// The words of a WatchResponse the probes read at once: every field they
/// use lies in its first 12 words on the identified layouts (header 0,
/// watch id 8, created and canceled 16 and 17, compact revision 24, the
/// events slice 56..80). One `bpf_probe_read_user` instead of five to seven:
/// each is a helper call that copies with page faults disabled, and these
/// run on every response etcd sends and every client dispatches. A field
/// outside them (a layout with more fields in front) is read on its own.
const RESP_WORDS: usize = 12;

/// Where a probe reads a response's first words: a per-CPU scratch value,
/// not the stack, which the per-event loops' state already nearly fills
/// (the verifier allows 512 bytes).
#[map(name = "WS_RESP_HEAD")]
static RESP_HEAD: PerCpuArray<[u64; RESP_WORDS]> = PerCpuArray::with_max_entries(1, 0);

/// A response's first words, when they can be read in one go (a response
/// at the very end of a mapping cannot: its fields are then read one by
/// one, as before).
struct RespHead {
    m: u64,
    words: Option<*const [u64; RESP_WORDS]>,
}

impl RespHead {
    #[inline(always)]
    fn read(m: u64) -> Self {
        let words = RESP_HEAD.get_ptr_mut(0).and_then(|w| {
            // SAFETY: bpf_probe_read_user_buf faults safely on bad source
            // addresses; `w` is this CPU's scratch value, valid for the run
            // (a probe runs to its end on one CPU).
            let buf = unsafe { core::slice::from_raw_parts_mut(w.cast::<u8>(), RESP_WORDS * 8) };
            unsafe { bpf_probe_read_user_buf(m as *const u8, buf) }.ok().map(|()| w.cast_const())
        });
        RespHead { m, words }
    }

    /// The u64 at byte offset `off`: from the head when it lies inside,
    /// else read alone. (The bound is on the byte offset itself: the
    /// verifier must see every 8-byte read end inside the value.)
    #[inline(always)]
    fn u64_at(&self, off: u32) -> Option<u64> {
        if let Some(w) = self.words
            && off <= (RESP_WORDS as u32 - 1) * 8
        {
            // SAFETY: inside the scratch value read above.
            return Some(unsafe { w.cast::<u8>().add(off as usize).cast::<u64>().read_unaligned() });
        }
        read_u64(self.m.wrapping_add(off as u64))
    }

    /// The byte at offset `off`.
    #[inline(always)]
    fn u8_at(&self, off: u32) -> Option<u8> {
        if let Some(w) = self.words
            && off < RESP_WORDS as u32 * 8
        {
            // SAFETY: inside the scratch value read above.
            return Some(unsafe { *w.cast::<u8>().add(off as usize) });
        }
        // SAFETY: bpf_probe_read_user faults safely on bad addresses.
        unsafe { bpf_probe_read_user(self.m.wrapping_add(off as u64) as *const u8) }.ok()
    }
}

/// Whether a response without events is a progress notification: etcd's
/// periodic ones and the answers to progress requests (which the API server
/// sends every 100 ms while a read waits for its cache) carry neither the
/// created nor the canceled flag nor a compact revision.
#[inline(always)]
fn is_progress(cfg: &WatchProbeConfig, head: &RespHead) -> bool {
    let (Some(created), Some(canceled), Some(compact)) =
        (head.u8_at(cfg.resp_created_off), head.u8_at(cfg.resp_canceled_off), head.u64_at(cfg.resp_compact_rev_off))
    else {
        return false;
    };
    created == 0 && canceled == 0 && compact == 0
}

#[inline(always)]
fn response(cfg: &WatchProbeConfig, head: &RespHead) -> Option<Response> {
    let header = head.u64_at(cfg.resp_header_off)?;
    let member = if header == 0 { 0 } else { read_u64(header.wrapping_add(cfg.hdr_member_off as u64))? };
    Some(Response {
        member,
        watch_id: head.u64_at(cfg.resp_watch_id_off)? as i64,
        events: head.u64_at(cfg.resp_events_off)?,
        len: head.u64_at(cfg.resp_events_off + 8)?,
    })
}

/// The per-event loop state of a Send or dispatchEvent call, and its event
/// count; a response without events is counted as progress (or not at
/// all) here and gives `None`.
#[inline(always)]
fn response_loop(ctx: &ProbeContext, side: Side) -> Option<(EventLoop, u64)> {
    let c = begin(ctx)?;
    let head = RespHead::read(arg(ctx, &c.cfg.args[0])?);
    let r = response(c.cfg, &head)?;
    if r.len == 0 {
        if is_progress(c.cfg, &head) {
            add(&WATCH_PROGRESS, events_index(c.slot, side), 1);
        }
        return None;
    }
    let st = EventLoop {
        tgid: c.tgid,
        slot: c.slot,
        now: c.now,
        layout: EventLayout::of(c.cfg),
        events: r.events,
        member: r.member,
        watch_id: r.watch_id,
        recording: record_on() as u32,
        fanout: 0,
        filtered: 0,
        n: 0,
        // SAFETY: the probe's own register context. Records of a stack-ABI
        // binary carry no goroutine (0), never a scratch register's value.
        g: if c.cfg.g_in_reg != 0 { reg(unsafe { &*ctx.regs }, G_SLOT).unwrap_or(0) } else { 0 },
    };
    Some((st, r.len))
}

#[uprobe]
pub fn etcd_send(ctx: ProbeContext) -> u32 {
    if let Some((mut st, len)) = response_loop(&ctx, Side::Server) {
        for_each_event(&mut st, len, send_event, Some(Side::Server));
    }
    0
}

#[inline(never)]
unsafe extern "C" fn send_event(i: u64, ctx: *mut c_void) -> i64 {
    ws_send_event(ctx.cast(), i);
    // 0: go on. The verifier knows nothing of a global function's result,
    // and a callback's must be 0 or 1.
    0
}

/// One iteration of [`send_event`]'s loop (a global function: see [`Callback`]).
#[unsafe(no_mangle)]
#[inline(never)]
extern "C" fn ws_send_event(st: *mut EventLoop, i: u64) -> i64 {
    // SAFETY: see Callback.
    let Some(st) = (unsafe { st.as_mut() }) else { return 0 };
    let Some(e) = event_at(&st.layout, st.events, i as u32) else { return 0 };
    let rev = e.rev;
    let mut rec = st.next_record(Side::Server, rev);
    let commit = stamp_of(&NOTIFY_TS, &RevKey { id: st.tgid as u64, rev });
    match commit {
        Some(t) => {
            observe_stage(st.slot, Stage::CommitToSend, st.now.saturating_sub(t), rev, st.watcher(), st.now);
            // Publish the commit time for clients on this node.
            insert_first(&COMMIT_TS, &RevKey { id: st.member, rev }, t);
            rec.commit_ns = t;
        }
        None => count(Counter::SendCommitMiss),
    }
    // The send does not know whether the watcher had filters: the copy
    // is looked for as an unfiltered one, then as a filtered one.
    let (set, fp) = copy_slot(st.tgid, st.watch_id, &e, false);
    let (found, filtered) = match stamps::find(&ENQ_TS, set, &fp) {
        Some(f) => (Some(f), false),
        None => (find_filtered_copy(st.tgid, st.watch_id, e.kv, rev), true),
    };
    match found {
        Some((idx, t)) => {
            observe_stage(st.slot, Stage::EnqueueToSend, st.now.saturating_sub(t), rev, st.watcher(), st.now);
            // Each watcher's copy is sent once: free the entry now.
            stamps::remove(&ENQ_TS, idx);
            rec.enqueue_ns = t;
            if filtered {
                // A filtered watcher's wait for its queue, timed now that
                // its filters kept the copy (see ws_enqueue_event).
                match commit {
                    Some(c) => {
                        observe_stage(st.slot, Stage::CommitToEnqueue, t.saturating_sub(c), rev, st.watcher(), t)
                    }
                    None => count(Counter::EnqueueCommitMiss),
                }
            }
        }
        None => count(Counter::SendEnqueueMiss),
    }
    if st.recording != 0 {
        emit(rec);
    }
    0
}

/// A filtered watcher's copy of an event (see `copy_slot`): the index of
/// its entry and its time. Out of line: only a send that found no
/// unfiltered copy runs it.
#[inline(never)]
fn find_filtered_copy(tgid: u32, watch_id: i64, kv: u64, rev: i64) -> Option<(u32, u64)> {
    let (set, fp) = filtered_copy_slot(&WatchRevKey { tgid: tgid as u64, watch_id, rev, event_addr: kv });
    stamps::find(&ENQ_TS, set, &fp)
}

#[uprobe]
pub fn etcd_dispatch(ctx: ProbeContext) -> u32 {
    if let Some((mut st, len)) = response_loop(&ctx, Side::Client) {
        for_each_event(&mut st, len, dispatch_event, Some(Side::Client));
    }
    0
}

#[inline(never)]
unsafe extern "C" fn dispatch_event(i: u64, ctx: *mut c_void) -> i64 {
    ws_dispatch_event(ctx.cast(), i);
    // 0: go on. The verifier knows nothing of a global function's result,
    // and a callback's must be 0 or 1.
    0
}

/// One event of [`dispatch_event`]'s loop (a global function: see [`Callback`]).
#[unsafe(no_mangle)]
#[inline(never)]
extern "C" fn ws_dispatch_event(st: *mut EventLoop, i: u64) -> i64 {
    // SAFETY: see Callback.
    let Some(st) = (unsafe { st.as_mut() }) else { return 0 };
    let Some(EventAt { rev, .. }) = event_at(&st.layout, st.events, i as u32) else { return 0 };
    let mut rec = st.next_record(Side::Client, rev);
    match stamp_of(&COMMIT_TS, &RevKey { id: st.member, rev }) {
        Some(t) => {
            observe_stage(st.slot, Stage::CommitToDispatch, st.now.saturating_sub(t), rev, st.watcher(), st.now);
            // For the stages later in this process (a Kubernetes API
            // server's watch cache), which know the revision only. Only
            // there: every other client's entries would crowd the ring.
            if st.layout.publish_commit != 0 {
                insert_first(&NOTIFY_TS, &RevKey { id: st.tgid as u64, rev }, t);
            }
            rec.commit_ns = t;
        }
        None => count(Counter::DispatchCommitMiss),
    }
    if st.recording != 0 {
        emit(rec);
    }
    0
}

// ---- a Kubernetes API server behind its etcd client ---------------------------

/// The key under which an API server keeps its watch cache's time for a
/// revision, in the same ring as commit times: a tgid is 32 bits, so the
/// high bit keeps the two kinds of entry apart.
#[inline(always)]
fn cache_key(tgid: u32, rev: i64) -> RevKey {
    RevKey { id: (1u64 << 32) | tgid as u64, rev }
}

#[uprobe]
pub fn kube_cache(ctx: ProbeContext) -> u32 {
    let _ = try_kube_cache(&ctx);
    0
}

#[inline(always)]
fn try_kube_cache(ctx: &ProbeContext) -> Option<()> {
    let c = begin(ctx)?;
    let rev = arg(ctx, &c.cfg.args[0])? as i64;
    add(&WATCH_EVENTS, events_index(c.slot, Side::ApiserverCache), 1);
    let commit = stamp_of(&NOTIFY_TS, &RevKey { id: c.tgid as u64, rev });
    match commit {
        Some(t) => {
            observe_stage(c.slot, Stage::CommitToCache, c.now.saturating_sub(t), rev, NO_WATCHER, c.now);
            // For the API server's clients on this node (operators,
            // kubectl), which know only the revision.
            insert_first(&COMMIT_TS, &RevKey { id: NODE_CLUSTER, rev }, t);
        }
        None => count(Counter::CacheCommitMiss),
    }
    insert_first(&NOTIFY_TS, &cache_key(c.tgid, rev), c.now);
    emit_hop(hop(Side::ApiserverCache, c.tgid, rev, commit.unwrap_or(0), c.now));
    Some(())
}

/// The member id under which an API server publishes commit times for its
/// clients, in the ring of commit times per (member, revision): no etcd
/// member has id 0. One Kubernetes cluster per node is assumed here: two
/// API servers of different clusters on one node would publish the same
/// revisions, and the first commit time would win.
const NODE_CLUSTER: u64 = 0;

/// What the watcher probes read of a `watchCacheEvent`.
struct CacheEvent {
    rev: i64,
    /// A DELETED event: its watchers are sent `PrevObject`, not `Object`.
    deleted: bool,
}

/// A `watchCacheEvent`'s revision and kind, or `None` for a BOOKMARK (the
/// cacher's progress events: `watch.Bookmark` is the only 8-byte type
/// starting with 'B', MODIFIED the other 8-byte one; DELETED the only
/// 7-byte one starting with 'D').
#[inline(always)]
fn cache_event(cfg: &WatchProbeConfig, ev: u64) -> Option<Option<CacheEvent>> {
    let ty = read_u64(ev.wrapping_add(cfg.cache_event_type_off as u64))?;
    let ty_len = read_u64(ev.wrapping_add(cfg.cache_event_type_off as u64 + 8))?;
    // SAFETY: bpf_probe_read_user faults safely on bad addresses.
    let first = match unsafe { bpf_probe_read_user(ty as *const u8) } {
        Ok(b) => b,
        Err(_) => {
            count(Counter::ReadError);
            return None;
        }
    };
    if ty_len == 8 && first == b'B' {
        return Some(None);
    }
    let rev = read_u64(ev.wrapping_add(cfg.cache_event_rv_off as u64))? as i64;
    Some(Some(CacheEvent { rev, deleted: ty_len == 7 && first == b'D' }))
}

/// (watcher, event) as a key of the per-watcher queue ring: a cacheWatcher
/// pointer in place of etcd's watch id, the `*watchCacheEvent` (shared by
/// every watcher of one event) as the address.
#[inline(always)]
fn queue_key(tgid: u32, watcher: u64, rev: i64, ev: u64) -> WatchRevKey {
    WatchRevKey { tgid: tgid as u64, watch_id: watcher as i64, rev, event_addr: ev }
}

#[uprobe]
pub fn kube_queue(ctx: ProbeContext) -> u32 {
    let _ = try_kube_queue(&ctx);
    0
}

#[inline(always)]
fn try_kube_queue(ctx: &ProbeContext) -> Option<()> {
    let c = begin(ctx)?;
    let watcher = arg(ctx, &c.cfg.args[0])?;
    let ev = arg(ctx, &c.cfg.args[1])?;
    let e = cache_event(c.cfg, ev)??;
    // The first offer wins: `add` offers again (and then blocks) when the
    // queue was full. Offers are marked in the ring (`OFFER_MARK`): events a
    // watcher's filter rejects never reach its result channel, so their
    // entries are left to age out, and pushing one out is no loss; pushing
    // out an etcd copy (the same ring, on a control-plane node) is.
    let (set, fp) = offer_slot(&queue_key(c.tgid, watcher, e.rev, ev));
    let inserted = stamps::insert_first(&ENQ_TS, set, &fp, c.now);
    count_copy_pushed_out(&inserted);
    if matches!(inserted, Some(Inserted::New | Inserted::Evicted(_))) {
        add(&WATCH_EVENTS, events_index(c.slot, Side::ApiserverOffered), 1);
        emit_hop(WatchRecord { watch_id: watcher as i64, ..hop(Side::ApiserverOffered, c.tgid, e.rev, 0, c.now) });
    }
    if c.cfg.publish_sent != 0 {
        publish_sent(&c, ev, &e);
    }
    Some(())
}

/// Objects the cacher dispatched, by (API server, object): the object the
/// watch handler will write, so its write is joined to the event's
/// revision. Published at the queue offer (before the watcher's goroutine
/// can take the event, so the writer never races ahead of it); every
/// watcher of an event shares the object, so only the first offer writes.
/// The handler's write checks the interface's type word too: a deep copy
/// (an event replayed from the cache's history, a bookmark) that the
/// allocator put at a freed object's address is another type's, never a
/// `cachingObject`'s. LRU: an object no watcher writes ages out.
#[map(name = "WS_KUBE_SENT")]
static KUBE_SENT: LruHashMap<ObjKey, SentObj> = LruHashMap::with_max_entries(16384, 0);

/// Watch handlers (by process and goroutine) that started writing a
/// dispatched event: its revision, until the write returns.
#[map(name = "WS_KUBE_WRITING")]
static KUBE_WRITING: LruHashMap<ObjKey, i64> = LruHashMap::with_max_entries(16384, 0);

#[inline(always)]
fn publish_sent(c: &Call, ev: u64, e: &CacheEvent) -> Option<()> {
    let off = if e.deleted { c.cfg.cache_event_prev_off } else { c.cfg.cache_event_obj_off } as u64;
    let itab = read_u64(ev.wrapping_add(off))?;
    let obj = read_u64(ev.wrapping_add(off + 8))?;
    if obj == 0 {
        return None;
    }
    let key = ObjKey { tgid: c.tgid as u64, obj };
    let sent = SentObj { itab, rev: e.rev };
    // SAFETY: the value is copied out at once.
    if unsafe { KUBE_SENT.get(key) }.copied() != Some(sent) && KUBE_SENT.insert(key, sent, 0).is_err() {
        count(Counter::MapFull);
    }
    Some(())
}

/// The watch handler starts encoding an event for its client
/// (`watchEncoder.Encode(event)`, on the handler's goroutine).
#[uprobe]
pub fn kube_encode(ctx: ProbeContext) -> u32 {
    let _ = try_kube_encode(&ctx);
    0
}

#[inline(always)]
fn try_kube_encode(ctx: &ProbeContext) -> Option<()> {
    let c = begin(ctx)?;
    let g = goroutine(ctx, c.cfg)?;
    let key = ObjKey { tgid: c.tgid as u64, obj: g };
    // Whatever this goroutine encoded before is over (an encode that
    // failed ended the watch without a write).
    let _ = KUBE_WRITING.remove(key);
    let itab = arg(ctx, &c.cfg.args[0])?;
    let obj = arg(ctx, &c.cfg.args[1])?;
    // SAFETY: the value is copied out at once.
    let sent = (unsafe { KUBE_SENT.get(ObjKey { tgid: c.tgid as u64, obj }) }).copied()?;
    if sent.itab != itab {
        return None;
    }
    if KUBE_WRITING.insert(key, sent.rev, 0).is_err() {
        count(Counter::MapFull);
    }
    Some(())
}

/// The encoded event is written (`watchEventMetricsRecorder.RecordEvent`,
/// called once the encoder returned without error).
#[uprobe]
pub fn kube_write(ctx: ProbeContext) -> u32 {
    let _ = try_kube_write(&ctx);
    0
}

#[inline(always)]
fn try_kube_write(ctx: &ProbeContext) -> Option<()> {
    let c = begin(ctx)?;
    let g = goroutine(ctx, c.cfg)?;
    let key = ObjKey { tgid: c.tgid as u64, obj: g };
    // SAFETY: the value is copied out before the entry is removed.
    let rev = (unsafe { KUBE_WRITING.get(key) }).copied()?;
    let _ = KUBE_WRITING.remove(key);
    add(&WATCH_EVENTS, events_index(c.slot, Side::ApiserverWritten), 1);
    let commit = stamp_of(&NOTIFY_TS, &RevKey { id: c.tgid as u64, rev });
    match commit {
        Some(t) => observe_stage(c.slot, Stage::CommitToWrite, c.now.saturating_sub(t), rev, NO_WATCHER, c.now),
        None => count(Counter::WriteCommitMiss),
    }
    let cached = stamp_of(&NOTIFY_TS, &cache_key(c.tgid, rev));
    if let Some(t) = cached {
        observe_stage(c.slot, Stage::CacheToWrite, c.now.saturating_sub(t), rev, NO_WATCHER, c.now);
    }
    emit_hop(WatchRecord {
        g,
        enqueue_ns: cached.unwrap_or(0),
        ..hop(Side::ApiserverWritten, c.tgid, rev, commit.unwrap_or(0), c.now)
    });
    Some(())
}

#[uprobe]
pub fn kube_watcher(ctx: ProbeContext) -> u32 {
    let _ = try_kube_watcher(&ctx);
    0
}

#[inline(always)]
fn try_kube_watcher(ctx: &ProbeContext) -> Option<()> {
    let c = begin(ctx)?;
    let watcher = arg(ctx, &c.cfg.args[0])?;
    let ev = arg(ctx, &c.cfg.args[1])?;
    let Some(CacheEvent { rev, .. }) = cache_event(c.cfg, ev)? else {
        add(&WATCH_PROGRESS, events_index(c.slot, Side::ApiserverWatcher), 1);
        return Some(());
    };
    let (set, fp) = offer_slot(&queue_key(c.tgid, watcher, rev, ev));
    let Some((idx, _queued)) = stamps::find(&ENQ_TS, set, &fp) else {
        // Never offered through the cacher's dispatch: an initial event
        // replayed from the cache's history to a new watch (its commit may
        // be minutes old; that is no watch latency), or one queued before
        // the agent attached. Counted apart, never timed.
        add(&WATCH_EVENTS, events_index(c.slot, Side::ApiserverReplay), 1);
        return Some(());
    };
    stamps::remove(&ENQ_TS, idx);
    add(&WATCH_EVENTS, events_index(c.slot, Side::ApiserverWatcher), 1);
    let commit = stamp_of(&NOTIFY_TS, &RevKey { id: c.tgid as u64, rev });
    match commit {
        Some(t) => {
            observe_stage(c.slot, Stage::CommitToWatcher, c.now.saturating_sub(t), rev, cache_watcher(watcher), c.now)
        }
        None => count(Counter::WatcherCommitMiss),
    }
    let cached = stamp_of(&NOTIFY_TS, &cache_key(c.tgid, rev));
    match cached {
        Some(t) => {
            observe_stage(c.slot, Stage::CacheToWatcher, c.now.saturating_sub(t), rev, cache_watcher(watcher), c.now)
        }
        None => count(Counter::WatcherCacheMiss),
    }
    let g = goroutine(ctx, c.cfg).unwrap_or(0);
    emit_hop(WatchRecord {
        g,
        watch_id: watcher as i64,
        enqueue_ns: cached.unwrap_or(0),
        ..hop(Side::ApiserverWatcher, c.tgid, rev, commit.unwrap_or(0), c.now)
    });
    Some(())
}

/// The cacher gives up on a watcher whose queue stayed full past its
/// dispatch budget (`cacheWatcher.add`'s close function): one call per
/// watcher terminated for unresponsiveness.
#[uprobe]
pub fn kube_terminated(ctx: ProbeContext) -> u32 {
    if let Some(c) = begin(&ctx) {
        add(&WATCH_EVENTS, events_index(c.slot, Side::ApiserverTerminated), 1);
        // Which watcher, for the chains of the events it will never get;
        // no revision (the record is about the watcher, not one event).
        if c.cfg.args[0].kind != ARG_NONE
            && let Some(closure) = arg(&ctx, &c.cfg.args[0])
            && let Some(watcher) = read_u64(closure.wrapping_add(c.cfg.closure_watcher_off as u64))
        {
            emit_hop(WatchRecord { watch_id: watcher as i64, ..hop(Side::ApiserverTerminated, c.tgid, 0, 0, c.now) });
        }
    }
    0
}

// ---- client-go: any watch client decodes a frame off its HTTP stream ----

/// A frame's first bytes and their scan, per CPU. The scan lives here, not
/// on the stack: the verifier follows values on the stack exactly, and
/// would verify the per-byte callback once per depth, key and flag the
/// scan can reach (past its million-instruction budget); a map value's
/// contents are unknown to it, so the callback is verified once.
#[repr(C)]
struct FrameArea {
    scan: FrameScan,
    /// Bytes read into `buf`.
    len: u64,
    buf: [u8; SCAN_MAX],
}

/// Bytes the callback scans per call: a call costs about as much as the
/// steps of a dozen bytes, so one per byte would double the scan's cost.
const SCAN_CHUNK: usize = 16;

#[map(name = "WS_FRAME_BUF")]
static FRAME_BUF: PerCpuArray<FrameArea> = PerCpuArray::with_max_entries(1, 0);

/// (process, revision) of frames a watch stream of that process decoded
/// and timed (`commit_to_decode`): the process's reflector then queues the
/// event without a second observation of the same decode. A set (two
/// informers of one process on one resource decode a revision twice, both
/// timed here, and both reflectors skip it); LRU, so a plain watch client's
/// entries (kubectl has no reflector) are evicted in time. A revision one
/// informer of a process got as JSON and another as protobuf would be
/// timed once: the cost of a set over a count the BPF target cannot keep
/// atomically.
#[map(name = "WS_STREAM_DECODED")]
static STREAM_DECODED: LruHashMap<ObjKey, u8> = LruHashMap::with_max_entries(4096, 0);

/// The per-byte callback's context: this CPU's frame area.
#[repr(C)]
struct ScanLoop {
    area: *mut FrameArea,
}

// SAFETY: `ctx` is the caller's ScanLoop (see try_client_decode).
unsafe extern "C" fn scan_chunk(i: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: `area` is this CPU's FRAME_BUF entry, alive for the probe's run.
    let a = unsafe { &mut *(*(ctx as *mut ScanLoop)).area };
    let base = (i as usize).wrapping_mul(SCAN_CHUNK);
    let mut k = 0;
    while k < SCAN_CHUNK {
        let j = base + k;
        if j as u64 >= a.len || !a.scan.step(a.buf[j & (SCAN_MAX - 1)]) {
            return 1;
        }
        k += 1;
    }
    0
}

#[uprobe]
pub fn client_decode(ctx: ProbeContext) -> u32 {
    let _ = try_client_decode(&ctx);
    0
}

/// Whether the probed function was called from the configuration's
/// caller range, `[caller_lo, caller_hi)` in the file's own addresses (its
/// entry probe reads the return address at the stack pointer). None when
/// the return address cannot be read.
#[inline(always)]
fn called_from_caller(ctx: &ProbeContext, cfg: &WatchProbeConfig) -> Option<bool> {
    // SAFETY: the probe's own register context.
    let regs = unsafe { &*ctx.regs };
    // The file's own addresses: less the load bias the probed instruction
    // shows.
    let bias = instruction_pointer(regs).wrapping_sub(cfg.site_addr);
    let from = entry_return_address(regs)?.wrapping_sub(bias);
    Some(from >= cfg.caller_lo && from < cfg.caller_hi)
}

#[inline(always)]
fn try_client_decode(ctx: &ProbeContext) -> Option<()> {
    let c = begin(ctx)?;
    if c.cfg.caller_hi != 0 && !called_from_caller(ctx, c.cfg)? {
        return None;
    }
    let ptr = arg(ctx, &c.cfg.args[0])?;
    let len = arg(ctx, &c.cfg.args[1])?;
    let area = FRAME_BUF.get_ptr_mut(0)?;
    let n = if len > SCAN_MAX as u64 { SCAN_MAX } else { len as usize };
    // SAFETY: this CPU's entry, not shared while the program runs.
    let a = unsafe { &mut *area };
    // SAFETY: bpf_probe_read_user faults safely on bad addresses.
    if unsafe { bpf_probe_read_user_buf(ptr as *const u8, &mut a.buf[..n]) }.is_err() {
        count(Counter::ReadError);
        return None;
    }
    a.scan = FrameScan::new();
    a.len = n as u64;
    let mut l = ScanLoop { area };
    let chunks = n.div_ceil(SCAN_CHUNK) as u32;
    // SAFETY: the callback only touches `l` through the pointer the kernel
    // passes back, during this call.
    unsafe { bpf_loop(chunks, scan_chunk as *mut c_void, (&mut l as *mut ScanLoop).cast(), 0) };
    // SAFETY: as above; the loop is over.
    let Frame::Event(rv) = (unsafe { &*area }).scan.frame() else { return Some(()) };
    add(&WATCH_EVENTS, events_index(c.slot, Side::ClientDecoded), 1);
    let Some(rev) = rv else {
        // Protobuf never comes here (another serializer); a JSON frame
        // whose revision is past SCAN_MAX or not a plain decimal does.
        count(Counter::RvUnreadable);
        return Some(());
    };
    if STREAM_DECODED.insert(ObjKey { tgid: c.tgid as u64, obj: rev as u64 }, 1, 0).is_err() {
        count(Counter::MapFull);
    }
    match stamp_of(&COMMIT_TS, &RevKey { id: NODE_CLUSTER, rev }) {
        Some(t) => {
            observe_stage(c.slot, Stage::CommitToDecode, c.now.saturating_sub(t), rev, NO_WATCHER, c.now);
            let g = goroutine(ctx, c.cfg).unwrap_or(0);
            emit_hop(WatchRecord { g, ..hop(Side::ClientDecoded, c.tgid, rev, t, c.now) });
        }
        None => count(Counter::DecodeCommitMiss),
    }
    Some(())
}

/// Whether a watch stream of this process decoded (and timed) `rev`.
#[inline(always)]
fn stream_decoded(tgid: u32, rev: i64) -> bool {
    STREAM_DECODED.get_ptr(ObjKey { tgid: tgid as u64, obj: rev as u64 }).is_some()
}

// ---- client-go: a reflector decodes an event and queues it for its informer ----

/// Goroutines (by `g`) whose reflector just queued a watch event into the
/// informer's FIFO: when, and which object. The reflector then records the
/// event's resourceVersion on the same goroutine; bookmarks and lists record
/// one without queueing anything, so they find no entry here and are never
/// counted as events. Entries are replaced per goroutine, so the map holds
/// at most one per reflector.
#[map(name = "WS_INFORMER_PENDING")]
static INFORMER_PENDING: HashMap<ObjKey, Pending> = HashMap::with_max_entries(4096, 0);

/// Objects a reflector queued (when), until the informer takes them off its
/// queue. LRU: an object an informer never pops (it stopped) is evicted in
/// time.
#[map(name = "WS_INFORMER_OBJS")]
static INFORMER_OBJS: LruHashMap<ObjKey, u64> = LruHashMap::with_max_entries(16384, 0);

/// The half of an object's join that came first. The reflector queues the
/// object, then records its revision; the informer's pop runs on another
/// goroutine and can take the object in between. Whichever of the two
/// comes second finds the other's half (an insert that must not exist is
/// the handshake: the map's update is atomic) and completes the join, so
/// neither order loses the event: the reflector's half is
/// `{rev, commit_ns, 0}`, the pop's `{REV_PENDING, 0, popped_ns}`.
#[map(name = "WS_INFORMER_JOIN")]
static INFORMER_JOIN: LruHashMap<ObjKey, ObjStamp> = LruHashMap::with_max_entries(16384, 0);

/// The running goroutine, when this binary keeps it in a register.
#[inline(always)]
fn goroutine(ctx: &ProbeContext, cfg: &WatchProbeConfig) -> Option<u64> {
    if cfg.g_in_reg == 0 {
        return None;
    }
    // SAFETY: the probe's own register context.
    reg(unsafe { &*ctx.regs }, G_SLOT).filter(|g| *g != 0)
}

#[uprobe]
pub fn informer_queue(ctx: ProbeContext) -> u32 {
    let _ = try_informer_queue(&ctx);
    0
}

#[inline(always)]
fn try_informer_queue(ctx: &ProbeContext) -> Option<()> {
    let c = begin(ctx)?;
    let g = goroutine(ctx, c.cfg)?;
    let obj = arg(ctx, &c.cfg.args[0])?;
    if INFORMER_PENDING.insert(ObjKey { tgid: c.tgid as u64, obj: g }, Pending { queued_ns: c.now, obj }, 0).is_err()
        || INFORMER_OBJS.insert(ObjKey { tgid: c.tgid as u64, obj }, c.now, 0).is_err()
    {
        count(Counter::MapFull);
    }
    Some(())
}

/// A decimal resourceVersion string's value (`None` for anything else).
#[inline(always)]
fn read_rv(ptr: u64, len: u64) -> Option<i64> {
    if len == 0 || len > RV_DIGITS as u64 {
        return None;
    }
    // Masked so the verifier sees the read's bound.
    let n = (len as usize) & 31;
    if n > RV_DIGITS {
        return None;
    }
    let mut buf = [0u8; RV_DIGITS + 1];
    // SAFETY: bpf_probe_read_user faults safely on bad addresses.
    unsafe { bpf_probe_read_user_buf(ptr as *const u8, &mut buf[..n]) }.ok()?;
    parse_rv(&buf, n)
}

#[uprobe]
pub fn informer_rv(ctx: ProbeContext) -> u32 {
    let _ = try_informer_rv(&ctx);
    0
}

#[inline(always)]
fn try_informer_rv(ctx: &ProbeContext) -> Option<()> {
    let c = begin(ctx)?;
    let g = goroutine(ctx, c.cfg)?;
    let key = ObjKey { tgid: c.tgid as u64, obj: g };
    // SAFETY: the value is copied out before the entry is removed.
    let p = unsafe { *INFORMER_PENDING.get(key)? };
    let _ = INFORMER_PENDING.remove(key);
    add(&WATCH_EVENTS, events_index(c.slot, Side::Informer), 1);
    let ptr = arg(ctx, &c.cfg.args[0])?;
    let len = arg(ctx, &c.cfg.args[1])?;
    let mut half = ObjStamp { rev: REV_UNREADABLE, commit_ns: 0, queued_ns: 0 };
    // The decode was timed at its watch stream (a JSON frame), or it is
    // timed here, at the queueing the reflector did just before (protobuf).
    let mut streamed = false;
    match read_rv(ptr, len) {
        Some(rev) => {
            half.rev = rev;
            streamed = stream_decoded(c.tgid, rev);
            match stamp_of(&COMMIT_TS, &RevKey { id: NODE_CLUSTER, rev }) {
                Some(t) => {
                    if !streamed {
                        let d = p.queued_ns.saturating_sub(t);
                        observe_stage(c.slot, Stage::CommitToDecode, d, rev, NO_WATCHER, p.queued_ns);
                    }
                    half.commit_ns = t;
                }
                None if !streamed => count(Counter::DecodeCommitMiss),
                None => {}
            }
        }
        None => count(Counter::RvUnreadable),
    }
    if half.rev >= 0 && !streamed {
        emit_hop(WatchRecord { g, ..hop(Side::Informer, c.tgid, half.rev, half.commit_ns, p.queued_ns) });
    }
    let key = ObjKey { tgid: c.tgid as u64, obj: p.obj };
    if INFORMER_JOIN.insert(key, half, BPF_NOEXIST as u64).is_ok() {
        return Some(());
    }
    // SAFETY: the value is copied out before the entry is removed.
    match (unsafe { INFORMER_JOIN.get(key) }).copied() {
        // The informer popped the object first: complete its join.
        Some(popped) if popped.rev == REV_PENDING => {
            let _ = INFORMER_JOIN.remove(key);
            join_processed(c.slot, c.tgid, &half, popped.queued_ns, p.queued_ns);
            // The pop handed the object over without its revision.
            // SAFETY: as above.
            if let Some(h) = (unsafe { INFORMER_HANDOFF.get(key) }).copied()
                && h.rev == REV_PENDING
            {
                let _ = INFORMER_HANDOFF.insert(key, ObjStamp { queued_ns: h.queued_ns, ..half }, 0);
            }
            // A listener may already have started its handler on it.
            // SAFETY: as above.
            if let Some(early) = (unsafe { HANDLER_EARLY.get(key) }).copied() {
                let _ = HANDLER_EARLY.remove(key);
                handler_started(c.slot, c.tgid, &half, &early);
            }
        }
        // A stale half of an earlier event at the same address, never
        // popped: replaced.
        _ => {
            if INFORMER_JOIN.insert(key, half, 0).is_err() {
                count(Counter::MapFull);
            }
        }
    }
    Some(())
}

/// An object's join is complete, in whichever order its halves came: `rv`
/// is the reflector's half (revision or `REV_UNREADABLE`, commit time),
/// `popped_ns` when the informer took the object off its queue,
/// `decoded_ns` when the reflector queued it.
#[inline(always)]
fn join_processed(slot: u32, tgid: u32, rv: &ObjStamp, popped_ns: u64, decoded_ns: u64) {
    if rv.commit_ns != 0 {
        let d = popped_ns.saturating_sub(rv.commit_ns);
        observe_stage(slot, Stage::CommitToProcess, d, rv.rev, NO_WATCHER, popped_ns);
    }
    if rv.rev >= 0 {
        emit_hop(WatchRecord {
            enqueue_ns: decoded_ns,
            ..hop(Side::InformerProcessed, tgid, rv.rev, rv.commit_ns, popped_ns)
        });
    }
}

/// State of one informer pop's per-delta loop.
#[repr(C)]
struct DeltaLoop {
    tgid: u32,
    slot: u32,
    now: u64,
    ptr: u64,
    stride: u64,
    obj_off: u64,
    /// Deltas that were queued events.
    n: u64,
}

#[uprobe]
pub fn informer_process(ctx: ProbeContext) -> u32 {
    let _ = try_informer_process(&ctx);
    0
}

#[inline(always)]
fn try_informer_process(ctx: &ProbeContext) -> Option<()> {
    let c = begin(ctx)?;
    let (ptr, len) = if c.cfg.deltas_boxed != 0 {
        // handleDeltas(obj interface{}): obj's data word points at the
        // `Deltas` slice header.
        let hdr = arg(ctx, &c.cfg.args[0])?;
        (read_u64(hdr)?, read_u64(hdr.wrapping_add(8))?)
    } else {
        (arg(ctx, &c.cfg.args[0])?, arg(ctx, &c.cfg.args[1])?)
    };
    let n = if len > MAX_DELTAS_PER_POP as u64 { MAX_DELTAS_PER_POP as u64 } else { len };
    if len > n {
        add_counter(Counter::EventsOverCap, len - n);
    }
    let mut st = DeltaLoop {
        tgid: c.tgid,
        slot: c.slot,
        now: c.now,
        ptr,
        stride: c.cfg.event_stride as u64,
        obj_off: c.cfg.delta_obj_off as u64,
        n: 0,
    };
    // SAFETY: the callback only touches `st` through the pointer the kernel
    // passes back, during this call.
    unsafe { bpf_loop(n as u32, process_delta as *mut c_void, (&mut st as *mut DeltaLoop).cast(), 0) };
    add(&WATCH_EVENTS, events_index(st.slot, Side::InformerProcessed), st.n);
    Some(())
}

#[inline(never)]
unsafe extern "C" fn process_delta(i: u64, ctx: *mut c_void) -> i64 {
    ws_process_delta(ctx.cast(), i);
    // 0: go on. The verifier knows nothing of a global function's result,
    // and a callback's must be 0 or 1.
    0
}

/// One iteration of [`process_delta`]'s loop (a global function: see [`Callback`]).
#[unsafe(no_mangle)]
#[inline(never)]
extern "C" fn ws_process_delta(st: *mut DeltaLoop, i: u64) -> i64 {
    // SAFETY: see Callback.
    let Some(st) = (unsafe { st.as_mut() }) else { return 0 };
    let Some(obj) = read_u64(st.ptr.wrapping_add(i * st.stride).wrapping_add(st.obj_off)) else { return 0 };
    let key = ObjKey { tgid: st.tgid as u64, obj };
    // SAFETY: the value is copied out before the entry is removed.
    let Some(queued) = (unsafe { INFORMER_OBJS.get(key) }).copied() else {
        // A delta no watch event queued (a resync or a relist): the handlers
        // get this object again, and must not time it from the revision of
        // the event that last carried it.
        let _ = INFORMER_HANDOFF.remove(key);
        return 0;
    };
    let _ = INFORMER_OBJS.remove(key);
    st.n += 1;
    // The revision joins later: no exemplar for this stage.
    observe_stage(st.slot, Stage::DecodeToProcess, st.now.saturating_sub(queued), REV_UNREADABLE, NO_WATCHER, st.now);
    let popped = ObjStamp { rev: REV_PENDING, commit_ns: 0, queued_ns: st.now };
    let handoff = if INFORMER_JOIN.insert(key, popped, BPF_NOEXIST as u64).is_ok() {
        // The reflector records the revision later and completes the join.
        popped
    } else {
        // SAFETY: the value is copied out before the entry is removed.
        match (unsafe { INFORMER_JOIN.get(key) }).copied() {
            Some(rv) if rv.rev != REV_PENDING => {
                let _ = INFORMER_JOIN.remove(key);
                join_processed(st.slot, st.tgid, &rv, st.now, queued);
                ObjStamp { queued_ns: st.now, ..rv }
            }
            // A stale pop of an earlier object at the same address.
            _ => {
                let _ = INFORMER_JOIN.insert(key, popped, 0);
                popped
            }
        }
    };
    if INFORMER_HANDOFF.insert(key, handoff, 0).is_err() {
        count(Counter::MapFull);
    }
    0
}

// ---- client-go: the informer's listener hands the event to a handler --------

/// Objects an informer processed, handed to its listeners: the stamp's
/// `queued_ns` is when the informer took the object off its queue. Kept
/// (not removed at the first handler) because every listener of the
/// informer runs its own handler on the same object; a later delta of the
/// same object that no watch event queued removes it, and the LRU ages out
/// the rest.
#[map(name = "WS_INFORMER_HANDOFF")]
static INFORMER_HANDOFF: LruHashMap<ObjKey, ObjStamp> = LruHashMap::with_max_entries(16384, 0);

/// A listener calls its handler (`ResourceEventHandlerFuncs.OnAdd`,
/// `OnUpdate`, `OnDelete`) with the object the informer processed.
#[uprobe]
pub fn informer_handler(ctx: ProbeContext) -> u32 {
    let _ = try_informer_handler(&ctx);
    0
}

#[inline(always)]
fn try_informer_handler(ctx: &ProbeContext) -> Option<()> {
    let c = begin(ctx)?;
    let obj = arg(ctx, &c.cfg.args[0])?;
    let key = ObjKey { tgid: c.tgid as u64, obj };
    // SAFETY: the value is copied out at once.
    let stamp = (unsafe { INFORMER_HANDOFF.get(key) }).copied()?;
    add(&WATCH_EVENTS, events_index(c.slot, Side::InformerHandled), 1);
    let g = goroutine(ctx, c.cfg).unwrap_or(0);
    let early = EarlyHandler { start_ns: c.now, g, popped_ns: stamp.queued_ns };
    if stamp.rev == REV_PENDING {
        // The informer popped the object before its reflector recorded the
        // revision, and a listener runs its handler already: the
        // reflector's half times it when it comes (it always comes, with
        // the revision or as unreadable).
        if HANDLER_EARLY.insert(key, early, BPF_NOEXIST as u64).is_err() {
            count(Counter::HandlerCommitMiss);
        }
    } else {
        handler_started(c.slot, c.tgid, &stamp, &early);
    }
    let d = c.now.saturating_sub(stamp.queued_ns);
    observe_stage(c.slot, Stage::ProcessToHandler, d, stamp.rev, NO_WATCHER, c.now);
    Some(())
}

/// Handlers that started before their object's revision was known, by
/// object: taken by the reflector's half of the join.
#[map(name = "WS_HANDLER_EARLY")]
static HANDLER_EARLY: LruHashMap<ObjKey, EarlyHandler> = LruHashMap::with_max_entries(1024, 0);

/// A handler started on an event whose revision and commit time (`rv`) are
/// known: its `commit_to_handler` and its hop.
#[inline(always)]
fn handler_started(slot: u32, tgid: u32, rv: &ObjStamp, h: &EarlyHandler) {
    if rv.rev == REV_UNREADABLE {
        // Counted as rv_unreadable where the reflector read it.
        return;
    }
    if rv.commit_ns != 0 {
        let d = h.start_ns.saturating_sub(rv.commit_ns);
        observe_stage(slot, Stage::CommitToHandler, d, rv.rev, NO_WATCHER, h.start_ns);
    } else {
        count(Counter::HandlerCommitMiss);
    }
    if rv.rev >= 0 {
        emit_hop(WatchRecord {
            g: h.g,
            enqueue_ns: h.popped_ns,
            ..hop(Side::InformerHandled, tgid, rv.rev, rv.commit_ns, h.start_ns)
        });
    }
}
