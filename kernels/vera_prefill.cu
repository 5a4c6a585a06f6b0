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
constexpr int MMA_THREADS = 128;       // 4 warps, 2 x 2, each a 32 x 32 sub-tile

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

template <int GROUP> __device__ __forceinline__ TileOrigin tile_in_order() {
    const int row_tiles = gridDim.x, col_tiles = gridDim.y;
    const long long place = blockIdx.x + (long long)gridDim.x * blockIdx.y;
    const long long per_group = (long long)GROUP * col_tiles;
    const int first = (int)(place / per_group) * GROUP;
    const int size = min(row_tiles - first, GROUP);
    const int in_group = (int)(place % per_group);
    return TileOrigin{(first + in_group % size) * BM, (in_group / size) * BN};
}

// ---------------------------------------------------------------------------------------------
// Tile loaders (16-bit path). Each fills a [64][SK] stage with rows [row0, row0 + 64) and k in
// [k0, k0 + BK); anything past `rows` or `k_end` is zero.

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
template <typename T>
__device__ __forceinline__ void load_rows(T (*dst)[SK], const T* src, int ld, int row0, int rows, int k0, int k_end,
                                          int align) {
    constexpr int N = Vec16<T>::N;
    constexpr int CHUNKS_PER_ROW = BK / N;
    for (int c = threadIdx.x; c < BM * CHUNKS_PER_ROW; c += MMA_THREADS) {
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

template <typename T> struct MmaSmem {
    __align__(16) T a[STAGES][BM][SK];
    __align__(16) T b[STAGES][BN][SK];
};

// acc[mi][ni][4] += A[warp rows] · B[warp cols]ᵀ over k in [k_begin, k_end). load_a / load_b fill
// one stage for a given k0.
template <typename T, typename LoadA, typename LoadB>
__device__ __forceinline__ void mma_tile(MmaSmem<T>& sm, int k_begin, int k_end, LoadA load_a, LoadB load_b,
                                         float (&acc)[2][4][4]) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int warp_m = (warp / 2) * 32, warp_n = (warp % 2) * 32;
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
            uint32_t af[2][4], bfrag[4][2];
#pragma unroll
            for (int mi = 0; mi < 2; ++mi) ldmatrix_x4(af[mi], &sa[warp_m + mi * 16 + lane % 16][kk + (lane / 16) * 8]);
#pragma unroll
            for (int np = 0; np < 2; ++np) {
                const int q = lane / 8;
                uint32_t r[4];
                ldmatrix_x4(r, &sb[warp_n + np * 16 + lane % 8 + (q / 2) * 8][kk + (q % 2) * 8]);
                bfrag[np * 2][0] = r[0];
                bfrag[np * 2][1] = r[1];
                bfrag[np * 2 + 1][0] = r[2];
                bfrag[np * 2 + 1][1] = r[3];
            }
#pragma unroll
            for (int mi = 0; mi < 2; ++mi)
#pragma unroll
                for (int ni = 0; ni < 4; ++ni) mma_m16n8k16(acc[mi][ni], af[mi], bfrag[ni], acc[mi][ni], T());
        }
    }
    cp_async_wait<0>();
}

// Calls f(row, col, value, value of col + 1) for each pair of adjacent accumulators of this
// thread (c[0], c[1] and c[2], c[3] of each mma C fragment, in the layout of the PTX ISA; col even).
template <typename F> __device__ __forceinline__ void for_each_acc_pair(const float (&acc)[2][4][4], F f) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int warp_m = (warp / 2) * 32, warp_n = (warp % 2) * 32;
    const int gid = lane / 4, tig = lane % 4;
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
        for (int ni = 0; ni < 4; ++ni)
#pragma unroll
            for (int h = 0; h < 2; ++h)
                f(warp_m + mi * 16 + gid + h * 8, warp_n + ni * 8 + tig * 2, acc[mi][ni][2 * h], acc[mi][ni][2 * h + 1]);
}

// Calls f(row, col, value) for each accumulator of this thread.
template <typename F> __device__ __forceinline__ void for_each_acc(const float (&acc)[2][4][4], F f) {
    for_each_acc_pair(acc, [&](int row, int col, float v0, float v1) {
        f(row, col, v0);
        f(row, col + 1, v1);
    });
}

// Stores a finished tile of u: directly when k is not split, else as this split's partials, and
// the block that completes the tile sums all splits. `each(f)` calls f(row, col, value) for this
// thread's accumulators (tile coordinates).
template <typename TU, typename Each>
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
        for (int e = threadIdx.x; e < BM * BN; e += blockDim.x) {
            const int t = row0 + e / BN, j = col0 + e % BN;
            if (t < p.rows && j < p.r) u[(size_t)t * p.ldu + j] = from_f32<TU>(reduce_splits(p, map, t, j));
        }
    }
}

// Grid: (ceil(rows / BM), ceil(r / BN), splits), tiles taken in launch order. Block: MMA_THREADS. k_split is a multiple of BK.
template <typename T> __device__ void down_mma(const DownParams& p) {
    __shared__ MmaSmem<T> sm;
    const TileOrigin tile = tile_in_order<DOWN_GROUP>();
    const int row0 = tile.row0, col0 = tile.col0;
    const int k_begin = blockIdx.z * p.k_split, k_end = min(p.n, k_begin + p.k_split);
    const T* x = static_cast<const T*>(p.x);
    const T* a = static_cast<const T*>(p.a);
    float acc[2][4][4] = {};
    mma_tile<T>(
        sm, k_begin, k_end,
        [&](T (*dst)[SK], int k0) { load_rows(dst, x, p.ldx, row0, p.rows, k0, k_end, p.x_align); },
        [&](T (*dst)[SK], int k0) { load_rows(dst, a, p.lda, col0, p.r, k0, k_end, 16); }, acc);
    store_u_tile<T>(p, row0, col0, [&](auto f) { for_each_acc(acc, f); });
}

// Grid: (ceil(rows / BM), ceil(m / BN)), tiles taken in launch order. Block: MMA_THREADS.
template <typename T> __device__ void up_mma(const UpParams& p) {
    __shared__ MmaSmem<T> sm;
    const TileOrigin tile = tile_in_order<UP_GROUP>();
    const int row0 = tile.row0, col0 = tile.col0;
    const T* b = static_cast<const T*>(p.b);
    float acc[2][4][4] = {};
    const T* u = static_cast<const T*>(p.u);
    mma_tile<T>(
        sm, 0, p.r, [&](T (*dst)[SK], int k0) { load_rows(dst, u, p.ldu, row0, p.rows, k0, p.r, 16); },
        [&](T (*dst)[SK], int k0) { load_rows(dst, b, p.ldb, col0, p.m, k0, p.r, 16); }, acc);
    // The C fragment holds pairs of adjacent columns (an even one first): stored as pairs.
    with_rows(p.rows_adapter, [&](auto map) {
        for_each_acc_pair(acc, [&](int rr, int cc, float v0, float v1) {
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
    const TileOrigin tile = tile_in_order<DOWN_GROUP>();
    const int row0 = tile.row0, col0 = tile.col0;
    const int k_begin = blockIdx.z * p.k_split, k_end = min(p.n, k_begin + p.k_split);
    const float* x = static_cast<const float*>(p.x);
    const float* a = static_cast<const float*>(p.a);
    float acc[4][4] = {};
    simt_tile(
        k_begin, k_end,
        [&](int rr, int k) { return row0 + rr < p.rows ? x[(size_t)(row0 + rr) * p.ldx + k] : 0.0f; },
        [&](int cc, int k) { return col0 + cc < p.r ? a[(size_t)(col0 + cc) * p.lda + k] : 0.0f; }, acc);
    store_u_tile<float>(p, row0, col0, [&](auto f) { for_each_simt_acc(acc, f); });
}

__device__ void up_simt(const UpParams& p) {
    const TileOrigin tile = tile_in_order<UP_GROUP>();
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

#define VERA_TILE_KERNELS(NAME, THREADS, DOWN, UP)                                                     \
    extern "C" __global__ void __launch_bounds__(THREADS) vera_down_tile_##NAME(DownParams p) { DOWN(p); } \
    VERA_EXPORT(vera_down_tile_##NAME)                                                                 \
    extern "C" __global__ void __launch_bounds__(THREADS) vera_up_tile_##NAME(UpParams p) { UP(p); }       \
    VERA_EXPORT(vera_up_tile_##NAME)

VERA_TILE_KERNELS(f32, SIMT_THREADS, down_simt, up_simt)
VERA_TILE_KERNELS(f16, MMA_THREADS, down_mma<f16>, up_mma<f16>)
VERA_TILE_KERNELS(bf16, MMA_THREADS, down_mma<bf16>, up_mma<bf16>)
