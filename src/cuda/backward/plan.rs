//! Which kernels a backward call launches, with what grids, and how its two long products split
//! their k ranges: a pure function of the shapes, tested without a device. Also the kernels'
//! parameter block, field for field as `struct BackwardParams` in `kernels/compat.cuh`, and the one
//! place it is filled, shared by the GPU and the emulator.

use crate::cuda::params::to_i32;
use crate::cuda::plan::{grid_dim, split_k, Launch};
use crate::dtype::DType;
use crate::error::{Error, Result};

/// Token rows and columns per tile of the backward's products (`BWD_TILE`), and the k granule of a
/// split (`BWD_K`).
const TILE: usize = 64;
const TILE_K: usize = 16;
/// Threads per block of the products (`BWD_THREADS`) and of the f32 sums (`BWD_SUM_THREADS`).
const THREADS: u32 = 256;
const SUM_THREADS: usize = 128;
/// Blocks to aim for per streaming multiprocessor before a product's k range is split further, and
/// the shortest split.
const TILES_PER_SM: usize = 2;
const MIN_SPLIT: usize = 256;

/// The kernels of the backward, per dtype (`vera_bwd_<op>_<dtype>`), and its f32-only steps (no
/// dtype suffix): what the device resolves when it opens.
// Only a GPU resolves kernels up front; the emulator looks each up by name at launch.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) fn kernel_names() -> Vec<String> {
    let mut names = Vec::new();
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        for op in ["h", "v", "g", "dx"] {
            names.push(format!("vera_bwd_{op}_{}", dtype.name()));
        }
    }
    names.extend(["vera_bwd_h_sum", "vera_bwd_g_sum", "vera_bwd_reduce"].map(String::from));
    names
}

/// The launches of one backward call, in order, and the splits they share through the parameter
/// block.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct BackwardPlan {
    pub launches: Vec<Launch>,
    /// Splits of `h = x·Aᵀ` over k = n, and k elements per split.
    pub h_splits: usize,
    pub h_k_split: usize,
    /// Splits of `g = (dy ⊙ lambda_b)·B` over k = m, and k elements per split.
    pub g_splits: usize,
    pub g_k_split: usize,
    /// 64-row tiles of the call (each sums its rows' column products once).
    pub row_tiles: usize,
}

fn launch(kernel: String, grid_dims: [usize; 3], threads: u32) -> Launch {
    Launch { kernel, grid: grid_dims.map(grid_dim), block: [threads, 1, 1], shared_bytes: 0, dependent: false }
}

/// The plan of a backward call of `rows` token rows through a layer `(n, r, m)` in `dtype`, with or
/// without `dx`, on a device of `sms` streaming multiprocessors.
pub(crate) fn plan(dtype: DType, rows: usize, n: usize, r: usize, m: usize, dx: bool, sms: usize) -> BackwardPlan {
    let name = dtype.name();
    let row_tiles = rows.div_ceil(TILE);
    let r_tiles = r.div_ceil(TILE);
    // Enough blocks to fill the device: what the output tiles do not give, the k splits do.
    let want = |tiles: usize| (TILES_PER_SM * sms).div_ceil(tiles.max(1));
    let (h_splits, h_k_split) = split_k(n, want(r_tiles * row_tiles), TILE_K, MIN_SPLIT);
    let (g_splits, g_k_split) = split_k(m, want(r_tiles * row_tiles), TILE_K, MIN_SPLIT);
    let mut launches = Vec::new();
    if rows > 0 {
        launches.push(launch(format!("vera_bwd_h_{name}"), [r_tiles, row_tiles, h_splits], THREADS));
        if h_splits > 1 {
            launches.push(launch(
                "vera_bwd_h_sum".into(),
                [(rows * r).div_ceil(SUM_THREADS), 1, 1],
                SUM_THREADS as u32,
            ));
        }
        if m > 0 {
            launches.push(launch(format!("vera_bwd_v_{name}"), [m.div_ceil(TILE), row_tiles, 1], THREADS));
        }
        launches.push(launch(format!("vera_bwd_g_{name}"), [r_tiles, row_tiles, g_splits], THREADS));
        launches.push(launch("vera_bwd_g_sum".into(), [r.div_ceil(SUM_THREADS), row_tiles, 1], SUM_THREADS as u32));
        if dx && n > 0 {
            launches.push(launch(format!("vera_bwd_dx_{name}"), [n.div_ceil(TILE), row_tiles, 1], THREADS));
        }
    }
    // With no rows the sums are empty: the gradients are written as zero (or left, accumulating).
    launches.push(launch("vera_bwd_reduce".into(), [(2 * m + r).div_ceil(SUM_THREADS), 1, 1], SUM_THREADS as u32));
    BackwardPlan { launches, h_splits, h_k_split, g_splits, g_k_split, row_tiles }
}

impl BackwardPlan {
    /// Bytes of the f32 workspace buffers the call needs: `h` and `g` (`rows · r` each), the split
    /// partial sums (`max(h_splits, g_splits) · rows · r`) and the row tiles' column sums
    /// (`row_tiles · (2m + r)`). Each count must fit the kernels' 32-bit indices.
    pub(crate) fn workspace_bytes(&self, rows: usize, r: usize, m: usize) -> Result<[usize; 4]> {
        let f32s = |count: Option<usize>, what: &'static str| -> Result<usize> {
            let count = count.ok_or(Error::SizeOverflow { what })?;
            to_i32(count, what)?;
            count.checked_mul(4).ok_or(Error::SizeOverflow { what })
        };
        let hg = f32s(rows.checked_mul(r), "h and g of the backward (T·r)")?;
        let splits = self.h_splits.max(self.g_splits);
        let part = f32s(splits.checked_mul(rows).and_then(|v| v.checked_mul(r)), "split partial sums of the backward")?;
        let width = m.checked_mul(2).and_then(|v| v.checked_add(r));
        let columns = f32s(width.and_then(|w| w.checked_mul(self.row_tiles)), "column sums of the backward")?;
        Ok([hg, hg, part, columns])
    }
}

/// The backward kernels' one parameter block (see `kernels/compat.cuh`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct BackwardParams {
    pub x: u64,
    pub a: u64,
    pub b: u64,
    pub dy: u64,
    pub lambda_d: u64,
    pub lambda_b: u64,
    pub h: u64,
    pub g: u64,
    pub part: u64,
    pub columns: u64,
    pub grad_lambda_d: u64,
    pub grad_lambda_b: u64,
    pub grad_bias: u64,
    pub dx: u64,
    pub rows: i32,
    pub n: i32,
    pub r: i32,
    pub m: i32,
    pub ldx: i32,
    pub lda: i32,
    pub ldb: i32,
    pub lddy: i32,
    pub lddx: i32,
    pub h_splits: i32,
    pub h_k_split: i32,
    pub g_splits: i32,
    pub g_k_split: i32,
    pub row_tiles: i32,
    pub accumulate: i32,
    pub unused: i32,
}

// The C side has the same fields in the same order with no padding: 14 pointers, then 16 ints.
const _: () = assert!(std::mem::size_of::<BackwardParams>() == 14 * 8 + 16 * 4);

/// The sizes and strides of one checked backward call, in the kernels' 32-bit integers.
#[derive(Clone, Copy, Debug)]
pub(crate) struct BackwardCall {
    pub rows: i32,
    pub n: i32,
    pub r: i32,
    pub m: i32,
    pub ldx: i32,
    pub lda: i32,
    pub ldb: i32,
    pub lddy: i32,
    /// 0 without dx.
    pub lddx: i32,
    pub accumulate: bool,
}

/// The device addresses of one backward call's buffers, as a backend sees them.
#[derive(Clone, Copy, Debug)]
pub(crate) struct BackwardAddresses {
    pub x: u64,
    pub a: u64,
    pub b: u64,
    pub dy: u64,
    pub lambda_d: u64,
    pub lambda_b: u64,
    pub h: u64,
    pub g: u64,
    pub part: u64,
    pub columns: u64,
    pub grad_lambda_d: u64,
    pub grad_lambda_b: u64,
    /// `None`: no bias gradient.
    pub grad_bias: Option<u64>,
    /// `None`: no dx.
    pub dx: Option<u64>,
}

/// The parameter block of a call: its plan's splits, its sizes and strides, and one backend's
/// addresses. [`Error::SizeOverflow`] when a split does not fit an `i32`.
pub(crate) fn params(plan: &BackwardPlan, call: &BackwardCall, at: &BackwardAddresses) -> Result<BackwardParams> {
    Ok(BackwardParams {
        x: at.x,
        a: at.a,
        b: at.b,
        dy: at.dy,
        lambda_d: at.lambda_d,
        lambda_b: at.lambda_b,
        h: at.h,
        g: at.g,
        part: at.part,
        columns: at.columns,
        grad_lambda_d: at.grad_lambda_d,
        grad_lambda_b: at.grad_lambda_b,
        grad_bias: at.grad_bias.unwrap_or(0),
        dx: at.dx.unwrap_or(0),
        rows: call.rows,
        n: call.n,
        r: call.r,
        m: call.m,
        ldx: call.ldx,
        lda: call.lda,
        ldb: call.ldb,
        lddy: call.lddy,
        lddx: call.lddx,
        h_splits: to_i32(plan.h_splits, "k splits of h")?,
        h_k_split: to_i32(plan.h_k_split, "k split of h")?,
        g_splits: to_i32(plan.g_splits, "k splits of g")?,
        g_k_split: to_i32(plan.g_k_split, "k split of g")?,
        row_tiles: to_i32(plan.row_tiles, "row tiles")?,
        accumulate: i32::from(call.accumulate),
        unused: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kernels(p: &BackwardPlan) -> Vec<&str> {
        p.launches.iter().map(|l| l.kernel.as_str()).collect()
    }

    #[test]
    fn a_prefill_call_launches_every_step_in_order_and_splits_only_what_needs_it() {
        // 4096 rows at r = 1024 fill 132 SMs with output tiles: no split.
        let p = plan(DType::BF16, 4096, 4096, 1024, 4096, true, 132);
        assert_eq!((p.h_splits, p.g_splits, p.row_tiles), (1, 1, 64));
        assert_eq!(
            kernels(&p),
            [
                "vera_bwd_h_bf16",
                "vera_bwd_v_bf16",
                "vera_bwd_g_bf16",
                "vera_bwd_g_sum",
                "vera_bwd_dx_bf16",
                "vera_bwd_reduce"
            ]
        );
        assert_eq!(p.launches[0].grid, [16, 64, 1]);
        assert_eq!(p.launches[1].grid, [64, 64, 1]);
        assert_eq!(p.launches[3].grid, [8, 64, 1]);
        assert_eq!(p.launches[4].grid, [64, 64, 1]);
        assert_eq!(p.launches[5].grid, [(2 * 4096 + 1024u32).div_ceil(128), 1, 1]);
    }

    #[test]
    fn a_decode_call_splits_both_long_products_in_granules_and_sums_them() {
        let p = plan(DType::F16, 1, 4096, 256, 11008, false, 132);
        // 4 output tiles for 264 wanted blocks: n split into 16 splits of 256, m into 43 of 256.
        assert_eq!((p.h_splits, p.h_k_split), (16, 256));
        assert_eq!((p.g_splits, p.g_k_split), (43, 256));
        assert!(p.h_k_split.is_multiple_of(16) && p.g_k_split.is_multiple_of(16));
        assert_eq!(
            kernels(&p),
            [
                "vera_bwd_h_f16",
                "vera_bwd_h_sum",
                "vera_bwd_v_f16",
                "vera_bwd_g_f16",
                "vera_bwd_g_sum",
                "vera_bwd_reduce"
            ]
        );
        assert_eq!(p.launches[0].grid, [4, 1, 16]);
        assert_eq!(p.launches[3].grid, [4, 1, 43]);
        // Every name a plan uses is one the device resolves when it opens.
        let names = kernel_names();
        assert!(p.launches.iter().all(|l| names.contains(&l.kernel)));
    }

    #[test]
    fn no_rows_only_reduce_and_the_workspace_counts_are_checked() {
        let p = plan(DType::F32, 0, 100, 10, 70, true, 132);
        assert_eq!(kernels(&p), ["vera_bwd_reduce"]);
        assert_eq!(p.row_tiles, 0);
        let p = plan(DType::F32, 130, 100, 10, 70, true, 132);
        assert_eq!(p.workspace_bytes(130, 10, 70).unwrap()[3], 3 * (2 * 70 + 10) * 4);
        let huge = plan(DType::F32, 1 << 20, 100, 1 << 12, 70, true, 132);
        assert!(matches!(huge.workspace_bytes(1 << 20, 1 << 12, 70), Err(Error::SizeOverflow { .. })));
    }
}
