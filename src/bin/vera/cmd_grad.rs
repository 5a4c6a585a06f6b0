//! `vera grad`: a PEFT VeRA module's gradients for an input and an upstream gradient, from the
//! command line (the fused backward pass).
//!
//! As the other PEFT commands: every failure is one line (main prints it and exits non-zero), and
//! the output is written to a temporary file and renamed, so a failed command leaves no file.

// The argument docs are also the --help text, where shapes read `[T, in_features]`, not links.
#![allow(rustdoc::broken_intra_doc_links)]

use std::path::PathBuf;

use clap::Args;
use vera_kernels::peft::{write_safetensors, PeftAdapter, ProjectionSizes, Tensor, TensorFile};
use vera_kernels::{backward, with_element_type, DType, Element, Error, Gradients, MatMut, MatRef, Mode};

use super::cmd_peft::{check_in_features, message, module, print, shape_text, tensor, SizeArgs};

/// `vera grad`.
#[derive(Args)]
pub struct GradArgs {
    /// The adapter directory.
    #[arg(long, value_name = "DIR")]
    adapter: PathBuf,
    /// The adapted module, as named in the adapter (e.g. model.layers.0.self_attn.q_proj).
    #[arg(long, value_name = "NAME")]
    module: String,
    /// A safetensors file holding the input x [T, in_features] and the upstream gradient
    /// dy = dL/dy [T, out_features].
    #[arg(long, value_name = "FILE")]
    input: PathBuf,
    /// The key of x in the input file.
    #[arg(long = "input-key", value_name = "KEY", default_value = "x")]
    input_key: String,
    /// The key of dy in the input file.
    #[arg(long = "dy-key", value_name = "KEY", default_value = "dy")]
    dy_key: String,
    /// The safetensors file to write, with grad_lambda_d [r], grad_lambda_b [out_features] and
    /// grad_x [T, in_features] (the adapter's part of dL/dx), all f32.
    #[arg(long, value_name = "FILE")]
    output: PathBuf,
    #[command(flatten)]
    sizes: SizeArgs,
    /// The element type to compute in (default: x's).
    #[arg(long, value_name = "f32|f16|bf16", value_parser = super::parse_dtype)]
    dtype: Option<DType>,
}

/// A 2-D tensor's shape `[rows, cols]` (`cols >= 1`), or a one-line error naming it.
fn matrix(path: &str, key: &str, t: &Tensor, cols_name: &str) -> Result<[usize; 2], String> {
    match *t.shape() {
        [rows, cols] if cols > 0 => Ok([rows, cols]),
        _ => Err(Error::TensorShape {
            path: path.to_string(),
            key: key.to_string(),
            expected: format!("[T, {cols_name}], {cols_name} >= 1"),
            actual: t.shape().to_vec(),
        }
        .to_string()),
    }
}

/// `vera grad`.
pub fn grad_cmd(args: GradArgs) -> Result<(), String> {
    let adapter = PeftAdapter::load(&args.adapter).map_err(|e| e.to_string())?;
    let m = module(&adapter, &args.module)?.out_features();
    let input = TensorFile::read(&args.input).map_err(|e| e.to_string())?;
    let path = args.input.display().to_string();
    let (x, dy) = (tensor(&input, &args.input_key)?, tensor(&input, &args.dy_key)?);
    let [t, n] = matrix(&path, &args.input_key, &x, "in_features")?;
    let dy_shape = matrix(&path, &args.dy_key, &dy, "out_features")?;
    if dy_shape != [t, m] {
        return Err(Error::TensorShape {
            path,
            key: args.dy_key.clone(),
            expected: format!("[{t}, {m}] (x's rows, module {:?}'s out_features)", args.module),
            actual: dy_shape.to_vec(),
        }
        .to_string());
    }
    let dtype = args.dtype.unwrap_or(x.dtype());
    let sizes = args.sizes.sizes();
    let (dld, dlb, dx) = with_element_type!(dtype, T => run_grad::<T>(&adapter, &args.module, sizes, (&x, &dy), t, n))
        .map_err(message)?;
    let r = dld.len();
    let tensors = [
        ("grad_lambda_d", Tensor::new(DType::F32, vec![r], dld).map_err(|e| e.to_string())?),
        ("grad_lambda_b", Tensor::new(DType::F32, vec![m], dlb).map_err(|e| e.to_string())?),
        ("grad_x", Tensor::new(DType::F32, vec![t, n], dx).map_err(|e| e.to_string())?),
    ];
    let named: Vec<(&str, &Tensor)> = tensors.iter().map(|(k, v)| (*k, v)).collect();
    write_safetensors(&args.output, &named, None).map_err(|e| e.to_string())?;
    print(&format!(
        "wrote grad_lambda_d {}, grad_lambda_b {}, grad_x {} (f32, computed in {dtype}) to {}\n",
        shape_text(&[r]),
        shape_text(&[m]),
        shape_text(&[t, n]),
        args.output.display()
    ))
}

/// Each of the three gradients.
type Grads = (Vec<f32>, Vec<f32>, Vec<f32>);

/// The backward pass in `T`; returns the gradients in f32 (dx widened exactly).
fn run_grad<T: Element>(
    adapter: &PeftAdapter,
    name: &str,
    sizes: Option<ProjectionSizes>,
    (x, dy): (&Tensor, &Tensor),
    t: usize,
    n: usize,
) -> Result<Grads, Error> {
    let module = adapter.module(name)?;
    let m = module.out_features();
    let projections = adapter.projections::<T>(sizes)?;
    check_in_features(&projections, name, n)?;
    let (x, dy): (Vec<T>, Vec<T>) = (x.to_elements(), dy.to_elements());
    let (mut dld, mut dlb, mut dx) = (vec![0.0f32; module.rank()], vec![0.0f32; m], vec![T::default(); t * n]);
    let grads = Gradients::new(&mut dld, &mut dlb).with_x(MatMut::from_slice(&mut dx, t, n)?);
    let (xv, dyv) = (MatRef::from_slice(&x, t, n)?, MatRef::from_slice(&dy, t, m)?);
    backward(&projections, module.adapter(), xv, dyv, None, grads, Mode::Overwrite)?;
    Ok((dld, dlb, dx.iter().map(|v| v.to_f32()).collect()))
}
