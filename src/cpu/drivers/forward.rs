//! The fused forward pass: per block of rows, `u = lambda_d ⊙ (x·Aᵀ)` into the block's scratch,
//! then at once `y (+)= lambda_b ⊙ (u·Bᵀ) + bias` while `u` is in cache. The two products are also
//! the building blocks of the unfused benchmark peer (`baseline`).

use super::{row_epilogues, RowScales, Weights};
use crate::cpu::kernels::{Kernels, Layout};
use std::marker::PhantomData;

use crate::cpu::pack::{
    pack_pairs, pack_pairs_rounded, pack_projections, pack_row_pairs, pack_row_pairs_rounded, pack_row_split,
    pack_rows, split_pairs, Bits, Gathered, Left, PackedProjections, RowPairs, RowSource, WeightPanels, NR,
};
use crate::cpu::parallel::{for_blocks, for_panels, with_scratch, Work};
use crate::cpu::sink::{Epilogue, RowEpilogues, Sink};
use crate::dtype::Element;
use crate::mat::{MatMut, MatPtr, MatRef};
use crate::types::Mode;

pub(crate) use crate::cpu::kernels::BLOCK_ROWS;

/// A call's packed projections and the layout its products read them in (`Pairs` and `Tiles`
/// share one packing).
pub(crate) struct Packed<'p, T> {
    pub layout: Layout,
    pub proj: &'p PackedProjections<T>,
}

impl<T> Clone for Packed<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for Packed<'_, T> {}

/// Scratch (f32 elements) [`down`] needs to pack `rows x n` activations for `packed`'s layout.
pub(crate) fn down_scratch<T>(packed: Packed<'_, T>, rows: usize, n: usize) -> usize {
    left_scratch(packed.layout, rows, n)
}

/// Scratch (f32 elements) [`up`] needs to pack `rows x r` of `u` for `packed`'s layout.
pub(crate) fn up_scratch<T>(packed: Packed<'_, T>, rows: usize, r: usize) -> usize {
    left_scratch(packed.layout, rows, r)
}

/// Scratch (f32 elements) a `rows x k` left operand takes packed in `layout` (k-pairs, as u32,
/// take no more room than f32 elements; pairs packed in tiles are padded, and split ones written
/// three times).
fn left_scratch(layout: Layout, rows: usize, k: usize) -> usize {
    match layout {
        Layout::Wide => Left::<f32>::len_for(rows, k),
        Layout::Pairs => Left::<u32>::len_for(rows, k.div_ceil(2)).max(Left::<f32>::len_for(rows, k)),
        Layout::Tiles => RowPairs::len_for(rows, k.div_ceil(2)),
        Layout::Split => RowPairs::len_for(rows, split_pairs(k)),
    }
}

/// The model's packed projections, or a copy packed for this call into `owned`, in `w`'s layout.
pub(crate) fn packed_or_owned<'p, T: Element>(
    w: &Weights<'p, T>,
    owned: &'p mut Option<PackedProjections<T>>,
) -> Packed<'p, T> {
    let proj = match w.packed {
        Some(p) => p,
        None => owned.insert(pack_projections(w.a, w.b, w.layout)),
    };
    Packed { layout: w.layout, proj }
}

/// How a product's left operand is packed into 16-bit pairs: bf16 bits as they are (`x`), or f32
/// rounded to bf16 (`u`, as PEFT rounds it), into `Left` tiles or into AMX tiles (`RowPairs`).
trait PackPairs<S> {
    fn tiles<'o>(&self, src: S, out: &'o mut [u32]) -> Left<'o, u32>;
    fn rows<'o>(&self, src: S, out: &'o mut [u32]) -> RowPairs<'o>;
}

/// 16-bit elements (bf16: pair kernels only exist for it) by their bits.
struct AsBits<T>(PhantomData<T>);

impl<T: Element, S: RowSource<T>> PackPairs<S> for AsBits<T> {
    fn tiles<'o>(&self, src: S, out: &'o mut [u32]) -> Left<'o, u32> {
        pack_pairs(Bits(src, PhantomData), out)
    }
    fn rows<'o>(&self, src: S, out: &'o mut [u32]) -> RowPairs<'o> {
        pack_row_pairs(Bits(src, PhantomData), out)
    }
}

/// f32 rounded to bf16.
struct Rounded;

impl<'a> PackPairs<MatRef<'a, f32>> for Rounded {
    fn tiles<'o>(&self, src: MatRef<'a, f32>, out: &'o mut [u32]) -> Left<'o, u32> {
        pack_pairs_rounded(src, out)
    }
    fn rows<'o>(&self, src: MatRef<'a, f32>, out: &'o mut [u32]) -> RowPairs<'o> {
        pack_row_pairs_rounded(src, out)
    }
}

/// `sink[t, j] <- Σ_k x[t, k]·A[j, k]` for the rows of `x` (the down-projection), packing `x`
/// into `scratch` first, in the layout of the kernels.
pub(crate) fn down<T: Element>(
    kern: &Kernels<T>,
    packed: Packed<'_, T>,
    x: impl RowSource<T>,
    scratch: &mut [f32],
    r: usize,
    sink: &Sink<'_, T>,
    split: bool,
) {
    product(kern, (packed.layout, &packed.proj.down), x, (scratch, AsBits(PhantomData)), r, sink, split);
}

/// `y (op)= epilogue(u·Bᵀ)` for the rows of `u` (the up-projection), packing `u` into `scratch`
/// first: as f32 rows, or for pair kernels rounded to bf16 k-pairs (as PEFT rounds `u` to the
/// activation dtype).
pub(crate) fn up<T: Element>(
    kern: &Kernels<T>,
    packed: Packed<'_, T>,
    u: MatRef<'_, f32>,
    scratch: &mut [f32],
    m: usize,
    sink: &Sink<'_, T>,
    split: bool,
) {
    product(kern, (packed.layout, &packed.proj.up), u, (scratch, Rounded), m, sink, split);
}

/// `sink <- left · weightsᵀ` over the first `cols` columns, with `left` packed into the scratch in
/// the weights' layout: widened to f32 rows, or by `pairs` into k-pairs for the pair kernels, or
/// into AMX tiles of pairs (bf16, or split into parts) for the tile kernels.
fn product<T: Element, E: Element, S: RowSource<E>>(
    kern: &Kernels<T>,
    (layout, weights): (Layout, &WeightPanels<T>),
    left: S,
    (scratch, pairs): (&mut [f32], impl PackPairs<S>),
    cols: usize,
    sink: &Sink<'_, T>,
    split: bool,
) {
    let panels = cols.div_ceil(NR);
    let k = left.cols();
    match (layout, kern.gemm_pairs, kern.gemm_tiles) {
        (Layout::Tiles, _, Some(gemm_tiles)) => {
            let p = weights.pairs();
            let left = pairs.rows(left, bytemuck::cast_slice_mut(scratch));
            // SAFETY: the panels hold ceil(k_max / 2) >= ceil(k / 2) pair rows; the caller owns
            // the sink's rows, and for_panels hands out disjoint panel ranges.
            for_panels(panels, split, |range| unsafe { gemm_tiles(left, k, p, range, sink) });
        }
        (Layout::Split, _, Some(gemm_tiles)) => {
            let p = weights.pairs();
            let left = pack_row_split(left, bytemuck::cast_slice_mut(scratch));
            // The split operands are whole tile steps of pairs: 2·k_len elements, no tail.
            let k = 2 * left.k_len;
            // SAFETY: the panels hold split_pairs(k_max) >= split_pairs(k) = left.k_len pair rows;
            // as above.
            for_panels(panels, split, |range| unsafe { gemm_tiles(left, k, p, range, sink) });
        }
        (Layout::Pairs, Some(gemm_pairs), _) => {
            let p = weights.pairs();
            let left = pairs.tiles(left, bytemuck::cast_slice_mut(scratch));
            // SAFETY: as above.
            for_panels(panels, split, |range| unsafe { gemm_pairs(left, k, p, range, sink) });
        }
        _ => {
            let p = weights.wide();
            let left = pack_rows(left, scratch);
            // SAFETY: as above, with k_len = k <= k_cap.
            for_panels(panels, split, |range| unsafe { (kern.gemm)(left, p, range, sink) });
        }
    }
}

/// The fused forward pass `y (+)= lambda_b ⊙ ((lambda_d ⊙ (x·Aᵀ))·Bᵀ) + bias`, with one adapter for
/// every row or (a bank's mixed forward) each row's own.
///
/// Scratch: each block of rows (at most the tier's `block_rows`) holds
/// its `u` (`rows · r` f32), `u` packed for the up-projection (`rows · r`) and `x` packed for the
/// down-projection (`rows · n`).
pub(crate) fn forward<T: Element>(
    kern: &Kernels<T>,
    w: Weights<'_, T>,
    s: RowScales<'_>,
    x: MatRef<'_, T>,
    y: MatMut<'_, T>,
    mode: Mode,
) {
    fused(kern, w, s, x, y, mode, None);
}

/// The training forward: [`forward`], also writing `h = x·Aᵀ` (`[T, r]` f32) into `h` for the
/// backward to reuse. `y` gets the same bits as from [`forward`]: `u = lambda_d ⊙ h` is the same
/// product, made from the stored `h` instead of in the down-projection's store.
pub(crate) fn forward_train<T: Element>(
    kern: &Kernels<T>,
    w: Weights<'_, T>,
    s: RowScales<'_>,
    x: MatRef<'_, T>,
    y: MatMut<'_, T>,
    mode: Mode,
    mut h: MatMut<'_, f32>,
) {
    fused(kern, w, s, x, y, mode, Some(h.as_ptr_mat()));
}

/// [`forward`], and with `h` [`forward_train`].
fn fused<T: Element>(
    kern: &Kernels<T>,
    w: Weights<'_, T>,
    s: RowScales<'_>,
    x: MatRef<'_, T>,
    mut y: MatMut<'_, T>,
    mode: Mode,
    h: Option<MatPtr<f32>>,
) {
    let (rows, n, r, m) = (x.rows(), x.cols(), w.a.rows(), w.b.rows());
    // Without outputs there is nothing to do, unless h is asked for.
    if rows == 0 || (m == 0 && h.is_none()) {
        return;
    }
    let mut owned = None;
    let packed = packed_or_owned(&w, &mut owned);
    let accumulate = mode == Mode::Accumulate;
    // A bank's rows run sorted by adapter: a block then holds few adapters, whose vectors stay in
    // cache for its stores (with row t using adapter t % 64, every block of a 512-row batch read all
    // 64 adapters' vectors: 0.89x of one adapter's time, against 0.98x sorted; one thread,
    // 512x4096x4096, r = 256, f32). Rows without an adapter are left out, unless h is asked for;
    // under overwrite they are zeroed here.
    let order = match s {
        RowScales::One(_) => None,
        RowScales::Bank(b) => {
            let order = adapter_order(b.rows, b.has_bias.len(), h.is_some());
            if !accumulate && order.len() < rows {
                for (t, _) in b.rows.iter().enumerate().filter(|(_, &k)| k < 0) {
                    y.row_mut(t).expect("row map validated against y").fill(T::from_f32(0.0));
                }
            }
            Some(order)
        }
    };
    let run = order.as_ref().map_or(rows, Vec::len);
    let yp = y.as_ptr_mat();
    let work = Work::new(2.0 * (run * r * (n + m)) as f64, r * (n + m) * size_of::<T>());
    // Blocks of the tier's size, shrunk (not below BLOCK_ROWS) to spread the rows evenly over the
    // threads. A row's result does not depend on the block it falls in.
    let even = run.div_ceil(rayon::current_num_threads()).next_multiple_of(32);
    let block = kern.facts().block_rows.min(even).max(BLOCK_ROWS);
    for_blocks(run, block, work, |t0, tb, split| {
        let packed_u = up_scratch(packed, tb, r);
        with_scratch(tb * r + packed_u + down_scratch(packed, tb, n), |buf| {
            let (u, rest) = buf.split_at_mut(tb * r);
            let (ul, xl) = rest.split_at_mut(packed_u);
            let mut um = MatMut::from_slice(u, tb, r).expect("scratch sized tb * r");
            let block_order = order.as_deref().map(|o| &o[t0..t0 + tb]);
            match (s, h) {
                // u = lambda_d ⊙ (x·Aᵀ), scaled as it is stored into this block's scratch ...
                (RowScales::One(s), None) => {
                    let sink = Sink::F32 { out: um.as_ptr_mat(), scale: Some(s.lambda_d) };
                    down(kern, packed, x.row_range(t0, tb), xl, r, &sink, split);
                }
                // ... or h = x·Aᵀ into the caller's h, then u = lambda_d ⊙ h: the same product as
                // the scaled store's (`scale[col] · acc`) ...
                (RowScales::One(s), Some(h)) => {
                    let hb = h.sub(t0, tb, 0, r);
                    down(kern, packed, x.row_range(t0, tb), xl, r, &Sink::F32 { out: hb, scale: None }, split);
                    for (t, urow) in u.chunks_mut(r).enumerate() {
                        // SAFETY: rows t0..t0 + tb of the caller's h are this block's, written
                        // just above, and h is not this scratch.
                        let hrow = unsafe { hb.row_mut(t) };
                        for ((uv, hv), d) in urow.iter_mut().zip(hrow.iter()).zip(s.lambda_d) {
                            *uv = d * hv;
                        }
                    }
                }
                // ... or, for a bank, h = x·Aᵀ of the block's rows (gathered in adapter order) into
                // u, copied to the caller's h when asked for, then scaled by each row's lambda_d.
                (RowScales::Bank(b), h) => {
                    let order = block_order.expect("a bank's call has a row order");
                    let sink = Sink::F32 { out: um.as_ptr_mat(), scale: None };
                    down(kern, packed, Gathered { mat: x, order }, xl, r, &sink, split);
                    for (urow, &row) in u.chunks_mut(r).zip(order) {
                        let row = row as usize;
                        if let Some(h) = h {
                            // SAFETY: each row of the call is in one block only, so row `row` of h
                            // is this block's.
                            unsafe { h.row_mut(row) }.copy_from_slice(urow);
                        }
                        match b.row(row) {
                            Some(s) => {
                                for (uv, d) in urow.iter_mut().zip(s.lambda_d) {
                                    *uv *= d;
                                }
                            }
                            // A row without an adapter: its u is never read (its epilogue skips it).
                            None => urow.fill(0.0),
                        }
                    }
                }
            }
            // ... then up-projected at once, while it is in cache.
            if m > 0 {
                let u = MatRef::from_slice(u, tb, r).expect("scratch sized tb * r");
                let resolved;
                let sink = match s {
                    RowScales::One(s) => Sink::Epilogue {
                        out: yp.sub(t0, tb, 0, m),
                        epi: Epilogue { scale: Some(s.lambda_b), bias: s.bias, accumulate },
                    },
                    RowScales::Bank(b) => {
                        resolved = row_epilogues(b, (t0, tb), order.as_deref(), true, accumulate);
                        let rows = RowEpilogues { rows: &resolved[..tb], dst: block_order, accumulate };
                        Sink::RowEpilogue { out: yp, rows }
                    }
                };
                up(kern, packed, u, ul, m, &sink, split);
            }
        });
    });
}

/// The rows of a bank's call sorted by adapter (stable: ascending within an adapter), as `u32`
/// row indices; the rows without an adapter last when `keep_none`, else left out.
fn adapter_order(rows: &[i32], adapters: usize, keep_none: bool) -> Vec<u32> {
    // Counting sort: bucket k for adapter k, bucket `adapters` for rows without one.
    let bucket = |id: i32| usize::try_from(id).unwrap_or(adapters);
    let mut start = vec![0usize; adapters + 2];
    for &id in rows {
        start[bucket(id) + 1] += 1;
    }
    for b in 1..start.len() {
        start[b] += start[b - 1];
    }
    let len = if keep_none { rows.len() } else { start[adapters] };
    let mut order = vec![0u32; rows.len()];
    for (t, &id) in rows.iter().enumerate() {
        let b = bucket(id);
        order[start[b]] = u32::try_from(t).expect("rows of a call fit u32");
        start[b] += 1;
    }
    order.truncate(len);
    order
}
