//! The kernel table: for each element type and tier, its micro-kernels **and** the facts the rest of
//! the crate needs about them (register block, cache blocks, operand layout, rounding, the
//! instruction whose peak bounds it). Drivers, packing, the error bounds and `vera bench` read the
//! facts from here; nothing else names a tier.
//!
//! Each tier's table is built once per process, on first use. The tier in use is
//! [`Isa::selected`], or, on the calling thread only, the one [`with_isa`] sets (so that one test
//! process can run every kernel on every tier this CPU has).

use std::cell::Cell;
use std::ops::Range;
use std::sync::OnceLock;

use half::{bf16, f16};

use super::isa::Isa;
use super::pack::{Left, Panels, RowPairs};
use super::sink::Sink;
use super::tiers::portable;
#[cfg(target_arch = "x86_64")]
use super::tiers::{amx, avx2, avx512, avx512bf16};
use crate::dtype::Element;
use crate::types::Numerics;

/// `sink[row, col] <- Σ_k left[row, k]·right[col, k]` over the panels in the range.
pub(crate) type GemmFn<W, T> = unsafe fn(Left<'_, f32>, &Panels<W>, Range<usize>, &Sink<'_, T>);
/// The same with bf16 activations (as bits) against k-pair panels (`vdpbf16ps`), `n` elements.
pub(crate) type PairGemmFn<T> = unsafe fn(Left<'_, u32>, usize, &Panels<u32>, Range<usize>, &Sink<'_, T>);
/// The same with bf16 activations as k-pairs packed in tiles ([`RowPairs`]) against k-pair panels
/// (AMX).
pub(crate) type TileGemmFn<T> = unsafe fn(RowPairs<'_>, usize, &Panels<u32>, Range<usize>, &Sink<'_, T>);

/// Rows of `x` per block of the fused forward on most tiers (see [`TierFacts::block_rows`]): the
/// unit of parallel work for large `T`. Scratch per thread is `block_rows · (2r + n)` f32 at most.
/// Not derived from the L2 size: blocks grown while a block's widened left operands fit half of L2
/// (256 rows at n = m = 768, r = 1024, 128 at n = 2048, on the Intel Xeon with AMX, 2 MiB L2) took
/// 1.04-1.05x the time there (f32, T = 512, 2 threads, `scripts/ab-bench.py --per-case`, 5 rounds,
/// paired medians), n = 1024, r = 256 (256 rows) 1.00x, although a larger block reads the weights
/// fewer times. A later session tried 256-row blocks (at most a thread's share of the rows) on
/// the same CPU (f32, 7 shapes, 5 rounds, paired medians): 0.95x the time at T = 512, n = m = 4096
/// and 768, r = 1024, 0.86x at n = 16384, r = 1024, 1.00x at r = 512, but 1.17x at m = 11008,
/// r = 256, 1.07x at n = 16384, r = 256, and 1.04-1.06x at r = 1024 with T = 256 and 2048.
pub(crate) const BLOCK_ROWS: usize = 64;

/// How the projections and the left operands are laid out for a tier's products.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Layout {
    /// Weights in their own type in 32-column panels; left operands widened to f32 (f32 FMAs).
    Wide,
    /// bf16 weights and left operands as k-pairs, each u32 = (element 2p, element 2p + 1)
    /// (`vdpbf16ps`).
    Pairs,
    /// bf16 weights as in `Pairs` (16 pair rows of a panel are an AMX tile in VNNI layout as they
    /// are); left operands as k-pairs packed tile by tile (`tdpbf16ps`).
    Tiles,
    /// f16 products on bf16 tiles (`tdpbf16ps`): every value split into a high and a low bf16 part
    /// (`hi = bf16(v)`, `lo = bf16(v - hi)`: exact for an f16 value, 16 bits of an f32 `u`), laid
    /// out as `Tiles` with each 16-pair step of k written three times, weights as `[hi][lo][hi]`
    /// and left operands as `[hi][hi][lo]`, so that one tile product over three times the steps is
    /// `hi·hi + hi·lo + lo·hi` (the low·low product, below 2^-16 of the term, left out). A
    /// non-finite `hi` is written as 0 in the copy that meets the other operand's `lo`, so that
    /// infinities give what IEEE products give (not `∞·0 = NaN`).
    Split,
}

impl Layout {
    /// Every layout (the index of each is its slot in a packing cache).
    pub(crate) const ALL: [Layout; 4] = [Layout::Wide, Layout::Pairs, Layout::Tiles, Layout::Split];

    /// The slot of the layout's packed weights in a packing cache: `Tiles` reads the weights
    /// `Pairs` packs, so the two share one copy.
    pub(crate) fn index(self) -> usize {
        match self {
            Layout::Tiles => Layout::Pairs as usize,
            _ => self as usize,
        }
    }
}

/// The instruction whose throughput bounds a tier's products (what `vera bench --peak` measures).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PeakInstruction {
    /// f32 fused multiply-add (or multiply and add).
    F32Fma,
    /// bf16 pair dot product into f32 (`vdpbf16ps`).
    Bf16Dot,
    /// AMX bf16 tile product into f32 (`tdpbf16ps`).
    AmxBf16,
    /// Three AMX bf16 tile products per product ([`Layout::Split`]): a third of the AMX peak.
    AmxBf16Split,
}

/// What a tier's kernels for one element type are and do: the facts drivers, error bounds and
/// benchmarks need, kept with the kernels so that a new tier is one table entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct TierFacts {
    /// The tier (`avx512` for f32 and f16 on an `avx512bf16` CPU: they have no bf16 products).
    pub isa: Isa,
    /// Rows of the left operand per micro-kernel tile.
    pub mr: usize,
    /// Columns per weight panel.
    pub nr: usize,
    /// Units of k (elements, or pairs) per cache block of a panel.
    pub kc: usize,
    /// Row tiles per group that share a panel's k block from L1.
    pub group: usize,
    /// Rows per block of the fused forward at most (the unit of parallel work, sharing one pass over
    /// the projections).
    pub block_rows: usize,
    /// Panels per micro-kernel call for a call of 1, 2, 3, 4 rows (decode); 0: the blocked path.
    pub decode_panels: [usize; 4],
    /// How operands are packed for a call of at least `wide_below_rows` rows.
    pub layout: Layout,
    /// Calls of fewer rows than this run on [`Layout::Wide`] instead of `layout` (0: none do).
    /// Decode streams the weights, and a layout whose weights take more bytes (`Split`: 3x) is
    /// slower there however fast its products; the crossover is measured (see the tier). A row's
    /// bits may then depend on the number of rows in its call, never on the threads.
    pub wide_below_rows: usize,
    /// Whether `u = lambda_d ⊙ h` is rounded to the element type before the up-projection.
    pub rounds_u: bool,
    /// Whether subnormal inputs and results are flushed to zero.
    pub flushes_subnormals: bool,
    /// The instruction whose peak bounds the products.
    pub peak: PeakInstruction,
}

impl TierFacts {
    /// The layout a call of `rows` rows runs its products in.
    pub fn layout_for(&self, rows: usize) -> Layout {
        if rows < self.wide_below_rows {
            Layout::Wide
        } else {
            self.layout
        }
    }

    /// The numerics of these kernels, as the error bounds of [`crate::reference`] take them.
    pub fn numerics(&self) -> Numerics {
        Numerics {
            rounds_u: self.rounds_u,
            flushes_subnormals: self.flushes_subnormals,
            // The pair and tile kernels run the backward on bf16 operands (`drivers::backward`).
            rounds_backward: matches!(self.layout, Layout::Pairs | Layout::Tiles),
            splits_products: self.layout == Layout::Split,
            // Only the tile kernels merge on split operands (`drivers::delta`).
            splits_delta: self.layout == Layout::Tiles,
        }
    }

    /// The numerics of these kernels' backward when it recomputes `h` (for
    /// [`crate::reference::backward_error_bound`]): [`TierFacts::numerics`] where the backward runs
    /// on bf16 operands (`vdpbf16ps` pairs or AMX tiles, rounded; or f16 split on tiles: a call of
    /// fewer rows than `wide_below_rows` then runs the f32-FMA kernels, which this bound covers
    /// too), else those of the f32-FMA kernels, the default (no rounding, flushing or splitting).
    /// With an `h` saved by the training forward, take [`TierFacts::numerics`].
    pub fn backward_numerics(&self) -> Numerics {
        match self.layout {
            Layout::Pairs | Layout::Tiles | Layout::Split => self.numerics(),
            Layout::Wide => Numerics::default(),
        }
    }
}

/// The micro-kernels of one element type on one tier, with their facts. Each kernel writes through
/// the sink; the caller guarantees that the rows and panel columns it passes are its own while the
/// call runs.
pub struct Kernels<T: 'static> {
    pub(crate) facts: TierFacts,
    /// Weights in `T` (projections, the dense baseline's ΔW), [`Layout::Wide`].
    pub(crate) gemm: GemmFn<T, T>,
    /// Weights in f32 (merge's Aᵀ is in `T`; the dense baseline's `diag(lambda_b)·B·diag(lambda_d)`).
    pub(crate) gemm_f32: GemmFn<f32, T>,
    /// bf16 k-pair products, for [`Layout::Pairs`].
    pub(crate) gemm_pairs: Option<PairGemmFn<T>>,
    /// bf16 products on AMX tiles, for [`Layout::Tiles`] and [`Layout::Split`] (the tiles' pairs
    /// are bf16 values or split parts: the kernel is the same).
    pub(crate) gemm_tiles: Option<TileGemmFn<T>>,
}

impl<T> Kernels<T> {
    /// The facts of these kernels.
    pub(crate) fn facts(&self) -> &TierFacts {
        &self.facts
    }
}

/// Element types every tier of this target implements (all three).
#[cfg(target_arch = "x86_64")]
pub(crate) trait TierElement: avx512::Simd16 + avx2::Simd8 {}
#[cfg(target_arch = "x86_64")]
impl<T: avx512::Simd16 + avx2::Simd8> TierElement for T {}
/// Element types every tier of this target implements (all three).
#[cfg(not(target_arch = "x86_64"))]
pub(crate) trait TierElement: Element {}
#[cfg(not(target_arch = "x86_64"))]
impl<T: Element> TierElement for T {}

/// The table of `isa` for `T` (`isa` is one this CPU has).
fn build<T: Element + TierElement>(isa: Isa) -> Kernels<T> {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Amx => amx::kernels::<T>(super::isa::vendor()),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512Bf16 => avx512bf16::kernels::<T>(super::isa::vendor()),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => avx512::kernels::<T>(super::isa::vendor()),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => avx2::kernels::<T>(),
        _ => portable::kernels::<T>(),
    }
}

/// The lazily built tables of one element type, one slot per tier.
pub(crate) type Tables<T> = [OnceLock<Kernels<T>>; Isa::ALL.len()];

macro_rules! kernel_tables {
    ($($t:ty),*) => {$(
        impl crate::sealed::Sealed for $t {
            fn kernel_tables() -> &'static Tables<$t> {
                static TABLES: Tables<$t> = [const { OnceLock::new() }; Isa::ALL.len()];
                &TABLES
            }
            fn build_kernels(isa: Isa) -> Kernels<$t> {
                build::<$t>(isa)
            }
        }
    )*};
}
kernel_tables!(f32, f16, bf16);

thread_local! {
    /// The tier [`with_isa`] set for this thread, if any.
    static OVERRIDE: Cell<Option<Isa>> = const { Cell::new(None) };
}

/// The kernels of `T` on `isa` (lowered to what this CPU has).
pub(crate) fn kernels_on<T: Element>(isa: Isa) -> &'static Kernels<T> {
    let isa = isa.min(Isa::detected());
    T::kernel_tables()[isa as usize].get_or_init(|| {
        let table = T::build_kernels(isa);
        assert!(table.facts.block_rows <= super::drivers::MAX_BLOCK_ROWS, "a tier's blocks fit MAX_BLOCK_ROWS");
        table
    })
}

/// The kernels of `T` in use on this thread: [`with_isa`]'s tier inside it, else [`Isa::selected`].
/// Drivers fetch the table once on the calling thread and hand it to their workers.
pub(crate) fn current<T: Element>() -> &'static Kernels<T> {
    kernels_on::<T>(OVERRIDE.with(Cell::get).unwrap_or_else(Isa::selected))
}

/// Runs `f` with the CPU kernels of every call made from this thread on `isa` (lowered to the best
/// tier this CPU has), whatever `VERA_KERNELS_ISA` says: a test can check every kernel on every
/// tier in one process, and a benchmark can compare tiers side by side. Calls made from other
/// threads are not affected; work a call hands to rayon's threads uses the calling thread's tier.
///
/// ```
/// use vera_kernels::{active_isa, with_isa, Isa};
///
/// with_isa(Isa::Portable, || assert_eq!(active_isa::<f32>(), Isa::Portable));
/// ```
pub fn with_isa<R>(isa: Isa, f: impl FnOnce() -> R) -> R {
    struct Restore(Option<Isa>);
    impl Drop for Restore {
        fn drop(&mut self) {
            OVERRIDE.with(|o| o.set(self.0));
        }
    }
    let _restore = Restore(OVERRIDE.with(|o| o.replace(Some(isa))));
    f()
}

/// The tier the kernels for `T` run on in this thread (f32 and f16 never use the bf16 tier's
/// dot-product instruction, so they report `avx512` on an `avx512bf16` machine).
pub fn active_isa<T: Element>() -> Isa {
    current::<T>().facts.isa
}

/// The facts of the kernels for `T` in use on this thread (see [`TierFacts`]).
pub fn tier_facts<T: Element>() -> TierFacts {
    current::<T>().facts
}
