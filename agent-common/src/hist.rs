//! The one bucket layout every watchscope timing histogram uses: the
//! Prometheus native-histogram schema 2, computed exactly in the kernel.
//!
//! Schema 2 has four buckets per power of two: native bucket `b` holds the
//! durations in (2^((b-1)/4), 2^(b/4)] seconds. Every histogram of every
//! family, process, node and watchscope version has the same bounds, so any
//! two line up bucket for bucket and Prometheus can merge them (that is what
//! a native histogram is). A bucket is 19 % wide (2^(1/4) = 1.189): a
//! quantile read from it is off by at most that factor, and by at most
//! ±9 % from the bucket's geometric middle.
//!
//! Why schema 2 and not 3: eight buckets per octave would double every
//! histogram's kernel memory (shared arrays, ~2,700 histograms) for a
//! resolution finer than the jitter of what is measured (a uprobe hit costs
//! ~1 µs, a scheduler tick 4 ms).
//!
//! Layout of the kernel's array, [`NBUCKETS`] counts:
//! - index 0 is the native *zero bucket*: durations ≤ 2^-20 s (953.67 ns),
//!   the zero threshold;
//! - index `i` ≥ 1 is native bucket `i - 80`: the first, (2^-20, 2^-19.75] s,
//!   is just over 1 µs; the last, (2^34, 2^34.25] s, holds u64::MAX ns, so no
//!   duration overflows and no `+Inf` bucket is needed in the native form
//!   (the classic exposition adds its own `+Inf`).
//!
//! Durations are integer nanoseconds, so a duration `ns` is in bucket `i`
//! exactly when `UPPER_NS[i-1] < ns <= UPPER_NS[i]`, where `UPPER_NS[i]` is
//! floor(2^((i-80)/4) · 10^9), computed with exact integer arithmetic (the
//! unit tests check every entry against big-integer fourth roots). The
//! kernel finds the index with a fixed eight-step binary search over that
//! table: integer compares only, no loop for the verifier to walk.

/// The native-histogram schema: 2^SCHEMA buckets per power of two.
pub const SCHEMA: i32 = 2;
/// Native index of the kernel's bucket 1; bucket `i` ≥ 1 is native `i + NATIVE_OFFSET`.
pub const NATIVE_OFFSET: i32 = -80;
/// Total buckets: the zero bucket and native buckets -79..=137.
pub const NBUCKETS: usize = 218;
/// The zero bucket's threshold: 2^-20 s (953.674 ns), the bound of bucket 0.
pub const ZERO_THRESHOLD_SECONDS: f64 = 1.0 / 1_048_576.0;

/// Inclusive upper bound of each bucket in nanoseconds: floor(2^((i-80)/4) s
/// in ns); the last is u64::MAX (its true bound, 2^34.25 s, is larger).
pub static UPPER_NS: [u64; NBUCKETS] = [
    953,
    1_134,
    1_348,
    1_603,
    1_907,
    2_268,
    2_697,
    3_207,
    3_814,
    4_536,
    5_394,
    6_415,
    7_629,
    9_072,
    10_789,
    12_831,
    15_258,
    18_145,
    21_579,
    25_662,
    30_517,
    36_291,
    43_158,
    51_324,
    61_035,
    72_583,
    86_316,
    102_648,
    122_070,
    145_166,
    172_633,
    205_296,
    244_140,
    290_333,
    345_266,
    410_593,
    488_281,
    580_667,
    690_533,
    821_187,
    976_562,
    1_161_335,
    1_381_067,
    1_642_375,
    1_953_125,
    2_322_670,
    2_762_135,
    3_284_751,
    3_906_250,
    4_645_340,
    5_524_271,
    6_569_503,
    7_812_500,
    9_290_680,
    11_048_543,
    13_139_006,
    15_625_000,
    18_581_361,
    22_097_086,
    26_278_012,
    31_250_000,
    37_162_722,
    44_194_173,
    52_556_025,
    62_500_000,
    74_325_444,
    88_388_347,
    105_112_051,
    125_000_000,
    148_650_889,
    176_776_695,
    210_224_103,
    250_000_000,
    297_301_778,
    353_553_390,
    420_448_207,
    500_000_000,
    594_603_557,
    707_106_781,
    840_896_415,
    1_000_000_000,
    1_189_207_115,
    1_414_213_562,
    1_681_792_830,
    2_000_000_000,
    2_378_414_230,
    2_828_427_124,
    3_363_585_661,
    4_000_000_000,
    4_756_828_460,
    5_656_854_249,
    6_727_171_322,
    8_000_000_000,
    9_513_656_920,
    11_313_708_498,
    13_454_342_644,
    16_000_000_000,
    19_027_313_840,
    22_627_416_997,
    26_908_685_288,
    32_000_000_000,
    38_054_627_680,
    45_254_833_995,
    53_817_370_576,
    64_000_000_000,
    76_109_255_360,
    90_509_667_991,
    107_634_741_152,
    128_000_000_000,
    152_218_510_720,
    181_019_335_983,
    215_269_482_304,
    256_000_000_000,
    304_437_021_440,
    362_038_671_967,
    430_538_964_609,
    512_000_000_000,
    608_874_042_881,
    724_077_343_935,
    861_077_929_219,
    1_024_000_000_000,
    1_217_748_085_762,
    1_448_154_687_870,
    1_722_155_858_439,
    2_048_000_000_000,
    2_435_496_171_525,
    2_896_309_375_740,
    3_444_311_716_879,
    4_096_000_000_000,
    4_870_992_343_051,
    5_792_618_751_480,
    6_888_623_433_758,
    8_192_000_000_000,
    9_741_984_686_102,
    11_585_237_502_960,
    13_777_246_867_516,
    16_384_000_000_000,
    19_483_969_372_204,
    23_170_475_005_920,
    27_554_493_735_033,
    32_768_000_000_000,
    38_967_938_744_409,
    46_340_950_011_841,
    55_108_987_470_067,
    65_536_000_000_000,
    77_935_877_488_818,
    92_681_900_023_683,
    110_217_974_940_134,
    131_072_000_000_000,
    155_871_754_977_636,
    185_363_800_047_366,
    220_435_949_880_269,
    262_144_000_000_000,
    311_743_509_955_273,
    370_727_600_094_732,
    440_871_899_760_539,
    524_288_000_000_000,
    623_487_019_910_546,
    741_455_200_189_465,
    881_743_799_521_078,
    1_048_576_000_000_000,
    1_246_974_039_821_093,
    1_482_910_400_378_930,
    1_763_487_599_042_157,
    2_097_152_000_000_000,
    2_493_948_079_642_186,
    2_965_820_800_757_861,
    3_526_975_198_084_315,
    4_194_304_000_000_000,
    4_987_896_159_284_372,
    5_931_641_601_515_722,
    7_053_950_396_168_631,
    8_388_608_000_000_000,
    9_975_792_318_568_745,
    11_863_283_203_031_444,
    14_107_900_792_337_263,
    16_777_216_000_000_000,
    19_951_584_637_137_491,
    23_726_566_406_062_888,
    28_215_801_584_674_527,
    33_554_432_000_000_000,
    39_903_169_274_274_983,
    47_453_132_812_125_776,
    56_431_603_169_349_054,
    67_108_864_000_000_000,
    79_806_338_548_549_967,
    94_906_265_624_251_552,
    112_863_206_338_698_109,
    134_217_728_000_000_000,
    159_612_677_097_099_935,
    189_812_531_248_503_105,
    225_726_412_677_396_219,
    268_435_456_000_000_000,
    319_225_354_194_199_870,
    379_625_062_497_006_211,
    451_452_825_354_792_438,
    536_870_912_000_000_000,
    638_450_708_388_399_741,
    759_250_124_994_012_423,
    902_905_650_709_584_876,
    1_073_741_824_000_000_000,
    1_276_901_416_776_799_483,
    1_518_500_249_988_024_846,
    1_805_811_301_419_169_752,
    2_147_483_648_000_000_000,
    2_553_802_833_553_598_966,
    3_037_000_499_976_049_692,
    3_611_622_602_838_339_504,
    4_294_967_296_000_000_000,
    5_107_605_667_107_197_932,
    6_074_000_999_952_099_384,
    7_223_245_205_676_679_009,
    8_589_934_592_000_000_000,
    10_215_211_334_214_395_865,
    12_148_001_999_904_198_769,
    14_446_490_411_353_358_019,
    17_179_869_184_000_000_000,
    18_446_744_073_709_551_615,
];

/// A histogram as the kernel keeps it (one per slot, shared by every CPU,
/// updated with atomic adds). `sum_ns` lets the exporter publish an exact
/// `_sum`; the count is the sum of the buckets, so it can never disagree
/// with them.
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
    /// the kernel does the same with atomic adds.
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

    /// Adds another histogram into this one.
    pub fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.buckets.iter_mut().zip(other.buckets.iter()) {
            *a = a.wrapping_add(*b);
        }
        self.sum_ns = self.sum_ns.wrapping_add(other.sum_ns);
    }
}

/// 218 buckets and the sum: 1,752 bytes per histogram (not per CPU).
const _: () = assert!(size_of::<Histogram>() == 1_752);
const _: () = assert!(NBUCKETS <= 256, "the binary search takes eight steps");

#[cfg(feature = "user")]
aya_pod!(Histogram);

impl Default for Histogram {
    fn default() -> Self {
        Self::ZERO
    }
}

/// The bucket a duration of `ns` nanoseconds falls in: the smallest `i` with
/// `ns <= UPPER_NS[i]`, always < NBUCKETS.
#[inline(always)]
pub fn bucket_index(ns: u64) -> u32 {
    // pos = how many bounds are below ns, found 128, 64, ..., 1 at a time.
    let mut pos = 0usize;
    let mut step = 128usize;
    while step > 0 {
        let probe = pos + step - 1;
        if probe < NBUCKETS && UPPER_NS[probe] < ns {
            pos += step;
        }
        step >>= 1;
    }
    pos as u32
}

/// The native-histogram bucket index of kernel bucket `i`; None for the zero
/// bucket.
pub fn native_index(i: usize) -> Option<i32> {
    (i > 0 && i < NBUCKETS).then(|| i as i32 + NATIVE_OFFSET)
}

/// 2^(b/4) as the nearest f64 to the true bound, exact when b is a multiple
/// of 4: a power of two times one of four constants.
pub fn native_upper_bound_seconds(b: i32) -> f64 {
    const FRACTIONS: [f64; 4] = [1.0, 1.189_207_115_002_721, core::f64::consts::SQRT_2, 1.681_792_830_507_429];
    // rem_euclid keeps the fraction in 0..4 for negative b too; 2^e is
    // built from its exponent bits (no powi in core), e is within ±40.
    let e = b.div_euclid(4);
    let pow2 = f64::from_bits(((e + 1023) as u64) << 52);
    FRACTIONS[b.rem_euclid(4) as usize] * pow2
}

/// Upper bound of bucket `i` in seconds (`le` in Prometheus terms): bucket
/// `i` holds durations in (upper(i-1), upper(i)].
pub fn bucket_upper_bound_seconds(i: usize) -> f64 {
    native_upper_bound_seconds(i.min(NBUCKETS - 1) as i32 + NATIVE_OFFSET)
}

/// Lower (exclusive) bound of bucket `i` in seconds (0 for the zero bucket).
pub fn bucket_lower_bound_seconds(i: usize) -> f64 {
    if i == 0 { 0.0 } else { bucket_upper_bound_seconds(i - 1) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use num_bigint::BigUint;

    /// 2^b · 10^36 compared with v^4, as (left, right) big integers with the
    /// power of two moved to the side where it is a whole number.
    fn sides(v: u64, b: i32) -> (BigUint, BigUint) {
        let v4 = BigUint::from(v).pow(4);
        let e36 = BigUint::from(10u32).pow(36);
        if b >= 0 { (v4, e36 << b as usize) } else { (v4 << (-b) as usize, e36) }
    }

    /// The exact bucket of `ns` from the definition, without the table: the
    /// smallest native b with ns · 10^-9 <= 2^(b/4), i.e. ns^4 <= 2^b · 10^36.
    fn exact_bucket(ns: u64) -> usize {
        let (lo, hi) = sides(ns, NATIVE_OFFSET);
        if lo <= hi {
            return 0;
        }
        // Start from the f64 estimate and settle it exactly.
        let mut b = ((ns as f64 * 1e-9).log2() * 4.0).ceil() as i32 - 2;
        loop {
            let (l, h) = sides(ns, b);
            if l <= h {
                let (l, h) = sides(ns, b - 1);
                if l <= h {
                    b -= 1;
                    continue;
                }
                return (b - NATIVE_OFFSET) as usize;
            }
            b += 1;
        }
    }

    #[test]
    fn table_is_the_exact_floor_of_each_bound() {
        for (i, &t) in UPPER_NS.iter().enumerate().take(NBUCKETS - 1) {
            let b = i as i32 + NATIVE_OFFSET;
            let (l, h) = sides(t, b);
            assert!(l <= h, "bucket {i}: {t} is above 2^({b}/4) s");
            let (l, h) = sides(t + 1, b);
            assert!(l > h, "bucket {i}: {t} + 1 is not above 2^({b}/4) s");
        }
        // The last bucket's true bound, 2^34.25 s, is beyond every u64.
        let (l, h) = sides(u64::MAX, NBUCKETS as i32 - 1 + NATIVE_OFFSET);
        assert!(l <= h);
    }

    #[test]
    fn layout_is_schema_2_from_the_zero_bucket_to_every_u64() {
        assert_eq!(UPPER_NS[0], 953, "zero threshold 2^-20 s");
        assert_eq!(bucket_upper_bound_seconds(0), ZERO_THRESHOLD_SECONDS);
        assert_eq!(native_index(0), None);
        assert_eq!(native_index(1), Some(-79));
        // Powers of two of seconds are bounds: 1 s is native bucket 0, 2 s is 4.
        assert_eq!(bucket_index(1_000_000_000) as usize, 80);
        assert_eq!(native_index(80), Some(0));
        assert_eq!(bucket_upper_bound_seconds(80), 1.0);
        assert_eq!(bucket_upper_bound_seconds(84), 2.0);
        assert_eq!(bucket_upper_bound_seconds(76), 0.5);
        // 1 µs is in the first native bucket, 60 s well inside the range.
        assert_eq!(bucket_index(1_000), 1);
        assert!(bucket_index(60_000_000_000) < NBUCKETS as u32 - 100);
        assert_eq!(bucket_index(u64::MAX) as usize, NBUCKETS - 1);
    }

    #[test]
    fn every_boundary_plus_and_minus_one_ns_lands_in_its_exact_bucket() {
        for (i, &t) in UPPER_NS.iter().enumerate().take(NBUCKETS - 1) {
            for v in [t - 1, t, t + 1] {
                assert_eq!(bucket_index(v) as usize, exact_bucket(v), "bucket {i}, v = {v} ns");
            }
            assert_eq!(bucket_index(t) as usize, i);
            assert_eq!(bucket_index(t + 1) as usize, i + 1);
        }
        for v in [0, 1, u64::MAX - 1, u64::MAX] {
            assert_eq!(bucket_index(v) as usize, exact_bucket(v), "v = {v} ns");
        }
    }

    #[test]
    fn values_between_boundaries_agree_with_the_definition() {
        // Dense at the low end, geometric after, to past 60 s.
        let mut v: u64 = 0;
        while v < 200_000_000_000 {
            assert_eq!(bucket_index(v) as usize, exact_bucket(v), "v = {v} ns");
            v = if v < 20_000 { v + 3 } else { v + v / 211 };
        }
    }

    #[test]
    fn float_bounds_match_the_table() {
        for i in 1..NBUCKETS {
            assert!(bucket_upper_bound_seconds(i) > bucket_upper_bound_seconds(i - 1));
        }
        for (i, &t) in UPPER_NS.iter().enumerate().take(NBUCKETS - 1) {
            let f = bucket_upper_bound_seconds(i) * 1e9;
            assert!(f >= t as f64 && f < t as f64 + 1.0 + f * 1e-15, "bucket {i}: {f} vs {t}");
        }
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
        assert_eq!(b.buckets[0], 1, "1 ns is in the zero bucket");
    }
}
