//! The fused backward pass on the GPU: [`CudaStream::backward`], the device counterpart of the CPU
//! [`backward`](crate::backward), its checks, its reusable f32 workspace and the hand-off to a
//! backend. The kernels are `kernels/vera_backward.cu`; [`plan`] says which run with what grids.

mod plan;

pub(crate) use plan::kernel_names;
#[cfg(feature = "cuda")]
pub(crate) use plan::BackwardParams;
pub(crate) use plan::{params, BackwardAddresses, BackwardCall, BackwardPlan};

use super::buffer::{Buffer, WorkBuffer};
use super::forward::grow;
use super::params::to_i32;
use super::{CudaStream, DeviceAdapter, DeviceMatrix, DeviceProjections, StreamKind};
use crate::dtype::Element;
use crate::error::{Error, Result};
use crate::types::{self, AdapterDims, LayerDims, Mode};

/// Where [`CudaStream::backward`] writes one layer's gradients, all on the device: always the λ
/// gradients (f32 `[1, r]` and `[1, m]` matrices, whatever the activation dtype); the bias gradient
/// (`[1, m]`) and the adapter's part of `dx` (`[T, n]`, in the activation dtype) when given.
///
/// ```no_run
/// # use vera_kernels::cuda::{CudaDevice, DeviceGradients};
/// let stream = CudaDevice::new(0)?.stream();
/// let (mut dld, mut dlb) = (stream.zeros::<f32>(1, 16, 16)?, stream.zeros::<f32>(1, 40, 40)?);
/// let mut dx = stream.zeros::<f32>(3, 48, 48)?;
/// let grads = DeviceGradients::new(&mut dld, &mut dlb).with_x(&mut dx);
/// # Ok::<(), vera_kernels::Error>(())
/// ```
#[derive(Debug)]
pub struct DeviceGradients<'a, T> {
    /// `dL/dlambda_d`, `[1, r]`.
    pub lambda_d: &'a mut DeviceMatrix<f32>,
    /// `dL/dlambda_b`, `[1, m]`.
    pub lambda_b: &'a mut DeviceMatrix<f32>,
    /// `dL/dbias`, `[1, m]` (= `Σ_t dy`), when the adapter's bias is trained.
    pub bias: Option<&'a mut DeviceMatrix<f32>>,
    /// The adapter's part of `dL/dx`, `[T, n]`, in the activation dtype.
    pub x: Option<&'a mut DeviceMatrix<T>>,
}

impl<'a, T> DeviceGradients<'a, T> {
    /// The λ gradients only.
    pub fn new(lambda_d: &'a mut DeviceMatrix<f32>, lambda_b: &'a mut DeviceMatrix<f32>) -> Self {
        Self { lambda_d, lambda_b, bias: None, x: None }
    }

    /// Also the bias gradient, `[1, m]`.
    pub fn with_bias(self, bias: &'a mut DeviceMatrix<f32>) -> Self {
        Self { bias: Some(bias), ..self }
    }

    /// Also the adapter's part of `dx`, `[T, n]`.
    pub fn with_x(self, x: &'a mut DeviceMatrix<T>) -> Self {
        Self { x: Some(x), ..self }
    }
}

/// A stream's reusable backward scratch, all f32: `h`, `g`, the split partial sums and the row
/// tiles' column sums. Each grows on demand and is then reused.
#[derive(Default)]
pub(super) struct Workspace {
    buffers: [Option<WorkBuffer>; 4],
}

/// The buffers of one backward call, after its checks and with the workspace grown for it.
pub(crate) struct BackwardOperands<'a> {
    pub x: &'a Buffer,
    pub a: &'a Buffer,
    pub b: &'a Buffer,
    pub dy: &'a Buffer,
    pub lambda_d: &'a Buffer,
    pub lambda_b: &'a Buffer,
    /// `h`, `g`, the split partial sums, the column sums.
    pub workspace: [&'a mut WorkBuffer; 4],
    pub grad_lambda_d: &'a mut Buffer,
    pub grad_lambda_b: &'a mut Buffer,
    pub grad_bias: Option<&'a mut Buffer>,
    pub dx: Option<&'a mut Buffer>,
}

fn check_vector(what: &'static str, m: &DeviceMatrix<f32>, len: usize) -> Result<()> {
    if [m.rows, m.cols] == [1, len] {
        Ok(())
    } else {
        Err(Error::ShapeMismatch { what, expected: [1, len], actual: [m.rows, m.cols] })
    }
}

impl CudaStream {
    /// The fused VeRA backward pass for one layer on this stream, as the CPU
    /// [`backward`](crate::backward) computes it: from `x [T, n]` and `dy = dL/dy [T, m]`,
    ///
    /// ```text
    /// dlambda_b = Σ_t dy ⊙ v      g = (dy ⊙ lambda_b)·B      dlambda_d = Σ_t g ⊙ h
    /// dbias     = Σ_t dy          dx (+)= (g ⊙ lambda_d)·A
    /// ```
    ///
    /// with `h = x·Aᵀ` (recomputed: the GPU has no training forward yet) and `v = (lambda_d ⊙
    /// h)·Bᵀ`, never stored. With [`Mode::Accumulate`] every gradient is added to the buffer's
    /// contents, with [`Mode::Overwrite`] written over them. Everything between the inputs and
    /// `dx` stays in f32 (the left operands `lambda_d ⊙ h`, `dy ⊙ lambda_b`, `g ⊙ lambda_d` too);
    /// `dx` is rounded once into `T`. Every sum runs in a fixed order (no atomics): the same call
    /// gives the same bits every time on a given GPU (the k splits follow its SM count). The
    /// reference bound is [`reference::backward_error_bound`](crate::reference::backward_error_bound)
    /// with the default [`Numerics`](crate::Numerics). Asynchronous, like
    /// [`CudaStream::forward`]; a workspace of `T·r·(2 + splits) + ⌈T/64⌉·(2m + r)` f32 is kept by
    /// the stream.
    ///
    /// Errors (checked before anything is launched): as [`CudaStream::forward`], with `dy` in the
    /// place of `y`; [`Error::ShapeMismatch`] when a λ or bias gradient is not `[1, r]` / `[1, m]`
    /// or `dx` not `[T, n]`; [`Error::DeviceMismatch`] for a buffer of another device.
    pub fn backward<T: Element>(
        &self,
        projections: &DeviceProjections<T>,
        adapter: &DeviceAdapter,
        x: &DeviceMatrix<T>,
        dy: &DeviceMatrix<T>,
        grads: DeviceGradients<'_, T>,
        mode: Mode,
    ) -> Result<()> {
        let call = self.check_backward(projections, adapter, x, dy, &grads, mode)?;
        let (rows, n, r, m) = (x.rows, x.cols, projections.r, dy.cols);
        let plan = plan::plan(T::DTYPE, rows, n, r, m, grads.x.is_some(), self.device.multiprocessors());
        // At least one element each: a call without rows still passes (unread) addresses.
        let sizes = plan.workspace_bytes(rows, r, m)?.map(|bytes| bytes.max(4));
        let mut workspace = self.backward_workspace.lock().unwrap_or_else(|e| e.into_inner());
        let [h, g, part, columns] = &mut workspace.buffers;
        let workspace = [
            grow(h, &self.kind, sizes[0])?,
            grow(g, &self.kind, sizes[1])?,
            grow(part, &self.kind, sizes[2])?,
            grow(columns, &self.kind, sizes[3])?,
        ];
        let DeviceGradients { lambda_d, lambda_b, bias, x: dx } = grads;
        let ops = BackwardOperands {
            x: &x.buf,
            a: &projections.a,
            b: &projections.b,
            dy: &dy.buf,
            lambda_d: &adapter.lambda_d,
            lambda_b: &adapter.lambda_b,
            workspace,
            grad_lambda_d: &mut lambda_d.buf,
            grad_lambda_b: &mut lambda_b.buf,
            grad_bias: bias.map(|b| &mut b.buf),
            dx: dx.map(|d| &mut d.buf),
        };
        // SAFETY: `check_backward` checked every operand against the call's shapes (x and dy span
        // (rows-1)·ld + cols elements, A and B hold r·lda and m_max·ldb elements with n <= n_max
        // <= lda and m <= m_max, lambda_d r f32, lambda_b m, the gradients 1 x r, 1 x m, 1 x m
        // and T x n with their strides) and that all are on this stream's device; the workspace
        // was grown to the plan's sizes just above.
        unsafe { self.launch_backward(&plan, &call, ops) }
    }

    /// The checks of [`CudaStream::backward`], in the CPU's order: the layer within the
    /// projections, the shapes, the gradients' shapes, then that every buffer is on this stream's
    /// device and every size fits the kernels' 32-bit integers.
    fn check_backward<T: Element>(
        &self,
        projections: &DeviceProjections<T>,
        adapter: &DeviceAdapter,
        x: &DeviceMatrix<T>,
        dy: &DeviceMatrix<T>,
        grads: &DeviceGradients<'_, T>,
        mode: Mode,
    ) -> Result<BackwardCall> {
        let (t, n, m, r) = (x.rows, x.cols, dy.cols, projections.r);
        types::check_fits(n, m, projections.n_max, projections.m_max)?;
        let layer = LayerDims { r, n, m };
        let dims = AdapterDims { r: adapter.r, m: adapter.m };
        types::check_forward(layer, dims, [t, n], Some(([dy.rows, m], types::DY)))?;
        check_vector("gradient of lambda_d (must be [1, r])", grads.lambda_d, r)?;
        check_vector("gradient of lambda_b (must be [1, m])", grads.lambda_b, m)?;
        if let Some(bias) = &grads.bias {
            check_vector("gradient of the bias (must be [1, m])", bias, m)?;
        }
        if let Some(dx) = &grads.x {
            if [dx.rows, dx.cols] != [t, n] {
                return Err(Error::ShapeMismatch {
                    what: "dx (must be [T, in_features])",
                    expected: [t, n],
                    actual: [dx.rows, dx.cols],
                });
            }
        }
        let mut buffers = [
            (&projections.a, "projections"),
            (&adapter.lambda_d, "adapter"),
            (&adapter.lambda_b, "adapter"),
            (&x.buf, "x"),
            (&dy.buf, "dy"),
            (&grads.lambda_d.buf, "gradient of lambda_d"),
            (&grads.lambda_b.buf, "gradient of lambda_b"),
        ]
        .into_iter()
        .chain(grads.bias.as_ref().map(|b| (&b.buf, "gradient of the bias")))
        .chain(grads.x.as_ref().map(|d| (&d.buf, "dx")));
        if let Some((_, what)) = buffers.find(|(b, _)| !b.is_on(&self.kind)) {
            return Err(Error::DeviceMismatch { what });
        }
        Ok(BackwardCall {
            rows: to_i32(t, "rows of x")?,
            n: to_i32(n, "in_features")?,
            r: to_i32(r, "rank")?,
            m: to_i32(m, "out_features")?,
            ldx: to_i32(x.row_stride, "row stride of x")?,
            lda: to_i32(projections.lda, "padded row of A")?,
            ldb: to_i32(projections.ldb, "padded row of B")?,
            lddy: to_i32(dy.row_stride, "row stride of dy")?,
            lddx: to_i32(grads.x.as_ref().map_or(0, |d| d.row_stride), "row stride of dx")?,
            accumulate: mode == Mode::Accumulate,
        })
    }

    /// Launches the plan's kernels on this stream's backend.
    ///
    /// # Safety
    /// Every operand must hold what the kernels read or write for `call` and `plan` (see
    /// [`CudaStream::backward`], which checks it).
    unsafe fn launch_backward(
        &self,
        plan: &BackwardPlan,
        call: &BackwardCall,
        ops: BackwardOperands<'_>,
    ) -> Result<()> {
        match &self.kind {
            #[cfg(feature = "cuda")]
            StreamKind::Driver(stream) => {
                let gpu = self.device.gpu()?;
                // SAFETY: this function's own obligations, passed on unchanged.
                unsafe { super::driver::backward(gpu, stream, plan, call, ops) }
            }
            #[cfg(feature = "cuda-emulation")]
            StreamKind::Emulated => {
                // SAFETY: this function's own obligations, passed on unchanged.
                unsafe { super::emulator::backward(plan, call, ops) }
            }
        }
    }
}
