//! Untyped device memory: a driver allocation on a GPU, or 16-byte aligned host memory for the
//! emulated device. The typed public wrappers (`DeviceMatrix`, ...) live in `resident.rs`.

use crate::error::{Error, Result};

use super::StreamKind;

/// Host memory standing in for device memory on the emulated device (16-byte aligned, like the
/// kernels' vector loads need).
#[cfg(feature = "cuda-emulation")]
pub(crate) struct HostBytes {
    words: Vec<u128>,
    len: usize,
}

pub(crate) enum Buffer {
    #[cfg(feature = "cuda")]
    Driver(cudarc::driver::CudaSlice<u8>),
    #[cfg(feature = "cuda-emulation")]
    Host(HostBytes),
}

impl Buffer {
    /// `bytes` zero bytes on the stream's device.
    pub(crate) fn zeros(stream: &StreamKind, bytes: usize) -> Result<Self> {
        match stream {
            #[cfg(feature = "cuda")]
            // A zero-length allocation is an error for the driver; keep one vector's worth.
            StreamKind::Driver(s) => s.alloc_zeros::<u8>(bytes.max(16)).map(Buffer::Driver).map_err(driver("alloc")),
            #[cfg(feature = "cuda-emulation")]
            StreamKind::Emulated => Ok(Buffer::Host(HostBytes::zeros(bytes))),
        }
    }

    /// A copy of `data` on the stream's device.
    pub(crate) fn from_host(stream: &StreamKind, data: &[u8]) -> Result<Self> {
        let mut buffer = Self::zeros(stream, data.len())?;
        buffer.write(stream, data)?;
        Ok(buffer)
    }

    /// Copies `data` to the start of the buffer (stream-ordered).
    pub(crate) fn write(&mut self, stream: &StreamKind, data: &[u8]) -> Result<()> {
        match (self, stream) {
            #[cfg(feature = "cuda")]
            (Buffer::Driver(slice), StreamKind::Driver(s)) => {
                let mut view = slice.slice_mut(0..data.len());
                s.memcpy_htod(data, &mut view).map_err(driver("copy to device"))
            }
            #[cfg(feature = "cuda-emulation")]
            (Buffer::Host(h), StreamKind::Emulated) => {
                h.bytes_mut()[..data.len()].copy_from_slice(data);
                Ok(())
            }
            #[allow(unreachable_patterns)]
            _ => Err(Error::DeviceMismatch { what: "a device buffer" }),
        }
    }

    /// Fills `out` from the start of the buffer (waits for the stream).
    pub(crate) fn read(&self, stream: &StreamKind, out: &mut [u8]) -> Result<()> {
        match (self, stream) {
            #[cfg(feature = "cuda")]
            (Buffer::Driver(slice), StreamKind::Driver(s)) => {
                s.memcpy_dtoh(&slice.slice(0..out.len()), out).map_err(driver("copy to host"))?;
                s.synchronize().map_err(driver("synchronize"))
            }
            #[cfg(feature = "cuda-emulation")]
            (Buffer::Host(h), StreamKind::Emulated) => {
                out.copy_from_slice(&h.bytes()[..out.len()]);
                Ok(())
            }
            #[allow(unreachable_patterns)]
            _ => Err(Error::DeviceMismatch { what: "a device buffer" }),
        }
    }

    /// Whether this buffer can be used on `stream` (same device and context).
    pub(crate) fn is_on(&self, stream: &StreamKind) -> bool {
        match (self, stream) {
            #[cfg(feature = "cuda")]
            // Two CudaDevice::new(0) handles are one primary context behind two Arcs: compare the
            // driver's context, not the handles.
            (Buffer::Driver(slice), StreamKind::Driver(s)) => slice.context().cu_ctx() == s.context().cu_ctx(),
            #[cfg(feature = "cuda-emulation")]
            (Buffer::Host(_), StreamKind::Emulated) => true,
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }
}

#[cfg(feature = "cuda-emulation")]
impl HostBytes {
    fn zeros(bytes: usize) -> Self {
        HostBytes { words: vec![0; bytes.div_ceil(16).max(1)], len: bytes }
    }

    fn bytes(&self) -> &[u8] {
        &bytemuck::cast_slice(&self.words)[..self.len]
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        &mut bytemuck::cast_slice_mut(&mut self.words)[..self.len]
    }

    /// The address the emulated kernels read through.
    pub(crate) fn address(&self) -> u64 {
        self.words.as_ptr() as u64
    }

    /// The address the emulated kernels write through.
    pub(crate) fn address_mut(&mut self) -> u64 {
        self.words.as_mut_ptr() as u64
    }
}

/// A stream's own scratch (its workspaces): on a GPU, device memory allocated outside cudarc's
/// slices, so that a launch passes its address without the event record and wait cudarc adds to
/// every use of a slice once a context has several streams (only the owning stream's kernels ever
/// touch it, in that stream's order); host memory on the emulated device.
pub(crate) enum WorkBuffer {
    #[cfg(feature = "cuda")]
    Driver(RawDeviceMemory),
    #[cfg(feature = "cuda-emulation")]
    Host(HostBytes),
}

impl WorkBuffer {
    /// `bytes` zero bytes for the stream's kernels (zeroed in the stream's order on a GPU).
    pub(crate) fn zeros(stream: &StreamKind, bytes: usize) -> Result<Self> {
        match stream {
            #[cfg(feature = "cuda")]
            StreamKind::Driver(s) => RawDeviceMemory::zeros(s, bytes).map(WorkBuffer::Driver),
            #[cfg(feature = "cuda-emulation")]
            StreamKind::Emulated => Ok(WorkBuffer::Host(HostBytes::zeros(bytes))),
        }
    }

    /// Size in bytes.
    pub(crate) fn len(&self) -> usize {
        match self {
            #[cfg(feature = "cuda")]
            WorkBuffer::Driver(d) => d.bytes,
            #[cfg(feature = "cuda-emulation")]
            WorkBuffer::Host(h) => h.len,
        }
    }

    /// The device address the GPU's kernels write through; [`Error::DeviceMismatch`] for the
    /// emulated device's memory.
    #[cfg(feature = "cuda")]
    pub(crate) fn device_address(&mut self) -> Result<u64> {
        match self {
            WorkBuffer::Driver(d) => Ok(d.ptr),
            #[cfg(feature = "cuda-emulation")]
            WorkBuffer::Host(_) => Err(Error::DeviceMismatch { what: "workspace" }),
        }
    }

    /// The host address the emulated kernels write through; [`Error::DeviceMismatch`] for a GPU's
    /// memory.
    #[cfg(feature = "cuda-emulation")]
    pub(crate) fn host_address(&mut self) -> Result<u64> {
        match self {
            WorkBuffer::Host(h) => Ok(h.address_mut()),
            #[cfg(feature = "cuda")]
            WorkBuffer::Driver(_) => Err(Error::DeviceMismatch { what: "workspace" }),
        }
    }
}

/// Device memory of one stream's context, allocated with `cuMemAlloc` and freed, after the
/// stream's queued work, when dropped.
#[cfg(feature = "cuda")]
pub(crate) struct RawDeviceMemory {
    ptr: cudarc::driver::sys::CUdeviceptr,
    bytes: usize,
    stream: std::sync::Arc<cudarc::driver::CudaStream>,
}

#[cfg(feature = "cuda")]
impl RawDeviceMemory {
    fn zeros(stream: &std::sync::Arc<cudarc::driver::CudaStream>, bytes: usize) -> Result<Self> {
        use cudarc::driver::result;
        // A zero-length allocation is an error for the driver; keep one vector's worth.
        let bytes = bytes.max(16);
        stream.context().bind_to_thread().map_err(driver("make the context current"))?;
        // SAFETY: the stream's context is current on this thread; the memory stays allocated
        // until `drop` frees it.
        let ptr = unsafe { result::malloc_sync(bytes) }.map_err(driver("alloc"))?;
        let memory = RawDeviceMemory { ptr, bytes, stream: stream.clone() };
        // SAFETY: `ptr` holds `bytes` bytes; the zeroing is queued on the stream, before any of
        // its kernels that use the memory.
        unsafe { result::memset_d8_async(ptr, 0, bytes, stream.cu_stream()) }.map_err(driver("zero device memory"))?;
        Ok(memory)
    }
}

#[cfg(feature = "cuda")]
impl Drop for RawDeviceMemory {
    fn drop(&mut self) {
        use cudarc::driver::result;
        let ctx = self.stream.context();
        // Kernels queued on the stream may still use the memory: wait for them first. A drop
        // cannot return errors; cudarc keeps them for the context's next checked call.
        ctx.record_err(ctx.bind_to_thread());
        ctx.record_err(self.stream.synchronize());
        // SAFETY: allocated by cuMemAlloc in this context, freed once, here, with no work left
        // that uses it (only this stream's kernels did).
        ctx.record_err(unsafe { result::free_sync(self.ptr) });
    }
}

/// Maps a cudarc driver error to [`Error::Cuda`] for `operation`.
#[cfg(feature = "cuda")]
pub(crate) fn driver(operation: &'static str) -> impl Fn(cudarc::driver::DriverError) -> Error {
    move |e| Error::Cuda { operation: operation.to_string(), message: e.to_string() }
}

impl Buffer {
    /// The driver allocation, or [`Error::DeviceMismatch`] for a buffer of the emulated device.
    #[cfg(feature = "cuda")]
    #[cfg_attr(not(feature = "cuda-emulation"), allow(unused_variables))]
    pub(crate) fn driver(&self, what: &'static str) -> Result<&cudarc::driver::CudaSlice<u8>> {
        match self {
            Buffer::Driver(s) => Ok(s),
            #[cfg(feature = "cuda-emulation")]
            Buffer::Host(_) => Err(Error::DeviceMismatch { what }),
        }
    }

    /// [`Buffer::driver`], for writing.
    #[cfg(feature = "cuda")]
    #[cfg_attr(not(feature = "cuda-emulation"), allow(unused_variables))]
    pub(crate) fn driver_mut(&mut self, what: &'static str) -> Result<&mut cudarc::driver::CudaSlice<u8>> {
        match self {
            Buffer::Driver(s) => Ok(s),
            #[cfg(feature = "cuda-emulation")]
            Buffer::Host(_) => Err(Error::DeviceMismatch { what }),
        }
    }

    /// The host memory of the emulated device, or [`Error::DeviceMismatch`] for a GPU buffer.
    #[cfg(feature = "cuda-emulation")]
    #[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
    pub(crate) fn host(&self, what: &'static str) -> Result<&HostBytes> {
        match self {
            Buffer::Host(h) => Ok(h),
            #[cfg(feature = "cuda")]
            Buffer::Driver(_) => Err(Error::DeviceMismatch { what }),
        }
    }

    /// [`Buffer::host`], for writing.
    #[cfg(feature = "cuda-emulation")]
    #[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
    pub(crate) fn host_mut(&mut self, what: &'static str) -> Result<&mut HostBytes> {
        match self {
            Buffer::Host(h) => Ok(h),
            #[cfg(feature = "cuda")]
            Buffer::Driver(_) => Err(Error::DeviceMismatch { what }),
        }
    }
}

impl Buffer {
    /// Copies all of `self` into `dst` (at least as long) on the stream.
    pub(crate) fn copy_to(&self, dst: &mut Buffer, stream: &StreamKind) -> Result<()> {
        match (self, dst, stream) {
            #[cfg(feature = "cuda")]
            (Buffer::Driver(src), Buffer::Driver(dst), StreamKind::Driver(s)) => {
                let mut view = dst.slice_mut(0..src.len());
                s.memcpy_dtod(src, &mut view).map_err(driver("copy on device"))
            }
            #[cfg(feature = "cuda-emulation")]
            (Buffer::Host(src), Buffer::Host(dst), StreamKind::Emulated) => {
                dst.bytes_mut()[..src.len].copy_from_slice(src.bytes());
                Ok(())
            }
            #[allow(unreachable_patterns)]
            _ => Err(Error::DeviceMismatch { what: "a device buffer" }),
        }
    }
}
