//! The ISA tier is detected once and chosen by `VERA_KERNELS_ISA` (lowered to what the CPU has);
//! CI runs the whole suite once per tier, and this test proves each run used the tier it asked for.

use vera_kernels::{active_isa, bf16, f16, Isa};

#[test]
fn the_environment_caps_the_tier() {
    let detected = Isa::detected();
    let expected = match std::env::var("VERA_KERNELS_ISA") {
        Ok(v) => v.parse::<Isa>().map_or(Isa::preferred(), |asked| asked.min(detected)),
        Err(_) => Isa::preferred(),
    };
    assert_eq!(Isa::selected(), expected);
    // f32 and f16 have no use for the bf16 dot-product instruction.
    let plain = if expected == Isa::Avx512Bf16 { Isa::Avx512 } else { expected };
    assert_eq!(active_isa::<f32>(), plain);
    assert_eq!(active_isa::<f16>(), plain);
    assert_eq!(active_isa::<bf16>(), expected);
}

#[test]
fn the_preferred_tier_is_one_the_cpu_has() {
    let (p, d) = (Isa::preferred(), Isa::detected());
    assert!(p <= d);
    // Only the bf16 dot-product tier is ever passed over.
    assert!(p == d || (d == Isa::Avx512Bf16 && p == Isa::Avx512));
}
