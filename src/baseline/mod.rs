//! The peers the fused kernel is benchmarked against, built from the same micro-kernels so that a
//! comparison measures the algorithm, not the code quality: the dense baseline (form ΔW, then
//! `x·ΔWᵀ`) and the unfused three-pass path (with `h = x·Aᵀ` materialised).

mod dense;
mod unfused;

pub use dense::DenseBuffers;

use crate::adapter::Adapter;
use crate::cpu::kernels;
use crate::dtype::Element;
use crate::error::{Error, Result};
use crate::mat::{MatMut, MatRef};
use crate::ops::{checked_layer, scales};
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
