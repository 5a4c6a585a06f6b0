//! One driver per operation, each built from the kernel table, packing, sinks and the thread split:
//! `forward` (the fused pass, the training forward, and its two products for the benchmark
//! peers), `backward` (the gradients) and `delta` (merge, unmerge, ΔW). Drivers take plain views and slices (see [`Weights`] and [`Scales`]), never the
//! front end's types, and shapes already validated by the front end.

pub(crate) mod backward;
pub(crate) mod delta;
pub(crate) mod forward;

use super::pack::PackedProjections;
pub(crate) use super::scales::{RowScales, Scales};
use crate::mat::MatRef;

/// One layer's projections as the drivers take them: A `[r, n]`, B `[m, r]`, and the model's
/// copy packed in the kernels' layout, when there is one (else the driver packs per call).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Weights<'a, T> {
    pub a: MatRef<'a, T>,
    pub b: MatRef<'a, T>,
    pub packed: Option<&'a PackedProjections<T>>,
}
