//! Plain types shared by the front end (`ops`, `baseline`, `candle`) and every backend (`cpu`,
//! `cuda`): the output mode, the dimensions of a call, and the one shape check of a forward call.
//! Nothing here knows about a backend.

use crate::error::{Error, Result};

/// How the forward pass treats the output buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Mode {
    /// `y += adapter(x)`: `y` already holds the frozen layer's output (the common case).
    Accumulate,
    /// `y = adapter(x)`: `y`'s previous contents are ignored (they may even be NaN).
    Overwrite,
}

/// What a kernel's arithmetic does beyond f32 accumulation, as the error bounds of
/// [`crate::reference`] take it (a tier's facts, see [`crate::TierFacts::numerics`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Numerics {
    /// `u = lambda_d ⊙ h` is rounded to the activation dtype before the up-projection (as PEFT
    /// does), instead of staying in f32.
    pub rounds_u: bool,
    /// Subnormal inputs and results are flushed to zero (`vdpbf16ps`, `tdpbf16ps`).
    pub flushes_subnormals: bool,
    /// The backward's products take their left operands (`lambda_d ⊙ h`, `dy ⊙ lambda_b`,
    /// `g ⊙ lambda_d`) rounded to the activation dtype, as PEFT's autograd does in bf16, and flush
    /// subnormals (bf16 on `vdpbf16ps` and on the `amx` tier's tiles), instead of keeping them in
    /// f32.
    pub rounds_backward: bool,
    /// The forward's f16 products run on bf16 tiles with each operand split into a high and a low
    /// bf16 part (`x`, A and B exactly; `u` to 16 bits), the low·low products left out: each
    /// product term carries a relative error of at most about 2^-15, and each dot product is three
    /// times as long (the `amx` tier's f16 prefill: [`crate::Layout::Split`]); the backward's
    /// products likewise, their f32 left operands (`lambda_d ⊙ h`, `dy ⊙ lambda_b`, `g ⊙ lambda_d`)
    /// split to 16 bits, and merge, unmerge and ΔW (`diag(lambda_b)·B·diag(lambda_d)` split to 16
    /// bits against A's exact parts).
    pub splits_products: bool,
    /// Merge, unmerge and ΔW run on bf16 tiles, their f32 left operand `diag(lambda_b)·B·diag(lambda_d)`
    /// split into three bf16 parts (to within 2^-24 of each value) against A's exact bf16 values:
    /// each dot product three times as long, subnormals flushed (the `amx` tier's bf16 merge).
    pub splits_delta: bool,
}

/// The sizes of one layer's projections: A `[r, n]` sliced from `[r, n_max]`, B `[m, r]` sliced
/// from `[m_max, r]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct LayerDims {
    pub r: usize,
    pub n: usize,
    pub m: usize,
}

/// The lengths of one adapter's vectors: `lambda_d`, `lambda_b` and the optional bias.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct AdapterDims {
    pub r: usize,
    pub m: usize,
}

/// Checks that a layer of `n` inputs and `m` outputs fits projections of `n_max` / `m_max`.
pub(crate) fn check_fits(n: usize, m: usize, n_max: usize, m_max: usize) -> Result<()> {
    if n > n_max {
        return Err(Error::LayerExceedsProjections { what: "in_features", layer: n, max: n_max });
    }
    if m > m_max {
        return Err(Error::LayerExceedsProjections { what: "out_features", layer: m, max: m_max });
    }
    Ok(())
}

/// Checks an adapter against a layer of rank `r` with `m` outputs.
pub(crate) fn check_adapter(adapter: AdapterDims, r: usize, m: usize) -> Result<()> {
    if adapter.r != r {
        return Err(Error::RankMismatch { what: "lambda_d", expected: r, actual: adapter.r });
    }
    if adapter.m != m {
        return Err(Error::LengthMismatch {
            what: "lambda_b (must equal the layer's out_features)",
            expected: m,
            actual: adapter.m,
        });
    }
    Ok(())
}

/// How the shape check names the forward's output `y`.
pub(crate) const Y: &str = "y (must be [T, out_features])";
/// How the shape check names the backward's upstream gradient `dy`, which has `y`'s shape.
pub(crate) const DY: &str = "dy (must be [T, out_features])";

/// The shape check of one forward (or backward) call, the same on every backend: `x [t, n]` and
/// an output-shaped buffer `[t, m]` (when given, with the name errors use: [`Y`] or [`DY`])
/// against the layer, and the adapter against the layer.
pub(crate) fn check_forward(
    layer: LayerDims,
    adapter: AdapterDims,
    x: [usize; 2],
    y: Option<([usize; 2], &'static str)>,
) -> Result<()> {
    check_adapter(adapter, layer.r, layer.m)?;
    let [t, n] = x;
    if n != layer.n {
        return Err(Error::ShapeMismatch { what: "x (must be [T, in_features])", expected: [t, layer.n], actual: x });
    }
    if let Some((shape, what)) = y {
        if shape != [t, layer.m] {
            return Err(Error::ShapeMismatch { what, expected: [t, layer.m], actual: shape });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const LAYER: LayerDims = LayerDims { r: 4, n: 10, m: 6 };

    #[test]
    fn every_mismatch_is_named_with_its_numbers() {
        let ok = AdapterDims { r: 4, m: 6 };
        assert!(check_forward(LAYER, ok, [3, 10], Some(([3, 6], Y))).is_ok());
        let cases = [
            (AdapterDims { r: 5, m: 6 }, [3, 10], Some([3, 6]), "lambda_d"),
            (AdapterDims { r: 4, m: 7 }, [3, 10], Some([3, 6]), "lambda_b"),
            (ok, [3, 11], Some([3, 6]), "x (must"),
            (ok, [3, 10], Some([2, 6]), "y (must"),
            (ok, [3, 10], Some([3, 5]), "y (must"),
        ];
        for (adapter, x, y, what) in cases {
            let err = check_forward(LAYER, adapter, x, y.map(|y| (y, Y))).unwrap_err().to_string();
            assert!(err.contains(what), "{err}");
        }
        assert!(check_fits(10, 6, 9, 6).unwrap_err().to_string().contains("in_features"));
        assert!(check_fits(10, 7, 10, 6).unwrap_err().to_string().contains("out_features"));
        assert!(check_fits(10, 6, 10, 6).is_ok());
    }
}
