//! The GPU half of the crate: the fused VeRA forward pass on NVIDIA GPUs, with this crate's own CUDA
//! kernels (`kernels/*.cu`, compiled by build.rs into one fatbin for sm_80 / sm_90 + compute_80 PTX).
//!
//! - [`CudaDevice::new`] opens a GPU through the driver, loaded at run time (cudarc, dynamic
//!   loading): on a machine without the driver or without a GPU it returns
//!   [`Error::NoCudaDevice`], never panics. With feature `cuda-emulation`,
//!   [`CudaDevice::emulated`] gives the same API backed by a CPU emulation of the same kernels (slow;
//!   for tests on machines without a GPU).
//! - Work is issued on a [`CudaStream`] (the device's default stream, or [`CudaDevice::new_stream`]).
//!   Host↔device copies happen only in the calls that say so ([`CudaStream::upload`],
//!   [`CudaStream::download`], ...); [`CudaStream::forward`] and [`CudaStream::forward_mixed`] only
//!   launch kernels.
//!   [`CudaStream::timer`] measures the device time of work on a stream with CUDA events.
//! - [`DeviceProjections`] holds the shared A and B once per model, packed (rows padded to 16 bytes)
//!   for the kernels; every layer's forward slices it, like [`Projections::slice`](crate::Projections::slice).
//!   [`DeviceAdapter`] holds one layer's lambdas and bias (f32). [`DeviceMatrix`] holds `x` and `y`
//!   with any row stride.
//! - Mixed-adapter batches, as the CPU [`forward_mixed`](crate::forward_mixed):
//!   [`DeviceAdapterBank`] holds one layer's [`AdapterBank`], [`DeviceRowMap`] a batch's row →
//!   adapter map (uploaded once per batch and used by every layer), and
//!   [`CudaStream::forward_mixed`] runs the same two kernels as [`CudaStream::forward`], each row
//!   with its own adapter's scales.
//!
//! Semantics are those of the CPU [`forward`](crate::forward): `y (+)= lambda_b ⊙ ((lambda_d ⊙
//! (x·Aᵀ))·Bᵀ) + bias`, [`Mode::Accumulate`] or [`Mode::Overwrite`], the same validation errors, and
//! deterministic results (no atomics; every sum in a fixed order), so the same call gives the same
//! bits every time on a given GPU. Numerics: f32 accumulation everywhere; for f16/bf16 the prefill
//! path (more than 8 token rows) rounds `u = lambda_d ⊙ (x·Aᵀ)` to the activation dtype before the
//! tensor-core up-projection, as PEFT does; [`reference::forward_error_bound_cuda`] is the bound
//! the kernels are tested against.
//!
//! Kernels: for up to 8 token rows (decode), split-K matrix-vector products with 16-byte loads that
//! stream A and B once (the down-projection writes per-split partial sums; the up-projection sums
//! them in order, applies lambda_d, and fuses lambda_b, bias and the base add in its epilogue); for
//! more rows (prefill), 64×64 tiles on tensor cores (`mma.sync` m16n8k16, bf16/f16 → f32, fed by a
//! 3-stage `cp.async` pipeline and `ldmatrix`) or on CUDA cores for f32.
//!
//! [`reference::forward_error_bound_cuda`]: crate::reference::forward_error_bound_cuda

mod buffer;
#[cfg(feature = "cuda")]
mod driver;
#[cfg(feature = "cuda-emulation")]
mod emulator;
mod forward;
mod params;
mod plan;

use std::marker::PhantomData;
use std::sync::{Arc, Mutex};

use crate::adapter::Adapter;
use crate::bank::AdapterBank;
use crate::dtype::Element;
use crate::error::{Error, Result};
use crate::mat::{MatMut, MatRef};
use crate::types::Mode;

use buffer::Buffer;
use forward::{Operands, ScaleBuffers, Workspace, WorkspaceSizes};
use params::{to_i32, Call};
use plan::Plan;

/// Streaming multiprocessors assumed by the emulated device when it plans launches (an H100/H200's
/// count, so that the emulator runs the same split-K plans a real GPU gets).
#[cfg(feature = "cuda-emulation")]
const EMULATED_SMS: usize = 132;

/// L2 cache reported by the emulated device: an H100/H200's 50 MiB, so that code sized by
/// [`CudaDevice::l2_cache_bytes`] runs the same way there.
#[cfg(feature = "cuda-emulation")]
const EMULATED_L2_BYTES: usize = 50 << 20;

/// A CUDA device: a GPU opened through the driver, or (feature `cuda-emulation`) the CPU emulation
/// of one. Cheap to clone; clones share the device.
#[derive(Clone)]
pub struct CudaDevice {
    inner: Arc<DeviceKind>,
}

enum DeviceKind {
    #[cfg(feature = "cuda")]
    Driver(driver::Gpu),
    #[cfg(feature = "cuda-emulation")]
    Emulated,
}

/// Where a stream's work runs.
pub(crate) enum StreamKind {
    #[cfg(feature = "cuda")]
    Driver(Arc<cudarc::driver::CudaStream>),
    #[cfg(feature = "cuda-emulation")]
    Emulated,
}

impl std::fmt::Debug for CudaDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaDevice").field("name", &self.name()).finish()
    }
}

impl CudaDevice {
    /// Opens GPU number `ordinal` and loads this crate's kernels into it.
    ///
    /// Errors: [`Error::NoCudaDevice`] when the CUDA driver library cannot be loaded, reports no
    /// device, or has no device `ordinal`; [`Error::Cuda`] when the kernels cannot be loaded (e.g. a
    /// driver older than CUDA 13.0 for a GPU without matching SASS). Without feature `cuda` (only
    /// `cuda-emulation`) this always returns [`Error::NoCudaDevice`].
    pub fn new(ordinal: usize) -> Result<Self> {
        #[cfg(feature = "cuda")]
        {
            driver::Gpu::open(ordinal).map(|gpu| CudaDevice { inner: Arc::new(DeviceKind::Driver(gpu)) })
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = ordinal;
            Err(Error::NoCudaDevice { reason: "this build of vera-kernels has no `cuda` feature".into() })
        }
    }

    /// The CPU emulation of a CUDA device: the same kernels, compiled for the host and run one CUDA
    /// thread at a time. Orders of magnitude slower than a GPU; for testing on machines without one.
    #[cfg(feature = "cuda-emulation")]
    pub fn emulated() -> Self {
        CudaDevice { inner: Arc::new(DeviceKind::Emulated) }
    }

    /// Whether this is the CPU emulation rather than a GPU.
    pub fn is_emulated(&self) -> bool {
        match &*self.inner {
            #[cfg(feature = "cuda")]
            DeviceKind::Driver(_) => false,
            #[cfg(feature = "cuda-emulation")]
            DeviceKind::Emulated => true,
        }
    }

    /// The device's name as the driver reports it (`"CPU emulation"` for the emulated device).
    pub fn name(&self) -> String {
        match &*self.inner {
            #[cfg(feature = "cuda")]
            DeviceKind::Driver(gpu) => gpu.name(),
            #[cfg(feature = "cuda-emulation")]
            DeviceKind::Emulated => "CPU emulation".into(),
        }
    }

    /// The device's default stream.
    pub fn stream(&self) -> CudaStream {
        let kind = match &*self.inner {
            #[cfg(feature = "cuda")]
            DeviceKind::Driver(gpu) => StreamKind::Driver(gpu.default_stream()),
            #[cfg(feature = "cuda-emulation")]
            DeviceKind::Emulated => StreamKind::Emulated,
        };
        CudaStream { device: self.clone(), kind, workspace: Mutex::new(Workspace::default()) }
    }

    /// A new stream on this device (work on different streams may overlap).
    pub fn new_stream(&self) -> Result<CudaStream> {
        let kind = match &*self.inner {
            #[cfg(feature = "cuda")]
            DeviceKind::Driver(gpu) => StreamKind::Driver(gpu.new_stream()?),
            #[cfg(feature = "cuda-emulation")]
            DeviceKind::Emulated => StreamKind::Emulated,
        };
        Ok(CudaStream { device: self.clone(), kind, workspace: Mutex::new(Workspace::default()) })
    }

    /// The device's L2 cache in bytes, as the driver reports it (50 MiB for the emulated device).
    /// Benchmarks size their working sets by it, e.g. to time calls whose operands are not in L2.
    pub fn l2_cache_bytes(&self) -> usize {
        match &*self.inner {
            #[cfg(feature = "cuda")]
            DeviceKind::Driver(gpu) => gpu.l2_cache_bytes(),
            #[cfg(feature = "cuda-emulation")]
            DeviceKind::Emulated => EMULATED_L2_BYTES,
        }
    }

    fn multiprocessors(&self) -> usize {
        match &*self.inner {
            #[cfg(feature = "cuda")]
            DeviceKind::Driver(gpu) => gpu.multiprocessors(),
            #[cfg(feature = "cuda-emulation")]
            DeviceKind::Emulated => EMULATED_SMS,
        }
    }

    /// The GPU behind this device; [`Error::DeviceMismatch`] for the emulated device (which a
    /// stream of a GPU never belongs to).
    #[cfg(feature = "cuda")]
    fn gpu(&self) -> Result<&driver::Gpu> {
        match &*self.inner {
            DeviceKind::Driver(gpu) => Ok(gpu),
            #[cfg(feature = "cuda-emulation")]
            DeviceKind::Emulated => Err(Error::DeviceMismatch { what: "stream" }),
        }
    }
}

/// A stream of work on a [`CudaDevice`]. Calls on one stream run in order; results are ready on the
/// host after [`CudaStream::synchronize`] or any download.
///
/// Each stream keeps one reusable workspace (`u`, `T · r` elements; the down-projection's split
/// partial sums, `splits · T · r` f32; a few counters), grown on demand, so forward calls do not
/// allocate once it is large enough.
pub struct CudaStream {
    device: CudaDevice,
    kind: StreamKind,
    workspace: Mutex<Workspace>,
}

impl std::fmt::Debug for CudaStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaStream").field("device", &self.device).finish()
    }
}

/// A matrix in device memory: `rows × cols` elements of `T`, row `i` starting at element
/// `i · row_stride`.
pub struct DeviceMatrix<T> {
    buf: Buffer,
    rows: usize,
    cols: usize,
    row_stride: usize,
    _t: PhantomData<T>,
}

impl<T: Element> DeviceMatrix<T> {
    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Number of columns.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Elements from the start of one row to the start of the next.
    pub fn row_stride(&self) -> usize {
        self.row_stride
    }

    fn span(&self) -> usize {
        // Checked when the matrix was made (`upload` / `zeros`), so it cannot fail here.
        crate::mat::span("device matrix", self.rows, self.cols, self.row_stride).expect("checked at construction")
    }
}

impl<T> std::fmt::Debug for DeviceMatrix<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceMatrix")
            .field("rows", &self.rows)
            .field("cols", &self.cols)
            .field("row_stride", &self.row_stride)
            .finish()
    }
}

/// The shared projections A `[r, n_max]` and B `[m_max, r]` in device memory, packed once for the
/// kernels (each row padded with zeros to a multiple of 16 bytes) and shared by every layer.
pub struct DeviceProjections<T> {
    a: Buffer,
    b: Buffer,
    r: usize,
    n_max: usize,
    m_max: usize,
    lda: usize,
    ldb: usize,
    _t: PhantomData<T>,
}

impl<T> DeviceProjections<T> {
    /// The rank `r`.
    pub fn rank(&self) -> usize {
        self.r
    }

    /// The largest `in_features` a layer may have.
    pub fn n_max(&self) -> usize {
        self.n_max
    }

    /// The largest `out_features` a layer may have.
    pub fn m_max(&self) -> usize {
        self.m_max
    }
}

impl<T> std::fmt::Debug for DeviceProjections<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceProjections")
            .field("r", &self.r)
            .field("n_max", &self.n_max)
            .field("m_max", &self.m_max)
            .finish()
    }
}

/// One layer's `lambda_d [r]`, `lambda_b [m]` and optional bias `[m]` in device memory (f32).
pub struct DeviceAdapter {
    lambda_d: Buffer,
    lambda_b: Buffer,
    bias: Option<Buffer>,
    r: usize,
    m: usize,
}

impl DeviceAdapter {
    /// The rank `r` (length of `lambda_d`).
    pub fn rank(&self) -> usize {
        self.r
    }

    /// The layer's `out_features` (length of `lambda_b`).
    pub fn out_features(&self) -> usize {
        self.m
    }

    /// Whether the adapter has a bias.
    pub fn has_bias(&self) -> bool {
        self.bias.is_some()
    }
}

impl std::fmt::Debug for DeviceAdapter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceAdapter").field("r", &self.r).field("m", &self.m).field("bias", &self.has_bias()).finish()
    }
}

/// One layer's [`AdapterBank`] in device memory (f32): `lambda_d [K, r]`, `lambda_b [K, m]` and,
/// when any adapter has a bias, the bias table `[K, m]` with a flag per adapter, for
/// [`CudaStream::forward_mixed`]. Made by [`CudaStream::upload_bank`].
pub struct DeviceAdapterBank {
    lambda_d: Buffer,
    lambda_b: Buffer,
    bias: Option<Buffer>,
    /// `[K]` i32, non-zero for an adapter with a bias; present with `bias`.
    has_bias: Option<Buffer>,
    k: usize,
    r: usize,
    m: usize,
}

impl DeviceAdapterBank {
    /// The number of adapters `K`.
    pub fn len(&self) -> usize {
        self.k
    }

    /// Always `false`: a bank holds at least one adapter.
    pub fn is_empty(&self) -> bool {
        self.k == 0
    }

    /// The rank `r` shared by every adapter.
    pub fn rank(&self) -> usize {
        self.r
    }

    /// The layer's `out_features` `m`.
    pub fn out_features(&self) -> usize {
        self.m
    }
}

impl std::fmt::Debug for DeviceAdapterBank {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceAdapterBank")
            .field("k", &self.k)
            .field("r", &self.r)
            .field("m", &self.m)
            .field("bias", &self.bias.is_some())
            .finish()
    }
}

/// A batch's row → adapter map in device memory, for [`CudaStream::forward_mixed`]: one `i32` per
/// token row, an index into the layer's [`DeviceAdapterBank`] or [`NO_ADAPTER`](crate::NO_ADAPTER).
/// Made by [`CudaStream::upload_row_map`], once per batch: every layer's call of that batch uses it
/// (the banks of all layers index the same adapters). It keeps a host copy, against which each call
/// checks the indices before it launches anything.
pub struct DeviceRowMap {
    buf: Buffer,
    rows: Vec<i32>,
}

impl DeviceRowMap {
    /// The number of token rows it maps.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// Whether it maps no rows.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The map, as uploaded (the host copy).
    pub fn rows(&self) -> &[i32] {
        &self.rows
    }
}

impl std::fmt::Debug for DeviceRowMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceRowMap").field("rows", &self.rows.len()).finish()
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
        let plan = plan::plan(T::DTYPE, rows, x.cols, r, y.cols, self.device.multiprocessors());
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

/// Measures the device time of work issued on one stream: on a GPU with a pair of CUDA timing
/// events recorded around the work (so host-side time outside the stream's work is not counted,
/// but gaps in the stream while the host is still launching are); on the emulated device, which
/// runs work as it is issued, with the host clock. Made by [`CudaStream::timer`], reused for every
/// measurement.
pub struct StreamTimer<'s> {
    stream: &'s CudaStream,
    clock: TimerClock,
}

enum TimerClock {
    #[cfg(feature = "cuda")]
    Events(driver::TimingEvents),
    #[cfg(feature = "cuda-emulation")]
    Host,
}

impl std::fmt::Debug for StreamTimer<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamTimer").field("stream", self.stream).finish()
    }
}

impl StreamTimer<'_> {
    /// Runs `work`, which must issue its work on this timer's stream, and returns the device time
    /// from the start of that work to its end, in milliseconds. Waits for the work to finish.
    ///
    /// Errors: whatever `work` returns, or [`Error::Cuda`] when an event cannot be recorded or read.
    pub fn time_ms(&mut self, work: impl FnOnce() -> Result<()>) -> Result<f64> {
        match (&self.clock, &self.stream.kind) {
            #[cfg(feature = "cuda")]
            (TimerClock::Events(events), StreamKind::Driver(stream)) => {
                events.record_start(stream)?;
                work()?;
                events.record_end(stream)?;
                events.elapsed_ms()
            }
            #[cfg(feature = "cuda-emulation")]
            (TimerClock::Host, StreamKind::Emulated) => {
                let start = std::time::Instant::now();
                work()?;
                Ok(start.elapsed().as_secs_f64() * 1e3)
            }
            // `CudaStream::timer` makes the clock of the stream's kind.
            #[allow(unreachable_patterns)]
            _ => Err(Error::DeviceMismatch { what: "timer" }),
        }
    }
}

impl CudaStream {
    /// A timer for work on this stream (see [`StreamTimer`]): how `vera bench --device cuda` times
    /// each call.
    ///
    /// Errors: [`Error::Cuda`] when the timing events cannot be created.
    pub fn timer(&self) -> Result<StreamTimer<'_>> {
        let clock = match &self.kind {
            #[cfg(feature = "cuda")]
            StreamKind::Driver(stream) => TimerClock::Events(driver::TimingEvents::new(stream)?),
            #[cfg(feature = "cuda-emulation")]
            StreamKind::Emulated => TimerClock::Host,
        };
        Ok(StreamTimer { stream: self, clock })
    }

    /// Measures this device's memory bandwidth with device-to-device copies of `bytes` bytes:
    /// `2 · bytes` (read and write) per copy over the median copy time (device events), in GB/s.
    /// The roofline that `vera bench --device cuda --peak` holds decode cases against.
    pub fn measure_copy_gbps(&self, bytes: usize) -> Result<f64> {
        let bytes = bytes.max(1 << 20);
        let src = Buffer::zeros(&self.kind, bytes)?;
        let mut dst = Buffer::zeros(&self.kind, bytes)?;
        let mut timer = self.timer()?;
        let mut times = Vec::new();
        for round in 0..12 {
            let ms = timer.time_ms(|| src.copy_to(&mut dst, &self.kind))?;
            // The first rounds warm the allocation and the clocks up.
            if round >= 2 {
                times.push(ms);
            }
        }
        times.sort_by(f64::total_cmp);
        Ok(2.0 * bytes as f64 / (times[times.len() / 2] * 1e-3) / 1e9)
    }
}
