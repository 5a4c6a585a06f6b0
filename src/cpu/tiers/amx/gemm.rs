//! The AMX tier's loop nest around the tile steps (groups of panels, k slices, 32-row blocks), the
//! k tail on `vdpbf16ps`, and the stores through the AVX-512 tier's sinks.

use std::arch::asm;
use std::arch::x86_64::*;
use std::ops::Range;

use super::tiles::{tiles_1x2, tiles_2x2, Ahead, CBlock, CONFIGS, ZERO};
use super::{usable, BLOCK, STEP};
use crate::cpu::caches::{cache_sizes, CacheSizes};
use crate::cpu::pack::{Panels, RowPairs, MR, NR, TILE_ROWS};
use crate::cpu::sink::Sink;
use crate::cpu::tiers::avx512::{prefetch_store_lines, store_acc, zero_acc, Acc, Simd16};

/// Adds pairs `p0..full` (and, for an odd `n`, its last element) of rows `t0..t0 + rows` of the
/// left operand into `c`, in k order, as the `vdpbf16ps` kernel adds them.
///
/// # Safety
/// AVX-512F/BW/VL and AVX512_BF16 are present; `t0 + rows` are rows of `left`, whose `k_len` is
/// `ceil(n / 2)`; `b` points at a panel of at least `ceil(n / 2)` pair rows.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16,f16c,fma")]
unsafe fn tail(left: &RowPairs<'_>, t0: usize, b: *const u32, n: usize, p0: usize, rows: usize, c: &mut CBlock) {
    let full = n / 2;
    if p0 == full && n.is_multiple_of(2) {
        return;
    }
    let lo = |v: __m512i| _mm512_castsi512_ps(_mm512_slli_epi32::<16>(v));
    for (i, crow) in c.0.iter_mut().enumerate().take(rows) {
        let pair = |p: usize| left.data[left.index(t0 + i, p)];
        // SAFETY: every load is inside the panel (contract) and the block's row.
        unsafe {
            let mut acc = [_mm512_loadu_ps(crow.as_ptr()), _mm512_loadu_ps(crow.as_ptr().add(16))];
            for p in p0..full {
                let x: __m512bh = std::mem::transmute(_mm512_set1_epi32(pair(p) as i32));
                for (h, ah) in acc.iter_mut().enumerate() {
                    let w: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(p * NR + 16 * h).cast()));
                    *ah = _mm512_dpbf16_ps(*ah, x, w);
                }
            }
            if n % 2 == 1 {
                let x = _mm512_set1_ps(f32::from_bits((pair(full) & 0xffff) << 16));
                for (h, ah) in acc.iter_mut().enumerate() {
                    let w = lo(_mm512_loadu_si512(b.add(full * NR + 16 * h).cast()));
                    *ah = _mm512_fmadd_ps(x, w, *ah);
                }
            }
            _mm512_storeu_ps(crow.as_mut_ptr(), acc[0]);
            _mm512_storeu_ps(crow.as_mut_ptr().add(16), acc[1]);
        }
    }
}

/// Stores rows `..rows` of `c` as local rows `t0..`, columns `col0..` (clipped), through the sink,
/// 8 rows at a time with the AVX-512 tier's stores.
///
/// # Safety
/// AVX-512F/BW/VL, F16C and FMA are present; as `avx512_store::store_acc` for those rows.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c,fma")]
unsafe fn store_block<T: Simd16>(c: &CBlock, rows: usize, sink: &Sink<'_, T>, t0: usize, col0: usize) {
    let mut acc: Acc = zero_acc();
    for i0 in (0..rows).step_by(MR) {
        let r = MR.min(rows - i0);
        for (i, a) in acc.iter_mut().enumerate().take(r) {
            let row = &c.0[i0 + i];
            // SAFETY: a row of the block holds 32 f32.
            *a = unsafe { [_mm512_loadu_ps(row.as_ptr()), _mm512_loadu_ps(row.as_ptr().add(16))] };
        }
        // SAFETY: rows t0 + i0 .. + r are the caller's (contract).
        unsafe {
            match r {
                1 => store_acc::<T, 1>(&acc, sink, t0 + i0, col0),
                2 => store_acc::<T, 2>(&acc, sink, t0 + i0, col0),
                3 => store_acc::<T, 3>(&acc, sink, t0 + i0, col0),
                4 => store_acc::<T, 4>(&acc, sink, t0 + i0, col0),
                5 => store_acc::<T, 5>(&acc, sink, t0 + i0, col0),
                6 => store_acc::<T, 6>(&acc, sink, t0 + i0, col0),
                7 => store_acc::<T, 7>(&acc, sink, t0 + i0, col0),
                _ => store_acc::<T, MR>(&acc, sink, t0 + i0, col0),
            }
        }
    }
}

/// Tile steps (16 pairs each) per k slice on a CPU with these caches: the largest power of two
/// whose operands of one tile call fit L1d (a step reads 2 KiB of a panel and 2 KiB of a block's
/// two row tiles), so that a panel's slice stays in L1 while the blocks of rows run over it, and
/// its blocks' next slices are asked for while it runs (see [`gemm_tiles`]). On the 48 KiB L1d of
/// the Intel Xeon with AMX this measured on, 8 steps (128 pairs, 256 elements: 32 KiB of operands
/// a call); longer slices, which spared the partial sums' reloads, put the two operands' tile
/// loads in L2 and left their next slices to the hardware prefetchers. Measured against 512-pair
/// slices with nothing asked for ahead (T = 512, 2 threads, bf16, `scripts/ab-bench.py
/// --per-case`, 5-7 rounds, paired medians): 0.82-0.96x the time on the prefill suite, 0.87x at T
/// = 4096 and 0.90x at T = 64, r = 1024; as fast at T = 1-32. With the prefetches, 256-pair
/// slices (64 KiB a call, more than L1d) took 1.16-1.22x the time of 128-pair ones at r = 1024
/// (0.95-1.01x elsewhere), 64-pair ones 1.09-1.46x at T = 512.
pub(super) fn slice_steps(caches: CacheSizes) -> usize {
    let fit = caches.l1d / (2 * STEP * NR * size_of::<u32>());
    1 << fit.clamp(2, 16).ilog2()
}

/// Bytes of partial sums a thread keeps between k slices on a CPU with these caches: a quarter of
/// L2 (512 KiB of the Intel Xeon's 2 MiB, where this measured), so that they stay there beside a
/// slice's operands on their way to L1. A product of more panels runs them in groups, each
/// group's slices in turn. With all panels in one group, an f16 up-projection to m = 11008
/// (split: 3 slices, 344 panels) kept 11 MiB of them; groups made T = 512 (2 threads) 0.73x the
/// time there and 0.83x at r = 1024, bf16 0.94-0.99x; groups of an eighth and of half of L2 were
/// within 7% of a quarter's, either way (`scripts/ab-bench.py --per-case`, 5 rounds, paired
/// medians).
fn partials_bytes(caches: CacheSizes) -> usize {
    (caches.l2 / 4).max(64 << 10)
}

thread_local! {
    /// Each thread's partial sums between k slices: one [`CBlock`] per (panel, 32-row block).
    static PARTIALS: std::cell::RefCell<Vec<CBlock>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Asks for the lines the stores of rows `t0..t0 + rows`, columns `col0..` will read or write
/// over (`y`, `dx`, ...), while the block's tile steps run: `perf record` put a quarter of a bf16
/// prefill call in the stores, most of it waiting for `y`.
///
/// # Safety
/// Rows `t0..t0 + rows` are in the sink.
#[inline(always)]
unsafe fn prefetch_block<T: Simd16>(sink: &Sink<'_, T>, t0: usize, rows: usize, col0: usize) {
    for i0 in (0..rows).step_by(MR) {
        // SAFETY: the rows are in the sink (contract).
        unsafe {
            match rows - i0 {
                1 => prefetch_store_lines::<T, 1>(sink, t0 + i0, col0),
                2 => prefetch_store_lines::<T, 2>(sink, t0 + i0, col0),
                3 => prefetch_store_lines::<T, 3>(sink, t0 + i0, col0),
                4 => prefetch_store_lines::<T, 4>(sink, t0 + i0, col0),
                5 => prefetch_store_lines::<T, 5>(sink, t0 + i0, col0),
                6 => prefetch_store_lines::<T, 6>(sink, t0 + i0, col0),
                7 => prefetch_store_lines::<T, 7>(sink, t0 + i0, col0),
                _ => prefetch_store_lines::<T, MR>(sink, t0 + i0, col0),
            }
        }
    }
}

/// bf16 products of k-pairs packed in tiles (`n` elements) against pair panels on AMX tiles (see the module
/// docs): `sink[row, col] <- Σ_k left[row, k]·right[col, k]` for the panels in `range`.
///
/// Loop nest: for each group of panels (as many as keep their partial sums in
/// [`partials_bytes`]), for each k slice of [`slice_steps`] tile steps, for each panel of the
/// group, for each 32-row block, in order; between slices each block's partial sums wait in f32 in
/// [`PARTIALS`] (stored and reloaded exactly, so the slicing does not change any result). The last slice adds the tail
/// and stores through the sink; a one-slice product (k up to one slice, or a single block of
/// rows, which runs its whole k range as one slice) needs no partials.
/// While a block's tile steps run they ask L2 for what later calls read ([`Ahead`]): a share of
/// the next panel's slice (split between the blocks) and a share of the block's next slice of
/// rows (split between the panels), so that each slice's operands arrive from L3 while the one
/// before it computes.
///
/// # Safety
/// [`usable`] is `Ok`; AVX-512F/BW/VL, FMA, F16C and AVX512_BF16 are present; `left.k_len ==
/// ceil(n / 2)` and the panels hold at least that many pair rows; the sink has `left.rows` rows
/// owned by this call, and the columns of the panels in `range` are owned too.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16,f16c,fma")]
pub(super) unsafe fn gemm_tiles<T: Simd16>(
    left: RowPairs<'_>,
    n: usize,
    right: &Panels<u32>,
    range: Range<usize>,
    sink: &Sink<'_, T>,
) {
    debug_assert_eq!(left.k_len, n.div_ceil(2));
    debug_assert!(left.k_len <= right.k_cap() && usable().is_ok());
    let panels = range.start..range.end.min(sink.cols().div_ceil(NR));
    if panels.is_empty() || left.rows == 0 {
        return;
    }
    let steps = (n / 2) / STEP;
    let blocks = left.rows.div_ceil(BLOCK);
    let caches = cache_sizes();
    // One block (up to 32 rows) reuses no panel slice across blocks: its whole k range in one
    // slice, with no partial sums. Against 128-pair slices: bf16 T = 32, r = 1024 0.89x the time,
    // T = 24 0.96x, T = 1 and 8 1.00-1.04x; f16 (split from 32 rows) T = 32 0.83x; the bf16
    // training step at T = 32 0.86x (`scripts/ab-bench.py --per-case`, 7-9 rounds).
    let slice_len = if blocks == 1 { steps.max(1) } else { slice_steps(caches) };
    let slices = steps.div_ceil(slice_len).max(1);
    // Steps of slice `s`; where slice `s` of row tile `t` of the left operand starts, and of panel `p`.
    let slice_steps = |s: usize| slice_len.min(steps.saturating_sub(s * slice_len));
    let a_at = |t: usize, s: usize| left.data[left.index(t, s * slice_len * STEP)..].as_ptr();
    let b_at = |p: usize, s: usize| right.panel(p)[s * slice_len * STEP * NR..].as_ptr();
    // Panels per group: all of them for a one-slice product, else as many as keep the partial
    // sums of a group in partials_bytes.
    let group = if slices > 1 {
        (partials_bytes(caches) / (blocks * size_of::<CBlock>())).clamp(1, panels.len())
    } else {
        panels.len()
    };
    let mut c = CBlock([[0.0; NR]; BLOCK]);
    PARTIALS.with_borrow_mut(|partials| {
        if slices > 1 {
            partials.resize(group * blocks, ZERO);
        }
        // SAFETY: tile data is usable (contract).
        unsafe { CONFIGS[left.rows.min(TILE_ROWS) - 1].load() };
        for g0 in panels.clone().step_by(group) {
            let g = g0..panels.end.min(g0 + group);
            for s in 0..slices {
                let sl = slice_steps(s);
                let last = s + 1 == slices;
                // What comes after this slice of the group: the next slice, or the next group's
                // first one (or nothing).
                let then = if !last { Some((g.start, s + 1)) } else { (g.end < panels.end).then_some((g.end, 0)) };
                // Each row tile's next slice, a share per panel.
                let a_share = then.map_or(0, |(_, s)| share(slice_steps(s) * TILE_ROWS * STEP * 4, g.len()));
                for (pi, p) in g.clone().enumerate() {
                    let b = b_at(p, s);
                    // The next panel's slice, a share per block.
                    let next_b = if p + 1 < g.end { Some((p + 1, s)) } else { then };
                    let (b_next, b_share) = match next_b {
                        Some((p, s)) => (b_at(p, s).cast::<u8>(), share(slice_steps(s) * STEP * NR * 4, blocks)),
                        None => (b.cast(), 0),
                    };
                    for (bi, t0) in (0..left.rows).step_by(BLOCK).enumerate() {
                        let rows = BLOCK.min(left.rows - t0);
                        // The block's second row tile, if it has one (else the first again, unread).
                        let t1 = if rows > TILE_ROWS { t0 + TILE_ROWS } else { t0 };
                        let a = [a_at(t0, s), a_at(t1, s)];
                        let a_next = |t: usize| match then {
                            Some((_, s)) => a_at(t, s).cast::<u8>().wrapping_add(pi * a_share),
                            None => a[0].cast(),
                        };
                        let ahead = Ahead::new(
                            [a_next(t0), a_next(t1)],
                            a_share,
                            b_next.wrapping_add(bi * b_share),
                            b_share,
                            sl,
                        );
                        let part = if slices > 1 { &raw mut partials[pi * blocks + bi] } else { &raw mut c };
                        let c_in: *const CBlock = if s == 0 { &ZERO } else { part };
                        let c_out = if last { &raw mut c } else { part };
                        if last {
                            // SAFETY: rows t0..t0 + rows are the sink's (contract).
                            unsafe { prefetch_block(sink, t0, rows, p * NR) };
                        }
                        // SAFETY: the left operand has room for whole tiles of rows (a padding row
                        // only makes an output row that is never stored) and each tile holds
                        // `steps` packed steps, so a block's 16 or 32 rows exist from this slice's
                        // first step on for sl steps; the panel holds k_len >= 16·steps pair rows;
                        // the C blocks are 32 x 32.
                        unsafe {
                            if rows > TILE_ROWS {
                                tiles_2x2(a, b, sl, (c_in, c_out), ahead);
                            } else {
                                tiles_1x2(a[0], b, sl, (c_in, c_out), ahead);
                            }
                        }
                        if last {
                            let b = right.panel(p).as_ptr();
                            // SAFETY: as above, for the whole k range of these rows and this panel;
                            // the sink's rows and columns are this call's (contract).
                            unsafe {
                                tail(&left, t0, b, n, steps * STEP, rows, &mut c);
                                store_block(&c, rows, sink, t0, p * NR);
                            }
                        }
                    }
                }
            }
        }
        // SAFETY: releases this thread's tile state (no tile holds anything needed).
        unsafe { asm!("tilerelease", options(nostack, nomem)) };
    });
}

/// `bytes` split into `parts` shares of whole lines (the last may run past the end, which a
/// prefetch may).
fn share(bytes: usize, parts: usize) -> usize {
    bytes.div_ceil(parts.max(1)).next_multiple_of(64)
}

#[cfg(test)]
mod tests {
    use super::{partials_bytes, slice_steps, CacheSizes};

    /// The tile loop's blocking on the caches it was measured on (the Intel Xeon with AMX: 48 KiB
    /// L1d, 2 MiB L2) is what was measured best there, and it follows other sizes.
    #[test]
    fn the_tile_blocking_follows_the_caches() {
        let caches = |l1d: usize, l2: usize| CacheSizes { l1d, l2, l3: 0, from_cpuid: true };
        let xeon = caches(48 << 10, 2 << 20);
        assert_eq!((slice_steps(xeon), partials_bytes(xeon)), (8, 512 << 10));
        // A 64 KiB L1d holds a 16-step slice's operands; 16 KiB a 4-step one; the slices are
        // powers of two between 2 and 16 steps, the partials at least 64 KiB.
        assert_eq!(slice_steps(caches(64 << 10, 2 << 20)), 16);
        assert_eq!(slice_steps(caches(32 << 10, 1 << 20)), 8);
        assert_eq!(slice_steps(caches(16 << 10, 256 << 10)), 4);
        assert_eq!(slice_steps(caches(1 << 10, 1 << 10)), 2);
        assert_eq!(slice_steps(caches(1 << 20, 1 << 20)), 16);
        assert_eq!(partials_bytes(caches(48 << 10, 4 << 20)), 1 << 20);
        assert_eq!(partials_bytes(caches(48 << 10, 128 << 10)), 64 << 10);
    }
}
