//! Per-call latency of decode (one token, T = 1) forwards made back to back, as a model's layers
//! make them: the 10th, 50th and 90th percentiles of each 500 calls, from this thread (outside
//! rayon's pool, as an application calls) and from inside the pool.
//!
//! ```sh
//! cargo run --release --example decode_latency            # 4096 x 4096, r = 256, f32
//! cargo run --release --example decode_latency -- 4096 11008 256
//! ```
//!
//! Called from outside the pool, a parallel region used to wait for the pool's sleeping threads
//! to wake (twice per call); the caller now works on the call's chunks itself while they wake, and
//! the two columns should be close.

use std::time::Instant;

use vera_kernels::{forward, Adapter, MatMut, MatRef, Mode, Projections};

const CALLS: usize = 3000;
const WINDOW: usize = 500;

fn main() -> vera_kernels::Result<()> {
    let args: Vec<usize> = std::env::args().skip(1).map(|a| a.parse().expect("sizes: n m r")).collect();
    let (n, m, r) = match args[..] {
        [] => (4096, 4096, 256),
        [n, m, r] => (n, m, r),
        _ => panic!("usage: decode_latency [n m r]"),
    };
    let proj = Projections::<f32>::from_seed(1, r, n, m)?;
    let adapter = Adapter::new(vec![0.1; r], vec![0.1; m])?;
    let x = vec![0.5f32; n];
    let mut y = vec![0.0f32; m];
    let times = |label: &str, y: &mut Vec<f32>| -> vera_kernels::Result<()> {
        let mut ms = Vec::with_capacity(CALLS);
        for _ in 0..CALLS {
            let t0 = Instant::now();
            forward(&proj, &adapter, MatRef::new(&x, 1, n, n)?, MatMut::new(y, 1, m, m)?, Mode::Accumulate)?;
            ms.push(t0.elapsed().as_secs_f64() * 1e3);
        }
        print!("{label:>12}:");
        for w in ms.chunks(WINDOW) {
            let mut w = w.to_vec();
            w.sort_by(f64::total_cmp);
            let at = |q: usize| w[q * w.len() / 100];
            print!("  [{:.3} {:.3} {:.3}]", at(10), at(50), at(90));
        }
        println!("  ms (p10 p50 p90 per {WINDOW} calls)");
        Ok(())
    };
    println!("T = 1, n = {n}, m = {m}, r = {r}, f32, {} threads", rayon::current_num_threads());
    times("this thread", &mut y)?;
    rayon::scope(|_| times("in the pool", &mut y))
}
