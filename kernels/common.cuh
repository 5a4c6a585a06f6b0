// common.cuh — device helpers shared by the decode and prefill kernels.
#pragma once

#include "compat.cuh"

// Butterfly sum over the 32 lanes of a warp: every lane ends with the same, fixed-order sum.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

// How the kernels see a call's row -> adapter map (compat.cuh). The code that reads an adapter's
// vectors (where u is stored, the up-projection's epilogue) is compiled for both views and picks one
// with a uniform branch on the map pointer (with_rows): with OneAdapter, row t's adapter is the
// constant 0 and the tables' row offsets fold to 0, so a single-adapter call runs the code it ran
// before row maps existed; with RowMap, each row looks its adapter up (from L1: the map is T ints).
// Where compiling twice made ptxas spill (the f32 tile's u store, on sm_80), AnyRows tests the
// pointer per lookup instead.
struct OneAdapter {
    __device__ __forceinline__ int adapter(int) const { return 0; }
    __device__ __forceinline__ bool has_bias(const UpParams& p, int) const { return p.bias != nullptr; }
};

struct RowMap {
    const int* rows;
    __device__ __forceinline__ int adapter(int t) const { return rows[t]; }
    __device__ __forceinline__ bool has_bias(const UpParams& p, int k) const {
        return p.bias && (!p.has_bias || p.has_bias[k] != 0);
    }
};

// Calls f(OneAdapter{}) without a row map, f(RowMap{rows_adapter}) with one.
template <typename F> __device__ __forceinline__ void with_rows(const int* rows_adapter, F f) {
    if (rows_adapter) {
        f(RowMap{rows_adapter});
    } else {
        f(OneAdapter{});
    }
}

// Both views in one, the map tested per lookup (the compiler may still split the code on the map
// pointer, which is uniform: it does for the 16-bit tiles' u store).
struct AnyRows {
    const int* rows;
    __device__ __forceinline__ int adapter(int t) const { return rows ? rows[t] : 0; }
};

// The offset of row t's lambda_d in the table (k_t * ld_lambda_d), or -1 for a row without
// adapter. Offsets, not pointers, so that every table access stays a global load from a
// parameter's address; the host keeps K * r within an int.
// (P: DownParams, or UpParams when the up-projection sums the splits: the same fields.)
template <typename P, typename Rows> __device__ __forceinline__ int lambda_d_row(const P& p, Rows rows, int t) {
    const int k = rows.adapter(t);
    return k < 0 ? -1 : k * p.ld_lambda_d;
}

// u[t][j] from its sum over k: lambda_d[k_t][j] * sum, with `row` = lambda_d_row(p, rows, t); zero
// for a row without adapter (which the up-projection does not store into y).
template <typename P> __device__ __forceinline__ float scale_u(const P& p, int row, int j, float sum) {
    return row < 0 ? 0.0f : p.lambda_d[row + j] * sum;
}

// u[t][j] = lambda_d[k_t][j] * (the split partials summed in split order). Every path to u goes
// through this one function (with splits == 1 the sum is the one partial), so u is the same bits
// whichever block of a group finished last, and whether the down-projection's last block or the
// up-projection sums them. The partials were written by other blocks: read them from L2.
template <typename P, typename Rows> __device__ __forceinline__ float reduce_splits(const P& p, Rows rows, int t, int j) {
    float sum = 0.0f;
    for (int s = 0; s < p.splits; ++s) sum += __ldcg(&p.part[((size_t)s * p.rows + t) * p.r + j]);
    return scale_u(p, lambda_d_row(p, rows, t), j, sum);
}

// Called by every thread of a block after it has written its split's partials (with __stcg, read
// back with __ldcg: L2 is where blocks meet): true in the block that completes `group` (all its
// splits written), which must then reduce the group's outputs. The counter is left at zero for the
// next call.
//
// The handshake, under the CUDA memory model: the barrier orders every thread's partials before
// thread 0's fence (bar.sync synchronises the block, and a gpu-scope fence is cumulative: it
// covers the writes its thread has observed), so the fence and the relaxed atomic form a release.
// The block that takes the counter to `splits` has observed, through the atomics on one counter,
// every other block's release; its fence after the atomic is the acquire side, and the second
// barrier extends it to the threads that read the partials. One fence per block on each side,
// not one per thread.
__device__ __forceinline__ bool completes_group(const DownParams& p, int group) {
    __shared__ int last;
    __syncthreads();
    if (threadIdx.x == 0) {
        __threadfence();  // release: this block's partials before its count
        const unsigned done = atomicAdd(&p.counters[group], 1u);
        last = done + 1 == (unsigned)p.splits;
        if (last) {
            __threadfence();  // acquire: the other blocks' partials after their counts
            p.counters[group] = 0;
        }
    }
    __syncthreads();
    return last != 0;
}

// One row's epilogue: the offset of its adapter's row in the lambda_b and bias tables
// (k_t * ld_lambda_b; -1 for a row without adapter; the host keeps K * m within an int) and
// whether that adapter has a bias.
struct RowEpilogue {
    int row;
    bool bias;
};

template <typename Rows> __device__ __forceinline__ RowEpilogue row_epilogue(const UpParams& p, Rows rows, int t) {
    const int k = rows.adapter(t);
    if (k < 0) return RowEpilogue{-1, false};
    return RowEpilogue{k * p.ld_lambda_b, rows.has_bias(p, k)};
}

// What the up-projection's epilogue reads for one output element besides its sum: whether row t
// has an adapter and that adapter a bias, its lambda_b and bias at column i, and the old value of
// y when accumulating. load_output reads them, finish_output combines them with the sum, so that
// a kernel can make the loads long before the sum is ready (the decode up-projection makes them
// before its k loop).
struct OutputOperands {
    bool adapter, has_bias;
    float scale, bias, old;
};

// Row t's adapter's part of the operands of output i (old left at 0).
template <typename Rows>
__device__ __forceinline__ OutputOperands load_output_scales(const UpParams& p, Rows rows, int t, int i) {
    const RowEpilogue e = row_epilogue(p, rows, t);
    OutputOperands o{e.row >= 0, e.bias, 0.0f, 0.0f, 0.0f};
    if (!o.adapter) return o;
    o.scale = p.lambda_b[e.row + i];
    if (o.has_bias) o.bias = p.bias[e.row + i];
    return o;
}

template <typename T, typename Rows>
__device__ __forceinline__ OutputOperands load_output(const UpParams& p, Rows rows, int t, int i) {
    OutputOperands o = load_output_scales(p, rows, t, i);
    if (o.adapter && p.accumulate) o.old = to_f32(static_cast<const T*>(p.y)[(size_t)t * p.ldy + i]);
    return o;
}

// The up-projection's epilogue for one output element with an adapter: lambda_b, bias and the base
// fused, in the order the CPU defines it (src/cpu/sink.rs, Epilogue::apply: scale, then bias, then
// the old value), so that both backends round alike.
__device__ __forceinline__ float epilogue_value(const UpParams& p, const OutputOperands& o, float v) {
    float out = o.scale * v;
    if (o.has_bias) out += o.bias;
    if (p.accumulate) out += o.old;
    return out;
}

// Output i of row t from its sum and operands. A row without adapter is left as it is when
// accumulating and set to zero otherwise.
template <typename T>
__device__ __forceinline__ void finish_output(const UpParams& p, int t, int i, float v, const OutputOperands& o) {
    T* y = static_cast<T*>(p.y) + (size_t)t * p.ldy + i;
    if (!o.adapter) {
        if (!p.accumulate) *y = from_f32<T>(0.0f);
        return;
    }
    *y = from_f32<T>(epilogue_value(p, o, v));
}

// The epilogue of one output element, with row t's adapter as `rows` maps it.
template <typename T, typename Rows>
__device__ __forceinline__ void store_output(const UpParams& p, Rows rows, int t, int i, float v) {
    finish_output<T>(p, t, i, v, load_output<T>(p, rows, t, i));
}

// Two adjacent 16-bit outputs, read and written as one 4-byte access.
template <typename T> struct alignas(4) OutputPair {
    T lo, hi;
};

// Outputs i and i + 1 (i even) of row t, each computed as store_output computes it (the same
// bits), with one 4-byte load of the old pair and one store: half the accesses of two
// store_output calls, and the loads of both elements ahead of the store (which may alias them).
// Only when the host set y_paired (y and ldy 4-byte aligned, so every even i is) and i + 1 < m.
template <typename T, typename Rows>
__device__ __forceinline__ void store_output_pair(const UpParams& p, Rows rows, int t, int i, float v0, float v1) {
    static_assert(sizeof(T) == 2, "pairs of 16-bit outputs");
    OutputOperands o0 = load_output_scales(p, rows, t, i), o1 = load_output_scales(p, rows, t, i + 1);
    OutputPair<T>* y = reinterpret_cast<OutputPair<T>*>(static_cast<T*>(p.y) + (size_t)t * p.ldy + i);
    if (!o0.adapter) {
        if (!p.accumulate) *y = OutputPair<T>{from_f32<T>(0.0f), from_f32<T>(0.0f)};
        return;
    }
    if (p.accumulate) {
        const OutputPair<T> old = *y;
        o0.old = to_f32(old.lo);
        o1.old = to_f32(old.hi);
    }
    *y = OutputPair<T>{from_f32<T>(epilogue_value(p, o0, v0)), from_f32<T>(epilogue_value(p, o1, v1))};
}
