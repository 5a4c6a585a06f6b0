//! `vera bench`: times the fused kernel against the dense baseline and the unfused peer.

use std::time::{Duration, Instant};

use vera_kernels::{active_isa, tier_facts, with_element_type, DType, Element, PeakInstruction};

use super::peak::Peak;
use super::workload::{Shape, Workload};

/// One measured case.
pub struct Row {
    pub shape: Shape,
    pub dtype: DType,
    pub threads: usize,
    pub isa: String,
    /// The instruction whose peak bounds the kernels that ran (the tier's fact).
    pub peak: PeakInstruction,
    pub fused_ms: f64,
    pub dense_ms: Option<f64>,
    pub unfused_ms: f64,
    /// With `--backward`: the training step's times.
    pub training: Option<Training>,
}

/// The times of one training step, in ms.
#[derive(Clone, Copy, Debug)]
pub struct Training {
    /// The backward pass alone (reusing the training forward's `h`).
    pub backward_ms: f64,
    /// The unfused backward peer (`v` and `g` materialised), reusing the same `h`.
    pub backward_unfused_ms: f64,
    /// The training forward (saving `h`) plus the backward reusing it.
    pub train_step_ms: f64,
    /// The forward (saving nothing) plus the backward recomputing `h`.
    pub train_step_recompute_ms: f64,
    /// The dense baseline's step (form ΔW, `x·ΔWᵀ`, the gradients through ΔW); `None` with
    /// `--no-dense`.
    pub train_step_dense_ms: Option<f64>,
}

impl Row {
    pub fn fused_gflops(&self) -> f64 {
        self.shape.fused_flops() / (self.fused_ms * 1e-3) / 1e9
    }

    /// One JSON object with exactly the documented keys.
    pub fn json(&self) -> String {
        let times = Times { fused_ms: self.fused_ms, dense_ms: self.dense_ms, unfused_ms: Some(self.unfused_ms) };
        let line = json_line(&self.shape.name(), self.shape, self.dtype, self.threads, &self.isa, times);
        match self.training {
            // The training keys follow the forward's, only with --backward.
            Some(tr) => format!(
                "{},\"backward_ms\":{:.6},\"train_step_ms\":{:.6},\"train_step_recompute_ms\":{:.6},\
                 \"backward_unfused_ms\":{:.6},\"train_step_dense_ms\":{}}}",
                line.trim_end_matches('}'),
                tr.backward_ms,
                tr.train_step_ms,
                tr.train_step_recompute_ms,
                tr.backward_unfused_ms,
                ms(tr.train_step_dense_ms)
            ),
            None => line,
        }
    }
}

/// The measured times of one case, in ms (`None`: that method was not run).
#[derive(Clone, Copy, Debug)]
pub struct Times {
    pub fused_ms: f64,
    pub dense_ms: Option<f64>,
    pub unfused_ms: Option<f64>,
}

/// One case as a JSON object with the keys `vera bench --json` documents (shared by the CPU and
/// the GPU bench, and matched by `benches/peers/torch_vera.py`). `case` is the shape's name, with
/// a suffix for a variant of it (the GPU bench's `_l2cold`).
pub fn json_line(case: &str, shape: Shape, dtype: DType, threads: usize, isa: &str, times: Times) -> String {
    let Times { fused_ms, dense_ms, unfused_ms } = times;
    format!(
        "{{\"case\":\"{}\",\"t\":{},\"n\":{},\"m\":{},\"r\":{},\"dtype\":\"{}\",\"threads\":{},\"isa\":\"{}\",\
         \"fused_ms\":{},\"dense_ms\":{},\"unfused_ms\":{},\"fused_gflops\":{:.3}}}",
        case,
        shape.t,
        shape.n,
        shape.m,
        shape.r,
        dtype,
        threads,
        isa,
        ms(Some(fused_ms)),
        ms(dense_ms),
        ms(unfused_ms),
        shape.fused_flops() / (fused_ms * 1e-3) / 1e9
    )
}

/// A time for JSON: with 6 decimals, or `null` for a method not run.
fn ms(v: Option<f64>) -> String {
    v.map_or("null".to_string(), |v| format!("{v:.6}"))
}

/// One way of computing a case, timed as a whole call.
pub(crate) type Method<W> = fn(&mut W) -> vera_kernels::Result<()>;

/// Times the methods round-robin, so that the machine's noise falls on all of them alike: each
/// round calls every method twice and times the second call, so that each is timed warm.
/// Rounds go on until every method has at least `min_runs` samples and `budget` has passed (at
/// most 1000 rounds). Returns each method's median in ms.
pub(crate) fn interleaved_medians<W>(
    w: &mut W,
    methods: &[Method<W>],
    budget: Duration,
    min_runs: usize,
) -> vera_kernels::Result<Vec<f64>> {
    let mut times = vec![Vec::new(); methods.len()];
    let start = Instant::now();
    while times[0].len() < min_runs || (start.elapsed() < budget && times[0].len() < 1000) {
        for (f, samples) in methods.iter().zip(&mut times) {
            f(w)?;
            let t0 = Instant::now();
            f(w)?;
            samples.push(t0.elapsed().as_secs_f64() * 1e3);
        }
    }
    Ok(times
        .into_iter()
        .map(|mut v| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        })
        .collect())
}

/// What one case measures besides the fused forward.
#[derive(Clone, Copy, Debug)]
pub struct Methods {
    /// The dense baseline.
    pub dense: bool,
    /// The training step (`--backward`).
    pub backward: bool,
}

fn run_typed<T: Element>(
    shape: Shape,
    threads: usize,
    methods: Methods,
    budget: Duration,
) -> vera_kernels::Result<Row> {
    let mut w = Workload::<T>::new(shape)?;
    // Each method is timed in rounds of its own, as the PyTorch peer (benches/peers/torch_vera.py)
    // times its calls: a call after a call of another method finds the cache as that method left
    // it (T = 1 f32 4096 x 4096, r = 256 on the Intel VM: 0.19 ms after an unfused call, 0.13 ms
    // after a fused one), so interleaving would time ours against a PyTorch timed alone. The dense
    // baseline's m x n ΔW would evict what the others reuse, so it is timed last.
    let ms = if methods.backward {
        // The forward is timed in the same rounds as the training methods, so that their ratios
        // (the backward over the forward) come from the same minutes of a noisy machine.
        w.forward_train()?;
        let all: [Method<Workload<T>>; 6] = [
            Workload::fused,
            Workload::unfused,
            Workload::backward,
            Workload::train_step,
            Workload::train_step_recompute,
            Workload::backward_unfused,
        ];
        interleaved_medians(&mut w, &all, budget, 5)?
    } else {
        let fused = interleaved_medians(&mut w, &[Workload::fused], budget, 5)?[0];
        vec![fused, interleaved_medians(&mut w, &[Workload::unfused], budget, 5)?[0]]
    };
    let dense = methods.dense;
    let dense_ms = if dense { Some(interleaved_medians(&mut w, &[Workload::dense], budget, 3)?[0]) } else { None };
    // The dense step last of all: its two [m, n] matrices evict everything else.
    let train_step_dense_ms = if dense && methods.backward {
        Some(interleaved_medians(&mut w, &[Workload::train_step_dense], budget, 3)?[0])
    } else {
        None
    };
    let training = methods.backward.then(|| Training {
        backward_ms: ms[2],
        train_step_ms: ms[3],
        train_step_recompute_ms: ms[4],
        backward_unfused_ms: ms[5],
        train_step_dense_ms,
    });
    Ok(Row {
        shape,
        dtype: T::DTYPE,
        threads,
        isa: active_isa::<T>().name().to_string(),
        peak: tier_facts::<T>().peak,
        fused_ms: ms[0],
        dense_ms,
        unfused_ms: ms[1],
        training,
    })
}

/// Measures one case on the current rayon pool.
pub fn run(
    shape: Shape,
    dtype: DType,
    threads: usize,
    methods: Methods,
    budget: Duration,
) -> vera_kernels::Result<Row> {
    with_element_type!(dtype, T => run_typed::<T>(shape, threads, methods, budget))
}

/// The machine's peaks, as printed before the table.
pub fn peak_line(p: &Peak) -> String {
    let bf16 = p.bf16_gflops.map_or("n/a".to_string(), |v| format!("{v:.0}"));
    let amx = match p.amx_gflops {
        Ok(v) => format!("{v:.0}"),
        Err(why) => format!("n/a ({why})"),
    };
    format!(
        "peak ({} threads): f32 FMA {:.0} GFLOP/s, bf16 dot {} GFLOP/s, AMX bf16 {} GFLOP/s, read {:.0} GB/s from cache ({} MiB/thread), {:.0} GB/s from memory; {}",
        p.threads,
        p.f32_gflops,
        bf16,
        amx,
        p.cache_gbps,
        super::peak::CACHE_BYTES_PER_THREAD >> 20,
        p.memory_gbps,
        caches_text(vera_kernels::cache_sizes()),
    )
}

/// The data caches, as the peak line prints them: `caches L1d 48 KiB, L2 2 MiB, L3 105 MiB (CPUID)`.
pub fn caches_text(c: vera_kernels::CacheSizes) -> String {
    let size = |b: usize| {
        if b >= 1 << 20 && b.is_multiple_of(1 << 20) {
            format!("{} MiB", b >> 20)
        } else {
            format!("{} KiB", b >> 10)
        }
    };
    let l3 = if c.l3 == 0 { "none".to_string() } else { size(c.l3) };
    let source = if c.from_cpuid { "CPUID" } else { "assumed: CPUID did not say" };
    format!("caches L1d {}, L2 {}, L3 {l3} ({source})", size(c.l1d), size(c.l2))
}

impl Row {
    /// Whether the kernel runs this case in its decode regime (fewer row blocks than threads).
    fn decode(&self) -> bool {
        self.shape.t.div_ceil(vera_kernels::BLOCK_ROWS) < self.threads
    }

    /// Bytes a decode case must move: the layer's slices of A and B, x and y.
    pub fn decode_bytes(&self) -> Option<usize> {
        let Shape { t, n, m, r } = self.shape;
        self.decode().then(|| (r + t) * (n + m) * self.dtype.size_bytes())
    }

    /// The share of the binding roofline the fused kernel reached, in percent, with its name.
    ///
    /// The compute bound is the FLOPs at the peak of the tier's instruction: the f32 FMA peak, or
    /// for a tier whose bf16 products run on `vdpbf16ps` (both products), the bf16 dot-product
    /// peak, or on AMX tiles, the AMX peak (a third of it for f16, whose products are split into
    /// three bf16 tile products). For decode, the bytes bound is the bytes moved at `read_gbps`:
    /// the read bandwidth measured on a buffer of the same size, so of the level of the memory
    /// hierarchy those bytes live in between calls. The roofline that binds
    /// is the larger of the two times: a decode case with a large enough rank and T is
    /// compute-bound, and then the share of the bytes bound is printed after it.
    pub fn roofline(&self, p: &Peak, read_gbps: Option<f64>) -> (f64, String) {
        let secs = self.fused_ms * 1e-3;
        let rate = match (self.peak, p.bf16_gflops, p.amx_gflops) {
            (PeakInstruction::Bf16Dot, Some(bf), _) => bf,
            (PeakInstruction::AmxBf16, _, Ok(amx)) => amx,
            // Three tile products per product (f16 split into bf16 parts).
            (PeakInstruction::AmxBf16Split, _, Ok(amx)) => amx / 3.0,
            _ => p.f32_gflops,
        };
        let compute_s = self.shape.fused_flops() / (rate * 1e9);
        let compute_pct = 100.0 * compute_s / secs;
        match (self.decode_bytes(), read_gbps) {
            (Some(bytes), Some(bw)) => {
                let bytes_s = bytes as f64 / (bw * 1e9);
                let bytes_pct = 100.0 * bytes_s / secs;
                let level = format!("bytes ({:.0} GB/s at {} MiB)", bw, bytes.div_ceil(1 << 20));
                if compute_s > bytes_s {
                    (compute_pct, format!("compute; {bytes_pct:.1}% of {level}"))
                } else {
                    (bytes_pct, level)
                }
            }
            _ => (compute_pct, "compute".to_string()),
        }
    }
}

/// The human-readable table's header; `training` adds the training step's columns, `peak` the
/// roofline column.
pub fn table_header(peak: bool, training: bool) -> String {
    let mut head = format!(
        "{:<26} {:>5} {:>3} {:>10} {:>10} {:>10} {:>10} {:>8} {:>8} {:>8}",
        "case (T,n,m,r)", "dtype", "thr", "isa", "fused ms", "dense ms", "unfused ms", "GFLOP/s", "dense/f", "unf/f"
    );
    if training {
        head += &format!(
            " {:>9} {:>9} {:>6} {:>11} {:>8} {:>10}",
            "bwd ms", "step ms", "bwd/f", "step-rec ms", "bwd unf/f", "step den/f"
        );
    }
    if peak {
        format!("{head}  % of roofline")
    } else {
        head
    }
}

pub fn table_row(row: &Row, peak: Option<(&Peak, Option<f64>)>) -> String {
    let dense = row.dense_ms.map_or("-".to_string(), |v| format!("{v:.3}"));
    let ratio = row.dense_ms.map_or("-".to_string(), |v| format!("{:.2}x", v / row.fused_ms));
    let line = format!(
        "{:<26} {:>5} {:>3} {:>10} {:>10.3} {:>10} {:>10.3} {:>8.1} {:>8} {:>7.2}x",
        row.shape.to_string(),
        row.dtype.name(),
        row.threads,
        row.isa,
        row.fused_ms,
        dense,
        row.unfused_ms,
        row.fused_gflops(),
        ratio,
        row.unfused_ms / row.fused_ms
    );
    let line = match row.training {
        Some(tr) => format!(
            "{line} {:>9.3} {:>9.3} {:>5.2}x {:>11.3} {:>7.2}x {:>10}",
            tr.backward_ms,
            tr.train_step_ms,
            tr.backward_ms / row.fused_ms,
            tr.train_step_recompute_ms,
            tr.backward_unfused_ms / tr.backward_ms,
            tr.train_step_dense_ms.map_or("-".to_string(), |v| format!("{:.2}x", v / tr.train_step_ms))
        ),
        None => line,
    };
    match peak {
        Some((p, read_gbps)) => {
            let (pct, level) = row.roofline(p, read_gbps);
            format!("{line}  {pct:5.1}% {level}")
        }
        None => line,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(shape: Shape, dtype: DType, isa: &str, fused_ms: f64) -> Row {
        let peak = match isa {
            "avx512bf16" => PeakInstruction::Bf16Dot,
            "amx" => PeakInstruction::AmxBf16,
            _ => PeakInstruction::F32Fma,
        };
        Row {
            shape,
            dtype,
            threads: 2,
            isa: isa.to_string(),
            peak,
            fused_ms,
            dense_ms: None,
            unfused_ms: fused_ms,
            training: None,
        }
    }

    const PEAK: Peak = Peak {
        threads: 2,
        f32_gflops: 200.0,
        bf16_gflops: Some(400.0),
        amx_gflops: Ok(3200.0),
        cache_gbps: 100.0,
        memory_gbps: 40.0,
    };

    #[test]
    fn the_larger_bound_binds() {
        // T = 1: 2·(n + m)·r = 4.19 MFLOP take 21 us at 200 GFLOP/s; (r + 1)·(n + m)·4 bytes
        // = 8.42 MB take 84 us at 100 GB/s, so bytes bind: 84 / 100 us.
        let t1 = row(Shape { t: 1, n: 4096, m: 4096, r: 256 }, DType::F32, "avx512", 0.1);
        let (pct, level) = t1.roofline(&PEAK, Some(100.0));
        assert!((pct - 84.21).abs() < 0.01, "{pct}");
        assert!(level.starts_with("bytes (100 GB/s at 9 MiB)"), "{level}");
        // T = 8, r = 1024, f16 on FMA: 134.2 MFLOP take 671 us; 16.9 MB take 169 us: compute binds.
        let t8 = row(Shape { t: 8, n: 4096, m: 4096, r: 1024 }, DType::F16, "avx512", 1.0);
        let (pct, level) = t8.roofline(&PEAK, Some(100.0));
        assert!((pct - 67.11).abs() < 0.01, "{pct}");
        assert!(level.starts_with("compute; 16.9% of bytes"), "{level}");
        // The same case in bf16 on vdpbf16ps: twice the rate halves the compute bound.
        let bf = row(Shape { t: 8, n: 4096, m: 4096, r: 1024 }, DType::BF16, "avx512bf16", 1.0);
        assert!((bf.roofline(&PEAK, Some(100.0)).0 - 33.55).abs() < 0.01);
        // Prefill on AMX tiles: 2·512·(768 + 768)·1024 = 1.61 GFLOP take 503 us at 3.2 TFLOP/s.
        let amx = row(Shape { t: 512, n: 768, m: 768, r: 1024 }, DType::BF16, "amx", 1.0);
        let (pct, level) = amx.roofline(&PEAK, None);
        assert!((pct - 50.33).abs() < 0.01, "{pct}");
        assert_eq!(level, "compute");
        // Prefill: compute only.
        let pre = row(Shape { t: 512, n: 768, m: 768, r: 1024 }, DType::F32, "avx512", 10.0);
        let (pct, level) = pre.roofline(&PEAK, None);
        assert!((pct - 80.53).abs() < 0.01, "{pct}");
        assert_eq!(level, "compute");
    }
}
