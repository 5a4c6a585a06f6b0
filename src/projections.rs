//! The frozen projections A `[r, n_max]` and B `[m_max, r]` shared by every layer of a model.

use crate::alloc::{self, product as checked_len};
use crate::cpu::drivers::Weights;
use crate::cpu::pack::{PackCache, TransposedProjections};
use crate::cpu::Layout;
use crate::dtype::Element;
use crate::error::{Error, Result};
use crate::mat::MatRef;
use crate::rng::TorchCpuGenerator;

/// The shared VeRA projections A `[r, n_max]` and B `[m_max, r]`, row-major and contiguous.
///
/// A layer with `n` inputs and `m` outputs uses `A[:, :n]` and `B[:m, :]` ([`Projections::slice`]);
/// the slices are strided views, never copies.
///
/// The first CPU call on a layer of these projections packs A and B into the kernels' panel layout,
/// once for the whole model (and once per layout, when several tiers run in one process): every
/// layer and every thread then reads the same packed copy.
#[derive(Clone)]
pub struct Projections<T> {
    a: Vec<T>,
    b: Vec<T>,
    r: usize,
    n_max: usize,
    m_max: usize,
    packed: PackCache<T>,
}

impl<T: Element> PartialEq for Projections<T> {
    /// Equal when the dimensions and every element of A and B are (packing is a cache).
    fn eq(&self, other: &Self) -> bool {
        (self.r, self.n_max, self.m_max) == (other.r, other.n_max, other.m_max)
            && self.a == other.a
            && self.b == other.b
    }
}

impl<T: Element> std::fmt::Debug for Projections<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Projections")
            .field("dtype", &T::DTYPE)
            .field("r", &self.r)
            .field("n_max", &self.n_max)
            .field("m_max", &self.m_max)
            .field("packed_bytes", &self.packed.bytes())
            .finish()
    }
}

impl<T: Element> Projections<T> {
    /// Generates the projections exactly as HuggingFace PEFT does for `projection_prng_key = seed`.
    ///
    /// PEFT draws A, then B, from one `torch.Generator("cpu").manual_seed(seed)` with
    /// Kaiming-uniform bounds `sqrt(6 / fan_in)` (fan_in = `n_max` for A, `r` for B), in f32. The
    /// f32 values are then rounded to `T` (PEFT casts the slices to the activation dtype). For
    /// `T = f32` the result equals the `vera_A` / `vera_B` PEFT saves, bit for bit.
    ///
    /// `n_max` / `m_max` are the largest in/out features of the adapted layers.
    pub fn from_seed(seed: u64, r: usize, n_max: usize, m_max: usize) -> Result<Self> {
        if r == 0 {
            return Err(Error::ZeroRank);
        }
        // Sizes typed by a person (`--n-max`): a typo must be an `Err`, not an aborted process.
        let mut a = alloc::filled("A = [r, n_max]", checked_len("A = [r, n_max]", r, n_max)?, 0.0f32)?;
        let mut b = alloc::filled("B = [m_max, r]", checked_len("B = [m_max, r]", m_max, r)?, 0.0f32)?;
        let mut g = TorchCpuGenerator::manual_seed(seed);
        let bound_a = (6.0 / n_max as f64).sqrt();
        let bound_b = (6.0 / r as f64).sqrt();
        g.fill_uniform_f32(&mut a, -bound_a, bound_a);
        g.fill_uniform_f32(&mut b, -bound_b, bound_b);
        // f32 → f32 reuses the buffers (in-place collect); other dtypes need new ones.
        let (a, b) = if T::DTYPE == crate::DType::F32 {
            (a.into_iter().map(T::from_f32).collect(), b.into_iter().map(T::from_f32).collect())
        } else {
            (alloc::map("A = [r, n_max]", &a, T::from_f32)?, alloc::map("B = [m_max, r]", &b, T::from_f32)?)
        };
        Ok(Self { a, b, r, n_max, m_max, packed: PackCache::default() })
    }

    /// Takes A `[r, n_max]` and B `[m_max, r]` as row-major arrays.
    ///
    /// Errors: [`Error::ZeroRank`], [`Error::SizeOverflow`], or [`Error::LengthMismatch`] when an
    /// array's length is not the product of its dimensions.
    pub fn from_arrays(a: Vec<T>, b: Vec<T>, r: usize, n_max: usize, m_max: usize) -> Result<Self> {
        if r == 0 {
            return Err(Error::ZeroRank);
        }
        let a_len = checked_len("A = [r, n_max]", r, n_max)?;
        let b_len = checked_len("B = [m_max, r]", m_max, r)?;
        if a.len() != a_len {
            return Err(Error::LengthMismatch { what: "A = [r, n_max]", expected: a_len, actual: a.len() });
        }
        if b.len() != b_len {
            return Err(Error::LengthMismatch { what: "B = [m_max, r]", expected: b_len, actual: b.len() });
        }
        Ok(Self { a, b, r, n_max, m_max, packed: PackCache::default() })
    }

    /// The rank `r`.
    pub fn rank(&self) -> usize {
        self.r
    }

    /// The largest in_features covered (columns of A).
    pub fn n_max(&self) -> usize {
        self.n_max
    }

    /// The largest out_features covered (rows of B).
    pub fn m_max(&self) -> usize {
        self.m_max
    }

    /// All of A, `[r, n_max]`.
    pub fn a(&self) -> MatRef<'_, T> {
        self.slice_unchecked(self.n_max, self.m_max).a
    }

    /// All of B, `[m_max, r]`.
    pub fn b(&self) -> MatRef<'_, T> {
        self.slice_unchecked(self.n_max, self.m_max).b
    }

    /// A's and B's elements as flat row-major slices.
    pub fn as_slices(&self) -> (&[T], &[T]) {
        (&self.a, &self.b)
    }

    /// The projections of a layer with `n` inputs and `m` outputs: `A[:, :n]` and `B[:m, :]`.
    ///
    /// Errors: [`Error::LayerExceedsProjections`] when `n > n_max` or `m > m_max`.
    pub fn slice(&self, n: usize, m: usize) -> Result<LayerProjections<'_, T>> {
        crate::types::check_fits(n, m, self.n_max, self.m_max)?;
        let full = self.slice_unchecked(self.n_max, self.m_max);
        Ok(LayerProjections { cache: Some((&self.packed, full.a, full.b)), ..self.slice_unchecked(n, m) })
    }

    fn slice_unchecked(&self, n: usize, m: usize) -> LayerProjections<'_, T> {
        // The lengths were validated at construction, so these views cannot fail.
        let a = MatRef::new(&self.a, self.r, n, self.n_max).expect("A extent validated at construction");
        let b = MatRef::new(&self.b, m, self.r, self.r).expect("B extent validated at construction");
        LayerProjections { a, b, cache: None }
    }

    /// A and B transposed for the backward's products, packed on first use.
    pub(crate) fn transposed(&self) -> &TransposedProjections<T> {
        self.packed.transposed(self.a(), self.b())
    }

    /// The same projections rounded to another element type.
    pub fn to_dtype<U: Element>(&self) -> Projections<U> {
        let conv = |v: &[T]| v.iter().map(|x| U::from_f32(x.to_f32())).collect();
        Projections {
            a: conv(&self.a),
            b: conv(&self.b),
            r: self.r,
            n_max: self.n_max,
            m_max: self.m_max,
            packed: PackCache::default(),
        }
    }
}

/// One layer's view of the projections: A `[r, n]` and B `[m, r]`, with the model's packing cache
/// (and its whole A and B) when it comes from [`Projections::slice`] (views made with
/// [`LayerProjections::new`] are packed per call instead).
pub struct LayerProjections<'a, T> {
    a: MatRef<'a, T>,
    b: MatRef<'a, T>,
    cache: Option<(&'a PackCache<T>, MatRef<'a, T>, MatRef<'a, T>)>,
}

impl<T> std::fmt::Debug for LayerProjections<'_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LayerProjections")
            .field("r", &self.a.rows())
            .field("n", &self.a.cols())
            .field("m", &self.b.rows())
            .field("model_packing", &self.cache.is_some())
            .finish()
    }
}

impl<T> Clone for LayerProjections<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for LayerProjections<'_, T> {}

impl<'a, T> LayerProjections<'a, T> {
    /// Pairs arbitrary views A `[r, n]` and B `[m, r]` (e.g. borrowed from another framework).
    ///
    /// Errors: [`Error::ZeroRank`] when A has no rows, [`Error::RankMismatch`] when B's columns
    /// differ from A's rows.
    pub fn new(a: MatRef<'a, T>, b: MatRef<'a, T>) -> Result<Self> {
        if a.rows() == 0 {
            return Err(Error::ZeroRank);
        }
        if b.cols() != a.rows() {
            return Err(Error::RankMismatch { what: "B's columns", expected: a.rows(), actual: b.cols() });
        }
        Ok(Self { a, b, cache: None })
    }

    /// The layer's weights as the CPU drivers take them, with the model's copy packed in `layout`
    /// (packed now on first use) when there is a model.
    pub(crate) fn weights(&self, layout: Layout) -> Weights<'a, T>
    where
        T: Element,
    {
        let packed = self.cache.map(|(cache, a, b)| cache.get(layout, a, b));
        Weights { a: self.a, b: self.b, layout, packed }
    }

    /// A `[r, n]`.
    pub fn a(&self) -> MatRef<'a, T> {
        self.a
    }

    /// B `[m, r]`.
    pub fn b(&self) -> MatRef<'a, T> {
        self.b
    }

    /// The rank `r`.
    pub fn rank(&self) -> usize {
        self.a.rows()
    }

    /// The layer's sizes, for the shared shape checks.
    pub(crate) fn dims(&self) -> crate::types::LayerDims {
        crate::types::LayerDims { r: self.rank(), n: self.in_features(), m: self.out_features() }
    }

    /// The layer's in_features `n`.
    pub fn in_features(&self) -> usize {
        self.a.cols()
    }

    /// The layer's out_features `m`.
    pub fn out_features(&self) -> usize {
        self.b.rows()
    }
}
