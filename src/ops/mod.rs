//! The public operations: fused forward, merge / unmerge, ΔW. Validation lives here (the shared
//! check of `types`); the work is done by the CPU drivers in `cpu::drivers`, with the kernel table
//! of the calling thread's tier.

mod mixed;
mod train;

pub use mixed::{backward_mixed, forward_mixed, forward_train_mixed};
pub(crate) use train::check_backward;
pub use train::{backward, forward_train, Gradients};

use crate::adapter::Adapter;
use crate::cpu::drivers::{self, RowScales, Scales, Weights};
use crate::cpu::kernels::{self, Layout};
use crate::cpu::sink::Update;
use crate::dtype::Element;
use crate::error::Result;
use crate::mat::{MatMut, MatRef};
use crate::projections::{LayerProjections, Projections};
use crate::types::{self, Mode};

/// Checks the shapes of one forward call, `x [t, n]` and `y` (when given) against the layer and
/// the adapter: the one check every backend runs (see `types::check_forward`).
pub(crate) fn check_forward<T>(
    layer: &LayerProjections<'_, T>,
    adapter: &Adapter,
    t: usize,
    n: usize,
    y_shape: Option<[usize; 2]>,
) -> Result<()> {
    types::check_forward(layer.dims(), adapter.dims(), [t, n], y_shape.map(|y| (y, types::Y)))
}

/// The layer of `projections` that `x [t, n]` and an output of `y_shape` address, with every shape
/// checked as [`forward`] checks it.
pub(crate) fn checked_layer<'p, T: Element>(
    projections: &'p Projections<T>,
    adapter: &Adapter,
    x: &MatRef<'_, T>,
    y_shape: [usize; 2],
) -> Result<LayerProjections<'p, T>> {
    let layer = projections.slice(x.cols(), y_shape[1])?;
    check_forward(&layer, adapter, x.rows(), x.cols(), Some(y_shape))?;
    Ok(layer)
}

/// The fused VeRA forward pass for one layer:
/// `y (+)= lambda_b ⊙ ((lambda_d ⊙ (x·Aᵀ))·Bᵀ) + bias`, with `x [T, n]`, `y [T, m]` and the layer's
/// projections `A[:, :n]`, `B[:m, :]` sliced from the shared `projections`.
///
/// ΔW is never formed. The work is split over rayon's current pool in blocks of a fixed number of
/// rows (and, when there are fewer blocks than threads, over `r` and then `m`), and every output
/// element is computed by one fixed sequence of f32 operations, so results are bitwise identical for
/// any number of threads. `T = 0` is a no-op.
///
/// Scratch memory: each worker thread keeps one reusable f32 buffer of at most
/// `BLOCK_ROWS · (2r + n)` elements, however large `T` is ([`BLOCK_ROWS`] rows of `u`, the same
/// rows packed for the up-projection, and the block of `x` packed for the down-projection): at
/// most `threads · BLOCK_ROWS · (2r + n) · 4` bytes, e.g. 3 MiB for 2 threads at r = 1024,
/// n = 4096. The projections are packed once per [`Projections`] (on first use, per layout of the
/// tier in use), not per call.
///
/// Errors: [`Error::LayerExceedsProjections`](crate::Error::LayerExceedsProjections) when
/// `n > n_max` or `m > m_max`, [`Error::RankMismatch`](crate::Error::RankMismatch) /
/// [`Error::LengthMismatch`](crate::Error::LengthMismatch) when the adapter does not fit, and
/// [`Error::ShapeMismatch`](crate::Error::ShapeMismatch) when `y` has another number of rows than
/// `x`.
///
/// ```
/// use vera_kernels::{forward, Adapter, MatMut, MatRef, Mode, Projections};
///
/// // Shared projections for a model whose layers are at most 64 wide, rank 16, PEFT's seed 0.
/// let proj = Projections::<f32>::from_seed(0, 16, 64, 64)?;
/// // One layer with 48 inputs and 40 outputs.
/// let adapter = Adapter::new(vec![0.1; 16], vec![0.5; 40])?;
/// let x = vec![1.0f32; 3 * 48];
/// let mut y = vec![0.0f32; 3 * 40]; // holds the base layer's output
/// forward(
///     &proj,
///     &adapter,
///     MatRef::from_slice(&x, 3, 48)?,
///     MatMut::from_slice(&mut y, 3, 40)?,
///     Mode::Accumulate,
/// )?;
/// assert!(y.iter().any(|&v| v != 0.0));
/// # Ok::<(), vera_kernels::Error>(())
/// ```
pub fn forward<T: Element>(
    projections: &Projections<T>,
    adapter: &Adapter,
    x: MatRef<'_, T>,
    y: MatMut<'_, T>,
    mode: Mode,
) -> Result<()> {
    let layer = projections.slice(x.cols(), y.cols())?;
    forward_layer(layer, adapter, x, y, mode)
}

/// [`forward`] with explicit layer projections (any strided views of A `[r, n]` and B `[m, r]`).
pub fn forward_layer<T: Element>(
    layer: LayerProjections<'_, T>,
    adapter: &Adapter,
    x: MatRef<'_, T>,
    y: MatMut<'_, T>,
    mode: Mode,
) -> Result<()> {
    check_forward(&layer, adapter, x.rows(), x.cols(), Some([y.rows(), y.cols()]))?;
    let kern = kernels::current::<T>();
    drivers::forward::forward(
        kern,
        layer.weights(kern.facts().layout_for(x.rows())),
        RowScales::One(scales(adapter)),
        x,
        y,
        mode,
    );
    Ok(())
}

/// Rows per block of the forward pass: the unit of work split across threads.
pub const BLOCK_ROWS: usize = drivers::forward::BLOCK_ROWS;

/// An adapter's vectors as the CPU drivers take them.
pub(crate) fn scales(adapter: &Adapter) -> Scales<'_> {
    Scales { lambda_d: adapter.lambda_d(), lambda_b: adapter.lambda_b(), bias: adapter.bias() }
}

fn apply_delta<T: Element>(
    projections: &Projections<T>,
    adapter: &Adapter,
    w: MatMut<'_, T>,
    update: Update,
) -> Result<()> {
    let layer = projections.slice(w.cols(), w.rows())?;
    adapter.check(layer.rank(), layer.out_features())?;
    // Merge reads B as it is (in T) and the model's transposed A (packed once, as the backward's).
    let weights = Weights { a: layer.a(), b: layer.b(), layout: Layout::Wide, packed: None };
    drivers::delta::apply_delta(kernels::current::<T>(), weights, projections.transposed(), scales(adapter), w, update);
    Ok(())
}

/// `W += ΔW` in place for a layer weight `W [m, n]` (torch's `[out_features, in_features]`), with
/// `ΔW = diag(lambda_b) · B · diag(lambda_d) · A` computed in f32 tile by tile and rounded once into
/// W's dtype. No `m x n` temporary is allocated.
///
/// Errors: as [`forward`], with the layer's shape taken from `W`.
pub fn merge<T: Element>(projections: &Projections<T>, adapter: &Adapter, w: MatMut<'_, T>) -> Result<()> {
    apply_delta(projections, adapter, w, Update::Add)
}

/// `W -= ΔW` in place: the inverse of [`merge`] up to rounding.
pub fn unmerge<T: Element>(projections: &Projections<T>, adapter: &Adapter, w: MatMut<'_, T>) -> Result<()> {
    apply_delta(projections, adapter, w, Update::Sub)
}

/// Writes `ΔW [m, n]` into `out` (PEFT's `get_delta_weight`), the layer's shape taken from `out`.
pub fn delta_weight<T: Element>(projections: &Projections<T>, adapter: &Adapter, out: MatMut<'_, T>) -> Result<()> {
    apply_delta(projections, adapter, out, Update::Overwrite)
}
