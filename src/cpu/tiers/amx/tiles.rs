//! The tile configuration and the tile steps: `C[32 x 32] += A · B` over a k slice in one `asm!`
//! block each, asking ahead for the operands of later calls.

use std::arch::asm;

use super::{BLOCK, TILE_ROWS};
use crate::cpu::pack::NR;

/// The 64-byte tile configuration (palette 1): tiles 0-3 are the C tiles (16 f32 a row), 4-5 the
/// A tiles (16 pairs a row), both of `rows` rows, and 6-7 the B tiles (16 pair rows of 16 columns);
/// every row 64 bytes.
#[repr(C, align(64))]
pub(super) struct TileConfig([u8; 64]);

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

    /// Loads this configuration into this thread's tile registers.
    ///
    /// # Safety
    /// Tile data is usable (`usable` is `Ok`).
    #[inline(always)]
    pub(super) unsafe fn load(&self) {
        // SAFETY: tile data is usable (contract); the configuration is a valid palette-1 one, and
        // ldtilecfg only reads its 64 bytes.
        unsafe { asm!("ldtilecfg [{}]", in(reg) self.0.as_ptr(), options(nostack, readonly)) };
    }
}

/// The configurations for products of 1 to 16 rows and more (`CONFIGS[min(rows, 16) - 1]`): a
/// product of fewer than 16 rows (decode) loads and multiplies only its rows of A and C. Each row
/// of a tile is computed from that row alone, so the bits are the same whatever the count.
pub(super) static CONFIGS: [TileConfig; TILE_ROWS] = {
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
pub(super) struct CBlock(pub(super) [[f32; NR]; BLOCK]);

/// The C tiles' starting values for the first k slice.
pub(super) static ZERO: CBlock = CBlock([[0.0; NR]; BLOCK]);

/// Where a tile call asks for the operands of later calls while its steps run (see
/// [`gemm_tiles`]): the left operand's next slice for the call's two row tiles (`a0`, `a1`,
/// [`AHEAD_LINES`]` / 2` lines a step each) and the next panel's weights (`b`, [`AHEAD_LINES`]
/// lines a step), each pointer then moving on by its `step` bytes. A prefetch never faults, so
/// the pointers may be anything; a stream with nothing to ask for points at the call's own
/// operands.
///
/// [`gemm_tiles`]: super::gemm::gemm_tiles
#[derive(Clone, Copy)]
pub(super) struct Ahead {
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
    pub(super) fn new(a: [*const u8; 2], a_len: usize, b: *const u8, b_len: usize, steps: usize) -> Self {
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
pub(super) unsafe fn tiles_2x2(
    a: [*const u32; 2],
    b: *const u32,
    steps: usize,
    c: (*const CBlock, *mut CBlock),
    ahead: Ahead,
) {
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
pub(super) unsafe fn tiles_1x2(
    a: *const u32,
    b: *const u32,
    steps: usize,
    c: (*const CBlock, *mut CBlock),
    ahead: Ahead,
) {
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
