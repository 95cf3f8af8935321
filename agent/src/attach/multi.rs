//! uprobe_multi links (Linux 6.6+): one link places every site of one
//! program in one binary, each site with its own cookie.
//!
//! Why: a perf-event uprobe is one link per site, and the kernel releases
//! those one after another, each behind an RCU grace period (about 100 ms
//! here): stopping the agent with 58 sites on etcd and etcdctl took 5.9 s.
//! A multi link unregisters all its uprobes and then waits once, and links
//! released from several threads wait together.
//!
//! aya 0.14 has no uprobe_multi link, and its `UProbe::load` gives the kernel
//! no expected attach type, which a multi link requires
//! (`BPF_TRACE_UPROBE_MULTI`). So the uprobe programs are loaded here
//! instead: the object is parsed again with aya-obj, relocated against the
//! maps aya already created (their fds, so both sides share every map), and
//! loaded with the raw `bpf()` syscall, as are its BTF and the links.

use std::{
    collections::{HashMap, HashSet},
    ffi::CString,
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd, OwnedFd},
    path::Path,
};

use aya::{
    Ebpf,
    maps::{Map, MapData},
};
use aya_obj::{
    Object,
    generated::{bpf_attach_type, bpf_attr, bpf_cmd},
};
use thiserror::Error;

use super::features::{KprobeLoad, ProgBtf, sys_bpf};

#[derive(Debug, Error)]
pub enum MultiError {
    #[error("parsing the eBPF object: {0}")]
    Parse(#[source] aya_obj::ParseError),
    #[error("the object's BTF: {0}")]
    Btf(#[source] aya_obj::btf::BtfError),
    #[error("loading the object's BTF: {0}")]
    BtfLoad(#[source] std::io::Error),
    #[error("relocating against the kernel's BTF: {0}")]
    Core(#[source] aya_obj::btf::BtfRelocationError),
    #[error("relocating: {0}")]
    Relocate(#[source] aya_obj::relocation::EbpfRelocationError),
    #[error("map `{0}` of the object was not created by aya")]
    MissingMap(String),
    #[error("program `{0}` is missing from the eBPF object")]
    MissingProgram(&'static str),
    #[error("loading `{program}` for uprobe_multi: {source}{log}")]
    Load {
        program: &'static str,
        #[source]
        source: std::io::Error,
        /// The verifier's last lines, when it refused.
        log: String,
    },
    #[error("attaching `{program}` to {count} sites of {path}: {source}")]
    Attach {
        program: &'static str,
        count: usize,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("a path with a NUL byte: {0}")]
    Path(String),
}

/// The uprobe programs, loaded for uprobe_multi links.
pub struct MultiPrograms {
    programs: HashMap<&'static str, OwnedFd>,
    /// Programs this kernel refused, and why (see [`super::Unavailable`]).
    failed: super::Unavailable,
    /// The programs' BTF (their func_info names types in it); held for
    /// their life.
    _btf: Option<OwnedFd>,
}

impl MultiPrograms {
    /// Loads `names` out of `object`, sharing the maps `ebpf` created from
    /// the same object. Fails on a kernel without uprobe_multi (it refuses
    /// the expected attach type of every program); a program it refuses
    /// alone (its verifier) is left out and listed in [`Self::failed`].
    pub fn load(object: &[u8], ebpf: &Ebpf, names: &[&'static str]) -> Result<Self, MultiError> {
        let mut obj = Object::parse(object).map_err(MultiError::Parse)?;
        let features = aya::features();
        let btf = match features.btf() {
            Some(btf_features) => match obj.fixup_and_sanitize_btf(btf_features).map_err(MultiError::Btf)? {
                Some(btf) => Some(load_btf(&btf.to_bytes()).map_err(MultiError::BtfLoad)?),
                None => None,
            },
            None => None,
        };
        // As aya does: CO-RE relocations against the running kernel's BTF.
        // Parsing it costs ~20 MB of peak RSS (aya holds its own copy), so
        // only when the object has any (ours has none today).
        if has_core_relocations(object)
            && let Ok(kernel) = aya_obj::btf::Btf::from_sys_fs()
        {
            obj.relocate_btf(&kernel).map_err(MultiError::Core)?;
        }
        let text_sections: HashSet<usize> = obj.functions.keys().map(|(section, _)| *section).collect();
        let defs = obj.maps.clone();
        let mut fds = Vec::with_capacity(defs.len());
        for (name, def) in &defs {
            let (_, map) = ebpf.maps().find(|(n, _)| n == name).ok_or_else(|| MultiError::MissingMap(name.clone()))?;
            fds.push((name.as_str(), map_data(map).fd().as_fd().as_raw_fd(), def));
        }
        obj.relocate_maps(fds.into_iter(), &text_sections).map_err(MultiError::Relocate)?;
        obj.relocate_calls(&text_sections).map_err(MultiError::Relocate)?;
        obj.sanitize_functions(features);

        let mut programs = HashMap::new();
        let (mut failed, mut first) = (super::Unavailable::new(), None);
        for &name in names {
            let prog = obj.programs.get(name).ok_or(MultiError::MissingProgram(name))?;
            let func = obj.functions.get(&prog.function_key()).ok_or(MultiError::MissingProgram(name))?;
            match load_program(name, prog, func, btf.as_ref().map(|b| b.as_fd())) {
                Ok(fd) => {
                    programs.insert(name, fd);
                }
                Err(e) => {
                    failed.insert(name, e.to_string());
                    first.get_or_insert(e);
                }
            }
        }
        // Every one refused: the kernel has no uprobe_multi (or nothing
        // loads at all), which the caller answers with another mechanism.
        if let (true, Some(e)) = (programs.is_empty(), first) {
            return Err(e);
        }
        Ok(Self { programs, failed, _btf: btf })
    }

    /// The programs this kernel refused, and why.
    pub fn failed(&self) -> &super::Unavailable {
        &self.failed
    }

    /// The program `name`, loaded for multi links.
    pub fn fd(&self, name: &str) -> Option<BorrowedFd<'_>> {
        self.programs.get(name).map(|fd| fd.as_fd())
    }

    /// Every program, by name (for their run statistics).
    pub fn iter(&self) -> impl Iterator<Item = (&'static str, BorrowedFd<'_>)> {
        self.programs.iter().map(|(name, fd)| (*name, fd.as_fd()))
    }
}

/// One uprobe_multi link: closing it unregisters every uprobe it placed.
#[derive(Debug)]
pub struct MultiLink {
    /// Held only to be closed, which detaches.
    _fd: OwnedFd,
    sites: usize,
}

impl MultiLink {
    /// Places `program` at each of `offsets` (file offsets) of the file at
    /// `path`, in every process that maps it, each with its cookie.
    pub fn attach(
        program: &'static str,
        prog: BorrowedFd<'_>,
        path: &Path,
        offsets: &[u64],
        cookies: &[u64],
    ) -> Result<Self, MultiError> {
        use std::os::unix::ffi::OsStrExt as _;
        assert_eq!(offsets.len(), cookies.len(), "one cookie per offset");
        let c_path =
            CString::new(path.as_os_str().as_bytes()).map_err(|_| MultiError::Path(path.display().to_string()))?;
        let err =
            |source| MultiError::Attach { program, count: offsets.len(), path: path.display().to_string(), source };
        let count = u32::try_from(offsets.len()).map_err(|_| err(std::io::Error::from_raw_os_error(libc::E2BIG)))?;
        // SAFETY: bpf_attr is plain data; all-zero is its documented default.
        let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
        // SAFETY: writing plain integer fields of the link_create member.
        unsafe {
            let lc = &mut attr.link_create;
            lc.__bindgen_anon_1.prog_fd = prog.as_raw_fd() as u32;
            lc.attach_type = bpf_attach_type::BPF_TRACE_UPROBE_MULTI as u32;
            let um = &mut lc.__bindgen_anon_3.uprobe_multi;
            um.path = c_path.as_ptr() as u64;
            um.offsets = offsets.as_ptr() as u64;
            um.cookies = cookies.as_ptr() as u64;
            um.cnt = count;
        }
        let fd = sys_bpf(bpf_cmd::BPF_LINK_CREATE, &mut attr).map_err(err)?;
        Ok(Self { _fd: fd, sites: offsets.len() })
    }

    /// How many sites the link placed.
    pub fn sites(&self) -> usize {
        self.sites
    }
}

/// Whether the object's `.BTF.ext` lists CO-RE relocations: its header's
/// `core_relo_len` (bytes 28..32, present when `hdr_len` >= 32). Anything
/// unreadable counts as yes, which only costs the kernel BTF's parse.
fn has_core_relocations(object: &[u8]) -> bool {
    use object::{Object as _, ObjectSection as _};
    let Ok(file) = object::File::parse(object) else { return true };
    let Some(data) = file.section_by_name(".BTF.ext").and_then(|s| s.data().ok()) else { return false };
    let word = |at: usize| data.get(at..at + 4).and_then(|b| b.try_into().ok()).map(u32::from_le_bytes);
    match (word(4), word(28)) {
        (Some(hdr_len), Some(core_relo_len)) if hdr_len >= 32 => core_relo_len > 0,
        (Some(hdr_len), _) if hdr_len < 32 => false,
        _ => true,
    }
}

/// The `MapData` of any map kind (aya gives the fd only through it).
fn map_data(map: &Map) -> &MapData {
    match map {
        Map::Array(m)
        | Map::ArrayOfMaps(m)
        | Map::BloomFilter(m)
        | Map::CgroupArray(m)
        | Map::CgroupStorage(m)
        | Map::CgrpStorage(m)
        | Map::CpuMap(m)
        | Map::DevMap(m)
        | Map::DevMapHash(m)
        | Map::HashMap(m)
        | Map::HashOfMaps(m)
        | Map::InodeStorage(m)
        | Map::LpmTrie(m)
        | Map::LruHashMap(m)
        | Map::PerCpuArray(m)
        | Map::PerCpuCgroupStorage(m)
        | Map::PerCpuHashMap(m)
        | Map::PerCpuLruHashMap(m)
        | Map::PerfEventArray(m)
        | Map::ProgramArray(m)
        | Map::Queue(m)
        | Map::ReusePortSockArray(m)
        | Map::RingBuf(m)
        | Map::SockHash(m)
        | Map::SockMap(m)
        | Map::SkStorage(m)
        | Map::Stack(m)
        | Map::StackTraceMap(m)
        | Map::Unsupported(m)
        | Map::XskMap(m) => m,
    }
}

fn load_btf(bytes: &[u8]) -> std::io::Result<OwnedFd> {
    // SAFETY: bpf_attr is plain data; all-zero is its documented default.
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    // SAFETY: writing plain integer fields of the BTF_LOAD member.
    unsafe {
        let b = &mut attr.__bindgen_anon_7;
        b.btf = bytes.as_ptr() as u64;
        b.btf_size = u32::try_from(bytes.len()).map_err(|_| std::io::Error::from_raw_os_error(libc::E2BIG))?;
    }
    sys_bpf(bpf_cmd::BPF_BTF_LOAD, &mut attr)
}

/// Loads one program with `BPF_TRACE_UPROBE_MULTI` as its expected attach
/// type. On a refusal, loads it again with a log to say why.
fn load_program(
    name: &'static str,
    prog: &aya_obj::Program,
    func: &aya_obj::Function,
    btf: Option<BorrowedFd<'_>>,
) -> Result<OwnedFd, MultiError> {
    let req = KprobeLoad {
        insns: &func.instructions,
        license: &prog.license,
        expected: Some(bpf_attach_type::BPF_TRACE_UPROBE_MULTI),
        name,
        kern_version: prog.kernel_version.unwrap_or(0),
        btf: btf.map(|fd| ProgBtf {
            fd,
            func_info: &func.func_info.func_info,
            func_info_rec_size: func.func_info_rec_size as u32,
            line_info: &func.line_info.line_info,
            line_info_rec_size: func.line_info_rec_size as u32,
        }),
    };
    let load = |log: Option<&mut Vec<u8>>| req.load_logged(log.map(|l| l.as_mut_slice()));
    load(None).or_else(|source| {
        let mut log = vec![0u8; 1 << 22];
        let again = load(Some(&mut log));
        let text = String::from_utf8_lossy(&log);
        let text = text.trim_end_matches('\0');
        let tail: Vec<&str> = text.lines().rev().take(6).collect();
        let log = if tail.is_empty() {
            String::new()
        } else {
            format!(" (verifier: {})", tail.into_iter().rev().collect::<Vec<_>>().join(" / "))
        };
        match again {
            Ok(fd) => Ok(fd),
            Err(_) => Err(MultiError::Load { program: name, source, log }),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_agents_object_has_no_core_relocations_and_junk_counts_as_having_some() {
        // The object's .BTF.ext lists func and line info only: the kernel's
        // BTF is not parsed for it.
        assert!(!crate::attach::OBJECT.is_empty());
        assert!(!has_core_relocations(crate::attach::OBJECT));
        assert!(has_core_relocations(b"not an ELF file"));
    }
}
