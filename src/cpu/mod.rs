//! The CPU backend: per-tier micro-kernels, one loop nest around them, packing, sinks, the thread
//! split, and one driver per operation. See `src/cpu/README.md` for how the pieces fit and how to
//! add a tier or an operation.
//!
//! Every product is `out[row, col] = Σ_k left[row, k] · right[col, k]` with `right` packed in
//! column panels (see `pack`). Determinism: each output element is produced by one chain of f32
//! operations that depends only on its row of `left` and its column of `right`, never on the tile,
//! block or thread it falls in, so any split across threads gives bitwise identical results.

mod caches;
pub(crate) mod drivers;
mod isa;
pub(crate) mod kernels;
mod macro_kernel;
pub(crate) mod pack;
pub(crate) mod parallel;
pub(crate) mod scales;
pub(crate) mod sink;
#[cfg(test)]
mod tests;
mod tiers;

pub use caches::{cache_sizes, CacheSizes};
pub use isa::Isa;
pub use kernels::{active_isa, tier_facts, with_isa, Layout, PeakInstruction, TierFacts};
pub use parallel::set_parallel_min_flops;
