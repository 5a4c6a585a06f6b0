// common.cuh — device helpers shared by the decode and prefill kernels.
#pragma once

#include "compat.cuh"

// Butterfly sum over the 32 lanes of a warp: every lane ends with the same, fixed-order sum.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

// u[t][j] = lambda_d[j] * (sum of the down-projection's split partials, in split order). Every
// kernel that reads u goes through this one function, so decode and prefill round alike.
__device__ __forceinline__ float u_value(const UpParams& p, int t, int j) {
    float sum = 0.0f;
    for (int s = 0; s < p.splits; ++s) sum += p.part[((size_t)s * p.rows + t) * p.r + j];
    return p.lambda_d[j] * sum;
}

// The up-projection's epilogue for one output element: lambda_b, bias and the base fused.
template <typename T> __device__ __forceinline__ void store_output(const UpParams& p, int t, int i, float v) {
    T* y = static_cast<T*>(p.y) + (size_t)t * p.ldy + i;
    float out = p.lambda_b[i] * v;
    if (p.bias) out += p.bias[i];
    if (p.accumulate) out += to_f32(*y);
    *y = from_f32<T>(out);
}
