//! Sinks: where a micro-kernel's accumulators go, and the arithmetic applied on the way (the
//! forward's epilogue, merge's update, a plain or scaled f32 store, packed weight panels).
//!
//! A sink is chosen by the driver and applied by the tier: the portable and AVX2 tiers store through
//! [`Sink::store_row`] (element by element), the AVX-512 tiers have vector stores of the same
//! arithmetic, in the same order (`tests` in `cpu` checks every tier against `store_row`, bit for
//! bit, including the rounding to f16 / bf16 against `half`).

use super::pack::{PanelsPtr, NR};
use crate::dtype::Element;
use crate::mat::{MatPtr, MatRef};

/// What the up-projection's epilogue does with each dot product `d` of output column `i`:
/// `y = (accumulate ? y : 0) + scale[i]·d + bias[i]`, in that order.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Epilogue<'a> {
    pub(crate) scale: Option<&'a [f32]>,
    pub(crate) bias: Option<&'a [f32]>,
    pub(crate) accumulate: bool,
}

impl Epilogue<'_> {
    /// The epilogue of one element: `scale[i]·dot`, then `+ bias[i]`, then `+ old` (the order every
    /// tier's store keeps, so that all tiers round alike).
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

/// Per-row epilogues (the mixed-adapter calls): row `t` of the sink takes `rows[t]`, its own
/// adapter's epilogue, resolved once per block by the driver (see `drivers::row_epilogues`), and
/// lands in row `dst[t]` of the output (rows sorted by adapter), or row `t` without `dst`. A row
/// without an epilogue (`None`) is left as it is when accumulating, and set to zero otherwise.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RowEpilogues<'a> {
    pub(crate) rows: &'a [Option<Epilogue<'a>>],
    pub(crate) dst: Option<&'a [u32]>,
    pub(crate) accumulate: bool,
}

impl<'a> RowEpilogues<'a> {
    /// The epilogue of row `t`, or `None` for a row without an adapter.
    #[inline(always)]
    pub(crate) fn row(&self, t: usize) -> Option<Epilogue<'a>> {
        self.rows[t]
    }

    /// The output row that row `t` is stored in.
    #[inline(always)]
    pub(crate) fn out_row(&self, t: usize) -> usize {
        self.dst.map_or(t, |d| d[t] as usize)
    }
}

/// How a ΔW tile is combined with the weight it is written to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Update {
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

/// Where a product's results go. Rows are local to the call; columns are absolute panel columns,
/// and columns at or past the sink's width are dropped.
pub(crate) enum Sink<'a, T> {
    /// `out[row, col] = scale[col]·acc` (or `acc`), f32.
    F32 { out: MatPtr<f32>, scale: Option<&'a [f32]> },
    /// `out[row, col] = epi(acc, out[row, col])`, in `T`.
    Epilogue { out: MatPtr<T>, epi: Epilogue<'a> },
    /// As `Epilogue`, with each row's own epilogue (see [`RowEpilogues`]).
    RowEpilogue { out: MatPtr<T>, rows: RowEpilogues<'a> },
    /// `out[row, col] = op(out[row, col], acc)`, in `T`.
    Update { out: MatPtr<T>, op: Update },
    /// Weight panels in `T` (the dense baseline's ΔW): row `row` of the panel holding `col`.
    Panels { out: PanelsPtr<T> },
    /// A column sum over rows of the product times another matrix: `sums[col] += other[row, col] ·
    /// acc`, in f32 (multiply, then add), rows added in ascending order (the backward's
    /// `dlambda_b = Σ_t dy ⊙ v`, without ever storing `v`). `sums` has the sink's width and one
    /// row, or with `slots` one row per slot: row `t` adds into row `slots[t]` of `sums`, or
    /// nowhere when that is negative (the mixed backward's per-adapter sums).
    ColumnDot { other: MatRef<'a, T>, sums: MatPtr<f32>, slots: Option<&'a [i32]> },
}

impl<T: Element> Sink<'_, T> {
    /// Columns the sink accepts.
    pub(crate) fn cols(&self) -> usize {
        match self {
            Sink::F32 { out, .. } => out.cols(),
            Sink::Epilogue { out, .. } | Sink::RowEpilogue { out, .. } | Sink::Update { out, .. } => out.cols(),
            Sink::Panels { out } => out.cols(),
            Sink::ColumnDot { sums, .. } => sums.cols(),
        }
    }

    /// Stores `vals` as columns `col0 .. col0 + vals.len()` of local row `row` (of the output row
    /// `RowEpilogues::out_row` names, for a `RowEpilogue` sink; element by element:
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
                    let dst = out.cols_mut(row, col0, vals.len());
                    for (c, (d, &v)) in dst.iter_mut().zip(vals).enumerate() {
                        *d = scale.map_or(v, |s| s[col0 + c] * v);
                    }
                }
                Sink::Epilogue { out, epi } => {
                    let dst = out.cols_mut(row, col0, vals.len());
                    for (c, (d, &v)) in dst.iter_mut().zip(vals).enumerate() {
                        *d = T::from_f32(epi.apply(col0 + c, v, d.to_f32()));
                    }
                }
                Sink::RowEpilogue { out, rows } => {
                    let dst = out.cols_mut(rows.out_row(row), col0, vals.len());
                    match rows.row(row) {
                        Some(epi) => {
                            for (c, (d, &v)) in dst.iter_mut().zip(vals).enumerate() {
                                *d = T::from_f32(epi.apply(col0 + c, v, d.to_f32()));
                            }
                        }
                        None if rows.accumulate => {}
                        None => dst.fill(T::from_f32(0.0)),
                    }
                }
                Sink::Update { out, op } => {
                    let dst = out.cols_mut(row, col0, vals.len());
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
                Sink::ColumnDot { other, sums, slots } => {
                    let slot = match slots {
                        Some(slots) => match usize::try_from(slots[row]) {
                            Ok(slot) => slot,
                            Err(_) => return,
                        },
                        None => 0,
                    };
                    let other = &other.row_unchecked(row)[col0..col0 + vals.len()];
                    // Only this call's columns of the sums, so that threads owning other columns
                    // hold no overlapping slice.
                    let sums = sums.sub(slot, 1, col0, vals.len()).row_mut(0);
                    for ((s, &v), o) in sums.iter_mut().zip(vals).zip(other) {
                        *s += o.to_f32() * v;
                    }
                }
            }
        }
    }
}
