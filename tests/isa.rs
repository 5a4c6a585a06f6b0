//! Tier selection in one process: `with_isa` makes every available tier the active one on the
//! calling thread, lowers a tier the CPU lacks, restores the previous one, and leaves other threads
//! alone; f32 and f16 never report the bf16 dot-product or AMX tiers. (How `VERA_KERNELS_ISA`, the
//! detected tier and the vendor combine is the table test of `lower` in `src/cpu/isa.rs`.)

use vera_kernels::{active_isa, bf16, f16, tier_facts, with_isa, Isa, Layout};

#[test]
fn with_isa_selects_each_available_tier_on_this_thread() {
    let outside = active_isa::<bf16>();
    for isa in Isa::available() {
        with_isa(isa, || {
            assert_eq!(active_isa::<bf16>(), isa);
            // f32 and f16 have no use for the bf16 dot-product or tile instructions.
            let plain = if isa >= Isa::Avx512Bf16 { Isa::Avx512 } else { isa };
            assert_eq!(active_isa::<f32>(), plain);
            assert_eq!(active_isa::<f16>(), plain);
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
        // Only the tiles run the backward on bf16 operands.
        assert_eq!(facts.numerics().rounds_backward, isa == Isa::Amx);
        let f32_facts = with_isa(isa, tier_facts::<f32>);
        assert_eq!(f32_facts.layout, Layout::Wide);
        assert!(!f32_facts.rounds_u);
    }
}
