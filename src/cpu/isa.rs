//! Which instruction-set tier the CPU kernels run on: detection (once per process), the default
//! choice per vendor, and `VERA_KERNELS_ISA`, combined by one pure function, [`lower`].

use std::sync::OnceLock;

use crate::error::{Error, Result};

/// The instruction-set tier the CPU kernels run on, from slowest to fastest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum Isa {
    /// Portable SIMD through the `wide` crate (any CPU: SSE2 on baseline x86-64, NEON on aarch64).
    Portable,
    /// x86-64 AVX2 + FMA + F16C: 4 x 16 register passes over the same tiles and panels.
    Avx2,
    /// x86-64 AVX-512 F/BW/VL with FMA and F16C: 32-column f32 tiles, f16/bf16 widened in registers.
    Avx512,
    /// AVX-512 plus AVX512_BF16: bf16 products with `vdpbf16ps` (other dtypes as `Avx512`).
    Avx512Bf16,
    /// AVX512_BF16 plus Intel AMX-BF16 (and the operating system's leave to use its tile data):
    /// bf16 products on `tdpbf16ps` tiles, whatever their row count; other dtypes as `Avx512`.
    Amx,
}

/// The CPU vendor, as far as the choice of a default tier cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Vendor {
    /// `AuthenticAMD`.
    Amd,
    /// Any other (Intel, or a non-x86 CPU).
    Other,
}

impl Isa {
    /// Every tier, slowest first.
    pub const ALL: [Isa; 5] = [Isa::Portable, Isa::Avx2, Isa::Avx512, Isa::Avx512Bf16, Isa::Amx];

    /// The tier's name, as `vera bench` prints it and `VERA_KERNELS_ISA` takes it.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Portable => "portable",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
            Isa::Avx512Bf16 => "avx512bf16",
            Isa::Amx => "amx",
        }
    }

    /// The best tier this CPU supports (detected once).
    pub fn detected() -> Isa {
        static BEST: OnceLock<Isa> = OnceLock::new();
        *BEST.get_or_init(detect)
    }

    /// The tier used when nothing is asked for: [`Isa::detected`], except that `avx512bf16` is
    /// only the default on AMD CPUs (on an Intel CPU with AMX, `amx` is the default). On the Intel CPU these kernels were measured on (Sapphire
    /// Rapids class), `vdpbf16ps` ran at half the FMA rate and the bf16 products were about 25%
    /// faster on the `avx512` tier (f32 FMAs on weights widened once per cache block); on AMD Zen 4
    /// it runs at twice the FMA rate.
    pub fn preferred() -> Isa {
        lower(None, Isa::detected(), vendor())
    }

    /// The tier in use: [`Isa::preferred`], or the tier named by the environment variable
    /// `VERA_KERNELS_ISA` (`amx`, `avx512bf16`, `avx512`, `avx2` or `portable`) when it is set, lowered to
    /// [`Isa::detected`] if this CPU lacks it. Other values are ignored (`vera bench` rejects them).
    /// Read once per process.
    pub fn selected() -> Isa {
        static SELECTED: OnceLock<Isa> = OnceLock::new();
        *SELECTED.get_or_init(|| {
            let asked = std::env::var("VERA_KERNELS_ISA").ok().and_then(|v| v.parse::<Isa>().ok());
            lower(asked, Isa::detected(), vendor())
        })
    }

    /// Why this process cannot run this tier (the CPU lacks its instructions, or, for `amx`, the
    /// operating system does not grant tile state), or `None` when it can.
    pub fn unavailable_reason(self) -> Option<&'static str> {
        if self <= Isa::detected() {
            return None;
        }
        Some(match self {
            Isa::Portable => unreachable!("every CPU runs the portable tier"),
            Isa::Avx2 => "this CPU lacks AVX2, FMA or F16C",
            Isa::Avx512 => "this CPU lacks AVX-512 F/BW/VL",
            Isa::Avx512Bf16 => "this CPU lacks AVX512_BF16",
            #[cfg(target_arch = "x86_64")]
            Isa::Amx if has_avx512_bf16() => super::tiers::amx::usable().err().unwrap_or("AMX is not usable"),
            Isa::Amx => "this CPU lacks AVX512_BF16 or AMX-BF16",
        })
    }

    /// The tiers this CPU can run, slowest first (what the tests run every kernel on).
    pub fn available() -> impl Iterator<Item = Isa> {
        Isa::ALL.into_iter().filter(|&isa| isa <= Isa::detected())
    }
}

/// The tier to run: the one `asked` for, lowered to the `detected` one when the CPU lacks it; or,
/// when nothing is asked, the detected tier, except `avx512bf16` off AMD (see [`Isa::preferred`]).
pub(crate) fn lower(asked: Option<Isa>, detected: Isa, vendor: Vendor) -> Isa {
    match asked {
        Some(isa) => isa.min(detected),
        None if detected == Isa::Avx512Bf16 && vendor != Vendor::Amd => Isa::Avx512,
        None => detected,
    }
}

fn detect() -> Isa {
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx512_bf16() && super::tiers::amx::usable().is_ok() {
            return Isa::Amx;
        }
        if has_avx512_bf16() {
            return Isa::Avx512Bf16;
        }
        if has_avx512() {
            return Isa::Avx512;
        }
        if has_avx2() {
            return Isa::Avx2;
        }
    }
    Isa::Portable
}

/// Whether this CPU runs the AVX2 tier (AVX2, FMA, F16C).
#[cfg(target_arch = "x86_64")]
pub(crate) fn has_avx2() -> bool {
    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c")
}

/// Whether this CPU runs the AVX-512 tier (F, BW, VL, plus FMA and F16C, and AVX2, whose decode
/// kernel this tier borrows for f16 on AMD).
#[cfg(target_arch = "x86_64")]
pub(crate) fn has_avx512() -> bool {
    has_avx2()
        && is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vl")
}

/// Whether this CPU also has AVX512_BF16 (`vdpbf16ps`).
#[cfg(target_arch = "x86_64")]
pub(crate) fn has_avx512_bf16() -> bool {
    has_avx512() && is_x86_feature_detected!("avx512bf16")
}

/// The CPU's vendor (`cpuid` leaf 0), read once.
pub(crate) fn vendor() -> Vendor {
    static VENDOR: OnceLock<Vendor> = OnceLock::new();
    *VENDOR.get_or_init(|| {
        // Miri cannot run `cpuid` (inline assembly); under it only the portable tier runs, for
        // which the vendor does not matter.
        #[cfg(all(target_arch = "x86_64", not(miri)))]
        {
            // SAFETY: cpuid leaf 0 exists on every x86-64 CPU. (`__cpuid` is a safe function on
            // newer toolchains than this crate's minimum; the block keeps older ones compiling.)
            #[allow(unused_unsafe)]
            let id = unsafe { std::arch::x86_64::__cpuid(0) };
            let name = [id.ebx, id.edx, id.ecx].map(u32::to_le_bytes).concat();
            if name == b"AuthenticAMD" {
                return Vendor::Amd;
            }
        }
        Vendor::Other
    })
}

impl std::str::FromStr for Isa {
    type Err = Error;

    /// Parses a tier name as `VERA_KERNELS_ISA` takes it.
    fn from_str(s: &str) -> Result<Self> {
        Isa::ALL.into_iter().find(|isa| isa.name() == s).ok_or_else(|| Error::UnknownIsa { name: s.to_string() })
    }
}

impl std::fmt::Display for Isa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Isa::*;

    #[test]
    fn lower_takes_the_asked_tier_capped_by_the_cpu_and_prefers_bf16_dots_on_amd_only() {
        // (asked, detected, vendor) -> tier
        let table = [
            (None, Portable, Vendor::Amd, Portable),
            (None, Avx2, Vendor::Other, Avx2),
            (None, Avx512, Vendor::Amd, Avx512),
            (None, Avx512Bf16, Vendor::Amd, Avx512Bf16),
            (None, Avx512Bf16, Vendor::Other, Avx512),
            (Some(Avx512Bf16), Avx512Bf16, Vendor::Other, Avx512Bf16),
            (Some(Avx512Bf16), Avx512, Vendor::Amd, Avx512),
            (Some(Avx512Bf16), Avx2, Vendor::Amd, Avx2),
            (Some(Avx512), Portable, Vendor::Other, Portable),
            (Some(Avx2), Avx512Bf16, Vendor::Amd, Avx2),
            (Some(Portable), Avx512Bf16, Vendor::Other, Portable),
            (None, Amx, Vendor::Other, Amx),
            (Some(Avx512Bf16), Amx, Vendor::Other, Avx512Bf16),
            (Some(Amx), Avx512Bf16, Vendor::Other, Avx512Bf16),
            (Some(Amx), Avx512, Vendor::Amd, Avx512),
        ];
        for (asked, detected, vendor, want) in table {
            assert_eq!(lower(asked, detected, vendor), want, "{asked:?} {detected:?} {vendor:?}");
        }
    }

    #[test]
    fn names_round_trip_and_unknown_names_are_errors() {
        for isa in Isa::ALL {
            assert_eq!(isa.name().parse::<Isa>().unwrap(), isa);
            assert_eq!(isa.to_string(), isa.name());
        }
        let err = "avx1024".parse::<Isa>().unwrap_err().to_string();
        assert!(err.contains("avx1024"), "{err}");
    }

    #[test]
    fn a_tier_is_unavailable_exactly_when_it_is_above_the_detected_one() {
        for isa in Isa::ALL {
            assert_eq!(isa.unavailable_reason().is_none(), isa <= Isa::detected(), "{isa}");
        }
    }

    #[test]
    fn available_tiers_end_at_the_detected_one() {
        let tiers: Vec<Isa> = Isa::available().collect();
        assert_eq!(tiers.first(), Some(&Portable));
        assert_eq!(tiers.last(), Some(&Isa::detected()));
    }
}
