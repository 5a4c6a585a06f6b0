//! The left operand in `Left` tiles of `MR` rows (`[k][MR]` each), and its packers: widened to
//! f32 (rows, scaled rows, columns) or as bf16 k-pairs.

use super::bf16::bf16_bits;
use super::source::RowSource;
use super::MR;
use crate::dtype::Element;
use crate::mat::MatRef;

/// The left operand of a product (activations, `u`, ...), packed per call into tiles of `MR` rows:
/// tile `t / MR` is `[k_len][lanes]`, so that a micro-kernel broadcasts all of its rows for one k
/// from one cache line. `lanes` is `MR`, and lanes past the last row are zero; except that an
/// operand of fewer than `MR` rows (decode) is one tile of exactly `rows` lanes, so that a one-row
/// call neither writes nor reads seven lanes of zeros per k.
#[derive(Debug)]
pub(crate) struct Left<'a, E> {
    data: &'a [E],
    pub(crate) rows: usize,
    pub(crate) k_len: usize,
    /// Elements per k in a tile: the stride between one k and the next.
    pub(crate) lanes: usize,
}

impl<E> Clone for Left<'_, E> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<E> Copy for Left<'_, E> {}

impl<'a, E> Left<'a, E> {
    /// Elements a packed `rows x k_len` operand takes.
    pub(crate) fn len_for(rows: usize, k_len: usize) -> usize {
        rows.div_ceil(MR) * MR * k_len
    }

    /// Rows `r0 .. r0 + n` (`r0` a multiple of `MR`; asserted).
    pub(crate) fn rows(&self, r0: usize, n: usize) -> Self {
        assert!(r0.is_multiple_of(MR) && r0 + n <= self.rows, "Left::rows out of range");
        let start = (r0 / MR) * self.lanes * self.k_len;
        Self { data: &self.data[start..], rows: n, k_len: self.k_len, lanes: self.lanes }
    }

    /// The tile holding rows `t0 .. t0 + MR` (`t0` a multiple of `MR`, `t0 < rows`), as
    /// `[k_len][lanes]`.
    #[inline(always)]
    pub(crate) fn tile(&self, t0: usize) -> &'a [E] {
        let start = (t0 / MR) * self.lanes * self.k_len;
        &self.data[start..start + self.lanes * self.k_len]
    }

    /// The number of lanes [`pack_tiles`] uses for `rows` rows.
    fn lanes_for(rows: usize) -> usize {
        if rows < MR {
            rows
        } else {
            MR
        }
    }
}

/// Elements of k per packing step: each row of a tile is converted into one row of a small
/// `MR x PACK_KB` block, which is then written out transposed (`MR` consecutive values per k). Writing
/// row by row instead scatters every element `MR` apart, which measured 6.5 GB/s and cost 3–7% of
/// a bf16 prefill call.
const PACK_KB: usize = 64;

/// Fills the tiles of a packed `rows x k_len` operand in `out` and returns its lane count (see
/// [`Left`]): `fill(t, k0, row)` writes elements `k0 .. k0 + row.len()` of row `t` into `row`;
/// element `k` of lane `i` of a tile lands at `tile[k * lanes + i]`.
fn pack_tiles<O: Copy + Default>(
    rows: usize,
    k_len: usize,
    out: &mut [O],
    mut fill: impl FnMut(usize, usize, &mut [O]),
) -> usize {
    let lanes = Left::<O>::lanes_for(rows);
    for (tile, dst) in out.chunks_mut((lanes * k_len).max(1)).enumerate() {
        let real = rows.saturating_sub(tile * MR).min(MR);
        if real == 0 {
            break;
        }
        if real < lanes {
            // Only the last of several tiles: its lanes past the last row must read as zero.
            dst.fill(O::default());
        }
        let mut block = [[O::default(); PACK_KB]; MR];
        for k0 in (0..k_len).step_by(PACK_KB) {
            let kb = PACK_KB.min(k_len - k0);
            for (i, row) in block.iter_mut().enumerate().take(real) {
                fill(tile * MR + i, k0, &mut row[..kb]);
            }
            let dst = &mut dst[k0 * lanes..(k0 + kb) * lanes];
            if lanes == MR && real == MR {
                transpose_block(&block, dst);
            } else {
                for (i, row) in block.iter().enumerate().take(real) {
                    for (k, &v) in row[..kb].iter().enumerate() {
                        dst[k * lanes + i] = v;
                    }
                }
            }
        }
    }
    lanes
}

/// `dst[k * MR + i] = block[i][k]` for the `dst.len() / MR` first k (a full tile: the fixed lane
/// count lets the compiler unroll each k's `MR` moves).
#[inline(always)]
fn transpose_block<O: Copy>(block: &[[O; PACK_KB]; MR], dst: &mut [O]) {
    for (k, lanes) in dst.chunks_exact_mut(MR).enumerate() {
        for (i, v) in lanes.iter_mut().enumerate() {
            *v = block[i][k];
        }
    }
}

/// Packs `src` (`rows x k_len`, rows are the operand's rows) into `out`, widened to f32.
pub(crate) fn pack_rows<'o, E: Element>(src: impl RowSource<E>, out: &'o mut [f32]) -> Left<'o, f32> {
    let (rows, k_len) = (src.rows(), src.cols());
    let out = &mut out[..Left::<f32>::len_for(rows, k_len)];
    let lanes = pack_tiles(rows, k_len, out, |t, k0, dst| E::widen_slice(&src.row(t)[k0..k0 + dst.len()], dst));
    Left { data: out, rows, k_len, lanes }
}

/// Packs the rows of `src`, widened to f32, each multiplied element by element by its own scale
/// vector over k: `row_scale(t)` for row `t`, or zeros for a row where that is `None` (a row
/// without an adapter in a mixed call).
pub(crate) fn pack_rows_scaled<'o, 's, E: Element>(
    src: impl RowSource<E>,
    row_scale: impl Fn(usize) -> Option<&'s [f32]>,
    out: &'o mut [f32],
) -> Left<'o, f32> {
    let (rows, k_len) = (src.rows(), src.cols());
    let out = &mut out[..Left::<f32>::len_for(rows, k_len)];
    let lanes = pack_tiles(rows, k_len, out, |t, k0, dst| match row_scale(t) {
        Some(scale) => {
            E::widen_slice(&src.row(t)[k0..k0 + dst.len()], dst);
            for (d, s) in dst.iter_mut().zip(&scale[k0..]) {
                *d *= s;
            }
        }
        None => dst.fill(0.0),
    });
    Left { data: out, rows, k_len, lanes }
}

/// Packs the transpose of `src` (`k_len x rows`: the operand's rows are `src`'s columns) into
/// `out`, widened to f32.
pub(crate) fn pack_cols<'o, E: Element>(src: MatRef<'_, E>, out: &'o mut [f32]) -> Left<'o, f32> {
    let (k_len, rows) = (src.rows(), src.cols());
    let out = &mut out[..Left::<f32>::len_for(rows, k_len)];
    out.fill(0.0);
    let mut buf = [0.0f32; MR];
    for k in 0..k_len {
        let row = src.row_unchecked(k);
        for (tile, chunk) in row.chunks(MR).enumerate() {
            E::widen_slice(chunk, &mut buf[..chunk.len()]);
            let at = tile * MR * k_len + k * MR;
            out[at..at + chunk.len()].copy_from_slice(&buf[..chunk.len()]);
        }
    }
    Left { data: out, rows, k_len, lanes: MR }
}

/// Packs bf16 rows (`rows x n`, as bits) into k-pairs: each u32 holds elements `2p` (low half)
/// and `2p + 1` (high half, 0 past `n`), `k_len = ceil(n / 2)`.
pub(crate) fn pack_pairs<'o>(src: impl RowSource<u16>, out: &'o mut [u32]) -> Left<'o, u32> {
    pack_pairs_with(src, out, u32::from)
}

/// `src` (f32) rounded to bf16 (to nearest, ties to even) and packed as k-pairs like
/// [`pack_pairs`]: the bf16 up-projection's left operand.
pub(crate) fn pack_pairs_rounded<'o>(src: MatRef<'_, f32>, out: &'o mut [u32]) -> Left<'o, u32> {
    pack_pairs_with(src, out, bf16_bits)
}

/// The rows of `src` widened to f32 and scaled as [`pack_rows_scaled`] scales them (zeros for a row
/// whose scale is `None`), then rounded to bf16 (to nearest, ties to even) and packed as k-pairs
/// like [`pack_pairs`]: the backward's left operands (`lambda_d ⊙ h`, `dy ⊙ lambda_b`,
/// `g ⊙ lambda_d`) on the `vdpbf16ps` kernels, rounded as PEFT's bf16 autograd rounds them.
pub(crate) fn pack_pairs_scaled<'o, 's, E: Element>(
    src: impl RowSource<E>,
    row_scale: impl Fn(usize) -> Option<&'s [f32]>,
    out: &'o mut [u32],
) -> Left<'o, u32> {
    let (rows, n) = (src.rows(), src.cols());
    let k_len = n.div_ceil(2);
    let out = &mut out[..Left::<u32>::len_for(rows, k_len)];
    let mut wide = [0.0f32; 2 * PACK_KB];
    let lanes = pack_tiles(rows, k_len, out, |t, p0, dst| {
        let (k0, k1) = (2 * p0, n.min(2 * (p0 + dst.len())));
        let row = &mut wide[..k1 - k0];
        match row_scale(t) {
            Some(scale) => {
                E::widen_slice(&src.row(t)[k0..k1], row);
                for (d, s) in row.iter_mut().zip(&scale[k0..k1]) {
                    *d *= s;
                }
            }
            None => row.fill(0.0),
        }
        write_pairs(row, dst, bf16_bits);
    });
    Left { data: out, rows, k_len, lanes }
}

/// Packs `src` into k-pairs of the 16 bits `bits` gives each element (see [`pack_pairs`]).
#[inline(always)]
fn pack_pairs_with<'o, E: Copy>(src: impl RowSource<E>, out: &'o mut [u32], bits: impl Fn(E) -> u32) -> Left<'o, u32> {
    let (rows, n) = (src.rows(), src.cols());
    let k_len = n.div_ceil(2);
    let out = &mut out[..Left::<u32>::len_for(rows, k_len)];
    let lanes = pack_tiles(rows, k_len, out, |t, p0, dst| {
        write_pairs(&src.row(t)[2 * p0..n.min(2 * (p0 + dst.len()))], dst, &bits);
    });
    Left { data: out, rows, k_len, lanes }
}

/// Writes `row` into `dst` as k-pairs of the 16 bits `bits` gives each element: element `2p` in
/// the low half of `dst[p]`, `2p + 1` in the high half (0 past the row's end).
#[inline(always)]
fn write_pairs<E: Copy>(row: &[E], dst: &mut [u32], bits: impl Fn(E) -> u32) {
    let (pairs, rest) = row.as_chunks::<2>();
    for (d, &[lo, hi]) in dst.iter_mut().zip(pairs) {
        *d = bits(lo) | (bits(hi) << 16);
    }
    if let [last] = rest {
        dst[pairs.len()] = bits(*last);
    }
}
