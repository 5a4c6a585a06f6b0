//! Many adapters of one layer, stacked: the operand of the mixed-adapter calls
//! ([`forward_mixed`](crate::forward_mixed), [`backward_mixed`](crate::backward_mixed)), where each
//! row of a batch names its own adapter.
//!
//! VeRA's projections are shared by every adapter made with the same key and rank, so a batch whose
//! rows use different adapters runs the same two dense products as a batch with one adapter; only
//! the per-row scales differ.

use crate::adapter::Adapter;
use crate::cpu::scales::BankScales;
use crate::error::{Error, Result};

/// The row index that means "no adapter" in a mixed-adapter call: the row is left as it is under
/// [`Mode::Accumulate`](crate::Mode::Accumulate) and set to zero under
/// [`Mode::Overwrite`](crate::Mode::Overwrite) (PEFT's convention for rows without an adapter).
pub const NO_ADAPTER: i32 = -1;

/// `K` adapters of one layer: `lambda_d [K, r]`, `lambda_b [K, m]` and, for the adapters that have
/// one, a bias `[m]`; all of one rank `r` and one `out_features` `m`, made for the same shared
/// projections (checking that is the caller's: the bank holds only the vectors, see
/// [`PeftAdapters::bank`](crate::peft::PeftAdapters::bank) for adapters loaded from PEFT).
///
/// Memory: `K·(r + m)·4` bytes, plus `K·m·4` when any adapter has a bias.
///
/// ```
/// use vera_kernels::{Adapter, AdapterBank};
///
/// let a0 = Adapter::new(vec![0.1; 16], vec![0.5; 40])?;
/// let a1 = Adapter::new(vec![0.2; 16], vec![-0.5; 40])?;
/// let bank = AdapterBank::new(&[a0.clone(), a1])?;
/// assert_eq!((bank.len(), bank.rank(), bank.out_features()), (2, 16, 40));
/// assert_eq!(bank.adapter(0), Some(a0));
/// # Ok::<(), vera_kernels::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct AdapterBank {
    r: usize,
    m: usize,
    lambda_d: Vec<f32>,
    lambda_b: Vec<f32>,
    /// `[K, m]`, zeros for the adapters without a bias; empty when none has one.
    bias: Vec<f32>,
    has_bias: Vec<bool>,
}

impl AdapterBank {
    /// A bank of `adapters`, adapter `k` answering to row index `k`.
    ///
    /// Errors: [`Error::EmptyBank`] for no adapters; [`Error::RankMismatch`] /
    /// [`Error::LengthMismatch`] when an adapter's rank or `out_features` differs from the first's.
    pub fn new(adapters: &[Adapter]) -> Result<Self> {
        let first = adapters.first().ok_or(Error::EmptyBank)?;
        let (r, m) = (first.rank(), first.out_features());
        for a in adapters {
            if a.rank() != r {
                return Err(Error::RankMismatch {
                    what: "lambda_d of an adapter of the bank (must match the first adapter's)",
                    expected: r,
                    actual: a.rank(),
                });
            }
            if a.out_features() != m {
                return Err(Error::LengthMismatch {
                    what: "lambda_b of an adapter of the bank (must match the first adapter's)",
                    expected: m,
                    actual: a.out_features(),
                });
            }
        }
        let any_bias = adapters.iter().any(|a| a.bias().is_some());
        let mut bank = Self {
            r,
            m,
            lambda_d: Vec::with_capacity(adapters.len() * r),
            lambda_b: Vec::with_capacity(adapters.len() * m),
            bias: Vec::with_capacity(if any_bias { adapters.len() * m } else { 0 }),
            has_bias: Vec::with_capacity(adapters.len()),
        };
        for a in adapters {
            bank.lambda_d.extend_from_slice(a.lambda_d());
            bank.lambda_b.extend_from_slice(a.lambda_b());
            if any_bias {
                match a.bias() {
                    Some(b) => bank.bias.extend_from_slice(b),
                    None => bank.bias.resize(bank.bias.len() + m, 0.0),
                }
            }
            bank.has_bias.push(a.bias().is_some());
        }
        Ok(bank)
    }

    /// The number of adapters `K`.
    pub fn len(&self) -> usize {
        self.has_bias.len()
    }

    /// Always `false`: a bank holds at least one adapter.
    pub fn is_empty(&self) -> bool {
        self.has_bias.is_empty()
    }

    /// The rank `r` shared by every adapter.
    pub fn rank(&self) -> usize {
        self.r
    }

    /// The layer's `out_features` `m`.
    pub fn out_features(&self) -> usize {
        self.m
    }

    /// Every adapter's `lambda_d`, `[K, r]` row-major.
    pub fn lambda_d(&self) -> &[f32] {
        &self.lambda_d
    }

    /// Every adapter's `lambda_b`, `[K, m]` row-major.
    pub fn lambda_b(&self) -> &[f32] {
        &self.lambda_b
    }

    /// Adapter `k` (a copy), or `None` when `k >= len()`.
    pub fn adapter(&self, k: usize) -> Option<Adapter> {
        if k >= self.len() {
            return None;
        }
        let (r, m) = (self.r, self.m);
        let adapter =
            Adapter::new(self.lambda_d[k * r..(k + 1) * r].to_vec(), self.lambda_b[k * m..(k + 1) * m].to_vec())
                .expect("the bank's rank is at least 1");
        Some(match self.has_bias[k] {
            true => adapter.with_bias(self.bias[k * m..(k + 1) * m].to_vec()).expect("bias rows have length m"),
            false => adapter,
        })
    }

    /// Bytes the bank's vectors take: `K·(r + m)·4`, plus `K·m·4` when any adapter has a bias.
    pub fn bytes(&self) -> usize {
        (self.lambda_d.len() + self.lambda_b.len() + self.bias.len()) * size_of::<f32>()
    }

    /// Every adapter's bias, `[K, m]` row-major, zeros for the adapters without one; empty when no
    /// adapter has a bias. (What the CUDA backend uploads.)
    #[cfg(any(feature = "cuda", feature = "cuda-emulation"))]
    pub(crate) fn bias_table(&self) -> &[f32] {
        &self.bias
    }

    /// Whether each adapter has a bias (`[K]`).
    #[cfg(any(feature = "cuda", feature = "cuda-emulation"))]
    pub(crate) fn has_bias(&self) -> &[bool] {
        &self.has_bias
    }

    /// Checks a call's row → adapter map: one entry per row of `x`, each in `0..len()` or
    /// [`NO_ADAPTER`].
    pub(crate) fn check_rows(&self, rows: &[i32], t: usize) -> Result<()> {
        check_row_map(rows, t, self.len())
    }

    /// The bank and a checked row map as the drivers take them.
    pub(crate) fn scales<'a>(&'a self, rows: &'a [i32]) -> BankScales<'a> {
        BankScales {
            rows,
            lambda_d: &self.lambda_d,
            lambda_b: &self.lambda_b,
            bias: &self.bias,
            has_bias: &self.has_bias,
            r: self.r,
            m: self.m,
        }
    }
}

/// Checks a mixed-adapter call's row → adapter map against a bank of `adapters` adapters: one entry
/// per row of `x` (`t` rows), each in `0..adapters` or [`NO_ADAPTER`]. Every backend's check.
pub(crate) fn check_row_map(rows: &[i32], t: usize, adapters: usize) -> Result<()> {
    if rows.len() != t {
        return Err(Error::LengthMismatch {
            what: "row adapters (one index per row of x)",
            expected: t,
            actual: rows.len(),
        });
    }
    // The drivers index a call's rows with u32.
    if u32::try_from(t).is_err() {
        return Err(Error::SizeOverflow { what: "rows of a mixed-adapter call (at most 2^32 - 1)" });
    }
    match rows.iter().position(|&i| i != NO_ADAPTER && usize::try_from(i).map_or(true, |i| i >= adapters)) {
        Some(row) => Err(Error::AdapterIndex { row, index: i64::from(rows[row]), adapters }),
        None => Ok(()),
    }
}
