//! Exact export of a VeRA adapter as a PEFT **LoRA** adapter.
//!
//! A VeRA module's `ΔW = diag(lambda_b)·B[:m, :] · diag(lambda_d)·A[:, :n]` has rank `r`, so it is
//! exactly a LoRA update `lora_B·lora_A` with scaling 1:
//!
//! - `lora_A = diag(lambda_d)·A[:, :n]`, `[r, n]` (`base_model.model.<module>.lora_A.weight`);
//! - `lora_B = diag(lambda_b)·B[:m, :]`, `[m, r]` (`base_model.model.<module>.lora_B.weight`);
//! - `lora_alpha = r` and `use_rslora = false`, so PEFT's scaling `lora_alpha / r` is exactly 1.
//!
//! Each element is one product of two stored values, computed exactly (in f64, which holds the
//! product of two f32 values without rounding) and rounded once to the output dtype (to nearest,
//! ties to even). So an f32 export is the correctly rounded factor, and the f32 export of an
//! adapter whose lambdas and projections are stored in f16 or bf16 is exact (their products fit in
//! f32's 24 bits). No SVD is involved.
//!
//! A VeRA adapter does not store a module's in_features `n` (only `lambda_d [r]` and
//! `lambda_b [m]`; `vera forward` takes `n` from its input and `vera merge` from the weight), while
//! LoRA's `lora_A` is `[r, n]`: [`InFeatures`] gives it, per module or for all modules at once.
//!
//! [`PeftAdapter::to_lora`] makes the adapter in memory and [`LoraAdapter::save`] writes it.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use half::{bf16, f16};
use serde_json::{Map, Value};

use super::tensors::{io_error, write_atomically};
use super::{write_safetensors, PeftAdapter, ProjectionSizes, TargetModules, Tensor, CONFIG_FILE, WEIGHTS_FILE};
use crate::dtype::DType;
use crate::error::{Error, Result};

const MODULE_PREFIX: &str = "base_model.model.";

/// The key of a module's `lora_A` in a LoRA adapter file: `base_model.model.<module>.lora_A.weight`.
pub fn lora_a_key(module: &str) -> String {
    format!("{MODULE_PREFIX}{module}.lora_A.weight")
}

/// The key of a module's `lora_B` in a LoRA adapter file: `base_model.model.<module>.lora_B.weight`.
pub fn lora_b_key(module: &str) -> String {
    format!("{MODULE_PREFIX}{module}.lora_B.weight")
}

/// The in_features of the adapted layers, which a VeRA adapter does not store: one value for
/// every module, and values for the modules of a name.
///
/// A name given with [`InFeatures::with`] applies to the module of that name and to every module
/// whose name ends with `"." + name` (PEFT's `target_modules` rule): `with("down_proj", 11008)`
/// covers `model.layers.0.mlp.down_proj`, `model.layers.1.mlp.down_proj`, ... When several names
/// cover a module the longest one wins; a module no name covers takes the value of
/// [`InFeatures::all`] / [`InFeatures::with_default`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct InFeatures {
    default: Option<usize>,
    by_name: BTreeMap<String, usize>,
}

impl InFeatures {
    /// No value yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// The same in_features for every module.
    pub fn all(n: usize) -> Self {
        Self::new().with_default(n)
    }

    /// Sets the value of the modules that no name covers.
    pub fn with_default(mut self, n: usize) -> Self {
        self.default = Some(n);
        self
    }

    /// Sets the value of the module `name` and of the modules whose name ends with `"." + name`
    /// (replacing an earlier value for the same name).
    pub fn with(mut self, name: impl Into<String>, n: usize) -> Self {
        self.by_name.insert(name.into(), n);
        self
    }

    /// The in_features of a module: the value of the longest name that covers it, or the default.
    pub fn of(&self, module: &str) -> Option<usize> {
        self.by_name
            .iter()
            .filter(|(name, _)| covers(name, module))
            .max_by_key(|(name, _)| name.len())
            .map(|(_, &n)| n)
            .or(self.default)
    }

    /// Every name covers at least one module of the adapter (a name that covers none is a typo).
    fn check_names(&self, adapter: &PeftAdapter) -> Result<()> {
        match self.by_name.keys().find(|name| !adapter.modules().keys().any(|m| covers(name, m))) {
            Some(name) => Err(Error::UnknownModule {
                module: name.clone(),
                available: adapter.modules().keys().cloned().collect(),
            }),
            None => Ok(()),
        }
    }
}

/// Whether `name` names `module`: equal, or a suffix of it after a `.`.
fn covers(name: &str, module: &str) -> bool {
    TargetModules::Names(vec![name.to_string()]).matches(module)
}

/// How [`PeftAdapter::to_lora`] exports an adapter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoraExportOptions {
    /// Each module's in_features (the width of its `lora_A`).
    pub in_features: InFeatures,
    /// The projection sizes: needed when the adapter does not save its projections (see
    /// [`PeftAdapter::projections`]), and then exactly the base model's `n_max` / `m_max`.
    pub sizes: Option<ProjectionSizes>,
    /// The dtype the factors are written in (default f32).
    pub dtype: DType,
}

impl LoraExportOptions {
    /// f32 factors, projections from the adapter file.
    pub fn new(in_features: InFeatures) -> Self {
        Self { in_features, sizes: None, dtype: DType::F32 }
    }

    /// The projection sizes, for an adapter that does not save its projections.
    pub fn with_sizes(mut self, sizes: ProjectionSizes) -> Self {
        self.sizes = Some(sizes);
        self
    }

    /// The dtype of the written factors.
    pub fn with_dtype(mut self, dtype: DType) -> Self {
        self.dtype = dtype;
        self
    }
}

/// One module of a [`LoraAdapter`]: its two factors, `lora_B·lora_A = ΔW`.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraModule {
    lora_a: Tensor,
    lora_b: Tensor,
}

impl LoraModule {
    /// `lora_A = diag(lambda_d)·A[:, :n]`, `[r, in_features]`.
    pub fn lora_a(&self) -> &Tensor {
        &self.lora_a
    }

    /// `lora_B = diag(lambda_b)·B[:m, :]`, `[out_features, r]`.
    pub fn lora_b(&self) -> &Tensor {
        &self.lora_b
    }

    /// The layer's in_features (columns of `lora_A`).
    pub fn in_features(&self) -> usize {
        self.lora_a.shape()[1]
    }

    /// The layer's out_features (rows of `lora_B`).
    pub fn out_features(&self) -> usize {
        self.lora_b.shape()[0]
    }
}

/// A PEFT LoRA adapter made from a VeRA adapter by [`PeftAdapter::to_lora`]: its config and its
/// modules' factors, held in memory until [`LoraAdapter::save`].
#[derive(Clone, Debug, PartialEq)]
pub struct LoraAdapter {
    r: usize,
    config: Map<String, Value>,
    modules: BTreeMap<String, LoraModule>,
}

impl LoraAdapter {
    /// The rank `r` (the VeRA adapter's).
    pub fn rank(&self) -> usize {
        self.r
    }

    /// The modules, by name (sorted).
    pub fn modules(&self) -> &BTreeMap<String, LoraModule> {
        &self.modules
    }

    /// One module.
    ///
    /// Errors: [`Error::UnknownModule`], listing the adapter's modules.
    pub fn module(&self, name: &str) -> Result<&LoraModule> {
        self.modules.get(name).ok_or_else(|| Error::UnknownModule {
            module: name.to_string(),
            available: self.modules.keys().cloned().collect(),
        })
    }

    /// `adapter_config.json` as written: sorted keys, indented by two spaces, as PEFT writes it.
    pub fn config_json(&self) -> String {
        // A map of JSON values built from integers, booleans, strings and parsed JSON always prints.
        serde_json::to_string_pretty(&Value::Object(self.config.clone())).unwrap_or_default()
    }

    /// Writes the adapter in PEFT's LoRA layout: `dir/adapter_config.json` and
    /// `dir/adapter_model.safetensors` (header metadata `{"format": "pt"}`), which PEFT's
    /// `PeftModel.from_pretrained` loads as a LoRA adapter.
    ///
    /// `dir` must not exist, or be an empty directory; its parent is created if needed. Both files
    /// are written into a fresh directory next to `dir`, which is then renamed to `dir`: a failure
    /// leaves no `dir` (and no partial adapter) behind.
    ///
    /// Errors: [`Error::Io`] when `dir` exists and is not an empty directory, or on a file system
    /// failure; [`Error::Safetensors`].
    pub fn save(&self, dir: impl AsRef<Path>) -> Result<()> {
        let dir = dir.as_ref();
        check_output_dir(dir)?;
        let name = dir.file_name().ok_or_else(|| Error::Io {
            path: dir.display().to_string(),
            message: "not a directory name".to_string(),
        })?;
        let parent = match dir.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        fs::create_dir_all(&parent).map_err(|e| io_error(&parent, &e))?;
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let tmp = parent.join(format!(
            ".{}.tmp-{}-{}",
            name.to_string_lossy(),
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir(&tmp).map_err(|e| io_error(&tmp, &e))?;
        let written = self.write_files(&tmp).and_then(|()| {
            // rename(2) replaces an empty directory and fails on a non-empty one, so an output
            // directory that filled up since the check above is not overwritten.
            fs::rename(&tmp, dir).map_err(|e| io_error(dir, &e))
        });
        if written.is_err() {
            let _ = fs::remove_dir_all(&tmp);
        }
        written
    }

    fn write_files(&self, dir: &Path) -> Result<()> {
        let keys: Vec<(String, &Tensor)> = self
            .modules
            .iter()
            .flat_map(|(name, m)| [(lora_a_key(name), &m.lora_a), (lora_b_key(name), &m.lora_b)])
            .collect();
        let refs: Vec<(&str, &Tensor)> = keys.iter().map(|(k, t)| (k.as_str(), *t)).collect();
        let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
        write_safetensors(dir.join(WEIGHTS_FILE), &refs, Some(metadata))?;
        write_atomically(&dir.join(CONFIG_FILE), self.config_json().as_bytes())
    }
}

/// `dir` may be written by [`LoraAdapter::save`]: it does not exist, or is an empty directory.
fn check_output_dir(dir: &Path) -> Result<()> {
    let refuse = |message: &str| Err(Error::Io { path: dir.display().to_string(), message: message.to_string() });
    match fs::symlink_metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_error(dir, &e)),
        Ok(meta) if !meta.is_dir() => {
            refuse("exists and is not a directory; give a new directory for the LoRA adapter")
        }
        Ok(_) => match fs::read_dir(dir).map_err(|e| io_error(dir, &e))?.next() {
            None => Ok(()),
            Some(_) => refuse("exists and is not empty; give a new (or empty) directory for the LoRA adapter"),
        },
    }
}

impl PeftAdapter {
    /// The adapter as an exact PEFT LoRA adapter, with `lora_B·lora_A = ΔW` for every module:
    /// `lora_A = diag(lambda_d)·A[:, :n]` `[r, n]` and `lora_B = diag(lambda_b)·B[:m, :]` `[m, r]`,
    /// each element the exact product of two stored values rounded once to `options.dtype` (to
    /// nearest, ties to even: exact in f32 when the lambdas and projections are f16 or bf16), with
    /// `n` from `options.in_features` (a VeRA adapter does not store it) and A, B the saved
    /// projections or those drawn from the seed with `options.sizes`.
    ///
    /// The config has `peft_type = "LORA"`, the same `r`, `lora_alpha = r` (scaling 1),
    /// `use_rslora = false`, `use_dora = false`, `lora_dropout = 0`, `fan_in_fan_out` carried over
    /// (LoRA's factors have these shapes whatever it says; it describes the base weight),
    /// `bias = "none"`, and `target_modules`, `task_type`, `base_model_name_or_path`, `revision`,
    /// `layers_to_transform`, `layers_pattern` and `auto_mapping` carried over. When the VeRA
    /// config leaves `target_modules` unspecified (PEFT's default for the architecture, which
    /// differs between VeRA and LoRA), the LoRA config lists the adapter's modules by name.
    ///
    /// Biases: PEFT does not save biases in a VeRA adapter file, whatever its `bias` setting says
    /// (a bias trained with `bias = "all"` or `"vera_only"` lives in the base model), so the
    /// export has none and says `bias = "none"`.
    ///
    /// Errors: [`Error::UnknownModule`] when a name of `options.in_features` covers no module;
    /// [`Error::MissingInFeatures`] when a module has no in_features; [`Error::TensorShape`] when
    /// it is 0; [`Error::ProjectionsTooSmall`] when it exceeds `n_max`; and those of
    /// [`PeftAdapter::projections`] (among them [`Error::MissingProjectionSizes`]).
    ///
    /// ```
    /// use vera_kernels::peft::{InFeatures, LoraExportOptions, PeftAdapter};
    ///
    /// let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/peft-vera-mlp/adapter");
    /// let adapter = PeftAdapter::load(dir)?;
    /// // The fixture's MLP: layers.0 is 48 -> 40, layers.1 40 -> 64, layers.2 64 -> 24.
    /// let n = InFeatures::new().with("layers.0", 48).with("layers.1", 40).with("layers.2", 64);
    /// let lora = adapter.to_lora(&LoraExportOptions::new(n))?;
    /// assert_eq!(lora.module("layers.1")?.lora_a().shape(), [16, 40]);
    /// assert_eq!(lora.module("layers.1")?.lora_b().shape(), [64, 16]);
    /// # let out = std::env::temp_dir().join(format!("vera-lora-doc-{}", std::process::id()));
    /// lora.save(&out)?; // adapter_config.json + adapter_model.safetensors, PEFT's LoRA layout
    /// # std::fs::remove_dir_all(&out).ok();
    /// # Ok::<(), vera_kernels::Error>(())
    /// ```
    pub fn to_lora(&self, options: &LoraExportOptions) -> Result<LoraAdapter> {
        options.in_features.check_names(self)?;
        let r = self.rank();
        let mut widths = BTreeMap::new();
        for name in self.modules().keys() {
            let n = options.in_features.of(name).ok_or_else(|| Error::MissingInFeatures { module: name.clone() })?;
            if n == 0 {
                return Err(Error::TensorShape {
                    path: String::new(),
                    key: lora_a_key(name),
                    expected: format!("[{r}, in_features] with in_features >= 1"),
                    actual: vec![r, 0],
                });
            }
            widths.insert(name.as_str(), n);
        }
        let projections = self.projections::<f32>(options.sizes)?;
        let (a, b) = projections.as_slices();
        let n_max = projections.n_max();
        let dtype = options.dtype;
        let mut modules = BTreeMap::new();
        for (name, module) in self.modules() {
            let (n, m) = (widths[name.as_str()], module.out_features());
            if n > n_max {
                return Err(Error::ProjectionsTooSmall {
                    module: name.clone(),
                    what: "in_features",
                    needed: n,
                    given: n_max,
                });
            }
            let adapter = module.adapter();
            let lora_a: Vec<f32> = adapter
                .lambda_d()
                .iter()
                .zip(a.chunks_exact(n_max))
                .flat_map(|(&d, row)| row[..n].iter().map(move |&v| round_product(d, v, dtype)))
                .collect();
            let lora_b: Vec<f32> = adapter
                .lambda_b()
                .iter()
                .zip(b.chunks_exact(r))
                .flat_map(|(&l, row)| row.iter().map(move |&v| round_product(l, v, dtype)))
                .collect();
            let lora_a = Tensor::new(dtype, vec![r, n], lora_a)?;
            let lora_b = Tensor::new(dtype, vec![m, r], lora_b)?;
            modules.insert(name.clone(), LoraModule { lora_a, lora_b });
        }
        Ok(LoraAdapter { r, config: self.lora_config(), modules })
    }

    /// The LoRA `adapter_config.json` object (see [`PeftAdapter::to_lora`]).
    fn lora_config(&self) -> Map<String, Value> {
        let c = self.config();
        let mut map = Map::new();
        let mut set = |k: &str, v: Value| {
            map.insert(k.to_string(), v);
        };
        set("peft_type", Value::from("LORA"));
        set("r", Value::from(c.r));
        set("lora_alpha", Value::from(c.r));
        set("use_rslora", Value::Bool(false));
        set("use_dora", Value::Bool(false));
        set("lora_dropout", Value::from(0.0));
        set("fan_in_fan_out", Value::Bool(c.fan_in_fan_out));
        set("bias", Value::from("none"));
        set("init_lora_weights", Value::Bool(true));
        set("inference_mode", Value::Bool(true));
        set("modules_to_save", Value::Null);
        set("rank_pattern", Value::Object(Map::new()));
        set("alpha_pattern", Value::Object(Map::new()));
        let targets = match &c.target_modules {
            TargetModules::Names(names) => Value::from(names.clone()),
            TargetModules::Pattern(p) => Value::from(p.clone()),
            TargetModules::Unspecified => Value::from(self.modules().keys().cloned().collect::<Vec<_>>()),
        };
        set("target_modules", targets);
        for key in [
            "task_type",
            "base_model_name_or_path",
            "revision",
            "layers_to_transform",
            "layers_pattern",
            "auto_mapping",
        ] {
            let carried = c.field(key).and_then(|text| serde_json::from_str(&text).ok());
            set(key, carried.unwrap_or(Value::Null));
        }
        map
    }
}

/// `x·y` rounded once to `dtype` (to nearest, ties to even), widened back to f32 (exact).
///
/// The product of two f32 values is exact in f64 (48 significant bits), and rounding it to f32
/// is then the one rounding. For f16 and bf16 the f64 product is first rounded to f32 *to odd*
/// (truncated, with the last bit set when inexact): with f32's 13 or 16 more bits than the target,
/// rounding that to nearest gives the correctly rounded result (Boldo and Melquiond, 2008), where
/// rounding to nearest twice may not.
fn round_product(x: f32, y: f32, dtype: DType) -> f32 {
    let p = f64::from(x) * f64::from(y);
    match dtype {
        DType::F32 => p as f32,
        DType::F16 => f16::from_f32(round_to_odd(p)).to_f32(),
        DType::BF16 => bf16::from_f32(round_to_odd(p)).to_f32(),
    }
}

/// `p` rounded to f32 toward zero, with the last significand bit set when that was inexact.
/// NaN stays NaN; a finite `p` beyond f32's range becomes the largest f32 of its sign with the
/// last bit set (f32::MAX, odd), which any narrower dtype rounds to infinity as it should.
fn round_to_odd(p: f64) -> f32 {
    let nearest = p as f32;
    if p.is_nan() || f64::from(nearest) == p {
        return nearest;
    }
    // Toward zero: step back one ulp when rounding to nearest went away from zero (for an
    // overflow to infinity the step lands on f32::MAX).
    let truncated = if f64::from(nearest).abs() > p.abs() { f32::from_bits(nearest.to_bits() - 1) } else { nearest };
    f32::from_bits(truncated.to_bits() | 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The neighbours of `v` in `dtype` (one unit in the last place below and above).
    fn neighbours(v: f32, dtype: DType) -> [f64; 2] {
        let step = |up: bool| -> f64 {
            match dtype {
                DType::F32 => f64::from(if up { v.next_up() } else { v.next_down() }),
                DType::F16 => {
                    let h = f16::from_f32(v);
                    let bits = h.to_bits();
                    let away = (bits & 0x8000 == 0) == up;
                    let b = if h.to_f32() == 0.0 && !up {
                        0x8001
                    } else if h.to_f32() == 0.0 {
                        1
                    } else if away {
                        bits + 1
                    } else {
                        bits - 1
                    };
                    f64::from(f16::from_bits(b).to_f32())
                }
                DType::BF16 => {
                    let h = bf16::from_f32(v);
                    let bits = h.to_bits();
                    let away = (bits & 0x8000 == 0) == up;
                    let b = if h.to_f32() == 0.0 && !up {
                        0x8001
                    } else if h.to_f32() == 0.0 {
                        1
                    } else if away {
                        bits + 1
                    } else {
                        bits - 1
                    };
                    f64::from(bf16::from_bits(b).to_f32())
                }
            }
        };
        [step(false), step(true)]
    }

    #[test]
    fn products_are_rounded_once_to_nearest_even() {
        let mut g = crate::rng::TorchCpuGenerator::manual_seed(7);
        let mut xs = vec![0.0f32; 4000];
        g.fill_uniform_f32(&mut xs, -3.0, 3.0);
        let mut pairs: Vec<(f32, f32)> = xs.chunks_exact(2).map(|c| (c[0], c[1])).collect();
        // (1 + h - 2^-20)·(1 + 2^-20) = 1 + h + 2^-20·h - 2^-40 lies just above 1 + h, half an ulp
        // of bf16 (h = 2^-8) or f16 (h = 2^-11) above 1: rounded to f32 it lands on that tie, which
        // rounding to nearest even again would take down to 1; the right answer is 1 + 2h.
        for h in [2f32.powi(-8), 2f32.powi(-11)] {
            let (x, y) = (1.0 + h - 2f32.powi(-20), 1.0 + 2f32.powi(-20));
            pairs.extend([(x, y), (-x, y)]);
        }
        pairs.extend([(3.0e38, 10.0), (1.0e-30, 1.0e-20), (0.0, -2.0), (f32::NAN, 1.0)]);
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            for &(x, y) in &pairs {
                let exact = f64::from(x) * f64::from(y);
                let got = round_product(x, y, dtype);
                if exact.is_nan() {
                    assert!(got.is_nan());
                    continue;
                }
                let reference = match dtype {
                    DType::F32 => exact as f32,
                    DType::F16 => f16::from_f64(exact).to_f32(),
                    DType::BF16 => bf16::from_f64(exact).to_f32(),
                };
                if got.is_infinite() || reference.is_infinite() {
                    assert_eq!(got, reference, "{x} * {y} in {dtype}");
                    continue;
                }
                // Nearest: no neighbour of the result is closer to the exact product; on a tie
                // the result has an even last bit.
                let err = (f64::from(got) - exact).abs();
                for nb in neighbours(got, dtype) {
                    let other = (nb - exact).abs();
                    assert!(err <= other, "{x} * {y} = {exact:e} in {dtype}: got {got:e}, {nb:e} is closer");
                    if err == other && err > 0.0 {
                        let bits = match dtype {
                            DType::F32 => got.to_bits(),
                            DType::F16 => u32::from(f16::from_f32(got).to_bits()),
                            DType::BF16 => u32::from(bf16::from_f32(got).to_bits()),
                        };
                        assert_eq!(bits & 1, 0, "{x} * {y} in {dtype}: a tie not rounded to even");
                    }
                }
            }
        }
    }

    #[test]
    fn ties_after_rounding_to_f32_go_the_right_way() {
        let (x, y) = (1.0 + 2f32.powi(-8) - 2f32.powi(-20), 1.0 + 2f32.powi(-20));
        assert_eq!(round_product(x, y, DType::BF16), 1.0 + 2f32.powi(-7));
        assert_eq!(bf16::from_f32(x * y).to_f32(), 1.0, "rounding to nearest twice would give 1");
        let (x, y) = (1.0 + 2f32.powi(-11) - 2f32.powi(-20), 1.0 + 2f32.powi(-20));
        assert_eq!(round_product(x, y, DType::F16), 1.0 + 2f32.powi(-10));
    }

    #[test]
    fn round_to_odd_sets_the_sticky_bit() {
        assert_eq!(round_to_odd(1.0), 1.0);
        let just_above = 1.0 + 2f64.powi(-30);
        assert_eq!(round_to_odd(just_above).to_bits(), 1.0f32.to_bits() | 1);
        assert_eq!(round_to_odd(-just_above).to_bits(), (-1.0f32).to_bits() | 1);
        // Just below 2: to nearest gives 2.0, toward zero the largest f32 below 2 (odd already).
        assert_eq!(round_to_odd(2.0 - 2f64.powi(-30)), 2.0f32.next_down());
        assert_eq!(round_to_odd(1e300), f32::MAX);
        assert_eq!(round_to_odd(-1e300), -f32::MAX);
    }
}
