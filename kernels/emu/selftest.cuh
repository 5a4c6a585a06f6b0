// Self-test kernels of the CPU emulation (emulation builds only). Driven by emu/selftest_main.cpp;
// all names start with vera_emu_selftest_.
#ifndef VERA_EMU_SELFTEST_CUH
#define VERA_EMU_SELFTEST_CUH

#include "ptx_emu.h"

// Tree reduction of 256 values per block through shared memory.
extern "C" __global__ void __launch_bounds__(256) vera_emu_selftest_reduce(const float* __restrict__ in,
                                                                           float* __restrict__ out) {
    __shared__ float s[256];
    const unsigned t = threadIdx.x;
    s[t] = in[blockIdx.x * 256 + t];
    __syncthreads();
    for (unsigned stride = 128; stride > 0; stride >>= 1) {
        if (t < stride) s[t] += s[t + stride];
        __syncthreads();
    }
    if (t == 0) out[blockIdx.x] = s[0];
}
VERA_EMU_REGISTER(vera_emu_selftest_reduce)

// Rotates a shared array by one place `iters` times (2 barriers per iteration).
extern "C" __global__ void vera_emu_selftest_rotate(int* out, int iters) {
    __shared__ int s[1024];
    const unsigned n = blockDim.x, t = threadIdx.x;
    s[t] = static_cast<int>(t);
    for (int i = 0; i < iters; ++i) {
        __syncthreads();
        const int v = s[(t + 1) % n];
        __syncthreads();
        s[t] = v;
    }
    out[blockIdx.x * n + t] = s[t];
}
VERA_EMU_REGISTER(vera_emu_selftest_rotate)

// Shuffles; 8 results per thread.
extern "C" __global__ void vera_emu_selftest_shfl(const float* fin, const int* iin, float* fout, int* iout) {
    const unsigned t = threadIdx.x, lane = t % 32;
    const unsigned full = 0xffffffffu;
    const float fv = fin[t];
    const int iv = iin[t];
    // 0: float butterfly sum (xor)
    float fs = fv;
    for (int m = 16; m > 0; m >>= 1) fs += __shfl_xor_sync(full, fs, m);
    fout[t * 8 + 0] = fs;
    // 1: int butterfly sum (xor)
    int is = iv;
    for (int m = 16; m > 0; m >>= 1) is += __shfl_xor_sync(full, is, m);
    iout[t * 8 + 1] = is;
    // 2: float shfl_down reduction (lane 0 holds the sum)
    float fd = fv;
    for (unsigned d = 16; d > 0; d >>= 1) fd += __shfl_down_sync(full, fd, d);
    fout[t * 8 + 2] = fd;
    // 3: broadcast from lane 5 (int)
    iout[t * 8 + 3] = __shfl_sync(full, iv, 5);
    // 4: inclusive scan with shfl_up (int)
    int sc = iv;
    for (unsigned d = 1; d < 32; d <<= 1) {
        const int y = __shfl_up_sync(full, sc, d);
        if (lane >= d) sc += y;
    }
    iout[t * 8 + 4] = sc;
    // 5: int shfl_down reduction
    int id = iv;
    for (unsigned d = 16; d > 0; d >>= 1) id += __shfl_down_sync(full, id, d);
    iout[t * 8 + 5] = id;
    // 6: xor sum within segments of 16 lanes (width 16)
    int w16 = iv;
    for (int m = 8; m > 0; m >>= 1) w16 += __shfl_xor_sync(full, w16, m, 16);
    iout[t * 8 + 6] = w16;
    // 7: reverse the warp (float), unsigned payload through __shfl_sync too
    fout[t * 8 + 7] = __shfl_sync(full, fv, 31 - static_cast<int>(lane));
    const unsigned u = __shfl_sync(full, static_cast<unsigned>(iv) * 3u, static_cast<int>(lane ^ 1u));
    iout[t * 8 + 7] = static_cast<int>(u);
}
VERA_EMU_REGISTER(vera_emu_selftest_shfl)

// Votes, block-wide counting barriers and warp reductions; 10 results per thread.
extern "C" __global__ void vera_emu_selftest_vote(const int* in, unsigned* out) {
    const unsigned t = threadIdx.x, lane = t % 32;
    const unsigned full = 0xffffffffu;
    unsigned* o = out + t * 10;
    o[0] = __ballot_sync(full, lane % 3 == 0);
    o[1] = __ballot_sync(full, in[t] > 0);
    o[2] = static_cast<unsigned>(__any_sync(full, lane == 7));
    o[3] = static_cast<unsigned>(__any_sync(full, 0));
    o[4] = static_cast<unsigned>(__all_sync(full, 1));
    o[5] = static_cast<unsigned>(__all_sync(full, lane != 5));
    o[6] = static_cast<unsigned>(__syncthreads_count(in[t] > 0));
    o[7] = static_cast<unsigned>(__syncthreads_and(in[t] > -1000) * 2 + __syncthreads_or(in[t] > 0));
    o[8] = __reduce_add_sync(full, lane);
    o[9] = __activemask();
    __syncwarp();
}
VERA_EMU_REGISTER(vera_emu_selftest_vote)

// Built-in index variables on 3D grids and blocks (12 values per thread), and collectives on a
// partial warp with its exact mask.
extern "C" __global__ void vera_emu_selftest_dims(unsigned* out, unsigned* warp_out) {
    const unsigned nthreads = blockDim.x * blockDim.y * blockDim.z;
    const unsigned linear = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
    const unsigned block = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
    unsigned* o = out + (block * nthreads + linear) * 12;
    o[0] = threadIdx.x;
    o[1] = threadIdx.y;
    o[2] = threadIdx.z;
    o[3] = blockIdx.x;
    o[4] = blockIdx.y;
    o[5] = blockIdx.z;
    o[6] = blockDim.x;
    o[7] = blockDim.y;
    o[8] = blockDim.z;
    o[9] = gridDim.x;
    o[10] = gridDim.y;
    o[11] = gridDim.z;
    // Last warp of the block is partial: use its exact live mask.
    const unsigned lanes = nthreads - (linear / 32) * 32;
    const unsigned mask = lanes >= 32 ? 0xffffffffu : (1u << lanes) - 1u;
    const unsigned sum = __reduce_add_sync(mask, 1u);
    const unsigned ballot = __ballot_sync(mask, 1);
    if (linear % 32 == 0) {
        warp_out[(block * ((nthreads + 31) / 32) + linear / 32) * 2 + 0] = sum;
        warp_out[(block * ((nthreads + 31) / 32) + linear / 32) * 2 + 1] = ballot;
    }
}
VERA_EMU_REGISTER(vera_emu_selftest_dims)

// A __syncthreads only threads 0..99 reach (block of 128): a deadlock.
extern "C" __global__ void vera_emu_selftest_deadlock(int* out) {
    if (threadIdx.x < 100) __syncthreads();
    out[threadIdx.x] = 1;
}
VERA_EMU_REGISTER(vera_emu_selftest_deadlock)

// Lanes 16..31 return before a full-mask shuffle.
extern "C" __global__ void vera_emu_selftest_warp_exit(int* out) {
    if (threadIdx.x % 32 >= 16) return;
    out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, static_cast<int>(threadIdx.x), 1);
}
VERA_EMU_REGISTER(vera_emu_selftest_warp_exit)

// A shuffle whose mask is not the warp's live lanes.
extern "C" __global__ void vera_emu_selftest_bad_mask(int* out) {
    out[threadIdx.x] = __shfl_sync(0x0000ffffu, static_cast<int>(threadIdx.x), 0);
}
VERA_EMU_REGISTER(vera_emu_selftest_bad_mask)

// Threads split between two different __syncthreads.
extern "C" __global__ void vera_emu_selftest_divergent_barrier(int* out) {
    if (threadIdx.x < 64) {
        __syncthreads();
    } else {
        __syncthreads();
    }
    out[threadIdx.x] = 1;
}
VERA_EMU_REGISTER(vera_emu_selftest_divergent_barrier)

extern "C" __global__ void vera_emu_selftest_trap(int* out) {
    if (threadIdx.x == 3) __trap();
    out[threadIdx.x] = 1;
}
VERA_EMU_REGISTER(vera_emu_selftest_trap)

// mma.m16n8k16: A (16x16 row-major) and B (16x8, stored [k][n]) as raw 16-bit patterns, C and D
// 16x8 f32 row-major. Fragments are loaded per the PTX ISA layout.
extern "C" __global__ void vera_emu_selftest_mma(const uint16_t* A, const uint16_t* B, const float* C, float* D,
                                                int use_f16) {
    const int lane = static_cast<int>(threadIdx.x % 32), g = lane >> 2, t = lane & 3;
    auto pack = [](uint16_t lo, uint16_t hi) { return static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16); };
    uint32_t a[4], b[2];
    a[0] = pack(A[g * 16 + 2 * t], A[g * 16 + 2 * t + 1]);
    a[1] = pack(A[(g + 8) * 16 + 2 * t], A[(g + 8) * 16 + 2 * t + 1]);
    a[2] = pack(A[g * 16 + 2 * t + 8], A[g * 16 + 2 * t + 9]);
    a[3] = pack(A[(g + 8) * 16 + 2 * t + 8], A[(g + 8) * 16 + 2 * t + 9]);
    b[0] = pack(B[(2 * t) * 8 + g], B[(2 * t + 1) * 8 + g]);
    b[1] = pack(B[(2 * t + 8) * 8 + g], B[(2 * t + 9) * 8 + g]);
    float c[4], d[4];
    c[0] = C[g * 8 + 2 * t];
    c[1] = C[g * 8 + 2 * t + 1];
    c[2] = C[(g + 8) * 8 + 2 * t];
    c[3] = C[(g + 8) * 8 + 2 * t + 1];
    if (use_f16)
        mma_m16n8k16_f16(d, a, b, c);
    else
        mma_m16n8k16_bf16(d, a, b, c);
    D[g * 8 + 2 * t] = d[0];
    D[g * 8 + 2 * t + 1] = d[1];
    D[(g + 8) * 8 + 2 * t] = d[2];
    D[(g + 8) * 8 + 2 * t + 1] = d[3];
}
VERA_EMU_REGISTER(vera_emu_selftest_mma)

// The usual tensor-core path: A through ldmatrix.x4 from a padded shared tile, B ([k][n]) through
// ldmatrix.x2.trans, then mma (bf16). Same inputs/outputs as vera_emu_selftest_mma.
extern "C" __global__ void vera_emu_selftest_ldmatrix_mma(const uint16_t* A, const uint16_t* B, const float* C,
                                                         float* D) {
    __shared__ __align__(16) uint16_t sa[16 * 24];  // row stride 24 elements = 48 bytes
    __shared__ __align__(16) uint16_t sb[16 * 8];
    const int lane = static_cast<int>(threadIdx.x % 32), g = lane >> 2, t = lane & 3;
    for (int i = lane; i < 256; i += 32) sa[(i / 16) * 24 + i % 16] = A[i];
    for (int i = lane; i < 128; i += 32) sb[i] = B[i];
    __syncthreads();
    uint32_t a[4], b[2];
    ldmatrix_x4(a, &sa[(lane % 16) * 24 + (lane / 16) * 8]);
    ldmatrix_x2_trans(b, &sb[(lane % 16) * 8]);
    float c[4], d[4];
    c[0] = C[g * 8 + 2 * t];
    c[1] = C[g * 8 + 2 * t + 1];
    c[2] = C[(g + 8) * 8 + 2 * t];
    c[3] = C[(g + 8) * 8 + 2 * t + 1];
    mma_m16n8k16_bf16(d, a, b, c);
    D[g * 8 + 2 * t] = d[0];
    D[g * 8 + 2 * t + 1] = d[1];
    D[(g + 8) * 8 + 2 * t] = d[2];
    D[(g + 8) * 8 + 2 * t + 1] = d[3];
}
VERA_EMU_REGISTER(vera_emu_selftest_ldmatrix_mma)

// ldmatrix x1/x2/x4 and .trans. Shared memory holds 4 matrices of 8x8 16-bit values
// (m << 8 | r << 4 | c) with rows stored out of order and a stride of 16 elements; lane 8m + r
// passes the address of row r of matrix m. Lanes whose address the instruction does not use pass
// a misaligned pointer. 14 registers per lane: x1, x2, x4, x1.trans, x2.trans, x4.trans.
extern "C" __global__ void vera_emu_selftest_ldmatrix(uint32_t* out) {
    __shared__ __align__(16) uint16_t s[32 * 16];
    const int lane = static_cast<int>(threadIdx.x % 32);
    auto slot = [](int m, int r) { return (m * 8 + (r * 5 + 3) % 8) * 16; };  // scrambled row order
    for (int i = lane; i < 256; i += 32) {
        const int m = i / 64, r = (i / 8) % 8, c = i % 8;
        s[slot(m, r) + c] = static_cast<uint16_t>((m << 8) | (r << 4) | c);
    }
    __syncthreads();
    const uint16_t* mine = &s[slot(lane / 8, lane % 8)];
    const void* bad = reinterpret_cast<const unsigned char*>(mine) + 1;
    uint32_t* o = out + lane * 14;
    ldmatrix_x1(o + 0, lane < 8 ? static_cast<const void*>(mine) : bad);
    ldmatrix_x2(o + 1, lane < 16 ? static_cast<const void*>(mine) : bad);
    ldmatrix_x4(o + 3, mine);
    ldmatrix_x1_trans(o + 7, lane < 8 ? static_cast<const void*>(mine) : bad);
    ldmatrix_x2_trans(o + 8, lane < 16 ? static_cast<const void*>(mine) : bad);
    ldmatrix_x4_trans(o + 10, mine);
}
VERA_EMU_REGISTER(vera_emu_selftest_ldmatrix)

// ldmatrix with a misaligned row address (an error).
extern "C" __global__ void vera_emu_selftest_ldmatrix_misaligned(uint32_t* out) {
    __shared__ __align__(16) uint16_t s[32 * 8 + 8];
    const int lane = static_cast<int>(threadIdx.x % 32);
    ldmatrix_x4(out + 4 * lane, &s[lane * 8 + (lane == 9 ? 4 : 0)]);
}
VERA_EMU_REGISTER(vera_emu_selftest_ldmatrix_misaligned)

// cp.async with zero fill: lane l fills its 16-byte chunk with the first l % 17 bytes of its source
// chunk (a null source when 0), in region w of `out` by 16 >> w copies of 16, 8 or 4 bytes.
extern "C" __global__ void vera_emu_selftest_cp_async(const unsigned char* src, unsigned char* out) {
    __shared__ __align__(16) unsigned char s[3][32 * 16];
    const int lane = static_cast<int>(threadIdx.x);
    for (int w = 0; w < 3; ++w)
        for (int i = 0; i < 16; ++i) s[w][lane * 16 + i] = 0xAA;
    __syncthreads();
    const int n = lane % 17;
    const auto part = [&](int at, int bytes) { return n - at < 0 ? 0 : (n - at > bytes ? bytes : n - at); };
    const auto from = [&](int at, int bytes) { return part(at, bytes) ? src + lane * 16 + at : nullptr; };
    cp_async<16>(&s[0][lane * 16], from(0, 16), part(0, 16));
    for (int at = 0; at < 16; at += 8) cp_async<8>(&s[1][lane * 16 + at], from(at, 8), part(at, 8));
    for (int at = 0; at < 16; at += 4) cp_async<4>(&s[2][lane * 16 + at], from(at, 4), part(at, 4));
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
    for (int w = 0; w < 3; ++w)
        for (int i = 0; i < 16; ++i) out[w * 32 * 16 + lane * 16 + i] = s[w][lane * 16 + i];
}
VERA_EMU_REGISTER(vera_emu_selftest_cp_async)

// Dynamic shared memory: thread i of each block records the byte it finds at offset 4i before any
// write (0xA5: fresh for every block) and the size, writes its tag there, and after a barrier reads
// its neighbour's tag (each resident block has its own buffer).
extern "C" __global__ void vera_emu_selftest_dynamic_smem(unsigned* out) {
    unsigned* s = reinterpret_cast<unsigned*>(dynamic_smem());
    const unsigned i = threadIdx.x, n = blockDim.x, base = 3 * (blockIdx.x * n + i);
    out[base] = dynamic_smem()[4 * i];
    out[base + 1] = dynamic_smem_size();
    __syncthreads();
    s[i] = blockIdx.x * 1000 + i;
    __syncthreads();
    out[base + 2] = s[(i + 1) % n];
}
VERA_EMU_REGISTER(vera_emu_selftest_dynamic_smem)

// Parameters of several kinds, passed cuLaunchKernel-style.
struct VeraEmuSelftestParams {
    int a;
    float b;
    double c;
    unsigned char tag;
};
extern "C" __global__ void vera_emu_selftest_params(VeraEmuSelftestParams p, const float* __restrict__ x,
                                                   long long k, double* out) {
    if (threadIdx.x == 0 && blockIdx.x == 0)
        out[0] = static_cast<double>(p.a) + p.b + p.c + p.tag + x[1] + static_cast<double>(k);
}
VERA_EMU_REGISTER(vera_emu_selftest_params)

// Atomics from every thread of every block; a 48 KiB local array per thread.
extern "C" __global__ void vera_emu_selftest_atomics_stack(int* counter, unsigned* maxv, int* sums) {
    atomicAdd(counter, 1);
    atomicMax(maxv, blockIdx.x * blockDim.x + threadIdx.x);
    volatile int big[12 * 1024];
    for (int i = 0; i < 12 * 1024; ++i) big[i] = i + static_cast<int>(threadIdx.x);
    int s = 0;
    for (int i = 0; i < 12 * 1024; i += 1024) s += big[i];
    sums[blockIdx.x * blockDim.x + threadIdx.x] = s;
}
VERA_EMU_REGISTER(vera_emu_selftest_atomics_stack)

// Half/bfloat16 conversions inside a kernel: out[i] = bits of __float2half_rn / __float2bfloat16_rn
// of in[i], and back.
extern "C" __global__ void vera_emu_selftest_half(const float* in, uint16_t* h, uint16_t* bf, float* back, int n) {
    const int i = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
    if (i >= n) return;
    const __half x = __float2half_rn(in[i]);
    const __nv_bfloat16 y = __float2bfloat16_rn(in[i]);
    h[i] = __half_as_ushort(x);
    bf[i] = __bfloat16_as_ushort(y);
    back[2 * i] = __half2float(__ushort_as_half(h[i]));
    back[2 * i + 1] = __bfloat162float(__ushort_as_bfloat16(bf[i]));
}
VERA_EMU_REGISTER(vera_emu_selftest_half)

// 16-byte vector loads reinterpreted as other element types (the pattern g++'s strict aliasing
// would break at -O2 without the shim's vector-type definitions): out[i] = float of element i,
// read through a uint4 copy, and float4 / make_float4 round trip.
template <typename T>
__device__ __noinline__ void vera_emu_selftest_wide_load(const T* p, float* out) {
    constexpr int N = 16 / static_cast<int>(sizeof(T));
    const uint4 raw = *reinterpret_cast<const uint4*>(p);
    const T* e = reinterpret_cast<const T*>(&raw);
    for (int i = 0; i < N; ++i) {
        if constexpr (sizeof(T) == 4)
            out[i] = static_cast<float>(e[i]);
        else if constexpr (std::is_same<T, __half>::value)
            out[i] = __half2float(e[i]);
        else
            out[i] = __bfloat162float(e[i]);
    }
}
extern "C" __global__ void vera_emu_selftest_vector_types(const float* f, const __half* h,
                                                         const __nv_bfloat16* b, float* out) {
    if (threadIdx.x != 0) return;
    vera_emu_selftest_wide_load(f, out);
    vera_emu_selftest_wide_load(h, out + 4);
    vera_emu_selftest_wide_load(b, out + 12);
    const float4 v = *reinterpret_cast<const float4*>(f);
    const float4 w = make_float4(v.w, v.z, v.y, v.x);
    *reinterpret_cast<float4*>(out + 20) = w;
}
VERA_EMU_REGISTER(vera_emu_selftest_vector_types)

// Split-K completion protocols (emu/README.md, "Concurrent schedule"). Grid (groups, splits),
// 64 threads. Block (g, s) writes its partials part[s][g][t] with __stcg; the block that completes
// group g sums the splits in order with __ldcg into out[g][t]. `variant`:
//   0: the protocol of common.cuh (barrier, one fence, atomic, fence in the last block);
//   1: broken, no fence: the partials may not be visible when the last block reads them;
//   2: broken, the block is counted before it writes its partials (the fence comes too late).
// Counters start at zero and are left at zero.
extern "C" __global__ void vera_emu_selftest_splitk(unsigned* part, unsigned* out, unsigned* counters, int variant) {
    __shared__ int last;
    const unsigned g = blockIdx.x, s = blockIdx.y, groups = gridDim.x, splits = gridDim.y, t = threadIdx.x;
    unsigned* mine = &part[(s * groups + g) * 64 + t];
    const unsigned value = 1000u * (g + 1) + 17u * (s + 1) + t;
    if (variant != 2) __stcg(mine, value);
    __syncthreads();
    if (t == 0) {
        if (variant == 0) __threadfence();
        const unsigned done = atomicAdd(&counters[g], 1u);
        last = done + 1 == splits;
        if (last) {
            if (variant == 0) __threadfence();
            counters[g] = 0;
        }
    }
    __syncthreads();
    if (variant == 2) {
        __stcg(mine, value);
        __threadfence();
        __syncthreads();
    }
    if (!last) return;
    unsigned sum = 0;
    for (unsigned k = 0; k < splits; ++k) sum += __ldcg(&part[(k * groups + g) * 64 + t]);
    out[g * 64 + t] = sum;
}
VERA_EMU_REGISTER(vera_emu_selftest_splitk)

// Every block keeps its own __shared__ array across switch points (barriers, atomics, fences,
// global loads); bad[block] counts the values that changed. Thread 0 also takes a ticket from
// `order` when the block starts and when it ends: tickets[block] = {start, end}.
extern "C" __global__ void vera_emu_selftest_shared_per_block(unsigned* order, unsigned* tickets, unsigned* bad,
                                                            const unsigned* in) {
    __shared__ unsigned s[128];
    const unsigned b = blockIdx.x, t = threadIdx.x;
    if (t == 0) tickets[2 * b] = atomicAdd(order, 1u);
    s[t] = b * 1000u + t;
    unsigned wrong = 0;
    for (int i = 0; i < 8; ++i) {
        __syncthreads();
        const unsigned v = __ldcg(&in[(t + i) % 128]);
        atomicAdd(&bad[gridDim.x], v);  // a switch point; the sum is not checked
        __threadfence();
        wrong += s[(t + 1) % 128] != b * 1000u + (t + 1) % 128;
        __syncthreads();
        s[t] = b * 1000u + t;
    }
    if (wrong) atomicAdd(&bad[b], wrong);
    __syncthreads();
    if (t == 0) tickets[2 * b + 1] = atomicAdd(order, 1u);
}
VERA_EMU_REGISTER(vera_emu_selftest_shared_per_block)

#endif  // VERA_EMU_SELFTEST_CUH
