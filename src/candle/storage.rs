//! candle CPU storage read as this crate's element slices, with a candle error (never a panic)
//! for any storage the kernels cannot take.

use super::*;

// --- Storage: candle CPU storage read as this crate's element slices, with a candle error (never a
// panic) for any storage the kernels cannot take.

/// A contiguous tensor's elements as a slice of `T`.
pub(super) fn elements<'a, T: candle_core::WithDType>(
    storage: &'a CpuStorage,
    layout: &Layout,
    what: &str,
) -> candle_core::Result<&'a [T]> {
    let (start, end) = layout.contiguous_offsets().ok_or_else(|| misuse(format!("{what} must be contiguous")))?;
    storage.as_slice::<T>()?.get(start..end).ok_or_else(|| misuse(format!("{what} out of range")))
}

/// This crate's element type for a candle dtype, or an error naming `what` for any other dtype.
pub(super) fn element_dtype(what: &str, dtype: candle_core::DType) -> candle_core::Result<DType> {
    match dtype {
        candle_core::DType::F32 => Ok(DType::F32),
        candle_core::DType::F16 => Ok(DType::F16),
        candle_core::DType::BF16 => Ok(DType::BF16),
        other => Err(misuse(format!("{what} has dtype {other:?}: expected f32, f16 or bf16"))),
    }
}

/// [`element_dtype`] of a storage.
pub(super) fn storage_dtype(what: &str, s: &CpuStorage) -> candle_core::Result<DType> {
    element_dtype(what, s.dtype())
}

/// The CPU storage behind a tensor's storage guard, or an error naming `what`.
pub(super) fn cpu<'a>(storage: &'a Storage, what: &str) -> candle_core::Result<&'a CpuStorage> {
    match storage {
        Storage::Cpu(s) => Ok(s),
        _ => Err(misuse(format!("{what} is not on the CPU, the only device this module runs on"))),
    }
}

/// A one-dimensional f32 vector of `len` elements (one of an adapter's vectors) from an op's
/// argument storage.
pub(super) fn f32_vector<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    what: &str,
    len: usize,
) -> candle_core::Result<&'a [f32]> {
    if storage.dtype() != candle_core::DType::F32 {
        return Err(misuse(format!("{what} has dtype {:?}: expected f32", storage.dtype())));
    }
    if layout.shape().dims() != [len] {
        return Err(misuse(format!("{what} has shape {:?}, expected [{len}]", layout.shape().dims())));
    }
    elements::<f32>(storage, layout, what)
}

/// The values of a one-dimensional f32 tensor of `len` elements (one of an adapter's vectors).
pub(super) fn f32_values(t: &Tensor, what: &str, len: usize) -> candle_core::Result<Vec<f32>> {
    let (storage, layout) = t.storage_and_layout();
    Ok(f32_vector(cpu(&storage, what)?, layout, what, len)?.to_vec())
}

/// A candle error for a tensor that is not on the CPU, the only device this module runs on.
pub(super) fn check_cpu(x: &Tensor) -> candle_core::Result<()> {
    check_cpu_for(x, "VeraLinear")
}

/// [`check_cpu`] for the layer type `layer`, which the message names.
pub(super) fn check_cpu_for(x: &Tensor, layer: &str) -> candle_core::Result<()> {
    if x.device().is_cpu() {
        Ok(())
    } else {
        Err(misuse(format!(
            "{layer} runs on the CPU only (x is on {:?}); vera-kernels' CUDA backend is not wired into candle",
            x.device().location()
        )))
    }
}
