// vera_prefill.cu — the prefill regime (many token rows): both products are tiled matrix products.
// 16-bit types run on tensor cores (mma.sync m16n8k16, f32 accumulators) fed by a 3-stage
// cp.async pipeline through ldmatrix; f32 runs on CUDA cores (a 64x64 tile, 4x4 outputs per
// thread). Both products read K-contiguous rows on both sides (x and A for the down-projection,
// u and B for the up-projection), so one tile loop serves both.
//
//   vera_down_tile_<dtype>: a 64x64 tile of u = lambda_d ⊙ (x·Aᵀ), stored in the dtype (rounded
//                           like PEFT's activations); the k range is split over blocks when there
//                           are too few tiles to fill the GPU (the last block of a tile sums the
//                           splits, in order).
//   vera_up_tile_<dtype>:   a 64x64 tile of y = u·Bᵀ with lambda_b, bias and the base add fused.
//   vera_{down,up}_tile128_<dtype> (16-bit only): the same on 128x128 tiles (8 warps, 4 stages in
//                           80 KiB of dynamic shared memory), for products with a wave of such
//                           tiles (src/cuda/plan.rs): each k stage feeds twice the mma per byte
//                           loaded into shared memory.
//
// The lambdas and the bias are those of row t's adapter (compat.cuh): one for every row, or each
// row's own in a mixed-adapter call.
#include "common.cuh"
#include "ptx.cuh"

constexpr int BM = 64;                 // token rows per tile
constexpr int BN = 64;                 // output columns per tile (j for down, i for up)
constexpr int BK = 32;                 // k per pipeline stage (16-bit path)
constexpr int STAGES = 3;              // cp.async pipeline depth
constexpr int SK = BK + 8;             // shared row stride: 80-byte rows keep 16-byte alignment and
                                       // put ldmatrix's 8 row reads in distinct bank groups
constexpr int BIG = 128;               // rows and columns of the large tiles
constexpr int BIG_STAGES = 4;
constexpr int STATIC_SMEM_MAX = 48 * 1024;  // past this a kernel needs dynamic shared memory

// A tensor-core tile: BM_ x BN_ outputs per block, WARPS_M x WARPS_N warps, each an (MI x 16) x
// (NI x 8) sub-tile of mma fragments, fed by STAGES_ stages of BK.
template <int BM_, int BN_, int WARPS_M_, int WARPS_N_, int STAGES_> struct MmaShape {
    static constexpr int TM = BM_, TN = BN_, WARPS_M = WARPS_M_, WARPS_N = WARPS_N_, STAGES = STAGES_;
    static constexpr int THREADS = 32 * WARPS_M * WARPS_N;
    static constexpr int MI = TM / WARPS_M / 16, NI = TN / WARPS_N / 8;
    static_assert(MI * 16 * WARPS_M == TM && NI * 8 * WARPS_N == TN && NI % 2 == 0, "whole mma fragments");
};
using Tile64 = MmaShape<BM, BN, 2, 2, STAGES>;     // 4 warps, each 32 x 32
using Tile128 = MmaShape<BIG, BIG, 2, 4, BIG_STAGES>;  // 8 warps, each 64 x 32

// Launch order. The host launches (row tiles, column tiles[, splits]) and blocks start in linear
// order (x fastest, then y), so the order in which blocks take tiles decides which tiles run at
// once and can share their operands through L2. Each block takes the tile at its linear place in:
//  - the down-projection: one row tile's r tiles after another (DOWN_GROUP = 1). x (T x n) is the
//    large operand at large T; a wave now reads a few of its row tiles, each once, where taking
//    row tiles fastest (blockIdx as the tile) walked all of x once per r tile, from HBM once x
//    outgrows L2 (32 MiB at T = 4096, n = 4096, bf16). A (r x n) is read by every row tile and
//    stays in L2.
//  - the up-projection: groups of UP_GROUP row tiles, the row tile fastest within a group (grouped
//    rasterisation): a wave reads UP_GROUP row tiles of u and the B tiles of a range of columns,
//    instead of all of u per column tile.
constexpr int DOWN_GROUP = 1;
constexpr int UP_GROUP = 8;

// The first row and column of this block's tile, in the order above for groups of GROUP row tiles
// (the last group may be smaller): a bijection from the grid's x·y places onto its tiles.
struct TileOrigin {
    int row0, col0;
};

template <int GROUP, int TM, int TN> __device__ __forceinline__ TileOrigin tile_in_order() {
    const int row_tiles = gridDim.x, col_tiles = gridDim.y;
    const long long place = blockIdx.x + (long long)gridDim.x * blockIdx.y;
    const long long per_group = (long long)GROUP * col_tiles;
    const int first = (int)(place / per_group) * GROUP;
    const int size = min(row_tiles - first, GROUP);
    const int in_group = (int)(place % per_group);
    return TileOrigin{(first + in_group % size) * TM, (in_group / size) * TN};
}

// ---------------------------------------------------------------------------------------------
// Tile loaders (16-bit path). Each fills a [ROWS][SK] stage with rows [row0, row0 + ROWS) and k in
// [k0, k0 + BK), shared by THREADS threads; anything past `rows` or `k_end` is zero.

// One 16-byte chunk of a tile row by cp.async in copies of BYTES: its first `valid` elements from
// `from` (not read when valid = 0), zeros after them.
template <int BYTES, typename T> __device__ __forceinline__ void copy_chunk(T* d, const T* from, int valid) {
    constexpr int N = Vec16<T>::N, STEP = BYTES / (int)sizeof(T);
#pragma unroll
    for (int e = 0; e < N; e += STEP) {
        const int v = max(0, min(STEP, valid - e));
        cp_async<BYTES>(d + e, v > 0 ? from + e : from, v * (int)sizeof(T));
    }
}

// From a K-contiguous global matrix whose rows (start and stride) are aligned to `align` bytes: by
// cp.async in copies of `align` bytes when that is 4, 8 or 16 (the same for every thread: a uniform
// branch), element by element through registers otherwise. Every chunk starts a multiple of 16
// bytes into its row (k0 and kk are multiples of N), so each copy is as aligned as its row.
template <int ROWS, int THREADS, typename T>
__device__ __forceinline__ void load_rows(T (*dst)[SK], const T* src, int ld, int row0, int rows, int k0, int k_end,
                                          int align) {
    constexpr int N = Vec16<T>::N;
    constexpr int CHUNKS_PER_ROW = BK / N;
    for (int c = threadIdx.x; c < ROWS * CHUNKS_PER_ROW; c += THREADS) {
        const int rr = c / CHUNKS_PER_ROW, kk = (c % CHUNKS_PER_ROW) * N;
        const int row = row0 + rr, k = k0 + kk;
        const int valid = row < rows ? max(0, min(N, k_end - k)) : 0;
        T* d = &dst[rr][kk];
        const T* from = valid > 0 ? src + (size_t)row * ld + k : src;
        if (align == 16) {
            copy_chunk<16>(d, from, valid);
        } else if (align == 8) {
            copy_chunk<8>(d, from, valid);
        } else if (align == 4) {
            copy_chunk<4>(d, from, valid);
        } else {
#pragma unroll
            for (int e = 0; e < N; ++e) d[e] = e < valid ? from[e] : from_f32<T>(0.0f);
        }
    }
}

template <typename T, typename S> struct MmaSmem {
    __align__(16) T a[S::STAGES][S::TM][SK];
    __align__(16) T b[S::STAGES][S::TN][SK];
};
static_assert(sizeof(MmaSmem<bf16, Tile64>) <= STATIC_SMEM_MAX, "the 64 tiles' stages fit a static array");
// src/cuda/plan.rs launches the large tiles with this many bytes of dynamic shared memory.
static_assert(sizeof(MmaSmem<bf16, Tile128>) == 81920 && sizeof(MmaSmem<f16, Tile128>) == 81920,
              "TILE128_SMEM_BYTES in src/cuda/plan.rs");

// A block's pipeline stages: a static array when they fit one, else the dynamic shared memory the
// launch provides (checked: too little would overrun it).
template <typename T, typename S> __device__ __forceinline__ MmaSmem<T, S>& tile_smem() {
    if constexpr (sizeof(MmaSmem<T, S>) <= STATIC_SMEM_MAX) {
        __shared__ MmaSmem<T, S> sm;
        return sm;
    } else {
        if (dynamic_smem_size() < sizeof(MmaSmem<T, S>)) __trap();
        return *reinterpret_cast<MmaSmem<T, S>*>(dynamic_smem());
    }
}

// The first row and column of this thread's warp's sub-tile.
template <typename S> __device__ __forceinline__ int warp_row0() {
    return (threadIdx.x / 32 / S::WARPS_N) * (S::MI * 16);
}
template <typename S> __device__ __forceinline__ int warp_col0() {
    return (threadIdx.x / 32 % S::WARPS_N) * (S::NI * 8);
}

// acc[mi][ni][4] += A[warp rows] · B[warp cols]ᵀ over k in [k_begin, k_end). load_a / load_b fill
// one stage for a given k0.
template <typename T, typename S, typename LoadA, typename LoadB>
__device__ __forceinline__ void mma_tile(MmaSmem<T, S>& sm, int k_begin, int k_end, LoadA load_a, LoadB load_b,
                                         float (&acc)[S::MI][S::NI][4]) {
    constexpr int STAGES = S::STAGES;
    const int lane = threadIdx.x % 32;
    const int warp_m = warp_row0<S>(), warp_n = warp_col0<S>();
    const int ktiles = (k_end - k_begin + BK - 1) / BK;

#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (s < ktiles) {
            load_a(sm.a[s], k_begin + s * BK);
            load_b(sm.b[s], k_begin + s * BK);
        }
        cp_async_commit();
    }
    for (int kt = 0; kt < ktiles; ++kt) {
        cp_async_wait<STAGES - 2>();
        __syncthreads();  // stage kt is in; every warp is done with the stage refilled below
        const int next = kt + STAGES - 1;
        if (next < ktiles) {
            load_a(sm.a[next % STAGES], k_begin + next * BK);
            load_b(sm.b[next % STAGES], k_begin + next * BK);
        }
        cp_async_commit();

        T (*sa)[SK] = sm.a[kt % STAGES];
        T (*sb)[SK] = sm.b[kt % STAGES];
#pragma unroll
        for (int kk = 0; kk < BK; kk += 16) {
            uint32_t af[S::MI][4], bfrag[S::NI][2];
#pragma unroll
            for (int mi = 0; mi < S::MI; ++mi)
                ldmatrix_x4(af[mi], &sa[warp_m + mi * 16 + lane % 16][kk + (lane / 16) * 8]);
#pragma unroll
            for (int np = 0; np < S::NI / 2; ++np) {
                const int q = lane / 8;
                uint32_t r[4];
                ldmatrix_x4(r, &sb[warp_n + np * 16 + lane % 8 + (q / 2) * 8][kk + (q % 2) * 8]);
                bfrag[np * 2][0] = r[0];
                bfrag[np * 2][1] = r[1];
                bfrag[np * 2 + 1][0] = r[2];
                bfrag[np * 2 + 1][1] = r[3];
            }
#pragma unroll
            for (int mi = 0; mi < S::MI; ++mi)
#pragma unroll
                for (int ni = 0; ni < S::NI; ++ni) mma_m16n8k16(acc[mi][ni], af[mi], bfrag[ni], acc[mi][ni], T());
        }
    }
    cp_async_wait<0>();
}

// Calls f(row, col, value, value of col + 1) for each pair of adjacent accumulators of this
// thread (c[0], c[1] and c[2], c[3] of each mma C fragment, in the layout of the PTX ISA; col even).
template <typename S, typename F>
__device__ __forceinline__ void for_each_acc_pair(const float (&acc)[S::MI][S::NI][4], F f) {
    const int lane = threadIdx.x % 32;
    const int warp_m = warp_row0<S>(), warp_n = warp_col0<S>();
    const int gid = lane / 4, tig = lane % 4;
#pragma unroll
    for (int mi = 0; mi < S::MI; ++mi)
#pragma unroll
        for (int ni = 0; ni < S::NI; ++ni)
#pragma unroll
            for (int h = 0; h < 2; ++h)
                f(warp_m + mi * 16 + gid + h * 8, warp_n + ni * 8 + tig * 2, acc[mi][ni][2 * h], acc[mi][ni][2 * h + 1]);
}

// Calls f(row, col, value) for each accumulator of this thread.
template <typename S, typename F> __device__ __forceinline__ void for_each_acc(const float (&acc)[S::MI][S::NI][4], F f) {
    for_each_acc_pair<S>(acc, [&](int row, int col, float v0, float v1) {
        f(row, col, v0);
        f(row, col + 1, v1);
    });
}

// Stores a finished TM x TN tile of u: directly when k is not split, else as this split's partials,
// and the block that completes the tile sums all splits. `each(f)` calls f(row, col, value) for
// this thread's accumulators (tile coordinates).
template <typename TU, int TM, int TN, typename Each>
__device__ __forceinline__ void store_u_tile(const DownParams& p, int row0, int col0, Each each) {
    TU* u = static_cast<TU*>(p.u);
    // The row map tested per lookup (common.cuh): compiled once per view, the f32 tile spilled on
    // sm_80; the compiler takes the uniform test out of the unrolled stores where it pays.
    const AnyRows map{p.rows_adapter};
    if (p.splits == 1) {
        each([&](int rr, int cc, float v) {
            const int t = row0 + rr, j = col0 + cc;
            if (t < p.rows && j < p.r)
                u[(size_t)t * p.ldu + j] = from_f32<TU>(scale_u(p, lambda_d_row(p, map, t), j, 0.0f + v));
        });
        return;
    }
    float* part = p.part + (size_t)blockIdx.z * p.rows * p.r;
    each([&](int rr, int cc, float v) {
        const int t = row0 + rr, j = col0 + cc;
        if (t < p.rows && j < p.r) __stcg(&part[(size_t)t * p.r + j], v);
    });
    if (completes_group(p, blockIdx.x + gridDim.x * blockIdx.y)) {
        for (int e = threadIdx.x; e < TM * TN; e += blockDim.x) {
            const int t = row0 + e / TN, j = col0 + e % TN;
            if (t < p.rows && j < p.r) u[(size_t)t * p.ldu + j] = from_f32<TU>(reduce_splits(p, map, t, j));
        }
    }
}

// Grid: (ceil(rows / TM), ceil(r / TN), splits), tiles taken in launch order. Block: S::THREADS.
// k_split is a multiple of BK.
template <typename T, typename S> __device__ void down_mma(const DownParams& p) {
    MmaSmem<T, S>& sm = tile_smem<T, S>();
    const TileOrigin tile = tile_in_order<DOWN_GROUP, S::TM, S::TN>();
    const int row0 = tile.row0, col0 = tile.col0;
    const int k_begin = blockIdx.z * p.k_split, k_end = min(p.n, k_begin + p.k_split);
    const T* x = static_cast<const T*>(p.x);
    const T* a = static_cast<const T*>(p.a);
    float acc[S::MI][S::NI][4] = {};
    mma_tile<T, S>(
        sm, k_begin, k_end,
        [&](T (*dst)[SK], int k0) {
            load_rows<S::TM, S::THREADS>(dst, x, p.ldx, row0, p.rows, k0, k_end, p.x_align);
        },
        [&](T (*dst)[SK], int k0) { load_rows<S::TN, S::THREADS>(dst, a, p.lda, col0, p.r, k0, k_end, 16); }, acc);
    store_u_tile<T, S::TM, S::TN>(p, row0, col0, [&](auto f) { for_each_acc<S>(acc, f); });
}

// Grid: (ceil(rows / TM), ceil(m / TN)), tiles taken in launch order. Block: S::THREADS.
template <typename T, typename S> __device__ void up_mma(const UpParams& p) {
    MmaSmem<T, S>& sm = tile_smem<T, S>();
    const TileOrigin tile = tile_in_order<UP_GROUP, S::TM, S::TN>();
    const int row0 = tile.row0, col0 = tile.col0;
    const T* b = static_cast<const T*>(p.b);
    float acc[S::MI][S::NI][4] = {};
    const T* u = static_cast<const T*>(p.u);
    mma_tile<T, S>(
        sm, 0, p.r,
        [&](T (*dst)[SK], int k0) { load_rows<S::TM, S::THREADS>(dst, u, p.ldu, row0, p.rows, k0, p.r, 16); },
        [&](T (*dst)[SK], int k0) { load_rows<S::TN, S::THREADS>(dst, b, p.ldb, col0, p.m, k0, p.r, 16); }, acc);
    // The C fragment holds pairs of adjacent columns (an even one first): stored as pairs.
    with_rows(p.rows_adapter, [&](auto map) {
        for_each_acc_pair<S>(acc, [&](int rr, int cc, float v0, float v1) {
            const int t = row0 + rr, i = col0 + cc;
            if (t >= p.rows || i >= p.m) return;
            if (p.y_paired && i + 1 < p.m) {
                store_output_pair<T>(p, map, t, i, v0, v1);
            } else {
                store_output<T>(p, map, t, i, v0);
                if (i + 1 < p.m) store_output<T>(p, map, t, i + 1, v1);
            }
        });
    });
}

// ---------------------------------------------------------------------------------------------
// f32 on CUDA cores: 256 threads as 16 x 16, each 4 x 4 outputs strided by 16 (conflict-free
// shared reads); k in steps of FBK through shared memory, stored k-major.

constexpr int FBK = 16;
constexpr int SIMT_THREADS = 256;

// get_a(t, k) / get_b(col, k) return the operands (zero outside); calls emit(t, col, value) for
// each of this thread's 16 outputs.
template <typename GetA, typename GetB>
__device__ __forceinline__ void simt_tile(int k_begin, int k_end, GetA get_a, GetB get_b, float (&acc)[4][4]) {
    __shared__ float sa[FBK][BM + 4];
    __shared__ float sb[FBK][BN + 4];
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
    for (int k0 = k_begin; k0 < k_end; k0 += FBK) {
        for (int e = threadIdx.x; e < BM * FBK; e += SIMT_THREADS) {
            const int rr = e / FBK, kk = e % FBK;
            const bool in_k = k0 + kk < k_end;
            sa[kk][rr] = in_k ? get_a(rr, k0 + kk) : 0.0f;
            sb[kk][rr] = in_k ? get_b(rr, k0 + kk) : 0.0f;
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < FBK; ++kk) {
            float av[4], bv[4];
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                av[i] = sa[kk][ty + 16 * i];
                bv[i] = sb[kk][tx + 16 * i];
            }
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int jj = 0; jj < 4; ++jj) acc[i][jj] = fmaf(av[i], bv[jj], acc[i][jj]);
        }
        __syncthreads();
    }
}

// Calls f(row, col, value) for each of this thread's SIMT accumulators (tile coordinates).
template <typename F> __device__ __forceinline__ void for_each_simt_acc(const float (&acc)[4][4], F f) {
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int jj = 0; jj < 4; ++jj) f(ty + 16 * i, tx + 16 * jj, acc[i][jj]);
}

__device__ void down_simt(const DownParams& p) {
    const TileOrigin tile = tile_in_order<DOWN_GROUP, BM, BN>();
    const int row0 = tile.row0, col0 = tile.col0;
    const int k_begin = blockIdx.z * p.k_split, k_end = min(p.n, k_begin + p.k_split);
    const float* x = static_cast<const float*>(p.x);
    const float* a = static_cast<const float*>(p.a);
    float acc[4][4] = {};
    simt_tile(
        k_begin, k_end,
        [&](int rr, int k) { return row0 + rr < p.rows ? x[(size_t)(row0 + rr) * p.ldx + k] : 0.0f; },
        [&](int cc, int k) { return col0 + cc < p.r ? a[(size_t)(col0 + cc) * p.lda + k] : 0.0f; }, acc);
    store_u_tile<float, BM, BN>(p, row0, col0, [&](auto f) { for_each_simt_acc(acc, f); });
}

__device__ void up_simt(const UpParams& p) {
    const TileOrigin tile = tile_in_order<UP_GROUP, BM, BN>();
    const int row0 = tile.row0, col0 = tile.col0;
    const float* u = static_cast<const float*>(p.u);
    const float* b = static_cast<const float*>(p.b);
    float acc[4][4] = {};
    simt_tile(
        0, p.r, [&](int rr, int j) { return row0 + rr < p.rows ? u[(size_t)(row0 + rr) * p.ldu + j] : 0.0f; },
        [&](int cc, int j) { return col0 + cc < p.m ? b[(size_t)(col0 + cc) * p.ldb + j] : 0.0f; }, acc);
    with_rows(p.rows_adapter, [&](auto map) {
        for_each_simt_acc(acc, [&](int rr, int cc, float v) {
            if (row0 + rr < p.rows && col0 + cc < p.m) store_output<float>(p, map, row0 + rr, col0 + cc, v);
        });
    });
}

// vera_down_<TILE>_<NAME> and vera_up_<TILE>_<NAME>.
#define VERA_TILE_KERNELS(TILE, NAME, THREADS, DOWN, UP)                                                  \
    extern "C" __global__ void __launch_bounds__(THREADS) vera_down_##TILE##_##NAME(DownParams p) { DOWN(p); } \
    VERA_EXPORT(vera_down_##TILE##_##NAME)                                                                 \
    extern "C" __global__ void __launch_bounds__(THREADS) vera_up_##TILE##_##NAME(UpParams p) { UP(p); }       \
    VERA_EXPORT(vera_up_##TILE##_##NAME)

VERA_TILE_KERNELS(tile, f32, SIMT_THREADS, down_simt, up_simt)
VERA_TILE_KERNELS(tile, f16, Tile64::THREADS, (down_mma<f16, Tile64>), (up_mma<f16, Tile64>))
VERA_TILE_KERNELS(tile, bf16, Tile64::THREADS, (down_mma<bf16, Tile64>), (up_mma<bf16, Tile64>))
VERA_TILE_KERNELS(tile128, f16, Tile128::THREADS, (down_mma<f16, Tile128>), (up_mma<f16, Tile128>))
VERA_TILE_KERNELS(tile128, bf16, Tile128::THREADS, (down_mma<bf16, Tile128>), (up_mma<bf16, Tile128>))
