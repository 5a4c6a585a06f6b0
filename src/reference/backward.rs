//! The backward pass in f64, and forward-error bounds for the kernels' gradients.

use super::{gamma, layer_matrices, split_product_error, F32_MIN_NORMAL, U32};
use crate::adapter::Adapter;
use crate::dtype::Element;
use crate::error::Result;
use crate::mat::MatRef;
use crate::projections::LayerProjections;
use crate::types::{check_forward, Numerics, DY};

/// One layer's gradients (or bounds on their errors), in f64: `dL/dlambda_d [r]`,
/// `dL/dlambda_b [m]`, `dL/dbias [m]` and the adapter's part of `dL/dx`, `[T, n]` row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct Gradients {
    /// `[r]`.
    pub lambda_d: Vec<f64>,
    /// `[m]`.
    pub lambda_b: Vec<f64>,
    /// `[m]`.
    pub bias: Vec<f64>,
    /// `[T, n]`, row-major.
    pub x: Vec<f64>,
}

/// The f64 quantities of one layer's backward pass, with every input replaced by its absolute
/// value when `abs` is set: `h [T][r]`, `v [T][m]`, `g [T][r]`.
struct Pass {
    h: Vec<Vec<f64>>,
    v: Vec<Vec<f64>>,
    g: Vec<Vec<f64>>,
}

fn pass<T: Element>(
    layer: &LayerProjections<'_, T>,
    adapter: &Adapter,
    x: MatRef<'_, T>,
    dy: MatRef<'_, T>,
    abs: bool,
) -> Pass {
    let (a, b) = layer_matrices(layer, abs);
    let f = |v: f64| if abs { v.abs() } else { v };
    let ld: Vec<f64> = adapter.lambda_d().iter().map(|&v| f(f64::from(v))).collect();
    let lb: Vec<f64> = adapter.lambda_b().iter().map(|&v| f(f64::from(v))).collect();
    let rows = |m: MatRef<'_, T>, t: usize| m.row_unchecked(t).iter().map(|v| f(v.to_f64())).collect::<Vec<f64>>();
    let dot = |p: &[f64], q: &[f64]| p.iter().zip(q).map(|(a, b)| a * b).sum::<f64>();
    let (mut h, mut v, mut g) = (Vec::new(), Vec::new(), Vec::new());
    for t in 0..x.rows() {
        let (xt, dyt) = (rows(x, t), rows(dy, t));
        let ht: Vec<f64> = a.iter().map(|aj| dot(aj, &xt)).collect();
        let ut: Vec<f64> = ht.iter().zip(&ld).map(|(h, d)| h * d).collect();
        v.push(b.iter().map(|bi| dot(bi, &ut)).collect());
        let dyl: Vec<f64> = dyt.iter().zip(&lb).map(|(d, l)| d * l).collect();
        g.push((0..ld.len()).map(|j| b.iter().zip(&dyl).map(|(bi, d)| bi[j] * d).sum()).collect());
        h.push(ht);
    }
    Pass { h, v, g }
}

/// The gradients of `sum(y ⊙ dy)` for one layer, `y = base + lambda_b ⊙ ((lambda_d ⊙ (x·Aᵀ))·Bᵀ) +
/// bias`: the f64 reference of [`crate::backward`].
///
/// Errors: as [`crate::backward`].
pub fn backward<T: Element>(
    layer: LayerProjections<'_, T>,
    adapter: &Adapter,
    x: MatRef<'_, T>,
    dy: MatRef<'_, T>,
) -> Result<Gradients> {
    check_forward(layer.dims(), adapter.dims(), [x.rows(), x.cols()], Some(([dy.rows(), dy.cols()], DY)))?;
    let p = pass(&layer, adapter, x, dy, false);
    let (a, _) = layer_matrices(&layer, false);
    let (r, m, n) = (layer.rank(), layer.out_features(), layer.in_features());
    let dyv = |t: usize, i: usize| dy.row_unchecked(t)[i].to_f64();
    let lambda_b = (0..m).map(|i| (0..x.rows()).map(|t| dyv(t, i) * p.v[t][i]).sum()).collect();
    let lambda_d = (0..r).map(|j| (0..x.rows()).map(|t| p.g[t][j] * p.h[t][j]).sum()).collect();
    let bias = (0..m).map(|i| (0..x.rows()).map(|t| dyv(t, i)).sum()).collect();
    let ld = adapter.lambda_d();
    let mut dx = vec![0.0; x.rows() * n];
    for (t, row) in dx.chunks_mut(n.max(1)).enumerate().take(x.rows()) {
        for (j, aj) in a.iter().enumerate() {
            let gl = p.g[t][j] * f64::from(ld[j]);
            for (o, av) in row.iter_mut().zip(aj) {
                *o += gl * av;
            }
        }
    }
    Ok(Gradients { lambda_d, lambda_b, bias, x: dx })
}

/// Per-element bounds on `|gradient_kernel - gradient_ref|` for [`crate::backward`] in
/// [`Mode::Overwrite`](crate::Mode::Overwrite) (for `Mode::Accumulate` add `ε·(|old| + |ref| +
/// bound)` for the one more f32 addition, `ε = 2^-24`), for kernels whose arithmetic `numerics`
/// describes (of the tier that made a saved `h`).
///
/// Derived like [`super::forward_error_bound`], with `γ(k) = kε/(1 - kε)` and the absolute values
/// `H = |x|·|A|ᵀ`, `V = (|lambda_d| ⊙ H)·|B|ᵀ`, `G = (|dy| ⊙ |lambda_b|)·|B|`: `ĥ` carries
/// `γ(n)·H`, `v̂` `γ(n + r + 1)·V` (one rounding for `u = lambda_d ⊙ ĥ`), `ĝ` `γ(m + 1)·G`; a
/// column sum over `T` rows made in blocks and then added block by block passes each term through
/// one product and at most `2T` additions. So
///
/// - `dlambda_b`: `γ(n + r + 2T + 2) · Σ_t |dy| ⊙ V`;
/// - `dlambda_d`: `γ(n + m + 2T + 2) · Σ_t G ⊙ H`;
/// - `dbias`: `γ(2T) · Σ_t |dy|`;
/// - `dx` (rounded once to `T`): `e = γ(m + r + 2) · (|lambda_d| ⊙ G)·|A|`, plus
///   `ε_T · (|dx_ref| + e) + s_T / 2`;
///
/// and, when `numerics.flushes_subnormals` (an `h` saved by a `vdpbf16ps` forward), the flushed
/// parts of `h`, `2^-126 · (Σ_k |A_jk| + Σ_k |x_tk| + n)` per element, carried through the same
/// sums; when `numerics.splits_products` (an `h` saved by a split forward), its error beyond
/// `gamma(n)·H` (see [`super::forward_error_bound`]) likewise.
///
/// When `numerics.rounds_backward` (bf16 on the `avx512bf16` tier's `vdpbf16ps` kernels and on
/// the `amx` tier's tiles), each product's left operand is rounded to `T` (unit roundoff `u_T`)
/// and its subnormals flushed: `v` gains `u_T·(1 + γ)·V +
/// 2^-126·(Σ_j |B_ij| + r)`, `g` gains `u_T·(1 + γ)·G + 2^-126·(Σ_i |B_ij| + m)` (reaching
/// `dlambda_d` through `Σ_t · H`), and `dx` gains `(|lambda_d| ⊙ (g's extra + u_T·(1 + γ)²·G))·|A|
/// + 2^-126·(Σ_j |A_jk| + r)`, `V`, `G`, `H` the magnitudes the terms above use.
///
/// When `numerics.splits_products` (f16 on the `amx` tier), the backward's products also run on
/// bf16 tiles with both operands split (the left ones f32 values split to 16 bits): a product over
/// k carries `split_product_error(k)` instead of `γ(k)`, an excess `δ_k` (see
/// [`super::forward_error_bound`]). `v`'s excess `δ_r(1 + γ_v)·(V + h's extra)` reaches
/// `dlambda_b` through `|dy|` and the sums (one more `1 + γ_v`); `g`'s `δ_m(1 + γ_g)·G` reaches
/// `dlambda_d` through `H` and the sums likewise, and `dx` through `lambda_d` and A (times
/// `1 + γ(m + r + 2)`), with the product's own `δ_r(1 + δ_m)(1 + γ(m + r + 2))·(|lambda_d| ⊙ G)·|A|`
/// (`γ_v`, `γ_g` the `γ` of the `dlambda_b` and `dlambda_d` terms above). The tiles flush subnormals: each of a product's `3k`
/// terms may lose 2^-126 from its result, and a flushed left part 2^-126·|w|(1 + 2^-8) from each of
/// the two weight parts it meets: `2^-126·(7 Σ|w| + 3k)` per element.
pub fn backward_error_bound<T: Element>(
    layer: LayerProjections<'_, T>,
    adapter: &Adapter,
    x: MatRef<'_, T>,
    dy: MatRef<'_, T>,
    numerics: Numerics,
) -> Result<Gradients> {
    let reference = backward(layer, adapter, x, dy)?;
    let p = pass(&layer, adapter, x, dy, true);
    let (a, b) = layer_matrices(&layer, true);
    let (rows, r, m, n) = (x.rows(), layer.rank(), layer.out_features(), layer.in_features());
    let ld: Vec<f64> = adapter.lambda_d().iter().map(|&v| f64::from(v).abs()).collect();
    let dyv = |t: usize, i: usize| dy.row_unchecked(t)[i].to_f64().abs();
    // What a saved h may carry beyond gamma(n)·H: a split forward's error (its excess over
    // gamma(n), times (1 + gamma(r + m + 1)) for the products it passes through), and the flushed
    // part of each h (0 unless the saved h came from a flushing kernel).
    let split = if numerics.splits_products {
        let excess = split_product_error(n, false) - gamma(n, U32);
        excess * (1.0 + gamma(r + m + 1, U32))
    } else {
        0.0
    };
    let ftz: Vec<Vec<f64>> = (0..rows)
        .map(|t| {
            let x_sum: f64 = x.row_unchecked(t).iter().map(|v| v.to_f64().abs()).sum();
            let on = if numerics.flushes_subnormals { 1.0 } else { 0.0 };
            a.iter()
                .zip(&p.h[t])
                .map(|(aj, h)| on * F32_MIN_NORMAL * (aj.iter().sum::<f64>() + x_sum + n as f64) + split * h)
                .collect()
        })
        .collect();
    let ftz_v = |t: usize, i: usize| (0..r).map(|j| ld[j] * b[i][j] * ftz[t][j]).sum::<f64>();
    // With `rounds_backward` (tiles): each left operand element rounded to T (relative u_T), and each
    // product's subnormal inputs and partial sums flushed (2^-126 per term of its k range).
    let (u_t, tiny) = if numerics.rounds_backward { (T::UNIT_ROUNDOFF, F32_MIN_NORMAL) } else { (0.0, 0.0) };
    // With split products: each product's excess over gamma(k), and the flushed terms of split tiles
    // (`tiny_w · Σ|w| + tiny_k · k`, times 2^-126).
    let delta = |k: usize| if numerics.splits_products { split_product_error(k, true) - gamma(k, U32) } else { 0.0 };
    let (d_r, d_m) = (delta(r), delta(m));
    let (tiny, tiny_w, tiny_k) = match (numerics.rounds_backward, numerics.splits_products) {
        (true, _) => (tiny, 1.0, 1.0),
        (false, true) => (F32_MIN_NORMAL, 7.0, 3.0),
        (false, false) => (0.0, 0.0, 0.0),
    };
    let b_col_sum: Vec<f64> = (0..r).map(|j| b.iter().map(|bi| bi[j]).sum()).collect();
    let a_col_sum: Vec<f64> = (0..n).map(|k| a.iter().map(|aj| aj[k]).sum()).collect();
    let g_lb = gamma(n + r + 2 * rows + 2, U32);
    // v = round(lambda_d ⊙ h)·Bᵀ: u_T on each element of u, and the flushed terms.
    let round_v = |t: usize, i: usize| {
        u_t * (1.0 + g_lb) * p.v[t][i]
            + tiny * (tiny_w * b[i].iter().sum::<f64>() + tiny_k * r as f64)
            + d_r * (1.0 + g_lb) * (1.0 + g_lb) * (p.v[t][i] + ftz_v(t, i))
    };
    let lambda_b =
        (0..m).map(|i| (0..rows).map(|t| dyv(t, i) * (g_lb * p.v[t][i] + ftz_v(t, i) + round_v(t, i))).sum()).collect();
    let g_ld = gamma(n + m + 2 * rows + 2, U32);
    // g = round(dy ⊙ lambda_b)·B: u_T on each element of dy ⊙ lambda_b, and the flushed terms.
    let round_g = |t: usize, j: usize| {
        u_t * (1.0 + g_ld) * p.g[t][j]
            + tiny * (tiny_w * b_col_sum[j] + tiny_k * m as f64)
            + d_m * (1.0 + g_ld) * p.g[t][j]
    };
    // g's error meets h's (H and its extra), through one product and the sums: (1 + g_ld) more.
    let lambda_d = (0..r)
        .map(|j| {
            (0..rows)
                .map(|t| {
                    p.g[t][j] * (g_ld * p.h[t][j] + ftz[t][j]) + round_g(t, j) * (1.0 + g_ld) * (p.h[t][j] + ftz[t][j])
                })
                .sum()
        })
        .collect();
    let g_b = gamma(2 * rows, U32);
    let bias = (0..m).map(|i| g_b * (0..rows).map(|t| dyv(t, i)).sum::<f64>()).collect();
    let g_dx = gamma(m + r + 2, U32);
    let split_dx = d_r * (1.0 + d_m) * (1.0 + g_dx);
    let mut dx = vec![0.0; rows * n];
    for (t, row) in dx.chunks_mut(n.max(1)).enumerate().take(rows) {
        // With tiles, g carries round_g, and g ⊙ lambda_d one more rounding to T.
        let mut extra = vec![0.0; n];
        for (j, aj) in a.iter().enumerate() {
            let gl = ld[j] * p.g[t][j];
            let ge = ld[j] * (round_g(t, j) * (1.0 + g_dx) + u_t * (1.0 + g_dx) * (1.0 + g_ld) * p.g[t][j]);
            for ((o, e), av) in row.iter_mut().zip(extra.iter_mut()).zip(aj) {
                *o += gl * av;
                *e += ge * av;
            }
        }
        for (k, o) in row.iter_mut().enumerate() {
            let e = (g_dx + split_dx) * *o + extra[k] + tiny * (tiny_w * a_col_sum[k] + tiny_k * r as f64);
            *o = e + T::UNIT_ROUNDOFF * (reference.x[t * n + k].abs() + e) + T::MIN_POSITIVE_SUBNORMAL / 2.0;
        }
    }
    Ok(Gradients { lambda_d, lambda_b, bias, x: dx })
}
