//! The real GPU: the driver (loaded at run time by cudarc), the embedded fatbin, kernel launches.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::driver::{
    sys, CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DeviceRepr,
    LaunchConfig, PushKernelArg,
};

use super::buffer::driver;
use super::params::{DownParams, UpParams};
use super::plan::{Launch, Plan};
use crate::error::{Error, Result};

/// The kernels, compiled by build.rs: SASS for sm_80 and sm_90 and compute_80 PTX.
static FATBIN: &[u8] = include_bytes!(env!("VERA_KERNELS_FATBIN"));

// SAFETY: both are plain `#[repr(C)]` blocks of integers and device addresses, laid out exactly as
// the kernels' `DownParams` / `UpParams` (checked by size in params.rs), passed by value.
unsafe impl DeviceRepr for DownParams {}
unsafe impl DeviceRepr for UpParams {}

pub(crate) struct Gpu {
    ctx: Arc<CudaContext>,
    module: Arc<CudaModule>,
    functions: Mutex<HashMap<String, CudaFunction>>,
    multiprocessors: usize,
}

impl Gpu {
    pub(crate) fn open(ordinal: usize) -> Result<Self> {
        // SAFETY: `is_culib_present` only tries to dlopen the driver library by its usual names.
        // Checking first matters: cudarc's entry points panic when the library is missing.
        if !unsafe { sys::is_culib_present() } {
            return Err(Error::NoCudaDevice {
                reason: "the CUDA driver library (libcuda) cannot be loaded: no NVIDIA driver is installed, or \
                         it is not on the library path (LD_LIBRARY_PATH)"
                    .into(),
            });
        }
        let count = CudaContext::device_count()
            .map_err(|e| Error::NoCudaDevice { reason: format!("the driver reports no usable device: {e}") })?;
        if ordinal >= usize::try_from(count).unwrap_or(0) {
            return Err(Error::NoCudaDevice { reason: format!("device {ordinal} asked for, the driver sees {count}") });
        }
        let ctx = CudaContext::new(ordinal)
            .map_err(|e| Error::NoCudaDevice { reason: format!("cannot open device {ordinal}: {e}") })?;
        let module = ctx.load_module(cudarc::nvrtc::Ptx::from_binary(FATBIN.to_vec())).map_err(|e| Error::Cuda {
            operation: "load the kernels' fatbin (sm_80/sm_90 SASS, compute_80 PTX; needs a CUDA 13.0 driver)".into(),
            message: e.to_string(),
        })?;
        let multiprocessors = ctx
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(driver("query the multiprocessor count"))?;
        Ok(Gpu { ctx, module, functions: Mutex::new(HashMap::new()), multiprocessors: multiprocessors.max(1) as usize })
    }

    pub(crate) fn name(&self) -> String {
        self.ctx.name().unwrap_or_else(|e| format!("CUDA device {} ({e})", self.ctx.ordinal()))
    }

    pub(crate) fn default_stream(&self) -> Arc<CudaStream> {
        self.ctx.default_stream()
    }

    pub(crate) fn new_stream(&self) -> Result<Arc<CudaStream>> {
        self.ctx.new_stream().map_err(driver("create a stream"))
    }

    pub(crate) fn multiprocessors(&self) -> usize {
        self.multiprocessors
    }

    fn function(&self, name: &str) -> Result<CudaFunction> {
        let mut functions = self.functions.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = functions.get(name) {
            return Ok(f.clone());
        }
        let f = self
            .module
            .load_function(name)
            .map_err(|e| Error::Cuda { operation: format!("find kernel {name}"), message: e.to_string() })?;
        functions.insert(name.to_string(), f.clone());
        Ok(f)
    }

    fn launch<P: DeviceRepr>(&self, stream: &Arc<CudaStream>, launch: &Launch, params: &P) -> Result<()> {
        let f = self.function(&launch.kernel)?;
        let config = LaunchConfig {
            grid_dim: (launch.grid[0], launch.grid[1], launch.grid[2]),
            block_dim: (launch.block[0], launch.block[1], launch.block[2]),
            shared_mem_bytes: 0,
        };
        let mut args = stream.launch_builder(&f);
        args.arg(params);
        // SAFETY: the kernel takes exactly one by-value parameter block of type P (the names in the
        // plan and the types are paired in `forward`), and every address in it comes from a live
        // slice whose extent `CudaStream::forward` checked against the shapes in the block.
        unsafe { args.launch(config) }
            .map(|_| ())
            .map_err(|e| Error::Cuda { operation: format!("launch {}", launch.kernel), message: e.to_string() })
    }
}

/// The device buffers of one forward call.
pub(crate) struct Operands<'a> {
    pub x: &'a CudaSlice<u8>,
    pub a: &'a CudaSlice<u8>,
    pub b: &'a CudaSlice<u8>,
    pub lambda_d: &'a CudaSlice<u8>,
    pub lambda_b: &'a CudaSlice<u8>,
    pub bias: Option<&'a CudaSlice<u8>>,
    pub part: &'a mut CudaSlice<u8>,
    pub u: &'a mut CudaSlice<u8>,
    pub counters: &'a mut CudaSlice<u8>,
    pub y: &'a mut CudaSlice<u8>,
}

/// Launches the plan's two kernels on `stream`, filling in the parameter blocks' addresses.
pub(crate) fn forward(
    gpu: &Gpu,
    stream: &Arc<CudaStream>,
    plan: &Plan,
    down: &mut DownParams,
    up: &mut UpParams,
    ops: Operands<'_>,
    elem: usize,
) -> Result<()> {
    // The guards make later work on other streams wait for these reads and writes; they are
    // dropped after both launches are queued.
    let (x, _gx) = ops.x.device_ptr(stream);
    let (a, _ga) = ops.a.device_ptr(stream);
    let (b, _gb) = ops.b.device_ptr(stream);
    let (lambda_d, _gd) = ops.lambda_d.device_ptr(stream);
    let (lambda_b, _gl) = ops.lambda_b.device_ptr(stream);
    let bias = ops.bias.map(|s| s.device_ptr(stream));
    let (part, _gp) = ops.part.device_ptr_mut(stream);
    let (u, _gu) = ops.u.device_ptr_mut(stream);
    let (counters, _gc) = ops.counters.device_ptr_mut(stream);
    let (y, _gy) = ops.y.device_ptr_mut(stream);
    down.x = x;
    down.a = a;
    down.lambda_d = lambda_d;
    down.u = u;
    down.part = part;
    down.counters = counters;
    down.x_aligned = super::vector_aligned(x, down.ldx as usize * elem);
    up.u = u;
    up.b = b;
    up.lambda_b = lambda_b;
    up.bias = bias.as_ref().map_or(0, |(p, _)| *p);
    up.y = y;
    gpu.launch(stream, &plan.down, down)?;
    gpu.launch(stream, &plan.up, up)
}
