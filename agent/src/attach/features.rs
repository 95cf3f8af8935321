//! Kernel features the attach stage chooses by, probed with test programs
//! through the raw `bpf()` syscall (aya 0.14 has no probe for either).

use std::{
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
    path::Path,
};

use aya_obj::generated::{bpf_attach_type, bpf_attr, bpf_cmd, bpf_func_info, bpf_insn, bpf_line_info, bpf_prog_type};

use super::multi::{MultiError, MultiLink};

/// Whether this kernel makes uprobe_multi links, as libbpf probes it: a
/// two-instruction program loads with the expected attach type (kernels
/// before 6.6 refuse that type: EINVAL), and a link on `/` is refused as
/// not a regular file (EBADF) rather than as unknown (EINVAL).
pub fn uprobe_multi() -> Result<(), String> {
    // r0 = 0; exit
    let insns = [insn(0xb7, 0, 0, 0, 0), insn(0x95, 0, 0, 0, 0)];
    let prog = load_kprobe(&insns, Some(bpf_attach_type::BPF_TRACE_UPROBE_MULTI))
        .map_err(|e| format!("a test program was refused: {e}"))?;
    match MultiLink::attach("probe", prog.as_fd(), Path::new("/"), &[0], &[0]) {
        Err(MultiError::Attach { source, .. }) if source.raw_os_error() == Some(libc::EBADF) => Ok(()),
        Err(e) => Err(format!("a test link was refused: {e}")),
        Ok(_) => Err("a test link on / was accepted".to_string()),
    }
}

/// How a RET site's probe returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RetMode {
    /// The kernel single-steps the RET after the program ran (two traps).
    SingleStep,
    /// The kernel lets a uprobe program write its registers; emulating the
    /// RET in the program is not built yet, so it is single-stepped too.
    WritableUnused,
}

impl RetMode {
    pub fn name(self) -> &'static str {
        match self {
            Self::SingleStep => "single-step",
            Self::WritableUnused => "single-step (context writes allowed, emulation not built)",
        }
    }
}

/// Whether a uprobe program may write its `pt_regs` (which would let it
/// perform a RET itself: ip from the return address, sp + 8). Probed with
/// the smallest such program, `r2 = 0; *(u64 *)(r1 + ip) = r2; r0 = 0;
/// exit`, as a plain uprobe program and as one for uprobe_multi links. The
/// verifier of Linux 6.18 refuses both ("invalid bpf_context access").
pub fn context_writes() -> Result<RetMode, String> {
    // pt_regs.ip on x86_64: the 17th 8-byte slot.
    const IP: i16 = 16 * 8;
    let program = |store: bool| {
        [
            insn(0xb7, 2, 0, 0, 0), // r2 = 0
            if store {
                insn(0x7b, 1, 2, IP, 0) // *(u64 *)(r1 + IP) = r2
            } else {
                insn(0x79, 2, 1, IP, 0) // r2 = *(u64 *)(r1 + IP)
            },
            insn(0xb7, 0, 0, 0, 0), // r0 = 0
            insn(0x95, 0, 0, 0, 0), // exit
        ]
    };
    // The same program reading the register must load: a refusal of the
    // store then means the store, not a malformed test.
    load_kprobe(&program(false), None).map_err(|e| format!("a test program was refused: {e}"))?;
    let plain = load_kprobe(&program(true), None);
    let multi = load_kprobe(&program(true), Some(bpf_attach_type::BPF_TRACE_UPROBE_MULTI));
    match (plain, multi) {
        (Ok(_), _) | (_, Ok(_)) => Ok(RetMode::WritableUnused),
        (Err(e), _) if e.raw_os_error() == Some(libc::EACCES) => Ok(RetMode::SingleStep),
        (Err(e), _) => Err(format!("the register-write test program failed to load: {e}")),
    }
}

fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> bpf_insn {
    // SAFETY: bpf_insn is plain data; zero is a valid value of every field.
    let mut i: bpf_insn = unsafe { std::mem::zeroed() };
    i.code = code;
    i.set_dst_reg(dst);
    i.set_src_reg(src);
    i.off = off;
    i.imm = imm;
    i
}

/// Loads a test program of the uprobe kind (`BPF_PROG_TYPE_KPROBE`).
fn load_kprobe(insns: &[bpf_insn], expected: Option<bpf_attach_type>) -> std::io::Result<OwnedFd> {
    KprobeLoad { insns, expected, ..KprobeLoad::default() }.load()
}

/// The BTF a program was compiled with: its object's BTF, loaded, and the
/// program's function and line records in it (what the verifier log cites).
pub(super) struct ProgBtf<'a> {
    pub fd: BorrowedFd<'a>,
    pub func_info: &'a [bpf_func_info],
    pub func_info_rec_size: u32,
    pub line_info: &'a [bpf_line_info],
    pub line_info_rec_size: u32,
}

/// One `BPF_PROG_LOAD` of a uprobe-kind program (`BPF_PROG_TYPE_KPROBE`),
/// the agent's only raw loader: the feature probes' test programs (bare)
/// and the programs loaded for uprobe_multi links (named, with BTF, and a
/// verifier log on a second try).
pub(super) struct KprobeLoad<'a> {
    pub insns: &'a [bpf_insn],
    pub license: &'a std::ffi::CStr,
    pub expected: Option<bpf_attach_type>,
    /// Cut to the kernel's 15 bytes, as aya does.
    pub name: &'a str,
    pub kern_version: u32,
    pub btf: Option<ProgBtf<'a>>,
}

impl Default for KprobeLoad<'_> {
    fn default() -> Self {
        KprobeLoad { insns: &[], license: c"GPL", expected: None, name: "", kern_version: 0, btf: None }
    }
}

impl KprobeLoad<'_> {
    pub fn load(&self) -> std::io::Result<OwnedFd> {
        self.load_logged(None)
    }

    /// Loads with the verifier's log written into `log` (level 1).
    pub fn load_logged(&self, log: Option<&mut [u8]>) -> std::io::Result<OwnedFd> {
        // SAFETY: bpf_attr is plain data; all-zero is its documented default.
        let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
        // SAFETY: writing plain fields of the PROG_LOAD member; every pointer
        // outlives the syscall.
        unsafe {
            let p = &mut attr.__bindgen_anon_3;
            p.prog_type = bpf_prog_type::BPF_PROG_TYPE_KPROBE as u32;
            if let Some(t) = self.expected {
                p.expected_attach_type = t as u32;
            }
            p.insns = self.insns.as_ptr() as u64;
            p.insn_cnt = self.insns.len() as u32;
            p.license = self.license.as_ptr() as u64;
            p.kern_version = self.kern_version;
            for (dst, src) in p.prog_name.iter_mut().zip(self.name.bytes().take(15)) {
                *dst = src as libc::c_char;
            }
            if let Some(btf) = &self.btf {
                p.prog_btf_fd = btf.fd.as_raw_fd() as u32;
                if !btf.func_info.is_empty() {
                    p.func_info = btf.func_info.as_ptr() as u64;
                    p.func_info_cnt = btf.func_info.len() as u32;
                    p.func_info_rec_size = btf.func_info_rec_size;
                }
                if !btf.line_info.is_empty() {
                    p.line_info = btf.line_info.as_ptr() as u64;
                    p.line_info_cnt = btf.line_info.len() as u32;
                    p.line_info_rec_size = btf.line_info_rec_size;
                }
            }
            if let Some(log) = log {
                p.log_level = 1;
                p.log_buf = log.as_mut_ptr() as u64;
                p.log_size = log.len() as u32;
            }
        }
        sys_bpf(bpf_cmd::BPF_PROG_LOAD, &mut attr)
    }
}

/// `bpf(cmd, attr)` for the commands that return a new fd.
pub(super) fn sys_bpf(cmd: bpf_cmd, attr: &mut bpf_attr) -> std::io::Result<OwnedFd> {
    // SAFETY: attr is a valid, initialised bpf_attr of the size given.
    let ret = unsafe {
        libc::syscall(libc::SYS_bpf, cmd as libc::c_long, attr as *mut bpf_attr, std::mem::size_of::<bpf_attr>())
    };
    if ret < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let fd = i32::try_from(ret).map_err(|_| std::io::Error::from_raw_os_error(libc::EBADF))?;
    // SAFETY: the kernel just returned this fd to us; nobody else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}
