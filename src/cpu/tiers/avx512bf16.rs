//! The AVX512_BF16 tier: bf16 products with `vdpbf16ps` on k-pairs (A, B and the left operands
//! packed as pairs of bf16, `u` rounded to bf16 as PEFT rounds it), with the AVX-512 tier's stores
//! and loop nest; f32 and f16 run the AVX-512 tier's kernels unchanged.

use std::arch::x86_64::*;
use std::mem::MaybeUninit;
use std::ops::Range;

use super::avx2::Simd8;
use super::avx512::{self, avx512_acc_and_store, prefetch_store_lines, store_acc, zero_acc, Acc, Simd16};
use crate::cpu::isa::{Isa, Vendor};
use crate::cpu::kernels::{Kernels, Layout, PeakInstruction, TierFacts};
use crate::cpu::macro_kernel::{self, MicroKernel};
use crate::cpu::pack::{Left, Panels, MR, NR};
use crate::cpu::sink::Sink;

/// Units of k (pairs) per cache block of the `vdpbf16ps` kernel, which only the AMD tier runs: 128
/// pairs (16 KiB of panel) halve the per-block reload of a tile's accumulators against 64 and
/// measured 1-3% faster on the bf16 prefill shapes (Zen 4, one thread, interleaved runs).
const KC_PAIRS: usize = 128;

/// bf16 k-pairs (`n` elements) against pair panels, with `vdpbf16ps`, asking for each panel's pair
/// rows `PREFETCH` bytes ahead (0: none): a call of a single row tile (decode) reads its panels
/// once, from L3 or memory (see `avx512::IN_PLACE_PREFETCH`).
struct Pairs<'a, const PREFETCH: usize> {
    left: Left<'a, u32>,
    n: usize,
}

impl<T: Simd16, const PREFETCH: usize> MicroKernel<T> for Pairs<'_, PREFETCH> {
    type Weight = u32;
    type Staged = u32;
    type Buf = ();
    const KC: usize = KC_PAIRS;
    const GROUP: usize = avx512::GROUP;
    const IN_PLACE: bool = true;
    const DECODE_PANELS: [usize; 4] = avx512::DECODE_PANELS;
    avx512_acc_and_store!();
    fn k_units(&self) -> usize {
        self.left.k_len
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c,fma")]
    unsafe fn stage(&self, wp: *const u32, k0: usize, _kl: usize, _buf: &mut MaybeUninit<()>) -> *const u32 {
        // Pairs are read as they are packed. SAFETY: row k0 of the panel exists (contract).
        unsafe { wp.add(k0 * NR) }
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16,f16c,fma")]
    unsafe fn run<const R: usize, const P: usize>(
        &self,
        t0: usize,
        sp: [*const u32; P],
        k0: usize,
        kl: usize,
        last: bool,
        acc: &mut [Acc; P],
    ) {
        // The blocks start at pair k0.
        let wp = sp.map(|s| s.wrapping_sub(k0 * NR));
        let (lp, lanes) = (self.left.tile(t0).as_ptr(), self.left.lanes);
        let mut a: [[[__m512; 2]; R]; P] = std::array::from_fn(|q| std::array::from_fn(|i| acc[q][i]));
        let full = self.n / 2;
        // SAFETY: the left tile is [ceil(n / 2)][lanes] pairs and R <= lanes; each panel holds at least
        // ceil(n / 2) pair rows (this trait method's contract).
        unsafe {
            for p in k0..(k0 + kl).min(full) {
                let bp = lp.add(p * lanes);
                for (aq, &wq) in a.iter_mut().zip(&wp) {
                    avx512::prefetch_row_ahead::<u32, PREFETCH>(wq.add(p * NR));
                    let w0: __m512bh = std::mem::transmute(_mm512_loadu_si512(wq.add(p * NR).cast()));
                    let w1: __m512bh = std::mem::transmute(_mm512_loadu_si512(wq.add(p * NR + 16).cast()));
                    for (i, ai) in aq.iter_mut().enumerate() {
                        let b: __m512bh = std::mem::transmute(_mm512_set1_epi32(*bp.add(i) as i32));
                        ai[0] = _mm512_dpbf16_ps(ai[0], b, w0);
                        ai[1] = _mm512_dpbf16_ps(ai[1], b, w1);
                    }
                }
            }
            if last && self.n % 2 == 1 {
                // The last k has no partner: one f32 FMA with the low halves of the last pair
                // row, so the weight past the layer's n is never touched.
                let lo = |v: __m512i| _mm512_castsi512_ps(_mm512_slli_epi32::<16>(v));
                let bp = lp.add(full * lanes);
                for (aq, &wq) in a.iter_mut().zip(&wp) {
                    let w0 = lo(_mm512_loadu_si512(wq.add(full * NR).cast()));
                    let w1 = lo(_mm512_loadu_si512(wq.add(full * NR + 16).cast()));
                    for (i, ai) in aq.iter_mut().enumerate() {
                        let b = _mm512_set1_ps(f32::from_bits((*bp.add(i) & 0xffff) << 16));
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
}

/// bf16 products of k-pairs (`n` elements) against pair panels, with `vdpbf16ps` (see
/// `cpu::macro_kernel`).
///
/// # Safety
/// AVX-512F/BW/VL, FMA, F16C and AVX512_BF16 are present; `left.k_len == ceil(n / 2)`; otherwise
/// as `macro_kernel::gemm`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16,f16c,fma")]
pub(super) unsafe fn gemm_pairs<T: Simd16>(
    left: Left<'_, u32>,
    n: usize,
    right: &Panels<u32>,
    range: Range<usize>,
    sink: &Sink<'_, T>,
) {
    debug_assert_eq!(left.k_len, n.div_ceil(2));
    let rows = left.rows;
    const STREAM: usize = avx512::IN_PLACE_PREFETCH;
    // SAFETY: forwarded. A single row tile (decode) reads each panel once: it asks for it ahead.
    unsafe {
        if rows > MR {
            blocked_path(&Pairs::<0> { left, n }, rows, right, range, sink)
        } else if macro_kernel::takes_few::<Pairs<'_, STREAM>, T>(rows) {
            few_path(&Pairs::<STREAM> { left, n }, rows, right, range, sink)
        } else {
            blocked_path(&Pairs::<STREAM> { left, n }, rows, right, range, sink)
        }
    }
}

/// `macro_kernel::few`, compiled on its own with this tier's features (as the AVX-512 tier's).
///
/// # Safety
/// As `macro_kernel::few`.
#[inline(never)]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16,f16c,fma")]
unsafe fn few_path<T: Simd16, const PREFETCH: usize>(
    kern: &Pairs<'_, PREFETCH>,
    rows: usize,
    right: &Panels<u32>,
    range: Range<usize>,
    sink: &Sink<'_, T>,
) {
    // SAFETY: forwarded.
    unsafe { macro_kernel::few(kern, rows, right, range, sink) }
}

/// `macro_kernel::blocked`, compiled on its own with this tier's features.
///
/// # Safety
/// As `macro_kernel::blocked`.
#[inline(never)]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16,f16c,fma")]
unsafe fn blocked_path<T: Simd16, const PREFETCH: usize>(
    kern: &Pairs<'_, PREFETCH>,
    rows: usize,
    right: &Panels<u32>,
    range: Range<usize>,
    sink: &Sink<'_, T>,
) {
    // SAFETY: forwarded.
    unsafe { macro_kernel::blocked(kern, rows, right, range, sink) }
}

/// The facts of this tier's bf16 kernels: pairs, `u` rounded to bf16, and `vdpbf16ps` flushes
/// subnormal inputs and results to zero.
pub(super) const FACTS: TierFacts = TierFacts {
    isa: Isa::Avx512Bf16,
    kc: KC_PAIRS,
    layout: Layout::Pairs,
    rounds_u: true,
    flushes_subnormals: true,
    peak: PeakInstruction::Bf16Dot,
    ..avx512::FACTS
};

/// The AVX512_BF16 kernel table for `T`: the pair kernels for bf16, the AVX-512 table otherwise.
pub(crate) fn kernels<T: Simd16 + Simd8>(vendor: Vendor) -> Kernels<T> {
    let table = avx512::kernels::<T>(vendor);
    if T::DTYPE != crate::DType::BF16 {
        return table;
    }
    Kernels { facts: FACTS, gemm_pairs: Some(gemm_pairs::<T>), ..table }
}
