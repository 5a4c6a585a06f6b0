// ptx.cuh — every inline PTX instruction the kernels use, each behind one small wrapper. Under
// VERA_EMULATION the host versions in emu/ptx_emu.h (written from the PTX ISA's fragment-layout
// tables) take their place, so the emulator only has to know these few instructions.
#pragma once

#include "compat.cuh"

#ifdef VERA_EMULATION
#include "emu/ptx_emu.h"
#else

// D = A·B + C for one warp: A 16x16 row-major (4 regs, 2 elements each), B 16x8 column-major
// (2 regs), C/D 16x8 f32 (4 per lane), laid out as in the PTX ISA's "Matrix Fragments for
// mma.m16n8k16".
__device__ __forceinline__ void mma_m16n8k16_bf16(float d[4], const uint32_t a[4], const uint32_t b[2],
                                                  const float c[4]) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%10,%11,%12,%13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
          "f"(c[3]));
}

__device__ __forceinline__ void mma_m16n8k16_f16(float d[4], const uint32_t a[4], const uint32_t b[2],
                                                 const float c[4]) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%10,%11,%12,%13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
          "f"(c[3]));
}

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Four 8x8 b16 matrices from shared memory; lane l gives the address of row l % 8 of matrix l / 8.
__device__ __forceinline__ void ldmatrix_x4(uint32_t r[4], const void* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(row)));
}

// BYTES (4, 8 or 16; both addresses aligned to it) global -> shared without passing through
// registers; bytes past src_bytes are zero-filled (src_bytes = 0 reads nothing), which is how the
// tile loaders mask the matrices' edges. 16-byte copies bypass L1 (.cg); the PTX ISA allows that
// only for 16 bytes, so smaller ones go through it (.ca).
template <int BYTES> __device__ __forceinline__ void cp_async(void* smem, const void* gmem, int src_bytes) {
    static_assert(BYTES == 4 || BYTES == 8 || BYTES == 16, "cp.async copies 4, 8 or 16 bytes");
    if constexpr (BYTES == 16) {
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem)), "l"(gmem),
                     "r"(src_bytes));
    } else {
        asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;\n" ::"r"(smem_addr(smem)), "l"(gmem),
                     "n"(BYTES), "r"(src_bytes));
    }
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

// Waits until at most N committed groups are still in flight.
template <int N> __device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// The block's dynamic shared memory, 16-byte aligned, and its size: the bytes the launch asked for
// (kernels whose shared memory passes the 48 KiB a static array may take).
__device__ __forceinline__ unsigned char* dynamic_smem() {
    extern __shared__ __align__(16) unsigned char vera_dynamic_smem[];
    return vera_dynamic_smem;
}

__device__ __forceinline__ unsigned dynamic_smem_size() {
    unsigned bytes;
    asm("mov.u32 %0, %%dynamic_smem_size;\n" : "=r"(bytes));
    return bytes;
}

// Programmatic dependent launch: a kernel launched with the host's programmatic-serialisation
// attribute may start before the previous kernel of its stream ends, once every block of that
// kernel has called grid_dependents_may_launch (or ended). It must call wait_for_previous_grid
// before it reads anything that kernel writes: the wait returns when the previous grid has ended
// and its writes are visible (and at once for a kernel launched without the attribute).
__device__ __forceinline__ void grid_dependents_may_launch() {
#if VERA_GRID_DEPENDENCY
    asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

__device__ __forceinline__ void wait_for_previous_grid() {
#if VERA_GRID_DEPENDENCY
    asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

// Asks L2 for the line holding `p` (no register written, never faults on a valid address).
__device__ __forceinline__ void prefetch_l2(const void* p) { asm volatile("prefetch.global.L2 [%0];\n" ::"l"(p)); }

#endif

// The mma for the element type of a tile (16-bit types only; f32 tiles use CUDA cores).
__device__ __forceinline__ void mma_m16n8k16(float d[4], const uint32_t a[4], const uint32_t b[2], const float c[4],
                                             bf16) {
    mma_m16n8k16_bf16(d, a, b, c);
}
__device__ __forceinline__ void mma_m16n8k16(float d[4], const uint32_t a[4], const uint32_t b[2], const float c[4],
                                             f16) {
    mma_m16n8k16_f16(d, a, b, c);
}
