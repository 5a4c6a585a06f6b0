//! The fused forward pass: per block of rows, `u = lambda_d ⊙ (x·Aᵀ)` into the block's scratch,
//! then at once `y (+)= lambda_b ⊙ (u·Bᵀ) + bias` while `u` is in cache. The two products are also
//! the building blocks of the unfused benchmark peer (`baseline`).

use super::{row_epilogues, RowScales, Weights};
use crate::cpu::kernels::{Kernels, Layout};
use crate::cpu::pack::{
    pack_pairs, pack_pairs_rounded, pack_projections, pack_rows, Left, PackedProjections, WeightPanels, NR,
};
use crate::cpu::parallel::{for_blocks, for_panels, with_scratch};
use crate::cpu::sink::{Epilogue, RowEpilogues, Sink};
use crate::dtype::Element;
use crate::mat::{MatMut, MatPtr, MatRef};
use crate::types::Mode;

/// Rows of `x` per block: the unit of parallel work for large `T`. Scratch per thread is
/// `BLOCK_ROWS · (2r + n)` f32 at most (see [`forward`]).
pub(crate) const BLOCK_ROWS: usize = 64;

/// Scratch (f32 elements) [`down`] needs to pack `rows x n` activations.
pub(crate) fn down_scratch(rows: usize, n: usize) -> usize {
    // k-pairs (u32) take no more room than f32 elements.
    Left::<f32>::len_for(rows, n)
}

/// Scratch (f32 elements) [`up`] needs to pack `rows x r` of `u`.
pub(crate) fn up_scratch(rows: usize, r: usize) -> usize {
    // k-pairs (u32) take no more room than f32 elements.
    Left::<f32>::len_for(rows, r)
}

/// The model's packed projections, or a copy packed for this call into `owned`.
pub(crate) fn packed_or_owned<'p, T: Element>(
    kern: &Kernels<T>,
    w: &Weights<'p, T>,
    owned: &'p mut Option<PackedProjections<T>>,
) -> &'p PackedProjections<T> {
    match w.packed {
        Some(p) => p,
        None => owned.insert(pack_projections(w.a, w.b, kern.facts().layout)),
    }
}

/// `sink[t, j] <- Σ_k x[t, k]·A[j, k]` for the rows of `x` (the down-projection), packing `x`
/// into `scratch` first, in the layout of the kernels.
pub(crate) fn down<T: Element>(
    kern: &Kernels<T>,
    packed: &PackedProjections<T>,
    x: MatRef<'_, T>,
    scratch: &mut [f32],
    r: usize,
    sink: &Sink<'_, T>,
    split: bool,
) {
    product(kern, &packed.down, x, (scratch, pack_bits_as_pairs::<T>), r, sink, split);
}

/// Packs 16-bit elements (bf16: pair kernels only exist for it) by their bits into k-pairs.
fn pack_bits_as_pairs<'o, T: Element>(x: MatRef<'_, T>, out: &'o mut [u32]) -> Left<'o, u32> {
    let bits: &[u16] = bytemuck::cast_slice(x.as_slice());
    pack_pairs(MatRef::new(bits, x.rows(), x.cols(), x.row_stride()).expect("same extent as x"), out)
}

/// `y (op)= epilogue(u·Bᵀ)` for the rows of `u` (the up-projection), packing `u` into `scratch`
/// first: as f32 rows, or for pair kernels rounded to bf16 k-pairs (as PEFT rounds `u` to the
/// activation dtype).
pub(crate) fn up<T: Element>(
    kern: &Kernels<T>,
    packed: &PackedProjections<T>,
    u: MatRef<'_, f32>,
    scratch: &mut [f32],
    m: usize,
    sink: &Sink<'_, T>,
    split: bool,
) {
    product(kern, &packed.up, u, (scratch, pack_pairs_rounded), m, sink, split);
}

/// `sink <- left · weightsᵀ` over the first `cols` columns, with `left` packed into the scratch in
/// the kernels' layout: widened to f32 rows, or by `pairs` into k-pairs for the pair kernels.
fn product<T: Element, E: Element>(
    kern: &Kernels<T>,
    weights: &WeightPanels<T>,
    left: MatRef<'_, E>,
    (scratch, pairs): (&mut [f32], impl for<'o> FnOnce(MatRef<'_, E>, &'o mut [u32]) -> Left<'o, u32>),
    cols: usize,
    sink: &Sink<'_, T>,
    split: bool,
) {
    let panels = cols.div_ceil(NR);
    let k = left.cols();
    match (kern.facts().layout, kern.gemm_pairs) {
        (Layout::Pairs, Some(gemm_pairs)) => {
            let p = weights.pairs();
            let left = pairs(left, bytemuck::cast_slice_mut(scratch));
            // SAFETY: the panels hold ceil(k_max / 2) >= ceil(k / 2) pair rows; the caller owns
            // the sink's rows, and for_panels hands out disjoint panel ranges.
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
/// Scratch: each block of [`BLOCK_ROWS`] rows holds its `u` (`rows · r` f32), `u` packed for the
/// up-projection (`rows · r`) and `x` packed for the down-projection (`rows · n`).
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
    let packed = packed_or_owned(kern, &w, &mut owned);
    let accumulate = mode == Mode::Accumulate;
    let yp = y.as_ptr_mat();
    let flops = 2.0 * (rows * r * (n + m)) as f64;
    for_blocks(rows, BLOCK_ROWS, flops, |t0, tb, split| {
        let packed_u = up_scratch(tb, r);
        with_scratch(tb * r + packed_u + down_scratch(tb, n), |buf| {
            let (u, rest) = buf.split_at_mut(tb * r);
            let (ul, xl) = rest.split_at_mut(packed_u);
            let xb = x.row_range(t0, tb);
            let mut um = MatMut::from_slice(u, tb, r).expect("scratch sized tb * r");
            match (s, h) {
                // u = lambda_d ⊙ (x·Aᵀ), scaled as it is stored into this block's scratch ...
                (RowScales::One(s), None) => {
                    down(kern, packed, xb, xl, r, &Sink::F32 { out: um.as_ptr_mat(), scale: Some(s.lambda_d) }, split);
                }
                // ... or h = x·Aᵀ (into the caller's h, or into u), then u = lambda_d ⊙ h with each
                // row's own lambda_d: the same product as the scaled store's (`scale[col] · acc`).
                (s, h) => {
                    let hb = h.map_or(um.as_ptr_mat(), |h| h.sub(t0, tb, 0, r));
                    down(kern, packed, xb, xl, r, &Sink::F32 { out: hb, scale: None }, split);
                    for (t, urow) in u.chunks_mut(r).enumerate() {
                        let Some(s) = s.row(t0 + t) else {
                            // A row without an adapter: its u is never read (its epilogue skips it).
                            urow.fill(0.0);
                            continue;
                        };
                        if h.is_some() {
                            // SAFETY: rows t0..t0 + tb of the caller's h are this block's, written
                            // just above, and h is not this scratch.
                            let hrow = unsafe { hb.row_mut(t) };
                            for ((uv, hv), d) in urow.iter_mut().zip(hrow.iter()).zip(s.lambda_d) {
                                *uv = d * hv;
                            }
                        } else {
                            for (uv, d) in urow.iter_mut().zip(s.lambda_d) {
                                *uv *= d;
                            }
                        }
                    }
                }
            }
            // ... then up-projected at once, while it is in cache.
            if m > 0 {
                let u = MatRef::from_slice(u, tb, r).expect("scratch sized tb * r");
                let out = yp.sub(t0, tb, 0, m);
                let resolved;
                let sink = match s {
                    RowScales::One(s) => {
                        Sink::Epilogue { out, epi: Epilogue { scale: Some(s.lambda_b), bias: s.bias, accumulate } }
                    }
                    RowScales::Bank(b) => {
                        resolved = row_epilogues(b, t0, tb, true, accumulate);
                        Sink::RowEpilogue { out, rows: RowEpilogues { rows: &resolved[..tb], accumulate } }
                    }
                };
                up(kern, packed, u, ul, m, &sink, split);
            }
        });
    });
}
