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
//! [`VeraBankLinear`] holds a bank of adapters for the same projections instead of one, and takes
//! each row's adapter id with the input (many fine-tunes served, or trained, in one batch, at one
//! adapter's cost): row for row it gives what a [`VeraLinear`] with that row's adapter gives, bit
//! for bit, on the same two paths (the crate's [`forward_mixed`] and [`backward_mixed`]).
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

mod bank;
mod bank_op;
mod export;
mod infer_op;
mod layer;
mod linear;
mod projections;
mod storage;
mod train_op;

pub use bank::{VeraBankLinear, VeraBankVars};
pub use export::to_peft_adapter;
pub use linear::{VeraLinear, VeraVars};
pub use projections::VeraProjections;

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Device, Layout, Shape, Storage, Tensor, Var};
use candle_nn::{Linear, Module};
use half::{bf16, f16};

use crate::adapter::Adapter;
use crate::bank::{AdapterBank, NO_ADAPTER};
use crate::dtype::{DType, Element};
use crate::error::Error;
use crate::mat::{MatMut, MatRef};
use crate::ops::{backward, backward_mixed, forward, forward_mixed, forward_train, forward_train_mixed, Gradients};
use crate::peft::{PeftAdapter, PeftAdapters, ProjectionSizes, Tensor as PeftTensor, VeraConfig, VeraModule};
use crate::projections::Projections;
use crate::types::Mode;
use crate::with_element_type;

// Each part sees the others through `use super::*`.
use bank::*;
use bank_op::*;
use infer_op::*;
use layer::*;
use storage::*;
use train_op::*;

/// A candle error carrying this crate's [`Error`] (its message is the error's).
fn wrap(e: Error) -> candle_core::Error {
    candle_core::Error::wrap(e)
}

/// A candle error for a misuse this module detects itself, its message prefixed with `vera: `.
fn misuse(message: impl std::fmt::Display) -> candle_core::Error {
    candle_core::Error::Msg(format!("vera: {message}"))
}
