//! Many OS threads (more than cores) calling every operation at once on one shared `Projections`,
//! whose packing is lazy (the first calls race to pack it), with mixed shapes and dtypes, from
//! inside and outside rayon pools: every result bitwise equal to the same call made alone.

use std::sync::{Arc, Barrier};

use vera_kernels::rng::TorchCpuGenerator;
use vera_kernels::{
    backward, backward_mixed, forward, forward_mixed, merge, Adapter, AdapterBank, Element, Gradients, MatMut, MatRef,
    Mode, Projections, NO_ADAPTER,
};

const R: usize = 24;
const N_MAX: usize = 300;
const M_MAX: usize = 260;

fn draw(g: &mut TorchCpuGenerator, len: usize) -> Vec<f32> {
    let mut v = vec![0.0f32; len];
    g.fill_uniform_f32(&mut v, -1.0, 1.0);
    v
}

/// One call's inputs: an operation on a shape, drawn from a seed.
#[derive(Clone, Copy, Debug)]
struct Job {
    op: usize,
    t: usize,
    n: usize,
    m: usize,
    seed: u64,
}

/// Runs `job` with element type `T` and returns every output's bits.
fn run<T: Element>(p: &Projections<T>, job: Job) -> Vec<u64> {
    let Job { op, t, n, m, seed } = job;
    let mut g = TorchCpuGenerator::manual_seed(seed);
    let adapters: Vec<Adapter> = (0..3)
        .map(|_| Adapter::new(draw(&mut g, R), draw(&mut g, m)).unwrap().with_bias(draw(&mut g, m)).unwrap())
        .collect();
    let x: Vec<T> = draw(&mut g, t * n).into_iter().map(T::from_f32).collect();
    let mut y: Vec<T> = draw(&mut g, t * m).into_iter().map(T::from_f32).collect();
    let rows: Vec<i32> = (0..t).map(|i| if i % 5 == 4 { NO_ADAPTER } else { (i % 3) as i32 }).collect();
    let xv = MatRef::from_slice(&x, t, n).unwrap();
    let bits = |v: &[T]| v.iter().map(|e| e.to_f64().to_bits()).collect::<Vec<_>>();
    match op {
        0 => {
            forward(p, &adapters[0], xv, MatMut::from_slice(&mut y, t, m).unwrap(), Mode::Accumulate).unwrap();
            bits(&y)
        }
        1 => {
            let bank = AdapterBank::new(&adapters).unwrap();
            forward_mixed(p, &bank, &rows, xv, MatMut::from_slice(&mut y, t, m).unwrap(), Mode::Accumulate).unwrap();
            bits(&y)
        }
        2 => {
            let mut w: Vec<T> = draw(&mut g, m * n).into_iter().map(T::from_f32).collect();
            merge(p, &adapters[1], MatMut::from_slice(&mut w, m, n).unwrap()).unwrap();
            bits(&w)
        }
        3 => {
            let dy = MatRef::from_slice(&y, t, m).unwrap();
            let (mut dld, mut dlb, mut dx) = (vec![0.0f32; R], vec![0.0f32; m], vec![T::default(); t * n]);
            let grads = Gradients::new(&mut dld, &mut dlb).with_x(MatMut::from_slice(&mut dx, t, n).unwrap());
            backward(p, &adapters[2], xv, dy, None, grads, Mode::Overwrite).unwrap();
            dld.iter().chain(&dlb).map(|v| u64::from(v.to_bits())).chain(bits(&dx)).collect()
        }
        _ => {
            let bank = AdapterBank::new(&adapters).unwrap();
            let dy = MatRef::from_slice(&y, t, m).unwrap();
            let (mut dld, mut dlb) = (vec![0.0f32; 3 * R], vec![0.0f32; 3 * m]);
            let grads = Gradients::new(&mut dld, &mut dlb);
            backward_mixed(p, &bank, &rows, xv, dy, None, grads, Mode::Overwrite).unwrap();
            dld.iter().chain(&dlb).map(|v| u64::from(v.to_bits())).collect()
        }
    }
}

fn jobs() -> Vec<Job> {
    let shapes = [(1, 300, 260), (7, 129, 65), (70, 300, 260), (131, 64, 33), (3, 17, 255)];
    (0..5)
        .flat_map(|op| {
            shapes.iter().enumerate().map(move |(i, &(t, n, m))| Job { op, t, n, m, seed: (op * 7 + i) as u64 })
        })
        .collect()
}

/// Every job alone (on one thread, with fresh projections), then all of them from 24 threads at
/// once on shared projections nobody has packed yet, half inside a 3-thread rayon pool.
fn check<T: Element>() {
    let make = || Projections::<T>::from_seed(3, R, N_MAX, M_MAX).unwrap();
    let jobs = jobs();
    let alone: Vec<Vec<u64>> = jobs.iter().map(|&j| run(&make(), j)).collect();
    let shared = Arc::new(make());
    let pool = Arc::new(rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap());
    let threads = 24;
    let start = Arc::new(Barrier::new(threads));
    let handles: Vec<_> = (0..threads)
        .map(|i| {
            let (shared, pool, start, jobs) = (shared.clone(), pool.clone(), start.clone(), jobs.clone());
            std::thread::spawn(move || {
                start.wait();
                // Each thread runs every job, starting at a different one.
                (0..jobs.len())
                    .map(|k| {
                        let j = (i + k) % jobs.len();
                        let out =
                            if i % 2 == 0 { pool.install(|| run(&shared, jobs[j])) } else { run(&shared, jobs[j]) };
                        (j, out)
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    for h in handles {
        for (j, out) in h.join().unwrap() {
            assert_eq!(out, alone[j], "{:?} {:?} differs when run concurrently", T::DTYPE, jobs[j]);
        }
    }
}

#[test]
fn concurrent_calls_on_shared_projections_give_the_bits_of_calls_made_alone_f32() {
    check::<f32>();
}

#[test]
fn concurrent_calls_on_shared_projections_give_the_bits_of_calls_made_alone_bf16() {
    check::<vera_kernels::bf16>();
}

#[test]
fn concurrent_calls_on_shared_projections_give_the_bits_of_calls_made_alone_f16() {
    check::<vera_kernels::f16>();
}
