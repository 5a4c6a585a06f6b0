//! The `peft` module against the PEFT fixtures: loading both adapters (saved and seeded
//! projections), reproducing PEFT's outputs, ΔW and merged weights through the loaded adapter,
//! `fan_in_fan_out` merging, and save → load round trips in every dtype.

mod common;

use std::collections::BTreeMap;

use common::{fixture_dir, read_f32_tensors, rel_err};
use vera_kernels::peft::{
    lambda_b_key, lambda_d_key, PeftAdapter, ProjectionSizes, TargetModules, Tensor, TensorFile, VeraBias, VeraConfig,
    VeraModule, CONFIG_FILE, VERA_A_KEY, VERA_B_KEY, WEIGHTS_FILE,
};
use vera_kernels::{bf16, delta_weight, f16, forward, DType, Element, MatMut, MatRef, Mode, Projections};

/// Layer sizes of the fixture model: layers.l maps SIZES[l] -> SIZES[l + 1].
const SIZES: [usize; 4] = [48, 40, 64, 24];
const SIZES_64: ProjectionSizes = ProjectionSizes { n_max: 64, m_max: 64 };
const TOL: f64 = 1e-5;

type Tensors = std::collections::HashMap<String, (Vec<usize>, Vec<f32>)>;

fn load(name: &str) -> PeftAdapter {
    PeftAdapter::load(fixture_dir(name).join("adapter")).unwrap()
}

/// The projections each fixture needs: saved in the file, or regenerated from the seed.
fn sizes_for(name: &str) -> Option<ProjectionSizes> {
    (name == "peft-vera-mlp-seeded").then_some(SIZES_64)
}

#[test]
fn fixtures_load_with_their_config() {
    let saved = load("peft-vera-mlp");
    let c = saved.config();
    assert_eq!((c.r, c.projection_prng_key, c.save_projection), (16, 0, true));
    assert_eq!((c.d_initial, c.vera_dropout, c.fan_in_fan_out, c.bias), (0.1, 0.0, false, VeraBias::None));
    assert_eq!(c.target_modules, TargetModules::Names(vec!["layers.2".into(), "layers.0".into(), "layers.1".into()]));
    assert_eq!(c.field("peft_version").as_deref(), Some("\"0.21.2\""));
    assert_eq!(saved.modules().keys().collect::<Vec<_>>(), ["layers.0", "layers.1", "layers.2"]);
    for (l, module) in saved.modules().values().enumerate() {
        assert_eq!((module.rank(), module.out_features()), (16, SIZES[l + 1]));
        assert_eq!((module.lambda_d().dtype(), module.lambda_b().dtype()), (DType::F32, DType::F32));
        assert_eq!(module.parameter_count(), 16 + SIZES[l + 1]);
    }
    assert_eq!(saved.parameter_count(), 3 * 16 + 40 + 64 + 24);
    assert_eq!(saved.projection_sizes(), Some(SIZES_64));
    let (a, b) = saved.saved_projections().unwrap();
    assert_eq!((a.shape(), b.shape()), (&[16, 64][..], &[64, 16][..]));

    let seeded = load("peft-vera-mlp-seeded");
    let c = seeded.config();
    assert_eq!((c.r, c.projection_prng_key, c.save_projection), (16, 7, false));
    assert!(seeded.saved_projections().is_none() && seeded.projection_sizes().is_none());
    assert_eq!(seeded.modules().len(), 3);
}

#[test]
fn saved_projections_are_the_files_bits_and_the_seeds_draw() {
    let adapter = load("peft-vera-mlp");
    let file = read_f32_tensors(&fixture_dir("peft-vera-mlp/adapter").join(WEIGHTS_FILE));
    let p = adapter.projections::<f32>(None).unwrap();
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(p.as_slices().0), bits(&file[VERA_A_KEY].1));
    assert_eq!(bits(p.as_slices().1), bits(&file[VERA_B_KEY].1));
    // Giving the (matching) sizes is allowed, and PEFT's seed 0 draws the same projections.
    assert_eq!(adapter.projections::<f32>(Some(SIZES_64)).unwrap(), p);
    assert_eq!(Projections::<f32>::from_seed(0, 16, 64, 64).unwrap(), p);
    // Narrower dtypes are the f32 values rounded.
    let p16 = adapter.projections::<f16>(None).unwrap();
    assert_eq!(p16, p.to_dtype::<f16>());
}

/// Reproduces every output of a fixture through a loaded adapter, in f32.
fn check_fixture(name: &str) {
    let adapter = load(name);
    let projections = adapter.projections::<f32>(sizes_for(name)).unwrap();
    let reference = read_f32_tensors(&fixture_dir(name).join("reference.safetensors"));
    for l in 0..3 {
        let (n, m) = (SIZES[l], SIZES[l + 1]);
        let module = adapter.module(&format!("layers.{l}")).unwrap();
        let get = |k: &str| &reference[&format!("layers.{l}.{k}")].1;
        let x = get("x");
        let t = x.len() / n;

        let mut y = vec![f32::NAN; t * m];
        forward(
            &projections,
            module.adapter(),
            MatRef::from_slice(x, t, n).unwrap(),
            MatMut::from_slice(&mut y, t, m).unwrap(),
            Mode::Overwrite,
        )
        .unwrap();
        let e = rel_err(&y, get("adapter_y"));
        assert!(e <= TOL, "{name} layers.{l} adapter_y: {e:e}");

        let mut dw = vec![0.0f32; m * n];
        delta_weight(&projections, module.adapter(), MatMut::from_slice(&mut dw, m, n).unwrap()).unwrap();
        let e = rel_err(&dw, get("delta_weight"));
        assert!(e <= TOL, "{name} layers.{l} delta_weight: {e:e}");

        let mut w = get("weight").clone();
        let name_l = format!("layers.{l}");
        adapter.merge_module(&projections, &name_l, MatMut::from_slice(&mut w, m, n).unwrap()).unwrap();
        let e = rel_err(&w, get("merged_weight"));
        assert!(e <= TOL, "{name} layers.{l} merged_weight: {e:e}");
        adapter.unmerge_module(&projections, &name_l, MatMut::from_slice(&mut w, m, n).unwrap()).unwrap();
        let e = rel_err(&w, get("weight"));
        assert!(e <= TOL, "{name} layers.{l} unmerged: {e:e}");
    }
}

#[test]
fn saved_projection_fixture_is_reproduced_through_the_loader() {
    check_fixture("peft-vera-mlp");
}

#[test]
fn seeded_fixture_is_reproduced_through_the_loader() {
    check_fixture("peft-vera-mlp-seeded");
}

#[test]
fn half_precision_forward_stays_close_to_peft() {
    // Not PEFT's own half-precision numbers (the fixtures are f32), but the loaded adapter drives the
    // f16 / bf16 kernels with the projections rounded to the activation dtype, as PEFT casts them.
    fn run<T: Element>(tol: f64) {
        for name in ["peft-vera-mlp", "peft-vera-mlp-seeded"] {
            let adapter = load(name);
            let projections = adapter.projections::<T>(sizes_for(name)).unwrap();
            let reference = read_f32_tensors(&fixture_dir(name).join("reference.safetensors"));
            for l in 0..3 {
                let (n, m) = (SIZES[l], SIZES[l + 1]);
                let x: Vec<T> = reference[&format!("layers.{l}.x")].1.iter().map(|&v| T::from_f32(v)).collect();
                let t = x.len() / n;
                let mut y = vec![T::default(); t * m];
                let module = adapter.module(&format!("layers.{l}")).unwrap();
                forward(
                    &projections,
                    module.adapter(),
                    MatRef::from_slice(&x, t, n).unwrap(),
                    MatMut::from_slice(&mut y, t, m).unwrap(),
                    Mode::Overwrite,
                )
                .unwrap();
                let y: Vec<f32> = y.iter().map(|v| v.to_f32()).collect();
                let e = rel_err(&y, &reference[&format!("layers.{l}.adapter_y")].1);
                assert!(e <= tol, "{name} layers.{l} {:?}: {e:e}", T::DTYPE);
            }
        }
    }
    run::<f16>(1e-2);
    run::<bf16>(5e-2);
}

/// The saved fixture with `fan_in_fan_out = true`: its base weights are stored `[in, out]`.
fn fan_in_fan_out_adapter() -> PeftAdapter {
    let adapter = load("peft-vera-mlp");
    let mut config = adapter.config().clone();
    config.fan_in_fan_out = true;
    let (a, b) = adapter.saved_projections().unwrap();
    PeftAdapter::new(config, adapter.modules().clone(), Some((a.clone(), b.clone()))).unwrap()
}

fn transpose<T: Copy>(w: &[T], rows: usize, cols: usize) -> Vec<T> {
    (0..cols).flat_map(|j| (0..rows).map(move |i| w[i * cols + j])).collect()
}

#[test]
fn fan_in_fan_out_merges_the_transposed_weight() {
    let plain = load("peft-vera-mlp");
    let conv1d = fan_in_fan_out_adapter();
    let reference = read_f32_tensors(&fixture_dir("peft-vera-mlp/reference.safetensors"));
    fn check<T: Element>(plain: &PeftAdapter, conv1d: &PeftAdapter, reference: &Tensors) {
        let projections = plain.projections::<T>(None).unwrap();
        for l in 0..3 {
            let (n, m) = (SIZES[l], SIZES[l + 1]);
            let module = format!("layers.{l}");
            let w: Vec<T> = reference[&format!("layers.{l}.weight")].1.iter().map(|&v| T::from_f32(v)).collect();
            let mut merged = w.clone();
            plain.merge_module(&projections, &module, MatMut::from_slice(&mut merged, m, n).unwrap()).unwrap();
            // Conv1D layout: [in, out].
            let mut wt = transpose(&w, m, n);
            conv1d.merge_module(&projections, &module, MatMut::from_slice(&mut wt, n, m).unwrap()).unwrap();
            assert_eq!(transpose(&wt, n, m), merged, "{module} {:?}", T::DTYPE);
            conv1d.unmerge_module(&projections, &module, MatMut::from_slice(&mut wt, n, m).unwrap()).unwrap();
            let mut unmerged = merged.clone();
            plain.unmerge_module(&projections, &module, MatMut::from_slice(&mut unmerged, m, n).unwrap()).unwrap();
            assert_eq!(transpose(&wt, n, m), unmerged, "{module} {:?}", T::DTYPE);
            if T::DTYPE == DType::F32 {
                let merged: Vec<f32> = merged.iter().map(|v| v.to_f32()).collect();
                let e = rel_err(&merged, &reference[&format!("layers.{l}.merged_weight")].1);
                assert!(e <= TOL, "{module}: {e:e}");
            }
        }
    }
    check::<f32>(&plain, &conv1d, &reference);
    check::<f16>(&plain, &conv1d, &reference);
    check::<bf16>(&plain, &conv1d, &reference);

    // A [out, in] weight given to the Conv1D adapter is the wrong shape for it.
    let projections = plain.projections::<f32>(None).unwrap();
    let mut w = vec![0.0f32; 40 * 48];
    assert!(conv1d.merge_module(&projections, "layers.0", MatMut::from_slice(&mut w, 40, 48).unwrap()).is_err());
}

/// Every key, dtype, shape and value of two safetensors files.
fn file_contents(path: &std::path::Path) -> BTreeMap<String, Tensor> {
    let file = TensorFile::read(path).unwrap();
    file.keys().map(|k| (k.to_string(), file.tensor(k).unwrap())).collect()
}

#[test]
fn saving_a_loaded_fixture_rewrites_peft_files() {
    for name in ["peft-vera-mlp", "peft-vera-mlp-seeded"] {
        let src = fixture_dir(name).join("adapter");
        let adapter = PeftAdapter::load(&src).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("saved");
        adapter.save(&out).unwrap();
        assert_eq!(PeftAdapter::load(&out).unwrap(), adapter);
        // Same tensors, bit for bit, under the same keys, and the same header metadata.
        assert_eq!(file_contents(&out.join(WEIGHTS_FILE)), file_contents(&src.join(WEIGHTS_FILE)));
        let meta = TensorFile::read(out.join(WEIGHTS_FILE)).unwrap().metadata().cloned();
        assert_eq!(meta, TensorFile::read(src.join(WEIGHTS_FILE)).unwrap().metadata().cloned());
        // safetensors orders tensors the same way in Python and Rust: the files are identical.
        assert_eq!(std::fs::read(out.join(WEIGHTS_FILE)).unwrap(), std::fs::read(src.join(WEIGHTS_FILE)).unwrap());
        // The config is PEFT's, field for field (PEFT writes sorted keys, two-space indent).
        let ours: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join(CONFIG_FILE)).unwrap()).unwrap();
        let peft: serde_json::Value = serde_json::from_slice(&std::fs::read(src.join(CONFIG_FILE)).unwrap()).unwrap();
        assert_eq!(ours, peft, "{name}");
        assert_eq!(
            std::fs::read_to_string(out.join(CONFIG_FILE)).unwrap(),
            std::fs::read_to_string(src.join(CONFIG_FILE)).unwrap()
        );
        // Nothing but the two files (no temporary files left).
        let mut names: Vec<_> = std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().file_name()).collect();
        names.sort();
        assert_eq!(names, [CONFIG_FILE, WEIGHTS_FILE]);
    }
}

#[test]
fn adapters_round_trip_in_every_dtype() {
    let fixture = load("peft-vera-mlp");
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        // A new adapter, built in memory: lambdas and projections stored in `dtype`.
        let modules: BTreeMap<String, VeraModule> = fixture
            .modules()
            .iter()
            .map(|(k, m)| {
                let module = VeraModule::new(m.lambda_d().to_dtype(dtype), m.lambda_b().to_dtype(dtype)).unwrap();
                (k.clone(), module)
            })
            .collect();
        let (a, b) = fixture.saved_projections().unwrap();
        let names = TargetModules::Names(modules.keys().cloned().collect());
        for save_projection in [true, false] {
            let mut config = VeraConfig::new(16, 0, names.clone());
            config.save_projection = save_projection;
            config.d_initial = 0.25;
            config.bias = VeraBias::VeraOnly;
            let projections = save_projection.then(|| (a.to_dtype(dtype), b.to_dtype(dtype)));
            let adapter = PeftAdapter::new(config, modules.clone(), projections).unwrap();
            let dir = tempfile::tempdir().unwrap();
            adapter.save(dir.path()).unwrap();
            let loaded = PeftAdapter::load(dir.path()).unwrap();
            assert_eq!(loaded, adapter, "{dtype} save_projection={save_projection}");
            for (key, t) in file_contents(&dir.path().join(WEIGHTS_FILE)) {
                assert_eq!(t.dtype(), dtype, "{key}");
            }
            let bits = |t: &Tensor| t.data().iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            for (name, module) in adapter.modules() {
                let other = loaded.module(name).unwrap();
                assert_eq!(bits(module.lambda_d()), bits(other.lambda_d()));
                assert_eq!(bits(module.lambda_b()), bits(other.lambda_b()));
            }
            let json: serde_json::Value =
                serde_json::from_slice(&std::fs::read(dir.path().join(CONFIG_FILE)).unwrap()).unwrap();
            assert_eq!(json["peft_type"], "VERA");
            assert_eq!(json["save_projection"], save_projection);
            assert_eq!(json["bias"], "vera_only");
            assert_eq!(json["d_initial"], 0.25);
            assert_eq!(json["r"], 16);
            assert!(json["target_modules"].is_array() && json["task_type"].is_null());
            // The projections in use are the same either way: saved, or drawn from seed 0.
            let sizes = (!save_projection).then_some(SIZES_64);
            let p = loaded.projections::<f32>(sizes).unwrap();
            let seeded = Projections::<f32>::from_seed(0, 16, 64, 64).unwrap();
            let expected = if save_projection { seeded.to_dtype_via(dtype) } else { seeded };
            assert_eq!(p, expected);
        }
    }
}

/// `Projections<f32>` rounded to `dtype` and widened back.
trait ViaDType {
    fn to_dtype_via(&self, dtype: DType) -> Projections<f32>;
}

impl ViaDType for Projections<f32> {
    fn to_dtype_via(&self, dtype: DType) -> Projections<f32> {
        match dtype {
            DType::F32 => self.clone(),
            DType::F16 => self.to_dtype::<f16>().to_dtype::<f32>(),
            DType::BF16 => self.to_dtype::<bf16>().to_dtype::<f32>(),
        }
    }
}

#[test]
fn tensors_round_trip_through_files_with_other_tensors_kept() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.safetensors");
    let a = Tensor::new(DType::BF16, vec![2, 3], vec![1.0, -2.5, 3.1, 0.0, 1e-3, 7.0]).unwrap();
    let b = Tensor::from_elements(vec![4], &[f16::from_f32(0.5); 4]).unwrap();
    // Values are rounded to the dtype on construction, so what is written is what is held.
    assert_eq!(a.data()[2], bf16::from_f32(3.1).to_f32());
    vera_kernels::peft::write_safetensors(&path, &[("a", &a), ("b", &b)], None).unwrap();
    let file = TensorFile::read(&path).unwrap();
    assert_eq!(file.keys().collect::<Vec<_>>(), ["a", "b"]);
    assert_eq!((file.tensor("a").unwrap(), file.tensor("b").unwrap()), (a.clone(), b.clone()));
    assert_eq!(file.shape("a").unwrap(), &[2, 3]);
    assert_eq!(file.dtype_name("b").unwrap(), "F16");
    assert!(file.metadata().is_none());

    let c = Tensor::new(DType::F32, vec![1], vec![9.0]).unwrap();
    let out = dir.path().join("u.safetensors");
    file.write_replacing(&out, &[("a", &c)]).unwrap();
    let file = TensorFile::read(&out).unwrap();
    assert_eq!((file.tensor("a").unwrap(), file.tensor("b").unwrap()), (c, b));
}

#[test]
fn module_key_names_are_peft_s() {
    assert_eq!(
        lambda_d_key("model.layers.3.self_attn.q_proj"),
        "base_model.model.model.layers.3.self_attn.q_proj.vera_lambda_d"
    );
    assert_eq!(lambda_b_key("layers.0"), "base_model.model.layers.0.vera_lambda_b");
    let t = TargetModules::Names(vec!["q_proj".into(), "layers.0".into()]);
    assert!(t.matches("model.layers.3.self_attn.q_proj") && t.matches("q_proj") && t.matches("layers.0"));
    assert!(!t.matches("model.layers.3.self_attn.xq_proj") && !t.matches("layers.01"));
    assert!(TargetModules::Pattern(".*".into()).matches("anything") && TargetModules::Unspecified.matches("x"));
}
