//! `VeraBankLinear` (feature `candle`): a bank of adapters in one candle layer, each row of a batch
//! naming its own. Row for row against `VeraLinear` with that row's adapter (bit for bit in f32,
//! f16 and bf16), rows without an adapter against the base layer, negative controls, PEFT's own
//! per-row outputs (`tests/fixtures/peft-vera-train/multi.safetensors`), the ids' dtypes and
//! shapes, misuse errors, and training through the fused mixed backward.
//!
//! Run with `cargo test --release --features candle --test candle_bank`.
#![cfg(feature = "candle")]

mod common;

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{Linear, Module, Optimizer, SGD};
use common::{fixture_dir, rel_err};
use vera_kernels::candle::{VeraBankLinear, VeraLinear, VeraProjections};
use vera_kernels::peft::PeftAdapters;
use vera_kernels::{backward_mixed, Adapter, AdapterBank, Gradients, MatMut, MatRef, Mode};

/// The fixture model's layer sizes: layers.l is `SIZES[l] -> SIZES[l + 1]`.
const SIZES: [usize; 4] = [48, 40, 64, 24];
const LAYERS: usize = 3;
const K: usize = 3;

struct Fixture {
    set: PeftAdapters,
    projections: Arc<VeraProjections>,
    tensors: HashMap<String, Tensor>,
}

fn fixture() -> Fixture {
    let set = PeftAdapters::load_saved(fixture_dir("peft-vera-train/multi")).unwrap();
    assert_eq!(set.names(), ["a0", "a1", "a2"]);
    let projections = Arc::new(VeraProjections::from_peft_adapters(&set, None).unwrap());
    let path = fixture_dir("peft-vera-train/multi.safetensors");
    let tensors = candle_core::safetensors::load(path, &Device::Cpu).unwrap();
    Fixture { set, projections, tensors }
}

impl Fixture {
    fn tensor(&self, key: &str) -> Tensor {
        self.tensors.get(key).unwrap_or_else(|| panic!("no {key} in the fixture")).clone()
    }

    /// layers.l's input `[18, n]`.
    fn x(&self, l: usize) -> Tensor {
        self.tensor(&format!("layers.{l}.x"))
    }

    /// layers.l's row → adapter map, int32 with -1 for no adapter.
    fn ids(&self, l: usize) -> Tensor {
        let ids = self.tensor(&format!("layers.{l}.row_adapter"));
        assert_eq!(ids.dtype(), DType::I32);
        ids
    }

    /// The bank layer of layers.l on `base`.
    fn bank_layer(&self, l: usize, base: Linear) -> VeraBankLinear {
        VeraBankLinear::from_peft(base, &self.set, &format!("layers.{l}"), self.projections.clone()).unwrap()
    }

    /// The one-adapter layer of adapter `k` on `base`.
    fn single(&self, l: usize, k: usize, base: Linear) -> VeraLinear {
        let adapter = &self.set.adapters()[k];
        VeraLinear::from_peft(base, adapter, &format!("layers.{l}"), self.projections.clone()).unwrap()
    }
}

/// A deterministic base layer `in_features -> out_features` in `dtype`, with a bias.
fn base_layer(n: usize, m: usize, dtype: DType) -> Linear {
    let values = |len: usize, step: f64| -> Tensor {
        let v: Vec<f32> = (0..len).map(|i| (0.1 * (i as f64 * step).sin()) as f32).collect();
        Tensor::from_vec(v, len, &Device::Cpu).unwrap().to_dtype(dtype).unwrap()
    };
    Linear::new(values(m * n, 0.37).reshape((m, n)).unwrap(), Some(values(m, 1.3)))
}

/// A base layer with zero weights and no bias: the layer's output is the adapters' alone.
fn zero_base(n: usize, m: usize) -> Linear {
    Linear::new(Tensor::zeros((m, n), DType::F32, &Device::Cpu).unwrap(), None)
}

/// Row `t` of a `[T, m]` tensor as f32 bits (exact for f16 and bf16).
fn row_bits(y: &Tensor, t: usize) -> Vec<u32> {
    let row: Vec<f32> = y.get(t).unwrap().to_dtype(DType::F32).unwrap().to_vec1().unwrap();
    row.iter().map(|v| v.to_bits()).collect()
}

fn to_vec<T: candle_core::WithDType>(t: &Tensor) -> Vec<T> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

/// The fixture's ids as i32 values.
fn id_values(ids: &Tensor) -> Vec<i32> {
    to_vec(ids)
}

/// The same ids as u32 (-1 → u32::MAX) and i64 tensors.
fn id_tensors(ids: &[i32]) -> [Tensor; 2] {
    let u: Vec<u32> = ids.iter().map(|&i| if i < 0 { u32::MAX } else { i as u32 }).collect();
    let i: Vec<i64> = ids.iter().map(|&i| i64::from(i)).collect();
    [Tensor::new(u.as_slice(), &Device::Cpu).unwrap(), Tensor::new(i.as_slice(), &Device::Cpu).unwrap()]
}

#[test]
fn each_row_is_vera_linear_with_its_adapter_bit_for_bit() {
    let f = fixture();
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        for l in 0..LAYERS {
            let (n, m) = (SIZES[l], SIZES[l + 1]);
            let base = base_layer(n, m, dtype);
            let layer = f.bank_layer(l, base.clone());
            let x = f.x(l).to_dtype(dtype).unwrap();
            let ids = id_values(&f.ids(l));
            assert!(ids.contains(&-1) && (0..K as i32).all(|k| ids.contains(&k)), "the fixture mixes every case");
            let y = layer.forward(&x, &f.ids(l)).unwrap();
            assert_eq!((y.dims(), y.dtype()), (&[ids.len(), m][..], dtype));
            // The ids as u32 and i64 give the same bits.
            for ids in id_tensors(&ids) {
                assert_eq!(
                    layer.forward(&x, &ids).unwrap().to_dtype(DType::F32).unwrap().to_vec2::<f32>().unwrap(),
                    y.to_dtype(DType::F32).unwrap().to_vec2::<f32>().unwrap(),
                    "{dtype:?} {:?} ids",
                    ids.dtype()
                );
            }
            let singles: Vec<Tensor> = (0..K).map(|k| f.single(l, k, base.clone()).forward(&x).unwrap()).collect();
            let base_y = base.forward(&x).unwrap();
            let adapter_y = layer.adapter_forward(&x, &f.ids(l)).unwrap();
            for (t, &id) in ids.iter().enumerate() {
                let want = match usize::try_from(id) {
                    Ok(k) => row_bits(&singles[k], t),
                    Err(_) => row_bits(&base_y, t),
                };
                assert_eq!(row_bits(&y, t), want, "{dtype:?} layers.{l} row {t} (adapter {id})");
                if id < 0 {
                    assert!(row_bits(&adapter_y, t).iter().all(|&b| b == 0), "{dtype:?} layers.{l} row {t}");
                } else {
                    let single = f.single(l, id as usize, base.clone()).adapter_forward(&x).unwrap();
                    assert_eq!(row_bits(&adapter_y, t), row_bits(&single, t), "{dtype:?} layers.{l} row {t}");
                }
            }
            // Negative control: every row given the next adapter no longer matches its own.
            let shifted: Vec<i64> =
                ids.iter().map(|&i| if i < 0 { -1 } else { i64::from((i + 1) % K as i32) }).collect();
            let y_shifted = layer.forward(&x, &Tensor::new(shifted.as_slice(), &Device::Cpu).unwrap()).unwrap();
            for (t, &id) in ids.iter().enumerate() {
                let own = usize::try_from(id).map_or_else(|_| row_bits(&base_y, t), |k| row_bits(&singles[k], t));
                assert_eq!(row_bits(&y_shifted, t) == own, id < 0, "{dtype:?} layers.{l} row {t}, shifted");
            }
        }
    }
}

#[test]
fn pefts_per_row_adapter_outputs_are_reproduced() {
    let f = fixture();
    for l in 0..LAYERS {
        let (n, m) = (SIZES[l], SIZES[l + 1]);
        let want = to_vec::<f32>(&f.tensor(&format!("layers.{l}.adapter_y")));
        let (x, ids) = (f.x(l), f.ids(l));
        // On a zero base layer the whole output is the adapters' part.
        let zero = f.bank_layer(l, zero_base(n, m));
        for (what, got) in
            [("forward", zero.forward(&x, &ids).unwrap()), ("adapter_forward", zero.adapter_forward(&x, &ids).unwrap())]
        {
            let got = to_vec::<f32>(&got);
            let e = rel_err(&got, &want);
            assert!(e <= 1e-5, "layers.{l} {what}: relative error {e:e}");
            // PEFT's rows without an adapter are zeros; so are ours.
            for (t, _) in id_values(&ids).iter().enumerate().filter(|(_, &i)| i < 0) {
                assert!(got[t * m..(t + 1) * m].iter().all(|&v| v.to_bits() == 0), "layers.{l} {what} row {t}");
            }
        }
        // With a real base layer, the adapters' part is what it adds.
        let layer = f.bank_layer(l, base_layer(n, m, DType::F32));
        let got = to_vec::<f32>(&layer.adapter_forward(&x, &ids).unwrap());
        assert!(rel_err(&got, &want) <= 1e-5, "layers.{l}");
        // Negative control: the ids shifted by one no longer reproduce PEFT.
        let shifted: Vec<i32> = id_values(&ids).iter().map(|&i| if i < 0 { i } else { (i + 1) % K as i32 }).collect();
        let shifted = Tensor::new(shifted.as_slice(), &Device::Cpu).unwrap();
        let e = rel_err(&to_vec::<f32>(&zero.forward(&x, &shifted).unwrap()), &want);
        assert!(e > 0.1, "layers.{l}: shifted ids still matched PEFT (relative error {e:e})");
    }
}

#[test]
fn ids_in_the_shape_of_x_and_batch_dimensions() {
    let f = fixture();
    let layer = f.bank_layer(0, base_layer(48, 40, DType::F32));
    let (x, ids) = (f.x(0), f.ids(0)); // [18, 48], [18]
    let flat = layer.forward(&x, &ids).unwrap();
    // x [3, 6, 48] with ids [18] or [3, 6].
    let x3 = x.reshape((3, 6, 48)).unwrap();
    let ids2 = ids.reshape((3, 6)).unwrap();
    for ids in [&ids, &ids2] {
        let y = layer.forward(&x3, ids).unwrap();
        assert_eq!(y.dims(), &[3, 6, 40]);
        assert_eq!(to_vec::<f32>(&y), to_vec::<f32>(&flat));
    }
    // Strided ids and x: a transposed view of a contiguous [6, 3] map.
    let ids_t = ids2.t().unwrap().contiguous().unwrap().t().unwrap();
    assert!(!ids_t.is_contiguous());
    assert_eq!(
        to_vec::<f32>(&layer.adapter_forward(&x3, &ids_t).unwrap()),
        to_vec::<f32>(&layer.adapter_forward(&x, &ids).unwrap())
    );
    // One token as a 1-D x, its id a scalar or [1].
    let row = x.get(4).unwrap();
    let id = ids.get(4).unwrap();
    let want = to_vec::<f32>(&layer.adapter_forward(&x, &ids).unwrap().get(4).unwrap());
    for id in [id.clone(), id.unsqueeze(0).unwrap()] {
        assert_eq!(to_vec::<f32>(&layer.adapter_forward(&row, &id).unwrap()), want);
    }
    // No tokens at all.
    let empty = Tensor::zeros((0, 48), DType::F32, &Device::Cpu).unwrap();
    let no_ids = Tensor::zeros(0, DType::U32, &Device::Cpu).unwrap();
    assert_eq!(layer.forward(&empty, &no_ids).unwrap().dims(), &[0, 40]);
}

#[test]
fn misuse_is_a_candle_error() {
    let f = fixture();
    let dev = &Device::Cpu;
    let layer = f.bank_layer(0, base_layer(48, 40, DType::F32));
    let x = f.x(0); // 18 rows
    let err = |ids: Tensor| {
        let forward = layer.forward(&x, &ids).unwrap_err().to_string();
        let adapter = layer.adapter_forward(&x, &ids).unwrap_err().to_string();
        assert_eq!(forward, adapter);
        forward
    };
    // Ids of a float or another integer dtype.
    for dtype in [DType::F32, DType::F64, DType::U8, DType::BF16] {
        let e = err(Tensor::zeros(18, dtype, dev).unwrap());
        assert!(e.contains("dtype") && e.contains("u32::MAX") && e.contains("i64"), "{dtype:?}: {e}");
    }
    // The wrong number of ids, or the right number in another shape.
    for shape in [vec![17], vec![19], vec![18, 1], vec![2, 9], vec![]] {
        let e = err(Tensor::zeros(shape.as_slice(), DType::I64, dev).unwrap());
        assert!(e.contains("shape") && e.contains("[18]"), "{shape:?}: {e}");
    }
    // Ids outside the bank: K or more, below -1 for the signed dtypes, u32's other large values.
    let with = |v: i64, dtype: DType| {
        let mut ids = vec![0i64; 18];
        ids[5] = v;
        Tensor::new(ids.as_slice(), dev).unwrap().to_dtype(dtype).unwrap()
    };
    for (v, dtype) in [
        (3, DType::I64),
        (-2, DType::I64),
        (i64::MIN, DType::I64),
        (i64::from(i32::MAX) + 1, DType::I64),
        (3, DType::I32),
        (-7, DType::I32),
        (3, DType::U32),
        (i64::from(u32::MAX) - 1, DType::U32),
    ] {
        let e = err(with(v, dtype));
        assert!(e.contains("row 5") && e.contains(&format!("id {v}")) && e.contains("holds 3 adapters"), "{v}: {e}");
    }
    // -1 in u32 is u32::MAX (no adapter); u32's 2^32 - 2 is not. And i64's u32::MAX is an id.
    assert!(layer.forward(&x, &with(i64::from(u32::MAX), DType::U32)).is_ok());
    let e = err(with(i64::from(u32::MAX), DType::I64));
    assert!(e.contains("or -1 for no adapter"), "{e}");
    // The wrong width, checked before the ids are.
    let x47 = Tensor::zeros((18, 47), DType::F32, dev).unwrap();
    let e = layer.forward(&x47, &f.ids(0)).unwrap_err().to_string();
    assert!(e.contains("[..., 48]"), "{e}");
    // f64 activations (the adapter part alone: the base Linear is f32).
    let e = layer.adapter_forward(&x.to_dtype(DType::F64).unwrap(), &f.ids(0)).unwrap_err().to_string();
    assert!(e.contains("f32, f16 or bf16"), "{e}");

    // Construction.
    let p = f.projections.clone();
    let a0 = f.set.adapters()[0].module("layers.0").unwrap().adapter().clone();
    let e = VeraBankLinear::from_peft(zero_base(48, 64), &f.set, "layers.0", p.clone()).unwrap_err().to_string();
    assert!(e.contains("lambda_b") && e.contains("expected length 64, got 40"), "{e}");
    let e = VeraBankLinear::from_peft(zero_base(65, 40), &f.set, "layers.0", p.clone()).unwrap_err().to_string();
    assert!(e.contains("in_features = 65"), "{e}");
    let e = VeraBankLinear::from_peft(zero_base(48, 40), &f.set, "layers.7", p.clone()).unwrap_err().to_string();
    assert!(e.contains("layers.7") && e.contains("a0"), "{e}");
    let e = VeraBankLinear::from_adapters(zero_base(48, 40), &[], p.clone()).unwrap_err().to_string();
    assert!(e.contains("at least one adapter"), "{e}");
    let rank8 = Adapter::new(vec![0.1; 8], vec![0.0; 40]).unwrap();
    let e = VeraBankLinear::from_adapters(zero_base(48, 40), std::slice::from_ref(&rank8), p.clone())
        .unwrap_err()
        .to_string();
    assert!(e.contains("rank 8"), "{e}");
    let e = VeraBankLinear::from_adapters(zero_base(48, 40), &[a0, rank8], p).unwrap_err().to_string();
    assert!(e.contains("rank"), "{e}");
}

#[test]
fn adapters_with_and_without_a_bias() {
    let f = fixture();
    let p = f.projections.clone();
    let adapters: Vec<Adapter> =
        (0..K).map(|k| f.set.adapters()[k].module("layers.1").unwrap().adapter().clone()).collect();
    // Adapter 1 has a bias, the others none.
    let bias: Vec<f32> = (0..64).map(|i| 0.01 * i as f32 - 0.3).collect();
    let adapters = vec![adapters[0].clone(), adapters[1].clone().with_bias(bias).unwrap(), adapters[2].clone()];
    for dtype in [DType::F32, DType::BF16] {
        let base = base_layer(40, 64, dtype);
        let layer = VeraBankLinear::from_adapters(base.clone(), &adapters, p.clone()).unwrap();
        assert_eq!(layer.num_adapters(), K);
        assert_eq!(layer.bank(), &AdapterBank::new(&adapters).unwrap());
        let (x, ids) = (f.x(1).to_dtype(dtype).unwrap(), f.ids(1));
        let y = layer.forward(&x, &ids).unwrap();
        for (t, &id) in id_values(&ids).iter().enumerate() {
            let want = match usize::try_from(id) {
                Ok(k) => VeraLinear::new(base.clone(), adapters[k].clone(), p.clone()).unwrap().forward(&x).unwrap(),
                Err(_) => base.forward(&x).unwrap(),
            };
            assert_eq!(row_bits(&y, t), row_bits(&want, t), "{dtype:?} row {t} (adapter {id})");
        }
    }
}

#[test]
fn the_cuda_device_is_a_clear_error_where_there_is_one() {
    // A CUDA tensor exists only where candle is built with CUDA and a GPU is present; there the
    // layer refuses it with an error naming the CPU, as VeraLinear does.
    let f = fixture();
    let layer = f.bank_layer(0, zero_base(48, 40));
    assert!(layer.forward(&f.x(0), &f.ids(0)).is_ok());
    if let Ok(dev) = Device::new_cuda(0) {
        let x = f.x(0).to_device(&dev).unwrap();
        let e = layer.forward(&x, &f.ids(0)).unwrap_err().to_string();
        assert!(e.contains("VeraBankLinear runs on the CPU only"), "{e}");
    }
}

// --- Training.

/// A deterministic output gradient `[t, m]`.
fn dy(t: usize, m: usize) -> Tensor {
    let v: Vec<f32> = (0..t * m).map(|i| (i as f32 * 0.71).cos()).collect();
    Tensor::from_vec(v, (t, m), &Device::Cpu).unwrap()
}

/// `sum(y ⊙ dy)` in f32: its gradient with respect to `y` is `dy`.
fn dot_loss(y: &Tensor, dy: &Tensor) -> Tensor {
    (y.to_dtype(DType::F32).unwrap() * dy).unwrap().sum_all().unwrap()
}

/// `backward_mixed` called directly, f32: (dlambda_d [K·r], dlambda_b [K·m], the adapters' dx).
fn direct_backward(f: &Fixture, bank: &AdapterBank, rows: &[i32], x: &[f32], dy: &[f32]) -> [Vec<f32>; 3] {
    let (r, m, k) = (bank.rank(), bank.out_features(), bank.len());
    let (t, n) = (rows.len(), x.len() / rows.len());
    let (mut dld, mut dlb, mut dx) = (vec![0.0; k * r], vec![0.0; k * m], vec![0.0; t * n]);
    let grads = Gradients::new(&mut dld, &mut dlb).with_x(MatMut::from_slice(&mut dx, t, n).unwrap());
    let (xv, dyv) = (MatRef::from_slice(x, t, n).unwrap(), MatRef::from_slice(dy, t, m).unwrap());
    backward_mixed(f.projections.f32(), bank, rows, xv, dyv, None, grads, Mode::Overwrite).unwrap();
    [dld, dlb, dx]
}

#[test]
fn the_gradients_are_the_fused_mixed_backward_bit_for_bit() {
    let f = fixture();
    for l in 0..LAYERS {
        let (n, m) = (SIZES[l], SIZES[l + 1]);
        let layer = f.bank_layer(l, base_layer(n, m, DType::F32)).into_trainable().unwrap();
        let vars = layer.vars().unwrap();
        assert_eq!((vars.lambda_d().dims(), vars.lambda_b().dims()), (&[K, 16][..], &[K, m][..]));
        assert!(vars.bias().is_none());
        let (x, ids) = (Var::from_tensor(&f.x(l)).unwrap(), f.ids(l));
        let rows = id_values(&ids);
        let dy = dy(rows.len(), m);
        // The adapters' part alone, so that dx is the fused backward's and nothing else.
        let grads = dot_loss(&layer.adapter_forward(&x, &ids).unwrap(), &dy).backward().unwrap();
        let got: Vec<Vec<f32>> = [vars.lambda_d().as_tensor(), vars.lambda_b().as_tensor(), x.as_tensor()]
            .map(|t| to_vec(grads.get(t).unwrap()))
            .into();
        let want = direct_backward(&f, layer.bank(), &rows, &to_vec(&f.x(l)), &to_vec(&dy));
        assert_eq!(got, want, "layers.{l}");
        // Through the whole layer, x's gradient adds the base layer's dy·W.
        let grads = dot_loss(&layer.forward(&x, &ids).unwrap(), &dy).backward().unwrap();
        assert_eq!(to_vec::<f32>(grads.get(vars.lambda_b()).unwrap()), want[1], "layers.{l}");
        let frozen_dx = dy.matmul(layer.base().weight()).unwrap();
        let e = rel_err(
            &to_vec(grads.get(&x).unwrap()),
            &to_vec(&(frozen_dx + Tensor::from_vec(want[2].clone(), x.shape(), &Device::Cpu).unwrap()).unwrap()),
        );
        assert!(e <= 1e-6, "layers.{l} dx: {e:e}");
    }
}

#[test]
fn each_adapters_gradient_is_its_own_rows_through_vera_linear() {
    // Adapter k's gradient in the bank is what a one-adapter layer gives on adapter k's rows alone
    // (up to the order of the sums over the rows).
    let f = fixture();
    let l = 2;
    let (n, m) = (SIZES[l], SIZES[l + 1]);
    let layer = f.bank_layer(l, zero_base(n, m)).into_trainable().unwrap();
    let (x, ids) = (f.x(l), f.ids(l));
    let rows = id_values(&ids);
    let dy = dy(rows.len(), m);
    let grads = dot_loss(&layer.forward(&x, &ids).unwrap(), &dy).backward().unwrap();
    let vars = layer.vars().unwrap();
    let (dld, dlb) = (grads.get(vars.lambda_d()).unwrap(), grads.get(vars.lambda_b()).unwrap());
    for k in 0..K {
        let mine: Vec<u32> = rows.iter().enumerate().filter(|(_, &i)| i == k as i32).map(|(t, _)| t as u32).collect();
        let pick = Tensor::new(mine.as_slice(), &Device::Cpu).unwrap();
        let single = f.single(l, k, zero_base(n, m)).into_trainable().unwrap();
        let y = single.forward(&x.index_select(&pick, 0).unwrap()).unwrap();
        let g = dot_loss(&y, &dy.index_select(&pick, 0).unwrap()).backward().unwrap();
        let sv = single.vars().unwrap();
        for (what, bank_grad, want) in [
            ("lambda_d", dld.get(k).unwrap(), g.get(sv.lambda_d()).unwrap()),
            ("lambda_b", dlb.get(k).unwrap(), g.get(sv.lambda_b()).unwrap()),
        ] {
            let e = rel_err(&to_vec(&bank_grad), &to_vec(want));
            assert!(e <= 1e-6, "adapter {k} {what}: relative error {e:e}");
        }
    }
}

#[test]
fn sgd_trains_only_the_adapters_in_the_batch_and_freeze_keeps_the_result() {
    let f = fixture();
    let l = 1;
    let (n, m) = (SIZES[l], SIZES[l + 1]);
    let adapters: Vec<Adapter> =
        (0..K).map(|k| f.set.adapters()[k].module("layers.1").unwrap().adapter().clone()).collect();
    let bias: Vec<f32> = vec![0.05; m];
    // Adapter 0 has a bias; adapter 2 gets no row.
    let adapters = vec![adapters[0].clone().with_bias(bias.clone()).unwrap(), adapters[1].clone(), adapters[2].clone()];
    let layer = VeraBankLinear::from_adapters(base_layer(n, m, DType::F32), &adapters, f.projections.clone())
        .unwrap()
        .into_trainable()
        .unwrap();
    assert_eq!(layer.trainable_vars().len(), 3);
    let x = f.x(l);
    let rows: Vec<i64> = (0..18).map(|t| [0, 1, -1][t % 3]).collect();
    let ids = Tensor::new(rows.as_slice(), &Device::Cpu).unwrap();
    let target = Tensor::zeros((18, m), DType::F32, &Device::Cpu).unwrap();
    let loss = |layer: &VeraBankLinear| candle_nn::loss::mse(&layer.forward(&x, &ids).unwrap(), &target).unwrap();
    let mut sgd = SGD::new(layer.trainable_vars(), 0.5).unwrap();
    let before = loss(&layer).to_scalar::<f32>().unwrap();
    for _ in 0..3 {
        sgd.backward_step(&loss(&layer)).unwrap();
    }
    assert!(loss(&layer).to_scalar::<f32>().unwrap() < before);
    let trained = layer.trained_bank().unwrap();
    for (k, old) in adapters.iter().enumerate() {
        let new = trained.adapter(k).unwrap();
        assert_eq!(old.bias().is_some(), new.bias().is_some(), "adapter {k} keeps (or lacks) its bias");
        assert_eq!(old == &new, k == 2, "adapter {k}: trained exactly when it has rows");
    }
    assert_ne!(trained.adapter(0).unwrap().bias().unwrap(), bias.as_slice());
    // The biases' rows of the adapters without one stay zero.
    let bias_var = to_vec::<f32>(layer.vars().unwrap().bias().unwrap().as_tensor());
    assert!(bias_var[m..].iter().all(|&v| v == 0.0));
    // Frozen with the trained values: the same outputs, no graph.
    let y_trained = layer.forward(&x, &ids).unwrap();
    let frozen = layer.clone().freeze().unwrap();
    assert!(!frozen.is_trainable() && frozen.trainable_vars().is_empty());
    assert_eq!(frozen.bank(), &trained);
    let y_frozen = frozen.forward(&x, &ids).unwrap();
    assert!(!y_frozen.track_op());
    assert_eq!(to_vec::<f32>(&y_frozen), to_vec::<f32>(&y_trained));
}

#[test]
fn a_frozen_layer_passes_the_gradient_through() {
    let f = fixture();
    let l = 0;
    let (n, m) = (SIZES[l], SIZES[l + 1]);
    let layer = f.bank_layer(l, base_layer(n, m, DType::F32));
    let (x, ids) = (f.x(l), f.ids(l));
    // A constant input builds no graph; the same input as a Var gets its gradient.
    assert!(!layer.forward(&x, &ids).unwrap().track_op());
    let xv = Var::from_tensor(&x).unwrap();
    let y = layer.forward(&xv, &ids).unwrap();
    assert_eq!(to_vec::<f32>(&y), to_vec::<f32>(&layer.forward(&x, &ids).unwrap()));
    let dy = dy(18, m);
    let grads = dot_loss(&y, &dy).backward().unwrap();
    let rows = id_values(&ids);
    let want = direct_backward(&f, layer.bank(), &rows, &to_vec(&x), &to_vec(&dy));
    let want_dx = (dy.matmul(layer.base().weight()).unwrap()
        + Tensor::from_vec(want[2].clone(), (18, n), &Device::Cpu).unwrap())
    .unwrap();
    assert!(rel_err(&to_vec(grads.get(&xv).unwrap()), &to_vec(&want_dx)) <= 1e-6);
}
