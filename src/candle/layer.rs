//! What both custom ops know about a layer: its projections and its in/out features.

use super::*;

// --- Layer: what both custom ops know about a layer, its projections and its in/out features.

/// One layer's shape and the shared projections it slices.
#[derive(Debug)]
pub(super) struct Layer {
    pub(super) projections: Arc<VeraProjections>,
    pub(super) in_features: usize,
    pub(super) out_features: usize,
}

impl Layer {
    /// The rank of the projections.
    pub(super) fn rank(&self) -> usize {
        self.projections.f32().rank()
    }

    /// `x [..., in_features]` → `(T, [..., out_features])`: the rows the kernels see and the
    /// shape of the layer's output.
    pub(super) fn rows(&self, x: &Layout) -> candle_core::Result<(usize, Vec<usize>)> {
        match x.shape().dims().split_last() {
            Some((&n, lead)) if n == self.in_features => {
                let mut out = lead.to_vec();
                out.push(self.out_features);
                Ok((lead.iter().product(), out))
            }
            _ => Err(misuse(format!(
                "x has shape {:?}, expected [..., {}] (the layer's in_features)",
                x.shape().dims(),
                self.in_features
            ))),
        }
    }
}

/// `rows · cols`, the length of a new `[rows, cols]` buffer, or a candle error on overflow.
pub(super) fn buffer_len(what: &'static str, rows: usize, cols: usize) -> candle_core::Result<usize> {
    rows.checked_mul(cols).ok_or_else(|| wrap(Error::SizeOverflow { what }))
}

/// Checks the base output of a layer op: the output's shape, x's dtype.
pub(super) fn check_base(xs: &CpuStorage, (bs, bl): (&CpuStorage, &Layout), dims: &[usize]) -> candle_core::Result<()> {
    if bl.shape().dims() != dims {
        return Err(misuse(format!("the base layer's output has shape {:?}, expected {dims:?}", bl.shape().dims())));
    }
    if bs.dtype() != xs.dtype() {
        return Err(misuse(format!(
            "x ({:?}) and the base output ({:?}) must have the same dtype",
            xs.dtype(),
            bs.dtype()
        )));
    }
    Ok(())
}
