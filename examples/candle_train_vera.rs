//! Trains a PEFT VeRA adapter's `lambda_d` / `lambda_b` with candle and saves the result as a PEFT
//! adapter directory.
//!
//! The model is a stack of `nn.Linear` layers whose weights and biases are `layers.{i}.weight` /
//! `layers.{i}.bias` in `FIXTURE/reference.safetensors`, each wrapped in a
//! [`VeraLinear`] with module `layers.{i}` of the adapter in `FIXTURE/adapter`, applied in order
//! with no activation. It is trained with plain SGD (no momentum) on `train.x` → `train.target`
//! with `loss = mean((model(x) - target)^2)`; one line `step K loss V` is printed before each step
//! and once after the last, and the trained adapter is saved in `OUTPUT`.
//!
//! ```text
//! cargo run --release --features candle --example candle_train_vera -- \
//!     --fixture tests/fixtures/peft-vera-train --steps 10 --lr 0.05 --output trained-adapter
//! ```
//!
//! `--n-max N --m-max M` give the projections' sizes for an adapter saved without them.

use std::error::Error;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{Device, Tensor};
use candle_nn::{Linear, Module, Optimizer, SGD};
use vera_kernels::candle::{to_peft_adapter, VeraLinear, VeraProjections};
use vera_kernels::peft::{PeftAdapter, ProjectionSizes, TensorFile};

/// How to call the example, in one line (error messages end with it).
const USAGE: &str = "usage: candle_train_vera --fixture DIR --steps N --lr X --output OUT [--n-max N --m-max M]";

/// The command line.
#[derive(Clone, Debug, PartialEq)]
pub struct Args {
    /// The fixture directory: `adapter/` and `reference.safetensors`.
    pub fixture: PathBuf,
    /// Number of SGD steps.
    pub steps: usize,
    /// The learning rate.
    pub lr: f64,
    /// Where the trained adapter is saved.
    pub output: PathBuf,
    /// The projections' sizes, for an adapter saved without its projections.
    pub sizes: Option<ProjectionSizes>,
}

/// Parses the arguments after the program name. Errors: one line saying what is wrong.
pub fn parse_args(args: impl IntoIterator<Item = String>) -> Result<Args, String> {
    let (mut fixture, mut steps, mut lr, mut output, mut n_max, mut m_max) = (None, None, None, None, None, None);
    let mut args = args.into_iter();
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--fixture" => fixture = Some(PathBuf::from(value()?)),
            "--steps" => steps = Some(number::<usize>(&flag, &value()?)?),
            "--lr" => lr = Some(learning_rate(&value()?)?),
            "--output" => output = Some(PathBuf::from(value()?)),
            "--n-max" => n_max = Some(number::<usize>(&flag, &value()?)?),
            "--m-max" => m_max = Some(number::<usize>(&flag, &value()?)?),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    let sizes = match (n_max, m_max) {
        (Some(n_max), Some(m_max)) => Some(ProjectionSizes { n_max, m_max }),
        (None, None) => None,
        _ => return Err("--n-max and --m-max go together".to_string()),
    };
    Ok(Args {
        fixture: fixture.ok_or("--fixture is required")?,
        steps: steps.ok_or("--steps is required")?,
        lr: lr.ok_or("--lr is required")?,
        output: output.ok_or("--output is required")?,
        sizes,
    })
}

/// A non-negative integer argument.
fn number<T: std::str::FromStr>(flag: &str, text: &str) -> Result<T, String> {
    text.parse().map_err(|_| format!("{flag} expects a non-negative integer, got {text:?}"))
}

/// A finite, positive learning rate.
fn learning_rate(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(lr) if lr.is_finite() && lr > 0.0 => Ok(lr),
        _ => Err(format!("--lr expects a positive number, got {text:?}")),
    }
}

/// The fixture's model: its layers in order, each with its module name.
pub struct Model {
    /// `(module name, layer)`, applied in this order.
    pub layers: Vec<(String, VeraLinear)>,
}

impl Module for Model {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.layers.iter().try_fold(x.clone(), |x, (_, layer)| layer.forward(&x))
    }
}

/// A tensor of the reference file as an f32 candle tensor.
fn tensor(file: &TensorFile, key: &str) -> Result<Tensor, Box<dyn Error>> {
    let t = file.tensor(key)?;
    Ok(Tensor::from_vec(t.data().to_vec(), t.shape(), &Device::Cpu)?)
}

/// The adapter before training and the model with trainable vectors, from a fixture directory.
pub fn load_model(fixture: &Path, sizes: Option<ProjectionSizes>) -> Result<(PeftAdapter, Model), Box<dyn Error>> {
    let adapter = PeftAdapter::load(fixture.join("adapter"))?;
    // One copy of the shared projections for the whole model, as in PEFT.
    let projections = Arc::new(VeraProjections::from_peft(&adapter, sizes)?);
    let reference = TensorFile::read(fixture.join("reference.safetensors"))?;
    let mut layers = Vec::new();
    while reference.contains(&format!("layers.{}.weight", layers.len())) {
        let name = format!("layers.{}", layers.len());
        let bias_key = format!("{name}.bias");
        let bias = reference.contains(&bias_key).then(|| tensor(&reference, &bias_key)).transpose()?;
        let base = Linear::new(tensor(&reference, &format!("{name}.weight"))?, bias);
        let layer = VeraLinear::from_peft(base, &adapter, &name, projections.clone())?.into_trainable()?;
        layers.push((name, layer));
    }
    if layers.is_empty() {
        return Err(format!("{} has no layers.0.weight", reference.path().display()).into());
    }
    Ok((adapter, Model { layers }))
}

/// Trains the model's vectors with plain SGD for `steps` steps, writing `step K loss V` before each
/// step and after the last; returns those `steps + 1` losses.
pub fn train(
    model: &Model,
    x: &Tensor,
    target: &Tensor,
    steps: usize,
    lr: f64,
    out: &mut dyn Write,
) -> Result<Vec<f32>, Box<dyn Error>> {
    let vars = model.layers.iter().flat_map(|(_, layer)| layer.trainable_vars()).collect();
    let mut sgd = SGD::new(vars, lr)?;
    let mut losses = Vec::with_capacity(steps + 1);
    for step in 0..=steps {
        let loss = candle_nn::loss::mse(&model.forward(x)?, target)?;
        let value = loss.to_scalar::<f32>()?;
        writeln!(out, "step {step} loss {value}")?;
        losses.push(value);
        if step < steps {
            sgd.backward_step(&loss)?;
        }
    }
    Ok(losses)
}

/// The whole run: load, train, save. Returns the losses.
pub fn run(args: &Args, out: &mut dyn Write) -> Result<Vec<f32>, Box<dyn Error>> {
    let (adapter, model) = load_model(&args.fixture, args.sizes)?;
    let reference = TensorFile::read(args.fixture.join("reference.safetensors"))?;
    let (x, target) = (tensor(&reference, "train.x")?, tensor(&reference, "train.target")?);
    let losses = train(&model, &x, &target, args.steps, args.lr, out)?;
    let layers = model.layers.iter().map(|(name, layer)| (name.as_str(), layer));
    to_peft_adapter(adapter.config(), layers)?.save(&args.output)?;
    Ok(losses)
}

fn main() {
    let args = std::env::args().skip(1).collect::<Vec<_>>();
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("{USAGE}");
        return;
    }
    let args = match parse_args(args) {
        Ok(args) => args,
        Err(e) => {
            eprintln!("candle_train_vera: {e} ({USAGE})");
            std::process::exit(2);
        }
    };
    if let Err(e) = run(&args, &mut std::io::stdout().lock()) {
        eprintln!("candle_train_vera: {e}");
        std::process::exit(1);
    }
}
