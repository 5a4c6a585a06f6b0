//! `VeraLinear` (feature `candle`) against PEFT's outputs on both fixtures and against candle's own
//! unfused computation (two matmuls and two broadcast multiplies) in f32, f16 and bf16.
//!
//! Run with `cargo test --release --features candle --test candle_vera`.
#![cfg(feature = "candle")]

mod common;

use std::sync::Arc;

use candle_core::{DType, Device, Tensor, D};
use candle_nn::{Linear, Module};
use common::fixture_dir;
use vera_kernels::candle::{VeraLinear, VeraProjections};
use vera_kernels::peft::{PeftAdapter, ProjectionSizes, TensorFile};
use vera_kernels::{Adapter, Projections};

const FIXTURES: [&str; 2] = ["peft-vera-mlp", "peft-vera-mlp-seeded"];
const SIZES_64: ProjectionSizes = ProjectionSizes { n_max: 64, m_max: 64 };

struct Fixture {
    adapter: PeftAdapter,
    projections: Arc<VeraProjections>,
    reference: TensorFile,
}

fn fixture(name: &str) -> Fixture {
    let adapter = PeftAdapter::load(fixture_dir(name).join("adapter")).unwrap();
    let sizes = name.ends_with("seeded").then_some(SIZES_64);
    let projections = Arc::new(VeraProjections::from_peft(&adapter, sizes).unwrap());
    let reference = TensorFile::read(fixture_dir(name).join("reference.safetensors")).unwrap();
    Fixture { adapter, projections, reference }
}

impl Fixture {
    fn tensor(&self, key: &str) -> Tensor {
        let t = self.reference.tensor(key).unwrap();
        Tensor::from_vec(t.data().to_vec(), t.shape(), &Device::Cpu).unwrap()
    }

    /// The base model's layers.l in `dtype`, wrapped with the adapter's module.
    fn layer(&self, l: usize, dtype: DType) -> VeraLinear {
        let base = Linear::new(
            self.tensor(&format!("layers.{l}.weight")).to_dtype(dtype).unwrap(),
            Some(self.tensor(&format!("layers.{l}.bias")).to_dtype(dtype).unwrap()),
        );
        VeraLinear::from_peft(base, &self.adapter, &format!("layers.{l}"), self.projections.clone()).unwrap()
    }
}

/// max |a - b| / max |b|, in f32.
fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    let (a, b) = (a.to_dtype(DType::F32).unwrap(), b.to_dtype(DType::F32).unwrap());
    assert_eq!(a.dims(), b.dims());
    let err = (&a - &b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    let scale = b.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    err / scale.max(f32::MIN_POSITIVE)
}

#[test]
fn fixtures_are_reproduced_in_f32() {
    for name in FIXTURES {
        let f = fixture(name);
        for l in 0..3 {
            let layer = f.layer(l, DType::F32);
            let x = f.tensor(&format!("layers.{l}.x"));
            let e = rel_err(&layer.forward(&x).unwrap(), &f.tensor(&format!("layers.{l}.y")));
            assert!(e <= 1e-5, "{name} layers.{l} y: {e:e}");
            let e = rel_err(&layer.adapter_forward(&x).unwrap(), &f.tensor(&format!("layers.{l}.adapter_y")));
            assert!(e <= 1e-5, "{name} layers.{l} adapter_y: {e:e}");
        }
    }
}

/// candle's own unfused VeRA layer in `dtype`: `x·Wᵀ + b + lambda_b ⊙ ((lambda_d ⊙ (x·Aᵀ))·Bᵀ)`
/// with the projections sliced and rounded to `dtype`.
fn candle_unfused(
    x: &Tensor,
    base: &Linear,
    projections: &Projections<f32>,
    adapter: &Adapter,
    dtype: DType,
) -> Tensor {
    let dev = &Device::Cpu;
    let (m, n) = base.weight().dims2().unwrap();
    let r = projections.rank();
    let to = |v: Vec<f32>, shape: &[usize]| Tensor::from_vec(v, shape, dev).unwrap().to_dtype(dtype).unwrap();
    let a = to(projections.a().to_vec(), &[r, projections.n_max()]).narrow(1, 0, n).unwrap();
    let b = to(projections.b().to_vec(), &[projections.m_max(), r]).narrow(0, 0, m).unwrap();
    let lambda_d = to(adapter.lambda_d().to_vec(), &[r]);
    let lambda_b = to(adapter.lambda_b().to_vec(), &[m]);
    let x2 = x.flatten_to(D::Minus2).unwrap();
    let h = x2.matmul(&a.t().unwrap()).unwrap();
    let v = h.broadcast_mul(&lambda_d).unwrap().matmul(&b.t().unwrap()).unwrap();
    let adapter_out = v.broadcast_mul(&lambda_b).unwrap();
    let mut dims = x.dims().to_vec();
    *dims.last_mut().unwrap() = m;
    (base.forward(&x2).unwrap() + adapter_out).unwrap().reshape(dims).unwrap()
}

#[test]
fn matches_candles_unfused_computation_in_every_dtype() {
    for name in FIXTURES {
        let f = fixture(name);
        for (dtype, tol) in [(DType::F32, 1e-5), (DType::F16, 5e-3), (DType::BF16, 4e-2)] {
            for l in 0..3 {
                let layer = f.layer(l, dtype);
                // [2, 5, n]: the fixture's tokens and their negation, as a batch.
                let x = f.tensor(&format!("layers.{l}.x"));
                let x = Tensor::stack(&[&x, &x.neg().unwrap()], 0).unwrap().to_dtype(dtype).unwrap();
                let ours = layer.forward(&x).unwrap();
                assert_eq!(ours.dtype(), dtype);
                let theirs = candle_unfused(&x, layer.base(), f.projections.f32(), layer.adapter(), dtype);
                let e = rel_err(&ours, &theirs);
                assert!(e <= tol, "{name} layers.{l} {dtype:?}: {e:e}");
                // The adapter's part alone.
                let adapter_only = layer.adapter_forward(&x).unwrap();
                let base = layer.base().forward(&x).unwrap();
                let e = rel_err(&(adapter_only + base).unwrap(), &theirs);
                assert!(e <= 2.0 * tol, "{name} layers.{l} {dtype:?} adapter part: {e:e}");
            }
        }
    }
}

#[test]
fn batch_dimensions_and_strided_inputs() {
    let f = fixture("peft-vera-mlp");
    let layer = f.layer(0, DType::F32);
    let x = f.tensor("layers.0.x"); // [5, 48]
    let flat = layer.forward(&x).unwrap();
    // [5, 48] as [5, 1, 48].
    let y3 = layer.forward(&x.unsqueeze(1).unwrap()).unwrap();
    assert_eq!(y3.dims(), &[5, 1, 40]);
    assert_eq!(y3.squeeze(1).unwrap().to_vec2::<f32>().unwrap(), flat.to_vec2::<f32>().unwrap());
    // A single token as a 1-D tensor (candle's Linear wants 2-D, the adapter part takes it).
    let row = layer.adapter_forward(&x.get(2).unwrap()).unwrap();
    assert_eq!(row.dims(), &[40]);
    let adapter_rows = layer.adapter_forward(&x).unwrap();
    assert_eq!(row.to_vec1::<f32>().unwrap(), adapter_rows.get(2).unwrap().to_vec1::<f32>().unwrap());
    // A transposed (non-contiguous) view.
    let xt = x.t().unwrap().contiguous().unwrap().t().unwrap();
    assert!(!xt.is_contiguous());
    // The adapter part is bitwise the same; candle's own matmul on the strided view may round
    // differently in the base part.
    assert_eq!(layer.adapter_forward(&xt).unwrap().to_vec2::<f32>().unwrap(), adapter_rows.to_vec2::<f32>().unwrap());
    assert!(rel_err(&layer.forward(&xt).unwrap(), &flat) <= 1e-6);
    // No tokens at all.
    let empty = Tensor::zeros((0, 48), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(layer.forward(&empty).unwrap().dims(), &[0, 40]);
}

#[test]
fn misuse_is_a_candle_error() {
    let f = fixture("peft-vera-mlp");
    let layer = f.layer(0, DType::F32);
    let dev = &Device::Cpu;

    // f64 activations: the base Linear is f32, so use the adapter part alone.
    let x64 = Tensor::zeros((2, 48), DType::F64, dev).unwrap();
    let e = layer.adapter_forward(&x64).unwrap_err().to_string();
    assert!(e.contains("dtype") && e.contains("f32, f16 or bf16"), "{e}");
    // The wrong width.
    let x = Tensor::zeros((2, 47), DType::F32, dev).unwrap();
    let e = layer.adapter_forward(&x).unwrap_err().to_string();
    assert!(e.contains("[..., 48]"), "{e}");

    let weight = |m: usize, n: usize| Linear::new(Tensor::zeros((m, n), DType::F32, dev).unwrap(), None);
    let p = f.projections.clone();
    // A module on a Linear of another shape.
    let e = VeraLinear::from_peft(weight(64, 48), &f.adapter, "layers.0", p.clone()).unwrap_err().to_string();
    assert!(e.contains("lambda_b") && e.contains("expected length 64, got 40"), "{e}");
    // A layer wider than the projections.
    let e = VeraLinear::from_peft(weight(40, 65), &f.adapter, "layers.0", p.clone()).unwrap_err().to_string();
    assert!(e.contains("in_features = 65"), "{e}");
    // An adapter of another rank.
    let adapter = Adapter::new(vec![0.1; 8], vec![0.0; 40]).unwrap();
    let e = VeraLinear::new(weight(40, 48), adapter, p.clone()).unwrap_err().to_string();
    assert!(e.contains("rank 8"), "{e}");
    // An unknown module.
    let e = VeraLinear::from_peft(weight(40, 48), &f.adapter, "layers.5", p).unwrap_err().to_string();
    assert!(e.contains("no module \"layers.5\""), "{e}");
    // Unsaved projections without their sizes.
    let seeded = PeftAdapter::load(fixture_dir("peft-vera-mlp-seeded/adapter")).unwrap();
    let e = VeraProjections::from_peft(&seeded, None).unwrap_err().to_string();
    assert!(e.contains("n_max"), "{e}");
}

#[test]
fn one_projection_copy_serves_every_layer_and_dtype() {
    let f = fixture("peft-vera-mlp-seeded");
    assert_eq!(f.projections.f32(), &Projections::<f32>::from_seed(7, 16, 64, 64).unwrap());
    // Layers of different dtypes share the same VeraProjections; results do not depend on the
    // order in which the dtypes are first used.
    let x = f.tensor("layers.1.x");
    let first_bf16 = f.layer(1, DType::BF16).forward(&x.to_dtype(DType::BF16).unwrap()).unwrap();
    let _ = f.layer(1, DType::F16).forward(&x.to_dtype(DType::F16).unwrap()).unwrap();
    let again = f.layer(1, DType::BF16).forward(&x.to_dtype(DType::BF16).unwrap()).unwrap();
    assert_eq!(
        first_bf16.to_dtype(DType::F32).unwrap().to_vec2::<f32>().unwrap(),
        again.to_dtype(DType::F32).unwrap().to_vec2::<f32>().unwrap()
    );
}
