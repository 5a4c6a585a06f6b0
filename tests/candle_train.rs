//! Training through `VeraLinear` (feature `candle`): the gradients `loss.backward()` gives against
//! PyTorch autograd through PEFT (`tests/fixtures/peft-vera-train/reference.safetensors`) and
//! against `vera_kernels::backward` called directly; f16 / bf16 training against f32; frozen layers
//! (no graph on the inference path, gradients passed through on the training path); the PEFT
//! export; misuse errors.
//!
//! Run with `cargo test --release --features candle --test candle_train`.
#![cfg(feature = "candle")]

mod common;

use std::sync::Arc;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{Linear, Module, Optimizer, SGD};
use common::{fixture_dir, rel_err};
use vera_kernels::candle::{to_peft_adapter, VeraLinear, VeraProjections};
use vera_kernels::peft::{PeftAdapter, ProjectionSizes, TensorFile};
use vera_kernels::{backward, Adapter, Gradients, MatMut, MatRef, Mode, Projections};

const LAYERS: usize = 3;

struct Fixture {
    adapter: PeftAdapter,
    projections: Arc<VeraProjections>,
    reference: TensorFile,
}

fn fixture() -> Fixture {
    let dir = fixture_dir("peft-vera-train");
    let adapter = PeftAdapter::load(dir.join("adapter")).unwrap();
    let projections = Arc::new(VeraProjections::from_peft(&adapter, None).unwrap());
    let reference = TensorFile::read(dir.join("reference.safetensors")).unwrap();
    Fixture { adapter, projections, reference }
}

impl Fixture {
    /// A reference tensor as an f32 candle tensor.
    fn tensor(&self, key: &str) -> Tensor {
        let t = self.reference.tensor(key).unwrap();
        Tensor::from_vec(t.data().to_vec(), t.shape(), &Device::Cpu).unwrap()
    }

    /// A reference tensor's values.
    fn values(&self, key: &str) -> Vec<f32> {
        self.reference.tensor(key).unwrap().into_data()
    }

    /// layers.l with its base in `dtype`, frozen.
    fn layer(&self, l: usize, dtype: DType) -> VeraLinear {
        let to = |key: String| self.tensor(&key).to_dtype(dtype).unwrap();
        let base = Linear::new(to(format!("layers.{l}.weight")), Some(to(format!("layers.{l}.bias"))));
        VeraLinear::from_peft(base, &self.adapter, &format!("layers.{l}"), self.projections.clone()).unwrap()
    }

    fn trainable(&self, l: usize, dtype: DType) -> VeraLinear {
        self.layer(l, dtype).into_trainable().unwrap()
    }
}

/// A tensor's values as f32 (exact for f16 and bf16).
fn flat(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

/// A gradient's values as f32.
fn grad(grads: &GradStore, t: &Tensor) -> Vec<f32> {
    flat(grads.get(t).expect("a gradient for the tensor"))
}

/// `sum(y ⊙ dy)` in f32: its gradient with respect to `y` is `dy`.
fn dot_loss(y: &Tensor, dy: &Tensor) -> Tensor {
    (y.to_dtype(DType::F32).unwrap() * dy).unwrap().sum_all().unwrap()
}

fn var(t: &Tensor) -> Var {
    Var::from_tensor(t).unwrap()
}

#[test]
fn loss_backward_gives_pefts_gradients_for_every_layer() {
    let f = fixture();
    for l in 0..LAYERS {
        let key = |k: &str| format!("layers.{l}.{k}");
        let layer = f.trainable(l, DType::F32);
        let vars = layer.vars().unwrap();
        let x = var(&f.tensor(&key("x")));
        let grads = dot_loss(&layer.forward(&x).unwrap(), &f.tensor(&key("dy"))).backward().unwrap();
        for (what, got, want) in [
            ("grad_lambda_d", grad(&grads, vars.lambda_d()), f.values(&key("grad_lambda_d"))),
            ("grad_lambda_b", grad(&grads, vars.lambda_b()), f.values(&key("grad_lambda_b"))),
            // The whole dx: candle's matmul gives the frozen part dy·W, the fused backward the rest.
            ("grad_x", grad(&grads, &x), f.values(&key("grad_x"))),
        ] {
            let e = rel_err(&got, &want);
            assert!(e <= 1e-5, "layers.{l} {what}: relative error {e:e}");
        }
    }
}

/// `vera_kernels::backward` called directly: (dlambda_d, dlambda_b, the adapter's dx).
fn direct_backward(projections: &Projections<f32>, adapter: &Adapter, x: &[f32], dy: &[f32]) -> [Vec<f32>; 3] {
    let (r, m) = (adapter.rank(), adapter.out_features());
    let (t, n) = (dy.len() / m, x.len() * m / dy.len());
    let (mut dld, mut dlb, mut dx) = (vec![0.0; r], vec![0.0; m], vec![0.0; t * n]);
    let grads = Gradients::new(&mut dld, &mut dlb).with_x(MatMut::from_slice(&mut dx, t, n).unwrap());
    let (x, dy) = (MatRef::from_slice(x, t, n).unwrap(), MatRef::from_slice(dy, t, m).unwrap());
    backward(projections, adapter, x, dy, None, grads, Mode::Overwrite).unwrap();
    [dld, dlb, dx]
}

#[test]
fn the_ops_backward_is_the_crates_fused_backward_bit_for_bit() {
    let f = fixture();
    for l in 0..LAYERS {
        let key = |k: &str| format!("layers.{l}.{k}");
        let layer = f.trainable(l, DType::F32);
        let vars = layer.vars().unwrap();
        let x = var(&f.tensor(&key("x")));
        // The adapter's part alone, so that dx is the fused backward's and nothing else.
        let grads = dot_loss(&layer.adapter_forward(&x).unwrap(), &f.tensor(&key("dy"))).backward().unwrap();
        let want = direct_backward(f.projections.f32(), layer.adapter(), &f.values(&key("x")), &f.values(&key("dy")));
        let got = [grad(&grads, vars.lambda_d()), grad(&grads, vars.lambda_b()), grad(&grads, &x)];
        // The op reuses the h its forward saved; the direct call recomputes it: the same numbers.
        assert_eq!(got, want, "layers.{l}");
        // And the adapter part's dx is PEFT's.
        assert!(rel_err(&got[2], &f.values(&key("grad_x_adapter"))) <= 1e-5, "layers.{l}");
    }
}

/// The fixture model's layers in `dtype`, trainable.
fn model(f: &Fixture, dtype: DType) -> Vec<VeraLinear> {
    (0..LAYERS).map(|l| f.trainable(l, dtype)).collect()
}

fn forward(layers: &[VeraLinear], x: &Tensor) -> Tensor {
    layers.iter().fold(x.clone(), |x, layer| layer.forward(&x).unwrap())
}

/// `mean((model(x) - target)^2)` in f32, whatever the model's dtype.
fn mse(layers: &[VeraLinear], x: &Tensor, target: &Tensor) -> Tensor {
    let out = forward(layers, &x.to_dtype(layers[0].base().weight().dtype()).unwrap());
    candle_nn::loss::mse(&out.to_dtype(DType::F32).unwrap(), target).unwrap()
}

/// Every layer's (dlambda_d, dlambda_b) of the training loss.
fn lambda_grads(layers: &[VeraLinear], x: &Tensor, target: &Tensor) -> Vec<[Vec<f32>; 2]> {
    let grads = mse(layers, x, target).backward().unwrap();
    layers
        .iter()
        .map(|layer| {
            let v = layer.vars().unwrap();
            [grad(&grads, v.lambda_d()), grad(&grads, v.lambda_b())]
        })
        .collect()
}

/// `steps` SGD steps; returns the loss before each and after the last.
fn sgd(layers: &[VeraLinear], x: &Tensor, target: &Tensor, steps: usize, lr: f64) -> Vec<f32> {
    let vars = layers.iter().flat_map(VeraLinear::trainable_vars).collect();
    let mut opt = SGD::new(vars, lr).unwrap();
    let mut losses = Vec::new();
    for step in 0..=steps {
        let loss = mse(layers, x, target);
        losses.push(loss.to_scalar::<f32>().unwrap());
        if step < steps {
            opt.backward_step(&loss).unwrap();
        }
    }
    losses
}

#[test]
fn f16_and_bf16_train_with_gradients_near_the_f32_ones() {
    // The activations, the base weights and the projections are rounded to f16 (unit roundoff
    // u = 2^-11 ≈ 4.9e-4) or bf16 (u = 2^-8 ≈ 3.9e-3) at every layer; the λ gradients themselves
    // stay f32. Tolerances, relative to each gradient's (or loss's) largest value: about 6 u for
    // the gradients through three stacked layers (measured: 5e-4 in f16, 4e-3 in bf16) and 2-3 u
    // for the losses of a 5-step SGD run (measured: 1e-4 and 2e-3).
    let f = fixture();
    let (x, target) = (f.tensor("train.x"), f.tensor("train.target"));
    let want = lambda_grads(&model(&f, DType::F32), &x, &target);
    let f32_losses = sgd(&model(&f, DType::F32), &x, &target, 5, 0.05);
    for (dtype, grad_tol, loss_tol) in [(DType::F16, 3e-3, 1e-3), (DType::BF16, 2e-2, 1e-2)] {
        let layers = model(&f, dtype);
        let got = lambda_grads(&layers, &x, &target);
        for (l, (g, w)) in got.iter().zip(&want).enumerate() {
            for (what, g, w) in [("lambda_d", &g[0], &w[0]), ("lambda_b", &g[1], &w[1])] {
                let e = rel_err(g, w);
                assert!(e <= grad_tol, "{dtype:?} layers.{l} grad {what}: relative error {e:e} > {grad_tol:e}");
            }
        }
        // Five steps in the narrow dtype follow the f32 run and lower the loss as it does.
        let losses = sgd(&layers, &x, &target, 5, 0.05);
        for (k, (got, want)) in losses.iter().zip(&f32_losses).enumerate() {
            let e = (got - want).abs() / want;
            assert!(e <= loss_tol, "{dtype:?} step {k}: loss {got}, f32 {want}, relative error {e:e}");
        }
        assert!(losses[5] < 0.5 * losses[0], "{dtype:?}: {losses:?}");
    }
}

#[test]
fn the_inference_path_keeps_no_graph_and_the_training_path_gives_the_same_numbers() {
    let f = fixture();
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        let x = f.tensor("train.x").to_dtype(dtype).unwrap();
        let frozen = f.layer(0, dtype);
        let trainable = frozen.clone().into_trainable().unwrap();
        let (y_frozen, y_trainable) = (frozen.forward(&x).unwrap(), trainable.forward(&x).unwrap());
        // The frozen layer on a plain input records nothing for a backward; the trainable one does.
        assert!(!y_frozen.track_op() && !frozen.adapter_forward(&x).unwrap().track_op());
        assert!(y_trainable.track_op() && trainable.adapter_forward(&x).unwrap().track_op());
        // Both accumulate the adapter into a copy of the base output with the same kernels.
        assert_eq!(flat(&y_trainable), flat(&y_frozen), "{dtype:?}");
        assert_eq!(flat(&trainable.adapter_forward(&x).unwrap()), flat(&frozen.adapter_forward(&x).unwrap()));
        // A frozen layer on an input that carries a graph takes the training path: the same numbers.
        let tracked = var(&x);
        assert_eq!(flat(&frozen.forward(&tracked).unwrap()), flat(&y_frozen), "{dtype:?}");
    }
    let frozen = f.layer(0, DType::F32);
    assert!(!frozen.is_trainable() && frozen.trainable_vars().is_empty());
    let trainable = frozen.into_trainable().unwrap();
    assert!(trainable.is_trainable() && trainable.trainable_vars().len() == 2);
}

#[test]
fn frozen_layers_pass_gradients_to_the_layers_before_them() {
    let f = fixture();
    let (x, target) = (f.tensor("train.x"), f.tensor("train.target"));
    let all = model(&f, DType::F32);
    // layers.0 trainable, layers.1 and layers.2 frozen: the gradient reaches layers.0 through them.
    let first_only = vec![f.trainable(0, DType::F32), f.layer(1, DType::F32), f.layer(2, DType::F32)];
    let grads = mse(&first_only, &x, &target).backward().unwrap();
    let v = first_only[0].vars().unwrap();
    let got = [grad(&grads, v.lambda_d()), grad(&grads, v.lambda_b())];
    assert_eq!(got, lambda_grads(&all, &x, &target)[0]);
}

#[test]
fn freezing_a_trained_layer_keeps_its_trained_vectors() {
    let f = fixture();
    let (x, target) = (f.tensor("train.x"), f.tensor("train.target"));
    let layers = model(&f, DType::F32);
    sgd(&layers, &x, &target, 3, 0.05);
    let trained = layers[1].trained_adapter().unwrap();
    assert_ne!(&trained, layers[1].adapter(), "the step changed nothing");
    let frozen = layers[1].clone().freeze().unwrap();
    assert!(!frozen.is_trainable());
    assert_eq!(frozen.adapter(), &trained);
    assert_eq!(frozen.trained_adapter().unwrap(), trained);
    let h = f.tensor("layers.1.x");
    assert_eq!(flat(&frozen.forward(&h).unwrap()), flat(&layers[1].forward(&h).unwrap()));
    // Making a trainable layer trainable again keeps its Vars (and so what was trained).
    let again = layers[1].clone().into_trainable().unwrap();
    assert_eq!(again.trained_adapter().unwrap(), trained);
}

#[test]
fn a_layer_called_twice_sums_its_gradients_and_batch_dimensions_and_strides_work() {
    let f = fixture();
    let layer = f.trainable(0, DType::F32);
    let v = layer.vars().unwrap();
    let (x, dy) = (f.tensor("layers.0.x"), f.tensor("layers.0.dy")); // [T, 48], [T, 40]
    let t = x.dim(0).unwrap();
    let one = dot_loss(&layer.forward(&x).unwrap(), &dy).backward().unwrap();
    // The same rows as [2, T, 48] with the second copy's dy negated: the λ gradients cancel.
    let x3 = Tensor::stack(&[&x, &x], 0).unwrap();
    let dy3 = Tensor::stack(&[&dy, &dy.neg().unwrap()], 0).unwrap();
    let g3 = dot_loss(&layer.forward(&x3).unwrap(), &dy3).backward().unwrap();
    assert!(grad(&g3, v.lambda_b()).iter().all(|g| g.abs() <= 1e-5), "{:?}", grad(&g3, v.lambda_b()));
    // Two calls on one graph: candle adds the two backward results, twice the single call's.
    let twice = (dot_loss(&layer.forward(&x).unwrap(), &dy) + dot_loss(&layer.forward(&x).unwrap(), &dy)).unwrap();
    let g2 = twice.backward().unwrap();
    let doubled: Vec<f32> = grad(&one, v.lambda_d()).iter().map(|g| 2.0 * g).collect();
    assert_eq!(grad(&g2, v.lambda_d()), doubled);
    // A transposed (non-contiguous) input: its gradient lands in the transposed Var.
    let xt = var(&x.t().unwrap().contiguous().unwrap()); // [48, T]
    let gt = dot_loss(&layer.forward(&xt.t().unwrap()).unwrap(), &dy).backward().unwrap();
    let dxt = flat(&gt.get(&xt).unwrap().t().unwrap());
    let xv = var(&x);
    let g = dot_loss(&layer.forward(&xv).unwrap(), &dy).backward().unwrap();
    assert_eq!(gt.get(&xt).unwrap().dims(), &[48, t]);
    assert!(rel_err(&dxt, &grad(&g, &xv)) <= 1e-6);
}

#[test]
fn the_adapter_bias_is_a_var_whose_gradient_is_the_sum_of_dy() {
    let f = fixture();
    let base = f.layer(0, DType::F32).base().clone();
    let a = f.adapter.module("layers.0").unwrap().adapter().clone().with_bias(vec![0.25; 40]).unwrap();
    let layer = VeraLinear::new(base, a.clone(), f.projections.clone()).unwrap().into_trainable().unwrap();
    let v = layer.vars().unwrap();
    assert_eq!(layer.trainable_vars().len(), 3);
    let (x, dy) = (f.tensor("layers.0.x"), f.tensor("layers.0.dy"));
    let grads = dot_loss(&layer.forward(&x).unwrap(), &dy).backward().unwrap();
    // What the fused backward gives for the bias: Σ_t dy.
    let (t, r) = (x.dim(0).unwrap(), a.rank());
    let (mut dld, mut dlb, mut db) = (vec![0.0; r], vec![0.0; 40], vec![0.0; 40]);
    let (xs, dys) = (f.values("layers.0.x"), f.values("layers.0.dy"));
    let g = Gradients::new(&mut dld, &mut dlb).with_bias(&mut db);
    let (xm, dym) = (MatRef::from_slice(&xs, t, 48).unwrap(), MatRef::from_slice(&dys, t, 40).unwrap());
    backward(f.projections.f32(), &a, xm, dym, None, g, Mode::Overwrite).unwrap();
    assert_eq!(grad(&grads, v.bias().unwrap()), db);
    assert_eq!(grad(&grads, v.lambda_d()), dld);
    assert_eq!(grad(&grads, v.lambda_b()), dlb);
    // The forward includes the bias: 0.25 more than the same layer without it.
    let plain = f.trainable(0, DType::F32).forward(&x).unwrap();
    let diff = flat(&(layer.forward(&x).unwrap() - plain).unwrap());
    assert!(diff.iter().all(|d| (d - 0.25).abs() <= 1e-5));
    // An SGD step moves the bias by -lr·Σ_t dy.
    let mut opt = SGD::new(layer.trainable_vars(), 0.5).unwrap();
    opt.backward_step(&dot_loss(&layer.forward(&x).unwrap(), &dy)).unwrap();
    let stepped: Vec<f32> = db.iter().map(|g| 0.25 - 0.5 * g).collect();
    assert!(rel_err(layer.trained_adapter().unwrap().bias().unwrap(), &stepped) <= 1e-6);
}

#[test]
fn trained_layers_export_to_a_peft_adapter_that_loads_back() {
    let f = fixture();
    let (x, target) = (f.tensor("train.x"), f.tensor("train.target"));
    let layers = model(&f, DType::F32);
    sgd(&layers, &x, &target, 2, 0.05);
    let names: Vec<String> = (0..LAYERS).map(|l| format!("layers.{l}")).collect();
    let named = || names.iter().map(String::as_str).zip(&layers);
    let exported = to_peft_adapter(f.adapter.config(), named()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    exported.save(dir.path()).unwrap();
    let loaded = PeftAdapter::load(dir.path()).unwrap();
    assert_eq!(loaded, exported);
    for (name, layer) in named() {
        assert_eq!(loaded.module(name).unwrap().adapter(), &layer.trained_adapter().unwrap());
        assert_ne!(loaded.module(name).unwrap().adapter(), f.adapter.module(name).unwrap().adapter());
    }
    // Without the projections: the fixture's are seed 0's, so PEFT (and we) draw them back.
    let mut config = f.adapter.config().clone();
    config.save_projection = false;
    let unsaved = to_peft_adapter(&config, named()).unwrap();
    assert!(unsaved.saved_projections().is_none());
    let sizes = ProjectionSizes { n_max: 64, m_max: 64 };
    assert_eq!(&unsaved.projections::<f32>(Some(sizes)).unwrap(), f.projections.f32());
}

#[test]
fn misuse_is_a_candle_error() {
    let f = fixture();
    let dev = &Device::Cpu;
    let layer = f.trainable(0, DType::F32);
    let config = f.adapter.config();
    let err = |r: candle_core::Result<PeftAdapter>| r.unwrap_err().to_string();

    // The training path checks its input as the inference path does.
    let e = layer.forward(&Tensor::zeros((2, 47), DType::F32, dev).unwrap()).unwrap_err().to_string();
    assert!(e.contains("[2, 47], expected [..., 48]"), "{e}");
    let e = layer.adapter_forward(&Tensor::zeros((2, 47), DType::F32, dev).unwrap()).unwrap_err().to_string();
    assert!(e.contains("[..., 48]"), "{e}");
    let e = layer.adapter_forward(&Tensor::zeros((2, 48), DType::F64, dev).unwrap()).unwrap_err().to_string();
    assert!(e.contains("F64") && e.contains("f32, f16 or bf16"), "{e}");

    // Export: no layers, one name twice, a layer with an adapter bias.
    assert!(err(to_peft_adapter(config, [])).contains("no layers"));
    let e = err(to_peft_adapter(config, [("layers.0", &layer), ("layers.0", &layer)]));
    assert!(e.contains("two layers are named \"layers.0\""), "{e}");
    let biased = VeraLinear::new(
        layer.base().clone(),
        layer.adapter().clone().with_bias(vec![0.0; 40]).unwrap(),
        f.projections.clone(),
    )
    .unwrap();
    assert!(err(to_peft_adapter(config, [("layers.0", &biased)])).contains("adapter bias"));
    // A module the config does not target; a config of another rank.
    let e = err(to_peft_adapter(config, [("layers.9", &layer)]));
    assert!(e.contains("target_modules"), "{e}");
    let mut r8 = config.clone();
    r8.r = 8;
    let e = err(to_peft_adapter(&r8, [("layers.0", &layer)]));
    assert!(e.contains("rank 16, the config's r is 8"), "{e}");
    // Layers on different projections; projections that are not the seed's, left unsaved.
    let other = Arc::new(VeraProjections::new(Projections::from_seed(1, 16, 64, 64).unwrap()));
    let on_other = VeraLinear::new(layer.base().clone(), layer.adapter().clone(), other).unwrap();
    let e = err(to_peft_adapter(config, [("layers.0", &layer), ("layers.1", &on_other)]));
    assert!(e.contains("other projections"), "{e}");
    let mut unsaved = config.clone();
    unsaved.save_projection = false;
    let e = err(to_peft_adapter(&unsaved, [("layers.0", &on_other)]));
    assert!(e.contains("projection_prng_key = 0") && e.contains("save_projection = false"), "{e}");
}
