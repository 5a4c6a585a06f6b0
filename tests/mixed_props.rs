//! Mixed-adapter batches (an `AdapterBank`, each row naming its own adapter or none), on every CPU
//! tier this machine has, over random shapes (1, primes, one past every block and tile size),
//! strides, both modes and every dtype:
//!
//! - the forward gives, row for row, the same bits as a single-adapter `forward` with that row's
//!   adapter (which `forward_props` checks against the f64 reference); rows without an adapter
//!   are left bit for bit (accumulate) or zeroed (overwrite); 1 and 2 threads agree bitwise; the
//!   training forward gives the same `y` and the `h` of the single-adapter training forward;
//! - the backward's per-adapter gradients are within `reference::backward_error_bound` of the
//!   f64 reference over that adapter's rows only (the reference run with `dy` zeroed on every
//!   other row, which adds nothing to any of that adapter's sums); `dx` likewise row by row;
//!   1, 2 and 3 threads agree bitwise; a bank of one adapter on every row gives the bits of
//!   `backward`;
//! - every misuse is an `Err` before anything is written.

mod common;

use common::grads::{extras, within, Grads};
use common::{dim, inputs, kdim, split_pool, values, Case, Inputs};
use proptest::prelude::*;
use vera_kernels::rng::TorchCpuGenerator;
use vera_kernels::{
    backward, backward_mixed, bf16, f16, forward, forward_mixed, forward_train, forward_train_mixed, reference,
    with_isa, Adapter, AdapterBank, Element, Error, Gradients, Isa, MatMut, MatRef, Mode, BLOCK_ROWS, NO_ADAPTER,
};

/// A case, the number of adapters, and the seed of the bank and the row map.
#[derive(Clone, Debug)]
struct Mixed {
    c: Case,
    k: usize,
    seed: u64,
}

fn mixed() -> impl Strategy<Value = Mixed> {
    (
        (dim(70), kdim(60), kdim(60), kdim(40)),
        (0usize..4, 0usize..4, 0usize..3, 0usize..3),
        (any::<bool>(), any::<bool>(), any::<u64>()),
        (1usize..6, any::<u64>()),
    )
        .prop_map(|(shape, pads, flags, (k, seed))| Mixed { c: Case::from_draw((shape, pads, flags)), k, seed })
}

/// The bank (adapter 0 is the case's own; with the case's bias flag, every other adapter has a
/// bias), and the row map: each row a random adapter or, one time in five, none.
fn bank_and_rows(mx: &Mixed, inp: &Inputs<impl Element>) -> (Vec<Adapter>, Vec<i32>) {
    let c = &mx.c;
    let mut g = TorchCpuGenerator::manual_seed(mx.seed);
    let mut adapters = vec![inp.adapter.clone()];
    for k in 1..mx.k {
        let a = Adapter::new(values(&mut g, c.r, 1.0), values(&mut g, c.m, 1.0)).unwrap();
        adapters.push(if c.bias && k % 2 == 1 { a.with_bias(values(&mut g, c.m, 1.0)).unwrap() } else { a });
    }
    let draws = values(&mut g, c.t, 1.0);
    let rows = draws
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

fn check_forward<T: Element>(mx: &Mixed) -> Result<(), TestCaseError> {
    let c = &mx.c;
    let inp = inputs::<T>(c);
    let (adapters, rows) = bank_and_rows(mx, &inp);
    let bank = AdapterBank::new(&adapters).unwrap();
    let x = MatRef::new(&inp.x, c.t, c.n, c.n + c.x_pad).unwrap();
    let stride = c.m + c.y_pad;
    for isa in Isa::available() {
        let run_mixed = |threads: usize, h: Option<&mut Vec<f32>>| {
            let mut y = inp.y0.clone();
            split_pool(threads).install(|| {
                with_isa(isa, || {
                    let ym = MatMut::new(&mut y, c.t, c.m, stride).unwrap();
                    match h {
                        None => forward_mixed(&inp.projections, &bank, &rows, x, ym, mode(c)).unwrap(),
                        Some(h) => {
                            let hm = MatMut::from_slice(h, c.t, c.r).unwrap();
                            forward_train_mixed(&inp.projections, &bank, &rows, x, ym, mode(c), hm).unwrap()
                        }
                    }
                })
            });
            y
        };
        let one = run_mixed(2, None);
        // Under Miri (slow) only the split run, the one that can race; thread counts are compared natively.
        if !cfg!(miri) {
            prop_assert_eq!(bits(&one), bits(&run_mixed(1, None)), "1 and 2 threads differ on {}", isa);
        }
        let mut h_mixed = vec![f32::NAN; c.t * c.r];
        prop_assert_eq!(bits(&one), bits(&run_mixed(2, Some(&mut h_mixed))), "training forward's y on {}", isa);
        // Under Miri the edge cases look for undefined behaviour; their numbers are checked natively.
        if cfg!(miri) {
            continue;
        }
        for (k, adapter) in adapters.iter().enumerate() {
            let mut y = inp.y0.clone();
            let mut h = vec![f32::NAN; c.t * c.r];
            with_isa(isa, || {
                let ym = MatMut::new(&mut y, c.t, c.m, stride).unwrap();
                forward(&inp.projections, adapter, x, ym, mode(c)).unwrap();
                let mut y2 = inp.y0.clone();
                let ym = MatMut::new(&mut y2, c.t, c.m, stride).unwrap();
                let hm = MatMut::from_slice(&mut h, c.t, c.r).unwrap();
                forward_train(&inp.projections, adapter, x, ym, mode(c), hm).unwrap();
            });
            prop_assert_eq!(bits(&h), bits(&h_mixed), "h differs from the single-adapter h on {}", isa);
            for (t, &id) in rows.iter().enumerate() {
                let row = t * stride..t * stride + c.m;
                if id == k as i32 {
                    prop_assert_eq!(bits(&one[row.clone()]), bits(&y[row]), "{} row {} (adapter {})", isa, t, k);
                }
            }
        }
        for (t, &id) in rows.iter().enumerate() {
            let row = t * stride..t * stride + c.m;
            if id == NO_ADAPTER {
                let want = if c.accumulate { inp.y0[row.clone()].to_vec() } else { vec![T::from_f32(0.0); c.m] };
                prop_assert_eq!(bits(&one[row]), bits(&want), "{} row {} without adapter", isa, t);
            }
            // The pad past m is never written.
            prop_assert_eq!(
                bits(&one[t * stride + c.m..(t + 1) * stride]),
                bits(&inp.y0[t * stride + c.m..(t + 1) * stride])
            );
        }
    }
    Ok(())
}

fn run_backward_mixed<T: Element>(mx: &Mixed, isa: Isa, threads: usize) -> Grads<T> {
    let c = &mx.c;
    let inp = inputs::<T>(c);
    let (adapters, rows) = bank_and_rows(mx, &inp);
    let bank = AdapterBank::new(&adapters).unwrap();
    let (dy, mut out) = extras::<T>(c, mx.k);
    let x = MatRef::new(&inp.x, c.t, c.n, c.n + c.x_pad).unwrap();
    let dy = MatRef::new(&dy, c.t, c.m, c.m + c.y_pad).unwrap();
    split_pool(threads).install(|| {
        with_isa(isa, || {
            let grads = Gradients::new(&mut out.lambda_d, &mut out.lambda_b)
                .with_bias(&mut out.bias)
                .with_x(MatMut::new(&mut out.x, c.t, c.n, c.n + c.x_pad).unwrap());
            backward_mixed(&inp.projections, &bank, &rows, x, dy, None, grads, mode(c)).unwrap();
        })
    });
    out
}

fn check_backward<T: Element>(mx: &Mixed) -> Result<(), TestCaseError> {
    let c = &mx.c;
    let inp = inputs::<T>(c);
    let (adapters, rows) = bank_and_rows(mx, &inp);
    let (dy, old) = extras::<T>(c, mx.k);
    let layer = inp.projections.slice(c.n, c.m).unwrap();
    let x = MatRef::new(&inp.x, c.t, c.n, c.n + c.x_pad).unwrap();
    let (r, m, n, xs, ys) = (c.r, c.m, c.n, c.n + c.x_pad, c.m + c.y_pad);
    for isa in Isa::available() {
        let out = run_backward_mixed::<T>(mx, isa, 2);
        // Under Miri (slow) only the split run, the one that can race; thread counts are compared natively.
        if !cfg!(miri) {
            let one = run_backward_mixed::<T>(mx, isa, 1);
            prop_assert_eq!(one.bits(), out.bits(), "1 and 2 threads differ on {}", isa);
        }
        // Under Miri the edge cases look for undefined behaviour; their numbers are checked natively.
        if cfg!(miri) {
            continue;
        }
        for (k, adapter) in adapters.iter().enumerate() {
            // This adapter's rows only: dy zeroed elsewhere.
            let mut dyk = dy.clone();
            for (t, &id) in rows.iter().enumerate() {
                if id != k as i32 {
                    dyk[t * ys..(t + 1) * ys].fill(T::from_f32(0.0));
                }
            }
            let dyk = MatRef::new(&dyk, c.t, m, ys).unwrap();
            let want = reference::backward(layer, adapter, x, dyk).unwrap();
            let numerics = with_isa(isa, vera_kernels::tier_facts::<T>).backward_numerics();
            let bound = reference::backward_error_bound(layer, adapter, x, dyk, numerics).unwrap();
            let present = rows.contains(&(k as i32));
            let f32s = [
                (
                    "lambda_d",
                    &out.lambda_d[k * r..(k + 1) * r],
                    &want.lambda_d,
                    &bound.lambda_d,
                    &old.lambda_d[k * r..],
                ),
                (
                    "lambda_b",
                    &out.lambda_b[k * m..(k + 1) * m],
                    &want.lambda_b,
                    &bound.lambda_b,
                    &old.lambda_b[k * m..],
                ),
                ("bias", &out.bias[k * m..(k + 1) * m], &want.bias, &bound.bias, &old.bias[k * m..]),
            ];
            for (what, got, want, bound, old) in f32s {
                for i in 0..got.len() {
                    let o = c.accumulate.then(|| f64::from(old[i]));
                    prop_assert!(
                        within(f64::from(got[i]), want[i], bound[i], o),
                        "{isa} adapter {k} d{what}[{i}] = {}, reference {}, bound {}, old {o:?}",
                        got[i],
                        want[i],
                        bound[i]
                    );
                    if !present {
                        // An adapter without rows: left as it was, or exactly zero.
                        let expect = if c.accumulate { old[i] } else { 0.0 };
                        prop_assert_eq!(got[i].to_bits(), expect.to_bits(), "{} adapter {} without rows", isa, k);
                    }
                }
            }
            for (t, &id) in rows.iter().enumerate() {
                if id != k as i32 {
                    continue;
                }
                for j in 0..n {
                    let idx = t * xs + j;
                    let o = c.accumulate.then(|| old.x[idx].to_f64());
                    let (w, b) = (want.x[t * n + j], bound.x[t * n + j]);
                    let b =
                        if c.accumulate { b + T::UNIT_ROUNDOFF * (old.x[idx].to_f64().abs() + w.abs() + b) } else { b };
                    prop_assert!(
                        within(out.x[idx].to_f64(), w, b, o),
                        "{isa} dx[{t},{j}] = {:?}, reference {w}, bound {b}",
                        out.x[idx]
                    );
                }
            }
        }
        for (t, &id) in rows.iter().enumerate() {
            let row = t * xs..t * xs + n;
            if id == NO_ADAPTER {
                let want = if c.accumulate { old.x[row.clone()].to_vec() } else { vec![T::from_f32(0.0); n] };
                prop_assert_eq!(bits(&out.x[row]), bits(&want), "{} dx row {} without adapter", isa, t);
            }
            prop_assert_eq!(bits(&out.x[t * xs + n..(t + 1) * xs]), bits(&old.x[t * xs + n..(t + 1) * xs]));
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn mixed_forward_f32_matches_single_adapter_calls(mx in mixed()) { check_forward::<f32>(&mx)?; }

    #[test]
    fn mixed_forward_f16_matches_single_adapter_calls(mx in mixed()) { check_forward::<f16>(&mx)?; }

    #[test]
    fn mixed_forward_bf16_matches_single_adapter_calls(mx in mixed()) { check_forward::<bf16>(&mx)?; }

    #[test]
    fn mixed_backward_f32_within_bound(mx in mixed()) { check_backward::<f32>(&mx)?; }

    #[test]
    fn mixed_backward_f16_within_bound(mx in mixed()) { check_backward::<f16>(&mx)?; }

    #[test]
    fn mixed_backward_bf16_within_bound(mx in mixed()) { check_backward::<bf16>(&mx)?; }
}

/// The fixed edge cases of `common::edge_cases` with banks of 1 to 3 adapters, every dtype, forward
/// and backward: the run `.ci/run` makes under Miri.
#[test]
fn edge_cases_every_dtype() {
    for (i, c) in common::edge_cases().into_iter().enumerate() {
        let mx = Mixed { c, k: 1 + i % 3, seed: i as u64 };
        for dtype in common::edge_dtypes(i) {
            vera_kernels::with_element_type!(dtype, T => check_forward::<T>(&mx).and_then(|()| check_backward::<T>(&mx))).unwrap();
        }
    }
}

/// Decode (one block: columns split across threads) and prefill (blocks in parallel), large enough
/// to split without the lowered threshold too.
fn big_cases() -> [Mixed; 2] {
    let case = |t, n, m, r| Case {
        t,
        n,
        m,
        r,
        n_extra: 2,
        m_extra: 1,
        x_pad: 1,
        y_pad: 2,
        bias: true,
        accumulate: true,
        seed: 5,
    };
    [
        Mixed { c: case(3, 700, 650, 67), k: 3, seed: 9 },
        Mixed { c: case(3 * BLOCK_ROWS + 5, 300, 260, 40), k: 5, seed: 11 },
    ]
}

#[test]
fn mixed_gradients_are_bitwise_identical_for_1_2_and_3_threads() {
    fn same<T: Element>(mx: &Mixed) {
        for isa in Isa::available() {
            let one = run_backward_mixed::<T>(mx, isa, 1);
            assert_eq!(one.bits(), run_backward_mixed::<T>(mx, isa, 2).bits(), "{isa} 2 threads");
            assert_eq!(one.bits(), run_backward_mixed::<T>(mx, isa, 3).bits(), "{isa} 3 threads");
        }
    }
    for mx in big_cases() {
        same::<f32>(&mx);
        same::<f16>(&mx);
        same::<bf16>(&mx);
    }
}

#[test]
fn a_bank_of_one_adapter_on_every_row_gives_the_bits_of_backward() {
    for mx in big_cases() {
        let c = &mx.c;
        let inp = inputs::<f32>(c);
        let bank = AdapterBank::new(std::slice::from_ref(&inp.adapter)).unwrap();
        let rows = vec![0; c.t];
        let (dy, old) = extras::<f32>(c, 1);
        let x = MatRef::new(&inp.x, c.t, c.n, c.n + c.x_pad).unwrap();
        let dy = MatRef::new(&dy, c.t, c.m, c.m + c.y_pad).unwrap();
        for isa in Isa::available() {
            let (mut single, mut mixed) = (old.clone(), old.clone());
            with_isa(isa, || {
                let Grads { lambda_d, lambda_b, bias, x: dx } = &mut single;
                let dx = MatMut::new(dx, c.t, c.n, c.n + c.x_pad).unwrap();
                let g = Gradients::new(lambda_d, lambda_b).with_bias(bias).with_x(dx);
                backward(&inp.projections, &inp.adapter, x, dy, None, g, Mode::Accumulate).unwrap();
                let Grads { lambda_d, lambda_b, bias, x: dx } = &mut mixed;
                let dx = MatMut::new(dx, c.t, c.n, c.n + c.x_pad).unwrap();
                let g = Gradients::new(lambda_d, lambda_b).with_bias(bias).with_x(dx);
                backward_mixed(&inp.projections, &bank, &rows, x, dy, None, g, Mode::Accumulate).unwrap();
            });
            assert_eq!(single.bits(), mixed.bits(), "{isa}");
        }
    }
}

#[test]
fn misuse_is_an_error_before_anything_is_written() {
    let c = Case {
        t: 4,
        n: 10,
        m: 6,
        r: 3,
        n_extra: 0,
        m_extra: 0,
        x_pad: 0,
        y_pad: 0,
        bias: false,
        accumulate: true,
        seed: 1,
    };
    let inp = inputs::<f32>(&c);
    let other = Adapter::new(vec![1.0; 3], vec![1.0; 6]).unwrap();
    let bank = AdapterBank::new(&[inp.adapter.clone(), other]).unwrap();
    let x = MatRef::from_slice(&inp.x, 4, 10).unwrap();
    let mut y = inp.y0.clone();
    let cases: [(&[i32], &str); 4] = [
        (&[0, 1, 2, 0], "row 2 names adapter 2, but the bank holds 2"),
        (&[0, -2, 1, 0], "row 1 names adapter -2"),
        (&[0, 1, 0], "row adapters (one index per row of x): expected length 4, got 3"),
        (&[0, 1, 0, 1, 0], "expected length 4, got 5"),
    ];
    for (rows, want) in cases {
        let err =
            forward_mixed(&inp.projections, &bank, rows, x, MatMut::from_slice(&mut y, 4, 6).unwrap(), Mode::Overwrite)
                .unwrap_err();
        assert!(err.to_string().contains(want), "{err}");
        let (mut ld, mut lb) = (vec![7.0f32; 6], vec![7.0f32; 12]);
        let dy = MatRef::from_slice(&inp.y0, 4, 6).unwrap();
        let g = Gradients::new(&mut ld, &mut lb);
        let err = backward_mixed(&inp.projections, &bank, rows, x, dy, None, g, Mode::Overwrite).unwrap_err();
        assert!(err.to_string().contains(want), "{err}");
        assert!(ld.iter().chain(&lb).all(|&v| v == 7.0));
    }
    assert_eq!(y, inp.y0, "y was written by a call that failed");
    // Gradient buffers sized for one adapter, not the bank.
    let (mut ld, mut lb) = (vec![0.0f32; 3], vec![0.0f32; 12]);
    let dy = MatRef::from_slice(&inp.y0, 4, 6).unwrap();
    let err = backward_mixed(
        &inp.projections,
        &bank,
        &[0; 4],
        x,
        dy,
        None,
        Gradients::new(&mut ld, &mut lb),
        Mode::Overwrite,
    )
    .unwrap_err();
    assert!(err.to_string().contains("[K, r] for a bank of K adapters): expected length 6, got 3"), "{err}");
    // Banks: empty, or adapters of different ranks / out_features.
    assert_eq!(AdapterBank::new(&[]).unwrap_err(), Error::EmptyBank);
    let r4 = Adapter::new(vec![1.0; 4], vec![1.0; 6]).unwrap();
    assert!(matches!(
        AdapterBank::new(&[inp.adapter.clone(), r4]),
        Err(Error::RankMismatch { expected: 3, actual: 4, .. })
    ));
    let m7 = Adapter::new(vec![1.0; 3], vec![1.0; 7]).unwrap();
    assert!(matches!(
        AdapterBank::new(&[inp.adapter.clone(), m7]),
        Err(Error::LengthMismatch { expected: 6, actual: 7, .. })
    ));
    // A bank for another layer.
    let wide = AdapterBank::new(&[Adapter::new(vec![1.0; 3], vec![1.0; 5]).unwrap()]).unwrap();
    let err =
        forward_mixed(&inp.projections, &wide, &[0; 4], x, MatMut::from_slice(&mut y, 4, 6).unwrap(), Mode::Overwrite)
            .unwrap_err();
    assert!(err.to_string().contains("lambda_b"), "{err}");
}

#[test]
fn a_bank_round_trips_its_adapters_and_costs_its_vectors() {
    let a0 = Adapter::new(vec![0.5; 4], vec![1.5; 6]).unwrap();
    let a1 = Adapter::new(vec![-0.5; 4], vec![2.5; 6]).unwrap().with_bias(vec![0.25; 6]).unwrap();
    let bank = AdapterBank::new(&[a0.clone(), a1.clone()]).unwrap();
    assert_eq!(bank.adapter(0), Some(a0));
    assert_eq!(bank.adapter(1), Some(a1));
    assert_eq!(bank.adapter(2), None);
    assert_eq!(bank.bytes(), 2 * (4 + 6) * 4 + 2 * 6 * 4);
    assert_eq!(&bank.lambda_d()[4..], &[-0.5; 4]);
}
