//! A value's bf16 bits: rounded to nearest even, or split into two or three exact parts; and
//! where the split layouts put each part.

use super::panels::Panels;
use super::row_pairs::RowPairs;
use crate::dtype::Element;

/// `v` rounded to bf16 (to nearest, ties to even; NaN stays a quiet NaN), as its 16 bits: the same
/// result as `half::bf16::from_f32`, without a branch on the value for finite inputs, so that the
/// packing loop stays cheap (it was 12% of a bf16 prefill call through `half`).
#[inline]
pub(crate) fn bf16_bits(v: f32) -> u32 {
    let b = v.to_bits();
    if v.is_nan() {
        (b >> 16) | 0x40
    } else {
        // Adding 0x7fff plus the kept part's lowest bit carries into bit 16 exactly when RNE rounds
        // up; it cannot overflow for non-NaN bit patterns (all below 0xff80_0001).
        (b + 0x7fff + ((b >> 16) & 1)) >> 16
    }
}

/// The 16 bits of a bf16 weight for pair panels. Only bf16 has pair and tile kernels: its bits are
/// the top half of its f32 value.
pub(super) fn bf16_weight_bits<T: Element>(v: T) -> u32 {
    v.to_f32().to_bits() >> 16
}

/// Pairs per row of a `k`-element operand in [`Layout::Split`]: each step of 16 pairs three times.
///
/// [`Layout::Split`]: crate::cpu::kernels::Layout::Split
pub(crate) fn split_pairs(k: usize) -> usize {
    3 * k.div_ceil(2).div_ceil(RowPairs::STEP) * RowPairs::STEP
}

/// Where pair `q` of a [`Layout::Split`] row comes from: pair `p` of the operand, and which copy of
/// its step (0, 1, 2), so that steps go `[copy 0][copy 1][copy 2]` for each 16 pairs of k.
///
/// [`Layout::Split`]: crate::cpu::kernels::Layout::Split
#[inline(always)]
pub(super) fn split_step(q: usize) -> (usize, usize) {
    let (step, within) = (q / RowPairs::STEP, q % RowPairs::STEP);
    (step / 3 * RowPairs::STEP + within, step % 3)
}

/// `hi` for the copy of a high part that meets the other operand's low parts, where a non-finite
/// `hi` is written as 0: `hi·lo` would make `∞·0 = NaN` from an infinity times a value that bf16
/// holds exactly (its `lo` is 0), where `v·w` is infinite; `hi·hi` carries the infinity (or NaN).
#[inline(always)]
pub(super) fn cross(hi: u32) -> u32 {
    if hi & 0x7f80 == 0x7f80 {
        0
    } else {
        hi
    }
}

/// The high and low bf16 parts of `v`, as bits: `hi = bf16(v)`, `lo = bf16(v - hi)` (both to
/// nearest, ties to even). `v - hi` is exact in f32 and for an f16 (or bf16) `v` so is `lo`:
/// `hi + lo = v`. For an f32 `v`, `|v - hi - lo| <= 2^-16 |v|`. Where `hi` is not finite (NaN,
/// an infinity, or an f32 beyond bf16's range) `lo` is 0, so that `hi` alone carries it as IEEE
/// arithmetic would (`v - hi` would make an infinity NaN).
#[inline(always)]
pub(crate) fn split_bits(v: f32) -> (u32, u32) {
    let hi = bf16_bits(v);
    let h = f32::from_bits(hi << 16);
    (hi, if h.is_finite() { bf16_bits(v - h) } else { 0 })
}

/// The three bf16 parts of an f32 `v`, as bits: `hi = bf16(v)`, `mid = bf16(v - hi)`, `lo =
/// bf16(v - hi - mid)` (to nearest, ties to even; both differences are exact in f32), so that
/// `|v - hi - mid - lo| <= 2^-24 |v|`. Where `hi` is not finite (NaN, an infinity, or an f32 beyond
/// bf16's range) `mid` and `lo` are 0, as in [`split_bits`].
#[inline(always)]
pub(crate) fn split3_bits(v: f32) -> [u32; 3] {
    let (hi, mid) = split_bits(v);
    let (h, m) = (f32::from_bits(hi << 16), f32::from_bits(mid << 16));
    let lo = if h.is_finite() { bf16_bits(v - h - m) } else { 0 };
    [hi, mid, lo]
}

/// Panels of `cols` columns over `k` elements in a split layout: each 16-pair step of k three
/// times, copy `i` of a step holding `parts(col, kk)[i]` (bf16 bits) for element `kk` of column
/// `col`, and 0 past `k`: f16 weights as [`split_weight_parts`], merge's bf16 Aᵀ as
/// [`tripled_bits`].
pub(crate) fn split_panels(cols: usize, k: usize, parts: impl Fn(usize, usize) -> [u32; 3]) -> Panels<u32> {
    Panels::from_fn(cols, split_pairs(k), |c, q| {
        let (p, copy) = split_step(q);
        let part = |kk: usize| if kk < k { parts(c, kk)[copy] } else { 0 };
        part(2 * p) | (part(2 * p + 1) << 16)
    })
}

/// A weight of [`Layout::Split`] as its step copies: `[hi][lo][hi, finite or 0]`, meeting the left
/// operand's `[hi][hi, finite or 0][lo]` (see [`pack_row_split`] and `cross`).
///
/// [`Layout::Split`]: crate::cpu::kernels::Layout::Split
/// [`pack_row_split`]: super::row_pairs::pack_row_split
#[inline(always)]
pub(super) fn split_weight_parts(v: f32) -> [u32; 3] {
    let (hi, lo) = split_bits(v);
    [hi, lo, cross(hi)]
}

/// A bf16 weight (bits) as its step copies for the merge's split left operand (`[hi][mid][lo]`,
/// [`pack_row_split3`]): `[w][w, finite or 0][w, finite or 0]`, so that a non-finite weight meets
/// only `hi` and an infinity times a `c` that bf16 holds exactly stays an infinity (see `cross`).
///
/// [`pack_row_split3`]: super::row_pairs::pack_row_split3
#[inline(always)]
pub(crate) fn tripled_bits(w: u32) -> [u32; 3] {
    [w, cross(w), cross(w)]
}

#[cfg(test)]
mod tests {
    use super::bf16_bits;

    #[test]
    fn bf16_rounding_matches_half_bit_for_bit() {
        let specials = [
            0.0f32,
            -0.0,
            1.0,
            f32::MAX,
            f32::MIN,
            f32::MIN_POSITIVE,
            1e-45,
            -1e-45,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            -f32::NAN,
            f32::from_bits(0x7f80_0001),
            f32::from_bits(0xffff_ffff),
        ];
        // Every tie and near-tie around the rounding point, over a spread of exponents, and an LCG walk
        // through all bit patterns.
        let mut x: u32 = 0x1234_5678;
        let walk = (0..200_000).map(|_| {
            x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            f32::from_bits(x)
        });
        let ties = (0u32..512)
            .flat_map(|e| [0x7fffu32, 0x8000, 0x8001, 0x1_8000].map(move |low| f32::from_bits((e << 23) | low)));
        for v in specials.into_iter().chain(walk).chain(ties) {
            let want = u32::from(half::bf16::from_f32(v).to_bits());
            assert_eq!(bf16_bits(v), want, "{v:e} ({:#010x})", v.to_bits());
        }
    }
}
