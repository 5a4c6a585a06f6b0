//! Portable micro-kernels on `wide::f32x8` (SSE2 pairs on baseline x86-64, NEON on aarch64).
//!
//! Two shapes of kernel cover everything:
//! - `nt`: `out[t, j] = Σ_k x[t, k]·w[j, k]` with both operands contiguous along k (down- and
//!   up-projection, dense product): an `MR x NR` tile of 8-lane accumulators, reduced once at the
//!   end. A k tail is loaded zero-padded, so there is no scalar edge loop.
//! - `update`: `out[i, k] op= Σ_j c[i, j]·a[j, k]` (ΔW, merge): `MR` rows x 16 columns of
//!   accumulators fed by broadcasts of `c` and vector loads of A's rows.
//!
//! Edge tiles reuse the last valid row or column (results discarded), so every output element
//! goes through exactly the same operations wherever it sits in a tile.

use std::array::from_fn;

use wide::f32x8;

use super::{Epilogue, Kernels, Update};
use crate::dtype::Element;
use crate::mat::{MatPtr, MatRef};

const LANES: usize = 8;
const MR: usize = 4;
const NR: usize = 4;
/// Vectors per row of an `update` tile.
const NV: usize = 2;

pub(super) fn kernels<T: Element>() -> Kernels<T> {
    Kernels {
        isa: super::Isa::Portable,
        down: down::<T>,
        up: up::<f32, T>,
        dense: up::<T, T>,
        update: update::<T>,
    }
}

/// Widens up to 8 elements into a vector, zero-padding the rest.
#[inline(always)]
fn load<E: Element>(src: &[E]) -> f32x8 {
    let mut buf = [0.0f32; LANES];
    let n = src.len().min(LANES);
    E::widen_slice(&src[..n], &mut buf[..n]);
    f32x8::new(buf)
}

/// Widens exactly 8 elements.
#[inline(always)]
fn load8<E: Element>(src: &[E; LANES]) -> f32x8 {
    let mut buf = [0.0f32; LANES];
    E::widen_slice(src, &mut buf);
    f32x8::new(buf)
}

#[inline(always)]
fn as8<E>(s: &[E], at: usize) -> &[E; LANES] {
    s[at..at + LANES].try_into().expect("8 elements")
}

/// One `MR x NR` tile of dot products over the whole k range.
#[inline(always)]
fn dot_tile<X: Element, W: Element>(x: &[&[X]; MR], w: &[&[W]; NR]) -> [[f32; NR]; MR] {
    let k = x[0].len();
    let mut acc = [[f32x8::ZERO; NR]; MR];
    let full = k - k % LANES;
    let mut kk = 0;
    while kk < full {
        let wv: [f32x8; NR] = from_fn(|j| load8(as8(w[j], kk)));
        for (acc_i, xi) in acc.iter_mut().zip(x) {
            let xv = load8(as8(xi, kk));
            for (a, wj) in acc_i.iter_mut().zip(&wv) {
                *a = xv.mul_add(*wj, *a);
            }
        }
        kk += LANES;
    }
    if full < k {
        let wv: [f32x8; NR] = from_fn(|j| load(&w[j][full..]));
        for (acc_i, xi) in acc.iter_mut().zip(x) {
            let xv = load(&xi[full..]);
            for (a, wj) in acc_i.iter_mut().zip(&wv) {
                *a = xv.mul_add(*wj, *a);
            }
        }
    }
    acc.map(|row| row.map(|v| v.reduce_add()))
}

/// Calls `emit(t, j, Σ_k x[t, k]·w[j, k])` for every `t < x.rows()`, `j < w.rows()`.
#[inline(always)]
fn nt<X: Element, W: Element>(
    x: MatRef<'_, X>,
    w: MatRef<'_, W>,
    mut emit: impl FnMut(usize, usize, f32),
) {
    let (rows, cols) = (x.rows(), w.rows());
    for j0 in (0..cols).step_by(NR) {
        let wr: [&[W]; NR] = from_fn(|j| w.row_unchecked((j0 + j).min(cols - 1)));
        for i0 in (0..rows).step_by(MR) {
            let xr: [&[X]; MR] = from_fn(|i| x.row_unchecked((i0 + i).min(rows - 1)));
            let d = dot_tile(&xr, &wr);
            for (i, di) in d.iter().enumerate().take(rows - i0) {
                for (j, &v) in di.iter().enumerate().take(cols - j0) {
                    emit(i0 + i, j0 + j, v);
                }
            }
        }
    }
}

/// `out[t, j] = scale[j] · Σ_k x[t, k]·w[j, k]`.
///
/// # Safety
/// `out` is `[x.rows(), w.rows()]` and no other thread touches it during the call.
unsafe fn down<T: Element>(
    x: MatRef<'_, T>,
    w: MatRef<'_, T>,
    scale: Option<&[f32]>,
    out: MatPtr<f32>,
) {
    debug_assert_eq!([out.rows(), out.cols()], [x.rows(), w.rows()]);
    nt(x, w, |t, j, d| {
        // SAFETY: t < out.rows() by the shape contract; exclusivity is the caller's.
        let row = unsafe { out.row_mut(t) };
        row[j] = scale.map_or(d, |s| s[j] * d);
    });
}

/// `y[t, i] = epilogue(Σ_j u[t, j]·w[i, j])`.
///
/// # Safety
/// `y` is `[u.rows(), w.rows()]` and no other thread touches it during the call.
unsafe fn up<X: Element, T: Element>(
    u: MatRef<'_, X>,
    w: MatRef<'_, T>,
    epi: &Epilogue<'_>,
    y: MatPtr<T>,
) {
    debug_assert_eq!([y.rows(), y.cols()], [u.rows(), w.rows()]);
    nt(u, w, |t, i, d| {
        // SAFETY: t < y.rows() by the shape contract; exclusivity is the caller's.
        let row = unsafe { y.row_mut(t) };
        row[i] = T::from_f32(epi.apply(i, d, row[i].to_f32()));
    });
}

/// `out[i, k] = op(out[i, k], Σ_j c[i, j]·a[j, k])`.
///
/// # Safety
/// `out` is `[c.rows(), a.cols()]` and no other thread touches it during the call.
unsafe fn update<T: Element>(c: MatRef<'_, f32>, a: MatRef<'_, T>, op: Update, out: MatPtr<T>) {
    debug_assert_eq!([out.rows(), out.cols()], [c.rows(), a.cols()]);
    let (rows, r, n) = (c.rows(), c.cols(), a.cols());
    const W: usize = LANES * NV;
    for k0 in (0..n).step_by(W) {
        let kl = W.min(n - k0);
        for i0 in (0..rows).step_by(MR) {
            let cr: [&[f32]; MR] = from_fn(|i| c.row_unchecked((i0 + i).min(rows - 1)));
            let mut acc = [[f32x8::ZERO; NV]; MR];
            for j in 0..r {
                let arow = &a.row_unchecked(j)[k0..k0 + kl];
                let av: [f32x8; NV] = if kl == W {
                    from_fn(|v| load8(as8(arow, v * LANES)))
                } else {
                    from_fn(|v| load(&arow[(v * LANES).min(kl)..]))
                };
                for (acc_i, ci) in acc.iter_mut().zip(&cr) {
                    let cv = f32x8::splat(ci[j]);
                    for (s, avv) in acc_i.iter_mut().zip(&av) {
                        *s = cv.mul_add(*avv, *s);
                    }
                }
            }
            for (i, acc_i) in acc.iter().enumerate().take(rows - i0) {
                // SAFETY: i0 + i < out.rows(); exclusivity is the caller's.
                let row = unsafe { out.row_mut(i0 + i) };
                let vals: [f32; W] = from_fn(|q| acc_i[q / LANES].to_array()[q % LANES]);
                for (o, &v) in row[k0..k0 + kl].iter_mut().zip(&vals) {
                    *o = T::from_f32(op.apply(o.to_f32(), v));
                }
            }
        }
    }
}
