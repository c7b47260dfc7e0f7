//! CPU kernels of the hyperlora engine, on plain f32 slices: a strided matrix product with
//! bias/residual epilogues ([`gemm`]), NCHW convolution as an implicit matrix product ([`conv`]),
//! GroupNorm(+SiLU) ([`group_norm`]), GEGLU ([`geglu`]), attention with the heads left
//! interleaved ([`attention`]) and 2× nearest upsampling. The engine's `cpu` module
//! applies them to candle tensors; see the repository's docs/cpu.md.
//!
//! A crate of its own so that it is compiled optimised in every profile (the workspace's
//! `Cargo.toml` says so): at opt-level 1 these loops would not vectorise.

mod attention;
pub mod conv;
mod geglu;
pub mod gemm;
mod math;
mod norm;
mod upsample;

pub use attention::attention;
pub use geglu::{geglu, gelu_in_place, quick_gelu_in_place};
pub use norm::group_norm;
pub use upsample::upsample_nearest2x;

/// Whether this CPU has AVX2 and FMA (x86-64 only), for the kernels compiled for them.
#[cfg(target_arch = "x86_64")]
fn has_avx2_fma() -> bool {
    static YES: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *YES.get_or_init(|| {
        std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
    })
}

/// A pointer into an output that parallel work items write in disjoint parts.
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);

// SAFETY: every user writes only its own elements through it.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// The pointer (a method, so that closures capture the whole `Send` wrapper).
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// Deterministic test values in [-1, 1] (xorshift), the same on every machine.
#[cfg(test)]
fn test_values(len: usize, seed: u32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(2654435761).wrapping_add(1);
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (s % 2001) as f32 / 1000.0 - 1.0
        })
        .collect()
}
