//! `vera grad` on the PEFT training fixture, run as a user runs it: the gradients checked against
//! PyTorch autograd through PEFT, and every failure checked to be one line on stderr, a non-zero
//! exit and no output file.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{fixture_dir, read_f32_tensors, rel_err};

const SIZES: [usize; 4] = [48, 40, 64, 24];

/// (exit code, stdout, stderr).
fn vera(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_vera")).args(args).output().unwrap();
    let text = |b: Vec<u8>| String::from_utf8(b).unwrap();
    (out.status.code().unwrap_or(-1), text(out.stdout), text(out.stderr))
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn fixture() -> (PathBuf, PathBuf) {
    let dir = fixture_dir("peft-vera-train");
    (dir.join("adapter"), dir.join("reference.safetensors"))
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vera-cli-grad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

#[test]
fn gradients_match_pefts_for_every_layer_and_dtype() {
    let (adapter, input) = fixture();
    let want = read_f32_tensors(&input);
    for l in 0..3 {
        for (dtype, tol) in [("f32", 1e-5), ("bf16", 3e-2), ("f16", 3e-3)] {
            let out = scratch(&format!("grad-{l}-{dtype}.safetensors"));
            let (x_key, dy_key) = (format!("layers.{l}.x"), format!("layers.{l}.dy"));
            let module = format!("layers.{l}");
            let args = [
                "grad",
                "--adapter",
                s(&adapter),
                "--module",
                &module,
                "--input",
                s(&input),
                "--input-key",
                &x_key,
                "--dy-key",
                &dy_key,
                "--output",
                s(&out),
                "--dtype",
                dtype,
            ];
            let (code, stdout, stderr) = vera(&args);
            assert_eq!(code, 0, "{stderr}");
            assert!(stdout.contains("grad_x [6, "), "{stdout}");
            let got = read_f32_tensors(&out);
            assert_eq!(got["grad_x"].0, vec![6, SIZES[l]]);
            for (key, reference) in
                [("grad_lambda_d", "grad_lambda_d"), ("grad_lambda_b", "grad_lambda_b"), ("grad_x", "grad_x_adapter")]
            {
                let e = rel_err(&got[key].1, &want[&format!("layers.{l}.{reference}")].1);
                assert!(e <= tol, "layers.{l} {dtype} {key}: relative error {e:e}");
            }
        }
    }
}

#[test]
fn every_failure_is_one_line_a_non_zero_exit_and_no_output() {
    let (adapter, input) = fixture();
    let out = scratch("never.safetensors");
    // (module, extra arguments, what the message must say). (An x whose width fits the
    // projections but not the module cannot be told apart: a VeRA module does not record its
    // in_features; only n > n_max is refused.)
    let cases: [(&str, &[&str], &str); 5] = [
        ("layers.1", &["--input-key", "layers.1.x", "--dy-key", "layers.0.dy"], "expected [6, 64]"),
        ("layers.1", &["--input-key", "layers.1.x", "--dy-key", "nope"], "\"nope\""),
        ("layers.9", &["--input-key", "layers.1.x", "--dy-key", "layers.1.dy"], "layers.9"),
        ("layers.1", &["--input-key", "train.loss", "--dy-key", "layers.1.dy"], "[T, in_features]"),
        ("layers.1", &["--input-key", "layers.1.x", "--dy-key", "layers.1.dy", "--dtype", "f64"], "f64"),
    ];
    for (module, extra, needle) in cases {
        let mut args =
            vec!["grad", "--adapter", s(&adapter), "--module", module, "--input", s(&input), "--output", s(&out)];
        args.extend_from_slice(extra);
        let (code, _, stderr) = vera(&args);
        assert_ne!(code, 0, "{args:?}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
        assert!(!out.exists(), "{args:?} left {}", out.display());
    }
}
