//! The host side of one [`CudaStream::forward`] or [`CudaStream::forward_mixed`] call, between its
//! checks and a backend's launch: the checks themselves, the stream's reusable workspace and its
//! sizes, and the buffers handed to the backend, which supplies their addresses to the shared
//! [`launch_params`] fill.
//!
//! [`launch_params`]: super::params::launch_params

use super::buffer::{Buffer, WorkBuffer};
use super::params::{to_i32, Call, Strides};
use super::plan::Plan;
use super::{CudaStream, DeviceAdapter, DeviceAdapterBank, DeviceMatrix, DeviceProjections, DeviceRowMap, StreamKind};
use crate::dtype::Element;
use crate::error::{Error, Result};
use crate::types::{self, AdapterDims, Mode};

/// The adapter side of a forward call: one adapter's vectors, or a bank's tables with the call's
/// row map.
#[derive(Clone, Copy)]
pub(crate) struct ScaleBuffers<'a> {
    pub lambda_d: &'a Buffer,
    pub lambda_b: &'a Buffer,
    pub bias: Option<&'a Buffer>,
    /// A bank's per-adapter bias flags (with its bias table).
    pub has_bias: Option<&'a Buffer>,
    /// The row map of a mixed-adapter call.
    pub rows_adapter: Option<&'a Buffer>,
}

impl<'a> ScaleBuffers<'a> {
    /// One adapter for every row.
    pub(crate) fn adapter(adapter: &'a DeviceAdapter) -> Self {
        ScaleBuffers {
            lambda_d: &adapter.lambda_d,
            lambda_b: &adapter.lambda_b,
            bias: adapter.bias.as_ref(),
            has_bias: None,
            rows_adapter: None,
        }
    }

    /// Each row's own adapter of `bank`, as `rows` names it.
    pub(crate) fn bank(bank: &'a DeviceAdapterBank, rows: &'a DeviceRowMap) -> Self {
        ScaleBuffers {
            lambda_d: &bank.lambda_d,
            lambda_b: &bank.lambda_b,
            bias: bank.bias.as_ref(),
            has_bias: bank.has_bias.as_ref(),
            rows_adapter: Some(&rows.buf),
        }
    }
}

/// The buffers of one forward call: the operands, and the stream's workspace grown for this call.
/// Built only by [`CudaStream::forward`] and [`CudaStream::forward_mixed`], after their checks
/// ([`CudaStream::check_forward`], [`CudaStream::check_forward_mixed`]) and
/// [`Workspace::reserve`], so every buffer holds what the call's kernels read or write.
pub(crate) struct Operands<'a> {
    pub x: &'a Buffer,
    pub a: &'a Buffer,
    pub b: &'a Buffer,
    pub lambda_d: &'a Buffer,
    pub lambda_b: &'a Buffer,
    pub bias: Option<&'a Buffer>,
    /// A bank's per-adapter bias flags (with its bias table); `None` for one adapter.
    pub has_bias: Option<&'a Buffer>,
    /// The row map of a mixed-adapter call; `None` for one adapter.
    pub rows_adapter: Option<&'a Buffer>,
    pub part: &'a mut WorkBuffer,
    pub u: &'a mut WorkBuffer,
    pub counters: &'a mut WorkBuffer,
    pub y: &'a mut Buffer,
}

impl<'a> Operands<'a> {
    /// The operands of `projections`, `scales`, `x` and `y`, with the workspace `scratch`.
    pub(crate) fn new<T>(
        projections: &'a DeviceProjections<T>,
        scales: ScaleBuffers<'a>,
        x: &'a DeviceMatrix<T>,
        y: &'a mut DeviceMatrix<T>,
        scratch: Scratch<'a>,
    ) -> Self {
        Operands {
            x: &x.buf,
            a: &projections.a,
            b: &projections.b,
            lambda_d: scales.lambda_d,
            lambda_b: scales.lambda_b,
            bias: scales.bias,
            has_bias: scales.has_bias,
            rows_adapter: scales.rows_adapter,
            part: scratch.part,
            u: scratch.u,
            counters: scratch.counters,
            y: &mut y.buf,
        }
    }
}

impl CudaStream {
    /// Checks a forward call before anything is allocated or launched: the shapes (the check every
    /// backend shares), that every buffer is on this stream's device, and that every size and stride
    /// fits the kernels' 32-bit integers. Returns the call's sizes and strides as the kernels take
    /// them.
    pub(super) fn check_forward<T: Element>(
        &self,
        projections: &DeviceProjections<T>,
        adapter: &DeviceAdapter,
        x: &DeviceMatrix<T>,
        y: &DeviceMatrix<T>,
        mode: Mode,
    ) -> Result<Call> {
        let dims = AdapterDims { r: adapter.r, m: adapter.m };
        let buffers = [(&adapter.lambda_d, "adapter"), (adapter.bias.as_ref().unwrap_or(&adapter.lambda_b), "adapter")];
        self.check_call(projections, dims, None, &buffers, x, y, mode)
    }

    /// [`CudaStream::check_forward`] for a mixed-adapter call: the bank in the place of the
    /// adapter, and the row map checked as on the CPU (one entry per row of `x`, each an adapter of
    /// the bank or [`NO_ADAPTER`](crate::NO_ADAPTER)) against its host copy.
    pub(super) fn check_forward_mixed<T: Element>(
        &self,
        projections: &DeviceProjections<T>,
        bank: &DeviceAdapterBank,
        rows: &DeviceRowMap,
        x: &DeviceMatrix<T>,
        y: &DeviceMatrix<T>,
        mode: Mode,
    ) -> Result<Call> {
        let dims = AdapterDims { r: bank.r, m: bank.m };
        let buffers = [
            (&bank.lambda_d, "adapter bank"),
            (bank.bias.as_ref().unwrap_or(&bank.lambda_b), "adapter bank"),
            (bank.has_bias.as_ref().unwrap_or(&bank.lambda_b), "adapter bank"),
            (&rows.buf, "row map"),
        ];
        self.check_call(projections, dims, Some((&rows.rows, bank.k)), &buffers, x, y, mode)
    }

    /// The checks both calls share, in the CPU's order: the layer within the projections, the
    /// shapes, the row map (`rows` and the bank's size, for a mixed call), then that every buffer
    /// (the `scales`' and the operands') is on this stream's device.
    #[allow(clippy::too_many_arguments)]
    fn check_call<T: Element>(
        &self,
        projections: &DeviceProjections<T>,
        dims: AdapterDims,
        rows: Option<(&[i32], usize)>,
        scales: &[(&Buffer, &'static str)],
        x: &DeviceMatrix<T>,
        y: &DeviceMatrix<T>,
        mode: Mode,
    ) -> Result<Call> {
        let (t, n, m, r) = (x.rows, x.cols, y.cols, projections.r);
        types::check_fits(n, m, projections.n_max, projections.m_max)?;
        let layer = types::LayerDims { r, n, m };
        types::check_forward(layer, dims, [t, n], Some(([y.rows, m], types::Y)))?;
        if let Some((rows, adapters)) = rows {
            crate::bank::check_row_map(rows, t, adapters)?;
        }
        let operands: [(&Buffer, &'static str); 3] = [(&projections.a, "projections"), (&x.buf, "x"), (&y.buf, "y")];
        let mut buffers = operands[..1].iter().chain(scales).chain(&operands[1..]);
        if let Some((_, what)) = buffers.find(|(b, _)| !b.is_on(&self.kind)) {
            return Err(Error::DeviceMismatch { what });
        }
        let strides = Strides { x: x.row_stride, a: projections.lda, b: projections.ldb, y: y.row_stride };
        Call::new(layer, t, strides, std::mem::size_of::<T>(), mode)
    }
}

/// Bytes of each workspace buffer that one call's plan needs.
#[derive(Clone, Copy, Debug)]
pub(super) struct WorkspaceSizes {
    part: usize,
    u: usize,
    counters: usize,
}

impl WorkspaceSizes {
    /// The sizes for `plan` over `rows` token rows at rank `r`, with elements of `elem_bytes` bytes:
    /// `splits · rows · r` f32 partial sums, `rows · ldu` elements of u (f32 or the dtype, as the
    /// plan keeps it) and one u32 counter per output group. Each count must fit the kernels' 32-bit
    /// indices ([`Error::SizeOverflow`] otherwise).
    pub(super) fn new(plan: &Plan, rows: usize, r: usize, elem_bytes: usize) -> Result<Self> {
        let u_elem_bytes = if plan.u_f32 { 4 } else { elem_bytes };
        Ok(WorkspaceSizes {
            part: bytes(plan.splits.checked_mul(rows).and_then(|v| v.checked_mul(r)), 4, "partial sums")?,
            u: bytes(rows.checked_mul(plan.ldu), u_elem_bytes, "u")?,
            counters: bytes(Some(plan.groups), 4, "split counters")?,
        })
    }
}

/// `elements · elem_bytes`, for a count of elements the kernels index with an `i32` (`None`: the
/// count itself overflowed).
fn bytes(elements: Option<usize>, elem_bytes: usize, what: &'static str) -> Result<usize> {
    let elements = elements.ok_or(Error::SizeOverflow { what })?;
    to_i32(elements, what)?;
    elements.checked_mul(elem_bytes).ok_or(Error::SizeOverflow { what })
}

/// A stream's reusable scratch: the down-projection's split partial sums, u, and the split
/// counters (zero between calls). Each grows on demand and is then reused.
#[derive(Default)]
pub(super) struct Workspace {
    part: Option<WorkBuffer>,
    u: Option<WorkBuffer>,
    counters: Option<WorkBuffer>,
}

/// The workspace buffers of one call, each at least as large as its [`WorkspaceSizes`].
pub(super) struct Scratch<'a> {
    part: &'a mut WorkBuffer,
    u: &'a mut WorkBuffer,
    counters: &'a mut WorkBuffer,
}

impl Workspace {
    /// Grows each buffer that is smaller than `sizes` (a new buffer is zeroed, as the counters must
    /// be) and lends all three for one call.
    pub(super) fn reserve(&mut self, kind: &StreamKind, sizes: WorkspaceSizes) -> Result<Scratch<'_>> {
        Ok(Scratch {
            part: grow(&mut self.part, kind, sizes.part)?,
            u: grow(&mut self.u, kind, sizes.u)?,
            counters: grow(&mut self.counters, kind, sizes.counters)?,
        })
    }

    /// Drops the split counters after a failed launch, which may have left them mid-count: the next
    /// call allocates zeroed ones.
    pub(super) fn reset_counters(&mut self) {
        self.counters = None;
    }
}

/// The buffer in `slot`, replaced by a zeroed one of `bytes` bytes if it is missing or smaller.
pub(super) fn grow<'a>(
    slot: &'a mut Option<WorkBuffer>,
    kind: &StreamKind,
    bytes: usize,
) -> Result<&'a mut WorkBuffer> {
    let buffer = match slot.take() {
        Some(buffer) if buffer.len() >= bytes => buffer,
        _ => WorkBuffer::zeros(kind, bytes)?,
    };
    Ok(slot.insert(buffer))
}
