//! Reproduces the outputs HuggingFace PEFT computed for the adapters in `tests/fixtures/`
//! (see the README.md of each fixture): the layers' adapter outputs, full outputs, ΔW and merged
//! weights, and, for the unsaved-projection fixture, the projections regenerated from the seed.

mod common;

use common::{fixture_dir, read_f32_tensors, rel_err};
use vera_kernels::{delta_weight, forward, merge, unmerge, Adapter, MatMut, MatRef, Mode, Projections};

/// Layer sizes of the fixture model: layers.l maps SIZES[l] -> SIZES[l + 1].
const SIZES: [usize; 4] = [48, 40, 64, 24];
const R: usize = 16;
const N_MAX: usize = 64;
const M_MAX: usize = 64;
const TOL: f64 = 1e-5;

fn check_fixture(name: &str, projections: &Projections<f32>) {
    let dir = fixture_dir(name);
    let adapter_file = read_f32_tensors(&dir.join("adapter/adapter_model.safetensors"));
    let reference = read_f32_tensors(&dir.join("reference.safetensors"));
    for l in 0..3 {
        let (n, m) = (SIZES[l], SIZES[l + 1]);
        let key = |k: &str| format!("base_model.model.layers.{l}.{k}");
        let lambda_d = adapter_file[&key("vera_lambda_d")].1.clone();
        let lambda_b = adapter_file[&key("vera_lambda_b")].1.clone();
        let adapter = Adapter::new(lambda_d, lambda_b).unwrap();
        let get = |k: &str| &reference[&format!("layers.{l}.{k}")];
        let (x_shape, x) = get("x");
        let t = x_shape[0];
        assert_eq!(x_shape[1], n);

        // The adapter's own contribution (overwrite mode).
        let mut y = vec![f32::NAN; t * m];
        forward(
            projections,
            &adapter,
            MatRef::from_slice(x, t, n).unwrap(),
            MatMut::from_slice(&mut y, t, m).unwrap(),
            Mode::Overwrite,
        )
        .unwrap();
        let e = rel_err(&y, &get("adapter_y").1);
        assert!(e <= TOL, "{name} layers.{l} adapter_y: relative error {e:e}");

        // The whole layer: base = x·Wᵀ + b (f64, rounded once), then accumulate the adapter.
        let (w, bias) = (&get("weight").1, &get("bias").1);
        let mut y: Vec<f32> = (0..t * m)
            .map(|idx| {
                let (ti, i) = (idx / m, idx % m);
                let dot: f64 = (0..n).map(|k| f64::from(x[ti * n + k]) * f64::from(w[i * n + k])).sum();
                (dot + f64::from(bias[i])) as f32
            })
            .collect();
        forward(
            projections,
            &adapter,
            MatRef::from_slice(x, t, n).unwrap(),
            MatMut::from_slice(&mut y, t, m).unwrap(),
            Mode::Accumulate,
        )
        .unwrap();
        let e = rel_err(&y, &get("y").1);
        assert!(e <= TOL, "{name} layers.{l} y: relative error {e:e}");

        // ΔW and the merged weight.
        let mut dw = vec![0.0f32; m * n];
        delta_weight(projections, &adapter, MatMut::from_slice(&mut dw, m, n).unwrap()).unwrap();
        let e = rel_err(&dw, &get("delta_weight").1);
        assert!(e <= TOL, "{name} layers.{l} delta_weight: relative error {e:e}");

        let mut merged = w.clone();
        merge(projections, &adapter, MatMut::from_slice(&mut merged, m, n).unwrap()).unwrap();
        let e = rel_err(&merged, &get("merged_weight").1);
        assert!(e <= TOL, "{name} layers.{l} merged_weight: relative error {e:e}");

        unmerge(projections, &adapter, MatMut::from_slice(&mut merged, m, n).unwrap()).unwrap();
        let e = rel_err(&merged, w);
        assert!(e <= TOL, "{name} layers.{l} unmerged weight: relative error {e:e}");
    }
}

#[test]
fn saved_projections_fixture_is_reproduced() {
    let file = read_f32_tensors(&fixture_dir("peft-vera-mlp/adapter/adapter_model.safetensors"));
    let (a_shape, a) = file["base_model.vera_A"].clone();
    let (b_shape, b) = file["base_model.vera_B"].clone();
    assert_eq!((a_shape, b_shape), (vec![R, N_MAX], vec![M_MAX, R]));
    let projections = Projections::from_arrays(a, b, R, N_MAX, M_MAX).unwrap();
    check_fixture("peft-vera-mlp", &projections);
}

#[test]
fn seeded_projections_are_bit_identical_to_the_ones_peft_saved() {
    // peft-vera-mlp was made with projection_prng_key = 0 and save_projection = True.
    let file = read_f32_tensors(&fixture_dir("peft-vera-mlp/adapter/adapter_model.safetensors"));
    let generated = Projections::<f32>::from_seed(0, R, N_MAX, M_MAX).unwrap();
    let (a, b) = generated.as_slices();
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(a), bits(&file["base_model.vera_A"].1));
    assert_eq!(bits(b), bits(&file["base_model.vera_B"].1));
}

#[test]
fn unsaved_projections_fixture_is_reproduced_from_its_seed() {
    // peft-vera-mlp-seeded has save_projection = False and projection_prng_key = 7: its projections
    // are not in the file, so PEFT's outputs are reachable only by regenerating them.
    let file = read_f32_tensors(&fixture_dir("peft-vera-mlp-seeded/adapter/adapter_model.safetensors"));
    assert!(!file.contains_key("base_model.vera_A"));
    let projections = Projections::<f32>::from_seed(7, R, N_MAX, M_MAX).unwrap();
    check_fixture("peft-vera-mlp-seeded", &projections);
}

#[test]
fn a_wrong_seed_does_not_reproduce_the_fixture() {
    // Guards the test above against passing vacuously.
    let wrong = Projections::<f32>::from_seed(8, R, N_MAX, M_MAX).unwrap();
    let result = std::panic::catch_unwind(|| check_fixture("peft-vera-mlp-seeded", &wrong));
    assert!(result.is_err());
}
