//! Criterion benchmarks: the fused forward vs the dense baseline (form ΔW, then x·ΔWᵀ, same
//! kernels) vs the unfused three-pass peer, on `vera bench`'s default suite, for every dtype.
//!
//! `cargo bench --bench forward` runs all of it; a filter narrows it, e.g.
//! `cargo bench --bench forward -- 'f32/t512_n768'`. Throughput is reported in "elements"/s where
//! one element is one FLOP of the fused path (2·T·r·(n + m)), so every method of a case is
//! compared on the same scale.

#[path = "../src/bin/vera/workload.rs"]
mod workload;

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use vera_kernels::{bf16, f16, Element};
use workload::{Workload, DEFAULT_SUITE};

fn bench_dtype<T: Element>(c: &mut Criterion) {
    for shape in DEFAULT_SUITE {
        let mut group = c.benchmark_group(format!("{}/{}", T::DTYPE, shape.name()));
        group.sample_size(10).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2));
        group.throughput(Throughput::Elements(shape.fused_flops() as u64));
        let mut w = Workload::<T>::new(shape).expect("suite shapes are valid");
        group.bench_function(BenchmarkId::from_parameter("fused"), |b| b.iter(|| w.fused().unwrap()));
        group.bench_function(BenchmarkId::from_parameter("unfused"), |b| b.iter(|| w.unfused().unwrap()));
        group.bench_function(BenchmarkId::from_parameter("dense"), |b| b.iter(|| w.dense().unwrap()));
        group.finish();
    }
}

fn benches(c: &mut Criterion) {
    bench_dtype::<f32>(c);
    bench_dtype::<f16>(c);
    bench_dtype::<bf16>(c);
}

criterion_group!(forward, benches);
criterion_main!(forward);
