//! Tier selection in one process: `with_isa` makes every available tier the active one on the
//! calling thread, lowers a tier the CPU lacks, restores the previous one, and leaves other threads
//! alone; f32 never reports the bf16 dot-product or AMX tiers, f16 only the AMX one. (How `VERA_KERNELS_ISA`, the
//! detected tier and the vendor combine is the table test of `lower` in `src/cpu/isa.rs`.)

use vera_kernels::{active_isa, bf16, f16, tier_facts, with_isa, Isa, Layout};

#[test]
fn with_isa_selects_each_available_tier_on_this_thread() {
    let outside = active_isa::<bf16>();
    for isa in Isa::available() {
        with_isa(isa, || {
            assert_eq!(active_isa::<bf16>(), isa);
            // f32 has no use for the bf16 dot-product or tile instructions; f16 uses the tiles
            // (split into bf16 parts), not the dot product.
            let plain = if isa >= Isa::Avx512Bf16 { Isa::Avx512 } else { isa };
            assert_eq!(active_isa::<f32>(), plain);
            assert_eq!(active_isa::<f16>(), if isa == Isa::Amx { isa } else { plain });
            // Another thread still runs the process-wide tier.
            let other = std::thread::scope(|s| s.spawn(active_isa::<bf16>).join().unwrap());
            assert_eq!(other, outside);
            // Nested selections restore the outer one.
            with_isa(Isa::Portable, || assert_eq!(active_isa::<bf16>(), Isa::Portable));
            assert_eq!(active_isa::<bf16>(), isa);
        });
    }
    assert_eq!(active_isa::<bf16>(), outside);
}

#[test]
fn a_tier_the_cpu_lacks_is_lowered_to_the_detected_one() {
    for isa in Isa::ALL {
        let got = with_isa(isa, active_isa::<bf16>);
        assert_eq!(got, isa.min(Isa::detected()));
    }
    assert!(Isa::selected() <= Isa::detected());
    assert!(Isa::preferred() <= Isa::detected());
}

#[test]
fn the_facts_follow_the_tier() {
    for isa in Isa::available() {
        let facts = with_isa(isa, tier_facts::<bf16>);
        assert_eq!(facts.isa, isa);
        // Only the bf16 dot-product tier packs pairs, and only the AMX tier tiles; only those two
        // round u and flush subnormals.
        assert_eq!(facts.layout == Layout::Pairs, isa == Isa::Avx512Bf16);
        assert_eq!(facts.layout == Layout::Tiles, isa == Isa::Amx);
        let bf16_products = isa >= Isa::Avx512Bf16;
        assert_eq!(facts.numerics().rounds_u, bf16_products);
        assert_eq!(facts.numerics().flushes_subnormals, bf16_products);
        // The pair and tile tiers run bf16's backward on bf16 operands.
        assert_eq!(facts.numerics().rounds_backward, bf16_products);
        // Only bf16 on tiles merges on split operands.
        assert_eq!(facts.numerics().splits_delta, isa == Isa::Amx);
        let f32_facts = with_isa(isa, tier_facts::<f32>);
        assert_eq!(f32_facts.layout, Layout::Wide);
        assert!(!f32_facts.rounds_u);
        // f16 splits its products into bf16 parts on tiles only, and only from a row count on
        // (decode runs Wide); it keeps u in f32 either way.
        let f16_facts = with_isa(isa, tier_facts::<f16>);
        assert_eq!(f16_facts.layout == Layout::Split, isa == Isa::Amx);
        assert_eq!(f16_facts.numerics().splits_products, isa == Isa::Amx);
        assert!(!f16_facts.rounds_u && !f16_facts.numerics().rounds_backward);
        assert!(!f16_facts.numerics().splits_delta && !f32_facts.numerics().splits_delta);
        assert_eq!(f16_facts.layout_for(1), Layout::Wide);
        assert_eq!(f16_facts.layout_for(4096), f16_facts.layout);
        // The backward runs in the forward's layout: bf16 on pairs or tiles (rounded) from
        // `avx512bf16` up, f16 split on tiles on `amx` only; elsewhere on the f32-FMA kernels,
        // whose numerics are the default.
        let fma = vera_kernels::Numerics::default();
        let bf16_want = if bf16_products { facts.numerics() } else { fma };
        assert_eq!(facts.backward_numerics(), bf16_want);
        let f16_want = if isa == Isa::Amx { f16_facts.numerics() } else { fma };
        assert_eq!(f16_facts.backward_numerics(), f16_want);
        assert_eq!(f32_facts.backward_numerics(), fma);
    }
}
