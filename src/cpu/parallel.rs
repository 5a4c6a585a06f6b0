//! How work is spread over rayon's threads, and the per-thread scratch it runs in.
//!
//! Every split here changes which thread computes an output, never how: each output element (or,
//! for reductions, each partial sum) is one fixed chain of f32 operations, and partial sums are
//! combined in a fixed order ([`reduce_in_order`]), so results are bitwise identical for any
//! number of threads.

use std::cell::Cell;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use rayon::prelude::*;

/// Below this much work (in FLOPs, see [`Work`]) a call runs on the calling thread alone: handing
/// work to rayon costs more than it saves (measured with `vera bench --threads 1` vs `--threads 2`
/// on small shapes).
const PARALLEL_MIN_FLOPS: f64 = 4e6;

/// What a weight byte a call reads counts for in [`Work`]: a decode call does few FLOPs per byte
/// it reads, and reading is what splitting its columns over the threads shares out. At 3.2, calls
/// reading more than 1.25 MB of weights split. Measured at T = 1-2 on an Intel Xeon with AMX (2
/// threads, every call on the same weights, `vera bench`, 5 interleaved rounds, medians of the
/// paired ratios; counted in FLOPs alone, all of these ran on one thread): split against one
/// thread, f32 n = m = 768, r = 1024 (6.3 MB) 0.45x the time, r = 256 (1.6 MB) 0.68x, n = m =
/// 1024, r = 160 (1.3 MB) 0.85x, r = 384 (3.1 MB) 0.21x, n = m = 2048, r = 256 0.27x, n = m =
/// 4096, r = 64 0.42x; bf16 n = m = 768, r = 1024 0.27x, n = m = 1536, r = 256 (1.6 MB) 0.64x;
/// but f32 n = m = 1024, r = 128 (1.05 MB) 1.14x and n = m = 768, r = 192 (1.2 MB) 1.02-1.09x,
/// bf16 n = m = 768, r = 256 (0.8 MB) 1.11x and n = m = 1024, r = 160 1.22x: about 1 µs of
/// hand-over that a call of under about 10 µs does not win back. (f16 decode, on f32 FMAs, won
/// from 0.6 MB: 0.84-0.93x, which this leaves on one thread.)
const FLOPS_PER_WEIGHT_BYTE: f64 = 3.2;

/// What a call does, for the choice between the calling thread alone and all of them: its
/// arithmetic, and the bytes of weights it reads (what bounds decode).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Work {
    flops: f64,
    weight_bytes: usize,
}

impl Work {
    /// Work of `flops` FLOPs on weights of `weight_bytes` bytes.
    pub(crate) fn new(flops: f64, weight_bytes: usize) -> Self {
        Self { flops, weight_bytes }
    }

    /// The work in FLOPs, a weight byte counting [`FLOPS_PER_WEIGHT_BYTE`], whichever is larger.
    fn cost(self) -> f64 {
        self.flops.max(self.weight_bytes as f64 * FLOPS_PER_WEIGHT_BYTE)
    }
}

/// [`PARALLEL_MIN_FLOPS`], or the threshold [`set_parallel_min_flops`] set (as f64 bits; 0 bits =
/// the default).
static MIN_FLOPS_OVERRIDE: AtomicU64 = AtomicU64::new(0);

fn parallel_min_flops() -> f64 {
    match MIN_FLOPS_OVERRIDE.load(Ordering::Relaxed) {
        0 => PARALLEL_MIN_FLOPS,
        bits => f64::from_bits(bits),
    }
}

/// Sets the work (in FLOPs, a byte of weights the call reads counting 3.2) below which a call runs
/// on the calling thread alone, for the whole process; `None` restores the default (4 MFLOP).
/// Results never depend on it, only speed: tests set it to 0 so that small random shapes really
/// run split across threads, which is what the thread-count equality properties are about.
pub fn set_parallel_min_flops(flops: Option<f64>) {
    MIN_FLOPS_OVERRIDE.store(flops.map_or(0, |f| f.max(f64::MIN_POSITIVE).to_bits()), Ordering::Relaxed);
}

/// Runs `f` with this thread's reusable f32 scratch of at least `len` elements.
///
/// The buffer is taken out of the thread-local while `f` runs, so a nested call (rayon may run
/// another task on this thread while `f` waits) gets a fresh buffer instead of a borrow conflict.
pub(crate) fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    thread_local! {
        static SCRATCH: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
    }
    let mut buf = SCRATCH.with(Cell::take);
    if buf.len() < len {
        buf.resize(len, 0.0);
    }
    let out = f(&mut buf[..len]);
    SCRATCH.with(|s| s.set(buf));
    out
}

/// Calls `f` on ranges of panels covering `0..panels`: across threads when `split` (the decode
/// regime), else all at once. The split changes which thread computes a column, never how.
pub(crate) fn for_panels(panels: usize, split: bool, f: impl Fn(Range<usize>) + Sync) {
    let threads = rayon::current_num_threads();
    if !split || threads <= 1 || panels <= 1 {
        f(0..panels);
        return;
    }
    let chunk = panels.div_ceil(threads * 2).max(1);
    for_each_chunk(panels.div_ceil(chunk), threads, &|c| f(c * chunk..panels.min((c + 1) * chunk)));
}

/// Calls `f(c)` once for each chunk `c` in `0..chunks`, on up to `threads` threads at once: the
/// caller, which claims chunks at once, and `threads - 1` helpers handed to the pool, which claim
/// what is left when they start. `f` must not wait for other work of the pool (the kernels it
/// runs do not): the caller waits for the chunks the helpers claimed.
///
/// Decode makes such a split twice per call (the two products), and rayon's threads are asleep in
/// between. With a parallel iterator, a caller outside the pool slept until both pool threads had
/// woken and finished (and then waited to be woken itself), and one inside the pool waited for a
/// late thief's half; here a helper that wakes late only does less. On the 2-vCPU Intel VM of the
/// README's table, a T = 1 f32 forward (4096 x 4096, r = 256) called from an application's thread
/// took a median of 0.20-0.24 ms with the iterator and 0.11-0.14 ms with claims
/// (`examples/decode_latency.rs`).
fn for_each_chunk(chunks: usize, threads: usize, f: &(dyn Fn(usize) + Sync)) {
    let claims =
        Arc::new(Claims { next: AtomicUsize::new(0), done: AtomicUsize::new(0), chunks, panic: Mutex::new(None) });
    // A helper reads `f` only once it has claimed a chunk below `chunks`, and this function
    // returns (or unwinds) only once every claimed chunk is done, so `f` is alive whenever it is
    // read; a helper that runs later claims nothing and never reads it.
    let f_static = FnPtr(erased_static(f));
    for _ in 1..threads.min(chunks) {
        let (claims, f_static) = (Arc::clone(&claims), f_static);
        // SAFETY: see above: `claim` reads the closure only once it has claimed a chunk, while the
        // caller waits for that chunk.
        rayon::spawn(move || unsafe { claims.claim(f_static) });
    }
    // SAFETY: `f` is alive until this function returns.
    unsafe { claims.claim(f_static) };
    let mut spins = 0u32;
    while claims.done.load(Ordering::Acquire) < chunks {
        // Every chunk is claimed by now, and the ones still running are short (a few panels).
        spins += 1;
        if spins < 256 {
            std::hint::spin_loop();
        } else {
            std::thread::yield_now();
        }
    }
    let panicked = claims.panic.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
    if let Some(payload) = panicked {
        std::panic::resume_unwind(payload);
    }
}

/// The chunks of one [`for_each_chunk`] call: the next one to claim, how many are done, and the
/// first panic of a chunk (resumed on the caller once all are done).
struct Claims {
    next: AtomicUsize,
    done: AtomicUsize,
    chunks: usize,
    panic: Mutex<Option<Box<dyn std::any::Any + Send>>>,
}

/// `f` as a pointer with its lifetime erased (a pointer may outlive its pointee; reading it may not).
fn erased_static(f: &(dyn Fn(usize) + Sync)) -> *const (dyn Fn(usize) + Sync + 'static) {
    let erased: *const (dyn Fn(usize) + Sync + '_) = f;
    // SAFETY: only the pointer's lifetime bound changes; its value and metadata stay as they are.
    unsafe {
        std::mem::transmute::<*const (dyn Fn(usize) + Sync + '_), *const (dyn Fn(usize) + Sync + 'static)>(erased)
    }
}

impl Claims {
    /// Claims and runs chunks until none is left.
    ///
    /// # Safety
    /// `f` points at a closure that stays alive until every chunk this call claims is done.
    unsafe fn claim(&self, f: FnPtr) {
        loop {
            let c = self.next.fetch_add(1, Ordering::Relaxed);
            if c >= self.chunks {
                return;
            }
            // SAFETY: a chunk is claimed, so the closure is alive until it is done (contract).
            let f = unsafe { f.get() };
            if let Err(payload) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(c))) {
                self.panic.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get_or_insert(payload);
            }
            self.done.fetch_add(1, Ordering::Release);
        }
    }
}

/// A `Sync` closure's pointer, sent to a helper of [`for_each_chunk`].
#[derive(Clone, Copy)]
struct FnPtr(*const (dyn Fn(usize) + Sync + 'static));

impl FnPtr {
    /// The closure.
    ///
    /// # Safety
    /// The closure is alive for the returned borrow (see [`for_each_chunk`]).
    unsafe fn get<'a>(self) -> &'a (dyn Fn(usize) + Sync) {
        // SAFETY: alive (contract); a pointer made from a reference is aligned and non-null.
        unsafe { &*self.0 }
    }
}

// SAFETY: the pointee is `Sync`, so sharing a pointer to it with another thread is sound; when it
// may be dereferenced is [`for_each_chunk`]'s argument.
unsafe impl Send for FnPtr {}

/// How a call's blocks of rows are spread over the threads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct BlockPlan {
    /// Blocks run at once (1: one after the other on the calling thread).
    pub(crate) width: usize,
    /// Whether each block spreads its columns over the threads (see [`for_panels`]).
    pub(crate) split: bool,
}

/// The plan for `blocks` blocks of `work` in all: on this thread alone for small work; in
/// parallel over blocks when there are enough to feed every thread (prefill); else one after the
/// other, each block's columns spread over the threads (decode).
pub(crate) fn plan_blocks(blocks: usize, work: Work) -> BlockPlan {
    plan(blocks, rayon::current_num_threads(), work.cost() >= parallel_min_flops())
}

/// [`plan_blocks`] for `threads` threads, with whether the work is worth handing to them.
fn plan(blocks: usize, threads: usize, worth_sharing: bool) -> BlockPlan {
    if !worth_sharing || threads <= 1 {
        BlockPlan { width: 1, split: false }
    } else if blocks >= threads {
        BlockPlan { width: threads, split: false }
    } else {
        BlockPlan { width: 1, split: true }
    }
}

/// Calls `f(t0, rows, split)` for blocks of `block` rows covering `0..rows`, for `work` in all, as
/// [`plan_blocks`] plans it.
pub(crate) fn for_blocks(rows: usize, block: usize, work: Work, f: impl Fn(usize, usize, bool) + Sync) {
    let blocks = rows.div_ceil(block);
    let plan = plan_blocks(blocks, work);
    if plan.width > 1 {
        (0..blocks).into_par_iter().for_each(|b| f(b * block, block.min(rows - b * block), false));
    } else {
        for b in 0..blocks {
            f(b * block, block.min(rows - b * block), plan.split);
        }
    }
}

/// `out = Σ_b partial(b)` over blocks `0..blocks`, element by element, added in block order
/// whatever thread computed each block: the reduction of per-block partial sums (column sums over
/// rows, such as the gradients of `lambda_d` and `lambda_b`) that keeps results bitwise identical
/// for any number of threads. `partial(b, buf)` writes block `b`'s partial sums into `buf`
/// (`out.len()` elements); blocks are computed in parallel, `par_width` at a time, so at most
/// `par_width · out.len()` f32 are held at once.
pub(crate) fn reduce_in_order(
    blocks: usize,
    par_width: usize,
    out: &mut [f32],
    partial: impl Fn(usize, &mut [f32]) + Sync,
) {
    out.fill(0.0);
    let width = par_width.max(1);
    let len = out.len();
    let mut bufs = vec![0.0f32; width * len];
    for b0 in (0..blocks).step_by(width) {
        let n = width.min(blocks - b0);
        if n == 1 {
            // One block at a time stays on this thread (it may still split its own columns).
            partial(b0, &mut bufs[..len]);
        } else {
            bufs[..n * len].par_chunks_mut(len.max(1)).enumerate().for_each(|(i, buf)| partial(b0 + i, buf));
        }
        for buf in bufs[..n * len].chunks(len.max(1)) {
            for (o, v) in out.iter_mut().zip(buf) {
                *o += v;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Column sums of a `rows x cols` matrix in blocks of 3 rows, with `threads` threads and `width`
    /// blocks in flight.
    fn column_sums(threads: usize, width: usize) -> Vec<f32> {
        let (rows, cols): (usize, usize) = (50, 7);
        // `t³` as products, not `powi`: Miri gives `powi` a random error of a few ulps per call (as
        // platforms' libm differ), which would make equal sums differ under it.
        let value = |t: usize, c: usize| ((t * 31 + c * 17) % 23) as f32 * 0.37 - 3.1 + (t * t * t) as f32 * 1e-3;
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        let mut out = vec![0.0; cols];
        pool.install(|| {
            reduce_in_order(rows.div_ceil(3), width, &mut out, |b, buf| {
                buf.fill(0.0);
                for t in 3 * b..rows.min(3 * b + 3) {
                    for (c, v) in buf.iter_mut().enumerate() {
                        *v += value(t, c);
                    }
                }
            })
        });
        out
    }

    #[test]
    fn reductions_are_bitwise_identical_for_any_thread_count_and_width() {
        let want = column_sums(1, 1);
        for (threads, width) in [(1, 4), (2, 1), (2, 2), (3, 5), (4, 17)] {
            let got = column_sums(threads, width);
            assert_eq!(got.map_bits(), want.map_bits(), "{threads} threads, {width} wide");
        }
        // And they are the sums: against f64.
        let exact: f64 =
            (0..50).map(|t| f64::from(((t * 31) % 23) as f32 * 0.37 - 3.1 + (t * t * t) as f32 * 1e-3)).sum();
        assert!((f64::from(want[0]) - exact).abs() < 1e-3 * exact.abs().max(1.0), "{} vs {exact}", want[0]);
    }

    trait Bits {
        fn map_bits(&self) -> Vec<u32>;
    }
    impl Bits for Vec<f32> {
        fn map_bits(&self) -> Vec<u32> {
            self.iter().map(|v| v.to_bits()).collect()
        }
    }

    /// How many times `for_each_chunk` ran each of `chunks` chunks, called on this thread (outside
    /// any pool) or on a worker of a pool of `threads`.
    fn chunk_counts(chunks: usize, threads: usize, inside: bool) -> Vec<usize> {
        let counts: Vec<AtomicUsize> = (0..chunks).map(|_| AtomicUsize::new(0)).collect();
        let f = |c: usize| {
            // Long enough that helpers really take chunks while the caller works.
            std::thread::sleep(std::time::Duration::from_micros(50));
            counts[c].fetch_add(1, Ordering::Relaxed);
        };
        if inside {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            pool.install(|| for_each_chunk(chunks, threads, &f));
        } else {
            for_each_chunk(chunks, threads, &f);
        }
        counts.into_iter().map(AtomicUsize::into_inner).collect()
    }

    #[test]
    fn every_chunk_runs_exactly_once_whoever_calls() {
        for (chunks, threads) in [(1, 1), (1, 4), (7, 2), (64, 3), (5, 8)] {
            for inside in [false, true] {
                assert_eq!(
                    chunk_counts(chunks, threads, inside),
                    vec![1; chunks],
                    "{chunks} chunks, {threads} threads"
                );
            }
        }
    }

    #[test]
    fn a_panicking_chunk_reaches_the_caller_after_every_chunk_is_done() {
        let done = AtomicUsize::new(0);
        let got = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            for_each_chunk(16, 4, &|c| {
                std::thread::sleep(std::time::Duration::from_micros(100));
                done.fetch_add(1, Ordering::Relaxed);
                assert_ne!(c, 5, "chunk five fails");
            })
        }));
        let payload = got.expect_err("the chunk's panic is resumed on the caller");
        assert_eq!(
            payload.downcast_ref::<String>().map(String::as_str),
            Some("assertion `left != right` failed: chunk five fails\n  left: 5\n right: 5")
        );
        // No chunk was still running (or skipped) when the caller went on.
        assert_eq!(done.load(Ordering::Relaxed), 16);
    }

    /// Small work stays on the caller; work for every thread runs block by block in parallel;
    /// fewer blocks than threads (decode) split their columns. Decode work counts the weights it
    /// reads: the shapes of `FLOPS_PER_WEIGHT_BYTE`'s measurements fall on the side they measured.
    #[test]
    fn work_is_shared_by_its_flops_or_the_weights_it_reads() {
        assert_eq!(plan(8, 2, false), BlockPlan { width: 1, split: false });
        assert_eq!(plan(8, 1, true), BlockPlan { width: 1, split: false });
        assert_eq!(plan(8, 2, true), BlockPlan { width: 2, split: false });
        assert_eq!(plan(1, 2, true), BlockPlan { width: 1, split: true });
        // T = 1, n = m, rank r, f32 (4 bytes) or bf16 (2): 4·n·r FLOPs over 2·n·r weights.
        let decode = |n: usize, r: usize, bytes: usize| Work::new((4 * n * r) as f64, 2 * n * r * bytes);
        let shared = |w: Work| w.cost() >= PARALLEL_MIN_FLOPS;
        for (n, r, bytes) in
            [(768, 1024, 4), (768, 256, 4), (1024, 160, 4), (4096, 64, 4), (768, 1024, 2), (1536, 256, 2)]
        {
            assert!(shared(decode(n, r, bytes)), "n = m = {n}, r = {r}, {bytes}-byte weights split");
        }
        for (n, r, bytes) in [(1024, 128, 4), (768, 192, 4), (768, 256, 2), (1024, 160, 2)] {
            assert!(!shared(decode(n, r, bytes)), "n = m = {n}, r = {r}, {bytes}-byte weights stay on one thread");
        }
        // Prefill is shared by its FLOPs alone.
        assert!(shared(Work::new(2.0 * (64 * 64 * (768 + 768)) as f64, 0)));
    }

    #[test]
    fn the_threshold_override_round_trips() {
        set_parallel_min_flops(Some(0.0));
        assert!(parallel_min_flops() <= f64::MIN_POSITIVE);
        set_parallel_min_flops(None);
        assert_eq!(parallel_min_flops(), PARALLEL_MIN_FLOPS);
    }
}
