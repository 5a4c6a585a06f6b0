//! The CPU backend: a dispatch table of micro-kernels per element type (chosen once per process),
//! and the rayon drivers that block the work and split it across threads.
//!
//! Determinism: every output element is produced by one kernel call whose arithmetic depends only
//! on its row of the left operand and its row of the right one (never on the tile or the block it
//! falls in), so any split across threads gives bitwise identical results.

mod portable;

use std::cell::Cell;
use std::sync::OnceLock;

use half::{bf16, f16};
use rayon::prelude::*;

use crate::adapter::Adapter;
use crate::dtype::Element;
use crate::mat::{MatMut, MatPtr, MatRef};
use crate::ops::Mode;
use crate::projections::LayerProjections;

/// Rows of `x` per block: the unit of parallel work for large `T`, and the height of the
/// per-thread scratch `u [T_BLOCK, r]`.
pub(crate) const T_BLOCK: usize = 32;

/// Rows of `W` per task of merge / unmerge / ΔW.
const W_BLOCK: usize = 16;

/// Column chunks of a small-`T` split are multiples of this (a multiple of every tile width).
const COL_QUANTUM: usize = 16;

/// The instruction-set tier the CPU kernels run on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Isa {
    /// Portable SIMD through the `wide` crate (any target; SSE2 on baseline x86-64, NEON on aarch64).
    Portable,
}

impl Isa {
    /// The tier's name as printed by `vera bench` (`portable`).
    pub fn name(self) -> &'static str {
        match self {
            Isa::Portable => "portable",
        }
    }
}

impl std::fmt::Display for Isa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The tier the kernels for `T` run on in this process (detected once, then cached).
pub fn active_isa<T: Element>() -> Isa {
    T::kernels().isa
}

/// What the up-projection's epilogue does with each dot product `d` of output column `i`:
/// `y = (accumulate ? y : 0) + scale[i]·d + bias[i]`.
#[derive(Clone, Copy, Debug)]
pub struct Epilogue<'a> {
    pub(crate) scale: Option<&'a [f32]>,
    pub(crate) bias: Option<&'a [f32]>,
    pub(crate) accumulate: bool,
}

impl<'a> Epilogue<'a> {
    /// The epilogue of output columns `c0 .. c0 + len`.
    fn cols(&self, c0: usize, len: usize) -> Self {
        Self {
            scale: self.scale.map(|s| &s[c0..c0 + len]),
            bias: self.bias.map(|b| &b[c0..c0 + len]),
            accumulate: self.accumulate,
        }
    }

    #[inline(always)]
    pub(crate) fn apply(&self, i: usize, dot: f32, old: f32) -> f32 {
        let mut v = match self.scale {
            Some(s) => s[i] * dot,
            None => dot,
        };
        if let Some(b) = self.bias {
            v += b[i];
        }
        if self.accumulate {
            v += old;
        }
        v
    }
}

/// How a ΔW tile is combined with the weight it is written to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Update {
    /// `W + ΔW` (merge).
    Add,
    /// `W - ΔW` (unmerge).
    Sub,
    /// `ΔW` (the old contents are ignored).
    Overwrite,
}

impl Update {
    #[inline(always)]
    pub(crate) fn apply(self, old: f32, delta: f32) -> f32 {
        match self {
            Update::Add => old + delta,
            Update::Sub => old - delta,
            Update::Overwrite => delta,
        }
    }
}

/// `out[t, j] = scale[j] · Σ_k x[t, k]·w[j, k]` into an f32 output.
pub(crate) type DownFn<T> = unsafe fn(MatRef<'_, T>, MatRef<'_, T>, Option<&[f32]>, MatPtr<f32>);
/// `y[t, i] = epilogue(Σ_j u[t, j]·w[i, j])`.
pub(crate) type UpFn<X, T> = unsafe fn(MatRef<'_, X>, MatRef<'_, T>, &Epilogue<'_>, MatPtr<T>);
/// `out[i, k] = update(out[i, k], Σ_j c[i, j]·a[j, k])`.
pub(crate) type UpdateFn<T> = unsafe fn(MatRef<'_, f32>, MatRef<'_, T>, Update, MatPtr<T>);

/// The micro-kernels of one element type on one ISA tier.
///
/// Every kernel writes through a [`MatPtr`]; the caller guarantees that no other thread touches
/// the rectangle it passes while the call runs.
pub struct Kernels<T: 'static> {
    pub(crate) isa: Isa,
    /// `out[t, j] = scale[j] · Σ_k x[t, k]·w[j, k]` (f32 out): the down-projection.
    pub(crate) down: DownFn<T>,
    /// `y[t, i] = epilogue(Σ_j u[t, j]·w[i, j])` with f32 `u`: the up-projection.
    pub(crate) up: UpFn<f32, T>,
    /// `y[t, i] = epilogue(Σ_k x[t, k]·w[i, k])` with `x` in `T`: the dense baseline's product.
    pub(crate) dense: UpFn<T, T>,
    /// `out[i, k] = update(out[i, k], Σ_j c[i, j]·a[j, k])`: ΔW, merge and unmerge.
    pub(crate) update: UpdateFn<T>,
}

fn select<T: Element>() -> Kernels<T> {
    portable::kernels::<T>()
}

macro_rules! kernel_table {
    ($($t:ty),*) => {$(
        impl crate::sealed::Sealed for $t {
            fn kernels() -> &'static Kernels<$t> {
                static TABLE: OnceLock<Kernels<$t>> = OnceLock::new();
                TABLE.get_or_init(select::<$t>)
            }
        }
    )*};
}
kernel_table!(f32, f16, bf16);

/// Runs `f` with this thread's reusable f32 scratch of at least `len` elements.
///
/// The buffer is taken out of the thread-local while `f` runs, so a nested call (rayon may run
/// another task on this thread while `f` waits) gets a fresh buffer instead of a borrow conflict.
fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    thread_local! {
        static SCRATCH: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
    }
    let mut buf = SCRATCH.with(Cell::take);
    if buf.len() < len {
        buf.resize(len, 0.0);
    }
    let out = f(&mut buf[..len]);
    SCRATCH.with(|s| s.set(buf));
    out
}

/// Calls `f(c0, len)` for column chunks covering `0..cols`, in parallel when there is more than one
/// thread. Chunk boundaries only change which thread computes a column, never how.
fn par_cols(cols: usize, f: impl Fn(usize, usize) + Sync) {
    let threads = rayon::current_num_threads();
    if threads <= 1 || cols <= COL_QUANTUM {
        f(0, cols);
        return;
    }
    let chunk = cols.div_ceil(threads * 4).next_multiple_of(COL_QUANTUM);
    (0..cols.div_ceil(chunk)).into_par_iter().for_each(|c| {
        let c0 = c * chunk;
        f(c0, chunk.min(cols - c0));
    });
}

/// Splits `rows x cols` of output work: by blocks of `T_BLOCK` rows when there are enough blocks
/// to feed every thread, else block by block with the columns split across threads.
fn par_rect(rows: usize, cols: usize, f: impl Fn(usize, usize, usize, usize) + Sync) {
    let blocks = rows.div_ceil(T_BLOCK);
    if blocks >= rayon::current_num_threads() {
        (0..blocks).into_par_iter().for_each(|b| {
            let t0 = b * T_BLOCK;
            f(t0, T_BLOCK.min(rows - t0), 0, cols);
        });
    } else {
        for b in 0..blocks {
            let t0 = b * T_BLOCK;
            par_cols(cols, |c0, nc| f(t0, T_BLOCK.min(rows - t0), c0, nc));
        }
    }
}

/// The fused forward pass (shapes already validated by `ops`).
pub(crate) fn forward<T: Element>(
    layer: LayerProjections<'_, T>,
    adapter: &Adapter,
    x: MatRef<'_, T>,
    mut y: MatMut<'_, T>,
    mode: Mode,
) {
    let (rows, r, m) = (x.rows(), layer.rank(), layer.out_features());
    if rows == 0 || m == 0 {
        return;
    }
    let k = T::kernels();
    let (a, b) = (layer.a(), layer.b());
    let ld = adapter.lambda_d();
    let epi = Epilogue {
        scale: Some(adapter.lambda_b()),
        bias: adapter.bias(),
        accumulate: mode == Mode::Accumulate,
    };
    let yp = y.as_ptr_mat();
    let blocks = rows.div_ceil(T_BLOCK);
    if blocks >= rayon::current_num_threads() {
        // Prefill: each block computes u [tb, r] into its thread's scratch and up-projects it at
        // once, while it is still in cache.
        (0..blocks).into_par_iter().for_each(|blk| {
            let t0 = blk * T_BLOCK;
            let tb = T_BLOCK.min(rows - t0);
            with_scratch(tb * r, |u| {
                let mut u = MatMut::from_slice(u, tb, r).expect("scratch sized tb * r");
                // SAFETY: u is this task's own scratch; rows t0..t0+tb of y belong to this task only.
                unsafe {
                    (k.down)(x.row_range(t0, tb), a, Some(ld), u.as_ptr_mat());
                    (k.up)(u.as_ref(), b, &epi, yp.sub(t0, tb, 0, m));
                }
            });
        });
    } else {
        // Decode: too few rows to feed every thread, so split r for the down-projection and m for
        // the up-projection.
        for blk in 0..blocks {
            let t0 = blk * T_BLOCK;
            let tb = T_BLOCK.min(rows - t0);
            with_scratch(tb * r, |u| {
                let mut u = MatMut::from_slice(u, tb, r).expect("scratch sized tb * r");
                let up = u.as_ptr_mat();
                let xb = x.row_range(t0, tb);
                par_cols(r, |j0, nj| {
                    // SAFETY: columns j0..j0+nj of u are this chunk's alone (par_cols is disjoint).
                    unsafe {
                        (k.down)(
                            xb,
                            a.row_range(j0, nj),
                            Some(&ld[j0..j0 + nj]),
                            up.sub(0, tb, j0, nj),
                        )
                    }
                });
                let u = u.as_ref();
                par_cols(m, |i0, ni| {
                    // SAFETY: columns i0..i0+ni of rows t0..t0+tb of y are this chunk's alone.
                    unsafe {
                        (k.up)(
                            u,
                            b.row_range(i0, ni),
                            &epi.cols(i0, ni),
                            yp.sub(t0, tb, i0, ni),
                        )
                    }
                });
            });
        }
    }
}

/// `w = update(w, ΔW)` for a whole layer, in blocks of rows (shapes already validated).
pub(crate) fn apply_delta<T: Element>(
    layer: LayerProjections<'_, T>,
    adapter: &Adapter,
    mut w: MatMut<'_, T>,
    update: Update,
) {
    let (m, r) = (layer.out_features(), layer.rank());
    let k = T::kernels();
    let (a, b) = (layer.a(), layer.b());
    let (ld, lb) = (adapter.lambda_d(), adapter.lambda_b());
    let wp = w.as_ptr_mat();
    (0..m.div_ceil(W_BLOCK)).into_par_iter().for_each(|blk| {
        let i0 = blk * W_BLOCK;
        let ib = W_BLOCK.min(m - i0);
        with_scratch(ib * r, |c| {
            // c[i, j] = lambda_b[i] · B[i, j] · lambda_d[j]: this block's rows of diag(lb)·B·diag(ld).
            for (i, crow) in c.chunks_mut(r).enumerate() {
                let brow = b.row_unchecked(i0 + i);
                for ((cv, bv), dv) in crow.iter_mut().zip(brow).zip(ld) {
                    *cv = lb[i0 + i] * bv.to_f32() * dv;
                }
            }
            let c = MatRef::from_slice(c, ib, r).expect("scratch sized ib * r");
            // SAFETY: rows i0..i0+ib of w belong to this task only.
            unsafe { (k.update)(c, a, update, wp.sub(i0, ib, 0, wp.cols())) };
        });
    });
}

/// `y = (acc ? y : 0) + x·dwᵀ + bias`: the second step of the dense baseline.
pub(crate) fn dense_product<T: Element>(
    x: MatRef<'_, T>,
    dw: MatRef<'_, T>,
    bias: Option<&[f32]>,
    mut y: MatMut<'_, T>,
    mode: Mode,
) {
    let k = T::kernels();
    let epi = Epilogue {
        scale: None,
        bias,
        accumulate: mode == Mode::Accumulate,
    };
    let yp = y.as_ptr_mat();
    par_rect(x.rows(), dw.rows(), |t0, tb, c0, nc| {
        // SAFETY: par_rect hands out disjoint rectangles of y.
        unsafe {
            (k.dense)(
                x.row_range(t0, tb),
                dw.row_range(c0, nc),
                &epi.cols(c0, nc),
                yp.sub(t0, tb, c0, nc),
            )
        }
    });
}

/// The unfused peer: `h = x·Aᵀ` for all rows, then `h *= lambda_d`, then the up-projection.
pub(crate) fn unfused<T: Element>(
    layer: LayerProjections<'_, T>,
    adapter: &Adapter,
    x: MatRef<'_, T>,
    mut h: MatMut<'_, f32>,
    mut y: MatMut<'_, T>,
    mode: Mode,
) {
    let k = T::kernels();
    let (a, b) = (layer.a(), layer.b());
    let hp = h.as_ptr_mat();
    par_rect(x.rows(), layer.rank(), |t0, tb, c0, nc| {
        // SAFETY: par_rect hands out disjoint rectangles of h.
        unsafe {
            (k.down)(
                x.row_range(t0, tb),
                a.row_range(c0, nc),
                None,
                hp.sub(t0, tb, c0, nc),
            )
        }
    });
    for t in 0..h.rows() {
        let row = h.row_mut(t).expect("t < rows");
        for (v, d) in row.iter_mut().zip(adapter.lambda_d()) {
            *v *= d;
        }
    }
    let epi = Epilogue {
        scale: Some(adapter.lambda_b()),
        bias: adapter.bias(),
        accumulate: mode == Mode::Accumulate,
    };
    let u = h.as_ref();
    let yp = y.as_ptr_mat();
    par_rect(x.rows(), layer.out_features(), |t0, tb, c0, nc| {
        // SAFETY: par_rect hands out disjoint rectangles of y.
        unsafe {
            (k.up)(
                u.row_range(t0, tb),
                b.row_range(c0, nc),
                &epi.cols(c0, nc),
                yp.sub(t0, tb, c0, nc),
            )
        }
    });
}
