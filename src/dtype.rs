//! Element types: `f32`, `half::f16` and `half::bf16`, all accumulated in `f32`.

use std::fmt;

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};

/// The storage type of a tensor, as a value (for messages, files and benchmarks).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    /// IEEE binary32.
    F32,
    /// IEEE binary16 (`half::f16`).
    F16,
    /// bfloat16 (`half::bf16`).
    BF16,
}

impl DType {
    /// The lower-case name used by the `vera` command and in JSON output (`f32`, `f16`, `bf16`).
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
        }
    }

    /// Size of one element in bytes.
    pub fn size_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for DType {
    type Err = crate::Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "f32" => Ok(DType::F32),
            "f16" => Ok(DType::F16),
            "bf16" => Ok(DType::BF16),
            other => Err(crate::Error::UnknownDType { name: other.to_string() }),
        }
    }
}

/// Runs an expression with a type name bound to the element type of a [`DType`] value: the one
/// place where a run-time dtype becomes a compile-time type (as candle's `Map1` does for its
/// storage), instead of a `match` at every call site.
///
/// ```
/// use vera_kernels::{with_element_type, DType, Element};
///
/// fn size<T: Element>() -> usize {
///     std::mem::size_of::<T>()
/// }
/// let dtype: DType = "bf16".parse()?;
/// assert_eq!(with_element_type!(dtype, T => size::<T>()), 2);
/// # Ok::<(), vera_kernels::Error>(())
/// ```
#[macro_export]
macro_rules! with_element_type {
    ($dtype:expr, $t:ident => $body:expr) => {
        match $dtype {
            $crate::DType::F32 => {
                type $t = f32;
                $body
            }
            $crate::DType::F16 => {
                type $t = $crate::f16;
                $body
            }
            $crate::DType::BF16 => {
                type $t = $crate::bf16;
                $body
            }
        }
    };
}

/// A floating-point element the kernels read and write.
///
/// Implemented for `f32`, [`half::f16`] and [`half::bf16`] only (the trait is sealed). Every kernel
/// widens elements to `f32`, accumulates in `f32` and rounds once when it stores a result.
pub trait Element:
    Copy + Default + fmt::Debug + PartialEq + Send + Sync + bytemuck::Pod + 'static + crate::sealed::Sealed
{
    /// This type as a [`DType`] value.
    const DTYPE: DType;
    /// Unit roundoff of the format (half the distance from 1 to the next number): 2^-24, 2^-11, 2^-8.
    const UNIT_ROUNDOFF: f64;
    /// Smallest positive subnormal number of the format: the absolute error of rounding near zero is
    /// at most half of it.
    const MIN_POSITIVE_SUBNORMAL: f64;

    /// Widens to `f32` (exact for every type).
    fn to_f32(self) -> f32;
    /// Rounds an `f32` to this type (round to nearest, ties to even).
    fn from_f32(v: f32) -> Self;
    /// Rounds an `f64` to this type in one step (round to nearest, ties to even).
    fn from_f64(v: f64) -> Self;
    /// Widens to `f64` (exact).
    fn to_f64(self) -> f64 {
        f64::from(self.to_f32())
    }
    /// Widens `src` into `dst` (same length) element by element.
    fn widen_slice(src: &[Self], dst: &mut [f32]);
    /// Rounds `src` into `dst` (same length) element by element.
    fn narrow_slice(src: &[f32], dst: &mut [Self]);
}

impl Element for f32 {
    const DTYPE: DType = DType::F32;
    const UNIT_ROUNDOFF: f64 = 5.960_464_477_539_063e-8; // 2^-24
    const MIN_POSITIVE_SUBNORMAL: f64 = 1.401_298_464_324_817e-45; // 2^-149

    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        v
    }
    #[inline(always)]
    fn from_f64(v: f64) -> Self {
        v as f32
    }
    #[inline(always)]
    fn widen_slice(src: &[Self], dst: &mut [f32]) {
        dst.copy_from_slice(src);
    }
    #[inline(always)]
    fn narrow_slice(src: &[f32], dst: &mut [Self]) {
        dst.copy_from_slice(src);
    }
}

impl Element for f16 {
    const DTYPE: DType = DType::F16;
    const UNIT_ROUNDOFF: f64 = 4.882_812_5e-4; // 2^-11
    const MIN_POSITIVE_SUBNORMAL: f64 = 5.960_464_477_539_063e-8; // 2^-24

    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        f16::from_f32(v)
    }
    #[inline(always)]
    fn from_f64(v: f64) -> Self {
        f16::from_f64(v)
    }
    #[inline(always)]
    fn widen_slice(src: &[Self], dst: &mut [f32]) {
        #[cfg(all(target_arch = "x86_64", not(miri)))]
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: AVX-512F was detected just above.
            return unsafe { widen_f16_avx512(src, dst) };
        }
        // half detects F16C at run time and converts 8 lanes per instruction when it is there.
        src.convert_to_f32_slice(dst);
    }
    #[inline(always)]
    fn narrow_slice(src: &[f32], dst: &mut [Self]) {
        dst.convert_from_f32_slice(src);
    }
}

/// `dst = src` widened, 16 elements per `vcvtph2ps`: `half`'s slice conversion calls a function
/// per 8 elements, which was a fifth of the f16 split packer's time.
///
/// # Safety
/// The CPU has AVX-512F.
#[cfg(all(target_arch = "x86_64", not(miri)))]
#[target_feature(enable = "avx512f")]
unsafe fn widen_f16_avx512(src: &[f16], dst: &mut [f32]) {
    use std::arch::x86_64::{__m256i, _mm256_loadu_si256, _mm512_cvtph_ps, _mm512_storeu_ps};
    assert_eq!(src.len(), dst.len(), "widen_slice takes slices of one length");
    let (whole, rest) = src.as_chunks::<16>();
    let (dst_whole, dst_rest) = dst.split_at_mut(16 * whole.len());
    for (s, d) in whole.iter().zip(dst_whole.as_chunks_mut::<16>().0) {
        // SAFETY: 16 f16 (32 bytes) are read from `s`, 16 f32 written to `d`.
        unsafe { _mm512_storeu_ps(d.as_mut_ptr(), _mm512_cvtph_ps(_mm256_loadu_si256(s.as_ptr().cast::<__m256i>()))) };
    }
    for (d, s) in dst_rest.iter_mut().zip(rest) {
        *d = s.to_f32();
    }
}

impl Element for bf16 {
    const DTYPE: DType = DType::BF16;
    const UNIT_ROUNDOFF: f64 = 3.906_25e-3; // 2^-8
    const MIN_POSITIVE_SUBNORMAL: f64 = 9.183_549_615_799_121e-41; // 2^-133

    #[inline(always)]
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        bf16::from_f32(v)
    }
    #[inline(always)]
    fn from_f64(v: f64) -> Self {
        bf16::from_f64(v)
    }
    #[inline(always)]
    fn widen_slice(src: &[Self], dst: &mut [f32]) {
        // bf16 is the top half of an f32: widening is a shift, which the compiler vectorises.
        for (d, s) in dst.iter_mut().zip(src) {
            *d = f32::from_bits(u32::from(s.to_bits()) << 16);
        }
    }
    #[inline(always)]
    fn narrow_slice(src: &[f32], dst: &mut [Self]) {
        dst.convert_from_f32_slice(src);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_roundoffs_match_the_formats() {
        assert_eq!(f32::UNIT_ROUNDOFF, f64::from(f32::EPSILON) / 2.0);
        assert_eq!(f16::UNIT_ROUNDOFF, f16::EPSILON.to_f64() / 2.0);
        assert_eq!(bf16::UNIT_ROUNDOFF, bf16::EPSILON.to_f64() / 2.0);
        assert_eq!(<f16 as Element>::MIN_POSITIVE_SUBNORMAL, f16::from_bits(1).to_f64());
        assert_eq!(<bf16 as Element>::MIN_POSITIVE_SUBNORMAL, bf16::from_bits(1).to_f64());
        assert_eq!(<f32 as Element>::MIN_POSITIVE_SUBNORMAL, f64::from(f32::from_bits(1)));
    }

    #[test]
    fn bf16_widening_is_exact_including_nan_and_inf() {
        let src: Vec<bf16> =
            [0.0f32, -1.5, 3.0e38, f32::INFINITY, f32::NAN, 1.0e-40].iter().map(|&v| bf16::from_f32(v)).collect();
        let mut dst = vec![0.0f32; src.len()];
        bf16::widen_slice(&src, &mut dst);
        for (s, d) in src.iter().zip(&dst) {
            assert_eq!(s.to_f32().to_bits(), d.to_bits());
        }
    }

    /// f16's slice widening (16 lanes per instruction where the CPU has AVX-512) gives `half`'s value
    /// for every f16 bit pattern (subnormals, infinities and NaNs included; NaNs compared by their
    /// bits), whole vectors and a tail of 15.
    #[test]
    fn f16_widening_matches_half_for_every_value() {
        let src: Vec<f16> = (0..=u16::MAX).chain(0..15).map(f16::from_bits).collect();
        let mut got = vec![0.0f32; src.len()];
        f16::widen_slice(&src, &mut got);
        for (s, g) in src.iter().zip(&got) {
            assert_eq!(g.to_bits(), s.to_f32().to_bits(), "f16 bits {:#06x}", s.to_bits());
        }
    }

    #[test]
    fn dtype_names_round_trip() {
        for d in [DType::F32, DType::F16, DType::BF16] {
            assert_eq!(d.name().parse::<DType>().unwrap(), d);
        }
        assert!(matches!("f64".parse::<DType>(), Err(crate::Error::UnknownDType { .. })));
    }
}
