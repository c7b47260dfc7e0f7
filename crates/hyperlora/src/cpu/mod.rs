//! CPU fast paths for f32: our own matrix product ([`gemm`]) and the fused passes around it
//! (GroupNorm+SiLU, GEGLU, Linear with bias and residual, attention on interleaved heads,
//! convolution epilogues).
//!
//! Each entry point returns `Ok(None)` when it does not apply (a GPU tensor, another dtype, or
//! `HYPERLORA_CPU_KERNELS=0`), and the caller then takes candle's generic path, which computes
//! the same function. See docs/cpu.md.

use candle_core::{CpuStorage, Device, Shape, Storage, Tensor};

mod attention;
pub mod gemm;
mod linear;
mod math;
mod norm;

#[cfg(test)]
mod tests;

pub use attention::attention;
pub use linear::{linear, linear_from_map, linear_geglu, linear_to_map};
pub use norm::group_norm;

/// Whether the fast paths are on: `HYPERLORA_CPU_KERNELS=0` turns them off, for A/B timing and
/// for bisecting a numerical difference.
pub fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("HYPERLORA_CPU_KERNELS").map_or(true, |v| v != "0"))
}

/// Whether the fast paths take `t`: an f32 tensor on the CPU, with the paths on.
pub fn applies(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == candle_core::DType::F32 && enabled()
}

/// Calls `f` with the elements of `t` (made contiguous first), an f32 CPU tensor.
pub(crate) fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> candle_core::Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    match (&*storage, layout.contiguous_offsets()) {
        (Storage::Cpu(CpuStorage::F32(v)), Some((start, end))) => Ok(f(&v[start..end])),
        _ => candle_core::bail!("hyperlora cpu kernels: expected a contiguous f32 CPU tensor"),
    }
}

/// A CPU tensor of `shape` from `data`.
pub(crate) fn tensor(data: Vec<f32>, shape: impl Into<Shape>) -> candle_core::Result<Tensor> {
    Tensor::from_vec(data, shape, &Device::Cpu)
}

/// Threads for one parallel operation: rayon's pool, which `RAYON_NUM_THREADS` sizes as it does
/// candle's.
fn threads() -> usize {
    rayon::current_num_threads()
}

/// Whether this CPU has AVX2 and FMA (x86-64 only), for the kernels compiled for them.
#[cfg(target_arch = "x86_64")]
fn has_avx2_fma() -> bool {
    static YES: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *YES.get_or_init(|| std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma"))
}
