//! The fused backward pass. With `h = x·Aᵀ`, `u = lambda_d ⊙ h`, `v = u·Bᵀ` and `dy = dL/dy`:
//!
//! ```text
//! dlambda_b = Σ_t dy ⊙ v      g = (dy ⊙ lambda_b)·B      dlambda_d = Σ_t g ⊙ h
//! dbias     = Σ_t dy          dx (+)= (g ⊙ lambda_d)·A
//! ```
//!
//! Per block of [`BLOCK_ROWS`] rows: `h` (recomputed, or the training forward's), then `v` straight
//! into a column-sum sink (never stored), `g` into the block's scratch, the λ column sums, and `dx`
//! through the epilogue sink. Each block's column sums are a partial result, added in block order
//! (`parallel::reduce_in_order`): gradients are bitwise identical for any number of threads. All
//! products run on the tier's f32-FMA kernels (`u` and `g` stay in f32 on every tier).

use super::forward::BLOCK_ROWS;
use super::{Scales, Weights};
use crate::cpu::kernels::{Kernels, Layout};
use crate::cpu::pack::{
    pack_projections, pack_rows, pack_rows_scaled, Left, PackedProjections, Panels, TransposedProjections, NR,
};
use crate::cpu::parallel::{for_panels, plan_blocks, reduce_in_order, with_scratch};
use crate::cpu::sink::{Epilogue, Sink};
use crate::dtype::Element;
use crate::mat::{MatMut, MatPtr, MatRef};

/// Where the backward writes: the λ gradients (and the bias's, when asked for) in f32, and the
/// adapter's part of `dx` in the activation dtype (when asked for); added to their contents when
/// `accumulate`, else written over them.
pub(crate) struct Grads<'a, T> {
    pub lambda_d: &'a mut [f32],
    pub lambda_b: &'a mut [f32],
    pub bias: Option<&'a mut [f32]>,
    pub x: Option<MatMut<'a, T>>,
    pub accumulate: bool,
}

/// The backward's projections: A and B packed for the f32-FMA kernels, and their transposes.
pub(crate) struct BackwardWeights<'a, T> {
    pub w: Weights<'a, T>,
    pub transposed: Option<&'a TransposedProjections<T>>,
}

/// The backward pass (shapes validated by the front end): gradients into `grads`. `saved_h` is the
/// training forward's `h` (`[T, r]` f32), or `None` to recompute it.
pub(crate) fn backward<T: Element>(
    kern: &Kernels<T>,
    bw: BackwardWeights<'_, T>,
    s: Scales<'_>,
    x: MatRef<'_, T>,
    dy: MatRef<'_, T>,
    saved_h: Option<MatRef<'_, f32>>,
    grads: Grads<'_, T>,
) {
    let Grads { lambda_d, lambda_b, bias, x: dx, accumulate } = grads;
    let (rows, n, r, m) = (x.rows(), x.cols(), bw.w.a.rows(), bw.w.b.rows());
    let mut owned = None;
    let packed: &PackedProjections<T> = match bw.w.packed {
        Some(p) => p,
        None => owned.insert(pack_projections(bw.w.a, bw.w.b, Layout::Wide)),
    };
    let mut owned_t = None;
    let transposed = match bw.transposed {
        Some(t) => t,
        None => owned_t.insert(TransposedProjections::pack(bw.w.a, bw.w.b)),
    };
    let mut dx = dx;
    let dxp = dx.as_mut().map(MatMut::as_ptr_mat);
    let want_bias = bias.is_some();
    // The column sums of one block: dlambda_d [r], dlambda_b [m], dbias [m].
    let mut sums = vec![0.0f32; r + 2 * m];
    let blocks = rows.div_ceil(BLOCK_ROWS);
    // v and g sweep B (2·T·r·m each), dx sweeps A (2·T·r·n), and so does h when it is recomputed.
    let sweeps_of_a = if saved_h.is_some() { 1 } else { 2 };
    let plan = plan_blocks(blocks, 2.0 * (rows * r * (2 * m + sweeps_of_a * n)) as f64);
    let ctx = Block { kern, packed, transposed, s, x, dy, saved_h, dxp, want_bias, accumulate, split: plan.split };
    reduce_in_order(blocks, plan.width, &mut sums, |b, part| {
        let t0 = b * BLOCK_ROWS;
        ctx.run(t0, BLOCK_ROWS.min(rows - t0), part);
    });
    let (dld, rest) = sums.split_at(r);
    let (dlb, dbias) = rest.split_at(m);
    let apply = |out: &mut [f32], sum: &[f32]| {
        for (o, v) in out.iter_mut().zip(sum) {
            *o = if accumulate { *o + v } else { *v };
        }
    };
    apply(lambda_d, dld);
    apply(lambda_b, dlb);
    if let Some(bias) = bias {
        apply(bias, dbias);
    }
}

/// What every block of one backward call shares.
struct Block<'a, T: 'static> {
    kern: &'a Kernels<T>,
    packed: &'a PackedProjections<T>,
    transposed: &'a TransposedProjections<T>,
    s: Scales<'a>,
    x: MatRef<'a, T>,
    dy: MatRef<'a, T>,
    saved_h: Option<MatRef<'a, f32>>,
    dxp: Option<MatPtr<T>>,
    want_bias: bool,
    accumulate: bool,
    split: bool,
}

impl<T: Element> Block<'_, T> {
    /// Rows `t0..t0 + tb`: their `dx` rows, and their column sums into `part` (`[r | m | m]`).
    fn run(&self, t0: usize, tb: usize, part: &mut [f32]) {
        let (n, r, m) = (self.x.cols(), self.s.lambda_d.len(), self.dy.cols());
        part.fill(0.0);
        let (dld, rest) = part.split_at_mut(r);
        let (dlb, dbias) = rest.split_at_mut(m);
        let (x, dy) = (self.x.row_range(t0, tb), self.dy.row_range(t0, tb));
        let (ld, lb) = (self.s.lambda_d, self.s.lambda_b);
        let h_len = if self.saved_h.is_some() { 0 } else { tb * r };
        let left_len = Left::<f32>::len_for(tb, n.max(m).max(r));
        with_scratch(h_len + tb * r + left_len, |buf| {
            let (h_buf, rest) = buf.split_at_mut(h_len);
            let (g, left) = rest.split_at_mut(tb * r);
            // h = x·Aᵀ, unless the training forward saved it.
            let h = match self.saved_h {
                Some(h) => h.row_range(t0, tb),
                None => {
                    let mut h = MatMut::from_slice(h_buf, tb, r).expect("scratch sized tb * r");
                    let xl = pack_rows(x, left);
                    let sink = Sink::F32 { out: h.as_ptr_mat(), scale: None };
                    self.product(xl, self.packed.down.wide(), r, &sink);
                    MatRef::from_slice(h_buf, tb, r).expect("scratch sized tb * r")
                }
            };
            // dlambda_b = Σ_t dy ⊙ v with v = (lambda_d ⊙ h)·Bᵀ, summed as each tile of v is made.
            let ul = pack_rows_scaled(h, ld, left);
            let mut dlb = MatMut::from_slice(dlb, 1, m).expect("m sums");
            let sink = Sink::ColumnDot { other: dy, sums: dlb.as_ptr_mat() };
            self.product(ul, self.packed.up.wide(), m, &sink);
            // g = (dy ⊙ lambda_b)·B, into the block's scratch.
            let mut gm = MatMut::from_slice(g, tb, r).expect("scratch sized tb * r");
            let dyl = pack_rows_scaled(dy, lb, left);
            self.product(dyl, &self.transposed.b_t, r, &Sink::F32 { out: gm.as_ptr_mat(), scale: None });
            let g = MatRef::from_slice(g, tb, r).expect("scratch sized tb * r");
            // dlambda_d = Σ_t g ⊙ h and dbias = Σ_t dy, rows in order.
            for t in 0..tb {
                for ((s, gv), hv) in dld.iter_mut().zip(g.row_unchecked(t)).zip(h.row_unchecked(t)) {
                    *s += gv * hv;
                }
                if self.want_bias {
                    for (s, d) in dbias.iter_mut().zip(dy.row_unchecked(t)) {
                        *s += d.to_f32();
                    }
                }
            }
            // dx (+)= (g ⊙ lambda_d)·A.
            if let Some(dxp) = self.dxp {
                let gl = pack_rows_scaled(g, ld, left);
                let epi = Epilogue { scale: None, bias: None, accumulate: self.accumulate };
                self.product(gl, &self.transposed.a_t, n, &Sink::Epilogue { out: dxp.sub(t0, tb, 0, n), epi });
            }
        });
    }

    /// `sink <- left · right` over the first `cols` columns of `right`, split over the threads'
    /// panels when the plan says so.
    fn product(&self, left: Left<'_, f32>, right: &Panels<T>, cols: usize, sink: &Sink<'_, T>) {
        let gemm = self.kern.gemm;
        // SAFETY: left.k_len <= right.k_cap (k is n <= n_max, r, or m <= m_max); the sink's rows
        // are this block's, and for_panels hands out disjoint panel ranges.
        for_panels(cols.div_ceil(NR), self.split, |range| unsafe { gemm(left, right, range, sink) });
    }
}
