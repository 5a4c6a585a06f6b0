//! Soak: a long, bounded, randomized run of every operation (forward and the training forward,
//! merge and unmerge, backward with and without a saved `h`, the mixed forward and backward), in
//! every dtype, on every CPU tier this machine has, on two threads with every call split, each
//! result checked against the f64 reference within its derived bound, while the process's resident
//! memory is sampled: the largest sample of the last tenth of the calls may not exceed the largest
//! of the first tenth by more than [`RSS_SLACK`]. That catches a leak of a few dozen bytes per call
//! and per-thread scratch that grows instead of being reused.
//!
//! `VERA_SOAK_CALLS` (default 100 000) and `VERA_SOAK_SECONDS` (default 100) bound the run, whichever
//! comes first; a failure prints the call's seed, which `VERA_SOAK_SEED` replays from (the whole
//! run is a function of that seed). `VERA_SOAK_RSS=off` leaves the memory check out, for runs under
//! AddressSanitizer, whose quarantine of freed memory grows the resident set by design (and whose
//! leak checker, run at exit, replaces the check).

mod common;

use std::time::{Duration, Instant};

use common::{split_pool, to, values, SplitMix64};
use vera_kernels::rng::TorchCpuGenerator;
use vera_kernels::{
    backward, backward_mixed, bf16, f16, forward, forward_mixed, forward_train, merge, reference, tier_facts, unmerge,
    with_isa, Adapter, AdapterBank, Element, Gradients, Isa, MatMut, MatRef, Mode, Projections, BLOCK_ROWS, NO_ADAPTER,
};

/// How much the resident set may grow from the first tenth of the run to the last. Measured (100 000
/// to 300 000 calls, three seeds): it grows by 0.1 to 0.3 MiB as the allocator's free lists settle;
/// the run's largest call needs under 1 MiB of inputs and outputs. A deliberate leak of one 64-byte
/// allocation per call grew it by 8 MiB over 100 000 calls, and fails this test.
const RSS_SLACK: u64 = 3 << 20;

/// The ranks of the shared projections, one set per rank and dtype (a rank of 1, a prime, one past
/// the 32-column panels and one past the 64-long k blocks).
const RANKS: [usize; 4] = [1, 7, 33, 65];
/// `n_max` and `m_max` of every set: room for the widest layer drawn below.
const WIDTH_MAX: usize = 160;

/// `f32` unit roundoff: one more f32 addition under accumulate.
const EPS: f64 = 5.960_464_477_539_063e-8;

/// Mostly small (1 to `small`), one time in eight an edge up to `WIDTH_MAX`.
fn dim(rng: &mut SplitMix64, small: usize, edges: &[usize]) -> usize {
    if rng.below(8) == 0 {
        edges[rng.below(edges.len())]
    } else {
        1 + rng.below(small)
    }
}

/// One call: an operation on a shape, with its strides, mode and the seed of its values.
#[derive(Clone, Copy, Debug)]
struct Call {
    op: usize,
    isa: Isa,
    rank: usize,
    t: usize,
    n: usize,
    m: usize,
    x_pad: usize,
    y_pad: usize,
    accumulate: bool,
    bias: bool,
    k: usize,
    seed: u64,
}

const OPS: usize = 6;

fn draw_call(rng: &mut SplitMix64, isas: &[Isa]) -> Call {
    Call {
        op: rng.below(OPS),
        isa: isas[rng.below(isas.len())],
        rank: rng.below(RANKS.len()),
        t: dim(rng, 12, &[BLOCK_ROWS + 1, 17, 33]),
        n: dim(rng, 48, &[65, 129, WIDTH_MAX]),
        m: dim(rng, 48, &[33, 129, WIDTH_MAX]),
        x_pad: rng.below(3),
        y_pad: rng.below(3),
        accumulate: rng.below(2) == 0,
        bias: rng.below(2) == 0,
        k: 1 + rng.below(3),
        seed: rng.next_u64(),
    }
}

/// `|got - want| <= bound`, with one more rounding (unit `unit`) onto `old` under accumulate.
fn within(got: f64, want: f64, bound: f64, old: Option<f64>, unit: f64) -> bool {
    let (want, bound) = match old {
        Some(o) => (o + want, bound + unit * (o.abs() + want.abs() + bound)),
        None => (want, bound),
    };
    (got - want).abs() <= bound
}

fn mode(accumulate: bool) -> Mode {
    if accumulate {
        Mode::Accumulate
    } else {
        Mode::Overwrite
    }
}

/// Runs `call` with the projections `p` (rank `RANKS[call.rank]`) and checks it against the
/// reference; `Err` says what differs.
fn run<T: Element>(p: &Projections<T>, c: Call) -> Result<(), String> {
    let r = RANKS[c.rank];
    let (xs, ys) = (c.n + c.x_pad, c.m + c.y_pad);
    let mut g = TorchCpuGenerator::manual_seed(c.seed);
    let adapters: Vec<Adapter> = (0..c.k)
        .map(|_| {
            let a = Adapter::new(values(&mut g, r, 1.0), values(&mut g, c.m, 1.0)).unwrap();
            if c.bias {
                a.with_bias(values(&mut g, c.m, 1.0)).unwrap()
            } else {
                a
            }
        })
        .collect();
    let x = to::<T>(&values(&mut g, c.t * xs, 2.0));
    let y0 = to::<T>(&values(&mut g, c.t * ys, 2.0));
    let xv = MatRef::new(&x, c.t, c.n, xs).unwrap();
    let layer = p.slice(c.n, c.m).unwrap();
    let numerics = with_isa(c.isa, tier_facts::<T>).numerics();
    let call = |f: &mut (dyn FnMut() + Send)| split_pool(2).install(|| with_isa(c.isa, f));
    let unit_t = T::UNIT_ROUNDOFF;
    match c.op {
        // The forward (and, on even seeds, the training forward, whose y is the same).
        0 => {
            let mut y = y0.clone();
            let mut h = vec![0.0f32; c.t * r];
            call(&mut || {
                let ym = MatMut::new(&mut y, c.t, c.m, ys).unwrap();
                if c.seed.is_multiple_of(2) {
                    forward(p, &adapters[0], xv, ym, mode(c.accumulate)).unwrap();
                } else {
                    let hm = MatMut::from_slice(&mut h, c.t, r).unwrap();
                    forward_train(p, &adapters[0], xv, ym, mode(c.accumulate), hm).unwrap();
                }
            });
            let base = c.accumulate.then(|| MatRef::new(&y0, c.t, c.m, ys).unwrap());
            let want = reference::forward(layer, &adapters[0], xv, base).unwrap();
            let bound = reference::forward_error_bound(layer, &adapters[0], xv, base, numerics).unwrap();
            for t in 0..c.t {
                for i in 0..c.m {
                    let (got, w, b) = (y[t * ys + i].to_f64(), want[t * c.m + i], bound[t * c.m + i]);
                    if (got - w).abs() > b {
                        return Err(format!("y[{t},{i}] = {got}, reference {w}, bound {b}"));
                    }
                }
                if y[t * ys + c.m..(t + 1) * ys] != y0[t * ys + c.m..(t + 1) * ys] {
                    return Err(format!("the padding of y row {t} was written"));
                }
            }
        }
        // Merge, then unmerge back.
        1 => {
            let w0 = to::<T>(&values(&mut g, c.m * c.n, 1.0));
            let dw = reference::delta_weight(layer, &adapters[0]).unwrap();
            // `after` against `before ± ΔW`, within the bound taken at `before`.
            let check = |what: &str, before: &[T], after: &[T], sign: f64| -> Result<(), String> {
                let before_ref = MatRef::from_slice(before, c.m, c.n).unwrap();
                let bound = reference::delta_error_bound(layer, &adapters[0], Some(before_ref), numerics).unwrap();
                for (i, got) in after.iter().enumerate() {
                    let want = before[i].to_f64() + sign * dw[i];
                    if (got.to_f64() - want).abs() > bound[i] {
                        return Err(format!("{what} W[{i}] = {got:?}, want {want}, bound {}", bound[i]));
                    }
                }
                Ok(())
            };
            let mut w = w0.clone();
            call(&mut || merge(p, &adapters[0], MatMut::from_slice(&mut w, c.m, c.n).unwrap()).unwrap());
            check("merged", &w0, &w, 1.0)?;
            let merged = w.clone();
            call(&mut || unmerge(p, &adapters[0], MatMut::from_slice(&mut w, c.m, c.n).unwrap()).unwrap());
            check("unmerged", &merged, &w, -1.0)?;
        }
        // The backward, recomputing h (op 2) or reusing the training forward's (op 3); the
        // mixed backward (op 5) with each adapter's gradients over its own rows.
        2 | 3 | 5 => {
            let dy = to::<T>(&values(&mut g, c.t * ys, 1.0));
            let dyv = MatRef::new(&dy, c.t, c.m, ys).unwrap();
            let k = if c.op == 5 { c.k } else { 1 };
            let rows: Vec<i32> = (0..c.t).map(|_| row_adapter(&mut g, k, c.op == 5)).collect();
            let old_ld = values(&mut g, k * r, 1.0);
            let old_lb = values(&mut g, k * c.m, 1.0);
            let old_b = values(&mut g, k * c.m, 1.0);
            let old_x = to::<T>(&values(&mut g, c.t * xs, 1.0));
            let (mut ld, mut lb, mut bias, mut dx) = (old_ld.clone(), old_lb.clone(), old_b.clone(), old_x.clone());
            let mut h = vec![0.0f32; c.t * r];
            let saved = c.op == 3;
            // The f32-FMA kernels' numerics (a recomputed h), or those of a tier whose backward runs
            // on tiles (bf16 rounded or f16 split), or with a saved h those of the forward that saved
            // it.
            let mut numerics = with_isa(c.isa, tier_facts::<T>).backward_numerics();
            if saved {
                let mut y = y0.clone();
                call(&mut || {
                    let ym = MatMut::new(&mut y, c.t, c.m, ys).unwrap();
                    let hm = MatMut::from_slice(&mut h, c.t, r).unwrap();
                    forward_train(p, &adapters[0], xv, ym, Mode::Overwrite, hm).unwrap();
                });
                numerics = with_isa(c.isa, tier_facts::<T>).numerics();
            }
            call(&mut || {
                let grads = Gradients::new(&mut ld, &mut lb)
                    .with_bias(&mut bias)
                    .with_x(MatMut::new(&mut dx, c.t, c.n, xs).unwrap());
                let h = saved.then(|| MatRef::from_slice(&h, c.t, r).unwrap());
                if c.op == 5 {
                    let bank = AdapterBank::new(&adapters).unwrap();
                    backward_mixed(p, &bank, &rows, xv, dyv, h, grads, mode(c.accumulate)).unwrap();
                } else {
                    backward(p, &adapters[0], xv, dyv, h, grads, mode(c.accumulate)).unwrap();
                }
            });
            for (a, adapter) in adapters.iter().take(k).enumerate() {
                // This adapter's rows only: dy zeroed on the others (they add nothing to its sums).
                let mut dyk = dy.clone();
                for (t, &id) in rows.iter().enumerate() {
                    if id != a as i32 {
                        dyk[t * ys..(t + 1) * ys].fill(T::from_f32(0.0));
                    }
                }
                let dyk = MatRef::new(&dyk, c.t, c.m, ys).unwrap();
                let want = reference::backward(layer, adapter, xv, dyk).unwrap();
                let bound = reference::backward_error_bound(layer, adapter, xv, dyk, numerics).unwrap();
                let sets = [
                    ("lambda_d", &ld[a * r..(a + 1) * r], &old_ld[a * r..], &want.lambda_d, &bound.lambda_d),
                    ("lambda_b", &lb[a * c.m..(a + 1) * c.m], &old_lb[a * c.m..], &want.lambda_b, &bound.lambda_b),
                    ("bias", &bias[a * c.m..(a + 1) * c.m], &old_b[a * c.m..], &want.bias, &bound.bias),
                ];
                for (what, got, old, want, bound) in sets {
                    for i in 0..got.len() {
                        let o = c.accumulate.then(|| f64::from(old[i]));
                        if !within(f64::from(got[i]), want[i], bound[i], o, EPS) {
                            return Err(format!(
                                "adapter {a} d{what}[{i}] = {}, reference {}, bound {}, old {o:?}",
                                got[i], want[i], bound[i]
                            ));
                        }
                    }
                }
                for (t, &id) in rows.iter().enumerate() {
                    for j in (0..c.n).filter(|_| id == a as i32) {
                        let o = c.accumulate.then(|| old_x[t * xs + j].to_f64());
                        let (got, w, b) = (dx[t * xs + j].to_f64(), want.x[t * c.n + j], bound.x[t * c.n + j]);
                        if !within(got, w, b, o, unit_t) {
                            return Err(format!("adapter {a} dx[{t},{j}] = {got}, reference {w}, bound {b}"));
                        }
                    }
                }
            }
            for (t, &id) in rows.iter().enumerate() {
                if let Some(j) =
                    written_outside(&dx[t * xs..(t + 1) * xs], &old_x[t * xs..(t + 1) * xs], c.n, id, c.accumulate)
                {
                    return Err(format!(
                        "dx[{t},{j}] (adapter {id}): a row without adapter, or the padding, was written"
                    ));
                }
            }
        }
        // The mixed forward: each row within the bound of its own adapter's reference forward.
        _ => {
            let rows: Vec<i32> = (0..c.t).map(|_| row_adapter(&mut g, c.k, true)).collect();
            let bank = AdapterBank::new(&adapters).unwrap();
            let mut y = y0.clone();
            call(&mut || {
                let ym = MatMut::new(&mut y, c.t, c.m, ys).unwrap();
                forward_mixed(p, &bank, &rows, xv, ym, mode(c.accumulate)).unwrap()
            });
            let base = c.accumulate.then(|| MatRef::new(&y0, c.t, c.m, ys).unwrap());
            for (a, adapter) in adapters.iter().enumerate() {
                let want = reference::forward(layer, adapter, xv, base).unwrap();
                let bound = reference::forward_error_bound(layer, adapter, xv, base, numerics).unwrap();
                for (t, _) in rows.iter().enumerate().filter(|&(_, &id)| id == a as i32) {
                    for i in 0..c.m {
                        let (got, w, b) = (y[t * ys + i].to_f64(), want[t * c.m + i], bound[t * c.m + i]);
                        if (got - w).abs() > b {
                            return Err(format!("adapter {a} y[{t},{i}] = {got}, reference {w}, bound {b}"));
                        }
                    }
                }
            }
            for (t, &id) in rows.iter().enumerate() {
                if let Some(i) =
                    written_outside(&y[t * ys..(t + 1) * ys], &y0[t * ys..(t + 1) * ys], c.m, id, c.accumulate)
                {
                    return Err(format!(
                        "y[{t},{i}] (adapter {id}): a row without adapter, or the padding, was written"
                    ));
                }
            }
        }
    }
    Ok(())
}

/// The first column of an output row (`got`, `cols` columns and then padding, `old` before the
/// call) that differs from what it must be: the padding as it was; a row without adapter as it
/// was under accumulate and zero under overwrite.
fn written_outside<T: Element>(got: &[T], old: &[T], cols: usize, id: i32, accumulate: bool) -> Option<usize> {
    (0..got.len()).find(|&j| {
        let want = if j < cols && id == NO_ADAPTER && !accumulate { T::from_f32(0.0) } else { old[j] };
        (j >= cols || id == NO_ADAPTER) && got[j].to_f64().to_bits() != want.to_f64().to_bits()
    })
}

/// A row's adapter: with `none_allowed`, one time in five [`NO_ADAPTER`], else one of `k`.
fn row_adapter(g: &mut TorchCpuGenerator, k: usize, none_allowed: bool) -> i32 {
    let u = (f64::from(values(g, 1, 1.0)[0]) + 1.0) / 2.0;
    if none_allowed && u < 0.2 {
        NO_ADAPTER
    } else {
        ((u * k as f64) as i32).min(k as i32 - 1)
    }
}

/// The resident set in bytes (`VmRSS` of `/proc/self/status`), where the OS has it.
fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().map_or(default, |v| v.parse().unwrap_or_else(|_| panic!("{name}={v}: not a number")))
}

/// One projection set per rank and dtype, shared by every call (packed lazily by the first).
struct Sets {
    f32: Vec<Projections<f32>>,
    f16: Vec<Projections<f16>>,
    bf16: Vec<Projections<bf16>>,
}

fn sets<T: Element>() -> Vec<Projections<T>> {
    RANKS.iter().map(|&r| Projections::from_seed(r as u64, r, WIDTH_MAX, WIDTH_MAX).unwrap()).collect()
}

#[test]
fn soak_every_operation_dtype_and_tier_against_the_reference_with_flat_memory() {
    let calls = env_or("VERA_SOAK_CALLS", 100_000);
    let limit = Duration::from_secs(env_or("VERA_SOAK_SECONDS", 100));
    let seed = env_or("VERA_SOAK_SEED", 1);
    let isas: Vec<Isa> = Isa::available().collect();
    let sets = Sets { f32: sets(), f16: sets(), bf16: sets() };
    let mut rng = SplitMix64(seed);
    let mut samples: Vec<(u64, u64)> = Vec::new();
    let start = Instant::now();
    let mut made = 0u64;
    while made < calls && start.elapsed() < limit {
        let c = draw_call(&mut rng, &isas);
        let outcome = match made % 3 {
            0 => run(&sets.f32[c.rank], c),
            1 => run(&sets.f16[c.rank], c),
            _ => run(&sets.bf16[c.rank], c),
        };
        if let Err(e) = outcome {
            panic!("call {made} (dtype {}, run seed {seed}) {c:?}: {e}", ["f32", "f16", "bf16"][(made % 3) as usize]);
        }
        made += 1;
        if made.is_multiple_of(64) {
            if let Some(rss) = resident_bytes() {
                samples.push((made, rss));
            }
        }
    }
    let secs = start.elapsed().as_secs_f64();
    println!("soak: {made} calls in {secs:.1} s on tiers {isas:?} (seed {seed})");
    assert!(made >= 1000, "soak: only {made} calls in {secs:.1} s: too few to say anything about memory");
    if std::env::var("VERA_SOAK_RSS").is_ok_and(|v| v == "off") {
        println!("soak: resident memory not checked (VERA_SOAK_RSS=off)");
        return;
    }
    if samples.is_empty() {
        println!("soak: resident memory not checked: this OS has no /proc/self/status");
        return;
    }
    let tenth = made / 10;
    let peak = |range: std::ops::Range<u64>| {
        samples.iter().filter(|(i, _)| range.contains(i)).map(|&(_, rss)| rss).max().unwrap_or(0)
    };
    let (first, last) = (peak(0..tenth + 1), peak(made - tenth..made + 1));
    println!("soak: resident set {:.1} MiB in the first tenth, {:.1} MiB in the last", mib(first), mib(last));
    assert!(
        last <= first + RSS_SLACK,
        "resident memory grew from {:.1} MiB (first tenth) to {:.1} MiB (last tenth)",
        mib(first),
        mib(last)
    );
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / f64::from(1 << 20)
}
