//! With the `cuda` feature, compiles src/cuda/kernels.cu to PTX (for compute capability 8.0,
//! which the driver JIT-compiles for Ampere, Ada and Hopper alike) with the nvcc candle's build
//! already needs (`NVCC`, else `nvcc` on the PATH; scripts/cuda-env.sh sets one up).
use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=src/cuda/kernels.cu");
    println!("cargo:rerun-if-env-changed=NVCC");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR")).join("kernels.ptx");
    let nvcc = std::env::var_os("NVCC").unwrap_or_else(|| "nvcc".into());
    let status = Command::new(&nvcc)
        .args(["--ptx", "-O3", "-arch=compute_80", "-o"])
        .arg(&out)
        .arg("src/cuda/kernels.cu")
        .status()
        .unwrap_or_else(|e| panic!("cannot run {nvcc:?} (see scripts/cuda-env.sh): {e}"));
    assert!(status.success(), "nvcc failed on src/cuda/kernels.cu");
}
