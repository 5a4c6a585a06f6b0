//! The AMX tier (Intel AMX-BF16): bf16 products on `tdpbf16ps` tiles, for the forward (both
//! products), the training forward and the backward (`cpu::drivers::backward`: its left operands
//! rounded to bf16); f16 products of calls of [`SPLIT_FROM_ROWS`] rows or more (forward and
//! backward) on the same tiles, each operand split into two bf16 parts; f32 products and smaller
//! f16 calls as the `avx512` tier.
//!
//! Every bf16 product runs on tiles, however few its rows: a tile computes each row from that row
//! alone, so a row's result does not depend on the rows batched with it (a mixed-adapter batch
//! gives each row the bits a single-adapter call gives it), which a switch to `vdpbf16ps` below
//! some row count would break: the two round differently (`tdpbf16ps` matched neither a chain of
//! FMAs over k in either order within a pair, nor one rounding per pair or per tile step, on random
//! inputs). Decode is bound by reading the weights either way; on tiles it is slower (see the
//! README's Intel table).
//!
//! A tile product is `C[16 x 16] f32 += A[16 rows x 16 pairs] · B[16 pairs x 16 columns]`, with B in
//! VNNI pairs: row `p` of a B tile is pair `p` of 16 columns, which is how a 32-column pair panel
//! (`pack::Panels<u32>`, `[pairs][32]`) already stores them, so the shared projections need no
//! packing of their own: a tile is 16 rows of a panel, 128 bytes apart. The left operand is packed
//! per call tile by tile (`pack::RowPairs`). Every tile operand starts on a 64-byte line: a tile
//! load whose rows straddle two lines took about 50 cycles here, against 8.
//!
//! Register blocking: 2 x 2 accumulator tiles (32 rows x one 32-column panel: 4 C, 2 A, 2 B tiles,
//! four `tdpbf16ps` per four tile loads), the complete 16-pair steps of one k slice in one `asm!`
//! block, the C tiles loaded from and stored to 4 KiB blocks in memory (partial sums between
//! slices, exact in f32). After the last slice the pairs past the last complete step (and an odd
//! n's last element) are added with `vdpbf16ps` (and one FMA) in k order, as the `avx512bf16`
//! kernel adds them, so that a weight past a layer's n is never read; the block then goes out
//! through the AVX-512 tier's stores and sinks.
//!
//! Stable Rust has no AMX intrinsics: the tile instructions are `asm!`, each block self-contained
//! (the tile registers hold nothing from one block to the next, and the compiler never allocates
//! them). Linux hands out tile state only to a process that asks (`arch_prctl`), once, in
//! [`usable`]; the tile configuration is per thread, loaded at the start of every product and
//! released at its end.
//!
//! Loop nest (this tier's own: its register block is tiles with a run-time row count, which
//! `macro_kernel`'s trait does not express): for each group of panels, for each k slice, for each
//! panel of the group, for each 32-row block, in order (a column-sum sink adds rows in ascending
//! order); each block's tile steps also ask L2 for the operands of the calls after it
//! (`prefetcht1`: the tile loads' operands otherwise came from L2 or L3 as they were needed), and
//! L1 for their own next step's left tiles. Each output is one chain over k in order (slices of
//! `tdpbf16ps` steps, then the tail), whatever the thread or panel range, so results are bitwise
//! the same for any thread count.

//!
//! Files: `os.rs` (whether this process may use tiles), `tiles.rs` (the tile configuration and the
//! `asm!` tile steps), `gemm.rs` (the loop nest around them, the tail and the stores).

mod gemm;
mod os;
mod tiles;

use super::avx2::Simd8;
use super::avx512::Simd16;
use super::avx512bf16;
use crate::cpu::caches::cache_sizes;
use crate::cpu::isa::{Isa, Vendor};
use crate::cpu::kernels::{Kernels, Layout, PeakInstruction, TierFacts};
use crate::cpu::pack::{RowPairs, TILE_ROWS};
use gemm::{gemm_tiles, slice_steps};
pub(crate) use os::usable;

/// Pairs of k per tile step (a tile row is 64 bytes: 16 pairs of bf16).
pub(super) const STEP: usize = RowPairs::STEP;
/// Rows of the register block: two A tiles.
pub(super) const BLOCK: usize = 2 * TILE_ROWS;

/// Rows per block of the fused forward: a block reads the whole of A and B once (r = 1024: 16 MiB
/// of weights, from L3), which on tiles takes about as long as a 64-row block's products. Against
/// 64-row blocks, 256 made T = 512 (2 threads, bf16) 1.27x faster at r = 1024 and n = m = 4096,
/// 1.13x at m = 11008, 1.06x at n = m = 768 and 1.02x at r = 256 (`scripts/ab-bench.py
/// --per-case`, 3 rounds, medians of the paired ratios).
const BLOCK_ROWS: usize = 256;

/// The facts of this tier's bf16 kernels: those of `avx512bf16` (pair weights, `u` rounded to bf16,
/// subnormals flushed: `tdpbf16ps` flushes them too), on tiles; `kc`, the k slice, follows the
/// CPU's L1d ([`kernels`] sets it).
const FACTS: TierFacts = TierFacts {
    isa: Isa::Amx,
    block_rows: BLOCK_ROWS,
    mr: BLOCK,
    kc: 0,
    layout: Layout::Tiles,
    peak: PeakInstruction::AmxBf16,
    ..avx512bf16::FACTS
};

/// Calls of fewer rows than this run f16 on the `avx512` tier's f32-FMA kernels; from this many on,
/// on tiles with each f16 split into two bf16 parts (three tile products each). Decode streams
/// the weights, and split weights take 3x the bytes of f16 ones. Measured (2 threads, n = m =
/// 4096, `vera bench --dtype f16`, split from 1 row against `VERA_KERNELS_ISA=avx512`, two runs
/// each): r = 256 split/FMA 0.35/0.16 ms at T = 8, 1.07/0.93 at 64, 1.20/1.52 at 96, 1.22/1.59 at
/// 128; r = 1024 1.34/1.01 at 16, 1.59/1.76 at 32, 2.42/3.14 at 64. At r = 64 the FMA kernels
/// stayed 3-10% ahead up to T = 256 (0.52/0.49 at 128, 1.05/0.97 at 256): too few weight columns
/// to reuse each packed row of `x` over. That set the crossover at 64 rows; once the tile loop
/// asked for its operands ahead, splitting from 32 rows instead of 64 took 0.87x the time at T =
/// 32, r = 1024, 0.87x at T = 48, r = 256, 0.64x at T = 48, r = 1024, 0.88x at T = 40, m = 11008,
/// 1.00x at T = 32, r = 256 (even at T = 16, r = 1024), the training step 0.84-0.91x, but 1.10-1.13x
/// at r = 64 (`scripts/ab-bench.py --per-case`, 5 rounds, paired medians): VeRA's ranks are
/// mostly 256 and up.
const SPLIT_FROM_ROWS: usize = 32;

/// The facts of this tier's f16 kernels: the `avx512` tier's below [`SPLIT_FROM_ROWS`] rows, split
/// products on tiles from there on (`u` kept in f32 and split too, subnormal results flushed), the
/// backward's too (its f32 left operands split likewise; the crossover measured for the forward
/// held for it: T = 64, r = 256 backward 1.46 against 1.78 ms on the FMA kernels, r = 64 even;
/// T = 48, r = 1024 0.80x the FMA backward's time, T = 32, r = 64 1.07x).
const FACTS_F16: TierFacts = TierFacts {
    layout: Layout::Split,
    wide_below_rows: SPLIT_FROM_ROWS,
    rounds_u: false,
    peak: PeakInstruction::AmxBf16Split,
    ..FACTS
};

/// The AMX kernel table for `T`: tiles for bf16 and (split into bf16 parts) for f16, the AVX-512
/// table for f32.
pub(crate) fn kernels<T: Simd16 + Simd8>(vendor: Vendor) -> Kernels<T> {
    let table = super::avx512::kernels::<T>(vendor);
    let facts = match T::DTYPE {
        crate::DType::BF16 => FACTS,
        crate::DType::F16 => FACTS_F16,
        _ => return table,
    };
    let facts = TierFacts { kc: slice_steps(cache_sizes()) * STEP, ..facts };
    Kernels { facts, gemm_tiles: Some(gemm_tiles::<T>), ..table }
}
