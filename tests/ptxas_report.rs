//! build.rs fails the CUDA build when ptxas reports a spill: its report parser, on reports in the
//! format ptxas 13.0 prints with `-v,-warn-spills,-warn-lmem-usage` (the warnings come first).

#[path = "../build/ptxas.rs"]
mod ptxas;

const REPORT: &str = "\
ptxas warning : Local memory used for function 'vera_down_tile_bf16', size of stack frame: 24 bytes
ptxas warning : Registers are spilled to local memory in function 'vera_down_tile_bf16', 20 bytes spill stores, 0 bytes spill loads
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'vera_up_tile_bf16' for 'sm_80'
ptxas info    : Function properties for vera_up_tile_bf16
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 96 registers, used 1 barriers, 30720 bytes smem, 432 bytes cmem[0]
ptxas info    : Compiling entry function 'vera_down_tile_bf16' for 'sm_90'
ptxas info    : Function properties for vera_down_tile_bf16
    24 bytes stack frame, 20 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 30720 bytes smem
ptxas info    : Compiling entry function 'vera_up_gemv_t8_f16' for 'sm_90'
ptxas info    : Function properties for vera_up_gemv_t8_f16
    8 bytes stack frame, 0 bytes spill stores, 16 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers, 32768 bytes smem
";

#[test]
fn spills_are_found_with_their_kernel_and_architecture() {
    // Once each, named: not also once, unnamed, for the warning before every kernel's report.
    assert_eq!(
        ptxas::spilling_kernels(REPORT),
        vec!["vera_down_tile_bf16 for sm_90".to_string(), "vera_up_gemv_t8_f16 for sm_90".to_string()]
    );
}

#[test]
fn a_report_without_spills_passes() {
    let clean: String = REPORT.lines().skip(2).take(5).map(|l| format!("{l}\n")).collect();
    assert!(ptxas::spilling_kernels(&clean).is_empty());
    assert!(ptxas::spilling_kernels("").is_empty());
}
