//! Export: trained layers back out as a PEFT adapter, which `PeftAdapter::save` writes as the
//! directory PEFT's `PeftModel.from_pretrained` loads.

use super::*;

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
pub(super) fn module(config: &VeraConfig, name: &str, layer: &VeraLinear) -> candle_core::Result<VeraModule> {
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
pub(super) fn check_same_projections(
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
pub(super) fn saved_projections(
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
