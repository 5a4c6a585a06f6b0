//! Helpers shared by the integration tests: reading the PEFT fixtures, random test values.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use safetensors::{Dtype, SafeTensors};

/// `tests/fixtures/<name>`.
pub fn fixture_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

/// Every f32 tensor of a safetensors file, by name, with its shape.
pub fn read_f32_tensors(path: &std::path::Path) -> HashMap<String, (Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let st = SafeTensors::deserialize(&bytes).expect("valid safetensors");
    st.tensors()
        .into_iter()
        .map(|(name, view)| {
            assert_eq!(view.dtype(), Dtype::F32, "{name} is not f32");
            let data: Vec<f32> = bytemuck::pod_collect_to_vec(view.data());
            (name, (view.shape().to_vec(), data))
        })
        .collect()
}

/// Max |a - b| / max |b|: the error relative to the tensor's scale.
pub fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().map(|v| f64::from(v.abs())).fold(0.0, f64::max);
    let err = a.iter().zip(b).map(|(x, y)| f64::from(x - y).abs()).fold(0.0, f64::max);
    if scale == 0.0 {
        err
    } else {
        err / scale
    }
}

/// `len` values uniform in `[-scale, scale)` from torch's CPU generator (reproducible per seed).
pub fn values(g: &mut vera_kernels::rng::TorchCpuGenerator, len: usize, scale: f64) -> Vec<f32> {
    let mut v = vec![0.0f32; len];
    g.fill_uniform_f32(&mut v, -scale, scale);
    v
}

/// `v` rounded to the element type `T`.
pub fn to<T: vera_kernels::Element>(v: &[f32]) -> Vec<T> {
    v.iter().map(|&x| T::from_f32(x)).collect()
}
