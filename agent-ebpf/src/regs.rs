//! Reading a Go function's registers and arguments at a uprobe, shared by
//! every uprobe program.

use core::ptr::read_volatile;

use agent_common::{
    Counter,
    watch::{ARG_REG, ARG_STACK, ArgLoc},
};
use aya_ebpf::{helpers::bpf_probe_read_user, programs::ProbeContext};

use crate::maps::count;

/// The register slot of the current goroutine `g` (R14 on amd64, R28 on arm64).
pub const G_SLOT: u32 = 9;

#[inline(always)]
pub fn read_u64(addr: u64) -> Option<u64> {
    // SAFETY: bpf_probe_read_user faults safely on bad addresses.
    match unsafe { bpf_probe_read_user(addr as *const u64) } {
        Ok(v) => Some(v),
        Err(_) => {
            count(Counter::ReadError);
            None
        }
    }
}

/// Reads a Go argument where the inspector said it is.
#[inline(always)]
pub fn arg(ctx: &ProbeContext, loc: &ArgLoc) -> Option<u64> {
    // SAFETY: uprobe context is the user registers at the probed instruction.
    let regs = unsafe { &*ctx.regs };
    match loc.kind {
        ARG_REG => reg(regs, loc.off),
        // SAFETY: as above.
        ARG_STACK => read_u64(stack_pointer(regs).wrapping_add(loc.off as u64)),
        _ => None,
    }
}

#[cfg(bpf_target_arch = "x86_64")]
#[inline(always)]
pub fn reg(regs: &aya_ebpf::bindings::pt_regs, slot: u32) -> Option<u64> {
    // Go's amd64 register ABI: RAX, RBX, RCX, RDI, RSI, R8, R9, R10, R11; g
    // in R14; a closure's context in RDX.
    // Every candidate is loaded at its fixed offset first: a `match` compiles
    // to one load at a computed context offset, which the verifier forbids.
    // SAFETY: fields of the probe's own register context.
    let vals = unsafe {
        [
            read_volatile(&regs.rax),
            read_volatile(&regs.rbx),
            read_volatile(&regs.rcx),
            read_volatile(&regs.rdi),
            read_volatile(&regs.rsi),
            read_volatile(&regs.r8),
            read_volatile(&regs.r9),
            read_volatile(&regs.r10),
            read_volatile(&regs.r11),
            read_volatile(&regs.r14),
            read_volatile(&regs.rdx),
        ]
    };
    vals.get(slot as usize).copied()
}

#[cfg(bpf_target_arch = "x86_64")]
#[inline(always)]
pub fn flags(regs: &aya_ebpf::bindings::pt_regs) -> u64 {
    // SAFETY: a field of the probe's own register context.
    unsafe { read_volatile(&regs.eflags) }
}

#[cfg(bpf_target_arch = "aarch64")]
#[inline(always)]
pub fn flags(regs: &aya_ebpf::bindings::user_pt_regs) -> u64 {
    // SAFETY: a field of the probe's own register context.
    unsafe { read_volatile(&regs.pstate) }
}

#[cfg(bpf_target_arch = "x86_64")]
#[inline(always)]
pub fn stack_pointer(regs: &aya_ebpf::bindings::pt_regs) -> u64 {
    // SAFETY: a field of the probe's own register context.
    unsafe { read_volatile(&regs.rsp) }
}

/// Where the probed function returns to, read at its entry (before its
/// prologue moves the stack): amd64 keeps it at the stack pointer.
#[cfg(bpf_target_arch = "x86_64")]
#[inline(always)]
pub fn entry_return_address(regs: &aya_ebpf::bindings::pt_regs) -> Option<u64> {
    read_u64(stack_pointer(regs))
}

/// Where the probed function returns to, read at its entry: arm64 keeps it
/// in the link register.
#[cfg(bpf_target_arch = "aarch64")]
#[inline(always)]
pub fn entry_return_address(regs: &aya_ebpf::bindings::user_pt_regs) -> Option<u64> {
    // SAFETY: a field of the probe's own register context.
    Some(unsafe { read_volatile(&regs.regs[30]) })
}

/// The probed instruction's runtime address (the kernel sets it before
/// running the program).
#[cfg(bpf_target_arch = "x86_64")]
#[inline(always)]
pub fn instruction_pointer(regs: &aya_ebpf::bindings::pt_regs) -> u64 {
    // SAFETY: a field of the probe's own register context.
    unsafe { read_volatile(&regs.rip) }
}

#[cfg(bpf_target_arch = "aarch64")]
#[inline(always)]
pub fn instruction_pointer(regs: &aya_ebpf::bindings::user_pt_regs) -> u64 {
    // SAFETY: a field of the probe's own register context.
    unsafe { read_volatile(&regs.pc) }
}

#[cfg(bpf_target_arch = "aarch64")]
#[inline(always)]
pub fn reg(regs: &aya_ebpf::bindings::user_pt_regs, slot: u32) -> Option<u64> {
    // Go's arm64 register ABI: R0–R8 in order (the same slots as amd64); g in
    // R28; a closure's context in R26.
    // Copied out at fixed offsets first (see the x86_64 variant).
    // SAFETY: fields of the probe's own register context.
    let vals = unsafe {
        [
            read_volatile(&regs.regs[0]),
            read_volatile(&regs.regs[1]),
            read_volatile(&regs.regs[2]),
            read_volatile(&regs.regs[3]),
            read_volatile(&regs.regs[4]),
            read_volatile(&regs.regs[5]),
            read_volatile(&regs.regs[6]),
            read_volatile(&regs.regs[7]),
            read_volatile(&regs.regs[8]),
            read_volatile(&regs.regs[28]),
            read_volatile(&regs.regs[26]),
        ]
    };
    vals.get(slot as usize).copied()
}

#[cfg(bpf_target_arch = "aarch64")]
#[inline(always)]
pub fn stack_pointer(regs: &aya_ebpf::bindings::user_pt_regs) -> u64 {
    regs.sp
}
