//! Which CUDA devices the GPU test files test ([`devices`]), from two switches that
//! scripts/gpu-check.sh sets:
//!
//! - `VERA_KERNELS_EXPECT_GPU=1`: a GPU must be found; a missing one fails the test instead of
//!   skipping it (so a run on the GPU machine cannot pass without testing the GPU).
//! - `VERA_KERNELS_SKIP_EMULATION=1`: test the GPU only, not also the CPU emulation of the kernels
//!   (which CI tests, and which is slow: on the GPU machine it would eat the time box).
#![allow(dead_code)]

use std::io::Write;
use std::sync::Once;

use vera_kernels::cuda::CudaDevice;

fn switch(name: &str) -> bool {
    std::env::var_os(name).is_some_and(|v| v == "1")
}

/// Whether `VERA_KERNELS_EXPECT_GPU=1`: a missing GPU is then a failure.
pub fn gpu_expected() -> bool {
    switch("VERA_KERNELS_EXPECT_GPU")
}

/// Whether `VERA_KERNELS_SKIP_EMULATION=1`: the emulated device is then left out of the tests.
pub fn emulation_skipped() -> bool {
    switch("VERA_KERNELS_SKIP_EMULATION")
}

/// The emulated device, unless `VERA_KERNELS_SKIP_EMULATION=1` (or the build has no emulation).
pub fn emulated_device() -> Option<CudaDevice> {
    #[cfg(feature = "cuda-emulation")]
    if !emulation_skipped() {
        return Some(CudaDevice::emulated());
    }
    None
}

/// The emulated device when `VERA_KERNELS_SKIP_EMULATION=1` left it out of [`devices`].
pub fn skipped_emulation() -> Option<CudaDevice> {
    #[cfg(feature = "cuda-emulation")]
    if emulation_skipped() {
        return Some(CudaDevice::emulated());
    }
    None
}

/// The devices to test, each with how many random cases it can afford (`emulated_cases` on the
/// emulation, `gpu_cases` on a GPU). Never empty: skipping the emulation on a machine without a GPU
/// would test nothing, which is a failure.
pub fn devices(emulated_cases: u32, gpu_cases: u32) -> Vec<(CudaDevice, u32)> {
    let mut devices: Vec<(CudaDevice, u32)> = emulated_device().into_iter().map(|d| (d, emulated_cases)).collect();
    match CudaDevice::new(0) {
        Ok(gpu) => devices.push((gpu, gpu_cases)),
        Err(e) => assert!(!gpu_expected(), "VERA_KERNELS_EXPECT_GPU=1 but no GPU: {e}"),
    }
    assert!(!devices.is_empty(), "no device to test: VERA_KERNELS_SKIP_EMULATION=1 and no GPU");
    devices
}

/// GPU 0, or `None` when there is none (with one line on stderr per process saying so and why);
/// panics instead when [`gpu_expected`].
pub fn gpu_or_skip(what: &str) -> Option<CudaDevice> {
    match CudaDevice::new(0) {
        Ok(gpu) => Some(gpu),
        Err(e) => {
            assert!(!gpu_expected(), "VERA_KERNELS_EXPECT_GPU=1 but no GPU: {e}");
            static SAID: Once = Once::new();
            SAID.call_once(|| {
                // Written to the process's stderr, not through eprintln!, which the test harness
                // captures and shows only for failing tests: the skip must be visible.
                let _ = writeln!(std::io::stderr(), "skipped: {what} need a GPU and there is none here ({e})");
            });
            None
        }
    }
}
