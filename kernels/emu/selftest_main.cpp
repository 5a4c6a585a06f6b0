// Stand-alone driver of the emulator self-test (not part of the crate build). From the repository
// root:
//   g++ -std=c++17 -O2 -Wall -Wextra -DVERA_EMULATION -I kernels kernels/emu/selftest_main.cpp
//       -o vera_emu_selftest && ./vera_emu_selftest
// (one command line).
// It builds the same unity translation unit as the crate (shim, runtime, kernels; here only the
// self-test kernels) and checks the results on the host. Exit status 0 when every check passes.
#include "emu/cuda_emu.h"
#include "emu/runtime.cpp"
#include "emu/ptx_emu.h"
#include "emu/selftest.cuh"

namespace {

int g_failures = 0;
int g_checks = 0;

#define CHECK(cond, ...)                                                      \
    do {                                                                      \
        ++g_checks;                                                           \
        if (!(cond)) {                                                        \
            ++g_failures;                                                     \
            std::printf("  FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond);     \
            std::printf(__VA_ARGS__);                                         \
            std::printf("\n");                                                \
        }                                                                     \
    } while (0)

struct Err {
    char msg[1024];
};

int launch(const char* name, dim3 grid, dim3 block, std::vector<void*> params, Err* e = nullptr,
           unsigned dynamic_smem_bytes = 0) {
    const unsigned g[3] = {grid.x, grid.y, grid.z};
    const unsigned b[3] = {block.x, block.y, block.z};
    Err local;
    Err* err = e ? e : &local;
    const int rc = vera_emu_launch(name, g, b, dynamic_smem_bytes, params.empty() ? nullptr : params.data(), err->msg,
                                   sizeof err->msg);
    if (rc != 0 && !e) std::printf("  launch of %s failed (%d): %s\n", name, rc, err->msg);
    return rc;
}

void section(const char* name) { std::printf("[%s]\n", name); }

// Deterministic pseudo-random numbers.
struct Rng {
    uint64_t s;
    uint32_t next() {
        s = s * 6364136223846793005ull + 1442695040888963407ull;
        return static_cast<uint32_t>(s >> 33);
    }
};

void test_reduce() {
    section("block tree reduction, 8 blocks x 256 threads");
    std::vector<float> in(8 * 256), out(8, -1.0f);
    for (size_t i = 0; i < in.size(); ++i) in[i] = static_cast<float>((i * 7) % 23);
    const float* pin = in.data();
    float* pout = out.data();
    CHECK(launch("vera_emu_selftest_reduce", dim3(8), dim3(256), {&pin, &pout}) == 0, "launch");
    for (int b = 0; b < 8; ++b) {
        float want = 0;
        for (int i = 0; i < 256; ++i) want += in[b * 256 + i];
        CHECK(out[b] == want, "block %d: %g != %g", b, out[b], want);
    }
}

void test_rotate_and_time() {
    section("barrier ordering (rotate through shared memory) and timing");
    for (unsigned n : {1u, 33u, 256u, 1024u}) {
        std::vector<int> out(2 * n, -1);
        int* po = out.data();
        int iters = 7;
        CHECK(launch("vera_emu_selftest_rotate", dim3(2), dim3(n), {&po, &iters}) == 0, "launch n=%u", n);
        for (unsigned b = 0; b < 2; ++b)
            for (unsigned t = 0; t < n; ++t)
                CHECK(out[b * n + t] == static_cast<int>((t + 7) % n), "n=%u block %u t=%u: %d", n, b, t,
                      out[b * n + t]);
    }
    // One block of 256 threads, 50 iterations = 100 barriers.
    std::vector<int> out(256);
    int* po = out.data();
    int iters = 50;
    launch("vera_emu_selftest_rotate", dim3(1), dim3(256), {&po, &iters});  // warm-up (maps stacks)
    const int reps = 20;
    const auto t0 = std::chrono::steady_clock::now();
    for (int r = 0; r < reps; ++r) launch("vera_emu_selftest_rotate", dim3(1), dim3(256), {&po, &iters});
    const double ms =
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count() / reps;
    for (int t = 0; t < 256; ++t) CHECK(out[t] == (t + 50) % 256, "t=%d: %d", t, out[t]);
    std::printf("  timing: one 256-thread block with 100 __syncthreads: %.2f ms per launch\n", ms);
    iters = 0;
    std::vector<int> big(256 * 256, -1);
    int* pbig = big.data();
    const auto t1 = std::chrono::steady_clock::now();
    CHECK(launch("vera_emu_selftest_rotate", dim3(256), dim3(256), {&pbig, &iters}) == 0, "launch");
    const double ms2 = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t1).count();
    std::printf("  timing: 256 blocks x 256 threads without barriers: %.2f ms per launch\n", ms2);
    for (int i = 0; i < 256 * 256; ++i) CHECK(big[i] == i % 256, "i=%d: %d", i, big[i]);
}

void test_shfl() {
    section("shuffles (xor/down/up/idx, float/int/unsigned, width 16), 2 warps");
    const int n = 64;
    std::vector<float> fin(n), fout(n * 8, -1.0f);
    std::vector<int> iin(n), iout(n * 8, -1);
    for (int i = 0; i < n; ++i) {
        fin[i] = static_cast<float>(i % 13) * 0.5f;
        iin[i] = (i * 37) % 101 - 50;
    }
    const float* pfi = fin.data();
    const int* pii = iin.data();
    float* pfo = fout.data();
    int* pio = iout.data();
    CHECK(launch("vera_emu_selftest_shfl", dim3(1), dim3(n), {&pfi, &pii, &pfo, &pio}) == 0, "launch");
    for (int w = 0; w < 2; ++w) {
        float fsum = 0;
        int isum = 0;
        for (int l = 0; l < 32; ++l) {
            fsum += fin[w * 32 + l];
            isum += iin[w * 32 + l];
        }
        // shfl_down partials: simulate the documented semantics (out of range -> own value).
        float fd[32];
        int id[32];
        for (int l = 0; l < 32; ++l) {
            fd[l] = fin[w * 32 + l];
            id[l] = iin[w * 32 + l];
        }
        for (int d = 16; d > 0; d >>= 1) {
            float nf[32];
            int ni[32];
            for (int l = 0; l < 32; ++l) {
                nf[l] = fd[l] + (l + d < 32 ? fd[l + d] : fd[l]);
                ni[l] = id[l] + (l + d < 32 ? id[l + d] : id[l]);
            }
            std::memcpy(fd, nf, sizeof fd);
            std::memcpy(id, ni, sizeof id);
        }
        int scan = 0;
        for (int l = 0; l < 32; ++l) {
            const int t = w * 32 + l;
            scan += iin[t];
            int seg = 0;
            for (int k = 0; k < 16; ++k) seg += iin[w * 32 + (l & 16) + k];
            CHECK(fout[t * 8 + 0] == fsum, "xor float t=%d: %g != %g", t, fout[t * 8 + 0], fsum);
            CHECK(iout[t * 8 + 1] == isum, "xor int t=%d: %d != %d", t, iout[t * 8 + 1], isum);
            CHECK(fout[t * 8 + 2] == fd[l], "down float t=%d: %g != %g", t, fout[t * 8 + 2], fd[l]);
            CHECK(iout[t * 8 + 3] == iin[w * 32 + 5], "bcast t=%d", t);
            CHECK(iout[t * 8 + 4] == scan, "scan t=%d: %d != %d", t, iout[t * 8 + 4], scan);
            CHECK(iout[t * 8 + 5] == id[l], "down int t=%d: %d != %d", t, iout[t * 8 + 5], id[l]);
            CHECK(iout[t * 8 + 6] == seg, "width16 t=%d: %d != %d", t, iout[t * 8 + 6], seg);
            CHECK(fout[t * 8 + 7] == fin[w * 32 + 31 - l], "reverse t=%d", t);
            CHECK(iout[t * 8 + 7] == static_cast<int>(static_cast<unsigned>(iin[w * 32 + (l ^ 1)]) * 3u),
                  "unsigned t=%d", t);
        }
        CHECK(fd[0] == fsum && id[0] == isum, "lane 0 of shfl_down holds the sum");
    }
}

void test_vote() {
    section("ballot/any/all, __syncthreads_count/and/or, __reduce_add_sync, 3 warps");
    const int n = 96;
    std::vector<int> in(n);
    for (int i = 0; i < n; ++i) in[i] = (i % 5 == 1) ? 1 : -(i % 3);
    std::vector<unsigned> out(n * 10, 0xdeadbeefu);
    const int* pin = in.data();
    unsigned* pout = out.data();
    CHECK(launch("vera_emu_selftest_vote", dim3(1), dim3(n), {&pin, &pout}) == 0, "launch");
    int positives = 0;
    for (int i = 0; i < n; ++i) positives += in[i] > 0;
    for (int t = 0; t < n; ++t) {
        const int w = t / 32;
        unsigned ball = 0;
        for (int l = 0; l < 32; ++l) ball |= (in[w * 32 + l] > 0 ? 1u : 0u) << l;
        const unsigned* o = &out[t * 10];
        CHECK(o[0] == 0x49249249u, "t=%d ballot %08x", t, o[0]);
        CHECK(o[1] == ball, "t=%d ballot(data) %08x != %08x", t, o[1], ball);
        CHECK(o[2] == 1 && o[3] == 0 && o[4] == 1 && o[5] == 0, "t=%d any/all %u %u %u %u", t, o[2], o[3], o[4],
              o[5]);
        CHECK(o[6] == static_cast<unsigned>(positives), "t=%d count %u != %d", t, o[6], positives);
        CHECK(o[7] == 3, "t=%d and/or %u", t, o[7]);
        CHECK(o[8] == 496, "t=%d reduce_add %u", t, o[8]);
        CHECK(o[9] == 0xffffffffu, "t=%d activemask %08x", t, o[9]);
    }
}

void test_dims() {
    section("2D/3D grids and blocks, partial warp with its exact mask");
    const dim3 grid(2, 3, 2), block(4, 2, 5);  // 40 threads: one full warp, one of 8 lanes
    const unsigned nb = 12, nt = 40, nw = 2;
    std::vector<unsigned> out(nb * nt * 12, 0xffffffffu), wout(nb * nw * 2, 0);
    unsigned* po = out.data();
    unsigned* pw = wout.data();
    CHECK(launch("vera_emu_selftest_dims", grid, block, {&po, &pw}) == 0, "launch");
    for (unsigned bz = 0; bz < 2; ++bz)
        for (unsigned by = 0; by < 3; ++by)
            for (unsigned bx = 0; bx < 2; ++bx)
                for (unsigned tz = 0; tz < 5; ++tz)
                    for (unsigned ty = 0; ty < 2; ++ty)
                        for (unsigned tx = 0; tx < 4; ++tx) {
                            const unsigned b = bx + 2 * (by + 3 * bz), t = tx + 4 * (ty + 2 * tz);
                            const unsigned want[12] = {tx, ty, tz, bx, by, bz, 4, 2, 5, 2, 3, 2};
                            CHECK(std::memcmp(&out[(b * nt + t) * 12], want, sizeof want) == 0,
                                  "block %u thread %u", b, t);
                        }
    for (unsigned b = 0; b < nb; ++b) {
        CHECK(wout[(b * nw) * 2] == 32 && wout[(b * nw) * 2 + 1] == 0xffffffffu, "block %u warp 0", b);
        CHECK(wout[(b * nw + 1) * 2] == 8 && wout[(b * nw + 1) * 2 + 1] == 0xffu, "block %u warp 1: %u %08x", b,
              wout[(b * nw + 1) * 2], wout[(b * nw + 1) * 2 + 1]);
    }
}

void test_errors() {
    section("errors: deadlock, warp misuse, divergent barrier, trap, unknown kernel, bad configuration");
    std::vector<int> buf(1024);
    int* pb = buf.data();
    Err e;
    int rc = launch("vera_emu_selftest_deadlock", dim3(3), dim3(128), {&pb}, &e);
    std::printf("  deadlock -> %d: %s\n", rc, e.msg);
    CHECK(rc == 3, "rc %d", rc);
    CHECK(std::strstr(e.msg, "block (0,0,0)") && std::strstr(e.msg, "reached by 100 of 128 threads") &&
              std::strstr(e.msg, "28 exited"),
          "message: %s", e.msg);

    rc = launch("vera_emu_selftest_warp_exit", dim3(1), dim3(64), {&pb}, &e);
    std::printf("  lanes exit before a full-mask shuffle -> %d: %s\n", rc, e.msg);
    CHECK(rc == 3 || rc == 4, "rc %d", rc);

    rc = launch("vera_emu_selftest_bad_mask", dim3(1), dim3(32), {&pb}, &e);
    std::printf("  wrong mask -> %d: %s\n", rc, e.msg);
    CHECK(rc == 4 && std::strstr(e.msg, "mask 0x0000ffff") && std::strstr(e.msg, "0xffffffff"), "rc %d: %s", rc,
          e.msg);

    rc = launch("vera_emu_selftest_divergent_barrier", dim3(1), dim3(128), {&pb}, &e);
    std::printf("  divergent __syncthreads -> %d: %s\n", rc, e.msg);
    CHECK(rc == 4 && std::strstr(e.msg, "divergent barrier"), "rc %d: %s", rc, e.msg);

    rc = launch("vera_emu_selftest_trap", dim3(2), dim3(8), {&pb}, &e);
    std::printf("  __trap -> %d: %s\n", rc, e.msg);
    CHECK(rc == 4 && std::strstr(e.msg, "thread (3,0,0)") && std::strstr(e.msg, "__trap"), "rc %d: %s", rc, e.msg);

    rc = launch("vera_emu_selftest_ldmatrix_misaligned", dim3(1), dim3(32), {&pb}, &e);
    std::printf("  misaligned ldmatrix -> %d: %s\n", rc, e.msg);
    CHECK(rc == 4 && std::strstr(e.msg, "lane 9"), "rc %d: %s", rc, e.msg);

    rc = launch("no_such_kernel", dim3(1), dim3(1), {&pb}, &e);
    std::printf("  unknown kernel -> %d: %s\n", rc, e.msg);
    CHECK(rc == 1 && std::strstr(e.msg, "no_such_kernel"), "rc %d: %s", rc, e.msg);

    rc = launch("vera_emu_selftest_reduce", dim3(1), dim3(1025), {&pb, &pb}, &e);
    std::printf("  1025 threads -> %d: %s\n", rc, e.msg);
    CHECK(rc == 2, "rc %d", rc);
    rc = launch("vera_emu_selftest_reduce", dim3(1), dim3(32, 0, 1), {&pb, &pb}, &e);
    CHECK(rc == 2, "zero block dimension: rc %d", rc);
    rc = launch("vera_emu_selftest_reduce", dim3(0), dim3(32), {&pb, &pb}, &e);
    CHECK(rc == 2, "zero grid dimension: rc %d", rc);
    rc = launch("vera_emu_selftest_reduce", dim3(1), dim3(32), {}, &e);
    CHECK(rc == 2, "null params: rc %d", rc);

    // The emulator recovers: a normal launch after the errors.
    test_reduce();
}

uint16_t random_bits(Rng& r, bool f16) {
    // Small values with few significant bits, so products and sums stay exactly representable
    // enough to compare bit for bit with the double reference.
    const float v = static_cast<float>(static_cast<int>(r.next() % 33) - 16) / 8.0f;
    return f16 ? vera_emu::f32_to_f16_bits(v) : vera_emu::f32_to_bf16_bits(v);
}

void naive_mma(const std::vector<uint16_t>& A, const std::vector<uint16_t>& B, const std::vector<float>& C,
               bool f16, std::vector<float>& D) {
    auto dec = [f16](uint16_t b) {
        return static_cast<double>(f16 ? vera_emu::f16_bits_to_f32(b) : vera_emu::bf16_bits_to_f32(b));
    };
    for (int m = 0; m < 16; ++m)
        for (int n = 0; n < 8; ++n) {
            double acc = C[m * 8 + n];
            for (int k = 0; k < 16; ++k) acc += dec(A[m * 16 + k]) * dec(B[k * 8 + n]);
            D[m * 8 + n] = static_cast<float>(acc);
        }
}

void test_mma() {
    section("mma.m16n8k16 bf16/f16 against a naive matmul; ldmatrix + mma");
    Rng r{42};
    for (int variant = 0; variant < 3; ++variant) {
        const bool f16 = variant == 1;
        for (int rep = 0; rep < 3; ++rep) {
            std::vector<uint16_t> A(256), B(128);
            std::vector<float> C(128), D(128, -999.0f), want(128);
            for (auto& a : A) a = random_bits(r, f16);
            for (auto& b : B) b = random_bits(r, f16);
            for (auto& c : C) c = static_cast<float>(static_cast<int>(r.next() % 17) - 8) * 0.25f;
            if (rep == 2) {  // general values: compare with a tolerance to a float reference as well
                for (auto& a : A) {
                    const float v = static_cast<float>(r.next() % 20001) / 10000.0f - 1.0f;
                    a = f16 ? vera_emu::f32_to_f16_bits(v) : vera_emu::f32_to_bf16_bits(v);
                }
            }
            naive_mma(A, B, C, f16, want);
            const uint16_t* pa = A.data();
            const uint16_t* pb = B.data();
            const float* pc = C.data();
            float* pd = D.data();
            int use_f16 = f16 ? 1 : 0;
            const char* name = variant == 2 ? "vera_emu_selftest_ldmatrix_mma" : "vera_emu_selftest_mma";
            int rc = variant == 2 ? launch(name, dim3(1), dim3(32), {&pa, &pb, &pc, &pd})
                                  : launch(name, dim3(1), dim3(32), {&pa, &pb, &pc, &pd, &use_f16});
            CHECK(rc == 0, "%s launch", name);
            int bad = 0;
            for (int i = 0; i < 128; ++i)
                if (D[i] != want[i] && bad++ < 4)
                    std::printf("  %s variant %d rep %d: D[%d][%d] = %g, want %g\n", name, variant, rep, i / 8,
                                i % 8, D[i], want[i]);
            CHECK(bad == 0, "%s variant %d rep %d: %d mismatches", name, variant, rep, bad);
        }
    }
    // A warp of fewer than 32 lanes cannot run mma.
    std::vector<uint16_t> A(256), B(128);
    std::vector<float> C(128), D(128);
    const uint16_t* pa = A.data();
    const uint16_t* pb = B.data();
    const float* pc = C.data();
    float* pd = D.data();
    int use_f16 = 0;
    Err e;
    const int rc = launch("vera_emu_selftest_mma", dim3(1), dim3(16), {&pa, &pb, &pc, &pd, &use_f16}, &e);
    std::printf("  mma on a 16-lane warp -> %d: %s\n", rc, e.msg);
    CHECK(rc == 4 && std::strstr(e.msg, "needs all 32 lanes"), "rc %d: %s", rc, e.msg);
}

void test_ldmatrix() {
    section("ldmatrix x1/x2/x4 and .trans against the documented layout");
    std::vector<uint32_t> out(32 * 14, 0);
    uint32_t* po = out.data();
    CHECK(launch("vera_emu_selftest_ldmatrix", dim3(1), dim3(32), {&po}) == 0, "launch");
    auto val = [](int m, int r, int c) { return static_cast<uint32_t>((m << 8) | (r << 4) | c); };
    for (int lane = 0; lane < 32; ++lane) {
        const uint32_t* o = &out[lane * 14];
        const int q = lane / 4, p = 2 * (lane % 4);
        auto plain = [&](int m) { return val(m, q, p) | (val(m, q, p + 1) << 16); };
        auto trans = [&](int m) { return val(m, p, q) | (val(m, p + 1, q) << 16); };
        CHECK(o[0] == plain(0), "lane %d x1: %08x != %08x", lane, o[0], plain(0));
        for (int m = 0; m < 2; ++m) CHECK(o[1 + m] == plain(m), "lane %d x2[%d]: %08x", lane, m, o[1 + m]);
        for (int m = 0; m < 4; ++m) CHECK(o[3 + m] == plain(m), "lane %d x4[%d]: %08x", lane, m, o[3 + m]);
        CHECK(o[7] == trans(0), "lane %d x1.trans: %08x != %08x", lane, o[7], trans(0));
        for (int m = 0; m < 2; ++m) CHECK(o[8 + m] == trans(m), "lane %d x2.trans[%d]: %08x", lane, m, o[8 + m]);
        for (int m = 0; m < 4; ++m)
            CHECK(o[10 + m] == trans(m), "lane %d x4.trans[%d]: %08x != %08x", lane, m, o[10 + m], trans(m));
    }
}

void test_cp_async() {
    section("cp.async of 16, 8 and 4 bytes with zero fill");
    alignas(16) unsigned char src[32 * 16];
    for (int i = 0; i < 32 * 16; ++i) src[i] = static_cast<unsigned char>(i * 7 + 1);
    std::vector<unsigned char> out(3 * 32 * 16, 0x55);
    const unsigned char* ps = src;
    unsigned char* po = out.data();
    CHECK(launch("vera_emu_selftest_cp_async", dim3(1), dim3(32), {&ps, &po}) == 0, "launch");
    for (int w = 0; w < 3; ++w)
        for (int l = 0; l < 32; ++l) {
            const int n = l % 17;
            for (int i = 0; i < 16; ++i) {
                const unsigned char want = i < n ? src[l * 16 + i] : 0, got = out[w * 32 * 16 + l * 16 + i];
                CHECK(got == want, "%d-byte copies, lane %d byte %d: %02x != %02x", 16 >> w, l, i, got, want);
            }
        }
}

void test_dynamic_smem() {
    section("dynamic shared memory: per block, fresh, of the launch's size");
    const unsigned blocks = 4, threads = 64, bytes = 1000;
    std::vector<unsigned> out(3 * blocks * threads, 0);
    unsigned* po = out.data();
    CHECK(launch("vera_emu_selftest_dynamic_smem", dim3(blocks), dim3(threads), {&po}, nullptr, bytes) == 0, "launch");
    for (unsigned b = 0; b < blocks; ++b)
        for (unsigned i = 0; i < threads; ++i) {
            const unsigned* o = &out[3 * (b * threads + i)];
            CHECK(o[0] == 0xA5u, "block %u thread %u found %02x before writing", b, i, o[0]);
            CHECK(o[1] == bytes, "block %u thread %u: size %u", b, i, o[1]);
            CHECK(o[2] == b * 1000 + (i + 1) % threads, "block %u thread %u read %u", b, i, o[2]);
        }
    Err e;
    CHECK(launch("vera_emu_selftest_dynamic_smem", dim3(1), dim3(32), {&po}, &e, 228 * 1024) == 2,
          "228 KiB of dynamic shared memory accepted");
    CHECK(std::strstr(e.msg, "dynamic shared memory") != nullptr, "message: %s", e.msg);
}

void test_params_atomics_stack() {
    section("parameters by value, atomics, 48 KiB of locals per thread");
    VeraEmuSelftestParams p{3, 0.5f, 0.25, 7};
    const float x[2] = {100.0f, 10.0f};
    const float* px = x;
    long long k = 1LL << 40;
    double out = 0;
    double* pout = &out;
    CHECK(launch("vera_emu_selftest_params", dim3(2), dim3(4), {&p, &px, &k, &pout}) == 0, "launch");
    CHECK(out == 3 + 0.5 + 0.25 + 7 + 10 + static_cast<double>(1LL << 40), "params %f", out);

    int counter = 0;
    unsigned maxv = 0;
    std::vector<int> sums(8 * 128);
    int* pc = &counter;
    unsigned* pm = &maxv;
    int* ps = sums.data();
    CHECK(launch("vera_emu_selftest_atomics_stack", dim3(8), dim3(128), {&pc, &pm, &ps}) == 0, "launch");
    CHECK(counter == 1024 && maxv == 1023, "counter %d max %u", counter, maxv);
    for (int i = 0; i < 1024; ++i) {
        const int t = i % 128;
        int want = 0;
        for (int j = 0; j < 12 * 1024; j += 1024) want += j + t;
        CHECK(sums[i] == want, "sum %d: %d != %d", i, sums[i], want);
    }
}

void test_vector_types() {
    section("16-byte vector loads read back as float / __half / __nv_bfloat16");
    alignas(16) float f[4] = {1.5f, -2.0f, 3.25f, 4.0f};
    alignas(16) __half h[8];
    alignas(16) __nv_bfloat16 b[8];
    for (int i = 0; i < 8; ++i) {
        h[i] = __float2half_rn(static_cast<float>(i) - 3.5f);
        b[i] = __float2bfloat16_rn(static_cast<float>(i) * 0.25f - 1.0f);
    }
    alignas(16) float out[24] = {};
    const float* pf = f;
    const __half* ph = h;
    const __nv_bfloat16* pb = b;
    float* po = out;
    CHECK(launch("vera_emu_selftest_vector_types", dim3(1), dim3(32), {&pf, &ph, &pb, &po}) == 0, "launch");
    for (int i = 0; i < 4; ++i) CHECK(out[i] == f[i], "f32 %d: %g", i, out[i]);
    for (int i = 0; i < 8; ++i) CHECK(out[4 + i] == static_cast<float>(i) - 3.5f, "f16 %d: %g", i, out[4 + i]);
    for (int i = 0; i < 8; ++i)
        CHECK(out[12 + i] == static_cast<float>(i) * 0.25f - 1.0f, "bf16 %d: %g", i, out[12 + i]);
    for (int i = 0; i < 4; ++i) CHECK(out[20 + i] == f[3 - i], "float4 %d: %g", i, out[20 + i]);
}

void test_threads() {
    section("launches from 4 OS threads at once (serialised)");
    std::atomic<int> bad{0};
    std::vector<std::thread> th;
    for (int k = 0; k < 4; ++k)
        th.emplace_back([&bad, k] {
            std::vector<float> in(4 * 256), out(4);
            for (size_t i = 0; i < in.size(); ++i) in[i] = static_cast<float>((i + k) % 5);
            for (int rep = 0; rep < 10; ++rep) {
                const float* pin = in.data();
                float* pout = out.data();
                char err[256];
                const unsigned g[3] = {4, 1, 1}, b[3] = {256, 1, 1};
                void* params[2] = {&pin, &pout};
                if (vera_emu_launch("vera_emu_selftest_reduce", g, b, 0, params, err, sizeof err) != 0) ++bad;
                for (int blk = 0; blk < 4; ++blk) {
                    float want = 0;
                    for (int i = 0; i < 256; ++i) want += in[blk * 256 + i];
                    if (out[blk] != want) ++bad;
                }
            }
        });
    for (auto& t : th) t.join();
    CHECK(bad.load() == 0, "%d bad results", bad.load());
}

// Reference float -> bfloat16 (round to nearest even) computed independently of the bit trick.
uint16_t ref_bf16(float f) {
    if (std::isnan(f)) return 0x7fff;
    if (std::isinf(f) || f == 0.0f) return static_cast<uint16_t>(__float_as_uint(f) >> 16);
    int e;
    std::frexp(f, &e);  // f = m * 2^e, 0.5 <= |m| < 1
    const double quantum = std::ldexp(1.0, std::max(e - 8, -133));
    const double q = std::nearbyint(static_cast<double>(f) / quantum) * quantum;  // ties to even
    const float rf = static_cast<float>(q);  // exact, or +-Inf past the largest bfloat16
    return static_cast<uint16_t>(__float_as_uint(rf) >> 16);
}

void test_half() {
    section("__half / __nv_bfloat16 conversions");
    // Every 16-bit pattern converts to float and back unchanged (NaNs become the canonical 0x7fff).
    int bad_h = 0, bad_b = 0;
    for (unsigned u = 0; u < 65536; ++u) {
        const uint16_t h = static_cast<uint16_t>(u);
        const bool hnan = (h & 0x7c00) == 0x7c00 && (h & 0x3ff);
        const uint16_t back = __half_as_ushort(__float2half_rn(__half2float(__ushort_as_half(h))));
        if (back != (hnan ? 0x7fff : h)) ++bad_h;
        const bool bnan = (h & 0x7f80) == 0x7f80 && (h & 0x7f);
        const uint16_t bback = __bfloat16_as_ushort(__float2bfloat16_rn(__bfloat162float(__ushort_as_bfloat16(h))));
        if (bback != (bnan ? 0x7fff : h)) ++bad_b;
    }
    CHECK(bad_h == 0, "%d f16 round trips", bad_h);
    CHECK(bad_b == 0, "%d bf16 round trips", bad_b);
    // Known values.
    struct Case {
        float f;
        uint16_t h, b;
    };
    const Case cases[] = {
        {0.0f, 0x0000, 0x0000},
        {-0.0f, 0x8000, 0x8000},
        {1.0f, 0x3c00, 0x3f80},
        {-2.0f, 0xc000, 0xc000},
        {65504.0f, 0x7bff, 0x4780},
        {65519.99f, 0x7bff, 0x4780},
        {65520.0f, 0x7c00, 0x4780},
        {1e10f, 0x7c00, 0x5015},
        {-1e10f, 0xfc00, 0xd015},
        {5.9604645e-08f, 0x0001, 0x3380},   // 2^-24, smallest f16 subnormal
        {2.9802322e-08f, 0x0000, 0x3300},   // 2^-25: tie, rounds to even (0)
        {2.9802326e-08f, 0x0001, 0x3300},   // just above 2^-25
        {6.1035156e-05f, 0x0400, 0x3880},   // 2^-14, smallest f16 normal
        {1.0009765625f, 0x3c01, 0x3f80},    // 1 + 2^-10
        {1.00048828125f, 0x3c00, 0x3f80},   // 1 + 2^-11: tie to even (down)
        {1.00146484375f, 0x3c02, 0x3f80},   // 1 + 3*2^-11: tie to even (up)
        {1.00390625f, 0x3c04, 0x3f80},      // 1 + 2^-8: bf16 tie to even (down)
        {1.01171875f, 0x3c0c, 0x3f82},      // 1 + 3*2^-8: bf16 tie to even (up)
        {3.3895314e38f, 0x7c00, 0x7f7f},    // largest bfloat16
        {3.4028235e38f, 0x7c00, 0x7f80},    // FLT_MAX rounds to Inf in bfloat16
        {INFINITY, 0x7c00, 0x7f80},
        {-INFINITY, 0xfc00, 0xff80},
        {NAN, 0x7fff, 0x7fff},
        {-NAN, 0x7fff, 0x7fff},
        {1.0e-40f, 0x0000, 0x0001},  // float subnormal: bfloat16 keeps it
    };
    for (const Case& c : cases) {
        const uint16_t h = __half_as_ushort(__float2half_rn(c.f)), b = __bfloat16_as_ushort(__float2bfloat16_rn(c.f));
        CHECK(h == c.h, "__float2half_rn(%a) = %04x, want %04x", c.f, h, c.h);
        CHECK(b == c.b, "__float2bfloat16_rn(%a) = %04x, want %04x", c.f, b, c.b);
        CHECK(b == ref_bf16(c.f), "bf16 reference of %a = %04x", c.f, ref_bf16(c.f));
    }
    // Sweep of float bit patterns against independent references: _Float16 (g++'s soft-float
    // conversion) where the compiler has it, and ref_bf16.
    int bad_sweep_h = 0, bad_sweep_b = 0;
    for (uint64_t u = 0; u <= 0xffffffffull; u += 0x1357) {
        for (uint32_t d = 0; d < 3; ++d) {
            const uint32_t bits = static_cast<uint32_t>(u) + d;
            const float f = __uint_as_float(bits);
            if (std::isnan(f)) continue;
            if (__bfloat16_as_ushort(__float2bfloat16_rn(f)) != ref_bf16(f)) ++bad_sweep_b;
#if defined(__FLT16_MAX__)
            const _Float16 r = static_cast<_Float16>(f);
            uint16_t rb;
            std::memcpy(&rb, &r, 2);
            if (__half_as_ushort(__float2half_rn(f)) != rb) ++bad_sweep_h;
            // Ties (the round bit set, nothing below it) exercise round-to-even.
            const uint32_t tie = (bits & ~0x1fffu) | 0x1000u;
            const _Float16 rt = static_cast<_Float16>(__uint_as_float(tie));
            std::memcpy(&rb, &rt, 2);
            if (!std::isnan(__uint_as_float(tie)) && __half_as_ushort(__float2half_rn(__uint_as_float(tie))) != rb)
                ++bad_sweep_h;
#endif
            const uint32_t btie = (bits & ~0xffffu) | 0x8000u;
            if (!std::isnan(__uint_as_float(btie)) &&
                __bfloat16_as_ushort(__float2bfloat16_rn(__uint_as_float(btie))) != ref_bf16(__uint_as_float(btie)))
                ++bad_sweep_b;
        }
    }
#if !defined(__FLT16_MAX__)
    std::printf("  (no _Float16 in this compiler: f16 sweep skipped)\n");
#endif
    CHECK(bad_sweep_h == 0, "%d f16 sweep mismatches", bad_sweep_h);
    CHECK(bad_sweep_b == 0, "%d bf16 sweep mismatches", bad_sweep_b);

    // The same conversions inside a kernel.
    const int n = 64;
    std::vector<float> in(n), back(2 * n);
    std::vector<uint16_t> h(n), bf(n);
    for (int i = 0; i < n; ++i) in[i] = static_cast<float>(i - 32) * 1.37f + 0.001f * static_cast<float>(i);
    const float* pin = in.data();
    uint16_t* ph = h.data();
    uint16_t* pbf = bf.data();
    float* pback = back.data();
    int nn = n;
    CHECK(launch("vera_emu_selftest_half", dim3(2), dim3(48), {&pin, &ph, &pbf, &pback, &nn}) == 0, "launch");
    for (int i = 0; i < n; ++i) {
        CHECK(h[i] == vera_emu::f32_to_f16_bits(in[i]) && bf[i] == ref_bf16(in[i]), "kernel conversion %d", i);
        CHECK(back[2 * i] == vera_emu::f16_bits_to_f32(h[i]) && back[2 * i + 1] == vera_emu::bf16_bits_to_f32(bf[i]),
              "kernel back-conversion %d", i);
    }
}

// One launch of vera_emu_selftest_splitk (3 groups x 5 splits); true when every group's sum is right
// and the counters are back at zero.
bool splitk_correct(int variant) {
    const unsigned groups = 3, splits = 5;
    std::vector<unsigned> part(groups * splits * 64, 0), out(groups * 64, 0xffffffffu), counters(groups, 0);
    unsigned* pp = part.data();
    unsigned* po = out.data();
    unsigned* pc = counters.data();
    CHECK(launch("vera_emu_selftest_splitk", dim3(groups, splits), dim3(64), {&pp, &po, &pc, &variant}) == 0,
          "launch variant %d", variant);
    bool ok = true;
    for (unsigned g = 0; g < groups; ++g) {
        ok = ok && counters[g] == 0;
        for (unsigned t = 0; t < 64; ++t) {
            unsigned want = 0;
            for (unsigned k = 0; k < splits; ++k) want += 1000u * (g + 1) + 17u * (k + 1) + t;
            ok = ok && out[g * 64 + t] == want;
        }
    }
    return ok;
}

void set_schedule(const char* spec) {
    const int rc = vera_emu_set_schedule(spec);
    CHECK(rc == 0, "vera_emu_set_schedule(%s) -> %d", spec, rc);
}

void test_concurrent() {
    section("concurrent schedule: shared memory per block, interleaved blocks, split-K completion protocols");
    CHECK(vera_emu_set_schedule("concurrent:") == -1 && vera_emu_set_schedule("concurrent:1:0") == -1 &&
              vera_emu_set_schedule("random") == -1,
          "malformed schedules must be refused");
    const unsigned nb = 12;
    std::vector<unsigned> in(128);
    for (unsigned i = 0; i < 128; ++i) in[i] = i;
    const unsigned* pin = in.data();
    // Returns true if the blocks' start/end tickets interleave (some block starts before another ends).
    auto shared_run = [&](const char* what) {
        unsigned order = 0;
        std::vector<unsigned> tickets(2 * nb, 0), bad(nb + 1, 0);
        unsigned* po = &order;
        unsigned* pt = tickets.data();
        unsigned* pb = bad.data();
        CHECK(launch("vera_emu_selftest_shared_per_block", dim3(nb), dim3(128), {&po, &pt, &pb, &pin}) == 0,
              "launch (%s)", what);
        for (unsigned b = 0; b < nb; ++b) CHECK(bad[b] == 0, "%s: block %u saw %u foreign shared values", what, b, bad[b]);
        bool interleaved = false;
        for (unsigned b = 0; b < nb; ++b) interleaved = interleaved || tickets[2 * b + 1] != tickets[2 * b] + 1;
        return interleaved;
    };
    set_schedule("sequential");
    CHECK(!shared_run("sequential"), "the sequential schedule runs blocks one after another");
    int interleaved = 0;
    char spec[64];
    for (int seed = 1; seed <= 4; ++seed) {
        std::snprintf(spec, sizeof spec, "concurrent:%d", seed);
        set_schedule(spec);
        interleaved += shared_run(spec);
    }
    CHECK(interleaved > 0, "no seed interleaved the blocks");
    std::printf("  blocks interleaved with %d of 4 seeds\n", interleaved);

    // The correct protocol passes with every schedule; each broken one passes sequentially and fails
    // concurrently with some seeds.
    const char* names[3] = {"correct (fence, count, fence)", "broken: no fence", "broken: counted before written"};
    const int seeds = 12;
    for (int variant = 0; variant < 3; ++variant) {
        set_schedule("sequential");
        CHECK(splitk_correct(variant), "%s fails in the sequential schedule", names[variant]);
        int failed = 0;
        for (int seed = 1; seed <= seeds; ++seed) {
            std::snprintf(spec, sizeof spec, "concurrent:%d", seed);
            set_schedule(spec);
            failed += !splitk_correct(variant);
        }
        std::printf("  %s: wrong with %d of %d seeds\n", names[variant], failed, seeds);
        if (variant == 0)
            CHECK(failed == 0, "the correct protocol failed with %d seeds", failed);
        else
            CHECK(failed > 0, "%s was not caught by any of %d seeds", names[variant], seeds);
    }
    set_schedule(std::getenv("VERA_EMU_SCHEDULE"));
}

}  // namespace

int main() {
    test_reduce();
    test_rotate_and_time();
    test_shfl();
    test_vote();
    test_dims();
    test_errors();
    test_mma();
    test_ldmatrix();
    test_cp_async();
    test_dynamic_smem();
    test_params_atomics_stack();
    test_vector_types();
    test_threads();
    test_half();
    test_concurrent();
    std::printf("%d checks, %d failures\n", g_checks, g_failures);
    std::printf(g_failures == 0 ? "SELFTEST PASSED\n" : "SELFTEST FAILED\n");
    return g_failures == 0 ? 0 : 1;
}
