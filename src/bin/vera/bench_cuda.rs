//! `vera bench --device cuda`: the fused forward on a GPU, each call timed with CUDA events; with
//! `--backward` also the backward pass (`CudaStream::backward`, which recomputes `h`) and a training
//! step (the forward, then the backward).
//!
//! The timing protocol is the one `benches/peers/torch_vera.py --device cuda` follows for PyTorch's
//! PEFT path, so that the two are compared like for like:
//! - [`WARMUP_CALLS`] untimed calls first (module load, workspace growth, clocks), and at least
//!   one pass over the copies of A and B when they rotate (see `--l2 cold` below);
//! - then each sample is one call between two events recorded on the stream, waited for before the
//!   next call (so a sample is the device time of one call, launch gaps inside it included);
//! - samples are taken until there are [`MIN_SAMPLES`] and the time budget has passed, or
//!   [`MAX_SAMPLES`]; the median is reported.
//!
//! With `--l2 cold`, each call reads its own copy of A and B, in rotation over enough copies to
//! fill [`COLD_FOOTPRINT_L2S`] times the device's L2, so that A and B come from device memory, as
//! in a model whose other layers ran in between. With `--l2 warm` every call reads the same A and
//! B, which stay in L2 when they fit there (decode at rank 256: 4 MiB in bf16).

use std::str::FromStr;
use std::time::{Duration, Instant};

use vera_kernels::cuda::{CudaDevice, CudaStream, DeviceGradients, DeviceProjections};
use vera_kernels::{with_element_type, DType, Element, MatRef, Mode};

use super::bench::{json_line, Times};
use super::workload::{Shape, Workload};

/// Untimed calls before the first sample (at least one pass over the rotated copies, too).
pub const WARMUP_CALLS: usize = 10;
/// Samples taken whatever the budget.
pub const MIN_SAMPLES: usize = 50;
/// Samples at most, however long the budget.
pub const MAX_SAMPLES: usize = 2000;
/// With `--l2 cold`, the copies of A and B rotated through hold this many times the L2's size.
pub const COLD_FOOTPRINT_L2S: usize = 4;
/// With `--l2 cold`, at most this many copies (a bound on memory for tiny layers).
const MAX_COLD_COPIES: usize = 256;

/// Whether A and B may stay in the GPU's L2 cache between timed calls.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L2 {
    /// Every call reads the same A and B.
    Warm,
    /// Every call reads a copy of A and B that the calls since its last use have evicted.
    Cold,
}

impl FromStr for L2 {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "warm" => Ok(L2::Warm),
            "cold" => Ok(L2::Cold),
            _ => Err(format!("expected warm or cold, got {s:?}")),
        }
    }
}

/// One measured case on the GPU.
pub struct Row {
    pub shape: Shape,
    pub dtype: DType,
    pub device: String,
    pub l2: L2,
    /// The median device time of one call.
    pub fused_ms: f64,
    /// How many calls were timed.
    pub samples: usize,
    /// With `--backward`: the median device times of the backward alone and of a training step
    /// (the forward, then the backward recomputing `h`), in ms.
    pub training: Option<(f64, f64)>,
}

impl Row {
    pub fn gflops(&self) -> f64 {
        self.shape.fused_flops() / (self.fused_ms * 1e-3) / 1e9
    }

    /// Bytes the call must move at least: the layer's slices of A and B, x, and y read and written.
    pub fn bytes(&self) -> usize {
        let Shape { t, n, m, r } = self.shape;
        (r * (n + m) + t * n + 2 * t * m) * self.dtype.size_bytes()
    }

    /// The case's name: the shape's, with `_l2cold` for the L2-cold variant (the PyTorch peer
    /// names its rows the same way, so that `scripts/compare-bench.py` pairs them).
    pub fn case(&self) -> String {
        match self.l2 {
            L2::Warm => self.shape.name(),
            L2::Cold => format!("{}_l2cold", self.shape.name()),
        }
    }

    /// The same keys as `vera bench --json` on the CPU (no dense or unfused peer on the GPU: null);
    /// with `--backward`, `backward_ms` and `train_step_ms` too, as the PyTorch peer prints them
    /// (the GPU's backward always recomputes `h`: no `train_step_recompute_ms`).
    pub fn json(&self) -> String {
        let isa = format!("cuda-{}", self.device.replace(' ', "_"));
        let times = Times { fused_ms: self.fused_ms, dense_ms: None, unfused_ms: None };
        let line = json_line(&self.case(), self.shape, self.dtype, 1, &isa, times);
        match self.training {
            Some((backward_ms, step_ms)) => format!(
                "{},\"backward_ms\":{backward_ms:.6},\"train_step_ms\":{step_ms:.6}}}",
                line.trim_end_matches('}')
            ),
            None => line,
        }
    }

    /// A table line; with the device's copy bandwidth, the share of the bytes roofline reached.
    pub fn table_row(&self, copy_gbps: Option<f64>) -> String {
        let gbps = self.bytes() as f64 / (self.fused_ms * 1e-3) / 1e9;
        let roofline = copy_gbps.map_or(String::new(), |bw| format!("  {:5.1}% of {bw:.0} GB/s", 100.0 * gbps / bw));
        let l2 = match self.l2 {
            L2::Warm => "warm",
            L2::Cold => "cold",
        };
        let training = self.training.map_or(String::new(), |(b, s)| format!("  backward {b:.4} ms, step {s:.4} ms"));
        format!(
            "{:<26} {:>5} {:>4} {:>10.4} {:>9.1} {:>9.1} {:>7}{roofline}{training}",
            self.shape.to_string(),
            self.dtype.name(),
            l2,
            self.fused_ms,
            self.gflops(),
            gbps,
            self.samples
        )
    }
}

pub fn table_header() -> String {
    format!(
        "{:<26} {:>5} {:>4} {:>10} {:>9} {:>9} {:>7}",
        "case (T,n,m,r)", "dtype", "L2", "fused ms", "GFLOP/s", "GB/s", "samples"
    )
}

/// How many copies of A and B to rotate through so that they are not in L2 when a call reads
/// them: enough to fill [`COLD_FOOTPRINT_L2S`] L2s (one copy when warm).
pub fn projection_copies(l2: L2, set_bytes: usize, l2_bytes: usize) -> usize {
    match l2 {
        L2::Warm => 1,
        L2::Cold => (COLD_FOOTPRINT_L2S * l2_bytes).div_ceil(set_bytes.max(1)).clamp(2, MAX_COLD_COPIES),
    }
}

/// The median of `samples` (not empty).
fn median(mut samples: Vec<f64>) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

/// Whether to take another sample: until [`MIN_SAMPLES`], then while the budget lasts, up to
/// [`MAX_SAMPLES`].
fn wants_more(samples: usize, started: Instant, budget: Duration) -> bool {
    samples < MIN_SAMPLES || (started.elapsed() < budget && samples < MAX_SAMPLES)
}

/// The median device time of `call` on the rotated projection `sets`, and the number of samples:
/// the warm-up, then one sample per call (see the module docs).
fn time_calls<T>(
    stream: &CudaStream,
    sets: &[DeviceProjections<T>],
    budget: Duration,
    mut call: impl FnMut(&DeviceProjections<T>) -> vera_kernels::Result<()>,
) -> vera_kernels::Result<(f64, usize)> {
    let mut next_set = sets.iter().cycle();
    // A whole pass first: the copies uploaded last may still be in L2.
    for set in next_set.by_ref().take(WARMUP_CALLS.max(sets.len())) {
        call(set)?;
    }
    stream.synchronize()?;
    let mut timer = stream.timer()?;
    let mut samples = Vec::new();
    let started = Instant::now();
    while wants_more(samples.len(), started, budget) {
        let set = next_set.next().expect("cycle over at least one set");
        samples.push(timer.time_ms(|| call(set))?);
    }
    let count = samples.len();
    Ok((median(samples), count))
}

/// What one case measures: the forward's median and samples, and with `backward` the backward's
/// and a training step's medians.
type Timings = (f64, usize, Option<(f64, f64)>);

/// The median device time of one call of `shape` and the number of samples (and with `backward`
/// those of the backward and of a step).
fn run_typed<T: Element>(
    stream: &CudaStream,
    shape: Shape,
    l2: L2,
    budget: Duration,
    backward: bool,
) -> vera_kernels::Result<Timings> {
    let w = Workload::<T>::new(shape)?;
    let Shape { t, n, m, r } = shape;
    let set_bytes = r * (n + m) * T::DTYPE.size_bytes();
    let copies = projection_copies(l2, set_bytes, stream.device().l2_cache_bytes());
    let sets: Vec<DeviceProjections<T>> = (0..copies)
        .map(|_| stream.upload_projections(w.projections.a(), w.projections.b()))
        .collect::<vera_kernels::Result<_>>()?;
    let adapter = stream.upload_adapter(&w.adapter)?;
    let x = stream.upload(MatRef::from_slice(&w.x, t, n)?)?;
    let mut y = stream.upload(MatRef::from_slice(&w.y, t, m)?)?;
    let (fused_ms, samples) =
        time_calls(stream, &sets, budget, |set| stream.forward(set, &adapter, &x, &mut y, Mode::Accumulate))?;
    if !backward {
        return Ok((fused_ms, samples, None));
    }
    // Every gradient, as `vera bench --backward` on the CPU and the PyTorch peer take them.
    let dy = stream.upload(MatRef::from_slice(w.dy(), t, m)?)?;
    let (mut dld, mut dlb, mut dbias) =
        (stream.zeros::<f32>(1, r, r)?, stream.zeros::<f32>(1, m, m)?, stream.zeros(1, m, m)?);
    let mut dx = stream.zeros::<T>(t, n, n)?;
    let mut backward = |set: &DeviceProjections<T>| {
        let grads = DeviceGradients::new(&mut dld, &mut dlb).with_bias(&mut dbias).with_x(&mut dx);
        stream.backward(set, &adapter, &x, &dy, grads, Mode::Overwrite)
    };
    let (backward_ms, _) = time_calls(stream, &sets, budget, &mut backward)?;
    let (step_ms, _) = time_calls(stream, &sets, budget, |set| {
        stream.forward(set, &adapter, &x, &mut y, Mode::Accumulate)?;
        backward(set)
    })?;
    Ok((fused_ms, samples, Some((backward_ms, step_ms))))
}

/// Times one case on GPU 0's own stream (`CudaDevice::stream`) (with `backward`, the training step too).
pub fn run(
    device: &CudaDevice,
    shape: Shape,
    dtype: DType,
    l2: L2,
    budget: Duration,
    backward: bool,
) -> vera_kernels::Result<Row> {
    let stream = device.stream();
    let (fused_ms, samples, training) =
        with_element_type!(dtype, T => run_typed::<T>(&stream, shape, l2, budget, backward))?;
    Ok(Row { shape, dtype, device: device.name(), l2, fused_ms, samples, training })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cold_rotation_fills_four_l2s() {
        // bf16, T = 1, n = m = 4096, r = 256: 4 MiB per copy; 4 x 50 MiB of L2 need 50 copies.
        assert_eq!(projection_copies(L2::Cold, 4 << 20, 50 << 20), 50);
        // A copy larger than the footprint still rotates through two.
        assert_eq!(projection_copies(L2::Cold, 1 << 30, 50 << 20), 2);
        // Tiny layers are bounded.
        assert_eq!(projection_copies(L2::Cold, 16, 50 << 20), MAX_COLD_COPIES);
        assert_eq!(projection_copies(L2::Warm, 4 << 20, 50 << 20), 1);
    }

    #[test]
    fn sampling_stops_at_the_budget_after_the_minimum() {
        assert!(wants_more(MIN_SAMPLES - 1, Instant::now(), Duration::ZERO));
        assert!(!wants_more(MIN_SAMPLES, Instant::now(), Duration::ZERO));
        assert!(wants_more(MIN_SAMPLES, Instant::now(), Duration::from_secs(60)));
        assert!(!wants_more(MAX_SAMPLES, Instant::now(), Duration::from_secs(60)));
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
    }

    /// The whole protocol, both variants, on the emulated device (no GPU needed).
    #[cfg(feature = "cuda-emulation")]
    #[test]
    fn both_variants_run_on_the_emulated_device() {
        let device = CudaDevice::emulated();
        for l2 in [L2::Warm, L2::Cold] {
            let row = run(&device, Shape { t: 2, n: 40, m: 24, r: 8 }, DType::BF16, l2, Duration::ZERO, false).unwrap();
            assert!(row.fused_ms > 0.0 && row.fused_ms.is_finite(), "{l2:?}: {} ms", row.fused_ms);
            assert_eq!(row.samples, MIN_SAMPLES);
            assert!(row.training.is_none());
        }
        // With --backward: the backward and a step, each timed. (Not which is the longer: the step
        // holds the backward, but a timing in a test on a shared machine is noise, and failed so.)
        let row = run(&device, Shape { t: 9, n: 40, m: 24, r: 8 }, DType::F16, L2::Warm, Duration::ZERO, true).unwrap();
        let (backward_ms, step_ms) = row.training.expect("--backward times the training step");
        for ms in [backward_ms, step_ms] {
            assert!(ms > 0.0 && ms.is_finite(), "backward {backward_ms} ms, step {step_ms} ms");
        }
        let json = row.json();
        assert!(json.contains(&format!("\"backward_ms\":{backward_ms:.6},\"train_step_ms\":{step_ms:.6}}}")), "{json}");
    }

    #[test]
    fn cold_rows_are_named_apart() {
        let row = |l2| Row {
            shape: Shape { t: 1, n: 4096, m: 4096, r: 256 },
            dtype: DType::BF16,
            device: "NVIDIA H200".into(),
            l2,
            fused_ms: 0.01,
            samples: 50,
            training: None,
        };
        assert!(row(L2::Warm).json().starts_with("{\"case\":\"t1_n4096_m4096_r256\","));
        assert!(row(L2::Cold).json().starts_with("{\"case\":\"t1_n4096_m4096_r256_l2cold\",\"t\":1,"));
    }
}
