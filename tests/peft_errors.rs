//! Every way a PEFT adapter directory or safetensors file can be wrong gives its own `Error`
//! variant, with a one-line message that names the file, the key or the field, and never a panic.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use common::fixture_dir;
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use serde_json::{Map, Value};
use vera_kernels::peft::{
    PeftAdapter, ProjectionSizes, TargetModules, Tensor, TensorFile, VeraConfig, VeraModule, CONFIG_FILE, WEIGHTS_FILE,
};
use vera_kernels::{DType, Error, MatMut};

/// A writable copy of a fixture's adapter directory.
fn copy_fixture(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let src = fixture_dir(name).join("adapter");
    for f in [CONFIG_FILE, WEIGHTS_FILE] {
        // read + write rather than fs::copy, whose copy_file_range Miri does not emulate.
        std::fs::write(dir.path().join(f), std::fs::read(src.join(f)).unwrap()).unwrap();
    }
    dir
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut Map<String, Value>)) {
    let path = dir.join(CONFIG_FILE);
    let mut value: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    edit(value.as_object_mut().unwrap());
    std::fs::write(path, serde_json::to_string_pretty(&value).unwrap()).unwrap();
}

/// Raw tensors of the weights file: key -> (dtype, shape, bytes).
type Raw = BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)>;

/// One way of corrupting the raw tensors.
type Edit = fn(&mut Raw);

fn edit_tensors(dir: &Path, edit: impl FnOnce(&mut Raw)) {
    let path = dir.join(WEIGHTS_FILE);
    let bytes = std::fs::read(&path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut raw: Raw =
        st.tensors().into_iter().map(|(k, v)| (k, (v.dtype(), v.shape().to_vec(), v.data().to_vec()))).collect();
    edit(&mut raw);
    let views: Vec<(String, TensorView<'_>)> = raw
        .iter()
        .map(|(k, (dtype, shape, data))| (k.clone(), TensorView::new(*dtype, shape.clone(), data).unwrap()))
        .collect();
    std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
}

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn load_err(dir: &Path) -> Error {
    let e = PeftAdapter::load(dir).unwrap_err();
    assert_one_line(&e);
    e
}

fn assert_one_line(e: &Error) {
    let msg = e.to_string();
    assert!(!msg.is_empty() && !msg.contains('\n'), "not one line: {msg:?}");
}

const D0: &str = "base_model.model.layers.0.vera_lambda_d";
const B1: &str = "base_model.model.layers.1.vera_lambda_b";

#[test]
fn io() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope");
    let e = load_err(&missing);
    assert!(matches!(&e, Error::Io { path, .. } if path.ends_with(CONFIG_FILE)), "{e:?}");

    // A config without weights.
    let dir = copy_fixture("peft-vera-mlp");
    std::fs::remove_file(dir.path().join(WEIGHTS_FILE)).unwrap();
    let e = load_err(dir.path());
    assert!(matches!(&e, Error::Io { path, .. } if path.ends_with(WEIGHTS_FILE)), "{e:?}");

    // Only the pickled weights: say so.
    std::fs::write(dir.path().join("adapter_model.bin"), b"pickle").unwrap();
    let e = load_err(dir.path());
    assert!(matches!(&e, Error::Io { message, .. } if message.contains("adapter_model.bin")), "{e:?}");

    assert!(matches!(TensorFile::read(dir.path().join("x.safetensors")), Err(Error::Io { .. })));

    // Saving below a regular file, or over a directory.
    let adapter = PeftAdapter::load(fixture_dir("peft-vera-mlp/adapter")).unwrap();
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"").unwrap();
    let e = adapter.save(file.join("sub")).unwrap_err();
    assert!(matches!(e, Error::Io { .. }), "{e:?}");
    let out = dir.path().join("out");
    std::fs::create_dir_all(out.join(WEIGHTS_FILE)).unwrap();
    let e = adapter.save(&out).unwrap_err();
    assert!(matches!(&e, Error::Io { path, .. } if path.ends_with(WEIGHTS_FILE)), "{e:?}");
    assert_one_line(&e);
    // No temporary file left behind.
    assert_eq!(std::fs::read_dir(&out).unwrap().count(), 1);
}

#[test]
fn invalid_config() {
    let cases: Vec<(&str, Value)> = vec![
        ("r", Value::from(0)),
        ("r", Value::from("16")),
        ("r", Value::from(-1)),
        ("r", Value::from(16.5)),
        ("projection_prng_key", Value::from(-3)),
        ("save_projection", Value::from("yes")),
        ("fan_in_fan_out", Value::from(1)),
        ("d_initial", Value::from("0.1")),
        ("vera_dropout", Value::from(1.5)),
        ("bias", Value::from("lora_only")),
        ("target_modules", Value::from(5)),
        ("target_modules", serde_json::json!(["layers.0", 1])),
        ("peft_type", Value::from(3)),
    ];
    for (field, value) in cases {
        let dir = copy_fixture("peft-vera-mlp");
        edit_config(dir.path(), |c| {
            c.insert(field.to_string(), value.clone());
        });
        let e = load_err(dir.path());
        assert!(
            matches!(&e, Error::InvalidConfig { path, message } if path.ends_with(CONFIG_FILE) && message.contains(field)),
            "{field} = {value}: {e:?}"
        );
    }
    for text in ["", "{", "not json", "[1, 2]", "{\"r\": 16}", "null"] {
        let e = VeraConfig::from_json(text).unwrap_err();
        assert!(matches!(e, Error::InvalidConfig { .. }), "{text:?}: {e:?}");
        assert_one_line(&e);
    }
    let mut config = VeraConfig::new(4, 0, TargetModules::Unspecified);
    config.d_initial = f64::NAN;
    assert!(matches!(config.to_json(), Err(Error::InvalidConfig { .. })));
    let dir = tempfile::tempdir().unwrap();
    assert!(matches!(config.write(dir.path().join(CONFIG_FILE)), Err(Error::InvalidConfig { .. })));
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[test]
fn not_vera() {
    let dir = copy_fixture("peft-vera-mlp");
    edit_config(dir.path(), |c| {
        c.insert("peft_type".into(), "LORA".into());
    });
    let e = load_err(dir.path());
    assert!(matches!(&e, Error::NotVera { peft_type, .. } if peft_type == "LORA"), "{e:?}");
    assert!(e.to_string().contains("not a VeRA adapter"));
}

#[test]
fn safetensors() {
    let good = std::fs::read(fixture_dir("peft-vera-mlp/adapter").join(WEIGHTS_FILE)).unwrap();
    let header_len = u64::from_le_bytes(good[..8].try_into().unwrap()) as usize;
    let mut huge_header = good.clone();
    huge_header[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    let mut bad_json = good.clone();
    bad_json[8] = b'[';
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty", vec![]),
        ("shorter than the header length", good[..5].to_vec()),
        ("truncated header", good[..8 + header_len / 2].to_vec()),
        ("truncated data", good[..good.len() - 1].to_vec()),
        ("trailing bytes", [good.clone(), vec![0]].concat()),
        ("huge header length", huge_header),
        ("corrupt header", bad_json),
        ("garbage", b"garbage that is not a safetensors file".to_vec()),
    ];
    for (what, bytes) in cases {
        let dir = copy_fixture("peft-vera-mlp");
        std::fs::write(dir.path().join(WEIGHTS_FILE), &bytes).unwrap();
        let e = load_err(dir.path());
        assert!(matches!(&e, Error::Safetensors { path, .. } if path.ends_with(WEIGHTS_FILE)), "{what}: {e:?}");
        assert!(matches!(TensorFile::from_bytes("mem", bytes), Err(Error::Safetensors { .. })), "{what}");
    }
    // Writing the same key twice is refused before anything is written.
    let dir = tempfile::tempdir().unwrap();
    let t = Tensor::new(DType::F32, vec![1], vec![1.0]).unwrap();
    let path = dir.path().join("t.safetensors");
    let e = vera_kernels::peft::write_safetensors(&path, &[("a", &t), ("a", &t)], None).unwrap_err();
    assert!(matches!(e, Error::Safetensors { .. }), "{e:?}");
    assert!(!path.exists());
}

#[test]
fn missing_tensor() {
    let cases: Vec<(&str, Edit, &str)> = vec![
        ("a module without lambda_b", |r| drop(r.remove(B1)), B1),
        ("a module without lambda_d", |r| drop(r.remove(D0)), D0),
        ("vera_B without vera_A", |r| drop(r.remove("base_model.vera_A")), "base_model.vera_A"),
        ("vera_A without vera_B", |r| drop(r.remove("base_model.vera_B")), "base_model.vera_B"),
        (
            "save_projection = true without projections",
            |r| r.retain(|k, _| !k.starts_with("base_model.vera_")),
            "base_model.vera_A",
        ),
        ("no module", |r| r.retain(|k, _| k.starts_with("base_model.vera_")), "vera_lambda_d"),
    ];
    for (what, edit, key_part) in cases {
        let dir = copy_fixture("peft-vera-mlp");
        edit_tensors(dir.path(), edit);
        let e = load_err(dir.path());
        assert!(matches!(&e, Error::MissingTensor { key, .. } if key.contains(key_part)), "{what}: {e:?}");
    }
    let file = TensorFile::read(fixture_dir("peft-vera-mlp/reference.safetensors")).unwrap();
    assert!(matches!(file.tensor("nope"), Err(Error::MissingTensor { .. })));
    assert!(matches!(file.shape("nope"), Err(Error::MissingTensor { .. })));
}

#[test]
fn unexpected_tensor() {
    // A key that is not VeRA's (PEFT never saves biases or other weights in a VeRA adapter).
    let dir = copy_fixture("peft-vera-mlp");
    edit_tensors(dir.path(), |r| {
        r.insert("base_model.model.layers.0.bias".into(), (Dtype::F32, vec![1], f32_bytes(&[0.0])));
    });
    let e = load_err(dir.path());
    assert!(matches!(&e, Error::UnexpectedTensor { key, .. } if key == "base_model.model.layers.0.bias"), "{e:?}");

    // A module that is not in target_modules.
    let dir = copy_fixture("peft-vera-mlp");
    edit_tensors(dir.path(), |r| {
        for suffix in ["vera_lambda_d", "vera_lambda_b"] {
            let v = r.remove(&format!("base_model.model.layers.2.{suffix}")).unwrap();
            r.insert(format!("base_model.model.layers.9.{suffix}"), v);
        }
    });
    let e = load_err(dir.path());
    assert!(matches!(&e, Error::UnexpectedTensor { reason, .. } if reason.contains("target_modules")), "{e:?}");

    // An empty module name.
    let dir = copy_fixture("peft-vera-mlp");
    edit_tensors(dir.path(), |r| {
        for suffix in ["vera_lambda_d", "vera_lambda_b"] {
            let v = r.remove(&format!("base_model.model.layers.2.{suffix}")).unwrap();
            r.insert(format!("base_model.model..{suffix}"), v);
        }
    });
    let e = load_err(dir.path());
    assert!(matches!(&e, Error::UnexpectedTensor { reason, .. } if reason.contains("empty")), "{e:?}");

    // Projections that the config says are not saved.
    let saved = std::fs::read(fixture_dir("peft-vera-mlp/adapter").join(WEIGHTS_FILE)).unwrap();
    let dir = copy_fixture("peft-vera-mlp-seeded");
    std::fs::write(dir.path().join(WEIGHTS_FILE), saved).unwrap();
    let e = load_err(dir.path());
    assert!(matches!(&e, Error::UnexpectedTensor { reason, .. } if reason.contains("save_projection")), "{e:?}");
}

#[test]
fn unsupported_dtype() {
    let dir = copy_fixture("peft-vera-mlp");
    edit_tensors(dir.path(), |r| {
        let data: Vec<u8> = (0..16).flat_map(|i| f64::from(i).to_le_bytes()).collect();
        r.insert(D0.into(), (Dtype::F64, vec![16], data));
    });
    let e = load_err(dir.path());
    assert!(matches!(&e, Error::UnsupportedDType { key, dtype, .. } if key == D0 && dtype == "F64"), "{e:?}");
}

#[test]
fn tensor_shape() {
    let cases: Vec<(&str, Edit, &str)> = vec![
        ("lambda_d of another rank", |r| drop(r.insert(D0.into(), (Dtype::F32, vec![8], f32_bytes(&[0.5; 8])))), D0),
        ("a 2-D lambda_b", |r| drop(r.insert(B1.into(), (Dtype::F32, vec![8, 8], f32_bytes(&[0.5; 64])))), B1),
        ("an empty lambda_b", |r| drop(r.insert(B1.into(), (Dtype::F32, vec![0], vec![]))), B1),
        (
            "vera_A of another rank",
            |r| drop(r.insert("base_model.vera_A".into(), (Dtype::F32, vec![8, 128], f32_bytes(&[0.1; 1024])))),
            "base_model.vera_A",
        ),
        (
            "a 1-D vera_B",
            |r| drop(r.insert("base_model.vera_B".into(), (Dtype::F32, vec![1024], f32_bytes(&[0.1; 1024])))),
            "base_model.vera_B",
        ),
    ];
    for (what, edit, key_part) in cases {
        let dir = copy_fixture("peft-vera-mlp");
        edit_tensors(dir.path(), edit);
        let e = load_err(dir.path());
        assert!(matches!(&e, Error::TensorShape { key, .. } if key == key_part), "{what}: {e:?}");
    }
    // Sizes that disagree with the saved projections.
    let adapter = PeftAdapter::load(fixture_dir("peft-vera-mlp/adapter")).unwrap();
    for (n_max, m_max, key) in [(48, 64, "base_model.vera_A"), (64, 40, "base_model.vera_B")] {
        let e = adapter.projections::<f32>(Some(ProjectionSizes { n_max, m_max })).unwrap_err();
        assert!(matches!(&e, Error::TensorShape { key: k, .. } if k == key), "{e:?}");
        assert_one_line(&e);
    }
    let empty = Tensor::new(DType::F32, vec![0], vec![]).unwrap();
    let one = Tensor::new(DType::F32, vec![1], vec![1.0]).unwrap();
    assert!(matches!(VeraModule::new(empty, one), Err(Error::TensorShape { .. })));
}

#[test]
fn missing_projection_sizes() {
    let adapter = PeftAdapter::load(fixture_dir("peft-vera-mlp-seeded/adapter")).unwrap();
    let e = adapter.projections::<f32>(None).unwrap_err();
    assert_eq!(e, Error::MissingProjectionSizes { seed: 7 });
    assert!(e.to_string().contains("n_max") && e.to_string().contains("projection_prng_key = 7"));
}

#[test]
fn projections_too_small() {
    let adapter = PeftAdapter::load(fixture_dir("peft-vera-mlp-seeded/adapter")).unwrap();
    let e = adapter.projections::<f32>(Some(ProjectionSizes { n_max: 64, m_max: 32 })).unwrap_err();
    assert_eq!(
        e,
        Error::ProjectionsTooSmall { module: "layers.1".into(), what: "out_features", needed: 64, given: 32 }
    );
    assert!(e.to_string().contains("m_max = 32"));

    // Saved projections whose B does not cover every module.
    let dir = copy_fixture("peft-vera-mlp");
    edit_tensors(dir.path(), |r| {
        let b = r.get_mut("base_model.vera_B").unwrap();
        b.1 = vec![32, 16];
        b.2.truncate(32 * 16 * 4);
    });
    let e = load_err(dir.path());
    assert!(matches!(&e, Error::ProjectionsTooSmall { needed: 64, given: 32, .. }), "{e:?}");

    // A layer wider than n_max is caught by the kernels' own check.
    let adapter = PeftAdapter::load(fixture_dir("peft-vera-mlp/adapter")).unwrap();
    let p = adapter.projections::<f32>(None).unwrap();
    let mut w = vec![0.0f32; 40 * 65];
    let e = adapter.merge_module(&p, "layers.0", MatMut::from_slice(&mut w, 40, 65).unwrap()).unwrap_err();
    assert!(matches!(e, Error::LayerExceedsProjections { layer: 65, max: 64, .. }), "{e:?}");
}

#[test]
fn unknown_module() {
    let adapter = PeftAdapter::load(fixture_dir("peft-vera-mlp/adapter")).unwrap();
    let e = adapter.module("layers.9").unwrap_err();
    assert!(matches!(&e, Error::UnknownModule { module, available } if module == "layers.9" && available.len() == 3));
    assert!(e.to_string().contains("layers.0, layers.1, layers.2"));
    let p = adapter.projections::<f32>(None).unwrap();
    let mut w = vec![0.0f32; 40 * 48];
    let e = adapter.merge_module(&p, "nope", MatMut::from_slice(&mut w, 40, 48).unwrap()).unwrap_err();
    assert!(matches!(e, Error::UnknownModule { .. }));
}

#[test]
fn tensor_lengths_and_sizes() {
    let e = Tensor::new(DType::F32, vec![2, 3], vec![0.0; 5]).unwrap_err();
    assert!(matches!(e, Error::LengthMismatch { expected: 6, actual: 5, .. }), "{e:?}");
    let e = Tensor::new(DType::F32, vec![usize::MAX, 3], vec![]).unwrap_err();
    assert!(matches!(e, Error::SizeOverflow { .. }), "{e:?}");
}

/// Paths in messages are the paths given.
#[test]
fn messages_name_the_file() {
    let dir = copy_fixture("peft-vera-mlp");
    edit_config(dir.path(), |c| drop(c.remove("peft_type")));
    let e = load_err(dir.path());
    let config: PathBuf = dir.path().join(CONFIG_FILE);
    assert!(e.to_string().starts_with(&config.display().to_string()), "{e}");
}
