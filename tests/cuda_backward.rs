//! The CUDA backward pass (`CudaStream::backward`) against the f64 reference, within
//! `reference::backward_error_bound` with the default numerics (everything f32 between the inputs
//! and dx; derived in its docs, not tuned), on every device this build can reach: the CPU
//! emulation of the kernels (feature `cuda-emulation`, which `.ci/run` turns on) and a real GPU
//! when the driver finds one. Shapes are drawn so that every kernel and edge is hit: one row, one
//! past the 64-row / 64-column tiles and the 16-wide k stages, n and m long enough to be split
//! over blocks (from 256 elements per split), strides, both modes, with and without the bias
//! gradient and dx, every dtype; the same call twice gives the same bits.
//!
//! `VERA_KERNELS_SKIP_EMULATION=1` and `VERA_KERNELS_EXPECT_GPU=1` as in tests/cuda_forward.rs.
#![cfg(any(feature = "cuda", feature = "cuda-emulation"))]

mod common;
mod gpu;

use common::grads::{check_gradients, extras, Grads};
use common::{inputs, Case};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use vera_kernels::cuda::{CudaDevice, CudaStream, DeviceGradients};
use vera_kernels::{bf16, f16, Adapter, Element, Error, MatMut, MatRef, Mode, Numerics, Projections};

/// Random cases per dtype on the emulated device (slow: one CUDA thread at a time) and on a GPU.
const EMULATED_CASES: u32 = 24;
const GPU_CASES: u32 = 300;

fn devices() -> Vec<(CudaDevice, u32)> {
    gpu::devices(EMULATED_CASES, GPU_CASES)
}

fn rows() -> impl Strategy<Value = usize> {
    prop_oneof![1usize..=9, prop::sample::select(vec![16usize, 63, 64, 65, 129]), 10usize..140]
}

/// n and m: the 16-wide k stages, the 64-wide tiles, and lengths split over blocks (256 and up).
fn long_dim() -> impl Strategy<Value = usize> {
    prop_oneof![
        3 => 1usize..150,
        2 => prop::sample::select(vec![1usize, 15, 16, 17, 63, 64, 65, 255, 256, 257]),
        1 => prop::sample::select(vec![520usize, 777, 1100]),
    ]
}

fn r_dim() -> impl Strategy<Value = usize> {
    prop_oneof![1usize..80, prop::sample::select(vec![1usize, 15, 16, 17, 63, 64, 65, 129])]
}

fn case() -> impl Strategy<Value = Case> {
    (
        (rows(), long_dim(), long_dim(), r_dim()),
        (0usize..9, 0usize..5, prop_oneof![Just(0usize), 0usize..9], 0usize..4),
        (any::<bool>(), any::<bool>(), any::<u64>()),
    )
        .prop_map(Case::from_draw)
}

/// Runs the case's backward on `stream`: the bias gradient when the case has a bias, dx always.
fn run<T: Element>(stream: &CudaStream, c: &Case, adapter: &Adapter, proj: &Projections<T>, x: &[T]) -> Grads<T> {
    let (dy, old) = extras::<T>(c, 1);
    let (ldx, lddy) = (c.n + c.x_pad, c.m + c.y_pad);
    let d_proj = stream.upload_projections(proj.a(), proj.b()).unwrap();
    let d_adapter = stream.upload_adapter(adapter).unwrap();
    let d_x = stream.upload(MatRef::new(x, c.t, c.n, ldx).unwrap()).unwrap();
    let d_dy = stream.upload(MatRef::new(&dy, c.t, c.m, lddy).unwrap()).unwrap();
    let vector = |v: &[f32]| stream.upload(MatRef::from_slice(v, 1, v.len()).unwrap()).unwrap();
    let (mut dld, mut dlb, mut dbias) = (vector(&old.lambda_d), vector(&old.lambda_b), vector(&old.bias));
    let mut dx = stream.upload(MatRef::new(&old.x, c.t, c.n, ldx).unwrap()).unwrap();
    let mode = if c.accumulate { Mode::Accumulate } else { Mode::Overwrite };
    let mut grads = DeviceGradients::new(&mut dld, &mut dlb).with_x(&mut dx);
    if c.bias {
        grads = grads.with_bias(&mut dbias);
    }
    stream.backward(&d_proj, &d_adapter, &d_x, &d_dy, grads, mode).unwrap();
    let mut out = old.clone();
    stream.download(&dld, MatMut::from_slice(&mut out.lambda_d, 1, c.r).unwrap()).unwrap();
    stream.download(&dlb, MatMut::from_slice(&mut out.lambda_b, 1, c.m).unwrap()).unwrap();
    stream.download(&dbias, MatMut::from_slice(&mut out.bias, 1, c.m).unwrap()).unwrap();
    stream.download(&dx, MatMut::new(&mut out.x, c.t, c.n, ldx).unwrap()).unwrap();
    out
}

fn check<T: Element>(stream: &CudaStream, c: &Case) -> Result<(), TestCaseError> {
    let inp = inputs::<T>(c);
    let out = run(stream, c, &inp.adapter, &inp.projections, &inp.x);
    check_gradients(c, &stream.device().name(), &out, Numerics::default(), c.bias)?;
    // Deterministic: the same call gives the same bits.
    let again = run(stream, c, &inp.adapter, &inp.projections, &inp.x);
    prop_assert!(out.bits() == again.bits(), "a second call gave other bits");
    Ok(())
}

fn run_cases<T: Element>() {
    for (device, cases) in devices() {
        let stream = device.stream();
        let mut runner = TestRunner::new(Config { cases, failure_persistence: None, ..Config::default() });
        runner
            .run(&case(), |c| check::<T>(&stream, &c))
            .unwrap_or_else(|e| panic!("{} ({}): {e}", device.name(), T::DTYPE));
    }
}

#[test]
fn backward_f32_within_bound() {
    run_cases::<f32>();
}

#[test]
fn backward_f16_within_bound() {
    run_cases::<f16>();
}

#[test]
fn backward_bf16_within_bound() {
    run_cases::<bf16>();
}

/// Every tile and split edge at least once per dtype, whatever the random draw.
fn edge_cases<T: Element>() {
    let mut seed = 0;
    for (device, _) in devices() {
        let stream = device.stream();
        // (t, n, r, m): one row; n and m split over blocks; one past the tiles and stages.
        for &(t, n, r, m) in
            &[(1, 1, 1, 1), (1, 1100, 17, 777), (9, 65, 64, 520), (65, 257, 65, 17), (130, 33, 129, 65)]
        {
            for (x_pad, accumulate, bias) in [(0, true, true), (3, false, false)] {
                seed += 1;
                let c = Case { t, n, m, r, n_extra: 5, m_extra: 3, x_pad, y_pad: 2, bias, accumulate, seed };
                check::<T>(&stream, &c).unwrap_or_else(|e| panic!("{} {c:?}: {e}", device.name()));
            }
        }
    }
}

#[test]
fn tile_and_split_edges_f32() {
    edge_cases::<f32>();
}

#[test]
fn tile_and_split_edges_f16() {
    edge_cases::<f16>();
}

#[test]
fn tile_and_split_edges_bf16() {
    edge_cases::<bf16>();
}

/// At PEFT's initialisation (`lambda_b = 0`) `g` is zero, so only `dlambda_b` (and the bias's) is
/// non-zero: `dlambda_d` and dx come back as exact zeros, written over NaN.
#[test]
fn at_peft_initialisation_only_lambda_b_has_a_gradient() {
    for (device, _) in devices() {
        let stream = device.stream();
        let (t, n, r, m) = (70, 300, 16, 90);
        let proj = Projections::<bf16>::from_seed(7, r, n, m).unwrap();
        let adapter = Adapter::new(vec![0.1; r], vec![0.0; m]).unwrap();
        let d_proj = stream.upload_projections(proj.a(), proj.b()).unwrap();
        let d_adapter = stream.upload_adapter(&adapter).unwrap();
        let x: Vec<bf16> = (0..t * n).map(|i| bf16::from_f32(((i * 7) % 13) as f32 / 6.0 - 1.0)).collect();
        let dy: Vec<bf16> = (0..t * m).map(|i| bf16::from_f32(((i * 5) % 11) as f32 / 5.0 - 1.0)).collect();
        let d_x = stream.upload(MatRef::from_slice(&x, t, n).unwrap()).unwrap();
        let d_dy = stream.upload(MatRef::from_slice(&dy, t, m).unwrap()).unwrap();
        let nan = |rows: usize, cols: usize| {
            stream.upload(MatRef::from_slice(&vec![f32::NAN; rows * cols], rows, cols).unwrap()).unwrap()
        };
        let (mut dld, mut dlb) = (nan(1, r), nan(1, m));
        let mut dx = stream.upload(MatRef::from_slice(&vec![bf16::NAN; t * n], t, n).unwrap()).unwrap();
        let grads = DeviceGradients::new(&mut dld, &mut dlb).with_x(&mut dx);
        stream.backward(&d_proj, &d_adapter, &d_x, &d_dy, grads, Mode::Overwrite).unwrap();
        assert!(stream.to_host(&dld).unwrap().iter().all(|&v| v == 0.0), "{}", device.name());
        assert!(stream.to_host(&dx).unwrap().iter().all(|&v| v == bf16::ZERO), "{}", device.name());
        let dlb = stream.to_host(&dlb).unwrap();
        assert!(dlb.iter().all(|v| v.is_finite()) && dlb.iter().any(|&v| v != 0.0), "{}: {dlb:?}", device.name());
    }
}

/// A call with no rows writes zero gradients under overwrite and leaves them under accumulate.
#[test]
fn no_rows_gives_zero_gradients_or_leaves_them() {
    for (device, _) in devices() {
        let stream = device.stream();
        let proj = Projections::<f16>::from_seed(3, 8, 40, 24).unwrap();
        let d_proj = stream.upload_projections(proj.a(), proj.b()).unwrap();
        let d_adapter = stream.upload_adapter(&Adapter::new(vec![0.5; 8], vec![0.25; 24]).unwrap()).unwrap();
        let (x, dy) = (stream.zeros::<f16>(0, 40, 40).unwrap(), stream.zeros::<f16>(0, 24, 24).unwrap());
        for (mode, want) in [(Mode::Accumulate, 2.0f32), (Mode::Overwrite, 0.0)] {
            let twos = |len: usize| stream.upload(MatRef::from_slice(&vec![2.0f32; len], 1, len).unwrap()).unwrap();
            let (mut dld, mut dlb, mut dbias) = (twos(8), twos(24), twos(24));
            let grads = DeviceGradients::new(&mut dld, &mut dlb).with_bias(&mut dbias);
            stream.backward(&d_proj, &d_adapter, &x, &dy, grads, mode).unwrap();
            for g in [&dld, &dlb, &dbias] {
                assert!(stream.to_host(g).unwrap().iter().all(|&v| v == want), "{} {mode:?}", device.name());
            }
        }
    }
}

#[test]
fn misuse_is_a_clear_error() {
    for (device, _) in devices() {
        let stream = device.stream();
        let proj = Projections::<f32>::from_seed(1, 4, 16, 12).unwrap();
        let d_proj = stream.upload_projections(proj.a(), proj.b()).unwrap();
        let adapter = stream.upload_adapter(&Adapter::new(vec![1.0; 4], vec![1.0; 12]).unwrap()).unwrap();
        let (x, dy) = (stream.zeros::<f32>(2, 16, 16).unwrap(), stream.zeros::<f32>(2, 12, 12).unwrap());
        let (mut dld, mut dlb) = (stream.zeros::<f32>(1, 4, 4).unwrap(), stream.zeros::<f32>(1, 12, 12).unwrap());
        let wide_x = stream.zeros::<f32>(2, 17, 17).unwrap();
        let e =
            stream.backward(&d_proj, &adapter, &wide_x, &dy, DeviceGradients::new(&mut dld, &mut dlb), Mode::Overwrite);
        assert_eq!(e, Err(Error::LayerExceedsProjections { what: "in_features", layer: 17, max: 16 }));
        let short_dy = stream.zeros::<f32>(3, 12, 12).unwrap();
        let e = stream.backward(
            &d_proj,
            &adapter,
            &x,
            &short_dy,
            DeviceGradients::new(&mut dld, &mut dlb),
            Mode::Overwrite,
        );
        assert!(matches!(e, Err(Error::ShapeMismatch { expected: [2, 12], actual: [3, 12], .. })), "{e:?}");
        let rank5 = stream.upload_adapter(&Adapter::new(vec![1.0; 5], vec![1.0; 12]).unwrap()).unwrap();
        let e = stream.backward(&d_proj, &rank5, &x, &dy, DeviceGradients::new(&mut dld, &mut dlb), Mode::Overwrite);
        assert_eq!(e, Err(Error::RankMismatch { what: "lambda_d", expected: 4, actual: 5 }));
        let mut long_dld = stream.zeros::<f32>(1, 5, 5).unwrap();
        let e =
            stream.backward(&d_proj, &adapter, &x, &dy, DeviceGradients::new(&mut long_dld, &mut dlb), Mode::Overwrite);
        assert_eq!(
            e,
            Err(Error::ShapeMismatch {
                what: "gradient of lambda_d (must be [1, r])",
                expected: [1, 4],
                actual: [1, 5]
            })
        );
        let mut column = stream.zeros::<f32>(12, 1, 1).unwrap();
        let e =
            stream.backward(&d_proj, &adapter, &x, &dy, DeviceGradients::new(&mut dld, &mut column), Mode::Overwrite);
        assert!(matches!(e, Err(Error::ShapeMismatch { expected: [1, 12], actual: [12, 1], .. })), "{e:?}");
        let mut bias = stream.zeros::<f32>(1, 11, 11).unwrap();
        let grads = DeviceGradients::new(&mut dld, &mut dlb).with_bias(&mut bias);
        let e = stream.backward(&d_proj, &adapter, &x, &dy, grads, Mode::Overwrite);
        assert!(matches!(e, Err(Error::ShapeMismatch { expected: [1, 12], actual: [1, 11], .. })), "{e:?}");
        let mut dx = stream.zeros::<f32>(2, 15, 15).unwrap();
        let grads = DeviceGradients::new(&mut dld, &mut dlb).with_x(&mut dx);
        let e = stream.backward(&d_proj, &adapter, &x, &dy, grads, Mode::Overwrite);
        assert!(matches!(e, Err(Error::ShapeMismatch { expected: [2, 16], actual: [2, 15], .. })), "{e:?}");
        // Nothing was written by the refused calls.
        assert!(stream.to_host(&dld).unwrap().iter().all(|&v| v == 0.0));
    }
}

/// Buffers of one device handed to another device's stream are refused (needs a GPU and the
/// emulator in one build, as in tests/cuda_forward.rs).
#[test]
fn buffers_of_another_device_are_refused() {
    let devices: Vec<CudaDevice> = devices().into_iter().map(|(d, _)| d).chain(gpu::skipped_emulation()).collect();
    for one in &devices {
        for other in devices.iter().filter(|o| o.is_emulated() != one.is_emulated()) {
            let (s1, s2) = (one.stream(), other.stream());
            let host = Projections::<f32>::from_seed(1, 4, 16, 12).unwrap();
            let proj = s2.upload_projections(host.a(), host.b()).unwrap();
            let adapter = s2.upload_adapter(&Adapter::new(vec![1.0; 4], vec![1.0; 12]).unwrap()).unwrap();
            let (x, dy) = (s2.zeros::<f32>(2, 16, 16).unwrap(), s2.zeros::<f32>(2, 12, 12).unwrap());
            let (mut dld, mut dlb) = (s1.zeros::<f32>(1, 4, 4).unwrap(), s2.zeros::<f32>(1, 12, 12).unwrap());
            let e = s2.backward(&proj, &adapter, &x, &dy, DeviceGradients::new(&mut dld, &mut dlb), Mode::Overwrite);
            assert_eq!(e, Err(Error::DeviceMismatch { what: "gradient of lambda_d" }));
        }
    }
}
