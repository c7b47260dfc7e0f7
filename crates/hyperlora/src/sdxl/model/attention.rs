//! Attention blocks of the SDXL UNet and VAE as diffusers 0.42 defines them: `Attention` with
//! `AttnProcessor2_0`, `BasicTransformerBlock`, `Transformer2DModel` and the VAE's single-head
//! spatial self-attention (an `Attention` with its own `group_norm` and a residual).
//!
//! The q/k/v/out projections stay plain [`candle_nn::Linear`]s in pub fields, so a LoRA can be
//! merged into (a copy of) their weights without touching the rest of the model. The transformer
//! forwards also take optional per-sample LoRA updates ([`SampleAdapters`]) for batches whose
//! samples carry different LoRAs.

use candle_core::{DType, Module, Tensor, D};
use candle_nn::{LayerNorm, Linear, VarBuilder};

use super::conv::{conv2d, Conv2d};
use super::norm::{group_norm, GroupNorm};

use crate::lora::{forward_linear, forward_linear_residual, SampleAdapters};
use crate::Result;

/// Upper bound on the elements of one score matrix chunk (f32: 256 MiB). Larger problems are
/// split along the queries; the softmax is per query row, so the result is unchanged.
pub(crate) const MAX_SCORE_ELEMENTS: usize = 1 << 26;

/// softmax(q kᵀ · scale) v for heads already folded into the batch.
///
/// `q`: [N, Sq, D], `k`/`v`: [N, Sk, D] → [N, Sq, D] in `v`'s dtype. With `upcast` the scores
/// and softmax run in f32 whatever the input dtype (f16 scores can overflow); otherwise in the
/// input dtype, as PyTorch's `scaled_dot_product_attention` does.
pub fn scaled_dot_product_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    upcast: bool,
) -> Result<Tensor> {
    if let Some(out) = crate::cpu::attention(q, k, v, 1, scale)? {
        return Ok(out);
    }
    attend_in_chunks(q, k, v, scale, upcast, MAX_SCORE_ELEMENTS)
}

fn attend_in_chunks(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    upcast: bool,
    max_score_elements: usize,
) -> Result<Tensor> {
    let out_dtype = v.dtype();
    let compute = if upcast { DType::F32 } else { q.dtype() };
    // Scaling q rather than the scores touches Sq·D elements instead of Sq·Sk.
    let q = (q.to_dtype(compute)? * scale)?;
    let k_t = k.to_dtype(compute)?.t()?;
    let (n, sq, _) = q.dims3()?;
    let sk = k_t.dim(2)?;
    let rows = (max_score_elements / (n * sk).max(1)).max(1);
    let attend = |q: &Tensor| -> Result<Tensor> {
        let scores = q.matmul(&k_t)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(out_dtype)?;
        Ok(probs.matmul(v)?)
    };
    if rows >= sq {
        return attend(&q);
    }
    let mut parts = Vec::with_capacity(sq.div_ceil(rows));
    for start in (0..sq).step_by(rows) {
        parts.push(attend(&q.narrow(1, start, rows.min(sq - start))?)?);
    }
    Ok(Tensor::cat(&parts, 1)?)
}

/// diffusers `Attention` (multi-head, optional cross-attention) without its optional norms.
#[derive(Debug, Clone)]
pub struct Attention {
    pub to_q: Linear,
    pub to_k: Linear,
    pub to_v: Linear,
    /// `to_out.0`; `to_out.1` is dropout.
    pub to_out: Linear,
    heads: usize,
    scale: f64,
    upcast: bool,
}

impl Attention {
    /// `cross_dim`: width of the context for cross-attention (`None`: self-attention).
    /// `bias`: whether q/k/v have biases (UNet: no, VAE: yes); `to_out.0` always has one.
    /// `upcast`: compute scores and softmax in f32 (see [`scaled_dot_product_attention`]).
    pub fn new(
        vb: VarBuilder,
        query_dim: usize,
        cross_dim: Option<usize>,
        heads: usize,
        dim_head: usize,
        bias: bool,
        upcast: bool,
    ) -> Result<Self> {
        let inner = heads * dim_head;
        let kv_dim = cross_dim.unwrap_or(query_dim);
        Ok(Self {
            to_q: candle_nn::linear_b(query_dim, inner, bias, vb.pp("to_q"))?,
            to_k: candle_nn::linear_b(kv_dim, inner, bias, vb.pp("to_k"))?,
            to_v: candle_nn::linear_b(kv_dim, inner, bias, vb.pp("to_v"))?,
            to_out: candle_nn::linear(inner, query_dim, vb.pp("to_out").pp("0"))?,
            heads,
            scale: 1.0 / (dim_head as f64).sqrt(),
            upcast,
        })
    }

    pub fn heads(&self) -> usize {
        self.heads
    }

    /// `x`: [B, S, query_dim]; `context`: [B, T, cross_dim] or `None` for self-attention;
    /// `adapters`: per-sample LoRA updates of the projections, if any.
    /// Returns [B, S, query_dim].
    pub fn forward(
        &self,
        x: &Tensor,
        context: Option<&Tensor>,
        adapters: Option<&SampleAdapters>,
    ) -> Result<Tensor> {
        let out = self.attend(x, context, adapters)?;
        forward_linear(&self.to_out, &out, adapters)
    }

    /// [`forward`](Self::forward) + `residual` ([B, S, query_dim]), added with `to_out`'s bias in
    /// one pass on CUDA.
    pub fn forward_residual(
        &self,
        x: &Tensor,
        context: Option<&Tensor>,
        adapters: Option<&SampleAdapters>,
        residual: &Tensor,
    ) -> Result<Tensor> {
        let out = self.attend(x, context, adapters)?;
        forward_linear_residual(&self.to_out, &out, adapters, residual)
    }

    /// The heads' attention output before `to_out`: [B, S, heads·dim_head].
    fn attend(
        &self,
        x: &Tensor,
        context: Option<&Tensor>,
        adapters: Option<&SampleAdapters>,
    ) -> Result<Tensor> {
        let context = context.unwrap_or(x);
        let q = forward_linear(&self.to_q, x, adapters)?;
        let k = forward_linear(&self.to_k, context, adapters)?;
        let v = forward_linear(&self.to_v, context, adapters)?;
        let (b, s, inner) = q.dims3()?;
        let out =
            if let Some(out) = crate::cuda::flash_attention(&q, &k, &v, self.heads, self.scale)? {
                out
            } else if let Some(out) = crate::cpu::attention(&q, &k, &v, self.heads, self.scale)? {
                out
            } else if self.heads == 1 {
                scaled_dot_product_attention(&q, &k, &v, self.scale, self.upcast)?
            } else {
                let h = self.heads;
                // [B, S, H·D] -> [B·H, S, D]: heads become batch entries for one batched matmul.
                let split = |t: &Tensor| -> Result<Tensor> {
                    let (b, s, _) = t.dims3()?;
                    Ok(t.reshape((b, s, h, inner / h))?.transpose(1, 2)?.reshape((
                        b * h,
                        s,
                        inner / h,
                    ))?)
                };
                let out = scaled_dot_product_attention(
                    &split(&q)?,
                    &split(&k)?,
                    &split(&v)?,
                    self.scale,
                    self.upcast,
                )?;
                out.reshape((b, h, s, inner / h))?
                    .transpose(1, 2)?
                    .reshape((b, s, inner))?
            };
        Ok(out)
    }
}

/// diffusers `FeedForward` with `activation_fn="geglu"`: `net.0.proj` makes value and gate
/// halves, value · GELU(gate) (exact erf GELU), then `net.2` back to the model width.
#[derive(Debug, Clone)]
pub struct FeedForward {
    pub proj: Linear,
    pub out: Linear,
}

impl FeedForward {
    pub fn new(vb: VarBuilder, dim: usize, mult: usize) -> Result<Self> {
        let inner = dim * mult;
        Ok(Self {
            proj: candle_nn::linear(dim, 2 * inner, vb.pp("net.0.proj"))?,
            out: candle_nn::linear(inner, dim, vb.pp("net.2"))?,
        })
    }

    /// `x` [B, S, dim] → FF(x) + `residual` (the block adds its input back).
    pub fn forward_residual(
        &self,
        x: &Tensor,
        adapters: Option<&SampleAdapters>,
        residual: &Tensor,
    ) -> Result<Tensor> {
        // Without per-sample adapters the projection's bias is added inside the GEGLU pass.
        let fused = match adapters {
            None => match crate::cuda::linear_geglu(&self.proj, x)? {
                Some(y) => Some(y),
                None => crate::cpu::linear_geglu(&self.proj, x)?,
            },
            Some(_) => None,
        };
        let gated = match fused {
            Some(y) => y,
            None => {
                let h = forward_linear(&self.proj, x, adapters)?;
                match crate::cuda::geglu(&h)? {
                    Some(y) => y,
                    None => {
                        let inner = h.dim(D::Minus1)? / 2;
                        let value = h.narrow(D::Minus1, 0, inner)?;
                        let gate = h.narrow(D::Minus1, inner, inner)?;
                        (value * gate.gelu_erf()?)?
                    }
                }
            }
        };
        forward_linear_residual(&self.out, &gated, adapters, residual)
    }
}

/// diffusers `BasicTransformerBlock` with `norm_type="layer_norm"`: self-attention,
/// cross-attention to the text, GEGLU feed-forward, each pre-normed and residual.
#[derive(Debug, Clone)]
pub struct BasicTransformerBlock {
    norm1: LayerNorm,
    pub attn1: Attention,
    norm2: LayerNorm,
    pub attn2: Attention,
    norm3: LayerNorm,
    pub ff: FeedForward,
}

impl BasicTransformerBlock {
    pub fn new(
        vb: VarBuilder,
        dim: usize,
        heads: usize,
        dim_head: usize,
        cross_dim: usize,
        upcast: bool,
    ) -> Result<Self> {
        // diffusers' BasicTransformerBlock default norm_eps.
        let eps = 1e-5;
        Ok(Self {
            norm1: candle_nn::layer_norm(dim, eps, vb.pp("norm1"))?,
            attn1: Attention::new(vb.pp("attn1"), dim, None, heads, dim_head, false, upcast)?,
            norm2: candle_nn::layer_norm(dim, eps, vb.pp("norm2"))?,
            attn2: Attention::new(
                vb.pp("attn2"),
                dim,
                Some(cross_dim),
                heads,
                dim_head,
                false,
                upcast,
            )?,
            norm3: candle_nn::layer_norm(dim, eps, vb.pp("norm3"))?,
            ff: FeedForward::new(vb.pp("ff"), dim, 4)?,
        })
    }

    /// `x`: [B, S, dim]; `context`: [B, T, cross_dim].
    pub fn forward(
        &self,
        x: &Tensor,
        context: &Tensor,
        adapters: Option<&SampleAdapters>,
    ) -> Result<Tensor> {
        let x = self
            .attn1
            .forward_residual(&self.norm1.forward(x)?, None, adapters, x)?;
        let x =
            self.attn2
                .forward_residual(&self.norm2.forward(&x)?, Some(context), adapters, &x)?;
        self.ff
            .forward_residual(&self.norm3.forward(&x)?, adapters, &x)
    }
}

/// `proj_in` / `proj_out` of a [`Transformer2DModel`]: a Linear on tokens (SDXL,
/// `use_linear_projection=True`) or a 1x1 conv on the feature map (SD 1.x style).
#[derive(Debug, Clone)]
enum Projection {
    Linear(Linear),
    Conv(Conv2d),
}

impl Projection {
    fn new(vb: VarBuilder, cin: usize, cout: usize, linear: bool) -> Result<Self> {
        Ok(if linear {
            Self::Linear(candle_nn::linear(cin, cout, vb)?)
        } else {
            Self::Conv(conv2d(cin, cout, 1, Default::default(), vb)?)
        })
    }
}

/// The Linears of `blocks` (`{prefix}.transformer_blocks.N.…`).
fn block_linears_mut<'a>(
    blocks: &'a mut [BasicTransformerBlock],
    prefix: &str,
    out: &mut Vec<(String, &'a mut Linear)>,
) {
    for (i, block) in blocks.iter_mut().enumerate() {
        let p = format!("{prefix}.transformer_blocks.{i}");
        let BasicTransformerBlock {
            attn1, attn2, ff, ..
        } = block;
        for (name, attn) in [("attn1", attn1), ("attn2", attn2)] {
            let Attention {
                to_q,
                to_k,
                to_v,
                to_out,
                ..
            } = attn;
            out.push((format!("{p}.{name}.to_q"), to_q));
            out.push((format!("{p}.{name}.to_k"), to_k));
            out.push((format!("{p}.{name}.to_v"), to_v));
            out.push((format!("{p}.{name}.to_out.0"), to_out));
        }
        out.push((format!("{p}.ff.net.0.proj"), &mut ff.proj));
        out.push((format!("{p}.ff.net.2"), &mut ff.out));
    }
}

/// diffusers `Transformer2DModel` for continuous inputs: GroupNorm (eps 1e-6), `proj_in`,
/// `transformer_blocks`, `proj_out`, plus the input as residual.
#[derive(Debug, Clone)]
pub struct Transformer2DModel {
    norm: GroupNorm,
    proj_in: Projection,
    pub transformer_blocks: Vec<BasicTransformerBlock>,
    proj_out: Projection,
}

/// Shape of one [`Transformer2DModel`].
#[derive(Debug, Clone, PartialEq)]
pub struct TransformerConfig {
    pub channels: usize,
    pub heads: usize,
    pub dim_head: usize,
    pub layers: usize,
    pub cross_dim: usize,
    pub groups: usize,
    pub use_linear_projection: bool,
    pub upcast_attention: bool,
}

impl Transformer2DModel {
    pub fn new(vb: VarBuilder, cfg: &TransformerConfig) -> Result<Self> {
        let inner = cfg.heads * cfg.dim_head;
        let norm = group_norm(cfg.groups, cfg.channels, 1e-6, vb.pp("norm"))?;
        let proj_in = Projection::new(
            vb.pp("proj_in"),
            cfg.channels,
            inner,
            cfg.use_linear_projection,
        )?;
        let blocks = (0..cfg.layers)
            .map(|i| {
                BasicTransformerBlock::new(
                    vb.pp("transformer_blocks").pp(i),
                    inner,
                    cfg.heads,
                    cfg.dim_head,
                    cfg.cross_dim,
                    cfg.upcast_attention,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let proj_out = Projection::new(
            vb.pp("proj_out"),
            inner,
            cfg.channels,
            cfg.use_linear_projection,
        )?;
        Ok(Self {
            norm,
            proj_in,
            transformer_blocks: blocks,
            proj_out,
        })
    }

    /// Every Linear of this transformer by diffusers name, as [`Self::linears_mut`] lists them.
    pub fn linears<'a>(&'a self, prefix: &str, out: &mut Vec<(String, &'a Linear)>) {
        if let Projection::Linear(l) = &self.proj_in {
            out.push((format!("{prefix}.proj_in"), l));
        }
        for (i, block) in self.transformer_blocks.iter().enumerate() {
            let p = format!("{prefix}.transformer_blocks.{i}");
            for (name, attn) in [("attn1", &block.attn1), ("attn2", &block.attn2)] {
                out.push((format!("{p}.{name}.to_q"), &attn.to_q));
                out.push((format!("{p}.{name}.to_k"), &attn.to_k));
                out.push((format!("{p}.{name}.to_v"), &attn.to_v));
                out.push((format!("{p}.{name}.to_out.0"), &attn.to_out));
            }
            out.push((format!("{p}.ff.net.0.proj"), &block.ff.proj));
            out.push((format!("{p}.ff.net.2"), &block.ff.out));
        }
        if let Projection::Linear(l) = &self.proj_out {
            out.push((format!("{prefix}.proj_out"), l));
        }
    }

    /// Every Linear of this transformer, named as diffusers names its weights under `prefix`
    /// (e.g. `down_blocks.1.attentions.0`): `proj_in`/`proj_out` when linear and, per block,
    /// `attn1|attn2.to_q|to_k|to_v|to_out.0`, `ff.net.0.proj`, `ff.net.2` — the layers UNet
    /// LoRAs target, so one can be merged by replacing the Linear.
    pub fn linears_mut<'a>(&'a mut self, prefix: &str, out: &mut Vec<(String, &'a mut Linear)>) {
        let Self {
            proj_in,
            transformer_blocks,
            proj_out,
            ..
        } = self;
        if let Projection::Linear(l) = proj_in {
            out.push((format!("{prefix}.proj_in"), l));
        }
        block_linears_mut(transformer_blocks, prefix, out);
        if let Projection::Linear(l) = proj_out {
            out.push((format!("{prefix}.proj_out"), l));
        }
    }

    /// Every layer LoRAs target: the Linears as [`Self::linears_mut`] lists them, and the
    /// 1x1-convolution `proj_in` / `proj_out` of SD 1.x-style transformers.
    pub fn layers_mut<'a>(
        &'a mut self,
        prefix: &str,
        linears: &mut Vec<(String, &'a mut Linear)>,
        convs: &mut Vec<(String, &'a mut Conv2d)>,
    ) {
        let Self {
            proj_in,
            transformer_blocks,
            proj_out,
            ..
        } = self;
        for (name, proj) in [("proj_in", proj_in), ("proj_out", proj_out)] {
            match proj {
                Projection::Conv(c) => convs.push((format!("{prefix}.{name}"), c)),
                Projection::Linear(l) => linears.push((format!("{prefix}.{name}"), l)),
            }
        }
        block_linears_mut(transformer_blocks, prefix, linears);
    }

    /// `x`: [B, C, H, W]; `context`: [B, T, cross_dim]; `adapters`: per-sample LoRA updates of
    /// the Linears, if any. Returns [B, C, H, W].
    pub fn forward(
        &self,
        x: &Tensor,
        context: &Tensor,
        adapters: Option<&SampleAdapters>,
    ) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let normed = self.norm.forward(x)?;
        // Pixels become tokens: [B, C, H, W] -> [B, H·W, C].
        let to_tokens = |t: &Tensor| -> Result<Tensor> {
            let c = t.dim(1)?;
            Ok(t.permute((0, 2, 3, 1))?.reshape((b, h * w, c))?)
        };
        let mut tokens = match &self.proj_in {
            Projection::Linear(l) if adapters.is_none() => {
                match crate::cpu::linear_from_map(l, &normed)? {
                    Some(t) => t,
                    None => forward_linear(l, &to_tokens(&normed)?, None)?,
                }
            }
            Projection::Linear(l) => forward_linear(l, &to_tokens(&normed)?, adapters)?,
            Projection::Conv(conv) => to_tokens(&conv.forward(&normed)?)?,
        };
        for block in &self.transformer_blocks {
            tokens = block.forward(&tokens, context, adapters)?;
        }
        let to_map = |t: &Tensor| -> Result<Tensor> {
            let c = t.dim(2)?;
            Ok(t.reshape((b, h, w, c))?.permute((0, 3, 1, 2))?)
        };
        if let (Projection::Linear(l), None) = (&self.proj_out, adapters) {
            if let Some(out) = crate::cpu::linear_to_map(l, &tokens, x)? {
                return Ok(out);
            }
        }
        let out = match &self.proj_out {
            Projection::Linear(l) => to_map(&forward_linear(l, &tokens, adapters)?)?,
            Projection::Conv(conv) => conv.forward(&to_map(&tokens)?.contiguous()?)?,
        };
        debug_assert_eq!(out.dims(), &[b, c, h, w]);
        Ok((out + x)?)
    }
}

/// The VAE mid-block attention: diffusers `Attention` built with `norm_num_groups`,
/// `residual_connection=True`, biased q/k/v and one head spanning all channels (SDXL).
#[derive(Debug, Clone)]
pub struct SpatialSelfAttention {
    group_norm: GroupNorm,
    pub attn: Attention,
    rescale_output_factor: f64,
}

impl SpatialSelfAttention {
    /// `vb` points at e.g. `decoder.mid_block.attentions.0`.
    pub fn new(
        vb: VarBuilder,
        channels: usize,
        heads: usize,
        groups: usize,
        eps: f64,
    ) -> Result<Self> {
        let group_norm = group_norm(groups, channels, eps, vb.pp("group_norm"))?;
        // Scores in f32: this attention spans every latent pixel and overflows f16.
        let attn = Attention::new(vb, channels, None, heads, channels / heads, true, true)?;
        Ok(Self {
            group_norm,
            attn,
            rescale_output_factor: 1.0,
        })
    }

    /// [B, C, H, W] -> [B, C, H, W].
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        // GroupNorm over [B, C, H·W], then tokens [B, H·W, C].
        let tokens = self
            .group_norm
            .forward(&x.reshape((b, c, h * w))?)?
            .transpose(1, 2)?
            .contiguous()?;
        let out = self.attn.forward(&tokens, None, None)?;
        let out = out.transpose(1, 2)?.reshape((b, c, h, w))?;
        let out = (out + x)?;
        if self.rescale_output_factor == 1.0 {
            Ok(out)
        } else {
            Ok((out / self.rescale_output_factor)?)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::assert_close;
    use candle_core::Device;

    /// softmax(q kᵀ s) v written out per head and row, the definition the batched code must meet.
    fn naive(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Tensor {
        let (q, k, v) = (
            q.to_vec3::<f32>().unwrap(),
            k.to_vec3::<f32>().unwrap(),
            v.to_vec3::<f32>().unwrap(),
        );
        let mut out = Vec::new();
        for n in 0..q.len() {
            for row in &q[n] {
                let scores: Vec<f32> = k[n]
                    .iter()
                    .map(|kr| row.iter().zip(kr).map(|(a, b)| a * b).sum::<f32>() * scale as f32)
                    .collect();
                let max = scores.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                let e: Vec<f32> = scores.iter().map(|s| (s - max).exp()).collect();
                let z: f32 = e.iter().sum();
                for d in 0..v[n][0].len() {
                    out.push(
                        e.iter()
                            .zip(&v[n])
                            .map(|(p, vr)| p / z * vr[d])
                            .sum::<f32>(),
                    );
                }
            }
        }
        Tensor::from_vec(out, (q.len(), q[0].len(), v[0][0].len()), &Device::Cpu).unwrap()
    }

    #[test]
    fn chunked_attention_equals_the_definition() {
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1.0, (3, 37, 8), &dev).unwrap();
        let k = Tensor::randn(0f32, 1.0, (3, 11, 8), &dev).unwrap();
        let v = Tensor::randn(0f32, 1.0, (3, 11, 8), &dev).unwrap();
        let expected = naive(&q, &k, &v, 0.35);
        let whole = scaled_dot_product_attention(&q, &k, &v, 0.35, false).unwrap();
        assert_close("whole", &whole, &expected, 1e-5);
        // 100 elements per chunk: 3 query rows at a time, with a ragged last chunk.
        let chunked = attend_in_chunks(&q, &k, &v, 0.35, false, 100).unwrap();
        assert_close("chunked", &chunked, &expected, 1e-5);
        let f16 = |t: &Tensor| t.to_dtype(DType::F16).unwrap();
        let upcast = attend_in_chunks(&f16(&q), &f16(&k), &f16(&v), 0.35, true, 100).unwrap();
        assert_eq!(upcast.dtype(), DType::F16);
        assert_close("f16 upcast", &upcast, &expected, 5e-3);
    }
}
