//! One driver per operation, each built from the kernel table, packing, sinks and the thread split:
//! `forward` (the fused pass, the training forward, and its two products for the benchmark
//! peers), `backward` (the gradients) and `delta` (merge, unmerge, ΔW). Drivers take plain views and slices (see [`Weights`] and [`Scales`]), never the
//! front end's types, and shapes already validated by the front end.

pub(crate) mod backward;
pub(crate) mod delta;
pub(crate) mod forward;

use super::pack::PackedProjections;
pub(crate) use super::scales::{BankScales, RowScales, Scales};
use super::sink::Epilogue;
use crate::mat::MatRef;

/// One layer's projections as the drivers take them: A `[r, n]`, B `[m, r]`, and the model's
/// copy packed in the kernels' layout, when there is one (else the driver packs per call).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Weights<'a, T> {
    pub a: MatRef<'a, T>,
    pub b: MatRef<'a, T>,
    pub packed: Option<&'a PackedProjections<T>>,
}

/// The epilogues of rows `t0..t0 + rows` of a bank's call (`rows <= BLOCK_ROWS`), resolved once per
/// block so that the stores read one entry per row: each row's `lambda_b` and bias when `scaled`
/// (the mixed forward), neither otherwise (the mixed backward's `dx`); `None` for a row without an
/// adapter.
pub(crate) fn row_epilogues(
    bank: BankScales<'_>,
    t0: usize,
    rows: usize,
    scaled: bool,
    accumulate: bool,
) -> [Option<Epilogue<'_>>; forward::BLOCK_ROWS] {
    assert!(rows <= forward::BLOCK_ROWS, "a block has at most BLOCK_ROWS rows");
    std::array::from_fn(|t| {
        let s = if t < rows { bank.row(t0 + t)? } else { return None };
        let (scale, bias) = if scaled { (Some(s.lambda_b), s.bias) } else { (None, None) };
        Some(Epilogue { scale, bias, accumulate })
    })
}
