//! Property tests: every kernel against the f64 reference, within the forward-error bound of
//! `reference::forward_error_bound` / `reference::delta_error_bound` (derived in their docs, not
//! tuned), over random shapes (1, primes, and sizes just above every block and tile size), random
//! strides, both modes, with and without bias, every dtype, on every CPU tier this machine has (in
//! one process, through `with_isa`); and bitwise equality of 1 vs 2 threads, with the parallel
//! threshold lowered so that even small calls really run split.

mod common;

use common::{dim, inputs, kdim, split_pool, to, values, Case, Inputs};
use proptest::prelude::*;
use vera_kernels::rng::TorchCpuGenerator;
use vera_kernels::{
    bf16, f16, forward_layer, merge, reference, tier_facts, unmerge, with_isa, Adapter, Element, Isa, LayerProjections,
    MatMut, MatRef, Mode, Projections, BLOCK_ROWS,
};

/// An output width (m): as [`dim`], and now and then one of four or more 32-column panels (with and
/// without a remainder), so that decode tiles' groups of several panels per call are hit whole.
fn wdim(max_random: usize) -> impl Strategy<Value = usize> {
    prop_oneof![4 => dim(max_random), 1 => prop::sample::select(vec![127usize, 128, 129, 161, 257])]
}

fn case() -> impl Strategy<Value = Case> {
    (
        (dim(70), kdim(70), wdim(70), kdim(40)),
        (0usize..5, 0usize..5, 0usize..4, 0usize..4),
        (any::<bool>(), any::<bool>(), any::<u64>()),
    )
        .prop_map(Case::from_draw)
}

/// The forward pass of case `c` on tier `isa` with `threads` threads.
fn run_forward<T: Element>(c: &Case, inp: &Inputs<T>, isa: Isa, threads: usize) -> Vec<T> {
    let mut y = inp.y0.clone();
    let layer = inp.projections.slice(c.n, c.m).unwrap();
    let x = MatRef::new(&inp.x, c.t, c.n, c.n + c.x_pad).unwrap();
    let mode = if c.accumulate { Mode::Accumulate } else { Mode::Overwrite };
    // with_isa holds on the thread that makes the call: inside the pool.
    split_pool(threads).install(|| {
        with_isa(isa, || {
            forward_layer(layer, &inp.adapter, x, MatMut::new(&mut y, c.t, c.m, c.m + c.y_pad).unwrap(), mode).unwrap()
        })
    });
    y
}

fn check_forward<T: Element>(c: &Case) -> Result<(), TestCaseError> {
    for isa in Isa::available() {
        check_forward_on::<T>(c, isa)?;
    }
    Ok(())
}

fn check_forward_on<T: Element>(c: &Case, isa: Isa) -> Result<(), TestCaseError> {
    let inp = inputs::<T>(c);
    let layer: LayerProjections<'_, T> = inp.projections.slice(c.n, c.m).unwrap();
    let x = MatRef::new(&inp.x, c.t, c.n, c.n + c.x_pad).unwrap();
    let base = MatRef::new(&inp.y0, c.t, c.m, c.m + c.y_pad).unwrap();
    let base = c.accumulate.then_some(base);
    let want = reference::forward(layer, &inp.adapter, x, base).unwrap();
    let numerics = with_isa(isa, tier_facts::<T>).numerics();
    let bound = reference::forward_error_bound(layer, &inp.adapter, x, base, numerics).unwrap();

    let y2 = run_forward(c, &inp, isa, 2);
    // Under Miri (slow) only the split run, the one that can race; thread counts are compared natively.
    let y1 = if cfg!(miri) { y2.clone() } else { run_forward(c, &inp, isa, 1) };
    let bits = |v: &[T]| v.iter().map(|e| e.to_f64().to_bits()).collect::<Vec<_>>();
    prop_assert_eq!(bits(&y1), bits(&y2), "1 and 2 threads differ on {}", isa);
    // Under Miri the edge cases look for undefined behaviour; their numbers are checked natively.
    if cfg!(miri) {
        return Ok(());
    }

    let stride = c.m + c.y_pad;
    for t in 0..c.t {
        for i in 0..c.m {
            let got = y1[t * stride + i].to_f64();
            let (w, b) = (want[t * c.m + i], bound[t * c.m + i]);
            prop_assert!((got - w).abs() <= b, "{isa}: y[{t},{i}] = {got}, reference {w}, bound {b}");
        }
        // Padding between rows is never touched.
        for i in c.m..stride {
            prop_assert_eq!(y1[t * stride + i].to_f64().to_bits(), inp.y0[t * stride + i].to_f64().to_bits());
        }
    }
    Ok(())
}

fn check_merge<T: Element>(c: &Case) -> Result<(), TestCaseError> {
    for isa in Isa::available() {
        check_merge_on::<T>(c, isa)?;
    }
    Ok(())
}

fn check_merge_on<T: Element>(c: &Case, isa: Isa) -> Result<(), TestCaseError> {
    let inp = inputs::<T>(c);
    let layer = inp.projections.slice(c.n, c.m).unwrap();
    let mut g = TorchCpuGenerator::manual_seed(c.seed ^ 0x5eed);
    let w0 = to::<T>(&values(&mut g, c.m * c.n, 1.0));
    let w_ref = MatRef::from_slice(&w0, c.m, c.n).unwrap();
    let dw = reference::delta_weight(layer, &inp.adapter).unwrap();
    let numerics = with_isa(isa, tier_facts::<T>).numerics();
    let bound = reference::delta_error_bound(layer, &inp.adapter, Some(w_ref), numerics).unwrap();

    let merged_with = |threads: usize| {
        let mut w = w0.clone();
        split_pool(threads).install(|| {
            with_isa(isa, || merge(&inp.projections, &inp.adapter, MatMut::from_slice(&mut w, c.m, c.n).unwrap()))
                .unwrap()
        });
        w
    };
    let w2 = merged_with(2);
    // Under Miri (slow) only the split run, the one that can race; thread counts are compared natively.
    let w1 = if cfg!(miri) { w2.clone() } else { merged_with(1) };
    prop_assert!(w1.iter().zip(&w2).all(|(a, b)| a.to_f64().to_bits() == b.to_f64().to_bits()));
    // Under Miri the edge cases look for undefined behaviour; their numbers are checked natively.
    if cfg!(miri) {
        return Ok(());
    }
    for (idx, got) in w1.iter().enumerate() {
        let want = w0[idx].to_f64() + dw[idx];
        prop_assert!(
            (got.to_f64() - want).abs() <= bound[idx],
            "{isa}: W[{idx}] = {got:?}, want {want}, bound {}",
            bound[idx]
        );
    }

    // Unmerging subtracts the same ΔW: back to W0 within the same bound around the merged weight.
    let mut w = w1.clone();
    with_isa(isa, || unmerge(&inp.projections, &inp.adapter, MatMut::from_slice(&mut w, c.m, c.n).unwrap())).unwrap();
    let merged_ref = MatRef::from_slice(&w1, c.m, c.n).unwrap();
    let back_bound = reference::delta_error_bound(layer, &inp.adapter, Some(merged_ref), numerics).unwrap();
    for (idx, got) in w.iter().enumerate() {
        let want = w1[idx].to_f64() - dw[idx];
        prop_assert!(
            (got.to_f64() - want).abs() <= back_bound[idx],
            "{isa}: unmerged W[{idx}] = {got:?}, want {want}, bound {}, merged {:?}, dw {}",
            back_bound[idx],
            w1[idx],
            dw[idx]
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 256,
        // Failing cases are printed with their seed; nothing is written into the source tree.
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn forward_f32_within_bound(c in case()) { check_forward::<f32>(&c)?; }

    #[test]
    fn forward_f16_within_bound(c in case()) { check_forward::<f16>(&c)?; }

    #[test]
    fn forward_bf16_within_bound(c in case()) { check_forward::<bf16>(&c)?; }

    #[test]
    fn merge_f32_within_bound(c in case()) { check_merge::<f32>(&c)?; }

    #[test]
    fn merge_f16_within_bound(c in case()) { check_merge::<f16>(&c)?; }

    #[test]
    fn merge_bf16_within_bound(c in case()) { check_merge::<bf16>(&c)?; }
}

/// The fixed edge cases of `common::edge_cases`, every dtype, forward and merge: the run `.ci/run`
/// makes under Miri (where the property tests above are out of reach), and a quick check here.
#[test]
fn edge_cases_every_dtype() {
    for (i, c) in common::edge_cases().into_iter().enumerate() {
        for dtype in common::edge_dtypes(i) {
            vera_kernels::with_element_type!(dtype, T => check_forward::<T>(&c).and_then(|()| check_merge::<T>(&c)))
                .unwrap();
        }
    }
}

#[test]
fn zero_rows_is_a_no_op() {
    let proj = Projections::<f32>::from_seed(1, 4, 8, 8).unwrap();
    let adapter = Adapter::new(vec![1.0; 4], vec![1.0; 8]).unwrap();
    let mut y: Vec<f32> = Vec::new();
    vera_kernels::forward(
        &proj,
        &adapter,
        MatRef::from_slice(&[], 0, 8).unwrap(),
        MatMut::from_slice(&mut y, 0, 8).unwrap(),
        Mode::Overwrite,
    )
    .unwrap();
    assert!(y.is_empty());
}

#[test]
fn overwrite_ignores_nan_in_y_and_nan_in_x_propagates() {
    let (t, n, m, r) = (3, 20, 12, 6);
    let proj = Projections::<f32>::from_seed(3, r, n, m).unwrap();
    let adapter = Adapter::new(vec![0.5; r], vec![1.0; m]).unwrap();
    let mut x = vec![1.0f32; t * n];
    x[n + 3] = f32::NAN; // row 1 only
    x[2 * n] = f32::INFINITY; // row 2 only
    let mut y = vec![f32::NAN; t * m];
    vera_kernels::forward(
        &proj,
        &adapter,
        MatRef::from_slice(&x, t, n).unwrap(),
        MatMut::from_slice(&mut y, t, m).unwrap(),
        Mode::Overwrite,
    )
    .unwrap();
    assert!(y[..m].iter().all(|v| v.is_finite()), "row 0 has no NaN input: {:?}", &y[..m]);
    assert!(y[m..2 * m].iter().all(|v| v.is_nan()));
    assert!(y[2 * m..].iter().all(|v| !v.is_finite()));
}

#[test]
fn parallel_paths_are_bitwise_identical_across_thread_counts() {
    // Calls big enough to be split across threads (small ones run on the calling thread): decode
    // shapes whose r and m columns are split, and a prefill shape split by blocks of rows; in every
    // dtype, against 1 thread, and within the error bound.
    let shapes = [(1usize, 4096usize, 2048usize, 257usize), (8, 1030, 1000, 256), (4 * BLOCK_ROWS + 3, 300, 260, 67)];
    for (t, n, m, r) in shapes {
        let c = Case { t, n, m, r, n_extra: 3, m_extra: 1, x_pad: 1, y_pad: 2, bias: true, accumulate: true, seed: 9 };
        fn same<T: Element>(c: &Case) {
            let inp = inputs::<T>(c);
            for isa in Isa::available() {
                let y1 = run_forward(c, &inp, isa, 1);
                let same = y1 == run_forward(c, &inp, isa, 2) && y1 == run_forward(c, &inp, isa, 3);
                assert!(same, "{c:?} {:?} {isa}", T::DTYPE);
            }
            check_forward::<T>(c).unwrap();
        }
        same::<f32>(&c);
        same::<f16>(&c);
        same::<bf16>(&c);
    }
}
