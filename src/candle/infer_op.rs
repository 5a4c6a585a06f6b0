//! The inference path: the adapter as a custom op with no backward, accumulating into a copy of
//! the base layer's output in one pass (no graph is kept, nothing is saved for a backward).

use super::*;

// --- The inference path: the adapter as a custom op with no backward, accumulating into a copy of
// the base layer's output in one pass (no graph is kept, nothing is saved for a backward).

/// The adapter path of one frozen layer as a candle custom op: on `x` alone (the adapter's
/// contribution, [`CustomOp1`]) or on `x` and the base output (their sum, [`CustomOp2`]).
#[derive(Debug)]
pub(super) struct VeraOp {
    pub(super) layer: Arc<Layer>,
    pub(super) adapter: Arc<Adapter>,
}

impl VeraOp {
    /// `adapter(x)` for `x [t, n]`: accumulated into a copy of `base` when given, else alone.
    pub(super) fn run<T: Element + candle_core::WithDType>(
        &self,
        x: &[T],
        t: usize,
        base: Option<&[T]>,
    ) -> candle_core::Result<Vec<T>> {
        run_layer(&self.layer, x, t, base, |p, x, y, mode| forward(p, &self.adapter, x, y, mode))
    }

    /// [`VeraOp::run`] on candle storage: `x` (and the base output, when given) read as `T`, the
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

impl CustomOp1 for VeraOp {
    fn name(&self) -> &'static str {
        "vera-adapter"
    }

    /// The adapter's contribution alone.
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (t, dims) = self.layer.rows(l)?;
        let dtype = storage_dtype("x", s)?;
        let storage = with_element_type!(dtype, T => self.run_storage::<T>((s, l), t, None)?);
        Ok((storage, Shape::from(dims)))
    }
}

impl CustomOp2 for VeraOp {
    fn name(&self) -> &'static str {
        "vera-linear"
    }

    /// `base + adapter(x)`, accumulated into a copy of `base`.
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

/// A layer's forward for `x [t, n]`: `call(projections, x, y, mode)` into a copy of `base`
/// (accumulating) when given, else into zeros (overwriting); returns `y`. Shared by the
/// single-adapter and the bank ops.
pub(super) fn run_layer<T: Element + candle_core::WithDType>(
    layer: &Layer,
    x: &[T],
    t: usize,
    base: Option<&[T]>,
    call: impl FnOnce(&Projections<T>, MatRef<'_, T>, MatMut<'_, T>, Mode) -> crate::error::Result<()>,
) -> candle_core::Result<Vec<T>> {
    let (n, m) = (layer.in_features, layer.out_features);
    let (mut y, mode) = match base {
        Some(b) => (b.to_vec(), Mode::Accumulate),
        None => (vec![T::default(); buffer_len("y [T, out_features]", t, m)?], Mode::Overwrite),
    };
    let x = MatRef::from_slice(x, t, n).map_err(wrap)?;
    let y_view = MatMut::from_slice(&mut y, t, m).map_err(wrap)?;
    call(layer.projections.get::<T>(), x, y_view, mode).map_err(wrap)?;
    Ok(y)
}
