//! InstantID's image projection (`image_proj` in `ip-adapter.bin`): IP-Adapter's perceiver
//! `Resampler`, which turns the 512-d ArcFace embedding into 16 tokens of the UNet's
//! cross-attention width. These tokens are IdentityNet's `encoder_hidden_states`.
//!
//! ```text
//! latents = learned [1, Q, dim];  x = proj_in(emb)                      emb: [N, T, 512]
//! per layer:  latents += attn(LN1(x), LN2(latents))   keys/values from cat(LN1(x), LN2(latents))
//!             latents += Linear(GELU(Linear(LN(latents))))              (no biases)
//! out = norm_out(proj_out(latents))                                     [N, Q, output_dim]
//! ```
//! Unlike HyperLoRA's resampler ([`crate::hypernet::resampler`]): the layer norms live inside the
//! attention (`layers.i.0.norm1/norm2`), keys and values are one fused `to_kv` over the
//! concatenation of the condition and the latents, the feed-forward is a bias-free
//! `Sequential(LayerNorm, Linear, GELU, Linear)`, and there is a final LayerNorm rather than an
//! L2 normalisation. Shared: the attention kernel and [`LayerNorm`].

use std::collections::HashMap;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Linear, VarBuilder};

use crate::clip::encoder::LayerNorm;
use crate::sdxl::model::attention::scaled_dot_product_attention;
use crate::{Error, Result};

const LN_EPS: f64 = 1e-5;

/// The resampler's sizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    pub dim: usize,
    pub depth: usize,
    pub dim_head: usize,
    pub heads: usize,
    pub num_queries: usize,
    pub embedding_dim: usize,
    pub output_dim: usize,
    pub ff_mult: usize,
}

impl Config {
    /// InstantID's `Resampler(dim=1280, depth=4, dim_head=64, heads=20, num_queries=16,
    /// embedding_dim=512, output_dim=unet.config.cross_attention_dim (2048), ff_mult=4)`
    /// (`pipeline_stable_diffusion_xl_instantid.py`, `set_image_proj_model`).
    pub fn instantid() -> Self {
        Self {
            dim: 1280,
            depth: 4,
            dim_head: 64,
            heads: 20,
            num_queries: 16,
            embedding_dim: 512,
            output_dim: 2048,
            ff_mult: 4,
        }
    }

    /// The sizes of the tensors under `prefix` (`image_proj.`), with InstantID's `dim_head` of
    /// 64, which the weights do not record.
    pub fn infer(tensors: &HashMap<String, Tensor>, prefix: &str) -> Result<Self> {
        let dims = |name: &str, rank: usize| -> Result<Vec<usize>> {
            let full = format!("{prefix}{name}");
            let t = tensors
                .get(&full)
                .ok_or_else(|| Error::bad_weights(format!("cannot find tensor {full}")))?;
            let d = t.dims().to_vec();
            if d.len() != rank || d.contains(&0) {
                return Err(Error::bad_weights(format!("{full} has shape {d:?}")));
            }
            Ok(d)
        };
        let latents = dims("latents", 3)?;
        let proj_in = dims("proj_in.weight", 2)?;
        let proj_out = dims("proj_out.weight", 2)?;
        let to_q = dims("layers.0.0.to_q.weight", 2)?;
        let ff = dims("layers.0.1.1.weight", 2)?;
        let depth = (0..)
            .take_while(|i| tensors.contains_key(&format!("{prefix}layers.{i}.0.to_q.weight")))
            .count();
        let dim_head = 64;
        let dim = latents[2];
        if !to_q[0].is_multiple_of(dim_head) || !ff[0].is_multiple_of(dim) {
            return Err(Error::bad_weights(format!(
                "{prefix}layers.0: attention width {} is not a multiple of 64, or feed-forward \
                 width {} not a multiple of {dim}",
                to_q[0], ff[0]
            )));
        }
        Ok(Self {
            dim,
            depth,
            dim_head,
            heads: to_q[0] / dim_head,
            num_queries: latents[1],
            embedding_dim: proj_in[1],
            output_dim: proj_out[0],
            ff_mult: ff[0] / dim,
        })
    }
}

/// IP-Adapter's `PerceiverAttention`: queries from the latents, keys and values from the
/// condition and the latents together.
#[derive(Debug, Clone)]
struct PerceiverAttention {
    norm1: LayerNorm,
    norm2: LayerNorm,
    to_q: Linear,
    to_kv: Linear,
    to_out: Linear,
    heads: usize,
    dim_head: usize,
}

impl PerceiverAttention {
    fn load(c: &Config, vb: VarBuilder) -> Result<Self> {
        let inner = c.heads * c.dim_head;
        Ok(Self {
            norm1: LayerNorm::load(c.dim, LN_EPS, vb.pp("norm1"))?,
            norm2: LayerNorm::load(c.dim, LN_EPS, vb.pp("norm2"))?,
            to_q: candle_nn::linear_no_bias(c.dim, inner, vb.pp("to_q"))?,
            to_kv: candle_nn::linear_no_bias(c.dim, 2 * inner, vb.pp("to_kv"))?,
            to_out: candle_nn::linear_no_bias(inner, c.dim, vb.pp("to_out"))?,
            heads: c.heads,
            dim_head: c.dim_head,
        })
    }

    /// `x`: `[N, T, dim]` (projected condition), `latents`: `[N, Q, dim]`.
    fn forward(&self, x: &Tensor, latents: &Tensor) -> Result<Tensor> {
        let x = self.norm1.forward(x)?;
        let latents = self.norm2.forward(latents)?;
        let (n, q_len, _) = latents.dims3()?;
        let (h, dh) = (self.heads, self.dim_head);
        // [N, L, H·D] → [N·H, L, D].
        let split = |t: Tensor| -> Result<Tensor> {
            let l = t.dim(1)?;
            Ok(t.reshape((n, l, h, dh))?
                .transpose(1, 2)?
                .contiguous()?
                .reshape((n * h, l, dh))?)
        };
        let q = split(self.to_q.forward(&latents)?)?;
        let kv = self.to_kv.forward(&Tensor::cat(&[&x, &latents], 1)?)?;
        let k = split(kv.narrow(2, 0, h * dh)?)?;
        let v = split(kv.narrow(2, h * dh, h * dh)?)?;
        // The reference scales q and k by dim_head^-1/4 each; the product is the same scale.
        let scale = 1.0 / (dh as f64).sqrt();
        let out = scaled_dot_product_attention(&q, &k, &v, scale, true)?
            .reshape((n, h, q_len, dh))?
            .transpose(1, 2)?
            .reshape((n, q_len, h * dh))?;
        Ok(self.to_out.forward(&out)?)
    }
}

/// `Sequential(LayerNorm, Linear(no bias), GELU, Linear(no bias))`.
#[derive(Debug, Clone)]
struct FeedForward {
    norm: LayerNorm,
    up: Linear,
    down: Linear,
}

impl FeedForward {
    fn load(c: &Config, vb: VarBuilder) -> Result<Self> {
        let inner = c.dim * c.ff_mult;
        Ok(Self {
            norm: LayerNorm::load(c.dim, LN_EPS, vb.pp("0"))?,
            up: candle_nn::linear_no_bias(c.dim, inner, vb.pp("1"))?,
            down: candle_nn::linear_no_bias(inner, c.dim, vb.pp("3"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.up.forward(&self.norm.forward(x)?)?;
        // torch's nn.GELU() (exact) in f32.
        let h = h.to_dtype(DType::F32)?.gelu_erf()?.to_dtype(x.dtype())?;
        Ok(self.down.forward(&h)?)
    }
}

/// The image projection model.
#[derive(Debug, Clone)]
pub struct Resampler {
    latents: Tensor,
    proj_in: Linear,
    layers: Vec<(PerceiverAttention, FeedForward)>,
    proj_out: Linear,
    norm_out: LayerNorm,
    config: Config,
}

impl Resampler {
    /// `vb` at `image_proj`.
    pub fn load(config: &Config, vb: VarBuilder) -> Result<Self> {
        let c = config;
        Ok(Self {
            latents: vb.get((1, c.num_queries, c.dim), "latents")?,
            proj_in: candle_nn::linear(c.embedding_dim, c.dim, vb.pp("proj_in"))?,
            layers: (0..c.depth)
                .map(|i| {
                    let l = vb.pp("layers").pp(i);
                    Ok((
                        PerceiverAttention::load(c, l.pp("0"))?,
                        FeedForward::load(c, l.pp("1"))?,
                    ))
                })
                .collect::<Result<_>>()?,
            proj_out: candle_nn::linear(c.dim, c.output_dim, vb.pp("proj_out"))?,
            norm_out: LayerNorm::load(c.output_dim, LN_EPS, vb.pp("norm_out"))?,
            config: *c,
        })
    }

    /// `image_proj.*` of InstantID's `ip-adapter.bin` tensors (the `ip_adapter.*` attention
    /// processors are not used), sizes inferred from them, in `dtype` on `device`.
    pub fn from_checkpoint(
        tensors: &HashMap<String, Tensor>,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let prefix = "image_proj.";
        let config = Config::infer(tensors, prefix)?;
        let own: HashMap<String, Tensor> = tensors
            .iter()
            .filter_map(|(k, v)| Some((k.strip_prefix(prefix)?.to_string(), v.clone())))
            .collect();
        let vb = VarBuilder::from_tensors(own, dtype, device);
        Self::load(&config, vb)
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn device(&self) -> &Device {
        self.latents.device()
    }

    /// `emb`: `[N, T, embedding_dim]` → `[N, num_queries, output_dim]`.
    pub fn forward(&self, emb: &Tensor) -> Result<Tensor> {
        let e = self.config.embedding_dim;
        let n = match emb.dims() {
            [n, t, w] if *n > 0 && *t > 0 && *w == e => *n,
            other => {
                return Err(Error::invalid_argument(format!(
                    "the face embedding must be [N, tokens, {e}], got {other:?}"
                )))
            }
        };
        let emb = emb.to_dtype(self.latents.dtype())?;
        let x = self.proj_in.forward(&emb)?;
        let mut latents = self.latents.repeat((n, 1, 1))?;
        for (attn, ff) in &self.layers {
            latents = (attn.forward(&x, &latents)? + &latents)?;
            latents = (ff.forward(&latents)? + &latents)?;
        }
        Ok(self.norm_out.forward(&self.proj_out.forward(&latents)?)?)
    }
}
