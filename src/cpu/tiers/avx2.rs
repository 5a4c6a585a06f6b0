//! AVX2 + FMA + F16C micro-kernels (x86-64 CPUs without AVX-512), chosen at run time.
//!
//! The 16 ymm registers hold a quarter of an `MR x NR` tile at a time: 4 rows x 16 columns, 8
//! accumulators, one broadcast per row and two 8-lane weight loads per k; a tile is four such
//! passes over the same k block (left and panel blocks are re-read from L1), the partial sums kept
//! in memory between passes. k is blocked by the shared loop nest (`cpu::macro_kernel`), and each
//! accumulator is one FMA chain over k in order. Tiles of one or two rows (decode) instead run all
//! 32 columns of up to 2 panels per pass. Results go out through the sink's element-wise store (the
//! same arithmetic as the portable tier's epilogue).

use std::arch::x86_64::*;
use std::ops::Range;

use half::{bf16, f16};

use std::mem::MaybeUninit;

use crate::cpu::isa::Isa;
use crate::cpu::kernels::{Kernels, Layout, PeakInstruction, TierFacts};
use crate::cpu::macro_kernel::{self, MicroKernel};
use crate::cpu::pack::{Left, Panels, MR, NR};
use crate::cpu::sink::Sink;
use crate::dtype::Element;

/// Units of k per cache block (see the AVX-512 kernels).
const KC: usize = 64;
/// Row tiles per group sharing a panel's k block.
const GROUP: usize = 8;
/// Panels per call for tiles of 1 and 2 rows (decode: `4·R·P` chains); 3 and 4 rows run the
/// blocked path.
const DECODE_PANELS: [usize; 4] = [2, 1, 0, 0];
/// Rows and columns of one register pass.
const PR: usize = 4;
const PC: usize = 16;

/// Element types the AVX2 kernels widen from.
pub trait Simd8: Element {
    /// Widens 8 consecutive elements at `p` to f32.
    ///
    /// # Safety
    /// 8 elements are readable at `p`; AVX2, FMA and F16C are available.
    unsafe fn load8(p: *const Self) -> __m256;
}

impl Simd8 for f32 {
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8(p: *const f32) -> __m256 {
        // SAFETY: 8 readable f32 at p (caller).
        unsafe { _mm256_loadu_ps(p) }
    }
}

impl Simd8 for f16 {
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8(p: *const f16) -> __m256 {
        // SAFETY: 8 readable f16 (16 bytes) at p (caller).
        unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p.cast())) }
    }
}

impl Simd8 for bf16 {
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8(p: *const bf16) -> __m256 {
        // SAFETY: 8 readable bf16 (16 bytes) at p (caller).
        unsafe { _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(_mm_loadu_si128(p.cast())))) }
    }
}

/// One register pass: rows `r0..r0 + R` of the tile at `lp` (`lanes` per k), columns `c0..c0 + 16` of the panel at
/// `wp`, over `k0..k0 + kl`, accumulating into `acc` (row-major `[MR][NR]` f32 partial sums).
///
/// # Safety
/// AVX2, FMA and F16C are available; the tile is `[k_len][lanes]`, the panel `[k_cap][NR]`, with
/// `k0 + kl` within both; `r0 + R <= lanes`, `c0 + 16 <= NR`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn pass<W: Simd8, const R: usize>(
    (lp, lanes): (*const f32, usize),
    wp: *const W,
    k0: usize,
    kl: usize,
    r0: usize,
    c0: usize,
    acc: &mut [[f32; NR]; MR],
) {
    // SAFETY: all pointers stay inside the tile, the panel and acc (this function's contract).
    unsafe {
        let mut a: [[__m256; 2]; R] =
            std::array::from_fn(|i| [0, 1].map(|h| _mm256_loadu_ps(acc[r0 + i].as_ptr().add(c0 + 8 * h))));
        for k in k0..k0 + kl {
            let w0 = W::load8(wp.add(k * NR + c0));
            let w1 = W::load8(wp.add(k * NR + c0 + 8));
            let bk = lp.add(k * lanes + r0);
            for (i, ai) in a.iter_mut().enumerate() {
                let b = _mm256_broadcast_ss(&*bk.add(i));
                ai[0] = _mm256_fmadd_ps(b, w0, ai[0]);
                ai[1] = _mm256_fmadd_ps(b, w1, ai[1]);
            }
        }
        for (i, ai) in a.iter().enumerate() {
            for (h, v) in ai.iter().enumerate() {
                _mm256_storeu_ps(acc[r0 + i].as_mut_ptr().add(c0 + 8 * h), *v);
            }
        }
    }
}

/// One k block of a whole row tile of `rows` (<= lanes <= MR) rows: the four register passes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tile_block<W: Simd8>(
    lp: *const f32,
    lanes: usize,
    wp: *const W,
    k0: usize,
    kl: usize,
    rows: usize,
    acc: &mut [[f32; NR]; MR],
) {
    for c0 in (0..NR).step_by(PC) {
        for r0 in (0..rows).step_by(PR) {
            // SAFETY: r0 + R <= rows <= lanes, c0 + 16 <= NR; the rest is the caller's contract.
            unsafe {
                match rows - r0 {
                    1 => pass::<W, 1>((lp, lanes), wp, k0, kl, r0, c0, acc),
                    2 => pass::<W, 2>((lp, lanes), wp, k0, kl, r0, c0, acc),
                    3 => pass::<W, 3>((lp, lanes), wp, k0, kl, r0, c0, acc),
                    _ => pass::<W, PR>((lp, lanes), wp, k0, kl, r0, c0, acc),
                }
            }
        }
    }
}

/// Panels `..P` for rows `..R <= 2` of the tile at `lp`: all 32 columns per pass over
/// `k0..k0 + kl`, accumulating into `acc`. A 16-column pass of one row has two accumulator chains,
/// and a one-row call waited on the FMA latency instead of its weights; this gives `4·R·P` chains,
/// each the same FMA chain over k in order as in [`pass`].
///
/// # Safety
/// As [`pass`], for `P` panels at `wp` and all `NR` columns.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn few_rows<W: Simd8, const R: usize, const P: usize>(
    (lp, lanes): (*const f32, usize),
    wp: [*const W; P],
    k0: usize,
    kl: usize,
    acc: &mut [Acc; P],
) {
    // SAFETY: every access is inside the tile, the panels and acc (this function's contract).
    unsafe {
        let mut a: [[[__m256; 4]; R]; P] = std::array::from_fn(|q| {
            std::array::from_fn(|i| std::array::from_fn(|h| _mm256_loadu_ps(acc[q][i].as_ptr().add(8 * h))))
        });
        for k in k0..k0 + kl {
            let bk = lp.add(k * lanes);
            for (aq, &wq) in a.iter_mut().zip(&wp) {
                let w: [__m256; 4] = std::array::from_fn(|h| W::load8(wq.add(k * NR + 8 * h)));
                for (i, ai) in aq.iter_mut().enumerate() {
                    let b = _mm256_broadcast_ss(&*bk.add(i));
                    for (v, wh) in ai.iter_mut().zip(&w) {
                        *v = _mm256_fmadd_ps(b, *wh, *v);
                    }
                }
            }
        }
        for (aq, accq) in a.iter().zip(acc.iter_mut()) {
            for (ai, row) in aq.iter().zip(accq.iter_mut()) {
                for (h, v) in ai.iter().enumerate() {
                    _mm256_storeu_ps(row.as_mut_ptr().add(8 * h), *v);
                }
            }
        }
    }
}

/// Partial sums of one row tile over one panel, in memory (row-major `[MR][NR]`).
type Acc = [[f32; NR]; MR];

/// f32 broadcasts against panels of `W`, read in place.
struct Fma<'a, W> {
    left: Left<'a, f32>,
    _w: std::marker::PhantomData<W>,
}

impl<W: Simd8, T: Element> MicroKernel<T> for Fma<'_, W> {
    type Weight = W;
    type Staged = W;
    type Acc = Acc;
    type Buf = ();
    const KC: usize = KC;
    const GROUP: usize = GROUP;
    const IN_PLACE: bool = true;
    const DECODE_PANELS: [usize; 4] = DECODE_PANELS;
    fn k_units(&self) -> usize {
        self.left.k_len
    }
    #[inline(always)]
    unsafe fn zero(&self) -> Acc {
        [[0.0; NR]; MR]
    }
    #[inline(always)]
    unsafe fn stage(&self, wp: *const W, k0: usize, _kl: usize, _buf: &mut MaybeUninit<()>) -> *const W {
        // SAFETY: row k0 of the panel exists (this trait method's contract).
        unsafe { wp.add(k0 * NR) }
    }
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn run<const R: usize, const P: usize>(
        &self,
        t0: usize,
        sp: [*const W; P],
        k0: usize,
        kl: usize,
        _last: bool,
        acc: &mut [Acc; P],
    ) {
        // The blocks start at row k0 of their panels.
        let wp = sp.map(|s| s.wrapping_sub(k0 * NR));
        let lp = (self.left.tile(t0).as_ptr(), self.left.lanes);
        // SAFETY: the tile holds R <= lanes rows of k_len >= k0 + kl elements, the panels k_cap >=
        // k_len rows (this trait method's contract).
        unsafe {
            if R <= 2 {
                few_rows::<W, R, P>(lp, wp, k0, kl, acc);
            } else {
                for (&w, a) in wp.iter().zip(acc.iter_mut()) {
                    tile_block(lp.0, lp.1, w, k0, kl, R, a);
                }
            }
        }
    }
    #[inline(always)]
    unsafe fn store<const R: usize>(&self, acc: &Acc, sink: &Sink<'_, T>, t0: usize, col0: usize) {
        let width = NR.min(sink.cols() - col0);
        for (i, row) in acc.iter().enumerate().take(R) {
            // SAFETY: the row and the panel's columns are this call's (the trait method's contract).
            unsafe { sink.store_row(t0 + i, col0, &row[..width]) };
        }
    }
}

/// `sink[row, col] <- Σ_k left[row, k] · right[col, k]` for the panels in `range` (see
/// `cpu::macro_kernel`).
///
/// # Safety
/// AVX2, FMA and F16C are available; otherwise as `macro_kernel::gemm`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn gemm<W: Simd8, T: Element>(
    left: Left<'_, f32>,
    right: &Panels<W>,
    range: Range<usize>,
    sink: &Sink<'_, T>,
) {
    let rows = left.rows;
    // SAFETY: forwarded.
    unsafe { macro_kernel::gemm(&Fma { left, _w: std::marker::PhantomData::<W> }, rows, right, range, sink) }
}

/// The AVX2 kernel table for `T`.
pub(crate) fn kernels<T: Simd8>() -> Kernels<T> {
    Kernels {
        facts: TierFacts {
            isa: Isa::Avx2,
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
        },
        gemm: gemm::<T, T>,
        gemm_f32: gemm::<f32, T>,
        gemm_pairs: None,
        gemm_tiles: None,
    }
}
