//! The SDXL ControlNet: diffusers 0.42 `ControlNetModel` (`models/controlnets/controlnet.py`),
//! loaded by its diffusers weight names (`controlnet_cond_embedding.conv_in`,
//! `down_blocks.1.attentions.0...`, `controlnet_down_blocks.3`, `controlnet_mid_block`).
//!
//! It is a copy of the UNet's encoder (`conv_in`, time and `text_time` embeddings, down blocks,
//! mid block: the UNet's own building blocks from [`super::unet`]) whose input is the noisy latent
//! plus an embedding of the control image, and whose outputs go through zero-initialised 1×1
//! convolutions to become residuals for the UNet's skip connections and mid block.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Module, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};
use serde_json::{json, Value};

use super::conv::{conv2d, Conv2d};
use super::resnet::conv2d_same;
use super::unet::{
    self, condition_with, down_blocks, mid_block, time_embed, time_embeddings, ControlResiduals,
    DownBlock, MidBlock, TimestepEmbedding, UNetConditioning,
};
use crate::{Error, Result};

/// A diffusers ControlNet `config.json`: the encoder's settings (read as a UNet config would be)
/// and the ControlNet's own.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The encoder's settings; `up_block_types` mirror the down blocks (a ControlNet has none).
    pub unet: unet::Config,
    /// Channels of the control image (3: RGB).
    pub conditioning_channels: usize,
    /// Widths of the control-image embedding's convolutions; each step after the first halves
    /// the size, so a latent 8× smaller than the image needs four.
    pub conditioning_embedding_out_channels: Vec<usize>,
    /// Residuals averaged over space (diffusers' "shuffle" ControlNets); implies guess mode.
    pub global_pool_conditions: bool,
    /// `controlnet_conditioning_channel_order = "bgr"`: the image's channels are flipped first.
    pub bgr: bool,
}

impl Config {
    /// diffusers' `ControlNetModel` defaults for the ControlNet's own fields.
    pub const DEFAULT_EMBEDDING_CHANNELS: [usize; 4] = [16, 32, 96, 256];

    /// diffusers/controlnet-*-sdxl-1.0 and xinsir/controlnet-*-sdxl-1.0 `config.json`: SDXL
    /// base's encoder with the default embedding.
    pub fn sdxl() -> Self {
        Self::from_unet(unet::Config::sdxl_base())
    }

    /// A ControlNet copied from `unet` with the default conditioning embedding.
    pub fn from_unet(unet: unet::Config) -> Self {
        Self {
            unet,
            conditioning_channels: 3,
            conditioning_embedding_out_channels: Self::DEFAULT_EMBEDDING_CHANNELS.to_vec(),
            global_pool_conditions: false,
            bgr: false,
        }
    }

    pub fn from_json(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text =
            std::fs::read_to_string(path).map_err(|e| Error::from(e).context(path.display()))?;
        Self::from_json_str(&text).map_err(|e| e.context(path.display()))
    }

    /// Parses a diffusers ControlNet `config.json`; settings that select an unimplemented
    /// architecture are refused (`BAD_WEIGHTS`), as for the UNet.
    pub fn from_json_str(text: &str) -> Result<Self> {
        let bad = |m: String| Error::bad_weights(format!("controlnet config: {m}"));
        let mut value: Value =
            serde_json::from_str(text).map_err(|e| bad(format!("not JSON: {e}")))?;
        let obj = value
            .as_object_mut()
            .ok_or_else(|| bad("not a JSON object".into()))?;
        let usize_of = |v: &Value| v.as_u64().map(|x| x as usize);
        let conditioning_channels = match obj.remove("conditioning_channels") {
            None | Some(Value::Null) => 3,
            Some(v) => usize_of(&v).ok_or_else(|| bad(format!("conditioning_channels = {v}")))?,
        };
        let conditioning_embedding_out_channels =
            match obj.remove("conditioning_embedding_out_channels") {
                None | Some(Value::Null) => Self::DEFAULT_EMBEDDING_CHANNELS.to_vec(),
                Some(Value::Array(a)) => a
                    .iter()
                    .map(|v| {
                        usize_of(v)
                            .ok_or_else(|| bad(format!("conditioning_embedding_out_channels {v}")))
                    })
                    .collect::<Result<_>>()?,
                Some(v) => return Err(bad(format!("conditioning_embedding_out_channels = {v}"))),
            };
        let global_pool_conditions = match obj.remove("global_pool_conditions") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => b,
            Some(v) => return Err(bad(format!("global_pool_conditions = {v}"))),
        };
        let bgr = match obj.remove("controlnet_conditioning_channel_order") {
            None | Some(Value::Null) => false,
            Some(v) if v == json!("rgb") => false,
            Some(v) if v == json!("bgr") => true,
            Some(v) => {
                return Err(bad(format!(
                    "unsupported controlnet_conditioning_channel_order = {v}"
                )))
            }
        };
        // The encoder reads as a UNet's; its up blocks mirror the down blocks so the UNet
        // config's checks apply unchanged.
        let downs: Vec<Value> = match obj.get("down_block_types") {
            Some(Value::Array(a)) => a.clone(),
            _ => unet::Config::default()
                .down_block_types
                .into_iter()
                .map(Value::from)
                .collect(),
        };
        let ups: Vec<Value> = downs
            .iter()
            .rev()
            .map(|d| match d.as_str() {
                Some("CrossAttnDownBlock2D") => json!("CrossAttnUpBlock2D"),
                _ => json!("UpBlock2D"),
            })
            .collect();
        obj.insert("up_block_types".into(), Value::Array(ups));
        let unet =
            unet::Config::from_json_str(&value.to_string()).map_err(|e| e.context("controlnet"))?;
        let config = Self {
            unet,
            conditioning_channels,
            conditioning_embedding_out_channels,
            global_pool_conditions,
            bgr,
        };
        config.validate()?;
        Ok(config)
    }

    /// The config of a single-file ControlNet in diffusers naming, read off its tensor shapes
    /// (`shapes`: name → shape). What shapes cannot tell (attention heads, the `text_time`
    /// sinusoid width, normalisation) comes from `base`, the UNet it is used with: a ControlNet
    /// is a copy of its UNet's encoder. Heads of blocks whose width differs from the UNet's are
    /// SDXL's 64 channels each.
    pub fn infer(shapes: &HashMap<String, Vec<usize>>, base: &unet::Config) -> Result<Self> {
        let shape = |name: &str| -> Result<&Vec<usize>> {
            shapes
                .get(name)
                .ok_or_else(|| Error::bad_weights(format!("controlnet: no tensor {name}")))
        };
        let dim = |name: &str, i: usize| -> Result<usize> {
            shape(name)?.get(i).copied().ok_or_else(|| {
                Error::bad_weights(format!("controlnet: tensor {name} has too few dimensions"))
            })
        };
        let count = |prefix: &dyn Fn(usize) -> String| {
            (0..)
                .take_while(|&k| {
                    let p = prefix(k);
                    shapes.keys().any(|n| n.starts_with(&p))
                })
                .count()
        };
        let n = count(&|i| format!("down_blocks.{i}.resnets.0."));
        if n == 0 {
            return Err(Error::bad_weights(
                "controlnet: no tensor down_blocks.0.resnets.0.conv1.weight",
            ));
        }
        let mut c = base.clone();
        c.block_out_channels = (0..n)
            .map(|i| dim(&format!("down_blocks.{i}.resnets.0.conv1.weight"), 0))
            .collect::<Result<_>>()?;
        c.layers_per_block = vec![count(&|j| format!("down_blocks.0.resnets.{j}."))];
        let attention = |i: usize| format!("down_blocks.{i}.attentions.0.");
        c.down_block_types = (0..n)
            .map(|i| {
                if shapes.keys().any(|k| k.starts_with(&attention(i))) {
                    "CrossAttnDownBlock2D".to_string()
                } else {
                    "DownBlock2D".to_string()
                }
            })
            .collect();
        c.up_block_types = c
            .down_block_types
            .iter()
            .rev()
            .map(|d| d.replace("Down", "Up"))
            .collect();
        let nb = base.block_out_channels.len();
        let base_heads = unet::per_block(&base.attention_head_dim, nb, "attention_head_dim")
            .ok()
            .filter(|_| base.block_out_channels == c.block_out_channels);
        c.attention_head_dim = match base_heads {
            Some(h) => h,
            None => c
                .block_out_channels
                .iter()
                .map(|&ch| (ch / 64).max(1))
                .collect(),
        };
        let base_depth = unet::per_block(&base.transformer_layers_per_block, nb, "depth").ok();
        c.transformer_layers_per_block = (0..n)
            .map(|i| {
                let depth = count(&|k| format!("{}transformer_blocks.{k}.", attention(i)));
                match (depth, &base_depth) {
                    (0, Some(d)) if d.len() == n => d[i],
                    (0, _) => 1,
                    (d, _) => d,
                }
            })
            .collect();
        if let Some(i) = (0..n).find(|&i| c.down_block_types[i] == "CrossAttnDownBlock2D") {
            let p = attention(i);
            c.cross_attention_dim = vec![dim(
                &format!("{p}transformer_blocks.0.attn2.to_k.weight"),
                1,
            )?];
            c.use_linear_projection = shape(&format!("{p}proj_in.weight"))?.len() == 2;
        }
        c.time_embedding_dim = Some(dim("time_embedding.linear_1.weight", 0)?);
        match shapes.get("add_embedding.linear_1.weight") {
            Some(s) if s.len() == 2 => {
                c.addition_embed_type = Some("text_time".into());
                c.projection_class_embeddings_input_dim = Some(s[1]);
                c.addition_time_embed_dim = base.addition_time_embed_dim.or(Some(256));
            }
            _ => {
                c.addition_embed_type = None;
                c.projection_class_embeddings_input_dim = None;
            }
        }
        c.mid_block_type = Some("UNetMidBlock2DCrossAttn".into());
        let embedding = "controlnet_cond_embedding";
        let conditioning_channels = dim(&format!("{embedding}.conv_in.weight"), 1)?;
        let mut widths = vec![dim(&format!("{embedding}.conv_in.weight"), 0)?];
        let blocks = count(&|k| format!("{embedding}.blocks.{k}."));
        for k in (1..blocks).step_by(2) {
            widths.push(dim(&format!("{embedding}.blocks.{k}.weight"), 0)?);
        }
        let config = Self {
            unet: c,
            conditioning_channels,
            conditioning_embedding_out_channels: widths,
            global_pool_conditions: false,
            bgr: false,
        };
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<()> {
        self.unet.validate()?;
        if self.unet.mid_block_type.is_none() {
            return Err(Error::bad_weights(
                "controlnet config: a ControlNet needs a mid block",
            ));
        }
        if self.conditioning_embedding_out_channels.is_empty() || self.conditioning_channels == 0 {
            return Err(Error::bad_weights(
                "controlnet config: empty conditioning embedding",
            ));
        }
        Ok(())
    }

    /// How many times smaller than the control image the latent is (SDXL: 8).
    pub fn downscale(&self) -> usize {
        1 << (self.conditioning_embedding_out_channels.len() - 1)
    }
}

/// diffusers `ControlNetConditioningEmbedding`: the control image [B, 3, H, W] in [0, 1] to
/// [B, block_out_channels[0], H/8, W/8] through SiLU-activated convolutions, every other one
/// with stride 2, then a zero-initialised `conv_out`.
#[derive(Debug, Clone)]
struct ConditioningEmbedding {
    conv_in: Conv2d,
    blocks: Vec<Conv2d>,
    conv_out: Conv2d,
}

impl ConditioningEmbedding {
    fn new(vb: VarBuilder, c: &Config) -> Result<Self> {
        let widths = &c.conditioning_embedding_out_channels;
        let conv = |cin, cout, stride, vb| {
            let cfg = Conv2dConfig {
                padding: 1,
                stride,
                ..Default::default()
            };
            conv2d(cin, cout, 3, cfg, vb)
        };
        let mut blocks = Vec::with_capacity(2 * (widths.len() - 1));
        for (i, pair) in widths.windows(2).enumerate() {
            blocks.push(conv(pair[0], pair[0], 1, vb.pp("blocks").pp(2 * i))?);
            blocks.push(conv(pair[0], pair[1], 2, vb.pp("blocks").pp(2 * i + 1))?);
        }
        Ok(Self {
            conv_in: conv(c.conditioning_channels, widths[0], 1, vb.pp("conv_in"))?,
            blocks,
            conv_out: conv(
                widths[widths.len() - 1],
                c.unet.block_out_channels[0],
                1,
                vb.pp("conv_out"),
            )?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = self.conv_in.forward(x)?.silu()?;
        for block in &self.blocks {
            x = block.forward(&x)?.silu()?;
        }
        Ok(self.conv_out.forward(&x)?)
    }
}

/// The ControlNet. Weights stay in the dtype of the `VarBuilder` they were loaded with.
#[derive(Debug, Clone)]
pub struct ControlNetModel {
    conv_in: Conv2d,
    time_embedding: TimestepEmbedding,
    add_embedding: Option<TimestepEmbedding>,
    cond_embedding: ConditioningEmbedding,
    down_blocks: Vec<DownBlock>,
    mid_block: MidBlock,
    /// `controlnet_down_blocks.*`: one 1×1 convolution per skip connection.
    zero_down: Vec<Conv2d>,
    /// `controlnet_mid_block`.
    zero_mid: Conv2d,
    config: Config,
    dtype: DType,
}

impl ControlNetModel {
    pub fn new(vb: VarBuilder, config: &Config) -> Result<Self> {
        config.validate()?;
        let c = &config.unet;
        let conv_in = conv2d_same(c.in_channels, c.block_out_channels[0], 3, vb.pp("conv_in"))?;
        let (time_embedding, add_embedding) = time_embeddings(&vb, c)?;
        let cond_embedding =
            ConditioningEmbedding::new(vb.pp("controlnet_cond_embedding"), config)?;
        let down_blocks = down_blocks(&vb, c)?;
        let mid_block = mid_block(&vb, c)?
            .ok_or_else(|| Error::bad_weights("controlnet config: no mid block"))?;
        // One zero convolution per skip connection: conv_in's output, each resnet's, each
        // downsampler's.
        let mut widths = vec![c.block_out_channels[0]];
        for (block, &ch) in down_blocks.iter().zip(&c.block_out_channels) {
            widths.extend(std::iter::repeat_n(ch, block.resnets.len()));
            if block.has_downsampler() {
                widths.push(ch);
            }
        }
        let zero = |ch: usize, vb| conv2d(ch, ch, 1, Conv2dConfig::default(), vb);
        let zero_down = widths
            .iter()
            .enumerate()
            .map(|(k, &ch)| zero(ch, vb.pp("controlnet_down_blocks").pp(k)))
            .collect::<Result<Vec<_>>>()?;
        let mid_ch = c.block_out_channels[c.block_out_channels.len() - 1];
        let zero_mid = zero(mid_ch, vb.pp("controlnet_mid_block"))?;
        Ok(Self {
            conv_in,
            time_embedding,
            add_embedding,
            cond_embedding,
            down_blocks,
            mid_block,
            zero_down,
            zero_mid,
            config: config.clone(),
            dtype: vb.dtype(),
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The step-independent inputs, as [`unet::UNet2DConditionModel::condition`] prepares them
    /// but with this ControlNet's own `text_time` embedding.
    pub fn condition(
        &self,
        encoder_hidden_states: &Tensor,
        text_embeds: &Tensor,
        time_ids: &Tensor,
    ) -> Result<UNetConditioning> {
        condition_with(
            self.add_embedding.as_ref(),
            &self.config.unet,
            self.dtype,
            encoder_hidden_states,
            text_embeds,
            time_ids,
        )
    }

    /// diffusers' `controlnet(sample, t, encoder_hidden_states, controlnet_cond,
    /// conditioning_scale, guess_mode, added_cond_kwargs)`:
    ///
    /// - `sample`: [B, 4, h, w] the UNet's (scaled) input;
    /// - `image`: [B, conditioning_channels, 8h, 8w] the control image in [0, 1];
    /// - `scale`: multiplies every residual; in `guess_mode` (without global pooling) the
    ///   residuals are further weighted from 0.1 (first) to 1 (mid), log-spaced.
    pub fn forward(
        &self,
        sample: &Tensor,
        timestep: f64,
        cond: &UNetConditioning,
        image: &Tensor,
        scale: f64,
        guess_mode: bool,
    ) -> Result<ControlResiduals> {
        let c = &self.config.unet;
        let b = sample.dim(0)?;
        let temb = time_embed(
            &self.time_embedding,
            c,
            self.dtype,
            timestep,
            b,
            sample.device(),
            cond,
        )?;
        let image = if self.config.bgr {
            let order = Tensor::new(&[2u32, 1, 0], image.device())?;
            image.index_select(&order, 1)?
        } else {
            image.clone()
        };
        let x = self.conv_in.forward(&sample.to_dtype(self.dtype)?)?;
        let mut x = (x + self.cond_embedding.forward(&image.to_dtype(self.dtype)?)?)?;
        let mut skips = vec![x.clone()];
        for block in &self.down_blocks {
            x = block.forward(&x, &temb, &cond.context, None, &mut skips)?;
        }
        let x = self.mid_block.forward(&x, &temb, &cond.context, None)?;

        let n = skips.len();
        // torch.logspace(-1, 0, n + 1) in f32: 10^(k/n - 1).
        let weights: Vec<f64> = if guess_mode && !self.config.global_pool_conditions {
            (0..=n)
                .map(|k| 10f32.powf(-1.0 + k as f32 / n as f32) as f64 * scale)
                .collect()
        } else {
            vec![scale; n + 1]
        };
        let finish = |t: Tensor, w: f64| -> Result<Tensor> {
            let t = (t * w)?;
            Ok(if self.config.global_pool_conditions {
                t.mean_keepdim(3)?.mean_keepdim(2)?
            } else {
                t
            })
        };
        let down = skips
            .iter()
            .zip(&self.zero_down)
            .zip(&weights)
            .map(|((s, conv), &w)| finish(conv.forward(s)?, w))
            .collect::<Result<Vec<_>>>()?;
        let mid = finish(self.zero_mid.forward(&x)?, weights[n])?;
        Ok(ControlResiduals { down, mid })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::tiny_model;

    #[test]
    fn tiny_config_reads_as_diffusers_wrote_it() {
        let c = Config::from_json(tiny_model("controlnet/config.json")).unwrap();
        assert_eq!(c.conditioning_embedding_out_channels, vec![4, 8, 8, 16]);
        assert_eq!(c.conditioning_channels, 3);
        assert_eq!(c.downscale(), 8);
        assert!(!c.global_pool_conditions && !c.bgr);
        assert_eq!(c.unet.block_out_channels, vec![16, 32, 32]);
        assert_eq!(
            c.unet.up_block_types,
            vec!["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]
        );
        assert_eq!(c.unet.addition_time_embed_dim, Some(8));
        assert_eq!(Config::sdxl().downscale(), 8);
    }

    #[test]
    fn unsupported_configs_are_refused() {
        for bad in [
            r#"{"controlnet_conditioning_channel_order": "gbr"}"#,
            r#"{"addition_embed_type": "text"}"#,
            r#"{"mid_block_type": null}"#,
            r#"{"conditioning_embedding_out_channels": []}"#,
            r#"{"global_pool_conditions": 1}"#,
        ] {
            let err = Config::from_json_str(bad).unwrap_err();
            assert_eq!(err.code, crate::ErrorCode::BadWeights, "{bad}: {err}");
        }
        let c = Config::from_json_str(r#"{"global_pool_conditions": true}"#).unwrap();
        assert!(c.global_pool_conditions);
    }
}
