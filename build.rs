//! Build script. The CUDA kernels in `kernels/` are compiled here only when the `cuda` feature is
//! on; the default build needs no CUDA toolchain.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=kernels");
}
