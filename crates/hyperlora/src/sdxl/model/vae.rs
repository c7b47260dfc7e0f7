//! The SDXL autoencoder: diffusers 0.42 `AutoencoderKL` (encoder + `quant_conv` to the diagonal
//! Gaussian, `post_quant_conv` + decoder back to pixels), loaded by its diffusers weight names.
//!
//! Precision: the SDXL VAE's activations overflow f16 (diffusers sets `force_upcast`), so run it
//! with f32 or bf16 weights; [`Config::compute_dtype`] picks one. GroupNorm and the mid-block
//! attention's softmax always compute in f32.

use std::path::Path;

use candle_core::{DType, Module, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;
use serde_json::{json, Value};

use super::attention::SpatialSelfAttention;
use super::conv::Conv2d;
use super::norm::{group_norm, GroupNorm};
use super::resnet::{conv2d_same, Downsample2D, ResnetBlock2D, ResnetConfig, Upsample2D};
use crate::{Error, Result};

/// diffusers' VAE blocks hard-code this GroupNorm epsilon.
const EPS: f64 = 1e-6;

/// A diffusers `vae/config.json`, restricted to the fields that change this architecture.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct Config {
    pub in_channels: usize,
    pub out_channels: usize,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub latent_channels: usize,
    pub norm_num_groups: usize,
    pub sample_size: usize,
    /// Latents are multiplied by this after encoding and divided by it before decoding.
    pub scaling_factor: f64,
    /// Subtracted before scaling (SD3/Flux VAEs); `None` for SDXL.
    pub shift_factor: Option<f64>,
    /// The model overflows in f16 and must run in a wider type.
    pub force_upcast: bool,
    pub use_quant_conv: bool,
    pub use_post_quant_conv: bool,
    pub mid_block_add_attention: bool,
}

/// diffusers' `AutoencoderKL.__init__` defaults.
impl Default for Config {
    fn default() -> Self {
        Self {
            in_channels: 3,
            out_channels: 3,
            down_block_types: vec!["DownEncoderBlock2D".into()],
            up_block_types: vec!["UpDecoderBlock2D".into()],
            block_out_channels: vec![64],
            layers_per_block: 1,
            latent_channels: 4,
            norm_num_groups: 32,
            sample_size: 32,
            scaling_factor: 0.18215,
            shift_factor: None,
            force_upcast: true,
            use_quant_conv: true,
            use_post_quant_conv: true,
            mid_block_add_attention: true,
        }
    }
}

impl Config {
    /// stabilityai/stable-diffusion-xl-base-1.0 `vae/config.json`.
    pub fn sdxl_base() -> Self {
        Self {
            down_block_types: vec!["DownEncoderBlock2D".into(); 4],
            up_block_types: vec!["UpDecoderBlock2D".into(); 4],
            block_out_channels: vec![128, 256, 512, 512],
            layers_per_block: 2,
            sample_size: 1024,
            scaling_factor: 0.13025,
            ..Self::default()
        }
    }

    /// Reads a diffusers `vae/config.json` file.
    pub fn from_json(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text =
            std::fs::read_to_string(path).map_err(|e| Error::from(e).context(path.display()))?;
        Self::from_json_str(&text).map_err(|e| e.context(path.display()))
    }

    /// Parses the text of a diffusers `vae/config.json`; unknown keys are ignored, settings that
    /// select an unimplemented architecture are refused (`BAD_WEIGHTS`).
    pub fn from_json_str(text: &str) -> Result<Self> {
        let value: Value = serde_json::from_str(text)
            .map_err(|e| Error::bad_weights(format!("vae config is not JSON: {e}")))?;
        if let Some(act) = value.get("act_fn") {
            if act != &json!("silu") {
                return Err(Error::bad_weights(format!(
                    "vae config: unsupported act_fn = {act}"
                )));
            }
        }
        let config: Self = serde_json::from_value(value)
            .map_err(|e| Error::bad_weights(format!("vae config: {e}")))?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<()> {
        let n = self.block_out_channels.len();
        if n == 0 || self.down_block_types.len() != n || self.up_block_types.len() != n {
            return Err(Error::bad_weights(
                "vae config: block_out_channels and block types differ in length",
            ));
        }
        if let Some(t) = self
            .down_block_types
            .iter()
            .find(|t| *t != "DownEncoderBlock2D")
        {
            return Err(Error::bad_weights(format!(
                "vae config: unsupported down block {t}"
            )));
        }
        if let Some(t) = self
            .up_block_types
            .iter()
            .find(|t| *t != "UpDecoderBlock2D")
        {
            return Err(Error::bad_weights(format!(
                "vae config: unsupported up block {t}"
            )));
        }
        // Every GroupNorm splits a block's channels into norm_num_groups groups.
        let g = self.norm_num_groups;
        if g == 0
            || self
                .block_out_channels
                .iter()
                .any(|&c| c == 0 || c % g != 0)
        {
            return Err(Error::bad_weights(format!(
                "vae config: norm_num_groups {g} does not divide block_out_channels {:?}",
                self.block_out_channels
            )));
        }
        // Latents are divided by the scaling factor before decoding.
        let shift = self.shift_factor.unwrap_or(0.0);
        if !(self.scaling_factor.is_normal() && shift.is_finite()) {
            return Err(Error::bad_weights(format!(
                "vae config: scaling_factor {} / shift_factor {shift} is unusable",
                self.scaling_factor
            )));
        }
        Ok(())
    }

    /// The dtype to load the weights in when `requested` is wanted: f16 becomes f32 for a
    /// model that overflows f16 (`force_upcast`), as diffusers' pipelines upcast it.
    pub fn compute_dtype(&self, requested: DType) -> DType {
        if self.force_upcast && requested == DType::F16 {
            DType::F32
        } else {
            requested
        }
    }
}

/// `UNetMidBlock2D` without time embedding: resnet, (attention, resnet).
#[derive(Debug, Clone)]
struct MidBlock {
    resnets: Vec<ResnetBlock2D>,
    attention: Option<SpatialSelfAttention>,
}

impl MidBlock {
    fn new(vb: VarBuilder, channels: usize, groups: usize, attention: bool) -> Result<Self> {
        let rc = ResnetConfig::new(channels, channels, groups, EPS);
        let resnets = (0..2)
            .map(|j| ResnetBlock2D::new(vb.pp("resnets").pp(j), &rc))
            .collect::<Result<_>>()?;
        let attention = if attention {
            // diffusers: attention_head_dim = channels, so a single head.
            Some(SpatialSelfAttention::new(
                vb.pp("attentions").pp(0),
                channels,
                1,
                groups,
                EPS,
            )?)
        } else {
            None
        };
        Ok(Self { resnets, attention })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = self.resnets[0].forward(x, None)?;
        if let Some(attn) = &self.attention {
            x = attn.forward(&x)?;
        }
        self.resnets[1].forward(&x, None)
    }
}

/// diffusers `Encoder`: conv_in, `DownEncoderBlock2D`s, mid block, norm, SiLU, conv_out to
/// 2 × latent channels (mean and log-variance).
#[derive(Debug, Clone)]
struct Encoder {
    conv_in: Conv2d,
    down_blocks: Vec<(Vec<ResnetBlock2D>, Option<Downsample2D>)>,
    mid_block: MidBlock,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Encoder {
    fn new(vb: VarBuilder, c: &Config) -> Result<Self> {
        let ch = &c.block_out_channels;
        let n = ch.len();
        let groups = c.norm_num_groups;
        let conv_in = conv2d_same(c.in_channels, ch[0], 3, vb.pp("conv_in"))?;
        let mut down_blocks = Vec::with_capacity(n);
        let mut cout = ch[0];
        for (i, &block_out) in ch.iter().enumerate() {
            let vb = vb.pp("down_blocks").pp(i);
            let cin = cout;
            cout = block_out;
            let resnets = (0..c.layers_per_block)
                .map(|j| {
                    let rc = ResnetConfig::new(if j == 0 { cin } else { cout }, cout, groups, EPS);
                    ResnetBlock2D::new(vb.pp("resnets").pp(j), &rc)
                })
                .collect::<Result<Vec<_>>>()?;
            // padding 0: Downsample2D pads right/bottom itself.
            let down = if i + 1 < n {
                Some(Downsample2D::new(
                    vb.pp("downsamplers").pp(0),
                    cout,
                    cout,
                    0,
                )?)
            } else {
                None
            };
            down_blocks.push((resnets, down));
        }
        let last = ch[n - 1];
        Ok(Self {
            conv_in,
            down_blocks,
            mid_block: MidBlock::new(vb.pp("mid_block"), last, groups, c.mid_block_add_attention)?,
            conv_norm_out: group_norm(groups, last, EPS, vb.pp("conv_norm_out"))?,
            conv_out: conv2d_same(last, 2 * c.latent_channels, 3, vb.pp("conv_out"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = self.conv_in.forward(x)?;
        for (resnets, down) in &self.down_blocks {
            for resnet in resnets {
                x = resnet.forward(&x, None)?;
            }
            if let Some(down) = down {
                x = down.forward(&x)?;
            }
        }
        let x = self.mid_block.forward(&x)?;
        let x = self.conv_norm_out.forward_silu(&x)?;
        Ok(self.conv_out.forward(&x)?)
    }
}

/// diffusers `Decoder`: conv_in, mid block, `UpDecoderBlock2D`s, norm, SiLU, conv_out.
#[derive(Debug, Clone)]
struct Decoder {
    conv_in: Conv2d,
    mid_block: MidBlock,
    up_blocks: Vec<(Vec<ResnetBlock2D>, Option<Upsample2D>)>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Decoder {
    fn new(vb: VarBuilder, c: &Config) -> Result<Self> {
        let rch: Vec<usize> = c.block_out_channels.iter().rev().copied().collect();
        let n = rch.len();
        let groups = c.norm_num_groups;
        let conv_in = conv2d_same(c.latent_channels, rch[0], 3, vb.pp("conv_in"))?;
        let mid_block = MidBlock::new(
            vb.pp("mid_block"),
            rch[0],
            groups,
            c.mid_block_add_attention,
        )?;
        let mut up_blocks = Vec::with_capacity(n);
        let mut cout = rch[0];
        for (i, &block_out) in rch.iter().enumerate() {
            let vb = vb.pp("up_blocks").pp(i);
            let cin = cout;
            cout = block_out;
            let resnets = (0..c.layers_per_block + 1)
                .map(|j| {
                    let rc = ResnetConfig::new(if j == 0 { cin } else { cout }, cout, groups, EPS);
                    ResnetBlock2D::new(vb.pp("resnets").pp(j), &rc)
                })
                .collect::<Result<Vec<_>>>()?;
            let up = if i + 1 < n {
                Some(Upsample2D::new(vb.pp("upsamplers").pp(0), cout, cout)?)
            } else {
                None
            };
            up_blocks.push((resnets, up));
        }
        let c0 = c.block_out_channels[0];
        Ok(Self {
            conv_in,
            mid_block,
            up_blocks,
            conv_norm_out: group_norm(groups, c0, EPS, vb.pp("conv_norm_out"))?,
            conv_out: conv2d_same(c0, c.out_channels, 3, vb.pp("conv_out"))?,
        })
    }

    fn forward(&self, z: &Tensor) -> Result<Tensor> {
        let x = self.conv_in.forward(z)?;
        let mut x = self.mid_block.forward(&x)?;
        for (resnets, up) in &self.up_blocks {
            for resnet in resnets {
                x = resnet.forward(&x, None)?;
            }
            if let Some(up) = up {
                x = up.forward(&x, None)?;
            }
        }
        let x = self.conv_norm_out.forward_silu(&x)?;
        Ok(self.conv_out.forward(&x)?)
    }
}

/// The SDXL VAE. Weights stay in the dtype of the `VarBuilder` they were loaded with; inputs
/// are converted to it.
#[derive(Debug, Clone)]
pub struct AutoencoderKL {
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Option<Conv2d>,
    post_quant_conv: Option<Conv2d>,
    config: Config,
    dtype: DType,
}

impl AutoencoderKL {
    pub fn new(vb: VarBuilder, config: &Config) -> Result<Self> {
        config.validate()?;
        let lc = config.latent_channels;
        let quant_conv = if config.use_quant_conv {
            Some(conv2d_same(2 * lc, 2 * lc, 1, vb.pp("quant_conv"))?)
        } else {
            None
        };
        let post_quant_conv = if config.use_post_quant_conv {
            Some(conv2d_same(lc, lc, 1, vb.pp("post_quant_conv"))?)
        } else {
            None
        };
        Ok(Self {
            encoder: Encoder::new(vb.pp("encoder"), config)?,
            decoder: Decoder::new(vb.pp("decoder"), config)?,
            quant_conv,
            post_quant_conv,
            config: config.clone(),
            dtype: vb.dtype(),
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The dtype of the weights (and of the outputs).
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// `x`: [B, 3, H, W] in [-1, 1] (H, W multiples of 8) → the diagonal Gaussian's
    /// `(mean, logvar)`, each [B, latent_channels, H/8, W/8], logvar clamped to [-30, 20] as
    /// diffusers' `DiagonalGaussianDistribution` does. Multiply a latent by `scaling_factor`
    /// before handing it to the UNet.
    pub fn encode(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let h = self.encoder.forward(&x.to_dtype(self.dtype)?)?;
        let moments = match &self.quant_conv {
            Some(conv) => conv.forward(&h)?,
            None => h,
        };
        let lc = self.config.latent_channels;
        let mean = moments.narrow(1, 0, lc)?;
        let logvar = moments.narrow(1, lc, lc)?.clamp(-30f32, 20f32)?;
        Ok((mean, logvar))
    }

    /// `z`: [B, latent_channels, h, w], the latent already divided by `scaling_factor` (what
    /// diffusers' `vae.decode` expects) → [B, 3, 8h, 8w], roughly in [-1, 1] (not clamped).
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        let z = z.to_dtype(self.dtype)?;
        let z = match &self.post_quant_conv {
            Some(conv) => conv.forward(&z)?,
            None => z,
        };
        self.decoder.forward(&z)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{tiny_model, tiny_vae};
    use candle_core::Device;

    #[test]
    fn tiny_config_reads_as_diffusers_wrote_it() {
        let c = Config::from_json(tiny_model("sdxl/vae/config.json")).unwrap();
        assert_eq!(c.block_out_channels, vec![8, 16, 16, 16]);
        assert_eq!(c.down_block_types, vec!["DownEncoderBlock2D"; 4]);
        assert_eq!(c.up_block_types, vec!["UpDecoderBlock2D"; 4]);
        assert_eq!(
            (c.layers_per_block, c.latent_channels, c.norm_num_groups),
            (2, 4, 8)
        );
        assert_eq!(c.scaling_factor, 0.13025);
        assert_eq!(c.shift_factor, None);
        assert!(
            c.force_upcast
                && c.use_quant_conv
                && c.use_post_quant_conv
                && c.mid_block_add_attention
        );
    }

    #[test]
    fn sdxl_base_has_the_published_values() {
        let c = Config::sdxl_base();
        assert_eq!(c.block_out_channels, vec![128, 256, 512, 512]);
        assert_eq!(
            (c.layers_per_block, c.latent_channels, c.norm_num_groups),
            (2, 4, 32)
        );
        assert_eq!((c.in_channels, c.out_channels, c.sample_size), (3, 3, 1024));
        assert_eq!(c.scaling_factor, 0.13025);
        assert!(c.force_upcast);
        let published = r#"{
          "_class_name": "AutoencoderKL", "_diffusers_version": "0.20.0.dev0", "act_fn": "silu",
          "block_out_channels": [128, 256, 512, 512],
          "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
          "force_upcast": true, "in_channels": 3, "latent_channels": 4, "layers_per_block": 2,
          "norm_num_groups": 32, "out_channels": 3, "sample_size": 1024, "scaling_factor": 0.13025,
          "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"]
        }"#;
        assert_eq!(Config::from_json_str(published).unwrap(), c);
        assert_eq!(c.compute_dtype(DType::F16), DType::F32);
        assert_eq!(c.compute_dtype(DType::BF16), DType::BF16);
        assert!(Config::from_json_str(
            r#"{"up_block_types": ["UpDecoderBlock2D", "AttnUpDecoderBlock2D"]}"#
        )
        .is_err());
    }

    #[test]
    fn logvar_is_clamped() {
        let vae = tiny_vae(DType::F32);
        // A saturated input drives the moments far out; the clamp must hold whatever comes.
        let x = (Tensor::ones((1, 3, 16, 16), DType::F32, &Device::Cpu).unwrap() * 1e4).unwrap();
        let (_, logvar) = vae.encode(&x).unwrap();
        let v = logvar.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(v.iter().all(|x| (-30.0..=20.0).contains(x)));
    }
}
