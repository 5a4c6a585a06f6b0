//! The CPU backend: a kernel table per element type (the ISA tier is chosen once per process),
//! packing of the shared projections, and the rayon drivers that block the work over threads.
//!
//! Every product is `out[row, col] = Σ_k left[row, k] · right[col, k]` with `right` packed in
//! column panels (see `packed`). Determinism: each output element is produced by one chain of f32
//! operations that depends only on its row of `left` and its column of `right`, never on the tile,
//! block or thread it falls in, so any split across threads gives bitwise identical results.

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
mod packed;
mod portable;

use std::cell::Cell;
use std::ops::Range;
use std::sync::OnceLock;

use half::{bf16, f16};
use rayon::prelude::*;

use crate::adapter::Adapter;
use crate::dtype::Element;
use crate::error::{Error, Result};
use crate::mat::{MatMut, MatRef};
use crate::projections::LayerProjections;
use crate::types::Mode;
pub use packed::Panels;
use packed::{pack_cols, pack_pairs, pack_pairs_rounded, pack_rows, Left, Sink, NR};

/// Rows of `x` per block: the unit of parallel work for large `T`. Scratch per thread is
/// `T_BLOCK · (r + n)` f32 at most.
pub(crate) const T_BLOCK: usize = 64;

/// Rows of `W` per task of merge / unmerge / ΔW.
const W_BLOCK: usize = 32;

/// The instruction-set tier the CPU kernels run on, from slowest to fastest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum Isa {
    /// Portable SIMD through the `wide` crate (any CPU: SSE2 on baseline x86-64, NEON on aarch64).
    Portable,
    /// x86-64 AVX2 + FMA + F16C: 4 x 16 register passes over the same tiles and panels.
    Avx2,
    /// x86-64 AVX-512 F/BW/VL with FMA and F16C: 32-column f32 tiles, f16/bf16 widened in registers.
    Avx512,
    /// AVX-512 plus AVX512_BF16: bf16 down-projections with `vdpbf16ps` (other dtypes as `Avx512`).
    Avx512Bf16,
}

impl Isa {
    /// The tier's name, as `vera bench` prints it and `VERA_KERNELS_ISA` takes it.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Portable => "portable",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
            Isa::Avx512Bf16 => "avx512bf16",
        }
    }

    /// The best tier this CPU supports (detected once).
    pub fn detected() -> Isa {
        static BEST: OnceLock<Isa> = OnceLock::new();
        *BEST.get_or_init(|| {
            #[cfg(target_arch = "x86_64")]
            {
                if avx512::has_avx512_bf16() {
                    return Isa::Avx512Bf16;
                }
                if avx512::has_avx512() {
                    return Isa::Avx512;
                }
                if avx2::has_avx2() {
                    return Isa::Avx2;
                }
            }
            Isa::Portable
        })
    }

    /// The tier used when nothing is asked for: [`Isa::detected`], except that `avx512bf16` is
    /// only the default on AMD CPUs. On the Intel CPU these kernels were measured on (Sapphire
    /// Rapids class), `vdpbf16ps` ran at half the FMA rate and the bf16 down-projection was about
    /// 25% faster on the `avx512` tier (f32 FMAs on weights widened once per cache block); on AMD
    /// Zen 5 it runs at about twice the FMA rate.
    pub fn preferred() -> Isa {
        let best = Isa::detected();
        if best == Isa::Avx512Bf16 && !cpu_is_amd() {
            Isa::Avx512
        } else {
            best
        }
    }

    /// The tier in use: [`Isa::preferred`], or the tier named by the environment variable
    /// `VERA_KERNELS_ISA` (`avx512bf16`, `avx512`, `avx2` or `portable`) when it is set, lowered to
    /// [`Isa::detected`] if this CPU lacks it. Other values are ignored (`vera bench` rejects them).
    /// Read once per process.
    pub fn selected() -> Isa {
        static SELECTED: OnceLock<Isa> = OnceLock::new();
        *SELECTED.get_or_init(|| {
            let asked = std::env::var("VERA_KERNELS_ISA").ok().and_then(|v| v.parse::<Isa>().ok());
            asked.map_or(Isa::preferred(), |a| a.min(Isa::detected()))
        })
    }
}

/// Whether the CPU's vendor string is AMD's (`cpuid` leaf 0).
fn cpu_is_amd() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: cpuid leaf 0 exists on every x86-64 CPU. (`__cpuid` is a safe function on newer
        // toolchains than this crate's minimum; the block keeps older ones compiling.)
        #[allow(unused_unsafe)]
        let id = unsafe { std::arch::x86_64::__cpuid(0) };
        let vendor = [id.ebx, id.edx, id.ecx].map(u32::to_le_bytes).concat();
        vendor == b"AuthenticAMD"
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

impl std::str::FromStr for Isa {
    type Err = Error;

    /// Parses a tier name as `VERA_KERNELS_ISA` takes it.
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "avx512bf16" => Ok(Isa::Avx512Bf16),
            "avx512" => Ok(Isa::Avx512),
            "avx2" => Ok(Isa::Avx2),
            "portable" => Ok(Isa::Portable),
            other => Err(Error::UnknownIsa { name: other.to_string() }),
        }
    }
}

impl std::fmt::Display for Isa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The tier the kernels for `T` run on in this process (f32 and f16 never use the bf16 tier's
/// dot-product instruction, so they report `avx512` on an `avx512bf16` machine).
pub fn active_isa<T: Element>() -> Isa {
    T::kernels().isa
}

/// What the up-projection's epilogue does with each dot product `d` of output column `i`:
/// `y = (accumulate ? y : 0) + scale[i]·d + bias[i]`, in that order.
#[derive(Clone, Copy, Debug)]
pub struct Epilogue<'a> {
    pub(crate) scale: Option<&'a [f32]>,
    pub(crate) bias: Option<&'a [f32]>,
    pub(crate) accumulate: bool,
}

impl Epilogue<'_> {
    #[inline(always)]
    pub(crate) fn apply(&self, i: usize, dot: f32, old: f32) -> f32 {
        let mut v = match self.scale {
            Some(s) => s[i] * dot,
            None => dot,
        };
        if let Some(b) = self.bias {
            v += b[i];
        }
        if self.accumulate {
            v += old;
        }
        v
    }
}

/// How a ΔW tile is combined with the weight it is written to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Update {
    /// `W + ΔW` (merge).
    Add,
    /// `W - ΔW` (unmerge).
    Sub,
    /// `ΔW` (the old contents are ignored).
    Overwrite,
}

impl Update {
    #[inline(always)]
    pub(crate) fn apply(self, old: f32, delta: f32) -> f32 {
        match self {
            Update::Add => old + delta,
            Update::Sub => old - delta,
            Update::Overwrite => delta,
        }
    }
}

/// `sink[row, col] <- Σ_k left[row, k]·right[col, k]` over the panels in the range.
pub(crate) type GemmFn<W, T> = unsafe fn(Left<'_, f32>, &Panels<W>, Range<usize>, &Sink<'_, T>);
/// The same with bf16 activations (as bits) against k-pair panels (`vdpbf16ps`).
pub(crate) type PairGemmFn<T> = unsafe fn(Left<'_, u32>, usize, &Panels<u32>, Range<usize>, &Sink<'_, T>);

/// The micro-kernels of one element type on one ISA tier. Each kernel writes through the sink; the
/// caller guarantees that the rows and panel columns it passes are its own while the call runs.
pub struct Kernels<T: 'static> {
    pub(crate) isa: Isa,
    /// Weights in `T` (projections, the dense baseline's ΔW).
    pub(crate) gemm: GemmFn<T, T>,
    /// Weights in f32 (the dense baseline's `diag(lambda_b)·B·diag(lambda_d)`).
    pub(crate) gemm_f32: GemmFn<f32, T>,
    /// bf16 k-pair dot products, where the tier has them.
    pub(crate) gemm_pairs: Option<PairGemmFn<T>>,
}

/// Element types every tier of this target implements (all three).
#[cfg(target_arch = "x86_64")]
trait TierElement: avx512::Simd16 + avx2::Simd8 {}
#[cfg(target_arch = "x86_64")]
impl<T: avx512::Simd16 + avx2::Simd8> TierElement for T {}
/// Element types every tier of this target implements (all three).
#[cfg(not(target_arch = "x86_64"))]
trait TierElement {}
#[cfg(not(target_arch = "x86_64"))]
impl<T: Element> TierElement for T {}

fn select<T: Element + TierElement>() -> Kernels<T> {
    match Isa::selected() {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512Bf16 => avx512::kernels::<T>(true, cpu_is_amd()),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => avx512::kernels::<T>(false, cpu_is_amd()),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => avx2::kernels::<T>(),
        _ => portable::kernels::<T>(),
    }
}

macro_rules! kernel_table {
    ($($t:ty),*) => {$(
        impl crate::sealed::Sealed for $t {
            fn kernels() -> &'static Kernels<$t> {
                static TABLE: OnceLock<Kernels<$t>> = OnceLock::new();
                TABLE.get_or_init(select::<$t>)
            }
        }
    )*};
}
kernel_table!(f32, f16, bf16);

/// Projection weights in the layout of the tier that packed them.
#[derive(Clone, Debug, PartialEq)]
enum WeightPanels<T> {
    /// A `[r, n_max]` as `r`-column panels over k = n, or B `[m_max, r]` as `m`-column panels over
    /// k = r (f32 FMA on widened weights).
    Wide(Panels<T>),
    /// bf16 weights as panels over k-pairs, each u32 = (W[j][2p], W[j][2p + 1]) (`vdpbf16ps`).
    Pairs(Panels<u32>),
}

impl<T> WeightPanels<T> {
    fn bytes(&self) -> usize {
        match self {
            WeightPanels::Wide(p) => p.num_panels() * p.k_cap() * NR * std::mem::size_of::<T>(),
            WeightPanels::Pairs(p) => p.num_panels() * p.k_cap() * NR * 4,
        }
    }
}

/// The shared projections packed for the active tier: built once per model, used by every layer
/// and thread.
#[derive(Clone, Debug, PartialEq)]
pub struct PackedProjections<T> {
    /// A `[r, n_max]` as `r`-column panels over k = n.
    down: WeightPanels<T>,
    /// B `[m_max, r]` as `m_max`-column panels over k = r.
    up: WeightPanels<T>,
}

impl<T> PackedProjections<T> {
    /// Bytes the packed weights take.
    pub(crate) fn bytes(&self) -> usize {
        self.down.bytes() + self.up.bytes()
    }
}

/// Packs A `[r, n]` and B `[m, r]` for the kernels of `T`.
pub(crate) fn pack_projections<T: Element>(a: MatRef<'_, T>, b: MatRef<'_, T>) -> PackedProjections<T> {
    let pack = |w: MatRef<'_, T>| {
        let k = w.cols();
        if T::kernels().gemm_pairs.is_some() {
            // Only bf16 has pair kernels: its bits are the top half of its f32 value.
            let bits = |j: usize, c: usize| if c < k { w.row_unchecked(j)[c].to_f32().to_bits() >> 16 } else { 0 };
            WeightPanels::Pairs(Panels::from_fn(w.rows(), k.div_ceil(2), |j, p| {
                bits(j, 2 * p) | (bits(j, 2 * p + 1) << 16)
            }))
        } else {
            WeightPanels::Wide(Panels::from_fn(w.rows(), k, |j, c| w.row_unchecked(j)[c]))
        }
    };
    PackedProjections { down: pack(a), up: pack(b) }
}

/// Runs `f` with this thread's reusable f32 scratch of at least `len` elements.
///
/// The buffer is taken out of the thread-local while `f` runs, so a nested call (rayon may run
/// another task on this thread while `f` waits) gets a fresh buffer instead of a borrow conflict.
fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
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
fn for_panels(panels: usize, split: bool, f: impl Fn(Range<usize>) + Sync) {
    let threads = rayon::current_num_threads();
    if !split || threads <= 1 || panels <= 1 {
        f(0..panels);
        return;
    }
    let chunk = panels.div_ceil(threads * 2).max(1);
    (0..panels.div_ceil(chunk)).into_par_iter().for_each(|c| f(c * chunk..panels.min((c + 1) * chunk)));
}

/// Below this many FLOPs a call runs on the calling thread alone: handing work to rayon costs
/// more than it saves (measured with `vera bench --threads 1` vs `--threads 2` on small shapes).
const PARALLEL_MIN_FLOPS: f64 = 4e6;

/// Calls `f(t0, rows, split)` for blocks of `block` rows covering `0..rows`, for work of about
/// `flops`: on this thread alone for small work; in parallel over blocks when there are enough to
/// feed every thread (prefill); else one after the other with `split` set so that `f` spreads each
/// block's columns over the threads (decode).
fn for_blocks(rows: usize, block: usize, flops: f64, f: impl Fn(usize, usize, bool) + Sync) {
    let blocks = rows.div_ceil(block);
    if flops < PARALLEL_MIN_FLOPS || rayon::current_num_threads() <= 1 {
        for b in 0..blocks {
            f(b * block, block.min(rows - b * block), false);
        }
    } else if blocks >= rayon::current_num_threads() {
        (0..blocks).into_par_iter().for_each(|b| f(b * block, block.min(rows - b * block), false));
    } else {
        for b in 0..blocks {
            f(b * block, block.min(rows - b * block), true);
        }
    }
}

/// Scratch (f32 elements) [`down`] needs to pack `rows x n` activations.
fn down_scratch(rows: usize, n: usize) -> usize {
    // k-pairs (u32) take no more room than f32 elements.
    Left::<f32>::len_for(rows, n)
}

/// `sink[t, j] <- Σ_k x[t, k]·A[j, k]` for the rows of `x` (the down-projection), packing `x`
/// into `scratch` first.
fn down<T: Element>(
    packed: &PackedProjections<T>,
    x: MatRef<'_, T>,
    scratch: &mut [f32],
    r: usize,
    sink: &Sink<'_, T>,
    split: bool,
) {
    let k = T::kernels();
    let panels = r.div_ceil(NR);
    match (&packed.down, k.gemm_pairs) {
        (WeightPanels::Pairs(p), Some(gemm_pairs)) => {
            let bits: &[u16] = bytemuck::cast_slice(x.as_slice());
            let bits = MatRef::new(bits, x.rows(), x.cols(), x.row_stride()).expect("same extent as x");
            let left = pack_pairs(bits, bytemuck::cast_slice_mut(scratch));
            let n = x.cols();
            // SAFETY: the panels hold ceil(n_max / 2) >= ceil(n / 2) pair rows; the caller owns
            // the sink's rows, and for_panels hands out disjoint panel ranges.
            for_panels(panels, split, |range| unsafe { gemm_pairs(left, n, p, range, sink) });
        }
        (WeightPanels::Wide(p), _) => {
            let left = pack_rows(x, scratch);
            // SAFETY: as above, with k_len = n <= n_max = k_cap.
            for_panels(panels, split, |range| unsafe { (k.gemm)(left, p, range, sink) });
        }
        (WeightPanels::Pairs(_), None) => unreachable!("pair panels are only packed for tiers with pair kernels"),
    }
}

/// Scratch (f32 elements) [`up`] needs to pack `rows x r` of `u`.
fn up_scratch(rows: usize, r: usize) -> usize {
    // k-pairs (u32) take no more room than f32 elements.
    Left::<f32>::len_for(rows, r)
}

/// `y (op)= epilogue(u·Bᵀ)` for the rows of `u` (the up-projection), packing `u` into `scratch`
/// first: as f32 rows, or on a tier with pair kernels rounded to bf16 k-pairs (as PEFT rounds `u`
/// to the activation dtype).
fn up<T: Element>(
    packed: &PackedProjections<T>,
    u: MatRef<'_, f32>,
    scratch: &mut [f32],
    m: usize,
    sink: &Sink<'_, T>,
    split: bool,
) {
    let k = T::kernels();
    let panels = m.div_ceil(NR);
    match (&packed.up, k.gemm_pairs) {
        (WeightPanels::Pairs(p), Some(gemm_pairs)) => {
            let left = pack_pairs_rounded(u, bytemuck::cast_slice_mut(scratch));
            let r = u.cols();
            // SAFETY: the panels hold ceil(r / 2) pair rows; the caller owns the sink's rows, and
            // for_panels hands out disjoint panel ranges.
            for_panels(panels, split, |range| unsafe { gemm_pairs(left, r, p, range, sink) });
        }
        (WeightPanels::Wide(p), _) => {
            let left = pack_rows(u, scratch);
            // SAFETY: k_len = r = k_cap of the B panels; the caller owns the sink's rows, and
            // for_panels hands out disjoint panel ranges.
            for_panels(panels, split, |range| unsafe { (k.gemm)(left, p, range, sink) });
        }
        (WeightPanels::Pairs(_), None) => unreachable!("pair panels are only packed for tiers with pair kernels"),
    }
}

fn packed_or_owned<'p, T: Element>(
    layer: &LayerProjections<'p, T>,
    owned: &'p mut Option<PackedProjections<T>>,
) -> &'p PackedProjections<T> {
    match layer.packed() {
        Some(p) => p,
        None => owned.insert(pack_projections(layer.a(), layer.b())),
    }
}

/// The fused forward pass (shapes already validated by `ops`).
pub(crate) fn forward<T: Element>(
    layer: LayerProjections<'_, T>,
    adapter: &Adapter,
    x: MatRef<'_, T>,
    mut y: MatMut<'_, T>,
    mode: Mode,
) {
    let (rows, n, r, m) = (x.rows(), x.cols(), layer.rank(), layer.out_features());
    if rows == 0 || m == 0 {
        return;
    }
    let mut owned = None;
    let packed = packed_or_owned(&layer, &mut owned);
    let epi = Epilogue { scale: Some(adapter.lambda_b()), bias: adapter.bias(), accumulate: mode == Mode::Accumulate };
    let yp = y.as_ptr_mat();
    let flops = 2.0 * (rows * r * (n + m)) as f64;
    for_blocks(rows, T_BLOCK, flops, |t0, tb, split| {
        let packed_u = up_scratch(tb, r);
        with_scratch(tb * r + packed_u + down_scratch(tb, n), |buf| {
            let (u, rest) = buf.split_at_mut(tb * r);
            let (ul, xl) = rest.split_at_mut(packed_u);
            let mut u = MatMut::from_slice(u, tb, r).expect("scratch sized tb * r");
            // u = lambda_d ⊙ (x·Aᵀ), into this block's scratch ...
            let sink = Sink::F32 { out: u.as_ptr_mat(), scale: Some(adapter.lambda_d()) };
            down(packed, x.row_range(t0, tb), xl, r, &sink, split);
            // ... then up-projected at once, while it is in cache.
            up(packed, u.as_ref(), ul, m, &Sink::Epilogue { out: yp.sub(t0, tb, 0, m), epi }, split);
        });
    });
}

/// `w = update(w, ΔW)` for a whole layer, in blocks of rows (shapes already validated).
pub(crate) fn apply_delta<T: Element>(
    layer: LayerProjections<'_, T>,
    adapter: &Adapter,
    mut w: MatMut<'_, T>,
    op: Update,
) {
    let (m, n, r) = (layer.out_features(), layer.in_features(), layer.rank());
    if m == 0 || n == 0 {
        return;
    }
    let k = T::kernels();
    let (a, b) = (layer.a(), layer.b());
    let (ld, lb) = (adapter.lambda_d(), adapter.lambda_b());
    // Aᵀ as n-column panels over k = r: output columns of W are A's columns.
    let at = Panels::from_fn(n, r, |col, j| a.row_unchecked(j)[col]);
    let wp = w.as_ptr_mat();
    (0..m.div_ceil(W_BLOCK)).into_par_iter().for_each(|blk| {
        let i0 = blk * W_BLOCK;
        let ib = W_BLOCK.min(m - i0);
        with_scratch(ib * r + Left::<f32>::len_for(ib, r), |buf| {
            let (c, cl) = buf.split_at_mut(ib * r);
            // c[i, j] = lambda_b[i] · B[i, j] · lambda_d[j]: this block's rows of diag(lb)·B·diag(ld).
            for (i, crow) in c.chunks_mut(r).enumerate() {
                let brow = b.row_unchecked(i0 + i);
                for ((cv, bv), dv) in crow.iter_mut().zip(brow).zip(ld) {
                    *cv = lb[i0 + i] * bv.to_f32() * dv;
                }
            }
            let left = pack_rows(MatRef::from_slice(c, ib, r).expect("scratch sized ib * r"), cl);
            let sink = Sink::Update { out: wp.sub(i0, ib, 0, n), op };
            // SAFETY: k_len = r = k_cap; rows i0..i0+ib of w belong to this task only.
            unsafe { (k.gemm)(left, &at, 0..n.div_ceil(NR), &sink) };
        });
    });
}

/// Reusable buffers of the dense baseline: ΔW packed as weight panels, and Aᵀ packed as a left operand.
#[derive(Debug, Default)]
pub struct DenseBuffers<T> {
    dw: Option<Panels<T>>,
    a_packed: Vec<f32>,
}

/// The dense baseline: forms ΔW (in `T`, as weight panels), then `y (op)= x·ΔWᵀ + bias`.
pub(crate) fn dense<T: Element>(
    layer: LayerProjections<'_, T>,
    adapter: &Adapter,
    x: MatRef<'_, T>,
    mut y: MatMut<'_, T>,
    mode: Mode,
    bufs: &mut DenseBuffers<T>,
) {
    let (rows, n, r, m) = (x.rows(), x.cols(), layer.rank(), layer.out_features());
    if m == 0 {
        return;
    }
    let k = T::kernels();
    let (a, b) = (layer.a(), layer.b());
    let (ld, lb) = (adapter.lambda_d(), adapter.lambda_b());
    // ΔWᵀ[col, i] = Σ_j Aᵀ[col, j] · C[i, j], C = diag(lb)·B·diag(ld): rows of the product are
    // A's columns, so it lands directly in the panel layout the second product reads.
    let c = Panels::from_fn(m, r, |i, j| lb[i] * b.row_unchecked(i)[j].to_f32() * ld[j]);
    bufs.a_packed.resize(Left::<f32>::len_for(n, r), 0.0);
    let left = pack_cols(a, &mut bufs.a_packed);
    let dw = match &mut bufs.dw {
        Some(p) if p.cols() == m && p.k_cap() == n => p,
        slot => slot.insert(Panels::with_shape(m, n)),
    };
    let dwp = dw.as_mut_ptr();
    for_blocks(n, T_BLOCK, 2.0 * (m * n * r) as f64, |k0, kb, split| {
        let sink = Sink::Panels { out: dwp.offset_rows(k0) };
        // SAFETY: k_len = r = k_cap of c; rows k0..k0+kb of the ΔW panels belong to this block,
        // and for_panels hands out disjoint panel ranges.
        for_panels(m.div_ceil(NR), split, |range| unsafe { (k.gemm_f32)(left.rows(k0, kb), &c, range, &sink) });
    });
    let dw = &*dw;
    let epi = Epilogue { scale: None, bias: adapter.bias(), accumulate: mode == Mode::Accumulate };
    let yp = y.as_ptr_mat();
    for_blocks(rows, T_BLOCK, 2.0 * (rows * n * m) as f64, |t0, tb, split| {
        with_scratch(Left::<f32>::len_for(tb, n), |xl| {
            let left = pack_rows(x.row_range(t0, tb), xl);
            let sink = Sink::Epilogue { out: yp.sub(t0, tb, 0, m), epi };
            // SAFETY: k_len = n = k_cap of ΔW; rows t0..t0+tb of y are this block's, and
            // for_panels hands out disjoint panel ranges.
            for_panels(m.div_ceil(NR), split, |range| unsafe { (k.gemm)(left, dw, range, &sink) });
        });
    });
}

/// The unfused peer: `h = x·Aᵀ` for all rows, then `h *= lambda_d`, then the up-projection.
pub(crate) fn unfused<T: Element>(
    layer: LayerProjections<'_, T>,
    adapter: &Adapter,
    x: MatRef<'_, T>,
    mut h: MatMut<'_, f32>,
    mut y: MatMut<'_, T>,
    mode: Mode,
) {
    let (rows, n, r, m) = (x.rows(), x.cols(), layer.rank(), layer.out_features());
    let mut owned = None;
    let packed = packed_or_owned(&layer, &mut owned);
    let hp = h.as_ptr_mat();
    for_blocks(rows, T_BLOCK, 2.0 * (rows * n * r) as f64, |t0, tb, split| {
        with_scratch(down_scratch(tb, n), |xl| {
            down(packed, x.row_range(t0, tb), xl, r, &Sink::F32 { out: hp.sub(t0, tb, 0, r), scale: None }, split);
        });
    });
    for t in 0..rows {
        for (v, d) in h.row_mut(t).expect("t < rows").iter_mut().zip(adapter.lambda_d()) {
            *v *= d;
        }
    }
    let epi = Epilogue { scale: Some(adapter.lambda_b()), bias: adapter.bias(), accumulate: mode == Mode::Accumulate };
    let (h, yp) = (h.as_ref(), y.as_ptr_mat());
    for_blocks(rows, T_BLOCK, 2.0 * (rows * r * m) as f64, |t0, tb, split| {
        with_scratch(up_scratch(tb, r), |hl| {
            up(packed, h.row_range(t0, tb), hl, m, &Sink::Epilogue { out: yp.sub(t0, tb, 0, m), epi }, split);
        });
    });
}
