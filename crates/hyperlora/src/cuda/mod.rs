//! CUDA fast paths: fused kernels ([`kernels.cu`](./kernels.cu), compiled to PTX by build.rs
//! with the `cuda` feature) for flash attention (head dim 64), GroupNorm(+SiLU), GEGLU and
//! bias adds, and cuDNN convolutions with the `cudnn` feature.
//!
//! Each entry point returns `Ok(None)` when it does not apply (CPU tensors, a build without
//! CUDA, an unsupported dtype or layout, or `HYPERLORA_CUDA_KERNELS=0`), and the caller then
//! takes candle's generic path, which computes the same function.

use candle_core::{Module, Tensor};
use candle_nn::{Conv2dConfig, Linear};

/// The `cpu_fwd` of a CUDA-only candle custom op, with an (unused) storage and layout name per
/// input: the entry points below only apply these ops to CUDA tensors.
#[cfg(feature = "cuda")]
macro_rules! cuda_only {
    ($what:literal, $($storage:ident $layout:ident),+) => {
        fn cpu_fwd(
            &self,
            $($storage: &candle_core::CpuStorage, $layout: &candle_core::Layout),+
        ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
            candle_core::bail!(concat!($what, " runs on CUDA only"))
        }
    };
}

#[cfg(feature = "cuda")]
/// Calls `f::<T>(args)` with the Rust type of a float `DType`.
macro_rules! by_dtype {
    ($dtype:expr, $f:ident ( $($arg:expr),* )) => {
        match $dtype {
            candle_core::DType::F32 => $f::<f32>($($arg),*),
            candle_core::DType::F16 => $f::<half::f16>($($arg),*),
            candle_core::DType::BF16 => $f::<half::bf16>($($arg),*),
            other => candle_core::bail!("hyperlora kernels: unsupported dtype {other:?}"),
        }
    };
}

#[cfg(feature = "cudnn")]
mod cudnn;
#[cfg(feature = "cuda")]
mod launch;

/// Whether the fast paths may run on `t`'s device: CUDA, and not turned off by
/// `HYPERLORA_CUDA_KERNELS=0` (for A/B timing and for bisecting a numerical difference).
fn applies(t: &Tensor) -> bool {
    #[cfg(feature = "cuda")]
    {
        static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        t.device().is_cuda()
            && *ON
                .get_or_init(|| std::env::var("HYPERLORA_CUDA_KERNELS").map_or(true, |v| v != "0"))
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = t;
        false
    }
}

/// softmax(q kᵀ · scale) v per head, heads interleaved in the last dimension as the projections
/// produce them: `q` [B, Sq, H·64], `k`/`v` [B, Sk, H·64] → [B, Sq, H·64]. Scores and
/// softmax in f32, probabilities rounded to the input dtype for the second product.
pub fn flash_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f64,
) -> candle_core::Result<Option<Tensor>> {
    if !applies(q) {
        return Ok(None);
    }
    #[cfg(feature = "cuda")]
    return launch::flash_attention(q, k, v, heads, scale);
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (k, v, heads, scale);
        Ok(None)
    }
}

/// GroupNorm over `x` [B, C, ...] with per-channel `weight`/`bias` [C] (x's dtype), statistics
/// in f32, optionally followed by SiLU.
pub fn group_norm(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    groups: usize,
    eps: f64,
    silu: bool,
) -> candle_core::Result<Option<Tensor>> {
    if !applies(x) {
        return Ok(None);
    }
    #[cfg(feature = "cuda")]
    return launch::group_norm(x, weight, bias, groups, eps, silu);
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (weight, bias, groups, eps, silu);
        Ok(None)
    }
}

/// value · GELU(gate) (exact GELU) for `h` [..., 2·inner] = [value | gate].
pub fn geglu(h: &Tensor) -> candle_core::Result<Option<Tensor>> {
    if !applies(h) {
        return Ok(None);
    }
    #[cfg(feature = "cuda")]
    return launch::geglu(h, None);
    #[cfg(not(feature = "cuda"))]
    Ok(None)
}

/// GEGLU of `linear`'s output (`linear` [2·inner, in], its bias added inside the GEGLU pass), or
/// `None` off CUDA.
pub fn linear_geglu(linear: &Linear, x: &Tensor) -> candle_core::Result<Option<Tensor>> {
    if !applies(x) {
        return Ok(None);
    }
    #[cfg(feature = "cuda")]
    {
        let h = Linear::new(linear.weight().clone(), None).forward(x)?;
        launch::geglu(&h, linear.bias())
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = linear;
        Ok(None)
    }
}

/// `x` + `bias` [C] along dimension `dim` of `x`, in one contiguous pass.
fn add_bias(x: Tensor, bias: &Tensor, dim: usize) -> candle_core::Result<Tensor> {
    #[cfg(feature = "cuda")]
    if let Some(y) = launch::add_bias(&x, bias, dim)? {
        return Ok(y);
    }
    let mut shape = vec![1; x.rank()];
    shape[dim] = bias.elem_count();
    x.broadcast_add(&bias.reshape(shape)?)
}

/// `x` [B, C, ...] + `bias` [B, C] broadcast over the remaining dimensions (a resnet's time
/// embedding), in one contiguous pass on CUDA.
pub fn add_per_channel(x: &Tensor, bias: &Tensor) -> candle_core::Result<Tensor> {
    let (b, c) = bias.dims2()?;
    if applies(x) && x.rank() >= 2 && x.dims()[..2] == [b, c] {
        let rest = x.elem_count() / (b * c).max(1);
        let y = add_bias(x.reshape((b * c, rest))?, &bias.flatten_all()?, 0)?;
        return y.reshape(x.shape());
    }
    let mut shape = bias.dims().to_vec();
    shape.resize(x.rank(), 1);
    x.broadcast_add(&bias.reshape(shape)?)
}

/// `linear.forward(x)`; on CUDA the bias is added in one contiguous pass rather than candle's
/// strided broadcast.
pub fn linear(linear: &Linear, x: &Tensor) -> candle_core::Result<Tensor> {
    match linear.bias() {
        Some(bias) if applies(x) => {
            let y = Linear::new(linear.weight().clone(), None).forward(x)?;
            let last = y.rank() - 1;
            add_bias(y, bias, last)
        }
        _ => linear.forward(x),
    }
}

/// `linear.forward(x) + residual`; on CUDA bias and residual are added in one pass.
pub fn linear_residual(
    linear: &Linear,
    x: &Tensor,
    residual: &Tensor,
) -> candle_core::Result<Tensor> {
    #[cfg(feature = "cuda")]
    if let (Some(bias), true) = (linear.bias(), applies(x)) {
        let y = Linear::new(linear.weight().clone(), None).forward(x)?;
        if let Some(out) = launch::add_bias_residual(&y, bias, residual)? {
            return Ok(out);
        }
    }
    linear.forward(x)? + residual
}

/// A 2-D convolution (candle's weights [K, C, R, S], optional bias, configuration) on CUDA:
/// cuDNN with the `cudnn` feature, else candle's; either way the bias in one contiguous pass.
pub fn conv2d(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    cfg: &Conv2dConfig,
) -> candle_core::Result<Option<Tensor>> {
    if !applies(x) {
        return Ok(None);
    }
    #[cfg(feature = "cudnn")]
    let y = if cfg.groups == 1 {
        cudnn::conv2d(x, weight, cfg.padding, cfg.stride, cfg.dilation)?
    } else {
        x.conv2d(weight, cfg.padding, cfg.stride, cfg.dilation, cfg.groups)?
    };
    #[cfg(not(feature = "cudnn"))]
    let y = x.conv2d(weight, cfg.padding, cfg.stride, cfg.dilation, cfg.groups)?;
    Ok(Some(match bias {
        Some(b) => add_bias(y, b, 1)?,
        None => y,
    }))
}

#[cfg(all(test, feature = "cuda"))]
mod tests;
