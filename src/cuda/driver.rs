//! The real GPU: the driver (loaded at run time by cudarc), the embedded fatbin, kernel launches.

use std::collections::HashMap;
use std::sync::Arc;

use cudarc::driver::{
    sys, CudaContext, CudaEvent, CudaFunction, CudaStream, DevicePtr, DevicePtrMut, DeviceRepr, LaunchConfig,
    PushKernelArg,
};

use super::backward::{self, BackwardAddresses, BackwardCall, BackwardOperands, BackwardParams, BackwardPlan};
use super::buffer::driver;
use super::forward::Operands;
use super::params::{self, Addresses, Call, DownParams, UpParams};
use super::plan::{Launch, Plan};
use crate::error::{Error, Result};

/// The kernels, compiled by build.rs: SASS for sm_80 and sm_90 and compute_80 PTX.
static FATBIN: &[u8] = include_bytes!(env!("VERA_KERNELS_FATBIN"));

// SAFETY: both are plain `#[repr(C)]` blocks of integers and device addresses, laid out exactly as
// the kernels' `DownParams` / `UpParams` (checked by size in params.rs), passed by value.
unsafe impl DeviceRepr for DownParams {}
unsafe impl DeviceRepr for UpParams {}
// SAFETY: as above, laid out as the kernels' `BackwardParams` (checked by size in backward/plan.rs).
unsafe impl DeviceRepr for BackwardParams {}

pub(crate) struct Gpu {
    ctx: Arc<CudaContext>,
    /// The device's own non-blocking stream (what `CudaDevice::stream` hands out).
    stream: Arc<CudaStream>,
    /// Every kernel of [`super::plan::kernel_names`], resolved when the device opened.
    functions: HashMap<String, CudaFunction>,
    multiprocessors: usize,
    l2_cache_bytes: usize,
    /// Whether launches marked [`Launch::dependent`] go out as programmatic dependents: on sm_90
    /// and newer, unless `VERA_CUDA_PROGRAMMATIC_LAUNCH=0` (to compare with and without).
    programmatic: bool,
}

/// The environment variable that turns programmatic dependent launches off (`0`).
pub(crate) const PROGRAMMATIC_LAUNCH_ENV: &str = "VERA_CUDA_PROGRAMMATIC_LAUNCH";

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
        let l2_cache_bytes = ctx
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE)
            .map_err(driver("query the L2 cache size"))?;
        let major = ctx
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)
            .map_err(driver("query the compute capability"))?;
        let programmatic = major >= 9 && std::env::var(PROGRAMMATIC_LAUNCH_ENV).map_or(true, |v| v != "0");
        // Not the legacy NULL stream: that one waits for and holds up every other blocking stream
        // of the context, and cannot be captured into a CUDA graph.
        let stream = ctx.new_stream().map_err(driver("create the device's stream"))?;
        // Every kernel resolved now, on this thread (which holds the context): a bad kernel image is
        // reported here, and a later launch from a thread that made no CUDA call yet cannot fail
        // in cuModuleGetFunction with CUDA_ERROR_INVALID_CONTEXT.
        let mut functions = HashMap::new();
        for name in super::plan::kernel_names() {
            let f = module
                .load_function(&name)
                .map_err(|e| Error::Cuda { operation: format!("find kernel {name}"), message: e.to_string() })?;
            functions.insert(name, f);
        }
        // A kernel may take more than 48 KiB of dynamic shared memory only once allowed to.
        for (name, bytes) in super::plan::dynamic_smem_kernels() {
            let f = functions.get(&name).ok_or_else(|| Error::Cuda {
                operation: format!("allow {name} {bytes} bytes of dynamic shared memory"),
                message: "not among the kernels resolved (plan::kernel_names)".into(),
            })?;
            let attribute = sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES;
            f.set_attribute(attribute, i32::try_from(bytes).unwrap_or(i32::MAX)).map_err(|e| Error::Cuda {
                operation: format!("allow {name} {bytes} bytes of dynamic shared memory"),
                message: e.to_string(),
            })?;
        }
        Ok(Gpu {
            ctx,
            stream,
            // Each function holds the module alive.
            functions,
            multiprocessors: multiprocessors.max(1) as usize,
            l2_cache_bytes: l2_cache_bytes.max(0) as usize,
            programmatic,
        })
    }

    pub(crate) fn name(&self) -> String {
        self.ctx.name().unwrap_or_else(|e| format!("CUDA device {} ({e})", self.ctx.ordinal()))
    }

    pub(crate) fn stream(&self) -> Arc<CudaStream> {
        self.stream.clone()
    }

    pub(crate) fn new_stream(&self) -> Result<Arc<CudaStream>> {
        self.ctx.new_stream().map_err(driver("create a stream"))
    }

    pub(crate) fn multiprocessors(&self) -> usize {
        self.multiprocessors
    }

    pub(crate) fn l2_cache_bytes(&self) -> usize {
        self.l2_cache_bytes
    }

    fn function(&self, name: &str) -> Result<CudaFunction> {
        self.functions.get(name).cloned().ok_or_else(|| Error::Cuda {
            operation: format!("find kernel {name}"),
            message: "not among the kernels resolved when the device opened (plan::kernel_names)".into(),
        })
    }

    /// Queues `launch` on `stream` with its one by-value parameter block.
    ///
    /// # Safety
    /// `P` must be the parameter type of `launch.kernel`, and every address in `params` must point
    /// to live device memory of this context, of the extent the kernel reads or writes for the
    /// sizes in `params`, until the kernel has run.
    unsafe fn launch<P: DeviceRepr>(&self, stream: &Arc<CudaStream>, launch: &Launch, params: &P) -> Result<()> {
        let f = self.function(&launch.kernel)?;
        if launch.dependent && self.programmatic {
            // SAFETY: forwarded (this function's contract).
            return unsafe { launch_dependent(stream, &f, launch, params) };
        }
        let config = LaunchConfig {
            grid_dim: (launch.grid[0], launch.grid[1], launch.grid[2]),
            block_dim: (launch.block[0], launch.block[1], launch.block[2]),
            shared_mem_bytes: launch.shared_bytes,
        };
        let mut args = stream.launch_builder(&f);
        args.arg(params);
        // SAFETY: the kernel takes exactly one by-value parameter block of type P, whose addresses
        // are valid for what it reads and writes: both are the caller's obligations (see above).
        unsafe { args.launch(config) }
            .map(|_| ())
            .map_err(|e| Error::Cuda { operation: format!("launch {}", launch.kernel), message: e.to_string() })
    }
}

/// Queues `launch` on `stream` as a programmatic dependent of the work queued before it
/// (`cuLaunchKernelEx` with `CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION`): its blocks may
/// be scheduled once every block of the previous kernel has let them (`grid_dependents_may_launch`)
/// or ended, and the kernel waits for that kernel's end before it reads what it wrote
/// (`wait_for_previous_grid`, kernels/ptx.cuh). cudarc's launch builder has no launch attributes.
///
/// # Safety
/// As [`Gpu::launch`]; and the kernel reads nothing the previous launch writes before its
/// `wait_for_previous_grid`.
unsafe fn launch_dependent<P: DeviceRepr>(
    stream: &Arc<CudaStream>,
    f: &CudaFunction,
    launch: &Launch,
    params: &P,
) -> Result<()> {
    let failed = |e: cudarc::driver::DriverError| Error::Cuda {
        operation: format!("launch {} as a programmatic dependent", launch.kernel),
        message: e.to_string(),
    };
    // A raw driver call acts on the thread's current context (cudarc binds it in its own launches).
    stream.context().bind_to_thread().map_err(failed)?;
    // SAFETY: a C struct holding an enum whose 0 is a valid id and a union of plain integers and
    // structs of integers: all-zero bytes are a valid value, overwritten below.
    let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
    attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
    attr.value.programmaticStreamSerializationAllowed = 1;
    let config = sys::CUlaunchConfig {
        gridDimX: launch.grid[0],
        gridDimY: launch.grid[1],
        gridDimZ: launch.grid[2],
        blockDimX: launch.block[0],
        blockDimY: launch.block[1],
        blockDimZ: launch.block[2],
        sharedMemBytes: launch.shared_bytes,
        hStream: stream.cu_stream(),
        attrs: &mut attr,
        numAttrs: 1,
    };
    // The kernel's one by-value parameter, passed as the driver takes parameters: an array of
    // pointers to each value (the driver copies the values before returning).
    let mut args = [std::ptr::from_ref(params).cast_mut().cast::<std::ffi::c_void>()];
    // SAFETY: `config` and `attr` live across the call; `f` is a function of this stream's
    // context, resolved at open and kept alive by `f`; the one parameter is a `P` of the type
    // the kernel takes, whose addresses are valid for what it reads and writes (the caller's
    // obligations, as for `Gpu::launch`).
    unsafe { sys::cuLaunchKernelEx(&config, f.cu_function(), args.as_mut_ptr(), std::ptr::null_mut()) }
        .result()
        .map_err(failed)
}

/// A pair of timing events on one stream: the device time between two points of its work.
///
/// Created once and recorded again for every measurement, so that creating events (host work)
/// never falls between the two records.
pub(crate) struct TimingEvents {
    start: CudaEvent,
    end: CudaEvent,
}

impl TimingEvents {
    /// Two events with timing enabled (cudarc's default flags disable it) in `stream`'s context.
    pub(crate) fn new(stream: &CudaStream) -> Result<Self> {
        let timing = Some(sys::CUevent_flags::CU_EVENT_DEFAULT);
        let ctx = stream.context();
        let start = ctx.new_event(timing).map_err(driver("create a timing event"))?;
        let end = ctx.new_event(timing).map_err(driver("create a timing event"))?;
        Ok(TimingEvents { start, end })
    }

    /// Marks the start of the measured work on `stream`.
    pub(crate) fn record_start(&self, stream: &CudaStream) -> Result<()> {
        self.start.record(stream).map_err(driver("record a timing event"))
    }

    /// Marks the end of the measured work on `stream`.
    pub(crate) fn record_end(&self, stream: &CudaStream) -> Result<()> {
        self.end.record(stream).map_err(driver("record a timing event"))
    }

    /// Waits for the end event and returns the device time from start to end, in milliseconds
    /// (the driver's resolution is about half a microsecond).
    pub(crate) fn elapsed_ms(&self) -> Result<f64> {
        self.start.elapsed_ms(&self.end).map(f64::from).map_err(driver("read a timing event"))
    }
}

/// Launches the plan's two kernels on `stream`: this backend's part is the operands' device
/// addresses; the parameter blocks are filled by [`params::launch_params`], as on the emulator.
///
/// # Safety
/// Every operand must hold what the kernels read or write for `call` and `plan` (as
/// `CudaStream::forward` checks before it calls this).
pub(crate) unsafe fn forward(
    gpu: &Gpu,
    stream: &Arc<CudaStream>,
    plan: &Plan,
    call: &Call,
    ops: Operands<'_>,
) -> Result<()> {
    let (x, a, b) = (ops.x.driver("x")?, ops.a.driver("projections")?, ops.b.driver("projections")?);
    let (lambda_d, lambda_b) = (ops.lambda_d.driver("adapter")?, ops.lambda_b.driver("adapter")?);
    let bias = ops.bias.map(|b| b.driver("adapter")).transpose()?;
    let has_bias = ops.has_bias.map(|b| b.driver("adapter bank")).transpose()?;
    let rows_adapter = ops.rows_adapter.map(|b| b.driver("row map")).transpose()?;
    let y = ops.y.driver_mut("y")?;
    // The workspace is this stream's own raw memory: addresses without cudarc's event guards.
    let (part, u, counters) = (ops.part.device_address()?, ops.u.device_address()?, ops.counters.device_address()?);
    // The guards make later work on other streams wait for these reads and writes; they are
    // dropped after both launches are queued.
    let (x, _gx) = x.device_ptr(stream);
    let (a, _ga) = a.device_ptr(stream);
    let (b, _gb) = b.device_ptr(stream);
    let (lambda_d, _gd) = lambda_d.device_ptr(stream);
    let (lambda_b, _gl) = lambda_b.device_ptr(stream);
    let bias = bias.map(|s| s.device_ptr(stream));
    let has_bias = has_bias.map(|s| s.device_ptr(stream));
    let rows_adapter = rows_adapter.map(|s| s.device_ptr(stream));
    let (y, _gy) = y.device_ptr_mut(stream);
    let [bias, has_bias, rows_adapter] = [&bias, &has_bias, &rows_adapter].map(|p| p.as_ref().map(|(p, _)| *p));
    let at = Addresses { x, a, b, lambda_d, lambda_b, bias, has_bias, rows_adapter, part, u, counters, y };
    let (down, up) = params::launch_params(plan, call, &at)?;
    // SAFETY: `plan.down` names a down-projection kernel and `plan.up` an up-projection kernel
    // (plan.rs), which take DownParams and UpParams; every address is live memory of this
    // stream's context, of the extent the caller guarantees, and stays allocated until the kernels
    // have run: the guards above, dropped after both launches are queued, record them on each
    // slice, and cudarc frees a slice only after the work recorded on it; the workspace is freed
    // only after its stream's queued work (`RawDeviceMemory`'s drop).
    unsafe {
        gpu.launch(stream, &plan.down, &down)?;
        gpu.launch(stream, &plan.up, &up)
    }
}

/// Launches a backward plan's kernels on `stream`, in order, each with the call's one parameter
/// block (filled by [`backward::params`], as on the emulator).
///
/// # Safety
/// Every operand must hold what the kernels read or write for `call` and `plan` (as
/// `CudaStream::backward` checks before it calls this).
pub(crate) unsafe fn backward(
    gpu: &Gpu,
    stream: &Arc<CudaStream>,
    plan: &BackwardPlan,
    call: &BackwardCall,
    ops: BackwardOperands<'_>,
) -> Result<()> {
    let [h, g, part, columns] = ops.workspace;
    let (x, a, b, dy) =
        (ops.x.driver("x")?, ops.a.driver("projections")?, ops.b.driver("projections")?, ops.dy.driver("dy")?);
    let (lambda_d, lambda_b) = (ops.lambda_d.driver("adapter")?, ops.lambda_b.driver("adapter")?);
    // The workspace is this stream's own raw memory: addresses without cudarc's event guards.
    let (h, g, part, columns) =
        (h.device_address()?, g.device_address()?, part.device_address()?, columns.device_address()?);
    let grad_lambda_d = ops.grad_lambda_d.driver_mut("gradient of lambda_d")?;
    let grad_lambda_b = ops.grad_lambda_b.driver_mut("gradient of lambda_b")?;
    let grad_bias = ops.grad_bias.map(|b| b.driver_mut("gradient of the bias")).transpose()?;
    let dx = ops.dx.map(|d| d.driver_mut("dx")).transpose()?;
    // The guards make later work on other streams wait for these reads and writes; they are
    // dropped after every launch is queued.
    let (x, _gx) = x.device_ptr(stream);
    let (a, _ga) = a.device_ptr(stream);
    let (b, _gb) = b.device_ptr(stream);
    let (dy, _gdy) = dy.device_ptr(stream);
    let (lambda_d, _gd) = lambda_d.device_ptr(stream);
    let (lambda_b, _gl) = lambda_b.device_ptr(stream);
    let (grad_lambda_d, _gdld) = grad_lambda_d.device_ptr_mut(stream);
    let (grad_lambda_b, _gdlb) = grad_lambda_b.device_ptr_mut(stream);
    let grad_bias = grad_bias.map(|s| s.device_ptr_mut(stream));
    let dx = dx.map(|s| s.device_ptr_mut(stream));
    let at = BackwardAddresses {
        x,
        a,
        b,
        dy,
        lambda_d,
        lambda_b,
        h,
        g,
        part,
        columns,
        grad_lambda_d,
        grad_lambda_b,
        grad_bias: grad_bias.as_ref().map(|(p, _)| *p),
        dx: dx.as_ref().map(|(p, _)| *p),
    };
    let params = backward::params(plan, call, &at)?;
    for l in &plan.launches {
        // SAFETY: every backward kernel (backward/plan.rs) takes one BackwardParams; every address
        // is live memory of this stream's context, of the extent the caller guarantees, kept
        // allocated until the kernels have run by the guards above (dropped after the last launch
        // is queued) and the workspace's stream-ordered drop, as in `forward`.
        unsafe { gpu.launch(stream, l, &params)? };
    }
    Ok(())
}
