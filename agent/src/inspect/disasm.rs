//! Return sites of one function, for uprobes that stand in for uretprobes
//! (which crash Go programs: the runtime moves goroutine stacks and finds the
//! trampoline's return address). The whole body is decoded from the entry;
//! if any byte cannot be decoded cleanly, the function is unusable: a probe
//! in the middle of an instruction corrupts the program.

use iced_x86::{Decoder, DecoderOptions, Mnemonic};

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
