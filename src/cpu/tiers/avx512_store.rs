//! The AVX-512 tiers' loads and stores: each element type's 16-lane loads and stores ([`Simd16`]),
//! and the sinks' arithmetic on a tile of partial sums ([`store_acc`]), vector for vector the same
//! operations, in the same order, as the scalar definitions in `cpu::sink` (`cpu::tests` checks
//! them bit for bit). Shared by the f32-FMA kernels (`avx512`) and the `vdpbf16ps` kernels
//! (`avx512bf16`).

use std::arch::x86_64::*;

use half::{bf16, f16};

use crate::cpu::pack::{MR, NR};
use crate::cpu::sink::{Sink, Update};
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
                    let p = out.at(t0 + i, col0);
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
                    let p = out.at(t0 + i, col0);
                    epilogue_row(p, a, sc, bi, epi.accumulate, m);
                }
            }
            Sink::RowEpilogue { out, rows } => {
                for (i, a) in acc.iter().enumerate() {
                    let p = out.at(rows.out_row(t0 + i), col0);
                    match rows.row(t0 + i) {
                        // Each row its own adapter's vectors: the arithmetic of the arm above.
                        Some(epi) => {
                            let load =
                                |v: &[f32]| [0, 1].map(|h| f32::load16_masked(v.as_ptr().add(col0 + 16 * h), m[h]));
                            epilogue_row(p, a, epi.scale.map(load), epi.bias.map(load), epi.accumulate, m);
                        }
                        None if rows.accumulate => {}
                        None => {
                            for (h, &mask) in m.iter().enumerate() {
                                T::store16_masked(p.add(16 * h), mask, _mm512_setzero_ps());
                            }
                        }
                    }
                }
            }
            Sink::Update { out, op } => {
                for (i, a) in acc.iter().enumerate() {
                    let p = out.at(t0 + i, col0);
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
            Sink::ColumnDot { other, sums, slots } => {
                // The scalar definition's arithmetic, 16 columns at a time: `sum + other·acc`,
                // multiply then add (no FMA), rows in ascending order. (Element by element, this
                // store was a large part of the AMX tier's backward, whose products are fast.)
                for (i, a) in acc.iter().enumerate() {
                    let row = t0 + i;
                    let slot = match slots {
                        Some(slots) => match usize::try_from(slots[row]) {
                            Ok(slot) => slot,
                            Err(_) => continue,
                        },
                        None => 0,
                    };
                    let o = other.row_unchecked(row).as_ptr().add(col0);
                    // Only this call's columns of the sums (see `Sink::store_row`).
                    let sp = sums.at(slot, col0);
                    for h in 0..2 {
                        let old = f32::load16_masked(sp.add(16 * h), m[h]);
                        let prod = _mm512_mul_ps(T::load16_masked(o.add(16 * h), m[h]), a[h]);
                        f32::store16_masked(sp.add(16 * h), m[h], _mm512_add_ps(old, prod));
                    }
                }
            }
        }
    }
}

/// One row of an epilogue store: `scale·acc`, `+ bias`, `+ old`, in [`Epilogue::apply`](crate::cpu::sink::Epilogue::apply)'s order
/// (`sc` / `bi`: the row's scale and bias at this tile's columns, when there are any).
///
/// # Safety
/// `p` points at the row's first column of the tile; the masks clip it to the sink's width.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c,fma")]
unsafe fn epilogue_row<T: Simd16>(
    p: *mut T,
    a: &[__m512; 2],
    sc: Option<[__m512; 2]>,
    bi: Option<[__m512; 2]>,
    accumulate: bool,
    m: [__mmask16; 2],
) {
    for h in 0..2 {
        let mut v = match sc {
            Some(s) => _mm512_mul_ps(s[h], a[h]),
            None => a[h],
        };
        if let Some(b) = bi {
            v = _mm512_add_ps(v, b[h]);
        }
        // SAFETY: the row's columns col0.. are in the sink up to the masks (this fn's contract).
        unsafe {
            if accumulate {
                v = _mm512_add_ps(v, T::load16_masked(p.add(16 * h), m[h]));
            }
            T::store16_masked(p.add(16 * h), m[h], v);
        }
    }
}

/// Partial sums of one row tile.
pub(super) type Acc = [[__m512; 2]; MR];

/// Zeroed partial sums.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c,fma")]
pub(super) fn zero_acc() -> Acc {
    [[_mm512_setzero_ps(); 2]; MR]
}

/// Stores rows `..R` of a tile's partial sums (see [`store_tile`]).
///
/// # Safety
/// As [`store_tile`].
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c,fma")]
pub(super) unsafe fn store_acc<T: Simd16, const R: usize>(acc: &Acc, sink: &Sink<'_, T>, t0: usize, col0: usize) {
    let tile: &[[__m512; 2]; R] = acc[..R].try_into().expect("R <= MR");
    // SAFETY: forwarded.
    unsafe { store_tile::<T, R>(sink, t0, col0, tile) }
}

/// Asks for the lines a tile's store will read (`y` when accumulating, `W` for a merge, the
/// backward's `dy` for a column-dot sink, a mixed call's adapter vectors) or write over, while its k loop runs. Those rows lie a
/// row stride apart and each is visited for one tile's columns at a time, so the hardware
/// prefetchers miss them: `perf record` of a bf16 prefill call at r = 256 put 11% of its time in
/// `store_tile`, nearly all on the load of `y`. An output written over without being read
/// (`Mode::Overwrite`, ΔW) is asked for too: a store to a line not in cache waits for the line all
/// the same (write-allocate), and the bf16 backward at T = 4096 (n = m = 4096, r = 256, `dx` written over, 32 MiB) spent a
/// quarter of its time in the stores, most of it behind those of `dx`; asking for them made that
/// backward 0.82x the time (its training step 0.92x; the f16 and f32 backwards there 0.93x and
/// 0.99x; `vera bench --backward`, old and new binaries alternated 3 times, paired medians, Intel
/// Xeon with AMX), T = 512 within the noise (0.99-1.03x, 7 rounds).
///
/// # Safety
/// Rows `t0..t0 + R` are in the sink.
#[inline(always)]
pub(super) unsafe fn prefetch_store_lines<T: Simd16, const R: usize>(sink: &Sink<'_, T>, t0: usize, col0: usize) {
    // A column-dot sink reads a row of its other operand (the backward's `dy`) per output row, a
    // row stride apart too (asking for them: the bf16 backward at T = 4096 0.91x the time).
    if let Sink::ColumnDot { other, .. } = sink {
        let len = NR.min(other.cols().saturating_sub(col0));
        if len == 0 {
            return;
        }
        for row in t0..t0 + R {
            // The rows are in the sink (contract): the store reads them the same way.
            prefetch_span(other.row_unchecked(row).as_ptr().wrapping_add(col0), len);
        }
        return;
    }
    let (out, dst) = match sink {
        Sink::Epilogue { out, .. } => (out, None),
        Sink::RowEpilogue { out, rows } => (out, Some(rows)),
        Sink::Update { out, .. } => (out, None),
        _ => return,
    };
    let len = NR.min(out.cols().saturating_sub(col0));
    if len == 0 {
        return;
    }
    for i in 0..R {
        // SAFETY: row t0 + i is in the sink (contract) and col0 < its width (len > 0).
        let row = unsafe { out.at(dst.map_or(t0 + i, |d| d.out_row(t0 + i)), col0) };
        prefetch_span(row.cast_const(), len);
    }
    // A mixed call's rows read their own adapter's `lambda_b` and bias at these columns: each
    // adapter's vectors are a row of the bank, `m` floats apart, so a block's adapters are as many
    // streams at once, too many for the prefetchers (`perf annotate`: the store's loads of them
    // were most of its time, 12% of the call's against 5% with one adapter). The rows run sorted
    // by adapter, so asking once per run of rows with the same vectors asks once per adapter of
    // the tile. One adapter's time over the mixed call's, K = 64 adapters over 512 rows, 4096 x
    // 4096, r = 256, old and new binaries alternated, medians (`vera bench --adapters 64`, AMD
    // EPYC Zen 4, 2 threads): bf16 0.908 -> 0.942 (rows interleaved) and 0.920 -> 0.970 (in runs),
    // 15 rounds; f32 0.958 -> 0.965, f16 0.968 -> 0.981, 9 rounds.
    if let Some(rows) = dst {
        let mut last = None;
        for t in t0..t0 + R {
            let Some(epi) = rows.row(t) else { continue };
            let key = (epi.scale.map(<[f32]>::as_ptr), epi.bias.map(<[f32]>::as_ptr));
            if last == Some(key) {
                continue;
            }
            last = Some(key);
            for v in [epi.scale, epi.bias].into_iter().flatten() {
                prefetch_span(v.as_ptr().wrapping_add(col0), len);
            }
        }
    }
}

/// Asks for the lines holding elements `p .. p + len` of one tile row (`1 <= len <= NR`: its
/// first and last element, one or two lines). A prefetch never faults and reads nothing
/// architecturally, so the address need not be valid.
#[inline(always)]
fn prefetch_span<E>(p: *const E, len: usize) {
    // SAFETY: SSE is in the x86-64 baseline; a prefetch never faults, whatever the address.
    unsafe {
        _mm_prefetch::<_MM_HINT_T0>(p.cast());
        _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(len - 1).cast());
    }
}
