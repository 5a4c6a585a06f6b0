//! Merge, unmerge and ΔW: `W = update(W, ΔW)` with `ΔW = diag(lambda_b)·B·diag(lambda_d)·A`
//! formed tile by tile in f32 and rounded once into W's dtype; no `m x n` temporary.

use rayon::prelude::*;

use super::{Scales, Weights};
use crate::cpu::kernels::Kernels;
use crate::cpu::pack::{pack_rows, Left, Panels, NR};
use crate::cpu::parallel::with_scratch;
use crate::cpu::sink::{Sink, Update};
use crate::dtype::Element;
use crate::mat::{MatMut, MatRef};

/// Rows of `W` per task.
const W_BLOCK: usize = 32;

/// `w = update(w, ΔW)` for a whole layer, in blocks of rows (shapes already validated).
pub(crate) fn apply_delta<T: Element>(
    kern: &Kernels<T>,
    wt: Weights<'_, T>,
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
    // Aᵀ as n-column panels over k = r: output columns of W are A's columns.
    let at = Panels::from_fn(n, r, |col, j| a.row_unchecked(j)[col]);
    let wp = w.as_ptr_mat();
    (0..m.div_ceil(W_BLOCK)).into_par_iter().for_each(|blk| {
        let i0 = blk * W_BLOCK;
        let ib = W_BLOCK.min(m - i0);
        with_scratch(ib * r + Left::<f32>::len_for(ib, r), |buf| {
            let (c, cl) = buf.split_at_mut(ib * r);
            // c[i, j] = lambda_b[i] · B[i, j] · lambda_d[j]: this block's rows of diag(lb)·B·diag(ld).
            for (i, crow) in c.chunks_mut(r).enumerate() {
                let brow = b.row_unchecked(i0 + i);
                for ((cv, bv), dv) in crow.iter_mut().zip(brow).zip(ld) {
                    *cv = lb[i0 + i] * bv.to_f32() * dv;
                }
            }
            let left = pack_rows(MatRef::from_slice(c, ib, r).expect("scratch sized ib * r"), cl);
            let sink = Sink::Update { out: wp.sub(i0, ib, 0, n), op };
            // SAFETY: k_len = r = k_cap; rows i0..i0+ib of w belong to this task only.
            unsafe { (kern.gemm)(left, &at, 0..n.div_ceil(NR), &sink) };
        });
    });
}
