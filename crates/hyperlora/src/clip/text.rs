//! CLIP's text tower, as transformers 5.24 runs it: `CLIPTextModel` (e.g. OpenAI CLIP ViT-L/14,
//! 768 wide) and `CLIPTextModelWithProjection` (e.g. OpenCLIP ViT-bigG/14, 1280 wide, with
//! `text_projection`), on the shared encoder of [`super::encoder`].

use std::path::Path;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Embedding, Linear, VarBuilder};

use super::encoder::{
    causal_mask, ClipActivation, ClipConfigJson, ClipEncoder, ClipEncoderSpec, LayerNorm,
};
use crate::{Error, Result};

/// A CLIP text tower's configuration (transformers' `CLIPTextConfig`).
#[derive(Debug, Clone, PartialEq)]
pub struct ClipTextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    pub hidden_act: ClipActivation,
    pub layer_norm_eps: f64,
    /// Width of `text_projection` (used only by `CLIPTextModelWithProjection`).
    pub projection_dim: usize,
    pub bos_token_id: u32,
    /// Chooses the pooling position: `2` (legacy configs, SDXL's) means the argmax of the ids;
    /// anything else means the first position holding this id.
    pub eos_token_id: u32,
    pub pad_token_id: u32,
}

impl ClipTextConfig {
    /// SDXL's `text_encoder`: openai/clip-vit-large-patch14's text tower, as
    /// stabilityai/stable-diffusion-xl-base-1.0 `text_encoder/config.json` states it.
    pub fn sdxl_clip_l() -> Self {
        Self {
            vocab_size: 49408,
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            max_position_embeddings: 77,
            hidden_act: ClipActivation::QuickGelu,
            layer_norm_eps: 1e-5,
            projection_dim: 768,
            bos_token_id: 0,
            eos_token_id: 2,
            pad_token_id: 1,
        }
    }

    /// SDXL's `text_encoder_2`: laion/CLIP-ViT-bigG-14-laion2B-39B-b160k's text tower with its
    /// 1280 → 1280 projection.
    pub fn sdxl_clip_g() -> Self {
        Self {
            vocab_size: 49408,
            hidden_size: 1280,
            intermediate_size: 5120,
            num_hidden_layers: 32,
            num_attention_heads: 20,
            max_position_embeddings: 77,
            hidden_act: ClipActivation::Gelu,
            layer_norm_eps: 1e-5,
            projection_dim: 1280,
            bos_token_id: 0,
            eos_token_id: 2,
            pad_token_id: 1,
        }
    }

    /// Reads a transformers `config.json` (a `CLIPTextConfig`, or a `CLIPConfig` whose
    /// `text_config` is used). Missing keys take transformers' `CLIPTextConfig` defaults.
    pub fn from_json(json: &str) -> Result<Self> {
        let json = ClipConfigJson::parse(json, "text_config", "CLIP text config")?;
        let int = |key: &str, default: usize| json.int(key, default);
        let (hidden_act, layer_norm_eps) = (json.activation()?, json.layer_norm_eps()?);
        let cfg = Self {
            vocab_size: int("vocab_size", 49408)?,
            hidden_size: int("hidden_size", 512)?,
            intermediate_size: int("intermediate_size", 2048)?,
            num_hidden_layers: int("num_hidden_layers", 12)?,
            num_attention_heads: int("num_attention_heads", 8)?,
            max_position_embeddings: int("max_position_embeddings", 77)?,
            hidden_act,
            layer_norm_eps,
            projection_dim: int("projection_dim", 512)?,
            bos_token_id: json.token_id("bos_token_id", 49406)?,
            eos_token_id: json.token_id("eos_token_id", 49407)?,
            pad_token_id: json.token_id("pad_token_id", 1)?,
        };
        if cfg.num_attention_heads == 0 || !cfg.hidden_size.is_multiple_of(cfg.num_attention_heads)
        {
            return Err(Error::invalid_argument(format!(
                "CLIP text config: hidden_size {} is not a multiple of num_attention_heads {}",
                cfg.hidden_size, cfg.num_attention_heads
            )));
        }
        if cfg.num_hidden_layers < 2 {
            return Err(Error::invalid_argument(
                "CLIP text config: SDXL needs at least 2 layers (penultimate output)",
            ));
        }
        Ok(cfg)
    }

    /// Reads `config.json` from disk (see [`ClipTextConfig::from_json`]).
    pub fn from_json_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::from(e).context(format!("cannot read {}", path.display())))?;
        Self::from_json(&text).map_err(|e| e.context(path.display()))
    }

    pub fn encoder_spec(&self) -> ClipEncoderSpec {
        ClipEncoderSpec {
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_hidden_layers: self.num_hidden_layers,
            num_attention_heads: self.num_attention_heads,
            hidden_act: self.hidden_act,
            layer_norm_eps: self.layer_norm_eps,
        }
    }
}
/// Everything one text forward produces.
#[derive(Debug, Clone)]
pub struct ClipTextOutput {
    /// transformers' `hidden_states`: embeddings, then each layer's output; `[B, T, H]` each.
    pub hidden_states: Vec<Tensor>,
    /// `final_layer_norm` of the last layer, `[B, T, H]`.
    pub last_hidden_state: Tensor,
    /// `last_hidden_state` at the EOS position, `[B, H]` (transformers' `pooler_output`).
    pub pooled: Tensor,
    /// `text_projection(pooled)`, `[B, projection_dim]`, for [`ClipTextModelWithProjection`].
    pub text_embeds: Option<Tensor>,
}

impl ClipTextOutput {
    /// `hidden_states[-2]`: the penultimate layer, before `final_layer_norm` (what SDXL uses).
    pub fn penultimate(&self) -> &Tensor {
        &self.hidden_states[self.hidden_states.len() - 2]
    }

    /// diffusers' `clip_skip`: `hidden_states[-(clip_skip + 2)]` (`0` is the penultimate).
    pub fn skip(&self, clip_skip: usize) -> Result<&Tensor> {
        let n = self.hidden_states.len();
        n.checked_sub(clip_skip + 2)
            .map(|i| &self.hidden_states[i])
            .ok_or_else(|| {
                Error::invalid_argument(format!(
                    "clip_skip {clip_skip} exceeds the {} layers",
                    n - 1
                ))
            })
    }
}

/// transformers' pooling positions, one per row of `ids` (`[B, T]`, any integer dtype).
/// `eos_token_id == 2`: the first position of the largest id; otherwise the first position
/// equal to `eos_token_id` (0 when absent).
pub fn eos_positions(ids: &Tensor, eos_token_id: u32) -> Result<Vec<usize>> {
    let rows = ids.to_dtype(DType::U32)?.to_vec2::<u32>()?;
    Ok(rows
        .iter()
        .map(|row| {
            if eos_token_id == 2 {
                let mut best = 0;
                for (i, &v) in row.iter().enumerate() {
                    if v > row[best] {
                        best = i;
                    }
                }
                best
            } else {
                row.iter().position(|&v| v == eos_token_id).unwrap_or(0)
            }
        })
        .collect())
}

/// The CLIP text transformer (transformers' `text_model`): embeddings, causal encoder,
/// `final_layer_norm`, EOS pooling.
#[derive(Debug, Clone)]
pub struct ClipTextTransformer {
    token_embedding: Embedding,
    position_embedding: Embedding,
    encoder: ClipEncoder,
    final_layer_norm: LayerNorm,
    config: ClipTextConfig,
    device: Device,
}

impl ClipTextTransformer {
    /// `vb` points at the level holding `embeddings`, `encoder` and `final_layer_norm`.
    pub fn load(vb: VarBuilder, config: &ClipTextConfig) -> Result<Self> {
        let spec = config.encoder_spec();
        let emb = vb.pp("embeddings");
        Ok(Self {
            token_embedding: candle_nn::embedding(
                config.vocab_size,
                config.hidden_size,
                emb.pp("token_embedding"),
            )?,
            position_embedding: candle_nn::embedding(
                config.max_position_embeddings,
                config.hidden_size,
                emb.pp("position_embedding"),
            )?,
            encoder: ClipEncoder::load(&spec, vb.pp("encoder"))?,
            final_layer_norm: LayerNorm::load(
                config.hidden_size,
                config.layer_norm_eps,
                vb.pp("final_layer_norm"),
            )?,
            config: config.clone(),
            device: vb.device().clone(),
        })
    }

    pub fn config(&self) -> &ClipTextConfig {
        &self.config
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Every Linear of the encoder layers with its transformers name (without `.weight`),
    /// e.g. `text_model.encoder.layers.0.self_attn.q_proj`, `text_model.encoder.layers.0.mlp.fc1`
    /// — the layers text-encoder LoRAs target. Replacing one changes what
    /// [`forward`](Self::forward) computes.
    pub fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        let mut out = Vec::new();
        self.encoder.linears_mut("text_model.encoder", &mut out);
        out
    }

    /// `input_ids`: `[B, T]` u32 (or i64), `T <= max_position_embeddings`.
    pub fn forward(&self, input_ids: &Tensor) -> Result<ClipTextOutput> {
        let (b, t) = input_ids.dims2().map_err(|_| {
            Error::invalid_argument(format!(
                "CLIP input_ids must be [batch, seq], got {:?}",
                input_ids.dims()
            ))
        })?;
        if t == 0 || t > self.config.max_position_embeddings {
            return Err(Error::invalid_argument(format!(
                "CLIP sequence length {t} outside 1..={}",
                self.config.max_position_embeddings
            )));
        }
        let ids = input_ids.to_device(&self.device)?.to_dtype(DType::U32)?;
        let max_id = ids
            .max_keepdim(1)?
            .max_keepdim(0)?
            .flatten_all()?
            .to_vec1::<u32>()?[0];
        if max_id as usize >= self.config.vocab_size {
            return Err(Error::invalid_argument(format!(
                "token id {max_id} outside the vocabulary of {}",
                self.config.vocab_size
            )));
        }
        let positions = Tensor::arange(0u32, t as u32, &self.device)?;
        let x = self
            .token_embedding
            .forward(&ids)?
            .broadcast_add(&self.position_embedding.forward(&positions)?)?;
        let mask = causal_mask(t, &self.device)?;
        let hidden_states = self.encoder.forward_hidden_states(&x, Some(&mask))?;
        let last = self
            .final_layer_norm
            .forward(hidden_states.last().expect("layers"))?;
        let index: Vec<u32> = eos_positions(&ids, self.config.eos_token_id)?
            .into_iter()
            .enumerate()
            .map(|(row, p)| (row * t + p) as u32)
            .collect();
        let index = Tensor::from_vec(index, b, &self.device)?;
        let pooled = last
            .reshape((b * t, self.config.hidden_size))?
            .index_select(&index, 0)?;
        Ok(ClipTextOutput {
            hidden_states,
            last_hidden_state: last,
            pooled,
            text_embeds: None,
        })
    }
}

/// transformers' `CLIPTextModel` (SDXL's `text_encoder`). Accepts both weight layouts:
/// `text_model.embeddings.…` (transformers 4 files, the published SDXL repos) and
/// `embeddings.…` (what transformers 5 writes).
#[derive(Debug, Clone)]
pub struct ClipTextModel {
    pub text_model: ClipTextTransformer,
}

impl ClipTextModel {
    pub fn load(vb: VarBuilder, config: &ClipTextConfig) -> Result<Self> {
        Ok(Self {
            text_model: ClipTextTransformer::load(text_model_root(vb), config)?,
        })
    }

    pub fn forward(&self, input_ids: &Tensor) -> Result<ClipTextOutput> {
        self.text_model.forward(input_ids)
    }

    /// See [`ClipTextTransformer::linears_mut`].
    pub fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        self.text_model.linears_mut()
    }
}

/// transformers' `CLIPTextModelWithProjection` (SDXL's `text_encoder_2`):
/// `text_model.*` plus `text_projection.weight` (no bias).
#[derive(Debug, Clone)]
pub struct ClipTextModelWithProjection {
    pub text_model: ClipTextTransformer,
    text_projection: Linear,
}

impl ClipTextModelWithProjection {
    pub fn load(vb: VarBuilder, config: &ClipTextConfig) -> Result<Self> {
        let text_model = ClipTextTransformer::load(text_model_root(vb.clone()), config)?;
        let text_projection = candle_nn::linear_no_bias(
            config.hidden_size,
            config.projection_dim,
            vb.pp("text_projection"),
        )?;
        Ok(Self {
            text_model,
            text_projection,
        })
    }

    /// As [`ClipTextTransformer::forward`], with `text_embeds` set.
    pub fn forward(&self, input_ids: &Tensor) -> Result<ClipTextOutput> {
        let mut out = self.text_model.forward(input_ids)?;
        out.text_embeds = Some(self.text_projection.forward(&out.pooled)?);
        Ok(out)
    }

    /// The encoder layers' Linears (see [`ClipTextTransformer::linears_mut`]);
    /// `text_projection` is not included (LoRAs do not target it).
    pub fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        self.text_model.linears_mut()
    }
}

fn text_model_root(vb: VarBuilder) -> VarBuilder {
    if vb.contains_tensor("text_model.embeddings.token_embedding.weight") {
        vb.pp("text_model")
    } else {
        vb
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::tiny_text_config;

    #[test]
    fn tiny_configs_parse() {
        let l = tiny_text_config("text_encoder");
        assert_eq!(
            (l.hidden_size, l.num_hidden_layers, l.num_attention_heads),
            (16, 3, 2)
        );
        assert_eq!(
            (l.hidden_act, l.eos_token_id, l.layer_norm_eps),
            (ClipActivation::QuickGelu, 2, 1e-5)
        );
        let g = tiny_text_config("text_encoder_2");
        assert_eq!((g.hidden_act, g.projection_dim), (ClipActivation::Gelu, 16));
        let real_g = ClipTextConfig::from_json(
            r#"{"architectures":["CLIPTextModelWithProjection"],"bos_token_id":0,"eos_token_id":2,
            "hidden_act":"gelu","hidden_size":1280,"intermediate_size":5120,"layer_norm_eps":1e-05,
            "max_position_embeddings":77,"model_type":"clip_text_model","num_attention_heads":20,
            "num_hidden_layers":32,"pad_token_id":1,"projection_dim":1280,"torch_dtype":"float16","vocab_size":49408}"#,
        )
        .unwrap();
        assert_eq!(real_g, ClipTextConfig::sdxl_clip_g());
        let l_sd = ClipTextConfig::sdxl_clip_l();
        assert_eq!(
            (
                l_sd.hidden_size,
                l_sd.num_hidden_layers,
                l_sd.num_attention_heads,
                l_sd.intermediate_size
            ),
            (768, 12, 12, 3072)
        );
        assert!(ClipTextConfig::from_json(r#"{"hidden_act":"relu"}"#).is_err());
        assert!(
            ClipTextConfig::from_json(r#"{"hidden_size":10,"num_attention_heads":3}"#).is_err()
        );
    }
}
