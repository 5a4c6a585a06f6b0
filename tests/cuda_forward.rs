//! The CUDA backend against the f64 reference, on every device this build can reach: the CPU
//! emulation of the kernels (feature `cuda-emulation`, which `.ci/run` turns on) and a real GPU when
//! the driver finds one (feature `cuda`). Shapes are drawn so that every kernel and every edge is hit:
//! decode (1..=8 rows, one kernel per power of two) and prefill (9+ rows), one past the 64-row /
//! 64-column tiles and the 32-wide k stages, k ranges split across blocks, n not a multiple of the
//! 8-element vectors, x rows 16-, 8-, 4- and 2-byte aligned (the tile loader's copies of each size
//! and the kernels' scalar paths), both modes, bias on and off,
//! every dtype. The tolerance is `reference::forward_error_bound_cuda`, derived in its docs.
//!
//! `VERA_CUDA_PREFILL_TILE=128` runs every 16-bit prefill call on the 128×128 tiles (which the plans
//! choose on their own only at model sizes): CI and scripts/gpu-check.sh run the file that way too.
//!
//! `VERA_KERNELS_SKIP_EMULATION=1` tests the GPU alone (scripts/gpu-check.sh on the GPU machine,
//! where the emulation would only use up the time box); `VERA_KERNELS_EXPECT_GPU=1` fails the tests
//! when there is no GPU (see tests/gpu/mod.rs). Model-sized shapes run on a GPU only, in
//! tests/cuda_gpu_scale.rs.
#![cfg(any(feature = "cuda", feature = "cuda-emulation"))]

mod common;
mod gpu;

use common::{inputs, Case, Inputs};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use vera_kernels::cuda::{CudaDevice, CudaStream};
use vera_kernels::{bf16, f16, reference, Adapter, Element, Error, MatMut, MatRef, Mode, Projections};

use gpu::{gpu_expected, skipped_emulation};

/// Random cases per dtype on the emulated device (slow: one CUDA thread at a time) and on a GPU.
const EMULATED_CASES: u32 = 40;
const GPU_CASES: u32 = 400;

/// The devices to test, each with how many random cases it can afford per dtype.
fn devices() -> Vec<(CudaDevice, u32)> {
    gpu::devices(EMULATED_CASES, GPU_CASES)
}

#[test]
fn device_constructor_reports_a_missing_gpu_as_an_error() {
    match CudaDevice::new(0) {
        Ok(dev) => {
            assert!(!dev.is_emulated());
        }
        Err(Error::NoCudaDevice { reason }) => {
            assert!(!gpu_expected(), "VERA_KERNELS_EXPECT_GPU=1 but: {reason}");
            assert!(!reason.is_empty());
        }
        Err(e) => panic!("expected NoCudaDevice, got {e:?}"),
    }
    // No machine has this many GPUs: always the no-device error, never a panic.
    assert!(matches!(CudaDevice::new(1 << 20), Err(Error::NoCudaDevice { .. })));
}

fn rows() -> impl Strategy<Value = usize> {
    prop_oneof![1usize..=9, prop::sample::select(vec![16usize, 63, 64, 65, 100, 129]), 10usize..140]
}

/// n: vector-width and k-stage edges (8, 32), the decode lane step (256 for 16-bit types), and sizes
/// long enough to be split across blocks (decode splits from 512 per split, prefill from 256).
fn n_dim() -> impl Strategy<Value = usize> {
    prop_oneof![
        3 => 1usize..300,
        2 => prop::sample::select(vec![1usize, 7, 8, 9, 31, 32, 33, 255, 256, 257]),
        1 => prop::sample::select(vec![520usize, 777, 1100, 1543]),
    ]
}

fn r_dim() -> impl Strategy<Value = usize> {
    prop_oneof![1usize..80, prop::sample::select(vec![1usize, 8, 15, 16, 17, 63, 64, 65, 129])]
}

fn m_dim() -> impl Strategy<Value = usize> {
    prop_oneof![1usize..150, prop::sample::select(vec![1usize, 63, 64, 65, 129])]
}

fn case() -> impl Strategy<Value = Case> {
    (
        (rows(), n_dim(), m_dim(), r_dim()),
        (0usize..9, 0usize..5, prop_oneof![Just(0usize), 0usize..9], 0usize..4),
        (any::<bool>(), any::<bool>(), any::<u64>()),
    )
        .prop_map(Case::from_draw)
}

fn check<T: Element>(stream: &CudaStream, c: &Case) -> Result<(), TestCaseError> {
    let Inputs { projections, adapter, x, y0 } = inputs::<T>(c);
    let (ldx, ldy) = (c.n + c.x_pad, c.m + c.y_pad);

    let layer = projections.slice(c.n, c.m).unwrap();
    let x_ref = MatRef::new(&x, c.t, c.n, ldx).unwrap();
    let base = c.accumulate.then(|| MatRef::new(&y0, c.t, c.m, ldy).unwrap());
    let want = reference::forward(layer, &adapter, x_ref, base).unwrap();
    let bound = reference::forward_error_bound_cuda(layer, &adapter, x_ref, base).unwrap();

    let d_proj = stream.upload_projections(projections.a(), projections.b()).unwrap();
    let d_adapter = stream.upload_adapter(&adapter).unwrap();
    let d_x = stream.upload(x_ref).unwrap();
    let mode = if c.accumulate { Mode::Accumulate } else { Mode::Overwrite };
    let run = || {
        let mut d_y = stream.upload(MatRef::new(&y0, c.t, c.m, ldy).unwrap()).unwrap();
        stream.forward(&d_proj, &d_adapter, &d_x, &mut d_y, mode).unwrap();
        let mut y = y0.clone();
        stream.download(&d_y, MatMut::new(&mut y, c.t, c.m, ldy).unwrap()).unwrap();
        y
    };
    let y = run();
    for t in 0..c.t {
        for i in 0..c.m {
            let got = y[t * ldy + i].to_f64();
            let (w, bd) = (want[t * c.m + i], bound[t * c.m + i]);
            prop_assert!((got - w).abs() <= bd, "y[{t},{i}] = {got}, reference {w}, bound {bd}");
        }
        for i in c.m..ldy {
            prop_assert_eq!(y[t * ldy + i].to_f64().to_bits(), y0[t * ldy + i].to_f64().to_bits(), "padding written");
        }
    }
    // Deterministic: the same call gives the same bits.
    let again = run();
    prop_assert!(y.iter().zip(&again).all(|(p, q)| p.to_f64().to_bits() == q.to_f64().to_bits()));
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
fn forward_f32_within_bound() {
    run_cases::<f32>();
}

#[test]
fn forward_f16_within_bound() {
    run_cases::<f16>();
}

#[test]
fn forward_bf16_within_bound() {
    run_cases::<bf16>();
}

/// Every tile and split edge at least once per dtype, whatever the random draw.
fn edge_cases<T: Element>() {
    let mut seed = 0;
    for (device, _) in devices() {
        let stream = device.stream();
        for &(t, n, r, m) in &[
            (1, 1, 1, 1),
            (1, 1100, 17, 65),
            (2, 257, 64, 64),
            (5, 33, 65, 130),
            (8, 520, 129, 63),
            (9, 8, 1, 1),
            (64, 64, 64, 64),
            (65, 257, 65, 65),
            (130, 777, 33, 129),
            // 10 row tiles: a whole group of the up-projection's launch order (8) and a partial one;
            // 9 row tiles of the large tiles (VERA_CUDA_PREFILL_TILE=128) likewise.
            (600, 40, 70, 130),
            (1100, 40, 70, 130),
        ] {
            // x rows n + x_pad elements apart: a multiple of 8 elements; odd; 2 and 4 past one (for
            // 16-bit types 4- and 8-byte aligned rows: the tile loader's 4- and 8-byte copies).
            let past_8 = |extra: usize| (8 - n % 8 + extra) % 8;
            for (x_pad, accumulate, bias) in
                [(0, true, true), (3, false, false), (past_8(2), true, false), (past_8(4), false, true)]
            {
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

#[test]
fn overwrite_ignores_nan_in_y_and_zero_rows_is_a_no_op() {
    for (device, _) in devices() {
        let stream = device.stream();
        let proj = Projections::<bf16>::from_seed(3, 8, 40, 24).unwrap();
        let adapter = Adapter::new(vec![0.5; 8], vec![0.25; 24]).unwrap();
        let d_proj = stream.upload_projections(proj.a(), proj.b()).unwrap();
        let d_adapter = stream.upload_adapter(&adapter).unwrap();
        for t in [3, 20] {
            let x: Vec<bf16> = (0..t * 40).map(|i| bf16::from_f32((i % 7) as f32 - 3.0)).collect();
            let d_x = stream.upload(MatRef::from_slice(&x, t, 40).unwrap()).unwrap();
            let nan = vec![bf16::NAN; t * 24];
            let mut d_y = stream.upload(MatRef::from_slice(&nan, t, 24).unwrap()).unwrap();
            stream.forward(&d_proj, &d_adapter, &d_x, &mut d_y, Mode::Overwrite).unwrap();
            let y = stream.to_host(&d_y).unwrap();
            let mut want = vec![bf16::ZERO; t * 24];
            vera_kernels::forward(
                &proj,
                &adapter,
                MatRef::from_slice(&x, t, 40).unwrap(),
                MatMut::from_slice(&mut want, t, 24).unwrap(),
                Mode::Overwrite,
            )
            .unwrap();
            assert!(y.iter().all(|v| v.is_finite()), "{}: NaN leaked from y", device.name());
            let err = y.iter().zip(&want).map(|(a, b)| (a.to_f32() - b.to_f32()).abs()).fold(0.0, f32::max);
            assert!(err <= 0.05, "{}: GPU vs CPU differ by {err}", device.name());
        }
        let empty: Vec<bf16> = Vec::new();
        let d_x = stream.upload(MatRef::new(&empty, 0, 40, 40).unwrap()).unwrap();
        let mut d_y = stream.zeros::<bf16>(0, 24, 24).unwrap();
        stream.forward(&d_proj, &d_adapter, &d_x, &mut d_y, Mode::Accumulate).unwrap();
        assert!(stream.to_host(&d_y).unwrap().is_empty());
        // A layer with no outputs is a no-op too (as on the CPU), not a launch of an empty grid.
        let no_outputs = stream.upload_adapter(&Adapter::new(vec![0.5; 8], vec![]).unwrap()).unwrap();
        let x: Vec<bf16> = vec![bf16::ONE; 3 * 40];
        let d_x = stream.upload(MatRef::from_slice(&x, 3, 40).unwrap()).unwrap();
        let mut d_y = stream.zeros::<bf16>(3, 0, 0).unwrap();
        assert_eq!(stream.forward(&d_proj, &no_outputs, &d_x, &mut d_y, Mode::Overwrite), Ok(()));
    }
}

#[test]
fn misuse_is_a_clear_error() {
    for (device, _) in devices() {
        let stream = device.stream();
        let proj = Projections::<f32>::from_seed(1, 4, 16, 12).unwrap();
        let d_proj = stream.upload_projections(proj.a(), proj.b()).unwrap();
        let adapter = stream.upload_adapter(&Adapter::new(vec![1.0; 4], vec![1.0; 12]).unwrap()).unwrap();
        let x = stream.zeros::<f32>(2, 16, 16).unwrap();
        let mut y = stream.zeros::<f32>(2, 12, 12).unwrap();
        let wide_x = stream.zeros::<f32>(2, 17, 17).unwrap();
        assert_eq!(
            stream.forward(&d_proj, &adapter, &wide_x, &mut y, Mode::Accumulate),
            Err(Error::LayerExceedsProjections { what: "in_features", layer: 17, max: 16 })
        );
        let mut wide_y = stream.zeros::<f32>(2, 13, 13).unwrap();
        assert_eq!(
            stream.forward(&d_proj, &adapter, &x, &mut wide_y, Mode::Accumulate),
            Err(Error::LayerExceedsProjections { what: "out_features", layer: 13, max: 12 })
        );
        let rank5 = stream.upload_adapter(&Adapter::new(vec![1.0; 5], vec![1.0; 12]).unwrap()).unwrap();
        assert_eq!(
            stream.forward(&d_proj, &rank5, &x, &mut y, Mode::Accumulate),
            Err(Error::RankMismatch { what: "lambda_d", expected: 4, actual: 5 })
        );
        let mut narrow_y = stream.zeros::<f32>(2, 11, 11).unwrap();
        assert!(matches!(
            stream.forward(&d_proj, &adapter, &x, &mut narrow_y, Mode::Accumulate),
            Err(Error::LengthMismatch { expected: 11, actual: 12, .. })
        ));
        let mut short_y = stream.zeros::<f32>(3, 12, 12).unwrap();
        assert!(matches!(
            stream.forward(&d_proj, &adapter, &x, &mut short_y, Mode::Accumulate),
            Err(Error::ShapeMismatch { expected: [2, 12], actual: [3, 12], .. })
        ));
        assert!(matches!(stream.zeros::<f32>(2, 12, 11), Err(Error::StrideTooSmall { .. })));
        let mut host = vec![0.0f32; 6];
        assert!(matches!(
            stream.download(&y, MatMut::from_slice(&mut host, 2, 3).unwrap()),
            Err(Error::ShapeMismatch { expected: [2, 12], actual: [2, 3], .. })
        ));
        // Projections whose B does not have A's rank (B of a rank-3 model).
        let other = Projections::<f32>::from_seed(1, 3, 16, 12).unwrap();
        assert_eq!(
            stream.upload_projections(proj.a(), other.b()).unwrap_err(),
            Error::RankMismatch { what: "B's columns", expected: 4, actual: 3 }
        );
    }
}

/// Buffers of one device handed to another device's stream are refused (needs a GPU and the
/// emulator in one build: scripts/gpu-check.sh builds both). Uses the emulated device even under
/// `VERA_KERNELS_SKIP_EMULATION=1`: these calls are refused before anything runs.
#[test]
fn buffers_of_another_device_are_refused() {
    let devices: Vec<(CudaDevice, u32)> = devices().into_iter().chain(skipped_emulation().map(|d| (d, 0))).collect();
    for (one, _) in &devices {
        for (other, _) in &devices {
            if one.is_emulated() == other.is_emulated() {
                continue;
            }
            let (s1, s2) = (one.stream(), other.stream());
            let host = Projections::<f32>::from_seed(1, 4, 16, 12).unwrap();
            let proj = s1.upload_projections(host.a(), host.b()).unwrap();
            let adapter = s1.upload_adapter(&Adapter::new(vec![1.0; 4], vec![1.0; 12]).unwrap()).unwrap();
            let x = s1.zeros::<f32>(2, 16, 16).unwrap();
            let mut y = s1.zeros::<f32>(2, 12, 12).unwrap();
            let e = s2.forward(&proj, &adapter, &x, &mut y, Mode::Accumulate).unwrap_err();
            assert_eq!(e, Error::DeviceMismatch { what: "projections" });
            let mut host = vec![0.0f32; 24];
            let e = s2.download(&y, MatMut::from_slice(&mut host, 2, 12).unwrap()).unwrap_err();
            assert!(matches!(e, Error::DeviceMismatch { .. }), "{e:?}");
        }
    }
}

/// The stream timer measures work on every device: positive, finite, and more for more work.
#[test]
fn stream_timer_measures_the_work_it_wraps() {
    for (device, _) in devices() {
        let stream = device.stream();
        let proj = Projections::<bf16>::from_seed(5, 16, 520, 64).unwrap();
        let d_proj = stream.upload_projections(proj.a(), proj.b()).unwrap();
        let adapter = stream.upload_adapter(&Adapter::new(vec![0.5; 16], vec![0.25; 64]).unwrap()).unwrap();
        let x: Vec<bf16> = (0..2 * 520).map(|i| bf16::from_f32((i % 11) as f32 - 5.0)).collect();
        let d_x = stream.upload(MatRef::from_slice(&x, 2, 520).unwrap()).unwrap();
        let mut d_y = stream.zeros::<bf16>(2, 64, 64).unwrap();
        let mut timer = stream.timer().unwrap();
        let ms = timer.time_ms(|| stream.forward(&d_proj, &adapter, &d_x, &mut d_y, Mode::Accumulate)).unwrap();
        assert!(ms.is_finite() && ms > 0.0, "{}: {ms} ms", device.name());
        // An error from the timed work is passed on, and the timer still works after it.
        let refused = timer.time_ms(|| Err(Error::ZeroRank));
        assert_eq!(refused, Err(Error::ZeroRank));
        assert!(timer.time_ms(|| Ok(())).unwrap() >= 0.0);
        assert!(device.l2_cache_bytes() > 0, "{}", device.name());
    }
}
