//! Helpers shared by the integration tests: reading the PEFT fixtures, random test values.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use safetensors::{Dtype, SafeTensors};

pub mod grads;

/// `tests/fixtures/<name>`.
pub fn fixture_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

/// Every f32 tensor of a safetensors file, by name, with its shape.
pub fn read_f32_tensors(path: &std::path::Path) -> HashMap<String, (Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let st = SafeTensors::deserialize(&bytes).expect("valid safetensors");
    st.tensors()
        .into_iter()
        .map(|(name, view)| {
            assert_eq!(view.dtype(), Dtype::F32, "{name} is not f32");
            let data: Vec<f32> = bytemuck::pod_collect_to_vec(view.data());
            (name, (view.shape().to_vec(), data))
        })
        .collect()
}

/// Max |a - b| / max |b|: the error relative to the tensor's scale.
pub fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().map(|v| f64::from(v.abs())).fold(0.0, f64::max);
    let err = a.iter().zip(b).map(|(x, y)| f64::from(x - y).abs()).fold(0.0, f64::max);
    if scale == 0.0 {
        err
    } else {
        err / scale
    }
}

/// `len` values uniform in `[-scale, scale)` from torch's CPU generator (reproducible per seed).
pub fn values(g: &mut vera_kernels::rng::TorchCpuGenerator, len: usize, scale: f64) -> Vec<f32> {
    let mut v = vec![0.0f32; len];
    g.fill_uniform_f32(&mut v, -scale, scale);
    v
}

/// `v` rounded to the element type `T`.
pub fn to<T: vera_kernels::Element>(v: &[f32]) -> Vec<T> {
    v.iter().map(|&x| T::from_f32(x)).collect()
}

/// One random forward case (the property tests of the CPU and GPU paths draw these).
#[derive(Clone, Debug)]
pub struct Case {
    pub t: usize,
    pub n: usize,
    pub m: usize,
    pub r: usize,
    /// Extra columns of the projections beyond the layer (n_max - n, m_max - m).
    pub n_extra: usize,
    pub m_extra: usize,
    /// Extra row stride of x and y.
    pub x_pad: usize,
    pub y_pad: usize,
    pub bias: bool,
    pub accumulate: bool,
    pub seed: u64,
}

/// What a case strategy draws: `((t, n, m, r), (n_extra, m_extra, x_pad, y_pad), (bias,
/// accumulate, seed))`.
pub type CaseDraw = ((usize, usize, usize, usize), (usize, usize, usize, usize), (bool, bool, u64));

impl Case {
    /// The case a strategy drew (each test file has its own ranges, the same fields).
    pub fn from_draw(((t, n, m, r), (n_extra, m_extra, x_pad, y_pad), (bias, accumulate, seed)): CaseDraw) -> Case {
        Case { t, n, m, r, n_extra, m_extra, x_pad, y_pad, bias, accumulate, seed }
    }
}

/// The inputs of a [`Case`]: projections, adapter, `x [t, n + x_pad]` and `y0 [t, m + y_pad]`.
pub struct Inputs<T> {
    pub projections: vera_kernels::Projections<T>,
    pub adapter: vera_kernels::Adapter,
    pub x: Vec<T>,
    pub y0: Vec<T>,
}

/// Draws a case's inputs from its seed.
pub fn inputs<T: vera_kernels::Element>(c: &Case) -> Inputs<T> {
    let mut g = vera_kernels::rng::TorchCpuGenerator::manual_seed(c.seed);
    let (n_max, m_max) = (c.n + c.n_extra, c.m + c.m_extra);
    let a = to::<T>(&values(&mut g, c.r * n_max, 1.0));
    let b = to::<T>(&values(&mut g, m_max * c.r, 1.0));
    let projections = vera_kernels::Projections::from_arrays(a, b, c.r, n_max, m_max).unwrap();
    let mut adapter = vera_kernels::Adapter::new(values(&mut g, c.r, 1.0), values(&mut g, c.m, 1.0)).unwrap();
    if c.bias {
        adapter = adapter.with_bias(values(&mut g, c.m, 1.0)).unwrap();
    }
    let x = to::<T>(&values(&mut g, c.t * (c.n + c.x_pad), 2.0));
    let y0 = to::<T>(&values(&mut g, c.t * (c.m + c.y_pad), 2.0));
    Inputs { projections, adapter, x, y0 }
}

/// A dimension for the property tests: small random sizes, 1, primes, and one past every block /
/// tile / vector width the CPU kernels use (8-row tiles, 8 and 16 lanes, 32-column panels, 32-row
/// merge blocks, AMX's 16-row tiles and 32-row blocks, BLOCK_ROWS-row blocks), plus an exact panel
/// width.
pub fn dim(max_random: usize) -> impl proptest::strategy::Strategy<Value = usize> {
    use proptest::prelude::*;
    let block = vera_kernels::BLOCK_ROWS;
    prop_oneof![
        1..=max_random,
        Just(1),
        prop::sample::select(vec![2usize, 3, 5, 7, 13, 31, 37, 61]),
        prop::sample::select(vec![5usize, 9, 17, 32, 33, block + 1, 2 * block + 1]),
    ]
}

/// A reduction length (n, r, or m for the backward's `g`): as [`dim`], and now and then one around
/// the kernels' k blocks (64 elements; AMX: tile steps of 32 elements, slices of 512), so that
/// partial blocks and several blocks are hit (1057: three AMX slices and an odd element).
pub fn kdim(max_random: usize) -> impl proptest::strategy::Strategy<Value = usize> {
    use proptest::prelude::*;
    prop_oneof![4 => dim(max_random), 1 => prop::sample::select(vec![63usize, 64, 65, 129, 255, 256, 257, 513, 1057])]
}

/// The fixed cases the Miri runs use (Miri interprets every instruction, so the random property
/// tests' shapes are out of its reach): one of each edge the CPU drivers have, at the smallest size
/// that reaches it. Row tiles of 8, vector widths of 8 and 16, panels of 32 columns, k blocks of 64,
/// blocks of `BLOCK_ROWS` rows; row strides wider than the rows; accumulate and overwrite; with and
/// without bias.
#[allow(dead_code)] // used by the property tests' Miri runs only
pub fn edge_cases() -> Vec<Case> {
    let block = vera_kernels::BLOCK_ROWS;
    [
        // (t, n, m, r), (n_extra, m_extra, x_pad, y_pad), (bias, accumulate). Each case is small
        // in every dimension but the one whose edge it reaches (Miri runs about 10^6 operations a
        // second: a 3 x 65 x 7 x 65 forward with its reference takes 30 s there).
        ((1, 1, 1, 1), (0, 0, 0, 0), (false, false)),
        ((9, 17, 33, 5), (3, 2, 1, 2), (true, true)),
        ((2, 65, 3, 2), (0, 1, 0, 3), (true, false)),
        ((2, 3, 5, 65), (1, 0, 2, 0), (false, true)),
        ((2, 5, 129, 2), (1, 0, 2, 1), (false, true)),
        ((8, 16, 32, 8), (0, 0, 0, 0), (true, false)),
        ((block + 1, 3, 9, 3), (2, 1, 1, 0), (false, true)),
    ]
    .into_iter()
    .enumerate()
    .map(|(i, ((t, n, m, r), pads, (bias, accumulate)))| {
        Case::from_draw(((t, n, m, r), pads, (bias, accumulate, i as u64)))
    })
    .collect()
}

/// A rayon pool of `threads` threads (1 to 4), built once per process, with the parallel threshold
/// at 0 so that every call made in it splits. (Building a pool per call costs seconds under Miri.)
#[allow(dead_code)] // not every test file uses it
pub fn split_pool(threads: usize) -> &'static rayon::ThreadPool {
    static POOLS: [std::sync::OnceLock<rayon::ThreadPool>; 4] = [const { std::sync::OnceLock::new() }; 4];
    vera_kernels::set_parallel_min_flops(Some(0.0));
    POOLS[threads - 1].get_or_init(|| rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap())
}

/// The dtypes edge case `i` runs in: all three natively; under Miri, where one kernel call on these
/// shapes takes about a second, one dtype per case in turn (f32, f16, bf16, f32, ...), so that every
/// dtype and every edge is covered within the CI's time.
#[allow(dead_code)] // used by the property tests' edge cases only
pub fn edge_dtypes(i: usize) -> Vec<vera_kernels::DType> {
    use vera_kernels::DType;
    let all = [DType::F32, DType::F16, DType::BF16];
    if cfg!(miri) {
        vec![all[i % 3]]
    } else {
        all.to_vec()
    }
}

/// SplitMix64: a tiny, fast generator for the tests' own draws (shapes, and the values of inputs too
/// large for torch's generator to fill in a blink).
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n`.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// Uniform in `[-scale, scale)`.
    pub fn value(&mut self, scale: f32) -> f32 {
        let unit = (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
        (2.0 * unit - 1.0) * scale
    }

    pub fn values(&mut self, len: usize, scale: f32) -> Vec<f32> {
        (0..len).map(|_| self.value(scale)).collect()
    }

    pub fn elements<T: vera_kernels::Element>(&mut self, len: usize, scale: f32) -> Vec<T> {
        (0..len).map(|_| T::from_f32(self.value(scale))).collect()
    }
}
