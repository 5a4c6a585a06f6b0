//! A model saved by PEFT with three adapters (`tests/fixtures/peft-vera-train/multi/a0..a2`, one
//! sub-folder each) and PEFT's own output row by row with each row's adapter active
//! (`multi.safetensors`: `x`, `row_adapter`, `adapter_y` per layer): the mixed forward against it,
//! with negative controls, and the loader's checks that a bank's adapters share their projections.

mod common;

use std::collections::HashMap;

use common::{fixture_dir, read_f32_tensors, rel_err};
use safetensors::SafeTensors;
use vera_kernels::peft::{PeftAdapter, PeftAdapters, ProjectionSizes};
use vera_kernels::{forward_mixed, reference, tier_facts, Error, MatMut, MatRef, Mode};

const SIZES: [usize; 4] = [48, 40, 64, 24];

/// Every int32 tensor of the fixture, by name.
fn row_maps() -> HashMap<String, Vec<i32>> {
    let bytes = std::fs::read(fixture_dir("peft-vera-train/multi.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .filter(|(_, v)| v.dtype() == safetensors::Dtype::I32)
        .map(|(name, v)| (name, bytemuck::pod_collect_to_vec(v.data())))
        .collect()
}

#[test]
fn the_mixed_forward_is_pefts_row_by_row() {
    let set = PeftAdapters::load_saved(fixture_dir("peft-vera-train/multi")).unwrap();
    assert_eq!(set.names(), ["a0", "a1", "a2"]);
    // The same set, from the three directories.
    let dirs: Vec<_> = ["a0", "a1", "a2"].iter().map(|a| fixture_dir("peft-vera-train/multi").join(a)).collect();
    assert_eq!(PeftAdapters::load(&dirs).unwrap(), set);
    let projections = set.projections::<f32>(None).unwrap();
    let tensors = read_f32_tensors_but_ints();
    let maps = row_maps();
    for l in 0..3 {
        let module = format!("layers.{l}");
        let (n, m) = (SIZES[l], SIZES[l + 1]);
        let (x_shape, x) = &tensors[&format!("{module}.x")];
        let want = &tensors[&format!("{module}.adapter_y")].1;
        let rows = &maps[&format!("{module}.row_adapter")];
        let t = x_shape[0];
        assert!(rows.contains(&-1) && (0..3).all(|k| rows.contains(&k)), "the fixture mixes every case");
        let bank = set.bank(&module).unwrap();
        let run = |rows: &[i32]| {
            let mut y = vec![f32::NAN; t * m];
            let (xv, yv) = (MatRef::from_slice(x, t, n).unwrap(), MatMut::from_slice(&mut y, t, m).unwrap());
            forward_mixed(&projections, &bank, rows, xv, yv, Mode::Overwrite).unwrap();
            y
        };
        let y = run(rows);
        // Per element: ours and PEFT's are both f32 evaluations of the same sums, each within the
        // reference's forward-error bound of the exact value, so they differ by at most twice it.
        let layer = projections.slice(n, m).unwrap();
        let xv = MatRef::from_slice(x, t, n).unwrap();
        let numerics = tier_facts::<f32>().numerics();
        for (k, adapter) in set.adapters().iter().enumerate() {
            let adapter = adapter.module(&module).unwrap().adapter();
            let bound = reference::forward_error_bound(layer, adapter, xv, None, numerics).unwrap();
            for (row, _) in rows.iter().enumerate().filter(|(_, &id)| id == k as i32) {
                for i in 0..m {
                    let (got, peft) = (f64::from(y[row * m + i]), f64::from(want[row * m + i]));
                    let b = 2.0 * bound[row * m + i];
                    assert!(
                        (got - peft).abs() <= b,
                        "{module} row {row} (adapter {k}) [{i}]: {got} vs PEFT {peft}, bound {b}"
                    );
                }
            }
        }
        for (row, _) in rows.iter().enumerate().filter(|(_, &id)| id == -1) {
            assert!(y[row * m..(row + 1) * m].iter().all(|&v| v.to_bits() == 0), "{module} row {row}: not zeroed");
        }
        // Negative control: every row given the next adapter instead no longer matches.
        let shifted: Vec<i32> = rows.iter().map(|&id| if id < 0 { id } else { (id + 1) % 3 }).collect();
        let e = rel_err(&run(&shifted), want);
        assert!(e > 0.1, "{module}: shifted adapters still matched PEFT (relative error {e:e})");
    }
}

/// The fixture's f32 tensors (its int32 row maps are read by [`row_maps`]).
fn read_f32_tensors_but_ints() -> HashMap<String, (Vec<usize>, Vec<f32>)> {
    let path = fixture_dir("peft-vera-train/multi.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let keep: Vec<String> =
        st.tensors().into_iter().filter(|(_, v)| v.dtype() == safetensors::Dtype::F32).map(|(k, _)| k).collect();
    let _ = read_f32_tensors; // the shared reader asserts every tensor is f32
    keep.into_iter()
        .map(|k| {
            let v = st.tensor(&k).unwrap();
            let data: Vec<f32> = bytemuck::pod_collect_to_vec(v.data());
            (k, (v.shape().to_vec(), data))
        })
        .collect()
}

#[test]
fn a_bank_needs_adapters_made_for_the_same_projections() {
    let multi = fixture_dir("peft-vera-train/multi");
    // Same key and rank, and the same saved projections: the adapter before training joins.
    let ok = PeftAdapters::load(&[multi.join("a0"), fixture_dir("peft-vera-train/adapter")]).unwrap();
    assert_eq!(ok.names(), ["a0", "adapter"]);
    assert_eq!(ok.index_of("adapter"), Some(1));
    // Saved projections against ones drawn from another key (7).
    let seeded = fixture_dir("peft-vera-mlp-seeded/adapter");
    let err = PeftAdapters::load(&[multi.join("a0"), seeded.clone()]).unwrap_err();
    assert!(matches!(err, Error::ProjectionsDiffer { .. }), "{err}");
    assert!(err.to_string().contains("projection_prng_key = 7"), "{err}");
    // The other way round too.
    let err = PeftAdapters::load(&[seeded, multi.join("a1")]).unwrap_err();
    assert!(err.to_string().contains("\"a1\" was not made for the projections of adapter \"adapter\""), "{err}");
    // A module one adapter lacks: the error names the adapter.
    let mut modules = PeftAdapter::load(multi.join("a2")).unwrap().modules().clone();
    modules.remove("layers.1");
    let a2 = PeftAdapter::load(multi.join("a2")).unwrap();
    let lacking =
        PeftAdapter::new(a2.config().clone(), modules, a2.saved_projections().map(|(a, b)| (a.clone(), b.clone())))
            .unwrap_or_else(|e| panic!("{e}"));
    let set =
        PeftAdapters::new(vec![("a0".into(), PeftAdapter::load(multi.join("a0")).unwrap()), ("short".into(), lacking)]);
    match set {
        Ok(set) => {
            let err = set.bank("layers.1").unwrap_err().to_string();
            assert!(err.contains("layers.1 (in adapter short)"), "{err}");
        }
        // PEFT's config lists the module, so the adapter itself may refuse to lack it.
        Err(e) => assert!(e.to_string().contains("layers.1"), "{e}"),
    }
    // Nothing to load.
    assert_eq!(PeftAdapters::new(vec![]).unwrap_err(), Error::EmptyBank);
    let empty = std::env::temp_dir().join(format!("vera-empty-{}", std::process::id()));
    std::fs::create_dir_all(&empty).unwrap();
    let err = PeftAdapters::load_saved(&empty).unwrap_err().to_string();
    std::fs::remove_dir_all(&empty).unwrap();
    assert!(err.contains("no adapter here"), "{err}");
    // Sizes given with saved projections must agree with them.
    let set = PeftAdapters::load_saved(&multi).unwrap();
    assert!(set.projections::<f32>(Some(ProjectionSizes { n_max: 65, m_max: 64 })).is_err());
}
