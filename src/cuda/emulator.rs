//! The CPU emulation of the CUDA kernels (feature `cuda-emulation`): `kernels/*.cu` compiled by the
//! host C++ compiler against `kernels/emu/cuda_emu.h`, which runs every CUDA thread of a block as a
//! fiber (shared memory, `__syncthreads`, warp shuffles, and `mma`/`ldmatrix` with the PTX ISA's
//! fragment layouts). "Device" memory is host memory.

use std::ffi::{c_char, c_int, c_void, CStr, CString};

use super::backward::{self, BackwardAddresses, BackwardCall, BackwardOperands, BackwardPlan};
use super::forward::Operands;
use super::params::{self, Addresses, Call};
use super::plan::{Launch, Plan};
use crate::error::{Error, Result};

extern "C" {
    fn vera_emu_launch(
        kernel: *const c_char,
        grid: *const u32,
        block: *const u32,
        dynamic_smem_bytes: u32,
        params: *mut *mut c_void,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
}

/// Runs the plan's two kernels on the CPU: this backend's part is the operands' host addresses;
/// the parameter blocks are filled by [`params::launch_params`], as on a GPU.
///
/// # Safety
/// Every operand must hold what the kernels read or write for `call` and `plan` (as
/// `CudaStream::forward` checks before it calls this).
pub(crate) unsafe fn forward(plan: &Plan, call: &Call, ops: Operands<'_>) -> Result<()> {
    let at = Addresses {
        x: ops.x.host("x")?.address(),
        a: ops.a.host("projections")?.address(),
        b: ops.b.host("projections")?.address(),
        lambda_d: ops.lambda_d.host("adapter")?.address(),
        lambda_b: ops.lambda_b.host("adapter")?.address(),
        bias: ops.bias.map(|b| b.host("adapter").map(|h| h.address())).transpose()?,
        has_bias: ops.has_bias.map(|b| b.host("adapter bank").map(|h| h.address())).transpose()?,
        rows_adapter: ops.rows_adapter.map(|b| b.host("row map").map(|h| h.address())).transpose()?,
        part: ops.part.host_address()?,
        u: ops.u.host_address()?,
        counters: ops.counters.host_address()?,
        y: ops.y.host_mut("y")?.address_mut(),
    };
    let (mut down, mut up) = params::launch_params(plan, call, &at)?;
    // SAFETY: `plan.down` names a down-projection kernel and `plan.up` an up-projection kernel
    // (plan.rs), which take DownParams and UpParams; every address is host memory borrowed from
    // the operands for this call, of the extent the caller guarantees. The kernels run to the end
    // before `launch` returns, so nothing outlives the borrows.
    unsafe {
        launch(&plan.down, &mut down)?;
        launch(&plan.up, &mut up)
    }
}

/// Runs a backward plan's kernels on the CPU, in order, each with the call's one parameter block.
///
/// # Safety
/// Every operand must hold what the kernels read or write for `call` and `plan` (as
/// `CudaStream::backward` checks before it calls this).
pub(crate) unsafe fn backward(plan: &BackwardPlan, call: &BackwardCall, ops: BackwardOperands<'_>) -> Result<()> {
    let [h, g, part, columns] = ops.workspace;
    let at = BackwardAddresses {
        x: ops.x.host("x")?.address(),
        a: ops.a.host("projections")?.address(),
        b: ops.b.host("projections")?.address(),
        dy: ops.dy.host("dy")?.address(),
        lambda_d: ops.lambda_d.host("adapter")?.address(),
        lambda_b: ops.lambda_b.host("adapter")?.address(),
        h: h.host_address()?,
        g: g.host_address()?,
        part: part.host_address()?,
        columns: columns.host_address()?,
        grad_lambda_d: ops.grad_lambda_d.host_mut("gradient of lambda_d")?.address_mut(),
        grad_lambda_b: ops.grad_lambda_b.host_mut("gradient of lambda_b")?.address_mut(),
        grad_bias: ops.grad_bias.map(|b| b.host_mut("gradient of the bias").map(|h| h.address_mut())).transpose()?,
        dx: ops.dx.map(|d| d.host_mut("dx").map(|h| h.address_mut())).transpose()?,
    };
    let mut params = backward::params(plan, call, &at)?;
    for l in &plan.launches {
        // SAFETY: every backward kernel takes one BackwardParams; every address is host memory
        // borrowed from the operands for this call, of the extent the caller guarantees, and each
        // kernel runs to the end before `launch` returns.
        unsafe { launch(l, &mut params)? };
    }
    Ok(())
}

/// Runs `l`'s kernel over its grid × block threads on the CPU, with its dynamic shared memory and
/// its one by-value parameter block.
///
/// # Safety
/// Every pointer inside `params` must point to live host memory of the extent the kernel reads or
/// writes for these shapes.
pub(crate) unsafe fn launch<P>(l: &Launch, params: &mut P) -> Result<()> {
    let kernel = &l.kernel;
    let name = CString::new(kernel.as_str()).map_err(|_| Error::Cuda {
        operation: format!("launch {kernel}"),
        message: "kernel name contains NUL".into(),
    })?;
    let mut err = [0 as c_char; 512];
    let mut args = [params as *mut P as *mut c_void];
    // SAFETY: the name, dims and error buffer are live for the call; `args` follows cuLaunchKernel's
    // convention (one pointer to the by-value parameter block), and the memory the block points to
    // is the caller's obligation (see above).
    let rc = unsafe {
        vera_emu_launch(
            name.as_ptr(),
            l.grid.as_ptr(),
            l.block.as_ptr(),
            l.shared_bytes,
            args.as_mut_ptr(),
            err.as_mut_ptr(),
            err.len(),
        )
    };
    if rc == 0 {
        return Ok(());
    }
    // SAFETY: the emulator writes a NUL-terminated message into `err` (at most err_len bytes) on
    // failure; the last byte is forced to NUL in case it filled the buffer.
    err[err.len() - 1] = 0;
    let message = unsafe { CStr::from_ptr(err.as_ptr()) }.to_string_lossy().into_owned();
    Err(Error::Cuda { operation: format!("launch {kernel} (emulated)"), message })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn launch_of(kernel: &str, grid: [u32; 3], block: [u32; 3], shared_bytes: u32) -> Launch {
        Launch { kernel: kernel.into(), grid, block, shared_bytes, dependent: false }
    }

    #[test]
    fn emulator_errors_are_cuda_errors_with_the_emulators_message() {
        let mut params = 0u64;
        let unknown = launch_of("vera_no_such_kernel", [1, 1, 1], [32, 1, 1], 0);
        // SAFETY: no kernel of that name exists, so nothing reads the parameter block.
        let e = unsafe { launch(&unknown, &mut params) }.unwrap_err();
        let Error::Cuda { operation, message } = e else { panic!("expected Error::Cuda, got {e:?}") };
        assert_eq!(operation, "launch vera_no_such_kernel (emulated)");
        assert!(message.contains("unknown kernel 'vera_no_such_kernel'"), "{message}");
        // A block larger than CUDA allows, or more dynamic shared memory than a block can have, is
        // refused before any thread runs.
        for l in [
            launch_of("vera_up_tile_f32", [1, 1, 1], [2048, 1, 1], 0),
            launch_of("vera_up_tile128_bf16", [1, 1, 1], [256, 1, 1], 228 * 1024),
        ] {
            // SAFETY: the launch is rejected on its configuration, before the parameters are read.
            let e = unsafe { launch(&l, &mut params) }.unwrap_err();
            assert!(matches!(e, Error::Cuda { .. }), "{e:?}");
        }
    }

    #[test]
    fn a_large_tile_launched_without_its_shared_memory_traps() {
        let mut params = super::super::params::UpParams::default();
        // SAFETY: every block checks its dynamic shared memory before anything else and traps on
        // too little, so no thread reads the (null) addresses of the parameter block.
        let e = unsafe { launch(&launch_of("vera_up_tile128_f16", [1, 1, 1], [256, 1, 1], 4096), &mut params) };
        let message = format!("{:?}", e.unwrap_err());
        assert!(message.contains("__trap"), "{message}");
    }
}
