//! The `vera` command in-process: its argument parsing, the reading of the adapter and input files
//! it names (shapes, keys, dtypes) and the commands themselves, with argv drawn from a fixed
//! vocabulary of subcommands and flags plus fuzzed values, and the files made of fuzz bytes. Every
//! run exits (success or a one-line error), never panics, and a failed run leaves no output file
//! (nor a temporary one) behind.
//!
//! Input: four sections, each a little-endian u32 length + bytes (see `common::sections`), then
//! the rest: the argv tokens, `adapter_config.json` (shared by the two adapter directories), the
//! first and the second `adapter_model.safetensors`, and the input safetensors file (which also
//! serves as `--weights` and `--base`).
//!
//! argv tokens, one byte each: an index into `WORDS`; `0xF0..=0xFE` then a little-endian u16: that
//! number in decimal; `0xFF` then a length byte and that many raw bytes (not necessarily UTF-8).
//! The subcommand is `SUBCOMMANDS[first byte % 5]` (never `bench`: it times, it does not read files).
#![no_main]

mod common;

#[allow(dead_code, unexpected_cfgs, clippy::all)]
#[path = "../../src/bin/vera/main.rs"]
mod vera;

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;

const SUBCOMMANDS: [&str; 5] = ["inspect", "forward", "merge", "grad", "export-lora"];

/// Placeholders replaced by paths in the scratch directory.
const ADAPTER: &str = "@adapter";
const ADAPTER2: &str = "@adapter2";
const INPUT: &str = "@input";
const OUTPUT: &str = "@output";
const OUTPUT_DIR: &str = "@output-dir";
const MISSING: &str = "@missing";

const WORDS: &[&str] = &[
    "--adapter",
    "--module",
    "--input",
    "--input-key",
    "--output",
    "--base",
    "--weight-key",
    "--bias-key",
    "--n-max",
    "--m-max",
    "--dtype",
    "--rows-key",
    "--dy-key",
    "--weights",
    "--unmerge",
    "--in-features",
    "--help",
    ADAPTER,
    ADAPTER2,
    INPUT,
    OUTPUT,
    OUTPUT_DIR,
    MISSING,
    "layers.0",
    "layers.1",
    "layers.2",
    "x",
    "dy",
    "layers.0.x",
    "layers.1.x",
    "layers.0.dy",
    "layers.0.weight",
    "layers.0.bias",
    "layers.1.weight",
    "rows",
    "f32",
    "f16",
    "bf16",
    "f64",
    "0",
    "1",
    "-1",
    "24",
    "40",
    "48",
    "64",
    "layers.0=48",
    "layers.1=40",
    "layers.2=64",
    "--",
    "",
];

/// `--n-max`/`--m-max` beyond this are left out: projections that large are allocated as asked
/// (r·n_max elements), and sizes whose product overflows are handled separately.
const MAX_SIZE_ARG: u64 = 4096;

fn scratch() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| tempfile::Builder::new().prefix("vera-fuzz-cli").tempdir().expect("a scratch directory")).path()
}

fn decode(tokens: &[u8], dir: &Path) -> Vec<OsString> {
    let Some((&sub, mut rest)) = tokens.split_first() else { return Vec::new() };
    let mut argv = vec![OsString::from("vera"), OsString::from(SUBCOMMANDS[usize::from(sub) % SUBCOMMANDS.len()])];
    let path = |name: &str| dir.join(name).into_os_string();
    while let Some((&op, tail)) = rest.split_first() {
        rest = tail;
        let arg = match op {
            0xF0..=0xFE => {
                let Some((num, tail)) = rest.split_first_chunk::<2>() else { break };
                rest = tail;
                OsString::from(u16::from_le_bytes(*num).to_string())
            }
            0xFF => {
                let Some((&len, tail)) = rest.split_first() else { break };
                let len = usize::from(len).min(tail.len());
                rest = &tail[len..];
                OsString::from_vec(tail[..len].to_vec())
            }
            _ => match WORDS[usize::from(op) % WORDS.len()] {
                ADAPTER => path("a0"),
                ADAPTER2 => path("a1"),
                INPUT => path("in.safetensors"),
                OUTPUT => path("out.safetensors"),
                OUTPUT_DIR => path("lora"),
                MISSING => path("missing/none"),
                word => OsString::from(word),
            },
        };
        argv.push(arg);
    }
    argv
}

/// Whether argv asks for projections larger than `MAX_SIZE_ARG` (then the case is skipped).
fn asks_for_huge_sizes(argv: &[OsString]) -> bool {
    let huge = |v: &str| {
        v.trim().parse::<u64>().map_or(v.len() > 4 && v.bytes().any(|b| b.is_ascii_digit()), |n| n > MAX_SIZE_ARG)
    };
    argv.windows(2).any(|w| {
        let flag = w[0].to_string_lossy();
        (flag == "--n-max" || flag == "--m-max") && huge(&w[1].to_string_lossy())
    }) || argv.iter().any(|a| {
        let a = a.to_string_lossy();
        ["--n-max=", "--m-max="].iter().any(|p| a.strip_prefix(p).is_some_and(huge))
    })
}

/// Whether an output would go outside the scratch directory (a fuzzed `--output 1` would write
/// `1` into the working directory): such cases are left out.
fn writes_outside(argv: &[OsString], dir: &Path) -> bool {
    argv.windows(2).any(|w| w[0] == "--output" && !Path::new(&w[1]).starts_with(dir))
        || argv.iter().any(|a| a.to_string_lossy().starts_with("--output="))
}

fn write_adapter(dir: &Path, config: &[u8], weights: &[u8]) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("adapter_config.json"), config).unwrap();
    std::fs::write(dir.join("adapter_model.safetensors"), weights).unwrap();
}

fn reset(dir: &Path) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            std::fs::remove_dir_all(&path).unwrap();
        } else {
            std::fs::remove_file(&path).unwrap();
        }
    }
}

/// The entries of `dir`, sorted.
fn listing(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    v.sort();
    v
}

fuzz_target!(|data: &[u8]| {
    let s = common::sections(data, 5);
    let dir = scratch();
    let argv = decode(s[0], dir);
    if argv.is_empty() || asks_for_huge_sizes(&argv) || writes_outside(&argv, dir) {
        return;
    }
    reset(dir);
    write_adapter(&dir.join("a0"), s[1], s[2]);
    write_adapter(&dir.join("a1"), s[1], if s[3].is_empty() { s[2] } else { s[3] });
    std::fs::write(dir.join("in.safetensors"), s[4]).unwrap();
    let before = listing(dir);

    let code = vera::run(argv.clone());

    if code != ExitCode::SUCCESS {
        // A failed run writes nothing: no output, no temporary file (a directory's or a file's).
        assert_eq!(listing(dir), before, "a failed run left files behind: {argv:?}");
    }
});
