//! The perceiver resampler (docs/hyperlora-model.md §4), with one condition (Base-LoRA, single-encoder models)
//! or two (the released ID-LoRA: ArcFace tokens, then CLIP tokens).
//!
//! ```text
//! latents = learned [1, Q, dim] repeated over the N photos;  x = proj_in(cond1);  y = proj_in_2(cond2)
//! per block:  latents += attn1(LN1(latents) → LN1(latents))
//!             latents += attn2(LN2l(latents) → LN2x(x))
//!             latents += attn3(LN3l(latents) → LN3y(y))        (two conditions only)
//!             latents += ff(LNff(latents))                     (Linear+bias, exact GELU, Linear+bias)
//! out = proj_out(latents) → mean over the N photos → x / sqrt(Σx² + 1e-8) per token   → [1, Q, out]
//! ```
//! Attention is diffusers' `Attention(query_dim=dim, cross_attention_dim=dim, heads, dim_head,
//! out_bias=False)`: bias-free `to_q/to_k/to_v/to_out.0` (so not [`crate::sdxl::model::attention::Attention`],
//! whose `to_out.0` has a bias), scale `1/sqrt(dim_head)`, via the UNet's
//! [`scaled_dot_product_attention`]. The feed-forward is GELU, not the UNet's GEGLU.
//! LayerNorms have eps 1e-5 and compute their statistics in f32; softmax runs in f32.

use candle_core::{DType, Module, Tensor, D};
use candle_nn::{Linear, VarBuilder};

use super::folder::ResamplerShape;
use crate::clip::encoder::LayerNorm;
use crate::sdxl::model::attention::scaled_dot_product_attention;
use crate::{Error, Result};

const LN_EPS: f64 = 1e-5;

/// diffusers' `Attention` as the resampler uses it (no biases).
#[derive(Debug, Clone)]
pub struct PerceiverAttention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
    dim_head: usize,
}

impl PerceiverAttention {
    pub fn load(dim: usize, heads: usize, dim_head: usize, vb: VarBuilder) -> Result<Self> {
        let inner = heads * dim_head;
        Ok(Self {
            to_q: candle_nn::linear_no_bias(dim, inner, vb.pp("to_q"))?,
            to_k: candle_nn::linear_no_bias(dim, inner, vb.pp("to_k"))?,
            to_v: candle_nn::linear_no_bias(dim, inner, vb.pp("to_v"))?,
            to_out: candle_nn::linear_no_bias(inner, dim, vb.pp("to_out.0"))?,
            heads,
            dim_head,
        })
    }

    /// `x`: `[N, Lq, dim]` queries; `context`: `[N, Lk, dim]`. Scores and softmax in f32.
    pub fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let (n, lq, _) = x.dims3()?;
        let (h, dh) = (self.heads, self.dim_head);
        // [N, L, H·D] → [N·H, L, D]: heads become batch entries.
        let split = |t: Tensor| -> Result<Tensor> {
            let l = t.dim(1)?;
            Ok(t.reshape((n, l, h, dh))?
                .transpose(1, 2)?
                .reshape((n * h, l, dh))?)
        };
        let q = split(self.to_q.forward(x)?)?;
        let k = split(self.to_k.forward(context)?)?;
        let v = split(self.to_v.forward(context)?)?;
        let scale = 1.0 / (dh as f64).sqrt();
        let out = scaled_dot_product_attention(&q, &k, &v, scale, true)?
            .reshape((n, h, lq, dh))?
            .transpose(1, 2)?
            .reshape((n, lq, h * dh))?;
        Ok(self.to_out.forward(&out)?)
    }
}

/// diffusers' `FeedForward(dim, mult, activation_fn="gelu")`: `net.0.proj` → exact GELU → `net.2`.
#[derive(Debug, Clone)]
pub struct FeedForward {
    proj: Linear,
    out: Linear,
}

impl FeedForward {
    pub fn load(dim: usize, inner: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            proj: candle_nn::linear(dim, inner, vb.pp("net.0.proj"))?,
            out: candle_nn::linear(inner, dim, vb.pp("net.2"))?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.proj.forward(x)?;
        // torch's F.gelu (approximate="none") in f32.
        let h = h.to_dtype(DType::F32)?.gelu_erf()?.to_dtype(x.dtype())?;
        Ok(self.out.forward(&h)?)
    }
}

#[derive(Debug, Clone)]
struct Block {
    norm_attn1: LayerNorm,
    attn1: PerceiverAttention,
    norm_attn2_l: LayerNorm,
    norm_attn2_x: LayerNorm,
    attn2: PerceiverAttention,
    attn3: Option<(LayerNorm, LayerNorm, PerceiverAttention)>,
    norm_ff: LayerNorm,
    ff: FeedForward,
}

impl Block {
    fn load(s: &ResamplerShape, vb: VarBuilder) -> Result<Self> {
        let d = s.dim;
        let ln = |name: &str| LayerNorm::load(d, LN_EPS, vb.pp(name));
        let attn = |name: &str| PerceiverAttention::load(d, s.heads, s.dim_head, vb.pp(name));
        Ok(Self {
            norm_attn1: ln("norm_attn1")?,
            attn1: attn("attn1")?,
            norm_attn2_l: ln("norm_attn2_l")?,
            norm_attn2_x: ln("norm_attn2_x")?,
            attn2: attn("attn2")?,
            attn3: if s.two_conditions {
                Some((ln("norm_attn3_l")?, ln("norm_attn3_y")?, attn("attn3")?))
            } else {
                None
            },
            norm_ff: ln("norm_ff")?,
            ff: FeedForward::load(d, s.ff_inner, vb.pp("ff"))?,
        })
    }

    fn forward(&self, latents: &Tensor, x: &Tensor, y: Option<&Tensor>) -> Result<Tensor> {
        let q = self.norm_attn1.forward(latents)?;
        let latents = (latents + self.attn1.forward(&q, &q)?)?;
        let latents = (&latents
            + self.attn2.forward(
                &self.norm_attn2_l.forward(&latents)?,
                &self.norm_attn2_x.forward(x)?,
            )?)?;
        let latents = match (&self.attn3, y) {
            (Some((nl, ny, attn)), Some(y)) => {
                (&latents + attn.forward(&nl.forward(&latents)?, &ny.forward(y)?)?)?
            }
            _ => latents,
        };
        Ok((&latents + self.ff.forward(&self.norm_ff.forward(&latents)?)?)?)
    }
}

/// The perceiver resampler.
#[derive(Debug, Clone)]
pub struct Resampler {
    latents: Tensor,
    proj_in: Linear,
    proj_in_2: Option<Linear>,
    layers: Vec<Block>,
    proj_out: Linear,
    shape: ResamplerShape,
}

impl Resampler {
    /// `vb` holds the validated resampler tensors (see [`super::folder`]).
    pub fn load(shape: &ResamplerShape, vb: VarBuilder) -> Result<Self> {
        let s = shape;
        Ok(Self {
            latents: vb.get((1, s.num_queries, s.dim), "latents")?,
            proj_in: candle_nn::linear(s.embedding_dim, s.dim, vb.pp("proj_in"))?,
            proj_in_2: if s.two_conditions {
                Some(candle_nn::linear(
                    s.embedding_dim,
                    s.dim,
                    vb.pp("proj_in_2"),
                )?)
            } else {
                None
            },
            layers: (0..s.depth)
                .map(|l| Block::load(s, vb.pp("layers").pp(l)))
                .collect::<Result<_>>()?,
            proj_out: candle_nn::linear(s.dim, s.output_dim, vb.pp("proj_out"))?,
            shape: *s,
        })
    }

    pub fn shape(&self) -> &ResamplerShape {
        &self.shape
    }

    /// The resampler's output before the mean over photos: `[N, Q, output_dim]`.
    /// `x`: `[N, Tx, embedding_dim]` (first condition); `y`: `[N, Ty, embedding_dim]`, required
    /// exactly when the resampler has two conditions.
    pub fn forward_per_photo(&self, x: &Tensor, y: Option<&Tensor>) -> Result<Tensor> {
        let e = self.shape.embedding_dim;
        let check = |t: &Tensor, what: &str| -> Result<usize> {
            match t.dims() {
                [n, l, w] if *n > 0 && *l > 0 && *w == e => Ok(*n),
                other => Err(Error::invalid_argument(format!(
                    "resampler {what} must be [N, tokens, {e}], got {other:?}"
                ))),
            }
        };
        let n = check(x, "condition")?;
        let y = match (&self.proj_in_2, y) {
            (Some(p), Some(y)) => {
                if check(y, "second condition")? != n {
                    return Err(Error::invalid_argument(format!(
                        "the two resampler conditions have {n} and {} photos",
                        y.dim(0)?
                    )));
                }
                Some(p.forward(y)?)
            }
            (Some(_), None) => {
                return Err(Error::invalid_argument(
                    "this resampler takes two conditions, one was given",
                ))
            }
            (None, Some(_)) => {
                return Err(Error::invalid_argument(
                    "this resampler takes one condition, two were given",
                ))
            }
            (None, None) => None,
        };
        let x = self.proj_in.forward(x)?;
        let mut latents = self.latents.repeat((n, 1, 1))?;
        for block in &self.layers {
            latents = block.forward(&latents, &x, y.as_ref())?;
        }
        Ok(self.proj_out.forward(&latents)?)
    }

    /// The full output: mean over the N photos, then per-token L2 normalisation
    /// (`x / sqrt(Σx² + 1e-8)`), computed in f32. Returns `[1, Q, output_dim]` in f32.
    pub fn forward(&self, x: &Tensor, y: Option<&Tensor>) -> Result<Tensor> {
        let per_photo = self.forward_per_photo(x, y)?.to_dtype(DType::F32)?;
        Ok(normalize_tokens(&per_photo.mean_keepdim(0)?)?)
    }
}

/// Per-token L2 normalisation `x / sqrt(Σx² + 1e-8)` over the last dimension.
pub fn normalize_tokens(x: &Tensor) -> candle_core::Result<Tensor> {
    let norm = (x.sqr()?.sum_keepdim(D::Minus1)? + 1e-8)?.sqrt()?;
    x.broadcast_div(&norm)
}
