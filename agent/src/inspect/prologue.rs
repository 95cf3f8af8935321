//! Where an entry probe should go: on the conditional jump of a Go
//! function's stack-check prologue.
//!
//! A Go function starts by comparing the stack pointer with the goroutine's
//! stack guard and, if the stack is too small, calls `runtime.morestack`,
//! which copies the stack and jumps back to the function's *entry*: a probe
//! on the entry would fire twice for that call. The guard's conditional
//! jump sees the argument registers and the stack pointer exactly as they
//! were at entry (the prologue only writes a scratch register and the
//! flags), and the flags tell whether this pass is the one that will call
//! morestack; the kernel program skips that pass (`guard_taken`), so every
//! call counts once.
//!
//! Why the jump and not the instruction after it: the kernel *emulates* a
//! probed jump in one trap, but single-steps most other instructions out of
//! line, a second trap. Measured here (a Firecracker VM, kernel 6.18): 0.67
//! µs per hit on a `jae`, 6.6–10 µs on a `lea`; on etcd that difference was
//! a third of its put throughput.
//!
//! Anything but a recognised prologue is refused, never guessed.

use agent_common::watch::{GUARD_ARM64_LS, GUARD_NONE, GUARD_X86_JB, GUARD_X86_JBE};
use iced_x86::{Decoder, DecoderOptions, FlowControl, Instruction, Mnemonic, OpKind, Register};

/// Where to probe, and how the kernel recognises the morestack pass there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProbeSite {
    /// Bytes from the function entry.
    pub offset: u64,
    /// One of `agent_common::watch::GUARD_*`.
    pub guard: u32,
}

impl ProbeSite {
    /// The entry itself, for functions without a stack check.
    pub const ENTRY: ProbeSite = ProbeSite { offset: 0, guard: GUARD_NONE };
}

/// Why no probe site was found.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PrologueError {
    #[error("the function's first bytes do not decode")]
    Undecodable,
    #[error("unrecognised prologue instruction `{0}` before the stack check")]
    Unrecognised(String),
    #[error("the stack-check jump is not followed by an instruction inside the function")]
    Truncated,
}

/// Registers the register ABI passes arguments in (and g, and the frame
/// pointer): the prologue must not write any of them before our site.
const ARG_REGS: [Register; 11] = [
    Register::RAX,
    Register::RBX,
    Register::RCX,
    Register::RDI,
    Register::RSI,
    Register::R8,
    Register::R9,
    Register::R10,
    Register::R11,
    Register::R14,
    Register::RSP,
];

/// The probe site of an amd64 function whose bytes start at `code`: the
/// stack check's conditional jump, or the entry for functions without a
/// stack check (NOSPLIT leaves), where the entry runs once per call.
pub fn amd64_probe_site(code: &[u8], entry: u64, register_abi: bool) -> Result<ProbeSite, PrologueError> {
    let mut dec = Decoder::with_ip(64, code, entry, DecoderOptions::NONE);
    let mut ins = Instruction::default();
    let mut seen_guard_cmp = false;
    // The longest prologue (frames above StackBig) is 5 instructions.
    for i in 0..6 {
        if !dec.can_decode() {
            return Err(PrologueError::Truncated);
        }
        dec.decode_out(&mut ins);
        if ins.is_invalid() {
            return Err(PrologueError::Undecodable);
        }
        if seen_guard_cmp && ins.flow_control() == FlowControl::ConditionalBranch {
            let guard = match ins.mnemonic() {
                Mnemonic::Jbe => GUARD_X86_JBE,
                Mnemonic::Jb => GUARD_X86_JB,
                other => return Err(PrologueError::Unrecognised(format!("stack check ends in {other:?}"))),
            };
            let next = ins.next_ip() - entry;
            return if (next as usize) < code.len() {
                Ok(ProbeSite { offset: ins.ip() - entry, guard })
            } else {
                Err(PrologueError::Truncated)
            };
        }
        if is_guard_cmp(&ins, register_abi) {
            seen_guard_cmp = true;
            continue;
        }
        if !is_prologue_scratch(&ins, register_abi) {
            // A first instruction that is no part of a prologue means there
            // is no stack check (NOSPLIT): the entry runs once per call.
            // Anything unknown later, inside a prologue, is refused.
            if i > 0 {
                return Err(PrologueError::Unrecognised(format!("{:?}", ins.mnemonic())));
            }
            // Before calling it NOSPLIT, make sure no guard compare follows
            // shortly: that would be a prologue of a shape we do not know,
            // and an entry probe there could fire twice.
            for _ in 0..4 {
                if !dec.can_decode() {
                    break;
                }
                dec.decode_out(&mut ins);
                if ins.is_invalid() {
                    break;
                }
                if is_guard_cmp(&ins, register_abi) {
                    return Err(PrologueError::Unrecognised("stack check after an unknown first instruction".into()));
                }
            }
            return Ok(ProbeSite::ENTRY);
        }
    }
    Err(PrologueError::Unrecognised("prologue longer than expected".into()))
}

/// `cmp rsp|r12|r13, [r14+0x10]` (register ABI, g in R14) or
/// `cmp rsp|reg, [rcx+0x10]` (stack ABI, g loaded from TLS into RCX).
fn is_guard_cmp(ins: &Instruction, register_abi: bool) -> bool {
    if ins.mnemonic() != Mnemonic::Cmp || ins.op_count() != 2 || ins.op1_kind() != OpKind::Memory {
        return false;
    }
    let g = if register_abi { Register::R14 } else { Register::RCX };
    ins.memory_base() == g && ins.memory_index() == Register::None && matches!(ins.memory_displacement64(), 0x10 | 0x18)
}

/// Instructions a prologue runs before the guard compare: computing the
/// frame bottom into a scratch register (`lea r12,[rsp-N]`, `mov r12,rsp`,
/// `sub r12,N`, `jb` on overflow), or, with the stack ABI, loading g from
/// TLS into RCX (`mov rcx, fs:[-8]`). The stack ABI's scratch register is
/// RAX (`lea rax,[rsp-N]`: no argument lives in a register there); with
/// the register ABI RAX holds the first argument, so writing it is refused.
fn is_prologue_scratch(ins: &Instruction, register_abi: bool) -> bool {
    let dst = ins.op0_register();
    let scratch = matches!(dst, Register::R12 | Register::R13) || (!register_abi && dst == Register::RAX);
    let shape = match ins.mnemonic() {
        Mnemonic::Lea | Mnemonic::Sub => scratch,
        Mnemonic::Mov => scratch || (!register_abi && dst == Register::RCX && ins.segment_prefix() == Register::FS),
        // An overflow check on a huge frame: `jb` to the morestack call.
        Mnemonic::Jb => true,
        _ => false,
    };
    shape && !writes_arg_register(ins, register_abi)
}

fn writes_arg_register(ins: &Instruction, register_abi: bool) -> bool {
    if ins.op_count() == 0 || ins.op0_kind() != OpKind::Register {
        return false;
    }
    if !register_abi {
        // Stack ABI: every argument is on the stack; RCX (g) and RAX
        // (the frame bottom) are scratch.
        return false;
    }
    ARG_REGS.contains(&ins.op0_register().full_register())
}

/// arm64: `ldr x16, [x28, #16]`, optional `sub x17, sp, #N`, `cmp`, then
/// `b.ls`; the site is the `b.ls` (the kernel simulates branches too). The
/// entry when the first instruction is not the guard load (no stack check).
pub fn arm64_probe_site(code: &[u8]) -> Result<ProbeSite, PrologueError> {
    let word = |i: usize| -> Option<u32> {
        let b = code.get(i * 4..i * 4 + 4)?;
        Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    const LDR_X16_G_GUARD: u32 = 0xf940_0b90; // ldr x16, [x28, #16]
    let Some(first) = word(0) else {
        return Err(PrologueError::Truncated);
    };
    if first != LDR_X16_G_GUARD {
        return Ok(ProbeSite::ENTRY);
    }
    for i in 1..5 {
        let w = word(i).ok_or(PrologueError::Truncated)?;
        // b.cond with cond = LS (0b1001): 0101_0100 imm19 0 1001
        if w & 0xff00_001f == 0x5400_0009 {
            let next = (i as u64 + 1) * 4;
            return if (next as usize) < code.len() {
                Ok(ProbeSite { offset: i as u64 * 4, guard: GUARD_ARM64_LS })
            } else {
                Err(PrologueError::Truncated)
            };
        }
    }
    Err(PrologueError::Unrecognised(format!("{first:#010x} not followed by b.ls")))
}

/// Whether a closure's code loads a 64-bit word from its context register
/// (RDX) at `disp` before anything else writes RDX, branches or calls:
/// how Go reads the closure's first captured variable. Scans at most the
/// first 16 instructions, past the stack-check branch (which falls through
/// on the normal path).
pub fn amd64_loads_context(code: &[u8], entry: u64, disp: u64) -> bool {
    let mut dec = Decoder::with_ip(64, code, entry, DecoderOptions::NONE);
    let mut ins = Instruction::default();
    for _ in 0..16 {
        if !dec.can_decode() {
            return false;
        }
        dec.decode_out(&mut ins);
        if ins.is_invalid() {
            return false;
        }
        let load = ins.mnemonic() == Mnemonic::Mov
            && ins.op_count() == 2
            && ins.op0_kind() == OpKind::Register
            && ins.op0_register().size() == 8
            && ins.op1_kind() == OpKind::Memory
            && ins.memory_base() == Register::RDX
            && ins.memory_index() == Register::None
            && ins.memory_displacement64() == disp;
        if load {
            return true;
        }
        match ins.flow_control() {
            // The stack check's branch to morestack: the body follows.
            FlowControl::ConditionalBranch | FlowControl::Next => {}
            _ => return false,
        }
        if ins.op_count() > 0
            && ins.op0_kind() == OpKind::Register
            && ins.op0_register().full_register() == Register::RDX
        {
            return false;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etcd_notify_lea_cmp_jbe() {
        // lea r12,[rsp-0xc8]; cmp r12,[r14+0x10]; jbe +0x..; push rbp
        let code = [
            0x4c, 0x8d, 0xa4, 0x24, 0x38, 0xff, 0xff, 0xff, 0x4d, 0x3b, 0x66, 0x10, 0x0f, 0x86, 0x00, 0x01, 0x00, 0x00,
            0x55,
        ];
        assert_eq!(amd64_probe_site(&code, 0xb0b4c0, true), Ok(ProbeSite { offset: 12, guard: GUARD_X86_JBE }));
    }

    #[test]
    fn small_frame_cmp_rsp_jbe8() {
        // cmp rsp,[r14+0x10]; jbe +0x2f; push rbp
        let code = [0x49, 0x3b, 0x66, 0x10, 0x76, 0x2f, 0x55, 0x48, 0x89, 0xe5];
        assert_eq!(amd64_probe_site(&code, 0x1000, true), Ok(ProbeSite { offset: 4, guard: GUARD_X86_JBE }));
    }

    #[test]
    fn stack_abi_tls_guard() {
        // mov rcx, fs:[0xfffffffffffffff8]; cmp rsp,[rcx+0x10]; jbe +0x40; sub rsp,0x18
        let code = [
            0x64, 0x48, 0x8b, 0x0c, 0x25, 0xf8, 0xff, 0xff, 0xff, 0x48, 0x3b, 0x61, 0x10, 0x76, 0x40, 0x48, 0x83, 0xec,
            0x18,
        ];
        assert_eq!(amd64_probe_site(&code, 0x1000, false), Ok(ProbeSite { offset: 13, guard: GUARD_X86_JBE }));
    }

    #[test]
    fn stack_abi_big_frame_lea_rax() {
        // etcd 3.3.25 (Go 1.15) notify: mov rcx,fs:[-8]; lea rax,[rsp-0x78];
        // cmp rax,[rcx+0x10]; jbe +0x2dd; sub rsp,0xf8
        let code = [
            0x64, 0x48, 0x8b, 0x0c, 0x25, 0xf8, 0xff, 0xff, 0xff, 0x48, 0x8d, 0x44, 0x24, 0x88, 0x48, 0x3b, 0x41, 0x10,
            0x0f, 0x86, 0xdd, 0x02, 0x00, 0x00, 0x48, 0x81, 0xec, 0xf8, 0x00, 0x00, 0x00,
        ];
        assert_eq!(amd64_probe_site(&code, 0xa8aaa0, false), Ok(ProbeSite { offset: 0x12, guard: GUARD_X86_JBE }));
        // Under the register ABI, `lea rax` before a stack check writes an
        // argument register: refused.
        let code = [0x48, 0x8d, 0x44, 0x24, 0x88, 0x49, 0x3b, 0x46, 0x10, 0x0f, 0x86, 0xdd, 0x02, 0x00, 0x00, 0x55];
        assert!(amd64_probe_site(&code, 0x1000, true).is_err());
    }

    #[test]
    fn nosplit_function_probes_entry() {
        // mov rax,[rax+8]; ret  (no stack check)
        let code = [0x48, 0x8b, 0x40, 0x08, 0xc3];
        assert_eq!(amd64_probe_site(&code, 0x1000, true), Ok(ProbeSite::ENTRY));
    }

    #[test]
    fn refuses_writes_to_argument_registers_and_truncation() {
        // lea rax,[rsp-8]; cmp rax,[r14+0x10]; jbe: writes an argument register
        let code = [0x48, 0x8d, 0x44, 0x24, 0xf8, 0x49, 0x3b, 0x46, 0x10, 0x76, 0x10, 0x55];
        assert!(amd64_probe_site(&code, 0x1000, true).is_err());
        // cut right after the jbe
        let code = [0x49, 0x3b, 0x66, 0x10, 0x76, 0x2f];
        assert_eq!(amd64_probe_site(&code, 0x1000, true), Err(PrologueError::Truncated));
        assert_eq!(amd64_probe_site(&[0xff, 0xff], 0x1000, true), Err(PrologueError::Undecodable));
    }

    #[test]
    fn arm64_guard() {
        let mut code = Vec::new();
        for w in [0xf940_0b90u32, 0xeb30_63ff, 0x5400_0209, 0xa9bf_7bfd] {
            code.extend_from_slice(&w.to_le_bytes());
        }
        assert_eq!(arm64_probe_site(&code), Ok(ProbeSite { offset: 8, guard: GUARD_ARM64_LS }));
        assert_eq!(arm64_probe_site(&0xd65f_03c0u32.to_le_bytes()), Ok(ProbeSite::ENTRY));
    }

    /// k8s.io/apiserver 0.36.4's `cacheWatcher.add.func1` (Go 1.27):
    /// `lea r12,[rsp-0x48]; cmp r12,[r14+0x10]; jbe ...; push rbp; mov
    /// rbp,rsp; sub rsp,0xc0; mov rdx,[rdx+8]; mov [rsp+...],rdx`.
    #[test]
    fn a_closure_that_loads_its_first_capture_is_recognised() {
        let code = [
            0x4c, 0x8d, 0x64, 0x24, 0xb8, 0x4d, 0x3b, 0x66, 0x10, 0x0f, 0x86, 0xe2, 0x02, 0x00, 0x00, 0x55, 0x48, 0x89,
            0xe5, 0x48, 0x81, 0xec, 0xc0, 0x00, 0x00, 0x00, 0x48, 0x8b, 0x52, 0x08, 0x48, 0x89, 0x94, 0x24,
        ];
        assert!(amd64_loads_context(&code, 0x2339880, 8));
        assert!(!amd64_loads_context(&code, 0x2339880, 16), "another capture");
        // RDX overwritten first (`xor edx,edx`), then the same load: not the context.
        let clobbered = [0x31, 0xd2, 0x48, 0x8b, 0x52, 0x08];
        assert!(!amd64_loads_context(&clobbered, 0, 8));
        // A call before it: the context may be gone.
        let call = [0xe8, 0x00, 0x00, 0x00, 0x00, 0x48, 0x8b, 0x52, 0x08];
        assert!(!amd64_loads_context(&call, 0, 8));
        assert!(!amd64_loads_context(&[], 0, 8));
    }
}
