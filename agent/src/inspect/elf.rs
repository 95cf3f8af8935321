//! The ELF side of inspection: load segments, sections, dynamic relocations
//! and (when present) the symbol table, read with `object`'s zero-copy
//! low-level parser. Everything here keeps offsets, not borrows, so the
//! result can live next to the bytes it describes.

use object::{
    Endianness,
    elf::{self, FileHeader64},
    read::elf::{FileHeader, ProgramHeader, Rela, SectionHeader, Sym},
};
use serde::Serialize;

/// What the parser found wrong with the file, without the path (the caller adds it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ElfError {
    NotElf(String),
    Unsupported(String),
    Truncated(String),
    Corrupt(String),
}

/// The CPU a binary is for. Only the two the agent probes are accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum Arch {
    #[serde(rename = "x86_64")]
    X86_64,
    #[serde(rename = "aarch64")]
    Aarch64,
}

impl Arch {
    pub fn as_str(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86_64",
            Arch::Aarch64 => "aarch64",
        }
    }
}

impl std::fmt::Display for Arch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One `PT_LOAD` program header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub vaddr: u64,
    pub memsz: u64,
    pub offset: u64,
    pub filesz: u64,
    pub flags: u32,
}

impl Segment {
    pub fn executable(&self) -> bool {
        self.flags & elf::PF_X != 0
    }
    pub fn writable(&self) -> bool {
        self.flags & elf::PF_W != 0
    }
    /// End of the file-backed part (bytes past it are zero-filled `.bss`).
    pub fn file_end_vaddr(&self) -> Option<u64> {
        self.vaddr.checked_add(self.filesz)
    }
}

/// One section header (only the fields inspection needs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Section {
    pub name: String,
    pub addr: u64,
    pub offset: u64,
    pub size: u64,
    pub nobits: bool,
}

/// Where something lives in the file, for a virtual address range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    pub file_offset: u64,
    pub segment: Segment,
}

#[derive(Debug, Clone)]
pub struct ElfInfo {
    pub arch: Arch,
    /// `ET_DYN`: Go's `-buildmode=pie` (and c-shared) output.
    pub pie: bool,
    pub has_interp: bool,
    pub segments: Vec<Segment>,
    pub sections: Vec<Section>,
    /// `R_*_RELATIVE` dynamic relocations, sorted: (address, addend). In PIE
    /// binaries a pointer's in-file bytes may be zero and its value only in
    /// the addend (RELA), so pointer reads consult these first.
    pub relative_relocs: Vec<(u64, u64)>,
    /// `.symtab` exists and holds symbols (i.e. not stripped).
    pub has_symtab: bool,
    pub has_dwarf: bool,
}

type Hdr = FileHeader64<Endianness>;

impl ElfInfo {
    pub fn parse(data: &[u8]) -> Result<ElfInfo, ElfError> {
        if data.len() < 4 || data.get(..4) != Some(&elf::ELFMAG[..]) {
            return Err(ElfError::NotElf("no ELF magic".into()));
        }
        if data.len() < 64 {
            return Err(ElfError::Truncated(format!("{} bytes is shorter than an ELF header", data.len())));
        }
        match data.get(4) {
            Some(&elf::ELFCLASS64) => {}
            Some(&elf::ELFCLASS32) => {
                return Err(ElfError::Unsupported("32-bit ELF (only x86_64 and aarch64 are supported)".into()));
            }
            _ => return Err(ElfError::NotElf("bad ELF class byte".into())),
        }
        if data.get(5) != Some(&elf::ELFDATA2LSB) {
            return Err(ElfError::Unsupported("big-endian ELF (only x86_64 and aarch64 are supported)".into()));
        }
        let hdr = Hdr::parse(data).map_err(|e| ElfError::NotElf(e.to_string()))?;
        let endian = hdr.endian().map_err(|e| ElfError::NotElf(e.to_string()))?;
        let arch = match hdr.e_machine(endian) {
            elf::EM_X86_64 => Arch::X86_64,
            elf::EM_AARCH64 => Arch::Aarch64,
            other => {
                return Err(ElfError::Unsupported(format!("machine {other} (only x86_64 and aarch64 are supported)")));
            }
        };
        let pie = hdr.e_type(endian) == elf::ET_DYN;
        let file_len = data.len() as u64;

        let phoff = hdr.e_phoff(endian);
        let phend = u64::from(hdr.e_phnum(endian))
            .checked_mul(u64::from(hdr.e_phentsize(endian)))
            .and_then(|n| n.checked_add(phoff));
        match phend {
            Some(end) if end <= file_len => {}
            Some(end) => {
                return Err(ElfError::Truncated(format!(
                    "program headers end at {end:#x} but the file has {file_len:#x} bytes"
                )));
            }
            None => return Err(ElfError::Corrupt("program header table size overflows".into())),
        }
        let phdrs =
            hdr.program_headers(endian, data).map_err(|e| ElfError::Corrupt(format!("program headers: {e}")))?;
        let mut segments = Vec::new();
        let mut has_interp = false;
        for ph in phdrs {
            match ph.p_type(endian) {
                elf::PT_LOAD => {
                    let seg = Segment {
                        vaddr: ph.p_vaddr(endian),
                        memsz: ph.p_memsz(endian),
                        offset: ph.p_offset(endian),
                        filesz: ph.p_filesz(endian),
                        flags: ph.p_flags(endian),
                    };
                    match seg.offset.checked_add(seg.filesz) {
                        Some(end) if end <= file_len => {}
                        Some(end) => {
                            return Err(ElfError::Truncated(format!(
                                "load segment at {:#x} ends at file offset {end:#x} but the file has {file_len:#x} bytes",
                                seg.vaddr
                            )));
                        }
                        None => return Err(ElfError::Corrupt("load segment size overflows".into())),
                    }
                    if seg.vaddr.checked_add(seg.memsz).is_none() || seg.filesz > seg.memsz {
                        return Err(ElfError::Corrupt(format!(
                            "load segment at {:#x} has inconsistent sizes",
                            seg.vaddr
                        )));
                    }
                    segments.push(seg);
                }
                elf::PT_INTERP => has_interp = true,
                _ => {}
            }
        }
        if segments.is_empty() {
            return Err(ElfError::Corrupt("no loadable segments".into()));
        }

        let shoff = hdr.e_shoff(endian);
        let mut sections = Vec::new();
        let mut relative_relocs = Vec::new();
        let mut has_symtab = false;
        let mut has_dwarf = false;
        if shoff != 0 {
            let shend = u64::from(hdr.e_shnum(endian))
                .checked_mul(u64::from(hdr.e_shentsize(endian)))
                .and_then(|n| n.checked_add(shoff));
            match shend {
                Some(end) if end <= file_len => {}
                Some(end) => {
                    return Err(ElfError::Truncated(format!(
                        "section headers end at {end:#x} but the file has {file_len:#x} bytes"
                    )));
                }
                None => return Err(ElfError::Corrupt("section header table size overflows".into())),
            }
            let table = hdr.sections(endian, data).map_err(|e| ElfError::Corrupt(format!("section headers: {e}")))?;
            let relative_type = match arch {
                Arch::X86_64 => elf::R_X86_64_RELATIVE,
                Arch::Aarch64 => elf::R_AARCH64_RELATIVE,
            };
            for sh in table.iter() {
                let name =
                    table.section_name(endian, sh).map(|n| String::from_utf8_lossy(n).into_owned()).unwrap_or_default();
                let sh_type = sh.sh_type(endian);
                let nobits = sh_type == elf::SHT_NOBITS;
                let offset = sh.sh_offset(endian);
                let size = sh.sh_size(endian);
                if !nobits && sh_type != elf::SHT_NULL {
                    match offset.checked_add(size) {
                        Some(end) if end <= file_len => {}
                        _ => {
                            return Err(ElfError::Truncated(format!(
                                "section {name} ends past the end of the file ({file_len:#x} bytes)"
                            )));
                        }
                    }
                }
                if sh_type == elf::SHT_SYMTAB && size > 0 {
                    has_symtab = true;
                }
                if name.starts_with(".debug_") || name.starts_with(".zdebug_") {
                    has_dwarf = true;
                }
                if sh_type == elf::SHT_RELA && sh.sh_flags(endian) & u64::from(elf::SHF_ALLOC) != 0 {
                    let relas: &[object::elf::Rela64<Endianness>] = sh
                        .data_as_array(endian, data)
                        .map_err(|e| ElfError::Corrupt(format!("relocations in {name}: {e}")))?;
                    for r in relas {
                        if r.r_type(endian, false) == relative_type {
                            relative_relocs.push((r.r_offset(endian), r.r_addend(endian) as u64));
                        }
                    }
                }
                sections.push(Section { name, addr: sh.sh_addr(endian), offset, size, nobits });
            }
        }
        relative_relocs.sort_unstable();
        Ok(ElfInfo { arch, pie, has_interp, segments, sections, relative_relocs, has_symtab, has_dwarf })
    }

    pub fn section(&self, name: &str) -> Option<&Section> {
        self.sections.iter().find(|s| s.name == name)
    }

    /// The load segment whose file-backed bytes hold `[vaddr, vaddr+len)`.
    pub fn place(&self, vaddr: u64, len: u64) -> Option<Placement> {
        let end = vaddr.checked_add(len)?;
        self.segments.iter().find_map(|s| {
            let file_end = s.file_end_vaddr()?;
            if vaddr >= s.vaddr && end <= file_end {
                Some(Placement { file_offset: s.offset.checked_add(vaddr - s.vaddr)?, segment: *s })
            } else {
                None
            }
        })
    }

    /// The load segment that contains `vaddr` at all (in memory).
    pub fn segment_of(&self, vaddr: u64) -> Option<&Segment> {
        self.segments.iter().find(|s| vaddr >= s.vaddr && s.vaddr.checked_add(s.memsz).is_some_and(|e| vaddr < e))
    }

    pub fn relocated(&self, vaddr: u64) -> Option<u64> {
        self.relative_relocs
            .binary_search_by_key(&vaddr, |&(a, _)| a)
            .ok()
            .and_then(|i| self.relative_relocs.get(i))
            .map(|&(_, v)| v)
    }

    /// Addresses whose relocated value is `value` (for finding pointers to a
    /// table in PIE data whose in-file bytes are zero).
    pub fn relocs_with_value(&self, value: u64) -> impl Iterator<Item = u64> + '_ {
        self.relative_relocs.iter().filter(move |&&(_, v)| v == value).map(|&(a, _)| a)
    }
}

/// Reading the program's memory image as the loader would lay it out (file
/// bytes only: `.bss` is not readable), with relocation-aware pointers.
pub trait Memory {
    fn bytes(&self, vaddr: u64, len: u64) -> Option<&[u8]>;
    fn ptr(&self, vaddr: u64, ptr_size: u8) -> Option<u64>;
    /// `[vaddr, vaddr+len)` is in a segment's zero-filled tail (`.bss`):
    /// not in the file, but known to read as zeros at startup.
    fn zero_filled(&self, _vaddr: u64, _len: u64) -> bool {
        false
    }
}

/// The ELF file seen as memory.
pub struct ElfMemory<'a> {
    pub info: &'a ElfInfo,
    pub data: &'a [u8],
}

impl Memory for ElfMemory<'_> {
    fn bytes(&self, vaddr: u64, len: u64) -> Option<&[u8]> {
        let p = self.info.place(vaddr, len)?;
        let start = usize::try_from(p.file_offset).ok()?;
        let end = start.checked_add(usize::try_from(len).ok()?)?;
        self.data.get(start..end)
    }
    fn ptr(&self, vaddr: u64, ptr_size: u8) -> Option<u64> {
        if let Some(v) = self.info.relocated(vaddr) {
            return Some(v);
        }
        read_uint(self.bytes(vaddr, u64::from(ptr_size))?, ptr_size)
    }
    fn zero_filled(&self, vaddr: u64, len: u64) -> bool {
        let Some(end) = vaddr.checked_add(len) else { return false };
        self.info.segments.iter().any(|s| {
            s.file_end_vaddr().is_some_and(|fe| vaddr >= fe) && s.vaddr.checked_add(s.memsz).is_some_and(|me| end <= me)
        })
    }
}

/// Plain memory: one byte slice at one base address (for fuzzing and tests).
pub struct SliceMemory<'a> {
    pub base: u64,
    pub data: &'a [u8],
}

impl Memory for SliceMemory<'_> {
    fn bytes(&self, vaddr: u64, len: u64) -> Option<&[u8]> {
        let start = usize::try_from(vaddr.checked_sub(self.base)?).ok()?;
        let end = start.checked_add(usize::try_from(len).ok()?)?;
        self.data.get(start..end)
    }
    fn ptr(&self, vaddr: u64, ptr_size: u8) -> Option<u64> {
        read_uint(self.bytes(vaddr, u64::from(ptr_size))?, ptr_size)
    }
}

/// Little-endian unsigned integer of 4 or 8 bytes at the start of `b`.
pub fn read_uint(b: &[u8], size: u8) -> Option<u64> {
    match size {
        4 => Some(u64::from(u32::from_le_bytes(b.get(..4)?.try_into().ok()?))),
        8 => Some(u64::from_le_bytes(b.get(..8)?.try_into().ok()?)),
        _ => None,
    }
}

pub fn read_u32(b: &[u8], at: usize) -> Option<u32> {
    let end = at.checked_add(4)?;
    Some(u32::from_le_bytes(b.get(at..end)?.try_into().ok()?))
}

/// Symbols from `.symtab`: a single pass that picks out the names asked for
/// (used as a cross-check of pclntab, never as the primary source).
pub fn symtab_lookup(data: &[u8], wanted: &[&str]) -> Vec<Option<(u64, u64)>> {
    let mut out = vec![None; wanted.len()];
    let Ok(hdr) = Hdr::parse(data) else { return out };
    let Ok(endian) = hdr.endian() else { return out };
    let Ok(sections) = hdr.sections(endian, data) else { return out };
    let Ok(symtab) = sections.symbols(endian, data, elf::SHT_SYMTAB) else { return out };
    let strings = symtab.strings();
    for sym in symtab.iter() {
        if sym.st_type() != elf::STT_FUNC {
            continue;
        }
        let Ok(name) = sym.name(endian, strings) else { continue };
        for (i, w) in wanted.iter().enumerate() {
            if w.as_bytes() == name
                && let Some(slot) = out.get_mut(i)
                && slot.is_none()
            {
                *slot = Some((sym.st_value(endian), sym.st_size(endian)));
            }
        }
    }
    out
}

/// One `.symtab` symbol by exact name, any type (e.g. `runtime.text`).
pub fn symtab_value(data: &[u8], wanted: &str) -> Option<u64> {
    let hdr = Hdr::parse(data).ok()?;
    let endian = hdr.endian().ok()?;
    let sections = hdr.sections(endian, data).ok()?;
    let symtab = sections.symbols(endian, data, elf::SHT_SYMTAB).ok()?;
    let strings = symtab.strings();
    symtab.iter().find(|s| s.name(endian, strings).is_ok_and(|n| n == wanted.as_bytes())).map(|s| s.st_value(endian))
}
