//! `vera inspect`, `vera forward` and `vera merge` on the PEFT fixtures, run as a user runs them:
//! outputs checked against PEFT's reference tensors, and every failure checked to be one line on
//! stderr, a non-zero exit and no output file.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{fixture_dir, read_f32_tensors, rel_err};
use vera_kernels::peft::{write_safetensors, Tensor, TensorFile, CONFIG_FILE, WEIGHTS_FILE};
use vera_kernels::DType;

const SIZES: [usize; 4] = [48, 40, 64, 24];
const FIXTURES: [&str; 2] = ["peft-vera-mlp", "peft-vera-mlp-seeded"];
const TOL: f64 = 1e-5;

struct Output {
    code: i32,
    stdout: String,
    stderr: String,
}

fn vera(args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_vera")).args(args).output().unwrap();
    Output {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8(out.stdout).unwrap(),
        stderr: String::from_utf8(out.stderr).unwrap(),
    }
}

fn ok(args: &[&str]) -> String {
    let out = vera(args);
    assert_eq!(out.code, 0, "vera {args:?} failed: {}", out.stderr);
    assert!(out.stderr.is_empty(), "{}", out.stderr);
    out.stdout
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn adapter_dir(name: &str) -> PathBuf {
    fixture_dir(name).join("adapter")
}

fn reference(name: &str) -> PathBuf {
    fixture_dir(name).join("reference.safetensors")
}

/// The projection sizes the seeded fixture needs on the command line.
fn size_args(name: &str) -> Vec<&'static str> {
    if name.ends_with("seeded") {
        vec!["--n-max", "64", "--m-max", "64"]
    } else {
        vec![]
    }
}

fn read_tensor(path: &Path, key: &str) -> Tensor {
    TensorFile::read(path).unwrap().tensor(key).unwrap()
}

#[test]
fn forward_reproduces_peft_outputs() {
    let tmp = tempfile::tempdir().unwrap();
    for name in FIXTURES {
        let (adir, rfile) = (adapter_dir(name), reference(name));
        let refs = read_f32_tensors(&rfile);
        for l in 0..3 {
            let (n, m) = (SIZES[l], SIZES[l + 1]);
            let (module, x_key) = (format!("layers.{l}"), format!("layers.{l}.x"));
            let out = tmp.path().join(format!("{name}-{l}-adapter.safetensors"));
            let (adir_s, rfile_s) = (s(&adir), s(&rfile));
            // The arguments both forward runs share; each adds its output (and the base layer).
            let common =
                ["forward", "--adapter", adir_s, "--module", &module, "--input", rfile_s, "--input-key", &x_key];
            let args = [&common[..], &["--output", s(&out)], &size_args(name)].concat();
            let stdout = ok(&args);
            assert!(stdout.contains(&format!("wrote y [5, {m}] f32 (adapter contribution)")), "{stdout}");
            let y = read_tensor(&out, "y");
            assert_eq!((y.dtype(), y.shape()), (DType::F32, &[5, m][..]));
            let e = rel_err(y.data(), &refs[&format!("layers.{l}.adapter_y")].1);
            assert!(e <= TOL, "{name} layers.{l} adapter_y: {e:e}");
            assert_eq!(TensorFile::read(&out).unwrap().keys().collect::<Vec<_>>(), ["y"]);

            // base + adapter, the whole PEFT layer.
            let out = tmp.path().join(format!("{name}-{l}-full.safetensors"));
            let (w_key, b_key) = (format!("layers.{l}.weight"), format!("layers.{l}.bias"));
            let full = ["--output", s(&out), "--base", rfile_s, "--weight-key", &w_key, "--bias-key", &b_key];
            let args = [&common[..], &full, &size_args(name)].concat();
            assert!(ok(&args).contains("(base + adapter)"));
            let y = read_tensor(&out, "y");
            let e = rel_err(y.data(), &refs[&format!("layers.{l}.y")].1);
            assert!(e <= TOL, "{name} layers.{l} y: {e:e}");
            assert_eq!(n, refs[&x_key].0[1]);
        }
    }
}

#[test]
fn merge_and_unmerge_reproduce_peft_weights() {
    let tmp = tempfile::tempdir().unwrap();
    for name in FIXTURES {
        let (adir, rfile) = (adapter_dir(name), reference(name));
        let refs = read_f32_tensors(&rfile);
        for l in 0..3 {
            let (module, w_key) = (format!("layers.{l}"), format!("layers.{l}.weight"));
            let merged = tmp.path().join(format!("{name}-{l}-merged.safetensors"));
            let mut args = vec![
                "merge",
                "--adapter",
                s(&adir),
                "--module",
                &module,
                "--weights",
                s(&rfile),
                "--weight-key",
                &w_key,
                "--output",
                s(&merged),
            ];
            args.extend(size_args(name));
            let stdout = ok(&args);
            assert!(stdout.contains(&format!("wrote merged {w_key}")) && stdout.contains("20 other tensors"));
            let w = read_tensor(&merged, &w_key);
            let e = rel_err(w.data(), &refs[&format!("layers.{l}.merged_weight")].1);
            assert!(e <= TOL, "{name} layers.{l} merged_weight: {e:e}");
            // Every other tensor is copied unchanged.
            let out = read_f32_tensors(&merged);
            assert_eq!(out.len(), refs.len());
            for (k, v) in &refs {
                if *k != w_key {
                    assert_eq!(&out[k], v, "{k}");
                }
            }

            // Unmerge in place: the output may be the weights file itself.
            let mut args = vec![
                "merge",
                "--adapter",
                s(&adir),
                "--module",
                &module,
                "--weights",
                s(&merged),
                "--weight-key",
                &w_key,
                "--output",
                s(&merged),
                "--unmerge",
            ];
            args.extend(size_args(name));
            assert!(ok(&args).contains(&format!("wrote unmerged {w_key}")));
            let w = read_tensor(&merged, &w_key);
            let e = rel_err(w.data(), &refs[&w_key].1);
            assert!(e <= TOL, "{name} layers.{l} unmerged: {e:e}");
        }
    }
    // Nothing left behind but the outputs.
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 6);
}

#[test]
fn forward_in_half_precision_and_with_leading_dimensions() {
    let tmp = tempfile::tempdir().unwrap();
    let name = "peft-vera-mlp";
    let adir = adapter_dir(name);
    let refs = read_f32_tensors(&reference(name));
    // x as [1, 5, 48] in bf16.
    let x = Tensor::new(DType::BF16, vec![1, 5, 48], refs["layers.0.x"].1.clone()).unwrap();
    let input = tmp.path().join("x.safetensors");
    write_safetensors(&input, &[("x", &x)], None).unwrap();
    for (dtype, tol, expected) in
        [(None, 5e-2, DType::BF16), (Some("f16"), 5e-2, DType::F16), (Some("f32"), 5e-2, DType::F32)]
    {
        let out = tmp.path().join("y.safetensors");
        let mut args =
            vec!["forward", "--adapter", s(&adir), "--module", "layers.0", "--input", s(&input), "--output", s(&out)];
        if let Some(d) = dtype {
            args.extend(["--dtype", d]);
        }
        ok(&args);
        let y = read_tensor(&out, "y");
        assert_eq!((y.dtype(), y.shape()), (expected, &[1, 5, 40][..]));
        // x was rounded to bf16, so compare loosely with PEFT's f32 numbers.
        let e = rel_err(y.data(), &refs["layers.0.adapter_y"].1);
        assert!(e <= tol, "{dtype:?}: {e:e}");
    }
}

/// A copy of the saved fixture whose config says fan_in_fan_out, and a weights file holding the
/// base weights transposed to [in, out] (GPT-2 Conv1D layout).
fn conv1d_fixture(tmp: &Path) -> (PathBuf, PathBuf) {
    let dir = tmp.join("conv1d-adapter");
    std::fs::create_dir(&dir).unwrap();
    let src = adapter_dir("peft-vera-mlp");
    std::fs::copy(src.join(WEIGHTS_FILE), dir.join(WEIGHTS_FILE)).unwrap();
    let mut config: serde_json::Value = serde_json::from_slice(&std::fs::read(src.join(CONFIG_FILE)).unwrap()).unwrap();
    config["fan_in_fan_out"] = true.into();
    std::fs::write(dir.join(CONFIG_FILE), config.to_string()).unwrap();

    let refs = read_f32_tensors(&reference("peft-vera-mlp"));
    let mut tensors = Vec::new();
    for l in 0..3 {
        let (n, m) = (SIZES[l], SIZES[l + 1]);
        let w = &refs[&format!("layers.{l}.weight")].1;
        let wt: Vec<f32> = (0..n).flat_map(|k| (0..m).map(move |i| w[i * n + k])).collect();
        tensors.push((format!("layers.{l}.weight"), Tensor::new(DType::F32, vec![n, m], wt).unwrap()));
        let b = &refs[&format!("layers.{l}.bias")].1;
        tensors.push((format!("layers.{l}.bias"), Tensor::new(DType::F32, vec![m], b.clone()).unwrap()));
    }
    let weights = tmp.join("conv1d.safetensors");
    let refs: Vec<(&str, &Tensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
    write_safetensors(&weights, &refs, None).unwrap();
    (dir, weights)
}

#[test]
fn fan_in_fan_out_weights_are_merged_and_used_transposed() {
    let tmp = tempfile::tempdir().unwrap();
    let (adapter, weights) = conv1d_fixture(tmp.path());
    let refs = read_f32_tensors(&reference("peft-vera-mlp"));
    let inspect = ok(&["inspect", s(&adapter)]);
    assert!(inspect.contains("fan_in_fan_out: true"), "{inspect}");
    for l in 0..3 {
        let (n, m) = (SIZES[l], SIZES[l + 1]);
        let (module, w_key, b_key, x_key) =
            (format!("layers.{l}"), format!("layers.{l}.weight"), format!("layers.{l}.bias"), format!("layers.{l}.x"));
        let out = tmp.path().join("merged.safetensors");
        ok(&[
            "merge",
            "--adapter",
            s(&adapter),
            "--module",
            &module,
            "--weights",
            s(&weights),
            "--weight-key",
            &w_key,
            "--output",
            s(&out),
        ]);
        let w = read_tensor(&out, &w_key);
        assert_eq!(w.shape(), &[n, m]);
        let expected = &refs[&format!("layers.{l}.merged_weight")].1;
        let expected_t: Vec<f32> = (0..n).flat_map(|k| (0..m).map(move |i| expected[i * n + k])).collect();
        let e = rel_err(w.data(), &expected_t);
        assert!(e <= TOL, "layers.{l} merged [in, out]: {e:e}");

        let y_out = tmp.path().join("y.safetensors");
        ok(&[
            "forward",
            "--adapter",
            s(&adapter),
            "--module",
            &module,
            "--input",
            s(&reference("peft-vera-mlp")),
            "--input-key",
            &x_key,
            "--output",
            s(&y_out),
            "--base",
            s(&weights),
            "--weight-key",
            &w_key,
            "--bias-key",
            &b_key,
        ]);
        let e = rel_err(read_tensor(&y_out, "y").data(), &refs[&format!("layers.{l}.y")].1);
        assert!(e <= TOL, "layers.{l} y with a [in, out] base weight: {e:e}");
    }
}

#[test]
fn inspect_shows_the_adapter() {
    let out = ok(&["inspect", s(&adapter_dir("peft-vera-mlp"))]);
    for needle in [
        "peft_type:      VERA (peft_version 0.21.2)",
        "r:              16",
        "seed:           0 (projection_prng_key)",
        "projections:    saved: vera_A [16, 64] f32, vera_B [64, 16] f32 (n_max = 64, m_max = 64)",
        "target_modules: layers.2, layers.0, layers.1",
        "layers.0  [16]      [40]              56  f32",
        "layers.1  [16]      [64]              80  f32",
        "layers.2  [16]      [24]              40  f32",
        "trainable parameters: 176",
        "projection parameters: 2048",
    ] {
        assert!(out.contains(needle), "{needle:?} not in\n{out}");
    }
    let out = ok(&["inspect", s(&adapter_dir("peft-vera-mlp-seeded"))]);
    assert!(out.contains("seed:           7 (projection_prng_key)"), "{out}");
    assert!(out.contains("projections:    not saved") && out.contains("M >= 64"), "{out}");
    assert!(ok(&["--help"]).contains("inspect"));
    assert!(ok(&["forward", "--help"]).contains("--input-key"));
}

/// A failed command: non-zero exit, exactly one line on stderr, nothing on stdout, and the
/// output file neither created nor changed.
fn fails(args: &[&str], output: &Path, needle: &str) {
    let before = std::fs::read(output).ok();
    let dir_before = output.parent().map(|d| std::fs::read_dir(d).map_or(0, |r| r.count()));
    let out = vera(args);
    assert_ne!(out.code, 0, "vera {args:?} succeeded");
    assert_eq!(out.stderr.lines().count(), 1, "vera {args:?}: stderr is not one line:\n{}", out.stderr);
    assert!(out.stderr.starts_with("vera: error: "), "{}", out.stderr);
    assert!(out.stderr.contains(needle), "{needle:?} not in {}", out.stderr);
    assert!(out.stdout.is_empty(), "{}", out.stdout);
    assert_eq!(std::fs::read(output).ok(), before, "vera {args:?} touched its output");
    let dir_after = output.parent().map(|d| std::fs::read_dir(d).map_or(0, |r| r.count()));
    assert_eq!(dir_after, dir_before, "vera {args:?} left a file behind");
}

#[test]
fn failures_are_one_line_with_no_output() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out.safetensors");
    let out_s = s(&out);
    let saved = adapter_dir("peft-vera-mlp");
    let seeded = adapter_dir("peft-vera-mlp-seeded");
    let refs = reference("peft-vera-mlp");
    let (saved, seeded, refs) = (s(&saved), s(&seeded), s(&refs));
    let missing = tmp.path().join("missing");
    let corrupt = tmp.path().join("corrupt.safetensors");
    std::fs::write(&corrupt, b"\x10\0\0\0\0\0\0\0{not json}......").unwrap();
    let not_vera = tmp.path().join("lora");
    std::fs::create_dir(&not_vera).unwrap();
    std::fs::write(not_vera.join(CONFIG_FILE), r#"{"peft_type": "LORA", "r": 8}"#).unwrap();
    let ints = tmp.path().join("ints.safetensors");
    {
        let data: Vec<u8> = (0..5 * 48).flat_map(|i: i64| i.to_le_bytes()).collect();
        let view = safetensors::tensor::TensorView::new(safetensors::Dtype::I64, vec![5, 48], &data).unwrap();
        std::fs::write(&ints, safetensors::serialize([("x", view)], None).unwrap()).unwrap();
    }
    // `vera forward` on the saved fixture's layers.0, with some options replaced or added.
    let fwd = |over: &[(&str, &str)]| -> Vec<String> {
        let mut opts: Vec<(String, String)> = [
            ("--adapter", saved),
            ("--module", "layers.0"),
            ("--input", refs),
            ("--input-key", "layers.0.x"),
            ("--output", out_s),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        for (k, v) in over {
            match opts.iter_mut().find(|(key, _)| key == k) {
                Some(opt) => opt.1 = v.to_string(),
                None => opts.push((k.to_string(), v.to_string())),
            }
        }
        std::iter::once("forward".to_string()).chain(opts.into_iter().flat_map(|(k, v)| [k, v])).collect()
    };
    let wide = tmp.path().join("wide.safetensors");
    write_safetensors(&wide, &[("x", &Tensor::new(DType::F32, vec![2, 65], vec![1.0; 130]).unwrap())], None).unwrap();
    let wide_s = s(&wide);
    let (not_vera_s, missing_s, corrupt_s, ints_s) = (s(&not_vera), s(&missing), s(&corrupt), s(&ints));
    let missing_out = missing.join("y.safetensors");
    let cases: Vec<(Vec<String>, &str)> = vec![
        (fwd(&[("--adapter", "/nonexistent/adapter")]), "adapter_config.json"),
        (fwd(&[("--adapter", not_vera_s)]), "not a VeRA adapter"),
        (fwd(&[("--adapter", seeded)]), "--n-max N --m-max M"),
        (fwd(&[("--adapter", seeded), ("--n-max", "64")]), "--m-max"),
        (fwd(&[("--adapter", seeded), ("--n-max", "64"), ("--m-max", "32")]), "m_max = 32"),
        (fwd(&[("--adapter", seeded), ("--n-max", "40"), ("--m-max", "64")]), "in_features = 48"),
        // Typos in a size: one line saying what could not be had, not an aborted process.
        (fwd(&[("--adapter", seeded), ("--n-max", "99999999999"), ("--m-max", "64")]), "cannot allocate"),
        (fwd(&[("--adapter", seeded), ("--n-max", "4000000000"), ("--m-max", "64")]), "A = [r, n_max]"),
        (fwd(&[("--adapter", seeded), ("--n-max", "64"), ("--m-max", "18446744073709551615")]), "too large"),
        (fwd(&[("--adapter", saved), ("--n-max", "48"), ("--m-max", "64")]), "base_model.vera_A"),
        (fwd(&[("--module", "layers.7")]), "no module \"layers.7\""),
        (fwd(&[("--input-key", "nope")]), "no tensor \"nope\" (it has \"layers.0.adapter_y\", "),
        (fwd(&[("--input", missing_s)]), "missing"),
        (fwd(&[("--input", corrupt_s)]), "not a valid safetensors"),
        (fwd(&[("--input", ints_s), ("--input-key", "x")]), "dtype I64"),
        (fwd(&[("--input", wide_s), ("--input-key", "x")]), "in_features = 65"),
        (fwd(&[("--dtype", "f64")]), "f64"),
        (fwd(&[("--base", refs), ("--weight-key", "layers.1.weight")]), "[64, 40]"),
        (
            fwd(&[("--base", refs), ("--weight-key", "layers.0.weight"), ("--bias-key", "layers.1.bias")]),
            "layers.1.bias",
        ),
        (fwd(&[("--base", corrupt_s), ("--weight-key", "w")]), "not a valid safetensors"),
        (fwd(&[("--weight-key", "layers.0.weight")]), "--base"),
        (fwd(&[("--output", s(&missing_out))]), "missing"),
        (
            [
                "merge",
                "--adapter",
                saved,
                "--module",
                "layers.0",
                "--weights",
                refs,
                "--weight-key",
                "layers.0.x",
                "--output",
                out_s,
            ]
            .map(String::from)
            .to_vec(),
            "layers.0.x",
        ),
        (
            [
                "merge",
                "--adapter",
                saved,
                "--module",
                "layers.0",
                "--weights",
                refs,
                "--weight-key",
                "nope",
                "--output",
                out_s,
            ]
            .map(String::from)
            .to_vec(),
            "no tensor",
        ),
        (
            [
                "merge",
                "--adapter",
                seeded,
                "--module",
                "layers.0",
                "--weights",
                refs,
                "--weight-key",
                "layers.0.weight",
                "--output",
                out_s,
            ]
            .map(String::from)
            .to_vec(),
            "--n-max",
        ),
        (["merge", "--adapter", saved, "--module", "layers.0"].map(String::from).to_vec(), "required"),
        (["frobnicate"].map(String::from).to_vec(), "frobnicate"),
    ];
    for (args, needle) in &cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        fails(&args, &out, needle);
    }
    // An existing output is left as it was when the command fails.
    std::fs::write(&out, b"previous").unwrap();
    for (args, needle) in &cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        fails(&args, &out, needle);
    }
}

#[test]
fn bench_shapes_too_large_for_memory_are_one_line() {
    for (shape, needle) in [
        ("4000000000,4096,64,8", "x = [T, n]: cannot allocate 65536000000000 bytes"),
        ("1,4000000,4000000,8", "the dense baseline's ΔW = [m, n]: cannot allocate"),
        ("99999999999,99999999999,99999999999,99999999999", "A = [r, n_max]: too large"),
    ] {
        let out = vera(&["bench", "--shape", shape, "--dtype", "f32", "--budget-ms", "1"]);
        assert_ne!(out.code, 0, "vera bench --shape {shape} succeeded");
        assert_eq!(out.stderr.lines().count(), 1, "{shape}: stderr is not one line:\n{}", out.stderr);
        assert!(out.stderr.contains(needle), "{needle:?} not in {}", out.stderr);
    }
}
