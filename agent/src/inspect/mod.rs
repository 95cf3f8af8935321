//! The "inspect" stage: read a (usually stripped) Go binary and find exactly
//! where to place probes, or refuse and say why.
//!
//! Sources of truth, in order: `.gopclntab` for every function's name, entry
//! and size (it survives `-s -w`); the runtime module data or the pclntab
//! header for the text start those entries are relative to; `.go.buildinfo`
//! for the Go version (hence the calling convention) and modules; the load
//! segments for file offsets. `.symtab`, when present, is only a cross-check.
//!
//! The file is memory-mapped and parsed in place: nothing is decoded until it
//! is asked for except the function name index, and only the probed
//! functions are disassembled (to find their return instructions).
//!
//! Entry points: [`inspect_path`], [`Cache::inspect`] (the one the agent
//! uses: one inspection per file identity), and on the result
//! [`Inspection::resolve`] for any symbol.

pub mod buildinfo;
pub mod catalog;
pub mod disasm;
pub mod elf;
pub mod gotypes;
pub mod layout;
pub mod moduledata;
pub mod pclntab;
pub mod prologue;

use std::{
    collections::HashMap,
    fs::File,
    io,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicU64, Ordering},
    },
};

use serde::Serialize;

pub use buildinfo::{BuildInfo, GoVersion, Module};
pub use catalog::{Abi, ArgRead, ArgSource, Component, GoidOffset, Reg, Role};
pub use elf::Arch;
pub use gotypes::{FieldLayout, StructLayout, TypeError, TypeInfo};
pub use pclntab::PclnVersion;
/// The regular expressions `functions_matching` takes.
pub use regex::Regex;

use elf::{ElfInfo, ElfMemory, Memory};
use pclntab::{PclnLayout, Pclntab};

/// Why a file could not be inspected. Every message names the file.
#[derive(Debug, Clone, thiserror::Error)]
pub enum InspectError {
    #[error("{path}: {err}")]
    Io { path: String, err: Arc<io::Error> },
    #[error("{path}: not an ELF file ({reason})")]
    NotElf { path: String, reason: String },
    #[error("{path}: unsupported binary: {reason}")]
    Unsupported { path: String, reason: String },
    #[error("{path}: truncated: {reason}")]
    Truncated { path: String, reason: String },
    #[error("{path}: corrupt ELF: {reason}")]
    CorruptElf { path: String, reason: String },
    #[error("{path}: not a Go binary: {reason}")]
    NotGo { path: String, reason: String },
    #[error("{path}: unknown pclntab magic {magic:#010x}")]
    UnknownPclntabMagic { path: String, magic: u32 },
    #[error("{path}: corrupt pclntab: {reason}")]
    CorruptPclntab { path: String, reason: String },
    #[error("{path}: corrupt Go build info: {reason}")]
    CorruptBuildInfo { path: String, reason: String },
    #[error("{path}: cannot determine the text start: {reason}")]
    TextStart { path: String, reason: String },
    #[error("{path}: function range outside its segment: {reason}")]
    OutsideSegment { path: String, reason: String },
}

impl InspectError {
    fn io(path: &Path, err: io::Error) -> Self {
        InspectError::Io { path: path.display().to_string(), err: Arc::new(err) }
    }
}

/// Why one symbol cannot be probed (the file as a whole is fine).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    #[error("no function named {0} in pclntab")]
    NotFound(String),
    #[error("{name}: unusable: {reason}")]
    Unusable { name: String, reason: String },
}

/// (device, inode, size, mtime): the same file seen through any path or
/// container mount has the same identity, and a replaced file a new one.
/// mtime is kept as stat gives it, seconds and nanoseconds apart: any time a
/// filesystem can hold stays exact and distinct (no seconds × 10^9 to
/// overflow past 2262), and the derived order is chronological.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct FileIdentity {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime_sec: i64,
    pub mtime_nsec: i64,
}

impl FileIdentity {
    pub fn of(meta: &std::fs::Metadata) -> FileIdentity {
        FileIdentity {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime_sec: meta.mtime(),
            mtime_nsec: meta.mtime_nsec(),
        }
    }
}

/// A function from pclntab.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Function {
    pub name: String,
    /// Link-time virtual address (what `go tool nm` prints, also for PIE).
    pub address: u64,
    pub size: u64,
    /// From the function's pc-value table (exact: equal to the linker's
    /// symbol size, as the fixture tests check against `go tool nm`, except
    /// for linker-made `go:` markers) rather than the distance to the next
    /// function (an upper bound that includes alignment padding).
    pub size_exact: bool,
    /// `None` if the function is not inside a file-backed load segment.
    pub file_offset: Option<u64>,
}

/// A function ready for uprobes: entry and every return, as file offsets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ResolvedFunction {
    pub name: String,
    pub address: u64,
    pub size: u64,
    pub file_offset: u64,
    pub return_offsets: Vec<u64>,
}

/// One direct call of a function: where it returns to and where, in the
/// caller, its return can be seen without a probe on the callee's RETs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirectCall {
    pub caller: String,
    /// Link-time address the call returns to.
    pub return_address: u64,
    /// The first branch (kernel-emulated) after the call, or why there is
    /// none (a wrapper that returns right after the call).
    pub end: Result<EndSite, String>,
}

/// A probe site that sees a call has returned (link-time address, file
/// offset).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EndSite {
    pub address: u64,
    pub file_offset: u64,
}

/// A probe the catalog asked for and the binary has.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Probe {
    pub role: Role,
    pub component: Component,
    pub symbol: String,
    pub address: u64,
    pub file_offset: u64,
    pub size: u64,
    pub return_offsets: Vec<u64>,
    /// Reads at entry, for this binary's architecture and ABI.
    pub args: Vec<ArgRead>,
    /// Why `args` is empty or partial, if it is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub args_note: Option<String>,
    /// Which versions the matched catalog name is for.
    pub versions: &'static str,
    /// The catalog's name for this version was seen in a real binary.
    pub name_verified: bool,
}

/// A role the binary cannot serve, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Unresolved {
    pub role: Role,
    pub component: Component,
    pub reason: String,
}

/// Where the function table was and how it was found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PclntabInfo {
    pub format: PclnVersion,
    pub magic: u32,
    pub address: u64,
    pub file_offset: u64,
    pub functions: usize,
    pub found_by: &'static str,
}

enum Bytes {
    Map(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl Bytes {
    fn get(&self) -> &[u8] {
        match self {
            Bytes::Map(m) => m,
            Bytes::Owned(v) => v,
        }
    }

    /// Unmaps the pages of `len` bytes at `offset` from this process (they
    /// stay in the page cache): a scan that reads a whole text segment once
    /// would otherwise leave it all in the agent's RSS (7.6 MB for etcdctl).
    fn release(&self, offset: usize, len: usize) {
        if let Bytes::Map(m) = self {
            // SAFETY: a read-only mapping of a file: a dropped page is read
            // again from the file on its next access, with the same bytes,
            // so every slice borrowed from the mapping stays valid.
            let _ = unsafe { m.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, offset, len) };
        }
    }
}

/// The file bytes and everything parsed from them, as offsets.
struct Image {
    bytes: Bytes,
    elf: ElfInfo,
    pcln_start: usize,
    pcln_end: usize,
    layout: PclnLayout,
    /// Added to raw functab entries: the text start for 1.18+ tables, 0
    /// before (entries are addresses there).
    entry_base: u64,
    names: OnceLock<NameIndex>,
    /// Where the type descriptors are and how to read them.
    types: Result<gotypes::TypeSetup, TypeError>,
    /// Built on first use: a walk of the whole type graph.
    type_index: OnceLock<Result<gotypes::TypeIndex, TypeError>>,
}

/// Function names by hash: built once, no per-name allocation.
struct NameIndex {
    /// Per function: offset (in the pclntab slice) and length of its name.
    spans: Vec<(u32, u32)>,
    by_hash: Vec<(u64, u32)>,
    /// Names with a `/vendor/` segment, hashed by the part after the last one.
    vendored: Vec<(u64, u32)>,
}

fn name_hash(b: &[u8]) -> u64 {
    // FxHash-style: fast on the short ASCII names Go uses; collisions are
    // resolved by comparing the names.
    let mut h: u64 = b.len() as u64;
    let mut chunks = b.chunks_exact(8);
    for c in &mut chunks {
        let w = u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
        h = (h.rotate_left(5) ^ w).wrapping_mul(0x517c_c1b7_2722_0a95);
    }
    for &x in chunks.remainder() {
        h = (h.rotate_left(5) ^ u64::from(x)).wrapping_mul(0x517c_c1b7_2722_0a95);
    }
    h
}

const VENDOR: &[u8] = b"/vendor/";

/// The image as memory, for readers that outlive one function (the type index).
impl Memory for Image {
    fn bytes(&self, vaddr: u64, len: u64) -> Option<&[u8]> {
        let p = self.elf.place(vaddr, len)?;
        let start = usize::try_from(p.file_offset).ok()?;
        self.data().get(start..start.checked_add(usize::try_from(len).ok()?)?)
    }
    fn ptr(&self, vaddr: u64, ptr_size: u8) -> Option<u64> {
        if let Some(v) = self.elf.relocated(vaddr) {
            return Some(v);
        }
        elf::read_uint(self.bytes(vaddr, u64::from(ptr_size))?, ptr_size)
    }
}

impl Image {
    fn data(&self) -> &[u8] {
        self.bytes.get()
    }

    fn type_reader(&self) -> Result<gotypes::Reader<'_>, TypeError> {
        let setup = self.types.clone()?;
        Ok(gotypes::Reader { mem: self, setup })
    }

    fn type_index(&self) -> Result<&gotypes::TypeIndex, TypeError> {
        let r = self.type_reader()?;
        self.type_index.get_or_init(|| r.index()).as_ref().map_err(Clone::clone)
    }

    fn table(&self) -> Pclntab<'_> {
        let d = self.data().get(self.pcln_start..self.pcln_end).unwrap_or_default();
        Pclntab::from_layout(d, self.layout)
    }

    fn names(&self) -> &NameIndex {
        self.names.get_or_init(|| {
            let t = self.table();
            let n = t.nfunc();
            let mut spans = Vec::with_capacity(n);
            let mut by_hash = Vec::with_capacity(n);
            let mut vendored = Vec::new();
            let base = self.layout.funcnametab;
            for i in 0..n {
                // A function whose record is unreadable keeps an empty name
                // and can never be resolved.
                let name = t.func(i).and_then(|f| t.name_bytes(f.name_off).map(|b| (f.name_off, b)));
                let (off, b) = name.unwrap_or((0, &[]));
                let start = (off as usize).saturating_add(base);
                spans.push((u32::try_from(start).unwrap_or(u32::MAX), u32::try_from(b.len()).unwrap_or(0)));
                if b.is_empty() {
                    continue;
                }
                by_hash.push((name_hash(b), i as u32));
                if let Some(pos) = b.windows(VENDOR.len()).rposition(|w| w == VENDOR) {
                    let rest = b.get(pos + VENDOR.len()..).unwrap_or_default();
                    vendored.push((name_hash(rest), i as u32));
                }
            }
            by_hash.sort_unstable();
            vendored.sort_unstable();
            NameIndex { spans, by_hash, vendored }
        })
    }

    fn name_of(&self, i: usize) -> &[u8] {
        let Some(&(start, len)) = self.names().spans.get(i) else { return &[] };
        let t = self.table().data();
        let start = start as usize;
        t.get(start..start.saturating_add(len as usize)).unwrap_or_default()
    }

    /// Function indexes named exactly `name` (several for ABI wrappers that
    /// share a name with their assembly target).
    fn lookup(&self, name: &str) -> Vec<usize> {
        let idx = self.names();
        let h = name_hash(name.as_bytes());
        let mut out = Vec::new();
        for list in [&idx.by_hash, &idx.vendored] {
            let start = list.partition_point(|&(x, _)| x < h);
            for &(x, i) in list.get(start..).unwrap_or_default() {
                if x != h {
                    break;
                }
                let n = self.name_of(i as usize);
                let matches = if std::ptr::eq(list, &idx.by_hash) {
                    n == name.as_bytes()
                } else {
                    n.ends_with(name.as_bytes())
                        && n.len() >= name.len() + VENDOR.len()
                        && n.get(n.len() - name.len() - VENDOR.len()..n.len() - name.len()) == Some(VENDOR)
                };
                if matches {
                    out.push(i as usize);
                }
            }
            if !out.is_empty() {
                break;
            }
        }
        out.sort_unstable();
        out
    }

    /// Several functions share the name (an assembly function and its ABI
    /// wrapper, or generic instantiations Go 1.18-1.19 name `[...]`): which
    /// one is meant cannot be told from pclntab, so none is chosen.
    fn ambiguous(&self, idx: &[usize]) -> ResolveError {
        let addrs: Vec<String> =
            idx.iter().filter_map(|&i| self.function(i).ok()).map(|f| format!("{:#x}", f.address)).collect();
        ResolveError::Unusable {
            name: String::from_utf8_lossy(idx.first().map(|&i| self.name_of(i)).unwrap_or_default()).into_owned(),
            reason: format!("{} functions share this name (at {}); refusing to pick one", idx.len(), addrs.join(", ")),
        }
    }

    fn function(&self, i: usize) -> Result<Function, String> {
        let t = self.table();
        let f = t.func(i).map_err(|e| e.to_string())?;
        let name = String::from_utf8_lossy(self.name_of(i)).into_owned();
        let address = self.entry_base.checked_add(f.entry_raw).ok_or_else(|| format!("{name}: entry overflows"))?;
        let (size, size_exact) = match t.pcsp_size(&f).map_err(|e| format!("{name}: {e}"))? {
            Some(s) => (s, true),
            None => (f.next_raw.saturating_sub(f.entry_raw), false),
        };
        let file_offset = self.elf.place(address, size.max(1)).map(|p| p.file_offset);
        Ok(Function { name, address, size, size_exact, file_offset })
    }

    /// The function whose code holds `addr` (binary search of the table,
    /// which is sorted by entry).
    fn function_containing(&self, addr: u64) -> Option<Function> {
        let t = self.table();
        let raw = addr.checked_sub(self.entry_base)?;
        let (mut lo, mut hi) = (0usize, t.nfunc());
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if t.entry_raw(mid).ok()? <= raw {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        let f = self.function(lo.checked_sub(1)?).ok()?;
        (addr >= f.address && addr - f.address < f.size).then_some(f)
    }

    fn resolve_index(&self, i: usize) -> Result<ResolvedFunction, ResolveError> {
        let f = self.function(i).map_err(|reason| ResolveError::Unusable {
            name: String::from_utf8_lossy(self.name_of(i)).into_owned(),
            reason,
        })?;
        let unusable = |reason: String| ResolveError::Unusable { name: f.name.clone(), reason };
        let t = self.table();
        let raw = t.func(i).map_err(|e| unusable(e.to_string()))?;
        // An exact size from the pc-value table must also fit before the
        // next function: otherwise one of the two tables is wrong.
        if f.size_exact && f.size > raw.next_raw.saturating_sub(raw.entry_raw) {
            return Err(unusable(format!(
                "size {} runs into the next function at +{:#x}",
                f.size,
                raw.next_raw.saturating_sub(raw.entry_raw)
            )));
        }
        if f.size == 0 {
            return Err(unusable("function has no code".into()));
        }
        let place = self.elf.place(f.address, f.size).ok_or_else(|| {
            unusable(match self.elf.segment_of(f.address) {
                Some(_) => format!("{:#x}+{:#x} crosses the end of its segment's file data", f.address, f.size),
                None => format!("{:#x} is in no load segment", f.address),
            })
        })?;
        if !place.segment.executable() {
            return Err(unusable(format!("{:#x} is in a non-executable segment", f.address)));
        }
        let start = usize::try_from(place.file_offset).map_err(|_| unusable("offset overflows".into()))?;
        let end = usize::try_from(f.size)
            .ok()
            .and_then(|s| start.checked_add(s))
            .ok_or_else(|| unusable("size overflows".into()))?;
        let code = self.data().get(start..end).ok_or_else(|| unusable("code outside the file".into()))?;
        let rets = disasm::return_offsets(self.elf.arch, code, f.address).map_err(|e| unusable(e.to_string()))?;
        Ok(ResolvedFunction {
            return_offsets: rets.iter().map(|r| place.file_offset + r).collect(),
            name: f.name,
            address: f.address,
            size: f.size,
            file_offset: place.file_offset,
        })
    }
}

/// Everything known about one binary, and the means to resolve more.
pub struct Inspection {
    /// The path it was opened through (the first one, for a cache hit).
    pub path: PathBuf,
    pub identity: Option<FileIdentity>,
    /// As written in the build info (`go1.19.8`); `None` before Go 1.13 or
    /// when the build info is missing.
    pub go_version: Option<String>,
    pub version: Option<GoVersion>,
    pub arch: Arch,
    /// `None` when the Go version cannot be told (argument reads are then
    /// withheld: guessing the convention would read garbage).
    pub abi: Option<Abi>,
    pub stripped: bool,
    pub has_dwarf: bool,
    pub pie: bool,
    pub cgo: bool,
    pub external_link: bool,
    pub build_info: Option<BuildInfo>,
    /// The address pclntab entries are relative to (1.18+), or the runtime's
    /// text start (older tables hold absolute addresses).
    pub text_start: u64,
    pub text_start_source: &'static str,
    pub pclntab: PclntabInfo,
    /// Address of the runtime module data, when found.
    pub moduledata: Option<u64>,
    /// The type descriptor tables it points at (see [`Inspection::struct_layout`]).
    pub type_tables: Option<moduledata::TypeTables>,
    pub goid: Option<GoidOffset>,
    pub g_register: Option<Reg>,
    pub probes: Vec<Probe>,
    pub unresolved: Vec<Unresolved>,
    /// The etcd struct layout the watch-path probes read, identified from
    /// the binary (only for binaries with an etcd role).
    pub etcd_layout: Option<layout::EtcdLayout>,
    /// Cross-check results and other remarks worth showing a person.
    pub notes: Vec<String>,
    image: Arc<Image>,
}

impl std::fmt::Debug for Inspection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inspection")
            .field("path", &self.path)
            .field("go_version", &self.go_version)
            .field("arch", &self.arch)
            .field("abi", &self.abi)
            .field("probes", &self.probes.len())
            .finish_non_exhaustive()
    }
}

impl Inspection {
    /// Resolves any function by its exact pclntab name (as `go tool nm`
    /// prints it, e.g. `main.(*server).handle`): entry and return sites as
    /// file offsets. Names under a GOPATH `/vendor/` prefix also match.
    pub fn resolve(&self, symbol: &str) -> Result<ResolvedFunction, ResolveError> {
        let r = match self.image.lookup(symbol).as_slice() {
            [] => return Err(ResolveError::NotFound(symbol.to_string())),
            [i] => self.image.resolve_index(*i)?,
            many => return Err(self.image.ambiguous(many)),
        };
        self.cross_check(&r)?;
        Ok(r)
    }

    /// `len` bytes of the file at `file_offset`, from the inspection's own
    /// mapping (e.g. a function's first instructions, to place an entry
    /// probe after its prologue) without opening the file again.
    pub fn bytes_at(&self, file_offset: u64, len: usize) -> Option<&[u8]> {
        let start = usize::try_from(file_offset).ok()?;
        self.image.data().get(start..start.checked_add(len)?)
    }

    /// The layout of the one struct type whose Go type string is `name`
    /// (`mvccpb.Event`: package name, not path), read from the binary's
    /// type descriptors. Several packages with that name make it
    /// [`TypeError::Ambiguous`]; [`Inspection::struct_layout_in`] picks one.
    /// The first call walks the whole type graph (tens of ms for etcd).
    pub fn struct_layout(&self, name: &str) -> Result<StructLayout, TypeError> {
        self.struct_layout_in(name, None)
    }

    /// As [`Inspection::struct_layout`], among types of package `pkg_path`
    /// (the full import path, e.g. `go.etcd.io/etcd/api/v3/mvccpb`) if given.
    pub fn struct_layout_in(&self, name: &str, pkg_path: Option<&str>) -> Result<StructLayout, TypeError> {
        let r = self.image.type_reader()?;
        self.image.type_index()?.struct_layout(&r, name, pkg_path)
    }

    /// Every type descriptor whose type string is `name`, of any kind.
    pub fn types_named(&self, name: &str) -> Result<Vec<TypeInfo>, TypeError> {
        let r = self.image.type_reader()?;
        self.image.type_index()?.addrs(name).iter().map(|&a| r.info(a)).collect()
    }

    /// How many type descriptors are reachable (walks the graph once).
    pub fn type_count(&self) -> Result<usize, TypeError> {
        Ok(self.image.type_index()?.len())
    }

    /// Every direct call of the function at `target` in the binary, each
    /// with where it can be seen to have returned without a probe on the
    /// callee's RETs: the first branch after the call that the kernel
    /// emulates (see [`disasm::x86_first_branch`]). Calls through a
    /// function value or an interface have no call site here; the kernel
    /// program recognises them by their return address and leaves them
    /// untimed (see `agent-ebpf/src/goruntime.rs`). amd64 only. More than
    /// `max` direct calls is an error (each is a probe, or an entry in the
    /// kernel's table of call sites).
    pub fn direct_calls(&self, target: u64, max: usize) -> Result<Vec<DirectCall>, String> {
        if self.arch != Arch::X86_64 {
            return Err("ends in the caller are decoded on amd64 only".into());
        }
        let seg = *self
            .image
            .elf
            .segment_of(target)
            .filter(|s| s.executable())
            .ok_or_else(|| format!("{target:#x} is in no executable segment"))?;
        let start = usize::try_from(seg.offset).map_err(|_| "segment offset overflows".to_string())?;
        let len = usize::try_from(seg.filesz).map_err(|_| "segment size overflows".to_string())?;
        let text = self
            .image
            .data()
            .get(start..start.saturating_add(len))
            .ok_or_else(|| "the executable segment runs past the file".to_string())?;
        let mut out = Vec::new();
        // Scanned pages are let go of behind the cursor, a MB at a time.
        const RELEASE: usize = 1 << 20;
        let mut released = 0;
        let mut failure = None;
        for i in memchr::memchr_iter(0xe8, text) {
            if i - released >= 2 * RELEASE {
                self.image.bytes.release(start + released, RELEASE);
                released += RELEASE;
            }
            let Some(rel) = text.get(i + 1..i + 5).and_then(|b| <[u8; 4]>::try_from(b).ok()) else { continue };
            // Addresses from the file's headers: checked, never trusted.
            let Some((at, ret)) = seg.vaddr.checked_add(i as u64).and_then(|a| Some((a, a.checked_add(5)?))) else {
                continue;
            };
            if ret.wrapping_add_signed(i64::from(i32::from_le_bytes(rel))) != target {
                continue;
            }
            // An E8 byte with the right displacement may sit inside another
            // instruction: decode the containing function to be sure.
            let Some(f) = self.image.function_containing(at) else { continue };
            let Some(f_start) = f.address.checked_sub(seg.vaddr).and_then(|o| usize::try_from(o).ok()) else {
                continue;
            };
            let Some(code) = text.get(f_start..f_start.saturating_add(f.size as usize)) else { continue };
            if !disasm::x86_calls_at(code, f.address, at, target) {
                continue;
            }
            if out.len() == max {
                failure = Some(format!("more than {max} direct calls of it (each would be a probe)"));
                break;
            }
            let rest = code.get((i + 5).saturating_sub(f_start)..).unwrap_or_default();
            let end = disasm::x86_first_branch(rest, ret, 24).map(|off| {
                // Inside `code`, so inside the segment: these cannot overflow.
                let in_segment = (i + 5) as u64 + off;
                EndSite {
                    address: seg.vaddr.saturating_add(in_segment),
                    file_offset: seg.offset.saturating_add(in_segment),
                }
            });
            let end = end.map_err(|e| format!("called from {}: {e}", f.name));
            out.push(DirectCall { caller: f.name.clone(), return_address: ret, end });
        }
        self.image.bytes.release(start + released, len - released);
        match failure {
            Some(why) => Err(why),
            None => Ok(out),
        }
    }

    /// Lets go of the file's pages this process has touched (they stay in
    /// the page cache, and a later read faults them in again): the agent
    /// maps every binary it inspects, and what an inspection and a plan read
    /// (tables, prologues, a whole text segment for the window call sites)
    /// would otherwise stay in its RSS for as long as the binary is cached.
    pub fn release_pages(&self) {
        self.image.bytes.release(0, self.image.data().len());
    }

    /// The function record only (no disassembly).
    pub fn function(&self, symbol: &str) -> Option<Function> {
        let i = *self.image.lookup(symbol).first()?;
        self.image.function(i).ok()
    }

    /// Every function whose name matches `re`, in address order.
    pub fn functions_matching(&self, re: &regex::Regex) -> Vec<Function> {
        (0..self.pclntab.functions)
            .filter(|&i| std::str::from_utf8(self.image.name_of(i)).is_ok_and(|n| re.is_match(n)))
            .filter_map(|i| self.image.function(i).ok())
            .collect()
    }

    /// Every function (decodes the whole table: for tests and tools).
    pub fn functions(&self) -> impl Iterator<Item = Function> + '_ {
        (0..self.pclntab.functions).filter_map(|i| self.image.function(i).ok())
    }

    /// Probes of one role (several for `Select::All` roles).
    pub fn probes_for(&self, role: Role) -> impl Iterator<Item = &Probe> + '_ {
        self.probes.iter().filter(move |p| p.role == role)
    }

    /// The JSON report (the contract of `watchscope inspect --json`).
    pub fn report(&self, functions: Option<&regex::Regex>) -> Report<'_> {
        Report {
            path: self.path.display().to_string(),
            go_version: self.go_version.as_deref(),
            arch: self.arch,
            abi: self.abi,
            stripped: self.stripped,
            pie: self.pie,
            cgo: self.cgo,
            external_link: self.external_link,
            main_module: self.build_info.as_ref().and_then(|b| {
                let m = b.main.as_ref();
                let path = m.map(|m| m.path.clone()).or_else(|| b.path.clone())?;
                Some(MainModule { path, version: m.and_then(|m| m.version.clone()) })
            }),
            build_settings: self.build_info.as_ref().map(|b| b.settings.iter().cloned().collect()),
            deps: self.build_info.as_ref().map(|b| &b.deps[..]),
            text_start: self.text_start,
            text_start_source: self.text_start_source,
            pclntab: &self.pclntab,
            moduledata: self.moduledata,
            goid_offset: self.goid,
            g_register: self.g_register,
            probes: &self.probes,
            unresolved: &self.unresolved,
            etcd_layout: self.etcd_layout.as_ref(),
            notes: &self.notes,
            functions: functions.map(|re| {
                self.functions_matching(re)
                    .into_iter()
                    .map(|f| ReportFunction {
                        name: f.name,
                        address: f.address,
                        file_offset: f.file_offset,
                        size: f.size,
                    })
                    .collect()
            }),
        }
    }

    /// With `.symtab` present, pclntab's answer must agree with it.
    fn cross_check(&self, r: &ResolvedFunction) -> Result<(), ResolveError> {
        if self.stripped {
            return Ok(());
        }
        let found = elf::symtab_lookup(self.image.data(), &[&r.name]);
        match found.first().copied().flatten() {
            Some((addr, size)) if addr != r.address || (size != 0 && size != r.size) => Err(ResolveError::Unusable {
                name: r.name.clone(),
                reason: format!("pclntab says {:#x}+{:#x} but .symtab says {addr:#x}+{size:#x}", r.address, r.size),
            }),
            _ => Ok(()),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct MainModule {
    pub path: String,
    pub version: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct ReportFunction {
    pub name: String,
    pub address: u64,
    pub file_offset: Option<u64>,
    pub size: u64,
}

/// `watchscope inspect --json` output.
#[derive(Debug, Serialize)]
pub struct Report<'a> {
    pub path: String,
    pub go_version: Option<&'a str>,
    pub arch: Arch,
    pub abi: Option<Abi>,
    pub stripped: bool,
    pub pie: bool,
    pub cgo: bool,
    pub external_link: bool,
    pub main_module: Option<MainModule>,
    pub build_settings: Option<std::collections::BTreeMap<String, String>>,
    pub deps: Option<&'a [Module]>,
    pub text_start: u64,
    pub text_start_source: &'static str,
    pub pclntab: &'a PclntabInfo,
    pub moduledata: Option<u64>,
    pub goid_offset: Option<GoidOffset>,
    pub g_register: Option<Reg>,
    pub probes: &'a [Probe],
    pub unresolved: &'a [Unresolved],
    #[serde(skip_serializing_if = "Option::is_none")]
    pub etcd_layout: Option<&'a layout::EtcdLayout>,
    pub notes: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    pub functions: Option<Vec<ReportFunction>>,
}

/// Inspects the file at `path` (no caching).
pub fn inspect_path(path: &Path) -> Result<Inspection, InspectError> {
    let file = File::open(path).map_err(|e| InspectError::io(path, e))?;
    let meta = file.metadata().map_err(|e| InspectError::io(path, e))?;
    inspect_file(path, &file, &meta)
}

fn inspect_file(path: &Path, file: &File, meta: &std::fs::Metadata) -> Result<Inspection, InspectError> {
    if !meta.is_file() {
        return Err(InspectError::NotElf { path: path.display().to_string(), reason: "not a regular file".into() });
    }
    let bytes = if meta.len() == 0 {
        Bytes::Owned(Vec::new())
    } else {
        // SAFETY: the map is read-only and private. Its contents can still
        // change if another process truncates or rewrites the file in place;
        // executables in use cannot be opened for writing (ETXTBSY), image
        // layers are immutable, and the cache re-inspects a file whose
        // identity (size, mtime) changed.
        match unsafe { memmap2::Mmap::map(file) } {
            Ok(m) => Bytes::Map(m),
            Err(_) => Bytes::Owned(std::fs::read(path).map_err(|e| InspectError::io(path, e))?),
        }
    };
    analyze(path.to_path_buf(), Some(FileIdentity::of(meta)), bytes)
}

/// Inspects bytes already in memory (tests, fuzzing).
pub fn inspect_bytes(path: &Path, data: Vec<u8>) -> Result<Inspection, InspectError> {
    analyze(path.to_path_buf(), None, Bytes::Owned(data))
}

fn analyze(path: PathBuf, identity: Option<FileIdentity>, bytes: Bytes) -> Result<Inspection, InspectError> {
    let p = path.display().to_string();
    let data = bytes.get();
    let elf = ElfInfo::parse(data).map_err(|e| match e {
        elf::ElfError::NotElf(reason) => InspectError::NotElf { path: p.clone(), reason },
        elf::ElfError::Unsupported(reason) => InspectError::Unsupported { path: p.clone(), reason },
        elf::ElfError::Truncated(reason) => InspectError::Truncated { path: p.clone(), reason },
        elf::ElfError::Corrupt(reason) => InspectError::CorruptElf { path: p.clone(), reason },
    })?;
    let mem = ElfMemory { info: &elf, data };

    // Build info first: it is what makes a file "Go" even if the table is damaged.
    let bi_addr =
        elf.section(".go.buildinfo").filter(|s| !s.nobits).map(|s| s.addr).or_else(|| scan_buildinfo(&elf, &mem));
    let build_info = match bi_addr {
        Some(a) => Some(
            buildinfo::parse(&mem, a)
                .map_err(|e| InspectError::CorruptBuildInfo { path: p.clone(), reason: e.to_string() })?,
        ),
        None => None,
    };

    let (pcln_vaddr, pcln_start, pcln_end, found_by) = match find_pclntab(&elf, data, &p) {
        Ok(found) => found,
        Err(PclnSearch::Failed(e)) => return Err(e),
        Err(PclnSearch::NotFound { unknown_magic: Some(magic) }) if build_info.is_some() => {
            return Err(InspectError::UnknownPclntabMagic { path: p, magic });
        }
        Err(PclnSearch::NotFound { .. }) => {
            return Err(InspectError::NotGo {
                path: p,
                reason: if build_info.is_some() {
                    "it has Go build info but no function table (pclntab) could be found".into()
                } else {
                    "no .gopclntab section, no runtime.pclntab symbol and no valid table in any segment".into()
                },
            });
        }
    };
    let table_bytes = data.get(pcln_start..pcln_end).unwrap_or_default();
    let table = Pclntab::parse(table_bytes).map_err(|e| match e {
        pclntab::PclnError::UnknownMagic(magic) => InspectError::UnknownPclntabMagic { path: p.clone(), magic },
        pclntab::PclnError::Corrupt(reason) => InspectError::CorruptPclntab { path: p.clone(), reason },
    })?;
    let layout = table.layout;
    let bad_table = |e: pclntab::PclnError| InspectError::CorruptPclntab { path: p.clone(), reason: e.to_string() };
    let first_raw = table.entry_raw(0).map_err(bad_table)?;
    let end_raw = table.entry_raw(layout.nfunc).map_err(bad_table)?;

    // The module data: `.go.module` (Go 1.26+), else any pointer-aligned
    // word in the writable segments that points at the table.
    let expect = moduledata::Expect { pcln_vaddr, layout, first_raw, end_raw };
    let mut md_candidates: Vec<u64> = Vec::new();
    if let Some(s) = elf.section(".go.module").filter(|s| !s.nobits) {
        md_candidates.push(s.addr);
    }
    for seg in elf.segments.iter().filter(|s| s.writable()) {
        md_candidates.extend(moduledata::scan_words(&mem, seg.vaddr, seg.filesz, layout.ptr_size, pcln_vaddr));
    }
    md_candidates.extend(elf.relocs_with_value(pcln_vaddr));
    let mds = moduledata::find(&mem, md_candidates, &expect);
    let mut notes = Vec::new();
    let md = match mds.as_slice() {
        [] => None,
        [one] => Some(*one),
        [first, rest @ ..] => {
            if rest.iter().any(|m| m.text != first.text) {
                return Err(InspectError::TextStart {
                    path: p,
                    reason: format!("{} module data candidates disagree on the text start", mds.len()),
                });
            }
            Some(*first)
        }
    };

    let symtab_text = if elf.has_symtab { elf::symtab_value(data, "runtime.text") } else { None };
    let (entry_base, text_start, text_start_source) = if layout.version.relative_entries() {
        let header = layout
            .text_start_word
            .and_then(|w| pcln_vaddr.checked_add(w as u64))
            .and_then(|a| mem.ptr(a, layout.ptr_size))
            .filter(|&v| v != 0);
        let mut sources: Vec<(&'static str, u64)> = Vec::new();
        if let Some(m) = md {
            sources.push(("runtime module data", m.text));
        }
        if let Some(h) = header {
            sources.push(("pclntab header", h));
        }
        if let Some(s) = symtab_text {
            sources.push(("runtime.text symbol", s));
        }
        let Some(&(src, ts)) = sources.first() else {
            return Err(InspectError::TextStart {
                path: p,
                reason: "pclntab's textStart is 0 (Go 1.26+ or unrelocated) and no runtime module data or runtime.text symbol was found; the .text section address is not a safe substitute".into(),
            });
        };
        if let Some(&(other, v)) = sources.iter().find(|(_, v)| *v != ts) {
            return Err(InspectError::TextStart {
                path: p,
                reason: format!("{src} says {ts:#x} but {other} says {v:#x}"),
            });
        }
        (ts, ts, src)
    } else {
        match (md, symtab_text) {
            (Some(m), _) => (0, m.text, "runtime module data"),
            (None, Some(s)) => (0, s, "runtime.text symbol"),
            (None, None) => (0, first_raw, "first function entry"),
        }
    };

    // All functions must lie in one executable, file-backed segment: this
    // catches a wrong text start as well as a corrupt table.
    let lo = entry_base.checked_add(first_raw);
    let hi = entry_base.checked_add(end_raw);
    let (Some(lo), Some(hi)) = (lo, hi) else {
        return Err(InspectError::OutsideSegment { path: p, reason: "function addresses overflow".into() });
    };
    match elf.place(lo, hi - lo) {
        Some(pl) if pl.segment.executable() => {}
        Some(_) => {
            return Err(InspectError::OutsideSegment {
                path: p,
                reason: format!("functions {lo:#x}..{hi:#x} are in a non-executable segment"),
            });
        }
        None => {
            return Err(InspectError::OutsideSegment {
                path: p,
                reason: format!("functions {lo:#x}..{hi:#x} are not inside one file-backed load segment"),
            });
        }
    }

    let go_version = build_info.as_ref().map(|b| b.go_version.clone());
    let version = go_version.as_deref().and_then(GoVersion::parse);
    let abi = abi_for(elf.arch, version, layout.version);
    if abi.is_none() {
        notes.push(format!(
            "Go version unknown and the {} table does not settle the calling convention: argument reads withheld",
            layout.version.describe()
        ));
    }
    let goid = version.filter(|v| v.major == 1).and_then(|v| catalog::goid_offset(v.minor));
    if goid.is_none() {
        notes.push(match &go_version {
            Some(v) => format!("no known goid offset for {v}"),
            None => "no goid offset without a Go version".into(),
        });
    }

    let types = match md {
        Some(m) => {
            let mem = ElfMemory { info: &elf, data: bytes.get() };
            gotypes::setup(&mem, &m, layout.ptr_size, layout.version, version)
        }
        None => Err(TypeError::Unavailable("no runtime module data found".into())),
    };
    if let Err(e) = &types {
        notes.push(format!("struct layouts unavailable: {e}"));
    }
    let image = Arc::new(Image {
        pcln_start,
        pcln_end,
        layout,
        entry_base,
        names: OnceLock::new(),
        types,
        type_index: OnceLock::new(),
        elf,
        bytes,
    });
    let cgo = match build_info.as_ref().and_then(|b| b.setting("CGO_ENABLED")) {
        Some(v) => v == "1",
        None => {
            let idx = image.names();
            (0..idx.spans.len()).any(|i| {
                let n = image.name_of(i);
                n.starts_with(b"runtime/cgo.") || n.windows(7).any(|w| w == b"._Cfunc")
            })
        }
    };
    let ldflags_external = build_info
        .as_ref()
        .and_then(|b| b.setting("-ldflags"))
        .is_some_and(|f| f.contains("-linkmode=external") || f.contains("-linkmode external"));
    // Go's own linker never writes these; the system linker (gcc/ld) does.
    let external_link = ldflags_external
        || [".init", ".fini", ".init_array", ".eh_frame_hdr"].iter().any(|s| image.elf.section(s).is_some());

    let mut insp = Inspection {
        type_tables: image.types.as_ref().ok().map(|t| t.tables),
        path,
        identity,
        go_version,
        version,
        arch: image.elf.arch,
        abi,
        stripped: !image.elf.has_symtab,
        has_dwarf: image.elf.has_dwarf,
        pie: image.elf.pie,
        cgo,
        external_link,
        build_info,
        text_start,
        text_start_source,
        pclntab: PclntabInfo {
            format: layout.version,
            magic: layout.magic,
            address: pcln_vaddr,
            file_offset: pcln_start as u64,
            functions: layout.nfunc,
            found_by,
        },
        moduledata: md.map(|m| m.addr),
        goid,
        g_register: abi.and_then(|a| catalog::g_register(image.elf.arch, a)),
        probes: Vec::new(),
        unresolved: Vec::new(),
        etcd_layout: None,
        notes,
        image,
    };
    resolve_catalog(&mut insp);
    if insp.probes.iter().any(|p| layout::reads_etcd_structs(p.component)) {
        insp.etcd_layout = Some(layout::identify(&insp));
    }
    Ok(insp)
}

/// The calling convention, from the Go version, else from what the table
/// format alone implies.
fn abi_for(arch: Arch, version: Option<GoVersion>, table: PclnVersion) -> Option<Abi> {
    let first_register_minor = match arch {
        Arch::X86_64 => 17,
        Arch::Aarch64 => 18,
    };
    if let Some(v) = version {
        return Some(if v.at_least(1, first_register_minor) { Abi::Register } else { Abi::Stack });
    }
    match (table, arch) {
        (PclnVersion::Go12, _) => Some(Abi::Stack),
        (PclnVersion::Go116, Arch::Aarch64) => Some(Abi::Stack),
        // 1.16 was ABI0, 1.17 ABIInternal: the table cannot tell them apart.
        (PclnVersion::Go116, Arch::X86_64) => None,
        (PclnVersion::Go118 | PclnVersion::Go120, _) => Some(Abi::Register),
    }
}

fn scan_buildinfo(elf: &ElfInfo, mem: &ElfMemory<'_>) -> Option<u64> {
    // The blob is 16-byte aligned in a writable segment.
    for seg in elf.segments.iter().filter(|s| s.writable()) {
        let bytes = mem.bytes(seg.vaddr, seg.filesz)?;
        let skip = ((16 - seg.vaddr % 16) % 16) as usize;
        let mut at = skip;
        while let Some(window) = bytes.get(at..at + buildinfo::MAGIC.len()) {
            if window == buildinfo::MAGIC {
                return seg.vaddr.checked_add(at as u64);
            }
            at += 16;
        }
    }
    None
}

/// Finds the function table: its section, the `runtime.pclntab` symbol, or
/// a scan of the load segments for a magic that parses and validates.
/// Returns (vaddr, file start, file end, how).
fn find_pclntab(elf: &ElfInfo, data: &[u8], p: &str) -> Result<(u64, usize, usize, &'static str), PclnSearch> {
    let range = |off: u64, len: u64| -> Option<(usize, usize)> {
        let s = usize::try_from(off).ok()?;
        let e = s.checked_add(usize::try_from(len).ok()?)?;
        (e <= data.len()).then_some((s, e))
    };
    for name in [".gopclntab", ".data.rel.ro.gopclntab"] {
        if let Some(s) = elf.section(name).filter(|s| !s.nobits) {
            let (a, b) = range(s.offset, s.size).ok_or_else(|| InspectError::Truncated {
                path: p.to_string(),
                reason: format!("{name} runs past the end of the file"),
            })?;
            return Ok((s.addr, a, b, "section"));
        }
    }
    // The symbol (unstripped binaries whose section got merged by the linker).
    if elf.has_symtab
        && let Some(addr) = elf::symtab_value(data, "runtime.pclntab")
        && let Some(pl) = elf.place(addr, 8)
        && let Some(end) = pl.segment.offset.checked_add(pl.segment.filesz)
        && let Some((a, b)) = range(pl.file_offset, end - pl.file_offset)
    {
        return Ok((addr, a, b, "runtime.pclntab symbol"));
    }
    // A scan: read-only data first (where the table normally is), then the
    // rest. A candidate must parse fully (sorted entries, records in bounds).
    let mut segs: Vec<_> = elf.segments.iter().collect();
    segs.sort_by_key(|s| (s.executable(), s.writable()));
    let mut unknown_magic = None;
    for seg in segs {
        let Some((a, b)) = range(seg.offset, seg.filesz) else { continue };
        let Some(bytes) = data.get(a..b) else { continue };
        let skip = ((8 - seg.vaddr % 8) % 8) as usize;
        let mut at = skip;
        while let Some(w) = bytes.get(at..at + 8) {
            let magic = u32::from_le_bytes([w[0], w[1], w[2], w[3]]);
            if (magic & 0xffff_fff0) == 0xffff_fff0 && w[4] == 0 && w[5] == 0 && matches!(w[6], 1 | 2 | 4) && w[7] == 8
            {
                let cand = bytes.get(at..).unwrap_or_default();
                match Pclntab::parse(cand) {
                    Ok(_) => return Ok((seg.vaddr + at as u64, a + at, b, "magic scan")),
                    Err(pclntab::PclnError::UnknownMagic(m)) => unknown_magic = unknown_magic.or(Some(m)),
                    Err(_) => {}
                }
            }
            at += 8;
        }
    }
    // Something shaped like a pclntab header with a magic we do not know is
    // most likely a newer Go: the caller says so rather than "not Go".
    Err(PclnSearch::NotFound { unknown_magic })
}

enum PclnSearch {
    Failed(InspectError),
    NotFound { unknown_magic: Option<u32> },
}

impl From<InspectError> for PclnSearch {
    fn from(e: InspectError) -> Self {
        PclnSearch::Failed(e)
    }
}

fn resolve_catalog(insp: &mut Inspection) {
    let mut probes = Vec::new();
    let mut unresolved = Vec::new();
    for spec in catalog::CATALOG {
        let mut found_any = false;
        let mut failures: Vec<String> = Vec::new();
        for cand in spec.candidates {
            let names: Vec<usize> = match cand.symbol {
                // A module build's name first, then the same package built
                // in GOPATH mode (Debian), whose import path has no `/vN`.
                catalog::SymbolMatch::Exact(name) => match insp.image.lookup(name) {
                    found if found.is_empty() => {
                        catalog::gopath_form(name).map(|alt| insp.image.lookup(&alt)).unwrap_or_default()
                    }
                    found => found,
                },
                catalog::SymbolMatch::Pattern { .. } => (0..insp.pclntab.functions)
                    .filter(|&i| {
                        std::str::from_utf8(insp.image.name_of(i)).is_ok_and(|n| cand.symbol.matches_pattern(n))
                    })
                    .collect(),
            };
            let resolved = match names.as_slice() {
                [] => continue,
                [i] => insp.image.resolve_index(*i),
                many => Err(insp.image.ambiguous(many)),
            };
            match resolved {
                Ok(r) => {
                    let (args, args_note) = match insp.abi {
                        Some(abi) => {
                            let args = catalog::arg_reads(cand.sig, insp.arch, abi);
                            let note = (args.len() < cand.sig.reads.len())
                                .then(|| "some reads have no slot in this signature".to_string());
                            (args, note)
                        }
                        None => {
                            (Vec::new(), Some("calling convention unknown (no Go version): no argument reads".into()))
                        }
                    };
                    probes.push(Probe {
                        role: spec.role,
                        component: spec.component,
                        symbol: r.name,
                        address: r.address,
                        file_offset: r.file_offset,
                        size: r.size,
                        return_offsets: r.return_offsets,
                        args,
                        args_note,
                        versions: cand.versions,
                        name_verified: cand.name_verified,
                    });
                    found_any = true;
                    if spec.select == catalog::Select::First {
                        break;
                    }
                }
                Err(e) => failures.push(e.to_string()),
            }
        }
        if !found_any {
            let reason = if failures.is_empty() {
                let tried: Vec<String> = spec.candidates.iter().map(|c| c.symbol.describe()).collect();
                format!("none of the {} candidate symbols is in the binary (tried: {})", tried.len(), tried.join(", "))
            } else {
                failures.join("; ")
            };
            unresolved.push(Unresolved { role: spec.role, component: spec.component, reason });
        } else if !failures.is_empty() {
            insp.notes.push(format!("{}: {}", spec.role, failures.join("; ")));
        }
    }
    // With a symbol table, pclntab must agree with it: one pass over it for
    // all probes. A disagreement is a red flag, so the role is refused.
    if !insp.stripped {
        let names: Vec<&str> = probes.iter().map(|p| p.symbol.as_str()).collect();
        let syms = elf::symtab_lookup(insp.image.data(), &names);
        let mut keep = Vec::with_capacity(probes.len());
        for (p, sym) in probes.into_iter().zip(syms) {
            match sym {
                Some((addr, size)) if addr != p.address || (size != 0 && size != p.size) => {
                    let reason = format!(
                        "{}: pclntab says {:#x}+{:#x} but .symtab says {addr:#x}+{size:#x}",
                        p.symbol, p.address, p.size
                    );
                    if let Some(u) = unresolved.iter_mut().find(|u| u.role == p.role) {
                        u.reason = format!("{}; {reason}", u.reason);
                    } else {
                        unresolved.push(Unresolved { role: p.role, component: p.component, reason });
                    }
                }
                _ => keep.push(p),
            }
        }
        probes = keep;
        // A role whose every probe was refused stays listed once, above.
        unresolved.retain(|u| !probes.iter().any(|p| p.role == u.role));
    }
    insp.probes = probes;
    insp.unresolved = unresolved;
}

/// Hit/miss counters of a [`Cache`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct CacheStats {
    pub hits: u64,
    pub misses: u64,
    pub entries: usize,
}

struct CacheEntry {
    result: Result<Arc<Inspection>, InspectError>,
    last_used: u64,
}

/// Inspections by file identity: a node with 50 pods of one image inspects
/// its binary once. Failures about the file's contents are cached too (a
/// non-Go binary stays non-Go); I/O failures are not.
pub struct Cache {
    entries: Mutex<HashMap<FileIdentity, CacheEntry>>,
    capacity: usize,
    clock: AtomicU64,
    hits: AtomicU64,
    misses: AtomicU64,
}

impl Default for Cache {
    fn default() -> Self {
        Cache::new()
    }
}

impl Cache {
    /// A cache of up to 256 binaries.
    pub fn new() -> Cache {
        Cache::with_capacity(256)
    }

    /// Least recently used entries are dropped past `capacity`.
    pub fn with_capacity(capacity: usize) -> Cache {
        Cache {
            entries: Mutex::new(HashMap::new()),
            capacity: capacity.max(1),
            clock: AtomicU64::new(0),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    /// Inspects `path`, or returns the inspection of the same file identity.
    pub fn inspect(&self, path: &Path) -> Result<Arc<Inspection>, InspectError> {
        let file = File::open(path).map_err(|e| InspectError::io(path, e))?;
        // fstat of the opened file, so the identity is that of the bytes read.
        let meta = file.metadata().map_err(|e| InspectError::io(path, e))?;
        let id = FileIdentity::of(&meta);
        let now = self.clock.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut map) = self.entries.lock()
            && let Some(e) = map.get_mut(&id)
        {
            e.last_used = now;
            self.hits.fetch_add(1, Ordering::Relaxed);
            return e.result.clone();
        }
        self.misses.fetch_add(1, Ordering::Relaxed);
        // Parse without holding the lock: other binaries can be served meanwhile.
        let result = inspect_file(path, &file, &meta).map(Arc::new);
        if matches!(result, Err(InspectError::Io { .. })) {
            return result;
        }
        if let Ok(mut map) = self.entries.lock() {
            if map.len() >= self.capacity
                && let Some(oldest) = map.iter().min_by_key(|(_, e)| e.last_used).map(|(k, _)| *k)
            {
                map.remove(&oldest);
            }
            map.insert(id, CacheEntry { result: result.clone(), last_used: now });
        }
        result
    }

    /// Inspects the executable of a running process (`/proc/PID/exe`, which
    /// reaches the file even inside another mount namespace).
    pub fn inspect_pid(&self, pid: u32) -> Result<Arc<Inspection>, InspectError> {
        self.inspect(&PathBuf::from(format!("/proc/{pid}/exe")))
    }

    pub fn stats(&self) -> CacheStats {
        CacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            entries: self.entries.lock().map(|m| m.len()).unwrap_or(0),
        }
    }

    pub fn clear(&self) {
        if let Ok(mut m) = self.entries.lock() {
            m.clear();
        }
    }
}
