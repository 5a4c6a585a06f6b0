//! Fuzzing the PEFT loader with proptest: corrupted weights files (truncated, bytes flipped in the
//! header or the data, bytes inserted or removed, header length rewritten) and corrupted configs
//! (bytes flipped, truncated, fields replaced by arbitrary JSON) must give an `Err` or a consistent
//! adapter, never a panic; a loaded adapter must then run without panicking either.

mod common;

use common::fixture_dir;
use proptest::prelude::*;
use serde_json::Value;
use vera_kernels::peft::{PeftAdapter, ProjectionSizes, TensorFile, VeraConfig, CONFIG_FILE, WEIGHTS_FILE};
use vera_kernels::{forward, MatMut, MatRef, Mode};

#[derive(Clone, Debug)]
enum Mutation {
    /// Keep the first `fraction` of the bytes.
    Truncate(f64),
    /// XOR the byte at `fraction` of the header (or of the whole file) with `mask`.
    FlipHeader(f64, u8),
    FlipAnywhere(f64, u8),
    /// Overwrite a header byte with a character that matters to JSON.
    SetHeaderChar(f64, u8),
    /// Insert bytes at `fraction` of the file.
    Insert(f64, Vec<u8>),
    /// Remove `len` bytes at `fraction` of the file.
    Remove(f64, usize),
    /// Rewrite the 8-byte header length.
    HeaderLength(u64),
    /// Edit the header's JSON and re-encode it with its right length: the file stays parseable as
    /// JSON, and only the meaning changes.
    Header(f64, HeaderEdit),
}

#[derive(Clone, Debug)]
enum HeaderEdit {
    Dtype(&'static str),
    Dim(f64, usize),
    PushDim(usize),
    PopDim,
    Offset(bool, i64),
    Rename(String),
    Remove,
}

fn header_edit() -> impl Strategy<Value = HeaderEdit> {
    prop_oneof![
        prop::sample::select(vec!["F32", "F16", "BF16", "F64", "I64", "U8", "BOOL", "F8_E4M3", "F4", "X"])
            .prop_map(HeaderEdit::Dtype),
        (0.0..1.0f64, prop_oneof![0..80usize, Just(usize::MAX), Just(1 << 32)])
            .prop_map(|(f, d)| HeaderEdit::Dim(f, d)),
        prop_oneof![0..4usize, Just(usize::MAX)].prop_map(HeaderEdit::PushDim),
        Just(HeaderEdit::PopDim),
        (any::<bool>(), prop_oneof![-8..8i64, Just(i64::MAX), Just(i64::MIN)])
            .prop_map(|(s, d)| HeaderEdit::Offset(s, d)),
        prop::sample::select(vec![
            "base_model.vera_A".to_string(),
            "base_model.vera_B".to_string(),
            "base_model.model.layers.0.vera_lambda_d".to_string(),
            "base_model.model.layers.1.vera_lambda_b".to_string(),
            "base_model.model.layers.7.vera_lambda_b".to_string(),
            "base_model.model..vera_lambda_d".to_string(),
            "__metadata__".to_string(),
            "other".to_string(),
        ])
        .prop_map(HeaderEdit::Rename),
        Just(HeaderEdit::Remove),
    ]
}

/// Applies a [`HeaderEdit`] to the tensor at `fraction` of the header's keys.
fn edit_header(bytes: &mut Vec<u8>, header_end: usize, fraction: f64, edit: &HeaderEdit) {
    let Some(Ok(Value::Object(mut header))) = bytes.get(8..header_end).map(serde_json::from_slice::<Value>) else {
        return;
    };
    let keys: Vec<String> = header.keys().filter(|k| *k != "__metadata__").cloned().collect();
    if keys.is_empty() {
        return;
    }
    let key = keys[at(fraction, keys.len())].clone();
    let Some(Value::Object(info)) = header.get_mut(&key) else { return };
    match edit {
        HeaderEdit::Dtype(d) => drop(info.insert("dtype".into(), Value::from(*d))),
        HeaderEdit::Dim(f, d) => {
            if let Some(Value::Array(shape)) = info.get_mut("shape") {
                if !shape.is_empty() {
                    let i = at(*f, shape.len());
                    shape[i] = Value::from(*d);
                }
            }
        }
        HeaderEdit::PushDim(d) => {
            if let Some(Value::Array(shape)) = info.get_mut("shape") {
                shape.push(Value::from(*d));
            }
        }
        HeaderEdit::PopDim => {
            if let Some(Value::Array(shape)) = info.get_mut("shape") {
                shape.pop();
            }
        }
        HeaderEdit::Offset(start, delta) => {
            if let Some(Value::Array(offsets)) = info.get_mut("data_offsets") {
                let i = usize::from(!*start);
                if let Some(v) = offsets.get_mut(i) {
                    let old = v.as_i64().unwrap_or(0);
                    *v = Value::from(old.saturating_add(*delta));
                }
            }
        }
        HeaderEdit::Rename(new) => {
            let v = header.remove(&key).unwrap();
            header.insert(new.clone(), v);
        }
        HeaderEdit::Remove => drop(header.remove(&key)),
    }
    let text = Value::Object(header).to_string().into_bytes();
    let data = bytes[header_end..].to_vec();
    *bytes = [(text.len() as u64).to_le_bytes().to_vec(), text, data].concat();
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let frac = 0.0..1.0f64;
    prop_oneof![
        frac.clone().prop_map(Mutation::Truncate),
        (frac.clone(), 1..=255u8).prop_map(|(f, m)| Mutation::FlipHeader(f, m)),
        (frac.clone(), 1..=255u8).prop_map(|(f, m)| Mutation::FlipAnywhere(f, m)),
        (frac.clone(), prop::sample::select(b"{}[]\":,0123456789-eE. ".to_vec()))
            .prop_map(|(f, c)| Mutation::SetHeaderChar(f, c)),
        (frac.clone(), prop::collection::vec(any::<u8>(), 1..16)).prop_map(|(f, b)| Mutation::Insert(f, b)),
        (frac, 1..64usize).prop_map(|(f, n)| Mutation::Remove(f, n)),
        prop_oneof![0..2000u64, Just(u64::MAX), Just(1 << 40), any::<u64>()].prop_map(Mutation::HeaderLength),
        (0.0..1.0f64, header_edit()).prop_map(|(f, e)| Mutation::Header(f, e)),
        (0.0..1.0f64, header_edit()).prop_map(|(f, e)| Mutation::Header(f, e)),
        (0.0..1.0f64, header_edit()).prop_map(|(f, e)| Mutation::Header(f, e)),
    ]
}

fn at(fraction: f64, len: usize) -> usize {
    ((fraction * len as f64) as usize).min(len.saturating_sub(1))
}

fn apply(bytes: &mut Vec<u8>, m: &Mutation) {
    let header_end = if bytes.len() >= 8 {
        (u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize).saturating_add(8).min(bytes.len())
    } else {
        bytes.len()
    };
    if bytes.is_empty() {
        return;
    }
    match m {
        Mutation::Truncate(f) => bytes.truncate(at(*f, bytes.len())),
        Mutation::FlipHeader(f, mask) => {
            let i = 8 + at(*f, header_end.saturating_sub(8).max(1));
            if let Some(b) = bytes.get_mut(i) {
                *b ^= mask;
            }
        }
        Mutation::FlipAnywhere(f, mask) => {
            let i = at(*f, bytes.len());
            bytes[i] ^= mask;
        }
        Mutation::SetHeaderChar(f, c) => {
            let i = 8 + at(*f, header_end.saturating_sub(8).max(1));
            if let Some(b) = bytes.get_mut(i) {
                *b = *c;
            }
        }
        Mutation::Insert(f, extra) => {
            let i = at(*f, bytes.len());
            bytes.splice(i..i, extra.iter().copied());
        }
        Mutation::Remove(f, n) => {
            let i = at(*f, bytes.len());
            let end = (i + n).min(bytes.len());
            bytes.drain(i..end);
        }
        Mutation::HeaderLength(n) => {
            if bytes.len() >= 8 {
                bytes[..8].copy_from_slice(&n.to_le_bytes());
            }
        }
        Mutation::Header(f, edit) => edit_header(bytes, header_end, *f, edit),
    }
}

/// Uses a loaded adapter the way a caller would; nothing here may panic either.
fn exercise(adapter: &PeftAdapter) {
    let sizes = adapter.projection_sizes().unwrap_or(ProjectionSizes { n_max: 64, m_max: 64 });
    let Ok(projections) = adapter.projections::<f32>(Some(sizes)) else { return };
    for (name, module) in adapter.modules() {
        let (n, m) = (sizes.n_max.min(8), module.out_features());
        let x = vec![0.5f32; 2 * n];
        let mut y = vec![0.0f32; 2 * m];
        let _ = forward(
            &projections,
            module.adapter(),
            MatRef::from_slice(&x, 2, n).unwrap(),
            MatMut::from_slice(&mut y, 2, m).unwrap(),
            Mode::Overwrite,
        );
        let mut w = vec![0.0f32; m * n];
        let _ = adapter.merge_module(&projections, name, MatMut::from_slice(&mut w, m, n).unwrap());
    }
}

fn fixture_bytes(name: &str, file: &str) -> Vec<u8> {
    std::fs::read(fixture_dir(name).join("adapter").join(file)).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn corrupted_weights_never_panic(
        seeded in any::<bool>(),
        mutations in prop::collection::vec(mutation(), 1..4),
    ) {
        let name = if seeded { "peft-vera-mlp-seeded" } else { "peft-vera-mlp" };
        let config = VeraConfig::from_json(&String::from_utf8(fixture_bytes(name, CONFIG_FILE)).unwrap()).unwrap();
        let mut bytes = fixture_bytes(name, WEIGHTS_FILE);
        for m in &mutations {
            apply(&mut bytes, m);
        }
        if let Ok(file) = TensorFile::from_bytes("fuzz.safetensors", bytes) {
            for key in file.keys() {
                let _ = file.tensor(key);
            }
            if let Ok(adapter) = PeftAdapter::from_tensor_file(config, &file) {
                exercise(&adapter);
            }
        }
    }

    #[test]
    fn corrupted_config_text_never_panics(
        flips in prop::collection::vec((0.0..1.0f64, any::<u8>()), 0..4),
        cut in 0.0..1.0f64,
        truncate in any::<bool>(),
    ) {
        let mut text = fixture_bytes("peft-vera-mlp", CONFIG_FILE);
        for (f, b) in &flips {
            let i = at(*f, text.len());
            text[i] = *b;
        }
        if truncate {
            text.truncate(at(cut, text.len()));
        }
        // Not UTF-8 is an error too, through the file.
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(CONFIG_FILE), &text).unwrap();
        std::fs::write(dir.path().join(WEIGHTS_FILE), fixture_bytes("peft-vera-mlp", WEIGHTS_FILE)).unwrap();
        if let Ok(adapter) = PeftAdapter::load(dir.path()) {
            exercise(&adapter);
        }
    }

    #[test]
    fn arbitrary_config_fields_never_panic(
        fields in prop::collection::vec(
            (
                prop::sample::select(vec![
                    "r", "projection_prng_key", "save_projection", "d_initial", "fan_in_fan_out",
                    "target_modules", "bias", "vera_dropout", "peft_type",
                ]),
                json_value(),
            ),
            1..4,
        ),
        seeded in any::<bool>(),
    ) {
        let name = if seeded { "peft-vera-mlp-seeded" } else { "peft-vera-mlp" };
        let mut config: Value = serde_json::from_slice(&fixture_bytes(name, CONFIG_FILE)).unwrap();
        for (k, v) in &fields {
            config[*k] = v.clone();
        }
        if let Ok(config) = VeraConfig::from_json(&config.to_string()) {
            let _ = config.to_json();
            let file = TensorFile::from_bytes("w", fixture_bytes(name, WEIGHTS_FILE)).unwrap();
            if let Ok(adapter) = PeftAdapter::from_tensor_file(config, &file) {
                exercise(&adapter);
            }
        }
    }
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        prop_oneof![0..40u64, Just(16u64), Just(u64::MAX)].prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        "[a-z_.0-9]{0,12}".prop_map(Value::from),
        prop::sample::select(vec!["VERA", "LORA", "none", "all", "vera_only", "layers.0"]).prop_map(Value::from),
    ];
    leaf.prop_recursive(2, 8, 4, |inner| prop::collection::vec(inner, 0..4).prop_map(Value::Array))
}
