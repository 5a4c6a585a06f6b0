//! The CUDA backend at model sizes, on a real GPU only: the CPU emulation (tests/cuda_forward.rs
//! runs it on small shapes) would take hours here, so without a GPU every test below returns at
//! once, after one line on stderr saying why, and CI stays fast. On the GPU machine
//! scripts/gpu-check.sh sets `VERA_KERNELS_EXPECT_GPU=1`, which turns a missing GPU into a failure,
//! so these tests cannot pass there without running.
//!
//! - Model-sized layers (T ∈ {1, 8, 512, 4096}; n, m ∈ {4096, 11008}; r ∈ {256, 1024}) in every
//!   dtype: a sample of rows against the f64 reference within `reference::forward_error_bound_cuda`,
//!   and every output element written (overwrite mode over a NaN-poisoned y).
//! - 500 back-to-back calls, nothing synchronised in between, give the same bits (the split-K
//!   completion counters are reused from call to call).
//! - Two host threads, each with its own stream, share one set of device projections and get the
//!   bits a single stream gets.
#![cfg(feature = "cuda")]

mod common;
mod gpu;

// SplitMix64: fast enough to fill the 45M-element inputs of the largest shapes in a blink.
use common::SplitMix64 as Rng;
use vera_kernels::cuda::{CudaDevice, CudaStream, DeviceAdapter, DeviceMatrix, DeviceProjections};
use vera_kernels::{bf16, f16, reference, Adapter, Element, MatRef, Mode, Projections};

/// The largest in/out features of the shapes below: the projections every layer slices.
const N_MAX: usize = 11008;

/// One layer call: `t` token rows through `n → m` at rank `r`.
#[derive(Clone, Copy, Debug)]
struct Shape {
    t: usize,
    n: usize,
    m: usize,
    r: usize,
}

/// Every T with both ranks, the four (n, m) pairs in turn, so that each pair comes twice and the
/// largest layer (4096 × 11008 → 11008 at rank 1024) is among them.
fn model_shapes() -> Vec<Shape> {
    const PAIRS: [(usize, usize); 4] = [(4096, 4096), (4096, 11008), (11008, 4096), (11008, 11008)];
    let mut shapes = Vec::new();
    for (i, t) in [1, 8, 512, 4096].into_iter().enumerate() {
        for (j, r) in [256, 1024].into_iter().enumerate() {
            let (n, m) = PAIRS[(2 * i + j) % PAIRS.len()];
            shapes.push(Shape { t, n, m, r });
        }
    }
    shapes
}

/// The rows of a `t`-row output checked against the reference: the first, the last and one
/// drawn between them (all three when `t <= 3`).
fn sampled_rows(t: usize, rng: &mut Rng) -> Vec<usize> {
    let mut rows = vec![0, t - 1, (rng.next_u64() % t as u64) as usize];
    rows.sort_unstable();
    rows.dedup();
    rows
}

/// A random adapter for `m` outputs at rank `r`, with a bias when `bias`.
fn adapter(rng: &mut Rng, r: usize, m: usize, bias: bool) -> Adapter {
    let adapter = Adapter::new(rng.values(r, 1.0), rng.values(m, 1.0)).expect("lengths r and m");
    if bias {
        adapter.with_bias(rng.values(m, 1.0)).expect("length m")
    } else {
        adapter
    }
}

/// The reference output and its error bound for the given rows of `x` (one host thread per row:
/// the f64 reference of one row at n = m = 11008, r = 1024 takes a while).
fn reference_rows<T: Element>(
    projections: &Projections<T>,
    adapter: &Adapter,
    s: Shape,
    x: &[T],
    base: Option<&[T]>,
    rows: &[usize],
) -> Vec<(Vec<f64>, Vec<f64>)> {
    let layer = projections.slice(s.n, s.m).expect("shape within the projections");
    std::thread::scope(|scope| {
        let handles: Vec<_> = rows
            .iter()
            .map(|&row| {
                scope.spawn(move || {
                    let x_row = MatRef::from_slice(&x[row * s.n..(row + 1) * s.n], 1, s.n).unwrap();
                    let base_row = base.map(|b| MatRef::from_slice(&b[row * s.m..(row + 1) * s.m], 1, s.m).unwrap());
                    let want = reference::forward(layer, adapter, x_row, base_row).unwrap();
                    let bound = reference::forward_error_bound_cuda(layer, adapter, x_row, base_row).unwrap();
                    (want, bound)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("reference thread")).collect()
    })
}

/// Runs one model-sized call on the GPU and checks it; returns the largest |error| / bound seen.
fn check_model_shape<T: Element>(
    stream: &CudaStream,
    projections: &Projections<T>,
    d_proj: &DeviceProjections<T>,
    s: Shape,
    seed: u64,
) -> f64 {
    let mut rng = Rng(seed);
    // Overwrite into a NaN-poisoned y shows every unwritten element; accumulate checks the base add.
    let mode = if seed.is_multiple_of(2) { Mode::Overwrite } else { Mode::Accumulate };
    let host_adapter = adapter(&mut rng, s.r, s.m, !seed.is_multiple_of(3));
    let x: Vec<T> = rng.elements(s.t * s.n, 2.0);
    let y0: Vec<T> = match mode {
        Mode::Overwrite => vec![T::from_f32(f32::NAN); s.t * s.m],
        Mode::Accumulate => rng.elements(s.t * s.m, 2.0),
    };
    let d_adapter = stream.upload_adapter(&host_adapter).unwrap();
    let d_x = stream.upload(MatRef::from_slice(&x, s.t, s.n).unwrap()).unwrap();
    let mut d_y = stream.upload(MatRef::from_slice(&y0, s.t, s.m).unwrap()).unwrap();
    stream.forward(d_proj, &d_adapter, &d_x, &mut d_y, mode).unwrap();
    let y = stream.to_host(&d_y).unwrap();

    let unwritten = y.iter().filter(|v| !v.to_f64().is_finite()).count();
    assert_eq!(unwritten, 0, "{s:?} {mode:?} {}: {unwritten} outputs not finite", T::DTYPE);
    let rows = sampled_rows(s.t, &mut rng);
    let base = (mode == Mode::Accumulate).then_some(&y0[..]);
    let mut worst: f64 = 0.0;
    for (&row, (want, bound)) in rows.iter().zip(reference_rows(projections, &host_adapter, s, &x, base, &rows)) {
        for i in 0..s.m {
            let got = y[row * s.m + i].to_f64();
            let err = (got - want[i]).abs();
            assert!(
                err <= bound[i],
                "{s:?} {mode:?} {}: y[{row},{i}] = {got}, reference {}, bound {}",
                T::DTYPE,
                want[i],
                bound[i]
            );
            worst = worst.max(err / bound[i]);
        }
    }
    worst
}

fn model_sizes<T: Element>() {
    let Some(device) = gpu::gpu_or_skip("the model-sized CUDA tests") else { return };
    let stream = device.stream();
    let mut checked = 0;
    for r in [256, 1024] {
        // One set of projections per rank, sliced by every layer, as in a model.
        let projections = Projections::<T>::from_seed(r as u64, r, N_MAX, N_MAX).unwrap();
        let d_proj = stream.upload_projections(projections.a(), projections.b()).unwrap();
        for (i, s) in model_shapes().into_iter().enumerate().filter(|(_, s)| s.r == r) {
            let started = std::time::Instant::now();
            let worst = check_model_shape(&stream, &projections, &d_proj, s, i as u64);
            eprintln!("{} {s:?}: max |error| / bound {worst:.3} ({:.2?})", T::DTYPE, started.elapsed());
            checked += 1;
        }
    }
    assert_eq!(checked, model_shapes().len(), "every model shape checked on {}", device.name());
}

#[test]
fn model_sizes_f32_within_bound() {
    model_sizes::<f32>();
}

#[test]
fn model_sizes_f16_within_bound() {
    model_sizes::<f16>();
}

#[test]
fn model_sizes_bf16_within_bound() {
    model_sizes::<bf16>();
}

/// The inputs of one layer on the device, from a seed.
struct DeviceLayer<T> {
    shape: Shape,
    adapter: DeviceAdapter,
    x: DeviceMatrix<T>,
}

impl<T: Element> DeviceLayer<T> {
    fn new(stream: &CudaStream, shape: Shape, seed: u64) -> Self {
        let mut rng = Rng(seed);
        let adapter = stream.upload_adapter(&adapter(&mut rng, shape.r, shape.m, true)).unwrap();
        let x_host: Vec<T> = rng.elements(shape.t * shape.n, 2.0);
        let x = stream.upload(MatRef::from_slice(&x_host, shape.t, shape.n).unwrap()).unwrap();
        DeviceLayer { shape, adapter, x }
    }

    /// Queues one overwrite call into `y` on `stream`.
    fn forward(&self, stream: &CudaStream, projections: &DeviceProjections<T>, y: &mut DeviceMatrix<T>) {
        stream.forward(projections, &self.adapter, &self.x, y, Mode::Overwrite).unwrap();
    }

    /// A new output matrix for this layer.
    fn output(&self, stream: &CudaStream) -> DeviceMatrix<T> {
        stream.zeros(self.shape.t, self.shape.m, self.shape.m).unwrap()
    }
}

/// The bits of a device matrix (waits for the stream).
fn bits<T: Element>(stream: &CudaStream, y: &DeviceMatrix<T>) -> Vec<u64> {
    stream.to_host(y).unwrap().iter().map(|v| v.to_f64().to_bits()).collect()
}

const BACK_TO_BACK_CALLS: usize = 500;

/// `BACK_TO_BACK_CALLS` calls of one layer queued without a synchronisation, each into its own y:
/// all must hold the first call's bits.
fn back_to_back<T: Element>(stream: &CudaStream, shape: Shape, seed: u64) {
    let projections = Projections::<T>::from_seed(seed, shape.r, shape.n, shape.m).unwrap();
    let d_proj = stream.upload_projections(projections.a(), projections.b()).unwrap();
    let layer = DeviceLayer::<T>::new(stream, shape, seed);
    let mut outputs: Vec<DeviceMatrix<T>> = (0..BACK_TO_BACK_CALLS).map(|_| layer.output(stream)).collect();
    for y in &mut outputs {
        layer.forward(stream, &d_proj, y);
    }
    let first = bits(stream, &outputs[0]);
    assert!(first.iter().all(|&b| f64::from_bits(b).is_finite()), "{shape:?} {}: not finite", T::DTYPE);
    for (call, y) in outputs.iter().enumerate().skip(1) {
        assert!(bits(stream, y) == first, "{shape:?} {}: call {call} of {BACK_TO_BACK_CALLS} differs", T::DTYPE);
    }
}

#[test]
fn back_to_back_calls_give_identical_bits() {
    let Some(device) = gpu::gpu_or_skip("the model-sized CUDA tests") else { return };
    let stream = device.stream();
    // Decode with split-K (T = 1, 8), and a prefill tile grid (T = 512), as models call them.
    back_to_back::<bf16>(&stream, Shape { t: 1, n: 4096, m: 4096, r: 256 }, 1);
    back_to_back::<bf16>(&stream, Shape { t: 8, n: 4096, m: 11008, r: 1024 }, 2);
    back_to_back::<f32>(&stream, Shape { t: 8, n: 11008, m: 4096, r: 256 }, 3);
    back_to_back::<f16>(&stream, Shape { t: 512, n: 4096, m: 4096, r: 1024 }, 4);
}

/// Rounds of calls each host thread queues on its own stream.
const THREAD_ROUNDS: usize = 50;

/// Two host threads, each on a stream of its own, run decode and prefill layers against one shared
/// set of device projections; every result must hold the bits one stream alone computed.
#[test]
fn two_threads_on_two_streams_share_projections() {
    let Some(device) = gpu::gpu_or_skip("the model-sized CUDA tests") else { return };
    two_threads_share_projections::<bf16>(&device);
}

fn two_threads_share_projections<T: Element>(device: &CudaDevice) {
    let r = 256;
    let streams = [device.new_stream().unwrap(), device.new_stream().unwrap()];
    let main = device.stream();
    let projections = Projections::<T>::from_seed(9, r, N_MAX, N_MAX).unwrap();
    let d_proj = main.upload_projections(projections.a(), projections.b()).unwrap();
    main.synchronize().unwrap();
    let shapes = [
        [Shape { t: 1, n: 4096, m: 11008, r }, Shape { t: 512, n: 11008, m: 4096, r }],
        [Shape { t: 8, n: 11008, m: 11008, r }, Shape { t: 64, n: 4096, m: 4096, r }],
    ];
    // Each thread's layers and the bits the main stream alone computes for them.
    let work: Vec<Vec<(DeviceLayer<T>, Vec<u64>)>> = shapes
        .iter()
        .enumerate()
        .map(|(k, pair)| {
            pair.iter()
                .enumerate()
                .map(|(j, &s)| {
                    let layer = DeviceLayer::<T>::new(&main, s, 100 + 10 * k as u64 + j as u64);
                    let mut y = layer.output(&main);
                    layer.forward(&main, &d_proj, &mut y);
                    let want = bits(&main, &y);
                    (layer, want)
                })
                .collect()
        })
        .collect();
    std::thread::scope(|scope| {
        for (stream, layers) in streams.iter().zip(&work) {
            let d_proj = &d_proj;
            scope.spawn(move || {
                let mut outputs: Vec<DeviceMatrix<T>> = layers.iter().map(|(l, _)| l.output(stream)).collect();
                for round in 0..THREAD_ROUNDS {
                    for ((layer, _), y) in layers.iter().zip(&mut outputs) {
                        layer.forward(stream, d_proj, y);
                    }
                    // Check now and then; in between, the two streams queue work side by side.
                    if round % 10 == 9 {
                        for ((layer, want), y) in layers.iter().zip(&outputs) {
                            assert!(bits(stream, y) == *want, "{:?}: round {round} differs", layer.shape);
                        }
                    }
                }
            });
        }
    });
}
