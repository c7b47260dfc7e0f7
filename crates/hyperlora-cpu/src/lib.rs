//! CPU kernels of the hyperlora engine, on plain f32 slices: a strided matrix product with
//! bias/residual epilogues ([`gemm`]), NCHW convolution as an implicit matrix product or, 3×3
//! ones, by Winograd's F(2×2, 3×3) ([`conv`]), GroupNorm(+SiLU) ([`group_norm`]), GEGLU
//! ([`geglu`]), attention with the heads left interleaved ([`attention`]) and 2× nearest
//! upsampling. The engine's `cpu` module applies them to candle tensors; see the repository's
//! docs/cpu.md.
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
#[cfg(target_arch = "x86_64")]
mod winograd;

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

/// Rows (vector lanes) and columns (broadcasts) of the micro-kernel's largest tile.
#[cfg(target_arch = "x86_64")]
const TILE_ROWS: usize = 16;
#[cfg(target_arch = "x86_64")]
const TILE_COLS: usize = 6;

/// The `gemm` crate's AVX2+FMA micro-kernel on an `rows`×`cols` tile (at most 16×6) of `dst`,
/// whose rows are contiguous and columns `dst_cs` apart: `dst = Σ_p lhs[p]·rhs[p]ᵀ`, plus what
/// `dst` held when `accumulate`. `lhs` holds 16 values per step `p` (a packed panel, zero past
/// `rows`), `rhs` the `cols` broadcast values of step `p` at `p·rhs_rs + j·rhs_cs`. The
/// convolution, attention and matrix product lay their operands out for it.
///
/// # Safety
/// The CPU has AVX2 and FMA; `lhs` holds `16·k` values, `rhs` every value named above, and the
/// tile lies inside `dst`, which nothing else touches meanwhile.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
unsafe fn micro_kernel(
    rows: usize,
    cols: usize,
    k: usize,
    dst: *mut f32,
    dst_cs: usize,
    lhs: *const f32,
    rhs: *const f32,
    rhs_rs: usize,
    rhs_cs: usize,
    accumulate: bool,
) {
    use gemm_f32::microkernel::fma::f32::UKR;
    debug_assert!(rows > 0 && rows <= TILE_ROWS && cols > 0 && cols <= TILE_COLS);
    // The kernel for `rows` reads whole 8-lane halves of the panel and stores only `rows`.
    let kernel = UKR[rows.div_ceil(8) - 1][cols - 1];
    // SAFETY: forwarded from the caller. Arguments: the tile, its strides (columns, rows), the
    // operands' strides (lhs per step; rhs per step and per column), alpha and beta, then
    // alpha's status (0: dst = beta·product, 1: dst += beta·product), no conjugation, and no
    // next panel to prefetch.
    unsafe {
        kernel(
            rows,
            cols,
            k,
            dst,
            lhs,
            rhs,
            dst_cs as isize,
            1,
            TILE_ROWS as isize,
            rhs_rs as isize,
            rhs_cs as isize,
            1.0,
            1.0,
            u8::from(accumulate),
            false,
            false,
            false,
            std::ptr::null(),
        )
    }
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
