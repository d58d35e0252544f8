//! Deterministic patch subsampling.
//!
//! A bag with more than `max_patches` rows is reduced to a uniformly random subset of
//! `max_patches` rows, drawn without replacement and returned in storage order. The draw depends
//! only on `(seed, epoch, slide index)`, so every worker, rank and rerun picks the same rows.

/// SplitMix64 step: advances `state` and returns a well-mixed 64-bit value.
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// xoshiro256** generator (Blackman & Vigna), seeded through SplitMix64.
#[derive(Debug, Clone)]
pub struct Rng {
    s: [u64; 4],
}

impl Rng {
    /// A generator whose stream is a function of `seed` only.
    pub fn new(seed: u64) -> Self {
        let mut st = seed;
        let s = [
            splitmix64(&mut st),
            splitmix64(&mut st),
            splitmix64(&mut st),
            splitmix64(&mut st),
        ];
        Rng { s }
    }

    /// A generator for one bag: the stream is a function of `(seed, epoch, index)`.
    pub fn for_bag(seed: u64, epoch: u64, index: u64) -> Self {
        let mut st = seed;
        let a = splitmix64(&mut st);
        let mut st = a ^ epoch.wrapping_mul(0xD1B5_4A32_D192_ED03);
        let b = splitmix64(&mut st);
        let mut st = b ^ index.wrapping_mul(0xAEF1_7502_108E_F2D9);
        Rng::new(splitmix64(&mut st))
    }

    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let result = self.s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = self.s[1] << 17;
        self.s[2] ^= self.s[0];
        self.s[3] ^= self.s[1];
        self.s[1] ^= self.s[2];
        self.s[0] ^= self.s[3];
        self.s[2] ^= t;
        self.s[3] = self.s[3].rotate_left(45);
        result
    }

    /// Uniform integer in `0..n` without modulo bias (Lemire's method). `n` must be > 0.
    pub fn below(&mut self, n: u64) -> u64 {
        debug_assert!(n > 0);
        let mut m = u128::from(self.next_u64()) * u128::from(n);
        let mut low = m as u64;
        if low < n {
            let threshold = n.wrapping_neg() % n;
            while low < threshold {
                m = u128::from(self.next_u64()) * u128::from(n);
                low = m as u64;
            }
        }
        (m >> 64) as u64
    }
}

/// Choose `m` of the rows `0..n` uniformly at random without replacement, in increasing order.
///
/// Selection sampling (Knuth, TAOCP vol. 2, Algorithm S): row `t` is kept with probability
/// `(m - kept) / (n - t)`, decided with an exact integer draw, so the output is sorted by
/// construction and every `m`-subset is equally likely. Returns all rows when `m >= n`.
pub fn choose_sorted(n: usize, m: usize, rng: &mut Rng) -> Vec<usize> {
    if m >= n {
        return (0..n).collect();
    }
    let mut out = Vec::with_capacity(m);
    for t in 0..n {
        let need = m - out.len();
        if need == 0 {
            break;
        }
        let left = n - t;
        if need == left || rng.below(left as u64) < need as u64 {
            out.push(t);
        }
    }
    out
}

/// The rows of a bag of `n` rows that a read with `max_patches` returns, or `None` for all rows.
pub fn bag_rows(
    n: usize,
    max_patches: Option<usize>,
    seed: u64,
    epoch: u64,
    index: usize,
) -> Option<Vec<usize>> {
    match max_patches {
        Some(m) if m < n => {
            let mut rng = Rng::for_bag(seed, epoch, index as u64);
            Some(choose_sorted(n, m, &mut rng))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xoshiro_reference_values() {
        // Reference: xoshiro256** with state [1, 2, 3, 4] (first outputs from the authors' C code).
        let mut r = Rng { s: [1, 2, 3, 4] };
        let got: Vec<u64> = (0..4).map(|_| r.next_u64()).collect();
        assert_eq!(got, vec![11520, 0, 1509978240, 1215971899390074240]);
    }

    #[test]
    fn splitmix_reference_value() {
        // First output of SplitMix64 seeded with 0 (Vigna's reference implementation).
        let mut s = 0u64;
        assert_eq!(splitmix64(&mut s), 0xE220_A839_7B1D_CDAF);
    }

    #[test]
    fn below_stays_in_range_and_covers_it() {
        let mut r = Rng::new(7);
        let mut seen = [0usize; 5];
        for _ in 0..5000 {
            let v = r.below(5) as usize;
            assert!(v < 5);
            seen[v] += 1;
        }
        assert!(seen.iter().all(|&c| c > 850 && c < 1150), "{seen:?}");
    }

    #[test]
    fn choose_is_sorted_unique_and_sized() {
        let mut r = Rng::new(3);
        for (n, m) in [(10, 3), (100, 99), (1000, 1), (7, 7), (7, 0), (5, 9)] {
            let v = choose_sorted(n, m, &mut r);
            assert_eq!(v.len(), m.min(n));
            assert!(v.windows(2).all(|w| w[0] < w[1]));
            assert!(v.iter().all(|&x| x < n));
        }
    }

    #[test]
    fn choose_is_uniform_over_rows() {
        // Each row of 6 must be picked with probability 2/6 when choosing 2.
        let mut r = Rng::new(11);
        let mut counts = [0usize; 6];
        let trials = 30_000;
        for _ in 0..trials {
            for i in choose_sorted(6, 2, &mut r) {
                counts[i] += 1;
            }
        }
        let expect = trials as f64 / 3.0;
        for c in counts {
            assert!(((c as f64) - expect).abs() < 0.05 * expect, "{counts:?}");
        }
    }

    #[test]
    fn bag_rows_is_deterministic_and_depends_on_all_inputs() {
        let a = bag_rows(1000, Some(50), 1, 2, 3).unwrap();
        assert_eq!(a, bag_rows(1000, Some(50), 1, 2, 3).unwrap());
        assert_ne!(a, bag_rows(1000, Some(50), 9, 2, 3).unwrap());
        assert_ne!(a, bag_rows(1000, Some(50), 1, 9, 3).unwrap());
        assert_ne!(a, bag_rows(1000, Some(50), 1, 2, 9).unwrap());
        assert!(bag_rows(10, Some(10), 1, 2, 3).is_none());
        assert!(bag_rows(10, None, 1, 2, 3).is_none());
    }
}
