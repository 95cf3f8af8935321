//! Decoding exec events from the kernel's ring buffer.

use agent_common::{ExecEvent, events::ExitEvent};

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
pub fn decode_exit(bytes: &[u8]) -> Option<u32> {
    if bytes.len() < size_of::<ExitEvent>() {
        return None;
    }
    // SAFETY: length checked; ExitEvent is plain data.
    let ev: ExitEvent = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
    Some(ev.tgid)
}

/// Decodes one ring buffer record. Returns None for a record of the wrong
/// size (a mismatched object and agent would be a build bug; we count it
/// rather than misread it).
pub fn decode(bytes: &[u8]) -> Option<ExecInfo> {
    if bytes.len() < size_of::<ExecEvent>() {
        return None;
    }
    // SAFETY: length checked; ExecEvent is plain data, any bit pattern valid.
    let ev: ExecEvent = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
    Some(ExecInfo { ktime_ns: ev.ktime_ns, tgid: ev.tgid, comm: c_str(&ev.comm), filename: c_str(&ev.filename) })
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
        // SAFETY: reading a repr(C) value's bytes.
        let bytes =
            unsafe { std::slice::from_raw_parts((&ev as *const ExecEvent).cast::<u8>(), size_of::<ExecEvent>()) };
        let info = decode(bytes).unwrap();
        assert_eq!(info.tgid, 77);
        assert_eq!(info.comm, "etcd");
        assert_eq!(info.filename, "/usr/bin/etcd");
        assert_eq!(decode(&bytes[..10]), None);
        assert_eq!(record_kind(bytes), Some(agent_common::events::EVENT_EXEC));
        assert_eq!(record_kind(&bytes[..2]), None);
        assert_eq!(decode_exit(&bytes[..4]), None);
        assert_eq!(c_str(b"abc"), "abc");
    }
}
