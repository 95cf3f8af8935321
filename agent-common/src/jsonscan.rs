//! A Kubernetes watch frame's event type and resourceVersion, read from its
//! JSON one byte at a time: what a kernel program can do to a frame a
//! client-go watch client is about to decode, whatever the object's Go type
//! (typed, `Unstructured`, a `Table`), which decides where the decoded
//! object keeps its resourceVersion (for `Unstructured`, inside nested maps
//! a probe cannot walk).
//!
//! The frame is a `metav1.WatchEvent`: `{"type":"MODIFIED","object":{...}}`.
//! The scanner tracks the nesting (objects and arrays, strings and their
//! escapes) and reads exactly two values: the top level's `type` and
//! `object.metadata.resourceVersion`, each only at its own depth under its
//! own parent keys. A `resourceVersion` anywhere else — an Event's
//! `involvedObject`, an annotation named so, a field of `spec` — is never
//! taken for the event's, whatever order the encoder wrote the keys in (an
//! `Unstructured` object's keys are sorted: `involvedObject` comes before
//! `metadata`). A value that is not a plain decimal string reads as none:
//! never guessed.
//!
//! One step per byte, no allocation, no panics and no loop inside a step, so
//! the kernel calls it from a `bpf_loop` callback over a frame's first
//! `SCAN_MAX` bytes; the tests and the fuzz target feed it anything.

use crate::watch::{RV_DIGITS, parse_rv};

/// Bytes of a frame the kernel reads and scans. The resourceVersion sits in
/// the object's metadata, before its spec; an `Unstructured` object's
/// `managedFields` (sorted before `resourceVersion`) take most of that.
pub const SCAN_MAX: usize = 4096;

const IN_STRING: u32 = 1;
const ESCAPE: u32 = 1 << 1;
const EXPECT_KEY: u32 = 1 << 2;
const IN_KEY: u32 = 1 << 3;
const CAPTURE_TYPE: u32 = 1 << 4;
const CAPTURE_RV: u32 = 1 << 5;
const TYPE_SEEN: u32 = 1 << 6;
const RV_SEEN: u32 = 1 << 7;
/// The frame's top-level object closed, or its bytes cannot be a frame.
const DONE: u32 = 1 << 8;

const KEY_NONE: u8 = 0;
const KEY_TYPE: u8 = 1;
const KEY_OBJECT: u8 = 2;
const KEY_METADATA: u8 = 3;
const KEY_RV: u8 = 4;
const KEY_OTHER: u8 = 5;

/// Longest key kept (`resourceVersion` is 15 bytes); longer ones are other.
const KEY_MAX: usize = 16;
/// Longest type kept (`MODIFIED`, `BOOKMARK`).
const TYPE_MAX: usize = 8;

/// The scanner's state (the kernel's `bpf_loop` context holds it).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FrameScan {
    /// Depth of the container the next byte is in (0: before the frame).
    depth: u32,
    flags: u32,
    /// Bit d set: the container at depth d (1..=63) is an array.
    arrays: u64,
    /// The latest key read at depths 1, 2, 3 (index 0 unused).
    keys: [u8; 4],
    /// Bytes of the string being captured; one past the buffer means it
    /// overflowed (or held an escape), and matches nothing.
    key_len: u8,
    type_len: u8,
    rv_len: u8,
    _pad: u8,
    key: [u8; KEY_MAX],
    typ: [u8; TYPE_MAX],
    rv: [u8; RV_DIGITS + 1],
    _pad2: [u8; 4],
}

const _: () = assert!(core::mem::size_of::<FrameScan>() == 72);

/// What a scanned frame is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Frame {
    /// An ADDED, MODIFIED or DELETED event, with its object's
    /// resourceVersion when it was read.
    Event(Option<i64>),
    /// Anything else: a BOOKMARK (a progress mark, not an event), an ERROR,
    /// no type in the bytes scanned, or not a frame at all.
    Other,
}

impl FrameScan {
    pub const fn new() -> Self {
        FrameScan {
            depth: 0,
            flags: 0,
            arrays: 0,
            keys: [KEY_NONE; 4],
            key_len: 0,
            type_len: 0,
            rv_len: 0,
            _pad: 0,
            key: [0; KEY_MAX],
            typ: [0; TYPE_MAX],
            rv: [0; RV_DIGITS + 1],
            _pad2: [0; 4],
        }
    }

    /// Feeds one byte; false once nothing later can change the outcome
    /// (both values read, or the frame ended): the caller stops there.
    #[inline(always)]
    pub fn step(&mut self, b: u8) -> bool {
        if self.flags & DONE != 0 {
            return false;
        }
        if self.flags & IN_STRING != 0 {
            self.string_byte(b);
        } else {
            self.structure_byte(b);
        }
        self.flags & DONE == 0
    }

    /// The outcome from what was fed so far.
    pub fn frame(&self) -> Frame {
        if self.flags & TYPE_SEEN == 0 {
            return Frame::Other;
        }
        let t = &self.typ[..(self.type_len as usize).min(TYPE_MAX)];
        let event = self.type_len as usize <= TYPE_MAX && matches!(t, b"ADDED" | b"MODIFIED" | b"DELETED");
        if !event {
            return Frame::Other;
        }
        let rv = if self.flags & RV_SEEN != 0 { parse_rv(&self.rv, self.rv_len as usize) } else { None };
        Frame::Event(rv)
    }

    #[inline(always)]
    fn string_byte(&mut self, b: u8) {
        if self.flags & ESCAPE != 0 {
            // An escaped byte: whatever is being captured no longer matches
            // anything sought (keys, types and digits have no escapes).
            self.flags &= !ESCAPE;
            self.spoil();
            return;
        }
        match b {
            b'\\' => self.flags |= ESCAPE,
            b'"' => self.end_string(),
            _ => {
                if self.flags & IN_KEY != 0 {
                    put(&mut self.key, &mut self.key_len, b);
                } else if self.flags & CAPTURE_TYPE != 0 {
                    put(&mut self.typ, &mut self.type_len, b);
                } else if self.flags & CAPTURE_RV != 0 {
                    put(&mut self.rv, &mut self.rv_len, b);
                }
            }
        }
    }

    #[inline(always)]
    fn spoil(&mut self) {
        if self.flags & IN_KEY != 0 {
            self.key_len = KEY_MAX as u8 + 1;
        } else if self.flags & CAPTURE_TYPE != 0 {
            self.type_len = TYPE_MAX as u8 + 1;
        } else if self.flags & CAPTURE_RV != 0 {
            self.rv_len = RV_DIGITS as u8 + 1;
        }
    }

    #[inline(always)]
    fn end_string(&mut self) {
        self.flags &= !IN_STRING;
        if self.flags & IN_KEY != 0 {
            self.flags &= !IN_KEY;
            let id = self.key_id();
            if let Some(k) = self.keys.get_mut(self.depth as usize) {
                *k = id;
            }
        } else if self.flags & CAPTURE_TYPE != 0 {
            self.flags = (self.flags & !CAPTURE_TYPE) | TYPE_SEEN;
        } else if self.flags & CAPTURE_RV != 0 {
            self.flags = (self.flags & !CAPTURE_RV) | RV_SEEN;
            // The type comes first in every encoder's frame; if it did here,
            // nothing later matters.
            if self.flags & TYPE_SEEN != 0 {
                self.flags |= DONE;
            }
        }
    }

    #[inline(always)]
    fn structure_byte(&mut self, b: u8) {
        match b {
            b'"' => {
                self.flags |= IN_STRING;
                if self.flags & EXPECT_KEY != 0 {
                    self.flags = (self.flags & !EXPECT_KEY) | IN_KEY;
                    self.key_len = 0;
                } else {
                    self.start_value();
                }
            }
            b'{' | b'[' => {
                if self.depth == 0 && b == b'[' {
                    // A frame is an object.
                    self.flags |= DONE;
                    return;
                }
                self.depth = self.depth.saturating_add(1);
                let bit = 1u64.checked_shl(self.depth).unwrap_or(0);
                if b == b'[' {
                    self.arrays |= bit;
                    self.flags &= !EXPECT_KEY;
                } else {
                    self.arrays &= !bit;
                    self.flags |= EXPECT_KEY;
                }
                if let Some(k) = self.keys.get_mut(self.depth as usize) {
                    *k = KEY_NONE;
                }
            }
            b'}' | b']' => {
                self.flags &= !EXPECT_KEY;
                self.depth = self.depth.saturating_sub(1);
                if self.depth == 0 {
                    self.flags |= DONE;
                }
            }
            b':' => self.flags &= !EXPECT_KEY,
            b',' => {
                let array = self.arrays & 1u64.checked_shl(self.depth).unwrap_or(0) != 0;
                if self.depth > 0 && !array {
                    self.flags |= EXPECT_KEY;
                }
            }
            b' ' | b'\t' | b'\n' | b'\r' => {}
            _ => {
                // Anything else outside a string before the frame's first
                // `{` is not a frame.
                if self.depth == 0 {
                    self.flags |= DONE;
                }
            }
        }
    }

    /// A string value starts: capture it when it is one of the two sought.
    #[inline(always)]
    fn start_value(&mut self) {
        let k = self.keys;
        if self.depth == 1 && k[1] == KEY_TYPE && self.flags & TYPE_SEEN == 0 {
            self.flags |= CAPTURE_TYPE;
            self.type_len = 0;
        } else if self.depth == 3
            && (k[1], k[2], k[3]) == (KEY_OBJECT, KEY_METADATA, KEY_RV)
            && self.flags & RV_SEEN == 0
        {
            self.flags |= CAPTURE_RV;
            self.rv_len = 0;
        }
    }

    #[inline(always)]
    fn key_id(&self) -> u8 {
        let n = self.key_len as usize;
        if n > KEY_MAX {
            return KEY_OTHER;
        }
        let k = &self.key[..n.min(KEY_MAX)];
        match k {
            b"type" => KEY_TYPE,
            b"object" => KEY_OBJECT,
            b"metadata" => KEY_METADATA,
            b"resourceVersion" => KEY_RV,
            _ => KEY_OTHER,
        }
    }
}

/// Appends `b` to `buf` at `*len`; past the end, `*len` stays one past it.
#[inline(always)]
fn put<const N: usize>(buf: &mut [u8; N], len: &mut u8, b: u8) {
    let i = *len as usize;
    if let Some(slot) = buf.get_mut(i) {
        *slot = b;
        *len += 1;
    } else {
        *len = (N as u8).saturating_add(1);
    }
}

/// Scans `bytes` whole (the user-space form of the kernel's loop).
pub fn scan(bytes: &[u8]) -> Frame {
    let mut s = FrameScan::new();
    for &b in bytes {
        if !s.step(b) {
            break;
        }
    }
    s.frame()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_typed_objects_frame_gives_its_type_and_revision() {
        let f = br#"{"type":"MODIFIED","object":{"kind":"EtcdCluster","apiVersion":"ws.example.com/v1","metadata":{"name":"main","uid":"u","resourceVersion":"1234","generation":3},"spec":{"size":2}}}"#;
        assert_eq!(scan(f), Frame::Event(Some(1234)));
        // Stops at the revision's closing quote: the rest is never read.
        let mut s = FrameScan::new();
        let at = f.iter().position(|&b| !s.step(b)).expect("stops early");
        assert!(f[..at].ends_with(b"\"1234") && f[at] == b'"', "{at}");
    }

    #[test]
    fn an_unstructured_objects_sorted_keys_and_managed_fields_are_skipped() {
        // An Event: `involvedObject.resourceVersion` sorts before metadata;
        // an annotation named resourceVersion sits inside metadata; a
        // managedFields entry mentions it as a field path.
        let f = br#"{"type":"ADDED","object":{"apiVersion":"v1","involvedObject":{"kind":"Pod","resourceVersion":"7"},"kind":"Event","metadata":{"annotations":{"resourceVersion":"8"},"managedFields":[{"fieldsV1":{"f:metadata":{"f:resourceVersion":{}}},"resourceVersion":"9"}],"name":"e","resourceVersion":"42"},"spec":{"resourceVersion":"10"}}}"#;
        assert_eq!(scan(f), Frame::Event(Some(42)));
    }

    #[test]
    fn bookmarks_errors_and_other_types_are_not_events() {
        let bookmark = br#"{"type":"BOOKMARK","object":{"kind":"EtcdCluster","metadata":{"resourceVersion":"99","annotations":{"k8s.io/initial-events-end":"true"}}}}"#;
        assert_eq!(scan(bookmark), Frame::Other);
        let error = br#"{"type":"ERROR","object":{"kind":"Status","code":410,"metadata":{}}}"#;
        assert_eq!(scan(error), Frame::Other);
        assert_eq!(scan(br#"{"type":"MODIFIEDX","object":{"metadata":{"resourceVersion":"1"}}}"#), Frame::Other);
        assert_eq!(scan(br#"{"type":"MODIFIE","object":{"metadata":{"resourceVersion":"1"}}}"#), Frame::Other);
        assert_eq!(scan(br#"{"object":{"metadata":{"resourceVersion":"1"}}}"#), Frame::Other);
        // A list response is not a frame of an event either.
        assert_eq!(scan(br#"{"kind":"List","metadata":{"resourceVersion":"5"},"items":[]}"#), Frame::Other);
        assert_eq!(scan(br#"[{"type":"ADDED"}]"#), Frame::Other);
        assert_eq!(scan(b"\x0a\x0b\x00protobuf"), Frame::Other);
        assert_eq!(scan(b""), Frame::Other);
    }

    #[test]
    fn a_revision_that_is_not_a_plain_decimal_is_not_read() {
        for rv in [r#""12a""#, r#""""#, r#""1\u0032""#, "12", r#""99999999999999999999""#, r#"{"a":"1"}"#] {
            let f = format!(r#"{{"type":"MODIFIED","object":{{"metadata":{{"resourceVersion":{rv}}}}}}}"#);
            assert_eq!(scan(f.as_bytes()), Frame::Event(None), "{rv}");
        }
        // Escapes elsewhere are skipped as string bytes; an escaped quote
        // does not end a string.
        let f = br#"{"type":"DELETED","object":{"metadata":{"name":"a\"b\\","resourceVersion":"77"}}}"#;
        assert_eq!(scan(f), Frame::Event(Some(77)));
        // A key with an escape is no sought key.
        let f = br#"{"type":"DELETED","object":{"metadata":{"resource\u0056ersion":"77"}}}"#;
        assert_eq!(scan(f), Frame::Event(None));
    }

    #[test]
    fn whitespace_and_key_order_do_not_matter_and_depth_does() {
        let f = b"{ \"object\" : { \"metadata\" : { \"resourceVersion\" : \"5\" } } ,\n \"type\" : \"ADDED\" }";
        assert_eq!(scan(f), Frame::Event(Some(5)));
        // metadata nested one level deeper, or an array in its place.
        let f = br#"{"type":"ADDED","object":{"x":{"metadata":{"resourceVersion":"5"}},"metadata":[{"resourceVersion":"6"}]}}"#;
        assert_eq!(scan(f), Frame::Event(None));
        // Truncated before the revision (past SCAN_MAX in the kernel).
        let f = br#"{"type":"ADDED","object":{"metadata":{"name":"x","resourceVer"#;
        assert_eq!(scan(f), Frame::Event(None));
    }

    #[test]
    fn any_bytes_are_scanned_without_panicking() {
        let mut seed = 7u64;
        let alphabet = br#"{}[]":,\ atype objectmetadataresourceVersion0123456789ADDED"#;
        for len in 0..300 {
            for _ in 0..50 {
                let bytes: Vec<u8> = (0..len)
                    .map(|_| {
                        seed = crate::watch::mix(seed.wrapping_add(0x9e37_79b9_7f4a_7c15));
                        if seed.is_multiple_of(3) {
                            seed as u8
                        } else {
                            alphabet[(seed >> 8) as usize % alphabet.len()]
                        }
                    })
                    .collect();
                let _ = scan(&bytes);
            }
        }
        // Deeper than the array mask holds.
        let deep = [b'['; 200].iter().copied().chain(*b"{").collect::<Vec<u8>>();
        assert_eq!(scan(&[b"{\"a\":".as_slice(), &deep].concat()), Frame::Other);
    }
}
