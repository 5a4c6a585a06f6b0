//! `VeraBankLinear`: a candle Linear with a bank of VeRA adapters, each row of a batch naming its
//! own (many fine-tunes served, or trained, in one batch), frozen (inference) or trainable.

use super::*;

// --- VeraBankLinear: a candle Linear with a bank of VeRA adapters, each row naming its own.

/// The trainable vectors of a [`VeraBankLinear`] as candle [`Var`]s (f32, whatever the activation
/// dtype), one row per adapter of the bank: hand [`VeraBankVars::all`] (or
/// [`VeraBankLinear::trainable_vars`]) to a candle-nn optimizer.
///
/// Clones of a layer share these Vars: a step of the optimizer updates every clone.
#[derive(Clone, Debug)]
pub struct VeraBankVars {
    pub(super) lambda_d: Var,
    pub(super) lambda_b: Var,
    pub(super) bias: Option<Var>,
}

impl VeraBankVars {
    /// Vars holding a bank's vectors.
    pub(super) fn new(bank: &AdapterBank, has_bias: &[bool]) -> candle_core::Result<Self> {
        let (k, r, m) = (bank.len(), bank.rank(), bank.out_features());
        let dev = &Device::Cpu;
        Ok(Self {
            lambda_d: Var::from_slice(bank.lambda_d(), (k, r), dev)?,
            lambda_b: Var::from_slice(bank.lambda_b(), (k, m), dev)?,
            bias: bank_bias(bank, has_bias).map(|b| Var::from_vec(b, (k, m), dev)).transpose()?,
        })
    }

    /// `lambda_d [K, r]`, row `k` adapter `k`'s.
    pub fn lambda_d(&self) -> &Var {
        &self.lambda_d
    }

    /// `lambda_b [K, out_features]`, row `k` adapter `k`'s.
    pub fn lambda_b(&self) -> &Var {
        &self.lambda_b
    }

    /// The adapters' additive biases `[K, out_features]`, when at least one adapter of the bank has
    /// one. The rows of the adapters without a bias stay zero: they get no gradient.
    pub fn bias(&self) -> Option<&Var> {
        self.bias.as_ref()
    }

    /// Every Var: `lambda_d`, `lambda_b`, then the bias when there is one.
    pub fn all(&self) -> Vec<Var> {
        [&self.lambda_d, &self.lambda_b].into_iter().chain(&self.bias).cloned().collect()
    }

    /// The Vars' current values as a bank (`has_bias[k]`: whether adapter `k` has a bias).
    ///
    /// Errors: a Var that no longer holds `[K, len]` f32 values (candle's `Var::set` keeps the shape
    /// and the dtype, so this is a candle error rather than a panic for what should not happen).
    pub(super) fn bank(&self, r: usize, m: usize, has_bias: &[bool]) -> candle_core::Result<AdapterBank> {
        let k = has_bias.len();
        let lambda_d = f32_rows(&self.lambda_d, "lambda_d", k, r)?;
        let lambda_b = f32_rows(&self.lambda_b, "lambda_b", k, m)?;
        let bias = self.bias.as_ref().map(|b| f32_rows(b, "bias", k, m)).transpose()?;
        bank_from_vectors(&lambda_d, &lambda_b, bias.as_deref(), has_bias, r, m)
    }
}

/// The values of a `[k, len]` f32 tensor (one of a bank's vectors), row-major.
fn f32_rows(t: &Tensor, what: &str, k: usize, len: usize) -> candle_core::Result<Vec<f32>> {
    if t.dims() != [k, len] {
        return Err(misuse(format!("{what} has shape {:?}, expected [{k}, {len}]", t.dims())));
    }
    f32_values(&t.flatten_all()?, what, k * len)
}

/// A bank's biases `[K, m]` row-major, zeros for the adapters without one; `None` when no adapter
/// has one.
fn bank_bias(bank: &AdapterBank, has_bias: &[bool]) -> Option<Vec<f32>> {
    if !has_bias.contains(&true) {
        return None;
    }
    let m = bank.out_features();
    let mut bias = Vec::with_capacity(bank.len() * m);
    for k in 0..bank.len() {
        match bank.adapter(k).as_ref().and_then(Adapter::bias) {
            Some(b) => bias.extend_from_slice(b),
            None => bias.resize(bias.len() + m, 0.0),
        }
    }
    Some(bias)
}

/// The bank holding `lambda_d [K, r]`, `lambda_b [K, m]` and, for the adapters with
/// `has_bias[k]`, row `k` of `bias [K, m]`.
pub(super) fn bank_from_vectors(
    lambda_d: &[f32],
    lambda_b: &[f32],
    bias: Option<&[f32]>,
    has_bias: &[bool],
    r: usize,
    m: usize,
) -> candle_core::Result<AdapterBank> {
    let short = || misuse("the bank's vectors are too short");
    let adapters = has_bias
        .iter()
        .enumerate()
        .map(|(k, &with_bias)| {
            let ld = lambda_d.get(k * r..(k + 1) * r).ok_or_else(short)?;
            let lb = lambda_b.get(k * m..(k + 1) * m).ok_or_else(short)?;
            let adapter = Adapter::new(ld.to_vec(), lb.to_vec()).map_err(wrap)?;
            match (with_bias, bias) {
                (true, Some(b)) => {
                    adapter.with_bias(b.get(k * m..(k + 1) * m).ok_or_else(short)?.to_vec()).map_err(wrap)
                }
                (true, None) => Err(short()),
                (false, _) => Ok(adapter),
            }
        })
        .collect::<candle_core::Result<Vec<_>>>()?;
    AdapterBank::new(&adapters).map_err(wrap)
}

/// A candle [`Linear`] with a bank of VeRA adapters for the same shared projections, each row of
/// the input naming its own: `forward(x, ids)[t] = linear(x)[t] + adapter_{ids[t]}(x[t])`, the
/// adapters computed by this crate's fused mixed-adapter kernels ([`forward_mixed`]: the two dense
/// products run once over the whole batch, as for one adapter; CPU, f32 / f16 / bf16). Row for
/// row, the output has the same bits as a [`VeraLinear`] holding that row's adapter.
///
/// The ids are a candle tensor with one id per row of `x [..., in_features]`: shape `[T]` (`x`'s
/// leading dimensions flattened, `T` their product) or `x`'s leading dimensions themselves, of
/// dtype
///
/// - `u32`: `0..K` names adapter `k` of the bank, **`u32::MAX` means no adapter**;
/// - `i64` (or `i32`): `0..K` names adapter `k`, **`-1` means no adapter**.
///
/// A row without an adapter gets the base layer's output alone (and zeros from
/// [`VeraBankLinear::adapter_forward`], PEFT's convention). Any other id, another dtype or another
/// number of ids is a candle error, before anything runs. The ids are read to the host on every
/// call, whatever their device.
///
/// As for [`VeraLinear`], a layer is built frozen, and runs one fused op with no graph unless its
/// input or base weights carry one; [`VeraBankLinear::into_trainable`] makes the bank's vectors
/// candle [`Var`]s `[K, r]` / `[K, out_features]` that `loss.backward()` reaches through the fused
/// mixed backward ([`backward_mixed`]: adapter `k`'s gradient sums over its own rows only), and
/// [`VeraBankLinear::freeze`] returns to the inference path with the trained values.
///
/// ```
/// use std::sync::Arc;
/// use candle_core::{DType, Device, Tensor};
/// use candle_nn::Linear;
/// use vera_kernels::candle::{VeraBankLinear, VeraProjections};
/// use vera_kernels::peft::PeftAdapters;
///
/// // A model saved by PEFT with three adapters, a0..a2.
/// let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/peft-vera-train/multi");
/// let set = PeftAdapters::load_saved(dir)?;
/// let projections = Arc::new(VeraProjections::from_peft_adapters(&set, None)?);
/// // The base model's layers.0: 48 -> 40.
/// let base = Linear::new(Tensor::zeros((40, 48), DType::F32, &Device::Cpu)?, None);
/// let layer = VeraBankLinear::from_peft(base, &set, "layers.0", projections)?;
/// let x = Tensor::ones((2, 3, 48), DType::F32, &Device::Cpu)?;
/// // Batch 0 asks a2, a0 and no adapter; batch 1 a1 three times.
/// let ids = Tensor::new(&[2i64, 0, -1, 1, 1, 1], &Device::Cpu)?;
/// let y = layer.forward(&x, &ids)?;
/// assert_eq!(y.dims(), &[2, 3, 40]);
/// assert_eq!(y.get(0)?.get(2)?.to_vec1::<f32>()?, vec![0.0; 40]); // the zero base layer alone
/// // u32 ids name "no adapter" u32::MAX; the ids may also have x's leading shape.
/// let ids = Tensor::new(&[[2u32, 0, u32::MAX], [1, 1, 1]], &Device::Cpu)?;
/// assert_eq!(layer.forward(&x, &ids)?.to_vec3::<f32>()?, y.to_vec3::<f32>()?);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone)]
pub struct VeraBankLinear {
    pub(super) base: Linear,
    pub(super) layer: Arc<Layer>,
    pub(super) bank: Arc<AdapterBank>,
    /// Whether adapter `k` has a bias (the bank stores zeros for those that have none).
    pub(super) has_bias: Arc<[bool]>,
    pub(super) vars: Option<VeraBankVars>,
}

impl std::fmt::Debug for VeraBankLinear {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VeraBankLinear")
            .field("in_features", &self.layer.in_features)
            .field("out_features", &self.layer.out_features)
            .field("rank", &self.bank.rank())
            .field("adapters", &self.bank.len())
            .field("trainable", &self.vars.is_some())
            .finish()
    }
}

impl VeraBankLinear {
    /// Wraps `base` (weight `[out_features, in_features]`, as candle stores it) with `bank`, frozen.
    /// Adapter `k` of the bank answers to id `k`.
    ///
    /// Errors (candle errors carrying this crate's [`Error`]): the weight is not 2-D, the bank's
    /// rank is not the projections', its `lambda_b` rows are not `out_features` long, or the layer
    /// is larger than the projections.
    pub fn new(base: Linear, bank: AdapterBank, projections: Arc<VeraProjections>) -> candle_core::Result<Self> {
        let (m, n) = base.weight().dims2()?;
        let p = projections.f32();
        p.slice(n, m).map_err(wrap)?;
        if bank.rank() != p.rank() {
            return Err(wrap(Error::RankMismatch {
                what: "lambda_d of the bank's adapters",
                expected: p.rank(),
                actual: bank.rank(),
            }));
        }
        if bank.out_features() != m {
            return Err(wrap(Error::LengthMismatch {
                what: "lambda_b of the bank's adapters (must equal the Linear's out_features)",
                expected: m,
                actual: bank.out_features(),
            }));
        }
        let has_bias: Arc<[bool]> =
            (0..bank.len()).map(|k| bank.adapter(k).is_some_and(|a| a.bias().is_some())).collect();
        let layer = Arc::new(Layer { projections, in_features: n, out_features: m });
        Ok(Self { base, layer, bank: Arc::new(bank), has_bias, vars: None })
    }

    /// Wraps `base` with a bank of `adapters`, adapter `k` answering to id `k`, frozen.
    ///
    /// Errors: those of [`AdapterBank::new`] (no adapters, ranks or `out_features` that differ) and
    /// of [`VeraBankLinear::new`].
    pub fn from_adapters(
        base: Linear,
        adapters: &[Adapter],
        projections: Arc<VeraProjections>,
    ) -> candle_core::Result<Self> {
        Self::new(base, AdapterBank::new(adapters).map_err(wrap)?, projections)
    }

    /// Wraps `base` with module `module` of every adapter of a PEFT set ([`PeftAdapters::bank`]),
    /// frozen: id `k` names `adapters.names()[k]` (see [`PeftAdapters::index_of`]). The projections
    /// are the set's ([`VeraProjections::from_peft_adapters`]).
    ///
    /// Errors: [`Error::UnknownModule`] when an adapter lacks the module, and as
    /// [`VeraBankLinear::new`].
    pub fn from_peft(
        base: Linear,
        adapters: &PeftAdapters,
        module: &str,
        projections: Arc<VeraProjections>,
    ) -> candle_core::Result<Self> {
        Self::new(base, adapters.bank(module).map_err(wrap)?, projections)
    }

    /// `linear(x) + adapter_{ids[t]}(x)` row for row, for `x [..., in_features]` (f32, f16 or
    /// bf16) and one adapter id per row (see the [type's docs](VeraBankLinear) for the ids' shape,
    /// dtypes and "no adapter"); the output is `[..., out_features]` in x's dtype.
    ///
    /// Errors: a non-CPU `x`, a dtype other than f32 / f16 / bf16, a last dimension that is not the
    /// layer's in_features; ids of another dtype or shape, or naming no adapter of the bank.
    pub fn forward(&self, x: &Tensor, ids: &Tensor) -> candle_core::Result<Tensor> {
        check_cpu_for(x, "VeraBankLinear")?;
        // Before the base layer runs, so that a wrong width is named as the layer's in_features.
        let rows = self.row_adapters(x, ids)?;
        // From candle's Linear, so that on the training path its gradient flows on to the weights
        // and x.
        let base = self.base.forward(x)?.contiguous()?;
        if self.needs_graph(x) {
            let (vectors, op) = self.train_op(rows)?;
            x.contiguous()?.apply_op3(&base, &vectors, op)
        } else {
            x.contiguous()?.apply_op2_no_bwd(&base, &self.op(&rows))
        }
    }

    /// The adapters' contribution alone, `adapter_{ids[t]}(x)` row for row, zeros for the rows
    /// without an adapter (PEFT's convention); differentiable when the layer is trainable or `x`
    /// carries a gradient graph.
    ///
    /// Errors: as [`VeraBankLinear::forward`].
    pub fn adapter_forward(&self, x: &Tensor, ids: &Tensor) -> candle_core::Result<Tensor> {
        check_cpu_for(x, "VeraBankLinear")?;
        let rows = self.row_adapters(x, ids)?;
        if self.vars.is_some() || x.track_op() {
            let (vectors, op) = self.train_op(rows)?;
            x.contiguous()?.apply_op2(&vectors, op)
        } else {
            x.contiguous()?.apply_op1_no_bwd(&self.op(&rows))
        }
    }

    /// The number of adapters `K` in the bank: the ids name `0..K`.
    pub fn num_adapters(&self) -> usize {
        self.bank.len()
    }

    /// The bank the frozen path uses: the one the layer was built (or last frozen) with. For a
    /// trainable layer these are its starting values; its current ones are
    /// [`VeraBankLinear::trained_bank`].
    pub fn bank(&self) -> &AdapterBank {
        &self.bank
    }

    /// The wrapped base layer.
    pub fn base(&self) -> &Linear {
        &self.base
    }

    /// The shared projections the layer slices.
    pub fn projections(&self) -> &Arc<VeraProjections> {
        &self.layer.projections
    }

    /// The same layer with the bank's `lambda_d [K, r]`, `lambda_b [K, out_features]` (and the
    /// biases `[K, out_features]`, when an adapter has one) as f32 candle [`Var`]s starting from the
    /// layer's current values; see [`VeraBankLinear::trainable_vars`]. A layer that is already
    /// trainable is returned as it is (its Vars kept).
    ///
    /// Errors: candle's, when a Var cannot be allocated.
    pub fn into_trainable(self) -> candle_core::Result<Self> {
        if self.vars.is_some() {
            return Ok(self);
        }
        let vars = VeraBankVars::new(&self.bank, &self.has_bias)?;
        Ok(Self { vars: Some(vars), ..self })
    }

    /// The same layer frozen with its current (trained) vectors: it runs the inference path again,
    /// and its Vars are no longer used. A frozen layer is returned as it is.
    ///
    /// Errors: as [`VeraBankLinear::trained_bank`].
    pub fn freeze(self) -> candle_core::Result<Self> {
        if self.vars.is_none() {
            return Ok(self);
        }
        let bank = Arc::new(self.trained_bank()?);
        Ok(Self { bank, vars: None, ..self })
    }

    /// Whether the vectors are candle Vars ([`VeraBankLinear::into_trainable`]).
    pub fn is_trainable(&self) -> bool {
        self.vars.is_some()
    }

    /// The trainable vectors, when the layer is trainable.
    pub fn vars(&self) -> Option<&VeraBankVars> {
        self.vars.as_ref()
    }

    /// The Vars to hand to an optimizer: `lambda_d`, `lambda_b` and the biases when there are any;
    /// empty for a frozen layer.
    pub fn trainable_vars(&self) -> Vec<Var> {
        self.vars.as_ref().map(VeraBankVars::all).unwrap_or_default()
    }

    /// The layer's current bank: the Vars' values for a trainable layer, the constants of a frozen
    /// one. Adapter `k` keeps a bias exactly when it had one.
    ///
    /// Errors: a Var whose shape or dtype no longer fits the layer.
    pub fn trained_bank(&self) -> candle_core::Result<AdapterBank> {
        match &self.vars {
            Some(vars) => vars.bank(self.layer.rank(), self.layer.out_features, &self.has_bias),
            None => Ok(self.bank.as_ref().clone()),
        }
    }

    /// Whether a forward of `x` must build a graph: the vectors are Vars, or `x` or the base
    /// layer's weights carry one (the fused no-backward op would cut their gradients).
    pub(super) fn needs_graph(&self, x: &Tensor) -> bool {
        self.vars.is_some()
            || x.track_op()
            || self.base.weight().track_op()
            || self.base.bias().is_some_and(Tensor::track_op)
    }

    /// The inference op of one call.
    pub(super) fn op<'a>(&'a self, rows: &'a [i32]) -> BankOp<'a> {
        BankOp { layer: &self.layer, bank: &self.bank, rows }
    }

    /// The bank's vectors as the training op's one f32 argument,
    /// `cat(lambda_d, lambda_b[, bias])` flattened (from the Vars, so that candle carries the
    /// gradient back onto each, or constants for a frozen layer), and the differentiable op of one
    /// call with these rows.
    pub(super) fn train_op(&self, rows: Vec<i32>) -> candle_core::Result<(Tensor, BankTrainOp)> {
        let vectors = match &self.vars {
            Some(v) => {
                let parts = [&v.lambda_d, &v.lambda_b]
                    .into_iter()
                    .chain(&v.bias)
                    .map(|var| var.as_tensor().flatten_all())
                    .collect::<candle_core::Result<Vec<_>>>()?;
                Tensor::cat(&parts, 0)?
            }
            None => {
                let b = &self.bank;
                let bias = bank_bias(b, &self.has_bias).unwrap_or_default();
                let values = [b.lambda_d(), b.lambda_b(), &bias].concat();
                let len = values.len();
                Tensor::from_vec(values, len, &Device::Cpu)?
            }
        };
        Ok((vectors, BankTrainOp::new(self.layer.clone(), self.has_bias.clone(), rows)))
    }

    /// The checked row → adapter map of a call on `x`, in the kernels' form (`NO_ADAPTER` for no
    /// adapter).
    pub(super) fn row_adapters(&self, x: &Tensor, ids: &Tensor) -> candle_core::Result<Vec<i32>> {
        let (t, _) = self.layer.rows(x.layout())?;
        let lead = &x.dims()[..x.rank() - 1];
        row_adapters(ids, lead, t, self.bank.len())
    }
}

/// The adapter of each of the `t` rows of an input whose leading dimensions are `lead`, from
/// `ids` (`[t]` or `lead`; u32 with `u32::MAX`, or i64 / i32 with `-1`, for no adapter), each
/// checked against a bank of `k` adapters.
pub(super) fn row_adapters(ids: &Tensor, lead: &[usize], t: usize, k: usize) -> candle_core::Result<Vec<i32>> {
    if ids.dims() != [t] && ids.dims() != lead {
        return Err(misuse(format!(
            "the adapter ids have shape {:?}, expected [{t}] (one per row of x) or {lead:?} (x's leading \
             dimensions)",
            ids.dims()
        )));
    }
    let flat = ids.reshape(t)?;
    match ids.dtype() {
        candle_core::DType::U32 => checked_ids(flat.to_vec1::<u32>()?, i64::from(u32::MAX), "u32::MAX", k),
        candle_core::DType::I64 => checked_ids(flat.to_vec1::<i64>()?, -1, "-1", k),
        candle_core::DType::I32 => checked_ids(flat.to_vec1::<i32>()?, -1, "-1", k),
        other => Err(misuse(format!(
            "the adapter ids have dtype {other:?}: expected u32 (u32::MAX for no adapter), i64 or i32 (-1 for no \
             adapter)"
        ))),
    }
}

/// `ids` as the kernels' row map: `none` → [`NO_ADAPTER`], `0..k` as is, anything else an error.
fn checked_ids<I: Copy + Into<i64>>(
    ids: Vec<I>,
    none: i64,
    none_name: &str,
    k: usize,
) -> candle_core::Result<Vec<i32>> {
    ids.into_iter()
        .enumerate()
        .map(|(row, id)| {
            let id: i64 = id.into();
            if id == none {
                return Ok(NO_ADAPTER);
            }
            match (usize::try_from(id), i32::try_from(id)) {
                (Ok(index), Ok(id)) if index < k => Ok(id),
                _ => Err(misuse(format!(
                    "row {row} has adapter id {id}, but the bank holds {k} adapters (valid: 0..{k}, or {none_name} \
                     for no adapter)"
                ))),
            }
        })
        .collect()
}
