// Scheduler of the CUDA emulation: one ucontext fiber per CUDA thread, on the launching OS thread,
// and vera_emu_launch(). Two schedules (emu/README.md): sequential (the default: blocks one after
// another, round-robin between the fibers of a block) and concurrent (several blocks resident at
// once, fibers interleaved by a seeded random scheduler, stores through __stcg buffered until a
// fence). Compiled in the same translation unit as emu/cuda_emu.h and the kernels.
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
// Dynamic shared memory one block may have: sm_90's 227 KiB (sm_80's is 163 KiB).
constexpr unsigned kMaxDynamicShared = 227 * 1024;
constexpr unsigned kMaxWarps = kMaxThreads / 32;
// Fibers of all resident blocks together (concurrent schedule); the sequential one needs kMaxThreads.
constexpr unsigned kMaxFibers = 4096;
constexpr unsigned kDefaultResident = 16;

enum class FState : unsigned char { Ready, AtBarrier, AtWarp, Done };

struct Block;

struct Fiber {
    ucontext_t uc;
    char* stack = nullptr;  // lowest usable address (a PROT_NONE guard page lies below)
    size_t stack_size = 0;
    uint3 tid{0, 0, 0};
    unsigned linear = 0, lane = 0, warp = 0;
    FState st = FState::Ready;
    Block* blk = nullptr;
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

// 16 bytes, 16-byte aligned: the unit of a block's dynamic shared memory.
struct alignas(16) Chunk16 {
    unsigned char bytes[16];
};

// One resident block: its threads, warps, barrier, and (concurrent schedule) its shared memory
// while another block's is live, and the addresses of its buffered stores.
struct Block {
    uint3 idx{0, 0, 0};
    unsigned long long serial = 0;  // linear index in the grid (x fastest)
    Fiber* fibers = nullptr;
    WarpState* warps = nullptr;
    BarrierState bar;
    unsigned done = 0;   // threads that returned
    unsigned ready = 0;  // threads in state Ready
    bool active = false;
    std::vector<unsigned char> image;
    std::vector<Chunk16> dynamic;  // dynamic shared memory
    std::vector<uintptr_t> pending;
};

// A store made through __stcg in the concurrent schedule, not yet visible to other blocks.
struct PendingStore {
    unsigned long long serial;  // the writing block
    unsigned writer;            // linear thread id of the writer
    unsigned gen;               // the block's barrier generation at the store
    unsigned size;
    alignas(16) unsigned char bytes[16];
};

// splitmix64: small, seedable, good enough to pick fibers.
struct Rng {
    uint64_t s = 0;
    uint64_t next() {
        uint64_t z = (s += 0x9e3779b97f4a7c15ull);
        z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
        z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
        return z ^ (z >> 31);
    }
    unsigned below(unsigned n) { return n ? static_cast<unsigned>(next() % n) : 0; }
};

struct Launch {
    const char* name = "";
    Invoker inv = nullptr;
    void** params = nullptr;
    dim3 grid, block;
    unsigned nthreads = 0, nwarps = 0;
    unsigned dynamic_bytes = 0;  // dynamic shared memory per block
    Block* blocks = nullptr;  // resident slots (one in the sequential schedule)
    unsigned nslots = 1;
    ucontext_t sched_uc;
    bool failed = false;
    std::string error;
    // Stack of the scheduler (the launching thread), for AddressSanitizer's fiber annotations.
    const void* sched_stack = nullptr;
    size_t sched_stack_size = 0;
    bool need_sched_stack = false;
    // Concurrent schedule.
    bool concurrent = false;
    Rng rng;
    Block* live = nullptr;  // the block whose shared memory is in the shared section now
    unsigned quantum = 0;   // yield points left before the scheduler moves to another block
    unsigned long long total_blocks = 0, next_serial = 0;
    std::vector<unsigned long long> upcoming;  // blocks that may start next
    std::unordered_map<uintptr_t, PendingStore> stores;
    std::vector<uintptr_t> retired;  // buffered stores of blocks that have finished
};

// Stacks and contexts, allocated on first use and kept (launches are serialised).
struct Pool {
    Fiber* fibers = nullptr;  // kMaxFibers, never moved (a ucontext_t points into itself)
    WarpState* warps = nullptr;
    std::vector<Block> blocks;
    char* region = nullptr;
    size_t region_size = 0;
    unsigned mapped = 0;  // fibers with a stack
    size_t stack_size = 0;
    size_t guard = 0;
#if defined(VERA_EMU_VALGRIND)
    unsigned valgrind_ids[kMaxFibers] = {};
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

// The schedule: set by vera_emu_set_schedule() or, at the first launch, from VERA_EMU_SCHEDULE.
struct Schedule {
    bool known = false;
    bool concurrent = false;
    uint64_t seed = 0;
    unsigned resident = kDefaultResident;
    unsigned long long launches = 0;
};

inline Schedule& schedule() {
    static Schedule s;
    return s;
}

// "sequential", "concurrent:SEED" or "concurrent:SEED:RESIDENT". Returns false if malformed.
inline bool parse_schedule(const char* spec, Schedule& out) {
    if (!spec || !*spec || std::strcmp(spec, "sequential") == 0) {
        out.concurrent = false;
        return true;
    }
    const char* prefix = "concurrent:";
    if (std::strncmp(spec, prefix, std::strlen(prefix)) != 0) return false;
    const char* p = spec + std::strlen(prefix);
    char* end = nullptr;
    const unsigned long long seed = std::strtoull(p, &end, 10);
    if (end == p) return false;
    unsigned resident = kDefaultResident;
    if (*end == ':') {
        const char* q = end + 1;
        const unsigned long r = std::strtoul(q, &end, 10);
        if (end == q || r < 1 || r > 256) return false;
        resident = static_cast<unsigned>(r);
    }
    if (*end != '\0') return false;
    out.concurrent = true;
    out.seed = seed;
    out.resident = resident;
    return true;
}

// getcontext returns twice; kept out of line so no caller variable can be clobbered.
__attribute__((noinline)) inline bool init_context(ucontext_t* uc) { return getcontext(uc) == 0; }

// Make sure `n` fibers have stacks. Returns false (with a message) if memory cannot be mapped.
inline bool pool_reserve(unsigned n, std::string& err) {
    Pool& p = pool();
    if (!p.fibers) {
        p.fibers = new Fiber[kMaxFibers];
        p.warps = new WarpState[kMaxFibers / 32];
        for (unsigned i = 0; i < kMaxFibers; ++i) {
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
    if (want > kMaxFibers) want = kMaxFibers;
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
const uint3& cur_block_idx() { return me_or_die("blockIdx")->blk->idx; }
const dim3& cur_block_dim() {
    me_or_die("blockDim");
    return g_launch->block;
}
const dim3& cur_grid_dim() {
    me_or_die("gridDim");
    return g_launch->grid;
}

inline void set_state(Fiber* f, FState s) {
    const bool was = f->st == FState::Ready, is = s == FState::Ready;
    if (was && !is) --f->blk->ready;
    if (!was && is) ++f->blk->ready;
    f->st = s;
}

// The shared-memory section: every __shared__ variable lives in it (cuda_emu.h). The linker
// defines these bounds; weak, so that a program without __shared__ variables links too.
extern "C" {
extern unsigned char __start_vera_emu_shared[] __attribute__((weak));
extern unsigned char __stop_vera_emu_shared[] __attribute__((weak));
}
inline unsigned char* shared_begin() { return __start_vera_emu_shared; }
inline size_t shared_size() {
    return __start_vera_emu_shared ? static_cast<size_t>(__stop_vera_emu_shared - __start_vera_emu_shared) : 0;
}

// Copies shared-section bytes. Under AddressSanitizer the section holds instrumented globals with
// poisoned redzones between them (build.rs moves them there after compilation), so the copy must
// not be checked: an uninstrumented loop the compiler may not turn back into memcpy.
#if defined(__SANITIZE_ADDRESS__)
__attribute__((no_sanitize_address, noinline, optimize("no-tree-loop-distribute-patterns"))) inline void
copy_shared(unsigned char* dst, const unsigned char* src, size_t n) {
    for (size_t i = 0; i < n; ++i) dst[i] = src[i];
}
#else
inline void copy_shared(unsigned char* dst, const unsigned char* src, size_t n) { std::memcpy(dst, src, n); }
#endif

// Concurrent schedule: puts block b's shared memory into the section (saving the live block's).
inline void make_live(Launch* L, Block* b) {
    const size_t n = shared_size();
    if (n) {
        if (L->live) copy_shared(L->live->image.data(), shared_begin(), n);
        copy_shared(shared_begin(), b->image.data(), n);
    }
    L->live = b;
    // How many yield points the scheduler stays with this block (at most), unless a fence or an
    // atomic moves it on earlier: long enough that the section copies stay rare, random so that
    // blocks interleave at every kind of point.
    L->quantum = 1 + L->rng.below(16 * L->nthreads);
}

// Context switch from the running fiber (or the scheduler, from == nullptr) to `to` (or the
// scheduler, to == nullptr). `dying`: the caller will never be resumed.
inline void switch_to(Launch* L, Fiber* from, Fiber* to, bool dying) {
    ucontext_t* save = from ? &from->uc : &L->sched_uc;
    ucontext_t* target = to ? &to->uc : &L->sched_uc;
    if (L->concurrent && to && to->blk != L->live) make_live(L, to->blk);
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

// A ready fiber of block b, chosen at random (null if none).
inline Fiber* random_ready_in(Launch* L, Block* b) {
    if (!b->active || b->ready == 0) return nullptr;
    const unsigned n = L->nthreads, start = L->rng.below(n);
    for (unsigned k = 0; k < n; ++k) {
        Fiber* f = &b->fibers[(start + k) % n];
        if (f->st == FState::Ready) return f;
    }
    return nullptr;
}

// A ready fiber of a random resident block other than `except` (null if none).
inline Fiber* random_ready_elsewhere(Launch* L, const Block* except) {
    const unsigned start = L->rng.below(L->nslots);
    for (unsigned k = 0; k < L->nslots; ++k) {
        Block* b = &L->blocks[(start + k) % L->nslots];
        if (b == except) continue;
        if (Fiber* f = random_ready_in(L, b)) return f;
    }
    return nullptr;
}

// Concurrent schedule: should the next fiber come from another block? Always at random at fences
// and atomics (`sync`), else when the block's quantum is used up.
inline bool want_other_block(Launch* L, bool sync) {
    if (sync) return L->rng.below(2) == 0;
    if (L->quantum == 0) return true;
    --L->quantum;
    return false;
}

// The running fiber `me` cannot continue (blocked or finished): run another ready fiber (the next
// one in round-robin order in the sequential schedule, a random one in the concurrent schedule),
// or return to the scheduler when none is ready. Returns when `me` is resumed.
inline void run_next(Launch* L, Fiber* me, bool dying) {
    Block* b = me->blk;
    if (L->concurrent) {
        Fiber* f = nullptr;
        if (want_other_block(L, false)) f = random_ready_elsewhere(L, b);
        if (!f) f = random_ready_in(L, b);
        if (!f) f = random_ready_elsewhere(L, b);
        switch_to(L, me, f, dying);
        return;
    }
    const unsigned n = L->nthreads;
    for (unsigned k = 1; k <= n; ++k) {
        Fiber* f = &b->fibers[(me->linear + k) % n];
        if (f->st == FState::Ready) {
            switch_to(L, me, f, dying);
            return;
        }
    }
    switch_to(L, me, nullptr, dying);
}

// Concurrent schedule: makes a buffered store visible.
inline void commit_store(Launch* L, std::unordered_map<uintptr_t, PendingStore>::iterator it) {
    std::memcpy(reinterpret_cast<void*>(it->first), it->second.bytes, it->second.size);
    L->stores.erase(it);
}

// Commits the buffered stores of `addrs` that belong to block `serial` and satisfy `pred`;
// removes the committed (and stale) addresses from the list.
template <typename Pred>
inline void commit_list(Launch* L, std::vector<uintptr_t>& addrs, Pred pred) {
    size_t keep = 0;
    for (size_t i = 0; i < addrs.size(); ++i) {
        auto it = L->stores.find(addrs[i]);
        if (it == L->stores.end()) continue;  // committed already (overwritten by another block)
        if (pred(it->second)) {
            commit_store(L, it);
            continue;
        }
        addrs[keep++] = addrs[i];
    }
    addrs.resize(keep);
}

inline void commit_block(Launch* L, Block* b) {
    const unsigned long long serial = b->serial;
    commit_list(L, b->pending, [serial](const PendingStore& s) { return s.serial == serial; });
}

inline void commit_all(Launch* L) {
    for (auto it = L->stores.begin(); it != L->stores.end();) {
        auto next = std::next(it);
        commit_store(L, it);
        it = next;
    }
    L->retired.clear();
    for (unsigned i = 0; i < L->nslots; ++i) L->blocks[i].pending.clear();
}

// Concurrent schedule: now and then, stores drain on their own (as they do on the GPU, just later
// than the program may assume).
inline void maybe_drain(Launch* L) {
    if (L->stores.empty() || L->rng.below(256) != 0) return;
    if (!L->retired.empty() && L->rng.below(2) == 0) {
        commit_list(L, L->retired, [](const PendingStore&) { return true; });
        return;
    }
    commit_block(L, &L->blocks[L->rng.below(L->nslots)]);
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
    Block* b = me->blk;
    set_state(me, FState::Done);
    b->warps[me->warp].exited |= 1u << me->lane;
    ++b->done;
    if (L->concurrent && b->done == L->nthreads) {
        // The block is finished: its stores stay buffered (until drained or the launch ends), and
        // the scheduler starts the next block in its slot.
        b->active = false;
        L->retired.insert(L->retired.end(), b->pending.begin(), b->pending.end());
        b->pending.clear();
        if (L->live == b) L->live = nullptr;
        switch_to(L, me, nullptr, true);
    } else {
        run_next(L, me, true);
    }
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

inline std::string where(const Launch* L, const Block* b) {
    return format("kernel '%s', block (%u,%u,%u)", L->name, b->idx.x, b->idx.y, b->idx.z);
}

}  // namespace detail

unsigned thread_linear() { return detail::me_or_die("thread_linear")->linear; }
unsigned lane_id() { return detail::me_or_die("lane_id")->lane; }
unsigned warp_id() { return detail::me_or_die("warp_id")->warp; }
unsigned live_lane_mask() {
    const detail::Fiber* me = detail::me_or_die("__activemask");
    const detail::WarpState& w = me->blk->warps[me->warp];
    return w.existing & ~w.exited;
}

unsigned char* dynamic_shared() {
    std::vector<detail::Chunk16>& d = detail::me_or_die("dynamic shared memory")->blk->dynamic;
    return d.empty() ? nullptr : d.data()->bytes;
}
unsigned dynamic_shared_size() {
    detail::me_or_die("dynamic shared memory");
    return detail::g_launch->dynamic_bytes;
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
    L->error =
        detail::where(L, me->blk) + detail::format(", thread (%u,%u,%u): ", me->tid.x, me->tid.y, me->tid.z) + msg;
    detail::switch_to(L, me, nullptr, true);
    std::abort();  // never resumed
}

void yield_point(bool sync) {
    using namespace detail;
    Fiber* me = g_cur;
    Launch* L = g_launch;
    if (!me || !L || !L->concurrent) return;
    maybe_drain(L);
    Fiber* f = nullptr;
    if (want_other_block(L, sync)) f = random_ready_elsewhere(L, me->blk);
    if (!f && L->rng.below(2) == 0) f = random_ready_in(L, me->blk);
    if (f && f != me) switch_to(L, me, f, false);
}

void fence() {
    using namespace detail;
    Fiber* me = g_cur;
    Launch* L = g_launch;
    if (!me || !L || !L->concurrent) return;
    // The caller's own stores, and those of its block made before a barrier it has passed since.
    Block* b = me->blk;
    const unsigned long long serial = b->serial;
    const unsigned linear = me->linear, gen = b->bar.gen;
    commit_list(L, b->pending, [&](const PendingStore& s) {
        return s.serial == serial && (s.writer == linear || s.gen != gen);
    });
    yield_point(true);
}

void store_cg(void* p, const void* v, size_t size) {
    using namespace detail;
    Fiber* me = g_cur;
    Launch* L = g_launch;
    if (!me || !L || !L->concurrent) {
        std::memcpy(p, v, size);
        return;
    }
    if (size > sizeof(PendingStore::bytes)) fail("__stcg of %zu bytes (at most 16 are buffered)", size);
    yield_point(false);
    Block* b = me->blk;
    const uintptr_t a = reinterpret_cast<uintptr_t>(p);
    auto it = L->stores.find(a);
    if (it != L->stores.end() && (it->second.serial != b->serial || it->second.size != size)) {
        commit_store(L, it);  // another block's (or another size's) older store lands first
        it = L->stores.end();
    }
    if (it == L->stores.end()) {
        it = L->stores.emplace(a, PendingStore{}).first;
        b->pending.push_back(a);
    }
    PendingStore& s = it->second;
    s.serial = b->serial;
    s.writer = me->linear;
    s.gen = b->bar.gen;
    s.size = static_cast<unsigned>(size);
    std::memcpy(s.bytes, v, size);
}

void load_cg(const void* p, void* out, size_t size) {
    using namespace detail;
    Fiber* me = g_cur;
    Launch* L = g_launch;
    if (me && L && L->concurrent) {
        yield_point(false);
        // A block sees its own buffered stores; other blocks see memory.
        auto it = L->stores.find(reinterpret_cast<uintptr_t>(p));
        if (it != L->stores.end() && it->second.serial == me->blk->serial && it->second.size == size) {
            std::memcpy(out, it->second.bytes, size);
            return;
        }
    }
    std::memcpy(out, p, size);
}

int block_barrier(int pred, const char* op, const char* file, int line) {
    using namespace detail;
    Fiber* me = me_or_die(op);
    Launch* L = g_launch;
    Block* blk = me->blk;
    BarrierState& b = blk->bar;
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
            if (blk->fibers[i].st == FState::AtBarrier) set_state(&blk->fibers[i], FState::Ready);
        return b.result[g & 1];
    }
    set_state(me, FState::AtBarrier);
    run_next(L, me, false);
    return b.result[g & 1];
}

const unsigned char* warp_exchange_view(WarpOp op, unsigned mask, bool check_mask, bool need_full_warp,
                                        const void* mine, size_t bytes, unsigned* got, const char* file, int line) {
    using namespace detail;
    Fiber* me = me_or_die(warp_op_name(op));
    Launch* L = g_launch;
    Block* blk = me->blk;
    WarpState& w = blk->warps[me->warp];
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
            if (((w.need >> l) & 1u) && blk->fibers[first + l].st == FState::AtWarp)
                set_state(&blk->fibers[first + l], FState::Ready);
    } else {
        set_state(me, FState::AtWarp);
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

inline std::string deadlock_message(const Launch* L, const Block* blk) {
    std::string m = "deadlock in " + where(L, blk) + ":";
    unsigned exited = blk->done, at_warp = 0;
    for (unsigned i = 0; i < L->nthreads; ++i) at_warp += blk->fibers[i].st == FState::AtWarp;
    const BarrierState& b = blk->bar;
    if (b.arrived)
        m += format(" %s at %s:%d reached by %u of %u threads (%u exited, %u waiting in warp collectives);", b.op,
                    base_name(b.file), b.line, b.arrived, L->nthreads, exited, at_warp);
    for (unsigned wi = 0; wi < L->nwarps; ++wi) {
        const WarpState& w = blk->warps[wi];
        if (!w.arrived) continue;
        m += format(" warp %u: %s at %s:%d reached by %d of %d lanes (arrived 0x%08x, needed 0x%08x, exited 0x%08x);",
                    wi, warp_op_name(w.op), base_name(w.file), w.line, __popc(w.arrived), __popc(w.need), w.arrived,
                    w.need, w.exited);
    }
    if (m.back() == ';') m.pop_back();
    return m;
}

// Sets up block `serial` in slot `b`, its fibers ready to start.
inline void init_block(Launch* L, Block* b, unsigned slot, unsigned long long serial) {
    Pool& p = pool();
    const dim3 g = L->grid, bd = L->block;
    b->serial = serial;
    b->idx = uint3{static_cast<unsigned>(serial % g.x), static_cast<unsigned>((serial / g.x) % g.y),
                   static_cast<unsigned>(serial / (1ull * g.x * g.y))};
    b->fibers = p.fibers + slot * L->nthreads;
    b->warps = p.warps + slot * L->nwarps;
    b->bar = BarrierState{};
    b->done = 0;
    b->ready = L->nthreads;
    b->active = true;
    b->pending.clear();
    // Fresh for every block, and not zero: a read before the block's own write shows in its results.
    Chunk16 garbage;
    std::memset(garbage.bytes, 0xA5, sizeof garbage.bytes);
    b->dynamic.assign((L->dynamic_bytes + 15) / 16, garbage);
    for (unsigned wi = 0; wi < L->nwarps; ++wi) {
        WarpState& w = b->warps[wi];
        const unsigned lanes = std::min(32u, L->nthreads - wi * 32);
        w.existing = lanes == 32 ? 0xffffffffu : (1u << lanes) - 1u;
        w.exited = 0;
        w.arrived = 0;
        w.gen = 0;
        w.need = 0;
        w.contributed[0] = w.contributed[1] = 0;
    }
    for (unsigned i = 0; i < L->nthreads; ++i) {
        Fiber& f = b->fibers[i];
        f.linear = i;
        f.tid = uint3{i % bd.x, (i / bd.x) % bd.y, i / (bd.x * bd.y)};
        f.lane = i % 32;
        f.warp = i / 32;
        f.st = FState::Ready;
        f.blk = b;
#if defined(__SANITIZE_ADDRESS__)
        ASAN_UNPOISON_MEMORY_REGION(f.stack, f.stack_size);
#endif
        f.uc.uc_stack.ss_sp = f.stack;
        f.uc.uc_stack.ss_size = f.stack_size;
        f.uc.uc_link = nullptr;
        makecontext(&f.uc, fiber_entry, 0);
    }
}

// Sequential schedule: every block of the launch, one after another. Returns 0 or an error code
// with L->error set.
inline int run_sequential(Launch* L) {
    Block* b = &L->blocks[0];
    for (unsigned long long serial = 0; serial < L->total_blocks; ++serial) {
        init_block(L, b, 0, serial);
        L->need_sched_stack = true;
        switch_to(L, nullptr, &b->fibers[0], false);
        g_cur = nullptr;
        if (L->failed) return 4;
        if (b->done != L->nthreads) {
            L->error = deadlock_message(L, b);
            return 3;
        }
    }
    return 0;
}

// Concurrent schedule: up to nslots blocks resident, each free slot taking a random one of the
// next 2 * nslots blocks in grid order; the fibers of all resident blocks run in a seeded random
// order. Buffered stores are committed when the launch ends.
inline int run_concurrent(Launch* L) {
    const size_t shared = shared_size();
    for (unsigned s = 0; s < L->nslots; ++s) L->blocks[s].active = false;  // a sequential launch may have left one
    L->live = nullptr;
    L->need_sched_stack = true;
    int rc = 0;
    for (;;) {
        for (unsigned s = 0; s < L->nslots; ++s) {
            Block* b = &L->blocks[s];
            if (b->active) continue;
            while (L->upcoming.size() < 2 * L->nslots && L->next_serial < L->total_blocks)
                L->upcoming.push_back(L->next_serial++);
            if (L->upcoming.empty()) break;
            const unsigned k = L->rng.below(static_cast<unsigned>(L->upcoming.size()));
            const unsigned long long serial = L->upcoming[k];
            L->upcoming[k] = L->upcoming.back();
            L->upcoming.pop_back();
            init_block(L, b, s, serial);
            // Shared memory starts as garbage on the GPU: here as a random byte pattern.
            b->image.assign(shared, static_cast<unsigned char>(L->rng.next()));
        }
        Fiber* f = random_ready_elsewhere(L, nullptr);
        if (!f) {
            const Block* stuck = nullptr;
            for (unsigned s = 0; s < L->nslots; ++s) {
                const Block* b = &L->blocks[s];
                if (b->active && (!stuck || b->serial < stuck->serial)) stuck = b;
            }
            if (stuck) {
                L->error = deadlock_message(L, stuck);
                rc = 3;
            }
            break;
        }
        switch_to(L, nullptr, f, false);
        g_cur = nullptr;
        if (L->failed) {
            rc = 4;
            break;
        }
    }
    commit_all(L);
    for (unsigned s = 0; s < L->nslots; ++s) L->blocks[s].active = false;
    L->live = nullptr;
    return rc;
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
// from inside a kernel or no memory for the fiber stacks. Each block gets `dynamic_smem_bytes` of
// dynamic shared memory (at most an sm_90 block's 227 KiB).
extern "C" int vera_emu_launch(const char* kernel, const unsigned grid[3], const unsigned block[3],
                               unsigned dynamic_smem_bytes, void** params, char* err, size_t err_len) {
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
    if (dynamic_smem_bytes > kMaxDynamicShared) {
        set_err(err, err_len,
                format("kernel '%s': %u bytes of dynamic shared memory asked for, at most %u per block", kernel,
                       dynamic_smem_bytes, kMaxDynamicShared));
        return 2;
    }
    if (it->second.arity > 0 && params == nullptr) {
        set_err(err, err_len, format("kernel '%s' takes %zu parameters but params is null", kernel, it->second.arity));
        return 2;
    }
    Schedule& sched = schedule();
    if (!sched.known) {
        const char* env = std::getenv("VERA_EMU_SCHEDULE");
        if (!parse_schedule(env, sched))
            std::fprintf(stderr, "vera_emu: VERA_EMU_SCHEDULE=%s is not sequential or concurrent:SEED[:RESIDENT]; "
                                 "running sequentially\n", env);
        sched.known = true;
    }
    const unsigned long long total_blocks = 1ull * grid[0] * grid[1] * grid[2];
    unsigned nslots = 1;
    if (sched.concurrent) {
        const unsigned fit = kMaxFibers / static_cast<unsigned>(nthreads);
        nslots = static_cast<unsigned>(std::min<unsigned long long>({total_blocks, sched.resident, fit}));
        if (nslots == 0) nslots = 1;
    }
    std::string perr;
    if (!pool_reserve(static_cast<unsigned>(nthreads) * nslots, perr)) {
        set_err(err, err_len, perr);
        return 5;
    }
    Pool& p = pool();
    if (p.blocks.size() < nslots) p.blocks.resize(nslots);
    Launch L;
    L.blocks = p.blocks.data();
    L.nslots = nslots;
    L.total_blocks = total_blocks;
    L.concurrent = sched.concurrent;
    L.rng.s = sched.seed * 0x9e3779b97f4a7c15ull + (++sched.launches);
    L.name = it->first.c_str();
    L.inv = it->second.inv;
    L.params = params;
    L.grid = dim3(grid[0], grid[1], grid[2]);
    L.block = dim3(block[0], block[1], block[2]);
    L.nthreads = static_cast<unsigned>(nthreads);
    L.nwarps = (L.nthreads + 31) / 32;
    L.dynamic_bytes = dynamic_smem_bytes;
    g_launch = &L;
    g_concurrent = L.concurrent;
    const int rc = L.concurrent ? run_concurrent(&L) : run_sequential(&L);
    g_concurrent = false;
    g_launch = nullptr;
    g_cur = nullptr;
    if (rc != 0) set_err(err, err_len, L.error);
    return rc;
}

// Selects the schedule of the following launches: "sequential" (also null or "") or
// "concurrent:SEED[:RESIDENT]" (emu/README.md). Overrides VERA_EMU_SCHEDULE. Returns 0, or -1 (and
// changes nothing) when `spec` is malformed.
extern "C" int vera_emu_set_schedule(const char* spec) {
    using namespace vera_emu::detail;
    std::lock_guard<std::mutex> lock(launch_mutex());
    Schedule s = schedule();
    if (!parse_schedule(spec, s)) return -1;
    s.known = true;
    schedule() = s;
    return 0;
}

#endif  // VERA_EMU_RUNTIME_CPP
