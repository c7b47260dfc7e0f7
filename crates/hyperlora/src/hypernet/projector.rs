//! The ID projector (docs/hyperlora-model.md §4): one ArcFace embedding → `num_id_tokens` condition tokens.
//! `Linear(id_embed_dim → tokens × width)` → reshape `[N, tokens, width]` → `LayerNorm(width)`
//! (eps 1e-5). File keys: `0.weight`, `0.bias`, `2.weight`, `2.bias` (an `nn.Sequential`).

use candle_core::{Module, Tensor};
use candle_nn::{Linear, VarBuilder};

use crate::clip::encoder::LayerNorm;
use crate::{Error, Result};

#[derive(Debug, Clone)]
pub struct IdProjector {
    linear: Linear,
    norm: LayerNorm,
    num_tokens: usize,
    width: usize,
    id_embed_dim: usize,
}

impl IdProjector {
    /// `vb` holds the validated `id_projector.safetensors` tensors.
    pub fn load(
        vb: VarBuilder,
        id_embed_dim: usize,
        num_tokens: usize,
        width: usize,
    ) -> Result<Self> {
        Ok(Self {
            linear: candle_nn::linear(id_embed_dim, num_tokens * width, vb.pp("0"))?,
            norm: LayerNorm::load(width, 1e-5, vb.pp("2"))?,
            num_tokens,
            width,
            id_embed_dim,
        })
    }

    pub fn num_tokens(&self) -> usize {
        self.num_tokens
    }

    /// `id_embeds`: `[N, 1, id_embed_dim]` (as the reference stacks them) or `[N, id_embed_dim]`
    /// → `[N, num_tokens, width]`.
    pub fn forward(&self, id_embeds: &Tensor) -> Result<Tensor> {
        let n = match id_embeds.dims() {
            [n, 1, d] | [n, d] if *d == self.id_embed_dim && *n > 0 => *n,
            other => {
                return Err(Error::invalid_argument(format!(
                    "ID embeddings must be [N, 1, {0}] or [N, {0}], got {other:?}",
                    self.id_embed_dim
                )))
            }
        };
        let x = id_embeds.reshape((n, self.id_embed_dim))?;
        let tokens = self
            .linear
            .forward(&x)?
            .reshape((n, self.num_tokens, self.width))?;
        Ok(self.norm.forward(&tokens)?)
    }
}
