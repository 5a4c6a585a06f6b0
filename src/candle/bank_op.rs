//! The custom ops of a [`VeraBankLinear`]: the inference op (no backward) and the differentiable
//! op, over the crate's mixed-adapter kernels, each row with its own adapter of the bank.

use super::*;

// --- The inference op: a bank's adapters as a custom op with no backward, accumulating into a
// copy of the base layer's output in one pass (no graph is kept, nothing is saved for a backward).

/// The adapter path of one call of a frozen bank layer, with that call's row → adapter map: on `x`
/// alone (the adapters' contribution, zeros for rows without one, [`CustomOp1`]) or on `x` and the
/// base output (their sum, [`CustomOp2`]).
pub(super) struct BankOp<'a> {
    pub(super) layer: &'a Layer,
    pub(super) bank: &'a AdapterBank,
    /// One entry per row of x: an index into the bank, or [`NO_ADAPTER`].
    pub(super) rows: &'a [i32],
}

impl BankOp<'_> {
    /// The adapters' contribution for `x [t, n]`: accumulated into a copy of `base` when given,
    /// else alone.
    pub(super) fn run<T: Element + candle_core::WithDType>(
        &self,
        x: &[T],
        t: usize,
        base: Option<&[T]>,
    ) -> candle_core::Result<Vec<T>> {
        run_layer(self.layer, x, t, base, |p, x, y, mode| forward_mixed(p, self.bank, self.rows, x, y, mode))
    }

    /// [`BankOp::run`] on candle storage: `x` (and the base output, when given) read as `T`, the
    /// result stored as `T`.
    pub(super) fn run_storage<T: Element + candle_core::WithDType>(
        &self,
        (xs, xl): (&CpuStorage, &Layout),
        t: usize,
        base: Option<(&CpuStorage, &Layout)>,
    ) -> candle_core::Result<CpuStorage> {
        let x = elements::<T>(xs, xl, "x")?;
        let base = base.map(|(bs, bl)| elements::<T>(bs, bl, "the base output")).transpose()?;
        Ok(T::to_cpu_storage_owned(self.run(x, t, base)?))
    }
}

impl CustomOp1 for BankOp<'_> {
    fn name(&self) -> &'static str {
        "vera-bank-adapter"
    }

    /// The adapters' contribution alone.
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (t, dims) = self.layer.rows(l)?;
        let dtype = storage_dtype("x", s)?;
        let storage = with_element_type!(dtype, T => self.run_storage::<T>((s, l), t, None)?);
        Ok((storage, Shape::from(dims)))
    }
}

impl CustomOp2 for BankOp<'_> {
    fn name(&self) -> &'static str {
        "vera-bank-linear"
    }

    /// `base + adapters(x)`, accumulated into a copy of `base`.
    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (t, dims) = self.layer.rows(xl)?;
        check_base(xs, (bs, bl), &dims)?;
        let dtype = storage_dtype("x", xs)?;
        let storage = with_element_type!(dtype, T => self.run_storage::<T>((xs, xl), t, Some((bs, bl)))?);
        Ok((storage, Shape::from(dims)))
    }
}

// --- The training op: as `TrainOp` for one adapter, with the bank's vectors as one f32 tensor,
// `cat(lambda_d [K·r], lambda_b [K·m][, bias [K·m]])`, its forward `forward_train_mixed` and its
// backward `backward_mixed` (each adapter's gradient summed over its own rows).

/// One forward call of a bank layer's adapter path with a backward: [`CustomOp3`] on
/// `(x, base output, vectors)`, [`CustomOp2`] on `(x, vectors)`. A fresh op is made per call (candle
/// keeps it in the graph until the output is dropped), holding that call's row map and
/// `h = x·Aᵀ` for its backward.
pub(super) struct BankTrainOp {
    pub(super) layer: Arc<Layer>,
    /// Whether adapter `k` has a bias; the vectors end with the biases `[K, m]` when any has one.
    pub(super) has_bias: Arc<[bool]>,
    /// One entry per row of x: an index into the bank, or [`NO_ADAPTER`].
    pub(super) rows: Vec<i32>,
    /// `h [T, r]` (f32) of this call's forward; `T·r·4` bytes, kept as long as the graph is.
    pub(super) saved_h: OnceLock<Vec<f32>>,
}

impl BankTrainOp {
    /// A fresh op for one forward call of `layer` with the row map `rows`.
    pub(super) fn new(layer: Arc<Layer>, has_bias: Arc<[bool]>, rows: Vec<i32>) -> Self {
        Self { layer, has_bias, rows, saved_h: OnceLock::new() }
    }

    /// Whether the vectors end with the biases.
    fn any_bias(&self) -> bool {
        self.has_bias.contains(&true)
    }

    /// The length of the vectors argument: `K·(r + m)`, and `K·m` more with biases.
    pub(super) fn vectors_len(&self) -> candle_core::Result<usize> {
        let (k, r, m) = (self.has_bias.len(), self.layer.rank(), self.layer.out_features);
        let per_adapter = r + m + if self.any_bias() { m } else { 0 };
        buffer_len("the bank's vectors [K, r + m (+ m)]", k, per_adapter)
    }

    /// The bank the kernels take, from the vectors argument.
    pub(super) fn bank(&self, vectors: &[f32]) -> candle_core::Result<AdapterBank> {
        let (k, r, m) = (self.has_bias.len(), self.layer.rank(), self.layer.out_features);
        let (lambda_d, rest) =
            vectors.split_at_checked(k * r).ok_or_else(|| misuse("the bank's vectors are too short"))?;
        let (lambda_b, bias) =
            rest.split_at_checked(k * m).ok_or_else(|| misuse("the bank's vectors are too short"))?;
        bank_from_vectors(lambda_d, lambda_b, self.any_bias().then_some(bias), &self.has_bias, r, m)
    }

    /// The op's output `[T, m]` in `T` (the adapters' contribution, added to a copy of `base`
    /// when given) and `h [T, r]`.
    pub(super) fn forward<T: Element + candle_core::WithDType>(
        &self,
        x: &[T],
        t: usize,
        base: Option<&[T]>,
        bank: &AdapterBank,
    ) -> candle_core::Result<(CpuStorage, Vec<f32>)> {
        let (n, m, r) = (self.layer.in_features, self.layer.out_features, self.layer.rank());
        let (mut y, mode) = match base {
            Some(b) => (b.to_vec(), Mode::Accumulate),
            None => (vec![T::default(); buffer_len("y [T, out_features]", t, m)?], Mode::Overwrite),
        };
        let mut h = vec![0.0f32; buffer_len("h [T, r]", t, r)?];
        forward_train_mixed(
            self.layer.projections.get::<T>(),
            bank,
            &self.rows,
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
        let bank = self.bank(f32_vector(vs, vl, "the bank's vectors", self.vectors_len()?)?)?;
        let dtype = storage_dtype("x", xs)?;
        let (storage, h) = with_element_type!(dtype, T => {
            let base = base.map(|(bs, bl)| elements::<T>(bs, bl, "the base output")).transpose()?;
            self.forward::<T>(elements::<T>(xs, xl, "x")?, t, base, &bank)?
        });
        // A fresh op per call: the cell is empty.
        let _ = self.saved_h.set(h);
        Ok((storage, Shape::from(dims)))
    }

    /// The fused mixed backward for `x` and `dy` in `T`: the vectors' gradient
    /// `cat(dlambda_d, dlambda_b[, dbias])` (each adapter's rows summed over its own rows of the
    /// batch; zero for an adapter without a row, and for the bias row of an adapter without a
    /// bias) and, when `want_dx`, the adapters' part of `dx`.
    pub(super) fn backward<T: Element + candle_core::WithDType>(
        &self,
        x: &Tensor,
        dy: &Tensor,
        bank: &AdapterBank,
        want_dx: bool,
    ) -> candle_core::Result<(Vec<f32>, Option<Tensor>)> {
        let (n, m, r, k) = (self.layer.in_features, self.layer.out_features, self.layer.rank(), bank.len());
        let (t, _) = self.layer.rows(x.layout())?;
        let (x_storage, x_layout) = x.storage_and_layout();
        let x_values = elements::<T>(cpu(&x_storage, "x")?, x_layout, "x")?;
        let (dy_storage, dy_layout) = dy.storage_and_layout();
        let dy_values = elements::<T>(cpu(&dy_storage, "the output's gradient")?, dy_layout, "the output's gradient")?;

        let mut dvectors = vec![0.0f32; self.vectors_len()?];
        let (dld, rest) = dvectors.split_at_mut(k * r);
        let (dlb, dbias) = rest.split_at_mut(k * m);
        let mut dx = vec![T::default(); if want_dx { buffer_len("dx [T, in_features]", t, n)? } else { 0 }];
        let mut grads = Gradients::new(dld, dlb);
        if self.any_bias() {
            grads = grads.with_bias(&mut *dbias);
        }
        if want_dx {
            grads = grads.with_x(MatMut::from_slice(&mut dx, t, n).map_err(wrap)?);
        }
        let saved_h = self.saved_h.get().map(|h| MatRef::from_slice(h, t, r)).transpose().map_err(wrap)?;
        backward_mixed(
            self.layer.projections.get::<T>(),
            bank,
            &self.rows,
            MatRef::from_slice(x_values, t, n).map_err(wrap)?,
            MatRef::from_slice(dy_values, t, m).map_err(wrap)?,
            saved_h,
            grads,
            Mode::Overwrite,
        )
        .map_err(wrap)?;
        // The kernels sum dy into every used adapter's bias row; an adapter without a bias has
        // nothing there to train.
        for (row, _) in dbias.chunks_exact_mut(m.max(1)).zip(self.has_bias.iter()).filter(|(_, &b)| !b) {
            row.fill(0.0);
        }
        let dx = want_dx.then(|| Tensor::from_vec(dx, x.shape(), x.device())).transpose()?;
        Ok((dvectors, dx))
    }

    /// The gradients of `x` (the adapters' part) and of the vectors, each only when that argument
    /// carries a gradient graph.
    pub(super) fn backward_tensors(
        &self,
        x: &Tensor,
        vectors: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Grads2> {
        let bank = self.bank(&f32_values(vectors, "the bank's vectors", self.vectors_len()?)?)?;
        let dy = output_gradient(res, grad_res)?;
        let x = x.contiguous()?;
        let want_dx = x.track_op();
        let dtype = element_dtype("x", x.dtype())?;
        let (dvectors, dx) = with_element_type!(dtype, T => self.backward::<T>(&x, &dy, &bank, want_dx)?);
        let dvectors = vectors.track_op().then(|| Tensor::from_vec(dvectors, vectors.shape(), vectors.device()));
        Ok((dx, dvectors.transpose()?))
    }
}

impl CustomOp2 for BankTrainOp {
    fn name(&self) -> &'static str {
        "vera-bank-adapter-train"
    }

    /// The adapters' contribution alone for `x [..., n]` (f32, f16 or bf16) in x's dtype, zeros
    /// for the rows without one; keeps `h` for the backward.
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

impl CustomOp3 for BankTrainOp {
    fn name(&self) -> &'static str {
        "vera-bank-linear-train"
    }

    /// `base + adapters(x)`, accumulated into a copy of `base` (the base layer's output, in x's
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
