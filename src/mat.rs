//! Row-major matrix views with a row stride, validated once at construction.

use crate::error::{Error, Result};

/// Elements a `rows x cols` view with `row_stride` spans, checking every step for overflow.
pub(crate) fn span(what: &'static str, rows: usize, cols: usize, row_stride: usize) -> Result<usize> {
    if row_stride < cols {
        return Err(Error::StrideTooSmall { what, cols, row_stride });
    }
    if rows == 0 || cols == 0 {
        return Ok(0);
    }
    (rows - 1).checked_mul(row_stride).and_then(|v| v.checked_add(cols)).ok_or(Error::SizeOverflow { what })
}

fn validate(what: &'static str, len: usize, rows: usize, cols: usize, row_stride: usize) -> Result<()> {
    let needed = span(what, rows, cols, row_stride)?;
    if len < needed {
        return Err(Error::BufferTooSmall { what, rows, cols, row_stride, needed, len });
    }
    Ok(())
}

/// An immutable row-major view: element `(i, j)` is `data[i * row_stride + j]`.
///
/// The buffer may be longer than the view needs (a view into a larger tensor); it may not be shorter.
#[derive(Debug)]
pub struct MatRef<'a, T> {
    data: &'a [T],
    rows: usize,
    cols: usize,
    row_stride: usize,
}

impl<T> Clone for MatRef<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for MatRef<'_, T> {}

impl<'a, T> MatRef<'a, T> {
    /// A `rows x cols` view of `data` with the given row stride.
    ///
    /// Errors: [`Error::StrideTooSmall`] if `row_stride < cols`, [`Error::SizeOverflow`] if the
    /// span does not fit in `usize`, [`Error::BufferTooSmall`] if `data` is shorter than
    /// `(rows - 1) * row_stride + cols`.
    pub fn new(data: &'a [T], rows: usize, cols: usize, row_stride: usize) -> Result<Self> {
        validate("matrix", data.len(), rows, cols, row_stride)?;
        Ok(Self { data, rows, cols, row_stride })
    }

    /// A contiguous `rows x cols` view (row stride = `cols`).
    pub fn from_slice(data: &'a [T], rows: usize, cols: usize) -> Result<Self> {
        Self::new(data, rows, cols, cols)
    }

    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Number of columns.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Distance in elements between the starts of consecutive rows.
    pub fn row_stride(&self) -> usize {
        self.row_stride
    }

    /// Row `i` as a slice of `cols` elements, or `None` if `i >= rows`.
    pub fn row(&self, i: usize) -> Option<&'a [T]> {
        (i < self.rows).then(|| self.row_unchecked(i))
    }

    /// Row `i`; `i < rows` is the caller's invariant (a bounds-checked slice either way).
    #[inline(always)]
    pub(crate) fn row_unchecked(&self, i: usize) -> &'a [T] {
        let start = i * self.row_stride;
        &self.data[start..start + self.cols]
    }

    /// Element `(i, j)`, or `None` when out of range.
    pub fn get(&self, i: usize, j: usize) -> Option<&'a T> {
        self.row(i).and_then(|r| r.get(j))
    }

    /// The top-left `rows x cols` sub-view (same stride, no copy).
    ///
    /// Errors: [`Error::ShapeMismatch`] when the sub-view is larger than this view.
    pub fn top_left(&self, rows: usize, cols: usize) -> Result<Self> {
        if rows > self.rows || cols > self.cols {
            return Err(Error::ShapeMismatch {
                what: "sub-view (must fit inside the view)",
                expected: [self.rows, self.cols],
                actual: [rows, cols],
            });
        }
        Ok(Self { data: self.data, rows, cols, row_stride: self.row_stride })
    }

    /// Rows `start .. start + len` (the caller keeps them in range).
    pub(crate) fn row_range(&self, start: usize, len: usize) -> Self {
        debug_assert!(start + len <= self.rows);
        let data = if len == 0 { &self.data[..0] } else { &self.data[start * self.row_stride..] };
        Self { data, rows: len, cols: self.cols, row_stride: self.row_stride }
    }

    /// Copies the view into a new contiguous row-major `Vec`.
    pub fn to_vec(&self) -> Vec<T>
    where
        T: Copy,
    {
        (0..self.rows).flat_map(|i| self.row_unchecked(i).iter().copied()).collect()
    }
}

/// A mutable row-major view: element `(i, j)` is `data[i * row_stride + j]`.
#[derive(Debug)]
pub struct MatMut<'a, T> {
    data: &'a mut [T],
    rows: usize,
    cols: usize,
    row_stride: usize,
}

impl<'a, T> MatMut<'a, T> {
    /// A `rows x cols` mutable view of `data` with the given row stride; errors as [`MatRef::new`].
    pub fn new(data: &'a mut [T], rows: usize, cols: usize, row_stride: usize) -> Result<Self> {
        validate("matrix", data.len(), rows, cols, row_stride)?;
        Ok(Self { data, rows, cols, row_stride })
    }

    /// A contiguous `rows x cols` mutable view (row stride = `cols`).
    pub fn from_slice(data: &'a mut [T], rows: usize, cols: usize) -> Result<Self> {
        Self::new(data, rows, cols, cols)
    }

    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Number of columns.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Distance in elements between the starts of consecutive rows.
    pub fn row_stride(&self) -> usize {
        self.row_stride
    }

    /// A shorter-lived mutable view of the same elements.
    pub fn rb_mut(&mut self) -> MatMut<'_, T> {
        MatMut { data: self.data, rows: self.rows, cols: self.cols, row_stride: self.row_stride }
    }

    /// An immutable view of the same elements.
    pub fn as_ref(&self) -> MatRef<'_, T> {
        MatRef { data: self.data, rows: self.rows, cols: self.cols, row_stride: self.row_stride }
    }

    /// Row `i` as a mutable slice of `cols` elements, or `None` if `i >= rows`.
    pub fn row_mut(&mut self, i: usize) -> Option<&mut [T]> {
        if i >= self.rows {
            return None;
        }
        let start = i * self.row_stride;
        Some(&mut self.data[start..start + self.cols])
    }

    /// The top-left `rows x cols` mutable sub-view; errors as [`MatRef::top_left`].
    pub fn top_left(self, rows: usize, cols: usize) -> Result<Self> {
        if rows > self.rows || cols > self.cols {
            return Err(Error::ShapeMismatch {
                what: "sub-view (must fit inside the view)",
                expected: [self.rows, self.cols],
                actual: [rows, cols],
            });
        }
        Ok(Self { data: self.data, rows, cols, row_stride: self.row_stride })
    }

    /// A raw handle for kernels that write disjoint rectangles from several threads.
    pub(crate) fn as_ptr_mat(&mut self) -> MatPtr<T> {
        MatPtr { ptr: self.data.as_mut_ptr(), rows: self.rows, cols: self.cols, row_stride: self.row_stride }
    }
}

/// A raw, `Send + Sync` handle on a validated mutable view, for kernels whose threads write
/// disjoint rectangles of one output (column ranges of the same rows cannot be split as slices).
///
/// Only made from a [`MatMut`] (so the extent is valid) and only used while that borrow lives.
#[derive(Debug)]
pub(crate) struct MatPtr<T> {
    ptr: *mut T,
    rows: usize,
    cols: usize,
    row_stride: usize,
}

impl<T> Clone for MatPtr<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for MatPtr<T> {}

// SAFETY: a MatPtr is handed to threads that write pairwise disjoint rectangles of the view it came
// from (the drivers in `cpu` split rows or columns without overlap); T itself is Send.
unsafe impl<T: Send> Send for MatPtr<T> {}
// SAFETY: as above; shared references to a MatPtr only read its fields.
unsafe impl<T: Send> Sync for MatPtr<T> {}

impl<T> MatPtr<T> {
    /// Number of columns.
    pub(crate) fn cols(&self) -> usize {
        self.cols
    }

    /// The sub-rectangle rows `r0 .. r0 + nr`, columns `c0 .. c0 + nc` (asserted in range).
    pub(crate) fn sub(&self, r0: usize, nr: usize, c0: usize, nc: usize) -> Self {
        assert!(r0 + nr <= self.rows && c0 + nc <= self.cols, "MatPtr::sub out of range");
        let ptr = if nr == 0 || nc == 0 {
            self.ptr
        } else {
            // SAFETY: (r0, c0) lies inside the validated extent of the view (asserted above).
            unsafe { self.ptr.add(r0 * self.row_stride + c0) }
        };
        Self { ptr, rows: nr, cols: nc, row_stride: self.row_stride }
    }

    /// Row `i` as a mutable slice.
    ///
    /// # Safety
    /// `i < rows`, and no other thread reads or writes these columns of row `i` while the slice lives.
    #[inline(always)]
    pub(crate) unsafe fn row_mut<'s>(&self, i: usize) -> &'s mut [T] {
        debug_assert!(i < self.rows);
        // SAFETY: in range of the validated extent (caller keeps i < rows); exclusivity is the
        // caller's contract.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(i * self.row_stride), self.cols) }
    }

    /// Columns `c0 .. c0 + len` of row `i` as a mutable slice. Threads that split a row's columns
    /// must each take only their own columns: a slice over the whole row would be a `&mut` aliasing
    /// the columns another thread writes (a data race, as Miri reports).
    ///
    /// # Safety
    /// `i < rows`, `c0 + len <= cols`, and no other thread reads or writes these columns of row `i`
    /// while the slice lives.
    #[inline(always)]
    pub(crate) unsafe fn cols_mut<'s>(&self, i: usize, c0: usize, len: usize) -> &'s mut [T] {
        debug_assert!(i < self.rows && c0 + len <= self.cols);
        // SAFETY: in range of the validated extent (caller's contract); exclusivity likewise.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(i * self.row_stride + c0), len) }
    }

    /// The address of element `(i, c0)`, without making a reference (for the vector stores and
    /// prefetches of the SIMD tiers).
    ///
    /// # Safety
    /// `i < rows` and `c0 <= cols`.
    #[inline(always)]
    pub(crate) unsafe fn at(&self, i: usize, c0: usize) -> *mut T {
        debug_assert!(i < self.rows && c0 <= self.cols);
        // SAFETY: in range of the validated extent (caller's contract).
        unsafe { self.ptr.add(i * self.row_stride + c0) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn views_index_with_the_stride() {
        let data: Vec<i32> = (0..12).collect();
        let m = MatRef::new(&data, 3, 2, 4).unwrap();
        assert_eq!(m.row(1).unwrap(), &[4, 5]);
        assert_eq!(*m.get(2, 1).unwrap(), 9);
        assert!(m.get(3, 0).is_none());
        assert_eq!(m.to_vec(), vec![0, 1, 4, 5, 8, 9]);
        assert_eq!(m.top_left(2, 1).unwrap().to_vec(), vec![0, 4]);
        let r = m.row_range(1, 2);
        assert_eq!(r.to_vec(), vec![4, 5, 8, 9]);
    }

    #[test]
    fn last_row_needs_only_cols_elements() {
        let data = [0u8; 10];
        assert!(MatRef::new(&data, 3, 2, 4).is_ok()); // needs 2*4+2 = 10
        assert_eq!(
            MatRef::new(&data[..9], 3, 2, 4).unwrap_err(),
            Error::BufferTooSmall { what: "matrix", rows: 3, cols: 2, row_stride: 4, needed: 10, len: 9 }
        );
    }
}
