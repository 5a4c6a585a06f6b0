//! Criterion benchmarks: the fused forward vs the dense baseline (form ΔW, then x·ΔWᵀ, same
//! kernels) vs the unfused three-pass peer, and a training step (and the backward against its
//! unfused peer), on `vera bench`'s default suite, for every dtype.
//!
//! `cargo bench --bench forward` runs all of it; a filter narrows it, e.g.
//! `cargo bench --bench forward -- 'f32/t512_n768'`. Throughput is reported in "elements"/s where
//! one element is one FLOP of the fused path (2·T·r·(n + m)), so every method of a case is
//! compared on the same scale. f32 and f16 also run `gemm_unfused`, the unfused path on the `gemm`
//! crate.

#[path = "../src/bin/vera/workload.rs"]
mod workload;

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use vera_kernels::{bf16, f16, Element};
use workload::{Shape, Workload, DEFAULT_SUITE};

/// The unfused path on the `gemm` crate (AVX-512 via its `x86-v4` feature): `h = x·Aᵀ`,
/// `u = lambda_d ⊙ h`, `v = u·Bᵀ`, `y += lambda_b ⊙ v + bias`, with `h`, `v` materialised in `T`.
/// A general GEMM library packs its operands on every call; this is the peer that shows what
/// packing the shared projections once buys. (gemm has no bf16.)
struct GemmPeer<T> {
    h: Vec<T>,
    v: Vec<T>,
}

/// `dst [rows, cols] = lhs [rows, k] · rhsᵀ` on the gemm crate, with `rhs` row `c` at
/// `rhs[c * rhs_stride..]` (so `rhs` is `[cols, k]` row-major with that stride).
#[allow(clippy::too_many_arguments)]
fn nt_product<T: Element>(
    rows: usize,
    cols: usize,
    k: usize,
    dst: &mut [T],
    lhs: &[T],
    rhs: &[T],
    rhs_stride: usize,
    par: gemm::Parallelism,
) {
    assert!(dst.len() >= rows * cols && lhs.len() >= rows * k);
    assert!(cols == 0 || k == 0 || rhs.len() >= (cols - 1) * rhs_stride + k);
    // SAFETY: the asserts above bound every access: dst [rows, cols] and lhs [rows, k] row-major,
    // rhs element (k', c) = rhs[c * rhs_stride + k'].
    unsafe {
        gemm::gemm(
            rows,
            cols,
            k,
            dst.as_mut_ptr(),
            1,
            cols as isize,
            false,
            lhs.as_ptr(),
            1,
            k as isize,
            rhs.as_ptr(),
            rhs_stride as isize,
            1,
            T::from_f32(0.0),
            T::from_f32(1.0),
            false,
            false,
            false,
            par,
        );
    }
}

impl<T: Element> GemmPeer<T> {
    fn new(s: Shape) -> Self {
        Self { h: vec![T::default(); s.t * s.r], v: vec![T::default(); s.t * s.m] }
    }

    fn run(&mut self, w: &mut Workload<T>) {
        let Shape { t, n, m, r } = w.shape;
        let (a, b) = w.projections.as_slices();
        let n_max = w.projections.n_max();
        let par = gemm::Parallelism::Rayon(rayon::current_num_threads());
        // h[t, j] = Σ_k x[t, k]·A[j, k], then u = lambda_d ⊙ h, then v[t, i] = Σ_j u[t, j]·B[i, j].
        nt_product(t, r, n, &mut self.h, &w.x, a, n_max, par);
        for row in self.h.chunks_mut(r) {
            for (v, d) in row.iter_mut().zip(w.adapter.lambda_d()) {
                *v = T::from_f32(v.to_f32() * d);
            }
        }
        nt_product(t, m, r, &mut self.v, &self.h, b, r, par);
        let bias = w.adapter.bias().expect("the workload has a bias");
        for (yrow, vrow) in w.y.chunks_mut(m).zip(self.v.chunks(m)) {
            for (i, (y, v)) in yrow.iter_mut().zip(vrow).enumerate() {
                *y = T::from_f32(y.to_f32() + w.adapter.lambda_b()[i] * v.to_f32() + bias[i]);
            }
        }
    }
}

fn bench_dtype<T: Element>(c: &mut Criterion, gemm_peer: bool) {
    for shape in DEFAULT_SUITE {
        let mut group = c.benchmark_group(format!("{}/{}", T::DTYPE, shape.name()));
        group.sample_size(10).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2));
        group.throughput(Throughput::Elements(shape.fused_flops() as u64));
        let mut w = Workload::<T>::new(shape).expect("suite shapes are valid");
        group.bench_function(BenchmarkId::from_parameter("fused"), |b| b.iter(|| w.fused().unwrap()));
        group.bench_function(BenchmarkId::from_parameter("unfused"), |b| b.iter(|| w.unfused().unwrap()));
        group.bench_function(BenchmarkId::from_parameter("dense"), |b| b.iter(|| w.dense().unwrap()));
        // Training: one step (the training forward saving h, then the backward reusing it), one
        // that recomputes h instead, the dense baseline's step, the backward alone, and its
        // unfused peer.
        group.bench_function(BenchmarkId::from_parameter("train_step"), |b| b.iter(|| w.train_step().unwrap()));
        group.bench_function(BenchmarkId::from_parameter("train_step_dense"), |b| {
            b.iter(|| w.train_step_dense().unwrap())
        });
        group.bench_function(BenchmarkId::from_parameter("train_step_recompute"), |b| {
            b.iter(|| w.train_step_recompute().unwrap())
        });
        w.forward_train().unwrap();
        group.bench_function(BenchmarkId::from_parameter("backward"), |b| b.iter(|| w.backward().unwrap()));
        group.bench_function(BenchmarkId::from_parameter("backward_unfused"), |b| {
            b.iter(|| w.backward_unfused().unwrap())
        });
        if gemm_peer {
            let mut peer = GemmPeer::<T>::new(shape);
            group.bench_function(BenchmarkId::from_parameter("gemm_unfused"), |b| b.iter(|| peer.run(&mut w)));
        }
        group.finish();
    }
}

fn benches(c: &mut Criterion) {
    bench_dtype::<f32>(c, true);
    bench_dtype::<f16>(c, true);
    bench_dtype::<bf16>(c, false);
}

criterion_group!(forward, benches);
criterion_main!(forward);
