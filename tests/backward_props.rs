//! The backward pass against the f64 reference, within `reference::backward_error_bound` (derived in
//! its docs, not tuned), over random shapes (1, primes, one past every block and tile size), strides,
//! both modes, every dtype, on every CPU tier this machine has; bitwise equality of 1, 2 and 3
//! threads (with the parallel threshold at 0, so that small calls really split); the training
//! forward's `y` equal to the forward's and its saved `h` giving the same gradients within the
//! bound, as does the unfused peer (`baseline::unfused_backward`) from that `h`, and the dense peer
//! (`baseline::dense_backward`, ΔW's rounding to `T` in its `dx` bound); and the reference itself
//! against finite differences.

mod common;

use common::grads::{check_gradients, check_gradients_with, extras, Grads};
use common::{dim, inputs, kdim, values, Case};
use proptest::prelude::*;
use vera_kernels::baseline::{dense_backward, unfused_backward, DenseBuffers};
use vera_kernels::rng::TorchCpuGenerator;
use vera_kernels::{
    backward, bf16, f16, forward, forward_train, reference, tier_facts, with_isa, Adapter, DType, Element, Gradients,
    Isa, MatMut, MatRef, Mode, Numerics, Projections, BLOCK_ROWS,
};

fn case() -> impl Strategy<Value = Case> {
    (
        (dim(70), kdim(60), kdim(60), kdim(40)),
        (0usize..4, 0usize..4, 0usize..3, 0usize..3),
        (any::<bool>(), any::<bool>(), any::<u64>()),
    )
        .prop_map(Case::from_draw)
}

/// Which backward a test runs: the fused pass (recomputing `h`, or from a saved one) or a peer.
#[derive(Clone, Copy)]
enum Pass<'h> {
    Fused(Option<&'h [f32]>),
    /// The unfused peer, from the training forward's `h`.
    Unfused(&'h [f32]),
    Dense,
}

/// A case's gradients from `pass` on `isa` with `threads` threads, started from `extras`.
fn run<T: Element>(c: &Case, isa: Isa, threads: usize, pass: Pass<'_>) -> Grads<T> {
    let inp = inputs::<T>(c);
    let (dy, mut out) = extras::<T>(c, 1);
    let x = MatRef::new(&inp.x, c.t, c.n, c.n + c.x_pad).unwrap();
    let dy = MatRef::new(&dy, c.t, c.m, c.m + c.y_pad).unwrap();
    let mode = if c.accumulate { Mode::Accumulate } else { Mode::Overwrite };
    let (mut buffer, mut dense) = (Vec::new(), DenseBuffers::default());
    common::split_pool(threads).install(|| {
        with_isa(isa, || {
            let grads = Gradients::new(&mut out.lambda_d, &mut out.lambda_b)
                .with_bias(&mut out.bias)
                .with_x(MatMut::new(&mut out.x, c.t, c.n, c.n + c.x_pad).unwrap());
            let h = |h| MatRef::from_slice(h, c.t, c.r).unwrap();
            let (p, a) = (&inp.projections, &inp.adapter);
            match pass {
                Pass::Fused(saved) => backward(p, a, x, dy, saved.map(h), grads, mode),
                Pass::Unfused(saved) => unfused_backward(p, a, x, dy, h(saved), grads, mode, &mut buffer),
                Pass::Dense => dense_backward(p, a, x, dy, grads, mode, &mut dense),
            }
            .unwrap();
        })
    });
    out
}

/// The dense peer within the f32 kernels' bound (it runs the f32-FMA kernels on every tier), but
/// for `dx`, whose ΔW is rounded to `T`: rounding a product's left operand to `T`, as
/// `Numerics::rounds_backward` bounds it, covers rounding ΔW (the same magnitudes, `u_T·(|lambda_d|
/// ⊙ G)·|A|`), and a ΔW below `T`'s normal range may lose half its smallest subnormal per element
/// of `dy` it meets.
fn check_dense<T: Element>(c: &Case, isa: Isa) -> Result<(), TestCaseError> {
    let two = run::<T>(c, isa, 2, Pass::Dense);
    if cfg!(miri) {
        return Ok(());
    }
    prop_assert_eq!(two.bits(), run::<T>(c, isa, 1, Pass::Dense).bits(), "dense: 1 and 2 threads differ on {}", isa);
    let f32_kernels = Numerics::default();
    let dx = Numerics { rounds_backward: T::DTYPE != DType::F32, ..f32_kernels };
    check_gradients_with(c, &format!("dense on {isa}"), &two, f32_kernels, (dx, T::MIN_POSITIVE_SUBNORMAL / 2.0), true)
}

fn check<T: Element>(c: &Case) -> Result<(), TestCaseError> {
    for isa in Isa::available() {
        let numerics = with_isa(isa, tier_facts::<T>).numerics();
        let two = run::<T>(c, isa, 2, Pass::Fused(None));
        // Under Miri (slow) only the split run, the one that can race; thread counts are compared natively.
        let one = if cfg!(miri) { two.clone() } else { run::<T>(c, isa, 1, Pass::Fused(None)) };
        prop_assert_eq!(one.bits(), two.bits(), "1 and 2 threads differ on {}", isa);
        // The backward's own h, as its tier computes it. (Under Miri the edge cases look for
        // undefined behaviour; their numbers are checked natively.)
        if !cfg!(miri) {
            let recompute = with_isa(isa, tier_facts::<T>).backward_numerics();
            check_gradients(c, &isa, &one, recompute, true)?;
        }

        // The training forward: the forward's y, bit for bit, and an h that gives the gradients.
        let inp = inputs::<T>(c);
        let x = MatRef::new(&inp.x, c.t, c.n, c.n + c.x_pad).unwrap();
        let mode = if c.accumulate { Mode::Accumulate } else { Mode::Overwrite };
        let (mut y1, mut y2, mut h) = (inp.y0.clone(), inp.y0.clone(), vec![f32::NAN; c.t * c.r]);
        with_isa(isa, || {
            let stride = c.m + c.y_pad;
            forward(&inp.projections, &inp.adapter, x, MatMut::new(&mut y1, c.t, c.m, stride).unwrap(), mode).unwrap();
            let y = MatMut::new(&mut y2, c.t, c.m, stride).unwrap();
            let hm = MatMut::from_slice(&mut h, c.t, c.r).unwrap();
            forward_train(&inp.projections, &inp.adapter, x, y, mode, hm).unwrap();
        });
        let bits = |v: &[T]| v.iter().map(|e| e.to_f64().to_bits()).collect::<Vec<_>>();
        prop_assert_eq!(bits(&y1), bits(&y2), "forward_train's y differs from forward's on {}", isa);
        let saved = run::<T>(c, isa, 2, Pass::Fused(Some(&h)));
        if !cfg!(miri) {
            check_gradients(c, &isa, &saved, numerics, true)?;
        }
        // The unfused peer from the same h: within the same bound, the same bits on 1 and 2 threads.
        let unfused = run::<T>(c, isa, 2, Pass::Unfused(&h));
        if !cfg!(miri) {
            prop_assert_eq!(
                unfused.bits(),
                run::<T>(c, isa, 1, Pass::Unfused(&h)).bits(),
                "unfused: 1 and 2 threads differ"
            );
            check_gradients(c, &isa, &unfused, numerics, true)?;
        }
        check_dense::<T>(c, isa)?;
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn backward_f32_within_bound(c in case()) { check::<f32>(&c)?; }

    #[test]
    fn backward_f16_within_bound(c in case()) { check::<f16>(&c)?; }

    #[test]
    fn backward_bf16_within_bound(c in case()) { check::<bf16>(&c)?; }
}

/// The fixed edge cases of `common::edge_cases`, every dtype: the run `.ci/run` makes under Miri.
#[test]
fn edge_cases_every_dtype() {
    for (i, c) in common::edge_cases().into_iter().enumerate() {
        for dtype in common::edge_dtypes(i) {
            vera_kernels::with_element_type!(dtype, T => check::<T>(&c)).unwrap();
        }
    }
}

#[test]
fn gradients_are_bitwise_identical_for_1_2_and_3_threads() {
    // Decode (one block: columns split across threads) and prefill (blocks in parallel), large
    // enough to split without the lowered threshold too.
    for (t, n, m, r) in [(3usize, 700usize, 650usize, 67usize), (3 * BLOCK_ROWS + 5, 300, 260, 40)] {
        let c = Case { t, n, m, r, n_extra: 2, m_extra: 1, x_pad: 1, y_pad: 2, bias: true, accumulate: true, seed: 5 };
        fn same<T: Element>(c: &Case) {
            for isa in Isa::available() {
                let one = run::<T>(c, isa, 1, Pass::Fused(None));
                assert_eq!(one.bits(), run::<T>(c, isa, 2, Pass::Fused(None)).bits(), "{isa} 2 threads");
                assert_eq!(one.bits(), run::<T>(c, isa, 3, Pass::Fused(None)).bits(), "{isa} 3 threads");
                // From run to run.
                assert_eq!(one.bits(), run::<T>(c, isa, 1, Pass::Fused(None)).bits(), "{isa} rerun");
            }
        }
        same::<f32>(&c);
        same::<f16>(&c);
        same::<bf16>(&c);
    }
}

#[test]
fn at_peft_initialisation_only_lambda_b_has_a_gradient() {
    // lambda_b = 0 (PEFT's init): g = 0, so dlambda_d = 0 and dx = 0, while dlambda_b is not.
    let (t, n, m, r) = (5, 24, 20, 8);
    let proj = Projections::<f32>::from_seed(0, r, n, m).unwrap();
    let adapter = Adapter::peft_init(r, m, 0.1).unwrap();
    let mut g = TorchCpuGenerator::manual_seed(3);
    let (x, dy) = (values(&mut g, t * n, 1.0), values(&mut g, t * m, 1.0));
    let (mut dld, mut dlb, mut dx) = (vec![f32::NAN; r], vec![f32::NAN; m], vec![f32::NAN; t * n]);
    let grads = Gradients::new(&mut dld, &mut dlb).with_x(MatMut::from_slice(&mut dx, t, n).unwrap());
    let (xv, dyv) = (MatRef::from_slice(&x, t, n).unwrap(), MatRef::from_slice(&dy, t, m).unwrap());
    backward(&proj, &adapter, xv, dyv, None, grads, Mode::Overwrite).unwrap();
    assert!(dld.iter().all(|&v| v == 0.0), "{dld:?}");
    assert!(dx.iter().all(|&v| v == 0.0));
    assert!(dlb.iter().all(|&v| v != 0.0 && v.is_finite()), "{dlb:?}");
}

#[test]
fn the_reference_gradients_match_finite_differences() {
    // L = sum(y ⊙ dy) in f64; central differences along each lambda and each x element.
    let (t, n, m, r) = (3usize, 5usize, 4usize, 3usize);
    let proj = Projections::<f32>::from_seed(11, r, n, m).unwrap();
    let mut g = TorchCpuGenerator::manual_seed(12);
    let (ld, lb, bias) = (values(&mut g, r, 1.0), values(&mut g, m, 1.0), values(&mut g, m, 1.0));
    let (x, dy) = (values(&mut g, t * n, 1.0), values(&mut g, t * m, 1.0));
    let layer = proj.slice(n, m).unwrap();
    let loss = |ld: &[f64], lb: &[f64], bias: &[f64], x: &[f64]| -> f64 {
        let (a, b) = (layer.a(), layer.b());
        let mut l = 0.0;
        for ti in 0..t {
            let u: Vec<f64> = (0..r)
                .map(|j| ld[j] * (0..n).map(|k| x[ti * n + k] * f64::from(*a.get(j, k).unwrap())).sum::<f64>())
                .collect();
            for i in 0..m {
                let v: f64 = (0..r).map(|j| u[j] * f64::from(*b.get(i, j).unwrap())).sum();
                l += (lb[i] * v + bias[i]) * f64::from(dy[ti * m + i]);
            }
        }
        l
    };
    let f64s = |v: &[f32]| v.iter().map(|&e| f64::from(e)).collect::<Vec<f64>>();
    let (ld64, lb64, bias64, x64) = (f64s(&ld), f64s(&lb), f64s(&bias), f64s(&x));
    let adapter = Adapter::new(ld, lb).unwrap().with_bias(bias).unwrap();
    let want = reference::backward(
        layer,
        &adapter,
        MatRef::from_slice(&x, t, n).unwrap(),
        MatRef::from_slice(&dy, t, m).unwrap(),
    )
    .unwrap();
    let step = 1e-5;
    let diff = |which: usize, i: usize| {
        let mut p = [ld64.clone(), lb64.clone(), bias64.clone(), x64.clone()];
        let mut q = p.clone();
        p[which][i] += step;
        q[which][i] -= step;
        (loss(&p[0], &p[1], &p[2], &p[3]) - loss(&q[0], &q[1], &q[2], &q[3])) / (2.0 * step)
    };
    let groups: [(&str, &Vec<f64>); 4] =
        [("lambda_d", &want.lambda_d), ("lambda_b", &want.lambda_b), ("bias", &want.bias), ("x", &want.x)];
    for (which, (what, grad)) in groups.into_iter().enumerate() {
        for (i, &gv) in grad.iter().enumerate() {
            let fd = diff(which, i);
            assert!((fd - gv).abs() <= 1e-7 * (1.0 + gv.abs()), "d{what}[{i}]: reference {gv}, finite difference {fd}");
        }
    }
}

#[test]
fn misuse_is_a_clear_error_before_anything_is_written() {
    let (t, n, m, r) = (2, 12, 10, 4);
    let proj = Projections::<f32>::from_seed(1, r, 16, 16).unwrap();
    let adapter = Adapter::new(vec![1.0; r], vec![1.0; m]).unwrap();
    let x = vec![1.0f32; t * n];
    let dy = vec![1.0f32; t * m];
    let (xv, dyv) = (MatRef::from_slice(&x, t, n).unwrap(), MatRef::from_slice(&dy, t, m).unwrap());
    let run = |dld: &mut [f32],
               dlb: &mut [f32],
               dx: Option<MatMut<'_, f32>>,
               h: Option<MatRef<'_, f32>>,
               dy: MatRef<'_, f32>| {
        let mut grads = Gradients::new(dld, dlb);
        if let Some(dx) = dx {
            grads = grads.with_x(dx);
        }
        backward(&proj, &adapter, xv, dy, h, grads, Mode::Accumulate).unwrap_err().to_string()
    };
    let (mut dld, mut dlb) = (vec![7.0f32; r], vec![7.0f32; m]);
    let err = run(&mut vec![0.0; r + 1], &mut dlb, None, None, dyv);
    assert!(err.contains("lambda_d") && err.contains(&format!("{}", r + 1)), "{err}");
    let err = run(&mut dld, &mut vec![0.0; m - 1], None, None, dyv);
    assert!(err.contains("lambda_b"), "{err}");
    let mut dx = vec![0.0f32; t * (n + 1)];
    let err = run(&mut dld, &mut dlb, Some(MatMut::from_slice(&mut dx, t, n + 1).unwrap()), None, dyv);
    assert!(err.contains("dx (must be"), "{err}");
    let h = vec![0.0f32; (t + 1) * r];
    let err = run(&mut dld, &mut dlb, None, Some(MatRef::from_slice(&h, t + 1, r).unwrap()), dyv);
    assert!(err.contains("saved h"), "{err}");
    let short = vec![1.0f32; (t - 1) * m];
    let err = run(&mut dld, &mut dlb, None, None, MatRef::from_slice(&short, t - 1, m).unwrap());
    assert!(err.contains("dy (must be"), "{err}");
    let wide = vec![1.0f32; t * 20];
    let err = run(&mut dld, &mut dlb, None, None, MatRef::from_slice(&wide, t, 20).unwrap());
    assert!(err.contains("out_features") && err.contains("20"), "{err}");
    // Nothing was written by any of the refused calls.
    assert!(dld.iter().chain(&dlb).all(|&v| v == 7.0));
}
