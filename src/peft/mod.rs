//! HuggingFace PEFT interop: VeRA adapter directories as `PeftModel.save_pretrained` writes them.
//!
//! A directory holds `adapter_config.json` ([`VeraConfig`]) and `adapter_model.safetensors`, with
//! one `base_model.model.<module>.vera_lambda_d [r]` and `...vera_lambda_b [out_features]` per
//! adapted module and, when the config says `save_projection = true`, the shared
//! `base_model.vera_A [r, n_max]` and `base_model.vera_B [m_max, r]`. Tensors may be `f32`, `f16`
//! or `bf16`.
//!
//! When the projections are not saved, [`PeftAdapter::projections`] regenerates them bit for bit
//! from `projection_prng_key`, which needs the base model's `n_max` and `m_max` (the largest
//! in/out features over the adapted layers): the adapter file alone does not know them.
//!
//! [`PeftAdapter::to_lora`] exports an adapter exactly as a PEFT LoRA adapter (`lora_B·lora_A =
//! ΔW`, scaling 1), which [`LoraAdapter::save`] writes as a LoRA adapter directory.
//!
//! ```
//! use vera_kernels::peft::PeftAdapter;
//! use vera_kernels::{forward, MatMut, MatRef, Mode};
//!
//! let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/peft-vera-mlp/adapter");
//! let adapter = PeftAdapter::load(dir)?;
//! let projections = adapter.projections::<f32>(None)?; // saved in the file
//! let layer = adapter.module("layers.0")?; // 48 -> 40
//! let x = vec![1.0f32; 2 * 48];
//! let mut y = vec![0.0f32; 2 * 40];
//! forward(
//!     &projections,
//!     layer.adapter(),
//!     MatRef::from_slice(&x, 2, 48)?,
//!     MatMut::from_slice(&mut y, 2, 40)?,
//!     Mode::Overwrite,
//! )?;
//! # Ok::<(), vera_kernels::Error>(())
//! ```

mod bank;
mod config;
mod lora;
mod tensors;

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::Path;

pub use bank::{PeftAdapters, DEFAULT_ADAPTER};
pub use config::{TargetModules, VeraBias, VeraConfig};
pub use lora::{lora_a_key, lora_b_key, InFeatures, LoraAdapter, LoraExportOptions, LoraModule};
pub use tensors::{write_safetensors, Tensor, TensorFile};

use crate::adapter::Adapter;
use crate::dtype::Element;
use crate::error::{Error, Result};
use crate::mat::MatMut;
use crate::projections::Projections;

/// The config file of an adapter directory.
pub const CONFIG_FILE: &str = "adapter_config.json";
/// The weights file of an adapter directory.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// The key of the shared projection A `[r, n_max]`.
pub const VERA_A_KEY: &str = "base_model.vera_A";
/// The key of the shared projection B `[m_max, r]`.
pub const VERA_B_KEY: &str = "base_model.vera_B";

const MODULE_PREFIX: &str = "base_model.model.";
const LAMBDA_D_SUFFIX: &str = ".vera_lambda_d";
const LAMBDA_B_SUFFIX: &str = ".vera_lambda_b";

/// The key of a module's `lambda_d` in the adapter file: `base_model.model.<module>.vera_lambda_d`.
pub fn lambda_d_key(module: &str) -> String {
    format!("{MODULE_PREFIX}{module}{LAMBDA_D_SUFFIX}")
}

/// The key of a module's `lambda_b` in the adapter file: `base_model.model.<module>.vera_lambda_b`.
pub fn lambda_b_key(module: &str) -> String {
    format!("{MODULE_PREFIX}{module}{LAMBDA_B_SUFFIX}")
}

/// The sizes of the shared projections: `n_max` (columns of A) and `m_max` (rows of B), the largest
/// in_features and out_features over the adapted layers of the base model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ProjectionSizes {
    /// The largest in_features of the adapted layers.
    pub n_max: usize,
    /// The largest out_features of the adapted layers.
    pub m_max: usize,
}

/// One adapted module: its `lambda_d [r]` and `lambda_b [out_features]` as stored, and the
/// [`Adapter`] the kernels take.
#[derive(Clone, Debug, PartialEq)]
pub struct VeraModule {
    lambda_d: Tensor,
    lambda_b: Tensor,
    adapter: Adapter,
}

impl VeraModule {
    /// A module from its two vectors (any of the three dtypes, each kept for saving).
    ///
    /// Errors: [`Error::TensorShape`] when a vector is not one-dimensional or is empty.
    pub fn new(lambda_d: Tensor, lambda_b: Tensor) -> Result<Self> {
        for (key, t) in [("vera_lambda_d", &lambda_d), ("vera_lambda_b", &lambda_b)] {
            if t.shape().len() != 1 || t.is_empty() {
                return Err(Error::TensorShape {
                    path: String::new(),
                    key: key.to_string(),
                    expected: "one dimension of at least 1 element".to_string(),
                    actual: t.shape().to_vec(),
                });
            }
        }
        let adapter = Adapter::new(lambda_d.data().to_vec(), lambda_b.data().to_vec())?;
        Ok(Self { lambda_d, lambda_b, adapter })
    }

    /// The vectors as the kernels take them.
    pub fn adapter(&self) -> &Adapter {
        &self.adapter
    }

    /// `lambda_d [r]` as stored.
    pub fn lambda_d(&self) -> &Tensor {
        &self.lambda_d
    }

    /// `lambda_b [out_features]` as stored.
    pub fn lambda_b(&self) -> &Tensor {
        &self.lambda_b
    }

    /// The rank `r` (length of `lambda_d`).
    pub fn rank(&self) -> usize {
        self.lambda_d.len()
    }

    /// The layer's out_features (length of `lambda_b`).
    pub fn out_features(&self) -> usize {
        self.lambda_b.len()
    }

    /// Trainable parameters: `r + out_features`.
    pub fn parameter_count(&self) -> usize {
        self.rank() + self.out_features()
    }
}

/// A PEFT VeRA adapter: its config, its modules by name and, when saved, its projections.
///
/// Every instance is consistent: each module's `lambda_d` has length `r`, the projections (when
/// saved) are `[r, n_max]` and `[m_max, r]` with `m_max` covering every module, the modules match
/// `target_modules`, and `save_projection` says whether projections are present.
#[derive(Clone, Debug, PartialEq)]
pub struct PeftAdapter {
    config: VeraConfig,
    modules: BTreeMap<String, VeraModule>,
    projections: Option<(Tensor, Tensor)>,
}

impl PeftAdapter {
    /// An adapter from its parts; `projections` are A `[r, n_max]` and B `[m_max, r]`, given exactly
    /// when `config.save_projection` is true.
    ///
    /// Errors: as [`PeftAdapter::load`] for the same inconsistencies.
    pub fn new(
        config: VeraConfig,
        modules: BTreeMap<String, VeraModule>,
        projections: Option<(Tensor, Tensor)>,
    ) -> Result<Self> {
        let adapter = Self { config, modules, projections };
        adapter.validate("")?;
        Ok(adapter)
    }

    /// Loads an adapter directory written by PEFT's `save_pretrained` (or by [`PeftAdapter::save`]).
    ///
    /// Errors:
    /// - [`Error::Io`]: a file is missing or unreadable;
    /// - [`Error::InvalidConfig`], [`Error::NotVera`]: see [`VeraConfig::from_json`];
    /// - [`Error::Safetensors`]: the weights file is truncated or corrupt;
    /// - [`Error::UnsupportedDType`]: a tensor is not f32, f16 or bf16;
    /// - [`Error::MissingTensor`]: a module lacks one of its vectors, there is no module, or the
    ///   config says the projections are saved and they are not;
    /// - [`Error::UnexpectedTensor`]: a key that is not part of a VeRA adapter, a module that is
    ///   not in `target_modules`, or projections the config says are not saved;
    /// - [`Error::TensorShape`]: a `lambda_d` whose length is not `r`, a vector that is not
    ///   one-dimensional, projections that are not `[r, n_max]` / `[m_max, r]`;
    /// - [`Error::ProjectionsTooSmall`]: a module's `lambda_b` longer than the saved B's `m_max`.
    pub fn load(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let config = VeraConfig::read(dir.join(CONFIG_FILE))?;
        let weights_path = dir.join(WEIGHTS_FILE);
        if !weights_path.exists() && dir.join("adapter_model.bin").exists() {
            return Err(Error::Io {
                path: weights_path.display().to_string(),
                message: "not found; the directory holds only the pickled adapter_model.bin, \
                          which is not supported: save the adapter with safe_serialization=True"
                    .to_string(),
            });
        }
        let file = TensorFile::read(&weights_path)?;
        Self::from_tensor_file(config, &file)
    }

    /// An adapter from its config and its weights file already in memory (e.g. fetched over the
    /// network, or read from an archive): [`PeftAdapter::load`] without the file system.
    ///
    /// Errors: as [`PeftAdapter::load`].
    pub fn from_tensor_file(config: VeraConfig, file: &TensorFile) -> Result<Self> {
        let path = file.path().display().to_string();

        let mut lambdas: BTreeMap<String, (Option<Tensor>, Option<Tensor>)> = BTreeMap::new();
        let mut a = None;
        let mut b = None;
        for key in file.keys() {
            if key == VERA_A_KEY {
                a = Some(file.tensor(key)?);
            } else if key == VERA_B_KEY {
                b = Some(file.tensor(key)?);
            } else if let Some((module, is_d)) = parse_lambda_key(key) {
                let tensor = file.tensor(key)?;
                let entry = lambdas.entry(module.to_string()).or_default();
                if is_d {
                    entry.0 = Some(tensor);
                } else {
                    entry.1 = Some(tensor);
                }
            } else {
                return Err(Error::UnexpectedTensor {
                    path,
                    key: key.to_string(),
                    reason: "not a VeRA tensor (expected base_model.model.<module>.vera_lambda_d, \
                             ...vera_lambda_b, base_model.vera_A, base_model.vera_B)"
                        .to_string(),
                });
            }
        }
        let mut modules = BTreeMap::new();
        for (name, (d, b)) in lambdas {
            let missing = |key: String| Error::MissingTensor { path: path.clone(), key };
            let d = d.ok_or_else(|| missing(lambda_d_key(&name)))?;
            let b = b.ok_or_else(|| missing(lambda_b_key(&name)))?;
            let module = VeraModule::new(d, b).map_err(|e| match e {
                Error::TensorShape { key, expected, actual, .. } => Error::TensorShape {
                    path: path.clone(),
                    key: format!("{MODULE_PREFIX}{name}.{key}"),
                    expected,
                    actual,
                },
                other => other,
            })?;
            modules.insert(name, module);
        }
        let projections = match (a, b) {
            (None, None) => None,
            (Some(a), Some(b)) => Some((a, b)),
            (Some(_), None) => return Err(Error::MissingTensor { path, key: VERA_B_KEY.to_string() }),
            (None, Some(_)) => return Err(Error::MissingTensor { path, key: VERA_A_KEY.to_string() }),
        };
        let adapter = Self { config, modules, projections };
        adapter.validate(&path)?;
        Ok(adapter)
    }

    /// The checks shared by [`PeftAdapter::new`] and [`PeftAdapter::load`]; `path` names the file.
    fn validate(&self, path: &str) -> Result<()> {
        let r = self.config.r;
        if r == 0 {
            return Err(Error::ZeroRank);
        }
        if self.modules.is_empty() {
            return Err(Error::MissingTensor { path: path.to_string(), key: lambda_d_key("<module>") });
        }
        for (name, module) in &self.modules {
            if name.is_empty() {
                return Err(Error::UnexpectedTensor {
                    path: path.to_string(),
                    key: lambda_d_key(name),
                    reason: "the module name is empty".to_string(),
                });
            }
            if !self.config.target_modules.matches(name) {
                return Err(Error::UnexpectedTensor {
                    path: path.to_string(),
                    key: lambda_d_key(name),
                    reason: format!(
                        "module {name:?} is not one of the config's target_modules {:?}",
                        self.config.target_modules
                    ),
                });
            }
            if module.rank() != r {
                return Err(Error::TensorShape {
                    path: path.to_string(),
                    key: lambda_d_key(name),
                    expected: format!("[{r}] (r in {CONFIG_FILE})"),
                    actual: module.lambda_d.shape().to_vec(),
                });
            }
        }
        match (&self.projections, self.config.save_projection) {
            (None, true) => Err(Error::MissingTensor { path: path.to_string(), key: VERA_A_KEY.to_string() }),
            (Some(_), false) => Err(Error::UnexpectedTensor {
                path: path.to_string(),
                key: VERA_A_KEY.to_string(),
                reason: format!("{CONFIG_FILE} says save_projection = false"),
            }),
            (None, false) => Ok(()),
            (Some((a, b)), true) => {
                let (a_shape, b_shape) = (a.shape(), b.shape());
                if a_shape.len() != 2 || a_shape[0] != r || a_shape[1] == 0 {
                    return Err(Error::TensorShape {
                        path: path.to_string(),
                        key: VERA_A_KEY.to_string(),
                        expected: format!("[{r}, n_max] (r in {CONFIG_FILE}, n_max >= 1)"),
                        actual: a_shape.to_vec(),
                    });
                }
                if b_shape.len() != 2 || b_shape[1] != r {
                    return Err(Error::TensorShape {
                        path: path.to_string(),
                        key: VERA_B_KEY.to_string(),
                        expected: format!("[m_max, {r}] (r in {CONFIG_FILE})"),
                        actual: b_shape.to_vec(),
                    });
                }
                self.check_m_max(b_shape[0])
            }
        }
    }

    /// Checks that `m_max` covers every module, naming the widest one (whose size is the `m_max`
    /// needed) when it does not.
    pub(crate) fn check_m_max(&self, m_max: usize) -> Result<()> {
        let widest = self.modules.iter().max_by_key(|(_, module)| module.out_features());
        match widest.filter(|(_, module)| module.out_features() > m_max) {
            Some((name, module)) => Err(Error::ProjectionsTooSmall {
                module: name.clone(),
                what: "out_features",
                needed: module.out_features(),
                given: m_max,
            }),
            None => Ok(()),
        }
    }

    /// Writes the adapter in PEFT's layout: `dir/adapter_config.json` and
    /// `dir/adapter_model.safetensors` (header metadata `{"format": "pt"}`, each tensor in its
    /// dtype), creating `dir` if needed. PEFT's `PeftModel.from_pretrained` loads the result.
    ///
    /// Each file is written atomically. Errors: [`Error::Io`], [`Error::Safetensors`],
    /// [`Error::InvalidConfig`] (a non-finite `d_initial` or `vera_dropout`).
    pub fn save(&self, dir: impl AsRef<Path>) -> Result<()> {
        let dir = dir.as_ref();
        // Fails early, before anything is written, on a config that cannot be written.
        self.config.to_json()?;
        fs::create_dir_all(dir).map_err(|e| tensors::io_error(dir, &e))?;
        let keys: Vec<(String, &Tensor)> = self
            .modules
            .iter()
            .flat_map(|(name, m)| [(lambda_d_key(name), &m.lambda_d), (lambda_b_key(name), &m.lambda_b)])
            .chain(
                self.projections.iter().flat_map(|(a, b)| [(VERA_A_KEY.to_string(), a), (VERA_B_KEY.to_string(), b)]),
            )
            .collect();
        let refs: Vec<(&str, &Tensor)> = keys.iter().map(|(k, t)| (k.as_str(), *t)).collect();
        let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
        write_safetensors(dir.join(WEIGHTS_FILE), &refs, Some(metadata))?;
        self.config.write(dir.join(CONFIG_FILE))
    }

    /// The config.
    pub fn config(&self) -> &VeraConfig {
        &self.config
    }

    /// The rank `r`.
    pub fn rank(&self) -> usize {
        self.config.r
    }

    /// The modules, by name (sorted).
    pub fn modules(&self) -> &BTreeMap<String, VeraModule> {
        &self.modules
    }

    /// One module.
    ///
    /// Errors: [`Error::UnknownModule`], listing the adapter's modules.
    pub fn module(&self, name: &str) -> Result<&VeraModule> {
        self.modules.get(name).ok_or_else(|| Error::UnknownModule {
            module: name.to_string(),
            available: self.modules.keys().cloned().collect(),
        })
    }

    /// Trainable parameters over all modules: `Σ (r + out_features)`.
    pub fn parameter_count(&self) -> usize {
        self.modules.values().map(VeraModule::parameter_count).sum()
    }

    /// The saved projections A `[r, n_max]` and B `[m_max, r]`, if the file holds them.
    pub fn saved_projections(&self) -> Option<(&Tensor, &Tensor)> {
        self.projections.as_ref().map(|(a, b)| (a, b))
    }

    /// The projection sizes of the saved projections, if any.
    pub fn projection_sizes(&self) -> Option<ProjectionSizes> {
        self.projections.as_ref().map(|(a, b)| ProjectionSizes { n_max: a.shape()[1], m_max: b.shape()[0] })
    }

    /// The shared projections in element type `T`: the saved ones (rounded to `T` when narrower),
    /// or, when they are not saved, the ones PEFT draws from `projection_prng_key`
    /// ([`Projections::from_seed`], bit-identical to PEFT), which need `sizes`.
    ///
    /// `sizes` may be given with saved projections too; it must then equal their shape.
    ///
    /// Errors: [`Error::MissingProjectionSizes`] when the projections are not saved and `sizes` is
    /// `None`; [`Error::ProjectionsTooSmall`] when `m_max` is smaller than a module's
    /// out_features; [`Error::TensorShape`] when `sizes` disagrees with the saved projections.
    pub fn projections<T: Element>(&self, sizes: Option<ProjectionSizes>) -> Result<Projections<T>> {
        let r = self.config.r;
        match (&self.projections, sizes) {
            (Some((a, b)), sizes) => {
                let (n_max, m_max) = (a.shape()[1], b.shape()[0]);
                if let Some(s) = sizes {
                    if s.n_max != n_max {
                        return Err(Error::TensorShape {
                            path: String::new(),
                            key: VERA_A_KEY.to_string(),
                            expected: format!(
                                "[{r}, {}] (r and the n_max given; leave the sizes out for saved projections)",
                                s.n_max
                            ),
                            actual: a.shape().to_vec(),
                        });
                    }
                    if s.m_max != m_max {
                        return Err(Error::TensorShape {
                            path: String::new(),
                            key: VERA_B_KEY.to_string(),
                            expected: format!(
                                "[{}, {r}] (the m_max given and r; leave the sizes out for saved projections)",
                                s.m_max
                            ),
                            actual: b.shape().to_vec(),
                        });
                    }
                }
                Projections::from_arrays(a.to_elements(), b.to_elements(), r, n_max, m_max)
            }
            (None, None) => Err(Error::MissingProjectionSizes { seed: self.config.projection_prng_key }),
            (None, Some(s)) => {
                self.check_m_max(s.m_max)?;
                Projections::from_seed(self.config.projection_prng_key, r, s.n_max, s.m_max)
            }
        }
    }

    /// `W += ΔW` for a module's base weight, stored as PEFT's base layer stores it:
    /// `[out_features, in_features]`, or `[in_features, out_features]` when the config says
    /// `fan_in_fan_out` (GPT-2's `Conv1D`). See [`crate::merge`].
    ///
    /// Errors: [`Error::UnknownModule`], and those of [`crate::merge`] (the weight's out_features
    /// must be the length of the module's `lambda_b`).
    pub fn merge_module<T: Element>(
        &self,
        projections: &Projections<T>,
        module: &str,
        weight: MatMut<'_, T>,
    ) -> Result<()> {
        self.apply_module(projections, module, weight, false)
    }

    /// `W -= ΔW`: the inverse of [`PeftAdapter::merge_module`] up to rounding.
    pub fn unmerge_module<T: Element>(
        &self,
        projections: &Projections<T>,
        module: &str,
        weight: MatMut<'_, T>,
    ) -> Result<()> {
        self.apply_module(projections, module, weight, true)
    }

    fn apply_module<T: Element>(
        &self,
        projections: &Projections<T>,
        module: &str,
        mut weight: MatMut<'_, T>,
        unmerge: bool,
    ) -> Result<()> {
        let adapter = self.module(module)?.adapter();
        let apply = |w: MatMut<'_, T>| {
            if unmerge {
                crate::ops::unmerge(projections, adapter, w)
            } else {
                crate::ops::merge(projections, adapter, w)
            }
        };
        if !self.config.fan_in_fan_out {
            return apply(weight);
        }
        // [n, m] storage: merge a transposed copy with the same kernels, then write it back, so
        // that the result is bitwise the transpose of merging the [m, n] weight.
        let (n, m) = (weight.rows(), weight.cols());
        projections.slice(n, m)?;
        let len = m.checked_mul(n).ok_or(Error::SizeOverflow { what: "weight [in, out]" })?;
        let mut wt = vec![T::default(); len];
        for k in 0..n {
            let row = weight.as_ref().row(k).unwrap_or(&[]);
            for (i, &v) in row.iter().enumerate() {
                wt[i * n + k] = v;
            }
        }
        apply(MatMut::from_slice(&mut wt, m, n)?)?;
        for k in 0..n {
            if let Some(row) = weight.row_mut(k) {
                for (i, v) in row.iter_mut().enumerate() {
                    *v = wt[i * n + k];
                }
            }
        }
        Ok(())
    }
}

/// `base_model.model.<module>.vera_lambda_{d,b}` → `(module, is_d)`.
fn parse_lambda_key(key: &str) -> Option<(&str, bool)> {
    let rest = key.strip_prefix(MODULE_PREFIX)?;
    if let Some(module) = rest.strip_suffix(LAMBDA_D_SUFFIX) {
        Some((module, true))
    } else {
        rest.strip_suffix(LAMBDA_B_SUFFIX).map(|m| (m, false))
    }
}
