//! # vera-kernels
//!
//! Fused kernels for the VeRA adapter path (Kopiczko et al., 2024):
//!
//! ```text
//! y = base + lambda_b ⊙ ((lambda_d ⊙ (x·Aᵀ))·Bᵀ) + bias
//! ```
//!
//! computed without ever forming `ΔW = diag(lambda_b)·B·diag(lambda_d)·A`, for `f32`, `f16` and
//! `bf16`, exact to HuggingFace PEFT's semantics (including its seeded projections).
//!
//! - [`Projections`]: the frozen A `[r, n_max]` and B `[m_max, r]` shared by every layer
//!   (PEFT-identical generation from a seed, or your arrays), sliced per layer without copies.
//! - [`Adapter`]: one layer's `lambda_d [r]`, `lambda_b [m]` and optional bias `[m]`.
//! - [`forward`]: the fused pass into a caller-owned `y`, accumulating ([`Mode::Accumulate`]) or
//!   overwriting; [`merge`] / [`unmerge`] / [`delta_weight`] for weight merging.
//! - [`forward_train`] and [`backward`]: training (the gradients of `lambda_d`, `lambda_b`, the
//!   bias and `x`), deterministic.
//! - [`AdapterBank`], [`forward_mixed`], [`backward_mixed`]: a batch whose rows use different
//!   adapters of one layer, at one adapter's cost (the projections are shared).
//! - [`baseline`]: the dense and unfused peers the fused path is benchmarked against.
//! - [`reference`](mod@reference): the naive f64 implementation and the forward-error bounds the kernels are
//!   tested against.
//!
//! Every misuse returns an [`Error`]; no public function panics on bad input. Results are bitwise
//! identical for any number of rayon threads.

#![deny(missing_docs)]

mod adapter;
mod alloc;
mod bank;
pub mod baseline;
#[cfg(feature = "candle")]
pub mod candle;
mod cpu;
#[cfg(any(feature = "cuda", feature = "cuda-emulation"))]
pub mod cuda;
mod dtype;
mod error;
mod mat;
mod ops;
pub mod peft;
mod projections;
pub mod reference;
pub mod rng;
mod types;

pub use adapter::Adapter;
pub use bank::{AdapterBank, NO_ADAPTER};
pub use cpu::{
    active_isa, cache_sizes, set_parallel_min_flops, tier_facts, with_isa, CacheSizes, Isa, Layout, PeakInstruction,
    TierFacts,
};
pub use dtype::{DType, Element};
pub use error::{Error, Result};
pub use mat::{MatMut, MatRef};
pub use ops::{
    backward, backward_mixed, delta_weight, forward, forward_layer, forward_mixed, forward_train, forward_train_mixed,
    merge, unmerge, Gradients, BLOCK_ROWS,
};
pub use projections::{LayerProjections, Projections};
pub use types::{Mode, Numerics};

/// Re-exported so that users name the same `f16` / `bf16` types as the kernels.
pub use half::{bf16, f16};

pub(crate) mod sealed {
    /// Seals [`crate::Element`] and carries each type's CPU kernel tables.
    pub trait Sealed {
        /// The CPU kernel tables of this element type, one slot per tier, each built on first use.
        fn kernel_tables() -> &'static crate::cpu::kernels::Tables<Self>
        where
            Self: Sized;
        /// Builds this type's kernel table for a tier this CPU has.
        fn build_kernels(isa: crate::cpu::Isa) -> crate::cpu::kernels::Kernels<Self>
        where
            Self: Sized;
    }
}

/// The README's code examples, compiled and run as doctests.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
