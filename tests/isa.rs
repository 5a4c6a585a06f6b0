//! The ISA tier is detected once and capped by `VERA_KERNELS_ISA`; CI runs the whole suite once
//! per tier this machine supports, and this test proves each run really used the tier it asked for.

use vera_kernels::{active_isa, bf16, f16, Isa};

#[test]
fn the_environment_caps_the_tier() {
    let detected = Isa::detected();
    let expected = match std::env::var("VERA_KERNELS_ISA") {
        Ok(v) => v.parse::<Isa>().map_or(detected, |cap| cap.min(detected)),
        Err(_) => detected,
    };
    assert_eq!(Isa::selected(), expected);
    // f32 and f16 have no use for the bf16 dot-product instruction.
    let plain = if expected == Isa::Avx512Bf16 { Isa::Avx512 } else { expected };
    assert_eq!(active_isa::<f32>(), plain);
    assert_eq!(active_isa::<f16>(), plain);
    assert_eq!(active_isa::<bf16>(), expected);
}
