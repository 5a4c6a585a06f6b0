//! Operand layouts and packing, shared by every ISA tier.
//!
//! All products here are `out[row, col] = Σ_k left[row, k] · right[col, k]`, computed by micro-kernels
//! that broadcast one `left` element per row and multiply it with `NR` consecutive columns of
//! `right`. So `right` (the weights) is packed once into column panels: panel `p` holds columns
//! `p·NR .. p·NR + NR` as `[k][NR]`, zero-padded past the last column. `left` (activations, `u`,
//! ...) is packed per call into [`Left`] tiles of `MR` rows, `[k][MR]` each; for AMX tiles (which
//! multiply a whole 16 x 32 block of `left` at once), into [`RowPairs`] instead.

use std::sync::OnceLock;

use super::kernels::Layout;
use crate::alloc;
use crate::dtype::Element;
use crate::error::Result;
use crate::mat::MatRef;

/// Columns per weight panel (two 512-bit vectors of f32).
pub(crate) const NR: usize = 32;
/// Rows per micro-kernel tile.
pub(crate) const MR: usize = 8;

/// Weights packed into column panels of `NR`, each `[k_cap][NR]`, the first panel starting on a
/// 64-byte boundary (and so every panel, as `k_cap·NR` elements are a whole number of 64-byte
/// lines): AMX tile loads of rows that straddle two lines ran 6.7x slower (50 cycles a tile,
/// against 8) on the Intel machine of the README's table, and cut a tile step from 90% of the
/// tile peak to 33%.
#[derive(Debug)]
pub struct Panels<W> {
    /// `ALIGN_SLACK` more elements than the panels take; they start at `data[offset]`.
    data: Vec<W>,
    offset: usize,
    cols: usize,
    k_cap: usize,
}

/// Bytes of alignment of packed operands (one cache line, one AMX tile row).
pub(crate) const ALIGN: usize = 64;

/// The offset of the first `ALIGN`-aligned element of `v` (0 for zero-sized or empty).
fn aligned_offset<W>(v: &[W]) -> usize {
    let off = v.as_ptr().align_offset(ALIGN);
    if off == usize::MAX {
        0
    } else {
        off.min(v.len())
    }
}

/// Elements of slack an aligned buffer of `W` needs.
const fn align_slack<W>() -> usize {
    ALIGN / if size_of::<W>() == 0 { 1 } else { size_of::<W>() }
}

impl<W: Clone> Clone for Panels<W> {
    fn clone(&self) -> Self {
        // A copy of the vector lies elsewhere: move the panels to its own aligned offset.
        let mut data = self.data.clone();
        let offset = aligned_offset(&data);
        if offset < self.offset {
            data.rotate_left(self.offset - offset);
        } else {
            data.rotate_right(offset - self.offset);
        }
        Self { data, offset, cols: self.cols, k_cap: self.k_cap }
    }
}

impl<W: PartialEq> PartialEq for Panels<W> {
    fn eq(&self, other: &Self) -> bool {
        let len = self.num_panels() * self.k_cap * NR;
        (self.cols, self.k_cap) == (other.cols, other.k_cap)
            && self.data[self.offset..self.offset + len] == other.data[other.offset..other.offset + len]
    }
}

impl<W: Copy + Default> Panels<W> {
    /// Packs `cols` columns of `k_cap` elements each, `get(col, k)`.
    pub(crate) fn from_fn(cols: usize, k_cap: usize, get: impl Fn(usize, usize) -> W) -> Self {
        let np = cols.div_ceil(NR);
        let data = vec![W::default(); np * k_cap * NR + align_slack::<W>()];
        let offset = aligned_offset(&data);
        let mut p = Self { data, offset, cols, k_cap };
        let packed = &mut p.data[offset..];
        for c in 0..cols {
            let base = (c / NR) * k_cap * NR + c % NR;
            for k in 0..k_cap {
                packed[base + k * NR] = get(c, k);
            }
        }
        p
    }
}

impl<W> Panels<W> {
    /// Number of real (unpadded) columns.
    pub(crate) fn cols(&self) -> usize {
        self.cols
    }

    /// Number of panels.
    pub(crate) fn num_panels(&self) -> usize {
        self.cols.div_ceil(NR)
    }

    /// Rows (k) each panel holds.
    pub(crate) fn k_cap(&self) -> usize {
        self.k_cap
    }

    /// Panel `p` as `[k_cap][NR]`.
    pub(crate) fn panel(&self, p: usize) -> &[W] {
        let at = self.offset + p * self.k_cap * NR;
        &self.data[at..at + self.k_cap * NR]
    }

    /// Element `k` of column `col`.
    pub(crate) fn at(&self, col: usize, k: usize) -> W
    where
        W: Copy,
    {
        self.panel(col / NR)[k * NR + col % NR]
    }

    /// Empty panels sized for `cols` columns of `k_cap` (contents unspecified until written), or an
    /// `Err` naming `what` when that many elements overflow or cannot be allocated.
    pub(crate) fn with_shape(what: &'static str, cols: usize, k_cap: usize) -> Result<Self>
    where
        W: Default + Clone,
    {
        let len = alloc::product(what, cols.div_ceil(NR) * NR, k_cap)?;
        // (A saturated length fails to allocate, with the same error.)
        let len = len.saturating_add(align_slack::<W>());
        let data = alloc::filled(what, len, W::default())?;
        let offset = aligned_offset(&data);
        Ok(Self { data, offset, cols, k_cap })
    }

    /// A raw handle for kernels that write panels from several threads.
    pub(crate) fn as_mut_ptr(&mut self) -> PanelsPtr<W> {
        // SAFETY: offset <= data.len() (aligned_offset).
        PanelsPtr {
            ptr: unsafe { self.data.as_mut_ptr().add(self.offset) },
            cols: self.cols,
            k_cap: self.k_cap,
            row0: 0,
        }
    }
}

/// A raw, `Send + Sync` handle on a [`Panels`] being written (rows are k), offset by `row0`.
#[derive(Debug)]
pub(crate) struct PanelsPtr<W> {
    ptr: *mut W,
    cols: usize,
    k_cap: usize,
    row0: usize,
}

impl<W> Clone for PanelsPtr<W> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<W> Copy for PanelsPtr<W> {}
// SAFETY: threads write pairwise disjoint rows (k ranges) of the panels (see `cpu::dense`).
unsafe impl<W: Send> Send for PanelsPtr<W> {}
// SAFETY: as above; shared references only read the fields.
unsafe impl<W: Send> Sync for PanelsPtr<W> {}

impl<W> PanelsPtr<W> {
    /// Number of real (unpadded) columns.
    pub(crate) fn cols(&self) -> usize {
        self.cols
    }

    /// The same panels with local row 0 at row `row0` (asserted in range).
    pub(crate) fn offset_rows(&self, row0: usize) -> Self {
        assert!(self.row0 + row0 <= self.k_cap, "PanelsPtr::offset_rows out of range");
        Self { row0: self.row0 + row0, ..*self }
    }

    /// Pointer to panel `col / NR`, local row `row`, lane 0.
    ///
    /// # Safety
    /// `col < cols` rounded up to a panel, `row0 + row < k_cap`.
    #[inline(always)]
    pub(crate) unsafe fn row_ptr(&self, row: usize, col: usize) -> *mut W {
        debug_assert!(self.row0 + row < self.k_cap && col < self.cols.div_ceil(NR) * NR);
        // SAFETY: in range of the allocation by the caller's contract.
        unsafe { self.ptr.add((col / NR) * self.k_cap * NR + (self.row0 + row) * NR) }
    }
}

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

/// The rows of a left operand to pack: a strided matrix, or rows gathered from one by index
/// ([`Gathered`]: a mixed-adapter batch's rows sorted by adapter).
pub(crate) trait RowSource<E> {
    /// Rows of the operand.
    fn rows(&self) -> usize;
    /// Elements per row (k).
    fn cols(&self) -> usize;
    /// Row `t` of the operand.
    fn row(&self, t: usize) -> &[E];
}

impl<E> RowSource<E> for MatRef<'_, E> {
    fn rows(&self) -> usize {
        MatRef::rows(self)
    }
    fn cols(&self) -> usize {
        MatRef::cols(self)
    }
    #[inline(always)]
    fn row(&self, t: usize) -> &[E] {
        self.row_unchecked(t)
    }
}

/// Rows `order[0]`, `order[1]`, ... of `mat`, in that order.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Gathered<'a, E> {
    pub(crate) mat: MatRef<'a, E>,
    pub(crate) order: &'a [u32],
}

impl<E> RowSource<E> for Gathered<'_, E> {
    fn rows(&self) -> usize {
        self.order.len()
    }
    fn cols(&self) -> usize {
        self.mat.cols()
    }
    #[inline(always)]
    fn row(&self, t: usize) -> &[E] {
        self.mat.row_unchecked(self.order[t] as usize)
    }
}

/// A source of 16-bit elements seen as their bits (bf16 rows for the pair kernels).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Bits<S, E>(pub(crate) S, pub(crate) std::marker::PhantomData<E>);

impl<E: bytemuck::Pod, S: RowSource<E>> RowSource<u16> for Bits<S, E> {
    fn rows(&self) -> usize {
        self.0.rows()
    }
    fn cols(&self) -> usize {
        self.0.cols()
    }
    #[inline(always)]
    fn row(&self, t: usize) -> &[u16] {
        bytemuck::cast_slice(self.0.row(t))
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

/// Packs `src` into k-pairs of the 16 bits `bits` gives each element (see [`pack_pairs`]).
#[inline(always)]
fn pack_pairs_with<'o, E: Copy>(src: impl RowSource<E>, out: &'o mut [u32], bits: impl Fn(E) -> u32) -> Left<'o, u32> {
    let (rows, n) = (src.rows(), src.cols());
    let k_len = n.div_ceil(2);
    let out = &mut out[..Left::<u32>::len_for(rows, k_len)];
    let lanes = pack_tiles(rows, k_len, out, |t, p0, dst| {
        let row = &src.row(t)[2 * p0..n.min(2 * (p0 + dst.len()))];
        let (pairs, rest) = row.as_chunks::<2>();
        for (d, &[lo, hi]) in dst.iter_mut().zip(pairs) {
            *d = bits(lo) | (bits(hi) << 16);
        }
        if let [last] = rest {
            dst[pairs.len()] = bits(*last);
        }
    });
    Left { data: out, rows, k_len, lanes }
}

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
    if super::isa::has_avx512() {
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
#[inline(always)]
fn split_left_parts(v: f32) -> [u32; 3] {
    let (hi, lo) = split_bits(v);
    [hi, cross(hi), lo]
}

/// Packs f32 rows (merge's `diag(lambda_b)·B·diag(lambda_d)`) split into three bf16 parts as
/// k-pairs in AMX tiles, each 16-pair step of k as `[hi][mid][lo]` (see [`split3_bits`]), for
/// weights packed as [`tripled_bits`]. Pairs past the row's end are zero, and so is the padding
/// [`RowPairs`] zeroes.
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
    if super::isa::has_avx512() {
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
    if super::isa::has_avx512() {
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
fn bf16_weight_bits<T: Element>(v: T) -> u32 {
    v.to_f32().to_bits() >> 16
}

/// Projection weights in one layout.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum WeightPanels<T> {
    /// [`Layout::Wide`]: A `[r, n_max]` as `r`-column panels over k = n, or B `[m_max, r]` as
    /// `m`-column panels over k = r.
    Wide(Panels<T>),
    /// [`Layout::Pairs`] and [`Layout::Tiles`]: bf16 weights as panels over k-pairs, each u32 =
    /// (W[j][2p], W[j][2p + 1]); [`Layout::Split`]: their split parts (see [`split_step`]).
    Pairs(Panels<u32>),
}

impl<T> WeightPanels<T> {
    fn bytes(&self) -> usize {
        match self {
            WeightPanels::Wide(p) => p.num_panels() * p.k_cap() * NR * std::mem::size_of::<T>(),
            WeightPanels::Pairs(p) => p.num_panels() * p.k_cap() * NR * 4,
        }
    }

    /// The [`Layout::Wide`] panels (drivers ask for the layout they packed).
    pub(crate) fn wide(&self) -> &Panels<T> {
        match self {
            WeightPanels::Wide(p) => p,
            WeightPanels::Pairs(_) => unreachable!("weights are packed in the layout of the kernels that read them"),
        }
    }

    /// The [`Layout::Pairs`] panels (drivers ask for the layout they packed).
    pub(crate) fn pairs(&self) -> &Panels<u32> {
        match self {
            WeightPanels::Pairs(p) => p,
            WeightPanels::Wide(_) => unreachable!("weights are packed in the layout of the kernels that read them"),
        }
    }
}

/// The shared projections packed in one layout: built once per model and layout, used by every
/// layer and thread.
#[derive(Clone, Debug, PartialEq)]
pub struct PackedProjections<T> {
    /// A `[r, n_max]` as `r`-column panels over k = n.
    pub(crate) down: WeightPanels<T>,
    /// B `[m_max, r]` as `m_max`-column panels over k = r.
    pub(crate) up: WeightPanels<T>,
}

impl<T> PackedProjections<T> {
    /// Bytes the packed weights take.
    pub(crate) fn bytes(&self) -> usize {
        self.down.bytes() + self.up.bytes()
    }
}

/// Packs A `[r, n]` and B `[m, r]` in `layout`.
pub(crate) fn pack_projections<T: Element>(a: MatRef<'_, T>, b: MatRef<'_, T>, layout: Layout) -> PackedProjections<T> {
    let pack = |w: MatRef<'_, T>| {
        let k = w.cols();
        let bits = |j: usize, c: usize| if c < k { bf16_weight_bits(w.row_unchecked(j)[c]) } else { 0 };
        match layout {
            Layout::Pairs | Layout::Tiles => WeightPanels::Pairs(Panels::from_fn(w.rows(), k.div_ceil(2), |j, p| {
                bits(j, 2 * p) | (bits(j, 2 * p + 1) << 16)
            })),
            Layout::Split => WeightPanels::Pairs(split_panels(w.rows(), k, |j, c| {
                split_weight_parts(w.row_unchecked(j)[c].to_f32())
            })),
            Layout::Wide => WeightPanels::Wide(Panels::from_fn(w.rows(), k, |j, c| w.row_unchecked(j)[c])),
        }
    };
    PackedProjections { down: pack(a), up: pack(b) }
}

/// Pairs per row of a `k`-element operand in [`Layout::Split`]: each step of 16 pairs three times.
pub(crate) fn split_pairs(k: usize) -> usize {
    3 * k.div_ceil(2).div_ceil(RowPairs::STEP) * RowPairs::STEP
}

/// Where pair `q` of a [`Layout::Split`] row comes from: pair `p` of the operand, and which copy of
/// its step (0, 1, 2), so that steps go `[copy 0][copy 1][copy 2]` for each 16 pairs of k.
#[inline(always)]
fn split_step(q: usize) -> (usize, usize) {
    let (step, within) = (q / RowPairs::STEP, q % RowPairs::STEP);
    (step / 3 * RowPairs::STEP + within, step % 3)
}

/// `hi` for the copy of a high part that meets the other operand's low parts, where a non-finite
/// `hi` is written as 0: `hi·lo` would make `∞·0 = NaN` from an infinity times a value that bf16
/// holds exactly (its `lo` is 0), where `v·w` is infinite; `hi·hi` carries the infinity (or NaN).
#[inline(always)]
fn cross(hi: u32) -> u32 {
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
#[inline(always)]
fn split_weight_parts(v: f32) -> [u32; 3] {
    let (hi, lo) = split_bits(v);
    [hi, lo, cross(hi)]
}

/// A bf16 weight (bits) as its step copies for the merge's split left operand (`[hi][mid][lo]`,
/// [`pack_row_split3`]): `[w][w, finite or 0][w, finite or 0]`, so that a non-finite weight meets
/// only `hi` and an infinity times a `c` that bf16 holds exactly stays an infinity (see `cross`).
#[inline(always)]
pub(crate) fn tripled_bits(w: u32) -> [u32; 3] {
    [w, cross(w), cross(w)]
}

/// The projections transposed, for the backward's products: Aᵀ as `n_max`-column panels over
/// k = r (`dx = (g ⊙ lambda_d)·A`), and Bᵀ as `r`-column panels over k = m_max
/// (`g = (dy ⊙ lambda_b)·B`).
#[derive(Clone, Debug, PartialEq)]
pub struct TransposedProjections<T> {
    pub(crate) a_t: Panels<T>,
    pub(crate) b_t: Panels<T>,
    /// The same as bf16 k-pair panels (AMX tiles), made on first use: Aᵀ over pairs of r, Bᵀ over
    /// pairs of m_max.
    pairs: OnceLock<(Panels<u32>, Panels<u32>)>,
    /// Aᵀ's bf16 pairs with each step three times ([`tripled_bits`]), for the merge on split tiles,
    /// made on first use.
    tripled_a: OnceLock<Panels<u32>>,
    /// Aᵀ and Bᵀ as [`Layout::Split`] weights, for the f16 backward on split tiles, made on first
    /// use.
    split: OnceLock<(Panels<u32>, Panels<u32>)>,
}

impl<T: Element> TransposedProjections<T> {
    /// Packs Aᵀ and Bᵀ of A `[r, n]` and B `[m, r]`.
    pub(crate) fn pack(a: MatRef<'_, T>, b: MatRef<'_, T>) -> Self {
        let a_t = Panels::from_fn(a.cols(), a.rows(), |col, j| a.row_unchecked(j)[col]);
        let b_t = Panels::from_fn(b.cols(), b.rows(), |col, i| b.row_unchecked(i)[col]);
        Self { a_t, b_t, pairs: OnceLock::new(), tripled_a: OnceLock::new(), split: OnceLock::new() }
    }

    /// Aᵀ as [`split_panels`] of [`tripled_bits`] (bf16 only), for the merge's split left operand,
    /// packed now if needed.
    pub(crate) fn tripled_a(&self) -> &Panels<u32> {
        self.tripled_a.get_or_init(|| {
            let a_t = &self.a_t;
            split_panels(a_t.cols(), a_t.k_cap(), |c, kk| tripled_bits(bf16_weight_bits(a_t.at(c, kk))))
        })
    }

    /// Aᵀ and Bᵀ as k-pair panels, for [`Layout::Tiles`] (bf16 only: an element's bits are the top
    /// half of its f32 value), packed now if needed.
    pub(crate) fn pairs(&self) -> (&Panels<u32>, &Panels<u32>) {
        let (a, b) = self.pairs.get_or_init(|| {
            let pairs = |w: &Panels<T>| {
                let k = w.k_cap();
                let bits = |c: usize, kk: usize| if kk < k { bf16_weight_bits(w.at(c, kk)) } else { 0 };
                Panels::from_fn(w.cols(), k.div_ceil(2), |c, p| bits(c, 2 * p) | (bits(c, 2 * p + 1) << 16))
            };
            (pairs(&self.a_t), pairs(&self.b_t))
        });
        (a, b)
    }

    /// Aᵀ and Bᵀ as [`Layout::Split`] weights (each value split into bf16 parts, [`split_panels`]
    /// of `split_weight_parts`), packed now if needed.
    pub(crate) fn split(&self) -> (&Panels<u32>, &Panels<u32>) {
        let (a, b) = self.split.get_or_init(|| {
            let split =
                |w: &Panels<T>| split_panels(w.cols(), w.k_cap(), |c, kk| split_weight_parts(w.at(c, kk).to_f32()));
            (split(&self.a_t), split(&self.b_t))
        });
        (a, b)
    }

    fn bytes(&self) -> usize {
        let words = |p: &Panels<u32>| p.num_panels() * p.k_cap() * NR;
        let wide = (self.a_t.num_panels() * self.a_t.k_cap() + self.b_t.num_panels() * self.b_t.k_cap()) * NR;
        let pairs = self.pairs.get().map_or(0, |(a, b)| words(a) + words(b));
        let tripled = self.tripled_a.get().map_or(0, words);
        let split = self.split.get().map_or(0, |(a, b)| words(a) + words(b));
        wide * size_of::<T>() + (pairs + tripled + split) * 4
    }
}

/// A model's packed projections, one slot per layout, each packed on first use (a process may run
/// kernels of several tiers, see `kernels::with_isa`), and their transposes for the backward.
#[derive(Clone, Debug, Default)]
pub struct PackCache<T> {
    slots: [OnceLock<PackedProjections<T>>; Layout::ALL.len()],
    transposed: OnceLock<TransposedProjections<T>>,
}

impl<T: Element> PackCache<T> {
    /// The projections A `[r, n_max]` and B `[m_max, r]` packed in `layout`, packed now if needed.
    pub(crate) fn get(&self, layout: Layout, a: MatRef<'_, T>, b: MatRef<'_, T>) -> &PackedProjections<T> {
        self.slots[layout.index()].get_or_init(|| pack_projections(a, b, layout))
    }

    /// The transposes of A `[r, n_max]` and B `[m_max, r]`, packed now if needed.
    pub(crate) fn transposed(&self, a: MatRef<'_, T>, b: MatRef<'_, T>) -> &TransposedProjections<T> {
        self.transposed.get_or_init(|| TransposedProjections::pack(a, b))
    }

    /// Bytes of every layout packed so far.
    pub(crate) fn bytes(&self) -> usize {
        let packed: usize = self.slots.iter().filter_map(OnceLock::get).map(PackedProjections::bytes).sum();
        packed + self.transposed.get().map_or(0, TransposedProjections::bytes)
    }
}

#[cfg(test)]
mod layout_tests {
    use super::*;

    #[test]
    fn panels_start_on_a_line_and_clones_are_realigned_and_equal() {
        // Several sizes, so that the allocator hands out differently aligned vectors.
        for (cols, k_cap) in [(1, 1), (33, 7), (64, 129), (5, 1000)] {
            let p = Panels::from_fn(cols, k_cap, |c, k| (c * 1000 + k) as u32);
            let copies: Vec<Panels<u32>> = (0..8).map(|_| p.clone()).collect();
            for q in std::iter::once(&p).chain(&copies) {
                assert_eq!(q.panel(0).as_ptr() as usize % ALIGN, 0, "{cols} x {k_cap}");
                assert!(*q == p);
                for c in 0..cols {
                    assert_eq!(q.panel(c / NR)[(k_cap - 1) * NR + c % NR], (c * 1000 + k_cap - 1) as u32);
                }
            }
            let other = Panels::from_fn(cols, k_cap, |c, k| (c * 1000 + k) as u32 + u32::from(c + k == 0));
            assert!(other != p, "a changed element must make the panels differ");
        }
    }

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

#[cfg(test)]
mod bf16_tests {
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
