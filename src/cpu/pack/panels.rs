//! The weights' layout: column panels of `NR`, each `[k][NR]`, starting on a 64-byte line; and a
//! raw handle for kernels that write panels from several threads.

use super::{align_slack, aligned_offset, NR};
use crate::alloc;
use crate::error::Result;

/// Weights packed into column panels of `NR`, each `[k_cap][NR]`, the first panel starting on a
/// 64-byte boundary (and so every panel, as `k_cap·NR` elements are a whole number of 64-byte
/// lines): AMX tile loads of rows that straddle two lines ran 6.7x slower (50 cycles a tile,
/// against 8) on the Intel machine of the README's table, and cut a tile step from 90% of the
/// tile peak to 33%.
#[derive(Debug)]
pub struct Panels<W> {
    /// `ALIGN_SLACK` more elements than the panels take; they start at `data[offset]`.
    data: Vec<W>,
    offset: usize,
    cols: usize,
    k_cap: usize,
}

impl<W: Clone> Clone for Panels<W> {
    fn clone(&self) -> Self {
        // A copy of the vector lies elsewhere: move the panels to its own aligned offset.
        let mut data = self.data.clone();
        let offset = aligned_offset(&data);
        if offset < self.offset {
            data.rotate_left(self.offset - offset);
        } else {
            data.rotate_right(offset - self.offset);
        }
        Self { data, offset, cols: self.cols, k_cap: self.k_cap }
    }
}

impl<W: PartialEq> PartialEq for Panels<W> {
    fn eq(&self, other: &Self) -> bool {
        let len = self.num_panels() * self.k_cap * NR;
        (self.cols, self.k_cap) == (other.cols, other.k_cap)
            && self.data[self.offset..self.offset + len] == other.data[other.offset..other.offset + len]
    }
}

impl<W: Copy + Default> Panels<W> {
    /// Packs `cols` columns of `k_cap` elements each, `get(col, k)`.
    pub(crate) fn from_fn(cols: usize, k_cap: usize, get: impl Fn(usize, usize) -> W) -> Self {
        let np = cols.div_ceil(NR);
        let data = vec![W::default(); np * k_cap * NR + align_slack::<W>()];
        let offset = aligned_offset(&data);
        let mut p = Self { data, offset, cols, k_cap };
        let packed = &mut p.data[offset..];
        for c in 0..cols {
            let base = (c / NR) * k_cap * NR + c % NR;
            for k in 0..k_cap {
                packed[base + k * NR] = get(c, k);
            }
        }
        p
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
        let at = self.offset + p * self.k_cap * NR;
        &self.data[at..at + self.k_cap * NR]
    }

    /// Element `k` of column `col`.
    pub(crate) fn at(&self, col: usize, k: usize) -> W
    where
        W: Copy,
    {
        self.panel(col / NR)[k * NR + col % NR]
    }

    /// Empty panels sized for `cols` columns of `k_cap` (contents unspecified until written), or an
    /// `Err` naming `what` when that many elements overflow or cannot be allocated.
    pub(crate) fn with_shape(what: &'static str, cols: usize, k_cap: usize) -> Result<Self>
    where
        W: Default + Clone,
    {
        let len = alloc::product(what, cols.div_ceil(NR) * NR, k_cap)?;
        // (A saturated length fails to allocate, with the same error.)
        let len = len.saturating_add(align_slack::<W>());
        let data = alloc::filled(what, len, W::default())?;
        let offset = aligned_offset(&data);
        Ok(Self { data, offset, cols, k_cap })
    }

    /// A raw handle for kernels that write panels from several threads.
    pub(crate) fn as_mut_ptr(&mut self) -> PanelsPtr<W> {
        // SAFETY: offset <= data.len() (aligned_offset).
        PanelsPtr {
            ptr: unsafe { self.data.as_mut_ptr().add(self.offset) },
            cols: self.cols,
            k_cap: self.k_cap,
            row0: 0,
        }
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
    /// Number of real (unpadded) columns.
    pub(crate) fn cols(&self) -> usize {
        self.cols
    }

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

#[cfg(test)]
mod tests {
    use super::super::ALIGN;
    use super::*;

    #[test]
    fn panels_start_on_a_line_and_clones_are_realigned_and_equal() {
        // Several sizes, so that the allocator hands out differently aligned vectors.
        for (cols, k_cap) in [(1, 1), (33, 7), (64, 129), (5, 1000)] {
            let p = Panels::from_fn(cols, k_cap, |c, k| (c * 1000 + k) as u32);
            let copies: Vec<Panels<u32>> = (0..8).map(|_| p.clone()).collect();
            for q in std::iter::once(&p).chain(&copies) {
                assert_eq!(q.panel(0).as_ptr() as usize % ALIGN, 0, "{cols} x {k_cap}");
                assert!(*q == p);
                for c in 0..cols {
                    assert_eq!(q.panel(c / NR)[(k_cap - 1) * NR + c % NR], (c * 1000 + k_cap - 1) as u32);
                }
            }
            let other = Panels::from_fn(cols, k_cap, |c, k| (c * 1000 + k) as u32 + u32::from(c + k == 0));
            assert!(other != p, "a changed element must make the panels differ");
        }
    }
}
