//! Consumes the per-event record streams (`WS_WATCH_RECORDS`,
//! `WS_WINDOW_RECORDS`) into the watch event chains, in `run` and `record`
//! alike, and switches them on (`WS_RECORD_ON`).
//!
//! Cost: the kernel writes one 64-byte record per watch event (per watcher
//! on a server, per client dispatch) and one 72-byte record per closed
//! window — far rarer than the syscalls the other programs see — so the
//! stream stays on while the agent runs; user space drains both rings every
//! 50 ms. Every item is decoded by `agent_common::decode::record`, which
//! refuses an item of the wrong length; those are counted as decode errors.

use std::{
    sync::{Arc, Mutex, atomic::Ordering},
    time::Duration,
};

use agent_common::{counters::Ring, decode, goruntime::WindowRecord, watch::WatchRecord};
use anyhow::{Context, Result};
use aya::{
    Ebpf,
    maps::{Array, MapData, RingBuf},
};

use crate::collect::{
    UserCounters,
    chains::{self, Chains},
};

/// How often the rings are drained and due chains judged. A 1 MiB ring
/// holds ~14,500 watch records (64 bytes and the ring's 8-byte header
/// each): 50 ms overflows only past ~290,000 events/s.
const DRAIN_EVERY: Duration = Duration::from_millis(50);

pub struct RecordRings {
    watch: RingBuf<MapData>,
    windows: RingBuf<MapData>,
    // Held so the switch lives as long as the consumer.
    _on: Array<MapData, u32>,
}

impl RecordRings {
    /// Takes both rings out of the object and switches records on.
    pub fn take(ebpf: &mut Ebpf) -> Result<Self> {
        let ring = |ebpf: &mut Ebpf, name: &str| -> Result<RingBuf<MapData>> {
            let m = ebpf.take_map(name).with_context(|| format!("the eBPF object has no {name} map"))?;
            RingBuf::try_from(m).with_context(|| format!("opening {name}"))
        };
        let watch = ring(ebpf, "WS_WATCH_RECORDS")?;
        let windows = ring(ebpf, "WS_WINDOW_RECORDS")?;
        let on = ebpf.take_map("WS_RECORD_ON").context("the eBPF object has no WS_RECORD_ON map")?;
        let mut on: Array<MapData, u32> = Array::try_from(on).context("opening WS_RECORD_ON")?;
        on.set(0, 1, 0).context("switching records on")?;
        Ok(Self { watch, windows, _on: on })
    }
}

/// Drains both rings into `chains` until stopped, judging chains as their
/// deadlines pass.
pub async fn records_loop(
    mut rings: RecordRings,
    chains: Arc<Mutex<Chains>>,
    user: Arc<UserCounters>,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) {
    let mut tick = tokio::time::interval(DRAIN_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = &mut stop => break,
            _ = tick.tick() => drain(&mut rings, &chains, &user),
        }
    }
}

fn drain(rings: &mut RecordRings, chains: &Mutex<Chains>, user: &UserCounters) {
    // The window ring first: a window's record is written when it closes,
    // after the records of every event inside it (on the same goroutine),
    // so those are in the watch ring by then and this drain reads them.
    // Read the other way round, a window that closed between the two reads
    // would arrive before the hop it contains.
    let mut bad = 0;
    let windows: Vec<WindowRecord> = read_ring(&mut rings.windows, Ring::Windows, decode::record, user, &mut bad);
    let watch: Vec<WatchRecord> = read_ring(&mut rings.watch, Ring::Watch, decode::record, user, &mut bad);
    let mut c = chains.lock().unwrap_or_else(|p| p.into_inner());
    feed(&mut c, &watch, &windows);
    c.expire(chains::monotonic_now_ns(), &chains::process_alive);
    if bad > 0 {
        user.decode_errors.fetch_add(bad, Ordering::Relaxed);
    }
}

/// Every record waiting in `ring` that decodes as a `T` (the others are
/// counted in `bad`); each one read is counted for `/debug/probes`.
fn read_ring<T>(
    ring: &mut RingBuf<MapData>,
    which: Ring,
    decoder: fn(&[u8]) -> Result<T, decode::LengthMismatch>,
    user: &UserCounters,
    bad: &mut u64,
) -> Vec<T> {
    let mut read = 0;
    let mut out = Vec::new();
    while let Some(item) = ring.next() {
        read += 1;
        out.extend(decode_item(&item, which.name(), decoder, bad));
    }
    user.read_from(which, read);
    out
}

/// One ring item as a `T`, or `None` (counted in `bad`) when it is not one
/// (wrong length).
fn decode_item<T>(
    item: &[u8],
    ring: &str,
    decoder: fn(&[u8]) -> Result<T, decode::LengthMismatch>,
    bad: &mut u64,
) -> Option<T> {
    match decoder(item) {
        Ok(r) => Some(r),
        Err(e) => {
            tracing::debug!("{ring} record ring: {e}");
            *bad += 1;
            None
        }
    }
}

/// Joins watch records and windows into the chains in time order (a
/// record at its hop, a window at its end): a window then meets every hop
/// that ran inside it already joined.
fn feed(c: &mut Chains, watch: &[WatchRecord], windows: &[WindowRecord]) {
    let mut w = windows.iter().peekable();
    for r in watch {
        while let Some(win) = w.next_if(|win| win.end_ns < r.at_ns) {
            c.on_window(win);
        }
        c.on_watch(r);
    }
    w.for_each(|win| c.on_window(win));
}

#[cfg(test)]
mod tests {
    use agent_common::watch::{Side, mix};

    use super::*;
    use crate::collect::chains::ChainSettings;

    fn record() -> WatchRecord {
        WatchRecord {
            side: Side::Server as u32,
            tgid: 100,
            member: 0xabc,
            rev: 42,
            watch_id: 3,
            commit_ns: 1,
            enqueue_ns: 2,
            at_ns: 3,
            g: 0x1000,
        }
    }

    #[test]
    fn records_decode_from_ring_bytes_at_their_exact_size() {
        let r = record();
        let bytes = bytemuck::bytes_of(&r);
        assert_eq!(decode::record::<WatchRecord>(bytes), Ok(r));
        // Unaligned: the ring gives no alignment promise to a sub-slice.
        let mut shifted = vec![0u8; 3];
        shifted.extend_from_slice(bytes);
        assert_eq!(decode::record::<WatchRecord>(&shifted[3..]), Ok(r));
        // Short: every length below 64.
        for n in 0..bytes.len() {
            let e = decode::record::<WatchRecord>(&bytes[..n]).unwrap_err();
            assert_eq!((e.record, e.expected, e.got), ("WatchRecord", 64, n));
        }
        // Long: a 72-byte window record is not a watch record with a tail.
        let mut long = bytes.to_vec();
        long.extend_from_slice(&[0; 8]);
        assert_eq!(decode::record::<WatchRecord>(&long).unwrap_err().got, 72);
        assert!(decode::record::<WindowRecord>(&long).is_ok());
        assert!(decode::record::<WindowRecord>(bytes).is_err());
        assert_eq!(
            decode::LengthMismatch { record: "WatchRecord", expected: 64, got: 72 }.to_string(),
            "a WatchRecord record is 64 bytes, the ring item has 72"
        );
    }

    #[test]
    fn arbitrary_ring_bytes_never_panic_the_chains() {
        // Deterministic noise (splitmix64) of every length from 0 to 160,
        // many times over: lengths of 64 and 72 become records with
        // arbitrary fields (zero or huge times, reversed stages, any side),
        // the rest are refused and counted.
        let mut c = Chains::new(ChainSettings { max_pending: 64, keep: 4, ..ChainSettings::default() });
        let (mut ok, mut bad) = (0u32, 0u32);
        let mut seed = 1u64;
        for round in 0..200u64 {
            for len in 0..=160usize {
                let bytes: Vec<u8> = (0..len)
                    .map(|_| {
                        seed = mix(seed.wrapping_add(0x9e37_79b9_7f4a_7c15));
                        // Small values now and then, so records join.
                        if round % 2 == 0 { (seed % 4) as u8 } else { seed as u8 }
                    })
                    .collect();
                let mut n = 0;
                let watch: Vec<WatchRecord> =
                    decode_item(&bytes, "watch", decode::record, &mut n).into_iter().collect();
                let windows: Vec<WindowRecord> =
                    decode_item(&bytes, "window", decode::record, &mut n).into_iter().collect();
                feed(&mut c, &watch, &windows);
                ok += (watch.len() + windows.len()) as u32;
                bad += n as u32;
            }
            c.expire(seed, &|tgid| tgid % 2 == 0);
            c.finish_ready(&|_| false);
        }
        // Each round: one watch record (64 bytes) and one window (72).
        assert_eq!(ok, 2 * 200);
        assert_eq!(bad, 2 * 200 * 161 - ok);
    }
}
