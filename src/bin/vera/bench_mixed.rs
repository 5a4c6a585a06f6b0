//! `vera bench --adapters K`: a batch whose rows use K different adapters (row `t` uses adapter
//! `t % K`, or with `--rows runs` K contiguous runs of rows), timed four ways in the same rounds:
//!
//! - `single`: the fused forward with one adapter on every row (what the batch would cost if it
//!   used one adapter: the target of the mixed kernel);
//! - `mixed`: `forward_mixed`, both products once over all rows, each row's own scales;
//! - `loop`: what a user without a mixed kernel does: per adapter, gather its rows of `x` and `y`,
//!   run the fused forward on them, scatter `y` back;
//! - `dense` (unless `--no-dense`): per adapter, form its ΔW and multiply its rows by it.

use std::time::Duration;

use vera_kernels::baseline::{dense_forward, DenseBuffers};
use vera_kernels::rng::TorchCpuGenerator;
use vera_kernels::{
    active_isa, forward, forward_mixed, with_element_type, Adapter, AdapterBank, DType, Element, MatMut, MatRef, Mode,
};

use super::bench::{interleaved_medians, Method};
use super::workload::{buffer, Shape, Workload};

/// How one many-adapter case is run.
#[derive(Clone, Copy, Debug)]
pub struct Setup {
    /// The number of adapters K.
    pub adapters: usize,
    /// K contiguous runs of rows instead of row t using adapter t % K.
    pub runs: bool,
    pub threads: usize,
    /// Also time the per-adapter dense baseline.
    pub dense: bool,
    pub budget: Duration,
}

/// One measured case of the many-adapter benchmark.
pub struct MixedRow {
    pub shape: Shape,
    pub adapters: usize,
    pub runs: bool,
    pub dtype: DType,
    pub threads: usize,
    pub isa: String,
    pub single_ms: f64,
    pub mixed_ms: f64,
    pub loop_ms: f64,
    pub dense_ms: Option<f64>,
}

impl MixedRow {
    /// One JSON object: the case, then each method's median in ms; `fused_ms` is the mixed call's,
    /// under the key `scripts/compare-bench.py` matches with the PyTorch peer's loop.
    pub fn json(&self) -> String {
        let Shape { t, n, m, r } = self.shape;
        let dense = self.dense_ms.map_or("null".to_string(), |v| format!("{v:.6}"));
        format!(
            "{{\"case\":\"{}_k{}{}\",\"t\":{t},\"n\":{n},\"m\":{m},\"r\":{r},\"adapters\":{},\"dtype\":\"{}\",\
             \"threads\":{},\"isa\":\"{}\",\"fused_ms\":{:.6},\"single_ms\":{:.6},\"mixed_ms\":{:.6},\"loop_ms\":{:.6},\"dense_ms\":{dense}}}",
            self.shape.name(),
            self.adapters,
            if self.runs { "_runs" } else { "" },
            self.adapters,
            self.dtype,
            self.threads,
            self.isa,
            self.mixed_ms,
            self.single_ms,
            self.mixed_ms,
            self.loop_ms,
        )
    }

    /// The table's header.
    pub fn header() -> String {
        format!(
            "{:<26} {:>9} {:>5} {:>3} {:>10} {:>10} {:>10} {:>10} {:>10} {:>9} {:>8}",
            "case (T,n,m,r)",
            "K (rows)",
            "dtype",
            "thr",
            "isa",
            "single ms",
            "mixed ms",
            "loop ms",
            "dense ms",
            "single/mx",
            "loop/mx"
        )
    }

    /// One table line; `single/mx` is the mixed batch's throughput as a share of one adapter's.
    pub fn table_row(&self) -> String {
        let dense = self.dense_ms.map_or("-".to_string(), |v| format!("{v:.3}"));
        format!(
            "{:<26} {:>9} {:>5} {:>3} {:>10} {:>10.3} {:>10.3} {:>10.3} {:>10} {:>9.3} {:>7.2}x",
            self.shape.to_string(),
            format!("{} {}", self.adapters, if self.runs { "run" } else { "int" }),
            self.dtype.name(),
            self.threads,
            self.isa,
            self.single_ms,
            self.mixed_ms,
            self.loop_ms,
            dense,
            self.single_ms / self.mixed_ms,
            self.loop_ms / self.mixed_ms
        )
    }
}

/// A case's inputs: the single-adapter workload (adapter 0 is its adapter), the bank, the row map,
/// and per adapter its rows with gather buffers.
struct MixedWorkload<T> {
    w: Workload<T>,
    adapters: Vec<Adapter>,
    bank: AdapterBank,
    rows: Vec<i32>,
    rows_of: Vec<Vec<usize>>,
    xk: Vec<T>,
    yk: Vec<T>,
    dense: DenseBuffers<T>,
}

impl<T: Element> MixedWorkload<T> {
    fn new(shape: Shape, k: usize, runs: bool) -> vera_kernels::Result<Self> {
        let w = Workload::<T>::new(shape)?;
        let Shape { t, n, m, r } = shape;
        let mut g = TorchCpuGenerator::manual_seed(2);
        let mut draw = |len: usize| {
            let mut v = vec![0.0f32; len];
            g.fill_uniform_f32(&mut v, -1.0, 1.0);
            v
        };
        let mut adapters = vec![w.adapter.clone()];
        for _ in 1..k {
            adapters.push(Adapter::new(draw(r), draw(m))?.with_bias(draw(m))?);
        }
        let bank = AdapterBank::new(&adapters)?;
        // Runs: rows t * K / T .. of adapter 0, then 1, ...; interleaved: row t uses t % K.
        let adapter_of = |i: usize| if runs { i * k / t.max(1) } else { i % k };
        let rows: Vec<i32> = (0..t).map(|i| adapter_of(i) as i32).collect();
        let rows_of = (0..k).map(|a| (0..t).filter(|&i| adapter_of(i) == a).collect()).collect();
        Ok(Self {
            w,
            adapters,
            bank,
            rows,
            rows_of,
            xk: buffer("x gathered per adapter", t, n, T::default())?,
            yk: buffer("y gathered per adapter", t, m, T::default())?,
            dense: DenseBuffers::default(),
        })
    }

    fn single(&mut self) -> vera_kernels::Result<()> {
        self.w.fused()
    }

    fn mixed(&mut self) -> vera_kernels::Result<()> {
        let Shape { t, n, m, .. } = self.w.shape;
        let x = MatRef::from_slice(&self.w.x, t, n)?;
        let y = MatMut::from_slice(&mut self.w.y, t, m)?;
        forward_mixed(&self.w.projections, &self.bank, &self.rows, x, y, Mode::Accumulate)
    }

    /// Per adapter: gather its rows, run `f` on them (accumulating into the gathered `y`), scatter.
    fn per_adapter(&mut self, f: fn(&mut Self, usize, usize) -> vera_kernels::Result<()>) -> vera_kernels::Result<()> {
        let Shape { n, m, .. } = self.w.shape;
        for k in 0..self.adapters.len() {
            let tk = self.rows_of[k].len();
            if tk == 0 {
                continue;
            }
            for (j, &row) in self.rows_of[k].iter().enumerate() {
                self.xk[j * n..(j + 1) * n].copy_from_slice(&self.w.x[row * n..(row + 1) * n]);
                self.yk[j * m..(j + 1) * m].copy_from_slice(&self.w.y[row * m..(row + 1) * m]);
            }
            f(self, k, tk)?;
            for (j, &row) in self.rows_of[k].iter().enumerate() {
                self.w.y[row * m..(row + 1) * m].copy_from_slice(&self.yk[j * m..(j + 1) * m]);
            }
        }
        Ok(())
    }

    fn looped(&mut self) -> vera_kernels::Result<()> {
        self.per_adapter(|s, k, tk| {
            let Shape { n, m, .. } = s.w.shape;
            let x = MatRef::from_slice(&s.xk[..tk * n], tk, n)?;
            let y = MatMut::from_slice(&mut s.yk[..tk * m], tk, m)?;
            forward(&s.w.projections, &s.adapters[k], x, y, Mode::Accumulate)
        })
    }

    fn dense(&mut self) -> vera_kernels::Result<()> {
        self.per_adapter(|s, k, tk| {
            let Shape { n, m, .. } = s.w.shape;
            let x = MatRef::from_slice(&s.xk[..tk * n], tk, n)?;
            let y = MatMut::from_slice(&mut s.yk[..tk * m], tk, m)?;
            dense_forward(&s.w.projections, &s.adapters[k], x, y, Mode::Accumulate, &mut s.dense)
        })
    }
}

fn run_typed<T: Element>(shape: Shape, s: Setup) -> vera_kernels::Result<MixedRow> {
    let mut w = MixedWorkload::<T>::new(shape, s.adapters, s.runs)?;
    let methods: [Method<MixedWorkload<T>>; 3] = [MixedWorkload::single, MixedWorkload::mixed, MixedWorkload::looped];
    let ms = interleaved_medians(&mut w, &methods, s.budget, 5)?;
    let dense_ms =
        if s.dense { Some(interleaved_medians(&mut w, &[MixedWorkload::dense], s.budget, 3)?[0]) } else { None };
    Ok(MixedRow {
        shape,
        adapters: s.adapters,
        runs: s.runs,
        dtype: T::DTYPE,
        threads: s.threads,
        isa: active_isa::<T>().name().to_string(),
        single_ms: ms[0],
        mixed_ms: ms[1],
        loop_ms: ms[2],
        dense_ms,
    })
}

/// Measures one case on the current rayon pool.
pub fn run(shape: Shape, dtype: DType, setup: Setup) -> vera_kernels::Result<MixedRow> {
    with_element_type!(dtype, T => run_typed::<T>(shape, setup))
}
