//! An adapter's vectors as the drivers and sinks take them: one adapter for every row of a call
//! ([`Scales`]), or a bank of adapters with each row's own ([`BankScales`], the mixed-adapter
//! calls). Plain slices, shapes validated by the front end.

/// One layer's adapter vectors: `lambda_d [r]`, `lambda_b [m]`, and the optional bias `[m]`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Scales<'a> {
    pub lambda_d: &'a [f32],
    pub lambda_b: &'a [f32],
    pub bias: Option<&'a [f32]>,
}

/// A bank's adapter vectors and each row's adapter: `lambda_d [K, r]`, `lambda_b [K, m]`, the
/// bias `[K, m]` of the adapters that have one, and per row of the call an index into the bank
/// (validated by the front end) or a negative value for "no adapter".
#[derive(Clone, Copy, Debug)]
pub(crate) struct BankScales<'a> {
    pub rows: &'a [i32],
    pub lambda_d: &'a [f32],
    pub lambda_b: &'a [f32],
    pub bias: &'a [f32],
    pub has_bias: &'a [bool],
    pub r: usize,
    pub m: usize,
}

impl<'a> BankScales<'a> {
    /// The vectors of row `t`'s adapter, or `None` for a row without one.
    #[inline(always)]
    pub(crate) fn row(&self, t: usize) -> Option<Scales<'a>> {
        let k = usize::try_from(self.rows[t]).ok()?;
        let (r, m) = (self.r, self.m);
        Some(Scales {
            lambda_d: &self.lambda_d[k * r..(k + 1) * r],
            lambda_b: &self.lambda_b[k * m..(k + 1) * m],
            bias: self.has_bias[k].then(|| &self.bias[k * m..(k + 1) * m]),
        })
    }
}

/// The adapter vectors of a call: one adapter for every row, or a bank with each row's adapter.
#[derive(Clone, Copy, Debug)]
pub(crate) enum RowScales<'a> {
    One(Scales<'a>),
    Bank(BankScales<'a>),
}

impl<'a> RowScales<'a> {
    /// The vectors of row `t`'s adapter, or `None` for a row without one.
    #[inline(always)]
    pub(crate) fn row(&self, t: usize) -> Option<Scales<'a>> {
        match self {
            RowScales::One(s) => Some(*s),
            RowScales::Bank(b) => b.row(t),
        }
    }
}
