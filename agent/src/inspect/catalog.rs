//! The probe catalog: which functions to probe for each role, under which
//! names across versions, and how to read their arguments.
//!
//! Everything is data. To support a new version, add a `Candidate` with the
//! symbol name and (if the signature changed) a `Signature`; the register or
//! stack slot of every argument is derived from the signature and the
//! binary's calling convention by [`assign`], so no register is written down
//! by hand. Struct field offsets are the only hand-written facts: each
//! `ReadSpec` says whether it was measured (and how) or only taken from
//! source (`verified: None`).
//!
//! How the verified facts were measured (etcd 3.4.23, go1.19.8, amd64,
//! Debian's `/usr/bin/etcd` and `/usr/bin/etcdctl`): tracefs uprobes at the
//! file offsets `watchscope inspect` printed, with fetchargs built from the
//! reads below, while `etcdctl watch` ran and `etcdctl put` committed known
//! revisions; the values seen matched the revisions/watch ids etcdctl
//! reported (see `tests/tests/inspect.rs::etcd_arg_reads_match_tracefs`).

use serde::Serialize;

use super::elf::Arch;

/// Whose code a role probes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Component {
    EtcdServer,
    EtcdClient,
    /// A Kubernetes API server's storage layer (`k8s.io/apiserver`: the
    /// watch cache and its watchers).
    KubeApiserver,
    ClientGo,
    GoRuntime,
}

/// What a probed function means to watchscope: one variant per catalog
/// entry. Planners match on it; [`Role::name`] is its stable name in
/// `inspect --json`, `/debug/probes` and the logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    EtcdServerNotify,
    EtcdServerWatcherSend,
    EtcdServerGrpcSend,
    EtcdClientDispatch,
    KubeCacheProcessEvent,
    KubeWatcherQueue,
    KubeWatcherSent,
    KubeWatcherTerminated,
    KubeWatchEncode,
    KubeWatchWritten,
    ClientGoHandleDeltas,
    ClientGoQueuePop,
    ClientGoFifoQueue,
    ClientGoReflectorRv,
    ClientGoHandler,
    ClientGoWatchDecode,
    GoMapAssign,
    GoMapAccess,
    GoMapDelete,
    GoMapGrow,
    GoMapEvacuate,
    GoGcAssist,
    GoSchedExecute,
    GoSchedPark,
    GoSchedReady,
    GoSchedYield,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::EtcdServerNotify => "etcd_server_notify",
            Role::EtcdServerWatcherSend => "etcd_server_watcher_send",
            Role::EtcdServerGrpcSend => "etcd_server_grpc_send",
            Role::EtcdClientDispatch => "etcd_client_dispatch",
            Role::KubeCacheProcessEvent => "apiserver_cache_process_event",
            Role::KubeWatcherQueue => "apiserver_watcher_queue",
            Role::KubeWatcherSent => "apiserver_watcher_sent",
            Role::KubeWatcherTerminated => "apiserver_watcher_terminated",
            Role::KubeWatchEncode => "apiserver_watch_encode",
            Role::KubeWatchWritten => "apiserver_watch_written",
            Role::ClientGoHandleDeltas => "client_go_handle_deltas",
            Role::ClientGoQueuePop => "client_go_queue_pop",
            Role::ClientGoFifoQueue => "client_go_fifo_queue",
            Role::ClientGoReflectorRv => "client_go_reflector_rv",
            Role::ClientGoHandler => "client_go_handler",
            Role::ClientGoWatchDecode => "client_go_watch_decode",
            Role::GoMapAssign => "go_map_assign",
            Role::GoMapAccess => "go_map_access",
            Role::GoMapDelete => "go_map_delete",
            Role::GoMapGrow => "go_map_grow",
            Role::GoMapEvacuate => "go_map_evacuate",
            Role::GoGcAssist => "go_gc_assist",
            Role::GoSchedExecute => "go_sched_execute",
            Role::GoSchedPark => "go_sched_park",
            Role::GoSchedReady => "go_sched_ready",
            Role::GoSchedYield => "go_sched_yield",
        }
    }

    /// A code-shape fact for windows on this role's functions: the role
    /// whose function the same goroutine enters next, as soon as a call
    /// returns, in the loop that makes the calls. A window whose callers
    /// return right after the call (no branch there to end it on) ends at
    /// that entry instead of on its single-stepped RETs: the goroutine
    /// runs it above the window's frame only once the call has returned.
    ///
    /// client-go's informer (`controller.processLoop`, every version)
    /// calls the queue's `Pop` or `PopBatch` again right after the previous
    /// one returned (a non-blocking check of its context in between), and
    /// the delta handler only ever runs inside one: in 0.36 `RealFIFO.Pop`
    /// → `whileProcessing_locked` → a closure → the informer's closure
    /// that calls `handleDeltas` (`PopBatch` likewise for
    /// `handleBatchDeltas`); before, `DeltaFIFO.Pop` → the method value
    /// `HandleDeltas-fm`. Both closures return right after the call.
    pub fn loop_next(self) -> Option<Role> {
        match self {
            Role::ClientGoHandleDeltas => Some(Role::ClientGoQueuePop),
            _ => None,
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // `pad`, so `{:<26}` aligns columns.
        f.pad(self.name())
    }
}

/// Whether one symbol is enough, or every candidate present is probed (the
/// runtime's map functions: each variant is a separate entry point).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Select {
    First,
    All,
}

/// How a candidate names its function.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SymbolMatch {
    /// The exact symbol, or the same under a `.../vendor/` prefix (GOPATH-era
    /// vendoring put the vendoring package's path in front).
    Exact(&'static str),
    /// Generic instantiations, whose names spell out type arguments.
    Pattern {
        prefix: &'static str,
        contains: &'static [&'static str],
        excludes: &'static [&'static str],
        suffix: &'static str,
    },
}

impl SymbolMatch {
    pub fn describe(&self) -> String {
        match self {
            SymbolMatch::Exact(s) => (*s).to_string(),
            SymbolMatch::Pattern { prefix, contains, suffix, .. } => {
                format!("{prefix}…{}…{suffix}", contains.join("…"))
            }
        }
    }
    pub fn matches_pattern(&self, name: &str) -> bool {
        match self {
            SymbolMatch::Exact(_) => false,
            SymbolMatch::Pattern { prefix, contains, excludes, suffix } => {
                name.starts_with(prefix)
                    && name.ends_with(suffix)
                    && contains.iter().all(|c| name.contains(c))
                    && !excludes.iter().any(|e| name.contains(e))
            }
        }
    }
}

/// The name a GOPATH-mode build gives `symbol`: the same import path
/// without its major-version element (`go.etcd.io/etcd/server/v3/mvcc.f`
/// → `go.etcd.io/etcd/server/mvcc.f`), or `None` when it has none. Debian
/// builds etcd 3.5 that way; module builds keep `/v3`.
pub fn gopath_form(symbol: &str) -> Option<String> {
    // The import path ends at the first '.' after its last '/'.
    let last_slash = symbol.rfind('/')?;
    let pkg_end = symbol[last_slash..].find('.').map_or(symbol.len(), |i| last_slash + i);
    let (pkg, rest) = symbol.split_at(pkg_end);
    let is_major = |e: &str| e.strip_prefix('v').is_some_and(|n| n.parse::<u32>().is_ok_and(|n| n >= 2));
    let mut elements = pkg.split('/');
    let first = elements.next()?;
    let kept: Vec<&str> = std::iter::once(first).chain(elements.filter(|e| !is_major(e))).collect();
    let alt = format!("{}{rest}", kept.join("/"));
    (alt != symbol).then_some(alt)
}

/// One integer-class scalar of a flattened argument (Go's register ABI
/// assigns struct fields one by one, so a signature is a list of these).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Field {
    /// Empty for a scalar parameter; `len`, `Revision`, ... for parts.
    pub name: &'static str,
    /// Bytes (also the alignment: every field here is a scalar).
    pub size: u8,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Param {
    pub name: &'static str,
    pub fields: &'static [Field],
}

/// What to read at entry, given as a field of the signature and a pointer
/// chase: the value starts as the field, then for each offset `o` in
/// `derefs` becomes the 8-byte word at `value + o`; the last read is `size`
/// bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadSpec {
    pub name: &'static str,
    /// `param` or `param.field`.
    pub field: &'static str,
    pub derefs: &'static [u64],
    pub size: u8,
    /// How this read was checked against a running program, or `None` if it
    /// only comes from reading the source.
    pub verified: Option<&'static str>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Signature {
    pub params: &'static [Param],
    pub reads: &'static [ReadSpec],
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    pub symbol: SymbolMatch,
    /// Which versions use this name (for humans).
    pub versions: &'static str,
    pub sig: &'static Signature,
    /// The symbol name itself was seen in a real binary of that version.
    pub name_verified: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoleSpec {
    pub role: Role,
    pub component: Component,
    pub what: &'static str,
    pub select: Select,
    pub candidates: &'static [Candidate],
}

// ---- building blocks ----------------------------------------------------

const fn f(name: &'static str, size: u8) -> Field {
    Field { name, size }
}
const WORD: &[Field] = &[f("", 8)];
const U32: &[Field] = &[f("", 4)];
const SLICE: &[Field] = &[f("ptr", 8), f("len", 8), f("cap", 8)];
const STRING: &[Field] = &[f("ptr", 8), f("len", 8)];
const IFACE: &[Field] = &[f("type", 8), f("data", 8)];
const fn p(name: &'static str, fields: &'static [Field]) -> Param {
    Param { name, fields }
}
const fn read(name: &'static str, field: &'static str, derefs: &'static [u64]) -> ReadSpec {
    ReadSpec { name, field, derefs, size: 8, verified: None }
}
const fn read_v(name: &'static str, field: &'static str, derefs: &'static [u64], how: &'static str) -> ReadSpec {
    ReadSpec { name, field, derefs, size: 8, verified: Some(how) }
}
const fn exact(name: &'static str, versions: &'static str, sig: &'static Signature, name_verified: bool) -> Candidate {
    Candidate { symbol: SymbolMatch::Exact(name), versions, sig, name_verified }
}

const TRACEFS_344: &str = "etcd 3.4.23/go1.19.8 amd64: tracefs uprobe during etcdctl put/watch";

// ---- etcd server ----------------------------------------------------------

/// `func (s *watchableStore) notify(rev int64, evs []mvccpb.Event)`
static NOTIFY: Signature = Signature {
    params: &[p("s", WORD), p("rev", WORD), p("evs", SLICE)],
    reads: &[read_v("rev", "rev", &[], TRACEFS_344), read_v("events", "evs.len", &[], TRACEFS_344)],
};

/// `func (w *watcher) send(wr WatchResponse) bool`, with
/// `WatchResponse{WatchID int64; Events []mvccpb.Event; Revision, CompactRevision int64}`
/// passed by value (flattened into registers after the receiver).
static WATCHER_SEND: Signature = Signature {
    params: &[
        p("w", WORD),
        p(
            "wr",
            &[
                f("WatchID", 8),
                f("Events.ptr", 8),
                f("Events.len", 8),
                f("Events.cap", 8),
                f("Revision", 8),
                f("CompactRevision", 8),
            ],
        ),
    ],
    reads: &[
        read_v("watch_id", "wr.WatchID", &[], TRACEFS_344),
        read_v("revision", "wr.Revision", &[], TRACEFS_344),
        read_v("events", "wr.Events.len", &[], TRACEFS_344),
        // The queued []mvccpb.Event's backing array: &Events[i] is the pointer
        // the gRPC send later transmits (seen equal in the same tracefs run).
        read_v("events_ptr", "wr.Events.ptr", &[], TRACEFS_344),
        // The receiver: its filters (`fcs`) decide how its copies are told
        // apart (`agent_common::watch::filtered_copy_slot`).
        read_v("watcher", "w", &[], FILTERED_WATCH),
    ],
};
const FILTERED_WATCH: &str = "etcd 3.3.25/go1.15 (stack ABI), 3.4.23/go1.19, 3.5.16/go1.24 and 3.5.30/go1.26 amd64: a \
     watch with a filter and one without, every event of each timed enqueue to send (tests/tests/etcd_watch.rs)";

/// `func (x *watchWatchServer) Send(m *WatchResponse) error`. The
/// generated `WatchResponse` starts `Header *ResponseHeader; WatchId int64`
/// and `ResponseHeader` is `{ClusterId, MemberId uint64; Revision int64; RaftTerm uint64}`.
static GRPC_SEND: Signature = Signature {
    params: &[p("x", WORD), p("m", WORD)],
    reads: &[
        read_v("revision", "m", &[0, 16], TRACEFS_344),
        read_v("watch_id", "m", &[8], TRACEFS_344),
        read_v("member_id", "m", &[0, 8], TRACEFS_344),
        read_v("cluster_id", "m", &[0, 0], TRACEFS_344),
        // Events []*mvccpb.Event after Created, Canceled, CompactRevision,
        // CancelReason and Fragment: ptr at 56, len at 64.
        read_v("events_ptr", "m", &[56], TRACEFS_344),
        read_v("events", "m", &[64], TRACEFS_344),
    ],
};

/// grpc-go's generic stream (`*GenericServerStream[Req, Res]`) `Send(m *Res)`,
/// called through the interface wrapper whose name spells the type
/// arguments (Go 1.20+; 1.18-1.19 pclntab writes `[...]`, so instantiations
/// cannot be told apart and the role stays unresolved there). The name and
/// the receiver/`m` registers were checked on a stand-in built with Go 1.27
/// (`tests/fixtures/go/generic`), not on a real etcd 3.7, whose message
/// layout may differ: nothing here is marked verified.
static GENERIC_SEND: Signature = Signature {
    params: &[p("x", WORD), p("m", WORD)],
    reads: &[
        read("revision", "m", &[0, 16]),
        read("watch_id", "m", &[8]),
        read("member_id", "m", &[0, 8]),
        read("cluster_id", "m", &[0, 0]),
        read("events_ptr", "m", &[56]),
        read("events", "m", &[64]),
    ],
};

// ---- etcd client ------------------------------------------------------------

/// `func (w *watchGrpcStream) dispatchEvent(pbresp *pb.WatchResponse) bool`
static DISPATCH: Signature = Signature {
    params: &[p("w", WORD), p("pbresp", WORD)],
    reads: &[
        read_v("revision", "pbresp", &[0, 16], TRACEFS_344),
        read_v("watch_id", "pbresp", &[8], TRACEFS_344),
        read_v("member_id", "pbresp", &[0, 8], TRACEFS_344),
        read_v("cluster_id", "pbresp", &[0, 0], TRACEFS_344),
        read_v("events_ptr", "pbresp", &[56], TRACEFS_344),
        read_v("events", "pbresp", &[64], TRACEFS_344),
    ],
};

// ---- Kubernetes API server ---------------------------------------------------

const TRACEFS_AS036: &str = "k8s.io/apiserver 0.36.4 (Debian sid)/go1.27.3 amd64, apiextensions-apiserver: tracefs \
                             uprobes while N patches of a custom resource reached two watchers";

/// `func (w *watchCache) processEvent(event watch.Event, resourceVersion uint64,
/// updateFunc func(*store.Element) error) error`; `watch.Event` is
/// `{Type EventType (a string); Object runtime.Object}`, passed by value.
static CACHE_PROCESS_EVENT: Signature = Signature {
    params: &[
        p("w", WORD),
        p("event", &[f("Type.ptr", 8), f("Type.len", 8), f("Object.type", 8), f("Object.data", 8)]),
        p("resourceVersion", WORD),
        p("updateFunc", WORD),
    ],
    reads: &[
        read_v("rev", "resourceVersion", &[], TRACEFS_AS036),
        read_v("type_len", "event.Type.len", &[], TRACEFS_AS036),
    ],
};

/// `func (c *cacheWatcher) nonblockingAdd(event *watchCacheEvent) bool` and
/// `func (c *cacheWatcher) markBookmarkAfterRvSent(event *watchCacheEvent)`.
/// The event's field offsets come from the binary's own type descriptor
/// (`attach::watch`), never from here: these reads are for `inspect`.
static CACHE_WATCHER_EVENT: Signature = Signature {
    params: &[p("c", WORD), p("event", WORD)],
    reads: &[read_v("watcher", "c", &[], TRACEFS_AS036), read_v("rev", "event", &[96], TRACEFS_AS036)],
};

/// `cacheWatcher.add`'s first closure, `closeFunc := func() {...}`: it
/// reads nothing (its captures are in the closure context).
static CLOSURE: Signature = Signature { params: &[], reads: &[] };

const DISASM_AS036_WRITE: &str = "k8s.io/apiserver 0.36.4 (Debian sid)/go1.27.3 amd64, apiextensions-apiserver: \
     disassembly of WatchServer.HandleHTTP's calls (the event's words in RBX, RCX, RDI, RSI; the recorder in RAX) \
     and uprobes while N patches reached four HTTP watchers";

/// `func (e *watchEncoder) Encode(event watch.Event) error`: the watch
/// handler's encoder, called once per event it takes from the watcher's
/// result channel (bookmarks too).
static WATCH_ENCODE: Signature = Signature {
    params: &[
        p("e", WORD),
        p("event", &[f("Type.ptr", 8), f("Type.len", 8), f("Object.type", 8), f("Object.data", 8)]),
    ],
    reads: &[
        read_v("obj_type", "event.Object.type", &[], DISASM_AS036_WRITE),
        read_v("obj", "event.Object.data", &[], DISASM_AS036_WRITE),
    ],
};

/// `func (c *watchEventMetricsRecorder) RecordEvent()`: called by the watch
/// handler right after the encoder wrote an event, on the same goroutine.
static WATCH_RECORD_EVENT: Signature = Signature { params: &[p("c", WORD)], reads: &[] };

// ---- client-go ---------------------------------------------------------------

const TRACEFS_CG036_WATCH: &str = "client-go 0.36.4 (Debian sid)/go1.27.3 amd64: tracefs uprobes on an informer \
                                   watching a real API server while N patches of a custom resource arrived";

/// `func (f *RealFIFO) Add(obj interface{}) error` (and Update, Delete;
/// DeltaFIFO's likewise): what a reflector calls for each watch event.
static FIFO_QUEUE: Signature = Signature {
    params: &[p("f", WORD), p("obj", IFACE)],
    reads: &[read_v("obj", "obj.data", &[], TRACEFS_CG036_WATCH)],
};

/// `func (r *Reflector) setLastSyncResourceVersion(v string)`: called after
/// every watch event (and bookmark, and list) with its resourceVersion.
static REFLECTOR_RV: Signature = Signature {
    params: &[p("r", WORD), p("v", STRING)],
    reads: &[read_v("rv_ptr", "v.ptr", &[], TRACEFS_CG036_WATCH), read_v("rv_len", "v.len", &[], TRACEFS_CG036_WATCH)],
};

const TRACEFS_CG032: &str =
    "client-go 0.32.3 (Debian trixie)/go1.24.4 amd64: tracefs uprobe on an informer fed a known number of deltas";

/// `func (s *sharedIndexInformer) HandleDeltas(obj interface{}[, isInInitialList bool]) error`
/// (client-go before 0.36); `obj` boxes a `Deltas` slice, so its data word
/// points at a slice header.
static HANDLE_DELTAS: Signature =
    Signature { params: &[p("s", WORD), p("obj", IFACE)], reads: &[read_v("deltas", "obj.data", &[8], TRACEFS_CG032)] };

/// `klog.Logger` is `logr.Logger{sink LogSink; level int}`, passed by value:
/// the interface's two words and the int, each in its own register.
const LOGR: &[Field] = &[f("sink.type", 8), f("sink.data", 8), f("level", 8)];

const TRACEFS_CG036: &str =
    "client-go 0.36.4 (Debian sid)/go1.27.3 amd64: tracefs uprobe on an informer fed a known number of deltas";

/// client-go 0.36: `func (s *sharedIndexInformer) handleDeltas(logger klog.Logger,
/// obj interface{}, isInInitialList bool) error`. The logger comes first, so
/// `obj` is after its three words (RSI/R8 on amd64), not right after the
/// receiver. With RealFIFO (the default queue) each call carries one delta.
static HANDLE_DELTAS_LOGGER: Signature = Signature {
    params: &[p("s", WORD), p("logger", LOGR), p("obj", IFACE)],
    reads: &[read_v("deltas", "obj.data", &[8], TRACEFS_CG036)],
};

/// client-go 0.36: `func (s *sharedIndexInformer) handleBatchDeltas(logger klog.Logger,
/// deltas []Delta, isInInitialList bool) error`. `RealFIFO.PopBatch` (on by
/// default, `InOrderInformersBatchProcess`) calls it for a pop of several
/// objects' deltas and `handleDeltas` for a pop of one.
static HANDLE_BATCH_DELTAS: Signature = Signature {
    params: &[p("s", WORD), p("logger", LOGR), p("deltas", SLICE)],
    reads: &[
        read_v("deltas", "deltas.len", &[], TRACEFS_CG036),
        read_v("deltas_ptr", "deltas.ptr", &[], TRACEFS_CG036_WATCH),
    ],
};

/// `func (f *DeltaFIFO) Pop(process PopProcessFunc) (interface{}, error)`
static FIFO_POP: Signature = Signature { params: &[p("f", WORD), p("process", WORD)], reads: &[] };
/// `func (f *RealFIFO) PopBatch(processBatch ProcessBatchFunc, processSingle PopProcessFunc) error`
static FIFO_POP_BATCH: Signature =
    Signature { params: &[p("f", WORD), p("processBatch", WORD), p("processSingle", WORD)], reads: &[] };

const DISASM_CG036_HANDLER: &str = "client-go 0.36.4 (Debian sid)/go1.27.3 amd64: disassembly of the pointer \
     wrapper (receiver in RAX, the objects' words after it) and uprobes on an informer's handlers fed a known \
     number of updates";

/// `func (r *ResourceEventHandlerFuncs) OnAdd(obj interface{}, isInInitialList bool)`:
/// the pointer-receiver wrapper the compiler makes for the value method,
/// which is what a listener calls through the `ResourceEventHandler`
/// interface (the struct of three funcs is boxed behind a pointer). Before
/// client-go 0.27 there is no `isInInitialList`; `obj` is where it was.
static HANDLER_ADD: Signature = Signature {
    params: &[p("r", WORD), p("obj", IFACE)],
    reads: &[read_v("obj", "obj.data", &[], DISASM_CG036_HANDLER)],
};
/// `func (r *ResourceEventHandlerFuncs) OnUpdate(oldObj, newObj interface{})`
static HANDLER_UPDATE: Signature = Signature {
    params: &[p("r", WORD), p("oldObj", IFACE), p("newObj", IFACE)],
    reads: &[read_v("obj", "newObj.data", &[], DISASM_CG036_HANDLER)],
};

/// `func (s *Serializer) Decode(originalData []byte, gvk *schema.GroupVersionKind,
/// into runtime.Object) (runtime.Object, *schema.GroupVersionKind, error)`:
/// apimachinery's JSON serializer, which a watch client's streaming decoder
/// calls with each whole frame (`{"type":...,"object":...}`).
static JSON_DECODE: Signature = Signature {
    params: &[p("s", WORD), p("data", SLICE), p("gvk", WORD), p("into", IFACE)],
    reads: &[
        read_v("frame_ptr", "data.ptr", &[], COUNTED_CG036_FRAMES),
        read_v("frame_len", "data.len", &[], COUNTED_CG036_FRAMES),
    ],
};
const COUNTED_CG036_FRAMES: &str = "apimachinery 0.36.4 (Debian sid)/go1.27.3 amd64, in kubectl 1.36.4 and a client-go \
     operator: every frame of N updates read at entry and counted exactly (tests/tests/kube_path.rs)";

/// The function whose calls of `JSON_DECODE` are watch frames.
pub const STREAMING_DECODE: &str = "k8s.io/apimachinery/pkg/runtime/serializer/streaming.(*decoder).Decode";

// ---- Go runtime --------------------------------------------------------------

/// `func mapassign(t *maptype, h *hmap, key unsafe.Pointer) unsafe.Pointer`
/// (Swiss maps keep the shape: `typ *abi.MapType, m *maps.Map`).
static MAP_PTRKEY: Signature = Signature {
    params: &[p("t", WORD), p("h", WORD), p("key", WORD)],
    reads: &[read("map", "h", &[]), read("maptype", "t", &[])],
};
static MAP_KEY32: Signature = Signature {
    params: &[p("t", WORD), p("h", WORD), p("key", U32)],
    reads: &[read("map", "h", &[]), read("maptype", "t", &[])],
};
static MAP_KEYSTR: Signature = Signature {
    params: &[p("t", WORD), p("h", WORD), p("key", STRING)],
    reads: &[read("map", "h", &[]), read("maptype", "t", &[])],
};
/// `hashGrow(t, h)`, `growWork(t, h, bucket)`, `evacuate(t, h, oldbucket)`.
static MAP_CLASSIC_GROW: Signature =
    Signature { params: &[p("t", WORD), p("h", WORD)], reads: &[read("map", "h", &[]), read("maptype", "t", &[])] };
/// `func (m *Map) growToSmall(typ *abi.MapType)` / `growToTable`.
static MAP_SWISS_MAP_GROW: Signature =
    Signature { params: &[p("m", WORD), p("typ", WORD)], reads: &[read("map", "m", &[]), read("maptype", "typ", &[])] };
/// `func (t *table) rehash(typ *abi.MapType, m *Map)` / `grow` / `split`.
static MAP_SWISS_TABLE_GROW: Signature = Signature {
    params: &[p("t", WORD), p("typ", WORD), p("m", WORD)],
    reads: &[read("map", "m", &[]), read("maptype", "typ", &[]), read("table", "t", &[])],
};
/// `func gcAssistAlloc(gp *g)`
static GC_ASSIST: Signature = Signature { params: &[p("gp", WORD)], reads: &[read("g", "gp", &[])] };
/// `func execute(gp *g, inheritTime bool)`, `func ready(gp *g, traceskip int, next bool)`,
/// `func goschedImpl(gp *g[, preempted bool])`: the goroutine comes first.
static SCHED_GP: Signature = Signature { params: &[p("gp", WORD)], reads: &[read("g", "gp", &[])] };
/// `func gopark(unlockf func(*g, unsafe.Pointer) bool, lock unsafe.Pointer, ...)`: the
/// parking goroutine is the running one (the g register).
static GOPARK: Signature = Signature { params: &[p("unlockf", WORD), p("lock", WORD)], reads: &[] };

/// Runtime functions: names seen in the Go 1.19 and 1.27 fixtures (those
/// a fixture does not link, e.g. classic growth in 1.27, by source only).
macro_rules! runtime {
    ($($name:literal => $sig:ident),* $(,)?) => {
        runtime!["Go 1.19-1.27"; $($name => $sig),*]
    };
    ($versions:literal; $($name:literal => $sig:ident),* $(,)?) => {
        &[$(exact($name, $versions, &$sig, true)),*]
    };
}

/// The catalog. Order matters only for `Select::First` (first found wins).
pub static CATALOG: &[RoleSpec] = &[
    RoleSpec {
        role: Role::EtcdServerNotify,
        component: Component::EtcdServer,
        what: "commit fan-out: one call per committed revision, to all synced watchers",
        select: Select::First,
        candidates: &[
            exact("go.etcd.io/etcd/mvcc.(*watchableStore).notify", "etcd 3.4", &NOTIFY, true),
            exact("go.etcd.io/etcd/server/v3/mvcc.(*watchableStore).notify", "etcd 3.5", &NOTIFY, true),
            exact("go.etcd.io/etcd/server/v3/storage/mvcc.(*watchableStore).notify", "etcd 3.6+", &NOTIFY, false),
            exact("github.com/coreos/etcd/mvcc.(*watchableStore).notify", "etcd 3.3 and older", &NOTIFY, true),
        ],
    },
    RoleSpec {
        role: Role::EtcdServerWatcherSend,
        component: Component::EtcdServer,
        what: "per-watcher queue: one call per response queued to one watcher",
        select: Select::First,
        candidates: &[
            exact("go.etcd.io/etcd/mvcc.(*watcher).send", "etcd 3.4", &WATCHER_SEND, true),
            exact("go.etcd.io/etcd/server/v3/mvcc.(*watcher).send", "etcd 3.5", &WATCHER_SEND, true),
            exact("go.etcd.io/etcd/server/v3/storage/mvcc.(*watcher).send", "etcd 3.6+", &WATCHER_SEND, false),
            exact("github.com/coreos/etcd/mvcc.(*watcher).send", "etcd 3.3 and older", &WATCHER_SEND, true),
        ],
    },
    RoleSpec {
        role: Role::EtcdServerGrpcSend,
        component: Component::EtcdServer,
        what: "gRPC send: one call per WatchResponse written to a client stream",
        select: Select::First,
        candidates: &[
            exact("go.etcd.io/etcd/etcdserver/etcdserverpb.(*watchWatchServer).Send", "etcd 3.4", &GRPC_SEND, true),
            exact("go.etcd.io/etcd/api/v3/etcdserverpb.(*watchWatchServer).Send", "etcd 3.5-3.6", &GRPC_SEND, true),
            Candidate {
                symbol: SymbolMatch::Pattern {
                    prefix: "google.golang.org/grpc.(*GenericServerStream[",
                    contains: &["etcdserverpb.WatchRequest", "etcdserverpb.WatchResponse"],
                    excludes: &["go.shape."],
                    suffix: "]).Send",
                },
                versions: "etcd 3.7 (generic grpc-go streams; unverified)",
                sig: &GENERIC_SEND,
                name_verified: false,
            },
            exact(
                "github.com/coreos/etcd/etcdserver/etcdserverpb.(*watchWatchServer).Send",
                "etcd 3.3 and older",
                &GRPC_SEND,
                true,
            ),
        ],
    },
    RoleSpec {
        role: Role::EtcdClientDispatch,
        component: Component::EtcdClient,
        what: "client receive: one call per WatchResponse the client dispatches to its watchers",
        select: Select::First,
        candidates: &[
            exact("go.etcd.io/etcd/clientv3.(*watchGrpcStream).dispatchEvent", "etcd 3.4", &DISPATCH, true),
            exact("go.etcd.io/etcd/client/v3.(*watchGrpcStream).dispatchEvent", "etcd 3.5", &DISPATCH, true),
            exact("go.etcd.io/etcd/client/v3.(*watchGRPCStream).dispatchEvent", "etcd 3.6+", &DISPATCH, false),
            exact(
                "github.com/coreos/etcd/clientv3.(*watchGrpcStream).dispatchEvent",
                "etcd 3.3 and older",
                &DISPATCH,
                true,
            ),
        ],
    },
    RoleSpec {
        role: Role::KubeCacheProcessEvent,
        component: Component::KubeApiserver,
        what: "watch cache: one call per event the API server's cacher takes from etcd (bookmarks apart)",
        select: Select::First,
        candidates: &[exact(
            "k8s.io/apiserver/pkg/storage/cacher.(*watchCache).processEvent",
            "k8s.io/apiserver 0.36 (kube-apiserver 1.36)",
            &CACHE_PROCESS_EVENT,
            true,
        )],
    },
    RoleSpec {
        role: Role::KubeWatcherQueue,
        component: Component::KubeApiserver,
        what: "per-watcher queue: one call per event offered to one watcher (again when its queue was full)",
        select: Select::First,
        candidates: &[exact(
            "k8s.io/apiserver/pkg/storage/cacher.(*cacheWatcher).nonblockingAdd",
            "k8s.io/apiserver 0.36 (kube-apiserver 1.36)",
            &CACHE_WATCHER_EVENT,
            true,
        )],
    },
    RoleSpec {
        role: Role::KubeWatcherSent,
        component: Component::KubeApiserver,
        what: "watcher result channel: one call per event (or bookmark) put in one watcher's result channel",
        select: Select::First,
        candidates: &[exact(
            "k8s.io/apiserver/pkg/storage/cacher.(*cacheWatcher).markBookmarkAfterRvSent",
            "k8s.io/apiserver 0.36 (kube-apiserver 1.36)",
            &CACHE_WATCHER_EVENT,
            true,
        )],
    },
    RoleSpec {
        role: Role::KubeWatcherTerminated,
        component: Component::KubeApiserver,
        what: "a watcher terminated for unresponsiveness: its queue stayed full past the dispatch budget \
               (\"Forcing ... watcher close due to unresponsiveness\")",
        select: Select::First,
        candidates: &[exact(
            "k8s.io/apiserver/pkg/storage/cacher.(*cacheWatcher).add.func1",
            "k8s.io/apiserver 0.36 (kube-apiserver 1.36)",
            &CLOSURE,
            true,
        )],
    },
    RoleSpec {
        role: Role::KubeWatchEncode,
        component: Component::KubeApiserver,
        what: "HTTP watch handler: one call per event (or bookmark) taken from a watcher's result channel, \
               encoded for its client",
        select: Select::First,
        candidates: &[exact(
            "k8s.io/apiserver/pkg/endpoints/handlers.(*watchEncoder).Encode",
            "k8s.io/apiserver 0.36 (kube-apiserver 1.36)",
            &WATCH_ENCODE,
            true,
        )],
    },
    RoleSpec {
        role: Role::KubeWatchWritten,
        component: Component::KubeApiserver,
        what: "HTTP watch handler: one call per event written to a watcher's stream",
        select: Select::First,
        candidates: &[exact(
            "k8s.io/apiserver/pkg/endpoints/handlers.(*watchEventMetricsRecorder).RecordEvent",
            "k8s.io/apiserver 0.36 (kube-apiserver 1.36)",
            &WATCH_RECORD_EVENT,
            true,
        )],
    },
    RoleSpec {
        role: Role::ClientGoHandleDeltas,
        component: Component::ClientGo,
        what: "informer delta handler: one call per pop of the delta queue (one object's deltas, or in \
               client-go 0.35+ a batch of several objects')",
        // Every one present: 0.36 pops through handleDeltas or
        // handleBatchDeltas, never one inside the other.
        select: Select::All,
        candidates: &[
            exact(
                "k8s.io/client-go/tools/cache.(*sharedIndexInformer).HandleDeltas",
                "client-go before 0.36 (found in 0.32.3)",
                &HANDLE_DELTAS,
                true,
            ),
            exact(
                "k8s.io/client-go/tools/cache.(*sharedIndexInformer).handleDeltas",
                "client-go 0.36",
                &HANDLE_DELTAS_LOGGER,
                true,
            ),
            exact(
                "k8s.io/client-go/tools/cache.(*sharedIndexInformer).handleBatchDeltas",
                "client-go 0.36 (batch pops)",
                &HANDLE_BATCH_DELTAS,
                true,
            ),
        ],
    },
    RoleSpec {
        role: Role::ClientGoQueuePop,
        component: Component::ClientGo,
        what: "informer queue pop: one call per item taken off the delta queue",
        select: Select::All,
        candidates: &[
            exact("k8s.io/client-go/tools/cache.(*DeltaFIFO).Pop", "client-go (all)", &FIFO_POP, true),
            exact("k8s.io/client-go/tools/cache.(*RealFIFO).Pop", "client-go 0.30+", &FIFO_POP, true),
            // What 0.35+ informers call instead of Pop (batch processing is on by default).
            exact("k8s.io/client-go/tools/cache.(*RealFIFO).PopBatch", "client-go 0.35+", &FIFO_POP_BATCH, true),
        ],
    },
    RoleSpec {
        role: Role::ClientGoFifoQueue,
        component: Component::ClientGo,
        what: "informer queue push: one call per watch event a reflector queues (bookmarks never)",
        select: Select::All,
        candidates: &[
            exact("k8s.io/client-go/tools/cache.(*RealFIFO).Add", "client-go 0.30+", &FIFO_QUEUE, true),
            exact("k8s.io/client-go/tools/cache.(*RealFIFO).Update", "client-go 0.30+", &FIFO_QUEUE, true),
            exact("k8s.io/client-go/tools/cache.(*RealFIFO).Delete", "client-go 0.30+", &FIFO_QUEUE, true),
            exact("k8s.io/client-go/tools/cache.(*DeltaFIFO).Add", "client-go (all)", &FIFO_QUEUE, true),
            exact("k8s.io/client-go/tools/cache.(*DeltaFIFO).Update", "client-go (all)", &FIFO_QUEUE, true),
            exact("k8s.io/client-go/tools/cache.(*DeltaFIFO).Delete", "client-go (all)", &FIFO_QUEUE, true),
        ],
    },
    RoleSpec {
        role: Role::ClientGoReflectorRv,
        component: Component::ClientGo,
        what: "reflector progress: one call per watch event, bookmark or list, with its resourceVersion",
        select: Select::First,
        candidates: &[exact(
            "k8s.io/client-go/tools/cache.(*Reflector).setLastSyncResourceVersion",
            "client-go (all)",
            &REFLECTOR_RV,
            true,
        )],
    },
    RoleSpec {
        role: Role::ClientGoHandler,
        component: Component::ClientGo,
        what: "an informer's listener starts a user's handler: one call per handler and event (OnDelete has \
               OnAdd's shape)",
        select: Select::All,
        // The pointer wrappers only: a listener calls through the interface.
        // Not `FilteringResourceEventHandler`, which calls one of these (it
        // would count the event twice).
        candidates: &[
            exact(
                "k8s.io/client-go/tools/cache.(*ResourceEventHandlerFuncs).OnAdd",
                "client-go (all)",
                &HANDLER_ADD,
                true,
            ),
            exact(
                "k8s.io/client-go/tools/cache.(*ResourceEventHandlerFuncs).OnUpdate",
                "client-go (all)",
                &HANDLER_UPDATE,
                true,
            ),
            exact(
                "k8s.io/client-go/tools/cache.(*ResourceEventHandlerFuncs).OnDelete",
                "client-go (all)",
                &HANDLER_ADD,
                true,
            ),
            exact(
                "k8s.io/client-go/tools/cache.(*ResourceEventHandlerDetailedFuncs).OnAdd",
                "client-go 0.27+",
                &HANDLER_ADD,
                false,
            ),
            exact(
                "k8s.io/client-go/tools/cache.(*ResourceEventHandlerDetailedFuncs).OnUpdate",
                "client-go 0.27+",
                &HANDLER_UPDATE,
                false,
            ),
            exact(
                "k8s.io/client-go/tools/cache.(*ResourceEventHandlerDetailedFuncs).OnDelete",
                "client-go 0.27+",
                &HANDLER_ADD,
                false,
            ),
        ],
    },
    RoleSpec {
        role: Role::ClientGoWatchDecode,
        component: Component::ClientGo,
        what: "a client-go watch client (informer or not) decodes a JSON frame off its HTTP stream: one call per \
               event and bookmark, told from other JSON by its caller",
        select: Select::First,
        candidates: &[exact(
            "k8s.io/apimachinery/pkg/runtime/serializer/json.(*Serializer).Decode",
            "apimachinery (all)",
            &JSON_DECODE,
            true,
        )],
    },
    RoleSpec {
        role: Role::GoMapAssign,
        component: Component::GoRuntime,
        what: "map assignment (generic and fast variants)",
        select: Select::All,
        candidates: runtime![
            "runtime.mapassign" => MAP_PTRKEY,
            "runtime.mapassign_fast32" => MAP_KEY32,
            "runtime.mapassign_fast32ptr" => MAP_PTRKEY,
            "runtime.mapassign_fast64" => MAP_PTRKEY,
            "runtime.mapassign_fast64ptr" => MAP_PTRKEY,
            "runtime.mapassign_faststr" => MAP_KEYSTR,
        ],
    },
    RoleSpec {
        role: Role::GoMapAccess,
        component: Component::GoRuntime,
        what: "map lookup (generic and fast variants; the _fat wrappers call these)",
        select: Select::All,
        candidates: runtime![
            "runtime.mapaccess1" => MAP_PTRKEY,
            "runtime.mapaccess2" => MAP_PTRKEY,
            "runtime.mapaccess1_fast32" => MAP_KEY32,
            "runtime.mapaccess2_fast32" => MAP_KEY32,
            "runtime.mapaccess1_fast64" => MAP_PTRKEY,
            "runtime.mapaccess2_fast64" => MAP_PTRKEY,
            "runtime.mapaccess1_faststr" => MAP_KEYSTR,
            "runtime.mapaccess2_faststr" => MAP_KEYSTR,
        ],
    },
    RoleSpec {
        role: Role::GoMapDelete,
        component: Component::GoRuntime,
        what: "map delete (generic and fast variants)",
        select: Select::All,
        candidates: runtime![
            "runtime.mapdelete" => MAP_PTRKEY,
            "runtime.mapdelete_fast32" => MAP_KEY32,
            "runtime.mapdelete_fast64" => MAP_PTRKEY,
            "runtime.mapdelete_faststr" => MAP_KEYSTR,
        ],
    },
    RoleSpec {
        role: Role::GoMapGrow,
        component: Component::GoRuntime,
        what: "map growth: where a classic bucket map's growth starts (Go <= 1.23), and Swiss tables' growth (1.24+)",
        select: Select::All,
        candidates: &[
            exact("runtime.hashGrow", "Go <= 1.23", &MAP_CLASSIC_GROW, true),
            exact("internal/runtime/maps.(*Map).growToSmall", "Go 1.24+", &MAP_SWISS_MAP_GROW, true),
            exact("internal/runtime/maps.(*Map).growToTable", "Go 1.24+", &MAP_SWISS_MAP_GROW, true),
            exact("internal/runtime/maps.(*table).rehash", "Go 1.24+", &MAP_SWISS_TABLE_GROW, true),
            exact("internal/runtime/maps.(*table).grow", "Go 1.24+", &MAP_SWISS_TABLE_GROW, true),
            exact("internal/runtime/maps.(*table).split", "Go 1.24+", &MAP_SWISS_TABLE_GROW, true),
        ],
    },
    // A classic map grows incrementally: after hashGrow, every assign and
    // delete evacuates one or two old buckets (growWork → evacuate) until
    // none is left, so these are hit about once per insert while a map
    // grows. A Swiss table moves everything inside its growth call.
    RoleSpec {
        role: Role::GoMapEvacuate,
        component: Component::GoRuntime,
        what: "map growth: a classic bucket map's incremental evacuations (Go <= 1.23)",
        select: Select::All,
        candidates: &[
            exact("runtime.growWork", "Go <= 1.23", &MAP_CLASSIC_GROW, true),
            exact("runtime.growWork_fast32", "Go <= 1.23", &MAP_CLASSIC_GROW, true),
            exact("runtime.growWork_fast64", "Go <= 1.23", &MAP_CLASSIC_GROW, true),
            exact("runtime.growWork_faststr", "Go <= 1.23", &MAP_CLASSIC_GROW, true),
            exact("runtime.evacuate", "Go <= 1.23", &MAP_CLASSIC_GROW, true),
            exact("runtime.evacuate_fast32", "Go <= 1.23", &MAP_CLASSIC_GROW, true),
            exact("runtime.evacuate_fast64", "Go <= 1.23", &MAP_CLASSIC_GROW, true),
            exact("runtime.evacuate_faststr", "Go <= 1.23", &MAP_CLASSIC_GROW, true),
        ],
    },
    RoleSpec {
        role: Role::GoGcAssist,
        component: Component::GoRuntime,
        what: "GC assist: a goroutine made to help the collector before it may allocate",
        select: Select::First,
        candidates: runtime!["runtime.gcAssistAlloc" => GC_ASSIST],
    },
    RoleSpec {
        role: Role::GoSchedExecute,
        component: Component::GoRuntime,
        what: "scheduler: a goroutine starts running on a thread (window run-queue time ends here)",
        select: Select::First,
        candidates: runtime!["runtime.execute" => SCHED_GP],
    },
    RoleSpec {
        role: Role::GoSchedPark,
        component: Component::GoRuntime,
        what: "scheduler: the running goroutine blocks (channel, timer, lock, network)",
        select: Select::First,
        candidates: runtime!["runtime.gopark" => GOPARK],
    },
    RoleSpec {
        role: Role::GoSchedReady,
        component: Component::GoRuntime,
        what: "scheduler: a parked goroutine becomes runnable",
        select: Select::First,
        candidates: runtime!["runtime.ready" => SCHED_GP],
    },
    RoleSpec {
        role: Role::GoSchedYield,
        component: Component::GoRuntime,
        what: "scheduler: a goroutine yields (Gosched) or is preempted, and waits to run again",
        select: Select::First,
        candidates: runtime!["runtime.goschedImpl" => SCHED_GP],
    },
];

// ---- calling conventions --------------------------------------------------------

/// Go's calling convention for a binary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Abi {
    /// ABIInternal: integer arguments in registers (amd64 Go 1.17+, arm64 1.18+).
    Register,
    /// ABI0: every argument on the stack.
    Stack,
}

impl Abi {
    pub fn as_str(self) -> &'static str {
        match self {
            Abi::Register => "register",
            Abi::Stack => "stack",
        }
    }
}

/// A machine register as the kernel's `pt_regs` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reg {
    Rax,
    Rbx,
    Rcx,
    Rdi,
    Rsi,
    R8,
    R9,
    R10,
    R11,
    R14,
    /// arm64 general register `Xn` (0..=30).
    X(u8),
}

impl Reg {
    pub fn name(self) -> String {
        match self {
            Reg::Rax => "rax".into(),
            Reg::Rbx => "rbx".into(),
            Reg::Rcx => "rcx".into(),
            Reg::Rdi => "rdi".into(),
            Reg::Rsi => "rsi".into(),
            Reg::R8 => "r8".into(),
            Reg::R9 => "r9".into(),
            Reg::R10 => "r10".into(),
            Reg::R11 => "r11".into(),
            Reg::R14 => "r14".into(),
            Reg::X(n) => format!("x{n}"),
        }
    }

    /// Byte offset of the register in the kernel's `struct pt_regs` (x86_64)
    /// or `struct user_pt_regs` (arm64: `regs[31]` first), as a kernel
    /// program reads it from a uprobe's context.
    pub fn pt_regs_offset(self) -> u64 {
        match self {
            Reg::R14 => 8,
            Reg::Rbx => 40,
            Reg::R11 => 48,
            Reg::R10 => 56,
            Reg::R9 => 64,
            Reg::R8 => 72,
            Reg::Rax => 80,
            Reg::Rcx => 88,
            Reg::Rsi => 104,
            Reg::Rdi => 112,
            Reg::X(n) => 8 * u64::from(n),
        }
    }
}

impl Serialize for Reg {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.name())
    }
}

impl std::fmt::Display for Reg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name())
    }
}

const AMD64_INT_REGS: [Reg; 9] =
    [Reg::Rax, Reg::Rbx, Reg::Rcx, Reg::Rdi, Reg::Rsi, Reg::R8, Reg::R9, Reg::R10, Reg::R11];
const ARM64_INT_REGS: usize = 16;

/// Where a value is at function entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ArgSource {
    Register(Reg),
    /// Byte offset from the stack pointer at entry (amd64: past the return
    /// address; arm64: past the caller's saved-LR slot).
    Stack(u64),
}

/// A concrete read for a kernel program.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ArgRead {
    pub name: String,
    pub source: ArgSource,
    /// Pointer chase: for each offset, value = *(u64 *)(value + offset).
    pub derefs: Vec<u64>,
    /// Bytes of the final value.
    pub size: u8,
    /// Measured on a running program of this architecture and ABI.
    pub verified: bool,
}

/// Assigns every flattened field of a signature to a register or stack slot,
/// following Go's rules for integer-class arguments: a parameter goes to
/// registers only if all of its fields fit in the remaining ones (otherwise
/// it goes to the stack as a whole and later parameters may still use
/// registers); stack arguments are laid out in order with natural alignment.
pub fn assign(sig: &Signature, arch: Arch, abi: Abi) -> Vec<(String, ArgSource, u8)> {
    let mut out = Vec::new();
    let mut next_reg = 0usize;
    // Both ABIs find stack arguments 8 bytes above SP at entry (return
    // address on amd64, the frame's LR slot on arm64).
    let mut stack: u64 = 8;
    let nregs = match (abi, arch) {
        (Abi::Stack, _) => 0,
        (Abi::Register, Arch::X86_64) => AMD64_INT_REGS.len(),
        (Abi::Register, Arch::Aarch64) => ARM64_INT_REGS,
    };
    for param in sig.params {
        let full = |f: &Field| {
            if f.name.is_empty() { param.name.to_string() } else { format!("{}.{}", param.name, f.name) }
        };
        if next_reg + param.fields.len() <= nregs {
            for field in param.fields {
                let reg = match arch {
                    Arch::X86_64 => AMD64_INT_REGS.get(next_reg).copied().unwrap_or(Reg::Rax),
                    Arch::Aarch64 => Reg::X(next_reg as u8),
                };
                out.push((full(field), ArgSource::Register(reg), field.size));
                next_reg += 1;
            }
        } else {
            let align = param.fields.iter().map(|f| u64::from(f.size)).max().unwrap_or(1);
            stack = stack.div_ceil(align) * align;
            for field in param.fields {
                let sz = u64::from(field.size);
                stack = stack.div_ceil(sz) * sz;
                out.push((full(field), ArgSource::Stack(stack), field.size));
                stack += sz;
            }
        }
    }
    out
}

/// Concrete reads for a candidate on a binary of this architecture and ABI.
pub fn arg_reads(sig: &Signature, arch: Arch, abi: Abi) -> Vec<ArgRead> {
    let slots = assign(sig, arch, abi);
    sig.reads
        .iter()
        .filter_map(|r| {
            let (_, source, size) = slots.iter().find(|(name, _, _)| name == r.field)?;
            let size = if r.derefs.is_empty() { *size } else { r.size };
            Some(ArgRead {
                name: r.name.to_string(),
                source: *source,
                derefs: r.derefs.to_vec(),
                size,
                // Measurements were made on amd64 with the register ABI; a
                // derived slot elsewhere is the same rule but not measured.
                verified: r.verified.is_some() && arch == Arch::X86_64 && abi == Abi::Register,
            })
        })
        .collect()
}

/// The register holding the current goroutine (`g`) at function entry.
pub fn g_register(arch: Arch, abi: Abi) -> Option<Reg> {
    match (arch, abi) {
        (Arch::X86_64, Abi::Register) => Some(Reg::R14),
        // ABI0 on amd64 keeps g in thread-local storage (fs:-8), not a register.
        (Arch::X86_64, Abi::Stack) => None,
        // arm64 has dedicated R28 to g under both conventions.
        (Arch::Aarch64, _) => Some(Reg::X(28)),
    }
}

/// Offset of `goid` in `runtime.g`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct GoidOffset {
    pub offset: u64,
    pub verified: bool,
    pub source: &'static str,
}

/// `goid`'s offset in `runtime.g` per Go minor version (64-bit targets).
///
/// Verified for 1.19 (Debian's go1.19.8) and 1.27 (go1.27.3) on amd64 and
/// arm64 two ways, by `tests/tests/inspect.rs::goid_offset_matches_dwarf_and_runtime`:
/// the DWARF of an unstripped fixture (`&((runtime.g*)0)->goid` in gdb) and
/// a live read of `*(r14 + offset)` at a breakpoint in the fixture's main
/// goroutine, which must be 1. The other rows are reported, not measured.
pub fn goid_offset(minor: u32) -> Option<GoidOffset> {
    let (offset, verified, source) = match minor {
        19 | 27 => (152, true, "measured: DWARF and a live read of the fixture's goroutine"),
        20..=22 => (152, false, "reported for Go 1.19-1.22; not measured here"),
        23 | 24 => (160, false, "reported for Go 1.23-1.24; not measured here"),
        25 | 26 => (152, false, "reported for Go 1.25-1.27; not measured here"),
        _ => return None,
    };
    Some(GoidOffset { offset, verified, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gopath_form_drops_only_the_major_version_element() {
        let g = |s: &str| gopath_form(s);
        assert_eq!(
            g("go.etcd.io/etcd/server/v3/mvcc.(*watchableStore).notify").as_deref(),
            Some("go.etcd.io/etcd/server/mvcc.(*watchableStore).notify")
        );
        assert_eq!(
            g("go.etcd.io/etcd/api/v3/etcdserverpb.(*watchWatchServer).Send").as_deref(),
            Some("go.etcd.io/etcd/api/etcdserverpb.(*watchWatchServer).Send")
        );
        assert_eq!(
            g("go.etcd.io/etcd/client/v3.(*watchGrpcStream).dispatchEvent").as_deref(),
            Some("go.etcd.io/etcd/client.(*watchGrpcStream).dispatchEvent")
        );
        // Nothing to drop: v1, a `v` that is no number, the first element.
        assert_eq!(g("go.etcd.io/etcd/mvcc.(*watchableStore).notify"), None);
        assert_eq!(g("example.com/v1/x.f"), None);
        assert_eq!(g("example.com/vendor/x.f"), None);
        assert_eq!(g("runtime.mapassign"), None);
        assert_eq!(g("v2/x.f"), None);
    }

    #[test]
    fn register_abi_matches_known_etcd_facts() {
        let r = arg_reads(&WATCHER_SEND, Arch::X86_64, Abi::Register);
        let get = |n: &str| r.iter().find(|a| a.name == n).unwrap().source;
        assert_eq!(get("watch_id"), ArgSource::Register(Reg::Rbx));
        assert_eq!(get("revision"), ArgSource::Register(Reg::R8));
        let n = arg_reads(&NOTIFY, Arch::X86_64, Abi::Register);
        assert_eq!(n[0].source, ArgSource::Register(Reg::Rbx));
        assert_eq!(n[1].source, ArgSource::Register(Reg::Rdi));
        let s = arg_reads(&GRPC_SEND, Arch::X86_64, Abi::Register);
        assert_eq!(s[0].source, ArgSource::Register(Reg::Rbx));
        assert_eq!(s[0].derefs, vec![0, 16]);
    }

    #[test]
    fn client_go_036_deltas_come_after_the_logger() {
        // Before 0.36: receiver, then obj (type, data): data in RCX.
        let old = arg_reads(&HANDLE_DELTAS, Arch::X86_64, Abi::Register);
        assert_eq!(old[0].source, ArgSource::Register(Reg::Rcx));
        // 0.36: receiver, logger (3 words: RBX, RCX, RDI), obj (RSI, R8).
        let new = arg_reads(&HANDLE_DELTAS_LOGGER, Arch::X86_64, Abi::Register);
        assert_eq!((new[0].source, new[0].derefs.as_slice()), (ArgSource::Register(Reg::R8), &[8u64][..]));
        // handleBatchDeltas: receiver, logger, deltas (ptr RSI, len R8).
        let batch = arg_reads(&HANDLE_BATCH_DELTAS, Arch::X86_64, Abi::Register);
        assert_eq!((batch[0].source, batch[0].derefs.is_empty()), (ArgSource::Register(Reg::R8), true));
    }

    #[test]
    fn stack_abi_lays_out_after_return_address() {
        let r = arg_reads(&WATCHER_SEND, Arch::X86_64, Abi::Stack);
        let get = |n: &str| r.iter().find(|a| a.name == n).unwrap().source;
        assert_eq!(get("watch_id"), ArgSource::Stack(16));
        assert_eq!(get("revision"), ArgSource::Stack(48));
        let k = assign(&MAP_KEY32, Arch::X86_64, Abi::Stack);
        assert_eq!(k[2].1, ArgSource::Stack(24));
        let a = arg_reads(&NOTIFY, Arch::Aarch64, Abi::Register);
        assert_eq!(a[0].source, ArgSource::Register(Reg::X(1)));
    }

    #[test]
    fn too_many_fields_spill_whole_param() {
        static BIG: Signature = Signature {
            params: &[
                p("a", &[f("0", 8), f("1", 8), f("2", 8), f("3", 8), f("4", 8), f("5", 8), f("6", 8), f("7", 8)]),
                p("b", SLICE),
                p("c", WORD),
            ],
            reads: &[],
        };
        let s = assign(&BIG, Arch::X86_64, Abi::Register);
        assert_eq!(s[8].1, ArgSource::Stack(8)); // b.ptr: does not fit in the one register left
        assert_eq!(s[11].1, ArgSource::Register(Reg::R11)); // c still gets a register
    }

    #[test]
    fn catalog_is_well_formed() {
        let mut roles = std::collections::HashSet::new();
        for r in CATALOG {
            assert!(roles.insert(r.role), "duplicate role {}", r.role);
            assert!(!r.candidates.is_empty());
            for c in r.candidates {
                let slots = assign(c.sig, Arch::X86_64, Abi::Register);
                for read in c.sig.reads {
                    assert!(slots.iter().any(|(n, _, _)| n == read.field), "{}: no field {}", r.role, read.field);
                }
            }
        }
    }
}
