//! `adapter_config.json`: the VeRA fields of a PEFT adapter config, read with PEFT's defaults and
//! written back with every other field kept.

use std::path::Path;

use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// The fields held in [`VeraConfig`]'s own fields (with `peft_type`, always `"VERA"`).
const VERA_FIELDS: &[&str] = &[
    "peft_type",
    "r",
    "projection_prng_key",
    "save_projection",
    "d_initial",
    "fan_in_fan_out",
    "target_modules",
    "bias",
    "vera_dropout",
];

/// Which modules of the base model PEFT adapted (`target_modules`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TargetModules {
    /// Module names: a module is targeted when its name equals one of them or ends with
    /// `"." + name` (PEFT's rule).
    Names(Vec<String>),
    /// A regular expression that the full module name must match (kept as text, not evaluated).
    Pattern(String),
    /// `null`: PEFT's defaults for the model architecture were used.
    Unspecified,
}

impl TargetModules {
    /// Whether a module name is targeted. Always `true` for [`TargetModules::Pattern`] and
    /// [`TargetModules::Unspecified`], which this crate does not evaluate.
    pub fn matches(&self, module: &str) -> bool {
        match self {
            TargetModules::Names(names) => names.iter().any(|t| {
                module == t
                    || (module.len() > t.len()
                        && module.ends_with(t.as_str())
                        && module.as_bytes()[module.len() - t.len() - 1] == b'.')
            }),
            TargetModules::Pattern(_) | TargetModules::Unspecified => true,
        }
    }

    fn to_json(&self) -> Value {
        match self {
            TargetModules::Names(names) => Value::Array(names.iter().map(|n| Value::String(n.clone())).collect()),
            TargetModules::Pattern(p) => Value::String(p.clone()),
            TargetModules::Unspecified => Value::Null,
        }
    }
}

/// Which biases PEFT trained alongside the adapter (`bias`). PEFT never saves biases in a VeRA
/// adapter file, whatever this says; it is kept so that the config round-trips.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum VeraBias {
    /// `"none"`.
    None,
    /// `"all"`.
    All,
    /// `"vera_only"`.
    VeraOnly,
}

impl VeraBias {
    /// The name PEFT uses.
    pub fn name(self) -> &'static str {
        match self {
            VeraBias::None => "none",
            VeraBias::All => "all",
            VeraBias::VeraOnly => "vera_only",
        }
    }
}

/// The VeRA fields of a PEFT `adapter_config.json` (`peft_type = "VERA"`).
///
/// Missing fields take PEFT's defaults (`r = 256`, `projection_prng_key = 0`,
/// `save_projection = true`, `d_initial = 0.1`, `vera_dropout = 0`, `fan_in_fan_out = false`,
/// `bias = "none"`). Fields this crate does not use (`task_type`, `peft_version`, ...) are kept
/// and written back unchanged by [`VeraConfig::to_json`].
#[derive(Clone, Debug, PartialEq)]
pub struct VeraConfig {
    /// The rank `r` of the shared projections.
    pub r: usize,
    /// The seed the projections are drawn from (PEFT's `projection_prng_key`).
    pub projection_prng_key: u64,
    /// Whether `vera_A` / `vera_B` are saved in the adapter file.
    pub save_projection: bool,
    /// The initial value of `lambda_d` (training only).
    pub d_initial: f64,
    /// Whether the base layers store their weight as `[in_features, out_features]` (GPT-2's
    /// `Conv1D`); it matters for merging only.
    pub fan_in_fan_out: bool,
    /// The adapted modules.
    pub target_modules: TargetModules,
    /// The `bias` setting.
    pub bias: VeraBias,
    /// The dropout on the adapter's input (training only).
    pub vera_dropout: f64,
    /// The other fields of the JSON object, written back as they were read.
    fields: Map<String, Value>,
}

impl VeraConfig {
    /// A config with PEFT's defaults for an adapter of rank `r` drawn from `projection_prng_key`
    /// that adapts `target_modules`, projections saved.
    pub fn new(r: usize, projection_prng_key: u64, target_modules: TargetModules) -> Self {
        let mut fields = Map::new();
        for (k, v) in [
            ("auto_mapping", Value::Null),
            ("base_model_name_or_path", Value::Null),
            ("inference_mode", Value::Bool(true)),
            ("init_weights", Value::Bool(true)),
            ("layers_pattern", Value::Null),
            ("layers_to_transform", Value::Null),
            ("modules_to_save", Value::Null),
            ("revision", Value::Null),
            ("task_type", Value::Null),
        ] {
            fields.insert(k.to_string(), v);
        }
        Self {
            r,
            projection_prng_key,
            save_projection: true,
            d_initial: 0.1,
            fan_in_fan_out: false,
            target_modules,
            bias: VeraBias::None,
            vera_dropout: 0.0,
            fields,
        }
    }

    /// Reads `adapter_config.json`.
    ///
    /// Errors: [`Error::Io`] when it cannot be read, otherwise as [`VeraConfig::from_json`].
    pub fn read(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read(path).map_err(|e| super::tensors::io_error(path, &e))?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses the text of an `adapter_config.json`.
    ///
    /// Errors: [`Error::InvalidConfig`] when it is not a JSON object, lacks `peft_type`, or a
    /// field has the wrong type or an impossible value (`r = 0`, a negative seed, an unknown
    /// `bias`, ...); [`Error::NotVera`] when `peft_type` is not `"VERA"`.
    pub fn from_json(text: &str) -> Result<Self> {
        Self::parse(text.as_bytes(), "")
    }

    fn parse(text: &[u8], path: &str) -> Result<Self> {
        let invalid = |message: String| Error::InvalidConfig { path: path.to_string(), message };
        let value: Value = serde_json::from_slice(text).map_err(|e| invalid(format!("not valid JSON: {e}")))?;
        let Value::Object(fields) = value else {
            return Err(invalid("not a JSON object".to_string()));
        };
        match fields.get("peft_type") {
            Some(Value::String(t)) if t == "VERA" => {}
            Some(Value::String(t)) => return Err(Error::NotVera { path: path.to_string(), peft_type: t.clone() }),
            Some(other) => return Err(invalid(format!("peft_type must be a string, found {other}"))),
            None => return Err(invalid("no peft_type field".to_string())),
        }
        // A field that is absent or null takes PEFT's default.
        let get = |name: &str| fields.get(name).filter(|v| !v.is_null());
        let wrong = |name: &str, want: &str, v: &Value| invalid(format!("{name} must be {want}, found {v}"));
        let uint = |name: &str, default: u64| -> Result<u64> {
            match get(name) {
                None => Ok(default),
                Some(v) => v.as_u64().ok_or_else(|| wrong(name, "a non-negative integer", v)),
            }
        };
        let boolean = |name: &str, default: bool| -> Result<bool> {
            match get(name) {
                None => Ok(default),
                Some(v) => v.as_bool().ok_or_else(|| wrong(name, "true or false", v)),
            }
        };
        let number = |name: &str, default: f64| -> Result<f64> {
            match get(name) {
                None => Ok(default),
                Some(v) => v.as_f64().filter(|x| x.is_finite()).ok_or_else(|| wrong(name, "a finite number", v)),
            }
        };

        let r = uint("r", 256)?;
        let r = usize::try_from(r)
            .ok()
            .filter(|&r| r >= 1)
            .ok_or_else(|| invalid(format!("r must be at least 1, found {r}")))?;
        let projection_prng_key = uint("projection_prng_key", 0)?;
        let save_projection = boolean("save_projection", true)?;
        let fan_in_fan_out = boolean("fan_in_fan_out", false)?;
        let d_initial = number("d_initial", 0.1)?;
        let vera_dropout = number("vera_dropout", 0.0)?;
        if !(0.0..=1.0).contains(&vera_dropout) {
            return Err(invalid(format!("vera_dropout must be in [0, 1], found {vera_dropout}")));
        }
        let bias = match get("bias") {
            None => VeraBias::None,
            Some(Value::String(s)) if s == "none" => VeraBias::None,
            Some(Value::String(s)) if s == "all" => VeraBias::All,
            Some(Value::String(s)) if s == "vera_only" => VeraBias::VeraOnly,
            Some(v) => return Err(wrong("bias", "\"none\", \"all\" or \"vera_only\"", v)),
        };
        let target_modules = match get("target_modules") {
            None => TargetModules::Unspecified,
            Some(Value::String(s)) => TargetModules::Pattern(s.clone()),
            Some(Value::Array(items)) => TargetModules::Names(
                items
                    .iter()
                    .map(|v| {
                        v.as_str()
                            .map(str::to_string)
                            .ok_or_else(|| wrong("target_modules", "a list of module names or a pattern", v))
                    })
                    .collect::<Result<_>>()?,
            ),
            Some(v) => return Err(wrong("target_modules", "a list of module names or a pattern", v)),
        };
        // The VeRA fields live in the struct; `fields` keeps the others.
        let mut fields = fields;
        for k in VERA_FIELDS {
            fields.remove(*k);
        }
        Ok(Self {
            r,
            projection_prng_key,
            save_projection,
            d_initial,
            fan_in_fan_out,
            target_modules,
            bias,
            vera_dropout,
            fields,
        })
    }

    /// The config as PEFT writes it: a JSON object with sorted keys, indented by two spaces,
    /// holding `peft_type = "VERA"`, the VeRA fields and every other field that was read.
    ///
    /// Errors: [`Error::InvalidConfig`] when `d_initial` or `vera_dropout` is not finite.
    pub fn to_json(&self) -> Result<String> {
        // serde_json's Map is sorted by key, as PEFT's json.dumps(sort_keys=True) output is.
        serde_json::to_string_pretty(&Value::Object(self.to_map()?))
            .map_err(|e| Error::InvalidConfig { path: String::new(), message: e.to_string() })
    }

    /// Writes [`VeraConfig::to_json`] to `path`, atomically (a temporary file, then a rename).
    ///
    /// Errors: as [`VeraConfig::to_json`], and [`Error::Io`].
    pub fn write(&self, path: impl AsRef<Path>) -> Result<()> {
        super::tensors::write_atomically(path.as_ref(), self.to_json()?.as_bytes())
    }

    /// The value of any field as [`VeraConfig::to_json`] writes it, as JSON text, e.g.
    /// `field("peft_version")`; `None` when the config has no such field.
    pub fn field(&self, name: &str) -> Option<String> {
        self.to_map().ok()?.get(name).map(Value::to_string)
    }

    fn to_map(&self) -> Result<Map<String, Value>> {
        let mut fields = self.fields.clone();
        let number = |name: &str, v: f64| {
            serde_json::Number::from_f64(v).map(Value::Number).ok_or_else(|| Error::InvalidConfig {
                path: String::new(),
                message: format!("{name} must be a finite number, found {v}"),
            })
        };
        let mut set = |k: &str, v: Value| {
            fields.insert(k.to_string(), v);
        };
        set("peft_type", Value::String("VERA".to_string()));
        set("r", Value::from(self.r));
        set("projection_prng_key", Value::from(self.projection_prng_key));
        set("save_projection", Value::Bool(self.save_projection));
        set("d_initial", number("d_initial", self.d_initial)?);
        set("fan_in_fan_out", Value::Bool(self.fan_in_fan_out));
        set("target_modules", self.target_modules.to_json());
        set("bias", Value::String(self.bias.name().to_string()));
        set("vera_dropout", number("vera_dropout", self.vera_dropout)?);
        Ok(fields)
    }
}
