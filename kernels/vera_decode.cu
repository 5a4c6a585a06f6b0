// vera_decode.cu — the decode regime (a few token rows): both products are matrix-vector products
// that stream the projections once, so they are bound by memory bandwidth. One warp reads one row
// of A (or B) with 16-byte loads and keeps the TT token rows' sums in registers; TT is a template
// parameter so that the sums stay in registers (TT = 1, 2, 4, 8; rows past `rows` are skipped).
//
//   vera_down_gemv_t<TT>_<dtype>: u[t][j] = lambda_d[j] · (x[t] · A[j]) in f32, the k range split
//                                 over blocks when A has too few rows to fill the GPU: the last
//                                 block of a row group sums the splits, in order, or (the host's
//                                 choice, src/cuda/plan.rs) each up-projection block does, in its
//                                 prologue, and this kernel only writes them.
//   vera_up_gemv_t<TT>_<dtype>:   y[t][i] (+)= lambda_b[i] · (u[t] · B[i]) + bias[i], with u in
//                                 shared memory for the whole block (padded against bank
//                                 conflicts), each warp on UP_WARP_ROWS rows of B at once.
//
// On sm_90 the host launches the up-projection as the down-projection's programmatic dependent: its
// blocks are scheduled while the down-projection runs and ask L2 for their rows of B (which do not
// depend on u), so neither its launch nor its first reads of B from HBM wait for the
// down-projection's end; they wait for it only before reading u.
//
// The lambdas and the bias are those of row t's adapter (compat.cuh): one for every row, or each
// row's own in a mixed-adapter call.
#include "common.cuh"
#include "ptx.cuh"

constexpr int GEMV_WARPS = 4;          // warps per block of the down-projection
constexpr int UP_WARPS = 8;            // warps per block of the up-projection
constexpr int UP_ROWS = 32;            // rows of B (outputs) per block of the up-projection
constexpr int UP_WARP_ROWS = UP_ROWS / UP_WARPS;  // rows of B each warp of the up-projection computes
constexpr int UP_SMEM_FLOATS = 8192;   // u in shared memory: TT * r <= 8192 (32 KiB), checked by the host

// Where u's element j sits in its shared-memory row: 4 floats of padding after every 32 (up_gemv).
__device__ __forceinline__ int u_smem_index(int j) { return j + (j / 32) * 4; }
// The padded rows: at most TT rows of ceil(r / 32) * 36 floats, where TT * r <= UP_SMEM_FLOATS and
// TT (1, 2, 4, 8) divides UP_SMEM_FLOATS / 32: so at most UP_SMEM_FLOATS / 32 * 36 (36 KiB).
constexpr int UP_SMEM_PADDED = UP_SMEM_FLOATS / 32 * 36;

// Grid: (ceil(r / GEMV_WARPS), splits). Block: 32 * GEMV_WARPS. k_split is a multiple of 32 * N.
// u is f32. A block's GEMV_WARPS rows of A are one counter group.
template <typename T, int TT> __device__ void down_gemv(const DownParams& p) {
    constexpr int N = Vec16<T>::N;
    const int warp = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    const int j = blockIdx.x * GEMV_WARPS + warp;
    const int rows = min(p.rows, TT);
    float* u = static_cast<float*>(p.u);
    float sum[TT] = {};
    // The up-projection, launched as this kernel's programmatic dependent (sm_90), may now be
    // scheduled beside it: its blocks stream B into L2 while this kernel runs, then wait for it.
    grid_dependents_may_launch();
    if (j < p.r) {  // warp-uniform: the block's barriers below are reached by every thread
        const T* x = static_cast<const T*>(p.x);
        const T* a = static_cast<const T*>(p.a) + (size_t)j * p.lda;
        const int k_begin = blockIdx.y * p.k_split;
        const int k_end = min(p.n, k_begin + p.k_split);
        // A split of several steps per lane (r = 1024 at T = 1: 4) first asks L2 for all of the
        // warp's part of its row of A, as up_gemv does for B: the loop then waits for memory once,
        // not once per step (each step has only one 16-byte load of A per lane in flight).
        if (k_end - k_begin > 32 * N)
            for (int k = k_begin + lane * N; k < k_end; k += 32 * N) prefetch_l2(a + k);
        float acc[TT];
#pragma unroll
        for (int t = 0; t < TT; ++t) acc[t] = 0.0f;
        for (int k = k_begin + lane * N; k < k_end; k += 32 * N) {
            float av[N];
            // A's rows start 16-byte aligned (lda is a multiple of 8 elements), k is a multiple of N.
            load16_f32(a + k, k_end - k, true, av);
#pragma unroll
            for (int t = 0; t < TT; ++t) {
                if (t < rows) {
                    float xv[N];
                    load16_f32(x + (size_t)t * p.ldx + k, k_end - k, p.x_align == 16, xv);
#pragma unroll
                    for (int e = 0; e < N; ++e) acc[t] = fmaf(xv[e], av[e], acc[t]);
                }
            }
        }
#pragma unroll
        for (int t = 0; t < TT; ++t) sum[t] = warp_sum(acc[t]);
    }
    // warp_sum is a butterfly: every lane holds every row's sum, the same bits. Lane t stores token
    // row t's, so the warp's stores run side by side, not one after another in lane 0.
    float mine = 0.0f;
#pragma unroll
    for (int t = 0; t < TT; ++t)
        if (lane == t) mine = sum[t];
    if (p.splits == 1) {
        if (j < p.r && lane < rows)
            with_rows(p.rows_adapter, [&](auto map) {
                u[(size_t)lane * p.ldu + j] = scale_u(p, lambda_d_row(p, map, lane), j, 0.0f + mine);
            });
        return;
    }
    if (j < p.r && lane < rows) __stcg(&p.part[((size_t)blockIdx.y * p.rows + lane) * p.r + j], mine);
    // No counters: the up-projection sums the splits (it reads them after its grid wait).
    if (p.counters == nullptr) return;
    if (completes_group(p, blockIdx.x)) {
        with_rows(p.rows_adapter, [&](auto map) {
            for (int e = threadIdx.x; e < GEMV_WARPS * rows; e += blockDim.x) {
                const int jj = blockIdx.x * GEMV_WARPS + e % GEMV_WARPS, t = e / GEMV_WARPS;
                if (jj < p.r) u[(size_t)t * p.ldu + jj] = reduce_splits(p, map, t, jj);
            }
        });
    }
}

// Grid: ceil(m / UP_ROWS). Block: 32 * UP_WARPS. u is f32.
//
// Each warp computes UP_WARP_ROWS consecutive rows of B together: per step, one 16-byte load of each
// row in flight at once, and each u value read from shared memory once for all of them. u sits in
// shared memory with 4 floats of padding after every 32 (u_smem_index), and each lane reads its
// values 16 bytes at a time: a 16-bit dtype's lanes start 8 floats apart, which without the padding
// put every fourth lane of a quarter-warp (the 8 lanes one 16-byte shared access serves) on the
// same banks; with it the 8 lanes' 16 bytes fall on distinct banks (f32's lanes read 4 consecutive
// floats: contiguous either way). Each row's sums run in the same order as one row at a time would.
template <typename T, int TT> __device__ void up_gemv(const UpParams& p) {
    constexpr int N = Vec16<T>::N;
    __shared__ __align__(16) float u[UP_SMEM_PADDED];
    const int warp = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    const int i0 = blockIdx.x * UP_ROWS + warp * UP_WARP_ROWS;
    // Rows past m read row m - 1 again (in bounds) and are not stored.
    const T* b[UP_WARP_ROWS];
#pragma unroll
    for (int w = 0; w < UP_WARP_ROWS; ++w) b[w] = static_cast<const T*>(p.b) + (size_t)min(i0 + w, p.m - 1) * p.ldb;
    // B does not depend on the down-projection: launched as its programmatic dependent (sm_90),
    // this block asks L2 for the lines of B its warps will read while the down-projection still
    // runs, then waits for it to end before it reads u. (Otherwise the wait returns at once.)
    if (i0 < p.m) {
        for (int j = lane * N; j < p.r; j += 32 * N)
#pragma unroll
            for (int w = 0; w < UP_WARP_ROWS; ++w) prefetch_l2(b[w] + j);
    }
    // The lane that stores an output (lane w * TT + t stores output i0 + w of token row t, see
    // below) loads its y, lambda_b and bias now, ahead of the sum: they do not depend on the
    // down-projection either, and the store then waits on no load.
    const int rows = min(p.rows, TT);
    const int out_w = lane / TT, out_t = lane % TT;
    static_assert(UP_WARP_ROWS * TT <= 32, "one lane per output of the warp");
    const bool stores = out_w < UP_WARP_ROWS && out_t < rows && i0 + out_w < p.m;
    OutputOperands out{};
    if (stores) with_rows(p.rows_adapter, [&](auto map) { out = load_output<T>(p, map, out_t, i0 + out_w); });
    wait_for_previous_grid();
    // A u row: r rounded up to 32 floats, padded; a multiple of 4 floats (16-byte aligned rows).
    const int ld = u_smem_index((p.r + 31) / 32 * 32);
    const float* u_global = static_cast<const float*>(p.u);
    const int r_up = (p.r + 31) / 32 * 32;
    with_rows(p.rows_adapter, [&](auto map) {
        for (int idx = threadIdx.x; idx < rows * r_up; idx += blockDim.x) {
            const int t = idx / r_up, j = idx % r_up;
            // Past r: zeros, so that the last 16-byte reads of a row read defined values. With
            // p.splits > 0 u is summed here from the split partials (no counters, no last block).
            float v = 0.0f;
            if (j < p.r) v = p.splits > 0 ? reduce_splits(p, map, t, j) : u_global[(size_t)t * p.ldu + j];
            u[t * ld + u_smem_index(j)] = v;
        }
    });
    __syncthreads();

    if (i0 >= p.m) return;  // warp-uniform, and no barrier follows
    float acc[UP_WARP_ROWS][TT];
#pragma unroll
    for (int w = 0; w < UP_WARP_ROWS; ++w)
#pragma unroll
        for (int t = 0; t < TT; ++t) acc[w][t] = 0.0f;
    for (int j = lane * N; j < p.r; j += 32 * N) {
        float bv[UP_WARP_ROWS][N];
#pragma unroll
        for (int w = 0; w < UP_WARP_ROWS; ++w) load16_f32(b[w] + j, p.r - j, true, bv[w]);
#pragma unroll
        for (int t = 0; t < TT; ++t) {
            if (t < rows) {
                float uv[N];
#pragma unroll
                for (int e = 0; e < N; e += 4) {
                    // j + e is a multiple of 4 inside one group of 32: 16 contiguous, aligned bytes.
                    const float4 q = *reinterpret_cast<const float4*>(&u[t * ld + u_smem_index(j + e)]);
                    uv[e] = q.x;
                    uv[e + 1] = q.y;
                    uv[e + 2] = q.z;
                    uv[e + 3] = q.w;
                }
#pragma unroll
                for (int w = 0; w < UP_WARP_ROWS; ++w)
#pragma unroll
                    for (int e = 0; e < N; ++e) {
                        if (j + e < p.r) acc[w][t] = fmaf(uv[e], bv[w][e], acc[w][t]);
                    }
            }
        }
    }
    // warp_sum is a butterfly: every lane ends with every sum, the same bits. Lane w * TT + t
    // stores output i0 + w of token row t, so the warp's up to 32 stores run side by side, not one
    // after another in lane 0, where each store could alias the next one's loads and so waited
    // for it.
    float mine = 0.0f;
#pragma unroll
    for (int w = 0; w < UP_WARP_ROWS; ++w) {
#pragma unroll
        for (int t = 0; t < TT; ++t) {
            const float sum = warp_sum(acc[w][t]);
            if (lane == w * TT + t) mine = sum;
        }
    }
    if (stores) finish_output<T>(p, out_t, i0 + out_w, mine, out);
}

#define VERA_DECODE_KERNELS(TT, T, NAME)                                                                     \
    extern "C" __global__ void __launch_bounds__(32 * GEMV_WARPS) vera_down_gemv_t##TT##_##NAME(DownParams p) { \
        down_gemv<T, TT>(p);                                                                                 \
    }                                                                                                        \
    VERA_EXPORT(vera_down_gemv_t##TT##_##NAME)                                                               \
    extern "C" __global__ void __launch_bounds__(32 * UP_WARPS) vera_up_gemv_t##TT##_##NAME(UpParams p) {       \
        up_gemv<T, TT>(p);                                                                                   \
    }                                                                                                        \
    VERA_EXPORT(vera_up_gemv_t##TT##_##NAME)

#define VERA_DECODE_DTYPE(T, NAME)    \
    VERA_DECODE_KERNELS(1, T, NAME)   \
    VERA_DECODE_KERNELS(2, T, NAME)   \
    VERA_DECODE_KERNELS(4, T, NAME)   \
    VERA_DECODE_KERNELS(8, T, NAME)

VERA_DECODE_DTYPE(float, f32)
VERA_DECODE_DTYPE(f16, f16)
VERA_DECODE_DTYPE(bf16, bf16)
