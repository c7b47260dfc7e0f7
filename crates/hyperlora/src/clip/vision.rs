//! The CLIP ViT vision tower HyperLoRA encodes face crops with (openai/clip-vit-large-patch14),
//! as transformers 5.24's `CLIPVisionModel` / `CLIPVisionModelWithProjection` runs it.
//!
//! HyperLoRA conditions on the *penultimate* layer's hidden states (`hidden_states[-2]`,
//! `[N, 257, 1024]` for ViT-L/14 at 224 px), taken before `post_layernorm`.
//!
//! The transformer layers are [`crate::clip::encoder::ClipEncoder`], shared with the text
//! towers (same transformers weight names, no causal mask here).
//!
//! Weight layouts accepted (all f32/f16/bf16):
//! - `vision_model.embeddings.…`, `vision_model.pre_layrnorm.…` (sic), `vision_model.encoder.…`,
//!   `vision_model.post_layernorm.…`, plus `visual_projection.weight` when present: what
//!   transformers writes for `CLIPVisionModelWithProjection`, and the layout of the full
//!   `CLIPModel` file of openai/clip-vit-large-patch14 (its `text_model.*` tensors are ignored);
//! - `embeddings.…`, `pre_layrnorm.…`, … without the prefix: what transformers 5 writes for a bare
//!   `CLIPVisionModel`.

use std::path::Path;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Linear, VarBuilder};

use crate::clip::encoder::{
    ClipActivation, ClipConfigJson, ClipEncoder, ClipEncoderLayer, ClipEncoderSpec, LayerNorm,
};
use crate::{Error, Result};

/// A CLIP vision tower's configuration (transformers' `CLIPVisionConfig`).
#[derive(Debug, Clone, PartialEq)]
pub struct ClipVisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_channels: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub hidden_act: ClipActivation,
    pub layer_norm_eps: f64,
    /// Width of `visual_projection` (only used when the weights have one).
    pub projection_dim: usize,
}

impl ClipVisionConfig {
    /// openai/clip-vit-large-patch14's vision tower: 224 px, patch 14 (257 tokens), 1024 wide,
    /// 24 layers, 16 heads, MLP 4096, quick_gelu, projection 768.
    pub fn vit_large_patch14() -> Self {
        Self {
            hidden_size: 1024,
            intermediate_size: 4096,
            num_hidden_layers: 24,
            num_attention_heads: 16,
            num_channels: 3,
            image_size: 224,
            patch_size: 14,
            hidden_act: ClipActivation::QuickGelu,
            layer_norm_eps: 1e-5,
            projection_dim: 768,
        }
    }

    /// Reads a transformers `config.json`: a `CLIPVisionConfig`, or a full `CLIPConfig` whose
    /// `vision_config` is used. Missing keys take transformers' `CLIPVisionConfig` defaults
    /// (ViT-B/32: 768 wide, 12 layers, 12 heads, 224 px, patch 32, projection 512).
    pub fn from_json(json: &str) -> Result<Self> {
        let json = ClipConfigJson::parse(json, "vision_config", "CLIP vision config")?;
        let int = |key: &str, default: usize| json.int(key, default);
        // A full CLIPConfig keeps projection_dim at its top level.
        let projection_dim = match json.fields().get("projection_dim") {
            Some(x) if !x.is_null() => x.as_u64(),
            _ => json.root().get("projection_dim").and_then(|x| x.as_u64()),
        }
        .unwrap_or(512) as usize;
        let cfg = Self {
            hidden_size: int("hidden_size", 768)?,
            intermediate_size: int("intermediate_size", 3072)?,
            num_hidden_layers: int("num_hidden_layers", 12)?,
            num_attention_heads: int("num_attention_heads", 12)?,
            num_channels: int("num_channels", 3)?,
            image_size: int("image_size", 224)?,
            patch_size: int("patch_size", 32)?,
            hidden_act: json.activation()?,
            layer_norm_eps: json.layer_norm_eps()?,
            projection_dim,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads `config.json` from disk (see [`ClipVisionConfig::from_json`]).
    pub fn from_json_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::from(e).context(format!("cannot read {}", path.display())))?;
        Self::from_json(&text).map_err(|e| e.context(path.display()))
    }

    fn validate(&self) -> Result<()> {
        if self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            return Err(Error::invalid_argument(format!(
                "CLIP vision config: hidden_size {} is not a multiple of num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            )));
        }
        if self.patch_size == 0 || !self.image_size.is_multiple_of(self.patch_size) {
            return Err(Error::invalid_argument(format!(
                "CLIP vision config: image_size {} is not a multiple of patch_size {}",
                self.image_size, self.patch_size
            )));
        }
        if self.num_hidden_layers < 2 {
            return Err(Error::invalid_argument(
                "CLIP vision config: HyperLoRA needs at least 2 layers (penultimate output)",
            ));
        }
        Ok(())
    }

    /// Patches per side (`image_size / patch_size`).
    pub fn grid(&self) -> usize {
        self.image_size / self.patch_size
    }

    /// Tokens per image: the class token plus one per patch (257 for ViT-L/14 at 224 px).
    pub fn num_positions(&self) -> usize {
        self.grid() * self.grid() + 1
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

/// Everything one vision forward produces.
#[derive(Debug, Clone)]
pub struct ClipVisionOutput {
    /// transformers' `hidden_states`: `pre_layrnorm(embeddings)`, then each layer's output;
    /// `[N, T, H]` each (`num_hidden_layers + 1` tensors).
    pub hidden_states: Vec<Tensor>,
    /// `post_layernorm(last_hidden_state[:, 0])`, `[N, H]` (transformers' `pooler_output`).
    pub pooled: Tensor,
    /// `visual_projection(pooled)`, `[N, projection_dim]`, when the weights have a projection.
    pub image_embeds: Option<Tensor>,
}

impl ClipVisionOutput {
    /// `hidden_states[-2]`: the penultimate layer, what HyperLoRA conditions on.
    pub fn penultimate(&self) -> &Tensor {
        &self.hidden_states[self.hidden_states.len() - 2]
    }

    /// The last layer's output (no `post_layernorm`; transformers' `last_hidden_state`).
    pub fn last_hidden_state(&self) -> &Tensor {
        self.hidden_states
            .last()
            .expect("at least two hidden states")
    }
}

/// transformers' `CLIPVisionModel` / `CLIPVisionModelWithProjection`.
#[derive(Debug, Clone)]
pub struct ClipVisionModel {
    /// `patch_embedding.weight` flattened to `[H, C * P * P]` (a stride-P convolution without
    /// bias is one matmul over non-overlapping patches).
    patch_weight: Tensor,
    class_embedding: Tensor,
    position_embedding: Tensor,
    pre_layrnorm: LayerNorm,
    /// `encoder.layers.0 ..= L-2`: their output is the penultimate hidden state.
    encoder: ClipEncoder,
    /// `encoder.layers.{L-1}`.
    last_layer: ClipEncoderLayer,
    post_layernorm: LayerNorm,
    visual_projection: Option<Linear>,
    config: ClipVisionConfig,
    device: Device,
    dtype: DType,
}

impl ClipVisionModel {
    /// `vb` points at the file's root (see the module docs for the accepted layouts).
    /// `visual_projection` is loaded when the weights have it.
    pub fn load(vb: VarBuilder, config: &ClipVisionConfig) -> Result<Self> {
        config.validate()?;
        let root = if vb.contains_tensor("vision_model.embeddings.class_embedding") {
            vb.pp("vision_model")
        } else {
            vb.clone()
        };
        let h = config.hidden_size;
        let p = config.patch_size;
        let c = config.num_channels;
        let emb = root.pp("embeddings");
        let patch = emb.get((h, c, p, p), "patch_embedding.weight")?;
        let patch_weight = patch.reshape((h, c * p * p))?;
        let class_embedding = emb.get(h, "class_embedding")?;
        let position_embedding =
            emb.get((config.num_positions(), h), "position_embedding.weight")?;
        let pre_layrnorm = LayerNorm::load(h, config.layer_norm_eps, root.pp("pre_layrnorm"))?;
        let spec = config.encoder_spec();
        let last = spec.num_hidden_layers - 1;
        let encoder = ClipEncoder::load(
            &ClipEncoderSpec {
                num_hidden_layers: last,
                ..spec
            },
            root.pp("encoder"),
        )?;
        let last_layer = ClipEncoderLayer::load(&spec, root.pp("encoder.layers").pp(last))?;
        let post_layernorm = LayerNorm::load(h, config.layer_norm_eps, root.pp("post_layernorm"))?;
        let visual_projection = if vb.contains_tensor("visual_projection.weight") {
            Some(candle_nn::linear_no_bias(
                h,
                config.projection_dim,
                vb.pp("visual_projection"),
            )?)
        } else {
            None
        };
        Ok(Self {
            patch_weight,
            class_embedding,
            position_embedding,
            pre_layrnorm,
            encoder,
            last_layer,
            post_layernorm,
            visual_projection,
            config: config.clone(),
            device: vb.device().clone(),
            dtype: vb.dtype(),
        })
    }

    /// Loads a transformers folder: `config.json` plus `model.safetensors` (or
    /// `model.fp16.safetensors`), converted to `dtype` on `device`.
    pub fn load_dir(dir: impl AsRef<Path>, dtype: DType, device: &Device) -> Result<Self> {
        let dir = dir.as_ref();
        if !dir.is_dir() {
            return Err(Error::model_not_found(format!(
                "CLIP vision model folder {} does not exist",
                dir.display()
            )));
        }
        let config = ClipVisionConfig::from_json_file(dir.join("config.json"))?;
        let weights = ["model.safetensors", "model.fp16.safetensors"]
            .iter()
            .map(|n| dir.join(n))
            .find(|p| p.is_file())
            .ok_or_else(|| {
                Error::model_not_found(format!(
                    "{}: no model.safetensors (or model.fp16.safetensors)",
                    dir.display()
                ))
            })?;
        // Candle's own var builder trusts the header: check it first.
        crate::weights::inspect::check_loadable(&weights)?;
        // SAFETY: model files are not modified while they are mapped (as for every
        // memory-mapped weights file in this crate).
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&weights], dtype, device) }
            .map_err(|e| Error::bad_weights(format!("{}: {e}", weights.display())))?;
        Self::load(vb, &config).map_err(|e| e.context(weights.display()))
    }

    pub fn config(&self) -> &ClipVisionConfig {
        &self.config
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn has_projection(&self) -> bool {
        self.visual_projection.is_some()
    }

    /// `pre_layrnorm(class token ‖ patch embeddings + positions)`, `[N, T, H]`.
    fn embed(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let cfg = &self.config;
        let (n, c, hgt, wid) = pixel_values.dims4().map_err(|_| {
            Error::invalid_argument(format!(
                "CLIP pixel_values must be [N, {}, {}, {}], got {:?}",
                cfg.num_channels,
                cfg.image_size,
                cfg.image_size,
                pixel_values.dims()
            ))
        })?;
        if n == 0 || c != cfg.num_channels || hgt != cfg.image_size || wid != cfg.image_size {
            return Err(Error::invalid_argument(format!(
                "CLIP pixel_values must be [N >= 1, {}, {}, {}], got {:?}",
                cfg.num_channels,
                cfg.image_size,
                cfg.image_size,
                pixel_values.dims()
            )));
        }
        let g = cfg.grid();
        let p = cfg.patch_size;
        let h = cfg.hidden_size;
        let x = pixel_values.to_device(&self.device)?.to_dtype(self.dtype)?;
        // [N, C, g, P, g, P] -> [N, g, g, C, P, P] -> [N, g*g, C*P*P]: each row one patch in
        // the weight's (C, kh, kw) order, patches row-major as transformers' flatten(2).
        let patches = x
            .reshape((n, c, g, p, g, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .contiguous()?
            .reshape((n, g * g, c * p * p))?;
        let patch_embeds = patches.broadcast_matmul(&self.patch_weight.t()?)?;
        let cls = self.class_embedding.reshape((1, 1, h))?.repeat((n, 1, 1))?;
        let tokens = Tensor::cat(&[&cls, &patch_embeds], 1)?;
        let tokens = tokens.broadcast_add(&self.position_embedding.unsqueeze(0)?)?;
        Ok(self.pre_layrnorm.forward(&tokens)?)
    }

    /// The full forward: every hidden state, the pooled output and (with a projection)
    /// `image_embeds`. `pixel_values`: `[N, 3, image_size, image_size]`, CLIP-normalised;
    /// converted to the model's dtype and device.
    pub fn forward(&self, pixel_values: &Tensor) -> Result<ClipVisionOutput> {
        let x = self.embed(pixel_values)?;
        let mut hidden_states = self.encoder.forward_hidden_states(&x, None)?;
        let last = self
            .last_layer
            .forward(hidden_states.last().expect("embeddings"), None)?;
        hidden_states.push(last.clone());
        let cls = last.narrow(1, 0, 1)?.squeeze(1)?;
        let pooled = self.post_layernorm.forward(&cls)?;
        let image_embeds = match &self.visual_projection {
            Some(proj) => Some(proj.forward(&pooled)?),
            None => None,
        };
        Ok(ClipVisionOutput {
            hidden_states,
            pooled,
            image_embeds,
        })
    }

    /// Only `hidden_states[-2]` (`[N, T, H]`), skipping the last layer: what HyperLoRA needs.
    pub fn penultimate(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let x = self.embed(pixel_values)?;
        Ok(self.encoder.forward(&x, None)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{tiny_clip_vision as tiny, tiny_model};

    #[test]
    fn configs_parse() {
        let tiny = ClipVisionConfig::from_json_file(tiny_model("clip-vision/config.json")).unwrap();
        assert_eq!(
            (
                tiny.hidden_size,
                tiny.num_hidden_layers,
                tiny.num_attention_heads,
                tiny.num_positions(),
                tiny.projection_dim
            ),
            (32, 3, 4, 5, 16)
        );
        // openai/clip-vit-large-patch14's config.json is a full CLIPConfig.
        let full = ClipVisionConfig::from_json(
            r#"{"architectures":["CLIPModel"],"projection_dim":768,"text_config":{"hidden_size":768},
            "vision_config":{"dropout":0.0,"hidden_act":"quick_gelu","hidden_size":1024,"image_size":224,
            "intermediate_size":4096,"layer_norm_eps":1e-05,"model_type":"clip_vision_model",
            "num_attention_heads":16,"num_hidden_layers":24,"patch_size":14,"projection_dim":768}}"#,
        )
        .unwrap();
        assert_eq!(full, ClipVisionConfig::vit_large_patch14());
        assert_eq!(full.num_positions(), 257);
        assert!(ClipVisionConfig::from_json(r#"{"image_size":30,"patch_size":14}"#).is_err());
        assert!(ClipVisionConfig::from_json(r#"{"hidden_act":"relu"}"#).is_err());
    }

    #[test]
    fn bad_inputs_and_weights() {
        let model = tiny(DType::F32);
        let wrong = Tensor::zeros((1, 3, 224, 224), DType::F32, &Device::Cpu).unwrap();
        assert_eq!(
            model.forward(&wrong).unwrap_err().code,
            crate::ErrorCode::InvalidArgument
        );
        let wrong = Tensor::zeros((3, 28, 28), DType::F32, &Device::Cpu).unwrap();
        assert_eq!(
            model.penultimate(&wrong).unwrap_err().code,
            crate::ErrorCode::InvalidArgument
        );
        // A config that disagrees with the weights: BAD_WEIGHTS naming the file and tensor.
        let dir = std::env::temp_dir().join(format!("hyperlora-clipv-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(
            tiny_model("clip-vision/model.safetensors"),
            dir.join("model.safetensors"),
        )
        .unwrap();
        std::fs::write(
            dir.join("config.json"),
            r#"{"hidden_size":32,"intermediate_size":48,"num_attention_heads":4,"num_hidden_layers":3,"image_size":28,"patch_size":14,"projection_dim":16}"#,
        )
        .unwrap();
        let err = ClipVisionModel::load_dir(&dir, DType::F32, &Device::Cpu).unwrap_err();
        assert_eq!(err.code, crate::ErrorCode::BadWeights, "{err}");
        assert!(err.message.contains("model.safetensors"), "{err}");
        assert!(err.message.contains("fc1"), "{err}");
        std::fs::remove_file(dir.join("model.safetensors")).unwrap();
        let err = ClipVisionModel::load_dir(&dir, DType::F32, &Device::Cpu).unwrap_err();
        assert_eq!(err.code, crate::ErrorCode::ModelNotFound, "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
