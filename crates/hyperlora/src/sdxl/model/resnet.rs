//! Convolutional building blocks shared by the SDXL UNet and VAE, as diffusers 0.42 defines them:
//! `ResnetBlock2D`, `Downsample2D` and `Upsample2D` (diffusers `models/resnet.py`,
//! `models/downsampling.py`, `models/upsampling.py`), loaded by their diffusers weight names.

use candle_core::{Module, Tensor};
use candle_nn::{Conv2dConfig, Linear, VarBuilder};

use super::conv::{conv2d, Conv2d};
use super::norm::{group_norm, GroupNorm};

use crate::Result;

/// A `kernel x kernel` convolution with bias and "same" padding (odd kernels), stride 1.
pub(crate) fn conv2d_same(
    in_channels: usize,
    out_channels: usize,
    kernel: usize,
    vb: VarBuilder,
) -> Result<Conv2d> {
    let cfg = Conv2dConfig {
        padding: kernel / 2,
        ..Default::default()
    };
    conv2d(in_channels, out_channels, kernel, cfg, vb)
}

/// Shape and normalisation parameters of one [`ResnetBlock2D`].
#[derive(Debug, Clone, PartialEq)]
pub struct ResnetConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    /// Width of the time embedding; `None` for the VAE, whose blocks take no embedding.
    pub temb_channels: Option<usize>,
    pub groups: usize,
    /// 1e-5 in the SDXL UNet (`norm_eps`), 1e-6 in the VAE.
    pub eps: f64,
    /// The output is divided by this (diffusers' `output_scale_factor`, 1 for SDXL).
    pub output_scale_factor: f64,
}

impl ResnetConfig {
    /// A block with SDXL's defaults: no time embedding, scale 1.
    pub fn new(in_channels: usize, out_channels: usize, groups: usize, eps: f64) -> Self {
        Self {
            in_channels,
            out_channels,
            temb_channels: None,
            groups,
            eps,
            output_scale_factor: 1.0,
        }
    }
}

/// diffusers `ResnetBlock2D` with `time_embedding_norm="default"` (the embedding is added
/// after `conv1`) and a 1x1 `conv_shortcut` when the channel count changes.
#[derive(Debug, Clone)]
pub struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
    output_scale_factor: f64,
}

impl ResnetBlock2D {
    pub fn new(vb: VarBuilder, cfg: &ResnetConfig) -> Result<Self> {
        let (cin, cout) = (cfg.in_channels, cfg.out_channels);
        let norm1 = group_norm(cfg.groups, cin, cfg.eps, vb.pp("norm1"))?;
        let conv1 = conv2d_same(cin, cout, 3, vb.pp("conv1"))?;
        let time_emb_proj = match cfg.temb_channels {
            Some(t) => Some(candle_nn::linear(t, cout, vb.pp("time_emb_proj"))?),
            None => None,
        };
        let norm2 = group_norm(cfg.groups, cout, cfg.eps, vb.pp("norm2"))?;
        let conv2 = conv2d_same(cout, cout, 3, vb.pp("conv2"))?;
        let conv_shortcut = if cin != cout {
            Some(conv2d_same(cin, cout, 1, vb.pp("conv_shortcut"))?)
        } else {
            None
        };
        Ok(Self {
            norm1,
            conv1,
            time_emb_proj,
            norm2,
            conv2,
            conv_shortcut,
            output_scale_factor: cfg.output_scale_factor,
        })
    }

    /// The layers LoRAs target, by diffusers name under `prefix` (`….resnets.N`): `conv1`,
    /// `conv2`, `conv_shortcut`, `time_emb_proj`.
    pub fn layers_mut<'a>(
        &'a mut self,
        prefix: &str,
        linears: &mut Vec<(String, &'a mut Linear)>,
        convs: &mut Vec<(String, &'a mut Conv2d)>,
    ) {
        convs.push((format!("{prefix}.conv1"), &mut self.conv1));
        convs.push((format!("{prefix}.conv2"), &mut self.conv2));
        if let Some(c) = &mut self.conv_shortcut {
            convs.push((format!("{prefix}.conv_shortcut"), c));
        }
        if let Some(l) = &mut self.time_emb_proj {
            linears.push((format!("{prefix}.time_emb_proj"), l));
        }
    }

    /// `x`: [B, Cin, H, W]; `temb`: [B, T] (ignored by blocks built without `temb_channels`).
    /// Returns [B, Cout, H, W].
    pub fn forward(&self, x: &Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        let h = self.norm1.forward_silu(x)?;
        // [B, T] -> [B, Cout], broadcast over the pixels.
        let temb = match (&self.time_emb_proj, temb) {
            (Some(proj), Some(temb)) => Some(proj.forward(&temb.silu()?)?),
            _ => None,
        };
        let h = self.conv1.forward_fused(&h, temb.as_ref(), None)?;
        let h = self.norm2.forward_silu(&h)?;
        let shortcut = match &self.conv_shortcut {
            Some(conv) => conv.forward(x)?,
            None => x.clone(),
        };
        if self.output_scale_factor == 1.0 {
            Ok(self.conv2.forward_fused(&h, None, Some(&shortcut))?)
        } else {
            Ok(((shortcut + self.conv2.forward(&h)?)? / self.output_scale_factor)?)
        }
    }
}

/// diffusers `Downsample2D` with a convolution: 3x3, stride 2. The UNet pads by 1 on every
/// side; the VAE (`padding=0`) pads only right and bottom, as the original LDM code did.
#[derive(Debug, Clone)]
pub struct Downsample2D {
    conv: Conv2d,
    pad_bottom_right: bool,
}

impl Downsample2D {
    /// `vb` points at the block's `downsamplers.0`.
    pub fn new(
        vb: VarBuilder,
        channels: usize,
        out_channels: usize,
        padding: usize,
    ) -> Result<Self> {
        let cfg = Conv2dConfig {
            padding,
            stride: 2,
            ..Default::default()
        };
        let conv = conv2d(channels, out_channels, 3, cfg, vb.pp("conv"))?;
        Ok(Self {
            conv,
            pad_bottom_right: padding == 0,
        })
    }

    /// The convolution (`downsamplers.0.conv`), for LoRAs.
    pub fn conv_mut(&mut self) -> &mut Conv2d {
        &mut self.conv
    }

    /// [B, C, H, W] -> [B, Cout, ceil(H/2), ceil(W/2)] (UNet) or [.., floor(H/2), floor(W/2)] (VAE).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.pad_bottom_right {
            let x = x.pad_with_zeros(2, 0, 1)?.pad_with_zeros(3, 0, 1)?;
            Ok(self.conv.forward(&x)?)
        } else {
            Ok(self.conv.forward(x)?)
        }
    }
}

/// diffusers `Upsample2D` with a convolution: nearest-neighbour resize, then a 3x3 conv.
#[derive(Debug, Clone)]
pub struct Upsample2D {
    conv: Conv2d,
}

impl Upsample2D {
    /// `vb` points at the block's `upsamplers.0`.
    pub fn new(vb: VarBuilder, channels: usize, out_channels: usize) -> Result<Self> {
        Ok(Self {
            conv: conv2d_same(channels, out_channels, 3, vb.pp("conv"))?,
        })
    }

    /// The convolution (`upsamplers.0.conv`), for LoRAs.
    pub fn conv_mut(&mut self) -> &mut Conv2d {
        &mut self.conv
    }

    /// [B, C, H, W] -> [B, Cout, 2H, 2W], or to `size` (h, w) when given: the UNet passes the
    /// skip connection's size so latents not divisible by the total downscale still line up.
    pub fn forward(&self, x: &Tensor, size: Option<(usize, usize)>) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let (th, tw) = size.unwrap_or((2 * h, 2 * w));
        let fast = if (th, tw) == (2 * h, 2 * w) {
            crate::cpu::upsample_nearest2x(x)?
        } else {
            None
        };
        let x = match fast {
            Some(x) => x,
            None => x.upsample_nearest2d(th, tw)?,
        };
        Ok(self.conv.forward(&x)?)
    }
}
