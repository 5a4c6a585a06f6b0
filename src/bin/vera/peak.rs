//! `vera bench --peak`: this machine's roofline, measured with built-in loops: f32 FMA and bf16
//! dot-product and AMX tile throughput, and read bandwidth from cache and from memory, for 1 and all threads.

use std::hint::black_box;
use std::time::Instant;

use rayon::prelude::*;

/// Peak figures of this machine for a thread count.
#[derive(Clone, Copy, Debug)]
pub struct Peak {
    pub threads: usize,
    /// f32 FMA throughput, GFLOP/s (2 FLOPs per lane per FMA).
    pub f32_gflops: f64,
    /// bf16 dot-product throughput (`vdpbf16ps`), GFLOP/s, if the CPU has it.
    pub bf16_gflops: Option<f64>,
    /// AMX bf16 tile throughput (`tdpbf16ps`), GFLOP/s, or why it was not measured.
    pub amx_gflops: Result<f64, &'static str>,
    /// Read bandwidth from a buffer that fits in the last-level cache, GB/s.
    pub cache_gbps: f64,
    /// Read bandwidth from a buffer far larger than the caches, GB/s.
    pub memory_gbps: f64,
}

const ITERS: usize = 20_000_000;

/// Bytes per thread of the buffer the cache bandwidth is read from.
pub const CACHE_BYTES_PER_THREAD: usize = 8 << 20;

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// 16 independent FMA chains on zmm registers; returns a value so the work is not elided.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn fma_loop(iters: usize) -> f32 {
        let mut acc = [_mm512_set1_ps(0.0); 16];
        let a = _mm512_set1_ps(0.999_999);
        let b = _mm512_set1_ps(1e-7);
        for _ in 0..iters {
            for v in acc.iter_mut() {
                *v = _mm512_fmadd_ps(*v, a, b);
            }
        }
        sum(acc)
    }

    /// The sum of every lane of every accumulator, so the loops' work is not elided.
    #[target_feature(enable = "avx512f")]
    fn sum(acc: [__m512; 16]) -> f32 {
        let mut s = _mm512_setzero_ps();
        for v in acc {
            s = _mm512_add_ps(s, v);
        }
        _mm512_reduce_add_ps(s)
    }

    /// Sums `buf` with 512-bit loads into 8 independent accumulators: one load and one add per
    /// 64 bytes, so the loop is bound by the memory level the buffer lives in, not by the adds.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn read_sum(buf: &[f32]) -> f32 {
        let mut acc = [_mm512_setzero_ps(); 8];
        let blocks = buf.chunks_exact(128);
        let tail: f32 = blocks.remainder().iter().sum();
        for b in blocks {
            for (j, a) in acc.iter_mut().enumerate() {
                // SAFETY: 16 f32 at 16·j < 128 are in the block.
                *a = _mm512_add_ps(*a, unsafe { _mm512_loadu_ps(b.as_ptr().add(16 * j)) });
            }
        }
        let mut s = _mm512_setzero_ps();
        for a in acc {
            s = _mm512_add_ps(s, a);
        }
        _mm512_reduce_add_ps(s) + tail
    }

    /// 16 independent `vdpbf16ps` chains; returns a value so the work is not elided.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub unsafe fn dp_loop(iters: usize) -> f32 {
        let mut acc = [_mm512_set1_ps(0.0); 16];
        // SAFETY: plain bit reinterpretation of a 512-bit vector.
        let a: __m512bh = unsafe { std::mem::transmute(_mm512_set1_epi16(0x3f80)) };
        for _ in 0..iters {
            for v in acc.iter_mut() {
                *v = _mm512_dpbf16_ps(*v, a, a);
            }
        }
        sum(acc)
    }
}

/// The AMX peak loop.
#[cfg(target_arch = "x86_64")]
mod amx {
    use std::arch::asm;

    /// Palette 1, eight tiles of 16 rows x 64 bytes.
    #[repr(C, align(64))]
    struct Config([u8; 64]);

    /// `iters` x 4 independent `tdpbf16ps` on tiles loaded once (four C tiles, two A, two B, as the
    /// kernels' register block): 4 · 16 · 16 · 32 · 2 FLOPs per iteration.
    ///
    /// # Safety
    /// The CPU has AMX-BF16 and the OS granted this process tile data (`Isa::Amx` is available).
    pub unsafe fn tile_loop(iters: usize) -> f32 {
        let mut cfg = Config([0; 64]);
        cfg.0[0] = 1;
        for t in 0..8 {
            cfg.0[16 + 2 * t] = 64;
            cfg.0[48 + t] = 16;
        }
        // 16 rows of 32 bf16 ones (0x3f80), as pairs.
        let ones = [0x3f80_3f80u32; 16 * 16];
        let mut out = [0.0f32; 16 * 16];
        // SAFETY: tile data is granted (contract); the configuration is valid; each load reads 16
        // rows of 64 bytes of `ones`, the store writes 16 rows of 64 bytes of `out`.
        unsafe {
            asm!(
                "ldtilecfg [{cfg}]",
                "tilezero tmm0",
                "tilezero tmm1",
                "tilezero tmm2",
                "tilezero tmm3",
                "tileloadd tmm4, [{src} + {stride} * 1]",
                "tileloadd tmm5, [{src} + {stride} * 1]",
                "tileloadd tmm6, [{src} + {stride} * 1]",
                "tileloadd tmm7, [{src} + {stride} * 1]",
                "2:",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                "dec {iters}",
                "jnz 2b",
                "tilestored [{dst} + {stride} * 1], tmm0",
                "tilerelease",
                cfg = in(reg) cfg.0.as_ptr(),
                src = in(reg) ones.as_ptr(),
                dst = in(reg) out.as_mut_ptr(),
                stride = in(reg) 64usize,
                iters = inout(reg) iters.max(1) => _,
                options(nostack),
            );
        }
        out[0]
    }
}

/// GFLOP/s of `f` (which does `flops_per_iter · iters` FLOPs) on every thread of the pool at once.
fn throughput(threads: usize, flops_per_iter: f64, f: impl Fn(usize) -> f32 + Sync) -> f64 {
    let iters = ITERS / 4;
    f(1000); // warm up the vector units
    let t0 = Instant::now();
    let sink: f32 = (0..threads).into_par_iter().map(|_| f(iters)).sum();
    black_box(sink);
    flops_per_iter * iters as f64 * threads as f64 / t0.elapsed().as_secs_f64() / 1e9
}

/// Sums `buf` as fast as this CPU can read it (AVX-512 where there is, else whatever the
/// compiler makes of 16 independent sums).
fn read_sum(buf: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx512f") {
        // SAFETY: AVX-512F is present (checked just above).
        return unsafe { x86::read_sum(buf) };
    }
    let mut acc = [0.0f32; 16];
    for chunk in buf.chunks_exact(16) {
        for (a, v) in acc.iter_mut().zip(chunk) {
            *a += v;
        }
    }
    acc.iter().sum::<f32>()
}

/// GB/s of summing `bytes_per_thread` of f32 per thread, `passes` times, on every thread: each
/// thread sums its own buffer inside one parallel region (a region per pass would add rayon's
/// hand-off to every pass, which for a cache-sized buffer is a large part of a pass).
fn read_bandwidth(threads: usize, bytes_per_thread: usize, passes: usize) -> f64 {
    let len = bytes_per_thread / 4;
    let bufs: Vec<Vec<f32>> = (0..threads).map(|i| vec![i as f32 + 1.0; len]).collect();
    black_box(bufs.par_iter().map(|b| read_sum(b)).sum::<f32>()); // warm up, fault pages in
    let t0 = Instant::now();
    let sums = bufs.par_iter().map(|b| (0..passes).map(|_| black_box(read_sum(black_box(b)))).sum::<f32>());
    black_box(sums.sum::<f32>());
    (threads * len * 4 * passes) as f64 / t0.elapsed().as_secs_f64() / 1e9
}

/// Read bandwidth in GB/s of `threads` threads sharing `total_bytes` (at least 64 KiB each), with
/// enough passes (3 to 200) to read about 512 MiB in all: the rate at the level of the memory hierarchy a
/// working set of that size lives in.
pub fn read_gbps_at(threads: usize, total_bytes: usize) -> f64 {
    let per_thread = (total_bytes / threads).max(64 << 10);
    let passes = ((512usize << 20) / (per_thread * threads)).clamp(3, 200);
    read_bandwidth(threads, per_thread, passes)
}

/// Measures the peaks on the current rayon pool.
pub fn measure(threads: usize) -> Peak {
    #[cfg(target_arch = "x86_64")]
    let (f32_gflops, bf16_gflops) = {
        let f32_gflops = if is_x86_feature_detected!("avx512f") {
            // SAFETY: AVX-512F is present (checked above).
            throughput(threads, 16.0 * 16.0 * 2.0, |n| unsafe { x86::fma_loop(n) })
        } else {
            0.0
        };
        let bf16 = (is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bf16")).then(|| {
            // SAFETY: AVX-512F and AVX512_BF16 are present (checked above).
            throughput(threads, 16.0 * 32.0 * 2.0, |n| unsafe { x86::dp_loop(n) })
        });
        (f32_gflops, bf16)
    };
    #[cfg(not(target_arch = "x86_64"))]
    let (f32_gflops, bf16_gflops) = (0.0, None);
    let amx_gflops = match vera_kernels::Isa::Amx.unavailable_reason() {
        Some(why) => Err(why),
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the AMX tier is available: AMX-BF16 is present and tile data granted.
        // One tile-loop iteration is 16x the FLOPs of an FMA-loop one: run a 16th as many.
        None => Ok(throughput(threads, 4.0 * 16.0 * 16.0 * 32.0 * 2.0 / 16.0, |n| unsafe { amx::tile_loop(n / 16) })),
        #[cfg(not(target_arch = "x86_64"))]
        None => Err("no AMX off x86-64"),
    };
    Peak {
        threads,
        f32_gflops,
        bf16_gflops,
        amx_gflops,
        cache_gbps: read_bandwidth(threads, CACHE_BYTES_PER_THREAD, 20),
        memory_gbps: read_bandwidth(threads, 1 << 30, 2),
    }
}
