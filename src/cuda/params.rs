//! The kernels' parameter blocks, field for field as `struct DownParams` / `struct UpParams` in
//! `kernels/compat.cuh` (each kernel takes one of them by value as its only argument).

/// `u[t][j] = lambda_d[j] · Σ_k x[t][k] · a[j][k]`, k split over `splits` blocks.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct DownParams {
    pub x: u64,
    pub a: u64,
    pub lambda_d: u64,
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
    pub x_aligned: i32,
    pub pad: i32,
}

/// `y[t][i] (+)= lambda_b[i] · Σ_j u[t][j] · b[i][j] + bias[i]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct UpParams {
    pub u: u64,
    pub b: u64,
    pub lambda_b: u64,
    pub bias: u64,
    pub y: u64,
    pub rows: i32,
    pub r: i32,
    pub m: i32,
    pub ldb: i32,
    pub ldu: i32,
    pub ldy: i32,
    pub accumulate: i32,
    pub pad: i32,
}

// The C side has the same fields in the same order with no padding: 6 or 5 pointers, then ints.
const _: () = assert!(std::mem::size_of::<DownParams>() == 6 * 8 + 10 * 4);
const _: () = assert!(std::mem::size_of::<UpParams>() == 5 * 8 + 8 * 4);
