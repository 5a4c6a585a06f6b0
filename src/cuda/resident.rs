//! The values that live in device memory, made by a [`CudaStream`]'s uploads and read by its forward
//! calls: matrices ([`DeviceMatrix`]), the shared projections ([`DeviceProjections`]), one layer's
//! adapter ([`DeviceAdapter`]) or bank of adapters ([`DeviceAdapterBank`]), and a batch's row map
//! ([`DeviceRowMap`]).
//!
//! [`CudaStream`]: super::CudaStream

use std::marker::PhantomData;

use crate::dtype::Element;

use super::buffer::Buffer;

/// A matrix in device memory: `rows × cols` elements of `T`, row `i` starting at element
/// `i · row_stride`.
pub struct DeviceMatrix<T> {
    pub(super) buf: Buffer,
    pub(super) rows: usize,
    pub(super) cols: usize,
    pub(super) row_stride: usize,
    pub(super) _t: PhantomData<T>,
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

    pub(super) fn span(&self) -> usize {
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
    pub(super) a: Buffer,
    pub(super) b: Buffer,
    pub(super) r: usize,
    pub(super) n_max: usize,
    pub(super) m_max: usize,
    pub(super) lda: usize,
    pub(super) ldb: usize,
    pub(super) _t: PhantomData<T>,
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
    pub(super) lambda_d: Buffer,
    pub(super) lambda_b: Buffer,
    pub(super) bias: Option<Buffer>,
    pub(super) r: usize,
    pub(super) m: usize,
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
///
/// [`AdapterBank`]: crate::AdapterBank
/// [`CudaStream::forward_mixed`]: super::CudaStream::forward_mixed
/// [`CudaStream::upload_bank`]: super::CudaStream::upload_bank
pub struct DeviceAdapterBank {
    pub(super) lambda_d: Buffer,
    pub(super) lambda_b: Buffer,
    pub(super) bias: Option<Buffer>,
    /// `[K]` i32, non-zero for an adapter with a bias; present with `bias`.
    pub(super) has_bias: Option<Buffer>,
    pub(super) k: usize,
    pub(super) r: usize,
    pub(super) m: usize,
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
///
/// [`CudaStream::forward_mixed`]: super::CudaStream::forward_mixed
/// [`CudaStream::upload_row_map`]: super::CudaStream::upload_row_map
pub struct DeviceRowMap {
    pub(super) buf: Buffer,
    pub(super) rows: Vec<i32>,
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
