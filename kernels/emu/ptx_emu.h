// Host versions of the inline-PTX wrappers of kernels/ptx.cuh, for the CPU emulation
// (-DVERA_EMULATION). Written from the fragment layouts of the PTX ISA:
//   mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32  ("Matrix Fragments for
//   mma.m16n8k16 with floating point type"), ldmatrix.sync.aligned.m8n8.{x1,x2,x4}{,.trans}
//   .shared.b16 and cp.async.cg.shared.global with a source size.
// The warp-wide wrappers exchange every lane's operands through the emulator's warp exchange, so
// each lane receives what the hardware would give it from the other lanes' registers.
//
// This header includes nothing itself (emu/cuda_emu.h is force-included before everything) and
// refers to the emulator only as ::vera_emu, so it may be included at any namespace scope.
#ifndef VERA_PTX_EMU_H
#define VERA_PTX_EMU_H

#ifndef VERA_CUDA_EMU_H
#error "emu/ptx_emu.h needs emu/cuda_emu.h (force-included in emulation builds)"
#endif

namespace vera_emu {
namespace ptx {

// Element `i` (0 = low half) of a packed pair of 16-bit values.
inline unsigned short half_of(::uint32_t r, int i) {
    return static_cast<unsigned short>(i ? (r >> 16) : (r & 0xffffu));
}

inline double decode_bf16(unsigned short b) { return static_cast<double>(::vera_emu::bf16_bits_to_f32(b)); }
inline double decode_f16(unsigned short h) { return static_cast<double>(::vera_emu::f16_bits_to_f32(h)); }

// m16n8k16, A row-major (16x16), B "col" (16x8, each lane holds pairs along k), C/D f32.
// Per PTX ISA, with g = lane >> 2 and t = lane % 4:
//   A: a[0] = A[g][2t..2t+1], a[1] = A[g+8][2t..], a[2] = A[g][2t+8..], a[3] = A[g+8][2t+8..]
//   B: b[0] = B[2t..2t+1][g], b[1] = B[2t+8..2t+9][g]
//   C/D: c[0] = C[g][2t], c[1] = C[g][2t+1], c[2] = C[g+8][2t], c[3] = C[g+8][2t+1]
// (low half of a register = the element with the lower index).
// Each output is c + the 16 products, summed in double (the products of two 16-bit floats are
// exact in double) and rounded once to float. The tensor cores accumulate in (at least) f32
// with their own internal order/rounding, so results may differ from the GPU within f32
// accumulation error.
template <double (*Decode)(unsigned short)>
inline void mma_m16n8k16(float d[4], const ::uint32_t a[4], const ::uint32_t b[2], const float c[4],
                         const char* file, int line) {
    struct Operands {
        ::uint32_t a[4];
        ::uint32_t b[2];
    };
    Operands mine;
    for (int i = 0; i < 4; ++i) mine.a[i] = a[i];
    for (int i = 0; i < 2; ++i) mine.b[i] = b[i];
    unsigned got;
    const unsigned char* buf = ::vera_emu::warp_exchange_view(::vera_emu::WarpOp::Mma, 0xffffffffu, false, true,
                                                              &mine, sizeof mine, &got, file, line);
    // This lane's outputs need rows g and g + 8 of A and columns 2t, 2t + 1 of B. Element A[r][k]
    // is in lane 4 (r % 8) + (k % 8) / 2, register (r >= 8) + 2 (k >= 8), half k % 2; element
    // B[k][n] in lane 4 n + (k % 8) / 2, register (k >= 8), half k % 2.
    const int lane = static_cast<int>(::vera_emu::lane_id());
    const int g = lane >> 2, t = lane & 3;
    Operands arow[4], bcol[2][4];  // lanes 4g.. (A rows g, g + 8) and 4n.. (B columns n = 2t, 2t + 1)
    for (int s = 0; s < 4; ++s) {
        arow[s] = ::vera_emu::exchanged<Operands>(buf, 4 * g + s);
        for (int i = 0; i < 2; ++i) bcol[i][s] = ::vera_emu::exchanged<Operands>(buf, 4 * (2 * t + i) + s);
    }
    double A[2][16], B[16][2];
    for (int k = 0; k < 16; ++k) {
        const int src = (k % 8) / 2, hi = k >= 8 ? 1 : 0;
        for (int i = 0; i < 2; ++i) {
            A[i][k] = Decode(half_of(arow[src].a[i + 2 * hi], k & 1));
            B[k][i] = Decode(half_of(bcol[i][src].b[hi], k & 1));
        }
    }
    for (int i = 0; i < 4; ++i) {
        double acc = static_cast<double>(c[i]);
        for (int k = 0; k < 16; ++k) acc += A[i >> 1][k] * B[k][i & 1];
        d[i] = static_cast<float>(acc);
    }
}

// ldmatrix.m8n8.b16: matrix m's 8 rows (16 bytes each) are addressed by lanes 8m..8m+7.
//   plain:  lane i, register m = M_m[i/4][2(i%4)], M_m[i/4][2(i%4)+1]          (low, high)
//   .trans: lane i, register m = M_m[2(i%4)][i/4], M_m[2(i%4)+1][i/4]          (low, high)
inline void ldmatrix(::uint32_t* r, int count, bool trans, const void* row, const char* file, int line) {
    struct Contribution {
        const void* row;
        int kind;
    };
    const Contribution mine{row, count * 2 + (trans ? 1 : 0)};
    unsigned got;
    const unsigned char* buf = ::vera_emu::warp_exchange_view(::vera_emu::WarpOp::Ldmatrix, 0xffffffffu, false,
                                                              true, &mine, sizeof mine, &got, file, line);
    Contribution all[32];
    for (int l = 0; l < 32; ++l) all[l] = ::vera_emu::exchanged<Contribution>(buf, l);
    for (int l = 0; l < 32; ++l)
        if (all[l].kind != mine.kind)
            ::vera_emu::fail("ldmatrix at %s:%d: lane %d runs ldmatrix .x%d%s, lane %d .x%d%s",
                             ::vera_emu::base_name(file), line, static_cast<int>(::vera_emu::lane_id()), count,
                             trans ? ".trans" : "", l,
                             all[l].kind / 2, (all[l].kind & 1) ? ".trans" : "");
    for (int l = 0; l < 8 * count; ++l)
        if ((reinterpret_cast<::uintptr_t>(all[l].row) & 15u) != 0)
            ::vera_emu::fail("ldmatrix at %s:%d: row address %p of lane %d is not 16-byte aligned",
                             ::vera_emu::base_name(file), line, all[l].row, l);
    const int lane = static_cast<int>(::vera_emu::lane_id());
    for (int m = 0; m < count; ++m) {
        if (!trans) {
            const unsigned char* p = static_cast<const unsigned char*>(all[8 * m + lane / 4].row) + 4 * (lane % 4);
            ::uint32_t v;
            __builtin_memcpy(&v, p, 4);
            r[m] = v;
        } else {
            unsigned short lo, hi;
            const int col = lane / 4, r0 = 2 * (lane % 4);
            __builtin_memcpy(&lo, static_cast<const unsigned char*>(all[8 * m + r0].row) + 2 * col, 2);
            __builtin_memcpy(&hi, static_cast<const unsigned char*>(all[8 * m + r0 + 1].row) + 2 * col, 2);
            r[m] = static_cast<::uint32_t>(lo) | (static_cast<::uint32_t>(hi) << 16);
        }
    }
}

}  // namespace ptx
}  // namespace vera_emu

inline void mma_m16n8k16_bf16(float d[4], const ::uint32_t a[4], const ::uint32_t b[2], const float c[4],
                              const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    ::vera_emu::ptx::mma_m16n8k16<&::vera_emu::ptx::decode_bf16>(d, a, b, c, file, line);
}
inline void mma_m16n8k16_f16(float d[4], const ::uint32_t a[4], const ::uint32_t b[2], const float c[4],
                             const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    ::vera_emu::ptx::mma_m16n8k16<&::vera_emu::ptx::decode_f16>(d, a, b, c, file, line);
}

inline void ldmatrix_x1(::uint32_t r[1], const void* row, const char* file = __builtin_FILE(),
                        int line = __builtin_LINE()) {
    ::vera_emu::ptx::ldmatrix(r, 1, false, row, file, line);
}
inline void ldmatrix_x2(::uint32_t r[2], const void* row, const char* file = __builtin_FILE(),
                        int line = __builtin_LINE()) {
    ::vera_emu::ptx::ldmatrix(r, 2, false, row, file, line);
}
inline void ldmatrix_x4(::uint32_t r[4], const void* row, const char* file = __builtin_FILE(),
                        int line = __builtin_LINE()) {
    ::vera_emu::ptx::ldmatrix(r, 4, false, row, file, line);
}
inline void ldmatrix_x1_trans(::uint32_t r[1], const void* row, const char* file = __builtin_FILE(),
                              int line = __builtin_LINE()) {
    ::vera_emu::ptx::ldmatrix(r, 1, true, row, file, line);
}
inline void ldmatrix_x2_trans(::uint32_t r[2], const void* row, const char* file = __builtin_FILE(),
                              int line = __builtin_LINE()) {
    ::vera_emu::ptx::ldmatrix(r, 2, true, row, file, line);
}
inline void ldmatrix_x4_trans(::uint32_t r[4], const void* row, const char* file = __builtin_FILE(),
                              int line = __builtin_LINE()) {
    ::vera_emu::ptx::ldmatrix(r, 4, true, row, file, line);
}

// cp.async.{cg,ca}.shared.global [smem], [gmem], BYTES, src_bytes: copy src_bytes (0..BYTES), zero
// the rest of the BYTES. Done synchronously; when src_bytes == 0 the source is not read.
template <int BYTES>
inline void cp_async(void* smem, const void* gmem, int src_bytes, const char* file = __builtin_FILE(),
                     int line = __builtin_LINE()) {
    static_assert(BYTES == 4 || BYTES == 8 || BYTES == 16, "cp.async copies 4, 8 or 16 bytes");
    if (src_bytes < 0 || src_bytes > BYTES)
        ::vera_emu::fail("cp.async at %s:%d: src_bytes %d not in [0, %d]", ::vera_emu::base_name(file), line,
                         src_bytes, BYTES);
    constexpr ::uintptr_t MASK = BYTES - 1;
    if ((reinterpret_cast<::uintptr_t>(smem) & MASK) != 0)
        ::vera_emu::fail("cp.async at %s:%d: shared address %p is not %d-byte aligned", ::vera_emu::base_name(file),
                         line, smem, BYTES);
    if (src_bytes > 0 && (reinterpret_cast<::uintptr_t>(gmem) & MASK) != 0)
        ::vera_emu::fail("cp.async at %s:%d: global address %p is not %d-byte aligned", ::vera_emu::base_name(file),
                         line, gmem, BYTES);
    ::vera_emu::maybe_yield();  // a global read: a switch point in the concurrent schedule
    unsigned char* d = static_cast<unsigned char*>(smem);
    if (src_bytes > 0) __builtin_memcpy(d, gmem, static_cast<unsigned long>(src_bytes));
    for (int i = src_bytes; i < BYTES; ++i) d[i] = 0;
}
inline void cp_async_commit() {}
template <int N>
inline void cp_async_wait() {}

// The running block's own buffer (0xA5 bytes when it starts), of the size its launch asked for.
inline unsigned char* dynamic_smem() { return ::vera_emu::dynamic_shared(); }
inline unsigned dynamic_smem_size() { return ::vera_emu::dynamic_shared_size(); }

// griddepcontrol: the emulator runs launches one after another, so a kernel always starts after
// the previous one ended: nothing to wait for, no one to let start. A prefetch changes nothing.
inline void grid_dependents_may_launch() {}
inline void wait_for_previous_grid() {}
inline void prefetch_l2(const void*) {}

#endif  // VERA_PTX_EMU_H
