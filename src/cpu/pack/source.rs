//! The rows a left operand is packed from: a strided matrix, rows gathered by index, or 16-bit
//! elements seen as their bits.

use crate::mat::MatRef;

/// The rows of a left operand to pack: a strided matrix, or rows gathered from one by index
/// ([`Gathered`]: a mixed-adapter batch's rows sorted by adapter).
pub(crate) trait RowSource<E> {
    /// Rows of the operand.
    fn rows(&self) -> usize;
    /// Elements per row (k).
    fn cols(&self) -> usize;
    /// Row `t` of the operand.
    fn row(&self, t: usize) -> &[E];
}

impl<E> RowSource<E> for MatRef<'_, E> {
    fn rows(&self) -> usize {
        MatRef::rows(self)
    }
    fn cols(&self) -> usize {
        MatRef::cols(self)
    }
    #[inline(always)]
    fn row(&self, t: usize) -> &[E] {
        self.row_unchecked(t)
    }
}

/// Rows `order[0]`, `order[1]`, ... of `mat`, in that order.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Gathered<'a, E> {
    pub(crate) mat: MatRef<'a, E>,
    pub(crate) order: &'a [u32],
}

impl<E> RowSource<E> for Gathered<'_, E> {
    fn rows(&self) -> usize {
        self.order.len()
    }
    fn cols(&self) -> usize {
        self.mat.cols()
    }
    #[inline(always)]
    fn row(&self, t: usize) -> &[E] {
        self.mat.row_unchecked(self.order[t] as usize)
    }
}

/// A source of 16-bit elements seen as their bits (bf16 rows for the pair kernels).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Bits<S, E>(pub(crate) S, pub(crate) std::marker::PhantomData<E>);

impl<E: bytemuck::Pod, S: RowSource<E>> RowSource<u16> for Bits<S, E> {
    fn rows(&self) -> usize {
        self.0.rows()
    }
    fn cols(&self) -> usize {
        self.0.cols()
    }
    #[inline(always)]
    fn row(&self, t: usize) -> &[u16] {
        bytemuck::cast_slice(self.0.row(t))
    }
}
