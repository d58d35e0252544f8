//! Checked float conversions and finiteness checks on flat row-major buffers.
//!
//! Each function works on a slice holding rows of `row_len` values and reports the first bad
//! *element* index, from which callers derive the row for their error message.

use half::f16;
use half::slice::HalfFloatSliceExt;

/// Largest finite float16 value.
pub const F16_MAX: f64 = 65504.0;

/// Why a value was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadValue {
    /// NaN or ±Inf.
    NonFinite,
    /// Finite, but `|x| > 65504` so float16 cannot hold it.
    Overflow,
}

/// A float type that can be converted to float16.
pub trait F16Source: Copy + Send + Sync {
    /// `|self| <= 65504` (false for NaN).
    fn fits_f16(self) -> bool;
    /// Finite (not NaN or ±Inf).
    fn finite(self) -> bool;
}

impl F16Source for f32 {
    #[inline]
    fn fits_f16(self) -> bool {
        self.abs() <= F16_MAX as f32
    }
    #[inline]
    fn finite(self) -> bool {
        self.is_finite()
    }
}

impl F16Source for f64 {
    #[inline]
    fn fits_f16(self) -> bool {
        self.abs() <= F16_MAX
    }
    #[inline]
    fn finite(self) -> bool {
        self.is_finite()
    }
}

/// Block size of the branch-free pre-scan; a block is only searched element by element when the
/// pre-scan found something.
const BLOCK: usize = 1024;

// Non-finite <=> all exponent bits set. Adding the exponent's lowest bit to the masked exponent
// carries into the sign bit exactly in that case, which keeps the scan a branch-free integer OR
// that vectorises.
#[inline]
fn any_nonfinite_f16_bits(bits: &[u16]) -> bool {
    bits.iter().fold(0u16, |a, &b| {
        a | ((b & 0x7C00).wrapping_add(0x0400) & 0x8000)
    }) != 0
}

#[inline]
fn any_nonfinite_f32_bits(bits: &[u32]) -> bool {
    bits.iter().fold(0u32, |a, &b| {
        a | ((b & 0x7F80_0000).wrapping_add(0x0080_0000) & 0x8000_0000)
    }) != 0
}

/// Index of the first element that is not finite, if any.
pub fn first_non_finite_f32(x: &[f32]) -> Option<usize> {
    let bits: &[u32] = bytemuck::cast_slice(x);
    for (b, block) in bits.chunks(BLOCK).enumerate() {
        if any_nonfinite_f32_bits(block) {
            let pos = x[b * BLOCK..]
                .iter()
                .position(|v| !v.is_finite())
                .unwrap_or(0);
            return Some(b * BLOCK + pos);
        }
    }
    None
}

/// Index of the first float16 element that is not finite, if any.
pub fn first_non_finite_f16(x: &[f16]) -> Option<usize> {
    let bits: &[u16] = bytemuck::cast_slice(x);
    for (b, block) in bits.chunks(BLOCK).enumerate() {
        if any_nonfinite_f16_bits(block) {
            let pos = block
                .iter()
                .position(|&v| v & 0x7C00 == 0x7C00)
                .unwrap_or(0);
            return Some(b * BLOCK + pos);
        }
    }
    None
}

/// Index of the first float64 element that is not finite, if any.
pub fn first_non_finite_f64(x: &[f64]) -> Option<usize> {
    x.iter().position(|v| !v.is_finite())
}

/// First element of `x` that float16 cannot represent (NaN/Inf or `|x| > 65504`).
pub fn first_unfit_for_f16<T: F16Source>(x: &[T]) -> Option<(usize, BadValue)> {
    for (b, block) in x.chunks(BLOCK).enumerate() {
        let all_ok = block.iter().fold(true, |acc, v| acc & v.fits_f16());
        if !all_ok {
            for (i, v) in block.iter().enumerate() {
                if !v.fits_f16() {
                    let why = if v.finite() {
                        BadValue::Overflow
                    } else {
                        BadValue::NonFinite
                    };
                    return Some((b * BLOCK + i, why));
                }
            }
        }
    }
    None
}

/// Convert float16 to float32 into `dst` (same length) and return the first non-finite index.
pub fn f16_to_f32_checked(src: &[f16], dst: &mut [f32]) -> Option<usize> {
    debug_assert_eq!(src.len(), dst.len());
    let bad = first_non_finite_f16(src);
    src.convert_to_f32_slice(dst);
    bad
}

/// Copy float32 into `dst` (same length) and return the first non-finite index.
pub fn f32_copy_checked(src: &[f32], dst: &mut [f32]) -> Option<usize> {
    debug_assert_eq!(src.len(), dst.len());
    dst.copy_from_slice(src);
    first_non_finite_f32(dst)
}

/// Copy float16 into `dst` (same length) and return the first non-finite index.
pub fn f16_copy_checked(src: &[f16], dst: &mut [f16]) -> Option<usize> {
    debug_assert_eq!(src.len(), dst.len());
    dst.copy_from_slice(src);
    first_non_finite_f16(dst)
}

/// Convert float32 to float16 into `dst` (same length, round to nearest even) and return the first
/// index float16 cannot hold (NaN/Inf or `|x| > 65504`).
pub fn f32_to_f16_into_checked(src: &[f32], dst: &mut [f16]) -> Option<usize> {
    debug_assert_eq!(src.len(), dst.len());
    if let Some((bad, _)) = first_unfit_for_f16(src) {
        return Some(bad);
    }
    dst.convert_from_f32_slice(src);
    None
}

/// Result of a checked float16 conversion: the values, or the first bad element and why.
pub type F16Result = Result<Vec<f16>, (usize, BadValue)>;

/// Convert float32 to float16 (round to nearest even). Fails on the first unrepresentable value.
pub fn f32_to_f16_checked(src: &[f32]) -> F16Result {
    if let Some(bad) = first_unfit_for_f16(src) {
        return Err(bad);
    }
    let mut out = vec![f16::ZERO; src.len()];
    out.as_mut_slice().convert_from_f32_slice(src);
    Ok(out)
}

/// Convert float64 to float16 (round to nearest even). Fails on the first unrepresentable value.
pub fn f64_to_f16_checked(src: &[f64]) -> F16Result {
    if let Some(bad) = first_unfit_for_f16(src) {
        return Err(bad);
    }
    let mut out = vec![f16::ZERO; src.len()];
    out.as_mut_slice().convert_from_f64_slice(src);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_first_non_finite() {
        let mut v = vec![1.0f32; 3000];
        assert_eq!(first_non_finite_f32(&v), None);
        v[2500] = f32::INFINITY;
        v[2900] = f32::NAN;
        assert_eq!(first_non_finite_f32(&v), Some(2500));
        let h: Vec<f16> = [1.0, -2.0, f32::NAN, f32::INFINITY]
            .iter()
            .map(|&x| f16::from_f32(x))
            .collect();
        assert_eq!(first_non_finite_f16(&h), Some(2));
        assert_eq!(first_non_finite_f16(&h[..2]), None);
        assert_eq!(first_non_finite_f64(&[0.0, f64::NEG_INFINITY]), Some(1));
    }

    #[test]
    fn bit_scans_agree_with_is_finite_on_every_f16() {
        let all: Vec<f16> = (0..=u16::MAX).map(f16::from_bits).collect();
        for (i, v) in all.iter().enumerate() {
            let expect = (!v.is_finite()).then_some(0);
            assert_eq!(first_non_finite_f16(&all[i..=i]), expect, "bits {i:#06x}");
            let w = [v.to_f32()];
            assert_eq!(first_non_finite_f32(&w), expect, "bits {i:#06x}");
        }
        for bits in [
            0x7F7F_FFFFu32,
            0x7F80_0000,
            0xFF80_0000,
            0x7FC0_0000,
            0x0000_0001,
            0x8000_0000,
        ] {
            let v = f32::from_bits(bits);
            let expect = (!v.is_finite()).then_some(0);
            assert_eq!(first_non_finite_f32(&[v]), expect, "bits {bits:#010x}");
        }
    }

    #[test]
    fn f16_round_trip_and_check() {
        let src: Vec<f16> = [0.5f32, -1.25, 65504.0, -65504.0, 1e-7]
            .iter()
            .map(|&x| f16::from_f32(x))
            .collect();
        let mut dst = vec![0.0f32; src.len()];
        assert_eq!(f16_to_f32_checked(&src, &mut dst), None);
        assert_eq!(&dst[..4], &[0.5, -1.25, 65504.0, -65504.0]);
        // 1e-7 becomes the nearest subnormal float16: 2 * 2^-24.
        assert_eq!(dst[4], 2.0 * 2f32.powi(-24));
        let bad = [f16::ONE, f16::NEG_INFINITY];
        let mut dst = [0.0f32; 2];
        assert_eq!(f16_to_f32_checked(&bad, &mut dst), Some(1));
    }

    #[test]
    fn into_variants_match_the_allocating_ones() {
        let src = [0.1f32, -2.0, 65504.0, 3.3e-5];
        let mut dst = [f16::ZERO; 4];
        assert_eq!(f32_to_f16_into_checked(&src, &mut dst), None);
        assert_eq!(dst.to_vec(), f32_to_f16_checked(&src).unwrap());
        assert_eq!(dst[0].to_bits(), 0x2E66);
        assert_eq!(
            f32_to_f16_into_checked(&[1.0, 70000.0], &mut [f16::ZERO; 2]),
            Some(1)
        );
        let mut copy = [f16::ZERO; 4];
        assert_eq!(f16_copy_checked(&dst, &mut copy), None);
        assert_eq!(copy, dst);
        let bad = [f16::ONE, f16::NAN];
        assert_eq!(f16_copy_checked(&bad, &mut [f16::ZERO; 2]), Some(1));
    }

    #[test]
    fn to_f16_rejects_overflow_and_nan() {
        assert_eq!(
            f32_to_f16_checked(&[1.0, 65504.0, -65504.5]).unwrap_err(),
            (2, BadValue::Overflow)
        );
        assert_eq!(
            f64_to_f16_checked(&[1.0, f64::NAN, 1e9]).unwrap_err(),
            (1, BadValue::NonFinite)
        );
        assert_eq!(
            f32_to_f16_checked(&[f32::NEG_INFINITY]).unwrap_err(),
            (0, BadValue::NonFinite)
        );
        let ok = f32_to_f16_checked(&[1.0, 0.1, 65504.0]).unwrap();
        // 0.1 rounds to 0x2E66 in float16 (hand-computed: 0.0999755859375).
        assert_eq!(ok[1].to_bits(), 0x2E66);
        assert_eq!(ok[2].to_bits(), 0x7BFF);
        let ok = f64_to_f16_checked(&[0.1, -2.0]).unwrap();
        assert_eq!(ok[0].to_bits(), 0x2E66);
        assert_eq!(ok[1].to_bits(), 0xC000);
    }
}
