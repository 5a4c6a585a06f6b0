//! Training: the training forward (which saves `h = x·Aᵀ`) and the fused backward pass, giving the
//! gradients of `lambda_d`, `lambda_b`, the bias and the adapter's part of `dx`.

use super::{check_forward, scales};
use crate::adapter::Adapter;
use crate::cpu::drivers::backward::{self, BackwardWeights, Grads};
use crate::cpu::drivers::forward;
use crate::cpu::drivers::RowScales;
use crate::cpu::kernels;
use crate::dtype::Element;
use crate::error::{Error, Result};
use crate::mat::{MatMut, MatRef};
use crate::projections::Projections;
use crate::types::{self, Mode};

/// Where [`backward`](fn@backward) writes one layer's gradients: always the λ gradients (f32, whatever the
/// activation dtype); the bias gradient and the adapter's part of `dx` when given.
///
/// ```
/// use vera_kernels::{Gradients, MatMut};
///
/// let (mut dld, mut dlb, mut dx) = (vec![0.0f32; 16], vec![0.0f32; 40], vec![0.0f32; 3 * 48]);
/// let grads = Gradients::new(&mut dld, &mut dlb).with_x(MatMut::from_slice(&mut dx, 3, 48)?);
/// # Ok::<(), vera_kernels::Error>(())
/// ```
#[derive(Debug)]
pub struct Gradients<'a, T> {
    /// `dL/dlambda_d`, `[r]`.
    pub lambda_d: &'a mut [f32],
    /// `dL/dlambda_b`, `[m]`.
    pub lambda_b: &'a mut [f32],
    /// `dL/dbias`, `[m]` (= `Σ_t dy`), when the adapter's bias is trained.
    pub bias: Option<&'a mut [f32]>,
    /// The adapter's part of `dL/dx`, `[T, n]`, in the activation dtype (the frozen layer's part,
    /// `dy·W0`, is the caller's: accumulate onto it).
    pub x: Option<MatMut<'a, T>>,
}

impl<'a, T> Gradients<'a, T> {
    /// The CPU drivers' form of these buffers, written or added to as `mode` says.
    pub(crate) fn for_drivers(self, mode: Mode) -> Grads<'a, T> {
        let Gradients { lambda_d, lambda_b, bias, x } = self;
        Grads { lambda_d, lambda_b, bias, x, accumulate: mode == Mode::Accumulate }
    }

    /// The λ gradients only.
    pub fn new(lambda_d: &'a mut [f32], lambda_b: &'a mut [f32]) -> Self {
        Self { lambda_d, lambda_b, bias: None, x: None }
    }

    /// Also the bias gradient, `[m]`.
    pub fn with_bias(self, bias: &'a mut [f32]) -> Self {
        Self { bias: Some(bias), ..self }
    }

    /// Also the adapter's part of `dx`, `[T, n]`.
    pub fn with_x(self, x: MatMut<'a, T>) -> Self {
        Self { x: Some(x), ..self }
    }
}

pub(super) fn check_len(what: &'static str, len: usize, expected: usize) -> Result<()> {
    if len == expected {
        Ok(())
    } else {
        Err(Error::LengthMismatch { what, expected, actual: len })
    }
}

pub(super) fn check_shape(what: &'static str, shape: [usize; 2], expected: [usize; 2]) -> Result<()> {
    if shape == expected {
        Ok(())
    } else {
        Err(Error::ShapeMismatch { what, expected, actual: shape })
    }
}

/// The checks of a backward call, in order, before anything is written (see [`backward`](fn@backward)'s
/// errors): the layer it slices from the projections.
pub(crate) fn check_backward<'p, T: Element>(
    projections: &'p Projections<T>,
    adapter: &Adapter,
    x: MatRef<'_, T>,
    dy: MatRef<'_, T>,
    saved_h: Option<MatRef<'_, f32>>,
    grads: &Gradients<'_, T>,
) -> Result<crate::projections::LayerProjections<'p, T>> {
    let layer = projections.slice(x.cols(), dy.cols())?;
    let (t, n, r, m) = (x.rows(), x.cols(), layer.rank(), layer.out_features());
    types::check_forward(layer.dims(), adapter.dims(), [t, n], Some(([dy.rows(), dy.cols()], types::DY)))?;
    if let Some(h) = saved_h {
        check_shape("saved h (must be [T, r])", [h.rows(), h.cols()], [t, r])?;
    }
    check_len("gradient of lambda_d (must be [r])", grads.lambda_d.len(), r)?;
    check_len("gradient of lambda_b (must be [m])", grads.lambda_b.len(), m)?;
    if let Some(bias) = &grads.bias {
        check_len("gradient of the bias (must be [m])", bias.len(), m)?;
    }
    if let Some(dx) = &grads.x {
        check_shape("dx (must be [T, in_features])", [dx.rows(), dx.cols()], [t, n])?;
    }
    Ok(layer)
}

/// The training forward: [`forward`](crate::forward) (the same `y`, bit for bit), also writing
/// `h = x·Aᵀ` (`[T, r]`, f32) into `h`, which [`backward`](fn@backward) can then reuse instead of recomputing it:
/// `T·r·4` bytes per layer, all a training step keeps between the passes.
///
/// Errors: as [`forward`](crate::forward), and [`Error::ShapeMismatch`] when `h` is not `[T, r]`.
pub fn forward_train<T: Element>(
    projections: &Projections<T>,
    adapter: &Adapter,
    x: MatRef<'_, T>,
    y: MatMut<'_, T>,
    mode: Mode,
    h: MatMut<'_, f32>,
) -> Result<()> {
    let layer = projections.slice(x.cols(), y.cols())?;
    check_forward(&layer, adapter, x.rows(), x.cols(), Some([y.rows(), y.cols()]))?;
    check_shape("h (must be [T, r])", [h.rows(), h.cols()], [x.rows(), layer.rank()])?;
    let kern = kernels::current::<T>();
    forward::forward_train(
        kern,
        layer.weights(kern.facts().layout_for(x.rows())),
        RowScales::One(scales(adapter)),
        x,
        y,
        mode,
        h,
    );
    Ok(())
}

/// The fused backward pass for one layer: from `x [T, n]` and `dy = dL/dy [T, m]`,
///
/// ```text
/// dlambda_b = Σ_t dy ⊙ v      g = (dy ⊙ lambda_b)·B      dlambda_d = Σ_t g ⊙ h
/// dbias     = Σ_t dy          dx (+)= (g ⊙ lambda_d)·A
/// ```
///
/// with `h = x·Aᵀ` (recomputed, or `saved_h` from [`forward_train`]) and `v = (lambda_d ⊙ h)·Bᵀ`,
/// which is never stored. With [`Mode::Accumulate`] every gradient is added to the buffer's contents
/// (gradient accumulation over micro-batches; `dx` onto the frozen layer's `dy·W0`), with
/// [`Mode::Overwrite`] written over them. Products accumulate in f32 (their left operands, `lambda_d
/// ⊙ h`, `dy ⊙ lambda_b` and `g ⊙ lambda_d`, are rounded to bf16 where bf16 runs on `vdpbf16ps`
/// (`avx512bf16`) or AMX tiles (`amx`), as PEFT's autograd rounds them in bf16; f32 elsewhere); the λ and bias gradients are f32, `dx` is
/// rounded once into `T`. Column sums over rows are made per block of the tier's `block_rows`
/// ([`BLOCK_ROWS`](crate::BLOCK_ROWS), 256 on `amx`) rows and the blocks added in order, so the
/// gradients are bitwise identical for any number of threads. Scratch is bounded as for the
/// forward.
///
/// Errors (before anything is written): as [`forward`](crate::forward), with `dy` in the place of
/// `y`; [`Error::LengthMismatch`] when a gradient buffer's length is not `r` or `m`;
/// [`Error::ShapeMismatch`] when `saved_h` is not `[T, r]` or `grads.x` not `[T, n]`.
///
/// ```
/// use vera_kernels::{backward, Adapter, Gradients, MatMut, MatRef, Mode, Projections};
///
/// let proj = Projections::<f32>::from_seed(0, 16, 64, 64)?;
/// let adapter = Adapter::new(vec![0.1; 16], vec![0.5; 40])?;
/// let (x, dy) = (vec![1.0f32; 3 * 48], vec![0.25f32; 3 * 40]);
/// let (mut dld, mut dlb) = (vec![0.0f32; 16], vec![0.0f32; 40]);
/// backward(
///     &proj,
///     &adapter,
///     MatRef::from_slice(&x, 3, 48)?,
///     MatRef::from_slice(&dy, 3, 40)?,
///     None,
///     Gradients::new(&mut dld, &mut dlb),
///     Mode::Overwrite,
/// )?;
/// assert!(dlb.iter().all(|&g| g != 0.0));
/// # Ok::<(), vera_kernels::Error>(())
/// ```
pub fn backward<T: Element>(
    projections: &Projections<T>,
    adapter: &Adapter,
    x: MatRef<'_, T>,
    dy: MatRef<'_, T>,
    saved_h: Option<MatRef<'_, f32>>,
    grads: Gradients<'_, T>,
    mode: Mode,
) -> Result<()> {
    let layer = check_backward(projections, adapter, x, dy, saved_h, &grads)?;
    let t = x.rows();
    let kern = kernels::current::<T>();
    let bw =
        BackwardWeights { w: layer.weights(backward::layout(kern, t)), transposed: Some(projections.transposed()) };
    backward::backward(kern, bw, RowScales::One(scales(adapter)), x, dy, saved_h, grads.for_drivers(mode));
    Ok(())
}
