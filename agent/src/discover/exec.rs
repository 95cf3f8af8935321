//! Decoding exec events from the kernel's ring buffer.

use agent_common::{ExecEvent, decode, events::ExitEvent};

/// An exec event in user-space form.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExecInfo {
    pub ktime_ns: u64,
    pub tgid: u32,
    pub comm: String,
    pub filename: String,
}

/// The kind tag every record starts with.
pub fn record_kind(bytes: &[u8]) -> Option<u32> {
    let b = bytes.get(..4)?;
    Some(u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
}

/// The tgid of an exit record.
pub fn decode_exit(bytes: &[u8]) -> Result<u32, decode::LengthMismatch> {
    decode::record::<ExitEvent>(bytes).map(|ev| ev.tgid)
}

/// Decodes one ring buffer record. A record of the wrong size (a mismatched
/// object and agent would be a build bug) is an error, for the caller to
/// count rather than misread.
pub fn decode(bytes: &[u8]) -> Result<ExecInfo, decode::LengthMismatch> {
    let ev = decode::record::<ExecEvent>(bytes)?;
    Ok(ExecInfo { ktime_ns: ev.ktime_ns, tgid: ev.tgid, comm: c_str(&ev.comm), filename: c_str(&ev.filename) })
}

/// A NUL-terminated (or full) byte buffer as a lossy UTF-8 string.
pub fn c_str(buf: &[u8]) -> String {
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use agent_common::events::{COMM_LEN, EXEC_FILENAME_LEN};

    fn exit(tgid: u32) -> ExitEvent {
        ExitEvent { kind: agent_common::events::EVENT_EXIT, tgid, ktime_ns: 9 }
    }

    #[test]
    fn decodes_and_rejects_short_records() {
        let mut ev = ExecEvent {
            kind: agent_common::events::EVENT_EXEC,
            _pad: 0,
            ktime_ns: 5,
            tgid: 77,
            old_pid: 77,
            comm: [0; COMM_LEN],
            filename: [0; EXEC_FILENAME_LEN],
        };
        ev.comm[..4].copy_from_slice(b"etcd");
        ev.filename[..13].copy_from_slice(b"/usr/bin/etcd");
        let bytes = bytemuck::bytes_of(&ev);
        let info = decode(bytes).unwrap();
        assert_eq!(info.tgid, 77);
        assert_eq!(info.comm, "etcd");
        assert_eq!(info.filename, "/usr/bin/etcd");
        let short = decode(&bytes[..10]).unwrap_err();
        assert_eq!((short.record, short.expected, short.got), ("ExecEvent", 296, 10));
        assert_eq!(record_kind(bytes), Some(agent_common::events::EVENT_EXEC));
        assert_eq!(record_kind(&bytes[..2]), None);
        assert!(decode_exit(&bytes[..4]).is_err());
        assert_eq!(c_str(b"abc"), "abc");
    }

    #[test]
    fn exit_records_decode_only_at_their_own_size() {
        let ev = exit(4242);
        let bytes = bytemuck::bytes_of(&ev);
        assert_eq!(decode_exit(bytes), Ok(4242));
        // Every shorter and a few longer lengths: an exec record is not an
        // exit record with trailing bytes, nor the reverse.
        let mut long = bytes.to_vec();
        long.extend_from_slice(&[0xff; 300]);
        for n in (0..bytes.len()).chain([bytes.len() + 1, bytes.len() + 8, 296, long.len()]) {
            let e = decode_exit(&long[..n]).unwrap_err();
            assert_eq!((e.expected, e.got), (16, n));
            assert!(decode(&long[..n]).is_err() || n == 296);
        }
        // Unaligned input decodes the same.
        let mut shifted = vec![0u8];
        shifted.extend_from_slice(bytes);
        assert_eq!(decode_exit(&shifted[1..]), Ok(4242));
    }
}
