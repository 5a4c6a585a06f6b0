//! One benchmark case: a layer shape, its inputs, and the three ways to compute it (fused, dense
//! baseline, unfused). Shared by `vera bench` and `benches/forward.rs` so both time the same thing.

use std::fmt;
use std::str::FromStr;

use vera_kernels::baseline::{dense_backward, dense_forward, unfused_backward, unfused_forward, DenseBuffers};
use vera_kernels::rng::TorchCpuGenerator;
use vera_kernels::{
    backward, forward, forward_train, Adapter, Element, Error, Gradients, MatMut, MatRef, Mode, Projections,
};

/// `T` tokens through a layer with `n` inputs, `m` outputs and VeRA rank `r`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    pub t: usize,
    pub n: usize,
    pub m: usize,
    pub r: usize,
}

/// The default suite: decode (T = 1, 8) and prefill (T = 512) shapes of 7B-class layers, plus a
/// small-layer, large-rank case.
pub const DEFAULT_SUITE: [Shape; 6] = [
    Shape { t: 1, n: 4096, m: 4096, r: 256 },
    Shape { t: 8, n: 4096, m: 4096, r: 1024 },
    Shape { t: 512, n: 4096, m: 4096, r: 256 },
    Shape { t: 512, n: 4096, m: 4096, r: 1024 },
    Shape { t: 512, n: 4096, m: 11008, r: 256 },
    Shape { t: 512, n: 768, m: 768, r: 1024 },
];

impl Shape {
    /// FLOPs of the fused path: `2·T·r·(n + m)`.
    pub fn fused_flops(&self) -> f64 {
        2.0 * self.t as f64 * self.r as f64 * (self.n + self.m) as f64
    }

    /// The case name used in tables and JSON.
    pub fn name(&self) -> String {
        format!("t{}_n{}_m{}_r{}", self.t, self.n, self.m, self.r)
    }
}

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{},{},{},{}", self.t, self.n, self.m, self.r)
    }
}

impl FromStr for Shape {
    type Err = String;

    /// Parses `T,n,m,r` (all at least 1).
    fn from_str(s: &str) -> Result<Self, String> {
        let parts: Vec<&str> = s.split(',').map(str::trim).collect();
        if parts.len() != 4 {
            return Err(format!("expected T,n,m,r (four comma-separated sizes), got {s:?}"));
        }
        let mut v = [0usize; 4];
        for (slot, p) in v.iter_mut().zip(&parts) {
            *slot = p.parse().map_err(|_| format!("{p:?} in {s:?} is not a non-negative integer"))?;
            if *slot == 0 {
                return Err(format!("every size in {s:?} must be at least 1"));
            }
        }
        Ok(Shape { t: v[0], n: v[1], m: v[2], r: v[3] })
    }
}

/// `rows · cols` copies of `value`: a shape typed on the command line that does not fit in memory
/// is an `Err` naming the buffer, not an aborted process.
pub fn buffer<V: Clone>(what: &'static str, rows: usize, cols: usize, value: V) -> vera_kernels::Result<Vec<V>> {
    let len = rows.checked_mul(cols).ok_or(Error::SizeOverflow { what })?;
    let bytes = len.checked_mul(size_of::<V>()).ok_or(Error::SizeOverflow { what })?;
    let mut v = Vec::new();
    v.try_reserve_exact(len).map_err(|_| Error::OutOfMemory { what, bytes })?;
    v.resize(len, value);
    Ok(v)
}

/// Inputs and buffers of one case in element type `T`.
pub struct Workload<T> {
    pub shape: Shape,
    pub projections: Projections<T>,
    pub adapter: Adapter,
    pub x: Vec<T>,
    pub y: Vec<T>,
    dense: DenseBuffers<T>,
    h: Vec<f32>,
    /// The upstream gradient and the gradient buffers of the training step.
    dy: Vec<T>,
    grads: (Vec<f32>, Vec<f32>, Vec<f32>, Vec<T>),
    /// The unfused backward's `v` and `g`.
    unfused: Vec<f32>,
}

impl<T: Element> Workload<T> {
    /// Random inputs (PEFT-seeded projections, uniform activations and lambdas). The dense
    /// baseline's `[m, n]` ΔW is allocated on its first call.
    pub fn new(shape: Shape) -> vera_kernels::Result<Self> {
        let Shape { t, n, m, r } = shape;
        let projections = Projections::<T>::from_seed(0, r, n, m)?;
        let mut g = TorchCpuGenerator::manual_seed(1);
        let mut draw = |what: &'static str, rows: usize, cols: usize| -> vera_kernels::Result<Vec<f32>> {
            let mut v = buffer(what, rows, cols, 0.0f32)?;
            g.fill_uniform_f32(&mut v, -1.0, 1.0);
            Ok(v)
        };
        let adapter = Adapter::new(draw("lambda_d", 1, r)?, draw("lambda_b", 1, m)?)?.with_bias(draw("bias", 1, m)?)?;
        let x = draw("x = [T, n]", t, n)?.into_iter().map(T::from_f32).collect();
        let y = draw("y = [T, m]", t, m)?.into_iter().map(T::from_f32).collect();
        let dy = draw("dy = [T, m]", t, m)?.into_iter().map(T::from_f32).collect();
        let grads = (vec![0.0; r], vec![0.0; m], vec![0.0; m], buffer("dx = [T, n]", t, n, T::default())?);
        let h = buffer("h = [T, r]", t, r, 0.0)?;
        Ok(Self {
            shape,
            projections,
            adapter,
            x,
            y,
            dense: DenseBuffers::default(),
            h,
            dy,
            grads,
            unfused: Vec::new(),
        })
    }

    /// The upstream gradient `dy [T, m]` the training step takes (the GPU bench uploads it).
    // Only `vera bench --device cuda` reads it: unused without feature cuda, and in
    // benches/forward.rs, which shares this file.
    #[allow(dead_code)]
    pub fn dy(&self) -> &[T] {
        &self.dy
    }

    /// The fused kernel, accumulating into y.
    pub fn fused(&mut self) -> vera_kernels::Result<()> {
        let Shape { t, n, m, .. } = self.shape;
        let x = MatRef::from_slice(&self.x, t, n)?;
        forward(&self.projections, &self.adapter, x, MatMut::from_slice(&mut self.y, t, m)?, Mode::Accumulate)
    }

    /// Dense baseline: form ΔW, then `y += x·ΔWᵀ + bias`.
    pub fn dense(&mut self) -> vera_kernels::Result<()> {
        let Shape { t, n, m, .. } = self.shape;
        let x = MatRef::from_slice(&self.x, t, n)?;
        let y = MatMut::from_slice(&mut self.y, t, m)?;
        dense_forward(&self.projections, &self.adapter, x, y, Mode::Accumulate, &mut self.dense)
    }

    /// The training forward: the fused forward, saving `h` for the backward.
    pub fn forward_train(&mut self) -> vera_kernels::Result<()> {
        let Shape { t, n, m, r } = self.shape;
        let x = MatRef::from_slice(&self.x, t, n)?;
        let y = MatMut::from_slice(&mut self.y, t, m)?;
        forward_train(&self.projections, &self.adapter, x, y, Mode::Accumulate, MatMut::from_slice(&mut self.h, t, r)?)
    }

    /// The backward pass: every gradient (λ, bias, the adapter's dx), reusing `h` from the
    /// training forward when `saved_h`, else recomputing it.
    fn backward_with(&mut self, saved_h: bool) -> vera_kernels::Result<()> {
        let Shape { t, n, m, r } = self.shape;
        let x = MatRef::from_slice(&self.x, t, n)?;
        let dy = MatRef::from_slice(&self.dy, t, m)?;
        let h = if saved_h { Some(MatRef::from_slice(&self.h, t, r)?) } else { None };
        let (dld, dlb, dbias, dx) = &mut self.grads;
        let grads = Gradients::new(dld, dlb).with_bias(dbias).with_x(MatMut::from_slice(dx, t, n)?);
        backward(&self.projections, &self.adapter, x, dy, h, grads, Mode::Overwrite)
    }

    /// The backward pass alone, with the `h` the last training forward saved.
    pub fn backward(&mut self) -> vera_kernels::Result<()> {
        self.backward_with(true)
    }

    /// The unfused backward peer (`v` and `g` materialised), with the `h` the last training forward
    /// saved: every gradient, as [`Workload::backward`].
    pub fn backward_unfused(&mut self) -> vera_kernels::Result<()> {
        let Shape { t, n, m, r } = self.shape;
        let x = MatRef::from_slice(&self.x, t, n)?;
        let dy = MatRef::from_slice(&self.dy, t, m)?;
        let h = MatRef::from_slice(&self.h, t, r)?;
        let (dld, dlb, dbias, dx) = &mut self.grads;
        let grads = Gradients::new(dld, dlb).with_bias(dbias).with_x(MatMut::from_slice(dx, t, n)?);
        unfused_backward(&self.projections, &self.adapter, x, dy, h, grads, Mode::Overwrite, &mut self.unfused)
    }

    /// One training step of the dense baseline: form ΔW, `y += x·ΔWᵀ + bias`, then the gradients
    /// through ΔW (`baseline::dense_backward`, which forms ΔW again in the layout `dx` reads).
    pub fn train_step_dense(&mut self) -> vera_kernels::Result<()> {
        self.dense()?;
        let Shape { t, n, m, .. } = self.shape;
        let x = MatRef::from_slice(&self.x, t, n)?;
        let dy = MatRef::from_slice(&self.dy, t, m)?;
        let (dld, dlb, dbias, dx) = &mut self.grads;
        let grads = Gradients::new(dld, dlb).with_bias(dbias).with_x(MatMut::from_slice(dx, t, n)?);
        dense_backward(&self.projections, &self.adapter, x, dy, grads, Mode::Overwrite, &mut self.dense)
    }

    /// One training step: the training forward, then the backward reusing its `h`.
    pub fn train_step(&mut self) -> vera_kernels::Result<()> {
        self.forward_train()?;
        self.backward_with(true)
    }

    /// One training step that saves nothing: the forward, then the backward recomputing `h`.
    pub fn train_step_recompute(&mut self) -> vera_kernels::Result<()> {
        self.fused()?;
        self.backward_with(false)
    }

    /// Unfused peer: three passes with `h` materialised.
    pub fn unfused(&mut self) -> vera_kernels::Result<()> {
        let Shape { t, n, m, r } = self.shape;
        let x = MatRef::from_slice(&self.x, t, n)?;
        let h = MatMut::from_slice(&mut self.h, t, r)?;
        unfused_forward(
            &self.projections,
            &self.adapter,
            x,
            h,
            MatMut::from_slice(&mut self.y, t, m)?,
            Mode::Accumulate,
        )
    }
}
