//! candle integration (cargo feature `candle`): [`VeraLinear`], a [`candle_nn::Module`] that wraps a
//! candle [`Linear`] and adds the VeRA adapter path computed by this crate's fused kernels.
//!
//! The adapter runs as a candle custom op ([`candle_core::CustomOp2`]) on `x` and the base layer's
//! output: `y = base + lambda_b ⊙ ((lambda_d ⊙ (x·Aᵀ))·Bᵀ)`, accumulated into a copy of `base` in
//! one pass, for `f32`, `f16` and `bf16` tensors on the CPU. This module runs the crate's CPU
//! kernels only: tensors on other devices get a candle error. (The crate's CUDA backend,
//! `vera_kernels::cuda` with feature `cuda`, works on its own device buffers and is not wired into
//! candle's CUDA storage.) The op has no backward pass: it is for inference.
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

use std::sync::{Arc, OnceLock};

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor};
use candle_nn::{Linear, Module};

use crate::adapter::Adapter;
use crate::dtype::{DType, Element};
use crate::error::Error;
use crate::mat::{MatMut, MatRef};
use crate::ops::forward;
use crate::peft::{PeftAdapter, ProjectionSizes};
use crate::projections::Projections;
use crate::types::Mode;
use crate::with_element_type;
use half::{bf16, f16};

/// A candle error carrying this crate's [`Error`] (its message is the error's).
fn wrap(e: Error) -> candle_core::Error {
    candle_core::Error::wrap(e)
}

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

/// The adapter path of one layer as a candle custom op.
struct VeraOp {
    projections: Arc<VeraProjections>,
    adapter: Arc<Adapter>,
    in_features: usize,
    out_features: usize,
}

/// A contiguous tensor's elements as a slice of `T`.
fn elements<'a, T: candle_core::WithDType>(
    storage: &'a CpuStorage,
    layout: &Layout,
    what: &str,
) -> candle_core::Result<&'a [T]> {
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("vera: {what} must be contiguous")))?;
    storage
        .as_slice::<T>()?
        .get(start..end)
        .ok_or_else(|| candle_core::Error::Msg(format!("vera: {what} out of range")))
}

/// This crate's element type of a storage, or an error naming `what` for any other dtype.
fn element_dtype(what: &str, s: &CpuStorage) -> candle_core::Result<DType> {
    match s.dtype() {
        candle_core::DType::F32 => Ok(DType::F32),
        candle_core::DType::F16 => Ok(DType::F16),
        candle_core::DType::BF16 => Ok(DType::BF16),
        other => Err(candle_core::Error::Msg(format!("vera: {what} has dtype {other:?}: expected f32, f16 or bf16"))),
    }
}

impl VeraOp {
    /// `[..., in_features]` → `(T, leading dims)`.
    fn rows(&self, x: &Layout) -> candle_core::Result<(usize, Vec<usize>)> {
        match x.shape().dims().split_last() {
            Some((&n, lead)) if n == self.in_features => Ok((lead.iter().product(), lead.to_vec())),
            _ => Err(candle_core::Error::Msg(format!(
                "vera: x has shape {:?}, expected [..., {}] (the layer's in_features)",
                x.shape().dims(),
                self.in_features
            ))),
        }
    }

    fn run<T: Element + candle_core::WithDType>(
        &self,
        x: &[T],
        t: usize,
        base: Option<&[T]>,
    ) -> candle_core::Result<Vec<T>> {
        let (n, m) = (self.in_features, self.out_features);
        let projections = self.projections.get::<T>();
        let (mut y, mode) = match base {
            Some(b) => (b.to_vec(), Mode::Accumulate),
            None => (vec![T::default(); t * m], Mode::Overwrite),
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
        let (t, mut dims) = self.rows(l)?;
        dims.push(self.out_features);
        let dtype = element_dtype("x", s)?;
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
        let (t, mut dims) = self.rows(xl)?;
        dims.push(self.out_features);
        if bl.shape().dims() != dims.as_slice() {
            return Err(candle_core::Error::Msg(format!(
                "vera: the base layer's output has shape {:?}, expected {dims:?}",
                bl.shape().dims()
            )));
        }
        let dtype = element_dtype("x", xs)?;
        if bs.dtype() != xs.dtype() {
            return Err(candle_core::Error::Msg(format!(
                "vera: x ({:?}) and the base output ({:?}) must have the same dtype",
                xs.dtype(),
                bs.dtype()
            )));
        }
        let storage = with_element_type!(dtype, T => self.run_storage::<T>((xs, xl), t, Some((bs, bl)))?);
        Ok((storage, Shape::from(dims)))
    }
}

/// A candle [`Linear`] with a VeRA adapter: `forward(x) = linear(x) + adapter(x)`, the adapter
/// computed by this crate's fused kernels (CPU, f32 / f16 / bf16).
#[derive(Clone)]
pub struct VeraLinear {
    base: Linear,
    op: Arc<VeraOp>,
}

impl std::fmt::Debug for VeraLinear {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VeraLinear")
            .field("in_features", &self.op.in_features)
            .field("out_features", &self.op.out_features)
            .field("rank", &self.op.adapter.rank())
            .finish()
    }
}

impl VeraLinear {
    /// Wraps `base` (weight `[out_features, in_features]`, as candle stores it) with `adapter`.
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
        let op = VeraOp { projections, adapter: Arc::new(adapter), in_features: n, out_features: m };
        Ok(Self { base, op: Arc::new(op) })
    }

    /// Wraps `base` with module `module` of a PEFT adapter.
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

    /// The wrapped base layer.
    pub fn base(&self) -> &Linear {
        &self.base
    }

    /// The adapter's vectors.
    pub fn adapter(&self) -> &Adapter {
        &self.op.adapter
    }

    /// The adapter's contribution alone, `lambda_b ⊙ ((lambda_d ⊙ (x·Aᵀ))·Bᵀ)`, for `x [..., in]`.
    ///
    /// Errors: a non-CPU tensor, a dtype other than f32 / f16 / bf16, a last dimension that is not
    /// the layer's in_features.
    pub fn adapter_forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        check_cpu(x)?;
        x.contiguous()?.apply_op1_no_bwd(self.op.as_ref())
    }
}

/// A candle error for a tensor that is not on the CPU, the only device this module runs on.
fn check_cpu(x: &Tensor) -> candle_core::Result<()> {
    if x.device().is_cpu() {
        Ok(())
    } else {
        Err(candle_core::Error::Msg(format!(
            "vera: VeraLinear runs on the CPU only (x is on {:?}); vera-kernels' CUDA backend is not wired into candle",
            x.device().location()
        )))
    }
}

impl Module for VeraLinear {
    /// `linear(x) + adapter(x)` for `x [..., in_features]`, in x's dtype (f32, f16 or bf16).
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        check_cpu(x)?;
        let base = self.base.forward(x)?.contiguous()?;
        x.contiguous()?.apply_op2_no_bwd(&base, self.op.as_ref())
    }
}
