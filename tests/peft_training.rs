//! Reproduces what PyTorch autograd through HuggingFace PEFT computed in
//! `tests/fixtures/peft-vera-train` (see its README.md): each layer's gradients of
//! `sum(layer(x) ⊙ dy)` with respect to `lambda_d`, `lambda_b` and `x`, and a 10-step SGD run of a
//! three-layer model (its losses and the trained adapter), with negative controls.

mod common;

use common::{fixture_dir, read_f32_tensors, rel_err};
use vera_kernels::{backward, forward_train, Adapter, Gradients, MatMut, MatRef, Mode, Projections};

/// Layer sizes of the fixture model: layers.l maps SIZES[l] -> SIZES[l + 1].
const SIZES: [usize; 4] = [48, 40, 64, 24];
const R: usize = 16;
const MAX: usize = 64;
const LR: f32 = 0.05;
const STEPS: usize = 10;

struct Model {
    projections: Projections<f32>,
    adapters: Vec<Adapter>,
    weights: Vec<Vec<f32>>,
    biases: Vec<Vec<f32>>,
}

fn adapter_file(dir: &str) -> std::collections::HashMap<String, (Vec<usize>, Vec<f32>)> {
    read_f32_tensors(&fixture_dir("peft-vera-train").join(dir).join("adapter_model.safetensors"))
}

fn lambdas(file: &std::collections::HashMap<String, (Vec<usize>, Vec<f32>)>, l: usize) -> (Vec<f32>, Vec<f32>) {
    let key = |k: &str| format!("base_model.model.layers.{l}.{k}");
    (file[&key("vera_lambda_d")].1.clone(), file[&key("vera_lambda_b")].1.clone())
}

fn model() -> Model {
    let file = adapter_file("adapter");
    let (a, b) = (file["base_model.vera_A"].1.clone(), file["base_model.vera_B"].1.clone());
    let projections = Projections::from_arrays(a, b, R, MAX, MAX).unwrap();
    let reference = read_f32_tensors(&fixture_dir("peft-vera-train/reference.safetensors"));
    let adapters = (0..3)
        .map(|l| {
            let (ld, lb) = lambdas(&file, l);
            Adapter::new(ld, lb).unwrap()
        })
        .collect();
    let weights = (0..3).map(|l| reference[&format!("layers.{l}.weight")].1.clone()).collect();
    let biases = (0..3).map(|l| reference[&format!("layers.{l}.bias")].1.clone()).collect();
    Model { projections, adapters, weights, biases }
}

/// `x·Wᵀ + b` in f64, rounded once (the frozen layer).
fn base(x: &[f32], w: &[f32], b: &[f32], t: usize, n: usize, m: usize) -> Vec<f32> {
    (0..t * m)
        .map(|idx| {
            let (ti, i) = (idx / m, idx % m);
            let dot: f64 = (0..n).map(|k| f64::from(x[ti * n + k]) * f64::from(w[i * n + k])).sum();
            (dot + f64::from(b[i])) as f32
        })
        .collect()
}

/// `dy·W` in f64, rounded once (the frozen layer's part of dx).
fn base_dx(dy: &[f32], w: &[f32], t: usize, n: usize, m: usize) -> Vec<f32> {
    (0..t * n)
        .map(|idx| {
            let (ti, k) = (idx / n, idx % n);
            (0..m).map(|i| f64::from(dy[ti * m + i]) * f64::from(w[i * n + k])).sum::<f64>() as f32
        })
        .collect()
}

/// One layer's gradients from our backward: (dlambda_d, dlambda_b, adapter's dx).
fn layer_grads(
    m: &Model,
    l: usize,
    x: &[f32],
    dy: &[f32],
    t: usize,
    saved_h: Option<&[f32]>,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (n, mo) = (SIZES[l], SIZES[l + 1]);
    let (mut dld, mut dlb, mut dx) = (vec![0.0; R], vec![0.0; mo], vec![0.0; t * n]);
    let grads = Gradients::new(&mut dld, &mut dlb).with_x(MatMut::from_slice(&mut dx, t, n).unwrap());
    let h = saved_h.map(|h| MatRef::from_slice(h, t, R).unwrap());
    let (x, dy) = (MatRef::from_slice(x, t, n).unwrap(), MatRef::from_slice(dy, t, mo).unwrap());
    backward(&m.projections, &m.adapters[l], x, dy, h, grads, Mode::Overwrite).unwrap();
    (dld, dlb, dx)
}

#[test]
fn each_layers_gradients_are_pefts() {
    let m = model();
    let reference = read_f32_tensors(&fixture_dir("peft-vera-train/reference.safetensors"));
    for l in 0..3 {
        let get = |k: &str| &reference[&format!("layers.{l}.{k}")];
        let (x_shape, x) = get("x");
        let t = x_shape[0];
        let dy = &get("dy").1;
        let (dld, dlb, dx) = layer_grads(&m, l, x, dy, t, None);
        for (what, got, want) in [
            ("grad_lambda_d", &dld, &get("grad_lambda_d").1),
            ("grad_lambda_b", &dlb, &get("grad_lambda_b").1),
            ("grad_x_adapter", &dx, &get("grad_x_adapter").1),
        ] {
            let e = rel_err(got, want);
            assert!(e <= 1e-5, "layers.{l} {what}: relative error {e:e}");
        }
        // The whole dx: the frozen layer's dy·W plus the adapter's part, accumulated.
        let (n, mo) = (SIZES[l], SIZES[l + 1]);
        let mut dx = base_dx(dy, &m.weights[l], t, n, mo);
        let (mut dld, mut dlb) = (vec![0.0; R], vec![0.0; mo]);
        let grads = Gradients::new(&mut dld, &mut dlb).with_x(MatMut::from_slice(&mut dx, t, n).unwrap());
        let (xv, dyv) = (MatRef::from_slice(x, t, n).unwrap(), MatRef::from_slice(dy, t, mo).unwrap());
        backward(&m.projections, &m.adapters[l], xv, dyv, None, grads, Mode::Accumulate).unwrap();
        let e = rel_err(&dx, &get("grad_x").1);
        assert!(e <= 1e-5, "layers.{l} grad_x: relative error {e:e}");
        // Negative control: the same call with lambda_b negated changes every gradient.
        let flipped =
            Adapter::new(m.adapters[l].lambda_d().to_vec(), m.adapters[l].lambda_b().iter().map(|v| -v).collect())
                .unwrap();
        let wrong = Model { adapters: vec![flipped.clone(), flipped.clone(), flipped], ..model() };
        let (dld_w, _, _) = layer_grads(&wrong, l, x, dy, t, None);
        assert!(rel_err(&dld_w, &get("grad_lambda_d").1) > 0.5, "layers.{l}: a negated lambda_b still matched");
    }
}

/// The fixture's SGD run with our training forward and backward: returns the losses (before each
/// step and after the last) and the trained lambdas.
/// Each layer's (lambda_d, lambda_b).
type Lambdas = Vec<(Vec<f32>, Vec<f32>)>;

fn sgd(m: &mut Model, saved_h: bool, lr: f32) -> (Vec<f32>, Lambdas) {
    let reference = read_f32_tensors(&fixture_dir("peft-vera-train/reference.safetensors"));
    let (x_shape, x0) = reference["train.x"].clone();
    let target = reference["train.target"].1.clone();
    let t = x_shape[0];
    let mut losses = Vec::new();
    for step in 0..=STEPS {
        // Forward through the three layers, keeping each layer's input and h.
        let mut inputs = vec![x0.clone()];
        let mut hs = Vec::new();
        for l in 0..3 {
            let (n, mo) = (SIZES[l], SIZES[l + 1]);
            let x = inputs.last().unwrap();
            let mut y = base(x, &m.weights[l], &m.biases[l], t, n, mo);
            let mut h = vec![0.0f32; t * R];
            let (xv, yv) = (MatRef::from_slice(x, t, n).unwrap(), MatMut::from_slice(&mut y, t, mo).unwrap());
            forward_train(
                &m.projections,
                &m.adapters[l],
                xv,
                yv,
                Mode::Accumulate,
                MatMut::from_slice(&mut h, t, R).unwrap(),
            )
            .unwrap();
            inputs.push(y);
            hs.push(h);
        }
        let out = inputs.last().unwrap();
        let count = out.len() as f64;
        let loss: f64 =
            out.iter().zip(&target).map(|(o, g)| (f64::from(*o) - f64::from(*g)).powi(2)).sum::<f64>() / count;
        losses.push(loss as f32);
        if step == STEPS {
            break;
        }
        // dL/dout = 2 (out - target) / count, then back through the layers.
        let mut dy: Vec<f32> =
            out.iter().zip(&target).map(|(o, g)| (2.0 * (f64::from(*o) - f64::from(*g)) / count) as f32).collect();
        let mut grads = vec![(Vec::new(), Vec::new()); 3];
        for l in (0..3).rev() {
            let (n, mo) = (SIZES[l], SIZES[l + 1]);
            let h = saved_h.then_some(hs[l].as_slice());
            let (dld, dlb, dx_adapter) = layer_grads(m, l, &inputs[l], &dy, t, h);
            let dx_base = base_dx(&dy, &m.weights[l], t, n, mo);
            dy = dx_base.iter().zip(&dx_adapter).map(|(a, b)| a + b).collect();
            grads[l] = (dld, dlb);
        }
        for (adapter, (dld, dlb)) in m.adapters.iter_mut().zip(&grads) {
            let step = |v: &[f32], g: &[f32]| v.iter().zip(g).map(|(v, g)| v - lr * g).collect::<Vec<f32>>();
            *adapter = Adapter::new(step(adapter.lambda_d(), dld), step(adapter.lambda_b(), dlb)).unwrap();
        }
    }
    let trained = m.adapters.iter().map(|a| (a.lambda_d().to_vec(), a.lambda_b().to_vec())).collect();
    (losses, trained)
}

#[test]
fn the_sgd_run_reproduces_pefts_losses_and_trained_adapter() {
    let reference = read_f32_tensors(&fixture_dir("peft-vera-train/reference.safetensors"));
    let want_losses = &reference["train.loss"].1;
    let trained_file = adapter_file("trained");
    for saved_h in [false, true] {
        let (losses, trained) = sgd(&mut model(), saved_h, LR);
        assert_eq!(losses.len(), STEPS + 1);
        for (k, (got, want)) in losses.iter().zip(want_losses).enumerate() {
            let e = (f64::from(*got) - f64::from(*want)).abs() / f64::from(*want).abs();
            assert!(e <= 1e-4, "step {k} loss {got}, PEFT {want}, relative error {e:e} (saved h: {saved_h})");
        }
        // The run did train: the loss fell.
        assert!(losses[STEPS] < 0.9 * losses[0], "{losses:?}");
        for (l, (ld, lb)) in trained.iter().enumerate() {
            let (want_d, want_b) = lambdas(&trained_file, l);
            assert!(rel_err(ld, &want_d) <= 1e-4, "layers.{l} trained lambda_d: {:e}", rel_err(ld, &want_d));
            assert!(rel_err(lb, &want_b) <= 1e-4, "layers.{l} trained lambda_b: {:e}", rel_err(lb, &want_b));
        }
    }
}

#[test]
fn a_wrong_learning_rate_does_not_reproduce_the_run() {
    // Negative control for the test above: 10% off in the step size is visible in the losses.
    let reference = read_f32_tensors(&fixture_dir("peft-vera-train/reference.safetensors"));
    let want = &reference["train.loss"].1;
    let (losses, _) = sgd(&mut model(), false, LR * 1.1);
    let e = (f64::from(losses[STEPS]) - f64::from(want[STEPS])).abs() / f64::from(want[STEPS]);
    assert!(e > 1e-3, "a 10% larger learning rate still matched PEFT's final loss ({e:e})");
}
