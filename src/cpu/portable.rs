//! Portable micro-kernels on `wide::f32x8` (SSE2 pairs on baseline x86-64, NEON on aarch64): the
//! tier every CPU can run, and the reference shape of the SIMD tiers.
//!
//! The tile is up to `MR` rows x 8 columns (one panel is done as four such strips), accumulated
//! over k in order; the last, partial strip is computed in full and stored clipped.

use std::ops::Range;

use wide::f32x8;

use super::packed::{Left, Panels, Sink, MR, NR};
use super::{Isa, Kernels};
use crate::dtype::Element;

const LANES: usize = 8;

pub(super) fn kernels<T: Element>() -> Kernels<T> {
    Kernels { isa: Isa::Portable, gemm: gemm::<T, T>, gemm_f32: gemm::<f32, T>, gemm_pairs: None }
}

/// Widens exactly 8 elements.
#[inline(always)]
fn load8<E: Element>(src: &[E]) -> f32x8 {
    let mut buf = [0.0f32; LANES];
    E::widen_slice(&src[..LANES], &mut buf);
    f32x8::new(buf)
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
    debug_assert!(left.k_len <= right.k_cap());
    let cols = sink.cols();
    for p in range {
        let col0 = p * NR;
        if col0 >= cols {
            break;
        }
        let panel = right.panel(p);
        let width = NR.min(cols - col0);
        for t0 in (0..left.rows).step_by(MR) {
            let rows = MR.min(left.rows - t0);
            let lt = left.tile(t0);
            for c in (0..width).step_by(LANES) {
                let mut acc = [f32x8::ZERO; MR];
                for k in 0..left.k_len {
                    let w = load8(&panel[k * NR + c..]);
                    for (i, a) in acc.iter_mut().enumerate().take(rows) {
                        *a = f32x8::splat(lt[k * left.lanes + i]).mul_add(w, *a);
                    }
                }
                let n = LANES.min(width - c);
                for (i, a) in acc.iter().enumerate().take(rows) {
                    // SAFETY: row and columns are in the sink and owned (this function's contract).
                    unsafe { sink.store_row(t0 + i, col0 + c, &a.to_array()[..n]) };
                }
            }
        }
    }
}
