//! The PEFT loader on adapters made of fuzz bytes, through its in-memory entry points
//! (`VeraConfig::from_json`, `TensorFile::from_bytes`, `PeftAdapter::from_tensor_file`,
//! `PeftAdapters::new`); an adapter that loads is then used: its projections, each module's
//! forward and merge, its LoRA export, and a mixed batch over the set. Every outcome is `Ok` or an
//! `Err`, never a panic, and a loaded adapter's layers within its projections must run.
//!
//! Input: 5 control bytes (flags, `n` and `m` as little-endian u16), then `adapter_config.json`
//! and the first `adapter_model.safetensors`, each as a u32 length + bytes, then the rest: a second
//! adapter's weights (same config) when not empty. `make_corpus.py` writes the seeds that way.
#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;
use vera_kernels::peft::{
    InFeatures, LoraExportOptions, PeftAdapter, PeftAdapters, ProjectionSizes, TensorFile, VeraConfig,
};
use vera_kernels::{bf16, f16, forward, forward_mixed, Element, MatMut, MatRef, Mode, Projections, NO_ADAPTER};

/// Sizes of the projections regenerated from the seed stay below this, as do buffers the target
/// allocates: the point is the loader's checks, not the fuzzer's memory.
const MAX_SIZE: usize = 512;
const MAX_ELEMS: usize = 1 << 18;

#[derive(Clone, Copy)]
struct Control {
    dtype: u8,
    give_sizes: bool,
    own_n: bool,
    rows: usize,
    accumulate: bool,
    n: usize,
    m: usize,
}

fuzz_target!(|data: &[u8]| {
    let Some((ctl, rest)) = data.split_first_chunk::<5>() else { return };
    let c = Control {
        dtype: ctl[0] & 3,
        give_sizes: ctl[0] & 4 != 0,
        own_n: ctl[0] & 8 != 0,
        rows: usize::from((ctl[0] >> 4) & 3) + 1,
        accumulate: ctl[0] & 64 != 0,
        n: usize::from(u16::from_le_bytes([ctl[1], ctl[2]])) % (MAX_SIZE + 1),
        m: usize::from(u16::from_le_bytes([ctl[3], ctl[4]])) % (MAX_SIZE + 1),
    };
    let s = common::sections(rest, 3);
    let config = match VeraConfig::from_json(&String::from_utf8_lossy(s[0])) {
        Ok(config) => config,
        Err(e) => return describe(&e),
    };
    // A config that was read is written back and read again to the same config.
    if let Ok(json) = config.to_json() {
        assert_eq!(VeraConfig::from_json(&json).as_ref(), Ok(&config), "config round trip: {json}");
    }
    let Some(first) = load(&config, s[1]) else { return };
    match c.dtype {
        1 => exercise::<f16>(&first, c),
        2 => exercise::<bf16>(&first, c),
        _ => exercise::<f32>(&first, c),
    }
    let mut named = vec![("a0".to_string(), first)];
    if !s[2].is_empty() {
        let Some(second) = load(&config, s[2]) else { return };
        named.push(("a1".to_string(), second));
    }
    match PeftAdapters::new(named) {
        Ok(set) => match c.dtype {
            1 => exercise_set::<f16>(&set, c),
            2 => exercise_set::<bf16>(&set, c),
            _ => exercise_set::<f32>(&set, c),
        },
        Err(e) => describe(&e),
    }
});

fn describe(e: &vera_kernels::Error) {
    assert!(!e.to_string().is_empty());
}

fn load(config: &VeraConfig, bytes: &[u8]) -> Option<PeftAdapter> {
    let loaded = TensorFile::from_bytes("adapter_model.safetensors", bytes.to_vec())
        .and_then(|file| PeftAdapter::from_tensor_file(config.clone(), &file));
    loaded.map_err(|e| describe(&e)).ok()
}

/// The sizes to ask for: none for saved projections (unless the flag says to give them anyway).
fn sizes(saved: bool, c: Control) -> Option<ProjectionSizes> {
    (!saved || c.give_sizes).then_some(ProjectionSizes { n_max: c.n, m_max: c.m })
}

fn exercise<T: Element>(adapter: &PeftAdapter, c: Control) {
    let projections = match adapter.projections::<T>(sizes(adapter.saved_projections().is_some(), c)) {
        Ok(p) => p,
        Err(e) => return describe(&e),
    };
    for (name, module) in adapter.modules().iter().take(4) {
        let m = module.out_features();
        assert!(m <= projections.m_max(), "{name}: {m} outputs on projections of m_max {}", projections.m_max());
        let n = if c.own_n { c.n.max(1) } else { projections.n_max() };
        let fits = n <= projections.n_max();
        if c.rows * n.max(m) > MAX_ELEMS || m * n > MAX_ELEMS {
            continue;
        }
        let x = common::pattern(c.rows * n, 1);
        let mut y = vec![T::default(); c.rows * m];
        let xt: Vec<T> = x.iter().map(|&v| T::from_f32(v)).collect();
        let mode = if c.accumulate { Mode::Accumulate } else { Mode::Overwrite };
        let res = forward(
            &projections,
            module.adapter(),
            MatRef::from_slice(&xt, c.rows, n).unwrap(),
            MatMut::from_slice(&mut y, c.rows, m).unwrap(),
            mode,
        );
        assert_eq!(res.is_ok(), fits, "{name}: forward [{}, {n}] -> {m}: {res:?}", c.rows);

        // The base weight as PEFT stores it: [m, n], or [n, m] under fan_in_fan_out.
        let mut w: Vec<T> = common::pattern(m * n, 2).iter().map(|&v| T::from_f32(v)).collect();
        let (rows, cols) = if adapter.config().fan_in_fan_out { (n, m) } else { (m, n) };
        let res = adapter.merge_module(&projections, name, MatMut::from_slice(&mut w, rows, cols).unwrap());
        assert_eq!(res.is_ok(), fits, "{name}: merge [{rows}, {cols}]: {res:?}");
        if res.is_ok() {
            let res = adapter.unmerge_module(&projections, name, MatMut::from_slice(&mut w, rows, cols).unwrap());
            assert!(res.is_ok(), "{name}: unmerge after merge: {res:?}");
        }
    }
    // The LoRA export of every module at width n (bounded: r·n + m·r per module).
    let n = if c.own_n { c.n.max(1) } else { projections.n_max() };
    let total: usize = adapter.modules().values().map(|m| adapter.rank().saturating_mul(n + m.out_features())).sum();
    if total <= MAX_ELEMS {
        let mut options = LoraExportOptions::new(InFeatures::all(n)).with_dtype(T::DTYPE);
        if let Some(s) = sizes(adapter.saved_projections().is_some(), c) {
            options = options.with_sizes(s);
        }
        if let Err(e) = adapter.to_lora(&options) {
            describe(&e);
        }
    }
}

fn exercise_set<T: Element>(set: &PeftAdapters, c: Control) {
    let saved = set.adapters().iter().any(|a| a.saved_projections().is_some());
    let projections: Projections<T> = match set.projections(sizes(saved, c)) {
        Ok(p) => p,
        Err(e) => return describe(&e),
    };
    let first = &set.adapters()[0];
    for name in first.modules().keys().take(2) {
        let bank = match set.bank(name) {
            Ok(b) => b,
            Err(e) => {
                describe(&e);
                continue;
            }
        };
        let (n, m) = (projections.n_max(), bank.out_features());
        let t = c.rows + 2;
        if t * n.max(m) > MAX_ELEMS {
            continue;
        }
        let k = bank.len() as i32;
        let rows: Vec<i32> = (0..t as i32).map(|i| if i % (k + 1) == k { NO_ADAPTER } else { i % (k + 1) }).collect();
        let x: Vec<T> = common::pattern(t * n, 3).iter().map(|&v| T::from_f32(v)).collect();
        let mut y = vec![T::default(); t * m];
        let res = forward_mixed(
            &projections,
            &bank,
            &rows,
            MatRef::from_slice(&x, t, n).unwrap(),
            MatMut::from_slice(&mut y, t, m).unwrap(),
            Mode::Overwrite,
        );
        assert!(res.is_ok(), "{name}: mixed forward [{t}, {n}] -> {m} over {k} adapters: {res:?}");
    }
}
