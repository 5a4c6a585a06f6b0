//! `vera export-lora` (and `PeftAdapter::to_lora` under it) on the PEFT fixtures, run as a user
//! runs it: the factors against the exact ones PyTorch computed for the multi-adapter fixture, the
//! product `lora_B·lora_A` against the crate's ΔW, the config PEFT reads, and every failure one line
//! on stderr, a non-zero exit and no output directory.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::fixture_dir;
use vera_kernels::peft::{
    lora_a_key, lora_b_key, InFeatures, LoraExportOptions, PeftAdapter, ProjectionSizes, TensorFile, CONFIG_FILE,
    WEIGHTS_FILE,
};
use vera_kernels::{DType, Error, MatMut};

/// The fixtures' MLP: layers.l is SIZES[l] -> SIZES[l + 1].
const SIZES: [usize; 4] = [48, 40, 64, 24];
const MODULES: [&str; 3] = ["layers.0", "layers.1", "layers.2"];
/// f32's unit roundoff, 2^-24.
const U32: f64 = 1.0 / 16_777_216.0;

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

fn multi_adapter(k: usize) -> PathBuf {
    fixture_dir("peft-vera-train").join("multi").join(format!("a{k}"))
}

/// `--in-features` for the fixtures' MLP, one per module.
const IN_FEATURES: [&str; 6] =
    ["--in-features", "layers.0=48", "--in-features", "layers.1=40", "--in-features", "layers.2=64"];

/// `vera export-lora` of `adapter` into `out`, with `extra` arguments.
fn export(adapter: &Path, out: &Path, extra: &[&str]) -> String {
    let args = [&["export-lora", "--adapter", s(adapter), "--output", s(out)][..], &IN_FEATURES, extra].concat();
    ok(&args)
}

/// Adapter `k`'s factors of layer `l` in the fixture: `lora_A [r, in]` and `lora_B [out, r]`,
/// sliced from `layers.l.lora_A [K, r, in]` and `layers.l.lora_B [K, out, r]`.
fn fixture_factors(k: usize, l: usize) -> (Vec<f32>, Vec<f32>) {
    let file = TensorFile::read(fixture_dir("peft-vera-train").join("multi.safetensors")).unwrap();
    let slice = |key: String| {
        let t = file.tensor(&key).unwrap();
        let per = t.len() / t.shape()[0];
        t.data()[k * per..(k + 1) * per].to_vec()
    };
    (slice(format!("layers.{l}.lora_A")), slice(format!("layers.{l}.lora_B")))
}

/// The bound on `|ours - theirs|` for one element when both are the exact product `p` of two f32
/// values, ours rounded once to a dtype of unit roundoff `u_t` and smallest subnormal `s_t`, theirs
/// (PyTorch's `lambda.unsqueeze(-1) * A`, one f32 multiplication) rounded once to f32:
/// `|ours - p| <= u_t·|p| + s_t/2`, `|theirs - p| <= u·|p| + s/2` with `u = 2^-24`, and
/// `|p| <= |theirs| + u·|p| + s/2`, so `|p| <= (|theirs| + s/2) / (1 - u)`. Summed:
/// `(u_t + u)·(|theirs| + s/2)/(1 - u) + (s_t + s)/2`. For an f32 export that is two ulps of
/// relative error at most (in practice both sides are the same correctly rounded product).
fn factor_tol(theirs: f32, u_t: f64, s_t: f64) -> f64 {
    let s32 = f64::from(f32::from_bits(1));
    (u_t + U32) * (f64::from(theirs).abs() + s32 / 2.0) / (1.0 - U32) + (s_t + s32) / 2.0
}

/// How many elements of `ours` lie outside [`factor_tol`] of `theirs`.
fn violations(ours: &[f32], theirs: &[f32], u_t: f64, s_t: f64) -> usize {
    assert_eq!(ours.len(), theirs.len());
    ours.iter().zip(theirs).filter(|&(&o, &t)| (f64::from(o) - f64::from(t)).abs() > factor_tol(t, u_t, s_t)).count()
}

fn read(dir: &Path) -> TensorFile {
    TensorFile::read(dir.join(WEIGHTS_FILE)).unwrap()
}

fn config(dir: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(dir.join(CONFIG_FILE)).unwrap()).unwrap()
}

#[test]
fn exported_factors_are_the_exact_ones() {
    let tmp = tempfile::tempdir().unwrap();
    for k in 0..3 {
        let out = tmp.path().join(format!("lora-a{k}"));
        let stdout = export(&multi_adapter(k), &out, &[]);
        assert!(stdout.contains("wrote LoRA adapter (r = 16, lora_alpha = 16, 3 modules, f32)"), "{stdout}");
        let file = read(&out);
        let mut keys: Vec<String> = MODULES.iter().flat_map(|m| [lora_a_key(m), lora_b_key(m)]).collect();
        keys.sort();
        assert_eq!(file.keys().collect::<Vec<_>>(), keys);
        assert_eq!(file.metadata().and_then(|m| m.get("format")).map(String::as_str), Some("pt"));
        for (l, module) in MODULES.iter().enumerate() {
            let (n, m) = (SIZES[l], SIZES[l + 1]);
            let (a, b) = (file.tensor(&lora_a_key(module)).unwrap(), file.tensor(&lora_b_key(module)).unwrap());
            assert_eq!((a.dtype(), a.shape()), (DType::F32, &[16, n][..]), "{module}");
            assert_eq!((b.dtype(), b.shape()), (DType::F32, &[m, 16][..]), "{module}");
            let (fa, fb) = fixture_factors(k, l);
            assert_eq!(violations(a.data(), &fa, U32, 0.0), 0, "a{k} {module} lora_A");
            assert_eq!(violations(b.data(), &fb, U32, 0.0), 0, "a{k} {module} lora_B");
            // Negative control: another adapter's factors are not within the tolerance (they share
            // A and B, so lora_A rows differ by the lambda_d scale, lora_B rows by lambda_b).
            let other = (k + 1) % 3;
            let (oa, ob) = fixture_factors(other, l);
            assert!(violations(a.data(), &oa, U32, 0.0) > a.len() / 2, "a{k} {module} lora_A matches a{other}'s");
            assert!(violations(b.data(), &ob, U32, 0.0) > b.len() / 2, "a{k} {module} lora_B matches a{other}'s");
        }
    }
}

#[test]
fn half_precision_exports_are_rounded_once() {
    let tmp = tempfile::tempdir().unwrap();
    for (dtype, name) in [(DType::F16, "f16"), (DType::BF16, "bf16")] {
        let out = tmp.path().join(name);
        let stdout = export(&multi_adapter(0), &out, &["--dtype", name]);
        assert!(stdout.contains(&format!("3 modules, {name})")), "{stdout}");
        let file = read(&out);
        let (u_t, s_t) = match dtype {
            DType::F16 => (2f64.powi(-11), 2f64.powi(-24)),
            _ => (2f64.powi(-8), 2f64.powi(-133)),
        };
        for (l, module) in MODULES.iter().enumerate() {
            let (a, b) = (file.tensor(&lora_a_key(module)).unwrap(), file.tensor(&lora_b_key(module)).unwrap());
            assert_eq!((a.dtype(), b.dtype()), (dtype, dtype));
            let (fa, fb) = fixture_factors(0, l);
            assert_eq!(violations(a.data(), &fa, u_t, s_t), 0, "{name} {module} lora_A");
            assert_eq!(violations(b.data(), &fb, u_t, s_t), 0, "{name} {module} lora_B");
        }
    }
}

#[test]
fn the_config_is_a_lora_config_with_scaling_one() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("lora");
    export(&multi_adapter(1), &out, &[]);
    let c = config(&out);
    let vera = config(&multi_adapter(1));
    let expected = [
        ("peft_type", serde_json::json!("LORA")),
        ("r", serde_json::json!(16)),
        ("lora_alpha", serde_json::json!(16)),
        ("use_rslora", serde_json::json!(false)),
        ("use_dora", serde_json::json!(false)),
        ("lora_dropout", serde_json::json!(0.0)),
        ("bias", serde_json::json!("none")),
        ("fan_in_fan_out", serde_json::json!(false)),
        ("init_lora_weights", serde_json::json!(true)),
        ("inference_mode", serde_json::json!(true)),
        ("modules_to_save", serde_json::Value::Null),
        ("rank_pattern", serde_json::json!({})),
        ("alpha_pattern", serde_json::json!({})),
        ("task_type", serde_json::Value::Null),
        ("base_model_name_or_path", serde_json::Value::Null),
        ("revision", serde_json::Value::Null),
        ("layers_to_transform", serde_json::Value::Null),
        ("layers_pattern", serde_json::Value::Null),
        ("target_modules", vera["target_modules"].clone()),
        ("auto_mapping", vera["auto_mapping"].clone()),
    ];
    for (key, value) in &expected {
        assert_eq!(&c[key], value, "{key}");
    }
    // Nothing else: no VeRA field (PEFT's LoraConfig would reject an unknown one in old versions).
    assert_eq!(c.as_object().unwrap().len(), expected.len(), "{c}");
    assert_eq!(vera["target_modules"], serde_json::json!(["layers.2", "layers.0", "layers.1"]));
}

/// `|lora_B·lora_A - ΔW|` against its bound, with ΔW from `vera_kernels::delta_weight`.
///
/// With `p_jk = lambda_d_j·A_jk` and `q_ij = lambda_b_i·B_ij`, the export holds `p(1 + α)` and
/// `q(1 + β)`, `|α|, |β| <= u` (one rounding each, f32, no underflow at these magnitudes), so
/// `Σ_j q_ij·p_jk·(1 + α)(1 + β)` is off the exact ΔW by at most `(2u + u²)·mag`, with
/// `mag_ik = Σ_j |q_ij·p_jk| <= Σ_j |lora_B_ij·lora_A_jk| / (1 - u)²`. The test forms the product in
/// f64 (each f32·f32 product exact, the r - 1 additions within `gamma_f64(r)·mag`), and the kernel's
/// ΔW is within `reference::delta_error_bound` of the f64 reference ΔW (itself within
/// `gamma_f64(r)·mag` of the exact one).
fn check_product(adapter: &PeftAdapter, sizes: Option<ProjectionSizes>, lora_dir: &Path, what: &str) {
    let projections = adapter.projections::<f32>(sizes).unwrap();
    let file = read(lora_dir);
    let r = adapter.rank();
    let g64 = |k: usize| k as f64 * f64::EPSILON / 2.0 / (1.0 - k as f64 * f64::EPSILON / 2.0);
    for (l, module) in MODULES.iter().enumerate() {
        let (n, m) = (SIZES[l], SIZES[l + 1]);
        let a = file.tensor(&lora_a_key(module)).unwrap();
        let b = file.tensor(&lora_b_key(module)).unwrap();
        let vera_module = adapter.module(module).unwrap().adapter();
        let mut dw = vec![0.0f32; m * n];
        vera_kernels::delta_weight(&projections, vera_module, MatMut::from_slice(&mut dw, m, n).unwrap()).unwrap();
        let layer = projections.slice(n, m).unwrap();
        let kernel_bound = vera_kernels::reference::delta_error_bound(
            layer,
            vera_module,
            None,
            vera_kernels::tier_facts::<f32>().numerics(),
        )
        .unwrap();
        for i in 0..m {
            for k in 0..n {
                let (mut p, mut mag) = (0.0f64, 0.0f64);
                for j in 0..r {
                    let t = f64::from(b.data()[i * r + j]) * f64::from(a.data()[j * n + k]);
                    p += t;
                    mag += t.abs();
                }
                let mag = mag * (1.0 + g64(r)) / ((1.0 - U32) * (1.0 - U32));
                let bound = (2.0 * U32 + U32 * U32) * mag + 2.0 * g64(r) * mag + kernel_bound[i * n + k];
                let err = (p - f64::from(dw[i * n + k])).abs();
                assert!(err <= bound, "{what} {module} [{i}, {k}]: |lora_B·lora_A - ΔW| = {err:e} > {bound:e}");
            }
        }
    }
}

#[test]
fn the_product_is_the_delta_weight() {
    let tmp = tempfile::tempdir().unwrap();
    for k in 0..3 {
        let out = tmp.path().join(format!("a{k}"));
        export(&multi_adapter(k), &out, &[]);
        check_product(&PeftAdapter::load(multi_adapter(k)).unwrap(), None, &out, &format!("a{k}"));
    }
    // Projections drawn from the seed (save_projection = false) need the sizes, as for forward.
    let seeded = fixture_dir("peft-vera-mlp-seeded").join("adapter");
    let out = tmp.path().join("seeded");
    export(&seeded, &out, &["--n-max", "64", "--m-max", "64"]);
    let sizes = ProjectionSizes { n_max: 64, m_max: 64 };
    check_product(&PeftAdapter::load(&seeded).unwrap(), Some(sizes), &out, "seeded");
}

#[test]
fn fan_in_fan_out_is_carried_and_does_not_change_the_factors() {
    // LoRA's lora_A [r, in] / lora_B [out, r] have these shapes for a Conv1D base layer too: the
    // flag describes the base weight only.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("conv1d");
    std::fs::create_dir(&dir).unwrap();
    std::fs::copy(multi_adapter(2).join(WEIGHTS_FILE), dir.join(WEIGHTS_FILE)).unwrap();
    let mut c = config(&multi_adapter(2));
    c["fan_in_fan_out"] = true.into();
    std::fs::write(dir.join(CONFIG_FILE), c.to_string()).unwrap();
    let (plain, conv) = (tmp.path().join("plain"), tmp.path().join("conv-lora"));
    export(&multi_adapter(2), &plain, &[]);
    export(&dir, &conv, &[]);
    assert_eq!(config(&conv)["fan_in_fan_out"], serde_json::json!(true));
    assert_eq!(std::fs::read(plain.join(WEIGHTS_FILE)).unwrap(), std::fs::read(conv.join(WEIGHTS_FILE)).unwrap());
}

#[test]
fn in_features_by_suffix_and_default() {
    let n = InFeatures::all(4096).with("down_proj", 11008).with("layers.3.mlp.down_proj", 7);
    assert_eq!(n.of("model.layers.0.self_attn.q_proj"), Some(4096));
    assert_eq!(n.of("model.layers.0.mlp.down_proj"), Some(11008));
    assert_eq!(n.of("down_proj"), Some(11008));
    assert_eq!(n.of("model.layers.3.mlp.down_proj"), Some(7), "the longest name wins");
    assert_eq!(n.of("model.layers.0.mlp.xdown_proj"), Some(4096), "a suffix counts after a '.' only");
    assert_eq!(InFeatures::new().with("q_proj", 8).of("k_proj"), None);

    // The library path, with a default and an override, gives the CLI's factors.
    let tmp = tempfile::tempdir().unwrap();
    let adapter = PeftAdapter::load(multi_adapter(0)).unwrap();
    let options = LoraExportOptions::new(InFeatures::all(48).with("layers.1", 40).with("2", 64));
    let lora = adapter.to_lora(&options).unwrap();
    let cli = tmp.path().join("cli");
    export(&multi_adapter(0), &cli, &[]);
    let file = read(&cli);
    for module in MODULES {
        let got = lora.module(module).unwrap();
        assert_eq!(got.lora_a(), &file.tensor(&lora_a_key(module)).unwrap(), "{module}");
        assert_eq!(got.lora_b(), &file.tensor(&lora_b_key(module)).unwrap(), "{module}");
    }
    assert_eq!(lora.rank(), 16);
    assert_eq!(lora.config_json(), std::fs::read_to_string(cli.join(CONFIG_FILE)).unwrap());

    // Library errors are values, never panics.
    let err = |n: InFeatures| adapter.to_lora(&LoraExportOptions::new(n)).unwrap_err();
    assert!(matches!(err(InFeatures::new()), Error::MissingInFeatures { module } if module == "layers.0"));
    assert!(
        matches!(err(InFeatures::all(48).with("layers.9", 3)), Error::UnknownModule { module, .. } if module == "layers.9")
    );
    assert!(matches!(err(InFeatures::all(65)), Error::ProjectionsTooSmall { needed: 65, given: 64, .. }));
    assert!(matches!(err(InFeatures::all(0)), Error::TensorShape { .. }));
    let seeded = PeftAdapter::load(fixture_dir("peft-vera-mlp-seeded").join("adapter")).unwrap();
    let e = seeded.to_lora(&LoraExportOptions::new(InFeatures::all(8))).unwrap_err();
    assert!(matches!(e, Error::MissingProjectionSizes { seed: 7 }), "{e:?}");
    // Saving refuses a directory that holds anything.
    let e = lora.save(&cli).unwrap_err();
    assert!(matches!(&e, Error::Io { message, .. } if message.contains("not empty")), "{e:?}");
    // An empty directory is taken.
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    lora.save(&empty).unwrap();
    assert_eq!(read(&empty).keys().count(), 6);
}

/// The entries of a directory, sorted.
fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    names
}

/// A failed command: non-zero exit, one line on stderr, nothing on stdout, and the parent of the
/// output exactly as it was (no output directory, no temporary one left behind).
fn fails(args: &[&str], output: &Path, needle: &str) {
    let parent = output.parent().unwrap();
    let before = listing(parent);
    let out = vera(args);
    assert_ne!(out.code, 0, "vera {args:?} succeeded");
    assert_eq!(out.stderr.lines().count(), 1, "vera {args:?}: stderr is not one line:\n{}", out.stderr);
    assert!(out.stderr.starts_with("vera: error: "), "{}", out.stderr);
    assert!(out.stderr.contains(needle), "{needle:?} not in {}", out.stderr);
    assert!(out.stdout.is_empty(), "{}", out.stdout);
    assert_eq!(listing(parent), before, "vera {args:?} changed the output's folder");
}

#[test]
fn failures_are_one_line_with_no_output() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let out_s = s(&out);
    let a0 = multi_adapter(0);
    let a0 = s(&a0);
    let missing = tmp.path().join("missing");
    let seeded = fixture_dir("peft-vera-mlp-seeded").join("adapter");
    let with = |args: &[&'static str]| -> Vec<&str> {
        [&["export-lora", "--adapter", a0, "--output", out_s][..], args].concat()
    };
    fails(&with(&["--in-features", "48", "--dtype", "f64"]), &out, "unknown dtype \"f64\"");
    fails(&with(&["--in-features", "0"]), &out, "N a positive integer");
    fails(&with(&["--in-features", "=4"]), &out, "module name before '=' is empty");
    fails(&with(&[]), &out, "module \"layers.0\": its in_features is not known");
    fails(&with(&["--in-features", "layers.0=48"]), &out, "--in-features layers.1=N, or --in-features N");
    fails(&with(&["--in-features", "48", "--in-features", "layers.7=3"]), &out, "no module \"layers.7\"");
    fails(&with(&["--in-features", "65"]), &out, "in_features = 65 but the projections cover only n_max = 64");
    fails(&with(&["--in-features", "48", "--n-max", "64"]), &out, "--m-max");
    fails(
        &["export-lora", "--adapter", s(&missing), "--output", out_s, "--in-features", "48"],
        &out,
        "No such file or directory",
    );
    fails(
        &["export-lora", "--adapter", s(&seeded), "--output", out_s, "--in-features", "48"],
        &out,
        "(--n-max N --m-max M)",
    );
    fails(&["export-lora", "--adapter", a0, "--in-features", "48"], &out, "--output");

    // An existing output that holds anything is refused and left as it was.
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join(CONFIG_FILE), b"{}").unwrap();
    fails(&with(&["--in-features", "48"]), &out, "exists and is not empty");
    assert_eq!(listing(&out), [CONFIG_FILE]);
    assert_eq!(std::fs::read(out.join(CONFIG_FILE)).unwrap(), b"{}");
    let file = tmp.path().join("file");
    std::fs::write(&file, b"x").unwrap();
    let args = ["export-lora", "--adapter", a0, "--output", s(&file), "--in-features", "48"];
    fails(&args, &file, "exists and is not a directory");
    assert_eq!(std::fs::read(&file).unwrap(), b"x");
}

#[test]
fn help_names_the_command() {
    assert!(ok(&["--help"]).contains("export-lora"));
    let help = ok(&["export-lora", "--help"]);
    for needle in ["--in-features", "--n-max", "--dtype", "[default: f32]"] {
        assert!(help.contains(needle), "{needle:?} not in\n{help}");
    }
}
