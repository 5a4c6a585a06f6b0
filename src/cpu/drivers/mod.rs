//! One driver per operation, each built from the kernel table, packing, sinks and the thread split:
//! `forward` (the fused pass, the training forward, and its two products for the benchmark
//! peers), `backward` (the gradients) and `delta` (merge, unmerge, ΔW). Drivers take plain views and slices (see [`Weights`] and [`Scales`]), never the
//! front end's types, and shapes already validated by the front end.

pub(crate) mod backward;
pub(crate) mod delta;
pub(crate) mod forward;

use super::kernels::Layout;
use super::pack::PackedProjections;
pub(crate) use super::scales::{BankScales, RowScales, Scales};
use super::sink::Epilogue;
use crate::mat::MatRef;

/// One layer's projections as the drivers take them: A `[r, n]`, B `[m, r]`, the layout the call's
/// products run in, and the model's copy packed in it, when there is one (else the driver packs
/// per call).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Weights<'a, T> {
    pub a: MatRef<'a, T>,
    pub b: MatRef<'a, T>,
    pub layout: Layout,
    pub packed: Option<&'a PackedProjections<T>>,
}

/// The most rows a block of any tier holds (`TierFacts::block_rows`; asserted when a table is
/// built).
pub(crate) const MAX_BLOCK_ROWS: usize = 256;

/// The epilogues of a block of a bank's call, resolved once per block so that the stores read one
/// entry per row: for rows `t0..t0 + rows` of the call, or with `order` for rows `order[t0..]`.
/// Each row's `lambda_b` and bias when `scaled` (the mixed forward), neither otherwise (the mixed
/// backward's `dx`); `None` for a row without an adapter.
pub(crate) fn row_epilogues<'a>(
    bank: BankScales<'a>,
    (t0, rows): (usize, usize),
    order: Option<&[u32]>,
    scaled: bool,
    accumulate: bool,
) -> [Option<Epilogue<'a>>; MAX_BLOCK_ROWS] {
    assert!(rows <= MAX_BLOCK_ROWS, "a block has at most MAX_BLOCK_ROWS rows");
    std::array::from_fn(|t| {
        if t >= rows {
            return None;
        }
        let s = bank.row(order.map_or(t0 + t, |o| o[t0 + t] as usize))?;
        let (scale, bias) = if scaled { (Some(s.lambda_b), s.bias) } else { (None, None) };
        Some(Epilogue { scale, bias, accumulate })
    })
}
