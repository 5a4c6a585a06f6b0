// compat.cuh — the one header every kernel source includes first: dtype aliases and conversions,
// architecture guards, the kernel export macro, and the parameter blocks shared with the Rust side
// (src/cuda/params.rs mirrors them field for field).
//
// Compiled two ways: by nvcc for the GPU, and as plain C++ by the host compiler with
// VERA_EMULATION defined and kernels/emu/cuda_emu.h included first (the CPU emulation that runs the
// kernels in CI). Everything that differs between the two lives here or in ptx.cuh.
#pragma once

#include <stdint.h>

#ifdef VERA_EMULATION
// cuda_emu.h (force-included) provides __half, __nv_bfloat16 and their conversions.
#define VERA_EXPORT(name) VERA_EMU_REGISTER(name)
#ifndef __align__
#define __align__(n) alignas(n)
#endif
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define VERA_EXPORT(name)
#endif

// Tensor-core mma.sync for 16-bit inputs needs sm_80; the fatbin carries sm_80 and sm_90 SASS and
// compute_80 PTX, so every device this crate loads on has it. The guard documents the assumption and
// makes an older -arch fail at compile time rather than at run time.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "vera-kernels needs compute capability 8.0 or newer (mma.sync m16n8k16, cp.async)"
#endif

// Programmatic dependent launch (griddepcontrol) needs sm_90. Below it, and on the emulator (which
// runs launches one after another), the wrappers in ptx.cuh compile to nothing: a kernel launched
// without the launch attribute, or on such a device, starts after the previous one ended anyway.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define VERA_GRID_DEPENDENCY 1
#else
#define VERA_GRID_DEPENDENCY 0
#endif

typedef __half f16;
typedef __nv_bfloat16 bf16;

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(f16 v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(bf16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ f16 from_f32<f16>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ bf16 from_f32<bf16>(float v) { return __float2bfloat16_rn(v); }

// Elements per 16-byte load.
template <typename T> struct Vec16 { static constexpr int N = 16 / sizeof(T); };

// Loads N = 16 / sizeof(T) elements widened to f32: one 16-byte load when `aligned` (the caller has
// checked the address), else element by element. Elements at or past `valid` read as zero, and are
// not touched in memory.
template <typename T>
__device__ __forceinline__ void load16_f32(const T* p, int valid, bool aligned, float* out) {
    constexpr int N = Vec16<T>::N;
#ifdef VERA_EMULATION
    ::vera_emu::maybe_yield();  // a global read: a switch point in the emulator's concurrent schedule
#endif
    if (aligned && valid >= N) {
        uint4 raw = *reinterpret_cast<const uint4*>(p);
        const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
        for (int i = 0; i < N; ++i) out[i] = to_f32(e[i]);
    } else {
#pragma unroll
        for (int i = 0; i < N; ++i) out[i] = i < valid ? to_f32(p[i]) : 0.0f;
    }
}

// Parameter blocks, passed by value as the kernels' only argument. Pointers are device addresses
// (64-bit); all pointer fields come first so that the layout has no padding on either side.
//
// Every row t of a call has an adapter k_t, whose rows of the lambda (and bias) tables it takes.
// One adapter (CudaStream::forward): rows_adapter is null, k_t = 0 for every row, and the tables'
// row strides are 0. A mixed-adapter call (CudaStream::forward_mixed): the tables are a bank's
// [K, r] and [K, m], with strides r and m, and rows_adapter[t] is k_t in 0..K, or NO_ADAPTER for a
// row without an adapter: its u row is zero, and its y row is left as it is (accumulate) or set to
// zero (overwrite).

// The row index that means "no adapter" in rows_adapter (vera_kernels::NO_ADAPTER).
constexpr int NO_ADAPTER = -1;

// The down-projection and lambda_d: u[t][j] = lambda_d[k_t][j] * sum_k x[t][k] * a[j][k], for
// t < rows, j < r. With splits > 1 the k range is split over blocks (split s covers
// [s * k_split, min(n, (s + 1) * k_split))): each block writes its partial sums to part[s][t][j],
// and the last block of a group of outputs to finish (counted in counters[group], which it resets
// to zero) sums the splits in split order, so u does not depend on which block finished last.
struct DownParams {
    const void* x;           // [rows, n], row stride ldx
    const void* a;           // [r, n] (the layer's slice of the packed A), row stride lda (multiple of 8)
    const float* lambda_d;   // [K, r], row stride ld_lambda_d
    const int* rows_adapter; // [rows]: k_t in 0..K or NO_ADAPTER; null: one adapter (k_t = 0)
    void* u;                 // [rows, r], row stride ldu: f32 from the GEMV kernels, the dtype from the tile kernels
    float* part;             // [splits, rows, r], dense (unused when splits == 1)
    unsigned* counters;      // one per output group, zero between calls (unused when splits == 1);
                             // null: the up-projection sums the splits (UpParams::splits)
    int rows, n, r, ldx;
    int lda, k_split, splits, ldu;
    int x_align;             // 16, 8 or 4: x and ldx are aligned to that many bytes; 0: neither
    int ld_lambda_d;         // r for a bank, 0 for one adapter
};

// The up-projection with the epilogue fused:
// y[t][i] = (accumulate ? y[t][i] : 0) + lambda_b[k_t][i] * sum_j u[t][j] * b[i][j] + bias[k_t][i],
// the bias added only when adapter k_t has one. With splits > 0 (decode) u is not read: each block
// makes it from the down-projection's split partials and lambda_d (the fields as in DownParams).
struct UpParams {
    const void* u;           // [rows, r], row stride ldu (as DownParams::u)
    const float* part;       // [splits, rows, r], dense: read when splits > 0
    const float* lambda_d;   // [K, r], row stride ld_lambda_d: read when splits > 0
    const void* b;           // [m, r] (the layer's slice of the packed B), row stride ldb (multiple of 8)
    const float* lambda_b;   // [K, m], row stride ld_lambda_b
    const float* bias;       // [K, m], row stride ld_lambda_b; null when no adapter of the call has a bias
    const int* has_bias;     // [K]: non-zero for an adapter with a bias; null: all have one (if bias is set)
    const int* rows_adapter; // [rows], as DownParams::rows_adapter
    void* y;                 // [rows, m], row stride ldy
    int rows, r, m, ldb;
    int ldu, ldy, accumulate;
    int ld_lambda_b;         // m for a bank, 0 for one adapter
    int y_paired;            // y and ldy allow 4-byte accesses to two adjacent 16-bit outputs
    int splits;              // > 0: sum u from this many split partials (decode); 0: read u
    int ld_lambda_d;         // as DownParams::ld_lambda_d
    int unused;
};

// The backward pass of one adapter (vera_backward.cu), every kernel of it taking this one block:
// from x, dy, the projections and lambda_d, lambda_b, the gradients dlambda_d, dlambda_b, dbias and
// dx, through the f32 workspace h, g, part and columns. With accumulate the gradients are added to
// the buffers' contents, else written over them.
struct BackwardParams {
    const void* x;           // [rows, n], row stride ldx
    const void* a;           // [r, n] (the layer's slice of the packed A), row stride lda
    const void* b;           // [m, r] (the layer's slice of the packed B), row stride ldb
    const void* dy;          // [rows, m], row stride lddy
    const float* lambda_d;   // [r]
    const float* lambda_b;   // [m]
    float* h;                // [rows, r] dense: x·Aᵀ
    float* g;                // [rows, r] dense: (dy ⊙ lambda_b)·B
    float* part;             // [max(h_splits, g_splits), rows, r] dense: split partial sums (h's, then g's)
    float* columns;          // [row_tiles, 2m + r]: per 64-row tile Σ dy ⊙ v [m], Σ dy [m], Σ g ⊙ h [r]
    float* grad_lambda_d;    // [r]
    float* grad_lambda_b;    // [m]
    float* grad_bias;        // [m], or null: no bias gradient
    void* dx;                // [rows, n], row stride lddx, or null: no dx
    int rows, n, r, m;
    int ldx, lda, ldb, lddy;
    int lddx, h_splits, h_k_split, g_splits;
    int g_k_split, row_tiles, accumulate, unused;
};

// The sizes src/cuda/params.rs and src/cuda/backward/plan.rs assert for their mirrors of these
// blocks: the pointers, then the ints.
static_assert(sizeof(DownParams) == 7 * 8 + 10 * 4, "DownParams must match src/cuda/params.rs");
static_assert(sizeof(UpParams) == 9 * 8 + 12 * 4, "UpParams must match src/cuda/params.rs");
static_assert(sizeof(BackwardParams) == 14 * 8 + 16 * 4, "BackwardParams must match src/cuda/backward/plan.rs");
