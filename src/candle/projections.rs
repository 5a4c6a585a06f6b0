//! The shared projections of one adapter, in every dtype a layer may be called with.

use super::*;

// --- Projections: the shared projections of one adapter, in every dtype a layer may be called with.

/// The shared projections of one adapter, in every dtype a layer may be called with: f32, and
/// f16 / bf16 rounded from it the first time they are needed (PEFT casts the projections to the
/// activation dtype in the same way).
#[derive(Debug)]
pub struct VeraProjections {
    pub(super) f32: Projections<f32>,
    pub(super) f16: OnceLock<Projections<f16>>,
    pub(super) bf16: OnceLock<Projections<bf16>>,
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

    /// The projections shared by a set of PEFT adapters (see [`PeftAdapters::projections`]), for a
    /// [`VeraBankLinear`](crate::candle::VeraBankLinear) holding them.
    ///
    /// Errors: those of [`PeftAdapters::projections`], as candle errors.
    pub fn from_peft_adapters(adapters: &PeftAdapters, sizes: Option<ProjectionSizes>) -> candle_core::Result<Self> {
        Ok(Self::new(adapters.projections::<f32>(sizes).map_err(wrap)?))
    }

    /// The f32 projections.
    pub fn f32(&self) -> &Projections<f32> {
        &self.f32
    }

    /// The projections in element type `T`.
    pub(super) fn get<T: Element>(&self) -> &Projections<T> {
        // The sealed Element has exactly these three types; `Any` picks the one asked for.
        let any: &dyn std::any::Any = match T::DTYPE {
            crate::DType::F32 => &self.f32,
            crate::DType::F16 => self.f16.get_or_init(|| self.f32.to_dtype()),
            crate::DType::BF16 => self.bf16.get_or_init(|| self.f32.to_dtype()),
        };
        any.downcast_ref::<Projections<T>>().unwrap_or_else(|| unreachable!("Element::DTYPE matches the type"))
    }
}
