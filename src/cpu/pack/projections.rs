//! The shared projections packed once per layout (`PackedProjections`), their transposes for the
//! backward (`TransposedProjections`), and a model's cache of both (`PackCache`).

use std::sync::OnceLock;

use super::bf16::{bf16_weight_bits, split_panels, split_weight_parts, tripled_bits};
use super::panels::Panels;
use super::NR;
use crate::cpu::kernels::Layout;
use crate::dtype::Element;
use crate::mat::MatRef;

/// Projection weights in one layout.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum WeightPanels<T> {
    /// [`Layout::Wide`]: A `[r, n_max]` as `r`-column panels over k = n, or B `[m_max, r]` as
    /// `m`-column panels over k = r.
    Wide(Panels<T>),
    /// [`Layout::Pairs`] and [`Layout::Tiles`]: bf16 weights as panels over k-pairs, each u32 =
    /// `(W[j][2p], W[j][2p + 1])`; [`Layout::Split`]: their split parts (see [`split_step`](super::bf16::split_step)).
    Pairs(Panels<u32>),
}

impl<T> WeightPanels<T> {
    fn bytes(&self) -> usize {
        match self {
            WeightPanels::Wide(p) => p.num_panels() * p.k_cap() * NR * std::mem::size_of::<T>(),
            WeightPanels::Pairs(p) => p.num_panels() * p.k_cap() * NR * 4,
        }
    }

    /// The [`Layout::Wide`] panels (drivers ask for the layout they packed).
    pub(crate) fn wide(&self) -> &Panels<T> {
        match self {
            WeightPanels::Wide(p) => p,
            WeightPanels::Pairs(_) => unreachable!("weights are packed in the layout of the kernels that read them"),
        }
    }

    /// The [`Layout::Pairs`] panels (drivers ask for the layout they packed).
    pub(crate) fn pairs(&self) -> &Panels<u32> {
        match self {
            WeightPanels::Pairs(p) => p,
            WeightPanels::Wide(_) => unreachable!("weights are packed in the layout of the kernels that read them"),
        }
    }
}

/// The shared projections packed in one layout: built once per model and layout, used by every
/// layer and thread.
#[derive(Clone, Debug, PartialEq)]
pub struct PackedProjections<T> {
    /// A `[r, n_max]` as `r`-column panels over k = n.
    pub(crate) down: WeightPanels<T>,
    /// B `[m_max, r]` as `m_max`-column panels over k = r.
    pub(crate) up: WeightPanels<T>,
}

impl<T> PackedProjections<T> {
    /// Bytes the packed weights take.
    pub(crate) fn bytes(&self) -> usize {
        self.down.bytes() + self.up.bytes()
    }
}

/// Packs A `[r, n]` and B `[m, r]` in `layout`.
pub(crate) fn pack_projections<T: Element>(a: MatRef<'_, T>, b: MatRef<'_, T>, layout: Layout) -> PackedProjections<T> {
    let pack = |w: MatRef<'_, T>| {
        let k = w.cols();
        let bits = |j: usize, c: usize| if c < k { bf16_weight_bits(w.row_unchecked(j)[c]) } else { 0 };
        match layout {
            Layout::Pairs | Layout::Tiles => WeightPanels::Pairs(Panels::from_fn(w.rows(), k.div_ceil(2), |j, p| {
                bits(j, 2 * p) | (bits(j, 2 * p + 1) << 16)
            })),
            Layout::Split => WeightPanels::Pairs(split_panels(w.rows(), k, |j, c| {
                split_weight_parts(w.row_unchecked(j)[c].to_f32())
            })),
            Layout::Wide => WeightPanels::Wide(Panels::from_fn(w.rows(), k, |j, c| w.row_unchecked(j)[c])),
        }
    };
    PackedProjections { down: pack(a), up: pack(b) }
}

/// The projections transposed, for the backward's products: Aᵀ as `n_max`-column panels over
/// k = r (`dx = (g ⊙ lambda_d)·A`), and Bᵀ as `r`-column panels over k = m_max
/// (`g = (dy ⊙ lambda_b)·B`).
#[derive(Clone, Debug, PartialEq)]
pub struct TransposedProjections<T> {
    pub(crate) a_t: Panels<T>,
    pub(crate) b_t: Panels<T>,
    /// The same as bf16 k-pair panels (AMX tiles), made on first use: Aᵀ over pairs of r, Bᵀ over
    /// pairs of m_max.
    pairs: OnceLock<(Panels<u32>, Panels<u32>)>,
    /// Aᵀ's bf16 pairs with each step three times ([`tripled_bits`]), for the merge on split tiles,
    /// made on first use.
    tripled_a: OnceLock<Panels<u32>>,
    /// Aᵀ and Bᵀ as [`Layout::Split`] weights, for the f16 backward on split tiles, made on first
    /// use.
    split: OnceLock<(Panels<u32>, Panels<u32>)>,
}

impl<T: Element> TransposedProjections<T> {
    /// Packs Aᵀ and Bᵀ of A `[r, n]` and B `[m, r]`.
    pub(crate) fn pack(a: MatRef<'_, T>, b: MatRef<'_, T>) -> Self {
        let a_t = Panels::from_fn(a.cols(), a.rows(), |col, j| a.row_unchecked(j)[col]);
        let b_t = Panels::from_fn(b.cols(), b.rows(), |col, i| b.row_unchecked(i)[col]);
        Self { a_t, b_t, pairs: OnceLock::new(), tripled_a: OnceLock::new(), split: OnceLock::new() }
    }

    /// Aᵀ as [`split_panels`] of [`tripled_bits`] (bf16 only), for the merge's split left operand,
    /// packed now if needed.
    pub(crate) fn tripled_a(&self) -> &Panels<u32> {
        self.tripled_a.get_or_init(|| {
            let a_t = &self.a_t;
            split_panels(a_t.cols(), a_t.k_cap(), |c, kk| tripled_bits(bf16_weight_bits(a_t.at(c, kk))))
        })
    }

    /// Aᵀ and Bᵀ as k-pair panels, for [`Layout::Tiles`] (bf16 only: an element's bits are the top
    /// half of its f32 value), packed now if needed.
    pub(crate) fn pairs(&self) -> (&Panels<u32>, &Panels<u32>) {
        let (a, b) = self.pairs.get_or_init(|| {
            let pairs = |w: &Panels<T>| {
                let k = w.k_cap();
                let bits = |c: usize, kk: usize| if kk < k { bf16_weight_bits(w.at(c, kk)) } else { 0 };
                Panels::from_fn(w.cols(), k.div_ceil(2), |c, p| bits(c, 2 * p) | (bits(c, 2 * p + 1) << 16))
            };
            (pairs(&self.a_t), pairs(&self.b_t))
        });
        (a, b)
    }

    /// Aᵀ and Bᵀ as [`Layout::Split`] weights (each value split into bf16 parts, [`split_panels`]
    /// of `split_weight_parts`), packed now if needed.
    pub(crate) fn split(&self) -> (&Panels<u32>, &Panels<u32>) {
        let (a, b) = self.split.get_or_init(|| {
            let split =
                |w: &Panels<T>| split_panels(w.cols(), w.k_cap(), |c, kk| split_weight_parts(w.at(c, kk).to_f32()));
            (split(&self.a_t), split(&self.b_t))
        });
        (a, b)
    }

    fn bytes(&self) -> usize {
        let words = |p: &Panels<u32>| p.num_panels() * p.k_cap() * NR;
        let wide = (self.a_t.num_panels() * self.a_t.k_cap() + self.b_t.num_panels() * self.b_t.k_cap()) * NR;
        let pairs = self.pairs.get().map_or(0, |(a, b)| words(a) + words(b));
        let tripled = self.tripled_a.get().map_or(0, words);
        let split = self.split.get().map_or(0, |(a, b)| words(a) + words(b));
        wide * size_of::<T>() + (pairs + tripled + split) * 4
    }
}

/// A model's packed projections, one slot per layout, each packed on first use (a process may run
/// kernels of several tiers, see `kernels::with_isa`), and their transposes for the backward.
#[derive(Clone, Debug, Default)]
pub struct PackCache<T> {
    slots: [OnceLock<PackedProjections<T>>; Layout::ALL.len()],
    transposed: OnceLock<TransposedProjections<T>>,
}

impl<T: Element> PackCache<T> {
    /// The projections A `[r, n_max]` and B `[m_max, r]` packed in `layout`, packed now if needed.
    pub(crate) fn get(&self, layout: Layout, a: MatRef<'_, T>, b: MatRef<'_, T>) -> &PackedProjections<T> {
        self.slots[layout.index()].get_or_init(|| pack_projections(a, b, layout))
    }

    /// The transposes of A `[r, n_max]` and B `[m_max, r]`, packed now if needed.
    pub(crate) fn transposed(&self, a: MatRef<'_, T>, b: MatRef<'_, T>) -> &TransposedProjections<T> {
        self.transposed.get_or_init(|| TransposedProjections::pack(a, b))
    }

    /// Bytes of every layout packed so far.
    pub(crate) fn bytes(&self) -> usize {
        let packed: usize = self.slots.iter().filter_map(OnceLock::get).map(PackedProjections::bytes).sum();
        packed + self.transposed.get().map_or(0, TransposedProjections::bytes)
    }
}
