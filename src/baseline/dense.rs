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
    let (n, r, m) = (x.cols(), layer.rank(), layer.out_features());
    if m == 0 {
        return Ok(());
    }
    let (a, b) = (layer.a(), layer.b());
    // ΔWᵀ[col, i] = Σ_j Aᵀ[col, j] · C[i, j], C = diag(lb)·B·diag(ld): rows of the product are
    // A's columns, so it lands directly in the panel layout the second product reads.
    let c = Panels::from_fn(m, r, |i, j| delta_factor(s, b, i, j));
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
    let epi = Epilogue { scale: None, bias: s.bias, accumulate: mode == Mode::Accumulate };
    let yp = y.as_ptr_mat();
    // SAFETY: x has n = k_cap columns of ΔW; block t0.. writes rows t0..t0+tb of y, m columns.
    unsafe { rows_times_panels(kern, x, dw, m, |t0, tb| Sink::Epilogue { out: yp.sub(t0, tb, 0, m), epi }) };
    Ok(())
}

/// `C[i, j] = lambda_b[i]·B[i, j]·lambda_d[j]`: `ΔW = C·A`.
fn delta_factor<T: Element>(s: Scales<'_>, b: MatRef<'_, T>, i: usize, j: usize) -> f32 {
    s.lambda_b[i] * b.row_unchecked(i)[j].to_f32() * s.lambda_d[j]
}

/// `sink(t0, tb) <- src[t0..t0 + tb]·w` (`cols` columns) for every block of `BLOCK_ROWS` rows of
/// `src`, on the tier's f32-FMA kernels: blocks in parallel, or one block's panels split over the
/// threads; each block's rows packed, widened to f32, into the thread's scratch.
///
/// # Safety
/// `src.cols() <= w.k_cap()`, `cols <= w.cols()`, and `sink(t0, tb)` writes only rows `t0..t0 +
/// tb` of its output (which no other code touches meanwhile), at most `cols` columns wide.
unsafe fn rows_times_panels<'s, T: Element, E: Element>(
    kern: &Kernels<T>,
    src: MatRef<'_, E>,
    w: &Panels<T>,
    cols: usize,
    sink: impl Fn(usize, usize) -> Sink<'s, T> + Sync,
) {
    let (rows, k) = (src.rows(), src.cols());
    for_blocks(
        rows,
        BLOCK_ROWS,
        Work::new(2.0 * (rows * k * cols) as f64, k * cols * size_of::<T>()),
        |t0, tb, split| {
            with_scratch(Left::<f32>::len_for(tb, k), |buf| {
                let left = pack_rows(src.row_range(t0, tb), buf);
                let sink = sink(t0, tb);
                // SAFETY: k_len = k <= k_cap of w; rows t0..t0+tb of the sink are this block's (the
                // caller's contract), and for_panels hands out disjoint panel ranges.
                for_panels(cols.div_ceil(NR), split, |range| unsafe { (kern.gemm)(left, w, range, &sink) });
            });
        },
    );
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
        // SAFETY: dΔW has n <= n_max = k_cap columns; block i0.. writes rows i0..i0+ib of P, r
        // columns (A's rows).
        unsafe {
            rows_times_panels(kern, dw_grad.as_ref(), a_panels, r, |i0, ib| Sink::F32 {
                out: pp.sub(i0, ib, 0, r),
                scale: None,
            })
        };
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
    let (n, r, m) = (dx.cols(), layer.rank(), layer.out_features());
    let b = layer.b();
    let c: Vec<f32> = (0..m * r).map(|e| delta_factor(s, b, e / r, e % r)).collect();
    let c = MatRef::from_slice(&c, m, r)?;
    let dw = match &mut bufs.dw_by_rows {
        Some(p) if p.cols() == n && p.k_cap() == m => p,
        slot => slot.insert(Panels::with_shape("the dense backward's ΔW = [m, n]", n, m)?),
    };
    let dwp = dw.as_mut_ptr();
    // SAFETY: C has r = k_cap columns of Aᵀ's panels (n_max >= n columns); block i0.. writes panel
    // rows i0..i0+ib of ΔW, n columns.
    unsafe { rows_times_panels(kern, c, &transposed.a_t, n, |i0, _| Sink::Panels { out: dwp.offset_rows(i0) }) };
    let epi = Epilogue { scale: None, bias: None, accumulate };
    let dxp = dx.as_ptr_mat();
    // SAFETY: dy has m = k_cap columns of ΔW; block t0.. writes rows t0..t0+tb of dx, n columns.
    unsafe { rows_times_panels(kern, dy, dw, n, |t0, tb| Sink::Epilogue { out: dxp.sub(t0, tb, 0, n), epi }) };
    Ok(())
}
