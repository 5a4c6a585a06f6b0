//! AVX2 + FMA + F16C micro-kernels (x86-64 CPUs without AVX-512), chosen at run time.
//!
//! The 16 ymm registers hold a quarter of an `MR x NR` tile at a time: 4 rows x 16 columns, 8
//! accumulators, one broadcast per row and two 8-lane weight loads per k; a tile is four such
//! passes over the same k block (left and panel blocks are re-read from L1). k is blocked as in
//! the AVX-512 kernels, and each accumulator is one FMA chain over k in order. One or two rows
//! (decode) instead run all 32 columns of up to 2 panels per pass over the whole k range. Results
//! go out through the sink's element-wise store (the same arithmetic as the portable tier's
//! epilogue).

use std::arch::x86_64::*;
use std::ops::Range;

use half::{bf16, f16};

use super::packed::{Left, Panels, Sink, MR, NR};
use super::{Isa, Kernels};
use crate::dtype::Element;

/// Units of k per cache block (see the AVX-512 kernels).
const KC: usize = 64;
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

/// `sink[row, col] <- Σ_k left[row, k] · right[col, k]` for the panels in `range`.
///
/// # Safety
/// AVX2, FMA and F16C are available; `left.k_len <= right.k_cap()`; the sink has `left.rows` rows
/// owned by this call, and the columns of the panels in `range` are owned too.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn gemm<W: Simd8, T: Element>(
    left: Left<'_, f32>,
    right: &Panels<W>,
    range: Range<usize>,
    sink: &Sink<'_, T>,
) {
    debug_assert!(left.k_len <= right.k_cap());
    if left.rows <= 2 {
        // SAFETY: forwarded.
        unsafe {
            return match left.rows {
                1 => gemm_few::<W, T, 1, 2>(left, right, range, sink),
                _ => gemm_few::<W, T, 2, 1>(left, right, range, sink),
            };
        }
    }
    const GROUP: usize = 8;
    let cols = sink.cols();
    let k_len = left.k_len;
    let mut partial = [[[0.0f32; NR]; MR]; GROUP];
    for p in range {
        let col0 = p * NR;
        if col0 >= cols {
            break;
        }
        let width = NR.min(cols - col0);
        let wp = right.panel(p).as_ptr();
        for g0 in (0..left.rows).step_by(MR * GROUP) {
            let g_end = left.rows.min(g0 + MR * GROUP);
            for acc in partial.iter_mut() {
                *acc = [[0.0; NR]; MR];
            }
            for k0 in (0..k_len).step_by(KC) {
                let kl = KC.min(k_len - k0);
                for (acc, t0) in partial.iter_mut().zip((g0..g_end).step_by(MR)) {
                    let lp = left.tile(t0).as_ptr();
                    // SAFETY: the tile holds k_len rows, the panel k_cap >= k_len; rows clipped.
                    unsafe { tile_block(lp, left.lanes, wp, k0, kl, MR.min(g_end - t0), acc) };
                }
            }
            for (acc, t0) in partial.iter().zip((g0..g_end).step_by(MR)) {
                for (i, row) in acc.iter().enumerate().take(MR.min(g_end - t0)) {
                    // SAFETY: the row and panel columns are owned (this function's contract).
                    unsafe { sink.store_row(t0 + i, col0, &row[..width]) };
                }
            }
        }
    }
}

/// [`gemm`] for 1 or 2 rows (decode): all 32 columns of up to `P` panels per pass, over the whole
/// k range. A 16-column pass of one row has two accumulator chains, and a one-row call waited on
/// the FMA latency instead of its weights; this gives `4·R·P` chains, each the same FMA chain over
/// k in order as in [`pass`].
///
/// # Safety
/// As [`gemm`], with `left.rows == R`.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn gemm_few<W: Simd8, T: Element, const R: usize, const P: usize>(
    left: Left<'_, f32>,
    right: &Panels<W>,
    range: Range<usize>,
    sink: &Sink<'_, T>,
) {
    let cols = sink.cols();
    let end = range.end.min(cols.div_ceil(NR));
    let (lp, lanes) = (left.tile(0).as_ptr(), left.lanes);
    let mut p = range.start;
    while p < end {
        let step = P.min(end - p);
        // SAFETY: panels p..p + step exist and have columns in the sink; the tile holds R <= lanes
        // rows of k_len <= k_cap elements; the rows and columns are this call's.
        unsafe {
            if step == P {
                few_panels::<W, T, R, P>((lp, lanes), left.k_len, right, p, sink);
            } else {
                few_panels::<W, T, R, 1>((lp, lanes), left.k_len, right, p, sink);
            }
        }
        p += step;
    }
}

/// Panels `p .. p + P` of [`gemm_few`], stored through the sink.
///
/// # Safety
/// As [`gemm_few`]; panels `p .. p + P` exist and have columns in the sink.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn few_panels<W: Simd8, T: Element, const R: usize, const P: usize>(
    (lp, lanes): (*const f32, usize),
    k_len: usize,
    right: &Panels<W>,
    p: usize,
    sink: &Sink<'_, T>,
) {
    let wp: [*const W; P] = std::array::from_fn(|q| right.panel(p + q).as_ptr());
    let mut a = [[[_mm256_setzero_ps(); 4]; R]; P];
    // SAFETY: every access is inside the tile and the panels (this function's contract).
    unsafe {
        for k in 0..k_len {
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
    }
    let mut row = [0.0f32; NR];
    for (q, aq) in a.iter().enumerate() {
        let col0 = (p + q) * NR;
        let width = NR.min(sink.cols() - col0);
        for (i, ai) in aq.iter().enumerate() {
            for (h, v) in ai.iter().enumerate() {
                // SAFETY: 8 f32 fit at 8·h < NR.
                unsafe { _mm256_storeu_ps(row.as_mut_ptr().add(8 * h), *v) };
            }
            // SAFETY: the row and the panel's columns are this call's (contract).
            unsafe { sink.store_row(i, col0, &row[..width]) };
        }
    }
}

/// Whether this CPU runs the AVX2 tier.
pub(crate) fn has_avx2() -> bool {
    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c")
}

/// The AVX2 kernel table for `T`.
pub(super) fn kernels<T: Simd8>() -> Kernels<T> {
    Kernels { isa: Isa::Avx2, gemm: gemm::<T, T>, gemm_f32: gemm::<f32, T>, gemm_pairs: None }
}
