//! The peers the fused kernel is benchmarked against, built from the same micro-kernels so that a
//! comparison measures the algorithm, not the code quality: the dense baseline (form ΔW, then
//! `x·ΔWᵀ`) and its backward (the gradients through that ΔW), the unfused three-pass path (with
//! `h = x·Aᵀ` materialised), and the unfused backward (with `v` and `g` materialised, as a
//! framework's autograd keeps them).

mod dense;
mod unfused;

pub use dense::DenseBuffers;

use crate::adapter::Adapter;
use crate::cpu::drivers::backward::{self, BackwardWeights};
use crate::cpu::kernels;
use crate::dtype::Element;
use crate::error::{Error, Result};
use crate::mat::{MatMut, MatRef};
use crate::ops::{check_backward, checked_layer, scales, Gradients};
use crate::projections::Projections;
use crate::types::Mode;

/// Forms `ΔW [m, n]` (rounded to `T`, as a materialised merge would be), then computes
/// `y (+)= x·ΔWᵀ + bias`. `buffers` keeps ΔW's storage between calls (allocated when the shape
/// changes), so that a benchmark times the arithmetic, not the allocator.
///
/// Errors: as [`crate::forward`].
pub fn dense_forward<T: Element>(
    projections: &Projections<T>,
    adapter: &Adapter,
    x: MatRef<'_, T>,
    y: MatMut<'_, T>,
    mode: Mode,
    buffers: &mut DenseBuffers<T>,
) -> Result<()> {
    let layer = checked_layer(projections, adapter, &x, [y.rows(), y.cols()])?;
    dense::dense(kernels::current::<T>(), layer, scales(adapter), x, y, mode, buffers)
}

/// The dense peer of [`backward`](crate::backward): the gradients through a materialised ΔW, as
/// autograd through `y = x·ΔWᵀ` with `ΔW = diag(lambda_b)·B·diag(lambda_d)·A` computes them.
/// `dΔW = dyᵀ·x` (`[m, n]`, f32), `P = dΔW·Aᵀ` (`[m, r]`), then `dlambda_b[i] = Σ_j P[i, j]·B[i,
/// j]·lambda_d[j]`, `dlambda_d[j] = Σ_i lambda_b[i]·B[i, j]·P[i, j]`, `dbias = Σ_t dy`, and when
/// `dx` is asked for, ΔW formed again (in `T`, as [`dense_forward`] rounds it) for `dx (+)=
/// dy·ΔW`: `4·T·m·n + 4·m·n·r` FLOPs (half without dx), against the fused backward's `2·T·r·(n +
/// 2m)` from a saved `h`; `buffers` keeps the `[m, n]` matrices between calls. Gradients and `mode` as
/// [`backward`](crate::backward)'s (equal to its results within the same bound, ΔW's rounding to
/// `T` aside; the sums run in another fixed order, the same bits for any thread count).
///
/// Errors: as [`backward`](crate::backward) (no saved `h`: the dense path has no use for it), and
/// [`Error::SizeOverflow`] or [`Error::OutOfMemory`] when an `[m, n]` matrix cannot be allocated.
#[allow(clippy::too_many_arguments)]
pub fn dense_backward<T: Element>(
    projections: &Projections<T>,
    adapter: &Adapter,
    x: MatRef<'_, T>,
    dy: MatRef<'_, T>,
    grads: Gradients<'_, T>,
    mode: Mode,
    buffers: &mut DenseBuffers<T>,
) -> Result<()> {
    let layer = check_backward(projections, adapter, x, dy, None, &grads)?;
    let (kern, grads) = (kernels::current::<T>(), grads.for_drivers(mode));
    dense::dense_backward(kern, layer, projections.transposed(), scales(adapter), x, dy, grads, buffers)
}

/// The unfused peer: `h = x·Aᵀ` for every row into `h` (f32 `[T, r]`, caller-provided), then
/// `h *= lambda_d` in place, then `y (+)= lambda_b ⊙ (h·Bᵀ) + bias`.
///
/// Errors: as [`crate::forward`], and [`Error::ShapeMismatch`] when `h` is not `[T, r]`.
pub fn unfused_forward<T: Element>(
    projections: &Projections<T>,
    adapter: &Adapter,
    x: MatRef<'_, T>,
    h: MatMut<'_, f32>,
    y: MatMut<'_, T>,
    mode: Mode,
) -> Result<()> {
    let layer = checked_layer(projections, adapter, &x, [y.rows(), y.cols()])?;
    if [h.rows(), h.cols()] != [x.rows(), layer.rank()] {
        return Err(Error::ShapeMismatch {
            what: "h (must be [T, r])",
            expected: [x.rows(), layer.rank()],
            actual: [h.rows(), h.cols()],
        });
    }
    let kern = kernels::current::<T>();
    unfused::unfused(kern, layer.weights(kern.facts().layout_for(x.rows())), scales(adapter), x, h, y, mode);
    Ok(())
}

/// The unfused peer of [`backward`](crate::backward), from the training forward's `h` (`[T, r]`
/// f32, as [`forward_train`](crate::forward_train) saves it): `v = (lambda_d ⊙ h)·Bᵀ` for every
/// row into a `[T, m]` f32 buffer, then `dlambda_b = Σ_t dy ⊙ v` and `dbias = Σ_t dy`; `g = (dy ⊙
/// lambda_b)·B` for every row into a `[T, r]` buffer, then `dlambda_d = Σ_t g ⊙ h`; then `dx (+)=
/// (g ⊙ lambda_d)·A`. The same products on the same kernels as the fused pass, each over every
/// row before the next, as a framework's autograd runs them; `buffer` keeps the `T·(m + r)` f32 of
/// `v` and `g` between calls. Gradients and `mode` as [`backward`](crate::backward)'s (equal to
/// its results within the same bound; the sums run in another fixed order).
///
/// Errors: as [`backward`](crate::backward), with `h` required.
#[allow(clippy::too_many_arguments)]
pub fn unfused_backward<T: Element>(
    projections: &Projections<T>,
    adapter: &Adapter,
    x: MatRef<'_, T>,
    dy: MatRef<'_, T>,
    h: MatRef<'_, f32>,
    grads: Gradients<'_, T>,
    mode: Mode,
    buffer: &mut Vec<f32>,
) -> Result<()> {
    let layer = check_backward(projections, adapter, x, dy, Some(h), &grads)?;
    let kern = kernels::current::<T>();
    let bw = BackwardWeights {
        w: layer.weights(backward::layout(kern, x.rows())),
        transposed: Some(projections.transposed()),
    };
    backward::unfused_backward(kern, bw, scales(adapter), x, dy, h, buffer, grads.for_drivers(mode));
    Ok(())
}
