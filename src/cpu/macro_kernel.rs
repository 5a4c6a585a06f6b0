//! The one loop nest around every tier's micro-kernel (BLIS's macro-kernel), in two shapes:
//!
//! - **blocked** (prefill): for each panel, for each group of `GROUP` row tiles, for each k block
//!   of `KC`: stage the panel's block once (e.g. widen f16 to f32), then run every row tile of the
//!   group over it, so the block is reused from L1; a tile's accumulators are zeroed at its first
//!   block and stored through the sink after its last.
//! - **few** (decode, a call of 1-4 rows): `P` panels per micro-kernel call over the whole k range,
//!   since one panel gives such a tile too few independent accumulator chains to hide the FMA
//!   latency; `P` per row count is a tier fact.
//!
//! A tier supplies only the [`MicroKernel`]: its accumulator type, staging, the k loop, and the
//! store. Determinism: each accumulator is one chain over k in order (partial sums are kept in f32
//! between blocks, which is exact), so neither the block a row falls in, the group, `P`, nor the
//! thread that runs a panel changes any result.

use std::mem::MaybeUninit;
use std::ops::Range;

use super::pack::{Panels, MR, NR};
use super::sink::Sink;
use crate::dtype::Element;

/// The most row tiles a group may hold (the size of the loop nest's accumulator array).
pub(crate) const MAX_GROUP: usize = 8;

/// One tier's micro-kernel for products into sinks of `T`:
/// `acc[..R] += left[t0.., k0..k0 + kl] · block` on `R <= MR` rows and one or more 32-column panels.
pub(crate) trait MicroKernel<T> {
    /// The element type of the panels.
    type Weight;
    /// The element type the micro-kernel reads a staged block in.
    type Staged;
    /// The accumulators of one row tile over one panel (registers, or f32 in memory).
    type Acc: Copy;
    /// Room for one staged block (`()` for kernels that read panels in place).
    type Buf;
    /// Units of k (elements, or pairs) per cache block.
    const KC: usize;
    /// Row tiles per group sharing a staged block (at most [`MAX_GROUP`]).
    const GROUP: usize;
    /// Whether [`MicroKernel::stage`] returns the panel itself (never writes the buffer), so that a
    /// block may span the whole k range.
    const IN_PLACE: bool;
    /// Panels per call for a call of 1, 2, 3 or 4 rows (at most 4), 0 for the blocked path. Only
    /// kernels that stage in place may run the few-rows path.
    const DECODE_PANELS: [usize; 4];

    /// Units of k (elements, or pairs) the left operand holds.
    fn k_units(&self) -> usize;

    /// Zeroed accumulators.
    ///
    /// # Safety
    /// The tier's instructions are available.
    unsafe fn zero(&self) -> Self::Acc;

    /// Rows `k0..k0 + kl` of the panel at `wp`, ready for [`MicroKernel::run`]: the panel itself, or
    /// a copy (e.g. widened) in `buf`, made once for all the row tiles that read it.
    ///
    /// # Safety
    /// The tier's instructions are available; the panel holds at least `k0 + kl` rows; `kl <= KC`
    /// unless `IN_PLACE`.
    unsafe fn stage(
        &self,
        wp: *const Self::Weight,
        k0: usize,
        kl: usize,
        buf: &mut MaybeUninit<Self::Buf>,
    ) -> *const Self::Staged;

    /// `acc[q][..R] += left[t0.., k0..k0 + kl] · block q` for `P` panels at once; `last` says the
    /// block ends the k range. Each chain is the same as with `P = 1`.
    ///
    /// # Safety
    /// The tier's instructions are available; `t0 + R <= rows` of the left operand, `R <= MR`,
    /// `k0 + kl <= k_units()`; each `sp[q]` is a block [`MicroKernel::stage`] returned for the same
    /// `k0`, `kl`, and all `P` are alive.
    unsafe fn run<const R: usize, const P: usize>(
        &self,
        t0: usize,
        sp: [*const Self::Staged; P],
        k0: usize,
        kl: usize,
        last: bool,
        acc: &mut [Self::Acc; P],
    );

    /// Stores rows `..R` of `acc` as local rows `t0..t0 + R`, columns `col0..col0 + NR` (clipped to
    /// the sink's width), through the sink.
    ///
    /// # Safety
    /// The tier's instructions are available; the rows are in the sink and this thread owns them
    /// and those columns.
    unsafe fn store<const R: usize>(&self, acc: &Self::Acc, sink: &Sink<'_, T>, t0: usize, col0: usize);

    /// Asks for the lines the store of rows `t0..t0 + R` will read or write over, while the k loop
    /// runs.
    ///
    /// # Safety
    /// Rows `t0..t0 + R` are in the sink.
    #[inline(always)]
    unsafe fn prefetch<const R: usize>(&self, _sink: &Sink<'_, T>, _t0: usize, _col0: usize) {}
}

/// `sink[row, col] <- Σ_k left[row, k] · right[col, k]` for the `rows` rows of the kernel's left
/// operand and the panels in `range`: [`few`] when [`takes_few`] says so, else [`blocked`].
///
/// # Safety
/// The kernel's instructions are available; `kern.k_units() <= right.k_cap()`; the sink has `rows`
/// rows owned by this call, and the columns of the panels in `range` are owned too.
#[inline(always)]
pub(crate) unsafe fn gemm<K: MicroKernel<T>, T: Element>(
    kern: &K,
    rows: usize,
    right: &Panels<K::Weight>,
    range: Range<usize>,
    sink: &Sink<'_, T>,
) {
    // SAFETY: forwarded.
    unsafe {
        if takes_few::<K, T>(rows) {
            few(kern, rows, right, range, sink)
        } else {
            blocked(kern, rows, right, range, sink)
        }
    }
}

/// Whether a call of `rows` rows runs the few-rows path: 1-4 rows, on a kernel that stages in
/// place and has a panel count for that many rows. (A tier may call [`few`] and [`blocked`] from
/// functions of its own, with its target features, so that each path is compiled on its own.)
#[inline(always)]
pub(crate) fn takes_few<K: MicroKernel<T>, T>(rows: usize) -> bool {
    K::IN_PLACE && (1..=4).contains(&rows) && K::DECODE_PANELS[rows - 1] > 0
}

/// The few-rows path for `rows` rows (see the module docs).
///
/// # Safety
/// As [`gemm`], with [`takes_few`] true for `rows`.
#[inline(always)]
pub(crate) unsafe fn few<K: MicroKernel<T>, T: Element>(
    kern: &K,
    rows: usize,
    right: &Panels<K::Weight>,
    range: Range<usize>,
    sink: &Sink<'_, T>,
) {
    debug_assert!(kern.k_units() <= right.k_cap() && takes_few::<K, T>(rows));
    // SAFETY: forwarded; rows == R.
    unsafe {
        match rows {
            1 => few_rows::<K, T, 1>(kern, right, range, sink),
            2 => few_rows::<K, T, 2>(kern, right, range, sink),
            3 => few_rows::<K, T, 3>(kern, right, range, sink),
            _ => few_rows::<K, T, 4>(kern, right, range, sink),
        }
    }
}

/// The blocked loop nest (see the module docs).
///
/// # Safety
/// As [`gemm`].
#[inline(always)]
pub(crate) unsafe fn blocked<K: MicroKernel<T>, T: Element>(
    kern: &K,
    rows: usize,
    right: &Panels<K::Weight>,
    range: Range<usize>,
    sink: &Sink<'_, T>,
) {
    const { assert!(K::GROUP <= MAX_GROUP) };
    debug_assert!(kern.k_units() <= right.k_cap());
    let cols = sink.cols();
    let k_units = kern.k_units();
    // SAFETY: the kernel's instructions are available (contract).
    let mut partial = [unsafe { kern.zero() }; MAX_GROUP];
    let mut buf = MaybeUninit::<K::Buf>::uninit();
    for p in range {
        let col0 = p * NR;
        if col0 >= cols {
            break;
        }
        let wp = right.panel(p).as_ptr();
        for g0 in (0..rows).step_by(MR * K::GROUP) {
            let g_end = rows.min(g0 + MR * K::GROUP);
            // At least one (possibly empty) block, so that k = 0 still stores its zeros.
            for k0 in (0..k_units.max(1)).step_by(K::KC) {
                let kl = K::KC.min(k_units.saturating_sub(k0));
                let block = Block { col0, k0, kl, last: k0 + K::KC >= k_units };
                // SAFETY: rows k0..k0 + kl of the panel exist (k_units <= k_cap), kl <= KC.
                let sp = unsafe { kern.stage(wp, k0, kl, &mut buf) };
                for (acc, t0) in partial.iter_mut().zip((g0..g_end).step_by(MR)) {
                    // SAFETY: rows t0..t0 + R <= rows, k0 + kl <= k_units; the rest is this
                    // function's contract.
                    unsafe {
                        match g_end - t0 {
                            1 => tile::<K, T, 1>(kern, t0, sp, block, acc, sink),
                            2 => tile::<K, T, 2>(kern, t0, sp, block, acc, sink),
                            3 => tile::<K, T, 3>(kern, t0, sp, block, acc, sink),
                            4 => tile::<K, T, 4>(kern, t0, sp, block, acc, sink),
                            5 => tile::<K, T, 5>(kern, t0, sp, block, acc, sink),
                            6 => tile::<K, T, 6>(kern, t0, sp, block, acc, sink),
                            7 => tile::<K, T, 7>(kern, t0, sp, block, acc, sink),
                            _ => tile::<K, T, MR>(kern, t0, sp, block, acc, sink),
                        }
                    }
                }
            }
        }
    }
}

/// Where one k block of the blocked loop nest works.
#[derive(Clone, Copy)]
struct Block {
    /// The panel's first column.
    col0: usize,
    /// The k block: `k0 .. k0 + kl`, and whether it is the last one.
    k0: usize,
    kl: usize,
    last: bool,
}

/// One k block of one row tile of `R` rows: zeroed (and its old outputs prefetched) at the first
/// block, stored through the sink after the last.
///
/// # Safety
/// As [`MicroKernel::run`] and [`MicroKernel::store`] for rows `t0..t0 + R`.
#[inline(always)]
unsafe fn tile<K: MicroKernel<T>, T: Element, const R: usize>(
    kern: &K,
    t0: usize,
    sp: *const K::Staged,
    blk: Block,
    acc: &mut K::Acc,
    sink: &Sink<'_, T>,
) {
    // SAFETY: forwarded (this function's contract).
    unsafe {
        if blk.k0 == 0 {
            *acc = kern.zero();
            kern.prefetch::<R>(sink, t0, blk.col0);
        }
        kern.run::<R, 1>(t0, [sp], blk.k0, blk.kl, blk.last, std::array::from_mut(acc));
        if blk.last {
            kern.store::<R>(acc, sink, t0, blk.col0);
        }
    }
}

/// The few-rows path for a left operand of exactly `R` rows (see the module docs): the panels in
/// `range` in steps of the tier's `DECODE_PANELS[R - 1]`, the last step taking what is left.
///
/// # Safety
/// As [`gemm`], with `rows == R` and `K::IN_PLACE`.
#[inline(always)]
unsafe fn few_rows<K: MicroKernel<T>, T: Element, const R: usize>(
    kern: &K,
    right: &Panels<K::Weight>,
    range: Range<usize>,
    sink: &Sink<'_, T>,
) {
    let per_call = K::DECODE_PANELS[R - 1];
    debug_assert!((1..=4).contains(&per_call));
    let end = range.end.min(sink.cols().div_ceil(NR));
    let mut p = range.start;
    while p < end {
        let step = per_call.min(end - p);
        // SAFETY: panels p..p + step are in range and below end; the rest is forwarded.
        unsafe {
            match step {
                1 => few_panels::<K, T, R, 1>(kern, right, p, sink),
                2 => few_panels::<K, T, R, 2>(kern, right, p, sink),
                3 => few_panels::<K, T, R, 3>(kern, right, p, sink),
                _ => few_panels::<K, T, R, 4>(kern, right, p, sink),
            }
        }
        p += step;
    }
}

/// Panels `p .. p + P` of [`few_rows`], over the whole k range, stored through the sink.
///
/// # Safety
/// As [`few_rows`]; panels `p .. p + P` exist and have columns in the sink.
#[inline(always)]
unsafe fn few_panels<K: MicroKernel<T>, T: Element, const R: usize, const P: usize>(
    kern: &K,
    right: &Panels<K::Weight>,
    p: usize,
    sink: &Sink<'_, T>,
) {
    let k_units = kern.k_units();
    let mut buf = MaybeUninit::<K::Buf>::uninit();
    // SAFETY: IN_PLACE kernels stage by pointer arithmetic over the whole k range (k_units <=
    // k_cap) and never touch the buffer; rows 0..R are the sink's; forwarded otherwise.
    unsafe {
        let mut acc = [kern.zero(); P];
        let sp: [*const K::Staged; P] =
            std::array::from_fn(|q| kern.stage(right.panel(p + q).as_ptr(), 0, k_units, &mut buf));
        for q in 0..P {
            kern.prefetch::<R>(sink, 0, (p + q) * NR);
        }
        kern.run::<R, P>(0, sp, 0, k_units, true, &mut acc);
        for (q, a) in acc.iter().enumerate() {
            kern.store::<R>(a, sink, 0, (p + q) * NR);
        }
    }
}
