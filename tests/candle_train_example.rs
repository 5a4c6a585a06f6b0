//! The `candle_train_vera` example's run (its own functions, called in-process) against PEFT's
//! training run in `tests/fixtures/peft-vera-train` (see its README.md): the losses printed before
//! each SGD step and after the last, and the saved adapter against PEFT's `trained/`, with a
//! negative control and the example's argument errors.
//!
//! Run with `cargo test --release --features candle --test candle_train_example`.
#![cfg(feature = "candle")]

mod common;

#[path = "../examples/candle_train_vera.rs"]
#[allow(dead_code)] // the example's `main` is not called here
mod example;

use std::path::Path;

use common::{fixture_dir, read_f32_tensors, rel_err};
use vera_kernels::peft::{PeftAdapter, ProjectionSizes};

const STEPS: usize = 10;
const LR: f64 = 0.05;

fn args(output: &Path, lr: f64) -> example::Args {
    example::Args {
        fixture: fixture_dir("peft-vera-train"),
        steps: STEPS,
        lr,
        output: output.to_path_buf(),
        sizes: None,
    }
}

/// The example's run into a fresh directory: its printed lines, its losses and the saved adapter.
fn run(lr: f64) -> (Vec<String>, Vec<f32>, PeftAdapter) {
    let dir = tempfile::tempdir().unwrap();
    let mut printed = Vec::new();
    let losses = example::run(&args(dir.path(), lr), &mut printed).unwrap();
    let lines = String::from_utf8(printed).unwrap().lines().map(str::to_string).collect();
    (lines, losses, PeftAdapter::load(dir.path()).unwrap())
}

/// PEFT's losses: before each of the 10 steps and after the last.
fn pefts_losses() -> Vec<f32> {
    read_f32_tensors(&fixture_dir("peft-vera-train/reference.safetensors"))["train.loss"].1.clone()
}

fn relative(got: f32, want: f32) -> f64 {
    (f64::from(got) - f64::from(want)).abs() / f64::from(want).abs()
}

#[test]
fn the_example_reproduces_pefts_losses_and_trained_adapter() {
    let (lines, losses, saved) = run(LR);
    let want = pefts_losses();
    assert_eq!(want.len(), STEPS + 1);
    // One line per loss, `step K loss V`, V the loss returned.
    assert_eq!(lines.len(), STEPS + 1, "{lines:?}");
    for (k, (line, loss)) in lines.iter().zip(&losses).enumerate() {
        assert_eq!(line, &format!("step {k} loss {loss}"));
        let printed: f32 = line.rsplit(' ').next().unwrap().parse().unwrap();
        let e = relative(printed, want[k]);
        assert!(e <= 1e-4, "step {k}: loss {printed}, PEFT {}, relative error {e:e}", want[k]);
    }
    assert!(losses[STEPS] < 0.9 * losses[0], "the run did not train: {losses:?}");

    // The saved directory: PEFT's trained vectors, the same config and projections as before.
    let trained = PeftAdapter::load(fixture_dir("peft-vera-train/trained")).unwrap();
    let before = PeftAdapter::load(fixture_dir("peft-vera-train/adapter")).unwrap();
    assert_eq!(saved.modules().keys().collect::<Vec<_>>(), trained.modules().keys().collect::<Vec<_>>());
    for (name, module) in saved.modules() {
        let want = trained.module(name).unwrap().adapter();
        let got = module.adapter();
        for (what, g, w) in
            [("lambda_d", got.lambda_d(), want.lambda_d()), ("lambda_b", got.lambda_b(), want.lambda_b())]
        {
            let e = rel_err(g, w);
            assert!(e <= 1e-4, "{name} trained {what}: relative error {e:e}");
        }
        // Training moved the vectors well beyond that tolerance.
        assert!(rel_err(got.lambda_b(), before.module(name).unwrap().adapter().lambda_b()) > 1e-2, "{name}");
    }
    assert_eq!(saved.config(), before.config());
    assert_eq!(saved.saved_projections(), before.saved_projections());
}

#[test]
fn a_wrong_learning_rate_does_not_reproduce_the_run() {
    // Negative control for the test above: 10% off in the step size shows in the last loss and in
    // the trained vectors.
    let (_, losses, saved) = run(LR * 1.1);
    let want = pefts_losses();
    let e = relative(losses[STEPS], want[STEPS]);
    assert!(e > 1e-3, "a 10% larger learning rate still matched PEFT's final loss ({e:e})");
    let trained = PeftAdapter::load(fixture_dir("peft-vera-train/trained")).unwrap();
    let (got, want) = (saved.module("layers.2").unwrap(), trained.module("layers.2").unwrap());
    assert!(rel_err(got.adapter().lambda_b(), want.adapter().lambda_b()) > 1e-3);
}

#[test]
fn zero_steps_print_one_loss_and_save_the_adapter_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let mut printed = Vec::new();
    let losses = example::run(&example::Args { steps: 0, ..args(dir.path(), LR) }, &mut printed).unwrap();
    assert_eq!(losses.len(), 1);
    assert!(relative(losses[0], pefts_losses()[0]) <= 1e-4);
    assert_eq!(String::from_utf8(printed).unwrap().lines().count(), 1);
    let before = PeftAdapter::load(fixture_dir("peft-vera-train/adapter")).unwrap();
    assert_eq!(PeftAdapter::load(dir.path()).unwrap(), before);
}

fn parse(args: &[&str]) -> Result<example::Args, String> {
    example::parse_args(args.iter().map(|s| s.to_string()))
}

#[test]
fn arguments_are_parsed_and_bad_ones_are_one_line_errors() {
    let full = ["--fixture", "f", "--steps", "3", "--lr", "0.5", "--output", "o"];
    let a = parse(&full).unwrap();
    assert_eq!((a.fixture.to_str(), a.steps, a.lr, a.output.to_str(), a.sizes), (Some("f"), 3, 0.5, Some("o"), None));
    let sized = parse(&[&full[..], &["--n-max", "64", "--m-max", "32"]].concat()).unwrap();
    assert_eq!(sized.sizes, Some(ProjectionSizes { n_max: 64, m_max: 32 }));

    let cases: [(&[&str], &str); 8] = [
        (&full[..6], "--output is required"),
        (&["--fixture", "f", "--lr", "0.5", "--output", "o"], "--steps is required"),
        (&["--steps"], "--steps needs a value"),
        (&["--steps", "-1"], "--steps expects a non-negative integer, got \"-1\""),
        (&["--lr", "0"], "--lr expects a positive number"),
        (&["--lr", "nan"], "--lr expects a positive number"),
        (&["--bogus"], "unknown argument \"--bogus\""),
        (&[&full[..], &["--n-max", "64"]].concat(), "--n-max and --m-max go together"),
    ];
    for (args, want) in cases {
        let e = parse(args).unwrap_err();
        assert!(e.contains(want) && !e.contains('\n'), "{args:?}: {e}");
    }
}

#[test]
fn a_fixture_that_is_not_there_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let a = example::Args { fixture: dir.path().join("missing"), ..args(&dir.path().join("out"), LR) };
    let e = example::run(&a, &mut Vec::new()).unwrap_err().to_string();
    assert!(e.contains("adapter_config.json"), "{e}");
    assert!(!dir.path().join("out").exists());
}
