//! The SDXL denoiser: diffusers 0.42 `UNet2DConditionModel` with `addition_embed_type="text_time"`,
//! loaded by its diffusers weight names (`conv_in`, `time_embedding.linear_1`,
//! `down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`, ...).
//!
//! Supported block types are the ones SDXL (and SD 1.x/2.x) use: `DownBlock2D`,
//! `CrossAttnDownBlock2D`, `UNetMidBlock2DCrossAttn`, `CrossAttnUpBlock2D`, `UpBlock2D`.

use std::path::Path;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Conv2dConfig, Linear, VarBuilder};
use serde::{Deserialize, Deserializer};
use serde_json::{json, Value};

use super::attention::{Transformer2DModel, TransformerConfig};
use super::conv::{conv2d, Conv2d};
use super::norm::{group_norm, GroupNorm};
use super::resnet::{conv2d_same, Downsample2D, ResnetBlock2D, ResnetConfig, Upsample2D};
use crate::lora::SampleAdapters;
use crate::{Error, Result};

/// A diffusers `unet/config.json`, restricted to the fields that change this architecture.
///
/// Per-block fields (`layers_per_block`, `attention_head_dim`, ...) hold one value per down
/// block, or a single value that applies to every block (diffusers accepts an int there).
/// Beware diffusers' naming: `attention_head_dim` is the number of heads per block (SDXL: 5,
/// 10, 20 heads of 64 channels).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct Config {
    pub sample_size: Option<usize>,
    pub in_channels: usize,
    pub out_channels: usize,
    pub center_input_sample: bool,
    pub flip_sin_to_cos: bool,
    pub freq_shift: f64,
    pub down_block_types: Vec<String>,
    pub mid_block_type: Option<String>,
    pub up_block_types: Vec<String>,
    pub block_out_channels: Vec<usize>,
    #[serde(deserialize_with = "one_or_many")]
    pub layers_per_block: Vec<usize>,
    pub downsample_padding: usize,
    pub mid_block_scale_factor: f64,
    pub norm_num_groups: usize,
    pub norm_eps: f64,
    #[serde(deserialize_with = "one_or_many")]
    pub cross_attention_dim: Vec<usize>,
    #[serde(deserialize_with = "one_or_many")]
    pub transformer_layers_per_block: Vec<usize>,
    #[serde(deserialize_with = "one_or_many")]
    pub attention_head_dim: Vec<usize>,
    pub use_linear_projection: bool,
    #[serde(deserialize_with = "null_as_default")]
    pub upcast_attention: bool,
    pub addition_embed_type: Option<String>,
    pub addition_time_embed_dim: Option<usize>,
    pub projection_class_embeddings_input_dim: Option<usize>,
    pub time_embedding_dim: Option<usize>,
    pub conv_in_kernel: usize,
    pub conv_out_kernel: usize,
}

/// diffusers' `UNet2DConditionModel.__init__` defaults, so a sparse config.json reads as
/// diffusers would read it.
impl Default for Config {
    fn default() -> Self {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        Self {
            sample_size: None,
            in_channels: 4,
            out_channels: 4,
            center_input_sample: false,
            flip_sin_to_cos: true,
            freq_shift: 0.0,
            down_block_types: s(&[
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "DownBlock2D",
            ]),
            mid_block_type: Some("UNetMidBlock2DCrossAttn".into()),
            up_block_types: s(&[
                "UpBlock2D",
                "CrossAttnUpBlock2D",
                "CrossAttnUpBlock2D",
                "CrossAttnUpBlock2D",
            ]),
            block_out_channels: vec![320, 640, 1280, 1280],
            layers_per_block: vec![2],
            downsample_padding: 1,
            mid_block_scale_factor: 1.0,
            norm_num_groups: 32,
            norm_eps: 1e-5,
            cross_attention_dim: vec![1280],
            transformer_layers_per_block: vec![1],
            attention_head_dim: vec![8],
            use_linear_projection: false,
            upcast_attention: false,
            addition_embed_type: None,
            addition_time_embed_dim: None,
            projection_class_embeddings_input_dim: None,
            time_embedding_dim: None,
            conv_in_kernel: 3,
            conv_out_kernel: 3,
        }
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(usize),
    Many(Vec<usize>),
}

fn one_or_many<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Vec<usize>, D::Error> {
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(x) => vec![x],
        OneOrMany::Many(v) => v,
    })
}

fn null_as_default<'de, D: Deserializer<'de>, T: Default + Deserialize<'de>>(
    d: D,
) -> std::result::Result<T, D::Error> {
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// Config keys whose other values select an architecture we do not implement; a config that
/// uses one is refused instead of silently computing something else.
fn unsupported_settings() -> Vec<(&'static str, Vec<Value>)> {
    let null = || vec![Value::Null];
    vec![
        ("act_fn", vec![json!("silu")]),
        ("num_attention_heads", null()),
        ("class_embed_type", null()),
        ("num_class_embeds", null()),
        ("encoder_hid_dim", null()),
        ("encoder_hid_dim_type", null()),
        ("time_cond_proj_dim", null()),
        ("time_embedding_act_fn", null()),
        ("timestep_post_act", null()),
        ("cross_attention_norm", null()),
        ("reverse_transformer_layers_per_block", null()),
        (
            "mid_block_only_cross_attention",
            vec![Value::Null, json!(false)],
        ),
        ("dual_cross_attention", vec![json!(false)]),
        ("class_embeddings_concat", vec![json!(false)]),
        ("resnet_time_scale_shift", vec![json!("default")]),
        ("time_embedding_type", vec![json!("positional")]),
        ("attention_type", vec![json!("default")]),
        ("addition_embed_type", vec![Value::Null, json!("text_time")]),
    ]
}

impl Config {
    /// stabilityai/stable-diffusion-xl-base-1.0 `unet/config.json`.
    pub fn sdxl_base() -> Self {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        Self {
            sample_size: Some(128),
            in_channels: 4,
            out_channels: 4,
            center_input_sample: false,
            flip_sin_to_cos: true,
            freq_shift: 0.0,
            down_block_types: s(&[
                "DownBlock2D",
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
            ]),
            mid_block_type: Some("UNetMidBlock2DCrossAttn".into()),
            up_block_types: s(&["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]),
            block_out_channels: vec![320, 640, 1280],
            layers_per_block: vec![2],
            downsample_padding: 1,
            mid_block_scale_factor: 1.0,
            norm_num_groups: 32,
            norm_eps: 1e-5,
            cross_attention_dim: vec![2048],
            transformer_layers_per_block: vec![1, 2, 10],
            attention_head_dim: vec![5, 10, 20],
            use_linear_projection: true,
            upcast_attention: false,
            addition_embed_type: Some("text_time".into()),
            addition_time_embed_dim: Some(256),
            projection_class_embeddings_input_dim: Some(2816),
            time_embedding_dim: None,
            conv_in_kernel: 3,
            conv_out_kernel: 3,
        }
    }

    /// Reads a diffusers `unet/config.json` file.
    pub fn from_json(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text =
            std::fs::read_to_string(path).map_err(|e| Error::from(e).context(path.display()))?;
        Self::from_json_str(&text).map_err(|e| e.context(path.display()))
    }

    /// Parses the text of a diffusers `unet/config.json`; unknown keys are ignored, settings
    /// that select an unimplemented architecture are refused (`BAD_WEIGHTS`).
    pub fn from_json_str(text: &str) -> Result<Self> {
        let value: Value = serde_json::from_str(text)
            .map_err(|e| Error::bad_weights(format!("unet config is not JSON: {e}")))?;
        for (key, allowed) in unsupported_settings() {
            if let Some(v) = value.get(key) {
                if !allowed.contains(v) {
                    return Err(Error::bad_weights(format!(
                        "unet config: unsupported {key} = {v}"
                    )));
                }
            }
        }
        // diffusers accepts a per-block list here; all-false is the only value we implement.
        match value.get("only_cross_attention") {
            None | Some(Value::Bool(false)) => {}
            Some(Value::Array(a)) if a.iter().all(|v| v == &json!(false)) => {}
            Some(v) => {
                return Err(Error::bad_weights(format!(
                    "unet config: unsupported only_cross_attention = {v}"
                )))
            }
        }
        let config: Self = serde_json::from_value(value)
            .map_err(|e| Error::bad_weights(format!("unet config: {e}")))?;
        config.validate()?;
        Ok(config)
    }

    pub(crate) fn validate(&self) -> Result<()> {
        let n = self.block_out_channels.len();
        if n == 0 || self.down_block_types.len() != n || self.up_block_types.len() != n {
            return Err(Error::bad_weights(format!(
                "unet config: {} block_out_channels, {} down blocks, {} up blocks",
                n,
                self.down_block_types.len(),
                self.up_block_types.len()
            )));
        }
        for (name, v) in [
            ("layers_per_block", &self.layers_per_block),
            ("cross_attention_dim", &self.cross_attention_dim),
            (
                "transformer_layers_per_block",
                &self.transformer_layers_per_block,
            ),
            ("attention_head_dim", &self.attention_head_dim),
        ] {
            per_block(v, n, name)?;
        }
        // Heads divide each block's channels, and GroupNorm's groups divide every width it sees.
        let heads = per_block(&self.attention_head_dim, n, "attention_head_dim")?;
        for (i, (&channels, &h)) in self.block_out_channels.iter().zip(&heads).enumerate() {
            if h == 0 || !channels.is_multiple_of(h) {
                return Err(Error::bad_weights(format!(
                    "unet config: block {i} has {channels} channels, which {h} attention heads do not divide"
                )));
            }
            if self.norm_num_groups == 0 || !channels.is_multiple_of(self.norm_num_groups) {
                return Err(Error::bad_weights(format!(
                    "unet config: norm_num_groups {} does not divide block {i}'s {channels} channels",
                    self.norm_num_groups
                )));
            }
        }
        for t in &self.down_block_types {
            if t != "DownBlock2D" && t != "CrossAttnDownBlock2D" {
                return Err(Error::bad_weights(format!(
                    "unet config: unsupported down block {t}"
                )));
            }
        }
        for t in &self.up_block_types {
            if t != "UpBlock2D" && t != "CrossAttnUpBlock2D" {
                return Err(Error::bad_weights(format!(
                    "unet config: unsupported up block {t}"
                )));
            }
        }
        if let Some(t) = &self.mid_block_type {
            if t != "UNetMidBlock2DCrossAttn" {
                return Err(Error::bad_weights(format!(
                    "unet config: unsupported mid block {t}"
                )));
            }
        }
        match self.addition_embed_type.as_deref() {
            None => {}
            Some("text_time")
                if self.addition_time_embed_dim.is_none()
                    || self.projection_class_embeddings_input_dim.is_none() =>
            {
                return Err(Error::bad_weights(
                    "unet config: text_time needs addition_time_embed_dim and projection_class_embeddings_input_dim",
                ));
            }
            Some("text_time") => {}
            Some(t) => {
                return Err(Error::bad_weights(format!(
                    "unet config: unsupported addition_embed_type {t}"
                )))
            }
        }
        Ok(())
    }

    /// Width of the time embedding fed to every ResNet (SDXL: 1280).
    pub fn time_embed_dim(&self) -> usize {
        self.time_embedding_dim
            .unwrap_or(self.block_out_channels[0] * 4)
    }
}

/// Expands a one-or-per-block field to one value per block.
pub(crate) fn per_block(values: &[usize], n: usize, name: &str) -> Result<Vec<usize>> {
    match values.len() {
        1 => Ok(vec![values[0]; n]),
        len if len == n => Ok(values.to_vec()),
        len => Err(Error::bad_weights(format!(
            "unet config: {name} has {len} values for {n} blocks"
        ))),
    }
}

/// diffusers `get_timestep_embedding` with `max_period=10000`, `scale=1`, computed in f32 in the
/// same order as PyTorch so large timesteps (999) round alike. Returns [values.len(), dim] f32.
pub fn timestep_embedding(
    values: &[f32],
    dim: usize,
    flip_sin_to_cos: bool,
    shift: f64,
    device: &Device,
) -> Result<Tensor> {
    let half = dim / 2;
    let freqs: Vec<f32> = (0..half)
        .map(|i| ((-(10000f64.ln()) as f32) * i as f32 / (half as f64 - shift) as f32).exp())
        .collect();
    let mut data = Vec::with_capacity(values.len() * dim);
    for &t in values {
        let args = freqs.iter().map(|f| t * f);
        let (sin, cos): (Vec<f32>, Vec<f32>) = args.map(|a| (a.sin(), a.cos())).unzip();
        let (first, second) = if flip_sin_to_cos {
            (cos, sin)
        } else {
            (sin, cos)
        };
        data.extend(first);
        data.extend(second);
        if dim % 2 == 1 {
            data.push(0.0);
        }
    }
    Ok(Tensor::from_vec(data, (values.len(), dim), device)?)
}

/// diffusers `TimestepEmbedding`: linear_1, SiLU, linear_2.
#[derive(Debug, Clone)]
pub(crate) struct TimestepEmbedding {
    linear_1: Linear,
    linear_2: Linear,
}

impl TimestepEmbedding {
    pub(crate) fn new(vb: VarBuilder, in_dim: usize, out_dim: usize) -> Result<Self> {
        Ok(Self {
            linear_1: candle_nn::linear(in_dim, out_dim, vb.pp("linear_1"))?,
            linear_2: candle_nn::linear(out_dim, out_dim, vb.pp("linear_2"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.linear_2.forward(&self.linear_1.forward(x)?.silu()?)?)
    }

    pub(crate) fn linears_mut<'a>(
        &'a mut self,
        prefix: &str,
        out: &mut Vec<(String, &'a mut Linear)>,
    ) {
        out.push((format!("{prefix}.linear_1"), &mut self.linear_1));
        out.push((format!("{prefix}.linear_2"), &mut self.linear_2));
    }
}

/// A config's per-block fields, one value per block.
struct Blocks {
    layers: Vec<usize>,
    cross: Vec<usize>,
    depth: Vec<usize>,
    heads: Vec<usize>,
}

impl Blocks {
    fn of(c: &Config) -> Result<Self> {
        let n = c.block_out_channels.len();
        Ok(Self {
            layers: per_block(&c.layers_per_block, n, "layers_per_block")?,
            cross: per_block(&c.cross_attention_dim, n, "cross_attention_dim")?,
            depth: per_block(
                &c.transformer_layers_per_block,
                n,
                "transformer_layers_per_block",
            )?,
            heads: per_block(&c.attention_head_dim, n, "attention_head_dim")?,
        })
    }
}

fn resnet_config(c: &Config, cin: usize, cout: usize) -> ResnetConfig {
    ResnetConfig {
        temb_channels: Some(c.time_embed_dim()),
        ..ResnetConfig::new(cin, cout, c.norm_num_groups, c.norm_eps)
    }
}

fn transformer_config(
    c: &Config,
    channels: usize,
    heads: usize,
    layers: usize,
    cross_dim: usize,
) -> TransformerConfig {
    TransformerConfig {
        channels,
        heads,
        dim_head: channels / heads,
        layers,
        cross_dim,
        groups: c.norm_num_groups,
        use_linear_projection: c.use_linear_projection,
        upcast_attention: c.upcast_attention,
    }
}

/// `time_embedding` and, with `text_time`, `add_embedding`: the UNet's and the ControlNet's.
pub(crate) fn time_embeddings(
    vb: &VarBuilder,
    c: &Config,
) -> Result<(TimestepEmbedding, Option<TimestepEmbedding>)> {
    let temb_dim = c.time_embed_dim();
    let time_embedding =
        TimestepEmbedding::new(vb.pp("time_embedding"), c.block_out_channels[0], temb_dim)?;
    let add_embedding = match c.addition_embed_type.as_deref() {
        Some("text_time") => {
            let in_dim = c.projection_class_embeddings_input_dim.unwrap_or_default();
            Some(TimestepEmbedding::new(
                vb.pp("add_embedding"),
                in_dim,
                temb_dim,
            )?)
        }
        _ => None,
    };
    Ok((time_embedding, add_embedding))
}

/// `down_blocks.*`: the UNet's encoder, which a ControlNet copies.
pub(crate) fn down_blocks(vb: &VarBuilder, c: &Config) -> Result<Vec<DownBlock>> {
    let n = c.block_out_channels.len();
    let b = Blocks::of(c)?;
    let mut out = Vec::with_capacity(n);
    let mut cout = c.block_out_channels[0];
    for (i, kind) in c.down_block_types.iter().enumerate() {
        let vb = vb.pp("down_blocks").pp(i);
        let cin = cout;
        cout = c.block_out_channels[i];
        let resnets = (0..b.layers[i])
            .map(|j| {
                ResnetBlock2D::new(
                    vb.pp("resnets").pp(j),
                    &resnet_config(c, if j == 0 { cin } else { cout }, cout),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let attentions = if kind == "CrossAttnDownBlock2D" {
            let tc = transformer_config(c, cout, b.heads[i], b.depth[i], b.cross[i]);
            (0..b.layers[i])
                .map(|j| Transformer2DModel::new(vb.pp("attentions").pp(j), &tc))
                .collect::<Result<Vec<_>>>()?
        } else {
            Vec::new()
        };
        let downsampler = if i + 1 < n {
            Some(Downsample2D::new(
                vb.pp("downsamplers").pp(0),
                cout,
                cout,
                c.downsample_padding,
            )?)
        } else {
            None
        };
        out.push(DownBlock {
            resnets,
            attentions,
            downsampler,
        });
    }
    Ok(out)
}

/// `mid_block`, if the config has one.
pub(crate) fn mid_block(vb: &VarBuilder, c: &Config) -> Result<Option<MidBlock>> {
    if c.mid_block_type.is_none() {
        return Ok(None);
    }
    let n = c.block_out_channels.len();
    let b = Blocks::of(c)?;
    let vb = vb.pp("mid_block");
    let ch = c.block_out_channels[n - 1];
    let rc = ResnetConfig {
        output_scale_factor: c.mid_block_scale_factor,
        ..resnet_config(c, ch, ch)
    };
    let tc = transformer_config(c, ch, b.heads[n - 1], b.depth[n - 1], b.cross[n - 1]);
    Ok(Some(MidBlock {
        resnets: (0..2)
            .map(|j| ResnetBlock2D::new(vb.pp("resnets").pp(j), &rc))
            .collect::<Result<_>>()?,
        attentions: vec![Transformer2DModel::new(vb.pp("attentions").pp(0), &tc)?],
    }))
}

/// The step-independent conditioning (see [`UNet2DConditionModel::condition`]) with the
/// `text_time` MLP `add_embedding` of the UNet or of a ControlNet.
pub(crate) fn condition_with(
    add_embedding: Option<&TimestepEmbedding>,
    c: &Config,
    dtype: DType,
    encoder_hidden_states: &Tensor,
    text_embeds: &Tensor,
    time_ids: &Tensor,
) -> Result<UNetConditioning> {
    let context = encoder_hidden_states.to_dtype(dtype)?;
    let added = match (add_embedding, c.addition_time_embed_dim) {
        (Some(add), Some(add_dim)) => {
            // text_time: [pooled text, sinusoid of each of the 6 ids] -> MLP, added to temb.
            let b = context.dim(0)?;
            let ids = time_ids
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            if ids.len() % b != 0 {
                return Err(Error::invalid_argument(format!(
                    "time_ids {:?} do not match batch {b}",
                    time_ids.dims()
                )));
            }
            let time_embeds = timestep_embedding(
                &ids,
                add_dim,
                c.flip_sin_to_cos,
                c.freq_shift,
                context.device(),
            )?
            .reshape((b, ()))?;
            let add_in = Tensor::cat(
                &[text_embeds.to_dtype(dtype)?, time_embeds.to_dtype(dtype)?],
                1,
            )?;
            Some(add.forward(&add_in)?)
        }
        _ => None,
    };
    Ok(UNetConditioning { context, added })
}

/// The time embedding [B, temb] every ResNet sees: sinusoidal features in f32 (PyTorch casts
/// the timestep to float32 first), the MLP in the model dtype, plus the `text_time` embedding.
pub(crate) fn time_embed(
    time_embedding: &TimestepEmbedding,
    c: &Config,
    dtype: DType,
    timestep: f64,
    b: usize,
    device: &Device,
    cond: &UNetConditioning,
) -> Result<Tensor> {
    let t = vec![timestep as f32; b];
    let t_emb = timestep_embedding(
        &t,
        c.block_out_channels[0],
        c.flip_sin_to_cos,
        c.freq_shift,
        device,
    )?;
    let temb = time_embedding.forward(&t_emb.to_dtype(dtype)?)?;
    Ok(match &cond.added {
        Some(added) => (temb + added)?,
        None => temb,
    })
}

/// A ControlNet's output for one step, added to the UNet's skip connections and mid-block
/// output (diffusers' `down_block_additional_residuals` / `mid_block_additional_residual`).
#[derive(Debug, Clone)]
pub struct ControlResiduals {
    /// One per skip connection, in the order the down path produces them (`conv_in` first).
    pub down: Vec<Tensor>,
    pub mid: Tensor,
}

impl ControlResiduals {
    /// MultiControlNet: the residuals of several ControlNets summed.
    pub fn add(&self, other: &Self) -> Result<Self> {
        Ok(Self {
            down: self
                .down
                .iter()
                .zip(&other.down)
                .map(|(a, b)| a + b)
                .collect::<candle_core::Result<_>>()?,
            mid: (&self.mid + &other.mid)?,
        })
    }
}

/// What [`UNet2DConditionModel::condition`] prepares: the same for every step of a loop.
#[derive(Debug, Clone)]
pub struct UNetConditioning {
    /// [B, S, cross_attention_dim] in the model dtype.
    pub context: Tensor,
    /// [B, time_embed_dim]: the `text_time` embedding added to the timestep's, if the config
    /// has one.
    pub added: Option<Tensor>,
}

/// `DownBlock2D` (no `attentions`) or `CrossAttnDownBlock2D`.
#[derive(Debug, Clone)]
pub struct DownBlock {
    pub resnets: Vec<ResnetBlock2D>,
    pub attentions: Vec<Transformer2DModel>,
    downsampler: Option<Downsample2D>,
}

impl DownBlock {
    pub(crate) fn has_downsampler(&self) -> bool {
        self.downsampler.is_some()
    }

    /// Appends every intermediate output to `skips` (one per resnet, one after downsampling),
    /// as the up blocks consume them.
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        temb: &Tensor,
        context: &Tensor,
        adapters: Option<&SampleAdapters>,
        skips: &mut Vec<Tensor>,
    ) -> Result<Tensor> {
        let mut x = x.clone();
        for (i, resnet) in self.resnets.iter().enumerate() {
            x = resnet.forward(&x, Some(temb))?;
            if let Some(attn) = self.attentions.get(i) {
                x = attn.forward(&x, context, adapters)?;
            }
            skips.push(x.clone());
        }
        if let Some(down) = &self.downsampler {
            x = down.forward(&x)?;
            skips.push(x.clone());
        }
        Ok(x)
    }
}

/// `UNetMidBlock2DCrossAttn`: resnet, then (transformer, resnet) pairs.
#[derive(Debug, Clone)]
pub struct MidBlock {
    pub resnets: Vec<ResnetBlock2D>,
    pub attentions: Vec<Transformer2DModel>,
}

impl MidBlock {
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        temb: &Tensor,
        context: &Tensor,
        adapters: Option<&SampleAdapters>,
    ) -> Result<Tensor> {
        let mut x = self.resnets[0].forward(x, Some(temb))?;
        for (attn, resnet) in self.attentions.iter().zip(&self.resnets[1..]) {
            x = attn.forward(&x, context, adapters)?;
            x = resnet.forward(&x, Some(temb))?;
        }
        Ok(x)
    }
}

/// `UpBlock2D` (no `attentions`) or `CrossAttnUpBlock2D`.
#[derive(Debug, Clone)]
pub struct UpBlock {
    pub resnets: Vec<ResnetBlock2D>,
    pub attentions: Vec<Transformer2DModel>,
    upsampler: Option<Upsample2D>,
}

impl UpBlock {
    /// `skips`: this block's skip connections in the order they were produced; the last is
    /// consumed first.
    fn forward(
        &self,
        x: &Tensor,
        mut skips: Vec<Tensor>,
        temb: &Tensor,
        context: &Tensor,
        adapters: Option<&SampleAdapters>,
        upsample_size: Option<(usize, usize)>,
    ) -> Result<Tensor> {
        let mut x = x.clone();
        for (i, resnet) in self.resnets.iter().enumerate() {
            let skip = skips
                .pop()
                .ok_or_else(|| Error::internal("up block ran out of skip connections"))?;
            x = resnet.forward(&Tensor::cat(&[&x, &skip], 1)?, Some(temb))?;
            if let Some(attn) = self.attentions.get(i) {
                x = attn.forward(&x, context, adapters)?;
            }
        }
        if let Some(up) = &self.upsampler {
            x = up.forward(&x, upsample_size)?;
        }
        Ok(x)
    }
}

/// The SDXL UNet. Weights stay in the dtype of the `VarBuilder` they were loaded with;
/// inputs of any float dtype are converted to it.
#[derive(Debug, Clone)]
pub struct UNet2DConditionModel {
    conv_in: Conv2d,
    time_embedding: TimestepEmbedding,
    add_embedding: Option<TimestepEmbedding>,
    pub down_blocks: Vec<DownBlock>,
    pub mid_block: Option<MidBlock>,
    pub up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    config: Config,
    dtype: DType,
}

impl UNet2DConditionModel {
    pub fn new(vb: VarBuilder, config: &Config) -> Result<Self> {
        config.validate()?;
        let c = config;
        let n = c.block_out_channels.len();
        let Blocks {
            layers,
            cross,
            depth,
            heads,
        } = Blocks::of(c)?;
        let resnet_cfg = |cin: usize, cout: usize| resnet_config(c, cin, cout);
        let transformer_cfg = |channels: usize, heads: usize, layers: usize, cross_dim: usize| {
            transformer_config(c, channels, heads, layers, cross_dim)
        };
        let groups = c.norm_num_groups;
        let conv_in = conv2d_same(
            c.in_channels,
            c.block_out_channels[0],
            c.conv_in_kernel,
            vb.pp("conv_in"),
        )?;
        let (time_embedding, add_embedding) = time_embeddings(&vb, c)?;
        let down_blocks = down_blocks(&vb, c)?;
        let mid_block = mid_block(&vb, c)?;

        let rev = |v: &[usize]| v.iter().rev().copied().collect::<Vec<_>>();
        let (rch, rlayers, rcross, rdepth, rheads) = (
            rev(&c.block_out_channels),
            rev(&layers),
            rev(&cross),
            rev(&depth),
            rev(&heads),
        );
        let mut up_blocks = Vec::with_capacity(n);
        let mut cout = rch[0];
        for (i, kind) in c.up_block_types.iter().enumerate() {
            let vb = vb.pp("up_blocks").pp(i);
            let prev = cout;
            cout = rch[i];
            // Channels of the down-path output this block starts from (its last skip).
            let cin = rch[(i + 1).min(n - 1)];
            let count = rlayers[i] + 1;
            let resnets = (0..count)
                .map(|j| {
                    let skip = if j == count - 1 { cin } else { cout };
                    let input = if j == 0 { prev } else { cout };
                    ResnetBlock2D::new(vb.pp("resnets").pp(j), &resnet_cfg(input + skip, cout))
                })
                .collect::<Result<Vec<_>>>()?;
            let attentions = if kind == "CrossAttnUpBlock2D" {
                let tc = transformer_cfg(cout, rheads[i], rdepth[i], rcross[i]);
                (0..count)
                    .map(|j| Transformer2DModel::new(vb.pp("attentions").pp(j), &tc))
                    .collect::<Result<Vec<_>>>()?
            } else {
                Vec::new()
            };
            let upsampler = if i + 1 < n {
                Some(Upsample2D::new(vb.pp("upsamplers").pp(0), cout, cout)?)
            } else {
                None
            };
            up_blocks.push(UpBlock {
                resnets,
                attentions,
                upsampler,
            });
        }

        let c0 = c.block_out_channels[0];
        let conv_norm_out = group_norm(groups, c0, c.norm_eps, vb.pp("conv_norm_out"))?;
        let conv_out = conv2d(
            c0,
            c.out_channels,
            c.conv_out_kernel,
            Conv2dConfig {
                padding: c.conv_out_kernel / 2,
                ..Default::default()
            },
            vb.pp("conv_out"),
        )?;
        Ok(Self {
            conv_in,
            time_embedding,
            add_embedding,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out,
            conv_out,
            config: config.clone(),
            dtype: vb.dtype(),
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The dtype of the weights (and of the output).
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Every Linear inside the UNet's transformers by diffusers name, as
    /// [`linears_mut`](Self::linears_mut) lists them (e.g. to prepare [`SampleAdapters`]).
    pub fn linears(&self) -> Vec<(String, &Linear)> {
        let mut out = Vec::new();
        for (i, block) in self.down_blocks.iter().enumerate() {
            for (j, t) in block.attentions.iter().enumerate() {
                t.linears(&format!("down_blocks.{i}.attentions.{j}"), &mut out);
            }
        }
        if let Some(mid) = &self.mid_block {
            for (j, t) in mid.attentions.iter().enumerate() {
                t.linears(&format!("mid_block.attentions.{j}"), &mut out);
            }
        }
        for (i, block) in self.up_blocks.iter().enumerate() {
            for (j, t) in block.attentions.iter().enumerate() {
                t.linears(&format!("up_blocks.{i}.attentions.{j}"), &mut out);
            }
        }
        out
    }

    /// Every Linear inside the UNet's transformers with its diffusers name (without
    /// `.weight`), e.g. `down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`; see
    /// [`Transformer2DModel::linears_mut`]. Replacing one (e.g. with LoRA-merged weights)
    /// changes what [`forward`](Self::forward) computes.
    pub fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        let mut out = Vec::new();
        for (i, block) in self.down_blocks.iter_mut().enumerate() {
            for (j, t) in block.attentions.iter_mut().enumerate() {
                t.linears_mut(&format!("down_blocks.{i}.attentions.{j}"), &mut out);
            }
        }
        if let Some(mid) = &mut self.mid_block {
            for (j, t) in mid.attentions.iter_mut().enumerate() {
                t.linears_mut(&format!("mid_block.attentions.{j}"), &mut out);
            }
        }
        for (i, block) in self.up_blocks.iter_mut().enumerate() {
            for (j, t) in block.attentions.iter_mut().enumerate() {
                t.linears_mut(&format!("up_blocks.{i}.attentions.{j}"), &mut out);
            }
        }
        out
    }

    /// Every layer a LoRA may target, by diffusers name: the Linears (the transformers' as
    /// [`linears_mut`](Self::linears_mut) lists them, the resnets' `time_emb_proj`,
    /// `time_embedding` / `add_embedding` `linear_1`/`linear_2`) and the convolutions
    /// (`conv_in`, `conv_out`, the resnets' `conv1`/`conv2`/`conv_shortcut`, the down/upsamplers'
    /// `conv`, conv-form `proj_in`/`proj_out`).
    #[allow(clippy::type_complexity)]
    pub fn lora_layers_mut(&mut self) -> (Vec<(String, &mut Linear)>, Vec<(String, &mut Conv2d)>) {
        let Self {
            conv_in,
            time_embedding,
            add_embedding,
            down_blocks,
            mid_block,
            up_blocks,
            conv_out,
            ..
        } = self;
        let (mut linears, mut convs) = (Vec::new(), Vec::new());
        convs.push(("conv_in".to_string(), conv_in));
        convs.push(("conv_out".to_string(), conv_out));
        time_embedding.linears_mut("time_embedding", &mut linears);
        if let Some(add) = add_embedding {
            add.linears_mut("add_embedding", &mut linears);
        }
        for (i, b) in down_blocks.iter_mut().enumerate() {
            let p = format!("down_blocks.{i}");
            for (j, r) in b.resnets.iter_mut().enumerate() {
                r.layers_mut(&format!("{p}.resnets.{j}"), &mut linears, &mut convs);
            }
            for (j, t) in b.attentions.iter_mut().enumerate() {
                let prefix = format!("{p}.attentions.{j}");
                t.layers_mut(&prefix, &mut linears, &mut convs);
            }
            if let Some(d) = &mut b.downsampler {
                convs.push((format!("{p}.downsamplers.0.conv"), d.conv_mut()));
            }
        }
        if let Some(mid) = mid_block {
            for (j, r) in mid.resnets.iter_mut().enumerate() {
                r.layers_mut(&format!("mid_block.resnets.{j}"), &mut linears, &mut convs);
            }
            for (j, t) in mid.attentions.iter_mut().enumerate() {
                let prefix = format!("mid_block.attentions.{j}");
                t.layers_mut(&prefix, &mut linears, &mut convs);
            }
        }
        for (i, b) in up_blocks.iter_mut().enumerate() {
            let p = format!("up_blocks.{i}");
            for (j, r) in b.resnets.iter_mut().enumerate() {
                r.layers_mut(&format!("{p}.resnets.{j}"), &mut linears, &mut convs);
            }
            for (j, t) in b.attentions.iter_mut().enumerate() {
                let prefix = format!("{p}.attentions.{j}");
                t.layers_mut(&prefix, &mut linears, &mut convs);
            }
            if let Some(u) = &mut b.upsampler {
                convs.push((format!("{p}.upsamplers.0.conv"), u.conv_mut()));
            }
        }
        (linears, convs)
    }

    /// One denoiser evaluation, as diffusers' `unet(sample, timestep, encoder_hidden_states,
    /// added_cond_kwargs={"text_embeds", "time_ids"}).sample`.
    ///
    /// - `sample`: [B, in_channels, h, w] noisy latents (already scaled by the scheduler);
    /// - `timestep`: the same (possibly fractional) timestep for the whole batch;
    /// - `encoder_hidden_states`: [B, S, cross_attention_dim] (SDXL: both encoders' penultimate
    ///   states, 768 + 1280 = 2048);
    /// - `text_embeds`: [B, pooled] (SDXL: the projected bigG pooled output, 1280);
    /// - `time_ids`: [B, 6] (original h, w, crop top, left, target h, w).
    ///
    /// `text_embeds` and `time_ids` are unused by configs without `text_time`.
    /// Returns [B, out_channels, h, w] in the weights' dtype.
    pub fn forward(
        &self,
        sample: &Tensor,
        timestep: f64,
        encoder_hidden_states: &Tensor,
        text_embeds: &Tensor,
        time_ids: &Tensor,
    ) -> Result<Tensor> {
        self.forward_with_adapters(
            sample,
            timestep,
            encoder_hidden_states,
            text_embeds,
            time_ids,
            None,
        )
    }

    /// [`forward`](Self::forward) with per-sample LoRA updates of the transformers' Linears
    /// (`adapters`, prepared from [`linears`](Self::linears) for this batch's B rows).
    pub fn forward_with_adapters(
        &self,
        sample: &Tensor,
        timestep: f64,
        encoder_hidden_states: &Tensor,
        text_embeds: &Tensor,
        time_ids: &Tensor,
        adapters: Option<&SampleAdapters>,
    ) -> Result<Tensor> {
        let cond = self.condition(encoder_hidden_states, text_embeds, time_ids)?;
        self.forward_conditioned(sample, timestep, &cond, adapters)
    }

    /// The step-independent inputs of [`forward`](Self::forward), prepared once per denoising
    /// loop: the context in the model dtype and the `text_time` embedding. `time_ids` are read
    /// back to the host here (the sinusoids are built there, as PyTorch orders them), so the loop
    /// itself never waits for the device.
    pub fn condition(
        &self,
        encoder_hidden_states: &Tensor,
        text_embeds: &Tensor,
        time_ids: &Tensor,
    ) -> Result<UNetConditioning> {
        condition_with(
            self.add_embedding.as_ref(),
            &self.config,
            self.dtype,
            encoder_hidden_states,
            text_embeds,
            time_ids,
        )
    }

    /// One denoiser evaluation with conditioning from [`condition`](Self::condition).
    pub fn forward_conditioned(
        &self,
        sample: &Tensor,
        timestep: f64,
        cond: &UNetConditioning,
        adapters: Option<&SampleAdapters>,
    ) -> Result<Tensor> {
        self.forward_controlled(sample, timestep, cond, adapters, None)
    }

    /// [`forward_conditioned`](Self::forward_conditioned) with a ControlNet's residuals added to
    /// the skip connections and to the mid block's output, as diffusers'
    /// `down_block_additional_residuals` / `mid_block_additional_residual` are.
    pub fn forward_controlled(
        &self,
        sample: &Tensor,
        timestep: f64,
        cond: &UNetConditioning,
        adapters: Option<&SampleAdapters>,
        control: Option<&ControlResiduals>,
    ) -> Result<Tensor> {
        let c = &self.config;
        let (b, _, h, w) = sample.dims4()?;
        let device = sample.device();
        let mut x = sample.to_dtype(self.dtype)?;
        if c.center_input_sample {
            x = ((x * 2.0)? - 1.0)?;
        }
        let context = &cond.context;

        let temb = time_embed(
            &self.time_embedding,
            c,
            self.dtype,
            timestep,
            b,
            device,
            cond,
        )?;

        x = self.conv_in.forward(&x)?;
        let mut skips = vec![x.clone()];
        for block in &self.down_blocks {
            x = block.forward(&x, &temb, context, adapters, &mut skips)?;
        }
        if let Some(mid) = &self.mid_block {
            x = mid.forward(&x, &temb, context, adapters)?;
        }
        if let Some(control) = control {
            if control.down.len() != skips.len() {
                return Err(Error::invalid_argument(format!(
                    "controlnet gives {} residuals for the unet's {} skip connections",
                    control.down.len(),
                    skips.len()
                )));
            }
            for (skip, residual) in skips.iter_mut().zip(&control.down) {
                *skip = skip.broadcast_add(&residual.to_dtype(self.dtype)?)?;
            }
            x = x.broadcast_add(&control.mid.to_dtype(self.dtype)?)?;
        }
        for block in &self.up_blocks {
            let n = block.resnets.len();
            if skips.len() < n {
                return Err(Error::internal(
                    "unet: fewer skip connections than up-block resnets",
                ));
            }
            let own = skips.split_off(skips.len() - n);
            // diffusers forwards the next skip's size to the upsampler when the latent is not
            // divisible by the total downscale; otherwise it is exactly 2x, the same thing.
            let size = skips
                .last()
                .map(|s| s.dims4())
                .transpose()?
                .map(|(_, _, sh, sw)| (sh, sw));
            x = block.forward(&x, own, &temb, context, adapters, size)?;
        }
        let x = self.conv_norm_out.forward_silu(&x)?;
        let x = self.conv_out.forward(&x)?;
        debug_assert_eq!(x.dims4()?, (b, c.out_channels, h, w));
        Ok(x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, tiny_model, tiny_unet};

    #[test]
    fn tiny_config_reads_as_diffusers_wrote_it() {
        let c = Config::from_json(tiny_model("sdxl/unet/config.json")).unwrap();
        assert_eq!(c.block_out_channels, vec![16, 32, 32]);
        assert_eq!(
            c.down_block_types,
            vec![
                "DownBlock2D",
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D"
            ]
        );
        assert_eq!(
            c.up_block_types,
            vec!["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]
        );
        assert_eq!(c.layers_per_block, vec![2]);
        assert_eq!(c.attention_head_dim, vec![1, 2, 2]);
        assert_eq!(c.transformer_layers_per_block, vec![1, 1, 2]);
        assert_eq!(c.cross_attention_dim, vec![32]);
        assert_eq!(c.norm_num_groups, 8);
        assert_eq!(c.addition_embed_type.as_deref(), Some("text_time"));
        assert_eq!(c.addition_time_embed_dim, Some(8));
        assert_eq!(c.projection_class_embeddings_input_dim, Some(64));
        assert!(c.use_linear_projection && c.flip_sin_to_cos && !c.upcast_attention);
        assert_eq!(c.time_embed_dim(), 64);
    }

    #[test]
    fn sdxl_base_has_the_published_values() {
        let c = Config::sdxl_base();
        assert_eq!(c.block_out_channels, vec![320, 640, 1280]);
        assert_eq!(c.transformer_layers_per_block, vec![1, 2, 10]);
        assert_eq!(c.attention_head_dim, vec![5, 10, 20]);
        assert_eq!(c.cross_attention_dim, vec![2048]);
        assert_eq!(c.addition_time_embed_dim, Some(256));
        assert_eq!(c.projection_class_embeddings_input_dim, Some(2816));
        assert_eq!(c.norm_num_groups, 32);
        assert_eq!(c.norm_eps, 1e-5);
        assert_eq!(c.layers_per_block, vec![2]);
        assert_eq!(c.time_embed_dim(), 1280);
        assert!(c.use_linear_projection);
        // The SDXL config as published reads back to the same values.
        let published = r#"{
          "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.19.0.dev0",
          "act_fn": "silu", "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64,
          "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20],
          "block_out_channels": [320, 640, 1280], "center_input_sample": false,
          "class_embed_type": null, "class_embeddings_concat": false, "conv_in_kernel": 3,
          "conv_out_kernel": 3, "cross_attention_dim": 2048, "cross_attention_norm": null,
          "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
          "downsample_padding": 1, "dual_cross_attention": false, "encoder_hid_dim": null,
          "encoder_hid_dim_type": null, "flip_sin_to_cos": true, "freq_shift": 0, "in_channels": 4,
          "layers_per_block": 2, "mid_block_only_cross_attention": null, "mid_block_scale_factor": 1,
          "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_eps": 1e-05, "norm_num_groups": 32,
          "num_attention_heads": null, "num_class_embeds": null, "only_cross_attention": false,
          "out_channels": 4, "projection_class_embeddings_input_dim": 2816,
          "resnet_out_scale_factor": 1.0, "resnet_skip_time_act": false,
          "resnet_time_scale_shift": "default", "sample_size": 128, "time_cond_proj_dim": null,
          "time_embedding_act_fn": null, "time_embedding_dim": null,
          "time_embedding_type": "positional", "timestep_post_act": null,
          "transformer_layers_per_block": [1, 2, 10],
          "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
          "upcast_attention": null, "use_linear_projection": true
        }"#;
        assert_eq!(Config::from_json_str(published).unwrap(), c);
    }

    #[test]
    fn unsupported_configs_are_refused() {
        for bad in [
            r#"{"class_embed_type": "timestep"}"#,
            r#"{"addition_embed_type": "text"}"#,
            r#"{"down_block_types": ["SimpleCrossAttnDownBlock2D", "DownBlock2D", "DownBlock2D", "DownBlock2D"]}"#,
            r#"{"only_cross_attention": [false, true, false, false]}"#,
            r#"{"layers_per_block": [2, 2]}"#,
        ] {
            let err = Config::from_json_str(bad).unwrap_err();
            assert_eq!(err.code, crate::ErrorCode::BadWeights, "{bad}: {err}");
        }
        // Defaults are diffusers' (SD 1.x layout), and an int applies to every block.
        let c = Config::from_json_str(r#"{"attention_head_dim": 8}"#).unwrap();
        assert_eq!(c, Config::default());
    }

    #[test]
    fn linears_are_named_as_diffusers_names_them() {
        let mut unet = tiny_unet(DType::F32);
        let weights = tiny_model("sdxl/unet/diffusion_pytorch_model.safetensors");
        let file = candle_core::safetensors::load(&weights, &Device::Cpu).unwrap();
        let linears = unet.linears_mut();
        // Per transformer layer: 2 attentions x 4 + 2 feed-forward; per transformer: proj_in/out.
        // Tiny: down 2 transformers of depth 1 and 2 of depth 2, mid 1 of depth 2, up 3 of
        // depth 2 and 3 of depth 1.
        let layers = 2 + 2 * 2 + 2 + 3 * 2 + 3;
        let transformers = 2 + 2 + 1 + 3 + 3;
        assert_eq!(linears.len(), layers * 10 + transformers * 2);
        for (name, linear) in &linears {
            let w = file
                .get(&format!("{name}.weight"))
                .unwrap_or_else(|| panic!("{name} not in file"));
            assert_close(name, linear.weight(), w, 0.0);
        }
        let names: Vec<&str> = linears.iter().map(|(n, _)| n.as_str()).collect();
        assert!(names.contains(&"down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"));
        assert!(names.contains(&"mid_block.attentions.0.transformer_blocks.1.attn2.to_out.0"));
        assert!(names.contains(&"up_blocks.1.attentions.2.transformer_blocks.0.ff.net.0.proj"));
    }
}
