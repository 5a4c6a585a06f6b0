//! The tiers' micro-kernels, one file per tier (see `cpu/README.md` for how to add one).

#[cfg(target_arch = "x86_64")]
pub(crate) mod amx;
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2;
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512;
#[cfg(target_arch = "x86_64")]
mod avx512_store;
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512bf16;
pub(crate) mod portable;
