//! The one bucket layout every watchscope timing histogram uses.
//!
//! Log-linear: below 1 µs everything lands in bucket 0; from 1 µs up, each
//! power of two of microseconds is split into four equal sub-buckets, up to
//! 2^26 µs (about 67 s); anything longer lands in the last (+Inf) bucket. The
//! upper bounds are exact binary fractions of a microsecond (1, 1.25, 1.5,
//! 1.75, 2, 2.5, 3, 3.5, 4, 5, ... µs), so every exported family lines up
//! bucket for bucket and a panel can put any two side by side.
//!
//! The index is computed in the kernel from nanoseconds, with integer
//! arithmetic only (one division by a constant and a fixed bit scan, which
//! the verifier accepts without loops).

/// Sub-buckets per power of two.
pub const SUB_BUCKETS: u32 = 4;
/// Powers of two of microseconds covered: [1 µs, 2^26 µs).
pub const OCTAVES: u32 = 26;
/// Total buckets: underflow, log-linear part, overflow.
pub const NBUCKETS: usize = 1 + (OCTAVES * SUB_BUCKETS) as usize + 1;

/// Nanoseconds in one quarter of a microsecond: the unit the index works in,
/// so that the four sub-buckets of the first octave are exact too.
const QUARTER_US_NS: u64 = 250;

/// A histogram as the kernel keeps it (one per CPU in a per-CPU array).
/// `sum_ns` lets the exporter publish an exact `_sum`; the count is the sum
/// of the buckets, so it can never disagree with them.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
#[cfg_attr(feature = "pod", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct Histogram {
    pub buckets: [u64; NBUCKETS],
    pub sum_ns: u64,
}

impl Histogram {
    pub const ZERO: Histogram = Histogram { buckets: [0; NBUCKETS], sum_ns: 0 };

    /// Adds one observation. Used in unit tests and by user-space aggregation;
    /// the kernel does the same with atomic adds on its per-CPU copy.
    pub fn observe(&mut self, ns: u64) {
        let i = bucket_index(ns) as usize;
        if let Some(b) = self.buckets.get_mut(i) {
            *b += 1;
        }
        self.sum_ns = self.sum_ns.wrapping_add(ns);
    }

    pub fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }

    /// Adds another histogram into this one (merging per-CPU copies).
    pub fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.buckets.iter_mut().zip(other.buckets.iter()) {
            *a = a.wrapping_add(*b);
        }
        self.sum_ns = self.sum_ns.wrapping_add(other.sum_ns);
    }
}

/// 106 buckets and the sum: 856 bytes per histogram per CPU.
const _: () = assert!(size_of::<Histogram>() == 856);

#[cfg(feature = "user")]
aya_pod!(Histogram);

impl Default for Histogram {
    fn default() -> Self {
        Self::ZERO
    }
}

/// Position of the highest set bit (floor(log2(v))) for v > 0, written as a
/// fixed binary search so the BPF verifier sees straight-line code.
#[inline(always)]
pub fn log2_u64(mut v: u64) -> u32 {
    let mut r = 0;
    if v >= 1 << 32 {
        v >>= 32;
        r += 32;
    }
    if v >= 1 << 16 {
        v >>= 16;
        r += 16;
    }
    if v >= 1 << 8 {
        v >>= 8;
        r += 8;
    }
    if v >= 1 << 4 {
        v >>= 4;
        r += 4;
    }
    if v >= 1 << 2 {
        v >>= 2;
        r += 2;
    }
    if v >= 1 << 1 {
        r += 1;
    }
    r
}

/// The bucket a duration of `ns` nanoseconds falls in: always < NBUCKETS.
#[inline(always)]
pub fn bucket_index(ns: u64) -> u32 {
    let q = ns / QUARTER_US_NS;
    if q < 4 {
        return 0;
    }
    // q in [4·2^k, 8·2^k) is the octave [2^k, 2^(k+1)) µs.
    let k = log2_u64(q) - 2;
    if k >= OCTAVES {
        return NBUCKETS as u32 - 1;
    }
    let sub = ((q >> k) & 3) as u32;
    1 + k * SUB_BUCKETS + sub
}

/// Upper bound of bucket `i` in seconds (`le` in Prometheus terms); the last
/// bucket's bound is +Inf. Bucket `i` holds durations in
/// [upper(i-1), upper(i)).
pub fn bucket_upper_bound_seconds(i: usize) -> f64 {
    if i == 0 {
        return 1e-6;
    }
    if i >= NBUCKETS - 1 {
        return f64::INFINITY;
    }
    let j = (i - 1) as u32;
    let k = j / SUB_BUCKETS;
    let sub = j % SUB_BUCKETS;
    // 2^k · (4 + sub + 1) / 4 µs
    let quarters = (1u64 << k) * (SUB_BUCKETS + sub + 1) as u64;
    // One correctly rounded division, so bounds print as 1.25e-06, not 1.2499999e-06.
    quarters as f64 / 4_000_000.0
}

/// Lower bound of bucket `i` in seconds (0 for the first bucket).
pub fn bucket_lower_bound_seconds(i: usize) -> f64 {
    if i == 0 { 0.0 } else { bucket_upper_bound_seconds(i - 1) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log2_matches_leading_zeros() {
        for shift in 0..64 {
            for v in [1u64 << shift, (1u64 << shift) | 1, (1u64 << shift).wrapping_mul(3)] {
                if v == 0 {
                    continue;
                }
                assert_eq!(log2_u64(v), 63 - v.leading_zeros(), "v={v}");
            }
        }
        assert_eq!(log2_u64(u64::MAX), 63);
    }

    #[test]
    fn layout_covers_1us_to_over_60s_with_4_per_octave() {
        assert_eq!(NBUCKETS, 106);
        assert_eq!(bucket_upper_bound_seconds(0), 1e-6);
        assert!(bucket_upper_bound_seconds(NBUCKETS - 2) >= 60.0);
        assert!(bucket_upper_bound_seconds(NBUCKETS - 1).is_infinite());
        // Four sub-buckets between consecutive powers of two.
        assert_eq!(bucket_upper_bound_seconds(4), 2e-6);
        assert_eq!(bucket_upper_bound_seconds(8), 4e-6);
        assert_eq!(bucket_upper_bound_seconds(1), 1.25e-6);
    }

    #[test]
    fn bounds_are_strictly_increasing() {
        for i in 1..NBUCKETS {
            assert!(bucket_upper_bound_seconds(i) > bucket_upper_bound_seconds(i - 1));
        }
    }

    #[test]
    fn every_value_lands_inside_its_bucket() {
        // Walk values densely at the low end and geometrically after.
        let mut v: u64 = 0;
        while v < 200_000_000_000 {
            let i = bucket_index(v) as usize;
            assert!(i < NBUCKETS);
            let secs = v as f64 * 1e-9;
            assert!(secs >= bucket_lower_bound_seconds(i) - 1e-15, "v={v} i={i}");
            if i < NBUCKETS - 1 {
                assert!(secs < bucket_upper_bound_seconds(i) + 1e-15, "v={v} i={i}");
            }
            v = if v < 100_000 { v + 7 } else { v + v / 97 };
        }
    }

    #[test]
    fn boundaries_map_exactly() {
        assert_eq!(bucket_index(999), 0);
        assert_eq!(bucket_index(1_000), 1);
        assert_eq!(bucket_index(1_249), 1);
        assert_eq!(bucket_index(1_250), 2);
        assert_eq!(bucket_index(2_000), 5);
        // 20 ms = 20_000 µs lies in octave 2^14 µs = 16384 µs, sub 0 ([16.384, 20.48) ms).
        assert_eq!(bucket_index(20_000_000), 1 + 14 * 4);
        assert_eq!(bucket_index(u64::MAX), NBUCKETS as u32 - 1);
        assert_eq!(bucket_index(67_108_864_000), NBUCKETS as u32 - 1);
        assert_eq!(bucket_index(67_108_863_999), NBUCKETS as u32 - 2);
    }

    #[test]
    fn histogram_observe_count_sum_merge() {
        let mut a = Histogram::ZERO;
        a.observe(5_000);
        a.observe(5_000_000_000);
        let mut b = Histogram::ZERO;
        b.observe(1);
        b.merge(&a);
        assert_eq!(b.count(), 3);
        assert_eq!(b.sum_ns, 5_000_005_001);
    }
}
