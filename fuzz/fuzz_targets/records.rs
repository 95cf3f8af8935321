//! Ring buffer items → records → watch event chains: the one decoder
//! (`agent_common::decode::record`) on any bytes and any length, the exec
//! ring's decoders, and what `run`/`record` do with the records that decode
//! (`Chains::on_watch`/`on_window`, judged by `expire`/`finish_ready`).
//! Records that decode carry arbitrary fields: zero and huge timestamps,
//! stages out of order, any side, window ids and goroutines.
#![no_main]

use agent_common::{ExecEvent, decode, events::ExitEvent, goruntime::WindowRecord, watch::WatchRecord};
use libfuzzer_sys::fuzz_target;
use watchscope_fuzz::{
    chains::{ChainSettings, Chains},
    exec,
};

fuzz_target!(|data: &[u8]| {
    // The whole input as one ring item of each kind.
    let _ = decode::record::<WatchRecord>(data);
    let _ = decode::record::<WindowRecord>(data);
    let _ = decode::record::<ExecEvent>(data);
    let _ = decode::record::<ExitEvent>(data);
    let _ = exec::record_kind(data);
    let _ = exec::decode(data);
    let _ = exec::decode_exit(data);

    // Then as a stream of items, each led by one op byte: its low two bits
    // say what the item is; with the high bit set the item is cut short by
    // up to 7 bytes (bits 4-6), so refused lengths are tried mid-stream too.
    let settings = ChainSettings { max_pending: 16, keep: 4, ..ChainSettings::default() };
    let mut c = Chains::new(settings);
    let mut rest = data;
    while let [op, tail @ ..] = rest {
        let want = match op & 3 {
            0 => size_of::<WatchRecord>(),
            1 => size_of::<WindowRecord>(),
            _ => 8,
        };
        let cut = if op & 0x80 != 0 { usize::from((op >> 4) & 7) } else { 0 };
        let (item, next) = tail.split_at(want.saturating_sub(cut).min(tail.len()));
        match op & 3 {
            0 => {
                if let Ok(r) = decode::record::<WatchRecord>(item) {
                    c.on_watch(&r);
                }
            }
            1 => {
                if let Ok(w) = decode::record::<WindowRecord>(item) {
                    c.on_window(&w);
                }
            }
            2 => {
                let mut now = [0u8; 8];
                now[..item.len()].copy_from_slice(item);
                c.expire(u64::from_le_bytes(now), &|tgid| tgid % 2 == 0);
            }
            _ => {
                c.finish_ready(&|tgid| tgid % 3 != 0);
                if op & 4 != 0 {
                    c.close();
                }
            }
        }
        rest = next;
    }
    c.expire(u64::MAX, &|_| false);
    let _ = c.counts();
    let _ = c.record_max();
    for chain in c.kept() {
        let _ = chain.view(&settings);
        let _ = chain.span_ns();
    }
});
