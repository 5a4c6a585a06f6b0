//! Portable micro-kernels on `wide::f32x8` (SSE2 pairs on baseline x86-64, NEON on aarch64): the
//! tier every CPU can run, and the reference shape of the SIMD tiers.
//!
//! The tile is up to `MR` rows x 32 columns as four 8-lane strips, accumulated over each k block
//! in order by the shared loop nest (`cpu::macro_kernel`); results go out through the sink's
//! element-wise store, clipped to the sink's width.

use std::mem::MaybeUninit;
use std::ops::Range;

use wide::f32x8;

use crate::cpu::isa::Isa;
use crate::cpu::kernels::{Kernels, Layout, PeakInstruction, TierFacts};
use crate::cpu::macro_kernel::{self, MicroKernel};
use crate::cpu::pack::{Left, Panels, MR, NR};
use crate::cpu::sink::Sink;
use crate::dtype::Element;

const LANES: usize = 8;
/// Units of k per cache block and row tiles per group: as the other tiers (not tuned here: this
/// tier is the fallback and the tests' reference shape, not a fast path).
const KC: usize = 64;
const GROUP: usize = 8;

/// Widens exactly 8 elements.
#[inline(always)]
fn load8<E: Element>(src: &[E]) -> f32x8 {
    let mut buf = [0.0f32; LANES];
    E::widen_slice(&src[..LANES], &mut buf);
    f32x8::new(buf)
}

/// Partial sums of one row tile over one panel: `MR` rows of four 8-lane strips.
type Acc = [[f32x8; NR / LANES]; MR];

/// f32 broadcasts against panels of `W`, read in place.
struct Fma<'a, W> {
    left: Left<'a, f32>,
    _w: std::marker::PhantomData<W>,
}

impl<W: Element, T: Element> MicroKernel<T> for Fma<'_, W> {
    type Weight = W;
    type Staged = W;
    type Acc = Acc;
    type Buf = ();
    const KC: usize = KC;
    const GROUP: usize = GROUP;
    const IN_PLACE: bool = true;
    const DECODE_PANELS: [usize; 4] = [0; 4];
    fn k_units(&self) -> usize {
        self.left.k_len
    }
    #[inline(always)]
    unsafe fn zero(&self) -> Acc {
        [[f32x8::ZERO; NR / LANES]; MR]
    }
    #[inline(always)]
    unsafe fn stage(&self, wp: *const W, k0: usize, _kl: usize, _buf: &mut MaybeUninit<()>) -> *const W {
        // SAFETY: row k0 of the panel exists (this trait method's contract).
        unsafe { wp.add(k0 * NR) }
    }
    #[inline(always)]
    unsafe fn run<const R: usize, const P: usize>(
        &self,
        t0: usize,
        sp: [*const W; P],
        k0: usize,
        kl: usize,
        _last: bool,
        acc: &mut [Acc; P],
    ) {
        let lt = self.left.tile(t0);
        let lanes = self.left.lanes;
        for (&s, a) in sp.iter().zip(acc.iter_mut()) {
            // SAFETY: the block holds kl rows of NR weights inside its panel (the trait method's
            // contract), so this slice is in bounds of the panel's allocation.
            let block = unsafe { std::slice::from_raw_parts(s, kl * NR) };
            for (c, strip) in (0..NR).step_by(LANES).enumerate() {
                for k in 0..kl {
                    let w = load8(&block[k * NR + strip..]);
                    for (i, ai) in a.iter_mut().enumerate().take(R) {
                        ai[c] = f32x8::splat(lt[(k0 + k) * lanes + i]).mul_add(w, ai[c]);
                    }
                }
            }
        }
    }
    #[inline(always)]
    unsafe fn store<const R: usize>(&self, acc: &Acc, sink: &Sink<'_, T>, t0: usize, col0: usize) {
        let width = NR.min(sink.cols() - col0);
        for (i, strips) in acc.iter().enumerate().take(R) {
            let mut row = [0.0f32; NR];
            for (c, s) in strips.iter().enumerate() {
                row[c * LANES..(c + 1) * LANES].copy_from_slice(&s.to_array());
            }
            // SAFETY: the row and the panel's columns are this call's (the trait method's contract).
            unsafe { sink.store_row(t0 + i, col0, &row[..width]) };
        }
    }
}

/// `sink[row, col] <- Σ_k left[row, k] · right[col, k]` for the panels in `range`.
///
/// # Safety
/// `left.k_len <= right.k_cap()`; the sink has `left.rows` rows owned by this call, and the
/// columns of the panels in `range` are owned too.
unsafe fn gemm<W: Element, T: Element>(
    left: Left<'_, f32>,
    right: &Panels<W>,
    range: Range<usize>,
    sink: &Sink<'_, T>,
) {
    let rows = left.rows;
    // SAFETY: forwarded; the portable kernel needs no instruction beyond the target's baseline.
    unsafe { macro_kernel::gemm(&Fma { left, _w: std::marker::PhantomData::<W> }, rows, right, range, sink) }
}

/// The portable kernel table for `T`.
pub(crate) fn kernels<T: Element>() -> Kernels<T> {
    Kernels {
        facts: TierFacts {
            isa: Isa::Portable,
            mr: MR,
            nr: NR,
            kc: KC,
            group: GROUP,
            block_rows: crate::cpu::kernels::BLOCK_ROWS,
            decode_panels: [0; 4],
            layout: Layout::Wide,
            wide_below_rows: 0,
            rounds_u: false,
            flushes_subnormals: false,
            peak: PeakInstruction::F32Fma,
        },
        gemm: gemm::<T, T>,
        gemm_f32: gemm::<f32, T>,
        gemm_pairs: None,
        gemm_tiles: None,
    }
}
