//! Writes a fresh VeRA adapter in PEFT's layout, plus this crate's outputs for it, so that
//! `scripts/peft_load_check.py` can load the adapter with real HuggingFace PEFT and compare.
//!
//! ```sh
//! cargo run --release --example peft_export -- OUT_DIR
//! python3 scripts/peft_load_check.py OUT_DIR      # needs torch and peft
//! ```
//!
//! The model is the fixtures' MLP: Linear layers 48 -> 40 -> 64 -> 24 (`layers.0..2`). The adapter
//! has rank 8, `projection_prng_key = 11` and `save_projection = false` (so PEFT must regenerate the
//! same projections from the seed), bf16 lambdas; `OUT_DIR/ours.safetensors` holds, per layer, an
//! input `layers.{l}.x` and this crate's adapter output `layers.{l}.adapter_y` (f32).

use std::collections::BTreeMap;

use vera_kernels::peft::{
    write_safetensors, PeftAdapter, ProjectionSizes, TargetModules, Tensor, VeraConfig, VeraModule,
};
use vera_kernels::rng::TorchCpuGenerator;
use vera_kernels::{forward, DType, MatMut, MatRef, Mode};

const SIZES: [usize; 4] = [48, 40, 64, 24];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = std::env::args().nth(1).ok_or("usage: peft_export OUT_DIR")?;
    let out = std::path::Path::new(&out);
    std::fs::create_dir_all(out)?;
    let (r, seed, t) = (8, 11, 3);
    let mut g = TorchCpuGenerator::manual_seed(2024);
    let mut draw = |len: usize, scale: f64| {
        let mut v = vec![0.0f32; len];
        g.fill_uniform_f32(&mut v, -scale, scale);
        v
    };
    let names: Vec<String> = (0..3).map(|l| format!("layers.{l}")).collect();
    let mut modules = BTreeMap::new();
    for (l, name) in names.iter().enumerate() {
        let lambda_d = Tensor::new(DType::BF16, vec![r], draw(r, 1.0))?;
        let lambda_b = Tensor::new(DType::BF16, vec![SIZES[l + 1]], draw(SIZES[l + 1], 1.0))?;
        modules.insert(name.clone(), VeraModule::new(lambda_d, lambda_b)?);
    }
    let mut config = VeraConfig::new(r, seed, TargetModules::Names(names.clone()));
    config.save_projection = false;
    let adapter = PeftAdapter::new(config, modules, None)?;
    adapter.save(out.join("adapter"))?;

    // This crate's outputs, from the adapter as saved and loaded back.
    let adapter = PeftAdapter::load(out.join("adapter"))?;
    let projections = adapter.projections::<f32>(Some(ProjectionSizes { n_max: 64, m_max: 64 }))?;
    let mut tensors = Vec::new();
    for (l, name) in names.iter().enumerate() {
        let (n, m) = (SIZES[l], SIZES[l + 1]);
        let x = draw(t * n, 2.0);
        let mut y = vec![0.0f32; t * m];
        let module = adapter.module(name)?;
        forward(
            &projections,
            module.adapter(),
            MatRef::from_slice(&x, t, n)?,
            MatMut::from_slice(&mut y, t, m)?,
            Mode::Overwrite,
        )?;
        tensors.push((format!("{name}.x"), Tensor::new(DType::F32, vec![t, n], x)?));
        tensors.push((format!("{name}.adapter_y"), Tensor::new(DType::F32, vec![t, m], y)?));
    }
    let refs: Vec<(&str, &Tensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    write_safetensors(out.join("ours.safetensors"), &refs, None)?;
    println!("wrote {} and {}", out.join("adapter").display(), out.join("ours.safetensors").display());
    Ok(())
}
