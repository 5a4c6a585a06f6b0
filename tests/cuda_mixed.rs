//! Mixed-adapter batches on the CUDA backend (`CudaStream::forward_mixed`: an `AdapterBank` on the
//! device, each row of the batch naming its own adapter or none), on every device this build can
//! reach (the CPU emulation of the kernels, and a GPU when the driver finds one; see
//! tests/cuda_forward.rs and tests/gpu/mod.rs). Shapes are drawn so that the decode (matrix-vector)
//! and prefill (tile) kernels and the split-K path are all hit, with 1 to 5 adapters, random row
//! maps with rows without adapter, both modes, bias on some adapters, strided x and y, every dtype:
//!
//! - every row within `reference::forward_error_bound_cuda` of the f64 reference for that row's
//!   adapter, and bit for bit the single-adapter CUDA forward with that adapter on the same shapes;
//!   rows without adapter left as they were (accumulate) or zero (overwrite), exactly; the padding
//!   of y untouched; the same bits from run to run;
//! - a bank of one adapter on every row gives the bits of the single-adapter forward;
//! - every misuse is an `Err` before anything is launched (y unchanged).
//!
//! CI also runs this file with `VERA_CUDA_PREFILL_TILE=128` (the 128×128 prefill tiles).
#![cfg(any(feature = "cuda", feature = "cuda-emulation"))]

mod common;
mod gpu;

use common::{inputs, values, Case, Inputs};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use vera_kernels::cuda::{CudaDevice, CudaStream};
use vera_kernels::rng::TorchCpuGenerator;
use vera_kernels::{
    bf16, f16, reference, Adapter, AdapterBank, Element, Error, MatMut, MatRef, Mode, Projections, NO_ADAPTER,
};

/// Random cases per dtype on the emulated device (slow: one CUDA thread at a time) and on a GPU.
const EMULATED_CASES: u32 = 24;
const GPU_CASES: u32 = 100;

/// The devices to test, each with how many random cases it can afford per dtype.
fn devices() -> Vec<(CudaDevice, u32)> {
    gpu::devices(EMULATED_CASES, GPU_CASES)
}

/// A case, the number of adapters in the bank, and the seed of the bank and the row map.
#[derive(Clone, Debug)]
struct Mixed {
    c: Case,
    k: usize,
    seed: u64,
}

/// Token rows: decode (1..=8, one kernel per power of two) and prefill (9+), around the 64-row tiles.
fn rows() -> impl Strategy<Value = usize> {
    prop_oneof![1usize..=9, prop::sample::select(vec![16usize, 63, 64, 65, 100, 129]), 10usize..140]
}

/// n: vector-width and k-stage edges, and lengths that the plans split across blocks (decode from
/// 512 per split, prefill from 256).
fn n_dim() -> impl Strategy<Value = usize> {
    prop_oneof![
        3 => 1usize..300,
        2 => prop::sample::select(vec![1usize, 7, 8, 9, 31, 32, 33, 255, 256, 257]),
        2 => prop::sample::select(vec![520usize, 777, 1100, 1543]),
    ]
}

fn r_dim() -> impl Strategy<Value = usize> {
    prop_oneof![1usize..80, prop::sample::select(vec![1usize, 8, 15, 16, 17, 63, 64, 65, 129])]
}

fn m_dim() -> impl Strategy<Value = usize> {
    prop_oneof![1usize..150, prop::sample::select(vec![1usize, 63, 64, 65, 129])]
}

fn mixed() -> impl Strategy<Value = Mixed> {
    (
        (rows(), n_dim(), m_dim(), r_dim()),
        (0usize..9, 0usize..5, prop_oneof![Just(0usize), 0usize..9], 0usize..4),
        (any::<bool>(), any::<bool>(), any::<u64>()),
        (1usize..=5, any::<u64>()),
    )
        .prop_map(|(shape, pads, flags, (k, seed))| Mixed { c: Case::from_draw((shape, pads, flags)), k, seed })
}

/// The bank's adapters (adapter 0 is the case's own; with the case's bias flag, every odd adapter
/// has a bias too, so that a bank mixes adapters with and without) and the row map: each row a
/// random adapter or, one time in five, none.
fn bank_and_rows(mx: &Mixed, inp: &Inputs<impl Element>) -> (Vec<Adapter>, Vec<i32>) {
    let c = &mx.c;
    let mut g = TorchCpuGenerator::manual_seed(mx.seed);
    let mut adapters = vec![inp.adapter.clone()];
    for k in 1..mx.k {
        let a = Adapter::new(values(&mut g, c.r, 1.0), values(&mut g, c.m, 1.0)).unwrap();
        adapters.push(if c.bias && k % 2 == 1 { a.with_bias(values(&mut g, c.m, 1.0)).unwrap() } else { a });
    }
    let rows = values(&mut g, c.t, 1.0)
        .iter()
        .map(|&d| {
            let u = (f64::from(d) + 1.0) / 2.0;
            if u < 0.2 {
                NO_ADAPTER
            } else {
                (((u - 0.2) / 0.8 * mx.k as f64) as i32).min(mx.k as i32 - 1)
            }
        })
        .collect();
    (adapters, rows)
}

fn mode(c: &Case) -> Mode {
    if c.accumulate {
        Mode::Accumulate
    } else {
        Mode::Overwrite
    }
}

fn bits<T: Element>(v: &[T]) -> Vec<u64> {
    v.iter().map(|e| e.to_f64().to_bits()).collect()
}

/// One mixed case on `stream`, checked row by row (see the file's docs).
fn check<T: Element>(stream: &CudaStream, mx: &Mixed, adapters: &[Adapter], rows: &[i32]) -> Result<(), TestCaseError> {
    let c = &mx.c;
    let inp = inputs::<T>(c);
    let (ldx, ldy) = (c.n + c.x_pad, c.m + c.y_pad);
    let layer = inp.projections.slice(c.n, c.m).unwrap();
    let x_ref = MatRef::new(&inp.x, c.t, c.n, ldx).unwrap();
    let base = c.accumulate.then(|| MatRef::new(&inp.y0, c.t, c.m, ldy).unwrap());

    let d_proj = stream.upload_projections(inp.projections.a(), inp.projections.b()).unwrap();
    let bank = AdapterBank::new(adapters).unwrap();
    let d_bank = stream.upload_bank(&bank).unwrap();
    prop_assert_eq!((d_bank.len(), d_bank.rank(), d_bank.out_features()), (adapters.len(), c.r, c.m));
    let d_rows = stream.upload_row_map(rows).unwrap();
    prop_assert_eq!(d_rows.rows(), rows);
    let d_x = stream.upload(x_ref).unwrap();
    let y0 = MatRef::new(&inp.y0, c.t, c.m, ldy).unwrap();
    let download = |d_y: &vera_kernels::cuda::DeviceMatrix<T>| {
        let mut y = inp.y0.clone();
        stream.download(d_y, MatMut::new(&mut y, c.t, c.m, ldy).unwrap()).unwrap();
        y
    };
    let run_mixed = || {
        let mut d_y = stream.upload(y0).unwrap();
        stream.forward_mixed(&d_proj, &d_bank, &d_rows, &d_x, &mut d_y, mode(c)).unwrap();
        download(&d_y)
    };
    let y = run_mixed();
    prop_assert!(bits(&y) == bits(&run_mixed()), "two runs of one call differ");

    for (k, adapter) in adapters.iter().enumerate() {
        let mine: Vec<usize> = (0..c.t).filter(|&t| rows[t] == k as i32).collect();
        if mine.is_empty() {
            continue;
        }
        let want = reference::forward(layer, adapter, x_ref, base).unwrap();
        let bound = reference::forward_error_bound_cuda(layer, adapter, x_ref, base).unwrap();
        let mut d_y = stream.upload(y0).unwrap();
        stream.forward(&d_proj, &stream.upload_adapter(adapter).unwrap(), &d_x, &mut d_y, mode(c)).unwrap();
        let single = download(&d_y);
        for t in mine {
            for i in 0..c.m {
                let got = y[t * ldy + i].to_f64();
                let (w, bd) = (want[t * c.m + i], bound[t * c.m + i]);
                prop_assert!(
                    (got - w).abs() <= bd,
                    "y[{},{}] = {} (adapter {}), reference {}, bound {}",
                    t,
                    i,
                    got,
                    k,
                    w,
                    bd
                );
            }
            let row = t * ldy..t * ldy + c.m;
            prop_assert!(
                bits(&y[row.clone()]) == bits(&single[row]),
                "row {} (adapter {}) differs from the single-adapter forward",
                t,
                k
            );
        }
    }
    for (t, &k) in rows.iter().enumerate() {
        if k == NO_ADAPTER {
            let row = t * ldy..t * ldy + c.m;
            let want = if c.accumulate { inp.y0[row.clone()].to_vec() } else { vec![T::from_f32(0.0); c.m] };
            prop_assert!(bits(&y[row]) == bits(&want), "row {} without adapter was written", t);
        }
        let pad = t * ldy + c.m..(t + 1) * ldy;
        prop_assert!(bits(&y[pad.clone()]) == bits(&inp.y0[pad]), "padding of row {} written", t);
    }
    Ok(())
}

fn check_drawn<T: Element>(stream: &CudaStream, mx: &Mixed) -> Result<(), TestCaseError> {
    let inp = inputs::<T>(&mx.c);
    let (adapters, rows) = bank_and_rows(mx, &inp);
    check::<T>(stream, mx, &adapters, &rows)
}

fn run_cases<T: Element>() {
    for (device, cases) in devices() {
        let stream = device.stream();
        let mut runner = TestRunner::new(Config { cases, failure_persistence: None, ..Config::default() });
        runner
            .run(&mixed(), |mx| check_drawn::<T>(&stream, &mx))
            .unwrap_or_else(|e| panic!("{} ({}): {e}", device.name(), T::DTYPE));
    }
}

#[test]
fn mixed_f32_within_bound_and_row_for_row_the_single_adapter_bits() {
    run_cases::<f32>();
}

#[test]
fn mixed_f16_within_bound_and_row_for_row_the_single_adapter_bits() {
    run_cases::<f16>();
}

#[test]
fn mixed_bf16_within_bound_and_row_for_row_the_single_adapter_bits() {
    run_cases::<bf16>();
}

/// Decode without and with a split k range, prefill tiles without and with one, and one past each
/// tile edge: (t, n, r, m).
const EDGE_SHAPES: [(usize, usize, usize, usize); 8] = [
    (1, 33, 17, 65),
    (3, 1100, 16, 40),
    (8, 520, 129, 63),
    (9, 8, 1, 1),
    (64, 64, 64, 64),
    (65, 257, 65, 65),
    (70, 1543, 24, 33),
    (130, 777, 33, 129),
];

/// Every edge shape with three adapters (two with a bias, one without), under row maps that name
/// every adapter and none, all the same adapter, and no adapter at all; both modes.
fn edge_cases<T: Element>() {
    let mut seed = 0;
    for (device, _) in devices() {
        let stream = device.stream();
        for &(t, n, r, m) in &EDGE_SHAPES {
            for (x_pad, accumulate) in [(0, true), (3, false)] {
                seed += 1;
                let c = Case { t, n, m, r, n_extra: 5, m_extra: 3, x_pad, y_pad: 2, bias: true, accumulate, seed };
                let mx = Mixed { c, k: 3, seed };
                let inp = inputs::<T>(&mx.c);
                let (adapters, _) = bank_and_rows(&mx, &inp);
                let cycle: Vec<i32> = (0..t as i32).map(|i| i % 4 - 1).collect();
                for rows in [cycle, vec![2; t], vec![NO_ADAPTER; t]] {
                    check::<T>(&stream, &mx, &adapters, &rows)
                        .unwrap_or_else(|e| panic!("{} {mx:?} rows {rows:?}: {e}", device.name()));
                }
            }
        }
    }
}

#[test]
fn mixed_tile_and_split_edges_f32() {
    edge_cases::<f32>();
}

#[test]
fn mixed_tile_and_split_edges_f16() {
    edge_cases::<f16>();
}

#[test]
fn mixed_tile_and_split_edges_bf16() {
    edge_cases::<bf16>();
}

/// A bank of one adapter, on every row, is the single-adapter forward: the same bits, on every
/// edge shape, both modes, with and without bias, every dtype.
#[test]
fn a_bank_of_one_on_every_row_gives_the_single_adapter_bits() {
    fn one<T: Element>(stream: &CudaStream, seed: &mut u64) {
        for &(t, n, r, m) in &EDGE_SHAPES {
            for (accumulate, bias) in [(true, true), (false, false)] {
                *seed += 1;
                let c = Case { t, n, m, r, n_extra: 2, m_extra: 1, x_pad: 1, y_pad: 1, bias, accumulate, seed: *seed };
                let inp = inputs::<T>(&c);
                let (ldx, ldy) = (n + 1, m + 1);
                let d_proj = stream.upload_projections(inp.projections.a(), inp.projections.b()).unwrap();
                let d_x = stream.upload(MatRef::new(&inp.x, t, n, ldx).unwrap()).unwrap();
                let d_bank =
                    stream.upload_bank(&AdapterBank::new(std::slice::from_ref(&inp.adapter)).unwrap()).unwrap();
                let d_rows = stream.upload_row_map(&vec![0; t]).unwrap();
                let d_adapter = stream.upload_adapter(&inp.adapter).unwrap();
                let y0 = MatRef::new(&inp.y0, t, m, ldy).unwrap();
                let (mut y_mixed, mut y_single) = (stream.upload(y0).unwrap(), stream.upload(y0).unwrap());
                stream.forward_mixed(&d_proj, &d_bank, &d_rows, &d_x, &mut y_mixed, mode(&c)).unwrap();
                stream.forward(&d_proj, &d_adapter, &d_x, &mut y_single, mode(&c)).unwrap();
                let (y_mixed, y_single) = (stream.to_host(&y_mixed).unwrap(), stream.to_host(&y_single).unwrap());
                assert!(bits(&y_mixed) == bits(&y_single), "{} {c:?}: a bank of one differs", T::DTYPE);
            }
        }
    }
    for (device, _) in devices() {
        let stream = device.stream();
        let mut seed = 1000;
        one::<f32>(&stream, &mut seed);
        one::<f16>(&stream, &mut seed);
        one::<bf16>(&stream, &mut seed);
    }
}

/// In a bank where some adapters have a bias, an adapter without one adds none: not even the zeros
/// that stand for it in the bank's bias table, which would turn a -0 output into +0. Overwrite
/// mode, lambda_b half zeros, so that about a quarter of the outputs are -0; decode and prefill.
#[test]
fn an_adapter_without_bias_adds_nothing_in_a_bank_with_biases() {
    fn one<T: Element>(stream: &CudaStream) {
        let (n, r, m) = (40, 8, 24);
        let proj = Projections::<T>::from_seed(7, r, n, m).unwrap();
        let d_proj = stream.upload_projections(proj.a(), proj.b()).unwrap();
        let plain = Adapter::new(vec![0.5; r], (0..m).map(|i| (i % 2) as f32).collect()).unwrap();
        let biased = Adapter::new(vec![0.25; r], vec![1.0; m]).unwrap().with_bias(vec![0.5; m]).unwrap();
        let d_bank = stream.upload_bank(&AdapterBank::new(&[biased, plain.clone()]).unwrap()).unwrap();
        let d_plain = stream.upload_adapter(&plain).unwrap();
        for t in [3, 70] {
            let x: Vec<T> = (0..t * n).map(|i| T::from_f32(((i * 7) % 11) as f32 - 5.0)).collect();
            let d_x = stream.upload(MatRef::from_slice(&x, t, n).unwrap()).unwrap();
            let rows: Vec<i32> = (0..t as i32).map(|i| i % 2).collect();
            let d_rows = stream.upload_row_map(&rows).unwrap();
            let (mut y_mixed, mut y_plain) = (stream.zeros::<T>(t, m, m).unwrap(), stream.zeros::<T>(t, m, m).unwrap());
            stream.forward_mixed(&d_proj, &d_bank, &d_rows, &d_x, &mut y_mixed, Mode::Overwrite).unwrap();
            stream.forward(&d_proj, &d_plain, &d_x, &mut y_plain, Mode::Overwrite).unwrap();
            let (y_mixed, y_plain) = (stream.to_host(&y_mixed).unwrap(), stream.to_host(&y_plain).unwrap());
            let plain_rows = (0..t).filter(|t| t % 2 == 1).flat_map(|t| t * m..(t + 1) * m);
            let negative_zeros = plain_rows.clone().filter(|&i| y_plain[i].to_f64().to_bits() == (-0.0f64).to_bits());
            assert!(negative_zeros.count() > 0, "{} t {t}: no -0 output to tell a zero bias from none", T::DTYPE);
            for i in plain_rows {
                assert_eq!(y_mixed[i].to_f64().to_bits(), y_plain[i].to_f64().to_bits(), "{} t {t}: y[{i}]", T::DTYPE);
            }
        }
    }
    for (device, _) in devices() {
        let stream = device.stream();
        one::<f32>(&stream);
        one::<f16>(&stream);
        one::<bf16>(&stream);
    }
}

#[test]
fn mixed_misuse_is_a_clear_error_and_launches_nothing() {
    for (device, _) in devices() {
        let stream = device.stream();
        let proj = Projections::<f32>::from_seed(1, 4, 16, 12).unwrap();
        let d_proj = stream.upload_projections(proj.a(), proj.b()).unwrap();
        let adapters = [
            Adapter::new(vec![1.0; 4], vec![1.0; 12]).unwrap(),
            Adapter::new(vec![0.5; 4], vec![2.0; 12]).unwrap().with_bias(vec![1.0; 12]).unwrap(),
        ];
        let bank = stream.upload_bank(&AdapterBank::new(&adapters).unwrap()).unwrap();
        let x_host: Vec<f32> = (0..3 * 16).map(|i| (i % 5) as f32 - 2.0).collect();
        let x = stream.upload(MatRef::from_slice(&x_host, 3, 16).unwrap()).unwrap();
        let y0 = vec![7.0f32; 3 * 12];
        let mut y = stream.upload(MatRef::from_slice(&y0, 3, 12).unwrap()).unwrap();
        let ok_rows = stream.upload_row_map(&[1, NO_ADAPTER, 0]).unwrap();
        let call = |rows: &[i32], y: &mut vera_kernels::cuda::DeviceMatrix<f32>| {
            let rows = stream.upload_row_map(rows).unwrap();
            stream.forward_mixed(&d_proj, &bank, &rows, &x, y, Mode::Overwrite)
        };
        assert_eq!(
            call(&[0, 1], &mut y),
            Err(Error::LengthMismatch { what: "row adapters (one index per row of x)", expected: 3, actual: 2 })
        );
        assert_eq!(call(&[0, 2, 1], &mut y), Err(Error::AdapterIndex { row: 1, index: 2, adapters: 2 }));
        assert_eq!(call(&[0, 1, -2], &mut y), Err(Error::AdapterIndex { row: 2, index: -2, adapters: 2 }));
        assert_eq!(
            call(&[i32::MIN, 0, 0], &mut y),
            Err(Error::AdapterIndex { row: 0, index: -(1 << 31), adapters: 2 })
        );
        let rank5 = AdapterBank::new(&[Adapter::new(vec![1.0; 5], vec![1.0; 12]).unwrap()]).unwrap();
        let rank5 = stream.upload_bank(&rank5).unwrap();
        assert_eq!(
            stream.forward_mixed(&d_proj, &rank5, &ok_rows, &x, &mut y, Mode::Overwrite),
            Err(Error::RankMismatch { what: "lambda_d", expected: 4, actual: 5 })
        );
        let mut narrow_y = stream.zeros::<f32>(3, 11, 11).unwrap();
        assert!(matches!(
            stream.forward_mixed(&d_proj, &bank, &ok_rows, &x, &mut narrow_y, Mode::Overwrite),
            Err(Error::LengthMismatch { expected: 11, actual: 12, .. })
        ));
        let wide_x = stream.zeros::<f32>(3, 17, 17).unwrap();
        assert_eq!(
            stream.forward_mixed(&d_proj, &bank, &ok_rows, &wide_x, &mut y, Mode::Overwrite),
            Err(Error::LayerExceedsProjections { what: "in_features", layer: 17, max: 16 })
        );
        let mut short_y = stream.zeros::<f32>(2, 12, 12).unwrap();
        assert!(matches!(
            stream.forward_mixed(&d_proj, &bank, &ok_rows, &x, &mut short_y, Mode::Overwrite),
            Err(Error::ShapeMismatch { expected: [3, 12], actual: [2, 12], .. })
        ));
        // Nothing ran: y holds what was uploaded.
        assert_eq!(stream.to_host(&y).unwrap(), y0, "{}: a refused call wrote y", device.name());
        // The valid call runs, and no rows and no outputs are no-ops, as for one adapter.
        stream.forward_mixed(&d_proj, &bank, &ok_rows, &x, &mut y, Mode::Overwrite).unwrap();
        let y = stream.to_host(&y).unwrap();
        assert!(y[12..24].iter().all(|&v| v == 0.0) && y[..12] != y[24..], "{}: {y:?}", device.name());
        let (no_x, mut no_y) = (stream.zeros::<f32>(0, 16, 16).unwrap(), stream.zeros::<f32>(0, 12, 12).unwrap());
        let no_rows = stream.upload_row_map(&[]).unwrap();
        assert!(no_rows.is_empty());
        assert_eq!(stream.forward_mixed(&d_proj, &bank, &no_rows, &no_x, &mut no_y, Mode::Accumulate), Ok(()));
        let no_outputs = [Adapter::new(vec![0.5; 4], vec![]).unwrap()];
        let no_outputs = stream.upload_bank(&AdapterBank::new(&no_outputs).unwrap()).unwrap();
        let mut zero_cols = stream.zeros::<f32>(3, 0, 0).unwrap();
        let rows = stream.upload_row_map(&[0, NO_ADAPTER, 0]).unwrap();
        assert_eq!(stream.forward_mixed(&d_proj, &no_outputs, &rows, &x, &mut zero_cols, Mode::Overwrite), Ok(()));
    }
}

/// A bank or a row map of one device handed to another device's stream is refused (needs a GPU and
/// the emulator in one build, as tests/cuda_forward.rs's test of the other buffers).
#[test]
fn a_bank_or_row_map_of_another_device_is_refused() {
    let devices: Vec<CudaDevice> = devices().into_iter().map(|(d, _)| d).chain(gpu::skipped_emulation()).collect();
    for one in &devices {
        for other in &devices {
            if one.is_emulated() == other.is_emulated() {
                continue;
            }
            let (s1, s2) = (one.stream(), other.stream());
            let host = Projections::<f32>::from_seed(1, 4, 16, 12).unwrap();
            let bank = AdapterBank::new(&[Adapter::new(vec![1.0; 4], vec![1.0; 12]).unwrap()]).unwrap();
            let (proj, bank_2, rows_2) = (
                s2.upload_projections(host.a(), host.b()).unwrap(),
                s2.upload_bank(&bank).unwrap(),
                s2.upload_row_map(&[0, 0]).unwrap(),
            );
            let (bank_1, rows_1) = (s1.upload_bank(&bank).unwrap(), s1.upload_row_map(&[0, 0]).unwrap());
            let x = s2.zeros::<f32>(2, 16, 16).unwrap();
            let mut y = s2.zeros::<f32>(2, 12, 12).unwrap();
            let e = s2.forward_mixed(&proj, &bank_1, &rows_2, &x, &mut y, Mode::Accumulate).unwrap_err();
            assert_eq!(e, Error::DeviceMismatch { what: "adapter bank" });
            let e = s2.forward_mixed(&proj, &bank_2, &rows_1, &x, &mut y, Mode::Accumulate).unwrap_err();
            assert_eq!(e, Error::DeviceMismatch { what: "row map" });
        }
    }
}
