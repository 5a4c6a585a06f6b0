//! The GPU half of the crate: the fused VeRA forward pass on NVIDIA GPUs, with this crate's own CUDA
//! kernels (`kernels/*.cu`, compiled by build.rs into one fatbin for sm_80 / sm_90 + compute_80 PTX).
//!
//! - [`CudaDevice::new`] opens a GPU through the driver, loaded at run time (cudarc, dynamic
//!   loading): on a machine without the driver or without a GPU it returns
//!   [`Error::NoCudaDevice`], never panics. With feature `cuda-emulation`,
//!   [`CudaDevice::emulated`] gives the same API backed by a CPU emulation of the same kernels (slow;
//!   for tests on machines without a GPU).
//! - Work is issued on a [`CudaStream`] (the device's own stream, [`CudaDevice::stream`], or one of
//!   [`CudaDevice::new_stream`]).
//!   Host↔device copies happen only in the calls that say so ([`CudaStream::upload`],
//!   [`CudaStream::download`], ...); [`CudaStream::forward`] and [`CudaStream::forward_mixed`] only
//!   launch kernels.
//!   [`CudaStream::timer`] measures the device time of work on a stream with CUDA events.
//! - [`DeviceProjections`] holds the shared A and B once per model, packed (rows padded to 16 bytes)
//!   for the kernels; every layer's forward slices it, like [`Projections::slice`](crate::Projections::slice).
//!   [`DeviceAdapter`] holds one layer's lambdas and bias (f32). [`DeviceMatrix`] holds `x` and `y`
//!   with any row stride.
//! - Training: [`CudaStream::backward`] is the fused backward pass of the CPU
//!   [`backward`](crate::backward) (the λ and bias gradients and the adapter's part of `dx` into
//!   [`DeviceGradients`]), deterministic like the forward.
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
//! stream A and B once (the down-projection's blocks write per-split partial sums, which the last
//! block of each group of outputs, or each up-projection block in its prologue, sums in split
//! order and scales by lambda_d; the up-projection fuses lambda_b, bias and the base add in its
//! epilogue); for
//! more rows (prefill), 64×64 tiles on tensor cores (`mma.sync` m16n8k16, bf16/f16 → f32, fed by a
//! 3-stage `cp.async` pipeline and `ldmatrix`), or 128×128 ones (4 stages, dynamic shared memory)
//! for a product with at least a wave of them, or on CUDA cores for f32.
//!
//! [`AdapterBank`]: crate::AdapterBank
//! [`Error::NoCudaDevice`]: crate::Error::NoCudaDevice
//! [`Mode::Accumulate`]: crate::Mode::Accumulate
//! [`Mode::Overwrite`]: crate::Mode::Overwrite
//! [`reference::forward_error_bound_cuda`]: crate::reference::forward_error_bound_cuda

mod backward;
mod buffer;
mod device;
#[cfg(feature = "cuda")]
mod driver;
#[cfg(feature = "cuda-emulation")]
mod emulator;
mod forward;
mod params;
mod plan;
mod resident;
mod stream;
mod timer;

pub use backward::DeviceGradients;
pub use device::CudaDevice;
pub use resident::{DeviceAdapter, DeviceAdapterBank, DeviceMatrix, DeviceProjections, DeviceRowMap};
pub use stream::CudaStream;
// Where a stream's work runs, for the buffers, the forward checks and the timer.
use stream::StreamKind;
pub use timer::StreamTimer;
