//! The dense baseline: form ΔW (in `T`, as weight panels), then `y (op)= x·ΔWᵀ + bias`; and its
//! backward, the gradients through a materialised ΔW. The same micro-kernels as the fused path.

use crate::alloc;
use crate::cpu::drivers::backward::{store_sums, Grads};
use crate::cpu::drivers::forward::{packed_or_owned, BLOCK_ROWS};
use crate::cpu::drivers::Scales;
use crate::cpu::kernels::{Kernels, Layout};
use crate::cpu::pack::{pack_cols, pack_rows, Left, Panels, TransposedProjections, NR};
use crate::cpu::parallel::{for_blocks, for_panels, with_scratch, Work};
use crate::cpu::sink::{Epilogue, Sink};
use crate::dtype::Element;
use crate::error::Result;
use crate::mat::{MatMut, MatRef};
use crate::projections::LayerProjections;
use crate::types::Mode;

/// Reusable buffers of the dense baseline: ΔW packed as weight panels, and Aᵀ packed as a left
/// operand; for its backward, ΔW packed the other way (for `dx = dy·ΔW`), `dΔW [m, n]` and `dyᵀ`
/// packed as a left operand. Kept between calls so that a benchmark times the arithmetic, not the
/// allocator.
#[derive(Debug, Default)]
pub struct DenseBuffers<T> {
    dw: Option<Panels<T>>,
    a_packed: Vec<f32>,
    dw_by_rows: Option<Panels<T>>,
    dw_grad: Vec<f32>,
    dy_packed: Vec<f32>,
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

/// The gradients through a materialised ΔW (shapes already validated): `dΔW = dyᵀ·x [m, n]` (f32),
/// `P = dΔW·Aᵀ [m, r]`, then `dlambda_b[i] = Σ_j P[i, j]·B[i, j]·lambda_d[j]`, `dlambda_d[j] =
/// Σ_i lambda_b[i]·B[i, j]·P[i, j]`, `dbias = Σ_t dy`, and `dx (+)= dy·ΔW` with ΔW formed (in `T`,
/// as the forward's) in the panel layout that product reads. Every output element comes from one
/// kernel call or one serial loop in a fixed order: the same bits for any thread count.
#[allow(clippy::too_many_arguments)]
pub(super) fn dense_backward<T: Element>(
    kern: &Kernels<T>,
    layer: LayerProjections<'_, T>,
    transposed: &TransposedProjections<T>,
    s: Scales<'_>,
    x: MatRef<'_, T>,
    dy: MatRef<'_, T>,
    grads: Grads<'_, T>,
    bufs: &mut DenseBuffers<T>,
) -> Result<()> {
    let (rows, n, r, m) = (x.rows(), x.cols(), layer.rank(), layer.out_features());
    let Grads { lambda_d, lambda_b, bias, x: dx, accumulate } = grads;
    let (ld, lb, b) = (s.lambda_d, s.lambda_b, layer.b());
    let (mut dld, mut dlb, mut dbias) = (vec![0.0f32; r], vec![0.0f32; m], vec![0.0f32; m]);
    for t in 0..rows {
        for (sum, v) in dbias.iter_mut().zip(dy.row_unchecked(t)) {
            *sum += v.to_f32();
        }
    }
    // With no rows, inputs or outputs, dΔW and so the λ gradients are zero (the products below
    // would have no k to sum over).
    if rows > 0 && n > 0 && m > 0 {
        // dΔW = dyᵀ·x: the rows of the product are dy's columns, k runs over the call's rows.
        let len = alloc::product("the dense backward's dΔW = [m, n]", m, n)?;
        if bufs.dw_grad.len() != len {
            bufs.dw_grad = alloc::filled("the dense backward's dΔW = [m, n]", len, 0.0)?;
        }
        bufs.dy_packed.resize(Left::<f32>::len_for(m, rows), 0.0);
        let dy_t = pack_cols(dy, &mut bufs.dy_packed);
        let x_panels = Panels::from_fn(n, rows, |col, t| x.row_unchecked(t)[col]);
        let mut dw_grad = MatMut::from_slice(&mut bufs.dw_grad, m, n)?;
        let gp = dw_grad.as_ptr_mat();
        for_blocks(
            m,
            BLOCK_ROWS,
            Work::new(2.0 * (rows * m * n) as f64, n * rows * size_of::<T>()),
            |i0, ib, split| {
                let sink = Sink::F32 { out: gp.sub(i0, ib, 0, n), scale: None };
                // SAFETY: k_len = rows = k_cap of the x panels; rows i0..i0+ib of dΔW are this block's,
                // and for_panels hands out disjoint panel ranges.
                for_panels(n.div_ceil(NR), split, |range| unsafe {
                    (kern.gemm)(dy_t.rows(i0, ib), &x_panels, range, &sink)
                });
            },
        );
        // P = dΔW·Aᵀ, on A's panels over k = n.
        let mut owned = None;
        let packed = packed_or_owned(&layer.weights(Layout::Wide), &mut owned);
        let a_panels = packed.proj.down.wide();
        let mut p = vec![0.0f32; m * r];
        let pp = MatMut::from_slice(&mut p, m, r)?.as_ptr_mat();
        let dw_grad = dw_grad.as_ref();
        for_blocks(m, BLOCK_ROWS, Work::new(2.0 * (m * n * r) as f64, n * r * size_of::<T>()), |i0, ib, split| {
            with_scratch(Left::<f32>::len_for(ib, n), |buf| {
                let left = pack_rows(dw_grad.row_range(i0, ib), buf);
                let sink = Sink::F32 { out: pp.sub(i0, ib, 0, r), scale: None };
                // SAFETY: k_len = n <= k_cap of A's panels (n_max); rows i0..i0+ib of P are this
                // block's, and for_panels hands out disjoint panel ranges.
                for_panels(r.div_ceil(NR), split, |range| unsafe { (kern.gemm)(left, a_panels, range, &sink) });
            });
        });
        for (i, p_row) in p.chunks_exact(r).enumerate() {
            for (j, (&pv, bv)) in p_row.iter().zip(b.row_unchecked(i)).enumerate() {
                let pb = pv * bv.to_f32();
                dlb[i] += pb * ld[j];
                dld[j] += lb[i] * pb;
            }
        }
    }
    if let Some(mut dx) = dx {
        if m == 0 || rows == 0 || n == 0 {
            if !accumulate {
                for t in 0..rows {
                    dx.row_mut(t).expect("t < rows").fill(T::from_f32(0.0));
                }
            }
        } else {
            dense_dx(kern, layer, transposed, s, dy, dx, accumulate, bufs)?;
        }
    }
    store_sums(lambda_d, &dld, accumulate);
    store_sums(lambda_b, &dlb, accumulate);
    if let Some(bias) = bias {
        store_sums(bias, &dbias, accumulate);
    }
    Ok(())
}

/// `dx (+)= dy·ΔW`: ΔW formed in `T` as panels over k = m (`ΔW[i, k] = Σ_j C[i, j]·A[j, k]`, `C =
/// diag(lambda_b)·B·diag(lambda_d)`, on Aᵀ's panels), then the product over every row.
#[allow(clippy::too_many_arguments)]
fn dense_dx<T: Element>(
    kern: &Kernels<T>,
    layer: LayerProjections<'_, T>,
    transposed: &TransposedProjections<T>,
    s: Scales<'_>,
    dy: MatRef<'_, T>,
    mut dx: MatMut<'_, T>,
    accumulate: bool,
    bufs: &mut DenseBuffers<T>,
) -> Result<()> {
    let (rows, n, r, m) = (dy.rows(), dx.cols(), layer.rank(), layer.out_features());
    let b = layer.b();
    let mut c = vec![0.0f32; m * r];
    for (i, c_row) in c.chunks_exact_mut(r).enumerate() {
        for (j, (cv, bv)) in c_row.iter_mut().zip(b.row_unchecked(i)).enumerate() {
            *cv = s.lambda_b[i] * bv.to_f32() * s.lambda_d[j];
        }
    }
    let c = MatRef::from_slice(&c, m, r)?;
    let dw = match &mut bufs.dw_by_rows {
        Some(p) if p.cols() == n && p.k_cap() == m => p,
        slot => slot.insert(Panels::with_shape("the dense backward's ΔW = [m, n]", n, m)?),
    };
    let dwp = dw.as_mut_ptr();
    let a_t = &transposed.a_t;
    for_blocks(m, BLOCK_ROWS, Work::new(2.0 * (m * n * r) as f64, r * n * size_of::<T>()), |i0, ib, split| {
        with_scratch(Left::<f32>::len_for(ib, r), |buf| {
            let left = pack_rows(c.row_range(i0, ib), buf);
            let sink = Sink::Panels { out: dwp.offset_rows(i0) };
            // SAFETY: k_len = r = k_cap of Aᵀ's panels; rows i0..i0+ib of the ΔW panels belong to
            // this block, and for_panels hands out disjoint panel ranges.
            for_panels(n.div_ceil(NR), split, |range| unsafe { (kern.gemm)(left, a_t, range, &sink) });
        });
    });
    let dw = &*dw;
    let epi = Epilogue { scale: None, bias: None, accumulate };
    let dxp = dx.as_ptr_mat();
    for_blocks(rows, BLOCK_ROWS, Work::new(2.0 * (rows * n * m) as f64, n * m * size_of::<T>()), |t0, tb, split| {
        with_scratch(Left::<f32>::len_for(tb, m), |buf| {
            let left = pack_rows(dy.row_range(t0, tb), buf);
            let sink = Sink::Epilogue { out: dxp.sub(t0, tb, 0, n), epi };
            // SAFETY: k_len = m = k_cap of the ΔW panels; rows t0..t0+tb of dx are this block's,
            // and for_panels hands out disjoint panel ranges.
            for_panels(n.div_ceil(NR), split, |range| unsafe { (kern.gemm)(left, dw, range, &sink) });
        });
    });
    Ok(())
}
