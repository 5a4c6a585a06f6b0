//! The per-layer trainable part of VeRA: `lambda_d [r]`, `lambda_b [m]` and an optional bias `[m]`.

use crate::dtype::Element;
use crate::error::{Error, Result};

/// One layer's VeRA vectors, kept in f32 whatever the activation dtype (they are tiny, and f32
/// holds every f16/bf16 value exactly).
#[derive(Clone, Debug, PartialEq)]
pub struct Adapter {
    lambda_d: Vec<f32>,
    lambda_b: Vec<f32>,
    bias: Option<Vec<f32>>,
}

impl Adapter {
    /// An adapter from `lambda_d [r]` and `lambda_b [m]`, without bias.
    ///
    /// Errors: [`Error::ZeroRank`] when `lambda_d` is empty.
    pub fn new(lambda_d: Vec<f32>, lambda_b: Vec<f32>) -> Result<Self> {
        if lambda_d.is_empty() {
            return Err(Error::ZeroRank);
        }
        Ok(Self { lambda_d, lambda_b, bias: None })
    }

    /// PEFT's initial adapter: `lambda_d = d_initial` (PEFT's default is 0.1), `lambda_b = 0`.
    pub fn peft_init(r: usize, m: usize, d_initial: f32) -> Result<Self> {
        Self::new(vec![d_initial; r], vec![0.0; m])
    }

    /// An adapter from vectors in any element type (widened exactly to f32).
    pub fn from_elements<T: Element>(lambda_d: &[T], lambda_b: &[T]) -> Result<Self> {
        Self::new(lambda_d.iter().map(|v| v.to_f32()).collect(), lambda_b.iter().map(|v| v.to_f32()).collect())
    }

    /// Adds the additive bias `[m]` to the adapter's output.
    ///
    /// Errors: [`Error::LengthMismatch`] when `bias.len() != lambda_b.len()`.
    pub fn with_bias(mut self, bias: Vec<f32>) -> Result<Self> {
        if bias.len() != self.lambda_b.len() {
            return Err(Error::LengthMismatch {
                what: "bias (must match lambda_b)",
                expected: self.lambda_b.len(),
                actual: bias.len(),
            });
        }
        self.bias = Some(bias);
        Ok(self)
    }

    /// The rank `r` (length of `lambda_d`).
    pub fn rank(&self) -> usize {
        self.lambda_d.len()
    }

    /// The layer's out_features `m` (length of `lambda_b`).
    pub fn out_features(&self) -> usize {
        self.lambda_b.len()
    }

    /// `lambda_d [r]`.
    pub fn lambda_d(&self) -> &[f32] {
        &self.lambda_d
    }

    /// `lambda_b [m]`.
    pub fn lambda_b(&self) -> &[f32] {
        &self.lambda_b
    }

    /// The optional bias `[m]`.
    pub fn bias(&self) -> Option<&[f32]> {
        self.bias.as_deref()
    }

    /// The lengths of this adapter's vectors, for the shared shape checks.
    pub(crate) fn dims(&self) -> crate::types::AdapterDims {
        crate::types::AdapterDims { r: self.rank(), m: self.out_features() }
    }

    /// Checks this adapter against a layer of rank `r` with `m` outputs.
    pub(crate) fn check(&self, r: usize, m: usize) -> Result<()> {
        crate::types::check_adapter(self.dims(), r, m)
    }
}
