//! Runs the `peft-vera-mlp` fixture (a PEFT VeRA adapter on a stack of three `nn.Linear` layers,
//! 48 -> 40 -> 64 -> 24) through candle with `VeraLinear`, and compares each layer's output with
//! the one PEFT computed.
//!
//! ```text
//! cargo run --release --features candle --example candle_peft_mlp
//! ```

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use candle_nn::{Linear, Module};
use vera_kernels::candle::{VeraLinear, VeraProjections};
use vera_kernels::peft::{PeftAdapter, TensorFile};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/peft-vera-mlp");
    let adapter = PeftAdapter::load(fixture.join("adapter"))?;
    let c = adapter.config();
    println!(
        "adapter: r = {}, seed = {}, projections saved: {}, modules: {:?}",
        c.r,
        c.projection_prng_key,
        c.save_projection,
        adapter.modules().keys().collect::<Vec<_>>()
    );
    // One copy of the shared projections for the whole model, as in PEFT.
    let projections = Arc::new(VeraProjections::from_peft(&adapter, None)?);

    // The base model's weights and PEFT's inputs and outputs.
    let reference = TensorFile::read(fixture.join("reference.safetensors"))?;
    let tensor = |key: &str| -> Result<Tensor, Box<dyn std::error::Error>> {
        let t = reference.tensor(key)?;
        Ok(Tensor::from_vec(t.data().to_vec(), t.shape(), &Device::Cpu)?)
    };

    for l in 0..3 {
        let name = format!("layers.{l}");
        let (weight, bias) = (tensor(&format!("{name}.weight"))?, tensor(&format!("{name}.bias"))?);
        let x = tensor(&format!("{name}.x"))?;
        let peft_y = tensor(&format!("{name}.y"))?;
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            // The base layer in the activation dtype, wrapped with the adapter's module.
            let base = Linear::new(weight.to_dtype(dtype)?, Some(bias.to_dtype(dtype)?));
            let layer = VeraLinear::from_peft(base, &adapter, &name, projections.clone())?;
            let y = layer.forward(&x.to_dtype(dtype)?)?.to_dtype(DType::F32)?;
            let err = (&y - &peft_y)?.abs()?.max_all()?.to_scalar::<f32>()?;
            let scale = peft_y.abs()?.max_all()?.to_scalar::<f32>()?;
            println!(
                "{name} {dtype:?}: x {:?} -> y {:?}, max |y - y_peft| / max |y_peft| = {:.2e}",
                x.dims(),
                y.dims(),
                err / scale
            );
        }
    }
    Ok(())
}
