//! Return sites of one function, for uprobes that stand in for uretprobes
//! (which crash Go programs: the runtime moves goroutine stacks and finds the
//! trampoline's return address). The whole body is decoded from the entry;
//! if any byte cannot be decoded cleanly, the function is unusable: a probe
//! in the middle of an instruction corrupts the program.

use iced_x86::{Decoder, DecoderOptions, FlowControl, Mnemonic, OpKind};

use super::elf::Arch;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("undecodable instruction at +{offset:#x}")]
    Invalid { offset: u64 },
    #[error("instruction at +{offset:#x} runs past the function's end")]
    PastEnd { offset: u64 },
    #[error("arm64 function at {addr:#x} of size {size} is not 4-byte aligned")]
    Misaligned { addr: u64, size: u64 },
    #[error("function body is empty")]
    Empty,
}

/// Offsets (from the function's entry) of every return instruction.
pub fn return_offsets(arch: Arch, code: &[u8], addr: u64) -> Result<Vec<u64>, DecodeError> {
    if code.is_empty() {
        return Err(DecodeError::Empty);
    }
    match arch {
        Arch::X86_64 => x86_returns(code, addr),
        Arch::Aarch64 => arm64_returns(code, addr),
    }
}

fn x86_returns(code: &[u8], addr: u64) -> Result<Vec<u64>, DecodeError> {
    let mut out = Vec::new();
    let mut dec = Decoder::with_ip(64, code, addr, DecoderOptions::NONE);
    while dec.can_decode() {
        let offset = dec.position() as u64;
        let ins = dec.decode();
        if ins.is_invalid() {
            // The decoder reports a cut-off instruction the same way; tell
            // the two apart for the message.
            return Err(if dec.last_error() == iced_x86::DecoderError::NoMoreBytes {
                DecodeError::PastEnd { offset }
            } else {
                DecodeError::Invalid { offset }
            });
        }
        if matches!(ins.mnemonic(), Mnemonic::Ret | Mnemonic::Retf) {
            out.push(offset);
        }
    }
    Ok(out)
}

/// Whether the kernel's x86 uprobes run the instruction starting `bytes`
/// by emulation, in the one trap of the breakpoint (arch/x86/kernel/
/// uprobes.c, `branch_setup_xol_ops`): relative jumps and calls,
/// conditional jumps and a one-byte NOP, without prefixes. Any other
/// instruction is single-stepped out of line: a second trap, ~4 µs here.
pub fn x86_emulated(bytes: &[u8]) -> bool {
    match bytes {
        [0xe8 | 0xe9 | 0xeb | 0x90, ..] => true,
        [op, ..] if (0x70..=0x7f).contains(op) => true,
        [0x0f, op, ..] => (0x80..=0x8f).contains(op),
        _ => false,
    }
}

/// Whether decoding the function `code` (at `addr`) from its entry meets an
/// instruction at `at` that is a direct near call to `target`: tells a real
/// call site from an `E8` byte that merely looks like one.
pub fn x86_calls_at(code: &[u8], addr: u64, at: u64, target: u64) -> bool {
    let mut dec = Decoder::with_ip(64, code, addr, DecoderOptions::NONE);
    while dec.can_decode() && dec.ip() <= at {
        let ins = dec.decode();
        if ins.is_invalid() {
            return false;
        }
        if ins.ip() == at {
            return ins.mnemonic() == Mnemonic::Call
                && ins.op0_kind() == OpKind::NearBranch64
                && ins.near_branch_target() == target;
        }
    }
    false
}

/// Why no cheap end site follows a call.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EndSiteError {
    #[error("undecodable instruction at {0:#x}")]
    Invalid(u64),
    #[error("the first branch after the return, at {at:#x}, is `{mnemonic:?}`, which the kernel single-steps")]
    NotEmulated { at: u64, mnemonic: Mnemonic },
    #[error("no branch within {0} instructions after the return")]
    TooFar(usize),
}

/// The first instruction, from a return address `addr` (`code` starts
/// there), that transfers control: every return to `addr` runs the
/// straight-line code before it and then reaches it. Its offset from `addr`
/// if the kernel emulates it (a probe there costs one trap, not two).
pub fn x86_first_branch(code: &[u8], addr: u64, max_instructions: usize) -> Result<u64, EndSiteError> {
    let mut dec = Decoder::with_ip(64, code, addr, DecoderOptions::NONE);
    for _ in 0..max_instructions {
        if !dec.can_decode() {
            break;
        }
        let offset = dec.position();
        let ins = dec.decode();
        if ins.is_invalid() {
            return Err(EndSiteError::Invalid(ins.ip()));
        }
        if ins.flow_control() == FlowControl::Next {
            continue;
        }
        let bytes = code.get(offset..offset + ins.len()).unwrap_or_default();
        return if x86_emulated(bytes) {
            Ok(offset as u64)
        } else {
            Err(EndSiteError::NotEmulated { at: ins.ip(), mnemonic: ins.mnemonic() })
        };
    }
    Err(EndSiteError::TooFar(max_instructions))
}

/// `RET Xn` is 0xd65f0000 | n << 5 (plain `RET` uses X30: 0xd65f03c0);
/// RETAA/RETAB are the pointer-authenticating forms.
pub fn is_arm64_ret(word: u32) -> bool {
    word & 0xffff_fc1f == 0xd65f_0000 || word == 0xd65f_0bff || word == 0xd65f_0fff
}

fn arm64_returns(code: &[u8], addr: u64) -> Result<Vec<u64>, DecodeError> {
    let size = code.len() as u64;
    if !addr.is_multiple_of(4) || !size.is_multiple_of(4) {
        return Err(DecodeError::Misaligned { addr, size });
    }
    Ok(code
        .chunks_exact(4)
        .enumerate()
        .filter_map(|(i, w)| {
            let word = u32::from_le_bytes([*w.first()?, *w.get(1)?, *w.get(2)?, *w.get(3)?]);
            is_arm64_ret(word).then_some(i as u64 * 4)
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emulated_branches_and_end_sites() {
        assert!(x86_emulated(&[0xeb, 0x10]));
        assert!(x86_emulated(&[0x74, 0x05]));
        assert!(x86_emulated(&[0x0f, 0x84, 0, 0, 0, 0]));
        assert!(x86_emulated(&[0xe8, 0, 0, 0, 0]));
        assert!(!x86_emulated(&[0x66, 0xe8, 0, 0]), "a prefixed call is single-stepped");
        assert!(!x86_emulated(&[0xc3]));
        assert!(!x86_emulated(&[0xff, 0xd0]), "an indirect call is single-stepped");
        assert!(!x86_emulated(&[]));
        // test al,al; je +5 — after a call returning bool.
        let after = [0x84, 0xc0, 0x74, 0x05, 0x90];
        assert_eq!(x86_first_branch(&after, 0x2000, 8), Ok(2));
        // mov rax,[rsp+8]; add rsp,0x18; pop rbp; ret — a wrapper's tail.
        let tail = [0x48, 0x8b, 0x44, 0x24, 0x08, 0x48, 0x83, 0xc4, 0x18, 0x5d, 0xc3];
        assert_eq!(
            x86_first_branch(&tail, 0x3000, 8),
            Err(EndSiteError::NotEmulated { at: 0x300a, mnemonic: Mnemonic::Ret })
        );
        assert_eq!(x86_first_branch(&[0x48, 0x89, 0xc3, 0x48, 0x89, 0xc3], 0, 2), Err(EndSiteError::TooFar(2)));
        // push rbp; call +0 (to 0x1006); xor eax,eax; ret
        let f = [0x55, 0xe8, 0x00, 0x00, 0x00, 0x00, 0x31, 0xc0, 0xc3];
        assert!(x86_calls_at(&f, 0x1000, 0x1001, 0x1006));
        assert!(!x86_calls_at(&f, 0x1000, 0x1001, 0x1007), "another target");
        assert!(!x86_calls_at(&f, 0x1000, 0x1002, 0x1006), "not an instruction boundary");
    }

    #[test]
    fn x86_finds_rets_and_refuses_cut_instructions() {
        // mov eax,1 ; ret ; xor eax,eax ; ret
        let code = [0xb8, 1, 0, 0, 0, 0xc3, 0x31, 0xc0, 0xc3];
        assert_eq!(return_offsets(Arch::X86_64, &code, 0x1000).unwrap(), vec![5, 8]);
        assert_eq!(return_offsets(Arch::X86_64, &code[..3], 0x1000), Err(DecodeError::PastEnd { offset: 0 }));
        // 0x06 (push es) is invalid in 64-bit mode.
        assert_eq!(return_offsets(Arch::X86_64, &[0x90, 0x06, 0x90, 0x90], 0), Err(DecodeError::Invalid { offset: 1 }));
    }

    #[test]
    fn arm64_ret_family() {
        assert!(is_arm64_ret(0xd65f03c0)); // ret
        assert!(is_arm64_ret(0xd65f0020)); // ret x1
        assert!(is_arm64_ret(0xd65f0bff)); // retaa
        assert!(!is_arm64_ret(0xd63f0020)); // blr x1
        assert!(!is_arm64_ret(0xd61f0020)); // br x1
        let code = [0x1f, 0x20, 0x03, 0xd5, 0xc0, 0x03, 0x5f, 0xd6];
        assert_eq!(return_offsets(Arch::Aarch64, &code, 0x1000).unwrap(), vec![4]);
        assert!(return_offsets(Arch::Aarch64, &code[..6], 0x1000).is_err());
    }
}
