//! Consumes the per-event record streams (`WS_WATCH_RECORDS`,
//! `WS_WINDOW_RECORDS`) into the watch event chains, in `run` and `record`
//! alike, and switches them on (`WS_RECORD_ON`).
//!
//! Cost: the kernel writes one 64-byte record per watch event (per watcher
//! on a server, per client dispatch) and one 72-byte record per closed
//! window — far rarer than the syscalls the other programs see — so the
//! stream stays on while the agent runs. Every item is decoded by
//! `agent_common::decode::record`, which refuses an item of the wrong
//! length; those are counted as decode errors.
//!
//! A thread of its own, off the runtime (where reads waited behind the
//! tracker's attach work and the scrapes), reads both rings every 50 ms, or
//! at once when the kernel wakes it (a ring past half full: an event to
//! 1,000 watchers is 1,000 records at once), and joins what it read into
//! the chains.

use std::{
    os::fd::AsRawFd,
    sync::{
        Arc, Mutex,
        atomic::Ordering,
        mpsc::{Receiver, Sender, TryRecvError},
    },
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

/// How often the rings are read (unless the kernel woke the reader before)
/// and due chains judged. An event to 1,000 watchers is 1,000 dispatch
/// windows at once: the window ring (512 KiB) holds 6,553 of them (72 bytes
/// and the ring's 8-byte header each); at 256 KiB it overflowed in the long
/// soak. The watch ring (1 MiB) holds ~14,500 watch records (64 + 8 bytes).
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

/// What one read took out of both rings.
struct Batch {
    windows: Vec<WindowRecord>,
    watch: Vec<WatchRecord>,
    /// Items read per ring, decoded or not.
    read: [(Ring, u64); 2],
    bad: u64,
}

/// The record loop, ready to run on a thread of its own (`run`).
pub struct RecordsLoop {
    rings: RecordRings,
    /// Both rings' wakeups and the stop's; `None` when the kernel or the
    /// process refused an epoll instance: the loop then reads on its timer.
    poll: Option<mio::Poll>,
    stop: Receiver<()>,
}

/// Ends a `RecordsLoop` at once, from any thread.
pub struct RecordsStop {
    tx: Sender<()>,
    waker: Option<mio::Waker>,
}

impl RecordsStop {
    pub fn stop(&self) {
        let _ = self.tx.send(());
        // Without a waker the loop sees the stop within DRAIN_EVERY.
        if let Some(w) = &self.waker {
            let _ = w.wake();
        }
    }
}

/// The stop's token; the rings take 0 and 1.
const STOP: mio::Token = mio::Token(2);

impl RecordsLoop {
    pub fn new(rings: RecordRings) -> (Self, RecordsStop) {
        let (tx, stop) = std::sync::mpsc::channel();
        let (poll, waker) = match wakeups(&rings) {
            Ok((p, w)) => (Some(p), Some(w)),
            Err(e) => {
                tracing::warn!("record rings: no wakeups ({e}); read every {DRAIN_EVERY:?} only");
                (None, None)
            }
        };
        (Self { rings, poll, stop }, RecordsStop { tx, waker })
    }

    /// Reads both rings and joins their records into `chains`, judging
    /// chains as their deadlines pass, until stopped (or the stop is
    /// dropped). Wakes every `DRAIN_EVERY`, or at once when the kernel wakes
    /// a ring's readers (past half full: agent-ebpf `maps::submit_record`).
    /// The rings are registered edge-triggered, so a record submitted
    /// without a wakeup never wakes it (level-triggered, any waiting record
    /// would).
    pub fn run(mut self, chains: Arc<Mutex<Chains>>, user: Arc<UserCounters>) {
        let mut events = mio::Events::with_capacity(4);
        loop {
            match self.poll.as_mut() {
                // An interrupted wait (EINTR) only reads early.
                Some(p) => drop(p.poll(&mut events, Some(DRAIN_EVERY))),
                None => std::thread::sleep(DRAIN_EVERY),
            }
            if !matches!(self.stop.try_recv(), Err(TryRecvError::Empty)) {
                break;
            }
            let batch = read(&mut self.rings);
            let mut c = chains.lock().unwrap_or_else(|p| p.into_inner());
            feed(&mut c, &batch.watch, &batch.windows);
            c.expire(chains::monotonic_now_ns(), &chains::process_alive);
            drop(c);
            for (ring, n) in batch.read {
                user.read_from(ring, n);
            }
            if batch.bad > 0 {
                user.decode_errors.fetch_add(batch.bad, Ordering::Relaxed);
            }
        }
    }
}

/// Edge-triggered readiness of both rings, and a waker for the stop.
fn wakeups(rings: &RecordRings) -> std::io::Result<(mio::Poll, mio::Waker)> {
    let poll = mio::Poll::new()?;
    for (i, fd) in [rings.windows.as_raw_fd(), rings.watch.as_raw_fd()].into_iter().enumerate() {
        poll.registry().register(&mut mio::unix::SourceFd(&fd), mio::Token(i), mio::Interest::READABLE)?;
    }
    let waker = mio::Waker::new(poll.registry(), STOP)?;
    Ok((poll, waker))
}

/// Both rings' waiting records: the window ring first. A window's record is
/// written when it closes, after the records of every event inside it (on
/// the same goroutine), so those are in the watch ring by then and this
/// read takes them too. Read the other way round, a window that closed
/// between the two reads would arrive before the hop it contains.
fn read(rings: &mut RecordRings) -> Batch {
    let mut bad = 0;
    let (windows, nw) = read_ring(&mut rings.windows, Ring::Windows, decode::record, &mut bad);
    let (watch, nr) = read_ring(&mut rings.watch, Ring::Watch, decode::record, &mut bad);
    Batch { windows, watch, read: [(Ring::Windows, nw), (Ring::Watch, nr)], bad }
}

/// Every record waiting in `ring` that decodes as a `T` (the others are
/// counted in `bad`), and how many items were read.
fn read_ring<T>(
    ring: &mut RingBuf<MapData>,
    which: Ring,
    decoder: fn(&[u8]) -> Result<T, decode::LengthMismatch>,
    bad: &mut u64,
) -> (Vec<T>, u64) {
    let mut read = 0;
    let mut out = Vec::new();
    while let Some(item) = ring.next() {
        read += 1;
        out.extend(decode_item(&item, which.name(), decoder, bad));
    }
    (out, read)
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
