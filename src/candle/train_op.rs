//! The training path: the adapter as a differentiable custom op, its forward the crate's
//! `forward_train` and its backward the fused `backward`.

use super::*;

// --- The training path: the adapter as a differentiable custom op, its forward the crate's
// `forward_train` and its backward the fused `backward`. The adapter's vectors come in as one f32
// tensor, `cat(lambda_d, lambda_b[, bias])`, made by candle from the Vars (its backward splits
// the gradient back onto them), so that the op needs at most three arguments: `(x, base, vectors)`
// for a layer, accumulating into a copy of the base layer's output in one pass as the inference
// path does (and so with the same numbers), or `(x, vectors)` for the adapter's contribution alone.

/// The gradients of one backward call, each `None` for an argument that carries no gradient graph.
pub(super) type Grads2 = (Option<Tensor>, Option<Tensor>);
/// As [`Grads2`], for the three arguments of the layer form.
pub(super) type Grads3 = (Option<Tensor>, Option<Tensor>, Option<Tensor>);

/// One forward call of a layer's adapter path with a backward: [`CustomOp3`] on
/// `(x, base output, vectors)`, [`CustomOp2`] on `(x, vectors)`. A fresh op is made per call (candle
/// keeps it in the graph until the output is dropped), so that it can hold that call's
/// `h = x·Aᵀ` for its backward.
pub(super) struct TrainOp {
    pub(super) layer: Arc<Layer>,
    /// Whether the vectors end with the adapter's bias.
    pub(super) has_bias: bool,
    /// `h [T, r]` (f32) of this call's forward: all the backward needs besides its arguments;
    /// `T·r·4` bytes, kept as long as the graph is.
    pub(super) saved_h: OnceLock<Vec<f32>>,
}

impl TrainOp {
    /// A fresh op for one forward call of `layer`, whose vectors hold a bias when `has_bias`.
    pub(super) fn new(layer: Arc<Layer>, has_bias: bool) -> Self {
        Self { layer, has_bias, saved_h: OnceLock::new() }
    }

    /// The length of the vectors argument: `r + m`, and `m` more with a bias.
    pub(super) fn vectors_len(&self) -> usize {
        let m = self.layer.out_features;
        self.layer.rank() + m + if self.has_bias { m } else { 0 }
    }

    /// The adapter the kernels take, from `cat(lambda_d, lambda_b[, bias])`.
    pub(super) fn adapter(&self, vectors: &[f32]) -> candle_core::Result<Adapter> {
        let (r, m) = (self.layer.rank(), self.layer.out_features);
        let (lambda_d, rest) =
            vectors.split_at_checked(r).ok_or_else(|| misuse("the adapter's vectors are too short"))?;
        let (lambda_b, bias) = rest.split_at_checked(m).ok_or_else(|| misuse("the adapter's vectors are too short"))?;
        let adapter = Adapter::new(lambda_d.to_vec(), lambda_b.to_vec()).map_err(wrap)?;
        match self.has_bias {
            true => adapter.with_bias(bias.to_vec()).map_err(wrap),
            false => Ok(adapter),
        }
    }

    /// The op's output `[T, m]` in `T` (the adapter's contribution, added to a copy of `base`
    /// when given) and `h [T, r]`.
    pub(super) fn forward<T: Element + candle_core::WithDType>(
        &self,
        x: &[T],
        t: usize,
        base: Option<&[T]>,
        adapter: &Adapter,
    ) -> candle_core::Result<(CpuStorage, Vec<f32>)> {
        let (n, m, r) = (self.layer.in_features, self.layer.out_features, self.layer.rank());
        let (mut y, mode) = match base {
            Some(b) => (b.to_vec(), Mode::Accumulate),
            None => (vec![T::default(); buffer_len("y [T, out_features]", t, m)?], Mode::Overwrite),
        };
        let mut h = vec![0.0f32; buffer_len("h [T, r]", t, r)?];
        forward_train(
            self.layer.projections.get::<T>(),
            adapter,
            MatRef::from_slice(x, t, n).map_err(wrap)?,
            MatMut::from_slice(&mut y, t, m).map_err(wrap)?,
            mode,
            MatMut::from_slice(&mut h, t, r).map_err(wrap)?,
        )
        .map_err(wrap)?;
        Ok((T::to_cpu_storage_owned(y), h))
    }

    /// The forward of either form on candle storage; `base` (the layer form) must have the
    /// output's shape and x's dtype.
    pub(super) fn cpu_forward(
        &self,
        (xs, xl): (&CpuStorage, &Layout),
        base: Option<(&CpuStorage, &Layout)>,
        (vs, vl): (&CpuStorage, &Layout),
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (t, dims) = self.layer.rows(xl)?;
        if let Some((bs, bl)) = base {
            check_base(xs, (bs, bl), &dims)?;
        }
        let adapter = self.adapter(f32_vector(vs, vl, "the adapter's vectors", self.vectors_len())?)?;
        let dtype = storage_dtype("x", xs)?;
        let (storage, h) = with_element_type!(dtype, T => {
            let base = base.map(|(bs, bl)| elements::<T>(bs, bl, "the base output")).transpose()?;
            self.forward::<T>(elements::<T>(xs, xl, "x")?, t, base, &adapter)?
        });
        // A fresh op per call: the cell is empty, and a second forward of the same op (which candle
        // does not make) would only keep the first h, for the same x.
        let _ = self.saved_h.set(h);
        Ok((storage, Shape::from(dims)))
    }

    /// The fused backward for `x` and `dy` in `T`: the vectors' gradient
    /// `cat(dlambda_d, dlambda_b[, dbias])` and, when `want_dx`, the adapter's part of `dx`.
    pub(super) fn backward<T: Element + candle_core::WithDType>(
        &self,
        x: &Tensor,
        dy: &Tensor,
        adapter: &Adapter,
        want_dx: bool,
    ) -> candle_core::Result<(Vec<f32>, Option<Tensor>)> {
        let (n, m, r) = (self.layer.in_features, self.layer.out_features, self.layer.rank());
        let (t, _) = self.layer.rows(x.layout())?;
        let (x_storage, x_layout) = x.storage_and_layout();
        let x_values = elements::<T>(cpu(&x_storage, "x")?, x_layout, "x")?;
        let (dy_storage, dy_layout) = dy.storage_and_layout();
        let dy_values = elements::<T>(cpu(&dy_storage, "the output's gradient")?, dy_layout, "the output's gradient")?;

        let mut dvectors = vec![0.0f32; self.vectors_len()];
        let (dld, rest) = dvectors.split_at_mut(r);
        let (dlb, dbias) = rest.split_at_mut(m);
        let mut dx = vec![T::default(); if want_dx { buffer_len("dx [T, in_features]", t, n)? } else { 0 }];
        let mut grads = Gradients::new(dld, dlb);
        if self.has_bias {
            grads = grads.with_bias(dbias);
        }
        if want_dx {
            grads = grads.with_x(MatMut::from_slice(&mut dx, t, n).map_err(wrap)?);
        }
        let saved_h = self.saved_h.get().map(|h| MatRef::from_slice(h, t, r)).transpose().map_err(wrap)?;
        backward(
            self.layer.projections.get::<T>(),
            adapter,
            MatRef::from_slice(x_values, t, n).map_err(wrap)?,
            MatRef::from_slice(dy_values, t, m).map_err(wrap)?,
            saved_h,
            grads,
            Mode::Overwrite,
        )
        .map_err(wrap)?;
        let dx = want_dx.then(|| Tensor::from_vec(dx, x.shape(), x.device())).transpose()?;
        Ok((dvectors, dx))
    }

    /// The gradients of `x` (the adapter's part) and of the vectors, each only when that argument
    /// carries a gradient graph (a model's input needs no `dx`).
    pub(super) fn backward_tensors(
        &self,
        x: &Tensor,
        vectors: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Grads2> {
        let adapter = self.adapter(&f32_values(vectors, "the adapter's vectors", self.vectors_len())?)?;
        let dy = output_gradient(res, grad_res)?;
        let x = x.contiguous()?;
        let want_dx = x.track_op();
        let dtype = element_dtype("x", x.dtype())?;
        let (dvectors, dx) = with_element_type!(dtype, T => self.backward::<T>(&x, &dy, &adapter, want_dx)?);
        let dvectors = vectors.track_op().then(|| Tensor::from_vec(dvectors, vectors.shape(), vectors.device()));
        Ok((dx, dvectors.transpose()?))
    }
}

impl CustomOp2 for TrainOp {
    fn name(&self) -> &'static str {
        "vera-adapter-train"
    }

    /// The adapter's contribution alone, `lambda_b ⊙ ((lambda_d ⊙ (x·Aᵀ))·Bᵀ) (+ bias)`, for
    /// `x [..., n]` (f32, f16 or bf16) in x's dtype; keeps `h` for the backward.
    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.cpu_forward((xs, xl), None, (vs, vl))
    }

    fn bwd(&self, x: &Tensor, vectors: &Tensor, res: &Tensor, grad_res: &Tensor) -> candle_core::Result<Grads2> {
        self.backward_tensors(x, vectors, res, grad_res)
    }
}

impl CustomOp3 for TrainOp {
    fn name(&self) -> &'static str {
        "vera-linear-train"
    }

    /// `base + adapter(x)`, accumulated into a copy of `base` (the base layer's output, in x's
    /// dtype); keeps `h` for the backward.
    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.cpu_forward((xs, xl), Some((bs, bl)), (vs, vl))
    }

    /// The base output's gradient is the output's (the sum passes it through); candle carries it
    /// on through the base layer.
    fn bwd(
        &self,
        x: &Tensor,
        base: &Tensor,
        vectors: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Grads3> {
        let (dx, dvectors) = self.backward_tensors(x, vectors, res, grad_res)?;
        let dbase = base.track_op().then(|| grad_res.clone());
        Ok((dx, dbase, dvectors))
    }
}

/// The gradient candle hands a training op's backward for its output `res`, contiguous (candle may
/// hand a strided or broadcast one, e.g. from a mean; the kernels read rows), checked against the
/// output's shape and dtype.
pub(super) fn output_gradient(res: &Tensor, grad_res: &Tensor) -> candle_core::Result<Tensor> {
    let dy = grad_res.contiguous()?;
    if dy.dims() != res.dims() || dy.dtype() != res.dtype() {
        return Err(misuse(format!(
            "the output's gradient is {:?} {:?}, expected {:?} {:?} (the output's)",
            dy.dtype(),
            dy.dims(),
            res.dtype(),
            res.dims()
        )));
    }
    Ok(dy)
}
