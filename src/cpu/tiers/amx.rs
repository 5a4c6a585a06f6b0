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
//! `macro_kernel`'s trait does not express): for each k slice, for each panel of the range, for
//! each 32-row block, in order (a column-sum sink adds rows in ascending order). Each output is
//! one chain over k in order (slices of `tdpbf16ps` steps, then the tail), whatever the thread or
//! panel range, so results are bitwise the same for any thread count.

use std::arch::asm;
use std::arch::x86_64::*;
use std::ops::Range;
use std::sync::OnceLock;

use super::avx2::Simd8;
use super::avx512::{prefetch_old, store_acc, zero_acc, Acc, Simd16};
use super::avx512bf16;
use crate::cpu::isa::{Isa, Vendor};
use crate::cpu::kernels::{Kernels, Layout, PeakInstruction, TierFacts};
use crate::cpu::pack::{Panels, RowPairs, MR, NR, TILE_ROWS};
use crate::cpu::sink::Sink;

/// Pairs of k per tile step (a tile row is 64 bytes: 16 pairs of bf16).
const STEP: usize = RowPairs::STEP;
/// Rows of the register block: two A tiles.
const BLOCK: usize = 2 * TILE_ROWS;

/// Whether this process may run tile instructions: the CPU has AMX-BF16 and AMX-TILE, the OS
/// saves tile state (XCR0 bits 17-18), and (Linux) granted this process tile data. Asked once;
/// `Err` says why not.
pub(crate) fn usable() -> Result<(), &'static str> {
    static USABLE: OnceLock<Result<(), &'static str>> = OnceLock::new();
    *USABLE.get_or_init(check)
}

/// Miri cannot run `cpuid` or `syscall` (inline assembly).
#[cfg(miri)]
fn check() -> Result<(), &'static str> {
    Err("not under Miri")
}

#[cfg(not(miri))]
fn check() -> Result<(), &'static str> {
    // SAFETY: cpuid runs on every x86-64 CPU; a leaf above the maximum returns unrelated values,
    // which the check of leaf 0's maximum below discards.
    #[allow(unused_unsafe)]
    let (max, leaf1, leaf7) = unsafe { (__cpuid(0).eax, __cpuid(1), __cpuid_count(7, 0)) };
    if max < 7 || leaf7.edx & (1 << 22) == 0 || leaf7.edx & (1 << 24) == 0 {
        return Err("this CPU has no AMX-BF16");
    }
    if leaf1.ecx & (1 << 27) == 0 {
        return Err("the OS has not enabled XSAVE");
    }
    // SAFETY: OSXSAVE (checked above) means XGETBV is available; XCR0 is register 0.
    let xcr0 = unsafe { xgetbv0() };
    if xcr0 & (0b11 << 17) != 0b11 << 17 {
        return Err("the OS does not save AMX tile state (XCR0)");
    }
    request_tile_data()
}

/// XCR0, read with XGETBV.
///
/// # Safety
/// CPUID.1:ECX.OSXSAVE is set.
#[cfg(not(miri))]
unsafe fn xgetbv0() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: XGETBV with ECX = 0 reads XCR0 (the caller checked OSXSAVE); it touches no memory.
    unsafe { asm!("xgetbv", in("ecx") 0u32, out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags)) };
    (u64::from(hi) << 32) | u64::from(lo)
}

/// Asks Linux for this process's leave to use AMX tile data: `arch_prctl(ARCH_REQ_XCOMP_PERM,
/// XFEATURE_XTILEDATA)`. The permission is the process's (every thread, present and future),
/// so once is enough.
#[cfg(all(target_os = "linux", not(miri)))]
fn request_tile_data() -> Result<(), &'static str> {
    const SYS_ARCH_PRCTL: i64 = 158;
    const ARCH_REQ_XCOMP_PERM: i64 = 0x1023;
    const XFEATURE_XTILEDATA: i64 = 18;
    let ret: i64;
    // SAFETY: the arch_prctl system call with this request reads and writes no user memory; the
    // syscall instruction clobbers rcx and r11 only.
    unsafe {
        asm!(
            "syscall",
            inlateout("rax") SYS_ARCH_PRCTL => ret,
            in("rdi") ARCH_REQ_XCOMP_PERM,
            in("rsi") XFEATURE_XTILEDATA,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    if ret == 0 {
        Ok(())
    } else {
        Err("Linux refused this process AMX tile data (arch_prctl ARCH_REQ_XCOMP_PERM)")
    }
}

/// Other systems: tiles are not used (untested there).
#[cfg(all(not(target_os = "linux"), not(miri)))]
fn request_tile_data() -> Result<(), &'static str> {
    Err("AMX is only used on Linux")
}

/// The 64-byte tile configuration (palette 1): tiles 0-3 are the C tiles (16 f32 a row), 4-5 the
/// A tiles (16 pairs a row), both of `rows` rows, and 6-7 the B tiles (16 pair rows of 16 columns);
/// every row 64 bytes.
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

impl TileConfig {
    const fn new(rows: usize) -> Self {
        let mut b = [0u8; 64];
        b[0] = 1; // palette
        let mut t = 0;
        while t < 8 {
            // colsb[t]: u16 at byte 16 + 2t; rows[t]: byte 48 + t.
            b[16 + 2 * t] = 64;
            b[48 + t] = if t < 6 { rows as u8 } else { TILE_ROWS as u8 };
            t += 1;
        }
        Self(b)
    }
}

/// The configurations for products of 1 to 16 rows and more (`CONFIGS[min(rows, 16) - 1]`): a
/// product of fewer than 16 rows (decode) loads and multiplies only its rows of A and C. Each row
/// of a tile is computed from that row alone, so the bits are the same whatever the count.
static CONFIGS: [TileConfig; TILE_ROWS] = {
    let mut c = [const { TileConfig::new(TILE_ROWS) }; TILE_ROWS];
    let mut r = 1;
    while r < TILE_ROWS {
        c[r - 1] = TileConfig::new(r);
        r += 1;
    }
    c
};

/// One 32 x 32 f32 block of outputs, as the C tiles store it (row stride 128 bytes).
#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct CBlock([[f32; NR]; BLOCK]);

/// The C tiles' starting values for the first k slice.
static ZERO: CBlock = CBlock([[0.0; NR]; BLOCK]);

/// `c_out[..32][..32] = c_in + a[..32][16·steps pairs] · panel[16·steps pairs]` on tiles: the C tiles
/// loaded from `c_in`, `steps` tile steps, and stored to `c_out`, all in one `asm!` block.
///
/// # Safety
/// Tile data is usable and one of [`CONFIGS`] loaded on this thread; `a` and `a1` point at `steps`
/// consecutive packed tiles (1 KiB each, rows 64 bytes apart: `pack::RowPairs`) of rows 0-15 and
/// 16-31; `b` at a panel's rows of at least `16·steps` pairs; `c_in` and `c_out` at 32 x 32 f32
/// blocks.
#[inline(always)]
unsafe fn tiles_2x2(
    a: *const u32,
    a1: *const u32,
    b: *const u32,
    steps: usize,
    c_in: *const CBlock,
    c_out: *mut CBlock,
) {
    let (ci, co) = (c_in.cast::<f32>(), c_out.cast::<f32>());
    // SAFETY: each tileloadd reads 16 rows of 64 bytes inside the operands or `c_in` (contract);
    // the stores write 16 rows of 64 bytes inside `c_out`.
    unsafe {
        asm!(
            "tileloadd tmm0, [{ci0} + {sc} * 1]",
            "tileloadd tmm1, [{ci0} + {sc} * 1 + 64]",
            "tileloadd tmm2, [{ci1} + {sc} * 1]",
            "tileloadd tmm3, [{ci1} + {sc} * 1 + 64]",
            "test {steps}, {steps}",
            "jz 3f",
            "2:",
            "tileloadd tmm4, [{a0} + {sa} * 1]",
            "tileloadd tmm6, [{b} + {sb} * 1]",
            "tileloadd tmm7, [{b} + {sb} * 1 + 64]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tileloadd tmm5, [{a1} + {sa} * 1]",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tdpbf16ps tmm3, tmm5, tmm7",
            "add {a0}, 1024",
            "add {a1}, 1024",
            "add {b}, 2048",
            "dec {steps}",
            "jnz 2b",
            "3:",
            "tilestored [{co0} + {sc} * 1], tmm0",
            "tilestored [{co0} + {sc} * 1 + 64], tmm1",
            "tilestored [{co1} + {sc} * 1], tmm2",
            "tilestored [{co1} + {sc} * 1 + 64], tmm3",
            a0 = inout(reg) a => _,
            a1 = inout(reg) a1 => _,
            sa = in(reg) 64usize,
            b = inout(reg) b => _,
            sb = in(reg) NR * 4,
            steps = inout(reg) steps => _,
            ci0 = in(reg) ci,
            ci1 = in(reg) ci.add(TILE_ROWS * NR),
            co0 = in(reg) co,
            co1 = in(reg) co.add(TILE_ROWS * NR),
            sc = in(reg) NR * 4,
            options(nostack),
        );
    }
}

/// [`tiles_2x2`] for the first 16 rows only (a block of at most 16 real rows).
///
/// # Safety
/// As [`tiles_2x2`], for the tiles of `a` only and 16 rows of the C blocks.
#[inline(always)]
unsafe fn tiles_1x2(a: *const u32, b: *const u32, steps: usize, c_in: *const CBlock, c_out: *mut CBlock) {
    let (ci, co) = (c_in.cast::<f32>(), c_out.cast::<f32>());
    // SAFETY: as in tiles_2x2, for the first A and C tiles only.
    unsafe {
        asm!(
            "tileloadd tmm0, [{ci0} + {sc} * 1]",
            "tileloadd tmm1, [{ci0} + {sc} * 1 + 64]",
            "test {steps}, {steps}",
            "jz 3f",
            "2:",
            "tileloadd tmm4, [{a0} + {sa} * 1]",
            "tileloadd tmm6, [{b} + {sb} * 1]",
            "tileloadd tmm7, [{b} + {sb} * 1 + 64]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "add {a0}, 1024",
            "add {b}, 2048",
            "dec {steps}",
            "jnz 2b",
            "3:",
            "tilestored [{co0} + {sc} * 1], tmm0",
            "tilestored [{co0} + {sc} * 1 + 64], tmm1",
            a0 = inout(reg) a => _,
            sa = in(reg) 64usize,
            b = inout(reg) b => _,
            sb = in(reg) NR * 4,
            steps = inout(reg) steps => _,
            ci0 = in(reg) ci,
            co0 = in(reg) co,
            sc = in(reg) NR * 4,
            options(nostack),
        );
    }
}

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

/// Tile steps (16 pairs each) per k slice: 512 pairs (1024 elements). Slices let a block's left
/// slice stay in L2 while the panels stream past it: at n = 4096, r = 1024 (T = 512, 2 threads)
/// 512-pair slices were 7% faster than 256-pair ones and 6% faster than none; at n = 768 (one
/// slice) 256-pair slices cost 10% (interleaved runs, `scripts/ab-bench.py`, bf16).
const SLICE_STEPS: usize = 32;

thread_local! {
    /// Each thread's partial sums between k slices: one [`CBlock`] per (panel, 32-row block).
    static PARTIALS: std::cell::RefCell<Vec<CBlock>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Asks for the old values the stores of rows `t0..t0 + rows`, columns `col0..` will read (`y`
/// when accumulating), while the block's tile steps run: `perf record` put a quarter of a bf16
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
                1 => prefetch_old::<T, 1>(sink, t0 + i0, col0),
                2 => prefetch_old::<T, 2>(sink, t0 + i0, col0),
                3 => prefetch_old::<T, 3>(sink, t0 + i0, col0),
                4 => prefetch_old::<T, 4>(sink, t0 + i0, col0),
                5 => prefetch_old::<T, 5>(sink, t0 + i0, col0),
                6 => prefetch_old::<T, 6>(sink, t0 + i0, col0),
                7 => prefetch_old::<T, 7>(sink, t0 + i0, col0),
                _ => prefetch_old::<T, MR>(sink, t0 + i0, col0),
            }
        }
    }
}

/// bf16 products of k-pairs packed in tiles (`n` elements) against pair panels on AMX tiles (see the module
/// docs): `sink[row, col] <- Σ_k left[row, k]·right[col, k]` for the panels in `range`.
///
/// Loop nest: for each k slice of [`SLICE_STEPS`] tile steps, for each panel, for each 32-row
/// block, in order; between slices each block's partial sums wait in f32 in [`PARTIALS`] (stored
/// and reloaded exactly, so the slicing does not change any result). The last slice adds the tail
/// and stores through the sink; a one-slice product (k up to 512 elements) needs no partials.
///
/// # Safety
/// [`usable`] is `Ok`; AVX-512F/BW/VL, FMA, F16C and AVX512_BF16 are present; `left.k_len ==
/// ceil(n / 2)` and the panels hold at least that many pair rows; the sink has `left.rows` rows
/// owned by this call, and the columns of the panels in `range` are owned too.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16,f16c,fma")]
unsafe fn gemm_tiles<T: Simd16>(
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
    let slices = steps.div_ceil(SLICE_STEPS).max(1);
    let blocks = left.rows.div_ceil(BLOCK);
    let mut c = CBlock([[0.0; NR]; BLOCK]);
    PARTIALS.with_borrow_mut(|partials| {
        if slices > 1 {
            partials.resize(panels.len() * blocks, ZERO);
        }
        // SAFETY: tile data is usable (contract); the configuration is a valid palette-1 one.
        let config = &CONFIGS[left.rows.min(TILE_ROWS) - 1];
        unsafe { asm!("ldtilecfg [{}]", in(reg) config.0.as_ptr(), options(nostack, readonly)) };
        for s in 0..slices {
            let s0 = s * SLICE_STEPS;
            let sl = SLICE_STEPS.min(steps - s0.min(steps));
            let last = s + 1 == slices;
            for (pi, p) in panels.clone().enumerate() {
                let b = right.panel(p)[s0 * STEP * NR..].as_ptr();
                for (bi, t0) in (0..left.rows).step_by(BLOCK).enumerate() {
                    let rows = BLOCK.min(left.rows - t0);
                    let a = left.data[left.index(t0, s0 * STEP)..].as_ptr();
                    let part = if slices > 1 { &raw mut partials[pi * blocks + bi] } else { &raw mut c };
                    let c_in: *const CBlock = if s == 0 { &ZERO } else { part };
                    let c_out = if last { &raw mut c } else { part };
                    if last {
                        // SAFETY: rows t0..t0 + rows are the sink's (contract).
                        unsafe { prefetch_block(sink, t0, rows, p * NR) };
                    }
                    // SAFETY: the left operand has room for whole tiles of rows (a padding row only
                    // makes an output row that is never stored) and each tile holds `steps >= s0 +
                    // sl` packed steps, so a block's 16 or 32 rows exist from step s0 on for sl
                    // steps; the panel holds k_len >= 16·(s0 + sl) pair rows; the C blocks are
                    // 32 x 32.
                    unsafe {
                        if rows > TILE_ROWS {
                            let a1 = left.data[left.index(t0 + TILE_ROWS, s0 * STEP)..].as_ptr();
                            tiles_2x2(a, a1, b, sl, c_in, c_out);
                        } else {
                            tiles_1x2(a, b, sl, c_in, c_out);
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
        // SAFETY: releases this thread's tile state (no tile holds anything needed).
        unsafe { asm!("tilerelease", options(nostack, nomem)) };
    });
}

/// Rows per block of the fused forward: a block reads the whole of A and B once (r = 1024: 16 MiB
/// of weights, from L3), which on tiles takes about as long as a 64-row block's products. Against
/// 64-row blocks, 256 made T = 512 (2 threads, bf16) 1.27x faster at r = 1024 and n = m = 4096,
/// 1.13x at m = 11008, 1.06x at n = m = 768 and 1.02x at r = 256 (`scripts/ab-bench.py
/// --per-case`, 3 rounds, medians of the paired ratios).
const BLOCK_ROWS: usize = 256;

/// The facts of this tier's bf16 kernels: those of `avx512bf16` (pair weights, `u` rounded to bf16,
/// subnormals flushed: `tdpbf16ps` flushes them too), on tiles.
const FACTS: TierFacts = TierFacts {
    isa: Isa::Amx,
    block_rows: BLOCK_ROWS,
    mr: BLOCK,
    kc: SLICE_STEPS * STEP,
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
/// to reuse each packed row of `x` over.
const SPLIT_FROM_ROWS: usize = 64;

/// The facts of this tier's f16 kernels: the `avx512` tier's below [`SPLIT_FROM_ROWS`] rows, split
/// products on tiles from there on (`u` kept in f32 and split too, subnormal results flushed), the
/// backward's too (its f32 left operands split likewise; the crossover measured for the forward
/// held for it: T = 64, r = 256 backward 1.46 against 1.78 ms on the FMA kernels, r = 64 even).
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
    Kernels { facts, gemm_tiles: Some(gemm_tiles::<T>), ..table }
}
