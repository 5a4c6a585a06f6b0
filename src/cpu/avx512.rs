//! AVX-512 micro-kernels (x86-64), chosen at run time.
//!
//! Tile: `R <= MR` rows x `NR = 32` columns, 2·R zmm accumulators, one broadcast of the left operand
//! per row and k, two 16-lane weight loads per k (f16 / bf16 weights widened in registers, never in
//! memory). bf16 down-projections on CPUs with AVX512_BF16 use `vdpbf16ps` on k-pairs instead.
//! Each accumulator is one chain over k in order, whatever R is, so the tile a row falls in never
//! changes its result. Column tails are handled with masked loads and stores.

use std::arch::x86_64::*;
use std::ops::Range;

use half::{bf16, f16};

use super::packed::{Left, Panels, Sink, MR, NR};
use super::{Isa, Kernels, Update};
use crate::dtype::Element;

/// Element types the AVX-512 kernels load and store.
pub trait Simd16: Element {
    /// Widens 16 consecutive elements at `p` to f32.
    ///
    /// # Safety
    /// 16 elements are readable at `p`; AVX-512F/BW/VL and F16C are available.
    unsafe fn load16(p: *const Self) -> __m512;
    /// Widens the elements of `p` selected by `mask` (others read as 0, never touched).
    ///
    /// # Safety
    /// The selected elements are readable; AVX-512F/BW/VL and F16C are available.
    unsafe fn load16_masked(p: *const Self, mask: __mmask16) -> __m512;
    /// Rounds `v` to this type (to nearest, ties to even) and stores the lanes selected by `mask`.
    ///
    /// # Safety
    /// The selected elements are writable; AVX-512F/BW/VL and F16C are available.
    unsafe fn store16_masked(p: *mut Self, mask: __mmask16, v: __m512);
}

impl Simd16 for f32 {
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c,fma")]
    unsafe fn load16(p: *const f32) -> __m512 {
        // SAFETY: 16 readable f32 at p (caller).
        unsafe { _mm512_loadu_ps(p) }
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c,fma")]
    unsafe fn load16_masked(p: *const f32, mask: __mmask16) -> __m512 {
        // SAFETY: masked-off lanes are not accessed; selected ones are readable (caller).
        unsafe { _mm512_maskz_loadu_ps(mask, p) }
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c,fma")]
    unsafe fn store16_masked(p: *mut f32, mask: __mmask16, v: __m512) {
        // SAFETY: selected lanes are writable (caller).
        unsafe { _mm512_mask_storeu_ps(p, mask, v) }
    }
}

impl Simd16 for f16 {
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c,fma")]
    unsafe fn load16(p: *const f16) -> __m512 {
        // SAFETY: 16 readable f16 (32 bytes) at p (caller).
        unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(p.cast())) }
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c,fma")]
    unsafe fn load16_masked(p: *const f16, mask: __mmask16) -> __m512 {
        // SAFETY: masked-off lanes are not accessed (caller guarantees the selected ones).
        unsafe { _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, p.cast())) }
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c,fma")]
    unsafe fn store16_masked(p: *mut f16, mask: __mmask16, v: __m512) {
        // SAFETY: selected lanes are writable (caller).
        unsafe {
            let h = _mm512_cvtps_ph::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(v);
            _mm256_mask_storeu_epi16(p.cast(), mask, h)
        }
    }
}

/// bf16 bits in the low 16 of each 32-bit lane, widened to f32 (exact).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c,fma")]
fn bf16_bits_to_f32(bits: __m256i) -> __m512 {
    _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(bits)))
}

impl Simd16 for bf16 {
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c,fma")]
    unsafe fn load16(p: *const bf16) -> __m512 {
        // SAFETY: 16 readable bf16 (32 bytes) at p (caller).
        bf16_bits_to_f32(unsafe { _mm256_loadu_si256(p.cast()) })
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c,fma")]
    unsafe fn load16_masked(p: *const bf16, mask: __mmask16) -> __m512 {
        // SAFETY: masked-off lanes are not accessed (caller guarantees the selected ones).
        bf16_bits_to_f32(unsafe { _mm256_maskz_loadu_epi16(mask, p.cast()) })
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c,fma")]
    unsafe fn store16_masked(p: *mut bf16, mask: __mmask16, v: __m512) {
        // Round to nearest even in integer arithmetic, NaN kept quiet: the same rule as
        // half::bf16::from_f32, so every tier rounds outputs identically.
        let bits = _mm512_castps_si512(v);
        let lsb = _mm512_and_si512(_mm512_srli_epi32::<16>(bits), _mm512_set1_epi32(1));
        let rounded = _mm512_srli_epi32::<16>(_mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))));
        let quiet = _mm512_or_si512(_mm512_srli_epi32::<16>(bits), _mm512_set1_epi32(0x40));
        let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v);
        let out = _mm512_mask_blend_epi32(nan, rounded, quiet);
        // SAFETY: selected lanes are writable (caller).
        unsafe { _mm256_mask_storeu_epi16(p.cast(), mask, _mm512_cvtepi32_epi16(out)) }
    }
}

/// The mask of the first `n` (<= 16) lanes.
#[inline(always)]
fn lanes(n: usize) -> __mmask16 {
    if n >= 16 {
        0xffff
    } else {
        ((1u32 << n) - 1) as __mmask16
    }
}

/// Stores an `R x 32` tile at local rows `t0..t0 + R`, columns `col0..col0 + 32` (clipped).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c,fma")]
unsafe fn store_tile<T: Simd16, const R: usize>(sink: &Sink<'_, T>, t0: usize, col0: usize, acc: &[[__m512; 2]; R]) {
    let n = NR.min(sink.cols() - col0);
    let m = [lanes(n), lanes(n.saturating_sub(16))];
    // SAFETY (whole body): rows t0..t0+R are in the sink and owned by this thread, columns are
    // clipped to the sink's width by the masks (the kernel's contract, see `gemm`).
    unsafe {
        match sink {
            Sink::F32 { out, scale } => {
                let sc = scale.map(|s| [0, 1].map(|h| f32::load16_masked(s.as_ptr().add(col0 + 16 * h), m[h])));
                for (i, a) in acc.iter().enumerate() {
                    let p = out.row_mut(t0 + i).as_mut_ptr().add(col0);
                    for h in 0..2 {
                        let v = match sc {
                            Some(s) => _mm512_mul_ps(s[h], a[h]),
                            None => a[h],
                        };
                        f32::store16_masked(p.add(16 * h), m[h], v);
                    }
                }
            }
            Sink::Epilogue { out, epi } => {
                let sc = epi.scale.map(|s| [0, 1].map(|h| f32::load16_masked(s.as_ptr().add(col0 + 16 * h), m[h])));
                let bi = epi.bias.map(|b| [0, 1].map(|h| f32::load16_masked(b.as_ptr().add(col0 + 16 * h), m[h])));
                for (i, a) in acc.iter().enumerate() {
                    let p = out.row_mut(t0 + i).as_mut_ptr().add(col0);
                    for h in 0..2 {
                        // Same operation order as Epilogue::apply: scale, bias, then the old value.
                        let mut v = match sc {
                            Some(s) => _mm512_mul_ps(s[h], a[h]),
                            None => a[h],
                        };
                        if let Some(b) = bi {
                            v = _mm512_add_ps(v, b[h]);
                        }
                        if epi.accumulate {
                            v = _mm512_add_ps(v, T::load16_masked(p.add(16 * h), m[h]));
                        }
                        T::store16_masked(p.add(16 * h), m[h], v);
                    }
                }
            }
            Sink::Update { out, op } => {
                for (i, a) in acc.iter().enumerate() {
                    let p = out.row_mut(t0 + i).as_mut_ptr().add(col0);
                    for h in 0..2 {
                        let v = match op {
                            Update::Add => _mm512_add_ps(T::load16_masked(p.add(16 * h), m[h]), a[h]),
                            Update::Sub => _mm512_sub_ps(T::load16_masked(p.add(16 * h), m[h]), a[h]),
                            Update::Overwrite => a[h],
                        };
                        T::store16_masked(p.add(16 * h), m[h], v);
                    }
                }
            }
            Sink::Panels { out } => {
                for (i, a) in acc.iter().enumerate() {
                    let p = out.row_ptr(t0 + i, col0);
                    for h in 0..2 {
                        T::store16_masked(p.add(16 * h), m[h], a[h]);
                    }
                }
            }
        }
    }
}

/// `R x 32` dot products over `k_len`, left broadcast from `left` rows `t0..t0 + R`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c,fma")]
unsafe fn tile<W: Simd16, const R: usize>(left: &Left<'_, f32>, t0: usize, wp: *const W) -> [[__m512; 2]; R] {
    let mut acc = [[_mm512_setzero_ps(); 2]; R];
    let lp = left.tile(t0).as_ptr();
    // SAFETY: the left tile is [k_len][MR] and R <= MR; the panel holds k_len rows of NR weights
    // (k_len <= k_cap, checked by the caller).
    unsafe {
        for k in 0..left.k_len {
            let w0 = W::load16(wp.add(k * NR));
            let w1 = W::load16(wp.add(k * NR + 16));
            let bk = lp.add(k * MR);
            for (i, a) in acc.iter_mut().enumerate() {
                let b = _mm512_set1_ps(*bk.add(i));
                a[0] = _mm512_fmadd_ps(b, w0, a[0]);
                a[1] = _mm512_fmadd_ps(b, w1, a[1]);
            }
        }
    }
    acc
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c,fma")]
unsafe fn tile_and_store<W: Simd16, T: Simd16, const R: usize>(
    left: &Left<'_, f32>,
    t0: usize,
    wp: *const W,
    col0: usize,
    sink: &Sink<'_, T>,
) {
    // SAFETY: forwarded contracts of `tile` and `store_tile`.
    unsafe {
        let acc = tile::<W, R>(left, t0, wp);
        store_tile::<T, R>(sink, t0, col0, &acc);
    }
}

/// `sink[row, col] <- Σ_k left[row, k] · right[col, k]` for the panels in `range`.
///
/// # Safety
/// AVX-512F/BW/VL, FMA and F16C are available; `left.k_len <= right.k_cap()`; the sink has
/// `left.rows` rows owned by this call, and the columns of the panels in `range` are owned too.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c,fma")]
unsafe fn gemm<W: Simd16, T: Simd16>(left: Left<'_, f32>, right: &Panels<W>, range: Range<usize>, sink: &Sink<'_, T>) {
    debug_assert!(left.k_len <= right.k_cap());
    let cols = sink.cols();
    for p in range {
        let col0 = p * NR;
        if col0 >= cols {
            break;
        }
        let wp = right.panel(p).as_ptr();
        for t0 in (0..left.rows).step_by(MR) {
            // SAFETY: rows t0..t0+R < left.rows; the rest is this function's contract.
            unsafe {
                match left.rows - t0 {
                    1 => tile_and_store::<W, T, 1>(&left, t0, wp, col0, sink),
                    2 => tile_and_store::<W, T, 2>(&left, t0, wp, col0, sink),
                    3 => tile_and_store::<W, T, 3>(&left, t0, wp, col0, sink),
                    4 => tile_and_store::<W, T, 4>(&left, t0, wp, col0, sink),
                    5 => tile_and_store::<W, T, 5>(&left, t0, wp, col0, sink),
                    6 => tile_and_store::<W, T, 6>(&left, t0, wp, col0, sink),
                    7 => tile_and_store::<W, T, 7>(&left, t0, wp, col0, sink),
                    _ => tile_and_store::<W, T, MR>(&left, t0, wp, col0, sink),
                }
            }
        }
    }
}

/// `R x 32` bf16 dot products with `vdpbf16ps` over `n` elements: `left` holds packed k-pairs,
/// `wp` the weights' k-pairs.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16,f16c,fma")]
unsafe fn tile_pairs<const R: usize>(left: &Left<'_, u32>, n: usize, t0: usize, wp: *const u32) -> [[__m512; 2]; R] {
    let mut acc = [[_mm512_setzero_ps(); 2]; R];
    let lp = left.tile(t0).as_ptr();
    // SAFETY: the left tile is [ceil(n / 2)][MR] pairs and R <= MR; the panel holds ceil(n / 2)
    // pair rows of NR weights (checked by the caller).
    unsafe {
        for p in 0..n / 2 {
            let w0: __m512bh = std::mem::transmute(_mm512_loadu_si512(wp.add(p * NR).cast()));
            let w1: __m512bh = std::mem::transmute(_mm512_loadu_si512(wp.add(p * NR + 16).cast()));
            let bp = lp.add(p * MR);
            for (i, a) in acc.iter_mut().enumerate() {
                let b: __m512bh = std::mem::transmute(_mm512_set1_epi32(*bp.add(i) as i32));
                a[0] = _mm512_dpbf16_ps(a[0], b, w0);
                a[1] = _mm512_dpbf16_ps(a[1], b, w1);
            }
        }
        if n % 2 == 1 {
            // The last k has no partner: one f32 FMA with the low halves of the last pair row, so
            // the weight past the layer's n is never touched.
            let p = n / 2;
            let lo = |v: __m512i| _mm512_castsi512_ps(_mm512_slli_epi32::<16>(v));
            let w0 = lo(_mm512_loadu_si512(wp.add(p * NR).cast()));
            let w1 = lo(_mm512_loadu_si512(wp.add(p * NR + 16).cast()));
            let bp = lp.add(p * MR);
            for (i, a) in acc.iter_mut().enumerate() {
                let b = _mm512_set1_ps(f32::from_bits((*bp.add(i) & 0xffff) << 16));
                a[0] = _mm512_fmadd_ps(b, w0, a[0]);
                a[1] = _mm512_fmadd_ps(b, w1, a[1]);
            }
        }
    }
    acc
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16,f16c,fma")]
unsafe fn tile_pairs_and_store<T: Simd16, const R: usize>(
    left: &Left<'_, u32>,
    n: usize,
    t0: usize,
    wp: *const u32,
    col0: usize,
    sink: &Sink<'_, T>,
) {
    // SAFETY: forwarded contracts of `tile_pairs` and `store_tile`.
    unsafe {
        let acc = tile_pairs::<R>(left, n, t0, wp);
        store_tile::<T, R>(sink, t0, col0, &acc);
    }
}

/// [`gemm`] for bf16 activations packed in k-pairs (`n` elements) against k-pair panels, with
/// `vdpbf16ps`.
///
/// # Safety
/// As [`gemm`], plus AVX512_BF16; `left.k_len == ceil(n / 2) <= right.k_cap()`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16,f16c,fma")]
unsafe fn gemm_pairs<T: Simd16>(
    left: Left<'_, u32>,
    n: usize,
    right: &Panels<u32>,
    range: Range<usize>,
    sink: &Sink<'_, T>,
) {
    debug_assert!(left.k_len == n.div_ceil(2) && left.k_len <= right.k_cap());
    let cols = sink.cols();
    for p in range {
        let col0 = p * NR;
        if col0 >= cols {
            break;
        }
        let wp = right.panel(p).as_ptr();
        for t0 in (0..left.rows).step_by(MR) {
            // SAFETY: rows t0..t0+R < left.rows; the rest is this function's contract.
            unsafe {
                match left.rows - t0 {
                    1 => tile_pairs_and_store::<T, 1>(&left, n, t0, wp, col0, sink),
                    2 => tile_pairs_and_store::<T, 2>(&left, n, t0, wp, col0, sink),
                    3 => tile_pairs_and_store::<T, 3>(&left, n, t0, wp, col0, sink),
                    4 => tile_pairs_and_store::<T, 4>(&left, n, t0, wp, col0, sink),
                    5 => tile_pairs_and_store::<T, 5>(&left, n, t0, wp, col0, sink),
                    6 => tile_pairs_and_store::<T, 6>(&left, n, t0, wp, col0, sink),
                    7 => tile_pairs_and_store::<T, 7>(&left, n, t0, wp, col0, sink),
                    _ => tile_pairs_and_store::<T, MR>(&left, n, t0, wp, col0, sink),
                }
            }
        }
    }
}

/// Whether this CPU runs the AVX-512 tier (F, BW, VL, plus FMA and F16C).
pub(crate) fn has_avx512() -> bool {
    is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vl")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
}

/// Whether this CPU also has AVX512_BF16 (`vdpbf16ps`).
pub(crate) fn has_avx512_bf16() -> bool {
    has_avx512() && is_x86_feature_detected!("avx512bf16")
}

/// The AVX-512 kernel table for `T`; `bf16_pairs` adds the `vdpbf16ps` down-projection (only
/// meaningful for bf16, and only when [`has_avx512_bf16`]).
pub(super) fn kernels<T: Simd16>(bf16_pairs: bool) -> Kernels<T> {
    let pairs = bf16_pairs && T::DTYPE == crate::DType::BF16;
    Kernels {
        isa: if pairs { Isa::Avx512Bf16 } else { Isa::Avx512 },
        gemm: gemm::<T, T>,
        gemm_f32: gemm::<f32, T>,
        gemm_pairs: if pairs { Some(gemm_pairs::<T>) } else { None },
    }
}
