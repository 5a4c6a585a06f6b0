//! The kernels' parameter blocks, field for field as `struct DownParams` / `struct UpParams` in
//! `kernels/compat.cuh` (each kernel takes one of them by value as its only argument), and the one
//! place they are filled: [`launch_params`], shared by the GPU and the emulator, which differ only
//! in the [`Addresses`] they supply.

use super::plan::Plan;
use crate::error::{Error, Result};
use crate::types::{LayerDims, Mode};

/// `u[t][j] = lambda_d[k_t][j] · Σ_k x[t][k] · a[j][k]`, k split over `splits` blocks, with `k_t`
/// row `t`'s adapter: `rows_adapter[t]`, or 0 for every row when `rows_adapter` is null (one
/// adapter, `ld_lambda_d` 0).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct DownParams {
    pub x: u64,
    pub a: u64,
    pub lambda_d: u64,
    pub rows_adapter: u64,
    pub u: u64,
    pub part: u64,
    pub counters: u64,
    pub rows: i32,
    pub n: i32,
    pub r: i32,
    pub ldx: i32,
    pub lda: i32,
    pub k_split: i32,
    pub splits: i32,
    pub ldu: i32,
    pub x_align: i32,
    pub ld_lambda_d: i32,
}

/// `y[t][i] (+)= lambda_b[k_t][i] · Σ_j u[t][j] · b[i][j] + bias[k_t][i]`, the bias added when
/// adapter `k_t` has one (`has_bias[k_t]`, or every adapter when `has_bias` is null and `bias` is
/// not); `k_t` as in [`DownParams`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct UpParams {
    pub u: u64,
    pub part: u64,
    pub lambda_d: u64,
    pub b: u64,
    pub lambda_b: u64,
    pub bias: u64,
    pub has_bias: u64,
    pub rows_adapter: u64,
    pub y: u64,
    pub rows: i32,
    pub r: i32,
    pub m: i32,
    pub ldb: i32,
    pub ldu: i32,
    pub ldy: i32,
    pub accumulate: i32,
    pub ld_lambda_b: i32,
    pub y_paired: i32,
    pub splits: i32,
    pub ld_lambda_d: i32,
    pub unused: i32,
}

// The C side has the same fields in the same order with no padding: pointers, then ints
// (kernels/compat.cuh asserts the same sizes).
const _: () = assert!(std::mem::size_of::<DownParams>() == 7 * 8 + 10 * 4);
const _: () = assert!(std::mem::size_of::<UpParams>() == 9 * 8 + 12 * 4);

/// Kernel parameters are 32-bit: every size and stride must fit in an `i32`.
pub(crate) fn to_i32(v: usize, what: &'static str) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::SizeOverflow { what })
}

/// The widest of the kernels' 16-, 8- and 4-byte accesses that rows at `addr`, `stride_bytes` apart,
/// allow (16-byte vector loads, and `cp.async` copies of that size), or 0 for their
/// element-by-element path.
fn row_alignment(addr: u64, stride_bytes: usize) -> i32 {
    [16, 8, 4].into_iter().find(|&bytes| aligned_to(bytes, addr, stride_bytes) == 1).map_or(0, |b| b as i32)
}

/// Whether rows at `addr`, `stride_bytes` apart, allow the tile kernels' 4-byte accesses to two
/// adjacent 16-bit outputs (1), or need one access per output (0).
fn pair_aligned(addr: u64, stride_bytes: usize) -> i32 {
    aligned_to(4, addr, stride_bytes)
}

/// 1 when `addr` and every row `stride_bytes` after it are multiples of `bytes`, else 0.
fn aligned_to(bytes: usize, addr: u64, stride_bytes: usize) -> i32 {
    i32::from(addr.is_multiple_of(bytes as u64) && stride_bytes.is_multiple_of(bytes))
}

/// Row strides of a forward call's operands, in elements: x, the packed A and B, and y.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Strides {
    pub x: usize,
    pub a: usize,
    pub b: usize,
    pub y: usize,
}

/// The sizes, strides and mode of one forward call in the kernels' 32-bit integers. Made only by
/// [`Call::new`], so holding one means they all fit.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Call {
    rows: i32,
    n: i32,
    r: i32,
    m: i32,
    ldx: i32,
    lda: i32,
    ldb: i32,
    ldy: i32,
    /// Bytes from one row of x to the next (for the vector-load check of x), and of y (for the
    /// paired-store check).
    x_stride_bytes: usize,
    y_stride_bytes: usize,
    accumulate: bool,
}

impl Call {
    /// `rows` token rows through `layer`, with operands `strides` apart and elements of
    /// `elem_bytes` bytes. [`Error::SizeOverflow`] names the first size that does not fit an `i32`.
    pub(crate) fn new(layer: LayerDims, rows: usize, strides: Strides, elem_bytes: usize, mode: Mode) -> Result<Self> {
        let x_stride_bytes =
            strides.x.checked_mul(elem_bytes).ok_or(Error::SizeOverflow { what: "row stride of x, in bytes" })?;
        let y_stride_bytes =
            strides.y.checked_mul(elem_bytes).ok_or(Error::SizeOverflow { what: "row stride of y, in bytes" })?;
        Ok(Call {
            rows: to_i32(rows, "rows of x")?,
            n: to_i32(layer.n, "in_features")?,
            r: to_i32(layer.r, "rank")?,
            m: to_i32(layer.m, "out_features")?,
            ldx: to_i32(strides.x, "row stride of x")?,
            lda: to_i32(strides.a, "padded row of A")?,
            ldb: to_i32(strides.b, "padded row of B")?,
            ldy: to_i32(strides.y, "row stride of y")?,
            x_stride_bytes,
            y_stride_bytes,
            accumulate: mode == Mode::Accumulate,
        })
    }

    /// Whether the call has nothing to compute (no token rows or no outputs): no kernel is launched.
    pub(crate) fn is_empty(&self) -> bool {
        self.rows == 0 || self.m == 0
    }
}

/// The device addresses of one forward call's buffers, as a backend sees them: driver pointers
/// on a GPU, host pointers on the emulator.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Addresses {
    pub x: u64,
    pub a: u64,
    pub b: u64,
    /// One adapter's `lambda_d [r]` and `lambda_b [m]`, or a bank's `[K, r]` and `[K, m]` tables.
    pub lambda_d: u64,
    pub lambda_b: u64,
    /// `None` for an adapter without bias, or a bank in which no adapter has one (the kernels
    /// read a null pointer as "no bias").
    pub bias: Option<u64>,
    /// A bank's per-adapter bias flags (`[K]` i32), when it has a bias table; `None` for one
    /// adapter.
    pub has_bias: Option<u64>,
    /// A mixed-adapter call's row map (`[rows]` i32): with it the lambdas and bias are a bank's
    /// tables, `None` for one adapter.
    pub rows_adapter: Option<u64>,
    /// The workspace: split partial sums, u (written by the down-projection, read by the up), and
    /// the split counters.
    pub part: u64,
    pub u: u64,
    pub counters: u64,
    pub y: u64,
}

/// The two kernels' parameter blocks for one call: the plan's split of k and layout of u, the
/// call's sizes and strides, and the addresses of one backend's buffers.
///
/// Errors: [`Error::SizeOverflow`] when the plan's split or u stride does not fit an `i32`.
pub(crate) fn launch_params(plan: &Plan, call: &Call, at: &Addresses) -> Result<(DownParams, UpParams)> {
    let ldu = to_i32(plan.ldu, "row stride of u")?;
    // A bank's tables hold one row per adapter, r and m long; one adapter is every row's adapter
    // 0, at stride 0.
    let (ld_lambda_d, ld_lambda_b) = match at.rows_adapter {
        Some(_) => (call.r, call.m),
        None => (0, 0),
    };
    let down = DownParams {
        x: at.x,
        a: at.a,
        lambda_d: at.lambda_d,
        rows_adapter: at.rows_adapter.unwrap_or(0),
        u: at.u,
        part: at.part,
        // Null: the up-projection sums the splits (kernels/vera_decode.cu).
        counters: if plan.up_sums_splits { 0 } else { at.counters },
        rows: call.rows,
        n: call.n,
        r: call.r,
        ldx: call.ldx,
        lda: call.lda,
        k_split: to_i32(plan.k_split, "k split")?,
        splits: to_i32(plan.splits, "k splits")?,
        ldu,
        x_align: row_alignment(at.x, call.x_stride_bytes),
        ld_lambda_d,
    };
    let up = UpParams {
        u: at.u,
        part: at.part,
        lambda_d: at.lambda_d,
        b: at.b,
        lambda_b: at.lambda_b,
        bias: at.bias.unwrap_or(0),
        has_bias: at.has_bias.unwrap_or(0),
        rows_adapter: at.rows_adapter.unwrap_or(0),
        y: at.y,
        rows: call.rows,
        r: call.r,
        m: call.m,
        ldb: call.ldb,
        ldu,
        ldy: call.ldy,
        accumulate: i32::from(call.accumulate),
        ld_lambda_b,
        y_paired: pair_aligned(at.y, call.y_stride_bytes),
        splits: if plan.up_sums_splits { to_i32(plan.splits, "k splits")? } else { 0 },
        ld_lambda_d,
        unused: 0,
    };
    Ok((down, up))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cuda::plan::Options;
    use crate::dtype::DType;

    const ADDRESSES: Addresses = Addresses {
        x: 0x1000,
        a: 0x2000,
        b: 0x3000,
        lambda_d: 0x4000,
        lambda_b: 0x5000,
        bias: None,
        has_bias: None,
        rows_adapter: None,
        part: 0x6000,
        u: 0x7000,
        counters: 0x8000,
        y: 0x9000,
    };

    fn call(ldx: usize, elem_bytes: usize, mode: Mode) -> Call {
        let strides = Strides { x: ldx, a: 104, b: 16, y: 70 };
        Call::new(LayerDims { r: 10, n: 100, m: 70 }, 5, strides, elem_bytes, mode).unwrap()
    }

    #[test]
    fn every_field_comes_from_the_plan_the_call_or_the_addresses() {
        let plan = crate::cuda::plan::plan(DType::BF16, 5, 100, 10, 70, 132, Options::AUTO);
        let (down, up) = launch_params(&plan, &call(104, 2, Mode::Accumulate), &ADDRESSES).unwrap();
        assert_eq!(
            down,
            DownParams {
                x: 0x1000,
                a: 0x2000,
                lambda_d: 0x4000,
                rows_adapter: 0,
                u: 0x7000,
                part: 0x6000,
                counters: 0x8000,
                rows: 5,
                n: 100,
                r: 10,
                ldx: 104,
                lda: 104,
                k_split: plan.k_split as i32,
                splits: plan.splits as i32,
                ldu: plan.ldu as i32,
                x_align: 16,
                ld_lambda_d: 0,
            }
        );
        assert_eq!(
            up,
            UpParams {
                u: 0x7000,
                part: 0x6000,
                lambda_d: 0x4000,
                b: 0x3000,
                lambda_b: 0x5000,
                bias: 0,
                has_bias: 0,
                rows_adapter: 0,
                y: 0x9000,
                rows: 5,
                r: 10,
                m: 70,
                ldb: 16,
                ldu: plan.ldu as i32,
                ldy: 70,
                accumulate: 1,
                ld_lambda_b: 0,
                // 70 bf16 = 140 bytes between rows of y, at a 4-byte aligned address.
                y_paired: 1,
                splits: 0,
                ld_lambda_d: 0,
                unused: 0,
            }
        );
    }

    #[test]
    fn x_alignment_bias_and_mode_are_read_from_the_call() {
        let plan = crate::cuda::plan::plan(DType::F16, 5, 100, 10, 70, 132, Options::AUTO);
        // 100 f16 = 200 bytes between rows: a multiple of 8, not of 16.
        let (down, up) = launch_params(&plan, &call(100, 2, Mode::Overwrite), &ADDRESSES).unwrap();
        assert_eq!((down.x_align, up.accumulate), (8, 0));
        // 102 f16 = 204 bytes: a multiple of 4; 101 f16 = 202 bytes: of 2 only.
        assert_eq!(launch_params(&plan, &call(102, 2, Mode::Overwrite), &ADDRESSES).unwrap().0.x_align, 4);
        assert_eq!(launch_params(&plan, &call(101, 2, Mode::Overwrite), &ADDRESSES).unwrap().0.x_align, 0);
        // The start counts as much as the stride: 208 bytes between rows from an 8- or 2-byte boundary.
        let x_at = |x: u64| Addresses { x, bias: Some(0xa000), ..ADDRESSES };
        let (down, up) = launch_params(&plan, &call(104, 2, Mode::Accumulate), &x_at(0x1008)).unwrap();
        assert_eq!((down.x_align, up.bias), (8, 0xa000));
        assert_eq!(launch_params(&plan, &call(104, 2, Mode::Accumulate), &x_at(0x1002)).unwrap().0.x_align, 0);
    }

    #[test]
    fn paired_stores_need_y_and_its_row_stride_4_byte_aligned() {
        let plan = crate::cuda::plan::plan(DType::BF16, 5, 100, 10, 70, 132, Options::AUTO);
        let with_y = |y: u64, ldy: usize| {
            let strides = Strides { x: 104, a: 104, b: 16, y: ldy };
            let call = Call::new(LayerDims { r: 10, n: 100, m: 70 }, 5, strides, 2, Mode::Accumulate).unwrap();
            launch_params(&plan, &call, &Addresses { y, ..ADDRESSES }).unwrap().1.y_paired
        };
        assert_eq!(with_y(0x9000, 70), 1);
        // 71 bf16 = 142 bytes: every other row starts 2 bytes past a 4-byte boundary.
        assert_eq!(with_y(0x9000, 71), 0);
        assert_eq!(with_y(0x9002, 70), 0);
    }

    #[test]
    fn a_row_map_makes_the_lambdas_and_bias_tables_of_one_row_per_adapter() {
        let plan = crate::cuda::plan::plan(DType::F32, 5, 100, 10, 70, 132, Options::AUTO);
        let bank = Addresses { bias: Some(0xa000), has_bias: Some(0xb000), rows_adapter: Some(0xc000), ..ADDRESSES };
        let (down, up) = launch_params(&plan, &call(104, 4, Mode::Accumulate), &bank).unwrap();
        assert_eq!((down.rows_adapter, down.lambda_d, down.ld_lambda_d), (0xc000, 0x4000, 10));
        assert_eq!((up.rows_adapter, up.lambda_b, up.ld_lambda_b), (0xc000, 0x5000, 70));
        assert_eq!((up.bias, up.has_bias), (0xa000, 0xb000));
    }

    #[test]
    fn sizes_beyond_i32_are_named_errors() {
        let huge = 1usize << 31;
        let layer = LayerDims { r: 10, n: 100, m: 70 };
        let strides = Strides { x: 100, a: 104, b: 16, y: 70 };
        let e = Call::new(layer, huge, strides, 4, Mode::Accumulate).unwrap_err();
        assert_eq!(e, Error::SizeOverflow { what: "rows of x" });
        let e = Call::new(layer, 1, Strides { y: huge, ..strides }, 4, Mode::Accumulate).unwrap_err();
        assert_eq!(e, Error::SizeOverflow { what: "row stride of y" });
        assert!(Call::new(layer, 0, strides, 4, Mode::Accumulate).unwrap().is_empty());
    }
}
