//! Time of merging an adapter into a layer's weight (`merge`, then `unmerge` to restore it), per
//! dtype, on this CPU's default tier and on another tier named like `VERA_KERNELS_ISA`,
//! alternated, medians of the pairs: how much the `amx` tier's bf16 and f16 merges on split tiles
//! gain over the `avx512` FMA kernels.
//!
//! ```sh
//! cargo run --release --example merge_time                      # 4096 x 4096, r = 256 and 1024
//! cargo run --release --example merge_time -- 4096 11008 256 avx512
//! ```

use std::time::Instant;

use vera_kernels::{bf16, f16, merge, unmerge, with_isa, Adapter, Element, Isa, MatMut, Projections};

const ROUNDS: usize = 7;

/// Milliseconds of one merge on `isa` (the unmerge after it restores `w`, untimed).
fn time<T: Element>(isa: Isa, proj: &Projections<T>, adapter: &Adapter, w: &mut [T]) -> vera_kernels::Result<f64> {
    let (m, n) = (proj.m_max(), proj.n_max());
    with_isa(isa, || -> vera_kernels::Result<f64> {
        let t0 = Instant::now();
        merge(proj, adapter, MatMut::from_slice(w, m, n)?)?;
        let t = t0.elapsed().as_secs_f64() * 1e3;
        unmerge(proj, adapter, MatMut::from_slice(w, m, n)?)?;
        Ok(t)
    })
}

fn compare<T: Element>(name: &str, other: Isa, (n, m, r): (usize, usize, usize)) -> vera_kernels::Result<()> {
    let here = Isa::selected();
    let proj = Projections::<T>::from_seed(1, r, n, m)?;
    let adapter = Adapter::new(vec![0.1; r], vec![0.1; m])?;
    let mut w = vec![T::from_f32(0.5); m * n];
    // Warm up: the model's transposed projections are packed on the first merge of each kind.
    time(here, &proj, &adapter, &mut w)?;
    time(other, &proj, &adapter, &mut w)?;
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        a.push(time(here, &proj, &adapter, &mut w)?);
        b.push(time(other, &proj, &adapter, &mut w)?);
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let mut ratios: Vec<f64> = b.iter().zip(&a).map(|(o, h)| o / h).collect();
    println!(
        "{name:>4} n {n} m {m} r {r}: {here} {:.2} ms, {other} {:.2} ms, {other}/{here} {:.2}x (median of {ROUNDS} pairs)",
        median(&mut a),
        median(&mut b),
        median(&mut ratios)
    );
    Ok(())
}

fn main() -> vera_kernels::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let other = |s: Option<&String>| s.map_or(Ok(Isa::Avx512), |s| s.parse::<Isa>());
    let (shapes, other) = match &args[..] {
        [] => (vec![(4096, 4096, 256), (4096, 4096, 1024)], other(None)?),
        [n, m, r, rest @ ..] => {
            let p = |s: &String| s.parse::<usize>().expect("sizes: n m r");
            (vec![(p(n), p(m), p(r))], other(rest.first())?)
        }
        _ => panic!("usage: merge_time [n m r [isa]]"),
    };
    println!("{} threads; default tier {}", rayon::current_num_threads(), Isa::selected());
    for shape in shapes {
        compare::<f32>("f32", other, shape)?;
        compare::<f16>("f16", other, shape)?;
        compare::<bf16>("bf16", other, shape)?;
    }
    Ok(())
}
