//! The one way user space turns ring buffer bytes into a shared record.
//!
//! A ring item is exactly as long as the record the kernel reserved
//! (`RingBuf::reserve::<T>`), so any other length means the kernel object
//! and the agent disagree about the type (a build mismatch) or the item is
//! another kind than the caller thinks: the bytes are refused, for the
//! caller to count, rather than read as a record with shifted fields. Only
//! `bytemuck::Pod` types are accepted (no padding, every bit pattern a valid
//! value: no `bool`, no enums), so decoding is sound for any input bytes.

/// A ring item whose length is not the record's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("a {record} record is {expected} bytes, the ring item has {got}")]
pub struct LengthMismatch {
    /// The record type's name (without its module path).
    pub record: &'static str,
    pub expected: usize,
    pub got: usize,
}

/// Decodes one ring item as a `T`; the item must be exactly `T`'s size.
/// Unaligned input is fine (the copy is byte-wise).
pub fn record<T: bytemuck::Pod>(bytes: &[u8]) -> Result<T, LengthMismatch> {
    bytemuck::try_pod_read_unaligned(bytes).map_err(|_| LengthMismatch {
        record: short_name(core::any::type_name::<T>()),
        expected: size_of::<T>(),
        got: bytes.len(),
    })
}

fn short_name(path: &'static str) -> &'static str {
    path.rsplit("::").next().unwrap_or(path)
}
