//! The naive f64 implementation every kernel is checked against (public so users can test with it).
//!
//! All arithmetic is in f64 from inputs widened exactly, so for the sizes used in tests its own
//! error is negligible next to the f32 kernels'. Results are row-major `Vec<f64>`.

mod backward;

pub use backward::{backward, backward_error_bound, Gradients};

use crate::adapter::Adapter;
use crate::dtype::Element;
use crate::error::Result;
use crate::mat::MatRef;
use crate::projections::LayerProjections;
use crate::types::{check_forward, Numerics, Y};

/// Unit roundoff of f32, the arithmetic the CPU kernels accumulate in.
const U32: f64 = 5.960_464_477_539_063e-8;

/// `gamma(k) = k u / (1 - k u)`: the classic bound on the relative error of k rounded operations
/// with unit roundoff `u`.
fn gamma(k: usize, u: f64) -> f64 {
    let ku = k as f64 * u;
    ku / (1.0 - ku)
}

/// Unit roundoff of bf16, `2^-8`: the split parts of [`Numerics::splits_products`].
const U_BF16: f64 = 0.003_906_25;

/// The relative error, on the magnitude of the exact product, of a dot product of `k` elements
/// split into bf16 parts ([`Numerics::splits_products`]): `gamma(3k) · S + drop`. Its `3k` terms
/// `hi·hi + hi·lo + lo·hi`, accumulated in f32, have magnitudes summing to at most `S = (1 + ε)²(1
/// + 2ε)` times the product's (`ε = 2^-8`, `|hi| <= (1 + ε)|v|`, `|lo| <= ε(1 + ε)|v|`); `drop` is
/// what the parts leave out: `lo·lo <= ε²(1 + ε)` for an exact split (f16 `x` and A), plus
/// `|v - hi - lo| <= ε²` when the left operand is an f32 (`u`).
pub(crate) fn split_product_error(k: usize, f32_left: bool) -> f64 {
    let e = U_BF16;
    let s = (1.0 + e) * (1.0 + e) * (1.0 + 2.0 * e);
    let drop = e * e * (1.0 + e) + if f32_left { e * e } else { 0.0 };
    gamma(3 * k, U32) * s + drop
}

fn layer_matrices<T: Element>(layer: &LayerProjections<'_, T>, abs: bool) -> (Vec<Vec<f64>>, Vec<Vec<f64>>) {
    let f = |v: &T| if abs { v.to_f64().abs() } else { v.to_f64() };
    let a = (0..layer.rank()).map(|j| layer.a().row_unchecked(j).iter().map(f).collect()).collect();
    let b = (0..layer.out_features()).map(|i| layer.b().row_unchecked(i).iter().map(f).collect()).collect();
    (a, b)
}

/// `lambda_b ⊙ ((lambda_d ⊙ (x·Aᵀ))·Bᵀ)` without bias or base, with every input replaced by its
/// absolute value when `abs` is set.
fn adapter_path<T: Element>(
    layer: &LayerProjections<'_, T>,
    adapter: &Adapter,
    x: MatRef<'_, T>,
    abs: bool,
) -> Vec<f64> {
    let (a, b) = layer_matrices(layer, abs);
    let g = |v: f32| {
        if abs {
            f64::from(v).abs()
        } else {
            f64::from(v)
        }
    };
    let m = layer.out_features();
    let mut out = Vec::with_capacity(x.rows() * m);
    for t in 0..x.rows() {
        let xr: Vec<f64> = x.row_unchecked(t).iter().map(|v| if abs { v.to_f64().abs() } else { v.to_f64() }).collect();
        let u: Vec<f64> = a
            .iter()
            .zip(adapter.lambda_d())
            .map(|(aj, &d)| g(d) * aj.iter().zip(&xr).map(|(p, q)| p * q).sum::<f64>())
            .collect();
        for (bi, &lb) in b.iter().zip(adapter.lambda_b()) {
            out.push(g(lb) * bi.iter().zip(&u).map(|(p, q)| p * q).sum::<f64>());
        }
    }
    out
}

/// The forward pass `y = base + lambda_b ⊙ ((lambda_d ⊙ (x·Aᵀ))·Bᵀ) + bias`, `[T, m]`.
///
/// `base` (the frozen layer's output, `[T, m]`) is optional: without it the result is the adapter
/// contribution alone, which is what the overwrite mode of [`crate::forward`] writes.
pub fn forward<T: Element>(
    layer: LayerProjections<'_, T>,
    adapter: &Adapter,
    x: MatRef<'_, T>,
    base: Option<MatRef<'_, T>>,
) -> Result<Vec<f64>> {
    check_forward(layer.dims(), adapter.dims(), [x.rows(), x.cols()], base.map(|b| ([b.rows(), b.cols()], Y)))?;
    let m = layer.out_features();
    let mut y = adapter_path(&layer, adapter, x, false);
    for (t, row) in y.chunks_mut(m.max(1)).enumerate().take(x.rows()) {
        for (i, v) in row.iter_mut().enumerate() {
            *v += adapter.bias().map_or(0.0, |b| f64::from(b[i]));
            *v += base.map_or(0.0, |b| b.row_unchecked(t)[i].to_f64());
        }
    }
    Ok(y)
}

/// `ΔW = diag(lambda_b) · B · diag(lambda_d) · A`, `[m, n]`.
pub fn delta_weight<T: Element>(layer: LayerProjections<'_, T>, adapter: &Adapter) -> Result<Vec<f64>> {
    adapter.check(layer.rank(), layer.out_features())?;
    let (a, b) = layer_matrices(&layer, false);
    let n = layer.in_features();
    let mut dw = vec![0.0f64; layer.out_features() * n];
    for (i, row) in dw.chunks_mut(n.max(1)).enumerate().take(layer.out_features()) {
        for (j, aj) in a.iter().enumerate() {
            let c = f64::from(adapter.lambda_b()[i]) * b[i][j] * f64::from(adapter.lambda_d()[j]);
            for (o, &av) in row.iter_mut().zip(aj) {
                *o += c * av;
            }
        }
    }
    Ok(dw)
}

/// Smallest positive normal f32, 2^-126.
const F32_MIN_NORMAL: f64 = 1.175_494_350_822_287_5e-38;

/// The extra error of arithmetic that flushes subnormals (`vdpbf16ps` treats subnormal inputs as
/// zero and flushes subnormal results): each of the `n` steps of `h_j` may lose up to 2^-126 from
/// its result and 2^-126 · (|x_k| + |A_jk|) from a flushed input, and that error reaches `y`
/// through `|lambda_d_j| · |B_ij| · |lambda_b_i|`; likewise each of the `r` steps of `v_i` may lose
/// 2^-126 from its result and `2^-126 · |B_ij|` from a flushed (part of) `u_j`, times `|lambda_b_i|`.
fn flush_to_zero_term<T: Element>(layer: &LayerProjections<'_, T>, adapter: &Adapter, x: MatRef<'_, T>) -> Vec<f64> {
    let (a, b) = layer_matrices(layer, true);
    let (n, r) = (layer.in_features() as f64, layer.rank() as f64);
    let a_sums: Vec<f64> = a.iter().map(|row| row.iter().sum()).collect();
    let mut out = Vec::with_capacity(x.rows() * layer.out_features());
    for t in 0..x.rows() {
        let x_sum: f64 = x.row_unchecked(t).iter().map(|v| v.to_f64().abs()).sum();
        let per_j: Vec<f64> = a_sums
            .iter()
            .zip(adapter.lambda_d())
            .map(|(sa, &d)| f64::from(d).abs() * F32_MIN_NORMAL * (sa + x_sum + n))
            .collect();
        for (bi, &lb) in b.iter().zip(adapter.lambda_b()) {
            let up = F32_MIN_NORMAL * (bi.iter().sum::<f64>() + r);
            out.push(f64::from(lb).abs() * (bi.iter().zip(&per_j).map(|(p, q)| p * q).sum::<f64>() + up));
        }
    }
    out
}

/// A rigorous per-element bound on `|y_kernel - y_ref|` for this crate's CPU kernels, `[T, m]`,
/// for kernels whose arithmetic `numerics` describes (a tier's, from
/// [`crate::tier_facts`]`::<T>().numerics()`).
///
/// The kernels compute in f32 (unit roundoff `u`): `h = x·Aᵀ` is `n` rounded multiply-adds,
/// `u = lambda_d ⊙ h` one rounding, `v = u·Bᵀ` `r` more, `lambda_b ⊙ v` one, and the bias and base
/// additions two. With `M = |lambda_b| ⊙ ((|lambda_d| ⊙ (|x|·|A|ᵀ))·|B|ᵀ)`, standard forward-error
/// analysis (Higham, ch. 3) gives for the f32 result
/// `e32 = gamma(n + r + 4) · M + 2u · (|base| + |bias| + M)`, and the final rounding to the output
/// dtype (unit roundoff `u_T`, smallest subnormal `s_T`) adds `u_T · (|y_ref| + e32) + s_T / 2`.
///
/// When `numerics.rounds_u` (bf16 on the `avx512bf16` tier, whose up-projection runs on
/// `vdpbf16ps`, as PEFT rounds `u` to the activation dtype), each element of `u` carries one more
/// relative error `u_T`: `u_T · (1 + gamma) · M` in `y`. When `numerics.flushes_subnormals`, `e32`
/// holds a term of order 2^-126 for that (see the source), negligible unless inputs are subnormal.
///
/// When `numerics.splits_products` (f16 on the `amx` tier), each product runs as three bf16 tile
/// products over three times its length, and `gamma(n + r + 4)` becomes `e_h + e_v + e_h·e_v +
/// gamma(4)·(1 + e_h)(1 + e_v)`, with `e_h`, `e_v` the two products' relative errors from
/// `split_product_error` (`x` split exactly, `u` an f32 split to 16 bits), as a chain of relative
/// errors composes.
pub fn forward_error_bound<T: Element>(
    layer: LayerProjections<'_, T>,
    adapter: &Adapter,
    x: MatRef<'_, T>,
    base: Option<MatRef<'_, T>>,
    numerics: Numerics,
) -> Result<Vec<f64>> {
    let u_round = if numerics.rounds_u { T::UNIT_ROUNDOFF } else { 0.0 };
    let g = if numerics.splits_products {
        let (e_h, e_v) = (split_product_error(layer.in_features(), false), split_product_error(layer.rank(), true));
        e_h + e_v + e_h * e_v + gamma(4, U32) * (1.0 + e_h) * (1.0 + e_v)
    } else {
        gamma(layer.in_features() + layer.rank() + 4, U32)
    };
    bound(layer, adapter, x, base, g, u_round, numerics.flushes_subnormals)
}

/// [`forward_error_bound`] for the CUDA kernels (`vera_kernels::cuda`, feature `cuda`), whose
/// arithmetic differs from the CPU's in two ways the bound accounts for:
/// - the f16/bf16 prefill path rounds `u = lambda_d ⊙ h` to the activation dtype before the
///   tensor-core up-projection, as PEFT does: one more relative error `u_T` on each element of `u`,
///   which reaches `y` as `u_T · (1 + gamma) · M`;
/// - tensor cores may accumulate a block of products with truncation instead of round-to-nearest, so
///   the `gamma` term uses the unit `2^-23` (one ulp) instead of `2^-24`.
///
/// Applied to every dtype and path (for f32 the extra terms are negligible), so one bound covers
/// whatever kernel a shape selects.
pub fn forward_error_bound_cuda<T: Element>(
    layer: LayerProjections<'_, T>,
    adapter: &Adapter,
    x: MatRef<'_, T>,
    base: Option<MatRef<'_, T>>,
) -> Result<Vec<f64>> {
    let g = gamma(layer.in_features() + layer.rank() + 4, 2.0 * U32);
    bound(layer, adapter, x, base, g, T::UNIT_ROUNDOFF, true)
}

/// The forward-error bound with relative error `g` for the adapter path's arithmetic up to `y`'s
/// bias and base additions (`gamma(n + r + 4)` for plain f32 accumulations), a relative error
/// `u_round` on each element of `u` (0 when `u` stays in f32), and the flush-to-zero term when
/// `ftz`.
fn bound<T: Element>(
    layer: LayerProjections<'_, T>,
    adapter: &Adapter,
    x: MatRef<'_, T>,
    base: Option<MatRef<'_, T>>,
    g: f64,
    u_round: f64,
    ftz: bool,
) -> Result<Vec<f64>> {
    let y_ref = forward(layer, adapter, x, base)?;
    let mag = adapter_path(&layer, adapter, x, true);
    let ftz = if ftz { flush_to_zero_term(&layer, adapter, x) } else { vec![0.0; mag.len()] };
    let m = layer.out_features();
    Ok(mag
        .iter()
        .zip(&y_ref)
        .enumerate()
        .map(|(idx, (&mg, &yr))| {
            let (t, i) = (idx / m, idx % m);
            let bias = adapter.bias().map_or(0.0, |b| f64::from(b[i]).abs());
            let base = base.map_or(0.0, |b| b.row_unchecked(t)[i].to_f64().abs());
            let e32 = g * mg + u_round * (1.0 + g) * mg + 2.0 * U32 * (base + bias + mg) + ftz[idx];
            e32 + T::UNIT_ROUNDOFF * (yr.abs() + e32) + T::MIN_POSITIVE_SUBNORMAL / 2.0
        })
        .collect())
}

/// A bound on `|ΔW_kernel - ΔW_ref|` (or on the error of `w ± ΔW`, merged or unmerged, with `w`
/// the weight before the update), `[m, n]`, for kernels whose arithmetic `numerics` describes (a
/// tier's, from [`crate::tier_facts`]`::<T>().numerics()`).
///
/// The kernels form each element from `c_ij = lambda_b_i · B_ij · lambda_d_j` (two roundings) and
/// `A_jk`, add it to (or subtract it from) `w` (one rounding), and round to the output dtype. With
/// `mag_ik = Σ_j |lambda_b_i B_ij lambda_d_j A_jk|`:
///
/// - f32 multiply-adds: `r` of them, so `gamma(r + 3) · mag` before the update.
/// - `numerics.splits_delta` (bf16 on the `amx` tier): each `c_ij` split into bf16 parts `hi + mid
///   + lo` (`|c - hi - mid - lo| <= ε³|c|`, `ε = 2^-8`, parts summing in magnitude to at most
///   `(1 + ε)(1 + 2ε)|c|`), each part times the exact bf16 `A_jk` exact in f32, the `3r` terms
///   accumulated in f32 on tiles: relative error `e = gamma(3r) (1 + ε)(1 + 2ε) + ε³` on `c`'s
///   magnitude, composed with `c`'s own `gamma(2)`: `(1 + gamma(2))(1 + e) - 1`. Tiles flush
///   subnormals: a part or an `A_jk` below 2^-126 loses at most `2^-126 (3|A_jk| + 2|c_ij|)`, each
///   of the `3r` partial sums at most 2^-126.
/// - `numerics.splits_products` (f16 on the `amx` tier): each `c_ij` split into two bf16 parts (to
///   16 bits) and each `A_jk` into two (exactly), `hi·hi + hi·lo + lo·hi` on tiles, as the f16
///   forward's products: `e = split_product_error(r)` (f32 left operand) composed with `c`'s own
///   `gamma(2)`. Tiles flush subnormals: a part of `c` below 2^-126 loses at most 2^-126 times the
///   `A` part it meets (at most `3·2^-126|A_jk|` over the three terms), a part of `A` likewise
///   (`3·2^-126|c_ij|`), and each of the `3r` partial sums at most 2^-126.
///
/// Both then add `u · (|w| + mag)` for the update and the final rounding `u_T · (|result| + e32) +
/// s_T / 2`.
pub fn delta_error_bound<T: Element>(
    layer: LayerProjections<'_, T>,
    adapter: &Adapter,
    w: Option<MatRef<'_, T>>,
    numerics: Numerics,
) -> Result<Vec<f64>> {
    adapter.check(layer.rank(), layer.out_features())?;
    let (a, b) = layer_matrices(&layer, true);
    let (n, r) = (layer.in_features(), layer.rank());
    let g = if numerics.splits_delta {
        let e = U_BF16;
        let split = gamma(3 * r, U32) * (1.0 + e) * (1.0 + 2.0 * e) + e * e * e;
        (1.0 + gamma(2, U32)) * (1.0 + split) - 1.0
    } else if numerics.splits_products {
        (1.0 + gamma(2, U32)) * (1.0 + split_product_error(r, true)) - 1.0
    } else {
        gamma(r + 3, U32)
    };
    let dw = delta_weight(layer, adapter)?;
    // Σ_j |A_jk| per column, for the flush term.
    let a_sums: Vec<f64> = (0..n).map(|k| (0..r).map(|j| a[j][k]).sum()).collect();
    let mut out = Vec::with_capacity(dw.len());
    for i in 0..layer.out_features() {
        // |c_ij| of this row, exact.
        let c: Vec<f64> = (0..r)
            .map(|j| f64::from(adapter.lambda_b()[i]).abs() * b[i][j] * f64::from(adapter.lambda_d()[j]).abs())
            .collect();
        let c_sum: f64 = c.iter().sum();
        for k in 0..n {
            let mag: f64 = (0..r).map(|j| c[j] * a[j][k]).sum();
            let ftz = if numerics.splits_delta {
                F32_MIN_NORMAL * (3.0 * a_sums[k] + 2.0 * c_sum + 3.0 * r as f64)
            } else if numerics.splits_products {
                F32_MIN_NORMAL * (3.0 * a_sums[k] + 3.0 * c_sum + 3.0 * r as f64)
            } else {
                0.0
            };
            let wv = w.map_or(0.0, |w| w.row_unchecked(i)[k].to_f64());
            let e32 = g * mag + ftz + U32 * (wv.abs() + mag);
            // |w| + |ΔW| bounds the result whether ΔW is added (merge) or subtracted (unmerge).
            let result = wv.abs() + dw[i * n + k].abs();
            out.push(e32 + T::UNIT_ROUNDOFF * (result + e32) + T::MIN_POSITIVE_SUBNORMAL / 2.0);
        }
    }
    Ok(out)
}
