//! `VeraLinear`: a candle Linear with a VeRA adapter, frozen (inference) or trainable.

use super::*;

// --- VeraLinear: a candle Linear with a VeRA adapter, frozen (inference) or trainable.

/// The trainable vectors of a [`VeraLinear`] as candle [`Var`]s (f32, whatever the activation
/// dtype): hand [`VeraVars::all`] (or [`VeraLinear::trainable_vars`]) to a candle-nn optimizer.
///
/// Clones of a layer share these Vars: a step of the optimizer updates every clone.
#[derive(Clone, Debug)]
pub struct VeraVars {
    pub(super) lambda_d: Var,
    pub(super) lambda_b: Var,
    pub(super) bias: Option<Var>,
}

impl VeraVars {
    /// Vars holding an adapter's vectors.
    pub(super) fn new(adapter: &Adapter) -> candle_core::Result<Self> {
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
    pub(super) fn all_tensors(&self) -> impl Iterator<Item = &Tensor> {
        [&self.lambda_d, &self.lambda_b].into_iter().chain(&self.bias).map(Var::as_tensor)
    }

    /// The Vars' current values as an adapter.
    ///
    /// Errors: a Var that no longer holds `[len]` f32 values (candle's `Var::set` keeps the shape and
    /// the dtype, so this is a candle error rather than a panic for what should not happen).
    pub(super) fn adapter(&self, r: usize, m: usize) -> candle_core::Result<Adapter> {
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
/// [module docs](crate::candle)). [`VeraLinear::into_trainable`] makes the vectors candle [`Var`]s that
/// `loss.backward()` reaches; [`VeraLinear::trained_adapter`] reads them back and
/// [`VeraLinear::freeze`] returns to the inference path with the trained values. A frozen layer on
/// an input that carries a graph passes the gradient through to the layers before it.
#[derive(Clone)]
pub struct VeraLinear {
    pub(super) base: Linear,
    pub(super) op: Arc<VeraOp>,
    pub(super) vars: Option<VeraVars>,
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
    pub(super) fn needs_graph(&self, x: &Tensor) -> bool {
        self.vars.is_some()
            || x.track_op()
            || self.base.weight().track_op()
            || self.base.bias().is_some_and(Tensor::track_op)
    }

    /// The adapter's vectors as the training op's one f32 argument, `cat(lambda_d, lambda_b[, bias])`,
    /// and whether it holds a bias: from the Vars (candle's `cat` carries the gradient back onto
    /// each), or constants for a frozen layer.
    pub(super) fn vectors(&self) -> candle_core::Result<(Tensor, bool)> {
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
    pub(super) fn train_op(&self, has_bias: bool) -> TrainOp {
        TrainOp::new(self.op.layer.clone(), has_bias)
    }

    /// The adapter's contribution alone through the differentiable op.
    pub(super) fn adapter_with_backward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (vectors, has_bias) = self.vectors()?;
        x.contiguous()?.apply_op2(&vectors, self.train_op(has_bias))
    }

    /// `linear(x) + adapter(x)` through the differentiable op: the base output from candle's
    /// Linear (so that its gradient flows on to the weights and `x`), the adapter added in one pass.
    pub(super) fn forward_with_backward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
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
