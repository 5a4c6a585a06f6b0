//! `vera export-lora`: a PEFT VeRA adapter written as the exact PEFT LoRA adapter with the same ΔW.
//!
//! Every failure is returned as one line of text (main prints it on stderr and exits non-zero); the
//! adapter is written into a fresh directory that is renamed to the output at the end, so a failed
//! command leaves no output directory.

use std::path::PathBuf;

use clap::Args;
use vera_kernels::peft::{InFeatures, LoraExportOptions, PeftAdapter};
use vera_kernels::{DType, Error};

use super::cmd_peft::{message, print, SizeArgs};

/// `vera export-lora`.
#[derive(Args)]
pub struct ExportLoraArgs {
    /// The VeRA adapter directory (adapter_config.json and adapter_model.safetensors).
    #[arg(long, value_name = "DIR")]
    adapter: PathBuf,
    /// The LoRA adapter directory to write; it must not exist, or be empty.
    #[arg(long, value_name = "DIR")]
    output: PathBuf,
    /// The in_features of the adapted layers, which a VeRA adapter does not store: `N` for every
    /// module, `NAME=N` for the module NAME and every module whose name ends in `.NAME` (the
    /// longest NAME wins). Repeat: `--in-features 4096 --in-features down_proj=11008`.
    #[arg(long = "in-features", value_name = "[NAME=]N", value_parser = parse_in_features)]
    in_features: Vec<InFeaturesArg>,
    #[command(flatten)]
    sizes: SizeArgs,
    /// The dtype of the written lora_A / lora_B (each element rounded once).
    #[arg(long, value_name = "f32|f16|bf16", value_parser = super::parse_dtype, default_value = "f32")]
    dtype: DType,
}

/// One `--in-features` value: `N` or `NAME=N`.
#[derive(Clone, Debug)]
struct InFeaturesArg {
    name: Option<String>,
    n: usize,
}

fn parse_in_features(s: &str) -> Result<InFeaturesArg, String> {
    let (name, n) = match s.rsplit_once('=') {
        Some((name, n)) if !name.is_empty() => (Some(name.to_string()), n),
        Some(_) => return Err(format!("{s:?}: the module name before '=' is empty")),
        None => (None, s),
    };
    match n.parse::<usize>() {
        Ok(n) if n >= 1 => Ok(InFeaturesArg { name, n }),
        _ => Err(format!("{s:?}: expected N or NAME=N with N a positive integer")),
    }
}

/// `vera export-lora`.
pub fn export_lora_cmd(args: ExportLoraArgs) -> Result<(), String> {
    let adapter = PeftAdapter::load(&args.adapter).map_err(|e| e.to_string())?;
    let mut in_features = InFeatures::new();
    for arg in args.in_features {
        in_features = match arg.name {
            Some(name) => in_features.with(name, arg.n),
            None => in_features.with_default(arg.n),
        };
    }
    let mut options = LoraExportOptions::new(in_features).with_dtype(args.dtype);
    options.sizes = args.sizes.sizes();
    let lora = adapter.to_lora(&options).map_err(|e| match e {
        Error::MissingInFeatures { module } => format!(
            "module {module:?}: its in_features is not known (a VeRA adapter does not store it): give \
             --in-features {module}=N, or --in-features N for every module"
        ),
        Error::UnknownModule { .. } => format!("--in-features: {e}"),
        e => message(e),
    })?;
    lora.save(&args.output).map_err(|e| e.to_string())?;
    print(&format!(
        "wrote LoRA adapter (r = {}, lora_alpha = {}, {} modules, {}) to {}\n",
        lora.rank(),
        lora.rank(),
        lora.modules().len(),
        args.dtype,
        args.output.display()
    ))
}
