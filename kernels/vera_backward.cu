// vera_backward.cu — the fused backward pass (CudaStream::backward), for one adapter:
//
//   h = x·Aᵀ [T, r]                        vera_bwd_h_<dtype> (k = n split over blocks), vera_bwd_h_sum
//   v = (lambda_d ⊙ h)·Bᵀ [T, m]           vera_bwd_v_<dtype>: never stored; each 64-row tile sums
//   Σ_t dy ⊙ v, Σ_t dy  (per row tile)                          dy ⊙ v and dy over its rows
//   g = (dy ⊙ lambda_b)·B [T, r]           vera_bwd_g_<dtype> (k = m split over blocks)
//   Σ_t g ⊙ h           (per row tile)     vera_bwd_g_sum: sums g's splits, then g ⊙ h over the tile
//   dx (+)= (g ⊙ lambda_d)·A [T, n]        vera_bwd_dx_<dtype>, rounded once into the dtype
//   dlambda_b, dbias, dlambda_d (+)=       vera_bwd_reduce: the row tiles' sums, in tile order
//
// Every sum has one fixed order: k in increasing order within a split, splits in split order, rows
// in row order within a tile, tiles in tile order. No atomics and no counters: each step is its own
// launch, so the gradients are the same bits from run to run (the split counts depend on the GPU's
// SM count, so bits may differ between GPU models). Everything between x, dy and the outputs is f32:
// the left operands lambda_d ⊙ h, dy ⊙ lambda_b and g ⊙ lambda_d are formed in f32 as the tiles are
// loaded (as the CPU's f32-FMA tiers do), and only dx is rounded to the dtype.
//
// The products run on CUDA cores: a 64 x 64 tile per block of 256 threads, 4 x 4 outputs per thread,
// k staged through shared memory 16 at a time, each operand read element by element through a
// loader that widens it to f32 (any stride, any alignment). That is the simple, checkable first
// version (measured against the reference by the emulator in CI); tensor cores for the 16-bit
// products are the next step once a GPU run has timed this one.
//
// The f32-only steps (h_sum, g_sum, reduce) read and write the f32 workspace alone, whatever the
// activation dtype, so they are compiled once, without a dtype suffix.
#include "common.cuh"

constexpr int BWD_TILE = 64;        // token rows and columns per tile
constexpr int BWD_K = 16;           // k per shared-memory stage
constexpr int BWD_THREADS = 256;    // 16 x 16 threads, 4 x 4 outputs each
constexpr int BWD_SUM_THREADS = 128;

// acc[i][c] += Σ_k left(t0 + 4·ty + i, k) · right(c0 + 4·tx + c, k) over k in [k_begin, k_end), in
// increasing k, with (tx, ty) = (threadIdx.x % 16, threadIdx.x / 16). `left(t, k)` and `right(c, k)`
// return an operand element as f32 (zero outside the matrix). LEFT_K / RIGHT_K say whether that
// operand is contiguous along k in memory: the loading threads then step along k, else along the
// tile's rows or columns, so that neighbouring threads read neighbouring elements either way.
template <bool LEFT_K, bool RIGHT_K, typename Left, typename Right>
__device__ __forceinline__ void tile_product(int t0, int c0, int k_begin, int k_end, Left left, Right right,
                                             float (&acc)[4][4]) {
    __shared__ float ls[BWD_K][BWD_TILE + 4];
    __shared__ float rs[BWD_K][BWD_TILE + 4];
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
    for (int k0 = k_begin; k0 < k_end; k0 += BWD_K) {
        for (int e = threadIdx.x; e < BWD_K * BWD_TILE; e += BWD_THREADS) {
            const int lk = LEFT_K ? e % BWD_K : e / BWD_TILE, lr = LEFT_K ? e / BWD_K : e % BWD_TILE;
            ls[lk][lr] = k0 + lk < k_end ? left(t0 + lr, k0 + lk) : 0.0f;
            const int rk = RIGHT_K ? e % BWD_K : e / BWD_TILE, rc = RIGHT_K ? e / BWD_K : e % BWD_TILE;
            rs[rk][rc] = k0 + rk < k_end ? right(c0 + rc, k0 + rk) : 0.0f;
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < BWD_K; ++kk) {
            float lv[4], rv[4];
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                lv[i] = ls[kk][4 * ty + i];
                rv[i] = rs[kk][4 * tx + i];
            }
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int c = 0; c < 4; ++c) acc[i][c] = fmaf(lv[i], rv[c], acc[i][c]);
        }
        __syncthreads();
    }
}

// Calls f(t, c, acc[i][c']) for every output of this thread's 4 x 4 block inside rows x cols.
template <typename F>
__device__ __forceinline__ void for_each_output(int t0, int c0, int rows, int cols, const float (&acc)[4][4], F f) {
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int c = 0; c < 4; ++c) {
            const int t = t0 + 4 * ty + i, col = c0 + 4 * tx + c;
            if (t < rows && col < cols) f(t, col, acc[i][c]);
        }
}

// The row-tile sums' layout: per row tile, Σ dy ⊙ v [m], Σ dy [m], Σ g ⊙ h [r].
__device__ __forceinline__ float* tile_columns(const BackwardParams& p, int tile) {
    return p.columns + (size_t)tile * (2 * (size_t)p.m + p.r);
}

// Grid: (ceil(r / 64), row_tiles, h_splits). h's split partials over k = n (or h itself, unsplit).
template <typename T> __device__ void bwd_h(const BackwardParams& p) {
    const int c0 = blockIdx.x * BWD_TILE, t0 = blockIdx.y * BWD_TILE, s = blockIdx.z;
    const int k_begin = s * p.h_k_split, k_end = min(p.n, k_begin + p.h_k_split);
    const T* x = static_cast<const T*>(p.x);
    const T* a = static_cast<const T*>(p.a);
    float acc[4][4] = {};
    tile_product<true, true>(
        t0, c0, k_begin, k_end,
        [&](int t, int k) { return t < p.rows ? to_f32(x[(size_t)t * p.ldx + k]) : 0.0f; },
        [&](int j, int k) { return j < p.r ? to_f32(a[(size_t)j * p.lda + k]) : 0.0f; }, acc);
    float* out = p.h_splits == 1 ? p.h : p.part + (size_t)s * p.rows * p.r;
    for_each_output(t0, c0, p.rows, p.r, acc, [&](int t, int j, float v) { out[(size_t)t * p.r + j] = v; });
}

// Grid: ceil(rows · r / 128). h = its split partials summed in split order.
__device__ void bwd_h_sum(const BackwardParams& p) {
    const size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x, len = (size_t)p.rows * p.r;
    if (idx >= len) return;
    float sum = 0.0f;
    for (int s = 0; s < p.h_splits; ++s) sum += p.part[s * len + idx];
    p.h[idx] = sum;
}

// Grid: (ceil(m / 64), row_tiles). A 64 x 64 tile of v = (lambda_d ⊙ h)·Bᵀ, then its rows' sums of
// dy ⊙ v and (when the bias gradient is asked for) of dy, per column, in row order.
template <typename T> __device__ void bwd_v(const BackwardParams& p) {
    __shared__ float prod[BWD_TILE][BWD_TILE + 1];
    const int c0 = blockIdx.x * BWD_TILE, t0 = blockIdx.y * BWD_TILE;
    const T* b = static_cast<const T*>(p.b);
    const T* dy = static_cast<const T*>(p.dy);
    float acc[4][4] = {};
    tile_product<true, true>(
        t0, c0, 0, p.r, [&](int t, int j) { return t < p.rows ? p.lambda_d[j] * p.h[(size_t)t * p.r + j] : 0.0f; },
        [&](int i, int j) { return i < p.m ? to_f32(b[(size_t)i * p.ldb + j]) : 0.0f; }, acc);
    for (int e = threadIdx.x; e < BWD_TILE * BWD_TILE; e += BWD_THREADS) prod[e / BWD_TILE][e % BWD_TILE] = 0.0f;
    __syncthreads();
    for_each_output(t0, c0, p.rows, p.m, acc, [&](int t, int i, float v) {
        prod[t - t0][i - c0] = to_f32(dy[(size_t)t * p.lddy + i]) * v;
    });
    __syncthreads();
    const int i = c0 + (int)threadIdx.x;
    if (threadIdx.x < BWD_TILE && i < p.m) {
        const int rows = min(BWD_TILE, p.rows - t0);
        float dyv = 0.0f, dys = 0.0f;
        for (int tt = 0; tt < rows; ++tt) {
            dyv += prod[tt][threadIdx.x];
            if (p.grad_bias) dys += to_f32(dy[(size_t)(t0 + tt) * p.lddy + i]);
        }
        float* columns = tile_columns(p, blockIdx.y);
        columns[i] = dyv;
        columns[p.m + i] = dys;
    }
}

// Grid: (ceil(r / 64), row_tiles, g_splits). g's split partials over k = m: left operand
// dy ⊙ lambda_b (contiguous along m), right operand B read down its columns.
template <typename T> __device__ void bwd_g(const BackwardParams& p) {
    const int c0 = blockIdx.x * BWD_TILE, t0 = blockIdx.y * BWD_TILE, s = blockIdx.z;
    const int k_begin = s * p.g_k_split, k_end = min(p.m, k_begin + p.g_k_split);
    const T* b = static_cast<const T*>(p.b);
    const T* dy = static_cast<const T*>(p.dy);
    float acc[4][4] = {};
    tile_product<true, false>(
        t0, c0, k_begin, k_end,
        [&](int t, int i) { return t < p.rows ? to_f32(dy[(size_t)t * p.lddy + i]) * p.lambda_b[i] : 0.0f; },
        [&](int j, int i) { return j < p.r ? to_f32(b[(size_t)i * p.ldb + j]) : 0.0f; }, acc);
    float* out = p.part + (size_t)s * p.rows * p.r;
    for_each_output(t0, c0, p.rows, p.r, acc, [&](int t, int j, float v) { out[(size_t)t * p.r + j] = v; });
}

// Grid: (ceil(r / 128), row_tiles). g = its split partials summed in split order, and the tile's
// Σ_t g ⊙ h, per column j, in row order.
__device__ void bwd_g_sum(const BackwardParams& p) {
    const int j = blockIdx.x * BWD_SUM_THREADS + threadIdx.x, t0 = blockIdx.y * BWD_TILE;
    if (j >= p.r) return;
    const size_t len = (size_t)p.rows * p.r;
    const int rows = min(BWD_TILE, p.rows - t0);
    float gh = 0.0f;
    for (int tt = 0; tt < rows; ++tt) {
        const size_t idx = (size_t)(t0 + tt) * p.r + j;
        float g = 0.0f;
        for (int s = 0; s < p.g_splits; ++s) g += p.part[s * len + idx];
        p.g[idx] = g;
        gh += g * p.h[idx];
    }
    tile_columns(p, blockIdx.y)[2 * p.m + j] = gh;
}

// Grid: (ceil(n / 64), row_tiles). dx (+)= (g ⊙ lambda_d)·A, A read down its columns, the f32 sum
// (plus the old value when accumulating) rounded once to the dtype.
template <typename T> __device__ void bwd_dx(const BackwardParams& p) {
    const int c0 = blockIdx.x * BWD_TILE, t0 = blockIdx.y * BWD_TILE;
    const T* a = static_cast<const T*>(p.a);
    T* dx = static_cast<T*>(p.dx);
    float acc[4][4] = {};
    tile_product<true, false>(
        t0, c0, 0, p.r, [&](int t, int j) { return t < p.rows ? p.g[(size_t)t * p.r + j] * p.lambda_d[j] : 0.0f; },
        [&](int k, int j) { return k < p.n ? to_f32(a[(size_t)j * p.lda + k]) : 0.0f; }, acc);
    for_each_output(t0, c0, p.rows, p.n, acc, [&](int t, int k, float v) {
        T* out = dx + (size_t)t * p.lddx + k;
        *out = from_f32<T>(p.accumulate ? to_f32(*out) + v : v);
    });
}

// Grid: ceil((2m + r) / 128). Each gradient element: the row tiles' sums in tile order, added to the
// old value when accumulating (dbias only when asked for).
__device__ void bwd_reduce(const BackwardParams& p) {
    const int idx = blockIdx.x * BWD_SUM_THREADS + threadIdx.x;
    const int width = 2 * p.m + p.r;
    if (idx >= width) return;
    float* out;
    if (idx < p.m) {
        out = p.grad_lambda_b + idx;
    } else if (idx < 2 * p.m) {
        if (!p.grad_bias) return;
        out = p.grad_bias + (idx - p.m);
    } else {
        out = p.grad_lambda_d + (idx - 2 * p.m);
    }
    float sum = 0.0f;
    for (int tile = 0; tile < p.row_tiles; ++tile) sum += tile_columns(p, tile)[idx];
    *out = p.accumulate ? *out + sum : sum;
}

#define VERA_BACKWARD_DTYPE(T, NAME)                                                                   \
    extern "C" __global__ void __launch_bounds__(BWD_THREADS) vera_bwd_h_##NAME(BackwardParams p) {    \
        bwd_h<T>(p);                                                                                   \
    }                                                                                                  \
    VERA_EXPORT(vera_bwd_h_##NAME)                                                                     \
    extern "C" __global__ void __launch_bounds__(BWD_THREADS) vera_bwd_v_##NAME(BackwardParams p) {    \
        bwd_v<T>(p);                                                                                   \
    }                                                                                                  \
    VERA_EXPORT(vera_bwd_v_##NAME)                                                                     \
    extern "C" __global__ void __launch_bounds__(BWD_THREADS) vera_bwd_g_##NAME(BackwardParams p) {    \
        bwd_g<T>(p);                                                                                   \
    }                                                                                                  \
    VERA_EXPORT(vera_bwd_g_##NAME)                                                                     \
    extern "C" __global__ void __launch_bounds__(BWD_THREADS) vera_bwd_dx_##NAME(BackwardParams p) {   \
        bwd_dx<T>(p);                                                                                  \
    }                                                                                                  \
    VERA_EXPORT(vera_bwd_dx_##NAME)

VERA_BACKWARD_DTYPE(float, f32)
VERA_BACKWARD_DTYPE(f16, f16)
VERA_BACKWARD_DTYPE(bf16, bf16)

extern "C" __global__ void __launch_bounds__(BWD_SUM_THREADS) vera_bwd_h_sum(BackwardParams p) { bwd_h_sum(p); }
VERA_EXPORT(vera_bwd_h_sum)
extern "C" __global__ void __launch_bounds__(BWD_SUM_THREADS) vera_bwd_g_sum(BackwardParams p) { bwd_g_sum(p); }
VERA_EXPORT(vera_bwd_g_sum)
extern "C" __global__ void __launch_bounds__(BWD_SUM_THREADS) vera_bwd_reduce(BackwardParams p) { bwd_reduce(p); }
VERA_EXPORT(vera_bwd_reduce)
