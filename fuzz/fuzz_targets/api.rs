//! The public API with arbitrary shapes, strides, lengths, modes and dtypes: every call is either
//! `Ok` and within the f64 reference's derived error bound (`vera_kernels::reference`, as
//! `tests/forward_props.rs` checks it), or an `Err`; never a panic. A case is consistent (every
//! length and shape agrees) or carries exactly the inconsistencies drawn, so the target also checks
//! that consistent calls succeed and inconsistent ones fail. Every CPU tier this machine has runs
//! (chosen by the case's `dtype` byte).
//!
//! Sizes stay small (T ≤ 24, n, m ≤ 96, r ≤ 40) so that a case runs in well under a millisecond;
//! `Absurd` cases give views, projections and banks sizes up to `usize::MAX` over short buffers,
//! which must be refused without allocating.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use vera_kernels::{
    backward, backward_mixed, bf16, delta_weight, f16, forward, forward_mixed, forward_train, forward_train_mixed,
    merge, reference, tier_facts, unmerge, with_isa, Adapter, AdapterBank, Element, Gradients, Isa, LayerProjections,
    MatMut, MatRef, Mode, Projections, NO_ADAPTER,
};

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Op {
    Forward,
    ForwardTrain,
    Merge,
    Unmerge,
    Delta,
    Backward { saved_h: bool, with_x: bool, with_bias: bool },
    ForwardMixed { k: u8, train: bool },
    BackwardMixed { k: u8, saved_h: bool, with_x: bool, with_bias: bool },
}

/// Deliberate inconsistencies; all zero/false for a consistent call.
#[derive(Arbitrary, Debug, Clone, Copy, Default)]
struct Faults {
    /// Added to `lambda_d`'s length (mod 3, minus 1: -1, 0, +1).
    lambda_d: u8,
    lambda_b: u8,
    bias: u8,
    /// The output's (or dy's) row count off by one.
    y_rows: bool,
    /// n or m beyond the projections.
    n_over: bool,
    m_over: bool,
    /// A buffer one element short of its view.
    short_x: bool,
    /// A gradient buffer of the wrong length, h of the wrong shape.
    grad_len: bool,
    h_shape: bool,
    /// A row's adapter index out of range (mixed).
    bad_row: bool,
}

#[derive(Arbitrary, Debug)]
enum Absurd {
    View { rows: u8, cols: u8, stride: u8, len: u8, y_cols: u8, op: u8 },
    Projections { r: u8, n_max: u8, m_max: u8, a_len: u8, b_len: u8 },
    Layer { r: u8, n: u8, m: u8, stride: u8 },
}

#[derive(Arbitrary, Debug)]
struct Case {
    dtype: u8,
    op: Op,
    t: u8,
    n: u8,
    m: u8,
    r: u8,
    n_extra: u8,
    m_extra: u8,
    x_pad: u8,
    y_pad: u8,
    bias: bool,
    accumulate: bool,
    seed: u64,
    faults: Option<Faults>,
    absurd: Option<Absurd>,
    values: Vec<i8>,
}

/// A size far beyond any buffer: the interesting edges of `usize` arithmetic.
fn huge(sel: u8) -> usize {
    const H: [usize; 8] =
        [usize::MAX, usize::MAX - 1, 1 << 32, (1 << 32) + 1, 1 << 62, usize::MAX / 2 + 1, 3_037_000_500, 65_537];
    H[usize::from(sel) % H.len()]
}

/// A dimension: usually small, sometimes `huge` (the high bit of `sel`).
fn dim_or_huge(sel: u8) -> usize {
    if sel & 0x80 != 0 {
        huge(sel)
    } else {
        usize::from(sel % 8)
    }
}

/// Bounded values (|v| ≤ 2, multiples of 1/64: exact in every dtype) cycled from the fuzz bytes.
struct Values<'a> {
    src: &'a [i8],
    at: usize,
    salt: u32,
}

impl Values<'_> {
    fn next(&mut self) -> f32 {
        self.at += 1;
        self.salt = self.salt.wrapping_mul(1_103_515_245).wrapping_add(12_345);
        let v = if self.src.is_empty() { (self.salt >> 24) as i8 } else { self.src[self.at % self.src.len()] };
        f32::from(v) / 64.0
    }

    fn vec(&mut self, len: usize) -> Vec<f32> {
        (0..len).map(|_| self.next()).collect()
    }

    fn elems<T: Element>(&mut self, len: usize) -> Vec<T> {
        (0..len).map(|_| T::from_f32(self.next())).collect()
    }
}

fn off(len: usize, delta: u8) -> usize {
    match delta % 3 {
        0 => len.saturating_sub(1),
        1 => len,
        _ => len + 1,
    }
}

fuzz_target!(|case: Case| {
    if let Some(absurd) = &case.absurd {
        run_absurd(absurd);
        return;
    }
    // The dtype from `dtype % 3`, the CPU tier (of those this machine has) from the rest.
    let isas: Vec<Isa> = Isa::available().collect();
    let isa = isas[usize::from(case.dtype / 3) % isas.len()];
    with_isa(isa, || match case.dtype % 3 {
        0 => run::<f32>(&case),
        1 => run::<f16>(&case),
        _ => run::<bf16>(&case),
    });
});

/// Views, projections and layers of absurd sizes over short buffers: refused, never allocated.
fn run_absurd(absurd: &Absurd) {
    let buf = vec![0.5f32; 64];
    let mut out = vec![0.0f32; 64];
    match *absurd {
        Absurd::View { rows, cols, stride, len, y_cols, op } => {
            let (rows, cols, stride) = (dim_or_huge(rows), dim_or_huge(cols), dim_or_huge(stride));
            let len = usize::from(len) % 65;
            let fits = |rows: usize| {
                rows == 0
                    || cols == 0
                    || (stride >= cols
                        && (rows - 1).checked_mul(stride).and_then(|s| s.checked_add(cols)).is_some_and(|s| s <= len))
            };
            let v = MatRef::new(&buf[..len], rows, cols, stride);
            assert_eq!(
                v.is_ok(),
                fits(rows) && stride >= cols,
                "MatRef::new({rows}, {cols}, {stride}) on {len}: {v:?}"
            );
            let w = MatMut::new(&mut out[..len], rows, cols, stride);
            assert_eq!(w.is_ok(), fits(rows) && stride >= cols, "MatMut::new({rows}, {cols}, {stride}) on {len}");
            // A view that was accepted runs through an op with an output of as many rows: a
            // mismatch is an Err, never a panic (nor a loop over rows that hold nothing).
            let Ok(x) = v else { return };
            let p = Projections::<f32>::from_seed(1, 4, 8, 8).unwrap();
            let y_cols = usize::from(y_cols % 9);
            let a = Adapter::new(vec![1.0; 4], vec![1.0; y_cols.max(1)]).unwrap();
            let Ok(yv) = MatMut::new(&mut out[..], rows, y_cols, y_cols) else { return };
            let res = match op % 3 {
                0 => forward(&p, &a, x, yv, Mode::Accumulate),
                1 => {
                    let mut h = vec![0.0f32; 64];
                    match MatMut::new(&mut h[..], rows, 4, 4) {
                        Ok(h) => forward_train(&p, &a, x, yv, Mode::Overwrite, h),
                        Err(_) => return,
                    }
                }
                _ => {
                    let (mut gd, mut gb) = (vec![0.0f32; 4], vec![0.0f32; y_cols.max(1)]);
                    backward(&p, &a, x, yv.as_ref(), None, Gradients::new(&mut gd, &mut gb), Mode::Accumulate)
                }
            };
            if let Err(e) = res {
                assert!(!e.to_string().is_empty());
            }
        }
        Absurd::Projections { r, n_max, m_max, a_len, b_len } => {
            let (r, n_max, m_max) = (dim_or_huge(r), dim_or_huge(n_max), dim_or_huge(m_max));
            let (a_len, b_len) = (usize::from(a_len) % 65, usize::from(b_len) % 65);
            let p = Projections::<f32>::from_arrays(buf[..a_len].to_vec(), buf[..b_len].to_vec(), r, n_max, m_max);
            let fits = r.checked_mul(n_max) == Some(a_len) && m_max.checked_mul(r) == Some(b_len);
            if p.is_ok() {
                assert!(fits && r > 0, "from_arrays accepted r {r}, n_max {n_max}, m_max {m_max}");
            }
        }
        Absurd::Layer { r, n, m, stride } => {
            let (r, n, m, stride) = (dim_or_huge(r), dim_or_huge(n), dim_or_huge(m), dim_or_huge(stride));
            let (Ok(a), Ok(b)) = (MatRef::new(&buf[..], r, n, stride), MatRef::new(&buf[..], m, r, stride)) else {
                return;
            };
            if let Ok(layer) = LayerProjections::new(a, b) {
                let ad = Adapter::new(vec![1.0; r.min(64)], vec![1.0; m.min(64)]);
                if let Ok(ad) = ad {
                    let x = MatRef::new(&buf[..], 1, n.min(64), n.min(64));
                    let mut y = vec![0.0f32; 64];
                    if let (Ok(x), Ok(yv)) = (x, MatMut::new(&mut y[..], 1, m.min(64), m.min(64))) {
                        let _ = vera_kernels::forward_layer(layer, &ad, x, yv, Mode::Overwrite);
                    }
                }
            }
        }
    }
}

fn run<T: Element>(c: &Case) {
    let (t, n, m, r) = (usize::from(c.t) % 25, usize::from(c.n) % 97, usize::from(c.m) % 97, usize::from(c.r) % 41);
    let (n_max, m_max) = (n + usize::from(c.n_extra % 5), m + usize::from(c.m_extra % 5));
    let f = c.faults.unwrap_or_default();
    let mut vals = Values { src: &c.values, at: 0, salt: c.seed as u32 };

    let Ok(projections) = Projections::<T>::from_seed(c.seed, r, n_max, m_max) else {
        assert!(r == 0 || n_max == 0 || m_max == 0, "from_seed({r}, {n_max}, {m_max}) failed");
        return;
    };
    // The layer's sizes, possibly beyond the projections.
    let n_l = if f.n_over { n_max + 1 } else { n };
    let m_l = if f.m_over { m_max + 1 } else { m };
    let mode = if c.accumulate { Mode::Accumulate } else { Mode::Overwrite };
    let d_len = off(r, f.lambda_d.wrapping_add(1));
    let b_len = off(m_l, f.lambda_b.wrapping_add(1));
    let bias_len = off(m_l, f.bias.wrapping_add(1));
    let make_adapter = |vals: &mut Values| {
        let a = Adapter::new(vals.vec(d_len), vals.vec(b_len));
        if c.bias {
            a.and_then(|a| a.with_bias(vals.vec(bias_len)))
        } else {
            a
        }
    };
    // Adapter::new checks nothing about the layer; its own lengths must be accepted.
    let adapter = match make_adapter(&mut vals) {
        Ok(a) => a,
        Err(_) => {
            assert!(d_len == 0 || b_len == 0 || (c.bias && bias_len != b_len), "Adapter::new refused a valid adapter");
            return;
        }
    };
    // The call is consistent unless a fault was drawn; zero sizes have no expectation either way.
    let sized = t > 0 && n_l > 0 && m_l > 0 && r > 0;
    let lens_ok = d_len == r && b_len == m_l && (!c.bias || bias_len == m_l) && !f.n_over && !f.m_over;

    let (x_stride, y_stride) = (n_l + usize::from(c.x_pad % 4), m_l + usize::from(c.y_pad % 4));
    let x_len = if t == 0 { 0 } else { (t - 1) * x_stride + n_l };
    let mut x_buf = vals.elems::<T>(x_len);
    if f.short_x {
        if x_buf.pop().is_none() {
            return;
        }
        // An empty view (no rows or no columns) needs no elements.
        if n_l > 0 {
            assert!(MatRef::new(&x_buf, t, n_l, x_stride).is_err(), "a short x was accepted");
        }
        return;
    }
    let x = MatRef::new(&x_buf, t, n_l, x_stride).unwrap();
    let t_y = if f.y_rows { t + 1 } else { t };
    let y_len = if t_y == 0 { 0 } else { (t_y - 1) * y_stride + m_l };
    let y0 = vals.elems::<T>(y_len);
    let mut y = y0.clone();
    let numerics = tier_facts::<T>().numerics();

    match c.op {
        Op::Forward | Op::ForwardTrain => {
            let yv = MatMut::new(&mut y, t_y, m_l, y_stride).unwrap();
            let mut h = vec![0.0f32; t * r + usize::from(f.h_shape)];
            let (h_rows, h_cols) = if f.h_shape { (t + 1, r) } else { (t, r) };
            let res = if matches!(c.op, Op::Forward) {
                forward(&projections, &adapter, x, yv, mode)
            } else {
                let hm = MatMut::new(&mut h, h_rows, h_cols, h_cols.max(1));
                match hm {
                    Ok(hm) => forward_train(&projections, &adapter, x, yv, mode, hm),
                    Err(_) => return,
                }
            };
            let ok = lens_ok && !f.y_rows && !(f.h_shape && matches!(c.op, Op::ForwardTrain));
            expect(sized, ok, &res, "forward");
            if res.is_ok() {
                let layer = projections.slice(n_l, m_l).unwrap();
                let base = MatRef::new(&y0, t, m_l, y_stride).unwrap();
                let base = c.accumulate.then_some(base);
                let want = reference::forward(layer, &adapter, x, base).unwrap();
                let bound = reference::forward_error_bound(layer, &adapter, x, base, numerics).unwrap();
                check_rows(&y, &y0, t, m_l, y_stride, &want, &bound, "forward");
            }
        }
        Op::Merge | Op::Unmerge | Op::Delta => {
            let mut w0 = vals.elems::<T>(m_l * n_l);
            if f.y_rows {
                w0.push(T::default());
            }
            let rows = if f.y_rows { m_l + 1 } else { m_l };
            let w_before = w0.clone();
            let wv = match MatMut::new(&mut w0, rows, n_l, n_l) {
                Ok(wv) => wv,
                Err(_) => return,
            };
            let res = match c.op {
                Op::Merge => merge(&projections, &adapter, wv),
                Op::Unmerge => unmerge(&projections, &adapter, wv),
                _ => delta_weight(&projections, &adapter, wv),
            };
            expect(sized, lens_ok && !f.y_rows, &res, "merge");
            if res.is_ok() && m_l > 0 && n_l > 0 {
                let layer = projections.slice(n_l, m_l).unwrap();
                let dw = reference::delta_weight(layer, &adapter).unwrap();
                let base = MatRef::from_slice(&w_before, m_l, n_l).unwrap();
                let (sign, base_opt) = match c.op {
                    Op::Merge => (1.0, Some(base)),
                    Op::Unmerge => (-1.0, Some(base)),
                    _ => (1.0, None),
                };
                let bound = reference::delta_error_bound(layer, &adapter, base_opt, numerics).unwrap();
                for (idx, got) in w0.iter().enumerate() {
                    let old = if base_opt.is_some() { w_before[idx].to_f64() } else { 0.0 };
                    let want = old + sign * dw[idx];
                    let got = got.to_f64();
                    assert!((got - want).abs() <= bound[idx], "W[{idx}] = {got}, want {want}, bound {}", bound[idx]);
                }
            }
        }
        Op::Backward { saved_h, with_x, with_bias } => {
            // dy [T, m] in the y buffer's shape.
            let dy = MatRef::new(&y0, t_y, m_l, y_stride).unwrap();
            let mut h = vec![0.0f32; t * r];
            if saved_h && lens_ok && !f.y_rows {
                let mut scratch = y0.clone();
                let yv = MatMut::new(&mut scratch, t, m_l, y_stride).unwrap();
                let hm = MatMut::new(&mut h, t, r, r.max(1)).unwrap();
                let res = forward_train(&projections, &adapter, x, yv, Mode::Overwrite, hm);
                expect(sized, true, &res, "forward_train for h");
            }
            let g_len = usize::from(f.grad_len);
            let (mut gd, mut gb, mut gbias) = (vec![0.0f32; r + g_len], vec![0.0f32; m_l], vec![0.0f32; m_l]);
            let mut dx = vec![T::default(); t * n_l];
            let mut grads = Gradients::new(&mut gd, &mut gb);
            if with_bias {
                grads = grads.with_bias(&mut gbias);
            }
            if with_x {
                grads = grads.with_x(MatMut::new(&mut dx, t, n_l, n_l.max(1)).unwrap());
            }
            let h_shape = if f.h_shape { (t, r + 1) } else { (t, r) };
            let hv = if saved_h {
                h.resize(h_shape.0 * h_shape.1, 0.0);
                Some(MatRef::new(&h, h_shape.0, h_shape.1, h_shape.1.max(1)).unwrap())
            } else {
                None
            };
            let res = backward(&projections, &adapter, x, dy, hv, grads, mode);
            let ok = lens_ok && !f.y_rows && !f.grad_len && !(saved_h && f.h_shape);
            expect(sized, ok, &res, "backward");
            if res.is_ok() && sized {
                let layer = projections.slice(n_l, m_l).unwrap();
                let want = reference::backward(layer, &adapter, x, dy).unwrap();
                let bound = reference::backward_error_bound(layer, &adapter, x, dy, numerics).unwrap();
                let close = |what: &str, got: &[f32], w: &[f64], b: &[f64]| {
                    for (i, (&g, (&w, &b))) in got.iter().zip(w.iter().zip(b)).enumerate() {
                        let g = f64::from(g);
                        // Accumulate adds one more f32 rounding onto the zero start.
                        let b = b + 2.0f64.powi(-24) * (w.abs() + b);
                        assert!((g - w).abs() <= b, "{what}[{i}] = {g}, reference {w}, bound {b}");
                    }
                };
                close("dlambda_d", &gd, &want.lambda_d, &bound.lambda_d);
                close("dlambda_b", &gb, &want.lambda_b, &bound.lambda_b);
                if with_bias {
                    close("dbias", &gbias, &want.bias, &bound.bias);
                }
                if with_x {
                    let dxf: Vec<f32> = dx.iter().map(|v| v.to_f32()).collect();
                    close("dx", &dxf, &want.x, &bound.x);
                }
            }
        }
        Op::ForwardMixed { k, train } => {
            let k = usize::from(k % 4) + 1;
            let Some(bank_adapters) = bank(&adapter, k, &mut vals, make_adapter) else { return };
            let Ok(bank) = AdapterBank::new(&bank_adapters) else { return };
            let rows = row_map(t, k, f.bad_row, &mut vals);
            let yv = MatMut::new(&mut y, t_y, m_l, y_stride).unwrap();
            let res = if train {
                let mut h = vec![0.0f32; t * r];
                let hm = MatMut::new(&mut h, t, r, r.max(1)).unwrap();
                forward_train_mixed(&projections, &bank, &rows, x, yv, mode, hm)
            } else {
                forward_mixed(&projections, &bank, &rows, x, yv, mode)
            };
            expect(sized, lens_ok && !f.y_rows && !f.bad_row, &res, "forward_mixed");
            if res.is_ok() && sized {
                let layer = projections.slice(n_l, m_l).unwrap();
                for (ti, &row) in rows.iter().enumerate() {
                    let got = &y[ti * y_stride..ti * y_stride + m_l];
                    let old = &y0[ti * y_stride..ti * y_stride + m_l];
                    if row == NO_ADAPTER {
                        for (g, o) in got.iter().zip(old) {
                            let want = if c.accumulate { o.to_f64() } else { 0.0 };
                            assert_eq!(g.to_f64(), want, "row {ti} without an adapter changed");
                        }
                        continue;
                    }
                    let a = &bank_adapters[row as usize];
                    let xr = MatRef::new(&x_buf[ti * x_stride..], 1, n_l, n_l).unwrap();
                    let base = c.accumulate.then(|| MatRef::new(old, 1, m_l, m_l).unwrap());
                    let want = reference::forward(layer, a, xr, base).unwrap();
                    let bound = reference::forward_error_bound(layer, a, xr, base, numerics).unwrap();
                    for i in 0..m_l {
                        let g = got[i].to_f64();
                        assert!((g - want[i]).abs() <= bound[i], "mixed y[{ti},{i}] = {g}, want {}", want[i]);
                    }
                }
            }
        }
        Op::BackwardMixed { k, saved_h, with_x, with_bias } => {
            let k = usize::from(k % 4) + 1;
            let Some(bank_adapters) = bank(&adapter, k, &mut vals, make_adapter) else { return };
            let Ok(bank) = AdapterBank::new(&bank_adapters) else { return };
            let rows = row_map(t, k, f.bad_row, &mut vals);
            let dy = MatRef::new(&y0, t_y, m_l, y_stride).unwrap();
            let h = vec![0.25f32; t * r];
            let hv = saved_h.then(|| MatRef::new(&h, t, r, r.max(1)).unwrap());
            let g_len = usize::from(f.grad_len);
            let (mut gd, mut gb, mut gbias) =
                (vec![0.0f32; k * r + g_len], vec![0.0f32; k * m_l], vec![0.0f32; k * m_l]);
            let mut dx = vec![T::default(); t * n_l];
            let mut grads = Gradients::new(&mut gd, &mut gb);
            if with_bias {
                grads = grads.with_bias(&mut gbias);
            }
            if with_x {
                grads = grads.with_x(MatMut::new(&mut dx, t, n_l, n_l.max(1)).unwrap());
            }
            let res = backward_mixed(&projections, &bank, &rows, x, dy, hv, grads, mode);
            expect(sized, lens_ok && !f.y_rows && !f.bad_row && !f.grad_len, &res, "backward_mixed");
            // Values are checked by tests/mixed_props.rs; here: no panic, and the Ok/Err contract.
        }
    }
}

/// `k` adapters of the same shapes as `first` (the first is `first` itself).
fn bank(
    first: &Adapter,
    k: usize,
    vals: &mut Values,
    make: impl Fn(&mut Values) -> vera_kernels::Result<Adapter>,
) -> Option<Vec<Adapter>> {
    let mut v = vec![first.clone()];
    for _ in 1..k {
        v.push(make(vals).ok()?);
    }
    Some(v)
}

/// One adapter index per row (or `NO_ADAPTER`); with `bad`, one out of range.
fn row_map(t: usize, k: usize, bad: bool, vals: &mut Values) -> Vec<i32> {
    let mut rows: Vec<i32> =
        (0..t).map(|_| (vals.next() * 64.0) as i32).map(|v| v.rem_euclid(k as i32 + 1) - 1).collect();
    if bad {
        let v = if vals.next() > 0.0 { k as i32 } else { -2 };
        match rows.first_mut() {
            Some(first) => *first = v,
            None => rows.push(v),
        }
    }
    rows
}

/// `Ok` when the call is consistent, `Err` when it is not (for calls of non-zero sizes).
fn expect(sized: bool, consistent: bool, res: &vera_kernels::Result<()>, what: &str) {
    if let Err(e) = res {
        assert!(!e.to_string().is_empty());
    }
    if sized {
        assert_eq!(
            res.is_ok(),
            consistent,
            "{what}: {res:?} for a {} call",
            if consistent { "consistent" } else { "faulty" }
        );
    }
}

#[allow(clippy::too_many_arguments)]
fn check_rows<T: Element>(
    y: &[T],
    y0: &[T],
    t: usize,
    m: usize,
    stride: usize,
    want: &[f64],
    bound: &[f64],
    what: &str,
) {
    for ti in 0..t {
        for i in 0..m {
            let got = y[ti * stride + i].to_f64();
            let (w, b) = (want[ti * m + i], bound[ti * m + i]);
            assert!((got - w).abs() <= b, "{what}: y[{ti},{i}] = {got}, reference {w}, bound {b}");
        }
        for i in m..stride {
            if ti * stride + i < y.len() {
                assert_eq!(
                    y[ti * stride + i].to_f64().to_bits(),
                    y0[ti * stride + i].to_f64().to_bits(),
                    "padding written"
                );
            }
        }
    }
}
