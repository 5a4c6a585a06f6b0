//! The unfused peer: `h = x·Aᵀ` for all rows, then `h *= lambda_d`, then the up-projection, with the
//! fused path's own two products (`cpu::drivers::forward`).

use crate::cpu::drivers::forward::{down, down_scratch, packed_or_owned, up, up_scratch, BLOCK_ROWS};
use crate::cpu::drivers::{Scales, Weights};
use crate::cpu::kernels::Kernels;
use crate::cpu::parallel::{for_blocks, with_scratch, Work};
use crate::cpu::sink::{Epilogue, Sink};
use crate::dtype::Element;
use crate::mat::{MatMut, MatRef};
use crate::types::Mode;

/// The three passes (shapes already validated; `h` is `[T, r]`).
pub(super) fn unfused<T: Element>(
    kern: &Kernels<T>,
    w: Weights<'_, T>,
    s: Scales<'_>,
    x: MatRef<'_, T>,
    mut h: MatMut<'_, f32>,
    mut y: MatMut<'_, T>,
    mode: Mode,
) {
    let (rows, n, r, m) = (x.rows(), x.cols(), w.a.rows(), w.b.rows());
    let mut owned = None;
    let packed = packed_or_owned(&w, &mut owned);
    let hp = h.as_ptr_mat();
    for_blocks(rows, BLOCK_ROWS, Work::new(2.0 * (rows * n * r) as f64, n * r * size_of::<T>()), |t0, tb, split| {
        with_scratch(down_scratch(packed, tb, n), |xl| {
            let sink = Sink::F32 { out: hp.sub(t0, tb, 0, r), scale: None };
            down(kern, packed, x.row_range(t0, tb), xl, r, &sink, split);
        });
    });
    for t in 0..rows {
        for (v, d) in h.row_mut(t).expect("t < rows").iter_mut().zip(s.lambda_d) {
            *v *= d;
        }
    }
    let epi = Epilogue { scale: Some(s.lambda_b), bias: s.bias, accumulate: mode == Mode::Accumulate };
    let (h, yp) = (h.as_ref(), y.as_ptr_mat());
    for_blocks(rows, BLOCK_ROWS, Work::new(2.0 * (rows * r * m) as f64, r * m * size_of::<T>()), |t0, tb, split| {
        with_scratch(up_scratch(packed, tb, r), |hl| {
            up(kern, packed, h.row_range(t0, tb), hl, m, &Sink::Epilogue { out: yp.sub(t0, tb, 0, m), epi }, split);
        });
    });
}
