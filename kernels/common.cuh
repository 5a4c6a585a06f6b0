// common.cuh — device helpers shared by the decode and prefill kernels.
#pragma once

#include "compat.cuh"

// Butterfly sum over the 32 lanes of a warp: every lane ends with the same, fixed-order sum.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

// u[t][j] = lambda_d[j] * (the split partials summed in split order). Every path to u goes through
// this one function (with splits == 1 the sum is the one partial), so u is the same bits whichever
// block of a group finished last. The partials were written by other blocks: read them from L2.
__device__ __forceinline__ float reduce_splits(const DownParams& p, int t, int j) {
    float sum = 0.0f;
    for (int s = 0; s < p.splits; ++s) sum += __ldcg(&p.part[((size_t)s * p.rows + t) * p.r + j]);
    return p.lambda_d[j] * sum;
}

// Called by every thread of a block after it has written its split's partials: true in the block
// that completes `group` (all its splits written), which must then reduce the group's outputs.
// The counter is left at zero for the next call.
__device__ __forceinline__ bool completes_group(const DownParams& p, int group) {
    __shared__ int last;
    __threadfence();  // this block's partials are visible device-wide before it is counted
    __syncthreads();
    if (threadIdx.x == 0) {
        const unsigned done = atomicAdd(&p.counters[group], 1u);
        last = done + 1 == (unsigned)p.splits;
        if (last) p.counters[group] = 0;
    }
    __syncthreads();
    return last != 0;
}

// The up-projection's epilogue for one output element: lambda_b, bias and the base fused, in the
// order the CPU defines it (src/cpu/sink.rs, Epilogue::apply: scale, then bias, then the old value),
// so that both backends round alike.
template <typename T> __device__ __forceinline__ void store_output(const UpParams& p, int t, int i, float v) {
    T* y = static_cast<T*>(p.y) + (size_t)t * p.ldy + i;
    float out = p.lambda_b[i] * v;
    if (p.bias) out += p.bias[i];
    if (p.accumulate) out += to_f32(*y);
    *y = from_f32<T>(out);
}
