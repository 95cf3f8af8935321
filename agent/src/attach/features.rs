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

/// What one uprobe hit costs on this node: the kernel's breakpoint, its
/// uprobe lookup, an empty program, and the probed instruction's execution,
/// less the call itself. Measured on the agent's own code, so that a user
/// can price a probe before attaching one to anything else.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TrapCost {
    /// On a jump the kernel emulates in the one trap (where watchscope puts
    /// a Go function's entry probe: its stack check's conditional jump).
    pub emulated_ns: f64,
    /// On an instruction the kernel must single-step afterwards, a second
    /// trap (a RET site, on kernels that refuse register writes).
    pub single_step_ns: f64,
}

/// Calls per timing: enough that the traps (about 1 µs each in a VM, a
/// few hundred ns on bare metal) dwarf the clock's resolution, few enough
/// that `check` stays well under a second with single-steps at 5 µs.
const TRAP_CALLS: u64 = 10_000;

/// Calls that check the probe fires once per call before it is timed.
const TRAP_CHECK_CALLS: u64 = 1_000;

/// Measures [`TrapCost`] with an empty program on two functions of this
/// binary, attached by a uprobe_multi link on this binary's file, timed
/// against the same calls unprobed (each the fastest of three runs: the
/// noise here is only ever added time). Before it is timed, the probe must
/// have run once per call, counted by the kernel's run-time statistics
/// (`runs`: the program's run count), on only while counting: a probe on
/// the wrong instruction would price nothing and say it had.
pub fn trap_cost(runs: impl Fn(BorrowedFd<'_>) -> Option<u64>) -> Result<TrapCost, String> {
    let targets = trap_targets().ok_or_else(|| "not built for this architecture".to_string())?;
    // r0 = 0; exit
    let insns = [insn(0xb7, 0, 0, 0, 0), insn(0x95, 0, 0, 0, 0)];
    // Named, so that a test can see it gone with `check`.
    let prog = KprobeLoad {
        insns: &insns,
        expected: Some(bpf_attach_type::BPF_TRACE_UPROBE_MULTI),
        name: "ws_trap_cost",
        ..KprobeLoad::default()
    }
    .load()
    .map_err(|e| format!("a test program for a uprobe_multi link was refused: {e}"))?;
    let maps = std::fs::read_to_string("/proc/self/maps").map_err(|e| format!("/proc/self/maps: {e}"))?;
    let mut per_hit = [0.0; 2];
    for (cost, target) in per_hit.iter_mut().zip(targets) {
        let (path, offset) = file_offset(&maps, target as usize as u64)
            .ok_or_else(|| "this binary's code is not mapped from a file".to_string())?;
        let plain = fastest_of_three(target);
        let link = MultiLink::attach("trap_cost", prog.as_fd(), Path::new(&path), &[offset], &[0])
            .map_err(|e| format!("a test probe on {path} was refused: {e}"))?;
        let fired = {
            let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime)
                .map_err(|e| format!("cannot count the test probe's hits: {e}"))?;
            let before = runs(prog.as_fd());
            call(target, TRAP_CHECK_CALLS);
            runs(prog.as_fd()).zip(before).map(|(after, before)| after.saturating_sub(before))
        };
        match fired {
            Some(TRAP_CHECK_CALLS) => {}
            Some(n) => return Err(format!("the test probe ran {n} times in {TRAP_CHECK_CALLS} calls")),
            None => return Err("cannot read the test program's run count".to_string()),
        }
        let probed = fastest_of_three(target);
        drop(link);
        *cost = probed.saturating_sub(plain).as_nanos() as f64 / TRAP_CALLS as f64;
    }
    Ok(TrapCost { emulated_ns: per_hit[0], single_step_ns: per_hit[1] })
}

fn fastest_of_three(target: extern "C" fn()) -> std::time::Duration {
    (0..3)
        .map(|_| {
            let start = std::time::Instant::now();
            call(target, TRAP_CALLS);
            start.elapsed()
        })
        .min()
        .unwrap_or_default()
}

/// Calls `target` `n` times, through an opaque pointer (never inlined).
fn call(target: extern "C" fn(), n: u64) {
    for _ in 0..n {
        std::hint::black_box(target)();
    }
}

/// Where `addr` lies in the file mapped executable there, from
/// `/proc/<pid>/maps` lines (`start-end perms offset dev inode path`).
fn file_offset(maps: &str, addr: u64) -> Option<(String, u64)> {
    maps.lines().find_map(|line| {
        let mut f = line.split_whitespace();
        let (start, end) = f.next()?.split_once('-')?;
        let (start, end) = (u64::from_str_radix(start, 16).ok()?, u64::from_str_radix(end, 16).ok()?);
        let perms = f.next()?;
        let offset = u64::from_str_radix(f.next()?, 16).ok()?;
        let path = f.nth(2)?;
        (start <= addr && addr < end && perms.contains('x') && path.starts_with('/') && f.next().is_none())
            .then(|| (path.to_string(), addr - start + offset))
    })
}

/// The two probe targets, each its first instruction then a return: a jump
/// to the next instruction (emulated), and a register clear (single-stepped).
#[cfg(target_arch = "x86_64")]
fn trap_targets() -> Option<[extern "C" fn(); 2]> {
    #[unsafe(naked)]
    extern "C" fn jump() {
        core::arch::naked_asm!("jmp 2f", "2:", "ret")
    }
    #[unsafe(naked)]
    extern "C" fn step() {
        core::arch::naked_asm!("xor eax, eax", "ret")
    }
    Some([jump, step])
}

#[cfg(target_arch = "aarch64")]
fn trap_targets() -> Option<[extern "C" fn(); 2]> {
    #[unsafe(naked)]
    extern "C" fn jump() {
        core::arch::naked_asm!("b 2f", "2:", "ret")
    }
    #[unsafe(naked)]
    extern "C" fn step() {
        core::arch::naked_asm!("eor x9, x9, x9", "ret")
    }
    Some([jump, step])
}

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
fn trap_targets() -> Option<[extern "C" fn(); 2]> {
    None
}

#[cfg(test)]
mod tests {
    use super::file_offset;

    const MAPS: &str = "\
55d0c0a00000-55d0c0b00000 r--p 00000000 fd:01 1234 /usr/bin/watchscope
55d0c0b00000-55d0c0f00000 r-xp 00100000 fd:01 1234 /usr/bin/watchscope
7f0000000000-7f0000001000 r-xp 00000000 00:00 0 
7f0000002000-7f0000003000 r-xp 00002000 fd:01 99 /usr/lib/libc.so.6 (deleted)
7ffd00000000-7ffd00001000 r-xp 00000000 00:00 0 [vdso]
";

    #[test]
    fn an_address_in_executable_text_maps_to_its_file_offset() {
        assert_eq!(file_offset(MAPS, 0x55d0c0b00010), Some(("/usr/bin/watchscope".into(), 0x100010)));
    }

    #[test]
    fn addresses_outside_a_file_backed_executable_mapping_have_none() {
        // read-only text, anonymous memory, a deleted file, the vdso, unmapped
        for addr in [0x55d0c0a00010, 0x7f0000000010, 0x7f0000002010, 0x7ffd00000010, 0x10] {
            assert_eq!(file_offset(MAPS, addr), None, "{addr:#x}");
        }
        assert_eq!(file_offset("garbage\n\n-\nzz-yy r-xp", 0x10), None);
    }
}
