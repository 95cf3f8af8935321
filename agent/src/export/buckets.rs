//! One kernel histogram, two expositions: the native histogram (schema 2,
//! every bucket the kernel counted, exactly) and classic `le` buckets for
//! text scrapers, whose bounds are a chosen subset of the native ones, so
//! both forms of the same series agree on every bound they share.

use agent_common::hist::{self, NBUCKETS};

/// The classic `le` layout, chosen with `--classic-buckets`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum ClassicBuckets {
    /// Every native bound from 2^-20 s (0.95 µs) to 2^6 s (64 s): 105 bounds
    /// and `+Inf`, four per power of two.
    #[default]
    Fine,
    /// One bound per power of two over the same range: 27 bounds and `+Inf`,
    /// a quarter of the series, for text scrapers that pay per series.
    Coarse,
}

/// The kernel bucket whose upper bound is the last classic bound: 2^6 s.
const TOP: usize = (24 - hist::NATIVE_OFFSET) as usize;
const _: () = assert!(TOP < NBUCKETS);

impl ClassicBuckets {
    /// Kernel buckets per classic bucket.
    fn step(self) -> usize {
        match self {
            ClassicBuckets::Fine => 1,
            ClassicBuckets::Coarse => 1 << hist::SCHEMA,
        }
    }

    /// The classic bucket a duration of `ns` falls in (same folding as
    /// [`Self::buckets`], from the kernel's exact index: no float compare).
    pub fn index_of(self, ns: u64) -> usize {
        let i = hist::bucket_index(ns) as usize;
        if i > TOP { TOP / self.step() + 1 } else { i.div_ceil(self.step()) }
    }

    /// (upper bound in seconds, count) per classic bucket, not cumulative, in
    /// ascending order with `+Inf` last; the counts add up to the histogram's.
    pub fn buckets(self, h: &agent_common::Histogram) -> Vec<(f64, u64)> {
        let step = self.step();
        // Kernel buckets 0..=TOP fold into the classic bound at or above them
        // (a multiple of step: TOP is one); the rest into +Inf.
        let mut out: Vec<(f64, u64)> =
            (0..=TOP).step_by(step).map(|i| (hist::bucket_upper_bound_seconds(i), 0)).collect();
        out.push((f64::INFINITY, 0));
        let last = out.len() - 1;
        for (i, n) in h.buckets.iter().enumerate() {
            let slot = if i > TOP { last } else { i.div_ceil(step) };
            debug_assert!(i > TOP || slot < last);
            if let Some(b) = out.get_mut(slot) {
                b.1 += n;
            }
        }
        out
    }
}

/// A native histogram's positive buckets in the exposition's sparse form:
/// spans of consecutive indices (offset from the end of the previous span,
/// length) and per-bucket deltas from the previous bucket's count.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Sparse {
    pub spans: Vec<(i32, u32)>,
    pub deltas: Vec<i64>,
}

/// The kernel's buckets 1.. as native buckets. Empty buckets between filled
/// ones start a new span; an all-empty histogram gets the no-op span (0, 0)
/// so that a reader sees a native histogram, as client_golang writes it.
pub fn native(h: &agent_common::Histogram) -> Sparse {
    let mut s = Sparse::default();
    let (mut prev_index, mut prev_count) = (None::<i32>, 0i64);
    for (i, &n) in h.buckets.iter().enumerate().skip(1) {
        if n == 0 {
            continue;
        }
        let Some(b) = hist::native_index(i) else { continue };
        let count = i64::try_from(n).unwrap_or(i64::MAX);
        match prev_index {
            Some(p) if p + 1 == b => {
                if let Some(last) = s.spans.last_mut() {
                    last.1 += 1;
                }
            }
            // The first span's offset is the bucket index itself.
            Some(p) => s.spans.push((b - p - 1, 1)),
            None => s.spans.push((b, 1)),
        }
        s.deltas.push(count - prev_count);
        (prev_index, prev_count) = (Some(b), count);
    }
    if s.spans.is_empty() {
        s.spans.push((0, 0));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use agent_common::Histogram;

    fn hist(values_ns: &[u64]) -> Histogram {
        let mut h = Histogram::ZERO;
        values_ns.iter().for_each(|v| h.observe(*v));
        h
    }

    #[test]
    fn classic_layouts_share_the_native_bounds_and_keep_every_count() {
        let h = hist(&[1, 1_000, 1_500, 1_000_000_000, 2_000_000_000, 2_000_000_001, 100_000_000_000]);
        let fine = ClassicBuckets::Fine.buckets(&h);
        assert_eq!(fine.len(), 106);
        assert_eq!(fine[0], (hist::ZERO_THRESHOLD_SECONDS, 1));
        assert_eq!(fine[104].0, 64.0);
        assert_eq!(fine[105], (f64::INFINITY, 1), "100 s is past the last classic bound");
        // 1 s and 2 s are bounds (upper-inclusive); 2 s + 1 ns is above.
        let at = |b: &[(f64, u64)], le: f64| b.iter().find(|(l, _)| *l == le).map(|(_, n)| *n);
        assert_eq!(at(&fine, 1.0), Some(1));
        assert_eq!(at(&fine, 2.0), Some(1));
        let coarse = ClassicBuckets::Coarse.buckets(&h);
        assert_eq!(coarse.len(), 28);
        assert_eq!(coarse.iter().map(|(_, n)| n).sum::<u64>(), h.count());
        assert_eq!(fine.iter().map(|(_, n)| n).sum::<u64>(), h.count());
        // Coarse bounds are every fourth fine bound: cumulative counts agree there.
        let cumulative = |b: &[(f64, u64)], le: f64| b.iter().filter(|(l, _)| *l <= le).map(|(_, n)| n).sum::<u64>();
        for (le, _) in &coarse {
            assert!(fine.iter().any(|(l, _)| l == le), "{le}");
            assert_eq!(cumulative(&coarse, *le), cumulative(&fine, *le), "le {le}");
        }
        assert_eq!(at(&coarse, 2.0), Some(1), "(1, 2] s holds 2 s only");
        assert_eq!(at(&coarse, 4.0), Some(1));
        // index_of agrees with where buckets() puts each value.
        for layout in [ClassicBuckets::Fine, ClassicBuckets::Coarse] {
            for v in [1, 953, 954, 1_500, 1_000_000_000, 1_000_000_001, 64_000_000_000, 64_000_000_001, u64::MAX] {
                let b = layout.buckets(&hist(&[v]));
                assert_eq!(b.iter().position(|(_, n)| *n == 1), Some(layout.index_of(v)), "{layout:?} {v}");
            }
        }
    }

    #[test]
    fn native_spans_and_deltas() {
        // 1 µs: native -79; 1.2 µs: -78; 1 s: native 0 (twice); 2 s: native 4.
        let h = hist(&[5, 1_000, 1_200, 1_000_000_000, 1_000_000_000, 2_000_000_000]);
        let s = native(&h);
        assert_eq!(s.spans, vec![(-79, 2), (77, 1), (3, 1)]);
        assert_eq!(s.deltas, vec![1, 0, 1, -1]);
        // Rebuild the absolute buckets from the sparse form.
        let (mut idx, mut count, mut total) = (0i32, 0i64, 0i64);
        let mut d = s.deltas.iter();
        let mut got = vec![];
        for (offset, len) in &s.spans {
            idx += offset;
            for _ in 0..*len {
                count += d.next().unwrap();
                got.push((idx, count));
                total += count;
                idx += 1;
            }
        }
        assert_eq!(got, vec![(-79, 1), (-78, 1), (0, 2), (4, 1)]);
        assert_eq!(total as u64 + h.buckets[0], h.count());
        assert_eq!(native(&Histogram::ZERO), Sparse { spans: vec![(0, 0)], deltas: vec![] });
        // The largest duration has a native bucket too: nothing overflows.
        assert_eq!(native(&hist(&[u64::MAX])).spans, vec![(137, 1)]);
    }
}
