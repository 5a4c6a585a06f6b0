//! `vera forward` with several `--adapter` and `--rows-key`: the mixed-adapter batch of PEFT's
//! multi-adapter fixture (`tests/fixtures/peft-vera-train/multi`), against PEFT's per-row outputs and
//! the library's `forward_mixed` bit for bit; with one `--adapter` and no `--rows-key` it is the
//! single-adapter forward; every misuse is one line on stderr, a non-zero exit and no output.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{fixture_dir, rel_err};
use vera_kernels::peft::{PeftAdapters, TensorFile};
use vera_kernels::{forward, forward_mixed, MatMut, MatRef, Mode};

const SIZES: [usize; 4] = [48, 40, 64, 24];

fn vera(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_vera")).args(args).output().unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8(out.stdout).unwrap(), String::from_utf8(out.stderr).unwrap())
}

fn multi(adapter: &str) -> PathBuf {
    fixture_dir("peft-vera-train/multi").join(adapter)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn y_of(path: &Path) -> Vec<f32> {
    TensorFile::read(path).unwrap().tensor("y").unwrap().into_data()
}

#[test]
fn a_mixed_batch_from_the_command_line_is_pefts() {
    let tmp = tempfile::tempdir().unwrap();
    let input = fixture_dir("peft-vera-train/multi.safetensors");
    let file = TensorFile::read(&input).unwrap();
    let set = PeftAdapters::load_saved(multi("")).unwrap();
    let projections = set.projections::<f32>(None).unwrap();
    let (a0, a1, a2) = (multi("a0"), multi("a1"), multi("a2"));
    for l in 0..3 {
        let module = format!("layers.{l}");
        let (n, m) = (SIZES[l], SIZES[l + 1]);
        let out = tmp.path().join(format!("y{l}.safetensors"));
        let (x_key, rows_key) = (format!("{module}.x"), format!("{module}.row_adapter"));
        let (code, stdout, stderr) = vera(&[
            "forward",
            "--adapter",
            s(&a0),
            "--adapter",
            s(&a1),
            "--adapter",
            s(&a2),
            "--module",
            &module,
            "--input",
            s(&input),
            "--input-key",
            &x_key,
            "--rows-key",
            &rows_key,
            "--output",
            s(&out),
        ]);
        assert_eq!(code, 0, "{stderr}");
        assert!(stdout.contains("each row's adapter of 3"), "{stdout}");
        let y = y_of(&out);
        let want = file.tensor(&format!("{module}.adapter_y")).unwrap().into_data();
        // The library test (tests/peft_multi.rs) holds this per element to the derived bound; here
        // the command must give the library's bits, and therefore PEFT's values.
        assert!(rel_err(&y, &want) <= 1e-5, "{module}: {:e}", rel_err(&y, &want));
        let x = file.tensor(&x_key).unwrap().into_data();
        let rows: Vec<i32> = file.integers(&rows_key).unwrap().into_iter().map(|v| v as i32).collect();
        let t = rows.len();
        let mut lib = vec![0.0f32; t * m];
        let bank = set.bank(&module).unwrap();
        let (xv, yv) = (MatRef::from_slice(&x, t, n).unwrap(), MatMut::from_slice(&mut lib, t, m).unwrap());
        forward_mixed(&projections, &bank, &rows, xv, yv, Mode::Overwrite).unwrap();
        assert_eq!(
            y.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            lib.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
        // The adapters in another order, with the map unchanged: a negative control.
        let swapped = tmp.path().join("swapped.safetensors");
        let (code, _, stderr) = vera(&[
            "forward",
            "--adapter",
            s(&a1),
            "--adapter",
            s(&a0),
            "--adapter",
            s(&a2),
            "--module",
            &module,
            "--input",
            s(&input),
            "--input-key",
            &x_key,
            "--rows-key",
            &rows_key,
            "--output",
            s(&swapped),
        ]);
        assert_eq!(code, 0, "{stderr}");
        assert!(rel_err(&y_of(&swapped), &want) > 0.1, "{module}: swapped adapters still matched");
        // One adapter, no map: the single-adapter forward on every row.
        let single = tmp.path().join("single.safetensors");
        let (code, _, stderr) = vera(&[
            "forward",
            "--adapter",
            s(&a2),
            "--module",
            &module,
            "--input",
            s(&input),
            "--input-key",
            &x_key,
            "--output",
            s(&single),
        ]);
        assert_eq!(code, 0, "{stderr}");
        let mut lib = vec![0.0f32; t * m];
        let adapter = set.adapters()[2].module(&module).unwrap().adapter();
        let (xv, yv) = (MatRef::from_slice(&x, t, n).unwrap(), MatMut::from_slice(&mut lib, t, m).unwrap());
        forward(&projections, adapter, xv, yv, Mode::Overwrite).unwrap();
        assert_eq!(y_of(&single), lib);
    }
}

#[test]
fn mixed_batch_misuse_is_one_line_with_no_output() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out.safetensors");
    let input = fixture_dir("peft-vera-train/multi.safetensors");
    // Row maps that are wrong: out of range, a float tensor, the wrong length.
    let bad = tmp.path().join("bad.safetensors");
    let x = TensorFile::read(&input).unwrap().tensor("layers.0.x").unwrap().into_data();
    let xb: Vec<u8> = x.iter().flat_map(|v| v.to_le_bytes()).collect();
    let rows = |vals: &[i32]| vals.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>();
    let mut ok_rows = vec![0i32; 18];
    ok_rows[4] = 3;
    let (far, short) = (rows(&ok_rows), rows(&[0; 17]));
    let floats: Vec<u8> = [0.0f32; 18].iter().flat_map(|v| v.to_le_bytes()).collect();
    use safetensors::tensor::{serialize_to_file, TensorView};
    use safetensors::Dtype;
    let views = vec![
        ("x", TensorView::new(Dtype::F32, vec![18, 48], &xb).unwrap()),
        ("far", TensorView::new(Dtype::I32, vec![18], &far).unwrap()),
        ("short", TensorView::new(Dtype::I32, vec![17], &short).unwrap()),
        ("floats", TensorView::new(Dtype::F32, vec![18], &floats).unwrap()),
    ];
    serialize_to_file(views, None, &bad).unwrap();
    let (a0, a1, seeded) = (multi("a0"), multi("a1"), fixture_dir("peft-vera-mlp-seeded/adapter"));
    let base = ["forward", "--module", "layers.0", "--input", s(&bad), "--input-key", "x", "--output", s(&out)];
    let cases: [(Vec<&str>, &str); 5] = [
        (vec!["--adapter", s(&a0), "--adapter", s(&a1)], "2 adapters given: a mixed batch needs --rows-key"),
        (
            vec!["--adapter", s(&a0), "--adapter", s(&a1), "--rows-key", "far"],
            "row 4 names adapter 3, but 2 --adapter were given",
        ),
        (vec!["--adapter", s(&a0), "--adapter", s(&a1), "--rows-key", "short"], "one adapter index per row"),
        (vec!["--adapter", s(&a0), "--adapter", s(&a1), "--rows-key", "floats"], "expected an integer type"),
        (
            vec!["--adapter", s(&a0), "--adapter", s(&seeded), "--rows-key", "far", "--n-max", "64", "--m-max", "64"],
            "was not made for the projections of adapter \"a0\"",
        ),
    ];
    for (extra, needle) in cases {
        let args: Vec<&str> = base.iter().copied().chain(extra).collect();
        let (code, stdout, stderr) = vera(&args);
        assert_ne!(code, 0, "{args:?} succeeded");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(stderr.contains(needle), "{needle:?} not in {stderr}");
        assert!(stdout.is_empty());
        assert!(!out.exists(), "{args:?} left an output");
    }
}
