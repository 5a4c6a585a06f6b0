//! Prints a digest (FNV-1a over the output bits) of the forward and merge results on a fixed suite:
//! 600 drawn shapes (1, primes, one past every tile / block size, strided views, both modes, with
//! and without bias) and the default `vera bench` shapes, for every dtype, on the CPU tier in use
//! (`VERA_KERNELS_ISA` picks it). Two builds whose digests agree compute bitwise identical
//! results on that suite: how a restructure or a kernel change is shown to change no bits.
//!
//! ```sh
//! for isa in avx512bf16 avx512 avx2 portable; do
//!     VERA_KERNELS_ISA=$isa cargo run --release --example output_digest
//! done
//! ```

use vera_kernels::rng::TorchCpuGenerator;
use vera_kernels::{bf16, f16, forward, merge, Adapter, Element, MatMut, MatRef, Mode, Projections};

/// FNV-1a, 64 bits.
struct Digest(u64);

impl Digest {
    fn add<T: Element>(&mut self, values: &[T]) {
        for v in values {
            for byte in bytemuck::bytes_of(v) {
                self.0 = (self.0 ^ u64::from(*byte)).wrapping_mul(0x100_0000_01b3);
            }
        }
    }
}

fn values(g: &mut TorchCpuGenerator, len: usize, scale: f64) -> Vec<f32> {
    let mut v = vec![0.0f32; len];
    g.fill_uniform_f32(&mut v, -scale, scale);
    v
}

/// A draw from `choices` by the generator's next value.
fn pick(g: &mut TorchCpuGenerator, choices: &[usize]) -> usize {
    let u = values(g, 1, 1.0)[0];
    choices[(((u + 1.0) / 2.0 * choices.len() as f32) as usize).min(choices.len() - 1)]
}

/// One forward (and, for small layers, one merge) of `T` on shape `(t, n, m, r)`, into the digest.
#[allow(clippy::too_many_arguments)]
fn run<T: Element>(
    d: &mut Digest,
    seed: u64,
    t: usize,
    n: usize,
    m: usize,
    r: usize,
    pad: usize,
    bias: bool,
    acc: bool,
) {
    let mut g = TorchCpuGenerator::manual_seed(seed);
    let proj = Projections::<T>::from_seed(seed, r, n + pad, m + pad).expect("valid sizes");
    let mut adapter = Adapter::new(values(&mut g, r, 1.0), values(&mut g, m, 1.0)).expect("valid adapter");
    if bias {
        adapter = adapter.with_bias(values(&mut g, m, 1.0)).expect("bias [m]");
    }
    let x: Vec<T> = values(&mut g, t * (n + pad), 1.0).into_iter().map(T::from_f32).collect();
    let mut y: Vec<T> = values(&mut g, t * (m + pad), 1.0).into_iter().map(T::from_f32).collect();
    let mode = if acc { Mode::Accumulate } else { Mode::Overwrite };
    let xv = MatRef::new(&x, t, n, n + pad).expect("x view");
    forward(&proj, &adapter, xv, MatMut::new(&mut y, t, m, m + pad).expect("y view"), mode).expect("forward");
    d.add(&y);
    if m * n <= 1 << 16 {
        let mut w: Vec<T> = values(&mut g, m * n, 1.0).into_iter().map(T::from_f32).collect();
        merge(&proj, &adapter, MatMut::from_slice(&mut w, m, n).expect("w view")).expect("merge");
        d.add(&w);
    }
}

fn suite<T: Element>() -> u64 {
    let mut d = Digest(0xcbf2_9ce4_8422_2325);
    let mut g = TorchCpuGenerator::manual_seed(2024);
    let dims = [1usize, 2, 3, 5, 7, 9, 13, 17, 31, 32, 33, 37, 61, 65, 129];
    let kdims = [1usize, 4, 7, 31, 63, 64, 65, 129, 255, 257, 513];
    let wdims = [1usize, 5, 31, 32, 33, 127, 128, 129, 161, 257];
    for case in 0..600u64 {
        let (t, n, m, r) = (pick(&mut g, &dims), pick(&mut g, &kdims), pick(&mut g, &wdims), pick(&mut g, &kdims));
        let pad = pick(&mut g, &[0, 1, 3]);
        let (bias, acc) = (case % 3 == 0, case % 2 == 0);
        run::<T>(&mut d, case, t, n, m, r, pad, bias, acc);
    }
    // The default `vera bench` shapes.
    for (t, n, m, r) in [
        (1, 4096, 4096, 256),
        (8, 4096, 4096, 1024),
        (512, 4096, 4096, 256),
        (512, 4096, 4096, 1024),
        (512, 4096, 11008, 256),
        (512, 768, 768, 1024),
    ] {
        run::<T>(&mut d, 7, t, n, m, r, 0, true, true);
    }
    d.0
}

fn main() {
    println!(
        "isa {} f32 {:016x} f16 {:016x} bf16 {:016x}",
        std::env::var("VERA_KERNELS_ISA").unwrap_or_else(|_| "default".into()),
        suite::<f32>(),
        suite::<f16>(),
        suite::<bf16>()
    );
}
