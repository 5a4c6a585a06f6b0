// Host (CPU) emulation of the CUDA execution model, force-included before every kernel source
// when the kernels are built with g++ and -DVERA_EMULATION (see emu/README.md).
//
// Every CUDA thread of a block runs as its own fiber (ucontext) on the launching OS thread, so
// __syncthreads(), the warp shuffles/votes and the warp-wide PTX wrappers of emu/ptx_emu.h behave
// as on the GPU. Blocks run one after another. The scheduler and vera_emu_launch() live in
// emu/runtime.cpp, which must be compiled in the same translation unit after this header.
#ifndef VERA_CUDA_EMU_H
#define VERA_CUDA_EMU_H

#if !defined(__cplusplus) || __cplusplus < 201703L
#error "emu/cuda_emu.h needs C++17"
#endif

// Standard headers first, before the CUDA keyword macros below exist: libstdc++ itself uses
// `__attribute__((__noinline__))` (e.g. <memory>), which the `__noinline__` macro would break.
// Everything a kernel is likely to include is included here, so that a later #include of it is a
// no-op behind its include guard.
#include <stdint.h>
#include <stddef.h>
#include <math.h>
#include <algorithm>
#include <array>
#include <atomic>
#include <cassert>
#include <cfloat>
#include <climits>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <new>
#include <numeric>
#include <string>
#include <thread>
#include <tuple>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <vector>
#include <chrono>
#include <cstdarg>
#include <ucontext.h>
#include <sys/mman.h>
#include <unistd.h>
#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif
// Fiber stacks are registered with valgrind where its client-request header is available (the
// requests cost a few instructions outside valgrind); -DVERA_EMU_NO_VALGRIND turns this off.
#if !defined(VERA_EMU_NO_VALGRIND) && !defined(VERA_EMU_VALGRIND) && defined(__has_include)
#if __has_include(<valgrind/valgrind.h>)
#define VERA_EMU_VALGRIND 1
#endif
#endif
#if defined(VERA_EMU_VALGRIND)
#include <valgrind/valgrind.h>
#endif

// ---------------------------------------------------------------------------------------------
// CUDA keywords
// ---------------------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __constant__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
// A __shared__ variable is a static in the section vera_emu_shared. In the sequential schedule
// blocks run one at a time, so the one copy is exactly "one per block, shared by its threads" (and,
// unlike on the GPU, the contents persist from one block and launch to the next). In the concurrent
// schedule the runtime saves and restores the whole section when it switches between blocks, so
// each resident block has its own copy. Only statically sized __shared__ arrays are declared this
// way (no `extern __shared__`), and `static __shared__` would expand to `static static`. A block's
// dynamic shared memory (the bytes its launch asks for) is its own buffer, reached through
// vera_emu::dynamic_shared() (ptx_emu.h's dynamic_smem).
#define __shared__ static __attribute__((section("vera_emu_shared")))
// `__restrict__` is understood by g++ as is.

#define VERA_EMU_STRINGIFY_(x) #x
#define VERA_EMU_STRINGIFY(x) VERA_EMU_STRINGIFY_(x)

// ---------------------------------------------------------------------------------------------
// Built-in vector types
// ---------------------------------------------------------------------------------------------
struct uint3 {
    unsigned int x, y, z;
};
struct dim3 {
    unsigned int x, y, z;
    constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
    constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
    constexpr operator uint3() const { return uint3{x, y, z}; }
};
// Kernels use the vector types for wide loads of other element types: `uint4 raw =
// *reinterpret_cast<const uint4*>(p);` and then read `raw` through a `const T*`. nvcc compiles that
// as meant; g++'s type-based alias analysis (on at -O2) may drop the copy as dead, since no uint4
// is read back. So the vector types are may_alias (reading them from other types' memory is fine)
// and overlay their fields with a byte array (a type with a char member conflicts with every type
// in g++'s alias analysis, so the copy stays). Building with -fno-strict-aliasing is still safest.
#define VERA_EMU_VECTOR_TYPE(name, align, T, n, ...)                    \
    struct __attribute__((__may_alias__, __aligned__(align))) name { \
        __extension__ union {                                        \
            __extension__ struct {                                   \
                T __VA_ARGS__;                                       \
            };                                                       \
            unsigned char vera_emu_bytes_[n * sizeof(T)];            \
        };                                                           \
    }
VERA_EMU_VECTOR_TYPE(int2, 8, int, 2, x, y);
VERA_EMU_VECTOR_TYPE(int4, 16, int, 4, x, y, z, w);
VERA_EMU_VECTOR_TYPE(uint2, 8, unsigned int, 2, x, y);
VERA_EMU_VECTOR_TYPE(uint4, 16, unsigned int, 4, x, y, z, w);
VERA_EMU_VECTOR_TYPE(float2, 8, float, 2, x, y);
VERA_EMU_VECTOR_TYPE(float4, 16, float, 4, x, y, z, w);
#undef VERA_EMU_VECTOR_TYPE
static_assert(sizeof(uint4) == 16 && alignof(uint4) == 16 && sizeof(float2) == 8, "vector type layout");
static_assert(std::is_trivially_copyable<uint4>::value && std::is_trivially_copyable<float4>::value,
              "vector types must be trivially copyable");
#define VERA_EMU_MAKE2(T, E)        \
    inline T make_##T(E x, E y) {   \
        T v;                        \
        v.x = x;                    \
        v.y = y;                    \
        return v;                   \
    }
#define VERA_EMU_MAKE4(T, E)                \
    inline T make_##T(E x, E y, E z, E w) { \
        T v;                                \
        v.x = x;                            \
        v.y = y;                            \
        v.z = z;                            \
        v.w = w;                            \
        return v;                           \
    }
VERA_EMU_MAKE2(int2, int)
VERA_EMU_MAKE4(int4, int)
VERA_EMU_MAKE2(uint2, unsigned int)
VERA_EMU_MAKE4(uint4, unsigned int)
VERA_EMU_MAKE2(float2, float)
VERA_EMU_MAKE4(float4, float)
#undef VERA_EMU_MAKE2
#undef VERA_EMU_MAKE4
inline uint3 make_uint3(unsigned x, unsigned y, unsigned z) { return uint3{x, y, z}; }

// ---------------------------------------------------------------------------------------------
// Emulator core: the state the intrinsics read. Defined in emu/runtime.cpp.
// ---------------------------------------------------------------------------------------------
namespace vera_emu {

// Kind of a warp collective; every lane of one collective must use the same kind.
enum class WarpOp : int {
    Generic = 0,
    Syncwarp,
    Shfl,
    ShflUp,
    ShflDown,
    ShflXor,
    Ballot,
    Any,
    All,
    Reduce,
    Mma,
    Ldmatrix,
};
const char* warp_op_name(WarpOp op);

// Largest per-lane contribution to one warp exchange.
constexpr size_t kMaxExchangeBytes = 64;

namespace detail {
struct Fiber;    // one CUDA thread
struct Launch;   // the launch being run
// The CUDA thread running now (null outside a kernel) and the launch it belongs to.
inline thread_local Fiber* g_cur = nullptr;
inline thread_local Launch* g_launch = nullptr;
const uint3& cur_thread_idx();
const uint3& cur_block_idx();
const dim3& cur_block_dim();
const dim3& cur_grid_dim();
// The current launch runs in the concurrent schedule (emu/README.md).
inline thread_local bool g_concurrent = false;
}  // namespace detail

// Concurrent schedule only (no-ops otherwise, and outside kernels). A point where the scheduler may
// switch to another thread, of this block or (`sync`: more likely) of another one.
void yield_point(bool sync);
inline void maybe_yield(bool sync = false) {
    if (__builtin_expect(detail::g_concurrent, false)) yield_point(sync);
}
// __threadfence: makes the caller's buffered __stcg stores, and those of its block made before a
// __syncthreads it has passed since, visible to other blocks.
void fence();
// __stcg / __ldcg: the store is buffered (visible to its own block only) until a fence, the end of
// the launch, or a random drain; the load sees its block's buffered stores, else memory.
void store_cg(void* p, const void* v, size_t size);
void load_cg(const void* p, void* out, size_t size);

// Linear thread id in the block (x fastest), lane and warp of the calling CUDA thread.
unsigned thread_linear();
unsigned lane_id();
unsigned warp_id();
// Lanes of the caller's warp that exist (the last warp of a block may be partial) and have not
// returned yet.
unsigned live_lane_mask();

// File name without its directories, for messages.
inline const char* base_name(const char* path) {
    const char* b = path;
    for (const char* s = path; *s; ++s)
        if (*s == '/' || *s == '\\') b = s + 1;
    return b;
}

// The running block's dynamic shared memory: dynamic_shared_size() bytes, 16-byte aligned, filled
// with 0xA5 bytes when the block starts (on the GPU its contents are undefined).
unsigned char* dynamic_shared();
unsigned dynamic_shared_size();

// Abort the launch with an error (the message is returned by vera_emu_launch). Never returns.
[[noreturn]] void fail(const char* fmt, ...) __attribute__((format(printf, 1, 2)));

// Block barrier; also returns the number of threads with pred != 0 (for __syncthreads_count...).
int block_barrier(int pred, const char* op, const char* file, int line);

// General warp exchange. Every live lane of the warp calls it with the same `op`; `mask` must
// equal the warp's live-lane mask (checked) unless `check_mask` is false; `need_full_warp`
// demands all 32 lanes. Each lane contributes `bytes` (<= kMaxExchangeBytes) from `mine` and
// receives the contributions of all 32 lanes, in lane order, in `all32` (32 * bytes; slots of
// lanes that do not exist or have exited are zero). Returns the mask of contributing lanes. The
// exchange buffer is double-buffered by generation, so no lane can overwrite a contribution
// before every lane has read it.
unsigned warp_exchange(WarpOp op, unsigned mask, bool check_mask, bool need_full_warp, const void* mine,
                       size_t bytes, void* all32, const char* file, int line);

// The same exchange without the copy: returns the exchange buffer, where lane l's contribution
// starts at l * kMaxExchangeBytes, and the mask of contributing lanes in *got. The buffer stays
// valid until the calling lane's next warp collective.
const unsigned char* warp_exchange_view(WarpOp op, unsigned mask, bool check_mask, bool need_full_warp,
                                        const void* mine, size_t bytes, unsigned* got, const char* file, int line);

// Contribution of `lane` in a buffer returned by warp_exchange_view.
template <typename T>
inline T exchanged(const unsigned char* buf, int lane) {
    T v;
    std::memcpy(&v, buf + static_cast<size_t>(lane) * kMaxExchangeBytes, sizeof(T));
    return v;
}

// Every live lane contributes `bytes`, waits for all, receives all lanes' contributions.
inline unsigned warp_allgather(const void* mine, size_t bytes, void* all32, const char* file = __builtin_FILE(),
                               int line = __builtin_LINE()) {
    return warp_exchange(WarpOp::Generic, 0, false, false, mine, bytes, all32, file, line);
}

}  // namespace vera_emu

#define threadIdx (::vera_emu::detail::cur_thread_idx())
#define blockIdx (::vera_emu::detail::cur_block_idx())
#define blockDim (::vera_emu::detail::cur_block_dim())
#define gridDim (::vera_emu::detail::cur_grid_dim())
constexpr int warpSize = 32;

// ---------------------------------------------------------------------------------------------
// Kernel registration: VERA_EMU_REGISTER(name) after `extern "C" __global__ void name(...)`.
// ---------------------------------------------------------------------------------------------
namespace vera_emu {
using Invoker = void (*)(void** params);
// `arity` is the kernel's parameter count (a launch with arity > 0 needs non-null params).
bool register_kernel(const char* name, Invoker inv, size_t arity);

namespace detail {
template <typename... A, size_t... I>
inline void call_unpacked(void (*fn)(A...), void** params, std::index_sequence<I...>) {
    // cuLaunchKernel convention: params[i] points to the value of parameter i.
    fn(*static_cast<std::remove_cv_t<std::remove_reference_t<A>>*>(params[I])...);
}
template <typename... A>
constexpr size_t arity(void (*)(A...)) {
    return sizeof...(A);
}
template <auto Fn>
void invoke(void** params) {
    call_unpacked(Fn, params, std::make_index_sequence<arity(Fn)>{});
}
}  // namespace detail
}  // namespace vera_emu

#define VERA_EMU_REGISTER(name)                                                                      \
    [[maybe_unused]] static const bool vera_emu_registered_##name =                                  \
        ::vera_emu::register_kernel(#name, &::vera_emu::detail::invoke<&name>, ::vera_emu::detail::arity(&name));

// ---------------------------------------------------------------------------------------------
// Synchronisation
// ---------------------------------------------------------------------------------------------
inline void __syncthreads(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    ::vera_emu::block_barrier(0, "__syncthreads", file, line);
}
inline int __syncthreads_count(int pred, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    return ::vera_emu::block_barrier(pred, "__syncthreads_count", file, line);
}
inline int __syncthreads_and(int pred, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    return ::vera_emu::block_barrier(pred, "__syncthreads_and", file, line) ==
           static_cast<int>(blockDim.x * blockDim.y * blockDim.z);
}
inline int __syncthreads_or(int pred, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    return ::vera_emu::block_barrier(pred, "__syncthreads_or", file, line) != 0;
}
inline void __syncwarp(unsigned mask = 0xffffffffu, const char* file = __builtin_FILE(),
                       int line = __builtin_LINE()) {
    unsigned got;
    ::vera_emu::warp_exchange_view(::vera_emu::WarpOp::Syncwarp, mask, true, false, nullptr, 0, &got, file, line);
}
// Fibers run one at a time and see each other's plain writes immediately. In the concurrent
// schedule a device-wide fence publishes the caller's buffered __stcg stores (see fence()); a block
// sees its own stores anyway, so __threadfence_block stays a no-op.
inline void __threadfence() {
    if (::vera_emu::detail::g_concurrent) ::vera_emu::fence();
}
inline void __threadfence_block() {}
inline void __threadfence_system() { __threadfence(); }
inline unsigned __activemask() { return ::vera_emu::live_lane_mask(); }
[[noreturn]] inline void __trap() { ::vera_emu::fail("kernel executed __trap()"); }

// ---------------------------------------------------------------------------------------------
// Warp shuffles and votes
// ---------------------------------------------------------------------------------------------
namespace vera_emu {
namespace detail {
template <typename T>
inline T shfl_common(WarpOp op, unsigned mask, T var, int arg, int width, const char* file, int line) {
    static_assert(std::is_trivially_copyable<T>::value, "shuffled type must be trivially copyable");
    static_assert(sizeof(T) <= kMaxExchangeBytes, "shuffled type too large");
    if (width <= 0 || width > 32 || (width & (width - 1)) != 0)
        fail("%s: width %d is not a power of two in [1, 32] (%s:%d)", warp_op_name(op), width, file, line);
    unsigned got;
    const unsigned char* all = warp_exchange_view(op, mask, true, false, &var, sizeof(T), &got, file, line);
    const int lane = static_cast<int>(lane_id());
    const int seg = lane & ~(width - 1);  // first lane of this lane's segment
    int src = lane;
    switch (op) {
        case WarpOp::Shfl: src = seg + (arg & (width - 1)); break;
        case WarpOp::ShflUp: src = (lane - seg) >= arg ? lane - arg : lane; break;
        case WarpOp::ShflDown: src = (lane - seg) + arg < width ? lane + arg : lane; break;
        case WarpOp::ShflXor: {
            const int s = lane ^ arg;
            src = (s >= seg && s < seg + width) ? s : lane;
            break;
        }
        default: break;
    }
    // Reading a lane that does not take part is undefined on the GPU; here it yields own value.
    if (src < 0 || src > 31 || !((got >> src) & 1u)) return var;
    return exchanged<T>(all, src);
}
}  // namespace detail
}  // namespace vera_emu

template <typename T>
inline T __shfl_sync(unsigned mask, T var, int srcLane, int width = warpSize, const char* file = __builtin_FILE(),
                     int line = __builtin_LINE()) {
    return ::vera_emu::detail::shfl_common(::vera_emu::WarpOp::Shfl, mask, var, srcLane, width, file, line);
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize,
                        const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    return ::vera_emu::detail::shfl_common(::vera_emu::WarpOp::ShflUp, mask, var, static_cast<int>(delta), width,
                                           file, line);
}
template <typename T>
inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize,
                          const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    return ::vera_emu::detail::shfl_common(::vera_emu::WarpOp::ShflDown, mask, var, static_cast<int>(delta), width,
                                           file, line);
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T var, int laneMask, int width = warpSize,
                         const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    return ::vera_emu::detail::shfl_common(::vera_emu::WarpOp::ShflXor, mask, var, laneMask, width, file, line);
}

namespace vera_emu {
namespace detail {
inline unsigned vote(WarpOp op, unsigned mask, int pred, const char* file, int line) {
    const int mine = pred != 0;
    unsigned got;
    const unsigned char* all = warp_exchange_view(op, mask, true, false, &mine, sizeof mine, &got, file, line);
    unsigned ballot = 0;
    for (int l = 0; l < 32; ++l)
        if (((got >> l) & 1u) && exchanged<int>(all, l)) ballot |= 1u << l;
    return ballot;
}
}  // namespace detail
}  // namespace vera_emu

inline unsigned __ballot_sync(unsigned mask, int pred, const char* file = __builtin_FILE(),
                              int line = __builtin_LINE()) {
    return ::vera_emu::detail::vote(::vera_emu::WarpOp::Ballot, mask, pred, file, line);
}
inline int __any_sync(unsigned mask, int pred, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    return ::vera_emu::detail::vote(::vera_emu::WarpOp::Any, mask, pred, file, line) != 0;
}
inline int __all_sync(unsigned mask, int pred, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    // all(p) == !any(!p) over the lanes taking part.
    return ::vera_emu::detail::vote(::vera_emu::WarpOp::All, mask, !pred, file, line) == 0;
}

// sm_80 warp reductions (unsigned / int).
namespace vera_emu {
namespace detail {
template <typename T, typename F>
inline T warp_reduce(unsigned mask, T v, F f, const char* file, int line) {
    unsigned got;
    const unsigned char* all = warp_exchange_view(WarpOp::Reduce, mask, true, false, &v, sizeof v, &got, file, line);
    bool first = true;
    T acc{};
    for (int l = 0; l < 32; ++l) {
        if (!((got >> l) & 1u)) continue;
        acc = first ? exchanged<T>(all, l) : f(acc, exchanged<T>(all, l));
        first = false;
    }
    return acc;
}
}  // namespace detail
}  // namespace vera_emu
inline unsigned __reduce_add_sync(unsigned mask, unsigned v, const char* file = __builtin_FILE(),
                                  int line = __builtin_LINE()) {
    return ::vera_emu::detail::warp_reduce(mask, v, [](unsigned a, unsigned b) { return a + b; }, file, line);
}
inline int __reduce_add_sync(unsigned mask, int v, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    return static_cast<int>(__reduce_add_sync(mask, static_cast<unsigned>(v), file, line));
}
inline unsigned __reduce_min_sync(unsigned mask, unsigned v, const char* file = __builtin_FILE(),
                                  int line = __builtin_LINE()) {
    return ::vera_emu::detail::warp_reduce(mask, v, [](unsigned a, unsigned b) { return a < b ? a : b; }, file, line);
}
inline int __reduce_min_sync(unsigned mask, int v, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    return ::vera_emu::detail::warp_reduce(mask, v, [](int a, int b) { return a < b ? a : b; }, file, line);
}
inline unsigned __reduce_max_sync(unsigned mask, unsigned v, const char* file = __builtin_FILE(),
                                  int line = __builtin_LINE()) {
    return ::vera_emu::detail::warp_reduce(mask, v, [](unsigned a, unsigned b) { return a > b ? a : b; }, file, line);
}
inline int __reduce_max_sync(unsigned mask, int v, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    return ::vera_emu::detail::warp_reduce(mask, v, [](int a, int b) { return a > b ? a : b; }, file, line);
}

// ---------------------------------------------------------------------------------------------
// Atomics. Fibers never switch inside these, so plain read-modify-write is atomic. They act on
// memory directly (not on buffered __stcg stores). In the concurrent schedule each is a likely
// switch point before and after.
// ---------------------------------------------------------------------------------------------
template <typename T>
inline T atomicAdd(T* p, T v) {
    ::vera_emu::maybe_yield(true);
    T old = *p;
    *p = static_cast<T>(old + v);
    ::vera_emu::maybe_yield(true);
    return old;
}
template <typename T>
inline T atomicSub(T* p, T v) {
    ::vera_emu::maybe_yield(true);
    T old = *p;
    *p = static_cast<T>(old - v);
    ::vera_emu::maybe_yield(true);
    return old;
}
template <typename T>
inline T atomicMax(T* p, T v) {
    ::vera_emu::maybe_yield(true);
    T old = *p;
    *p = old < v ? v : old;
    ::vera_emu::maybe_yield(true);
    return old;
}
template <typename T>
inline T atomicMin(T* p, T v) {
    ::vera_emu::maybe_yield(true);
    T old = *p;
    *p = v < old ? v : old;
    ::vera_emu::maybe_yield(true);
    return old;
}
template <typename T>
inline T atomicExch(T* p, T v) {
    ::vera_emu::maybe_yield(true);
    T old = *p;
    *p = v;
    ::vera_emu::maybe_yield(true);
    return old;
}
template <typename T>
inline T atomicCAS(T* p, T compare, T v) {
    ::vera_emu::maybe_yield(true);
    T old = *p;
    if (old == compare) *p = v;
    ::vera_emu::maybe_yield(true);
    return old;
}
template <typename T>
inline T atomicAnd(T* p, T v) {
    ::vera_emu::maybe_yield(true);
    T old = *p;
    *p = old & v;
    ::vera_emu::maybe_yield(true);
    return old;
}
template <typename T>
inline T atomicOr(T* p, T v) {
    ::vera_emu::maybe_yield(true);
    T old = *p;
    *p = old | v;
    ::vera_emu::maybe_yield(true);
    return old;
}
template <typename T>
inline T atomicXor(T* p, T v) {
    ::vera_emu::maybe_yield(true);
    T old = *p;
    *p = old ^ v;
    ::vera_emu::maybe_yield(true);
    return old;
}

// ---------------------------------------------------------------------------------------------
// Math and bit intrinsics
// ---------------------------------------------------------------------------------------------
template <typename T>
inline T __ldg(const T* p) {
    return *p;
}
// Loads that bypass L1 (for data other blocks wrote): one level of memory here, except that in the
// concurrent schedule they see the buffered __stcg stores of their own block only.
template <typename T>
inline T __ldcg(const T* p) {
    static_assert(std::is_trivially_copyable<T>::value, "__ldcg of a trivially copyable type");
    if (::vera_emu::detail::g_concurrent) {
        T v;
        ::vera_emu::load_cg(p, &v, sizeof v);
        return v;
    }
    return *p;
}
// Stores that bypass L1 (for data other blocks read). In the concurrent schedule they are buffered
// per block until a __threadfence (emu/README.md): a missing fence loses them.
template <typename T>
inline void __stcg(T* p, T v) {
    static_assert(std::is_trivially_copyable<T>::value, "__stcg of a trivially copyable type");
    if (::vera_emu::detail::g_concurrent) {
        ::vera_emu::store_cg(p, &v, sizeof v);
        return;
    }
    *p = v;
}
inline float __fmaf_rn(float a, float b, float c) { return ::fmaf(a, b, c); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fdividef(float a, float b) { return a / b; }
inline float __frcp_rn(float a) { return 1.0f / a; }
inline float __fsqrt_rn(float a) { return ::sqrtf(a); }
inline float __frsqrt_rn(float a) { return 1.0f / ::sqrtf(a); }
inline float rsqrtf(float a) { return 1.0f / ::sqrtf(a); }
inline float __expf(float a) { return ::expf(a); }
inline float __logf(float a) { return ::logf(a); }
inline float __sinf(float a) { return ::sinf(a); }
inline float __cosf(float a) { return ::cosf(a); }
inline float __tanf(float a) { return ::tanf(a); }
inline float __powf(float a, float b) { return ::powf(a, b); }
inline float __saturatef(float a) { return a != a ? 0.0f : (a < 0.0f ? 0.0f : (a > 1.0f ? 1.0f : a)); }
inline int __float2int_rn(float a) { return static_cast<int>(::nearbyintf(a)); }
inline int __float2int_rz(float a) { return static_cast<int>(a); }
inline float __int2float_rn(int a) { return static_cast<float>(a); }
inline float __uint2float_rn(unsigned a) { return static_cast<float>(a); }

inline unsigned __float_as_uint(float f) {
    unsigned u;
    std::memcpy(&u, &f, sizeof u);
    return u;
}
inline float __uint_as_float(unsigned u) {
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
}
inline int __float_as_int(float f) {
    int i;
    std::memcpy(&i, &f, sizeof i);
    return i;
}
inline float __int_as_float(int i) {
    float f;
    std::memcpy(&f, &i, sizeof f);
    return f;
}
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll(static_cast<unsigned long long>(x)); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline unsigned __brev(unsigned x) {
    unsigned r = 0;
    for (int i = 0; i < 32; ++i) r |= ((x >> i) & 1u) << (31 - i);
    return r;
}
inline unsigned __umulhi(unsigned a, unsigned b) {
    return static_cast<unsigned>((static_cast<unsigned long long>(a) * b) >> 32);
}

// Unqualified min/max as in device code. Plain overloads in the global namespace: std::min and
// std::max are untouched (and a non-template is preferred where both are visible).
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline unsigned min(int a, unsigned b) { return min(static_cast<unsigned>(a), b); }
inline unsigned max(int a, unsigned b) { return max(static_cast<unsigned>(a), b); }
inline unsigned min(unsigned a, int b) { return min(a, static_cast<unsigned>(b)); }
inline unsigned max(unsigned a, int b) { return max(a, static_cast<unsigned>(b)); }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline unsigned long long min(unsigned long long a, unsigned long long b) { return a < b ? a : b; }
inline unsigned long long max(unsigned long long a, unsigned long long b) { return a > b ? a : b; }
inline long min(long a, long b) { return a < b ? a : b; }
inline long max(long a, long b) { return a > b ? a : b; }
inline unsigned long min(unsigned long a, unsigned long b) { return a < b ? a : b; }
inline unsigned long max(unsigned long a, unsigned long b) { return a > b ? a : b; }
inline float min(float a, float b) { return ::fminf(a, b); }
inline float max(float a, float b) { return ::fmaxf(a, b); }
inline double min(double a, double b) { return ::fmin(a, b); }
inline double max(double a, double b) { return ::fmax(a, b); }

// ---------------------------------------------------------------------------------------------
// __half / __nv_bfloat16 (storage types, scalar conversions bit-exact with CUDA's)
// ---------------------------------------------------------------------------------------------
struct __half {
    unsigned short __x;
};
struct __nv_bfloat16 {
    unsigned short __x;
};
static_assert(sizeof(__half) == 2 && alignof(__half) == 2, "__half layout");
static_assert(sizeof(__nv_bfloat16) == 2 && alignof(__nv_bfloat16) == 2, "__nv_bfloat16 layout");
static_assert(std::is_trivially_copyable<__half>::value && std::is_trivially_copyable<__nv_bfloat16>::value,
              "half types must be trivially copyable");

namespace vera_emu {
// IEEE binary16 from binary32, round to nearest even; NaN -> 0x7fff (CUDA's canonical NaN),
// overflow -> +-Inf.
inline unsigned short f32_to_f16_bits(float f) {
    const unsigned x = __float_as_uint(f);
    const unsigned sign = (x >> 16) & 0x8000u;
    const unsigned a = x & 0x7fffffffu;
    if (a > 0x7f800000u) return 0x7fffu;                                  // NaN
    if (a >= 0x477ff000u) return static_cast<unsigned short>(sign | 0x7c00u);  // >= 65520: Inf
    if (a >= 0x38800000u) {  // normal in f16 (>= 2^-14)
        // Rebias the exponent (127 -> 15) and drop 13 mantissa bits with rounding.
        const unsigned v = a - 0x38000000u;
        const unsigned q = v >> 13, rem = v & 0x1fffu;
        const unsigned r = q + ((rem > 0x1000u || (rem == 0x1000u && (q & 1u))) ? 1u : 0u);
        return static_cast<unsigned short>(sign | r);
    }
    if (a < 0x33000001u) return static_cast<unsigned short>(sign);  // <= 2^-25 rounds to zero
    // Subnormal in f16: value = mant * 2^(e-150); result unit is 2^-24.
    const unsigned e = a >> 23;
    const unsigned mant = (a & 0x7fffffu) | 0x800000u;
    const unsigned shift = 126u - e;  // 14..24 (e in 102..112)
    const unsigned q = mant >> shift;
    const unsigned rem = mant & ((1u << shift) - 1u), half = 1u << (shift - 1u);
    const unsigned r = q + ((rem > half || (rem == half && (q & 1u))) ? 1u : 0u);
    return static_cast<unsigned short>(sign | r);
}
inline float f16_bits_to_f32(unsigned short h) {
    const unsigned sign = (static_cast<unsigned>(h) & 0x8000u) << 16;
    const unsigned e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    unsigned bits;
    if (e == 0x1f) {
        bits = sign | 0x7f800000u | (m << 13);
    } else if (e != 0) {
        bits = sign | ((e + 112u) << 23) | (m << 13);
    } else if (m == 0) {
        bits = sign;
    } else {  // subnormal: normalise
        int ee = 113;
        unsigned mm = m;
        while (!(mm & 0x400u)) {
            mm <<= 1;
            --ee;
        }
        bits = sign | (static_cast<unsigned>(ee) << 23) | ((mm & 0x3ffu) << 13);
    }
    return __uint_as_float(bits);
}
// bfloat16 from binary32, round to nearest even; NaN -> 0x7fff, overflow -> +-Inf.
inline unsigned short f32_to_bf16_bits(float f) {
    const unsigned x = __float_as_uint(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) return 0x7fffu;
    return static_cast<unsigned short>((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}
inline float bf16_bits_to_f32(unsigned short b) { return __uint_as_float(static_cast<unsigned>(b) << 16); }
}  // namespace vera_emu

inline __half __float2half_rn(float f) { return __half{::vera_emu::f32_to_f16_bits(f)}; }
inline __half __float2half(float f) { return __float2half_rn(f); }
inline float __half2float(__half h) { return ::vera_emu::f16_bits_to_f32(h.__x); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16{::vera_emu::f32_to_bf16_bits(f)}; }
inline __nv_bfloat16 __float2bfloat16(float f) { return __float2bfloat16_rn(f); }
inline float __bfloat162float(__nv_bfloat16 b) { return ::vera_emu::bf16_bits_to_f32(b.__x); }
inline unsigned short __half_as_ushort(__half h) { return h.__x; }
inline __half __ushort_as_half(unsigned short u) { return __half{u}; }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 b) { return b.__x; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short u) { return __nv_bfloat16{u}; }

// ---------------------------------------------------------------------------------------------
// Host entry point (defined in emu/runtime.cpp)
// ---------------------------------------------------------------------------------------------
extern "C" int vera_emu_launch(const char* kernel, const unsigned grid[3], const unsigned block[3],
                               unsigned dynamic_smem_bytes, void** params, char* err, size_t err_len);

#endif  // VERA_CUDA_EMU_H
