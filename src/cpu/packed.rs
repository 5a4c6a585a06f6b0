//! Operand layouts shared by every ISA tier.
//!
//! All products here are `out[row, col] = Σ_k left[row, k] · right[col, k]`, computed by micro-kernels
//! that broadcast one `left` element per row and multiply it with `NR` consecutive columns of
//! `right`. So `right` (the weights) is packed once into column panels: panel `p` holds columns
//! `p·NR .. p·NR + NR` as `[k][NR]`, zero-padded past the last column. `left` (activations, `u`,
//! ...) is read in place through a [`Bcast`] view: one f32 per row and k, at any row and k stride.

use std::marker::PhantomData;

use super::{Epilogue, Update};
use crate::mat::MatPtr;

/// Columns per weight panel (two 512-bit vectors of f32).
pub(crate) const NR: usize = 32;
/// Rows per micro-kernel tile.
pub(crate) const MR: usize = 8;

/// Weights packed into column panels of `NR`, each `[k_cap][NR]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Panels<W> {
    data: Vec<W>,
    cols: usize,
    k_cap: usize,
}

impl<W: Copy + Default> Panels<W> {
    /// Packs `cols` columns of `k_cap` elements each, `get(col, k)`.
    pub(crate) fn from_fn(cols: usize, k_cap: usize, get: impl Fn(usize, usize) -> W) -> Self {
        let np = cols.div_ceil(NR);
        let mut data = vec![W::default(); np * k_cap * NR];
        for c in 0..cols {
            let base = (c / NR) * k_cap * NR + c % NR;
            for k in 0..k_cap {
                data[base + k * NR] = get(c, k);
            }
        }
        Self { data, cols, k_cap }
    }
}

impl<W> Panels<W> {
    /// Number of real (unpadded) columns.
    pub(crate) fn cols(&self) -> usize {
        self.cols
    }

    /// Number of panels.
    pub(crate) fn num_panels(&self) -> usize {
        self.cols.div_ceil(NR)
    }

    /// Rows (k) each panel holds.
    pub(crate) fn k_cap(&self) -> usize {
        self.k_cap
    }

    /// Panel `p` as `[k_cap][NR]`.
    pub(crate) fn panel(&self, p: usize) -> &[W] {
        &self.data[p * self.k_cap * NR..(p + 1) * self.k_cap * NR]
    }

    /// Empty panels sized for `cols` columns of `k_cap` (contents unspecified until written).
    pub(crate) fn with_shape(cols: usize, k_cap: usize) -> Self
    where
        W: Default + Clone,
    {
        Self { data: vec![W::default(); cols.div_ceil(NR) * k_cap * NR], cols, k_cap }
    }

    /// A raw handle for kernels that write panels from several threads.
    pub(crate) fn as_mut_ptr(&mut self) -> PanelsPtr<W> {
        PanelsPtr { ptr: self.data.as_mut_ptr(), cols: self.cols, k_cap: self.k_cap, row0: 0 }
    }
}

/// A raw, `Send + Sync` handle on a [`Panels`] being written (rows are k), offset by `row0`.
#[derive(Debug)]
pub(crate) struct PanelsPtr<W> {
    ptr: *mut W,
    cols: usize,
    k_cap: usize,
    row0: usize,
}

impl<W> Clone for PanelsPtr<W> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<W> Copy for PanelsPtr<W> {}
// SAFETY: threads write pairwise disjoint rows (k ranges) of the panels (see `cpu::dense`).
unsafe impl<W: Send> Send for PanelsPtr<W> {}
// SAFETY: as above; shared references only read the fields.
unsafe impl<W: Send> Sync for PanelsPtr<W> {}

impl<W> PanelsPtr<W> {
    /// The same panels with local row 0 at row `row0` (asserted in range).
    pub(crate) fn offset_rows(&self, row0: usize) -> Self {
        assert!(self.row0 + row0 <= self.k_cap, "PanelsPtr::offset_rows out of range");
        Self { row0: self.row0 + row0, ..*self }
    }

    /// Pointer to panel `col / NR`, local row `row`, lane 0.
    ///
    /// # Safety
    /// `col < cols` rounded up to a panel, `row0 + row < k_cap`.
    #[inline(always)]
    pub(crate) unsafe fn row_ptr(&self, row: usize, col: usize) -> *mut W {
        debug_assert!(self.row0 + row < self.k_cap && col < self.cols.div_ceil(NR) * NR);
        // SAFETY: in range of the allocation by the caller's contract.
        unsafe { self.ptr.add((col / NR) * self.k_cap * NR + (self.row0 + row) * NR) }
    }
}

/// The left operand of a product, read in place: element `(row, k)` is at
/// `ptr + row·row_stride + k·k_stride` (in elements of `E`).
#[derive(Debug)]
pub(crate) struct Bcast<'a, E> {
    pub(crate) ptr: *const E,
    pub(crate) rows: usize,
    pub(crate) k_len: usize,
    pub(crate) row_stride: usize,
    pub(crate) k_stride: usize,
    _life: PhantomData<&'a [E]>,
}

impl<E> Clone for Bcast<'_, E> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<E> Copy for Bcast<'_, E> {}
// SAFETY: a Bcast is a shared view of data that outlives it ('a) and is not written meanwhile.
unsafe impl<E: Sync> Send for Bcast<'_, E> {}
// SAFETY: as above.
unsafe impl<E: Sync> Sync for Bcast<'_, E> {}

impl<'a, E> Bcast<'a, E> {
    /// A view of `rows x k_len` elements of `data` with the given strides.
    ///
    /// Panics (an internal invariant, never reached from the public API) when the view does not fit.
    pub(crate) fn new(data: &'a [E], rows: usize, k_len: usize, row_stride: usize, k_stride: usize) -> Self {
        if rows > 0 && k_len > 0 {
            let last = (rows - 1) * row_stride + (k_len - 1) * k_stride;
            assert!(last < data.len(), "Bcast view out of range");
        }
        Self { ptr: data.as_ptr(), rows, k_len, row_stride, k_stride, _life: PhantomData }
    }

    /// Rows `r0 .. r0 + n` of the view (asserted in range).
    pub(crate) fn rows(&self, r0: usize, n: usize) -> Self {
        assert!(r0 + n <= self.rows, "Bcast::rows out of range");
        let ptr = if n == 0 {
            self.ptr
        } else {
            // SAFETY: row r0 < rows lies inside the validated view.
            unsafe { self.ptr.add(r0 * self.row_stride) }
        };
        Self { ptr, rows: n, ..*self }
    }

    /// Element `(row, k)`.
    ///
    /// # Safety
    /// `row < rows`, `k < k_len`.
    #[inline(always)]
    pub(crate) unsafe fn get(&self, row: usize, k: usize) -> E
    where
        E: Copy,
    {
        debug_assert!(row < self.rows && k < self.k_len);
        // SAFETY: inside the view validated at construction.
        unsafe { *self.ptr.add(row * self.row_stride + k * self.k_stride) }
    }
}

/// Where a product's results go. Rows are local to the call; columns are absolute panel columns,
/// and columns at or past the sink's width are dropped.
pub(crate) enum Sink<'a, T> {
    /// `out[row, col] = scale[col]·acc` (or `acc`), f32.
    F32 { out: MatPtr<f32>, scale: Option<&'a [f32]> },
    /// `out[row, col] = epi(acc, out[row, col])`, in `T`.
    Epilogue { out: MatPtr<T>, epi: Epilogue<'a> },
    /// `out[row, col] = op(out[row, col], acc)`, in `T`.
    Update { out: MatPtr<T>, op: Update },
    /// Weight panels in `T` (the dense baseline's ΔW): row `row` of the panel holding `col`.
    Panels { out: PanelsPtr<T> },
}

impl<T: crate::dtype::Element> Sink<'_, T> {
    /// Columns the sink accepts.
    pub(crate) fn cols(&self) -> usize {
        match self {
            Sink::F32 { out, .. } => out.cols(),
            Sink::Epilogue { out, .. } | Sink::Update { out, .. } => out.cols(),
            Sink::Panels { out } => out.cols,
        }
    }

    /// Stores `vals` as columns `col0 .. col0 + vals.len()` of local row `row` (element by element:
    /// the portable kernels' path; the SIMD tiers have vector versions of the same arithmetic).
    ///
    /// # Safety
    /// The row is in range and this thread owns those columns of it; `col0 + vals.len() <= cols()`.
    #[inline(always)]
    pub(crate) unsafe fn store_row(&self, row: usize, col0: usize, vals: &[f32]) {
        // SAFETY (all arms): row and columns in range and owned, by the caller's contract.
        unsafe {
            match self {
                Sink::F32 { out, scale } => {
                    let dst = &mut out.row_mut(row)[col0..col0 + vals.len()];
                    for (c, (d, &v)) in dst.iter_mut().zip(vals).enumerate() {
                        *d = scale.map_or(v, |s| s[col0 + c] * v);
                    }
                }
                Sink::Epilogue { out, epi } => {
                    let dst = &mut out.row_mut(row)[col0..col0 + vals.len()];
                    for (c, (d, &v)) in dst.iter_mut().zip(vals).enumerate() {
                        *d = T::from_f32(epi.apply(col0 + c, v, d.to_f32()));
                    }
                }
                Sink::Update { out, op } => {
                    let dst = &mut out.row_mut(row)[col0..col0 + vals.len()];
                    for (d, &v) in dst.iter_mut().zip(vals) {
                        *d = T::from_f32(op.apply(d.to_f32(), v));
                    }
                }
                Sink::Panels { out } => {
                    let p = out.row_ptr(row, col0);
                    for (c, &v) in vals.iter().enumerate() {
                        *p.add(col0 % NR + c) = T::from_f32(v);
                    }
                }
            }
        }
    }
}
