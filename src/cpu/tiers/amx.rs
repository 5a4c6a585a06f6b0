//! The AMX tier (Intel AMX-BF16): bf16 products on `tdpbf16ps` tiles; f32 and f16 products as the
//! `avx512` tier.
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
//! per call as row-major pairs (`pack::RowPairs`).
//!
//! Register blocking: 2 x 2 accumulator tiles (32 rows x one 32-column panel: 4 C, 2 A, 2 B tiles,
//! four `tdpbf16ps` per four tile loads), the whole k range of complete 16-pair steps in one `asm!`
//! block, then the C tiles stored into a 4 KiB block on the stack. The pairs past the last complete
//! step (and an odd n's last element) are added there with `vdpbf16ps` (and one FMA) in k order,
//! exactly as the `avx512bf16` kernel adds them, so that a weight past a layer's n is never read;
//! the block then goes out through the AVX-512 tier's stores and sinks.
//!
//! Stable Rust has no AMX intrinsics: the tile instructions are `asm!`, each block self-contained
//! (the tile registers hold nothing from one block to the next, and the compiler never allocates
//! them). Linux hands out tile state only to a process that asks (`arch_prctl`), once, in
//! [`usable`]; the tile configuration is per thread, loaded at the start of every product and
//! released at its end.
//!
//! Loop nest: for each panel of the range, for each 32-row block of the left operand, in order (a
//! column-sum sink adds rows in ascending order). Each output is one chain over k in order
//! (`tdpbf16ps` steps, then the tail), whatever the thread or panel range, so results are
//! bitwise the same for any thread count.

use std::arch::asm;
use std::arch::x86_64::*;
use std::ops::Range;
use std::sync::OnceLock;

use super::avx2::Simd8;
use super::avx512::{store_acc, zero_acc, Acc, Simd16};
use super::avx512bf16;
use crate::cpu::isa::{Isa, Vendor};
use crate::cpu::kernels::{Kernels, Layout, PeakInstruction, TierFacts};
use crate::cpu::pack::{Panels, RowPairs, MR, NR, TILE_ROWS};
use crate::cpu::sink::Sink;

/// Pairs of k per tile step (a tile row is 64 bytes: 16 pairs of bf16).
const STEP: usize = 16;
/// Rows of the register block: two A tiles.
const BLOCK: usize = 2 * TILE_ROWS;

/// Whether this process may run tile instructions: the CPU has AMX-BF16 and AMX-TILE, the OS
/// saves tile state (XCR0 bits 17-18), and (Linux) granted this process tile data. Asked once;
/// `Err` says why not.
pub(crate) fn usable() -> Result<(), &'static str> {
    static USABLE: OnceLock<Result<(), &'static str>> = OnceLock::new();
    *USABLE.get_or_init(check)
}

fn check() -> Result<(), &'static str> {
    // Miri cannot run `cpuid` or `syscall` (inline assembly).
    if cfg!(miri) {
        return Err("not under Miri");
    }
    #[cfg(not(miri))]
    {
        // SAFETY: cpuid leaves 0, 1 and 7 exist on every x86-64 CPU that reports them (leaf 0's
        // maximum is checked first).
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

/// The 64-byte tile configuration (palette 1): tiles 0-3 are the C tiles (16 rows of 16 f32),
/// 4-5 the A tiles (16 rows of 16 pairs), 6-7 the B tiles (16 pair rows of 16 columns); every
/// row 64 bytes.
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

impl TileConfig {
    const fn new() -> Self {
        let mut b = [0u8; 64];
        b[0] = 1; // palette
        let mut t = 0;
        while t < 8 {
            // colsb[t]: u16 at byte 16 + 2t; rows[t]: byte 48 + t.
            b[16 + 2 * t] = 64;
            b[48 + t] = TILE_ROWS as u8;
            t += 1;
        }
        Self(b)
    }
}

static CONFIG: TileConfig = TileConfig::new();

/// One 32 x 32 f32 block of outputs, as the C tiles store it (row stride 128 bytes).
#[repr(C, align(64))]
struct CBlock([[f32; NR]; BLOCK]);

/// `c[..32][..32] = a[..32][0..16·steps pairs] · panel[0..16·steps pairs]` on tiles.
///
/// # Safety
/// Tile data is usable and [`CONFIG`] loaded on this thread; `a` points at 32 rows of at least
/// `16·steps` pairs, `a_stride` bytes apart; `b` at a panel of at least `16·steps` pair rows.
#[inline(always)]
unsafe fn tiles_2x2(a: *const u32, a_stride: usize, b: *const u32, steps: usize, c: &mut CBlock) {
    let c0 = c.0.as_mut_ptr().cast::<f32>();
    // SAFETY: each tileloadd reads 16 rows of 64 bytes inside the operands (contract); the stores
    // write 16 rows of 64 bytes inside the 4 KiB block.
    unsafe {
        asm!(
            "tilezero tmm0",
            "tilezero tmm1",
            "tilezero tmm2",
            "tilezero tmm3",
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
            "add {a0}, 64",
            "add {a1}, 64",
            "add {b}, 2048",
            "dec {steps}",
            "jnz 2b",
            "3:",
            "tilestored [{c0} + {sc} * 1], tmm0",
            "tilestored [{c0} + {sc} * 1 + 64], tmm1",
            "tilestored [{c1} + {sc} * 1], tmm2",
            "tilestored [{c1} + {sc} * 1 + 64], tmm3",
            a0 = inout(reg) a => _,
            a1 = inout(reg) a.byte_add(TILE_ROWS * a_stride) => _,
            sa = in(reg) a_stride,
            b = inout(reg) b => _,
            sb = in(reg) NR * 4,
            steps = inout(reg) steps => _,
            c0 = in(reg) c0,
            c1 = in(reg) c0.add(TILE_ROWS * NR),
            sc = in(reg) NR * 4,
            options(nostack),
        );
    }
}

/// [`tiles_2x2`] for the first 16 rows only (a block of at most 16 real rows).
///
/// # Safety
/// As [`tiles_2x2`], for 16 rows of `a` and of `c`.
#[inline(always)]
unsafe fn tiles_1x2(a: *const u32, a_stride: usize, b: *const u32, steps: usize, c: &mut CBlock) {
    let c0 = c.0.as_mut_ptr().cast::<f32>();
    // SAFETY: as in tiles_2x2, for the first A and C tiles only.
    unsafe {
        asm!(
            "tilezero tmm0",
            "tilezero tmm1",
            "test {steps}, {steps}",
            "jz 3f",
            "2:",
            "tileloadd tmm4, [{a0} + {sa} * 1]",
            "tileloadd tmm6, [{b} + {sb} * 1]",
            "tileloadd tmm7, [{b} + {sb} * 1 + 64]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "add {a0}, 64",
            "add {b}, 2048",
            "dec {steps}",
            "jnz 2b",
            "3:",
            "tilestored [{c0} + {sc} * 1], tmm0",
            "tilestored [{c0} + {sc} * 1 + 64], tmm1",
            a0 = inout(reg) a => _,
            sa = in(reg) a_stride,
            b = inout(reg) b => _,
            sb = in(reg) NR * 4,
            steps = inout(reg) steps => _,
            c0 = in(reg) c0,
            sc = in(reg) NR * 4,
            options(nostack),
        );
    }
}

/// Adds pairs `p0..full` (and, for an odd `n`, its last element) of rows `..rows` of the block
/// into `c`, in k order, as the `vdpbf16ps` kernel adds them.
///
/// # Safety
/// AVX-512F/BW/VL and AVX512_BF16 are present; `a` points at `rows` rows of `ceil(n / 2)` pairs,
/// `a_stride` bytes apart; `b` at a panel of at least `ceil(n / 2)` pair rows.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16,f16c,fma")]
unsafe fn tail(a: *const u32, a_stride: usize, b: *const u32, n: usize, p0: usize, rows: usize, c: &mut CBlock) {
    let full = n / 2;
    if p0 == full && n.is_multiple_of(2) {
        return;
    }
    let lo = |v: __m512i| _mm512_castsi512_ps(_mm512_slli_epi32::<16>(v));
    // SAFETY: every access is inside the operands and the block (contract).
    unsafe {
        for (i, crow) in c.0.iter_mut().enumerate().take(rows) {
            let ar = a.byte_add(i * a_stride);
            let mut acc = [_mm512_loadu_ps(crow.as_ptr()), _mm512_loadu_ps(crow.as_ptr().add(16))];
            for p in p0..full {
                let x: __m512bh = std::mem::transmute(_mm512_set1_epi32(*ar.add(p) as i32));
                for (h, ah) in acc.iter_mut().enumerate() {
                    let w: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(p * NR + 16 * h).cast()));
                    *ah = _mm512_dpbf16_ps(*ah, x, w);
                }
            }
            if n % 2 == 1 {
                let x = _mm512_set1_ps(f32::from_bits((*ar.add(full) & 0xffff) << 16));
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

/// bf16 products of row-major pairs (`n` elements) against pair panels on AMX tiles (see the module
/// docs): `sink[row, col] <- Σ_k left[row, k]·right[col, k]` for the panels in `range`.
///
/// # Safety
/// [`usable`] is `Ok`; AVX-512F/BW/VL, FMA, F16C and AVX512_BF16 are present; `left.k_len ==
/// ceil(n / 2)` and the panels hold at least that many pair rows; the sink has `left.rows` rows
/// owned by this call, and the columns of the panels in `range` are owned too.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16,f16c,fma")]
unsafe fn gemm_tiles<T: Simd16>(left: RowPairs<'_>, n: usize, right: &Panels<u32>, range: Range<usize>, sink: &Sink<'_, T>) {
    debug_assert_eq!(left.k_len, n.div_ceil(2));
    debug_assert!(left.k_len <= right.k_cap() && usable().is_ok());
    let steps = (n / 2) / STEP;
    let a_stride = left.stride * 4;
    let cols = sink.cols();
    let mut c = CBlock([[0.0; NR]; BLOCK]);
    // SAFETY: tile data is usable (contract); the configuration is a valid palette-1 one.
    unsafe { asm!("ldtilecfg [{}]", in(reg) CONFIG.0.as_ptr(), options(nostack, readonly)) };
    for p in range {
        let col0 = p * NR;
        if col0 >= cols {
            break;
        }
        let b = right.panel(p).as_ptr();
        for t0 in (0..left.rows).step_by(BLOCK) {
            let rows = BLOCK.min(left.rows - t0);
            let a = left.data[t0 * left.stride..].as_ptr();
            // SAFETY: the left operand has rows padded to 16 (zeros) of `stride >= k_len` pairs, so
            // a block's 16 or 32 rows exist; the panel holds k_len >= 16·steps pair rows.
            unsafe {
                if rows > TILE_ROWS {
                    tiles_2x2(a, a_stride, b, steps, &mut c);
                } else {
                    tiles_1x2(a, a_stride, b, steps, &mut c);
                }
                tail(a, a_stride, b, n, steps * STEP, rows, &mut c);
                store_block(&c, rows, sink, t0, col0);
            }
        }
    }
    // SAFETY: releases this thread's tile state (no tile holds anything needed).
    unsafe { asm!("tilerelease", options(nostack, nomem)) };
}

/// The facts of this tier's bf16 kernels: those of `avx512bf16` (pair weights, `u` rounded to bf16,
/// subnormals flushed: `tdpbf16ps` flushes them too), on tiles.
const FACTS: TierFacts = TierFacts {
    isa: Isa::Amx,
    mr: BLOCK,
    kc: 0,
    layout: Layout::Tiles,
    peak: PeakInstruction::AmxBf16,
    ..avx512bf16::FACTS
};

/// The AMX kernel table for `T`: tiles for bf16, the AVX-512 table otherwise.
pub(crate) fn kernels<T: Simd16 + Simd8>(vendor: Vendor) -> Kernels<T> {
    let table = super::avx512::kernels::<T>(vendor);
    if T::DTYPE != crate::DType::BF16 {
        return table;
    }
    Kernels { facts: FACTS, gemm_tiles: Some(gemm_tiles::<T>), ..table }
}

