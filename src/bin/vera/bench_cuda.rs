//! `vera bench --device cuda`: the fused forward on a GPU, timed on the device's stream.

use std::time::{Duration, Instant};

use vera_kernels::cuda::{CudaDevice, CudaStream};
use vera_kernels::{with_element_type, DType, Element, MatRef, Mode};

use crate::workload::{Shape, Workload};

/// One measured case on the GPU.
pub struct Row {
    pub shape: Shape,
    pub dtype: DType,
    pub device: String,
    pub fused_ms: f64,
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

    /// The same keys as `vera bench --json` on the CPU (no dense or unfused peer on the GPU: null).
    pub fn json(&self) -> String {
        let isa = format!("cuda-{}", self.device.replace(' ', "_"));
        crate::bench::json_line(self.shape, self.dtype, 1, &isa, self.fused_ms, None, None)
    }

    /// A table line; with the device's copy bandwidth, the share of the bytes roofline reached.
    pub fn table_row(&self, copy_gbps: Option<f64>) -> String {
        let gbps = self.bytes() as f64 / (self.fused_ms * 1e-3) / 1e9;
        let roofline = copy_gbps.map_or(String::new(), |bw| format!("  {:5.1}% of {bw:.0} GB/s", 100.0 * gbps / bw));
        format!(
            "{:<26} {:>5} {:>10.4} {:>9.1} {:>9.1}{roofline}",
            self.shape.to_string(),
            self.dtype.name(),
            self.fused_ms,
            self.gflops(),
            gbps
        )
    }
}

pub fn table_header() -> String {
    format!("{:<26} {:>5} {:>10} {:>9} {:>9}", "case (T,n,m,r)", "dtype", "fused ms", "GFLOP/s", "GB/s")
}

fn run_typed<T: Element>(stream: &CudaStream, shape: Shape, budget: Duration) -> vera_kernels::Result<f64> {
    let w = Workload::<T>::new(shape)?;
    let Shape { t, n, m, .. } = shape;
    let projections = stream.upload_projections(w.projections.a(), w.projections.b())?;
    let adapter = stream.upload_adapter(&w.adapter)?;
    let x = stream.upload(MatRef::from_slice(&w.x, t, n)?)?;
    let mut y = stream.upload(MatRef::from_slice(&w.y, t, m)?)?;
    let mut call = || stream.forward(&projections, &adapter, &x, &mut y, Mode::Accumulate);
    for _ in 0..3 {
        call()?;
    }
    stream.synchronize()?;
    // Batches of calls between synchronisations, so that the launch-to-sync overhead is amortised;
    // the median batch's time per call.
    let batch = 20;
    let mut per_call = Vec::new();
    let start = Instant::now();
    while per_call.len() < 5 || (start.elapsed() < budget && per_call.len() < 200) {
        let t0 = Instant::now();
        for _ in 0..batch {
            call()?;
        }
        stream.synchronize()?;
        per_call.push(t0.elapsed().as_secs_f64() * 1e3 / batch as f64);
    }
    per_call.sort_by(f64::total_cmp);
    Ok(per_call[per_call.len() / 2])
}

pub fn run(device: &CudaDevice, shape: Shape, dtype: DType, budget: Duration) -> vera_kernels::Result<Row> {
    let stream = device.stream();
    let fused_ms = with_element_type!(dtype, T => run_typed::<T>(&stream, shape, budget))?;
    Ok(Row { shape, dtype, device: device.name(), fused_ms })
}
