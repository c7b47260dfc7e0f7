//! Linear layers on the CPU: one matrix product that reads the `[out, in]` weight as its
//! transpose and adds the bias (and a residual) while storing, and GEGLU fused after it.

use candle_core::Tensor;
use candle_nn::Linear;
use hyperlora_cpu::gemm::{sgemm, Epilogue, MatRef};

/// `linear.forward(x)` (+ `residual`, of the output's shape); `x` [..., in].
pub fn linear(
    linear: &Linear,
    x: &Tensor,
    residual: Option<&Tensor>,
) -> candle_core::Result<Option<Tensor>> {
    let w = linear.weight();
    if !super::applies(x) || w.dtype() != x.dtype() || w.rank() != 2 || x.rank() < 2 {
        return Ok(None);
    }
    let (n, k) = w.dims2()?;
    let mut shape = x.dims().to_vec();
    if shape.pop() != Some(k) {
        return Ok(None);
    }
    shape.push(n);
    let m = x.elem_count() / k.max(1);
    let mut out = match residual {
        Some(r) if r.dims() == shape.as_slice() => super::with_f32(r, <[f32]>::to_vec)?,
        Some(_) => return Ok(None),
        None => vec![0f32; m * n],
    };
    let bias = match linear.bias() {
        Some(b) => Some(b.to_vec1::<f32>()?),
        None => None,
    };
    product(x, w, &mut out, m, n, k, residual.is_some(), bias.as_deref())?;
    Ok(Some(super::tensor(out, shape)?))
}

/// `x`·`w`ᵀ into `out` [m, n], accumulating or not, with a per-column bias.
#[allow(clippy::too_many_arguments)]
fn product(
    x: &Tensor,
    w: &Tensor,
    out: &mut [f32],
    m: usize,
    n: usize,
    k: usize,
    accumulate: bool,
    bias: Option<&[f32]>,
) -> candle_core::Result<()> {
    super::with_f32(x, |x| {
        super::with_f32(w, |w| {
            sgemm(
                super::threads(),
                m,
                n,
                k,
                MatRef::rows(x, m, k),
                MatRef::new(w, k, n, 1, k),
                out,
                n,
                Epilogue {
                    accumulate,
                    row_bias: None,
                    col_bias: bias,
                },
            )
        })
    })?
}

/// diffusers' GEGLU: `h = linear(x)` = [value | gate], value · GELU(gate) (exact GELU), the
/// bias added on the way.
pub fn linear_geglu(linear: &Linear, x: &Tensor) -> candle_core::Result<Option<Tensor>> {
    let w = linear.weight();
    if !super::applies(x) || w.dtype() != x.dtype() || w.rank() != 2 || x.rank() < 2 {
        return Ok(None);
    }
    let (n, k) = w.dims2()?;
    let mut shape = x.dims().to_vec();
    if shape.pop() != Some(k) || n % 2 != 0 {
        return Ok(None);
    }
    let inner = n / 2;
    shape.push(inner);
    let m = x.elem_count() / k.max(1);
    let mut h = vec![0f32; m * n];
    product(x, w, &mut h, m, n, k, false, None)?;
    let bias = match linear.bias() {
        Some(b) => b.to_vec1::<f32>()?,
        None => vec![0.0; n],
    };
    let mut out = vec![0f32; m * inner];
    hyperlora_cpu::geglu(&h, &bias, &mut out);
    Ok(Some(super::tensor(out, shape)?))
}

/// `linear` applied to the pixels of a feature map as tokens: `x` [B, C, H, W] →
/// [B, H·W, out], reading `x` through strides instead of transposing it first (a
/// `Transformer2DModel`'s `proj_in`).
pub fn linear_from_map(linear: &Linear, x: &Tensor) -> candle_core::Result<Option<Tensor>> {
    let w = linear.weight();
    if !super::applies(x) || w.dtype() != x.dtype() || x.rank() != 4 {
        return Ok(None);
    }
    let (b, c, h, wd) = x.dims4()?;
    let (n, k) = w.dims2()?;
    if k != c {
        return Ok(None);
    }
    let pixels = h * wd;
    let bias = match linear.bias() {
        Some(b) => Some(b.to_vec1::<f32>()?),
        None => None,
    };
    let mut out = vec![0f32; b * pixels * n];
    super::with_f32(x, |x| {
        super::with_f32(w, |w| {
            for (image, out) in x
                .chunks_exact(c * pixels)
                .zip(out.chunks_exact_mut(pixels * n))
            {
                let epi = Epilogue {
                    col_bias: bias.as_deref(),
                    ..Default::default()
                };
                let tokens = MatRef::new(image, pixels, c, 1, pixels);
                let wt = MatRef::new(w, k, n, 1, k);
                sgemm(super::threads(), pixels, n, k, tokens, wt, out, n, epi);
            }
        })
    })??;
    Ok(Some(super::tensor(out, (b, pixels, n))?))
}

/// `linear` applied to tokens `x` [B, H·W, in], written back as a feature map [B, out, H, W]
/// plus `residual` (that shape), without transposing either (a `Transformer2DModel`'s
/// `proj_out` and its residual).
pub fn linear_to_map(
    linear: &Linear,
    x: &Tensor,
    residual: &Tensor,
) -> candle_core::Result<Option<Tensor>> {
    let w = linear.weight();
    if !super::applies(x) || w.dtype() != x.dtype() || x.rank() != 3 || residual.rank() != 4 {
        return Ok(None);
    }
    let (b, pixels, k) = x.dims3()?;
    let (n, wk) = w.dims2()?;
    let (rb, rn, h, wd) = residual.dims4()?;
    if wk != k || (rb, rn, h * wd) != (b, n, pixels) || !super::applies(residual) {
        return Ok(None);
    }
    let bias = match linear.bias() {
        Some(b) => b.to_vec1::<f32>()?,
        None => vec![0.0; n],
    };
    let mut out = super::with_f32(residual, <[f32]>::to_vec)?;
    super::with_f32(x, |x| {
        super::with_f32(w, |w| {
            for (tokens, out) in x
                .chunks_exact(pixels * k)
                .zip(out.chunks_exact_mut(n * pixels))
            {
                let epi = Epilogue {
                    accumulate: true,
                    row_bias: Some(&bias),
                    col_bias: None,
                };
                // out [out, pixels] += W [out, in] · tokensᵀ [in, pixels]
                let tt = MatRef::new(tokens, k, pixels, 1, k);
                sgemm(
                    super::threads(),
                    n,
                    pixels,
                    k,
                    MatRef::rows(w, n, k),
                    tt,
                    out,
                    pixels,
                    epi,
                );
            }
        })
    })??;
    Ok(Some(super::tensor(out, residual.shape())?))
}
