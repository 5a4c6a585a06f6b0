//! candle integration (cargo feature `candle`): [`VeraLinear`], a [`candle_nn::Module`] that wraps a
//! candle [`Linear`] and adds the VeRA adapter path computed by this crate's fused kernels, for
//! inference and for training.
//!
//! `y = base + lambda_b ⊙ ((lambda_d ⊙ (x·Aᵀ))·Bᵀ) (+ bias)` for `f32`, `f16` and `bf16` tensors on
//! the CPU. This module runs the crate's CPU kernels only: tensors on other devices get a candle
//! error. (The crate's CUDA backend, `vera_kernels::cuda` with feature `cuda`, works on its own
//! device buffers and is not wired into candle's CUDA storage.)
//!
//! Both paths of a layer accumulate the adapter's output into a copy of the base layer's output in
//! one pass, with the same kernels and so the same numbers:
//!
//! - **inference** (a frozen layer, and neither its input nor its base weights carry a gradient
//!   graph): a custom op with no backward; no graph is kept;
//! - **training** ([`VeraLinear::into_trainable`] made `lambda_d`, `lambda_b` and the adapter's
//!   bias candle [`Var`]s, or the input or the base weights carry a graph): a differentiable custom
//!   op over `(x, base output, cat(lambda_d, lambda_b[, bias]))` whose forward keeps `h = x·Aᵀ`
//!   ([`forward_train`]) and whose backward is the crate's fused [`backward`], giving the vectors'
//!   gradients and the adapter's part of `dx`; the base output's gradient passes through to
//!   candle's Linear, so the frozen part of `dx` (and the base weights' gradient, when they are
//!   Vars) comes from candle. `loss.backward()` reaches the Vars, and any candle-nn optimizer
//!   trains them.
//!
//! [`to_peft_adapter`] collects trained layers into a [`PeftAdapter`] that
//! [`save`](PeftAdapter::save) writes as a PEFT directory.
//!
//! The projections are shared by every layer of a model, as in PEFT: build one
//! [`VeraProjections`] per adapter and hand it to each layer.
//!
//! ```
//! use std::sync::Arc;
//! use candle_core::{Device, Tensor};
//! use candle_nn::{Linear, Module};
//! use vera_kernels::candle::{VeraLinear, VeraProjections};
//! use vera_kernels::peft::PeftAdapter;
//!
//! let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/peft-vera-mlp/adapter");
//! let adapter = PeftAdapter::load(dir)?;
//! let projections = Arc::new(VeraProjections::from_peft(&adapter, None)?);
//! // The base model's layers.0: 48 -> 40.
//! let base = Linear::new(Tensor::zeros((40, 48), candle_core::DType::F32, &Device::Cpu)?, None);
//! let layer = VeraLinear::from_peft(base, &adapter, "layers.0", projections)?;
//! let x = Tensor::ones((2, 7, 48), candle_core::DType::F32, &Device::Cpu)?;
//! assert_eq!(layer.forward(&x)?.dims(), &[2, 7, 40]);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Training the same layer's vectors with plain SGD:
//!
//! ```
//! # use std::sync::Arc;
//! # use candle_core::{Device, Tensor};
//! # use candle_nn::{Linear, Module};
//! # use vera_kernels::candle::{VeraLinear, VeraProjections};
//! # use vera_kernels::peft::PeftAdapter;
//! use candle_nn::{Optimizer, SGD};
//!
//! # let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/peft-vera-mlp/adapter");
//! # let adapter = PeftAdapter::load(dir)?;
//! # let projections = Arc::new(VeraProjections::from_peft(&adapter, None)?);
//! # let base = Linear::new(Tensor::zeros((40, 48), candle_core::DType::F32, &Device::Cpu)?, None);
//! let layer = VeraLinear::from_peft(base, &adapter, "layers.0", projections)?.into_trainable()?;
//! let mut sgd = SGD::new(layer.trainable_vars(), 0.05)?;
//! let x = Tensor::ones((4, 48), candle_core::DType::F32, &Device::Cpu)?;
//! let target = Tensor::zeros((4, 40), candle_core::DType::F32, &Device::Cpu)?;
//! let loss = candle_nn::loss::mse(&layer.forward(&x)?, &target)?;
//! sgd.backward_step(&loss)?;
//! let trained = layer.trained_adapter()?; // the updated lambda_d and lambda_b
//! assert_ne!(trained.lambda_b(), adapter.module("layers.0")?.adapter().lambda_b());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Device, Layout, Shape, Storage, Tensor, Var};
use candle_nn::{Linear, Module};
use half::{bf16, f16};

use crate::adapter::Adapter;
use crate::dtype::{DType, Element};
use crate::error::Error;
use crate::mat::{MatMut, MatRef};
use crate::ops::{backward, forward, forward_train, Gradients};
use crate::peft::{PeftAdapter, ProjectionSizes, Tensor as PeftTensor, VeraConfig, VeraModule};
use crate::projections::Projections;
use crate::types::Mode;
use crate::with_element_type;

/// A candle error carrying this crate's [`Error`] (its message is the error's).
fn wrap(e: Error) -> candle_core::Error {
    candle_core::Error::wrap(e)
}

/// A candle error for a misuse this module detects itself, its message prefixed with `vera: `.
fn misuse(message: impl std::fmt::Display) -> candle_core::Error {
    candle_core::Error::Msg(format!("vera: {message}"))
}

// --- Storage: candle CPU storage read as this crate's element slices, with a candle error (never a
// panic) for any storage the kernels cannot take.

/// A contiguous tensor's elements as a slice of `T`.
fn elements<'a, T: candle_core::WithDType>(
    storage: &'a CpuStorage,
    layout: &Layout,
    what: &str,
) -> candle_core::Result<&'a [T]> {
    let (start, end) = layout.contiguous_offsets().ok_or_else(|| misuse(format!("{what} must be contiguous")))?;
    storage.as_slice::<T>()?.get(start..end).ok_or_else(|| misuse(format!("{what} out of range")))
}

/// This crate's element type for a candle dtype, or an error naming `what` for any other dtype.
fn element_dtype(what: &str, dtype: candle_core::DType) -> candle_core::Result<DType> {
    match dtype {
        candle_core::DType::F32 => Ok(DType::F32),
        candle_core::DType::F16 => Ok(DType::F16),
        candle_core::DType::BF16 => Ok(DType::BF16),
        other => Err(misuse(format!("{what} has dtype {other:?}: expected f32, f16 or bf16"))),
    }
}

/// [`element_dtype`] of a storage.
fn storage_dtype(what: &str, s: &CpuStorage) -> candle_core::Result<DType> {
    element_dtype(what, s.dtype())
}

/// The CPU storage behind a tensor's storage guard, or an error naming `what`.
fn cpu<'a>(storage: &'a Storage, what: &str) -> candle_core::Result<&'a CpuStorage> {
    match storage {
        Storage::Cpu(s) => Ok(s),
        _ => Err(misuse(format!("{what} is not on the CPU, the only device this module runs on"))),
    }
}

/// A one-dimensional f32 vector of `len` elements (one of an adapter's vectors) from an op's
/// argument storage.
fn f32_vector<'a>(storage: &'a CpuStorage, layout: &Layout, what: &str, len: usize) -> candle_core::Result<&'a [f32]> {
    if storage.dtype() != candle_core::DType::F32 {
        return Err(misuse(format!("{what} has dtype {:?}: expected f32", storage.dtype())));
    }
    if layout.shape().dims() != [len] {
        return Err(misuse(format!("{what} has shape {:?}, expected [{len}]", layout.shape().dims())));
    }
    elements::<f32>(storage, layout, what)
}

/// The values of a one-dimensional f32 tensor of `len` elements (one of an adapter's vectors).
fn f32_values(t: &Tensor, what: &str, len: usize) -> candle_core::Result<Vec<f32>> {
    let (storage, layout) = t.storage_and_layout();
    Ok(f32_vector(cpu(&storage, what)?, layout, what, len)?.to_vec())
}

/// A candle error for a tensor that is not on the CPU, the only device this module runs on.
fn check_cpu(x: &Tensor) -> candle_core::Result<()> {
    if x.device().is_cpu() {
        Ok(())
    } else {
        Err(misuse(format!(
            "VeraLinear runs on the CPU only (x is on {:?}); vera-kernels' CUDA backend is not wired into candle",
            x.device().location()
        )))
    }
}

// --- Projections: the shared projections of one adapter, in every dtype a layer may be called with.

/// The shared projections of one adapter, in every dtype a layer may be called with: f32, and
/// f16 / bf16 rounded from it the first time they are needed (PEFT casts the projections to the
/// activation dtype in the same way).
#[derive(Debug)]
pub struct VeraProjections {
    f32: Projections<f32>,
    f16: OnceLock<Projections<f16>>,
    bf16: OnceLock<Projections<bf16>>,
}

impl VeraProjections {
    /// Wraps f32 projections.
    pub fn new(projections: Projections<f32>) -> Self {
        Self { f32: projections, f16: OnceLock::new(), bf16: OnceLock::new() }
    }

    /// The projections of a PEFT adapter: the saved ones, or those drawn from its seed with
    /// `sizes` (see [`PeftAdapter::projections`]).
    ///
    /// Errors: those of [`PeftAdapter::projections`], as candle errors.
    pub fn from_peft(adapter: &PeftAdapter, sizes: Option<ProjectionSizes>) -> candle_core::Result<Self> {
        Ok(Self::new(adapter.projections::<f32>(sizes).map_err(wrap)?))
    }

    /// The f32 projections.
    pub fn f32(&self) -> &Projections<f32> {
        &self.f32
    }

    /// The projections in element type `T`.
    fn get<T: Element>(&self) -> &Projections<T> {
        // The sealed Element has exactly these three types; `Any` picks the one asked for.
        let any: &dyn std::any::Any = match T::DTYPE {
            crate::DType::F32 => &self.f32,
            crate::DType::F16 => self.f16.get_or_init(|| self.f32.to_dtype()),
            crate::DType::BF16 => self.bf16.get_or_init(|| self.f32.to_dtype()),
        };
        any.downcast_ref::<Projections<T>>().unwrap_or_else(|| unreachable!("Element::DTYPE matches the type"))
    }
}

// --- Layer: what both custom ops know about a layer, its projections and its in/out features.

/// One layer's shape and the shared projections it slices.
#[derive(Debug)]
struct Layer {
    projections: Arc<VeraProjections>,
    in_features: usize,
    out_features: usize,
}

impl Layer {
    /// The rank of the projections.
    fn rank(&self) -> usize {
        self.projections.f32().rank()
    }

    /// `x [..., in_features]` → `(T, [..., out_features])`: the rows the kernels see and the
    /// shape of the layer's output.
    fn rows(&self, x: &Layout) -> candle_core::Result<(usize, Vec<usize>)> {
        match x.shape().dims().split_last() {
            Some((&n, lead)) if n == self.in_features => {
                let mut out = lead.to_vec();
                out.push(self.out_features);
                Ok((lead.iter().product(), out))
            }
            _ => Err(misuse(format!(
                "x has shape {:?}, expected [..., {}] (the layer's in_features)",
                x.shape().dims(),
                self.in_features
            ))),
        }
    }
}

/// `rows · cols`, the length of a new `[rows, cols]` buffer, or a candle error on overflow.
fn buffer_len(what: &'static str, rows: usize, cols: usize) -> candle_core::Result<usize> {
    rows.checked_mul(cols).ok_or_else(|| wrap(Error::SizeOverflow { what }))
}

/// Checks the base output of a layer op: the output's shape, x's dtype.
fn check_base(xs: &CpuStorage, (bs, bl): (&CpuStorage, &Layout), dims: &[usize]) -> candle_core::Result<()> {
    if bl.shape().dims() != dims {
        return Err(misuse(format!("the base layer's output has shape {:?}, expected {dims:?}", bl.shape().dims())));
    }
    if bs.dtype() != xs.dtype() {
        return Err(misuse(format!(
            "x ({:?}) and the base output ({:?}) must have the same dtype",
            xs.dtype(),
            bs.dtype()
        )));
    }
    Ok(())
}

// --- The inference path: the adapter as a custom op with no backward, accumulating into a copy of
// the base layer's output in one pass (no graph is kept, nothing is saved for a backward).

/// The adapter path of one frozen layer as a candle custom op: on `x` alone (the adapter's
/// contribution, [`CustomOp1`]) or on `x` and the base output (their sum, [`CustomOp2`]).
#[derive(Debug)]
struct VeraOp {
    layer: Arc<Layer>,
    adapter: Arc<Adapter>,
}

impl VeraOp {
    /// `adapter(x)` for `x [t, n]`: accumulated into a copy of `base` when given, else alone.
    fn run<T: Element + candle_core::WithDType>(
        &self,
        x: &[T],
        t: usize,
        base: Option<&[T]>,
    ) -> candle_core::Result<Vec<T>> {
        let (n, m) = (self.layer.in_features, self.layer.out_features);
        let projections = self.layer.projections.get::<T>();
        let (mut y, mode) = match base {
            Some(b) => (b.to_vec(), Mode::Accumulate),
            None => (vec![T::default(); buffer_len("y [T, out_features]", t, m)?], Mode::Overwrite),
        };
        let x = MatRef::from_slice(x, t, n).map_err(wrap)?;
        let y_view = MatMut::from_slice(&mut y, t, m).map_err(wrap)?;
        forward(projections, &self.adapter, x, y_view, mode).map_err(wrap)?;
        Ok(y)
    }

    /// [`VeraOp::run`] on candle storage: `x` (and the base output, when given) read as `T`, the
    /// result stored as `T`.
    fn run_storage<T: Element + candle_core::WithDType>(
        &self,
        (xs, xl): (&CpuStorage, &Layout),
        t: usize,
        base: Option<(&CpuStorage, &Layout)>,
    ) -> candle_core::Result<CpuStorage> {
        let x = elements::<T>(xs, xl, "x")?;
        let base = base.map(|(bs, bl)| elements::<T>(bs, bl, "the base output")).transpose()?;
        Ok(T::to_cpu_storage_owned(self.run(x, t, base)?))
    }
}

impl CustomOp1 for VeraOp {
    fn name(&self) -> &'static str {
        "vera-adapter"
    }

    /// The adapter's contribution alone.
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (t, dims) = self.layer.rows(l)?;
        let dtype = storage_dtype("x", s)?;
        let storage = with_element_type!(dtype, T => self.run_storage::<T>((s, l), t, None)?);
        Ok((storage, Shape::from(dims)))
    }
}

impl CustomOp2 for VeraOp {
    fn name(&self) -> &'static str {
        "vera-linear"
    }

    /// `base + adapter(x)`, accumulated into a copy of `base`.
    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (t, dims) = self.layer.rows(xl)?;
        check_base(xs, (bs, bl), &dims)?;
        let dtype = storage_dtype("x", xs)?;
        let storage = with_element_type!(dtype, T => self.run_storage::<T>((xs, xl), t, Some((bs, bl)))?);
        Ok((storage, Shape::from(dims)))
    }
}

// --- The training path: the adapter as a differentiable custom op, its forward the crate's
// `forward_train` and its backward the fused `backward`. The adapter's vectors come in as one f32
// tensor, `cat(lambda_d, lambda_b[, bias])`, made by candle from the Vars (its backward splits
// the gradient back onto them), so that the op needs at most three arguments: `(x, base, vectors)`
// for a layer, accumulating into a copy of the base layer's output in one pass as the inference
// path does (and so with the same numbers), or `(x, vectors)` for the adapter's contribution alone.

/// The gradients of one backward call, each `None` for an argument that carries no gradient graph.
type Grads2 = (Option<Tensor>, Option<Tensor>);
/// As [`Grads2`], for the three arguments of the layer form.
type Grads3 = (Option<Tensor>, Option<Tensor>, Option<Tensor>);

/// One forward call of a layer's adapter path with a backward: [`CustomOp3`] on
/// `(x, base output, vectors)`, [`CustomOp2`] on `(x, vectors)`. A fresh op is made per call (candle
/// keeps it in the graph until the output is dropped), so that it can hold that call's
/// `h = x·Aᵀ` for its backward.
struct TrainOp {
    layer: Arc<Layer>,
    /// Whether the vectors end with the adapter's bias.
    has_bias: bool,
    /// `h [T, r]` (f32) of this call's forward: all the backward needs besides its arguments;
    /// `T·r·4` bytes, kept as long as the graph is.
    saved_h: OnceLock<Vec<f32>>,
}

impl TrainOp {
    /// A fresh op for one forward call of `layer`, whose vectors hold a bias when `has_bias`.
    fn new(layer: Arc<Layer>, has_bias: bool) -> Self {
        Self { layer, has_bias, saved_h: OnceLock::new() }
    }

    /// The length of the vectors argument: `r + m`, and `m` more with a bias.
    fn vectors_len(&self) -> usize {
        let m = self.layer.out_features;
        self.layer.rank() + m + if self.has_bias { m } else { 0 }
    }

    /// The adapter the kernels take, from `cat(lambda_d, lambda_b[, bias])`.
    fn adapter(&self, vectors: &[f32]) -> candle_core::Result<Adapter> {
        let (r, m) = (self.layer.rank(), self.layer.out_features);
        let (lambda_d, rest) =
            vectors.split_at_checked(r).ok_or_else(|| misuse("the adapter's vectors are too short"))?;
        let (lambda_b, bias) = rest.split_at_checked(m).ok_or_else(|| misuse("the adapter's vectors are too short"))?;
        let adapter = Adapter::new(lambda_d.to_vec(), lambda_b.to_vec()).map_err(wrap)?;
        match self.has_bias {
            true => adapter.with_bias(bias.to_vec()).map_err(wrap),
            false => Ok(adapter),
        }
    }

    /// The op's output `[T, m]` in `T` (the adapter's contribution, added to a copy of `base`
    /// when given) and `h [T, r]`.
    fn forward<T: Element + candle_core::WithDType>(
        &self,
        x: &[T],
        t: usize,
        base: Option<&[T]>,
        adapter: &Adapter,
    ) -> candle_core::Result<(CpuStorage, Vec<f32>)> {
        let (n, m, r) = (self.layer.in_features, self.layer.out_features, self.layer.rank());
        let (mut y, mode) = match base {
            Some(b) => (b.to_vec(), Mode::Accumulate),
            None => (vec![T::default(); buffer_len("y [T, out_features]", t, m)?], Mode::Overwrite),
        };
        let mut h = vec![0.0f32; buffer_len("h [T, r]", t, r)?];
        forward_train(
            self.layer.projections.get::<T>(),
            adapter,
            MatRef::from_slice(x, t, n).map_err(wrap)?,
            MatMut::from_slice(&mut y, t, m).map_err(wrap)?,
            mode,
            MatMut::from_slice(&mut h, t, r).map_err(wrap)?,
        )
        .map_err(wrap)?;
        Ok((T::to_cpu_storage_owned(y), h))
    }

    /// The forward of either form on candle storage; `base` (the layer form) must have the
    /// output's shape and x's dtype.
    fn cpu_forward(
        &self,
        (xs, xl): (&CpuStorage, &Layout),
        base: Option<(&CpuStorage, &Layout)>,
        (vs, vl): (&CpuStorage, &Layout),
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (t, dims) = self.layer.rows(xl)?;
        if let Some((bs, bl)) = base {
            check_base(xs, (bs, bl), &dims)?;
        }
        let adapter = self.adapter(f32_vector(vs, vl, "the adapter's vectors", self.vectors_len())?)?;
        let dtype = storage_dtype("x", xs)?;
        let (storage, h) = with_element_type!(dtype, T => {
            let base = base.map(|(bs, bl)| elements::<T>(bs, bl, "the base output")).transpose()?;
            self.forward::<T>(elements::<T>(xs, xl, "x")?, t, base, &adapter)?
        });
        // A fresh op per call: the cell is empty, and a second forward of the same op (which candle
        // does not make) would only keep the first h, for the same x.
        let _ = self.saved_h.set(h);
        Ok((storage, Shape::from(dims)))
    }

    /// The fused backward for `x` and `dy` in `T`: the vectors' gradient
    /// `cat(dlambda_d, dlambda_b[, dbias])` and, when `want_dx`, the adapter's part of `dx`.
    fn backward<T: Element + candle_core::WithDType>(
        &self,
        x: &Tensor,
        dy: &Tensor,
        adapter: &Adapter,
        want_dx: bool,
    ) -> candle_core::Result<(Vec<f32>, Option<Tensor>)> {
        let (n, m, r) = (self.layer.in_features, self.layer.out_features, self.layer.rank());
        let (t, _) = self.layer.rows(x.layout())?;
        let (x_storage, x_layout) = x.storage_and_layout();
        let x_values = elements::<T>(cpu(&x_storage, "x")?, x_layout, "x")?;
        let (dy_storage, dy_layout) = dy.storage_and_layout();
        let dy_values = elements::<T>(cpu(&dy_storage, "the output's gradient")?, dy_layout, "the output's gradient")?;

        let mut dvectors = vec![0.0f32; self.vectors_len()];
        let (dld, rest) = dvectors.split_at_mut(r);
        let (dlb, dbias) = rest.split_at_mut(m);
        let mut dx = vec![T::default(); if want_dx { buffer_len("dx [T, in_features]", t, n)? } else { 0 }];
        let mut grads = Gradients::new(dld, dlb);
        if self.has_bias {
            grads = grads.with_bias(dbias);
        }
        if want_dx {
            grads = grads.with_x(MatMut::from_slice(&mut dx, t, n).map_err(wrap)?);
        }
        let saved_h = self.saved_h.get().map(|h| MatRef::from_slice(h, t, r)).transpose().map_err(wrap)?;
        backward(
            self.layer.projections.get::<T>(),
            adapter,
            MatRef::from_slice(x_values, t, n).map_err(wrap)?,
            MatRef::from_slice(dy_values, t, m).map_err(wrap)?,
            saved_h,
            grads,
            Mode::Overwrite,
        )
        .map_err(wrap)?;
        let dx = want_dx.then(|| Tensor::from_vec(dx, x.shape(), x.device())).transpose()?;
        Ok((dvectors, dx))
    }

    /// The gradients of `x` (the adapter's part) and of the vectors, each only when that argument
    /// carries a gradient graph (a model's input needs no `dx`).
    fn backward_tensors(
        &self,
        x: &Tensor,
        vectors: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Grads2> {
        let adapter = self.adapter(&f32_values(vectors, "the adapter's vectors", self.vectors_len())?)?;
        // candle may hand a strided or broadcast gradient (e.g. from a mean); the kernels read rows.
        let dy = grad_res.contiguous()?;
        if dy.dims() != res.dims() || dy.dtype() != res.dtype() {
            return Err(misuse(format!(
                "the output's gradient is {:?} {:?}, expected {:?} {:?} (the output's)",
                dy.dtype(),
                dy.dims(),
                res.dtype(),
                res.dims()
            )));
        }
        let x = x.contiguous()?;
        let want_dx = x.track_op();
        let dtype = element_dtype("x", x.dtype())?;
        let (dvectors, dx) = with_element_type!(dtype, T => self.backward::<T>(&x, &dy, &adapter, want_dx)?);
        let dvectors = vectors.track_op().then(|| Tensor::from_vec(dvectors, vectors.shape(), vectors.device()));
        Ok((dx, dvectors.transpose()?))
    }
}

impl CustomOp2 for TrainOp {
    fn name(&self) -> &'static str {
        "vera-adapter-train"
    }

    /// The adapter's contribution alone, `lambda_b ⊙ ((lambda_d ⊙ (x·Aᵀ))·Bᵀ) (+ bias)`, for
    /// `x [..., n]` (f32, f16 or bf16) in x's dtype; keeps `h` for the backward.
    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.cpu_forward((xs, xl), None, (vs, vl))
    }

    fn bwd(&self, x: &Tensor, vectors: &Tensor, res: &Tensor, grad_res: &Tensor) -> candle_core::Result<Grads2> {
        self.backward_tensors(x, vectors, res, grad_res)
    }
}

impl CustomOp3 for TrainOp {
    fn name(&self) -> &'static str {
        "vera-linear-train"
    }

    /// `base + adapter(x)`, accumulated into a copy of `base` (the base layer's output, in x's
    /// dtype); keeps `h` for the backward.
    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.cpu_forward((xs, xl), Some((bs, bl)), (vs, vl))
    }

    /// The base output's gradient is the output's (the sum passes it through); candle carries it
    /// on through the base layer.
    fn bwd(
        &self,
        x: &Tensor,
        base: &Tensor,
        vectors: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Grads3> {
        let (dx, dvectors) = self.backward_tensors(x, vectors, res, grad_res)?;
        let dbase = base.track_op().then(|| grad_res.clone());
        Ok((dx, dbase, dvectors))
    }
}

// --- VeraLinear: a candle Linear with a VeRA adapter, frozen (inference) or trainable.

/// The trainable vectors of a [`VeraLinear`] as candle [`Var`]s (f32, whatever the activation
/// dtype): hand [`VeraVars::all`] (or [`VeraLinear::trainable_vars`]) to a candle-nn optimizer.
///
/// Clones of a layer share these Vars: a step of the optimizer updates every clone.
#[derive(Clone, Debug)]
pub struct VeraVars {
    lambda_d: Var,
    lambda_b: Var,
    bias: Option<Var>,
}

impl VeraVars {
    /// Vars holding an adapter's vectors.
    fn new(adapter: &Adapter) -> candle_core::Result<Self> {
        let var = |v: &[f32]| Var::from_slice(v, v.len(), &Device::Cpu);
        Ok(Self {
            lambda_d: var(adapter.lambda_d())?,
            lambda_b: var(adapter.lambda_b())?,
            bias: adapter.bias().map(var).transpose()?,
        })
    }

    /// `lambda_d [r]`.
    pub fn lambda_d(&self) -> &Var {
        &self.lambda_d
    }

    /// `lambda_b [out_features]`.
    pub fn lambda_b(&self) -> &Var {
        &self.lambda_b
    }

    /// The adapter's additive bias `[out_features]`, when the adapter has one.
    pub fn bias(&self) -> Option<&Var> {
        self.bias.as_ref()
    }

    /// Every Var: `lambda_d`, `lambda_b`, then the bias when there is one.
    pub fn all(&self) -> Vec<Var> {
        [&self.lambda_d, &self.lambda_b].into_iter().chain(&self.bias).cloned().collect()
    }

    /// The Vars' tensors, in the order of [`VeraVars::all`].
    fn all_tensors(&self) -> impl Iterator<Item = &Tensor> {
        [&self.lambda_d, &self.lambda_b].into_iter().chain(&self.bias).map(Var::as_tensor)
    }

    /// The Vars' current values as an adapter.
    ///
    /// Errors: a Var that no longer holds `[len]` f32 values (candle's `Var::set` keeps the shape and
    /// the dtype, so this is a candle error rather than a panic for what should not happen).
    fn adapter(&self, r: usize, m: usize) -> candle_core::Result<Adapter> {
        let adapter =
            Adapter::new(f32_values(&self.lambda_d, "lambda_d", r)?, f32_values(&self.lambda_b, "lambda_b", m)?)
                .map_err(wrap)?;
        match &self.bias {
            Some(bias) => adapter.with_bias(f32_values(bias, "bias", m)?).map_err(wrap),
            None => Ok(adapter),
        }
    }
}

/// A candle [`Linear`] with a VeRA adapter: `forward(x) = linear(x) + adapter(x)`, the adapter
/// computed by this crate's fused kernels (CPU, f32 / f16 / bf16).
///
/// A layer is built frozen: its vectors are constants and, unless its input or base weights carry
/// a gradient graph, it runs the inference path (one fused op, no graph; see the
/// [module docs](self)). [`VeraLinear::into_trainable`] makes the vectors candle [`Var`]s that
/// `loss.backward()` reaches; [`VeraLinear::trained_adapter`] reads them back and
/// [`VeraLinear::freeze`] returns to the inference path with the trained values. A frozen layer on
/// an input that carries a graph passes the gradient through to the layers before it.
#[derive(Clone)]
pub struct VeraLinear {
    base: Linear,
    op: Arc<VeraOp>,
    vars: Option<VeraVars>,
}

impl std::fmt::Debug for VeraLinear {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VeraLinear")
            .field("in_features", &self.op.layer.in_features)
            .field("out_features", &self.op.layer.out_features)
            .field("rank", &self.op.adapter.rank())
            .field("trainable", &self.vars.is_some())
            .finish()
    }
}

impl VeraLinear {
    /// Wraps `base` (weight `[out_features, in_features]`, as candle stores it) with `adapter`,
    /// frozen.
    ///
    /// Errors (candle errors carrying this crate's [`Error`]): the weight is not 2-D, the
    /// adapter's rank is not the projections', its `lambda_b` is not `out_features` long, or the
    /// layer is larger than the projections.
    pub fn new(base: Linear, adapter: Adapter, projections: Arc<VeraProjections>) -> candle_core::Result<Self> {
        let (m, n) = base.weight().dims2()?;
        let p = projections.f32();
        p.slice(n, m).map_err(wrap)?;
        if adapter.rank() != p.rank() {
            return Err(wrap(Error::RankMismatch { what: "lambda_d", expected: p.rank(), actual: adapter.rank() }));
        }
        if adapter.out_features() != m {
            return Err(wrap(Error::LengthMismatch {
                what: "lambda_b (must equal the Linear's out_features)",
                expected: m,
                actual: adapter.out_features(),
            }));
        }
        let layer = Arc::new(Layer { projections, in_features: n, out_features: m });
        Ok(Self { base, op: Arc::new(VeraOp { layer, adapter: Arc::new(adapter) }), vars: None })
    }

    /// Wraps `base` with module `module` of a PEFT adapter, frozen.
    ///
    /// Errors: as [`VeraLinear::new`], and [`Error::UnknownModule`].
    pub fn from_peft(
        base: Linear,
        adapter: &PeftAdapter,
        module: &str,
        projections: Arc<VeraProjections>,
    ) -> candle_core::Result<Self> {
        let adapter = adapter.module(module).map_err(wrap)?.adapter().clone();
        Self::new(base, adapter, projections)
    }

    /// The same layer with `lambda_d`, `lambda_b` (and the adapter's bias, when it has one) as f32
    /// candle [`Var`]s starting from the layer's current values; see [`VeraLinear::trainable_vars`].
    /// A layer that is already trainable is returned as it is (its Vars kept).
    ///
    /// Errors: candle's, when a Var cannot be allocated.
    pub fn into_trainable(self) -> candle_core::Result<Self> {
        if self.vars.is_some() {
            return Ok(self);
        }
        let vars = VeraVars::new(&self.op.adapter)?;
        Ok(Self { vars: Some(vars), ..self })
    }

    /// The same layer frozen with its current (trained) vectors: it runs the inference path again,
    /// and its Vars are no longer used. A frozen layer is returned as it is.
    ///
    /// Errors: as [`VeraLinear::trained_adapter`].
    pub fn freeze(self) -> candle_core::Result<Self> {
        if self.vars.is_none() {
            return Ok(self);
        }
        let adapter = self.trained_adapter()?;
        let op = VeraOp { layer: self.op.layer.clone(), adapter: Arc::new(adapter) };
        Ok(Self { base: self.base, op: Arc::new(op), vars: None })
    }

    /// Whether the vectors are candle Vars ([`VeraLinear::into_trainable`]).
    pub fn is_trainable(&self) -> bool {
        self.vars.is_some()
    }

    /// The trainable vectors, when the layer is trainable.
    pub fn vars(&self) -> Option<&VeraVars> {
        self.vars.as_ref()
    }

    /// The Vars to hand to an optimizer: `lambda_d`, `lambda_b` and the bias when there is one;
    /// empty for a frozen layer.
    pub fn trainable_vars(&self) -> Vec<Var> {
        self.vars.as_ref().map(VeraVars::all).unwrap_or_default()
    }

    /// The layer's current vectors: the Vars' values for a trainable layer, the constants of a
    /// frozen one.
    ///
    /// Errors: a Var whose shape or dtype no longer fits the layer.
    pub fn trained_adapter(&self) -> candle_core::Result<Adapter> {
        match &self.vars {
            Some(vars) => vars.adapter(self.op.layer.rank(), self.op.layer.out_features),
            None => Ok(self.op.adapter.as_ref().clone()),
        }
    }

    /// The wrapped base layer.
    pub fn base(&self) -> &Linear {
        &self.base
    }

    /// The shared projections the layer slices.
    pub fn projections(&self) -> &Arc<VeraProjections> {
        &self.op.layer.projections
    }

    /// The vectors the frozen path uses: those the layer was built (or last frozen) with. For a
    /// trainable layer these are its starting values; its current ones are
    /// [`VeraLinear::trained_adapter`].
    pub fn adapter(&self) -> &Adapter {
        &self.op.adapter
    }

    /// The adapter's contribution alone, `lambda_b ⊙ ((lambda_d ⊙ (x·Aᵀ))·Bᵀ) (+ bias)`, for
    /// `x [..., in]`; differentiable when the layer is trainable or `x` carries a gradient graph.
    ///
    /// Errors: a non-CPU tensor, a dtype other than f32 / f16 / bf16, a last dimension that is not
    /// the layer's in_features.
    pub fn adapter_forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        check_cpu(x)?;
        if self.vars.is_some() || x.track_op() {
            self.adapter_with_backward(x)
        } else {
            x.contiguous()?.apply_op1_no_bwd(self.op.as_ref())
        }
    }

    /// Whether a forward of `x` must build a graph: the vectors are Vars, or `x` or the base
    /// layer's weights carry one (the fused no-backward op would cut their gradients).
    fn needs_graph(&self, x: &Tensor) -> bool {
        self.vars.is_some()
            || x.track_op()
            || self.base.weight().track_op()
            || self.base.bias().is_some_and(Tensor::track_op)
    }

    /// The adapter's vectors as the training op's one f32 argument, `cat(lambda_d, lambda_b[, bias])`,
    /// and whether it holds a bias: from the Vars (candle's `cat` carries the gradient back onto
    /// each), or constants for a frozen layer.
    fn vectors(&self) -> candle_core::Result<(Tensor, bool)> {
        match &self.vars {
            Some(v) => {
                let parts: Vec<&Tensor> = v.all_tensors().collect();
                Ok((Tensor::cat(&parts, 0)?, v.bias.is_some()))
            }
            None => {
                let a = &self.op.adapter;
                let values: Vec<f32> = [a.lambda_d(), a.lambda_b(), a.bias().unwrap_or(&[])].concat();
                let len = values.len();
                Ok((Tensor::from_vec(values, len, &Device::Cpu)?, a.bias().is_some()))
            }
        }
    }

    /// The differentiable op of this layer for one call.
    fn train_op(&self, has_bias: bool) -> TrainOp {
        TrainOp::new(self.op.layer.clone(), has_bias)
    }

    /// The adapter's contribution alone through the differentiable op.
    fn adapter_with_backward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (vectors, has_bias) = self.vectors()?;
        x.contiguous()?.apply_op2(&vectors, self.train_op(has_bias))
    }

    /// `linear(x) + adapter(x)` through the differentiable op: the base output from candle's
    /// Linear (so that its gradient flows on to the weights and `x`), the adapter added in one pass.
    fn forward_with_backward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let base = self.base.forward(x)?.contiguous()?;
        let (vectors, has_bias) = self.vectors()?;
        x.contiguous()?.apply_op3(&base, &vectors, self.train_op(has_bias))
    }
}

impl Module for VeraLinear {
    /// `linear(x) + adapter(x)` for `x [..., in_features]`, in x's dtype (f32, f16 or bf16).
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        check_cpu(x)?;
        // Before the base layer runs, so that a wrong width is named as the layer's in_features.
        self.op.layer.rows(x.layout())?;
        if self.needs_graph(x) {
            self.forward_with_backward(x)
        } else {
            let base = self.base.forward(x)?.contiguous()?;
            x.contiguous()?.apply_op2_no_bwd(&base, self.op.as_ref())
        }
    }
}

// --- Export: trained layers back out as a PEFT adapter, which `PeftAdapter::save` writes as the
// directory PEFT's `PeftModel.from_pretrained` loads.

/// A PEFT adapter holding the current vectors of `layers` (see [`VeraLinear::trained_adapter`]),
/// each under its module name (`"layers.0"`, `"model.decoder.layers.3.self_attn.q_proj"`, ...),
/// with `config` (typically the config of the adapter the layers were loaded from).
///
/// The vectors are saved as f32. When `config.save_projection` is true the layers' projections are
/// saved with them; when it is false PEFT will draw them again from `projection_prng_key`, so they
/// must be exactly those.
///
/// ```
/// # use std::sync::Arc;
/// # use candle_core::{Device, Tensor};
/// # use candle_nn::Linear;
/// use vera_kernels::candle::{to_peft_adapter, VeraLinear, VeraProjections};
/// use vera_kernels::peft::PeftAdapter;
///
/// let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/peft-vera-mlp/adapter");
/// let adapter = PeftAdapter::load(dir)?;
/// let projections = Arc::new(VeraProjections::from_peft(&adapter, None)?);
/// let base = Linear::new(Tensor::zeros((40, 48), candle_core::DType::F32, &Device::Cpu)?, None);
/// let layer = VeraLinear::from_peft(base, &adapter, "layers.0", projections)?.into_trainable()?;
/// // ... train ...
/// let trained = to_peft_adapter(adapter.config(), [("layers.0", &layer)])?;
/// assert_eq!(trained.module("layers.0")?.adapter(), &layer.trained_adapter()?);
/// // trained.save("my-adapter")?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// Errors (candle errors): no layers; two layers under one name; a layer whose adapter has a bias
/// (PEFT's VeRA files have no place for it); layers with different projections; a rank that is
/// not `config.r`; `save_projection = false` with projections that are not the seed's; and those of
/// [`PeftAdapter::new`] (e.g. a name that is not one of `config.target_modules`).
pub fn to_peft_adapter<'a>(
    config: &VeraConfig,
    layers: impl IntoIterator<Item = (&'a str, &'a VeraLinear)>,
) -> candle_core::Result<PeftAdapter> {
    let mut modules = BTreeMap::new();
    let mut projections: Option<&Arc<VeraProjections>> = None;
    for (name, layer) in layers {
        let shared = *projections.get_or_insert(layer.projections());
        check_same_projections(shared, layer.projections(), name)?;
        if modules.insert(name.to_string(), module(config, name, layer)?).is_some() {
            return Err(misuse(format!("two layers are named {name:?}; each module needs one name")));
        }
    }
    let projections =
        projections.ok_or_else(|| misuse("no layers to save: a PEFT adapter needs at least one module"))?;
    let saved = saved_projections(config, projections.f32())?;
    PeftAdapter::new(config.clone(), modules, saved).map_err(wrap)
}

/// One layer's vectors as a PEFT module, in f32.
fn module(config: &VeraConfig, name: &str, layer: &VeraLinear) -> candle_core::Result<VeraModule> {
    let adapter = layer.trained_adapter()?;
    if adapter.bias().is_some() {
        return Err(misuse(format!(
            "layer {name:?} has an adapter bias, which a PEFT VeRA adapter cannot hold; \
             save its lambdas without it or keep the bias elsewhere"
        )));
    }
    if adapter.rank() != config.r {
        return Err(misuse(format!("layer {name:?} has rank {}, the config's r is {}", adapter.rank(), config.r)));
    }
    let vector = |v: &[f32]| PeftTensor::new(DType::F32, vec![v.len()], v.to_vec()).map_err(wrap);
    VeraModule::new(vector(adapter.lambda_d())?, vector(adapter.lambda_b())?).map_err(wrap)
}

/// Every layer of one PEFT adapter slices the same projections.
fn check_same_projections(
    first: &Arc<VeraProjections>,
    layer: &Arc<VeraProjections>,
    name: &str,
) -> candle_core::Result<()> {
    if Arc::ptr_eq(first, layer) || first.f32() == layer.f32() {
        Ok(())
    } else {
        Err(misuse(format!(
            "layer {name:?} has other projections than the layers before it; a PEFT adapter shares one pair"
        )))
    }
}

/// The projections to save: A `[r, n_max]` and B `[m_max, r]` when the config saves them; none when
/// it does not, after checking that PEFT's draw from the seed gives them back.
fn saved_projections(
    config: &VeraConfig,
    p: &Projections<f32>,
) -> candle_core::Result<Option<(PeftTensor, PeftTensor)>> {
    let (a, b) = p.as_slices();
    if config.save_projection {
        let a = PeftTensor::new(DType::F32, vec![p.rank(), p.n_max()], a.to_vec()).map_err(wrap)?;
        let b = PeftTensor::new(DType::F32, vec![p.m_max(), p.rank()], b.to_vec()).map_err(wrap)?;
        return Ok(Some((a, b)));
    }
    let seeded =
        Projections::<f32>::from_seed(config.projection_prng_key, p.rank(), p.n_max(), p.m_max()).map_err(wrap)?;
    if &seeded == p {
        Ok(None)
    } else {
        Err(misuse(format!(
            "the layers' projections are not the ones projection_prng_key = {} draws, and the config does \
             not save them (save_projection = false): PEFT would load other projections",
            config.projection_prng_key
        )))
    }
}
