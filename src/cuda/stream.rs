//! The stream: [`CudaStream`], on which all work is issued: the uploads of matrices, projections,
//! adapters, banks and row maps, the downloads, and the forward calls, each planned and launched on
//! the stream's backend (the GPU's driver or the emulator).

use std::marker::PhantomData;
#[cfg(feature = "cuda")]
use std::sync::Arc;
use std::sync::Mutex;

use crate::adapter::Adapter;
use crate::bank::AdapterBank;
use crate::dtype::Element;
use crate::error::{Error, Result};
use crate::mat::{MatMut, MatRef};
use crate::types::Mode;

#[cfg(feature = "cuda")]
use super::buffer;
use super::buffer::Buffer;
#[cfg(feature = "cuda")]
use super::driver;
#[cfg(feature = "cuda-emulation")]
use super::emulator;
use super::forward::{Operands, ScaleBuffers, Workspace, WorkspaceSizes};
use super::params::{to_i32, Call};
use super::plan::{self, Plan};
use super::{CudaDevice, DeviceAdapter, DeviceAdapterBank, DeviceMatrix, DeviceProjections, DeviceRowMap};

/// Where a stream's work runs.
pub(crate) enum StreamKind {
    #[cfg(feature = "cuda")]
    Driver(Arc<cudarc::driver::CudaStream>),
    #[cfg(feature = "cuda-emulation")]
    Emulated,
}

/// A stream of work on a [`CudaDevice`]. Calls on one stream run in order; results are ready on the
/// host after [`CudaStream::synchronize`] or any download.
///
/// Each stream keeps one reusable workspace (`u`, `T · r` elements; the down-projection's split
/// partial sums, `splits · T · r` f32; a few counters), grown on demand, so forward calls do not
/// allocate once it is large enough; [`CudaStream::backward`] keeps its own likewise.
pub struct CudaStream {
    pub(super) device: CudaDevice,
    pub(super) kind: StreamKind,
    pub(super) workspace: Mutex<Workspace>,
    /// The backward's f32 scratch (`h`, `g`, split and column sums), grown on demand.
    pub(super) backward_workspace: Mutex<super::backward::Workspace>,
}

impl std::fmt::Debug for CudaStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaStream").field("device", &self.device).finish()
    }
}

/// Rounds a row length up to a multiple of 8 elements (16 bytes for 16-bit types, 32 for f32).
fn padded(len: usize) -> Result<usize> {
    len.checked_next_multiple_of(8).ok_or(Error::SizeOverflow { what: "padded projection row" })
}

fn byte_len<T>(elements: usize, what: &'static str) -> Result<usize> {
    elements.checked_mul(std::mem::size_of::<T>()).ok_or(Error::SizeOverflow { what })
}

impl CudaStream {
    /// A stream of `device` running on `kind`, with empty workspaces.
    pub(super) fn with_kind(device: CudaDevice, kind: StreamKind) -> Self {
        CudaStream {
            device,
            kind,
            workspace: Mutex::new(Workspace::default()),
            backward_workspace: Mutex::new(super::backward::Workspace::default()),
        }
    }

    /// The device this stream belongs to.
    pub fn device(&self) -> &CudaDevice {
        &self.device
    }

    /// Waits until all work issued on this stream has finished.
    pub fn synchronize(&self) -> Result<()> {
        match &self.kind {
            #[cfg(feature = "cuda")]
            StreamKind::Driver(s) => s.synchronize().map_err(buffer::driver("synchronize")),
            #[cfg(feature = "cuda-emulation")]
            StreamKind::Emulated => Ok(()),
        }
    }

    /// Copies a host matrix to the device, keeping its row stride (the copy covers the rows' span).
    pub fn upload<T: Element>(&self, m: MatRef<'_, T>) -> Result<DeviceMatrix<T>> {
        let span = crate::mat::span("device matrix", m.rows(), m.cols(), m.row_stride())?;
        let mut host = vec![T::default(); span];
        for i in 0..m.rows() {
            let start = i * m.row_stride();
            host[start..start + m.cols()].copy_from_slice(m.row_unchecked(i));
        }
        let buf = Buffer::from_host(&self.kind, bytemuck::cast_slice(&host))?;
        Ok(DeviceMatrix { buf, rows: m.rows(), cols: m.cols(), row_stride: m.row_stride(), _t: PhantomData })
    }

    /// A zero `rows × cols` matrix with rows `row_stride` elements apart (`row_stride >= cols`).
    pub fn zeros<T: Element>(&self, rows: usize, cols: usize, row_stride: usize) -> Result<DeviceMatrix<T>> {
        let span = crate::mat::span("device matrix", rows, cols, row_stride)?;
        let buf = Buffer::zeros(&self.kind, byte_len::<T>(span, "device matrix bytes")?)?;
        Ok(DeviceMatrix { buf, rows, cols, row_stride, _t: PhantomData })
    }

    /// Copies a device matrix into a host matrix of the same shape (waits for the stream).
    pub fn download<T: Element>(&self, m: &DeviceMatrix<T>, mut out: MatMut<'_, T>) -> Result<()> {
        if [out.rows(), out.cols()] != [m.rows, m.cols] {
            return Err(Error::ShapeMismatch {
                what: "download destination (must match the device matrix)",
                expected: [m.rows, m.cols],
                actual: [out.rows(), out.cols()],
            });
        }
        let mut host = vec![T::default(); m.span()];
        m.buf.read(&self.kind, bytemuck::cast_slice_mut(&mut host))?;
        for i in 0..m.rows {
            let start = i * m.row_stride;
            out.row_mut(i).expect("row < rows").copy_from_slice(&host[start..start + m.cols]);
        }
        Ok(())
    }

    /// A device matrix copied to a new dense host vector (`rows · cols`, row-major).
    pub fn to_host<T: Element>(&self, m: &DeviceMatrix<T>) -> Result<Vec<T>> {
        let mut out = vec![T::default(); m.rows * m.cols];
        self.download(m, MatMut::from_slice(&mut out, m.rows, m.cols)?)?;
        Ok(out)
    }

    /// Copies and packs the shared projections A `[r, n_max]` and B `[m_max, r]` to the device,
    /// once per model: `stream.upload_projections(projections.a(), projections.b())` for a
    /// [`Projections`](crate::Projections), or any views of A and B.
    ///
    /// Errors: [`Error::ZeroRank`] when A has no rows, [`Error::RankMismatch`] when B's columns
    /// differ from A's rows, [`Error::SizeOverflow`] when a size does not fit the kernels' 32-bit
    /// indices.
    pub fn upload_projections<T: Element>(&self, a: MatRef<'_, T>, b: MatRef<'_, T>) -> Result<DeviceProjections<T>> {
        let (r, n_max, m_max) = (a.rows(), a.cols(), b.rows());
        if r == 0 {
            return Err(Error::ZeroRank);
        }
        if b.cols() != r {
            return Err(Error::RankMismatch { what: "B's columns", expected: r, actual: b.cols() });
        }
        let (lda, ldb) = (padded(n_max)?, padded(r)?);
        for (v, what) in [(r, "rank"), (lda, "n_max"), (m_max, "m_max")] {
            to_i32(v, what)?;
        }
        let pack = |src: MatRef<'_, T>, ld: usize| -> Result<Buffer> {
            let mut host = vec![T::default(); src.rows() * ld];
            for i in 0..src.rows() {
                host[i * ld..i * ld + src.cols()].copy_from_slice(src.row_unchecked(i));
            }
            Buffer::from_host(&self.kind, bytemuck::cast_slice(&host))
        };
        Ok(DeviceProjections { a: pack(a, lda)?, b: pack(b, ldb)?, r, n_max, m_max, lda, ldb, _t: PhantomData })
    }

    /// Copies one layer's adapter (lambdas and bias, f32) to the device.
    pub fn upload_adapter(&self, adapter: &Adapter) -> Result<DeviceAdapter> {
        let up = |v: &[f32]| Buffer::from_host(&self.kind, bytemuck::cast_slice(v));
        Ok(DeviceAdapter {
            lambda_d: up(adapter.lambda_d())?,
            lambda_b: up(adapter.lambda_b())?,
            bias: adapter.bias().map(up).transpose()?,
            r: adapter.rank(),
            m: adapter.out_features(),
        })
    }

    /// Copies one layer's [`AdapterBank`] (every adapter's lambdas, and the biases with a flag per
    /// adapter, f32) to the device, for [`CudaStream::forward_mixed`].
    ///
    /// Errors: [`Error::SizeOverflow`] when a table (`K·r` or `K·m` values) does not fit the
    /// kernels' 32-bit indices; [`Error::Cuda`] when a copy fails.
    pub fn upload_bank(&self, bank: &AdapterBank) -> Result<DeviceAdapterBank> {
        to_i32(bank.lambda_d().len(), "lambda_d table of the adapter bank (K·r)")?;
        to_i32(bank.lambda_b().len(), "lambda_b table of the adapter bank (K·m)")?;
        let up = |v: &[f32]| Buffer::from_host(&self.kind, bytemuck::cast_slice(v));
        let (bias, has_bias) = match bank.bias_table() {
            [] => (None, None),
            table => {
                let flags: Vec<i32> = bank.has_bias().iter().map(|&b| i32::from(b)).collect();
                (Some(up(table)?), Some(Buffer::from_host(&self.kind, bytemuck::cast_slice(&flags))?))
            }
        };
        Ok(DeviceAdapterBank {
            lambda_d: up(bank.lambda_d())?,
            lambda_b: up(bank.lambda_b())?,
            bias,
            has_bias,
            k: bank.len(),
            r: bank.rank(),
            m: bank.out_features(),
        })
    }

    /// Copies a batch's row → adapter map (one index per token row: an adapter of the bank, or
    /// [`NO_ADAPTER`](crate::NO_ADAPTER)) to the device, for [`CudaStream::forward_mixed`]. Upload
    /// it once per batch and pass it to every layer's call: the calls then only launch kernels.
    ///
    /// The indices are checked by each call against its bank (the map does not know the bank), so
    /// this does not fail on them; errors: [`Error::Cuda`] when the copy fails.
    pub fn upload_row_map(&self, rows: &[i32]) -> Result<DeviceRowMap> {
        Ok(DeviceRowMap { buf: Buffer::from_host(&self.kind, bytemuck::cast_slice(rows))?, rows: rows.to_vec() })
    }

    /// The fused VeRA forward pass on this stream: `y (+)= lambda_b ⊙ ((lambda_d ⊙ (x·Aᵀ))·Bᵀ) +
    /// bias` with `x [T, n]`, `y [T, m]` and the layer's `A[:, :n]`, `B[:m, :]` sliced from
    /// `projections`, as the CPU [`forward`](crate::forward) computes it. Asynchronous: the result is
    /// in `y` once the stream has reached this point (see [`CudaStream::synchronize`]).
    ///
    /// Errors (checked before anything is launched): [`Error::LayerExceedsProjections`],
    /// [`Error::RankMismatch`], [`Error::LengthMismatch`] and [`Error::ShapeMismatch`] as on the CPU;
    /// [`Error::DeviceMismatch`] when a buffer belongs to another device; [`Error::SizeOverflow`]
    /// when a size or stride does not fit the kernels' 32-bit indices; [`Error::Cuda`] when a launch
    /// fails.
    pub fn forward<T: Element>(
        &self,
        projections: &DeviceProjections<T>,
        adapter: &DeviceAdapter,
        x: &DeviceMatrix<T>,
        y: &mut DeviceMatrix<T>,
        mode: Mode,
    ) -> Result<()> {
        let call = self.check_forward(projections, adapter, x, y, mode)?;
        // SAFETY: `check_forward` checked the call: lambda_d holds r f32, lambda_b and the bias m.
        unsafe { self.run(projections, ScaleBuffers::adapter(adapter), &call, x, y) }
    }

    /// The fused VeRA forward pass of a mixed-adapter batch on this stream, as the CPU
    /// [`forward_mixed`](crate::forward_mixed) computes it: for every row `t` of `x [T, n]`,
    /// `y[t] (+)= bank[rows[t]](x[t])`, where a row whose index is
    /// [`NO_ADAPTER`](crate::NO_ADAPTER) is left as it is under [`Mode::Accumulate`] and set to
    /// zero under [`Mode::Overwrite`]. The same two kernels as [`CudaStream::forward`] at the same
    /// cost (both products once over all rows); each row reads its own adapter's scales. Row for
    /// row, the result has the bits of a [`CudaStream::forward`] call with that row's adapter on
    /// the same shapes. Asynchronous, and like [`CudaStream::forward`] it only launches kernels:
    /// the row map is already on the device ([`CudaStream::upload_row_map`], once per batch; a
    /// copy per call from pageable host memory could make the host wait for the stream).
    ///
    /// Errors (checked before anything is launched): as [`CudaStream::forward`], with the bank in
    /// the place of the adapter; [`Error::LengthMismatch`] when `rows` does not map every row of
    /// `x`; [`Error::AdapterIndex`] for an index outside `0..bank.len()` other than `NO_ADAPTER`;
    /// [`Error::DeviceMismatch`] for a bank or row map of another device.
    pub fn forward_mixed<T: Element>(
        &self,
        projections: &DeviceProjections<T>,
        bank: &DeviceAdapterBank,
        rows: &DeviceRowMap,
        x: &DeviceMatrix<T>,
        y: &mut DeviceMatrix<T>,
        mode: Mode,
    ) -> Result<()> {
        let call = self.check_forward_mixed(projections, bank, rows, x, y, mode)?;
        // SAFETY: `check_forward_mixed` checked the call: the bank's tables hold K·r (lambda_d) and
        // K·m (lambda_b, the bias) f32 and K flags; the row map holds one index per row of x, each
        // in 0..K or NO_ADAPTER.
        unsafe { self.run(projections, ScaleBuffers::bank(bank, rows), &call, x, y) }
    }

    /// Plans a checked call, grows the workspace for it, and launches its two kernels.
    ///
    /// # Safety
    /// `call` must come from the checks of `projections`, `x`, `y` and the adapter (or bank and
    /// row map) behind `scales`, so that `scales` hold what the kernels read for it.
    unsafe fn run<T: Element>(
        &self,
        projections: &DeviceProjections<T>,
        scales: ScaleBuffers<'_>,
        call: &Call,
        x: &DeviceMatrix<T>,
        y: &mut DeviceMatrix<T>,
    ) -> Result<()> {
        if call.is_empty() {
            return Ok(());
        }
        let (rows, r) = (x.rows, projections.r);
        let plan =
            plan::plan(T::DTYPE, rows, x.cols, r, y.cols, self.device.multiprocessors(), plan::Options::from_env());
        let sizes = WorkspaceSizes::new(&plan, rows, r, std::mem::size_of::<T>())?;
        let mut workspace = self.workspace.lock().unwrap_or_else(|e| e.into_inner());
        let operands = Operands::new(projections, scales, x, y, workspace.reserve(&self.kind, sizes)?);
        // SAFETY: the call's checks (the caller's obligation) checked the operands against its
        // shapes (and each backend refuses a buffer of the other kind): x and y span
        // (rows-1)·ld + cols elements (built by `upload`/`zeros`), A and B hold r·lda and
        // m_max·ldb elements with n <= n_max <= lda and m <= m_max, and the scales what the caller
        // says. `reserve` grew the workspace to the plan's `sizes`: splits·rows·r f32 partial
        // sums, rows·ldu elements of u, and one counter per group, zero (new, or set back to zero
        // by the call that last used them).
        let launched = unsafe { self.launch(&plan, call, operands) };
        if launched.is_err() {
            workspace.reset_counters();
        }
        launched
    }

    /// Launches the plan's two kernels on this stream's backend, which supplies the operands'
    /// addresses to the shared parameter fill.
    ///
    /// # Safety
    /// Every operand must hold what the kernels read or write for `call` and `plan` (see
    /// [`CudaStream::forward`], which checks it).
    unsafe fn launch(&self, plan: &Plan, call: &Call, operands: Operands<'_>) -> Result<()> {
        match &self.kind {
            #[cfg(feature = "cuda")]
            StreamKind::Driver(stream) => {
                let gpu = self.device.gpu()?;
                // SAFETY: this function's own obligations, passed on unchanged.
                unsafe { driver::forward(gpu, stream, plan, call, operands) }
            }
            #[cfg(feature = "cuda-emulation")]
            StreamKind::Emulated => {
                // SAFETY: this function's own obligations, passed on unchanged.
                unsafe { emulator::forward(plan, call, operands) }
            }
        }
    }
}
