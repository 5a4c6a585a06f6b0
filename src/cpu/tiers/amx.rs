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

use std::arch::asm;
use std::arch::x86_64::*;
use std::ops::Range;
use std::sync::OnceLock;

use super::avx2::Simd8;
use super::avx512::{prefetch_old, store_acc, zero_acc, Acc, Simd16};
use super::avx512bf16;
use crate::cpu::caches::{cache_sizes, CacheSizes};
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

/// Where a tile call asks for the operands of later calls while its steps run (see
/// [`gemm_tiles`]): the left operand's next slice for the call's two row tiles (`a0`, `a1`,
/// [`AHEAD_LINES`]` / 2` lines a step each) and the next panel's weights (`b`, [`AHEAD_LINES`]
/// lines a step), each pointer then moving on by its `step` bytes. A prefetch never faults, so
/// the pointers may be anything; a stream with nothing to ask for points at the call's own
/// operands.
#[derive(Clone, Copy)]
struct Ahead {
    a0: *const u8,
    a1: *const u8,
    a_step: usize,
    b: *const u8,
    b_step: usize,
}

/// Lines the weight stream of [`Ahead`] asks for per tile step, half as many from each left one
/// (the `prefetcht1`s in the `asm!`).
const AHEAD_LINES: usize = 4;

impl Ahead {
    /// The streams asking for `a_len` bytes from each of `a0` and `a1`, and `b_len` from `b`, over
    /// `steps` tile steps (as much of them as the lines a step cover).
    fn new(a: [*const u8; 2], a_len: usize, b: *const u8, b_len: usize, steps: usize) -> Self {
        let step = |len: usize, lines: usize| len.div_ceil(steps.max(1)).next_multiple_of(64).min(64 * lines);
        Self { a0: a[0], a1: a[1], a_step: step(a_len, AHEAD_LINES / 2), b, b_step: step(b_len, AHEAD_LINES) }
    }
}

/// The `prefetcht0`s of the 16 lines of the packed tile after the one at `{$base}` (its next
/// tile step, 1 KiB on), for the [`tiles_2x2`] loop: a left tile otherwise came from L2 when its
/// `tileloadd` asked for it (the `prefetcht1` streams of [`Ahead`] only bring it there). Asking
/// for it one step ahead took 0.90-1.03x the time (median of 12 cases 0.97x) on bf16 and f16
/// prefill at T = 64-2048 (`scripts/ab-bench.py --per-case`, 7 rounds, paired medians, Intel
/// Xeon with AMX); two steps ahead was no better, nor a `prefetcht0` of the next call's first
/// step or of its partial sums (1.02-1.09x).
#[rustfmt::skip]
macro_rules! prefetch_next_tile {
    ($base:literal) => {
        concat!(
            "prefetcht0 [{", $base, "} + 1024]\n",
            "prefetcht0 [{", $base, "} + 1088]\n",
            "prefetcht0 [{", $base, "} + 1152]\n",
            "prefetcht0 [{", $base, "} + 1216]\n",
            "prefetcht0 [{", $base, "} + 1280]\n",
            "prefetcht0 [{", $base, "} + 1344]\n",
            "prefetcht0 [{", $base, "} + 1408]\n",
            "prefetcht0 [{", $base, "} + 1472]\n",
            "prefetcht0 [{", $base, "} + 1536]\n",
            "prefetcht0 [{", $base, "} + 1600]\n",
            "prefetcht0 [{", $base, "} + 1664]\n",
            "prefetcht0 [{", $base, "} + 1728]\n",
            "prefetcht0 [{", $base, "} + 1792]\n",
            "prefetcht0 [{", $base, "} + 1856]\n",
            "prefetcht0 [{", $base, "} + 1920]\n",
            "prefetcht0 [{", $base, "} + 1984]\n",
        )
    };
}

/// `c_out[..32][..32] = c_in + a[..32][16·steps pairs] · panel[16·steps pairs]` on tiles: the C tiles
/// loaded from `c.0`, `steps` tile steps, and stored to `c.1`, all in one `asm!` block; each step
/// also asks for lines of `ahead` (into L2) and for its next step's left tiles (into L1:
/// [`prefetch_next_tile`]). Rows of the C blocks and of a panel are 128 bytes
/// apart (`{s64} * 2`), of a packed tile 64.
///
/// # Safety
/// Tile data is usable and one of [`CONFIGS`] loaded on this thread; `a[0]` and `a[1]` point at
/// `steps` consecutive packed tiles (1 KiB each, rows 64 bytes apart: `pack::RowPairs`) of rows
/// 0-15 and 16-31; `b` at a panel's rows of at least `16·steps` pairs; `c.0` and `c.1` at 32 x 32
/// f32 blocks.
#[inline(always)]
unsafe fn tiles_2x2(a: [*const u32; 2], b: *const u32, steps: usize, c: (*const CBlock, *mut CBlock), ahead: Ahead) {
    // SAFETY: each tileloadd reads 16 rows of 64 bytes inside the operands or `c.0` (contract);
    // the stores write 16 rows of 64 bytes inside `c.1`; prefetches read nothing.
    unsafe {
        asm!(
            "tileloadd tmm0, [{ci} + {s64} * 2]",
            "tileloadd tmm1, [{ci} + {s64} * 2 + 64]",
            "tileloadd tmm2, [{ci} + {s64} * 2 + 2048]",
            "tileloadd tmm3, [{ci} + {s64} * 2 + 2112]",
            "test {steps}, {steps}",
            "jz 3f",
            "2:",
            "tileloadd tmm4, [{a0} + {s64} * 1]",
            "tileloadd tmm6, [{b} + {s64} * 2]",
            "tileloadd tmm7, [{b} + {s64} * 2 + 64]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tileloadd tmm5, [{a1} + {s64} * 1]",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tdpbf16ps tmm3, tmm5, tmm7",
            prefetch_next_tile!("a0"),
            prefetch_next_tile!("a1"),
            "prefetcht1 [{pa0}]",
            "prefetcht1 [{pa0} + 64]",
            "prefetcht1 [{pa1}]",
            "prefetcht1 [{pa1} + 64]",
            "prefetcht1 [{pb}]",
            "prefetcht1 [{pb} + 64]",
            "prefetcht1 [{pb} + 128]",
            "prefetcht1 [{pb} + 192]",
            "add {pa0}, {pa_step}",
            "add {pa1}, {pa_step}",
            "add {pb}, {pb_step}",
            "add {a0}, 1024",
            "add {a1}, 1024",
            "add {b}, 2048",
            "dec {steps}",
            "jnz 2b",
            "3:",
            "tilestored [{co} + {s64} * 2], tmm0",
            "tilestored [{co} + {s64} * 2 + 64], tmm1",
            "tilestored [{co} + {s64} * 2 + 2048], tmm2",
            "tilestored [{co} + {s64} * 2 + 2112], tmm3",
            a0 = inout(reg) a[0] => _,
            a1 = inout(reg) a[1] => _,
            b = inout(reg) b => _,
            steps = inout(reg) steps => _,
            ci = in(reg) c.0,
            co = in(reg) c.1,
            s64 = in(reg) 64usize,
            pa0 = inout(reg) ahead.a0 => _,
            pa1 = inout(reg) ahead.a1 => _,
            pb = inout(reg) ahead.b => _,
            pa_step = in(reg) ahead.a_step,
            pb_step = in(reg) ahead.b_step,
            options(nostack),
        );
    }
}

/// [`tiles_2x2`] for the first 16 rows only (a block of at most 16 real rows).
///
/// # Safety
/// As [`tiles_2x2`], for the tiles of `a` only and 16 rows of the C blocks.
#[inline(always)]
unsafe fn tiles_1x2(a: *const u32, b: *const u32, steps: usize, c: (*const CBlock, *mut CBlock), ahead: Ahead) {
    // SAFETY: as in tiles_2x2, for the first A and C tiles only.
    unsafe {
        asm!(
            "tileloadd tmm0, [{ci} + {s64} * 2]",
            "tileloadd tmm1, [{ci} + {s64} * 2 + 64]",
            "test {steps}, {steps}",
            "jz 3f",
            "2:",
            "tileloadd tmm4, [{a0} + {s64} * 1]",
            "tileloadd tmm6, [{b} + {s64} * 2]",
            "tileloadd tmm7, [{b} + {s64} * 2 + 64]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "prefetcht1 [{pa0}]",
            "prefetcht1 [{pa0} + 64]",
            "prefetcht1 [{pb}]",
            "prefetcht1 [{pb} + 64]",
            "prefetcht1 [{pb} + 128]",
            "prefetcht1 [{pb} + 192]",
            "add {pa0}, {pa_step}",
            "add {pb}, {pb_step}",
            "add {a0}, 1024",
            "add {b}, 2048",
            "dec {steps}",
            "jnz 2b",
            "3:",
            "tilestored [{co} + {s64} * 2], tmm0",
            "tilestored [{co} + {s64} * 2 + 64], tmm1",
            a0 = inout(reg) a => _,
            b = inout(reg) b => _,
            steps = inout(reg) steps => _,
            ci = in(reg) c.0,
            co = in(reg) c.1,
            s64 = in(reg) 64usize,
            pa0 = inout(reg) ahead.a0 => _,
            pb = inout(reg) ahead.b => _,
            pa_step = in(reg) ahead.a_step,
            pb_step = in(reg) ahead.b_step,
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
fn slice_steps(caches: CacheSizes) -> usize {
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
        // SAFETY: tile data is usable (contract); the configuration is a valid palette-1 one.
        let config = &CONFIGS[left.rows.min(TILE_ROWS) - 1];
        unsafe { asm!("ldtilecfg [{}]", in(reg) config.0.as_ptr(), options(nostack, readonly)) };
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
