//! CPU fast paths for f32 tensors: the kernels of the `hyperlora-cpu` crate (a strided matrix
//! product with bias/residual epilogues, GroupNorm+SiLU, GEGLU, attention on interleaved heads,
//! 2× upsampling)
//! applied to candle tensors.
//!
//! Each entry point returns `Ok(None)` when it does not apply (a GPU tensor, another dtype, or
//! `HYPERLORA_CPU_KERNELS=0`), and the caller then takes candle's generic path, which computes
//! the same function. See docs/cpu.md.

use candle_core::{CpuStorage, Device, Shape, Storage, Tensor};

mod linear;
#[cfg(test)]
mod tests;

pub use linear::{linear, linear_from_map, linear_geglu, linear_to_map};

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
pub(crate) fn threads() -> usize {
    rayon::current_num_threads()
}

/// GroupNorm (+SiLU) of `x` [B, C, ...]; `weight`, `bias` [C].
pub fn group_norm(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    groups: usize,
    eps: f64,
    silu: bool,
) -> candle_core::Result<Option<Tensor>> {
    if !applies(x) || x.rank() < 3 || weight.dtype() != x.dtype() || x.elem_count() == 0 {
        return Ok(None);
    }
    let (b, c) = (x.dim(0)?, x.dim(1)?);
    if groups == 0 || c % groups != 0 {
        return Ok(None);
    }
    let pixels = x.elem_count() / (b * c);
    let (weight, bias) = (weight.to_vec1::<f32>()?, bias.to_vec1::<f32>()?);
    let mut out = vec![0f32; x.elem_count()];
    with_f32(x, |x| {
        hyperlora_cpu::group_norm(x, &mut out, c, pixels, groups, &weight, &bias, eps, silu)
    })?;
    Ok(Some(tensor(out, x.shape())?))
}

/// softmax(q kᵀ · scale) v per head, heads interleaved: `q` [B, Sq, H·D], `k`/`v` [B, Sk, H·D]
/// → [B, Sq, H·D].
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f64,
) -> candle_core::Result<Option<Tensor>> {
    if !applies(q) || !applies(k) || !applies(v) || q.rank() != 3 {
        return Ok(None);
    }
    let (b, sq, hd) = q.dims3()?;
    let (kb, sk, khd) = k.dims3()?;
    if heads == 0 || hd % heads != 0 || (kb, khd) != (b, hd) || v.dims() != k.dims() || sk == 0 {
        return Ok(None);
    }
    let mut out = vec![0f32; b * sq * hd];
    with_f32(q, |q| {
        with_f32(k, |k| {
            with_f32(v, |v| {
                hyperlora_cpu::attention(q, k, v, &mut out, sq, sk, heads, hd / heads, scale as f32)
            })
        })
    })???;
    Ok(Some(tensor(out, (b, sq, hd))?))
}

/// `x` [B, C, H, W] upsampled to [B, C, 2H, 2W] by repeating each pixel.
pub fn upsample_nearest2x(x: &Tensor) -> candle_core::Result<Option<Tensor>> {
    if !applies(x) || x.rank() != 4 {
        return Ok(None);
    }
    let (b, c, h, w) = x.dims4()?;
    let mut out = vec![0f32; 4 * x.elem_count()];
    with_f32(x, |x| hyperlora_cpu::upsample_nearest2x(x, &mut out, h, w))?;
    Ok(Some(tensor(out, (b, c, 2 * h, 2 * w))?))
}

/// GELU (exact; `quick`: CLIP's `x · sigmoid(1.702 x)`) of every element of `x`.
pub fn gelu(x: &Tensor, quick: bool) -> candle_core::Result<Option<Tensor>> {
    if !applies(x) {
        return Ok(None);
    }
    let mut out = with_f32(x, <[f32]>::to_vec)?;
    if quick {
        hyperlora_cpu::quick_gelu_in_place(&mut out);
    } else {
        hyperlora_cpu::gelu_in_place(&mut out);
    }
    Ok(Some(tensor(out, x.shape())?))
}
