//! What the backward tests share: one call's gradients on the host, the starting gradients and
//! `dy` a case draws, and the check of single-adapter gradients against the f64 reference bound.

use proptest::prelude::*;
use vera_kernels::rng::TorchCpuGenerator;
use vera_kernels::{reference, Element, MatRef, Numerics};

use super::{inputs, to, values, Case};

/// f32's unit roundoff: one more f32 addition onto an old value under accumulate.
const EPS: f64 = 5.960_464_477_539_063e-8;

/// One backward call's gradients: `lambda_d` (`[K, r]`), `lambda_b` and the bias (`[K, m]`), and
/// `dx [t, n + x_pad]` (the pad untouched); K = 1 for one adapter.
#[derive(Clone, Debug, PartialEq)]
pub struct Grads<T> {
    pub lambda_d: Vec<f32>,
    pub lambda_b: Vec<f32>,
    pub bias: Vec<f32>,
    pub x: Vec<T>,
}

impl<T: Element> Grads<T> {
    /// Every value's bits, for comparing runs.
    pub fn bits(&self) -> Vec<u64> {
        let f = self.lambda_d.iter().chain(&self.lambda_b).chain(&self.bias).map(|v| u64::from(v.to_bits()));
        f.chain(self.x.iter().map(|v| v.to_f64().to_bits())).collect()
    }
}

/// Random `dy [t, m + y_pad]` and starting gradients (what accumulate adds to) for a case with `k`
/// adapters.
pub fn extras<T: Element>(c: &Case, k: usize) -> (Vec<T>, Grads<T>) {
    let mut g = TorchCpuGenerator::manual_seed(c.seed ^ 0xd1);
    let dy = to::<T>(&values(&mut g, c.t * (c.m + c.y_pad), 1.0));
    let old = Grads {
        lambda_d: values(&mut g, k * c.r, 1.0),
        lambda_b: values(&mut g, k * c.m, 1.0),
        bias: values(&mut g, k * c.m, 1.0),
        x: to::<T>(&values(&mut g, c.t * (c.n + c.x_pad), 1.0)),
    };
    (dy, old)
}

/// `|got - want| <= bound`, with one more f32 addition onto `old` under accumulate.
pub fn within(got: f64, want: f64, bound: f64, old: Option<f64>) -> bool {
    let (want, bound) = match old {
        Some(o) => (o + want, bound + EPS * (o.abs() + want.abs() + bound)),
        None => (want, bound),
    };
    (got - want).abs() <= bound
}

/// A single-adapter backward's gradients `out` for case `c` (started from [`extras`]) against
/// `reference::backward` within `reference::backward_error_bound` for `numerics`; the bias
/// gradient too when `bias` (asked for), else it must be left as it was. `on` names the tier or
/// device in the messages.
pub fn check_gradients<T: Element>(
    c: &Case,
    on: &dyn std::fmt::Display,
    out: &Grads<T>,
    numerics: Numerics,
    bias: bool,
) -> Result<(), TestCaseError> {
    check_gradients_with(c, on, out, numerics, (numerics, 0.0), bias)
}

/// [`check_gradients`], with `dx` checked against the bound for `dx_bound.0` plus `dx_bound.1 ·
/// Σ_i |dy[t, i]|` on each element of row `t` (an absolute error per unit of `dy`, e.g. a weight
/// rounded below the normal range).
pub fn check_gradients_with<T: Element>(
    c: &Case,
    on: &dyn std::fmt::Display,
    out: &Grads<T>,
    numerics: Numerics,
    dx_bound: (Numerics, f64),
    bias: bool,
) -> Result<(), TestCaseError> {
    let inp = inputs::<T>(c);
    let (dy, old) = extras::<T>(c, 1);
    let layer = inp.projections.slice(c.n, c.m).unwrap();
    let x = MatRef::new(&inp.x, c.t, c.n, c.n + c.x_pad).unwrap();
    let dy = MatRef::new(&dy, c.t, c.m, c.m + c.y_pad).unwrap();
    let want = reference::backward(layer, &inp.adapter, x, dy).unwrap();
    let bound = reference::backward_error_bound(layer, &inp.adapter, x, dy, numerics).unwrap();
    let dx_bounds = if dx_bound.0 == numerics {
        bound.x.clone()
    } else {
        reference::backward_error_bound(layer, &inp.adapter, x, dy, dx_bound.0).unwrap().x
    };
    let dy_mass: Vec<f64> =
        (0..c.t).map(|t| dy.row(t).unwrap().iter().map(|v| v.to_f64().abs()).sum::<f64>() * dx_bound.1).collect();
    let acc = c.accumulate;
    let mut f32s = vec![
        ("lambda_d", &out.lambda_d, &want.lambda_d, &bound.lambda_d, &old.lambda_d),
        ("lambda_b", &out.lambda_b, &want.lambda_b, &bound.lambda_b, &old.lambda_b),
    ];
    if bias {
        f32s.push(("bias", &out.bias, &want.bias, &bound.bias, &old.bias));
    } else {
        prop_assert_eq!(&out.bias, &old.bias, "{}: bias gradient written without being asked for", on);
    }
    for (what, got, want, bound, old) in f32s {
        for i in 0..got.len() {
            let o = acc.then(|| f64::from(old[i]));
            prop_assert!(
                within(f64::from(got[i]), want[i], bound[i], o),
                "{on} d{what}[{i}] = {}, reference {}, bound {}, old {o:?}",
                got[i],
                want[i],
                bound[i]
            );
        }
    }
    let stride = c.n + c.x_pad;
    for t in 0..c.t {
        for k in 0..c.n {
            let idx = t * stride + k;
            let o = acc.then(|| old.x[idx].to_f64());
            let (w, b) = (want.x[t * c.n + k], dx_bounds[t * c.n + k] + dy_mass[t]);
            // The rounding of the sum to T is in the bound; under accumulate the old value adds
            // one more rounding to T.
            let b = if acc { b + T::UNIT_ROUNDOFF * (old.x[idx].to_f64().abs() + w.abs() + b) } else { b };
            prop_assert!(
                within(out.x[idx].to_f64(), w, b, o),
                "{on} dx[{t},{k}] = {:?}, reference {w}, bound {b}",
                out.x[idx]
            );
        }
        for k in c.n..stride {
            prop_assert_eq!(out.x[t * stride + k].to_f64().to_bits(), old.x[t * stride + k].to_f64().to_bits());
        }
    }
    Ok(())
}
