// Scheduler of the CUDA emulation: one ucontext fiber per CUDA thread of a block, deterministic
// round-robin on the launching OS thread, and vera_emu_launch(). Compiled in the same translation
// unit as emu/cuda_emu.h and the kernels (see emu/README.md).
#ifndef VERA_EMU_RUNTIME_CPP
#define VERA_EMU_RUNTIME_CPP

#include "cuda_emu.h"

namespace vera_emu {

const char* warp_op_name(WarpOp op) {
    switch (op) {
        case WarpOp::Generic: return "warp exchange";
        case WarpOp::Syncwarp: return "__syncwarp";
        case WarpOp::Shfl: return "__shfl_sync";
        case WarpOp::ShflUp: return "__shfl_up_sync";
        case WarpOp::ShflDown: return "__shfl_down_sync";
        case WarpOp::ShflXor: return "__shfl_xor_sync";
        case WarpOp::Ballot: return "__ballot_sync";
        case WarpOp::Any: return "__any_sync";
        case WarpOp::All: return "__all_sync";
        case WarpOp::Reduce: return "__reduce_*_sync";
        case WarpOp::Mma: return "mma.sync";
        case WarpOp::Ldmatrix: return "ldmatrix.sync";
    }
    return "warp collective";
}

namespace detail {

constexpr unsigned kMaxThreads = 1024;
constexpr unsigned kMaxWarps = kMaxThreads / 32;

enum class FState : unsigned char { Ready, AtBarrier, AtWarp, Done };

struct Fiber {
    ucontext_t uc;
    char* stack = nullptr;  // lowest usable address (a PROT_NONE guard page lies below)
    size_t stack_size = 0;
    uint3 tid{0, 0, 0};
    unsigned linear = 0, lane = 0, warp = 0;
    FState st = FState::Ready;
};

struct WarpState {
    unsigned existing = 0;  // lanes that exist in this block
    unsigned exited = 0;    // lanes whose thread has returned
    unsigned arrived = 0;   // lanes waiting in the pending collective
    unsigned gen = 0;       // completed collectives
    // The pending collective, as set by its first lane.
    WarpOp op = WarpOp::Generic;
    unsigned need = 0;  // lanes that must arrive
    size_t bytes = 0;
    const char* file = "";
    int line = 0;
    // Double-buffered by generation parity: the buffer of collective g is written again only by
    // collective g + 2, which cannot start before every lane has arrived at g + 1, i.e. has read g.
    unsigned contributed[2] = {0, 0};
    alignas(16) unsigned char buf[2][32][kMaxExchangeBytes];
};

struct BarrierState {
    unsigned arrived = 0;
    unsigned gen = 0;
    int count = 0;
    int result[2] = {0, 0};  // double-buffered like the warp exchange
    const char* op = "";
    const char* file = "";
    int line = 0;
};

struct Launch {
    const char* name = "";
    Invoker inv = nullptr;
    void** params = nullptr;
    dim3 grid, block;
    uint3 block_idx{0, 0, 0};
    unsigned nthreads = 0, nwarps = 0;
    Fiber* fibers = nullptr;
    WarpState* warps = nullptr;
    BarrierState bar;
    ucontext_t sched_uc;
    unsigned done = 0;
    bool failed = false;
    std::string error;
    // Stack of the scheduler (the launching thread), for AddressSanitizer's fiber annotations.
    const void* sched_stack = nullptr;
    size_t sched_stack_size = 0;
    bool need_sched_stack = false;
};

// Stacks and contexts, allocated on first use and kept (launches are serialised).
struct Pool {
    Fiber* fibers = nullptr;  // kMaxThreads, never moved (a ucontext_t points into itself)
    WarpState* warps = nullptr;
    char* region = nullptr;
    size_t region_size = 0;
    unsigned mapped = 0;  // fibers with a stack
    size_t stack_size = 0;
    size_t guard = 0;
#if defined(VERA_EMU_VALGRIND)
    unsigned valgrind_ids[kMaxThreads] = {};
#endif
};

inline Pool& pool() {
    static Pool p;
    return p;
}

inline size_t configured_stack_size() {
    size_t kib = 256;
    if (const char* s = std::getenv("VERA_EMU_STACK_KB")) {
        const long v = std::strtol(s, nullptr, 10);
        if (v >= 64 && v <= 65536) kib = static_cast<size_t>(v);
    }
    return kib * 1024;
}

// getcontext returns twice; kept out of line so no caller variable can be clobbered.
__attribute__((noinline)) inline bool init_context(ucontext_t* uc) { return getcontext(uc) == 0; }

// Make sure `n` fibers have stacks. Returns false (with a message) if memory cannot be mapped.
inline bool pool_reserve(unsigned n, std::string& err) {
    Pool& p = pool();
    if (!p.fibers) {
        p.fibers = new Fiber[kMaxThreads];
        p.warps = new WarpState[kMaxWarps];
        for (unsigned i = 0; i < kMaxThreads; ++i) {
            if (!init_context(&p.fibers[i].uc)) {
                err = "getcontext failed";
                return false;
            }
        }
        const long page = sysconf(_SC_PAGESIZE);
        p.guard = page > 0 ? static_cast<size_t>(page) : 4096;
        p.stack_size = (configured_stack_size() + p.guard - 1) / p.guard * p.guard;
    }
    if (n <= p.mapped) return true;
    // Grow to the next power of two (at least 64 threads), unmapping the old region: no fiber is
    // alive between launches.
    unsigned want = 64;
    while (want < n) want *= 2;
    if (want > kMaxThreads) want = kMaxThreads;
    if (p.region) {
#if defined(VERA_EMU_VALGRIND)
        for (unsigned i = 0; i < p.mapped; ++i) VALGRIND_STACK_DEREGISTER(p.valgrind_ids[i]);
#endif
        munmap(p.region, p.region_size);
        p.region = nullptr;
        p.mapped = 0;
    }
    const size_t per = p.guard + p.stack_size;
    const size_t total = per * want;
    void* r = mmap(nullptr, total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (r == MAP_FAILED) {
        err = "cannot map " + std::to_string(total >> 20) + " MiB of fiber stacks";
        return false;
    }
    p.region = static_cast<char*>(r);
    p.region_size = total;
    for (unsigned i = 0; i < want; ++i) {
        char* base = p.region + per * i;
        mprotect(base, p.guard, PROT_NONE);  // stack overflow faults instead of corrupting a neighbour
        p.fibers[i].stack = base + p.guard;
        p.fibers[i].stack_size = p.stack_size;
#if defined(VERA_EMU_VALGRIND)
        p.valgrind_ids[i] = VALGRIND_STACK_REGISTER(p.fibers[i].stack, p.fibers[i].stack + p.stack_size);
#endif
    }
    p.mapped = want;
    return true;
}

[[noreturn]] inline void outside_kernel(const char* what) {
    std::fprintf(stderr, "vera_emu: %s used outside an emulated kernel\n", what);
    std::abort();
}

inline Fiber* me_or_die(const char* what) {
    Fiber* f = g_cur;
    if (__builtin_expect(f == nullptr, 0)) outside_kernel(what);
    return f;
}

const uint3& cur_thread_idx() { return me_or_die("threadIdx")->tid; }
const uint3& cur_block_idx() {
    me_or_die("blockIdx");
    return g_launch->block_idx;
}
const dim3& cur_block_dim() {
    me_or_die("blockDim");
    return g_launch->block;
}
const dim3& cur_grid_dim() {
    me_or_die("gridDim");
    return g_launch->grid;
}

// Context switch from the running fiber (or the scheduler, from == nullptr) to `to` (or the
// scheduler, to == nullptr). `dying`: the caller will never be resumed.
inline void switch_to(Launch* L, Fiber* from, Fiber* to, bool dying) {
    ucontext_t* save = from ? &from->uc : &L->sched_uc;
    ucontext_t* target = to ? &to->uc : &L->sched_uc;
    g_cur = to;
#if defined(__SANITIZE_ADDRESS__)
    void* fake = nullptr;
    __sanitizer_start_switch_fiber(dying ? nullptr : &fake, to ? to->stack : L->sched_stack,
                                   to ? to->stack_size : L->sched_stack_size);
#else
    (void)dying;
#endif
    swapcontext(save, target);
#if defined(__SANITIZE_ADDRESS__)
    __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
}

// The running fiber `me` cannot continue (blocked or finished): run the next ready fiber in
// round-robin order, or return to the scheduler when none is ready (block done or deadlock).
// Returns when `me` is resumed.
inline void run_next(Launch* L, Fiber* me, bool dying) {
    const unsigned n = L->nthreads;
    for (unsigned k = 1; k <= n; ++k) {
        Fiber* f = &L->fibers[(me->linear + k) % n];
        if (f->st == FState::Ready) {
            switch_to(L, me, f, dying);
            return;
        }
    }
    switch_to(L, me, nullptr, dying);
}

void fiber_entry() {
#if defined(__SANITIZE_ADDRESS__)
    {
        const void* from_stack = nullptr;
        size_t from_size = 0;
        __sanitizer_finish_switch_fiber(nullptr, &from_stack, &from_size);
        if (g_launch->need_sched_stack) {
            g_launch->sched_stack = from_stack;
            g_launch->sched_stack_size = from_size;
            g_launch->need_sched_stack = false;
        }
    }
#endif
    Launch* L = g_launch;
    Fiber* me = g_cur;
    L->inv(L->params);
    me->st = FState::Done;
    L->warps[me->warp].exited |= 1u << me->lane;
    ++L->done;
    run_next(L, me, true);
    // A finished fiber is never resumed.
    std::abort();
}

inline std::string vformat(const char* fmt, va_list ap) {
    char buf[1024];
    std::vsnprintf(buf, sizeof buf, fmt, ap);
    return buf;
}

inline std::string format(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
inline std::string format(const char* fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    std::string s = vformat(fmt, ap);
    va_end(ap);
    return s;
}

inline std::string where(const Launch* L) {
    return format("kernel '%s', block (%u,%u,%u)", L->name, L->block_idx.x, L->block_idx.y, L->block_idx.z);
}

}  // namespace detail

unsigned thread_linear() { return detail::me_or_die("thread_linear")->linear; }
unsigned lane_id() { return detail::me_or_die("lane_id")->lane; }
unsigned warp_id() { return detail::me_or_die("warp_id")->warp; }
unsigned live_lane_mask() {
    const detail::Fiber* me = detail::me_or_die("__activemask");
    const detail::WarpState& w = detail::g_launch->warps[me->warp];
    return w.existing & ~w.exited;
}

void fail(const char* fmt, ...) {
    // No object owning memory may stay alive in this frame: the fiber is never resumed.
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    std::vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    detail::Fiber* me = detail::g_cur;
    detail::Launch* L = detail::g_launch;
    if (!me || !L) {
        std::fprintf(stderr, "vera_emu: %s\n", msg);
        std::abort();
    }
    L->failed = true;
    L->error = detail::where(L) + detail::format(", thread (%u,%u,%u): ", me->tid.x, me->tid.y, me->tid.z) + msg;
    detail::switch_to(L, me, nullptr, true);
    std::abort();  // never resumed
}

int block_barrier(int pred, const char* op, const char* file, int line) {
    using namespace detail;
    Fiber* me = me_or_die(op);
    Launch* L = g_launch;
    BarrierState& b = L->bar;
    if (b.arrived == 0) {
        b.op = op;
        b.file = file;
        b.line = line;
        b.count = 0;
    } else if (b.line != line || std::strcmp(b.file, file) != 0 || std::strcmp(b.op, op) != 0) {
        fail("divergent barrier: %s at %s:%d while %u thread(s) wait in %s at %s:%d", op, base_name(file), line,
             b.arrived, b.op, base_name(b.file), b.line);
    }
    b.count += pred != 0;
    const unsigned g = b.gen;
    if (++b.arrived == L->nthreads) {
        b.result[g & 1] = b.count;
        b.arrived = 0;
        ++b.gen;
        for (unsigned i = 0; i < L->nthreads; ++i)
            if (L->fibers[i].st == FState::AtBarrier) L->fibers[i].st = FState::Ready;
        return b.result[g & 1];
    }
    me->st = FState::AtBarrier;
    run_next(L, me, false);
    return b.result[g & 1];
}

const unsigned char* warp_exchange_view(WarpOp op, unsigned mask, bool check_mask, bool need_full_warp,
                                        const void* mine, size_t bytes, unsigned* got, const char* file, int line) {
    using namespace detail;
    Fiber* me = me_or_die(warp_op_name(op));
    Launch* L = g_launch;
    WarpState& w = L->warps[me->warp];
    const unsigned live = w.existing & ~w.exited;
    const unsigned bit = 1u << me->lane;
    if (bytes > kMaxExchangeBytes)
        fail("%s at %s:%d: %zu bytes per lane exceed the exchange size %zu", warp_op_name(op), base_name(file),
             line, bytes, kMaxExchangeBytes);
    if (need_full_warp && live != 0xffffffffu)
        fail("%s at %s:%d needs all 32 lanes of warp %u, live lanes are 0x%08x", warp_op_name(op),
             base_name(file), line, me->warp, live);
    if (check_mask && mask != live)
        fail("%s at %s:%d: mask 0x%08x is not the live-lane mask 0x%08x of warp %u", warp_op_name(op),
             base_name(file), line, mask, live, me->warp);
    if (w.arrived == 0) {
        w.op = op;
        w.need = live;
        w.bytes = bytes;
        w.file = file;
        w.line = line;
    } else if (w.op != op || w.bytes != bytes || w.need != live) {
        fail("warp %u: %s (%zu bytes) at %s:%d while lanes 0x%08x of 0x%08x wait in %s (%zu bytes) at %s:%d",
             me->warp, warp_op_name(op), bytes, base_name(file), line, w.arrived, w.need, warp_op_name(w.op),
             w.bytes, base_name(w.file), w.line);
    }
    const unsigned slot = w.gen & 1u;
    if (bytes) std::memcpy(w.buf[slot][me->lane], mine, bytes);
    w.arrived |= bit;
    if (w.arrived == w.need) {
        w.contributed[slot] = w.arrived;
        w.arrived = 0;
        ++w.gen;
        const unsigned first = me->warp * 32;
        for (unsigned l = 0; l < 32; ++l)
            if (((w.need >> l) & 1u) && L->fibers[first + l].st == FState::AtWarp)
                L->fibers[first + l].st = FState::Ready;
    } else {
        me->st = FState::AtWarp;
        run_next(L, me, false);
    }
    *got = w.contributed[slot];
    return &w.buf[slot][0][0];
}

unsigned warp_exchange(WarpOp op, unsigned mask, bool check_mask, bool need_full_warp, const void* mine,
                       size_t bytes, void* all32, const char* file, int line) {
    unsigned got = 0;
    const unsigned char* buf = warp_exchange_view(op, mask, check_mask, need_full_warp, mine, bytes, &got, file, line);
    if (all32) {
        unsigned char* out = static_cast<unsigned char*>(all32);
        for (unsigned l = 0; l < 32; ++l) {
            if ((got >> l) & 1u)
                std::memcpy(out + l * bytes, buf + l * kMaxExchangeBytes, bytes);
            else if (bytes)
                std::memset(out + l * bytes, 0, bytes);
        }
    }
    return got;
}

namespace detail {

struct KernelEntry {
    Invoker inv;
    size_t arity;
};

inline std::map<std::string, KernelEntry>& registry() {
    static std::map<std::string, KernelEntry> r;
    return r;
}

inline std::mutex& launch_mutex() {
    static std::mutex m;
    return m;
}

inline std::string deadlock_message(const Launch* L) {
    std::string m = "deadlock in " + where(L) + ":";
    unsigned exited = L->done, at_warp = 0;
    for (unsigned i = 0; i < L->nthreads; ++i) at_warp += L->fibers[i].st == FState::AtWarp;
    const BarrierState& b = L->bar;
    if (b.arrived)
        m += format(" %s at %s:%d reached by %u of %u threads (%u exited, %u waiting in warp collectives);", b.op,
                    base_name(b.file), b.line, b.arrived, L->nthreads, exited, at_warp);
    for (unsigned wi = 0; wi < L->nwarps; ++wi) {
        const WarpState& w = L->warps[wi];
        if (!w.arrived) continue;
        m += format(" warp %u: %s at %s:%d reached by %d of %d lanes (arrived 0x%08x, needed 0x%08x, exited 0x%08x);",
                    wi, warp_op_name(w.op), base_name(w.file), w.line, __popc(w.arrived), __popc(w.need), w.arrived,
                    w.need, w.exited);
    }
    if (m.back() == ';') m.pop_back();
    return m;
}

// Runs every block of the launch. Returns 0 or an error code with L->error set.
inline int run_launch(Launch* L) {
    Pool& p = pool();
    L->fibers = p.fibers;
    L->warps = p.warps;
    const dim3 g = L->grid, bd = L->block;
    for (unsigned bz = 0; bz < g.z; ++bz)
        for (unsigned by = 0; by < g.y; ++by)
            for (unsigned bx = 0; bx < g.x; ++bx) {
                L->block_idx = uint3{bx, by, bz};
                L->bar = BarrierState{};
                L->done = 0;
                for (unsigned wi = 0; wi < L->nwarps; ++wi) {
                    WarpState& w = L->warps[wi];
                    const unsigned lanes = std::min(32u, L->nthreads - wi * 32);
                    w.existing = lanes == 32 ? 0xffffffffu : (1u << lanes) - 1u;
                    w.exited = 0;
                    w.arrived = 0;
                    w.gen = 0;
                    w.need = 0;
                    w.contributed[0] = w.contributed[1] = 0;
                }
                for (unsigned i = 0; i < L->nthreads; ++i) {
                    Fiber& f = L->fibers[i];
                    f.linear = i;
                    f.tid = uint3{i % bd.x, (i / bd.x) % bd.y, i / (bd.x * bd.y)};
                    f.lane = i % 32;
                    f.warp = i / 32;
                    f.st = FState::Ready;
#if defined(__SANITIZE_ADDRESS__)
                    ASAN_UNPOISON_MEMORY_REGION(f.stack, f.stack_size);
#endif
                    f.uc.uc_stack.ss_sp = f.stack;
                    f.uc.uc_stack.ss_size = f.stack_size;
                    f.uc.uc_link = nullptr;
                    makecontext(&f.uc, fiber_entry, 0);
                }
                L->need_sched_stack = true;
                switch_to(L, nullptr, &L->fibers[0], false);
                g_cur = nullptr;
                if (L->failed) return 4;
                if (L->done != L->nthreads) {
                    L->error = deadlock_message(L);
                    return 3;
                }
            }
    return 0;
}

inline void set_err(char* err, size_t err_len, const std::string& msg) {
    if (err && err_len) std::snprintf(err, err_len, "%s", msg.c_str());
}

}  // namespace detail

bool register_kernel(const char* name, Invoker inv, size_t arity) {
    detail::registry()[name] = detail::KernelEntry{inv, arity};
    return true;
}

}  // namespace vera_emu

// Return codes: 0 ok, 1 unknown kernel, 2 invalid launch configuration, 3 deadlock, 4 error raised
// by the kernel (warp mask, divergent barrier, misaligned ldmatrix/cp.async, __trap...), 5 launch
// from inside a kernel or no memory for the fiber stacks.
extern "C" int vera_emu_launch(const char* kernel, const unsigned grid[3], const unsigned block[3], void** params,
                               char* err, size_t err_len) {
    using namespace vera_emu::detail;
    if (err && err_len) err[0] = '\0';
    if (g_cur != nullptr) {
        set_err(err, err_len, "vera_emu_launch called from inside an emulated kernel");
        return 5;
    }
    std::lock_guard<std::mutex> lock(launch_mutex());
    if (!kernel || !grid || !block) {
        set_err(err, err_len, "vera_emu_launch: null kernel name, grid or block");
        return 2;
    }
    auto it = registry().find(kernel);
    if (it == registry().end()) {
        set_err(err, err_len, format("unknown kernel '%s' (%zu kernels registered)", kernel, registry().size()));
        return 1;
    }
    const unsigned long long nthreads = 1ull * block[0] * block[1] * block[2];
    if (block[0] == 0 || block[1] == 0 || block[2] == 0 || nthreads > kMaxThreads || block[2] > 64) {
        set_err(err, err_len,
                format("kernel '%s': invalid block (%u,%u,%u): every dimension must be >= 1, z <= 64, and at most "
                       "%u threads in all",
                       kernel, block[0], block[1], block[2], kMaxThreads));
        return 2;
    }
    if (grid[0] == 0 || grid[1] == 0 || grid[2] == 0 || grid[0] > 0x7fffffffu || grid[1] > 65535 ||
        grid[2] > 65535) {
        set_err(err, err_len,
                format("kernel '%s': invalid grid (%u,%u,%u): every dimension must be >= 1, x < 2^31, y and z <= "
                       "65535",
                       kernel, grid[0], grid[1], grid[2]));
        return 2;
    }
    if (it->second.arity > 0 && params == nullptr) {
        set_err(err, err_len, format("kernel '%s' takes %zu parameters but params is null", kernel, it->second.arity));
        return 2;
    }
    std::string perr;
    if (!pool_reserve(static_cast<unsigned>(nthreads), perr)) {
        set_err(err, err_len, perr);
        return 5;
    }
    Launch L;
    L.name = it->first.c_str();
    L.inv = it->second.inv;
    L.params = params;
    L.grid = dim3(grid[0], grid[1], grid[2]);
    L.block = dim3(block[0], block[1], block[2]);
    L.nthreads = static_cast<unsigned>(nthreads);
    L.nwarps = (L.nthreads + 31) / 32;
    g_launch = &L;
    const int rc = run_launch(&L);
    g_launch = nullptr;
    g_cur = nullptr;
    if (rc != 0) set_err(err, err_len, L.error);
    return rc;
}

#endif  // VERA_EMU_RUNTIME_CPP
