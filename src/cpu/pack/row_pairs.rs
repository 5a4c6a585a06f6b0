//! Left operands for AMX tiles (`RowPairs`): bf16 k-pairs in 16-row tiles, each 16-pair step one
//! contiguous KiB; plain, rounded from f32, scaled per row, or split into bf16 parts.

use super::bf16::{bf16_bits, cross, split3_bits, split_bits, split_pairs};
use super::source::RowSource;
use super::{align_slack, aligned_offset};
use crate::dtype::Element;
use crate::mat::MatRef;

/// Rows per AMX tile: a left operand in [`RowPairs`] takes room for a multiple of this many rows.
pub(crate) const TILE_ROWS: usize = 16;

/// A left operand as bf16 k-pairs in AMX tiles: rows in tiles of [`TILE_ROWS`], each tile's k
/// range in steps of 16 pairs, and each (tile, step) the 16 x 16 pairs `tileloadd` reads, stored
/// as one contiguous KiB (rows 64 bytes apart). So a row tile's steps are one sequential stream;
/// in row-major order the 16 rows of a tile are 16 streams a row apart, more than the L2
/// prefetcher follows (a down-projection, n = 4096, ran at about a quarter of the tile peak).
/// Each u32 = (element 2p, element 2p + 1, 0 past `n`); pairs past `k_len` up to a whole step are
/// zero, and so are rows past `rows` up to a whole tile when `rows > 16`. An operand of fewer
/// rows (decode) leaves its padding rows as they were: the AMX tier configures its tiles with only
/// its rows, so they are never read (and zeroing them wrote 16x a one-row operand).
#[derive(Clone, Copy, Debug)]
pub(crate) struct RowPairs<'a> {
    pub(crate) data: &'a [u32],
    pub(crate) rows: usize,
    /// Pairs per row: `ceil(n / 2)`.
    pub(crate) k_len: usize,
    /// Steps of 16 pairs per row tile: `ceil(k_len / 16)`.
    pub(crate) steps: usize,
}

impl RowPairs<'_> {
    /// Pairs per step, and u32s per (tile, step) block.
    pub(crate) const STEP: usize = 16;
    const BLOCK: usize = TILE_ROWS * Self::STEP;

    /// u32s a buffer for a packed `rows x k_len` operand must hold: its tiles, and room to start
    /// them on a 64-byte boundary (see [`Panels`]: unaligned tile loads are 6.7x slower).
    ///
    /// [`Panels`]: super::Panels
    pub(crate) fn len_for(rows: usize, k_len: usize) -> usize {
        rows.div_ceil(TILE_ROWS) * k_len.div_ceil(Self::STEP) * Self::BLOCK + align_slack::<u32>()
    }

    /// The index of pair `p` of row `t`.
    #[inline(always)]
    pub(crate) fn index(&self, t: usize, p: usize) -> usize {
        ((t / TILE_ROWS * self.steps + p / Self::STEP) * TILE_ROWS + t % TILE_ROWS) * Self::STEP + p % Self::STEP
    }
}

/// Packs bf16 rows (`rows x n`, as bits) as k-pairs in AMX tiles (see [`RowPairs`]).
pub(crate) fn pack_row_pairs<'o>(src: impl RowSource<u16>, out: &'o mut [u32]) -> RowPairs<'o> {
    pack_row_pairs_as(src, out, u32::from)
}

/// `src` (f32) rounded to bf16 (to nearest, ties to even) and packed like [`pack_row_pairs`].
pub(crate) fn pack_row_pairs_rounded<'o>(src: MatRef<'_, f32>, out: &'o mut [u32]) -> RowPairs<'o> {
    pack_row_pairs_as(src, out, bf16_bits)
}

/// [`pack_row_pairs_with`], compiled for AVX-512 where the CPU has it (see [`avx512`]).
fn pack_row_pairs_as<'o, E: Copy>(src: impl RowSource<E>, out: &'o mut [u32], bits: impl Fn(E) -> u32) -> RowPairs<'o> {
    #[cfg(all(target_arch = "x86_64", not(miri)))]
    if crate::cpu::isa::has_avx512() {
        // SAFETY: AVX-512F/BW/VL were detected just above.
        return unsafe { avx512::pack_row_pairs_with(src, out, bits) };
    }
    pack_row_pairs_with(src, out, bits)
}

/// The [`RowPairs`] packers compiled for AVX-512, which every CPU of the AMX tier (their only user)
/// has: this module is compiled for the baseline x86-64, whose 4-lane SSE loops made packing `dy`
/// for the backward 12% of a bf16 training step even once vectorized. Same code, same bits.
#[cfg(all(target_arch = "x86_64", not(miri)))]
mod avx512 {
    use super::*;

    /// [`super::pack_row_pairs_with`].
    ///
    /// # Safety
    /// The CPU has AVX-512F, BW and VL.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub(super) unsafe fn pack_row_pairs_with<'o, E: Copy>(
        src: impl RowSource<E>,
        out: &'o mut [u32],
        bits: impl Fn(E) -> u32,
    ) -> RowPairs<'o> {
        super::pack_row_pairs_with(src, out, bits)
    }

    /// [`super::pack_row_parts_with`].
    ///
    /// # Safety
    /// The CPU has AVX-512F, BW and VL.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub(super) unsafe fn pack_row_parts_with<'o, 's, E: Element>(
        src: impl RowSource<E>,
        row_scale: impl Fn(usize) -> Option<&'s [f32]>,
        out: &'o mut [u32],
        parts: impl Fn(f32) -> [u32; 3],
    ) -> RowPairs<'o> {
        super::pack_row_parts_with(src, row_scale, out, parts)
    }

    /// [`super::pack_row_pairs_scaled_with`].
    ///
    /// # Safety
    /// The CPU has AVX-512F, BW and VL.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub(super) unsafe fn pack_row_pairs_scaled_with<'o, 's, E: Element>(
        src: impl RowSource<E>,
        row_scale: impl Fn(usize) -> Option<&'s [f32]>,
        out: &'o mut [u32],
    ) -> RowPairs<'o> {
        super::pack_row_pairs_scaled_with(src, row_scale, out)
    }
}

/// The part of `out` a packed operand of `rows` rows of `k_len` pairs ([`RowPairs`]) takes,
/// starting on a 64-byte line, zeroed where it has padding that is read (see [`RowPairs`]: the
/// rows past `rows` of its last tile when `rows > 16`, and the pairs past `k_len` of the last
/// step), and its layout (with no data yet).
fn row_pairs_out(rows: usize, k_len: usize, out: &mut [u32]) -> (&mut [u32], RowPairs<'static>) {
    const STEP: usize = RowPairs::STEP;
    let offset = aligned_offset(out);
    let out = &mut out[offset..offset + RowPairs::len_for(rows, k_len) - align_slack::<u32>()];
    let layout = RowPairs { data: &[], rows, k_len, steps: k_len.div_ceil(STEP) };
    if rows > TILE_ROWS {
        for t in rows..rows.next_multiple_of(TILE_ROWS) {
            for s in 0..layout.steps {
                let at = layout.index(t, s * STEP);
                out[at..at + STEP].fill(0);
            }
        }
    }
    if !k_len.is_multiple_of(STEP) {
        for t in 0..rows {
            let at = layout.index(t, k_len);
            out[at..at + STEP - k_len % STEP].fill(0);
        }
    }
    (out, layout)
}

#[inline(always)]
fn pack_row_pairs_with<'o, E: Copy>(
    src: impl RowSource<E>,
    out: &'o mut [u32],
    bits: impl Fn(E) -> u32,
) -> RowPairs<'o> {
    let n = src.cols();
    let (out, layout) = row_pairs_out(src.rows(), n.div_ceil(2), out);
    for t in 0..layout.rows {
        let (pairs, rest) = src.row(t)[..n].as_chunks::<2>();
        // One step (16 pairs, 64 contiguous bytes) at a time.
        for (s, chunk) in pairs.chunks(RowPairs::STEP).enumerate() {
            let at = layout.index(t, s * RowPairs::STEP);
            for (d, &[lo, hi]) in out[at..at + chunk.len()].iter_mut().zip(chunk) {
                *d = bits(lo) | (bits(hi) << 16);
            }
        }
        if let [last] = rest {
            out[layout.index(t, pairs.len())] = bits(*last);
        }
    }
    RowPairs { data: out, ..layout }
}

/// Packs `rows x n` values (f16 `x`, or f32 `u`) split into high and low bf16 parts as k-pairs in
/// AMX tiles, in [`Layout::Split`]'s order for left operands: each 16-pair step of k as
/// `[hi][hi, finite or 0][lo]` (see [`split_bits`] and `cross`). Pairs past `n` are zero, and so
/// is the padding [`RowPairs`] zeroes.
///
/// [`Layout::Split`]: crate::cpu::kernels::Layout::Split
pub(crate) fn pack_row_split<'o, E: Element>(src: impl RowSource<E>, out: &'o mut [u32]) -> RowPairs<'o> {
    pack_row_parts(src, |_| Some(&[][..]), out, split_left_parts)
}

/// [`pack_row_split`] of the rows of `src`, each multiplied element by element by its own scale
/// vector over k in f32 (`row_scale(t)`, or zeros where that is `None`) before it is split: the
/// backward's left operands (`lambda_d ⊙ h`, `dy ⊙ lambda_b`, `g ⊙ lambda_d`) for f16 on split
/// tiles, the same f32 values the f32-FMA kernels multiply.
pub(crate) fn pack_row_split_scaled<'o, 's, E: Element>(
    src: impl RowSource<E>,
    row_scale: impl Fn(usize) -> Option<&'s [f32]>,
    out: &'o mut [u32],
) -> RowPairs<'o> {
    pack_row_parts(src, row_scale, out, split_left_parts)
}

/// A left operand's value of [`Layout::Split`] as its step copies: `[hi][hi, finite or 0][lo]`.
///
/// [`Layout::Split`]: crate::cpu::kernels::Layout::Split
#[inline(always)]
fn split_left_parts(v: f32) -> [u32; 3] {
    let (hi, lo) = split_bits(v);
    [hi, cross(hi), lo]
}

/// Packs f32 rows (merge's `diag(lambda_b)·B·diag(lambda_d)`) split into three bf16 parts as
/// k-pairs in AMX tiles, each 16-pair step of k as `[hi][mid][lo]` (see [`split3_bits`]), for
/// weights packed as [`tripled_bits`]. Pairs past the row's end are zero, and so is the padding
/// [`RowPairs`] zeroes.
///
/// [`tripled_bits`]: super::bf16::tripled_bits
pub(crate) fn pack_row_split3<'o>(src: MatRef<'_, f32>, out: &'o mut [u32]) -> RowPairs<'o> {
    pack_row_parts(src, |_| Some(&[][..]), out, split3_bits)
}

/// Packs `rows x n` values as k-pairs in AMX tiles with each 16-pair step of k written three times,
/// copy `i` holding `parts(v)[i]` (bf16 bits) for each value `v`: the split layouts' left operands.
/// Row `t` is first multiplied element by element by `row_scale(t)` in f32 (an empty slice: by
/// nothing; `None`: the row is zeros).
#[inline(always)]
fn pack_row_parts<'o, 's, E: Element>(
    src: impl RowSource<E>,
    row_scale: impl Fn(usize) -> Option<&'s [f32]>,
    out: &'o mut [u32],
    parts: impl Fn(f32) -> [u32; 3],
) -> RowPairs<'o> {
    #[cfg(all(target_arch = "x86_64", not(miri)))]
    if crate::cpu::isa::has_avx512() {
        // SAFETY: AVX-512F/BW/VL were detected just above.
        return unsafe { avx512::pack_row_parts_with(src, row_scale, out, parts) };
    }
    pack_row_parts_with(src, row_scale, out, parts)
}

#[inline(always)]
fn pack_row_parts_with<'o, 's, E: Element>(
    src: impl RowSource<E>,
    row_scale: impl Fn(usize) -> Option<&'s [f32]>,
    out: &'o mut [u32],
    parts: impl Fn(f32) -> [u32; 3],
) -> RowPairs<'o> {
    const STEP: usize = RowPairs::STEP;
    let n = src.cols();
    // Whole steps: every pair of a real row is written below.
    let (out, layout) = row_pairs_out(src.rows(), split_pairs(n), out);
    // Each row widened to f32 at once, then read a step at a time (widening a step at a time,
    // the step's vector load waited on the narrower stores just made: a third of the packing).
    let mut row = vec![0.0f32; n.next_multiple_of(2 * STEP)];
    for t in 0..layout.rows {
        match row_scale(t) {
            Some(scale) => {
                E::widen_slice(&src.row(t)[..n], &mut row[..n]);
                if !scale.is_empty() {
                    for (v, s) in row[..n].iter_mut().zip(scale) {
                        *v *= s;
                    }
                }
            }
            None => row[..n].fill(0.0),
        }
        // One step of k (32 elements, zero past n) at a time: its parts' pairs, written as the
        // step's three copies.
        for (s, v) in row.chunks_exact(2 * STEP).enumerate() {
            // Each copy as 32 bf16 in k order, which is its 16 pairs (element 2p in the low half of
            // pair p): a plain map over the step, which the compiler vectorizes.
            let mut copies = [[0u16; 2 * STEP]; 3];
            for (i, &e) in v.iter().enumerate() {
                let p = parts(e);
                for (copy, bits) in copies.iter_mut().enumerate() {
                    bits[i] = p[copy] as u16;
                }
            }
            for (copy, bits) in copies.iter().enumerate() {
                let at = layout.index(t, (3 * s + copy) * STEP);
                for (d, pair) in out[at..at + STEP].iter_mut().zip(bits.chunks_exact(2)) {
                    *d = u32::from(pair[0]) | (u32::from(pair[1]) << 16);
                }
            }
        }
    }
    RowPairs { data: out, ..layout }
}

/// Packs the rows of `src`, each multiplied element by element by its own scale vector over k
/// (`row_scale(t)`, or zeros where that is `None`) in f32 and rounded to bf16, like
/// [`pack_row_pairs`]: the backward's left operands for AMX tiles (`lambda_d ⊙ h`, `dy ⊙ lambda_b`,
/// `g ⊙ lambda_d`, rounded to bf16 as PEFT's autograd rounds them).
pub(crate) fn pack_row_pairs_scaled<'o, 's, E: Element>(
    src: impl RowSource<E>,
    row_scale: impl Fn(usize) -> Option<&'s [f32]>,
    out: &'o mut [u32],
) -> RowPairs<'o> {
    #[cfg(all(target_arch = "x86_64", not(miri)))]
    if crate::cpu::isa::has_avx512() {
        // SAFETY: AVX-512F/BW/VL were detected just above.
        return unsafe { avx512::pack_row_pairs_scaled_with(src, row_scale, out) };
    }
    pack_row_pairs_scaled_with(src, row_scale, out)
}

#[inline(always)]
fn pack_row_pairs_scaled_with<'o, 's, E: Element>(
    src: impl RowSource<E>,
    row_scale: impl Fn(usize) -> Option<&'s [f32]>,
    out: &'o mut [u32],
) -> RowPairs<'o> {
    let n = src.cols();
    let (out, layout) = row_pairs_out(src.rows(), n.div_ceil(2), out);
    for t in 0..layout.rows {
        let Some(scale) = row_scale(t) else {
            // Pairs past k_len are zero already; a whole step at a time covers the rest.
            for s in 0..layout.steps {
                let at = layout.index(t, s * RowPairs::STEP);
                out[at..at + RowPairs::STEP].fill(0);
            }
            continue;
        };
        // One step (16 pairs, 64 contiguous bytes) at a time, as `pack_row_pairs_with`: a loop the
        // compiler vectorizes (a pair at a time through `index` it did not, and packing `dy` took a
        // quarter of a bf16 training step).
        let (pairs, rest) = src.row(t)[..n].as_chunks::<2>();
        let (scale_pairs, scale_rest) = scale[..n].as_chunks::<2>();
        for (s, (chunk, sc)) in pairs.chunks(RowPairs::STEP).zip(scale_pairs.chunks(RowPairs::STEP)).enumerate() {
            let at = layout.index(t, s * RowPairs::STEP);
            for (d, (&[lo, hi], &[slo, shi])) in out[at..at + chunk.len()].iter_mut().zip(chunk.iter().zip(sc)) {
                *d = bf16_bits(lo.to_f32() * slo) | (bf16_bits(hi.to_f32() * shi) << 16);
            }
        }
        if let ([last], [s_last]) = (rest, scale_rest) {
            out[layout.index(t, pairs.len())] = bf16_bits(last.to_f32() * s_last);
        }
    }
    RowPairs { data: out, ..layout }
}

#[cfg(test)]
mod tests {
    use super::super::ALIGN;
    use super::*;

    #[test]
    fn row_pairs_start_on_a_line_and_hold_each_pair_where_index_says() {
        for (rows, n) in [(1usize, 1usize), (3, 33), (16, 31), (17, 64), (40, 97)] {
            let src: Vec<u16> = (0..rows * n).map(|i| (i % 65_000) as u16 + 1).collect();
            let k_len = n.div_ceil(2);
            // Every start offset in a line, from a buffer of leftovers.
            for shift in 0..16 {
                let mut buf = vec![u32::MAX; RowPairs::len_for(rows, k_len) + shift];
                let left = pack_row_pairs(MatRef::from_slice(&src, rows, n).unwrap(), &mut buf[shift..]);
                assert_eq!(left.data.as_ptr() as usize % ALIGN, 0);
                let padded = if rows > TILE_ROWS { rows.next_multiple_of(TILE_ROWS) } else { rows };
                for t in 0..padded {
                    for p in 0..k_len.next_multiple_of(RowPairs::STEP) {
                        let e = |k: usize| if t < rows && k < n { u32::from(src[t * n + k]) } else { 0 };
                        assert_eq!(
                            left.data[left.index(t, p)],
                            e(2 * p) | (e(2 * p + 1) << 16),
                            "{rows}x{n} t {t} p {p}"
                        );
                    }
                }
            }
        }
    }
}
