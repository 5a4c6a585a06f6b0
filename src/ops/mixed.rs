//! Mixed-adapter calls: a batch whose rows each name their own adapter of an [`AdapterBank`]. Both
//! products run once over all rows, as for one adapter; each row's `lambda_d` is applied where `u` is
//! made, its `lambda_b` and bias in the up-projection's store.

use super::train::{check_len, check_shape, Gradients};
use crate::bank::AdapterBank;
use crate::cpu::drivers::backward::{self, BackwardWeights};
use crate::cpu::drivers::{forward, RowScales};
use crate::cpu::kernels;
use crate::dtype::Element;
use crate::error::Result;
use crate::mat::{MatMut, MatRef};
use crate::projections::{LayerProjections, Projections};
use crate::types::{self, AdapterDims, Mode};

/// The checks of one mixed call, before anything is written: the layer for `x [T, n]` and an
/// output-shaped `[T, m]` buffer, the bank against the layer, and the row map.
fn checked_layer<'p, T: Element>(
    projections: &'p Projections<T>,
    bank: &AdapterBank,
    rows: &[i32],
    x: &MatRef<'_, T>,
    out: ([usize; 2], &'static str),
) -> Result<LayerProjections<'p, T>> {
    let layer = projections.slice(x.cols(), out.0[1])?;
    let dims = AdapterDims { r: bank.rank(), m: bank.out_features() };
    types::check_forward(layer.dims(), dims, [x.rows(), x.cols()], Some(out))?;
    bank.check_rows(rows, x.rows())?;
    Ok(layer)
}

/// The fused forward pass with one adapter per row: for every row `t` of `x [T, n]`,
/// `y[t] (+)= bank[rows[t]](x[t])`, where a row whose index is [`NO_ADAPTER`](crate::NO_ADAPTER)
/// is left as it is under [`Mode::Accumulate`] and zeroed under [`Mode::Overwrite`].
///
/// It costs what [`forward`](crate::forward) costs for one adapter: `x·Aᵀ` and `u·Bᵀ` run once
/// over all rows; only the scales are per row. The rows run sorted by adapter (gathered as they
/// are packed), so that a block of rows reads few adapters' vectors; rows without an adapter are
/// skipped. Row for row, the result has the same bits as a [`forward`](crate::forward) call with
/// that row's adapter, and is bitwise identical for any number of threads. Memory: the scratch of
/// [`forward`](crate::forward), plus the row order (`T·4` bytes) and a count per adapter.
///
/// Errors (before anything is written): as [`forward`](crate::forward), with the bank in the
/// place of the adapter; [`Error::LengthMismatch`](crate::Error::LengthMismatch) when `rows` does
/// not have one entry per row of `x`; [`Error::AdapterIndex`](crate::Error::AdapterIndex) for an
/// index outside `0..bank.len()` other than `NO_ADAPTER`.
///
/// ```
/// use vera_kernels::{forward_mixed, Adapter, AdapterBank, MatMut, MatRef, Mode, Projections, NO_ADAPTER};
///
/// let proj = Projections::<f32>::from_seed(0, 16, 64, 64)?;
/// let bank = AdapterBank::new(&[
///     Adapter::new(vec![0.1; 16], vec![0.5; 40])?,
///     Adapter::new(vec![0.2; 16], vec![-0.5; 40])?,
/// ])?;
/// let x = vec![1.0f32; 3 * 48];
/// let mut y = vec![7.0f32; 3 * 40];
/// // Row 0 uses adapter 1, row 1 no adapter, row 2 adapter 0.
/// let rows = [1, NO_ADAPTER, 0];
/// forward_mixed(
///     &proj,
///     &bank,
///     &rows,
///     MatRef::from_slice(&x, 3, 48)?,
///     MatMut::from_slice(&mut y, 3, 40)?,
///     Mode::Accumulate,
/// )?;
/// assert!(y[40..80].iter().all(|&v| v == 7.0));
/// assert!(y[..40] != y[80..]);
/// # Ok::<(), vera_kernels::Error>(())
/// ```
pub fn forward_mixed<T: Element>(
    projections: &Projections<T>,
    bank: &AdapterBank,
    rows: &[i32],
    x: MatRef<'_, T>,
    y: MatMut<'_, T>,
    mode: Mode,
) -> Result<()> {
    let layer = checked_layer(projections, bank, rows, &x, ([y.rows(), y.cols()], types::Y))?;
    let kern = kernels::current::<T>();
    let s = RowScales::Bank(bank.scales(rows));
    forward::forward(kern, layer.weights(kern.facts().layout_for(x.rows())), s, x, y, mode);
    Ok(())
}

/// The training forward of a mixed batch: [`forward_mixed`] (the same `y`, bit for bit), also
/// writing `h = x·Aᵀ` (`[T, r]` f32) for [`backward_mixed`] to reuse; as
/// [`forward_train`](crate::forward_train) for one adapter.
///
/// Errors: as [`forward_mixed`], and [`Error::ShapeMismatch`](crate::Error::ShapeMismatch) when
/// `h` is not `[T, r]`.
pub fn forward_train_mixed<T: Element>(
    projections: &Projections<T>,
    bank: &AdapterBank,
    rows: &[i32],
    x: MatRef<'_, T>,
    y: MatMut<'_, T>,
    mode: Mode,
    h: MatMut<'_, f32>,
) -> Result<()> {
    let layer = checked_layer(projections, bank, rows, &x, ([y.rows(), y.cols()], types::Y))?;
    check_shape("h (must be [T, r])", [h.rows(), h.cols()], [x.rows(), layer.rank()])?;
    let kern = kernels::current::<T>();
    let s = RowScales::Bank(bank.scales(rows));
    forward::forward_train(kern, layer.weights(kern.facts().layout_for(x.rows())), s, x, y, mode, h);
    Ok(())
}

/// The fused backward pass of a mixed batch (multi-tenant fine-tuning: many adapters trained in
/// one batch, at one adapter's cost). As [`backward`](crate::backward), with every row's own
/// adapter, and the gradients kept per adapter: `grads.lambda_d` is `[K, r]` and
/// `grads.lambda_b` (and `grads.bias`, when given) `[K, m]`, row-major, row `k` summed over the
/// rows of adapter `k` only. Rows without an adapter contribute nothing, and their `dx` is left as
/// it is (accumulate) or zeroed (overwrite). Under [`Mode::Overwrite`] an adapter with no row in
/// the batch gets zero gradients; under [`Mode::Accumulate`] its gradients are left as they are.
/// Deterministic: bitwise identical for any number of threads. Column sums are kept only for the
/// adapters the batch uses: `(adapters used)·(r + 2m)` f32 per block in flight.
///
/// Errors (before anything is written): as [`forward_mixed`] with `dy` in the place of `y`, and as
/// [`backward`](crate::backward) for the gradient buffers, with the lengths above.
#[allow(clippy::too_many_arguments)]
pub fn backward_mixed<T: Element>(
    projections: &Projections<T>,
    bank: &AdapterBank,
    rows: &[i32],
    x: MatRef<'_, T>,
    dy: MatRef<'_, T>,
    saved_h: Option<MatRef<'_, f32>>,
    grads: Gradients<'_, T>,
    mode: Mode,
) -> Result<()> {
    let layer = checked_layer(projections, bank, rows, &x, ([dy.rows(), dy.cols()], types::DY))?;
    let (t, n, r, m, k) = (x.rows(), x.cols(), layer.rank(), layer.out_features(), bank.len());
    if let Some(h) = saved_h {
        check_shape("saved h (must be [T, r])", [h.rows(), h.cols()], [t, r])?;
    }
    check_len("gradient of lambda_d (must be [K, r] for a bank of K adapters)", grads.lambda_d.len(), k * r)?;
    check_len("gradient of lambda_b (must be [K, m] for a bank of K adapters)", grads.lambda_b.len(), k * m)?;
    if let Some(bias) = &grads.bias {
        check_len("gradient of the bias (must be [K, m] for a bank of K adapters)", bias.len(), k * m)?;
    }
    if let Some(dx) = &grads.x {
        check_shape("dx (must be [T, in_features])", [dx.rows(), dx.cols()], [t, n])?;
    }
    let kern = kernels::current::<T>();
    let bw =
        BackwardWeights { w: layer.weights(backward::layout(kern, t)), transposed: Some(projections.transposed()) };
    backward::backward(kern, bw, RowScales::Bank(bank.scales(rows)), x, dy, saved_h, grads.for_drivers(mode));
    Ok(())
}
