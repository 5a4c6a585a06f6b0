//! `vera inspect`, `vera forward`, `vera merge`: PEFT VeRA adapters from the command line.
//!
//! Every failure is returned as one line of text (main prints it on stderr and exits non-zero);
//! outputs are written to a temporary file and renamed, so a failed command leaves no file.

// The argument docs are also the --help text, where shapes read `[T, in_features]`, not links.
#![allow(rustdoc::broken_intra_doc_links)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::error::ErrorKind;
use clap::Args;
use rayon::prelude::*;
use vera_kernels::peft::{
    write_safetensors, PeftAdapter, PeftAdapters, ProjectionSizes, TargetModules, Tensor, TensorFile, VeraModule,
};
use vera_kernels::{
    forward, forward_mixed, with_element_type, Adapter, AdapterBank, DType, Element, Error, MatMut, MatRef, Mode,
    Projections,
};

/// `vera inspect DIR`.
#[derive(Args)]
pub struct InspectArgs {
    /// The adapter directory (adapter_config.json and adapter_model.safetensors).
    #[arg(value_name = "DIR")]
    dir: PathBuf,
}

/// The projection sizes, needed when the adapter does not save its projections.
#[derive(Args)]
pub(crate) struct SizeArgs {
    /// The largest in_features of the adapted layers of the base model (PEFT's n_max), needed to
    /// regenerate projections that the adapter does not save.
    #[arg(long = "n-max", value_name = "N", requires = "m_max")]
    n_max: Option<usize>,
    /// The largest out_features of the adapted layers of the base model (PEFT's m_max).
    #[arg(long = "m-max", value_name = "M", requires = "n_max")]
    m_max: Option<usize>,
}

impl SizeArgs {
    pub(crate) fn sizes(&self) -> Option<ProjectionSizes> {
        Some(ProjectionSizes { n_max: self.n_max?, m_max: self.m_max? })
    }
}

/// `vera forward`.
#[derive(Args)]
pub struct ForwardArgs {
    /// The adapter directory. Repeat it for a batch mixing several adapters (adapter 0, 1, ... in
    /// the order given; they must share their projections), together with --rows-key.
    #[arg(long, value_name = "DIR", required = true)]
    adapter: Vec<PathBuf>,
    /// The key of an integer tensor [T] in the input file holding each row's adapter: an index
    /// into the --adapter list, or -1 for no adapter (such a row gets only the base layer, or zeros
    /// without --base). Runs the mixed-adapter forward.
    #[arg(long = "rows-key", value_name = "KEY")]
    rows_key: Option<String>,
    /// The adapted module, as named in the adapter (e.g. model.layers.0.self_attn.q_proj).
    #[arg(long, value_name = "NAME")]
    module: String,
    /// A safetensors file holding the input x [T, in_features] (any leading dimensions).
    #[arg(long, value_name = "FILE")]
    input: PathBuf,
    /// The key of x in the input file.
    #[arg(long = "input-key", value_name = "KEY", default_value = "x")]
    input_key: String,
    /// The safetensors file to write, with one tensor "y" [T, out_features].
    #[arg(long, value_name = "FILE")]
    output: PathBuf,
    /// A safetensors file holding the base layer's weight (and bias): y is then base + adapter.
    #[arg(long, value_name = "FILE", requires = "weight_key")]
    base: Option<PathBuf>,
    /// The key of the base weight [out_features, in_features] ([in, out] when the adapter says
    /// fan_in_fan_out).
    #[arg(long = "weight-key", value_name = "KEY", requires = "base")]
    weight_key: Option<String>,
    /// The key of the base bias [out_features].
    #[arg(long = "bias-key", value_name = "KEY", requires = "base")]
    bias_key: Option<String>,
    #[command(flatten)]
    sizes: SizeArgs,
    /// The element type to compute and write y in (default: the input's).
    #[arg(long, value_name = "f32|f16|bf16", value_parser = super::parse_dtype)]
    dtype: Option<DType>,
}

/// `vera merge`.
#[derive(Args)]
pub struct MergeArgs {
    /// The adapter directory.
    #[arg(long, value_name = "DIR")]
    adapter: PathBuf,
    /// The adapted module whose ΔW is merged.
    #[arg(long, value_name = "NAME")]
    module: String,
    /// A safetensors file holding the base weight (e.g. a model checkpoint).
    #[arg(long, value_name = "FILE")]
    weights: PathBuf,
    /// The key of the weight [out_features, in_features] ([in, out] when fan_in_fan_out).
    #[arg(long = "weight-key", value_name = "KEY")]
    weight_key: String,
    /// The safetensors file to write: the weights file with this weight merged, every other tensor
    /// copied unchanged. May be the weights file itself.
    #[arg(long, value_name = "FILE")]
    output: PathBuf,
    /// Subtract ΔW instead (undo a merge).
    #[arg(long)]
    unmerge: bool,
    #[command(flatten)]
    sizes: SizeArgs,
}

/// Prints a command-line parsing error as one line on stderr (help and version as clap does).
pub fn usage_error(e: clap::Error) -> ExitCode {
    if matches!(
        e.kind(),
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        let _ = e.print();
        return ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(2));
    }
    let text = e.render().to_string();
    // The first paragraph: the usage and the pointer to --help follow it.
    let text = text.split("\n\n").next().unwrap_or_default();
    let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
    let text = text.strip_prefix("error: ").unwrap_or(&text);
    eprintln!("vera: error: {text} (see --help)");
    ExitCode::from(2)
}

/// Writes `text` to stdout; a closed pipe (`vera inspect | head`) is not a failure.
pub(crate) fn print(text: &str) -> Result<(), String> {
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(format!("cannot write to stdout: {e}")),
        _ => Ok(()),
    }
}

pub(crate) fn shape_text(shape: &[usize]) -> String {
    format!("{shape:?}")
}

/// `vera inspect DIR`.
pub fn inspect(args: InspectArgs) -> Result<(), String> {
    let adapter = PeftAdapter::load(&args.dir).map_err(|e| e.to_string())?;
    print(&inspect_text(&args.dir, &adapter))
}

fn inspect_text(dir: &Path, adapter: &PeftAdapter) -> String {
    let c = adapter.config();
    let mut out = String::new();
    let mut line = |k: &str, v: String| out.push_str(&format!("{:<16}{v}\n", format!("{k}:")));
    line("adapter", dir.display().to_string());
    let version =
        c.field("peft_version").map(|v| format!(" (peft_version {})", v.trim_matches('"'))).unwrap_or_default();
    line("peft_type", format!("VERA{version}"));
    line("r", c.r.to_string());
    line("seed", format!("{} (projection_prng_key)", c.projection_prng_key));
    let widest = adapter.modules().values().map(VeraModule::out_features).max().unwrap_or(0);
    match adapter.saved_projections() {
        Some((a, b)) => line(
            "projections",
            format!(
                "saved: vera_A {} {}, vera_B {} {} (n_max = {}, m_max = {})",
                shape_text(a.shape()),
                a.dtype(),
                shape_text(b.shape()),
                b.dtype(),
                a.shape()[1],
                b.shape()[0]
            ),
        ),
        None => line(
            "projections",
            format!(
                "not saved: regenerated from the seed; give --n-max N --m-max M (the base model's largest \
                 adapted in/out features; M >= {widest})"
            ),
        ),
    }
    line("fan_in_fan_out", c.fan_in_fan_out.to_string());
    line("bias", c.bias.name().to_string());
    let targets = match &c.target_modules {
        TargetModules::Names(names) => names.join(", "),
        TargetModules::Pattern(p) => format!("pattern {p:?}"),
        TargetModules::Unspecified => "unspecified (PEFT's defaults for the architecture)".to_string(),
    };
    line("target_modules", targets);
    line("modules", adapter.modules().len().to_string());

    let width = adapter.modules().keys().map(String::len).max().unwrap_or(0).max("module".len());
    out.push_str(&format!(
        "\n{:<width$}  {:<8}  {:<8}  {:>10}  dtype\n",
        "module", "lambda_d", "lambda_b", "parameters"
    ));
    for (name, m) in adapter.modules() {
        let (d, b) = (m.lambda_d().dtype(), m.lambda_b().dtype());
        let dtype = if d == b { d.to_string() } else { format!("{d} (lambda_d), {b} (lambda_b)") };
        out.push_str(&format!(
            "{name:<width$}  {:<8}  {:<8}  {:>10}  {dtype}\n",
            shape_text(m.lambda_d().shape()),
            shape_text(m.lambda_b().shape()),
            m.parameter_count()
        ));
    }
    out.push_str(&format!(
        "\ntrainable parameters: {} (lambda_d + lambda_b over {} modules)\n",
        adapter.parameter_count(),
        adapter.modules().len()
    ));
    match adapter.projection_sizes() {
        Some(s) => out.push_str(&format!(
            "projection parameters: {} (r x (n_max + m_max), frozen, shared by every module)\n",
            c.r * (s.n_max + s.m_max)
        )),
        None => out.push_str("projection parameters: none stored (r x (n_max + m_max) once drawn from the seed)\n"),
    }
    out
}

/// An error as one line, in the command's terms.
pub(crate) fn message(e: Error) -> String {
    match e {
        Error::MissingProjectionSizes { .. } => format!("{e} (--n-max N --m-max M)"),
        e => e.to_string(),
    }
}

/// A tensor of a file; when it is missing, the message lists the keys the file has.
pub(crate) fn tensor(file: &TensorFile, key: &str) -> Result<Tensor, String> {
    file.tensor(key).map_err(|e| match e {
        Error::MissingTensor { .. } => {
            let keys: Vec<&str> = file.keys().collect();
            let shown = keys.iter().take(12).map(|k| format!("{k:?}")).collect::<Vec<_>>().join(", ");
            let more = if keys.len() > 12 { format!(" and {} more", keys.len() - 12) } else { String::new() };
            format!("{e} (it has {shown}{more})")
        }
        e => e.to_string(),
    })
}

/// The module, with its name in the error when it is not there.
pub(crate) fn module<'a>(adapter: &'a PeftAdapter, name: &str) -> Result<&'a VeraModule, String> {
    adapter.module(name).map_err(|e| e.to_string())
}

/// Checks that the projections cover a layer with `n` inputs of `module`.
pub(crate) fn check_in_features<T: Element>(projections: &Projections<T>, module: &str, n: usize) -> Result<(), Error> {
    if n > projections.n_max() {
        return Err(Error::ProjectionsTooSmall {
            module: module.to_string(),
            what: "in_features",
            needed: n,
            given: projections.n_max(),
        });
    }
    Ok(())
}

/// The base layer of `vera forward --base`: its weight as `[m, n]` (transposed from `[n, m]` when
/// fan_in_fan_out) and its bias.
struct Base {
    weight: Tensor,
    bias: Option<Tensor>,
}

fn read_base(args: &ForwardArgs, n: usize, m: usize, fan_in_fan_out: bool) -> Result<Option<Base>, String> {
    let (Some(path), Some(weight_key)) = (&args.base, &args.weight_key) else { return Ok(None) };
    let file = TensorFile::read(path).map_err(|e| e.to_string())?;
    let w = tensor(&file, weight_key)?;
    let (expected, layout) = if fan_in_fan_out {
        ([n, m], "[in_features, out_features], fan_in_fan_out")
    } else {
        ([m, n], "[out_features, in_features]")
    };
    if w.shape() != expected {
        return Err(Error::TensorShape {
            path: path.display().to_string(),
            key: weight_key.clone(),
            expected: format!(
                "{expected:?} ({layout}; in_features = {n} from the input, out_features = {m} from module {:?})",
                args.module
            ),
            actual: w.shape().to_vec(),
        }
        .to_string());
    }
    let weight = if fan_in_fan_out {
        let data = w.data();
        let t: Vec<f32> = (0..m).flat_map(|i| (0..n).map(move |k| data[k * m + i])).collect();
        Tensor::new(w.dtype(), vec![m, n], t).map_err(|e| e.to_string())?
    } else {
        w
    };
    let bias = match &args.bias_key {
        None => None,
        Some(key) => {
            let b = tensor(&file, key)?;
            if b.shape() != [m] {
                return Err(Error::TensorShape {
                    path: path.display().to_string(),
                    key: key.clone(),
                    expected: format!("[{m}] (out_features of module {:?})", args.module),
                    actual: b.shape().to_vec(),
                }
                .to_string());
            }
            Some(b)
        }
    };
    Ok(Some(Base { weight, bias }))
}

/// `Σ_k a[k]·b[k]` in f32 with eight independent partial sums (vectorisable).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ta, tb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let tail: f32 = ta.iter().zip(tb).map(|(x, y)| x * y).sum();
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

/// `x·Wᵀ + b` for `x [t, n]` in `T`, with `W [m, n]` and `b` rounded to `T` first (the base layer
/// stored in the compute dtype), accumulated in f32 and rounded once.
fn base_output<T: Element>(x: &[T], t: usize, n: usize, m: usize, base: &Base) -> Vec<T> {
    let w = base.weight.to_dtype(T::DTYPE);
    let bias = base.bias.as_ref().map(|b| b.to_dtype(T::DTYPE));
    let mut y = vec![T::default(); t * m];
    if n == 0 || m == 0 {
        return y;
    }
    y.par_chunks_mut(m).zip(x.par_chunks(n)).for_each(|(y_row, x_row)| {
        let xf: Vec<f32> = x_row.iter().map(|v| v.to_f32()).collect();
        for (i, (out, w_row)) in y_row.iter_mut().zip(w.data().chunks_exact(n)).enumerate() {
            let b = bias.as_ref().map_or(0.0, |b| b.data()[i]);
            *out = T::from_f32(dot(&xf, w_row) + b);
        }
    });
    y
}

/// `vera forward`.
pub fn forward_cmd(args: ForwardArgs) -> Result<(), String> {
    if args.adapter.len() > 1 && args.rows_key.is_none() {
        return Err(format!(
            "{} adapters given: a mixed batch needs --rows-key KEY, the input's tensor of each row's adapter",
            args.adapter.len()
        ));
    }
    let set = PeftAdapters::load(&args.adapter).map_err(|e| e.to_string())?;
    let fan_in_fan_out = set.adapters()[0].config().fan_in_fan_out;
    if let Some(i) = set.adapters().iter().position(|a| a.config().fan_in_fan_out != fan_in_fan_out) {
        return Err(format!(
            "adapter {} says fan_in_fan_out = {}, adapter 0 says {fan_in_fan_out}: one base layer cannot be both",
            args.adapter[i].display(),
            !fan_in_fan_out
        ));
    }
    let m = module(&set.adapters()[0], &args.module)?.out_features();
    let input = TensorFile::read(&args.input).map_err(|e| e.to_string())?;
    let x = tensor(&input, &args.input_key)?;
    let shape = x.shape().to_vec();
    let Some((&n, lead)) = shape.split_last().filter(|(&n, _)| n > 0) else {
        return Err(Error::TensorShape {
            path: args.input.display().to_string(),
            key: args.input_key.clone(),
            expected: "[T, in_features] (or any leading dimensions), in_features >= 1".to_string(),
            actual: shape,
        }
        .to_string());
    };
    let t = lead.iter().product::<usize>();
    if t.checked_mul(m).is_none() {
        return Err(format!("the output y [{t}, {m}] does not fit in memory"));
    }
    let which = match &args.rows_key {
        None => Which::One(set.adapters()[0].module(&args.module).map_err(|e| e.to_string())?.adapter()),
        Some(key) => {
            let bank = set.bank(&args.module).map_err(|e| e.to_string())?;
            Which::Mixed(bank, row_adapters(&input, key, lead, set.adapters().len())?)
        }
    };
    let base = read_base(&args, n, m, fan_in_fan_out)?;
    let dtype = args.dtype.unwrap_or(x.dtype());
    let sizes = args.sizes.sizes();
    let y =
        with_element_type!(dtype, T => run_forward::<T>(&set, &args.module, sizes, &which, &x, t, n, base.as_ref()))
            .map_err(message)?;
    let out_shape: Vec<usize> = lead.iter().copied().chain([m]).collect();
    let y = Tensor::new(dtype, out_shape, y).map_err(|e| e.to_string())?;
    write_safetensors(&args.output, &[("y", &y)], None).map_err(|e| e.to_string())?;
    let what = match (&which, base.is_some()) {
        (Which::One(_), true) => "base + adapter".to_string(),
        (Which::One(_), false) => "adapter contribution".to_string(),
        (Which::Mixed(b, _), true) => format!("base + each row's adapter of {}", b.len()),
        (Which::Mixed(b, _), false) => format!("each row's adapter of {}", b.len()),
    };
    print(&format!("wrote y {} {dtype} ({what}) to {}\n", shape_text(y.shape()), args.output.display()))
}

/// The adapter(s) of one `vera forward`: one for every row, or a bank with each row's index.
enum Which<'a> {
    One(&'a Adapter),
    Mixed(AdapterBank, Vec<i32>),
}

/// The row → adapter map of a mixed batch: an integer tensor with x's leading shape, each value
/// in `-1..adapters`.
fn row_adapters(input: &TensorFile, key: &str, lead: &[usize], adapters: usize) -> Result<Vec<i32>, String> {
    let shape = input.shape(key).map_err(|e| e.to_string())?;
    if shape != lead {
        return Err(Error::TensorShape {
            path: input.path().display().to_string(),
            key: key.to_string(),
            expected: format!("{lead:?} (x's leading dimensions: one adapter index per row)"),
            actual: shape.to_vec(),
        }
        .to_string());
    }
    let values = input.integers(key).map_err(|e| e.to_string())?;
    values
        .iter()
        .enumerate()
        .map(|(row, &v)| match i32::try_from(v) {
            Ok(v) if (-1..adapters as i64).contains(&i64::from(v)) => Ok(v),
            _ => Err(format!(
                "{}: tensor {key:?} row {row} names adapter {v}, but {adapters} --adapter were given \
                 (valid: 0..{adapters}, or -1 for no adapter)",
                input.path().display()
            )),
        })
        .collect()
}

/// The forward pass in `T`; returns y widened to f32 (exact).
#[allow(clippy::too_many_arguments)]
fn run_forward<T: Element>(
    set: &PeftAdapters,
    name: &str,
    sizes: Option<ProjectionSizes>,
    which: &Which<'_>,
    x: &Tensor,
    t: usize,
    n: usize,
    base: Option<&Base>,
) -> Result<Vec<f32>, Error> {
    let m = set.adapters()[0].module(name)?.out_features();
    let projections = set.projections::<T>(sizes)?;
    check_in_features(&projections, name, n)?;
    let x: Vec<T> = x.to_elements();
    let (mut y, mode) = match base {
        Some(base) => (base_output(&x, t, n, m, base), Mode::Accumulate),
        None => (vec![T::default(); t * m], Mode::Overwrite),
    };
    let (xv, yv) = (MatRef::from_slice(&x, t, n)?, MatMut::from_slice(&mut y, t, m)?);
    match which {
        Which::One(adapter) => forward(&projections, adapter, xv, yv, mode)?,
        Which::Mixed(bank, rows) => forward_mixed(&projections, bank, rows, xv, yv, mode)?,
    }
    Ok(y.iter().map(|v| v.to_f32()).collect())
}

/// `vera merge`.
pub fn merge_cmd(args: MergeArgs) -> Result<(), String> {
    let adapter = PeftAdapter::load(&args.adapter).map_err(|e| e.to_string())?;
    let m = module(&adapter, &args.module)?.out_features();
    let file = TensorFile::read(&args.weights).map_err(|e| e.to_string())?;
    let w = tensor(&file, &args.weight_key)?;
    let fan_in_fan_out = adapter.config().fan_in_fan_out;
    let shape = w.shape().to_vec();
    let n = match (shape.as_slice(), fan_in_fan_out) {
        (&[rows, n], false) if rows == m && n > 0 => n,
        (&[n, cols], true) if cols == m && n > 0 => n,
        _ => {
            let expected = if fan_in_fan_out {
                format!("[in_features, {m}] ([in, out] as fan_in_fan_out says")
            } else {
                format!("[{m}, in_features] ([out, in]")
            };
            return Err(Error::TensorShape {
                path: args.weights.display().to_string(),
                key: args.weight_key.clone(),
                expected: format!("{expected}; out_features = {m} from module {:?})", args.module),
                actual: shape,
            }
            .to_string());
        }
    };
    let sizes = args.sizes.sizes();
    let dtype = w.dtype();
    let merged = with_element_type!(dtype, T => run_merge::<T>(&adapter, &args, sizes, &w, n)).map_err(message)?;
    let merged = Tensor::new(dtype, shape, merged).map_err(|e| e.to_string())?;
    file.write_replacing(&args.output, &[(&args.weight_key, &merged)]).map_err(|e| e.to_string())?;
    let what = if args.unmerge { "unmerged" } else { "merged" };
    let others = file.keys().count() - 1;
    print(&format!(
        "wrote {what} {} {} {dtype} to {} ({others} other tensors copied unchanged)\n",
        args.weight_key,
        shape_text(merged.shape()),
        args.output.display()
    ))
}

/// Merges in the weight's own dtype; returns the weight widened to f32 (exact).
fn run_merge<T: Element>(
    adapter: &PeftAdapter,
    args: &MergeArgs,
    sizes: Option<ProjectionSizes>,
    w: &Tensor,
    n: usize,
) -> Result<Vec<f32>, Error> {
    let projections = adapter.projections::<T>(sizes)?;
    check_in_features(&projections, &args.module, n)?;
    let mut w_t: Vec<T> = w.to_elements();
    let (rows, cols) = (w.shape()[0], w.shape()[1]);
    let view = MatMut::from_slice(&mut w_t, rows, cols)?;
    if args.unmerge {
        adapter.unmerge_module(&projections, &args.module, view)?;
    } else {
        adapter.merge_module(&projections, &args.module, view)?;
    }
    Ok(w_t.iter().map(|v| v.to_f32()).collect())
}
