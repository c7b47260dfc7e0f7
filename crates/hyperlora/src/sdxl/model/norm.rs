//! GroupNorm as the UNet and VAE use it (PyTorch `nn.GroupNorm`, affine), optionally followed by
//! SiLU, which most uses apply next: one fused kernel on CUDA and for f32 on the CPU, candle's
//! ops elsewhere.

use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;

use crate::Result;

#[derive(Debug, Clone)]
pub struct GroupNorm {
    inner: candle_nn::GroupNorm,
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
}

/// Loads `weight` and `bias` [channels] from `vb`.
pub fn group_norm(groups: usize, channels: usize, eps: f64, vb: VarBuilder) -> Result<GroupNorm> {
    let weight = vb.get(channels, "weight")?;
    let bias = vb.get(channels, "bias")?;
    Ok(GroupNorm {
        inner: candle_nn::GroupNorm::new(weight.clone(), bias.clone(), channels, groups, eps)?,
        weight,
        bias,
        groups,
        eps,
    })
}

impl GroupNorm {
    /// `x`: [B, C, ...] → same shape.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.run(x, false)
    }

    /// SiLU(GroupNorm(x)).
    pub fn forward_silu(&self, x: &Tensor) -> Result<Tensor> {
        self.run(x, true)
    }

    fn run(&self, x: &Tensor, silu: bool) -> Result<Tensor> {
        if let Some(y) =
            crate::cuda::group_norm(x, &self.weight, &self.bias, self.groups, self.eps, silu)?
        {
            return Ok(y);
        }
        if let Some(y) =
            crate::cpu::group_norm(x, &self.weight, &self.bias, self.groups, self.eps, silu)?
        {
            return Ok(y);
        }
        let y = self.inner.forward(x)?;
        Ok(if silu { y.silu()? } else { y })
    }
}
