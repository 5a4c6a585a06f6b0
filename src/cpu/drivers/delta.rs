//! Merge, unmerge and ΔW: `W = update(W, ΔW)` with `ΔW = diag(lambda_b)·B·diag(lambda_d)·A`
//! formed tile by tile in f32 and rounded once into W's dtype; no `m x n` temporary.

use rayon::prelude::*;

use super::{Scales, Weights};
use crate::cpu::kernels::{Kernels, Layout};
use crate::cpu::pack::{
    pack_row_split, pack_row_split3, pack_rows, split_pairs, Left, Panels, RowPairs, TransposedProjections, NR,
};
use crate::cpu::parallel::with_scratch;
use crate::cpu::sink::{Sink, Update};
use crate::dtype::Element;
use crate::mat::{MatMut, MatRef};

/// Rows of `W` per task.
const W_BLOCK: usize = 32;

/// Rows of `W` per task on tiles: each task streams all of Aᵀ (split: 3x its bf16 bytes) past its
/// rows once, which for 32 rows took longer than their products (bf16; f16's split Aᵀ is the same
/// size).
const W_BLOCK_TILES: usize = 256;

/// How `c = diag(lambda_b)·B·diag(lambda_d)` is split for the tile kernels.
#[derive(Clone, Copy)]
enum Split {
    /// `[hi][mid][lo]` against A's bf16 values each step three times (bf16 weights).
    Three,
    /// `[hi][hi'][lo]` against A's f16 values split into `[hi][lo][hi']` (f16 weights, as the f16
    /// forward's products).
    Two,
}

/// `w = update(w, ΔW)` for a whole layer, in blocks of rows (shapes already validated), with the
/// model's transposed projections (`transposed`, Aᵀ over the model's `n_max` columns, of which
/// the layer reads the first n).
pub(crate) fn apply_delta<T: Element>(
    kern: &Kernels<T>,
    wt: Weights<'_, T>,
    transposed: &TransposedProjections<T>,
    s: Scales<'_>,
    mut w: MatMut<'_, T>,
    op: Update,
) {
    let (a, b) = (wt.a, wt.b);
    let (m, n, r) = (b.rows(), a.cols(), a.rows());
    if m == 0 || n == 0 {
        return;
    }
    let (ld, lb) = (s.lambda_d, s.lambda_b);
    // bf16 on tiles: c = diag(lb)·B·diag(ld) in f32, split into three bf16 parts, against A's bf16
    // values (exact): each tile product term exact, c to within 2^-24. f16 on split tiles: c split
    // into two parts (to 16 bits) against A's f16 values split exactly into two, as the f16
    // forward's products. Else f32 FMAs against Aᵀ.
    let tiles: Option<(_, &Panels<u32>, Split)> = match (kern.facts.layout, kern.gemm_tiles) {
        (Layout::Tiles, Some(gemm_tiles)) => Some((gemm_tiles, transposed.tripled_a(), Split::Three)),
        (Layout::Split, Some(gemm_tiles)) => Some((gemm_tiles, transposed.split().0, Split::Two)),
        _ => None,
    };
    let block = if tiles.is_some() { W_BLOCK_TILES } else { W_BLOCK };
    let wp = w.as_ptr_mat();
    (0..m.div_ceil(block)).into_par_iter().for_each(|blk| {
        let i0 = blk * block;
        let ib = block.min(m - i0);
        let packed = if tiles.is_some() { RowPairs::len_for(ib, split_pairs(r)) } else { Left::<f32>::len_for(ib, r) };
        with_scratch(ib * r + packed, |buf| {
            let (c, cl) = buf.split_at_mut(ib * r);
            // c[i, j] = lambda_b[i] · B[i, j] · lambda_d[j]: this block's rows of diag(lb)·B·diag(ld).
            for (i, crow) in c.chunks_mut(r).enumerate() {
                let brow = b.row_unchecked(i0 + i);
                for ((cv, bv), dv) in crow.iter_mut().zip(brow).zip(ld) {
                    *cv = lb[i0 + i] * bv.to_f32() * dv;
                }
            }
            let c = MatRef::from_slice(c, ib, r).expect("scratch sized ib * r");
            let sink = Sink::Update { out: wp.sub(i0, ib, 0, n), op };
            let panels = 0..n.div_ceil(NR);
            match tiles {
                Some((gemm_tiles, at, split)) => {
                    let out = bytemuck::cast_slice_mut(cl);
                    let left = match split {
                        Split::Three => pack_row_split3(c, out),
                        Split::Two => pack_row_split(c, out),
                    };
                    // SAFETY: the tile kernels are available (the table has them); the left operand
                    // is whole split steps (2·k_len elements, no tail) and the panels hold
                    // split_pairs(r) = k_len pair rows; rows i0..i0+ib of w belong to this task only.
                    unsafe { gemm_tiles(left, 2 * left.k_len, at, panels, &sink) };
                }
                None => {
                    let left = pack_rows(c, cl);
                    // SAFETY: k_len = r = k_cap of Aᵀ's panels (output columns of W are A's
                    // columns); rows i0..i0+ib of w belong to this task only.
                    unsafe { (kern.gemm)(left, &transposed.a_t, panels, &sink) };
                }
            }
        });
    });
}
