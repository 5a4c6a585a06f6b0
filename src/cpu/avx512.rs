//! AVX-512 micro-kernels (x86-64), chosen at run time.
//!
//! Tile: `R <= MR` rows x `NR = 32` columns, 2·R zmm accumulators, one broadcast of the left operand
//! per row and k, two 16-lane weight loads per k (f16 / bf16 weights widened in registers, never in
//! memory). bf16 products on CPUs with AVX512_BF16 use `vdpbf16ps` on k-pairs instead. Tiles of at
//! most 4 rows (decode) run over 2-4 panels per call, for enough independent accumulator chains.
//! Each accumulator is one chain over k in order, whatever R (or the number of panels) is, so the
//! tile a row falls in never changes its result. Column tails are handled with masked loads and
//! stores.

use std::arch::x86_64::*;
use std::mem::MaybeUninit;
use std::ops::Range;

use half::{bf16, f16};

use super::avx2::Simd8;
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

/// Units of k per cache block of the f32-FMA kernels: a panel's block (`KC x 32` weights, 8 KiB in
/// f32) stays in L1 while every row tile of a group runs over it. Measured on an Intel CPU with a
/// 48 KiB L1 (one thread, n = 4096): 256 reached about 50% of the FMA peak, 128 about 55%, 64 and
/// 48 about 70%, 32 no better than 64; larger blocks let the left tiles evict the panel block
/// from L1. (On the AMD Zen 4 VM of the README's table 128 was 2-4% faster for f32 and mixed for
/// f16, so the Intel figure stands.)
const KC: usize = 64;
/// Units of k (pairs) per cache block of the `vdpbf16ps` kernel, which only the AMD tier runs: 128
/// pairs (16 KiB of panel) halve the per-block reload of a tile's accumulators against 64 and
/// measured 1-3% faster on the bf16 prefill shapes (Zen 4, one thread, interleaved runs).
const KC_PAIRS: usize = 128;
/// Row tiles per group: their partial sums (`GROUP x MR x 32` f32, 8 KiB) stay in L1 between
/// k blocks.
const GROUP: usize = 8;

/// Partial sums of one row tile.
type Acc = [[__m512; 2]; MR];

/// One k block of one row tile: `acc[..R] += left[t0.., k0..k0 + kl] · block[0..kl]`, where the
/// block is rows `k0..k0 + kl` of a panel, as [`ChunkKernel::stage`] prepared them.
trait ChunkKernel {
    /// The element type of the panels.
    type Weight;
    /// The element type the micro-kernel reads a staged block in.
    type Staged;
    /// Units of k per cache block (see [`KC`]); at most [`KC`] for kernels that stage.
    const KC: usize;
    /// Whether [`ChunkKernel::stage`] returns the panel itself (never writes the buffer), so that
    /// one call can run over the whole k range.
    const IN_PLACE: bool;
    /// Units of k (elements, or pairs) the left operand and the panels hold.
    fn k_units(&self) -> usize;
    /// Rows `k0..k0 + kl` of the panel at `wp`, ready for [`ChunkKernel::run`]: the panel itself, or
    /// a copy widened into `buf` once for all the row tiles that read it.
    ///
    /// # Safety
    /// The tier's features are present; the panel holds at least `k0 + kl` rows; `kl <= Self::KC`
    /// unless `Self::IN_PLACE` (an in-place block may span the whole k range).
    unsafe fn stage(
        &self,
        wp: *const Self::Weight,
        k0: usize,
        kl: usize,
        buf: &mut MaybeUninit<StageBuf>,
    ) -> *const Self::Staged;
    /// `acc[q][..R] += left[t0.., k0..k0 + kl] · block q` for `P` panels at once (more independent
    /// accumulator chains for tiles of few rows; each chain is the same as with `P = 1`).
    ///
    /// # Safety
    /// The tier's features are present; `t0 + R <= rows`, `k0 + kl <= k_units()`; each `sp[q]` is
    /// a block from [`ChunkKernel::stage`] for the same `k0`, `kl`, and all `P` are alive.
    unsafe fn run<const R: usize, const P: usize>(
        &self,
        t0: usize,
        sp: [*const Self::Staged; P],
        k0: usize,
        kl: usize,
        last: bool,
        acc: &mut [Acc; P],
    );
}

/// Room for one staged block of f32 weights (`KC x NR`, 8 KiB), aligned for full-vector loads.
#[repr(C, align(64))]
struct StageBuf([f32; KC * NR]);

/// `acc[q][..R] += left[t0.., k0..k0 + kl] · block q` with f32 FMAs, the blocks' weights (in
/// `S`) widened as they are loaded.
///
/// # Safety
/// AVX-512F/BW/VL, FMA and F16C are present; the left tile is `[k_len][lanes]` with `R <= lanes` and
/// `k0 + kl <= k_len`; each `sp[q]` points at `kl` rows of `NR` weights.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c,fma")]
unsafe fn fma_block<S: Simd16, const R: usize, const P: usize>(
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

impl<W: Simd16> ChunkKernel for Fma<'_, W> {
    type Weight = W;
    type Staged = f32;
    const KC: usize = KC;
    const IN_PLACE: bool = false;
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
        unsafe { fma_block::<f32, R, P>(&self.left, t0, sp, k0, kl, acc) }
    }
}

/// f32 broadcasts against panels of `W` widened in the inner loop: for calls of a single row tile
/// (decode), where a staged block would be read by one tile only.
struct FmaDirect<'a, W> {
    left: Left<'a, f32>,
    _w: std::marker::PhantomData<W>,
}

impl<W: Simd16> ChunkKernel for FmaDirect<'_, W> {
    type Weight = W;
    type Staged = W;
    const KC: usize = KC;
    const IN_PLACE: bool = true;
    fn k_units(&self) -> usize {
        self.left.k_len
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c,fma")]
    unsafe fn stage(&self, wp: *const W, k0: usize, _kl: usize, _buf: &mut MaybeUninit<StageBuf>) -> *const W {
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
        unsafe { fma_block::<W, R, P>(&self.left, t0, sp, k0, kl, acc) }
    }
}

/// bf16 k-pairs (`n` elements) against pair panels, with `vdpbf16ps`.
struct Pairs<'a> {
    left: Left<'a, u32>,
    n: usize,
}

impl ChunkKernel for Pairs<'_> {
    type Weight = u32;
    type Staged = u32;
    const KC: usize = KC_PAIRS;
    const IN_PLACE: bool = true;
    fn k_units(&self) -> usize {
        self.left.k_len
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c,fma")]
    unsafe fn stage(&self, wp: *const u32, k0: usize, _kl: usize, _buf: &mut MaybeUninit<StageBuf>) -> *const u32 {
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

/// Where one call of [`chunk`] works: a k block of a panel.
struct Block<W> {
    /// The staged block (rows k0..k0 + kl of the panel).
    wp: *const W,
    /// Its first column.
    col0: usize,
    /// The k block: `k0 .. k0 + kl`, and whether it is the last one.
    k0: usize,
    kl: usize,
    last: bool,
}

impl<W> Clone for Block<W> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<W> Copy for Block<W> {}

/// Asks for the old values a tile's store will read (`y` when accumulating, `W` for a merge) while
/// its k loop runs. Those rows lie a row stride apart and each is visited for one tile's columns at
/// a time, so the hardware prefetchers miss them: `perf record` of a bf16 prefill call at r = 256
/// put 11% of its time in `store_tile`, nearly all on the load of `y`.
///
/// # Safety
/// Rows `t0..t0 + R` are in the sink.
#[inline(always)]
unsafe fn prefetch_old<T: Simd16, const R: usize>(sink: &Sink<'_, T>, t0: usize, col0: usize) {
    let out = match sink {
        Sink::Epilogue { out, epi } if epi.accumulate => out,
        Sink::Update { out, op } if *op != Update::Overwrite => out,
        _ => return,
    };
    let len = NR.min(out.cols().saturating_sub(col0));
    if len == 0 {
        return;
    }
    for i in 0..R {
        // SAFETY: row t0 + i is in the sink (contract) and columns col0..col0 + len are in the row;
        // a prefetch reads nothing architecturally.
        unsafe {
            let row = out.row_mut(t0 + i).as_ptr().add(col0);
            _mm_prefetch::<_MM_HINT_T0>(row.cast());
            _mm_prefetch::<_MM_HINT_T0>(row.add(len - 1).cast());
        }
    }
}

/// One k block of one row tile of `R` rows; stores the tile through the sink after the last block.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c,fma")]
unsafe fn chunk<K: ChunkKernel, T: Simd16, const R: usize>(
    kern: &K,
    t0: usize,
    blk: Block<K::Staged>,
    acc: &mut Acc,
    sink: &Sink<'_, T>,
) {
    let Block { wp, col0, k0, kl, last } = blk;
    if k0 == 0 {
        *acc = [[_mm512_setzero_ps(); 2]; MR];
        // SAFETY: rows t0..t0 + R are the sink's (this function's contract).
        unsafe { prefetch_old::<T, R>(sink, t0, col0) };
    }
    // SAFETY: forwarded contracts of `ChunkKernel::run` and `store_tile`.
    unsafe {
        kern.run::<R, 1>(t0, [wp], k0, kl, last, std::array::from_mut(acc));
        if last {
            let tile: &[[__m512; 2]; R] = acc[..R].try_into().expect("R <= MR");
            store_tile::<T, R>(sink, t0, col0, tile);
        }
    }
}

/// `sink[row, col] <- Σ_k left[row, k] · right[col, k]` for the panels in `range`, blocked over k
/// so that each panel block is reused from L1 by a group of row tiles. Each accumulator is still
/// one chain over k in order (partial sums are kept in f32 between blocks, which is exact).
///
/// # Safety
/// The tier's features are present; `kern.k_units() <= right.k_cap()`; the sink has `rows` rows
/// owned by this call, and the columns of the panels in `range` are owned too.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c,fma")]
unsafe fn drive<K: ChunkKernel, T: Simd16>(
    kern: &K,
    rows: usize,
    right: &Panels<K::Weight>,
    range: Range<usize>,
    sink: &Sink<'_, T>,
) {
    debug_assert!(kern.k_units() <= right.k_cap());
    if K::IN_PLACE {
        // SAFETY: forwarded.
        unsafe {
            match rows {
                1 => return drive_few::<K, T, 1, 4>(kern, right, range, sink),
                2 => return drive_few::<K, T, 2, 4>(kern, right, range, sink),
                3 => return drive_few::<K, T, 3, 2>(kern, right, range, sink),
                4 => return drive_few::<K, T, 4, 2>(kern, right, range, sink),
                _ => {}
            }
        }
    }
    let cols = sink.cols();
    let k_units = kern.k_units();
    let mut partial: [Acc; GROUP] = [[[_mm512_setzero_ps(); 2]; MR]; GROUP];
    let mut buf = MaybeUninit::<StageBuf>::uninit();
    for p in range {
        let col0 = p * NR;
        if col0 >= cols {
            break;
        }
        let wp = right.panel(p).as_ptr();
        for g0 in (0..rows).step_by(MR * GROUP) {
            let g_end = rows.min(g0 + MR * GROUP);
            // At least one (possibly empty) block, so that k = 0 still stores its zeros.
            for k0 in (0..k_units.max(1)).step_by(K::KC) {
                let kl = K::KC.min(k_units.saturating_sub(k0));
                // SAFETY: rows k0..k0 + kl of the panel exist (k_units <= k_cap).
                let sp = unsafe { kern.stage(wp, k0, kl, &mut buf) };
                let blk = Block { wp: sp, col0, k0, kl, last: k0 + K::KC >= k_units };
                for (acc, t0) in partial.iter_mut().zip((g0..g_end).step_by(MR)) {
                    // SAFETY: rows t0..t0+R < rows, k0 + kl <= k_units; the rest is this
                    // function's contract.
                    unsafe {
                        match g_end - t0 {
                            1 => chunk::<K, T, 1>(kern, t0, blk, acc, sink),
                            2 => chunk::<K, T, 2>(kern, t0, blk, acc, sink),
                            3 => chunk::<K, T, 3>(kern, t0, blk, acc, sink),
                            4 => chunk::<K, T, 4>(kern, t0, blk, acc, sink),
                            5 => chunk::<K, T, 5>(kern, t0, blk, acc, sink),
                            6 => chunk::<K, T, 6>(kern, t0, blk, acc, sink),
                            7 => chunk::<K, T, 7>(kern, t0, blk, acc, sink),
                            _ => chunk::<K, T, MR>(kern, t0, blk, acc, sink),
                        }
                    }
                }
            }
        }
    }
}

/// [`drive`] for a tile of `R <= 4` rows (decode): up to `P` panels per micro-kernel call, over the
/// whole k range. One panel gives such a tile only `2·R` independent accumulator chains, fewer than
/// the FMA / `vdpbf16ps` latency times their throughput, and a one-row call then waited on the
/// chain rather than on its weights; `P` panels give `2·R·P` chains (each the same as with one
/// panel). A range of fewer panels (a thread's share of a small layer) takes them all at once.
///
/// # Safety
/// As [`drive`], with `rows == R` and `K::IN_PLACE`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c,fma")]
unsafe fn drive_few<K: ChunkKernel, T: Simd16, const R: usize, const P: usize>(
    kern: &K,
    right: &Panels<K::Weight>,
    range: Range<usize>,
    sink: &Sink<'_, T>,
) {
    let end = range.end.min(sink.cols().div_ceil(NR));
    let mut p = range.start;
    while p < end {
        let step = P.min(end - p);
        // SAFETY: panels p..p + step are in range and below end; the rest is forwarded.
        unsafe {
            match step {
                1 => few_panels::<K, T, R, 1>(kern, right, p, sink),
                2 => few_panels::<K, T, R, 2>(kern, right, p, sink),
                3 => few_panels::<K, T, R, 3>(kern, right, p, sink),
                _ => few_panels::<K, T, R, P>(kern, right, p, sink),
            }
        }
        p += step;
    }
}

/// Panels `p .. p + P` of [`drive_few`], stored through the sink.
///
/// # Safety
/// As [`drive_few`]; panels `p .. p + P` exist and have columns in the sink.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c,fma")]
unsafe fn few_panels<K: ChunkKernel, T: Simd16, const R: usize, const P: usize>(
    kern: &K,
    right: &Panels<K::Weight>,
    p: usize,
    sink: &Sink<'_, T>,
) {
    let k_units = kern.k_units();
    let mut acc: [Acc; P] = [[[_mm512_setzero_ps(); 2]; MR]; P];
    let mut buf = MaybeUninit::<StageBuf>::uninit();
    // SAFETY: IN_PLACE kernels stage by pointer arithmetic over the whole k range (k_units <=
    // k_cap) and never touch the buffer; rows 0..R are the sink's; forwarded otherwise.
    unsafe {
        let sp: [*const K::Staged; P] =
            std::array::from_fn(|q| kern.stage(right.panel(p + q).as_ptr(), 0, k_units, &mut buf));
        for q in 0..P {
            prefetch_old::<T, R>(sink, 0, (p + q) * NR);
        }
        kern.run::<R, P>(0, sp, 0, k_units, true, &mut acc);
        for (q, a) in acc.iter().enumerate() {
            let tile: &[[__m512; 2]; R] = a[..R].try_into().expect("R <= MR");
            store_tile::<T, R>(sink, 0, (p + q) * NR, tile);
        }
    }
}

/// f32 products against panels of `W` (see [`drive`]).
///
/// # Safety
/// AVX-512F/BW/VL, FMA and F16C are present; otherwise as [`drive`].
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c,fma")]
unsafe fn gemm<W: Simd16, T: Simd16>(left: Left<'_, f32>, right: &Panels<W>, range: Range<usize>, sink: &Sink<'_, T>) {
    let rows = left.rows;
    // SAFETY: forwarded. A single row tile reads each weight block once: widening it into a
    // staging buffer first would only add a store and a load.
    unsafe {
        if rows <= MR {
            drive(&FmaDirect { left, _w: std::marker::PhantomData::<W> }, rows, right, range, sink)
        } else {
            drive(&Fma { left, _w: std::marker::PhantomData::<W> }, rows, right, range, sink)
        }
    }
}

/// bf16 products of k-pairs (`n` elements) against pair panels, with `vdpbf16ps` (see [`drive`]).
///
/// # Safety
/// As [`gemm`], plus AVX512_BF16; `left.k_len == ceil(n / 2)`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16,f16c,fma")]
unsafe fn gemm_pairs<T: Simd16>(
    left: Left<'_, u32>,
    n: usize,
    right: &Panels<u32>,
    range: Range<usize>,
    sink: &Sink<'_, T>,
) {
    debug_assert_eq!(left.k_len, n.div_ceil(2));
    let rows = left.rows;
    // SAFETY: forwarded.
    unsafe { drive(&Pairs { left, n }, rows, right, range, sink) }
}

/// Whether this CPU runs the AVX-512 tier (F, BW, VL, plus FMA and F16C, and AVX2, whose decode
/// kernel this tier borrows for f16 on AMD).
pub(crate) fn has_avx512() -> bool {
    is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vl")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
}

/// Whether this CPU also has AVX512_BF16 (`vdpbf16ps`).
pub(crate) fn has_avx512_bf16() -> bool {
    has_avx512() && is_x86_feature_detected!("avx512bf16")
}

/// [`gemm`], except that a call of one row (T = 1 decode) runs the AVX2 tier's decode kernel: for
/// f16 weights on AMD. f16 decode is bound by widening the weights (`vcvtph2ps`), and on the
/// AMD Zen 4 CPU of the README's table the 256-bit kernel moved f16 weights 19-26% faster than
/// this tier's 512-bit one (T = 1, 4096x4096 and 4096x11008, r = 256, min of 5 interleaved runs)
/// for reasons the profile does not show (both loops are clean); at T = 2 the two were even. Each
/// output is the same FMA chain over k in order either way, so results are bitwise the same.
///
/// # Safety
/// As [`gemm`], plus AVX2 (part of [`has_avx512`]).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c,fma,avx2")]
unsafe fn gemm_narrow_ymm<W: Simd16 + Simd8, T: Simd16>(
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

/// The AVX-512 kernel table for `T`; `bf16_pairs` adds the `vdpbf16ps` down-projection (only
/// meaningful for bf16, and only when [`has_avx512_bf16`]); `amd` routes f16 decode to the 256-bit
/// kernel (see [`gemm_narrow_ymm`]).
pub(super) fn kernels<T: Simd16 + Simd8>(bf16_pairs: bool, amd: bool) -> Kernels<T> {
    let pairs = bf16_pairs && T::DTYPE == crate::DType::BF16;
    let f16_ymm = amd && T::DTYPE == crate::DType::F16;
    Kernels {
        isa: if pairs { Isa::Avx512Bf16 } else { Isa::Avx512 },
        gemm: if f16_ymm { gemm_narrow_ymm::<T, T> } else { gemm::<T, T> },
        gemm_f32: gemm::<f32, T>,
        gemm_pairs: if pairs { Some(gemm_pairs::<T>) } else { None },
    }
}
