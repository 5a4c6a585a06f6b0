//! The device: [`CudaDevice`] opens a GPU through the driver (or, with feature `cuda-emulation`, stands
//! for the CPU emulation of one), reports its name and sizes, and makes the streams work is issued on.

use std::sync::Arc;

// The code names `Error` only without `cuda` or with `cuda-emulation`; the docs name it always.
#[cfg_attr(all(feature = "cuda", not(feature = "cuda-emulation")), allow(unused_imports))]
use crate::error::{Error, Result};

#[cfg(feature = "cuda")]
use super::driver;
use super::{CudaStream, StreamKind};

/// Streaming multiprocessors assumed by the emulated device when it plans launches (an H100/H200's
/// count, so that the emulator runs the same split-K plans a real GPU gets).
#[cfg(feature = "cuda-emulation")]
const EMULATED_SMS: usize = 132;

/// L2 cache reported by the emulated device: an H100/H200's 50 MiB, so that code sized by
/// [`CudaDevice::l2_cache_bytes`] runs the same way there.
#[cfg(feature = "cuda-emulation")]
const EMULATED_L2_BYTES: usize = 50 << 20;

/// A CUDA device: a GPU opened through the driver, or (feature `cuda-emulation`) the CPU emulation
/// of one. Cheap to clone; clones share the device.
#[derive(Clone)]
pub struct CudaDevice {
    inner: Arc<DeviceKind>,
}

enum DeviceKind {
    #[cfg(feature = "cuda")]
    Driver(driver::Gpu),
    #[cfg(feature = "cuda-emulation")]
    Emulated,
}

impl std::fmt::Debug for CudaDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaDevice").field("name", &self.name()).finish()
    }
}

impl CudaDevice {
    /// Opens GPU number `ordinal` and loads this crate's kernels into it.
    ///
    /// Errors: [`Error::NoCudaDevice`] when the CUDA driver library cannot be loaded, reports no
    /// device, or has no device `ordinal`; [`Error::Cuda`] when the kernels cannot be loaded (e.g. a
    /// driver older than CUDA 13.0 for a GPU without matching SASS). Without feature `cuda` (only
    /// `cuda-emulation`) this always returns [`Error::NoCudaDevice`].
    pub fn new(ordinal: usize) -> Result<Self> {
        #[cfg(feature = "cuda")]
        {
            driver::Gpu::open(ordinal).map(|gpu| CudaDevice { inner: Arc::new(DeviceKind::Driver(gpu)) })
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = ordinal;
            Err(Error::NoCudaDevice { reason: "this build of vera-kernels has no `cuda` feature".into() })
        }
    }

    /// The CPU emulation of a CUDA device: the same kernels, compiled for the host and run one CUDA
    /// thread at a time. Orders of magnitude slower than a GPU; for testing on machines without one.
    #[cfg(feature = "cuda-emulation")]
    pub fn emulated() -> Self {
        CudaDevice { inner: Arc::new(DeviceKind::Emulated) }
    }

    /// Whether this is the CPU emulation rather than a GPU.
    pub fn is_emulated(&self) -> bool {
        match &*self.inner {
            #[cfg(feature = "cuda")]
            DeviceKind::Driver(_) => false,
            #[cfg(feature = "cuda-emulation")]
            DeviceKind::Emulated => true,
        }
    }

    /// The device's name as the driver reports it (`"CPU emulation"` for the emulated device).
    pub fn name(&self) -> String {
        match &*self.inner {
            #[cfg(feature = "cuda")]
            DeviceKind::Driver(gpu) => gpu.name(),
            #[cfg(feature = "cuda-emulation")]
            DeviceKind::Emulated => "CPU emulation".into(),
        }
    }

    /// The device's own stream: one non-blocking stream made when the device opened, shared by
    /// every call of this method on the device and its clones (so calls through it run in order).
    /// Not CUDA's legacy NULL stream, which waits for every other stream of the context and cannot
    /// be captured into a CUDA graph.
    pub fn stream(&self) -> CudaStream {
        let kind = match &*self.inner {
            #[cfg(feature = "cuda")]
            DeviceKind::Driver(gpu) => StreamKind::Driver(gpu.stream()),
            #[cfg(feature = "cuda-emulation")]
            DeviceKind::Emulated => StreamKind::Emulated,
        };
        CudaStream::with_kind(self.clone(), kind)
    }

    /// A new stream on this device (work on different streams may overlap).
    pub fn new_stream(&self) -> Result<CudaStream> {
        let kind = match &*self.inner {
            #[cfg(feature = "cuda")]
            DeviceKind::Driver(gpu) => StreamKind::Driver(gpu.new_stream()?),
            #[cfg(feature = "cuda-emulation")]
            DeviceKind::Emulated => StreamKind::Emulated,
        };
        Ok(CudaStream::with_kind(self.clone(), kind))
    }

    /// The device's L2 cache in bytes, as the driver reports it (50 MiB for the emulated device).
    /// Benchmarks size their working sets by it, e.g. to time calls whose operands are not in L2.
    pub fn l2_cache_bytes(&self) -> usize {
        match &*self.inner {
            #[cfg(feature = "cuda")]
            DeviceKind::Driver(gpu) => gpu.l2_cache_bytes(),
            #[cfg(feature = "cuda-emulation")]
            DeviceKind::Emulated => EMULATED_L2_BYTES,
        }
    }

    pub(super) fn multiprocessors(&self) -> usize {
        match &*self.inner {
            #[cfg(feature = "cuda")]
            DeviceKind::Driver(gpu) => gpu.multiprocessors(),
            #[cfg(feature = "cuda-emulation")]
            DeviceKind::Emulated => EMULATED_SMS,
        }
    }

    /// The GPU behind this device; [`Error::DeviceMismatch`] for the emulated device (which a
    /// stream of a GPU never belongs to).
    #[cfg(feature = "cuda")]
    pub(super) fn gpu(&self) -> Result<&driver::Gpu> {
        match &*self.inner {
            DeviceKind::Driver(gpu) => Ok(gpu),
            #[cfg(feature = "cuda-emulation")]
            DeviceKind::Emulated => Err(Error::DeviceMismatch { what: "stream" }),
        }
    }
}
