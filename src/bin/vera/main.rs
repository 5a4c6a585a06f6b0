//! `vera`: the command-line front end of vera-kernels.
//!
//! `vera bench` times the fused VeRA forward against the dense baseline (form ΔW, then x·ΔWᵀ) and
//! the unfused three-pass peer, on a built-in suite of shapes or on the ones given.
//!
//! `vera inspect`, `vera forward`, `vera merge` and `vera grad` read HuggingFace PEFT VeRA adapters:
//! show one, run a module's adapter on inputs from a safetensors file, merge its ΔW into a weight,
//! compute its gradients for an input and an upstream gradient.

mod bench;
#[cfg(feature = "cuda")]
mod bench_cuda;
mod bench_mixed;
mod cmd_export;
mod cmd_grad;
mod cmd_peft;
mod peak;
mod workload;

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use vera_kernels::DType;

use workload::{Shape, DEFAULT_SUITE};

#[derive(Parser)]
#[command(name = "vera", version, about = "Fused VeRA adapter kernels: benchmarks and tools")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Time fused vs dense baseline vs unfused (and with --backward a training step) on the default
    /// suite (or the given shapes).
    Bench(BenchArgs),
    /// Show a PEFT VeRA adapter directory: config, projections, modules, parameter counts.
    Inspect(cmd_peft::InspectArgs),
    /// Run a module's adapter (plus its base layer with --base) on x from a safetensors file.
    Forward(cmd_peft::ForwardArgs),
    /// Merge (or --unmerge) a module's ΔW into a weight of a safetensors file.
    Merge(cmd_peft::MergeArgs),
    /// A module's gradients (lambda_d, lambda_b, the adapter's part of x) for x and dy = dL/dy.
    Grad(cmd_grad::GradArgs),
    /// Write the adapter as the exact PEFT LoRA adapter with the same ΔW (rank r, no SVD).
    ExportLora(cmd_export::ExportLoraArgs),
}

#[derive(clap::Args)]
struct BenchArgs {
    /// A case as T,n,m,r (tokens, in_features, out_features, rank); repeat for several.
    /// Without it the default suite runs.
    #[arg(long = "shape", value_name = "T,n,m,r")]
    shapes: Vec<Shape>,
    /// Element type; repeat for several. Without it every dtype runs.
    #[arg(long = "dtype", value_name = "f32|f16|bf16", value_parser = parse_dtype)]
    dtypes: Vec<DType>,
    /// Worker threads (default: one per core).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    threads: Option<u16>,
    /// Print one JSON object per case instead of a table.
    #[arg(long)]
    json: bool,
    /// Skip the dense baseline (it forms the whole m x n ΔW, which is slow and large).
    #[arg(long)]
    no_dense: bool,
    /// Also time training: the backward alone, a training step (the training forward saving h,
    /// then the backward reusing it) and a step that recomputes h (with `--device cuda`, whose
    /// backward recomputes h, the backward and one step); JSON gains `backward_ms`,
    /// `train_step_ms` and (on the CPU) `train_step_recompute_ms`, `backward_unfused_ms` (the
    /// unfused backward peer: v and g materialised, the same kernels) and `train_step_dense_ms`
    /// (the dense baseline's step: ΔW formed, the gradients through it; null with --no-dense).
    #[arg(long)]
    backward: bool,
    /// Time a batch mixing K adapters (row t uses adapter t % K): the mixed forward against one
    /// adapter on every row, a per-adapter loop (gather, forward, scatter) and, unless --no-dense,
    /// each adapter's ΔW formed and applied to its rows. CPU only.
    #[arg(long, value_name = "K", value_parser = clap::value_parser!(u32).range(1..=65536))]
    adapters: Option<u32>,
    /// With --adapters: how rows are assigned to adapters. `interleaved` (row t uses adapter
    /// t % K: every block of rows reads every adapter's vectors, the worst case) or `runs` (K
    /// contiguous runs of rows, as requests of K users batched one after the other).
    #[arg(long = "rows", default_value = "interleaved", value_parser = ["interleaved", "runs"], requires = "adapters")]
    rows_layout: String,
    /// Measure this machine's peaks first (f32 FMA, bf16 dot product, cache and memory read
    /// bandwidth) and print each case's share of the roofline that binds it.
    #[arg(long)]
    peak: bool,
    /// Minimum time spent measuring each method of each case, in milliseconds.
    #[arg(long, default_value_t = 300)]
    budget_ms: u64,
    /// Where to run: `cpu` (default), or `cuda` (GPU 0; needs a build with `--features cuda`).
    #[arg(long, default_value = "cpu", value_parser = ["cpu", "cuda"])]
    device: String,
    /// With `--device cuda`: `warm` (default) times every call on the same A and B, which stay in
    /// the GPU's L2 when they fit; `cold` rotates each call over copies of A and B filling four
    /// L2s, so they come from device memory (cases are named `<shape>_l2cold`).
    #[arg(long, default_value = "warm", value_parser = ["warm", "cold"])]
    l2: String,
}

fn parse_dtype(s: &str) -> Result<DType, String> {
    s.parse::<DType>().map_err(|e| e.to_string())
}

fn bench(args: BenchArgs) -> Result<(), String> {
    if args.device == "cuda" {
        if args.adapters.is_some() {
            return Err("--adapters: only on the CPU for now (the GPU bench times one adapter per call)".into());
        }
        return bench_cuda(args);
    }
    if args.adapters.is_some() && (args.backward || args.peak) {
        return Err("--adapters: times the mixed forward only (without --backward and --peak)".into());
    }
    if args.l2 != "warm" {
        return Err("--l2 cold: only with --device cuda (the CPU bench times with warm caches)".into());
    }
    if let Ok(v) = std::env::var("VERA_KERNELS_ISA") {
        v.parse::<vera_kernels::Isa>().map_err(|e| format!("VERA_KERNELS_ISA: {e}"))?;
    }
    let shapes = if args.shapes.is_empty() { DEFAULT_SUITE.to_vec() } else { args.shapes };
    let dtypes = if args.dtypes.is_empty() { vec![DType::F32, DType::F16, DType::BF16] } else { args.dtypes };
    let threads = args.threads.map_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()), usize::from);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .map_err(|e| format!("cannot start {threads} threads: {e}"))?;
    let budget = Duration::from_millis(args.budget_ms);
    if let Some(k) = args.adapters {
        let runs = args.rows_layout == "runs";
        let setup = bench_mixed::Setup { adapters: k as usize, runs, threads, dense: !args.no_dense, budget };
        return bench_adapters(&pool, &shapes, &dtypes, setup, args.json);
    }
    let methods = bench::Methods { dense: !args.no_dense, backward: args.backward };
    // A CPU with AMX whose tier is off (the OS refused tile state): say why, since bf16 then runs
    // several times slower. (A CPU without AMX, the common case, needs no note.)
    if let Some(why) = vera_kernels::Isa::Amx.unavailable_reason() {
        if !why.starts_with("this CPU") {
            eprintln!("note: the amx tier is off: {why}");
        }
    }
    let peak = args.peak.then(|| pool.install(|| peak::measure(threads)));
    if let Some(p) = &peak {
        let line = bench::peak_line(p);
        // JSON lines keep exactly the documented keys: the machine's peaks go to stderr.
        if args.json {
            eprintln!("{line}");
        } else {
            println!("{line}");
        }
    }
    if !args.json {
        println!("{}", bench::table_header(peak.is_some(), args.backward));
    }
    for dtype in dtypes {
        for &shape in &shapes {
            let row = pool
                .install(|| bench::run(shape, dtype, threads, methods, budget))
                .map_err(|e| format!("case {shape} ({dtype}): {e}"))?;
            if args.json {
                println!("{}", row.json());
            } else {
                // Decode is bound by the bytes it moves: measure the read bandwidth at that size.
                let read_gbps = match (&peak, row.decode_bytes()) {
                    (Some(_), Some(bytes)) => Some(pool.install(|| peak::read_gbps_at(threads, bytes))),
                    _ => None,
                };
                println!("{}", bench::table_row(&row, peak.as_ref().map(|p| (p, read_gbps))));
            }
        }
    }
    Ok(())
}

/// `vera bench --adapters K`: see `bench_mixed`.
fn bench_adapters(
    pool: &rayon::ThreadPool,
    shapes: &[Shape],
    dtypes: &[DType],
    setup: bench_mixed::Setup,
    json: bool,
) -> Result<(), String> {
    if !json {
        println!("{}", bench_mixed::MixedRow::header());
    }
    for &dtype in dtypes {
        for &shape in shapes {
            let row = pool
                .install(|| bench_mixed::run(shape, dtype, setup))
                .map_err(|e| format!("case {shape} ({dtype}, {} adapters): {e}", setup.adapters))?;
            println!("{}", if json { row.json() } else { row.table_row() });
        }
    }
    Ok(())
}

/// `vera bench --device cuda`: the fused forward on GPU 0, with `--backward` the training step too
/// (no dense or unfused peer there; compare with `benches/peers/torch_vera.py --device cuda`).
#[cfg(feature = "cuda")]
fn bench_cuda(args: BenchArgs) -> Result<(), String> {
    let device = vera_kernels::cuda::CudaDevice::new(0).map_err(|e| e.to_string())?;
    let shapes = if args.shapes.is_empty() { DEFAULT_SUITE.to_vec() } else { args.shapes };
    let dtypes = if args.dtypes.is_empty() { vec![DType::F32, DType::F16, DType::BF16] } else { args.dtypes };
    let budget = Duration::from_millis(args.budget_ms);
    let l2: bench_cuda::L2 = args.l2.parse()?;
    let copy_gbps = if args.peak {
        let gbps = device.stream().measure_copy_gbps(1 << 30).map_err(|e| e.to_string())?;
        let line = format!("peak ({}): device-to-device copy {gbps:.0} GB/s (1 GiB, read + write)", device.name());
        if args.json {
            eprintln!("{line}");
        } else {
            println!("{line}");
        }
        Some(gbps)
    } else {
        None
    };
    if !args.json {
        println!("device: {} (each call timed with CUDA events; median)", device.name());
        println!("{}", bench_cuda::table_header());
    }
    for dtype in dtypes {
        for &shape in &shapes {
            let row = bench_cuda::run(&device, shape, dtype, l2, budget, args.backward)
                .map_err(|e| format!("case {shape} ({dtype}): {e}"))?;
            if args.json {
                println!("{}", row.json());
            } else {
                println!("{}", row.table_row(copy_gbps));
            }
        }
    }
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn bench_cuda(_args: BenchArgs) -> Result<(), String> {
    Err("--device cuda: this vera was built without the `cuda` feature (cargo build --release --features cuda)".into())
}

fn main() -> ExitCode {
    run(std::env::args_os())
}

/// The whole command for the arguments `args` (the program name first): what `main` runs, as a
/// function so that the fuzz target `cli` (fuzz/) can run the command in-process.
pub(crate) fn run(args: impl IntoIterator<Item = std::ffi::OsString>) -> ExitCode {
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => return cmd_peft::usage_error(e),
    };
    let result = match cli.command {
        Command::Bench(args) => bench(args),
        Command::Inspect(args) => cmd_peft::inspect(args),
        Command::Forward(args) => cmd_peft::forward_cmd(args),
        Command::Merge(args) => cmd_peft::merge_cmd(args),
        Command::Grad(args) => cmd_grad::grad_cmd(args),
        Command::ExportLora(args) => cmd_export::export_lora_cmd(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("vera: error: {msg}");
            ExitCode::FAILURE
        }
    }
}
