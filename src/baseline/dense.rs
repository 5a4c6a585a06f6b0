//! The dense baseline: form ΔW (in `T`, as weight panels), then `y (op)= x·ΔWᵀ + bias`, with the
//! same micro-kernels as the fused path.

use crate::cpu::drivers::forward::BLOCK_ROWS;
use crate::cpu::drivers::Scales;
use crate::cpu::kernels::Kernels;
use crate::cpu::pack::{pack_cols, pack_rows, Left, Panels, NR};
use crate::cpu::parallel::{for_blocks, for_panels, with_scratch, Work};
use crate::cpu::sink::{Epilogue, Sink};
use crate::dtype::Element;
use crate::error::Result;
use crate::mat::{MatMut, MatRef};
use crate::projections::LayerProjections;
use crate::types::Mode;

/// Reusable buffers of the dense baseline: ΔW packed as weight panels, and Aᵀ packed as a left
/// operand, kept between calls so that a benchmark times the arithmetic, not the allocator.
#[derive(Debug, Default)]
pub struct DenseBuffers<T> {
    dw: Option<Panels<T>>,
    a_packed: Vec<f32>,
}

/// Forms ΔW into `bufs`, then `y (op)= x·ΔWᵀ + bias` (shapes already validated).
pub(super) fn dense<T: Element>(
    kern: &Kernels<T>,
    layer: LayerProjections<'_, T>,
    s: Scales<'_>,
    x: MatRef<'_, T>,
    mut y: MatMut<'_, T>,
    mode: Mode,
    bufs: &mut DenseBuffers<T>,
) -> Result<()> {
    let (rows, n, r, m) = (x.rows(), x.cols(), layer.rank(), layer.out_features());
    if m == 0 {
        return Ok(());
    }
    let (a, b) = (layer.a(), layer.b());
    let (ld, lb) = (s.lambda_d, s.lambda_b);
    // ΔWᵀ[col, i] = Σ_j Aᵀ[col, j] · C[i, j], C = diag(lb)·B·diag(ld): rows of the product are
    // A's columns, so it lands directly in the panel layout the second product reads.
    let c = Panels::from_fn(m, r, |i, j| lb[i] * b.row_unchecked(i)[j].to_f32() * ld[j]);
    bufs.a_packed.resize(Left::<f32>::len_for(n, r), 0.0);
    let left = pack_cols(a, &mut bufs.a_packed);
    let dw = match &mut bufs.dw {
        Some(p) if p.cols() == m && p.k_cap() == n => p,
        // [m, n] may be far larger than anything the caller passed (A and B are [r, n] and [m, r]).
        slot => slot.insert(Panels::with_shape("the dense baseline's ΔW = [m, n]", m, n)?),
    };
    let dwp = dw.as_mut_ptr();
    for_blocks(n, BLOCK_ROWS, Work::new(2.0 * (m * n * r) as f64, m * r * size_of::<f32>()), |k0, kb, split| {
        let sink = Sink::Panels { out: dwp.offset_rows(k0) };
        // SAFETY: k_len = r = k_cap of c; rows k0..k0+kb of the ΔW panels belong to this block,
        // and for_panels hands out disjoint panel ranges.
        for_panels(m.div_ceil(NR), split, |range| unsafe { (kern.gemm_f32)(left.rows(k0, kb), &c, range, &sink) });
    });
    let dw = &*dw;
    let epi = Epilogue { scale: None, bias: s.bias, accumulate: mode == Mode::Accumulate };
    let yp = y.as_ptr_mat();
    for_blocks(rows, BLOCK_ROWS, Work::new(2.0 * (rows * n * m) as f64, n * m * size_of::<f32>()), |t0, tb, split| {
        with_scratch(Left::<f32>::len_for(tb, n), |xl| {
            let left = pack_rows(x.row_range(t0, tb), xl);
            let sink = Sink::Epilogue { out: yp.sub(t0, tb, 0, m), epi };
            // SAFETY: k_len = n = k_cap of ΔW; rows t0..t0+tb of y are this block's, and
            // for_panels hands out disjoint panel ranges.
            for_panels(m.div_ceil(NR), split, |range| unsafe { (kern.gemm)(left, dw, range, &sink) });
        });
    });
    Ok(())
}
