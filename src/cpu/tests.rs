//! Every tier's stores against the scalar definition, bit for bit: a product with an identity matrix
//! hands each sink exact values (a sum of one product `v·1` and zeros), so whatever a tier's
//! vector store computes must equal [`Epilogue::apply`] / [`Update::apply`] followed by `half`'s
//! rounding (`Element::from_f32`), for every sink and element type.

use super::caches::{CacheSizes, TEST_SIZES};
use super::drivers::{row_epilogues, MAX_BLOCK_ROWS};
use super::isa::Isa;
use super::kernels::{kernels_on, Kernels, Layout};
use super::pack::{
    pack_pairs, pack_projections, pack_row_pairs, pack_row_split, pack_row_split3, pack_rows, split3_bits, split_bits,
    split_pairs, split_panels, tripled_bits, Panels, RowPairs, NR,
};
use super::scales::BankScales;
use super::sink::{Epilogue, RowEpilogues, Sink, Update};
use crate::dtype::Element;
use crate::mat::{MatMut, MatRef};
use half::{bf16, f16};

/// Runs `f` with this thread's caches as the CPU's, then as a small CPU's (16 KiB L1d, 256 KiB
/// L2), so that the loop nests whose blocking follows the caches run their other blockings too
/// (the AMX tile loop: 4-step k slices, and 64 KiB of partial sums: groups of 2 panels at 250 rows).
fn with_each_cache_size(mut f: impl FnMut(&str)) {
    f("this CPU's caches");
    let small = CacheSizes { l1d: 16 << 10, l2: 256 << 10, l3: 0, from_cpuid: false };
    TEST_SIZES.with(|s| s.set(Some(small)));
    f("16 KiB L1d, 256 KiB L2");
    TEST_SIZES.with(|s| s.set(None));
}

/// Finite f32 values far from overflow in f32 arithmetic (so no NaN is ever made), with every
/// rounding case of f16 and bf16: ties to even both ways, near-ties, f16 subnormals and underflow,
/// f16 overflow to infinity, zeros of both signs, f32 subnormals, and an LCG walk over bit patterns.
fn values(len: usize, seed: u32) -> Vec<f32> {
    let specials = [
        0.0f32,
        -0.0,
        1.0,
        -1.0,
        1.0 + f32::powi(2.0, -11),
        1.0 + 3.0 * f32::powi(2.0, -11),
        1.0 + f32::powi(2.0, -8),
        1.0 + 3.0 * f32::powi(2.0, -8),
        f32::from_bits(0x3f80_8000),
        f32::from_bits(0x3f80_8001),
        f32::from_bits(0x3f80_7fff),
        65504.0,
        65519.0,
        65520.0,
        -70000.0,
        6.0e-8,
        3.0e-8,
        2.9e-8,
        1.0e-5,
        -6.1e-5,
        1.0e-30,
        1.0e20,
        // f32 subnormals (bf16 keeps f32's exponent range: they round to bf16 subnormals).
        1.0e-40,
        -2.0e-39,
        f32::from_bits(0x0000_8000),
        f32::from_bits(1),
    ];
    let mut x = seed.wrapping_mul(2_654_435_761) | 1;
    let mut walk = std::iter::from_fn(move || {
        x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
        let v = f32::from_bits(x);
        Some(if v.is_finite() && v.abs() < 1e20 { v } else { v.to_bits() as f32 * 1e-9 })
    });
    (0..len).map(|i| if i < specials.len() && seed == 0 { specials[i] } else { walk.next().unwrap() }).collect()
}

/// A bank of two adapters for the per-row epilogues of a block of up to `MAX_BLOCK_ROWS` rows: row
/// `t` uses adapter `t % 3` (adapter 0: the drawn scale and bias; adapter 1: the scale reversed, no
/// bias; 2: no adapter).
struct RowBank {
    lambda_b: Vec<f32>,
    bias: Vec<f32>,
    ids: Vec<i32>,
}

/// A [`RowBank`]'s epilogues, resolved, accumulating and overwriting.
struct Resolved<'a> {
    accumulate: Vec<Option<Epilogue<'a>>>,
    overwrite: Vec<Option<Epilogue<'a>>>,
}

impl RowBank {
    fn new(scale: &[f32], bias: &[f32]) -> Self {
        let reversed = scale.iter().rev().copied();
        Self {
            lambda_b: scale.iter().copied().chain(reversed).collect(),
            bias: bias.iter().copied().chain(bias.iter().map(|_| 0.0)).collect(),
            ids: (0..MAX_BLOCK_ROWS as i32).map(|t| if t % 3 == 2 { -1 } else { t % 3 }).collect(),
        }
    }

    /// The rows' resolved epilogues, as the drivers resolve them per block.
    fn resolved(&self, accumulate: bool) -> Vec<Option<Epilogue<'_>>> {
        let m = self.lambda_b.len() / 2;
        let bank = BankScales {
            rows: &self.ids,
            lambda_d: &[],
            lambda_b: &self.lambda_b,
            bias: &self.bias,
            has_bias: &[true, false],
            r: 0,
            m,
        };
        row_epilogues(bank, (0, self.ids.len()), None, true, accumulate).to_vec()
    }

    /// What the per-row epilogue must give at `(row, col)` (scalar definition).
    fn expected(&self, row: usize, col: usize, dot: f32, old: f32, accumulate: bool) -> f32 {
        let m = self.lambda_b.len() / 2;
        match row % 3 {
            0 => Epilogue { scale: Some(&self.lambda_b[..m]), bias: Some(&self.bias[..m]), accumulate }
                .apply(col, dot, old),
            1 => Epilogue { scale: Some(&self.lambda_b[m..]), bias: None, accumulate }.apply(col, dot, old),
            _ if accumulate => old,
            _ => 0.0,
        }
    }
}

/// The sinks under test, over `out` (the scales and biases are drawn per column).
#[allow(clippy::type_complexity)]
fn sinks<'a, T: Element>(
    scale: &'a [f32],
    bias: &'a [f32],
    bank: &'a Resolved<'a>,
) -> Vec<(&'static str, Box<dyn Fn(MatMut<'_, T>) -> Sink<'a, T> + 'a>)> {
    let epi =
        |scale: Option<&'a [f32]>, bias: Option<&'a [f32]>, accumulate: bool| Epilogue { scale, bias, accumulate };
    vec![
        (
            "row epilogue, accumulate",
            Box::new(move |mut y: MatMut<'_, T>| Sink::RowEpilogue {
                out: y.as_ptr_mat(),
                rows: RowEpilogues { rows: &bank.accumulate, dst: None, accumulate: true },
            }),
        ),
        (
            "row epilogue, overwrite",
            Box::new(move |mut y: MatMut<'_, T>| Sink::RowEpilogue {
                out: y.as_ptr_mat(),
                rows: RowEpilogues { rows: &bank.overwrite, dst: None, accumulate: false },
            }),
        ),
        (
            "plain rounding",
            Box::new(move |mut y: MatMut<'_, T>| Sink::Epilogue { out: y.as_ptr_mat(), epi: epi(None, None, false) }),
        ),
        (
            "epilogue, accumulate",
            Box::new(move |mut y: MatMut<'_, T>| Sink::Epilogue {
                out: y.as_ptr_mat(),
                epi: epi(Some(scale), Some(bias), true),
            }),
        ),
        (
            "epilogue, overwrite",
            Box::new(move |mut y: MatMut<'_, T>| Sink::Epilogue {
                out: y.as_ptr_mat(),
                epi: epi(Some(scale), None, false),
            }),
        ),
        ("update add", Box::new(|mut y: MatMut<'_, T>| Sink::Update { out: y.as_ptr_mat(), op: Update::Add })),
        ("update sub", Box::new(|mut y: MatMut<'_, T>| Sink::Update { out: y.as_ptr_mat(), op: Update::Sub })),
        (
            "update overwrite",
            Box::new(|mut y: MatMut<'_, T>| Sink::Update { out: y.as_ptr_mat(), op: Update::Overwrite }),
        ),
    ]
}

/// What a sink must write for the exact product `dot` over the old value `old` (scalar definition).
fn expected<T: Element>(
    what: &str,
    (scale, bias, bank): (&[f32], &[f32], &RowBank),
    at: [usize; 2],
    dot: f32,
    old: T,
) -> T {
    let old = old.to_f32();
    let [row, col] = at;
    let v = match what {
        "row epilogue, accumulate" => bank.expected(row, col, dot, old, true),
        "row epilogue, overwrite" => bank.expected(row, col, dot, old, false),
        "plain rounding" => Epilogue { scale: None, bias: None, accumulate: false }.apply(col, dot, old),
        "epilogue, accumulate" => {
            Epilogue { scale: Some(scale), bias: Some(bias), accumulate: true }.apply(col, dot, old)
        }
        "epilogue, overwrite" => Epilogue { scale: Some(scale), bias: None, accumulate: false }.apply(col, dot, old),
        "update add" => Update::Add.apply(old, dot),
        "update sub" => Update::Sub.apply(old, dot),
        _ => Update::Overwrite.apply(old, dot),
    };
    T::from_f32(v)
}

/// `y[row, col] <- sink(x[row, col])` through `kern`'s products with the identity, on `rows` rows
/// and `m` columns (k = m), for every sink; each element checked against [`expected`].
fn check_tier<T: Element>(kern: &Kernels<T>, rows: usize, m: usize, seed: u32) {
    let k = m;
    let x = values(rows * k, seed);
    let scale = values(m, seed + 1).iter().map(|v| v.clamp(-4.0, 4.0)).collect::<Vec<_>>();
    let bias = values(m, seed + 2).iter().map(|v| v.clamp(-1e6, 1e6)).collect::<Vec<_>>();
    let old: Vec<T> = values(rows * m, seed + 3).into_iter().map(T::from_f32).collect();
    let identity = Panels::from_fn(m, k, |c, kk| T::from_f32(if c == kk { 1.0 } else { 0.0 }));
    let bank = RowBank::new(&scale, &bias);
    let resolved = Resolved { accumulate: bank.resolved(true), overwrite: bank.resolved(false) };
    for (what, make) in sinks::<T>(&scale, &bias, &resolved) {
        let mut y = old.clone();
        let sink = make(MatMut::from_slice(&mut y, rows, m).unwrap());
        let mut scratch = vec![0.0f32; rows.div_ceil(8) * 8 * k];
        let left = pack_rows(MatRef::from_slice(&x, rows, k).unwrap(), &mut scratch);
        // SAFETY: k_len = k = k_cap of the panels; the sink covers rows x m, all this call's.
        unsafe { (kern.gemm)(left, &identity, 0..m.div_ceil(NR), &sink) };
        for (idx, got) in y.iter().enumerate() {
            let (row, col) = (idx / m, idx % m);
            // The chain starts at +0, so a -0 input comes out as +0: the dot is `x + 0`.
            let want = expected(what, (&scale, &bias, &bank), [row, col], x[row * k + col] + 0.0, old[idx]);
            assert_eq!(
                got.to_f64().to_bits(),
                want.to_f64().to_bits(),
                "{} {:?} {what}: y[{row},{col}] = {got:?}, want {want:?} (x = {:e}, rows {rows}, m {m})",
                kern.facts().isa,
                T::DTYPE,
                x[row * k + col],
            );
        }
    }
}

/// The column-sum sink (`sums[slot(row), col] += other[row, col] · acc`) through `kern`'s products
/// with the identity, against its scalar definition applied row by row in order, bit for bit;
/// rows in slots 0, 1 and none in turn.
fn check_column_dot<T: Element>(kern: &Kernels<T>, rows: usize, m: usize, seed: u32) {
    let x = values(rows * m, seed);
    let other: Vec<T> = values(rows * m, seed + 4).into_iter().map(T::from_f32).collect();
    let slots: Vec<i32> = (0..rows).map(|t| [0, 1, -1][t % 3]).collect();
    let start = values(2 * m, seed + 5);
    let identity = Panels::from_fn(m, m, |c, kk| T::from_f32(if c == kk { 1.0 } else { 0.0 }));
    let other_ref = MatRef::from_slice(&other, rows, m).unwrap();
    let mut got = start.clone();
    let mut sums = MatMut::from_slice(&mut got, 2, m).unwrap();
    let sink = Sink::ColumnDot { other: other_ref, sums: sums.as_ptr_mat(), slots: Some(&slots) };
    let mut scratch = vec![0.0f32; rows.div_ceil(8) * 8 * m];
    let left = pack_rows(MatRef::from_slice(&x, rows, m).unwrap(), &mut scratch);
    // SAFETY: k_len = m = k_cap of the panels; the sums cover 2 x m, all this call's.
    unsafe { (kern.gemm)(left, &identity, 0..m.div_ceil(NR), &sink) };
    let mut want = start;
    for t in 0..rows {
        let Ok(slot) = usize::try_from(slots[t]) else { continue };
        for col in 0..m {
            // The chain starts at +0, so a -0 input comes out as +0.
            want[slot * m + col] += other[t * m + col].to_f32() * (x[t * m + col] + 0.0);
        }
    }
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(
            g.to_bits(),
            w.to_bits(),
            "{} {:?}: sums[{i}] = {g}, want {w} (rows {rows}, m {m})",
            kern.facts().isa,
            T::DTYPE
        );
    }
}

#[test]
fn every_tier_sums_columns_exactly_as_the_scalar_sink() {
    for isa in Isa::available() {
        for (i, (rows, m)) in [(1, 61), (5, 64), (13, 70), (9, 31)].into_iter().enumerate() {
            check_column_dot(kernels_on::<f32>(isa), rows, m, i as u32);
            check_column_dot(kernels_on::<f16>(isa), rows, m, i as u32 + 10);
            check_column_dot(kernels_on::<bf16>(isa), rows, m, i as u32 + 20);
        }
    }
}

fn check_all_tiers<T: Element>() {
    for isa in Isa::available() {
        let kern = kernels_on::<T>(isa);
        // One row (decode, several panels per call), 3 and 5 rows (decode / blocked remainders),
        // 13 rows (a full tile and a remainder); widths with masked tails and whole panels.
        for (i, (rows, m)) in [(1, 61), (3, 33), (5, 64), (13, 70), (2, 1), (9, 31)].into_iter().enumerate() {
            check_tier(kern, rows, m, i as u32);
        }
    }
}

#[test]
fn every_tier_stores_f32_exactly_as_the_scalar_sink() {
    check_all_tiers::<f32>();
}

#[test]
fn every_tier_rounds_f16_stores_bit_for_bit_as_half() {
    check_all_tiers::<f16>();
}

#[test]
fn every_tier_rounds_bf16_stores_bit_for_bit_as_half() {
    check_all_tiers::<bf16>();
}

/// bf16 products of `rows x m` inputs with the identity as pair panels, through every sink, checked
/// element by element against [`expected`]; `run(x bits, identity, sink)` runs one kernel.
fn check_pair_products(
    isa: Isa,
    (rows, m): (usize, usize),
    run: impl Fn(MatRef<'_, u16>, &Panels<u32>, &Sink<'_, bf16>),
) {
    // bf16 inputs of normal magnitude (vdpbf16ps and tdpbf16ps flush subnormals), and the identity
    // as pairs.
    let x: Vec<bf16> = values(rows * m, 7).into_iter().map(|v| bf16::from_f32(v.clamp(-1e20, 1e20))).collect();
    let x: Vec<bf16> = x.into_iter().map(|v| if v.to_f32().abs() < 1e-30 { bf16::ONE } else { v }).collect();
    let one = u32::from(bf16::ONE.to_bits());
    let identity = Panels::from_fn(m, m.div_ceil(2), |c, p| match c.checked_sub(2 * p) {
        Some(0) => one,
        Some(1) => one << 16,
        _ => 0,
    });
    let old: Vec<bf16> = values(rows * m, 8).into_iter().map(bf16::from_f32).collect();
    let scale = values(m, 9).iter().map(|v| v.clamp(-4.0, 4.0)).collect::<Vec<_>>();
    let bias = values(m, 10).iter().map(|v| v.clamp(-1e6, 1e6)).collect::<Vec<_>>();
    let bank = RowBank::new(&scale, &bias);
    let resolved = Resolved { accumulate: bank.resolved(true), overwrite: bank.resolved(false) };
    let bits: Vec<u16> = x.iter().map(|v| v.to_bits()).collect();
    for (what, make) in sinks::<bf16>(&scale, &bias, &resolved) {
        let mut y = old.clone();
        let sink = make(MatMut::from_slice(&mut y, rows, m).unwrap());
        run(MatRef::from_slice(&bits, rows, m).unwrap(), &identity, &sink);
        for (idx, got) in y.iter().enumerate() {
            let (row, col) = (idx / m, idx % m);
            let want = expected(what, (&scale, &bias, &bank), [row, col], x[row * m + col].to_f32() + 0.0, old[idx]);
            assert_eq!(got.to_bits(), want.to_bits(), "{isa} {what}: y[{row},{col}] = {got:?}, want {want:?}");
        }
    }
}

#[test]
fn the_pair_kernels_store_through_the_same_sinks() {
    for isa in Isa::available() {
        let kern = kernels_on::<bf16>(isa);
        let Some(gemm_pairs) = kern.gemm_pairs else { continue };
        let (rows, m) = (11, 45);
        check_pair_products(isa, (rows, m), |bits, identity, sink| {
            let mut scratch = vec![0u32; rows.div_ceil(8) * 8 * m.div_ceil(2)];
            let left = pack_pairs(bits, &mut scratch);
            // SAFETY: the pair panels hold ceil(m / 2) pair rows; the sink covers rows x m.
            unsafe { gemm_pairs(left, m, identity, 0..m.div_ceil(NR), sink) };
        });
    }
}

/// The AMX tile kernel on the identity: 2 x 2 blocks (32 rows), a 1 x 2 remainder (5 rows) and a
/// lone 1 x 2 block (16 rows and fewer); widths with tile steps and a tail of pairs (45: one
/// 16-pair step, 6 pairs, and an odd last element; 64: two whole steps; 97: three steps and an odd
/// element; 1100: five k slices, the last of 2 steps, with partial sums kept between them; 250 x
/// 600: eight blocks, the last of 26 rows, and three k slices over 19 panels, which run in two
/// groups of panels, each asking for the next one's first slice ahead), on this CPU's caches and
/// on a small CPU's (slices of 4 steps; 250 x 600 in ten groups of panels).
#[test]
fn the_tile_kernels_store_through_the_same_sinks() {
    let mut ran = false;
    for isa in Isa::available() {
        let kern = kernels_on::<bf16>(isa);
        let Some(gemm_tiles) = kern.gemm_tiles else { continue };
        with_each_cache_size(|_| {
            for (rows, m) in [(37, 45), (16, 64), (3, 97), (64, 33), (35, 1100), (250, 600)] {
                check_pair_products(isa, (rows, m), |bits, identity, sink| {
                    let mut scratch = vec![0u32; RowPairs::len_for(rows, m.div_ceil(2))];
                    let left = pack_row_pairs(bits, &mut scratch);
                    // SAFETY: the tier is available (its table exists); the pair panels hold
                    // ceil(m / 2) pair rows; the sink covers rows x m.
                    unsafe { gemm_tiles(left, m, identity, 0..m.div_ceil(NR), sink) };
                });
            }
        });
        ran = true;
    }
    if !ran {
        println!("AMX tile kernels not tested: {}", Isa::Amx.unavailable_reason().unwrap_or("?"));
    }
}

/// The f16 tile kernels ([`Layout::Split`]) on the identity: each output is one f16 value split
/// into bf16 parts and summed back (`hi·1 + hi·0 + lo·1`), so it must equal the f16 value exactly,
/// and IEEE's `Σ_k x_k·I_ck` where a row holds an infinity or a NaN (an infinity stays one in its own
/// column and makes NaN in the others, as `∞·0` does). Shapes as for the bf16 tile kernels: 2 x 2
/// and 1 x 2 blocks, a partial last step of k, and several k slices (1100: 105 split steps; 250 x
/// 600: 57 of them over two groups of panels), on this CPU's caches and on a small CPU's.
#[test]
fn the_split_tile_kernels_give_f16_products_exactly() {
    let mut ran = false;
    for isa in Isa::available() {
        let kern = kernels_on::<f16>(isa);
        if kern.facts().layout != Layout::Split {
            continue;
        }
        let gemm_tiles = kern.gemm_tiles.expect("a split table has tile kernels");
        with_each_cache_size(|caches| {
            for (rows, m) in [(37, 45), (16, 64), (3, 97), (64, 33), (35, 1100), (250, 600)] {
                let finite = |v: f32| f16::from_f32(v.clamp(-65504.0, 65504.0));
                let mut x: Vec<f16> = values(rows * m, 11).into_iter().map(finite).collect();
                // Row 1: one infinity; row 2: a NaN and an infinity of the other sign.
                if rows > 2 {
                    x[m + m / 2] = f16::INFINITY;
                    x[2 * m] = f16::NAN;
                    x[2 * m + m - 1] = f16::NEG_INFINITY;
                }
                let eye: Vec<f16> = (0..m * m).map(|i| f16::from_f32(if i / m == i % m { 1.0 } else { 0.0 })).collect();
                let eye = MatRef::from_slice(&eye, m, m).unwrap();
                let packed = pack_projections(eye, eye, Layout::Split);
                let mut scratch = vec![0u32; RowPairs::len_for(rows, split_pairs(m))];
                let left = pack_row_split(MatRef::from_slice(&x, rows, m).unwrap(), &mut scratch);
                let mut y = vec![f32::NAN; rows * m];
                let sink = Sink::F32 { out: MatMut::from_slice(&mut y, rows, m).unwrap().as_ptr_mat(), scale: None };
                // SAFETY: the tier is available (its table exists); the split panels hold
                // split_pairs(m) = left.k_len pair rows; the sink covers rows x m.
                unsafe { gemm_tiles(left, 2 * left.k_len, packed.down.pairs(), 0..m.div_ceil(NR), &sink) };
                for (idx, got) in y.iter().enumerate() {
                    let (row, col) = (idx / m, idx % m);
                    let want: f64 = (0..m).map(|k| x[row * m + k].to_f64() * if k == col { 1.0 } else { 0.0 }).sum();
                    let same = if want.is_nan() { got.is_nan() } else { f64::from(*got) == want };
                    assert!(same, "{isa}, {caches} ({rows}, {m}): y[{row},{col}] = {got}, want {want}");
                }
            }
        });
        ran = true;
    }
    if !ran {
        println!("AMX split tile kernels not tested: {}", Isa::Amx.unavailable_reason().unwrap_or("?"));
    }
}

/// Every f16 is exactly the sum of its bf16 parts; an f32 is within 2^-16 of its own (the bound
/// `reference::forward_error_bound` takes for `u`), or within half of bf16's subnormal spacing
/// (2^-134) where the low part is subnormal (tiles flush it: the bound's flush term); infinities
/// and NaN keep their high part alone.
#[test]
fn split_parts_are_exact_for_f16_and_within_2_pow_minus_16_for_f32() {
    let part = |b: u32| f64::from(f32::from_bits(b << 16));
    for bits in 0..=u16::MAX {
        let v = f16::from_bits(bits);
        let (hi, lo) = split_bits(v.to_f32());
        if v.is_finite() {
            assert_eq!(part(hi) + part(lo), v.to_f64(), "{v}");
        } else {
            let h = f32::from_bits(hi << 16);
            assert!(lo == 0 && (if v.is_nan() { h.is_nan() } else { h == v.to_f32() }), "{v}: {h} {lo}");
        }
    }
    for v in values(100_000, 12) {
        let (hi, lo) = split_bits(v);
        let err = (f64::from(v) - part(hi) - part(lo)).abs();
        assert!(err <= f64::from(v).abs() * 2f64.powi(-16) + 2f64.powi(-134), "{v}: {err}");
    }
}

/// The three bf16 parts of an f32 sum back to it within 2^-24 of its magnitude (the bound
/// `reference::delta_error_bound` takes for a split merge), or within half of bf16's subnormal
/// spacing (2^-134) where a part is subnormal (tiles flush it: the bound's flush term); infinities
/// and NaN keep their high part alone.
#[test]
fn split3_parts_are_within_2_pow_minus_24_of_an_f32() {
    let part = |b: u32| f64::from(f32::from_bits(b << 16));
    for v in values(200_000, 0).into_iter().chain([f32::MAX, f32::MIN_POSITIVE, 1.0 + f32::EPSILON, -3.0e-39]) {
        let [hi, mid, lo] = split3_bits(v);
        let err = (f64::from(v) - part(hi) - part(mid) - part(lo)).abs();
        if part(hi).is_finite() {
            assert!(err <= f64::from(v).abs() * 2f64.powi(-24) + 2f64.powi(-134), "{v}: {err}");
        }
    }
    for v in [f32::INFINITY, f32::NEG_INFINITY, f32::NAN] {
        let [hi, mid, lo] = split3_bits(v);
        let h = f32::from_bits(hi << 16);
        assert!(mid == 0 && lo == 0 && (if v.is_nan() { h.is_nan() } else { h == v }), "{v}: {h} {mid} {lo}");
    }
}

/// The bf16 merge's tile products (`c` in f32 split into three parts against bf16 weights
/// repeated three times): within `reference::delta_error_bound`'s split term of the exact f64
/// product on random operands (2 x 2 and 1 x 2 blocks, partial steps, several k slices: r = 1100
/// is 105 split steps), and on the identity each value back within 2^-24, an infinity in `c`
/// staying an infinity in its own column and making NaN in the others (as `∞·0` does), and an
/// infinite weight making an infinity where it meets a non-zero `c`.
#[test]
fn the_merge_tile_kernels_give_f32_products_within_the_split_bound() {
    let mut ran = false;
    for isa in Isa::available() {
        let kern = kernels_on::<bf16>(isa);
        if kern.facts().layout != Layout::Tiles {
            continue;
        }
        let gemm_tiles = kern.gemm_tiles.expect("a tiles table has tile kernels");
        for (rows, r, cols) in [(37, 45, 40), (16, 64, 33), (3, 97, 70), (35, 1100, 40)] {
            let mut x = 0x9e37_79b9u32.wrapping_mul((rows * r + cols) as u32) | 1;
            let mut draw = move || {
                x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                let unit = (x >> 8) as f32 / (1u32 << 24) as f32 - 0.5;
                unit * 2f32.powi((x % 21) as i32 - 10)
            };
            // y = c · wᵀ for `rows x r` values c and `cols x r` bf16 weights w, on the tiles.
            let run = |c: &[f32], w: &[bf16], cols: usize| {
                let panels = split_panels(cols, r, |col, j| tripled_bits(u32::from(w[col * r + j].to_bits())));
                let mut scratch = vec![0u32; RowPairs::len_for(rows, split_pairs(r))];
                let left = pack_row_split3(MatRef::from_slice(c, rows, r).unwrap(), &mut scratch);
                let mut y = vec![f32::NAN; rows * cols];
                let sink = Sink::F32 { out: MatMut::from_slice(&mut y, rows, cols).unwrap().as_ptr_mat(), scale: None };
                // SAFETY: the tier is available (its table exists); the panels hold split_pairs(r) =
                // left.k_len pair rows; the sink covers rows x cols.
                unsafe { gemm_tiles(left, 2 * left.k_len, &panels, 0..cols.div_ceil(NR), &sink) };
                y
            };
            let mut c: Vec<f32> = (0..rows * r).map(|_| draw()).collect();
            let w: Vec<bf16> = (0..cols * r).map(|_| bf16::from_f32(draw())).collect();
            let y = run(&c, &w, cols);
            let (e, u) = (2f64.powi(-8), 2f64.powi(-24));
            let g = 3.0 * r as f64 * u / (1.0 - 3.0 * r as f64 * u);
            let rel = g * (1.0 + e) * (1.0 + 2.0 * e) + e * e * e;
            for (idx, got) in y.iter().enumerate() {
                let (row, col) = (idx / cols, idx % cols);
                let terms = (0..r).map(|j| f64::from(c[row * r + j]) * w[col * r + j].to_f64());
                let (want, mag) = terms.fold((0.0, 0.0), |(s, m), t| (s + t, m + t.abs()));
                let err = (f64::from(*got) - want).abs();
                assert!(
                    err <= rel * mag,
                    "{isa} ({rows}, {r}, {cols}): y[{row},{col}] = {got}, want {want}, err {err}"
                );
            }

            // The identity (r x r weights), with infinities and NaN.
            if rows > 2 {
                c[r + r / 2] = f32::INFINITY;
                c[2 * r] = f32::NAN;
            }
            let mut eye: Vec<bf16> =
                (0..r * r).map(|i| bf16::from_f32(if i / r == i % r { 1.0 } else { 0.0 })).collect();
            // Column 1's weight for k = 1 infinite: row 0 meets it with a finite non-zero c.
            eye[r + 1] = bf16::INFINITY;
            let y = run(&c, &eye, r);
            for (idx, got) in y.iter().enumerate() {
                let (row, col) = (idx / r, idx % r);
                let want: f64 = (0..r).map(|k| f64::from(c[row * r + k]) * eye[col * r + k].to_f64()).sum();
                let ok = if want.is_nan() {
                    got.is_nan()
                } else if want.is_infinite() {
                    f64::from(*got) == want
                } else {
                    (f64::from(*got) - want).abs() <= want.abs() * u
                };
                assert!(ok, "{isa} ({rows}, {r}) identity: y[{row},{col}] = {got}, want {want}");
            }
        }
        ran = true;
    }
    if !ran {
        println!("AMX merge tile kernels not tested: {}", Isa::Amx.unavailable_reason().unwrap_or("?"));
    }
}
