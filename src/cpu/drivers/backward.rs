//! The fused backward pass. With `h = x·Aᵀ`, `u = lambda_d ⊙ h`, `v = u·Bᵀ` and `dy = dL/dy`:
//!
//! ```text
//! dlambda_b = Σ_t dy ⊙ v      g = (dy ⊙ lambda_b)·B      dlambda_d = Σ_t g ⊙ h
//! dbias     = Σ_t dy          dx (+)= (g ⊙ lambda_d)·A
//! ```
//!
//! Per block of rows (the tier's `block_rows`: [`BLOCK_ROWS`](crate::BLOCK_ROWS), 256 on `amx`):
//! `h` (recomputed, or the training forward's), then `v` straight into a column-sum sink (never
//! stored), `g` into the block's scratch, the λ column sums, and `dx`
//! through the epilogue sink. Each block's column sums are a partial result, added in block order
//! (`parallel::reduce_in_order`): gradients are bitwise identical for any number of threads.
//!
//! The products run in the layout the tier runs the call's forward in. In [`Layout::Wide`] (f32
//! and f16 on the AVX tiers, every dtype on `portable`) on the f32-FMA kernels (`u`, `dy ⊙
//! lambda_b` and `g ⊙ lambda_d` stay in f32). In [`Layout::Pairs`] (bf16 on `avx512bf16`) on the
//! `vdpbf16ps` kernels and in [`Layout::Tiles`] (bf16 on `amx`) on AMX tiles, their left operands
//! rounded to bf16 (as PEFT's autograd rounds them in bf16). In [`Layout::Split`] (f16 on `amx`,
//! from its `wide_below_rows`) on the same tiles with every operand split into bf16 parts, as the
//! f16 forward runs (the left operands the same f32 values the FMA kernels multiply, split to 16
//! bits).

use super::{row_epilogues, RowScales, Scales, Weights};
use crate::cpu::kernels::{Kernels, Layout, PairGemmFn, TileGemmFn};
use crate::cpu::pack::{
    pack_pairs, pack_pairs_scaled, pack_projections, pack_row_pairs, pack_row_pairs_scaled, pack_row_split,
    pack_row_split_scaled, pack_rows, pack_rows_scaled, split_pairs, Bits, Left, PackedProjections, Panels, RowPairs,
    TransposedProjections, NR,
};
use crate::cpu::parallel::{for_blocks, for_panels, plan_blocks, reduce_in_order, with_scratch, Work};
use crate::cpu::sink::{Epilogue, RowEpilogues, Sink};
use crate::dtype::Element;
use crate::mat::{MatMut, MatPtr, MatRef};

/// Where the backward writes: the λ gradients (and the bias's, when asked for) in f32, and the
/// adapter's part of `dx` in the activation dtype (when asked for); added to their contents when
/// `accumulate`, else written over them. For a bank, the λ and bias gradients hold one row per
/// adapter (`[K, r]`, `[K, m]`), each summed over that adapter's rows only.
pub(crate) struct Grads<'a, T> {
    pub lambda_d: &'a mut [f32],
    pub lambda_b: &'a mut [f32],
    pub bias: Option<&'a mut [f32]>,
    pub x: Option<MatMut<'a, T>>,
    pub accumulate: bool,
}

/// The backward's projections: A and B packed for the f32-FMA kernels, and their transposes.
pub(crate) struct BackwardWeights<'a, T> {
    pub w: Weights<'a, T>,
    pub transposed: Option<&'a TransposedProjections<T>>,
}

impl<'a, T: Element> BackwardWeights<'a, T> {
    /// The packed projections and their transposes: the model's copies, or packed now into the
    /// `owned` slots.
    fn packed<'o>(
        &self,
        owned: &'o mut Option<PackedProjections<T>>,
        owned_t: &'o mut Option<TransposedProjections<T>>,
    ) -> (&'o PackedProjections<T>, &'o TransposedProjections<T>)
    where
        'a: 'o,
    {
        let packed = match self.w.packed {
            Some(p) => p,
            None => owned.insert(pack_projections(self.w.a, self.w.b, self.w.layout)),
        };
        let transposed = match self.transposed {
            Some(t) => t,
            None => owned_t.insert(TransposedProjections::pack(self.w.a, self.w.b)),
        };
        (packed, transposed)
    }
}

/// The layout the backward of a call of `rows` rows packs the projections in for `kern`: the one
/// its forward runs in ([`Layout::Pairs`]: bf16 on `avx512bf16`; [`Layout::Tiles`]: bf16 on
/// `amx`; [`Layout::Split`]: f16 on `amx` from its `wide_below_rows`; else [`Layout::Wide`], the
/// f32-FMA kernels).
pub(crate) fn layout<T>(kern: &Kernels<T>, rows: usize) -> Layout {
    kern.facts().layout_for(rows)
}

/// The backward pass (shapes validated by the front end): gradients into `grads`. `saved_h` is the
/// training forward's `h` (`[T, r]` f32), or `None` to recompute it.
pub(crate) fn backward<T: Element>(
    kern: &Kernels<T>,
    bw: BackwardWeights<'_, T>,
    s: RowScales<'_>,
    x: MatRef<'_, T>,
    dy: MatRef<'_, T>,
    saved_h: Option<MatRef<'_, f32>>,
    grads: Grads<'_, T>,
) {
    let Grads { lambda_d, lambda_b, bias, x: dx, accumulate } = grads;
    let (rows, n, r, m) = (x.rows(), x.cols(), bw.w.a.rows(), bw.w.b.rows());
    let (mut owned, mut owned_t) = (None, None);
    let (packed, transposed) = bw.packed(&mut owned, &mut owned_t);
    let mut dx = dx;
    let dxp = dx.as_mut().map(MatMut::as_ptr_mat);
    let want_bias = bias.is_some();
    // The column sums are kept per slot: one for a single adapter, else one per adapter that has
    // rows in this call (so that they cost what the batch uses, not the whole bank).
    let slots = Slots::of(&s);
    let count = slots.adapters.len();
    // The column sums of one block: dlambda_d [slots, r], dlambda_b [slots, m], dbias [slots, m].
    let mut sums = vec![0.0f32; count * (r + 2 * m)];
    // Blocks of the tier's size (fixed per tier: the blocks' partial sums are added in block order,
    // so the block size, unlike the forward's, must not follow the thread count).
    let block = kern.facts().block_rows;
    let blocks = rows.div_ceil(block);
    // v and g sweep B (2·T·r·m each), dx sweeps A (2·T·r·n), and so does h when it is recomputed.
    let sweeps_of_a = if saved_h.is_some() { 1 } else { 2 };
    // Weight bytes: B once, and A's once per sweep. g reads B's transposed copy, a second r·m,
    // but counting it split T = 1 calls of 1.0-1.6 MB (f32 n = m = 1024, r = 128; bf16 r = 256)
    // whose training step then took 1.64-1.76x the time (the backward alone 0.87-0.89x; old and
    // new binaries alternated, `vera bench --backward`, 7-9 rounds), presumably as a backward that
    // follows a one-thread training forward hands its work to threads gone to sleep.
    let work =
        Work::new(2.0 * (rows * r * (2 * m + sweeps_of_a * n)) as f64, r * (m + sweeps_of_a * n) * size_of::<T>());
    let plan = plan_blocks(blocks, work);
    let row_slots = slots.of_row.as_deref();
    let ctx = Block {
        kern,
        layout: bw.w.layout,
        packed,
        transposed,
        s,
        row_slots,
        count,
        r,
        x,
        dy,
        saved_h,
        dxp,
        want_bias,
        accumulate,
        split: plan.split,
    };
    reduce_in_order(blocks, plan.width, &mut sums, |b, part| {
        let t0 = b * block;
        ctx.run(t0, block.min(rows - t0), part);
    });
    let (dld, rest) = sums.split_at(count * r);
    let (dlb, dbias) = rest.split_at(count * m);
    // Slot j's sums go to its adapter's row of each gradient; under overwrite, an adapter without
    // rows in this call gets zeros (its gradient is zero), under accumulate it is left as it is.
    let apply = |out: &mut [f32], sum: &[f32], width: usize| {
        if !accumulate {
            out.fill(0.0);
        }
        for (&k, sum) in slots.adapters.iter().zip(sum.chunks(width.max(1))) {
            for (o, v) in out[k * width..(k + 1) * width].iter_mut().zip(sum) {
                *o = if accumulate { *o + v } else { *v };
            }
        }
    };
    apply(lambda_d, dld, r);
    apply(lambda_b, dlb, m);
    if let Some(bias) = bias {
        apply(bias, dbias, m);
    }
}

/// Which adapters a call's column sums are kept for.
struct Slots {
    /// The adapter of each slot, ascending.
    adapters: Vec<usize>,
    /// Each row's slot (negative: no adapter); `None` when every row has the one adapter (slot 0).
    of_row: Option<Vec<i32>>,
}

impl Slots {
    fn of(s: &RowScales<'_>) -> Self {
        match s {
            RowScales::One(_) => Slots { adapters: vec![0], of_row: None },
            RowScales::Bank(b) => {
                let k = b.has_bias.len();
                let mut slot_of = vec![-1i32; k];
                for &id in b.rows {
                    if let Ok(id) = usize::try_from(id) {
                        slot_of[id] = 0;
                    }
                }
                let adapters: Vec<usize> = (0..k).filter(|&a| slot_of[a] == 0).collect();
                for (slot, &a) in adapters.iter().enumerate() {
                    slot_of[a] = i32::try_from(slot).expect("slots <= rows of a call fit i32");
                }
                let of_row = b.rows.iter().map(|&id| usize::try_from(id).map_or(-1, |id| slot_of[id])).collect();
                Slots { adapters, of_row: Some(of_row) }
            }
        }
    }
}

/// The projections a backward product multiplies by.
#[derive(Clone, Copy)]
enum Weight {
    /// B, over k = r (`v = u·Bᵀ`).
    B,
    /// Bᵀ, over k = m (`g = (dy ⊙ lambda_b)·B`).
    BT,
    /// Aᵀ, over k = r (`dx = (g ⊙ lambda_d)·A`).
    AT,
}

/// The unfused peer of [`backward`] (`baseline::unfused_backward`), for one adapter and the
/// training forward's `h`: the same products on the same kernels, each over every row before the
/// next, with `v = (lambda_d ⊙ h)·Bᵀ` (`[T, m]`) and `g` (`[T, r]`) materialised in `buffer` (f32,
/// grown to `T·(m + r)`) as a framework's autograd keeps them, and the column sums made row by row
/// from them. The gradients are the fused pass's up to the order of the sums (fixed here too: the
/// same bits for any number of threads).
#[allow(clippy::too_many_arguments)]
pub(crate) fn unfused_backward<T: Element>(
    kern: &Kernels<T>,
    bw: BackwardWeights<'_, T>,
    s: Scales<'_>,
    x: MatRef<'_, T>,
    dy: MatRef<'_, T>,
    h: MatRef<'_, f32>,
    buffer: &mut Vec<f32>,
    grads: Grads<'_, T>,
) {
    let Grads { lambda_d, lambda_b, bias, x: dx, accumulate } = grads;
    let (rows, n, r, m) = (x.rows(), x.cols(), bw.w.a.rows(), bw.w.b.rows());
    let (mut owned, mut owned_t) = (None, None);
    let (packed, transposed) = bw.packed(&mut owned, &mut owned_t);
    buffer.resize(rows * (m + r), 0.0);
    let (v, g) = buffer.split_at_mut(rows * m);
    let (mut v, mut g) =
        (MatMut::from_slice(v, rows, m).expect("sized T·m"), MatMut::from_slice(g, rows, r).expect("sized T·r"));
    let (vp, gp) = (v.as_ptr_mat(), g.as_ptr_mat());
    let mut dx = dx;
    let ctx = Block {
        kern,
        layout: bw.w.layout,
        packed,
        transposed,
        s: RowScales::One(s),
        row_slots: None,
        count: 1,
        r,
        x,
        dy,
        saved_h: Some(h),
        dxp: dx.as_mut().map(MatMut::as_ptr_mat),
        want_bias: bias.is_some(),
        accumulate,
        split: false,
    };
    let block = kern.facts().block_rows;
    let k_max = n.max(m).max(r);
    // v = (lambda_d ⊙ h)·Bᵀ for every row, then dlambda_b = Σ_t dy ⊙ v and dbias = Σ_t dy.
    ctx.pass(block, k_max, h, s.lambda_d, Weight::B, m, &|t0, tb| Sink::F32 { out: vp.sub(t0, tb, 0, m), scale: None });
    let (mut dlb, mut dbias, mut dy_row) = (vec![0.0f32; m], vec![0.0f32; m], vec![0.0f32; m]);
    for t in 0..rows {
        T::widen_slice(dy.row_unchecked(t), &mut dy_row);
        for (((sb, sd), d), vv) in dlb.iter_mut().zip(&mut dbias).zip(&dy_row).zip(v.as_ref().row_unchecked(t)) {
            *sb += d * vv;
            *sd += d;
        }
    }
    // g = (dy ⊙ lambda_b)·B for every row, then dlambda_d = Σ_t g ⊙ h.
    ctx.pass(block, k_max, dy, s.lambda_b, Weight::BT, r, &|t0, tb| Sink::F32 {
        out: gp.sub(t0, tb, 0, r),
        scale: None,
    });
    let mut dld = vec![0.0f32; r];
    for t in 0..rows {
        for ((sum, gv), hv) in dld.iter_mut().zip(g.as_ref().row_unchecked(t)).zip(h.row_unchecked(t)) {
            *sum += gv * hv;
        }
    }
    // dx (+)= (g ⊙ lambda_d)·A for every row.
    if let Some(dxp) = ctx.dxp {
        let epi = Epilogue { scale: None, bias: None, accumulate };
        let sink = |t0, tb| Sink::Epilogue { out: dxp.sub(t0, tb, 0, n), epi };
        ctx.pass(block, k_max, g.as_ref(), s.lambda_d, Weight::AT, n, &sink);
    }
    store_sums(lambda_d, &dld, accumulate);
    store_sums(lambda_b, &dlb, accumulate);
    if let Some(bias) = bias {
        store_sums(bias, &dbias, accumulate);
    }
}

/// A gradient's sums into its buffer: added to its contents when `accumulate`, else written over
/// them.
pub(crate) fn store_sums(out: &mut [f32], sums: &[f32], accumulate: bool) {
    for (o, v) in out.iter_mut().zip(sums) {
        *o = if accumulate { *o + v } else { *v };
    }
}

/// f32 elements of scratch a block of `tb` rows needs for the left operand of a backward product
/// over at most `k_max`, packed in `layout`.
fn left_len(layout: Layout, tb: usize, k_max: usize) -> usize {
    match layout {
        Layout::Split => RowPairs::len_for(tb, split_pairs(k_max)),
        _ => Left::<f32>::len_for(tb, k_max).max(RowPairs::len_for(tb, k_max.div_ceil(2))),
    }
}

/// What every block of one backward call shares.
#[derive(Clone, Copy)]
struct Block<'a, T: 'static> {
    kern: &'a Kernels<T>,
    /// The layout the projections are packed in.
    layout: Layout,
    packed: &'a PackedProjections<T>,
    transposed: &'a TransposedProjections<T>,
    s: RowScales<'a>,
    /// Each row's slot of the column sums (see [`Slots`]), or `None`: every row slot 0.
    row_slots: Option<&'a [i32]>,
    /// Slots of the column sums.
    count: usize,
    /// The rank.
    r: usize,
    x: MatRef<'a, T>,
    dy: MatRef<'a, T>,
    saved_h: Option<MatRef<'a, f32>>,
    dxp: Option<MatPtr<T>>,
    want_bias: bool,
    accumulate: bool,
    split: bool,
}

impl<T: Element> Block<'_, T> {
    /// The tile kernels, when the projections are packed for them ([`layout`]).
    fn tiles(&self) -> Option<TileGemmFn<T>> {
        self.kern.gemm_tiles.filter(|_| matches!(self.layout, Layout::Tiles | Layout::Split))
    }

    /// The `vdpbf16ps` kernels, when the projections are packed for them ([`Layout::Pairs`]).
    fn pairs(&self) -> Option<PairGemmFn<T>> {
        self.kern.gemm_pairs.filter(|_| self.layout == Layout::Pairs)
    }

    /// One pass of `sink <- (src ⊙ scale)·which` over every row of `src`, in blocks of `block`
    /// rows (the unfused backward's products; `k_max` bounds every product's k).
    #[allow(clippy::too_many_arguments)]
    fn pass<E: Element>(
        &self,
        block: usize,
        k_max: usize,
        src: MatRef<'_, E>,
        scale: &[f32],
        which: Weight,
        cols: usize,
        sink: &(dyn Fn(usize, usize) -> Sink<'static, T> + Sync),
    ) {
        let (rows, k) = (src.rows(), src.cols());
        let work = Work::new(2.0 * (rows * k * cols) as f64, k * cols * size_of::<T>());
        for_blocks(rows, block, work, |t0, tb, split| {
            with_scratch(left_len(self.layout, tb, k_max), |left| {
                let c = Block { split, ..*self };
                c.scaled_product(src.row_range(t0, tb), |_| Some(scale), left, which, cols, &sink(t0, tb));
            });
        });
    }

    /// Rows `t0..t0 + tb`: their `dx` rows, and their column sums into `part`
    /// (`[slots, r] | [slots, m] | [slots, m]`).
    fn run(&self, t0: usize, tb: usize, part: &mut [f32]) {
        let (n, r, m, count) = (self.x.cols(), self.r, self.dy.cols(), self.count);
        part.fill(0.0);
        let (dld, rest) = part.split_at_mut(count * r);
        let (dlb, dbias) = rest.split_at_mut(count * m);
        let (x, dy) = (self.x.row_range(t0, tb), self.dy.row_range(t0, tb));
        // Row t's adapter vectors, and its slot of the sums (None: no adapter).
        let scales = |t: usize| self.s.row(t0 + t);
        let slot = |t: usize| match self.row_slots {
            Some(slots) => usize::try_from(slots[t0 + t]).ok(),
            None => Some(0),
        };
        let h_len = if self.saved_h.is_some() { 0 } else { tb * r };
        let left_len = left_len(self.layout, tb, n.max(m).max(r));
        with_scratch(h_len + tb * r + left_len, |buf| {
            let (h_buf, rest) = buf.split_at_mut(h_len);
            let (g, left) = rest.split_at_mut(tb * r);
            // h = x·Aᵀ, unless the training forward saved it.
            let h = match self.saved_h {
                Some(h) => h.row_range(t0, tb),
                None => {
                    let mut h = MatMut::from_slice(h_buf, tb, r).expect("scratch sized tb * r");
                    let sink = Sink::F32 { out: h.as_ptr_mat(), scale: None };
                    let out = bytemuck::cast_slice_mut(left);
                    match (self.tiles(), self.pairs(), self.layout) {
                        (Some(tiles), _, Layout::Split) => {
                            let xl = pack_row_split(x, out);
                            // The split operands are whole tile steps of pairs: 2·k_len elements.
                            self.tile_product(tiles, xl, 2 * xl.k_len, self.packed.down.pairs(), r, &sink);
                        }
                        (Some(tiles), _, _) => {
                            let xl = pack_row_pairs(Bits(x, std::marker::PhantomData), out);
                            self.tile_product(tiles, xl, n, self.packed.down.pairs(), r, &sink);
                        }
                        (None, Some(pairs), _) => {
                            let xl = pack_pairs(Bits(x, std::marker::PhantomData), out);
                            self.pair_product(pairs, xl, n, self.packed.down.pairs(), r, &sink);
                        }
                        (None, None, _) => self.product(pack_rows(x, left), self.packed.down.wide(), r, &sink),
                    }
                    MatRef::from_slice(h_buf, tb, r).expect("scratch sized tb * r")
                }
            };
            // dlambda_b = Σ_t dy ⊙ v with v = (lambda_d ⊙ h)·Bᵀ, summed as each tile of v is made.
            let mut dlb = MatMut::from_slice(dlb, count, m).expect("slots x m sums");
            let slots = self.row_slots.map(|s| &s[t0..t0 + tb]);
            let sink = Sink::ColumnDot { other: dy, sums: dlb.as_ptr_mat(), slots };
            let ld = |t: usize| scales(t).map(|s| s.lambda_d);
            let lb = |t: usize| scales(t).map(|s| s.lambda_b);
            self.scaled_product(h, ld, left, Weight::B, m, &sink);
            // g = (dy ⊙ lambda_b)·B, into the block's scratch.
            let mut gm = MatMut::from_slice(g, tb, r).expect("scratch sized tb * r");
            let sink = Sink::F32 { out: gm.as_ptr_mat(), scale: None };
            self.scaled_product(dy, lb, left, Weight::BT, r, &sink);
            let g = MatRef::from_slice(g, tb, r).expect("scratch sized tb * r");
            // dlambda_d = Σ_t g ⊙ h and dbias = Σ_t dy, rows in order, each into its slot (a row of
            // dy widened at once: element by element, f16's conversion was a call per element).
            let mut dy_row = vec![0.0f32; if self.want_bias { m } else { 0 }];
            for t in 0..tb {
                let Some(j) = slot(t) else { continue };
                let dld = &mut dld[j * r..(j + 1) * r];
                for ((s, gv), hv) in dld.iter_mut().zip(g.row_unchecked(t)).zip(h.row_unchecked(t)) {
                    *s += gv * hv;
                }
                if self.want_bias {
                    T::widen_slice(dy.row_unchecked(t), &mut dy_row);
                    for (s, d) in dbias[j * m..(j + 1) * m].iter_mut().zip(&dy_row) {
                        *s += d;
                    }
                }
            }
            // dx (+)= (g ⊙ lambda_d)·A.
            if let Some(dxp) = self.dxp {
                let out = dxp.sub(t0, tb, 0, n);
                let (accumulate, resolved);
                accumulate = self.accumulate;
                let sink = match self.s {
                    RowScales::One(_) => {
                        Sink::Epilogue { out, epi: Epilogue { scale: None, bias: None, accumulate: self.accumulate } }
                    }
                    RowScales::Bank(b) => {
                        resolved = row_epilogues(b, (t0, tb), None, false, accumulate);
                        Sink::RowEpilogue { out, rows: RowEpilogues { rows: &resolved[..tb], dst: None, accumulate } }
                    }
                };
                self.scaled_product(g, ld, left, Weight::AT, n, &sink);
            }
        });
    }

    /// `sink <- (src ⊙ scale(row))·weights` over the first `cols` columns, in the call's layout: on
    /// tiles, the left operand rounded to bf16 (`Tiles`) or split into bf16 parts (`Split`), on the
    /// `vdpbf16ps` kernels rounded to bf16 (`Pairs`), or on the f32-FMA kernels (`Wide`), against
    /// `which` projections packed in that layout (the transposed ones packed on first use).
    fn scaled_product<'s, E: Element>(
        &self,
        src: MatRef<'_, E>,
        scale: impl Fn(usize) -> Option<&'s [f32]>,
        left: &mut [f32],
        which: Weight,
        cols: usize,
        sink: &Sink<'_, T>,
    ) {
        if let Some(pairs) = self.pairs() {
            let packed = pack_pairs_scaled(src, scale, bytemuck::cast_slice_mut(left));
            let weights = match which {
                Weight::B => self.packed.up.pairs(),
                Weight::BT => self.transposed.pairs().1,
                Weight::AT => self.transposed.pairs().0,
            };
            self.pair_product(pairs, packed, src.cols(), weights, cols, sink);
            return;
        }
        match self.tiles() {
            Some(tiles) => {
                let split = self.layout == Layout::Split;
                let out = bytemuck::cast_slice_mut(left);
                // The split operands are whole tile steps of pairs: 2·k_len elements, no tail.
                let (packed, k) = if split {
                    let packed = pack_row_split_scaled(src, scale, out);
                    (packed, 2 * packed.k_len)
                } else {
                    (pack_row_pairs_scaled(src, scale, out), src.cols())
                };
                let transposed = || if split { self.transposed.split() } else { self.transposed.pairs() };
                let weights = match which {
                    Weight::B => self.packed.up.pairs(),
                    Weight::BT => transposed().1,
                    Weight::AT => transposed().0,
                };
                self.tile_product(tiles, packed, k, weights, cols, sink);
            }
            None => {
                let weights = match which {
                    Weight::B => self.packed.up.wide(),
                    Weight::BT => &self.transposed.b_t,
                    Weight::AT => &self.transposed.a_t,
                };
                self.product(pack_rows_scaled(src, scale, left), weights, cols, sink);
            }
        }
    }

    /// `sink <- left · right` on tiles over the first `cols` columns of `right` (`k` elements of
    /// k-pairs), split over the threads' panels when the plan says so.
    fn tile_product(
        &self,
        tiles: TileGemmFn<T>,
        left: RowPairs<'_>,
        k: usize,
        right: &Panels<u32>,
        cols: usize,
        sink: &Sink<'_, T>,
    ) {
        // SAFETY: the tile kernels exist only where the tier is usable; left.k_len = ceil(k / 2) <=
        // right.k_cap (k is n <= n_max, r, or m <= m_max); the sink's rows are this block's, and
        // for_panels hands out disjoint panel ranges.
        for_panels(cols.div_ceil(NR), self.split, |range| unsafe { tiles(left, k, right, range, sink) });
    }

    /// `sink <- left · right` with `vdpbf16ps` over the first `cols` columns of `right` (`k`
    /// elements of k-pairs), split over the threads' panels when the plan says so.
    fn pair_product(
        &self,
        pairs: PairGemmFn<T>,
        left: Left<'_, u32>,
        k: usize,
        right: &Panels<u32>,
        cols: usize,
        sink: &Sink<'_, T>,
    ) {
        // SAFETY: the pair kernels exist only where the tier is usable; left.k_len = ceil(k / 2)
        // <= right.k_cap (k is n <= n_max, r, or m <= m_max); the sink's rows are this block's, and
        // for_panels hands out disjoint panel ranges.
        for_panels(cols.div_ceil(NR), self.split, |range| unsafe { pairs(left, k, right, range, sink) });
    }

    /// `sink <- left · right` over the first `cols` columns of `right`, split over the threads'
    /// panels when the plan says so.
    fn product(&self, left: Left<'_, f32>, right: &Panels<T>, cols: usize, sink: &Sink<'_, T>) {
        let gemm = self.kern.gemm;
        // SAFETY: left.k_len <= right.k_cap (k is n <= n_max, r, or m <= m_max); the sink's rows
        // are this block's, and for_panels hands out disjoint panel ranges.
        for_panels(cols.div_ceil(NR), self.split, |range| unsafe { gemm(left, right, range, sink) });
    }
}
