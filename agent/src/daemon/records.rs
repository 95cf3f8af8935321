//! Consumes the per-event record streams (`WS_WATCH_RECORDS`,
//! `WS_WINDOW_RECORDS`) into the watch event chains, in `run` and `record`
//! alike, and switches them on (`WS_RECORD_ON`).
//!
//! Cost: the kernel writes one 56-byte record per watch event (per watcher
//! on a server, per client dispatch) and one per closed window — far rarer
//! than the syscalls the other programs see — so the stream stays on while
//! the agent runs; user space drains both rings every 50 ms.

use std::{
    sync::{Arc, Mutex, atomic::Ordering},
    time::Duration,
};

use agent_common::{goruntime::WindowRecord, watch::WatchRecord};
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
/// holds ~18,000 watch records: 50 ms overflows only past 360,000 events/s.
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
    let mut c = chains.lock().unwrap_or_else(|p| p.into_inner());
    let mut bad = 0;
    while let Some(item) = rings.watch.next() {
        match chains::decode::<WatchRecord>(&item) {
            Some(r) => c.on_watch(&r),
            None => bad += 1,
        }
    }
    while let Some(item) = rings.windows.next() {
        match chains::decode::<WindowRecord>(&item) {
            Some(w) => c.on_window(&w),
            None => bad += 1,
        }
    }
    c.expire(chains::monotonic_now_ns(), &chains::process_alive);
    if bad > 0 {
        user.decode_errors.fetch_add(bad, Ordering::Relaxed);
    }
}
