//! AVX-512 micro-kernels (x86-64), chosen at run time.
//!
//! Tile: `R <= MR` rows x `NR = 32` columns, 2·R zmm accumulators, one broadcast of the left operand
//! per row and k, two 16-lane weight loads per k (f16 / bf16 weights widened in registers, never in
//! memory). Calls of more than one row tile stage each panel's k block widened to f32 once for all
//! the tiles of a group. Tiles of at most 4 rows (decode) run over 2-4 panels per call, for enough
//! independent accumulator chains. Each accumulator is one chain over k in order, whatever R (or
//! the number of panels) is, so the tile a row falls in never changes its result. Column tails are
//! handled with masked loads and stores (`avx512_store`, shared with the bf16 `vdpbf16ps` kernel
//! in `avx512bf16`). The loop nest around these kernels is `cpu::macro_kernel`.

use std::arch::x86_64::*;
use std::mem::MaybeUninit;
use std::ops::Range;

use super::avx2::Simd8;
use crate::cpu::isa::{Isa, Vendor};
use crate::cpu::kernels::{Kernels, Layout, PeakInstruction, TierFacts};
use crate::cpu::macro_kernel::{self, MicroKernel};
use crate::cpu::pack::{Left, Panels, MR, NR};
use crate::cpu::sink::Sink;

pub(crate) use super::avx512_store::Simd16;
pub(super) use super::avx512_store::{prefetch_store_lines, store_acc, zero_acc, Acc};

/// Units of k per cache block of the f32-FMA kernels: a panel's block (`KC x 32` weights, 8 KiB in
/// f32) stays in L1 while every row tile of a group runs over it. Measured on an Intel CPU with a
/// 48 KiB L1 (one thread, n = 4096): 256 reached about 50% of the FMA peak, 128 about 55%, 64 and
/// 48 about 70%, 32 no better than 64; larger blocks let the left tiles evict the panel block
/// from L1. (On the AMD Zen 4 VM of the README's table 128 was 2-4% faster for f32 and mixed for
/// f16, so the Intel figure stands.) It is not derived from the L1d size `caches::cache_sizes`
/// reads: BLIS's analytical model (Low et al., 2016: the streamed left tile gets
/// `floor((ways - 1) / (1 + NR / MR))` ways of L1) gives 128 for Zen 4's 32 KiB 8-way L1d, which
/// agrees, but 256 for this Intel CPU's 48 KiB 12-way one, which measured worst.
///
/// Other blockings measured on that Intel CPU (2 threads, T = 512, f32, n, m in {768, 4096,
/// 11008, 16384}, r in {256, 1024}, paired medians of 2-3 interleaved rounds) and not kept:
/// 12-row tiles (24 accumulators; 9-13% faster than 8 x 32 in an L1-resident loop alone) with
/// groups of 6 or 8 and blocks of 60-144 rows, 0.99-1.04x the time; the k range in slices whose
/// group rows take half of L2 (BLIS's `pc` loop), 0.97-1.06x at n = 11008 and 16384; blocks of
/// 256 rows (each block reading the weights once), 0.91x at r = 1024 but 1.06-1.08x at n = 16384;
/// a software prefetch of each panel's next k block, 0.87-0.92x at r = 1024 but 1.03-1.06x at
/// r = 256 and n = 768; a `prefetcht0` of the left block the next tile call reads (a line every
/// second k), 1.03-1.09x the time on the four prefill shapes (5 rounds, a later session). A copy
/// of this tile's k loop with every operand in L1 runs at 82-85% of one core's FMA peak there,
/// unrolled 1 to 8 times alike; a 6 x 64 tile (24 accumulators, 4 weight loads and 6 broadcasts a
/// k) at 85-88%, within that copy's noise of it.
const KC: usize = 64;
/// Row tiles per group: their partial sums (`GROUP x MR x 32` f32, 8 KiB) stay in L1 between
/// k blocks.
pub(super) const GROUP: usize = 8;
/// Panels per call for tiles of 1, 2, 3, 4 rows (decode): `2·R·P` accumulator chains, at least 8
/// (one-thread T = 1 and T = 2 calls were 15-28% faster than with one panel per call).
pub(super) const DECODE_PANELS: [usize; 4] = [4, 4, 2, 2];

/// How far ahead (bytes) a kernel reading panels in place (decode: weights from L3 or memory,
/// each read once per call) asks for its panels' rows: 512 (4 k-rows of an f32 panel, 8 of an f16
/// one) made T = 8 (n = m = 4096, r = 1024, 2 threads) 1.34x faster in f32 and 1.06x in f16, and
/// changed T = 1 by less than the noise; 1024 was no better (`scripts/ab-bench.py --per-case`,
/// 5 rounds, Intel Xeon with AMX, paired medians). The `avx512bf16` tier's single-tile calls use
/// it too: T = 8 r = 1024 0.83x the time, T = 1 0.97x, T = 512 unchanged (7 rounds, same CPU,
/// `VERA_KERNELS_ISA=avx512bf16`). A staged block is in L1 and needs none.
pub(super) const IN_PLACE_PREFETCH: usize = 512;

/// Asks for panel row `row` of `W` (`NR` weights, one or two cache lines) `AHEAD` bytes ahead, for
/// a kernel reading panels in place (see [`IN_PLACE_PREFETCH`]); `AHEAD = 0` asks for nothing.
/// A prefetch never faults, so the address may run past the panel's end.
#[inline(always)]
pub(super) fn prefetch_row_ahead<W, const AHEAD: usize>(row: *const W) {
    if AHEAD == 0 {
        return;
    }
    let ahead = row.cast::<u8>().wrapping_add(AHEAD);
    for line in (0..NR * std::mem::size_of::<W>()).step_by(64) {
        // SAFETY: SSE is in the x86-64 baseline; a prefetch reads no memory architecturally and
        // never faults, whatever the address.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(line).cast()) };
    }
}

/// Room for one staged block of f32 weights (`KC x NR`, 8 KiB), aligned for full-vector loads.
#[repr(C, align(64))]
struct StageBuf([f32; KC * NR]);

/// `acc[q][..R] += left[t0.., k0..k0 + kl] · block q` with f32 FMAs, the blocks' weights (in
/// `S`) widened as they are loaded, each block's rows `PREFETCH` bytes ahead asked for (0: none).
///
/// # Safety
/// AVX-512F/BW/VL, FMA and F16C are present; the left tile is `[k_len][lanes]` with `R <= lanes` and
/// `k0 + kl <= k_len`; each `sp[q]` points at `kl` rows of `NR` weights.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c,fma")]
unsafe fn fma_block<S: Simd16, const R: usize, const P: usize, const PREFETCH: usize>(
    left: &Left<'_, f32>,
    t0: usize,
    sp: [*const S; P],
    k0: usize,
    kl: usize,
    acc: &mut [Acc; P],
) {
    let (lp, lanes) = (left.tile(t0).as_ptr(), left.lanes);
    let mut a: [[[__m512; 2]; R]; P] = std::array::from_fn(|q| std::array::from_fn(|i| acc[q][i]));
    // SAFETY: every access is inside the tile and the blocks (this function's contract).
    unsafe {
        for k in 0..kl {
            let bk = lp.add((k0 + k) * lanes);
            for (aq, &spq) in a.iter_mut().zip(&sp) {
                prefetch_row_ahead::<S, PREFETCH>(spq.add(k * NR));
                let w0 = S::load16(spq.add(k * NR));
                let w1 = S::load16(spq.add(k * NR + 16));
                for (i, ai) in aq.iter_mut().enumerate() {
                    let b = _mm512_set1_ps(*bk.add(i));
                    ai[0] = _mm512_fmadd_ps(b, w0, ai[0]);
                    ai[1] = _mm512_fmadd_ps(b, w1, ai[1]);
                }
            }
        }
    }
    for (accq, aq) in acc.iter_mut().zip(&a) {
        accq[..R].copy_from_slice(aq);
    }
}

/// f32 broadcasts against panels of `W`, staged into f32 blocks shared by the row tiles.
struct Fma<'a, W> {
    left: Left<'a, f32>,
    _w: std::marker::PhantomData<W>,
}

/// f32 broadcasts against panels of `W` widened in the inner loop: for calls of a single row tile
/// (decode), where a staged block would be read by one tile only.
struct FmaDirect<'a, W> {
    left: Left<'a, f32>,
    _w: std::marker::PhantomData<W>,
}

/// The parts of [`MicroKernel`] every AVX-512 kernel shares: zmm partial sums, [`store_acc`],
/// [`prefetch_store_lines`].
macro_rules! avx512_acc_and_store {
    () => {
        type Acc = Acc;
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c,fma")]
        unsafe fn zero(&self) -> Acc {
            zero_acc()
        }
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c,fma")]
        unsafe fn store<const R: usize>(&self, acc: &Acc, sink: &Sink<'_, T>, t0: usize, col0: usize) {
            // SAFETY: forwarded (the trait method's contract).
            unsafe { store_acc::<T, R>(acc, sink, t0, col0) }
        }
        #[inline(always)]
        unsafe fn prefetch<const R: usize>(&self, sink: &Sink<'_, T>, t0: usize, col0: usize) {
            // SAFETY: forwarded (the trait method's contract).
            unsafe { prefetch_store_lines::<T, R>(sink, t0, col0) }
        }
    };
}
pub(super) use avx512_acc_and_store;

impl<W: Simd16, T: Simd16> MicroKernel<T> for Fma<'_, W> {
    type Weight = W;
    type Staged = f32;
    type Buf = StageBuf;
    const KC: usize = KC;
    const GROUP: usize = GROUP;
    const IN_PLACE: bool = false;
    const DECODE_PANELS: [usize; 4] = [0; 4];
    avx512_acc_and_store!();
    fn k_units(&self) -> usize {
        self.left.k_len
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c,fma")]
    unsafe fn stage(&self, wp: *const W, k0: usize, kl: usize, buf: &mut MaybeUninit<StageBuf>) -> *const f32 {
        // SAFETY: rows k0..k0 + kl of the panel exist (this trait method's contract), kl <= KC.
        unsafe {
            let src = wp.add(k0 * NR);
            if W::DTYPE == crate::DType::F32 {
                return src.cast();
            }
            // f16 / bf16: widen the block once here rather than in every row tile's inner loop,
            // where the conversions would compete with the FMAs for their port. The first kl rows
            // of the buffer are written here, before the kernel reads them.
            let dst = buf.as_mut_ptr().cast::<f32>();
            for k in 0..kl {
                for h in 0..2 {
                    _mm512_store_ps(dst.add(k * NR + 16 * h), W::load16(src.add(k * NR + 16 * h)));
                }
            }
            dst
        }
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c,fma")]
    unsafe fn run<const R: usize, const P: usize>(
        &self,
        t0: usize,
        sp: [*const f32; P],
        k0: usize,
        kl: usize,
        _last: bool,
        acc: &mut [Acc; P],
    ) {
        // SAFETY: forwarded (each staged block holds kl rows of NR f32).
        unsafe { fma_block::<f32, R, P, 0>(&self.left, t0, sp, k0, kl, acc) }
    }
}

impl<W: Simd16, T: Simd16> MicroKernel<T> for FmaDirect<'_, W> {
    type Weight = W;
    type Staged = W;
    type Buf = ();
    const KC: usize = KC;
    const GROUP: usize = GROUP;
    const IN_PLACE: bool = true;
    const DECODE_PANELS: [usize; 4] = DECODE_PANELS;
    avx512_acc_and_store!();
    fn k_units(&self) -> usize {
        self.left.k_len
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c,fma")]
    unsafe fn stage(&self, wp: *const W, k0: usize, _kl: usize, _buf: &mut MaybeUninit<()>) -> *const W {
        // SAFETY: row k0 of the panel exists (this trait method's contract).
        unsafe { wp.add(k0 * NR) }
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c,fma")]
    unsafe fn run<const R: usize, const P: usize>(
        &self,
        t0: usize,
        sp: [*const W; P],
        k0: usize,
        kl: usize,
        _last: bool,
        acc: &mut [Acc; P],
    ) {
        // SAFETY: forwarded (the blocks are read in place).
        unsafe { fma_block::<W, R, P, IN_PLACE_PREFETCH>(&self.left, t0, sp, k0, kl, acc) }
    }
}

/// f32 products against panels of `W` (see `cpu::macro_kernel`).
///
/// # Safety
/// AVX-512F/BW/VL, FMA and F16C are present; otherwise as `macro_kernel::gemm`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c,fma")]
pub(super) unsafe fn gemm<W: Simd16, T: Simd16>(
    left: Left<'_, f32>,
    right: &Panels<W>,
    range: Range<usize>,
    sink: &Sink<'_, T>,
) {
    let rows = left.rows;
    let _w = std::marker::PhantomData::<W>;
    // SAFETY: forwarded. A single row tile reads each weight block once: widening it into a
    // staging buffer first would only add a store and a load.
    unsafe {
        if rows > MR {
            blocked_path(&Fma { left, _w }, rows, right, range, sink)
        } else if macro_kernel::takes_few::<FmaDirect<'_, W>, T>(rows) {
            few_path(&FmaDirect { left, _w }, rows, right, range, sink)
        } else {
            blocked_path(&FmaDirect { left, _w }, rows, right, range, sink)
        }
    }
}

/// `macro_kernel::few`, compiled on its own with this tier's features. Inlining both paths and
/// all their instantiations into one entry made the blocked path of 8-row calls (T = 8 decode)
/// 4-7% slower than when each path was its own function (interleaved runs, 2 threads).
///
/// # Safety
/// As `macro_kernel::few`.
#[inline(never)]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c,fma")]
pub(super) unsafe fn few_path<K: MicroKernel<T>, T: Simd16>(
    kern: &K,
    rows: usize,
    right: &Panels<K::Weight>,
    range: Range<usize>,
    sink: &Sink<'_, T>,
) {
    // SAFETY: forwarded.
    unsafe { macro_kernel::few(kern, rows, right, range, sink) }
}

/// `macro_kernel::blocked`, compiled on its own with this tier's features (see [`few_path`]).
///
/// # Safety
/// As `macro_kernel::blocked`.
#[inline(never)]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c,fma")]
pub(super) unsafe fn blocked_path<K: MicroKernel<T>, T: Simd16>(
    kern: &K,
    rows: usize,
    right: &Panels<K::Weight>,
    range: Range<usize>,
    sink: &Sink<'_, T>,
) {
    // SAFETY: forwarded.
    unsafe { macro_kernel::blocked(kern, rows, right, range, sink) }
}

/// [`gemm`], except that a call of one row (T = 1 decode) runs the AVX2 tier's decode kernel: for
/// f16 weights on AMD. f16 decode is bound by widening the weights (`vcvtph2ps`), and on the
/// AMD Zen 4 CPU of the README's table the 256-bit kernel moved f16 weights 19-26% faster than
/// this tier's 512-bit one (T = 1, 4096x4096 and 4096x11008, r = 256, min of 5 interleaved runs)
/// for reasons the profile does not show (both loops are clean); at T = 2 the two were even. Each
/// output is the same FMA chain over k in order either way, so results are bitwise the same.
///
/// # Safety
/// As [`gemm`], plus AVX2 (part of the tier's requirements, see `cpu::isa::has_avx512`).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c,fma,avx2")]
pub(super) unsafe fn gemm_narrow_ymm<W: Simd16 + Simd8, T: Simd16>(
    left: Left<'_, f32>,
    right: &Panels<W>,
    range: Range<usize>,
    sink: &Sink<'_, T>,
) {
    // SAFETY: forwarded; AVX2, FMA and F16C are present.
    unsafe {
        if left.rows == 1 {
            super::avx2::gemm::<W, T>(left, right, range, sink)
        } else {
            gemm::<W, T>(left, right, range, sink)
        }
    }
}

/// The facts of this tier's f32-FMA kernels.
pub(super) const FACTS: TierFacts = TierFacts {
    isa: Isa::Avx512,
    mr: MR,
    nr: NR,
    kc: KC,
    group: GROUP,
    block_rows: crate::cpu::kernels::BLOCK_ROWS,
    decode_panels: DECODE_PANELS,
    layout: Layout::Wide,
    wide_below_rows: 0,
    rounds_u: false,
    flushes_subnormals: false,
    peak: PeakInstruction::F32Fma,
};

/// The AVX-512 kernel table for `T`; on AMD, f16 decode of one row runs the 256-bit kernel (see
/// [`gemm_narrow_ymm`]).
pub(crate) fn kernels<T: Simd16 + Simd8>(vendor: Vendor) -> Kernels<T> {
    let f16_ymm = vendor == Vendor::Amd && T::DTYPE == crate::DType::F16;
    Kernels {
        facts: FACTS,
        gemm: if f16_ymm { gemm_narrow_ymm::<T, T> } else { gemm::<T, T> },
        gemm_f32: gemm::<f32, T>,
        gemm_pairs: None,
        gemm_tiles: None,
    }
}
