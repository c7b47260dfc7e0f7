//! SDXL's two text encoders, as transformers 5.24 runs them for diffusers'
//! `StableDiffusionXLPipeline`: `CLIPTextModel` (OpenAI CLIP ViT-L/14 text, 768 wide) and
//! `CLIPTextModelWithProjection` (OpenCLIP ViT-bigG/14 text, 1280 wide, with `text_projection`),
//! plus A1111's "Original" emphasis, which scales each token's hidden state by its prompt weight.
//!
//! SDXL conditions on the *penultimate* layer of both encoders (`hidden_states[-2]`, before
//! `final_layer_norm`), concatenated to 2048 features per token, and on bigG's projected pooled
//! output (1280).
//!
//! The encoder stack ([`ClipEncoder`], [`ClipEncoderLayer`], [`ClipAttention`], [`ClipMlp`],
//! [`LayerNorm`]) takes hidden states and an optional additive mask, so a CLIP vision tower can
//! reuse it with the same transformers weight names.

use std::path::Path;

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{Embedding, Linear, VarBuilder};

use crate::{Error, Result};

/// The activation of the MLP (`hidden_act` in a transformers config).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClipActivation {
    /// `quick_gelu`: `x * sigmoid(1.702 x)` (OpenAI CLIP).
    QuickGelu,
    /// `gelu`: the exact, erf-based GELU (OpenCLIP bigG).
    Gelu,
    /// `gelu_new` / `gelu_pytorch_tanh`: the tanh approximation.
    GeluTanh,
}

impl ClipActivation {
    /// Parses transformers' `hidden_act` name.
    pub fn from_name(name: &str) -> Result<Self> {
        match name {
            "quick_gelu" => Ok(Self::QuickGelu),
            "gelu" => Ok(Self::Gelu),
            "gelu_new" | "gelu_pytorch_tanh" => Ok(Self::GeluTanh),
            other => Err(Error::invalid_argument(format!(
                "unsupported CLIP hidden_act {other:?}"
            ))),
        }
    }

    pub fn forward(self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::QuickGelu => x * candle_nn::ops::sigmoid(&(x * 1.702)?)?,
            Self::Gelu => x.gelu_erf(),
            Self::GeluTanh => x.gelu(),
        }
    }
}

/// The shape of a CLIP transformer encoder; text and vision towers share it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ClipEncoderSpec {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub hidden_act: ClipActivation,
    pub layer_norm_eps: f64,
}

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

/// A transformers CLIP config (`CLIPTextConfig` / `CLIPVisionConfig`, or that section of a full
/// `CLIPConfig`), read with transformers' defaults for missing keys.
pub(crate) struct ClipConfigJson {
    root: serde_json::Value,
    section: &'static str,
    what: &'static str,
}

impl ClipConfigJson {
    pub(crate) fn parse(json: &str, section: &'static str, what: &'static str) -> Result<Self> {
        let root: serde_json::Value = serde_json::from_str(json)
            .map_err(|e| Error::invalid_argument(format!("{what} is not JSON: {e}")))?;
        let config = Self {
            root,
            section,
            what,
        };
        if !config.fields().is_object() {
            return Err(Error::invalid_argument(format!(
                "{what} must be a JSON object"
            )));
        }
        Ok(config)
    }

    /// The whole document (a full `CLIPConfig` keeps e.g. `projection_dim` at the top).
    pub(crate) fn root(&self) -> &serde_json::Value {
        &self.root
    }

    pub(crate) fn fields(&self) -> &serde_json::Value {
        match self.root.get(self.section) {
            Some(section) if section.is_object() => section,
            _ => &self.root,
        }
    }

    /// A non-negative integer (a one-element list is accepted, as some configs write it).
    pub(crate) fn int(&self, key: &str, default: usize) -> Result<usize> {
        let value = match self.fields().get(key) {
            None | Some(serde_json::Value::Null) => return Ok(default),
            Some(serde_json::Value::Array(a)) if a.len() == 1 => &a[0],
            Some(x) => x,
        };
        value.as_u64().map(|n| n as usize).ok_or_else(|| {
            Error::invalid_argument(format!(
                "{}: {key} must be a non-negative integer, got {value}",
                self.what
            ))
        })
    }

    pub(crate) fn activation(&self) -> Result<ClipActivation> {
        match self.fields().get("hidden_act") {
            None | Some(serde_json::Value::Null) => Ok(ClipActivation::QuickGelu),
            Some(serde_json::Value::String(s)) => ClipActivation::from_name(s),
            Some(x) => Err(Error::invalid_argument(format!(
                "{}: hidden_act must be a string, got {x}",
                self.what
            ))),
        }
    }

    pub(crate) fn layer_norm_eps(&self) -> Result<f64> {
        match self.fields().get("layer_norm_eps") {
            None | Some(serde_json::Value::Null) => Ok(1e-5),
            // LayerNorm divides by sqrt(variance + eps): a zero or negative eps gives NaN.
            Some(x) => x
                .as_f64()
                .filter(|e| *e > 0.0 && e.is_finite())
                .ok_or_else(|| {
                    Error::invalid_argument(format!(
                        "{}: layer_norm_eps must be a positive number, got {x}",
                        self.what
                    ))
                }),
        }
    }

    /// A token id (a 32-bit non-negative integer).
    pub(crate) fn token_id(&self, key: &str, default: u32) -> Result<u32> {
        let id = self.int(key, default as usize)?;
        u32::try_from(id).map_err(|_| {
            Error::invalid_argument(format!("{}: {key} {id} is not a token id", self.what))
        })
    }
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

/// `nn.LayerNorm` with torch's numerics: statistics in f32 with a two-pass variance
/// (candle's fused kernel uses a one-pass `E[x²] - E[x]²`, which loses precision on CLIP's
/// large-magnitude residual features).
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub fn load(size: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: vb.get(size, "weight")?,
            bias: vb.get(size, "bias")?,
            eps,
        })
    }

    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let dtype = x.dtype();
        let x = x.to_dtype(DType::F32)?;
        let mean = x.mean_keepdim(D::Minus1)?;
        let centered = x.broadcast_sub(&mean)?;
        let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = centered.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        let w = self.weight.to_dtype(DType::F32)?;
        let b = self.bias.to_dtype(DType::F32)?;
        normed.broadcast_mul(&w)?.broadcast_add(&b)?.to_dtype(dtype)
    }
}

/// Multi-head self-attention (`self_attn.{q,k,v,out}_proj`).
#[derive(Debug, Clone)]
pub struct ClipAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    num_heads: usize,
    head_dim: usize,
    scale: f64,
}

impl ClipAttention {
    pub fn load(hidden_size: usize, num_heads: usize, vb: VarBuilder) -> Result<Self> {
        let head_dim = hidden_size / num_heads;
        Ok(Self {
            q_proj: candle_nn::linear(hidden_size, hidden_size, vb.pp("q_proj"))?,
            k_proj: candle_nn::linear(hidden_size, hidden_size, vb.pp("k_proj"))?,
            v_proj: candle_nn::linear(hidden_size, hidden_size, vb.pp("v_proj"))?,
            out_proj: candle_nn::linear(hidden_size, hidden_size, vb.pp("out_proj"))?,
            num_heads,
            head_dim,
            scale: (head_dim as f64).powf(-0.5),
        })
    }

    /// `x`: `[B, T, C]`; `mask`: additive f32, broadcastable to `[B, heads, T, T]`.
    /// Softmax runs in f32 whatever the model dtype (as transformers does).
    pub fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> candle_core::Result<Tensor> {
        let (b, t, c) = x.dims3()?;
        let heads = |p: &Linear| -> candle_core::Result<Tensor> {
            p.forward(x)?
                .reshape((b, t, self.num_heads, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = heads(&self.q_proj)?;
        let k = heads(&self.k_proj)?;
        let v = heads(&self.v_proj)?;
        let scores = (q.matmul(&k.t()?)? * self.scale)?.to_dtype(DType::F32)?;
        let scores = match mask {
            Some(m) => scores.broadcast_add(m)?,
            None => scores,
        };
        let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(x.dtype())?;
        let out = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, t, c))?;
        self.out_proj.forward(&out)
    }

    /// `{prefix}.q_proj|k_proj|v_proj|out_proj`.
    fn linears_mut<'a>(&'a mut self, prefix: &str, out: &mut Vec<(String, &'a mut Linear)>) {
        out.push((format!("{prefix}.q_proj"), &mut self.q_proj));
        out.push((format!("{prefix}.k_proj"), &mut self.k_proj));
        out.push((format!("{prefix}.v_proj"), &mut self.v_proj));
        out.push((format!("{prefix}.out_proj"), &mut self.out_proj));
    }
}

/// `mlp.fc1` → activation → `mlp.fc2`.
#[derive(Debug, Clone)]
pub struct ClipMlp {
    fc1: Linear,
    fc2: Linear,
    act: ClipActivation,
}

impl ClipMlp {
    pub fn load(spec: &ClipEncoderSpec, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            fc1: candle_nn::linear(spec.hidden_size, spec.intermediate_size, vb.pp("fc1"))?,
            fc2: candle_nn::linear(spec.intermediate_size, spec.hidden_size, vb.pp("fc2"))?,
            act: spec.hidden_act,
        })
    }

    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.fc2.forward(&self.act.forward(&self.fc1.forward(x)?)?)
    }

    /// `{prefix}.fc1|fc2`.
    fn linears_mut<'a>(&'a mut self, prefix: &str, out: &mut Vec<(String, &'a mut Linear)>) {
        out.push((format!("{prefix}.fc1"), &mut self.fc1));
        out.push((format!("{prefix}.fc2"), &mut self.fc2));
    }
}

/// One pre-norm transformer layer (`encoder.layers.{i}`).
#[derive(Debug, Clone)]
pub struct ClipEncoderLayer {
    self_attn: ClipAttention,
    layer_norm1: LayerNorm,
    mlp: ClipMlp,
    layer_norm2: LayerNorm,
}

impl ClipEncoderLayer {
    pub fn load(spec: &ClipEncoderSpec, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            self_attn: ClipAttention::load(
                spec.hidden_size,
                spec.num_attention_heads,
                vb.pp("self_attn"),
            )?,
            layer_norm1: LayerNorm::load(
                spec.hidden_size,
                spec.layer_norm_eps,
                vb.pp("layer_norm1"),
            )?,
            mlp: ClipMlp::load(spec, vb.pp("mlp"))?,
            layer_norm2: LayerNorm::load(
                spec.hidden_size,
                spec.layer_norm_eps,
                vb.pp("layer_norm2"),
            )?,
        })
    }

    pub fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> candle_core::Result<Tensor> {
        let h = (x + self
            .self_attn
            .forward(&self.layer_norm1.forward(x)?, mask)?)?;
        &h + self.mlp.forward(&self.layer_norm2.forward(&h)?)?
    }
}

/// The layer stack (`encoder.layers.*`).
#[derive(Debug, Clone)]
pub struct ClipEncoder {
    layers: Vec<ClipEncoderLayer>,
}

impl ClipEncoder {
    /// `vb` points at `encoder`.
    pub fn load(spec: &ClipEncoderSpec, vb: VarBuilder) -> Result<Self> {
        let vb = vb.pp("layers");
        let layers = (0..spec.num_hidden_layers)
            .map(|i| ClipEncoderLayer::load(spec, vb.pp(i)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { layers })
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Every Linear, named `{prefix}.layers.{i}.self_attn.{q,k,v,out}_proj` and
    /// `{prefix}.layers.{i}.mlp.fc{1,2}`.
    pub fn linears_mut<'a>(&'a mut self, prefix: &str, out: &mut Vec<(String, &'a mut Linear)>) {
        for (i, layer) in self.layers.iter_mut().enumerate() {
            let p = format!("{prefix}.layers.{i}");
            layer.self_attn.linears_mut(&format!("{p}.self_attn"), out);
            layer.mlp.linears_mut(&format!("{p}.mlp"), out);
        }
    }

    /// transformers' `hidden_states`: the input, then every layer's output
    /// (`num_layers + 1` tensors).
    pub fn forward_hidden_states(
        &self,
        x: &Tensor,
        mask: Option<&Tensor>,
    ) -> candle_core::Result<Vec<Tensor>> {
        let mut states = Vec::with_capacity(self.layers.len() + 1);
        states.push(x.clone());
        for layer in &self.layers {
            let next = layer.forward(states.last().expect("non-empty"), mask)?;
            states.push(next);
        }
        Ok(states)
    }

    /// The last layer's output.
    pub fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> candle_core::Result<Tensor> {
        let mut h = x.clone();
        for layer in &self.layers {
            h = layer.forward(&h, mask)?;
        }
        Ok(h)
    }
}

/// Additive causal mask `[T, T]` in f32: 0 on and below the diagonal, `f32::MIN` above
/// (transformers fills with the dtype's minimum).
pub fn causal_mask(seq_len: usize, device: &Device) -> candle_core::Result<Tensor> {
    let data: Vec<f32> = (0..seq_len)
        .flat_map(|i| (0..seq_len).map(move |j| if j > i { f32::MIN } else { 0.0 }))
        .collect();
    Tensor::from_vec(data, (seq_len, seq_len), device)
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

/// A1111's "Original" emphasis (`modules/sd_emphasis.py`, `EmphasisOriginal`), per chunk:
/// `z * w[..., None]`, then rescaled so the chunk's mean equals its mean before weighting.
/// `z`: `[C, T, D]`; `weights`: `[C, T]`. Computed in f32, returned in `z`'s dtype.
/// With all weights 1.0 the result is `z` exactly.
pub fn apply_emphasis_original(z: &Tensor, weights: &Tensor) -> Result<Tensor> {
    let (c, t, _) = z.dims3()?;
    if weights.dims() != [c, t] {
        return Err(Error::invalid_argument(format!(
            "emphasis weights {:?} do not match hidden states {:?}",
            weights.dims(),
            z.dims()
        )));
    }
    let dtype = z.dtype();
    let z = z.to_dtype(DType::F32)?;
    let w = weights
        .to_device(z.device())?
        .to_dtype(DType::F32)?
        .unsqueeze(2)?;
    // Mean of row means: a two-level sum, close to torch's pairwise `mean()` in f32.
    let chunk_mean = |x: &Tensor| x.mean_keepdim(2)?.mean_keepdim(1);
    let original_mean = chunk_mean(&z)?;
    let weighted = z.broadcast_mul(&w)?;
    let new_mean = chunk_mean(&weighted)?;
    Ok(weighted
        .broadcast_mul(&(original_mean / new_mean)?)?
        .to_dtype(dtype)?)
}

/// SDXL's text conditioning: CLIP-L and OpenCLIP bigG side by side.
#[derive(Debug, Clone)]
pub struct SdxlTextEncoders {
    pub clip_l: ClipTextModel,
    pub clip_g: ClipTextModelWithProjection,
}

impl SdxlTextEncoders {
    pub fn new(clip_l: ClipTextModel, clip_g: ClipTextModelWithProjection) -> Self {
        Self { clip_l, clip_g }
    }

    /// `vb_l`: the `text_encoder` weights; `vb_g`: the `text_encoder_2` weights.
    pub fn load(
        vb_l: VarBuilder,
        config_l: &ClipTextConfig,
        vb_g: VarBuilder,
        config_g: &ClipTextConfig,
    ) -> Result<Self> {
        Ok(Self {
            clip_l: ClipTextModel::load(vb_l, config_l).map_err(|e| e.context("text_encoder"))?,
            clip_g: ClipTextModelWithProjection::load(vb_g, config_g)
                .map_err(|e| e.context("text_encoder_2"))?,
        })
    }

    /// Encodes one prompt given as `C` token windows per encoder (`ids_*`: `[C, T]` u32, normally
    /// `T = 77`; `weights_*`: `[C, T]` f32 A1111 multipliers). Each chunk is encoded on its own,
    /// each encoder's penultimate states get A1111's Original emphasis per chunk, features are
    /// concatenated (768 + 1280) and chunks follow each other along the sequence.
    ///
    /// Returns `(hidden [1, C*T, H_l + H_g], pooled [1, projection_dim])`; `pooled` is bigG's
    /// projected pooled output of the *first* chunk (as A1111 does). With one chunk and unit
    /// weights this is diffusers' `encode_prompt` (`prompt_embeds`, `pooled_prompt_embeds`).
    /// Outputs are in the encoders' dtype on their device.
    pub fn encode(
        &self,
        ids_l: &Tensor,
        weights_l: &Tensor,
        ids_g: &Tensor,
        weights_g: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let (c, t) = ids_l.dims2().map_err(|_| {
            Error::invalid_argument(format!(
                "ids_l must be [chunks, seq], got {:?}",
                ids_l.dims()
            ))
        })?;
        for (name, x) in [
            ("weights_l", weights_l),
            ("ids_g", ids_g),
            ("weights_g", weights_g),
        ] {
            if x.dims() != [c, t] {
                return Err(Error::invalid_argument(format!(
                    "{name} is {:?}, expected [{c}, {t}]",
                    x.dims()
                )));
            }
        }
        if c == 0 {
            return Err(Error::invalid_argument("a prompt needs at least one chunk"));
        }
        let out_l = self.clip_l.forward(ids_l)?;
        let out_g = self.clip_g.forward(ids_g)?;
        let z_l = apply_emphasis_original(out_l.penultimate(), weights_l)?;
        let z_g = apply_emphasis_original(out_g.penultimate(), weights_g)?;
        let z_g = z_g.to_device(z_l.device())?.to_dtype(z_l.dtype())?;
        let hidden = Tensor::cat(&[&z_l, &z_g], D::Minus1)?;
        let width = hidden.dim(D::Minus1)?;
        let hidden = hidden.reshape((1, c * t, width))?;
        let pooled = out_g
            .text_embeds
            .expect("projection model sets text_embeds")
            .narrow(0, 0, 1)?;
        Ok((hidden, pooled))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::testing::{assert_close, load_fixture, tiny_model};

    const STAGE: &str = "sdxl_text";
    const TOL: f32 = 1e-4;

    fn vb(sub: &str, dtype: DType) -> VarBuilder<'static> {
        let path = tiny_model(&format!("sdxl/{sub}/model.fp16.safetensors"));
        // SAFETY: the fixture files are not modified while the test runs.
        unsafe { VarBuilder::from_mmaped_safetensors(&[path], dtype, &Device::Cpu).unwrap() }
    }

    fn config(sub: &str) -> ClipTextConfig {
        ClipTextConfig::from_json_file(tiny_model(&format!("sdxl/{sub}/config.json"))).unwrap()
    }

    fn clip_l() -> ClipTextModel {
        ClipTextModel::load(vb("text_encoder", DType::F32), &config("text_encoder")).unwrap()
    }

    fn clip_g() -> ClipTextModelWithProjection {
        ClipTextModelWithProjection::load(
            vb("text_encoder_2", DType::F32),
            &config("text_encoder_2"),
        )
        .unwrap()
    }

    fn ids(t: &Tensor) -> Tensor {
        t.to_dtype(DType::U32).unwrap()
    }

    fn check_output(what: &str, out: &ClipTextOutput, f: &HashMap<String, Tensor>) {
        assert_close(
            &format!("{what} penultimate"),
            out.penultimate(),
            &f["penultimate"],
            TOL,
        );
        assert_close(
            &format!("{what} last_hidden_state"),
            &out.last_hidden_state,
            &f["last_hidden_state"],
            TOL,
        );
        assert_close(&format!("{what} pooled"), &out.pooled, &f["pooled"], TOL);
        if let Some(e) = f.get("text_embeds") {
            assert_close(
                &format!("{what} text_embeds"),
                out.text_embeds.as_ref().unwrap(),
                e,
                TOL,
            );
        }
    }

    #[test]
    fn tiny_configs_parse() {
        let l = config("text_encoder");
        assert_eq!(
            (l.hidden_size, l.num_hidden_layers, l.num_attention_heads),
            (16, 3, 2)
        );
        assert_eq!(
            (l.hidden_act, l.eos_token_id, l.layer_norm_eps),
            (ClipActivation::QuickGelu, 2, 1e-5)
        );
        let g = config("text_encoder_2");
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

    #[test]
    fn clip_l_matches_transformers() {
        let f = load_fixture(STAGE, "clip_l_batch.safetensors");
        let out = clip_l().forward(&ids(&f["input_ids"])).unwrap();
        assert_eq!(out.hidden_states.len(), 4);
        check_output("clip_l", &out, &f);
    }

    #[test]
    fn clip_g_matches_transformers() {
        let f = load_fixture(STAGE, "clip_g_batch.safetensors");
        let out = clip_g().forward(&ids(&f["input_ids"])).unwrap();
        check_output("clip_g", &out, &f);
    }

    #[test]
    fn first_eos_pooling_for_new_configs() {
        let f = load_fixture(STAGE, "clip_g_eos49407.safetensors");
        let mut cfg = config("text_encoder_2");
        cfg.eos_token_id = 49407;
        let model =
            ClipTextModelWithProjection::load(vb("text_encoder_2", DType::F32), &cfg).unwrap();
        let out = model.forward(&ids(&f["input_ids"])).unwrap();
        assert_close("pooled (first eos)", &out.pooled, &f["pooled"], TOL);
        assert_close(
            "text_embeds (first eos)",
            out.text_embeds.as_ref().unwrap(),
            &f["text_embeds"],
            TOL,
        );
    }

    #[test]
    fn legacy_text_model_prefix_loads_identically() {
        // The published SDXL repos name CLIP-L's tensors `text_model.…` (transformers 4).
        let path = tiny_model("sdxl/text_encoder/model.fp16.safetensors");
        let tensors: HashMap<String, Tensor> = candle_core::safetensors::load(path, &Device::Cpu)
            .unwrap()
            .into_iter()
            .map(|(k, v)| (format!("text_model.{k}"), v))
            .collect();
        let prefixed = VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
        let model = ClipTextModel::load(prefixed, &config("text_encoder")).unwrap();
        let f = load_fixture(STAGE, "clip_l_batch.safetensors");
        check_output(
            "clip_l (text_model. prefix)",
            &model.forward(&ids(&f["input_ids"])).unwrap(),
            &f,
        );
    }

    #[test]
    fn f16_weights_run_close() {
        let f = load_fixture(STAGE, "clip_g_batch.safetensors");
        let model = ClipTextModelWithProjection::load(
            vb("text_encoder_2", DType::F16),
            &config("text_encoder_2"),
        )
        .unwrap();
        let out = model.forward(&ids(&f["input_ids"])).unwrap();
        assert_eq!(out.penultimate().dtype(), DType::F16);
        assert_close(
            "clip_g f16 penultimate",
            out.penultimate(),
            &f["penultimate"],
            2e-2,
        );
        assert_close(
            "clip_g f16 text_embeds",
            out.text_embeds.as_ref().unwrap(),
            &f["text_embeds"],
            2e-2,
        );
    }

    #[test]
    fn a1111_emphasis_two_chunks() {
        let f = load_fixture(STAGE, "a1111_two_chunks.safetensors");
        let enc = SdxlTextEncoders::new(clip_l(), clip_g());
        let (hidden, pooled) = enc
            .encode(
                &ids(&f["ids_l"]),
                &f["weights_l"],
                &ids(&f["ids_g"]),
                &f["weights_g"],
            )
            .unwrap();
        assert_eq!(hidden.dims(), [1, 154, 32]);
        assert_close("a1111 hidden", &hidden, &f["hidden"], TOL);
        assert_close("a1111 pooled", &pooled, &f["pooled"], TOL);
    }

    #[test]
    fn unit_weights_equal_diffusers_encode_prompt() {
        let f = load_fixture(STAGE, "diffusers_encode_prompt.safetensors");
        let enc = SdxlTextEncoders::load(
            vb("text_encoder", DType::F32),
            &config("text_encoder"),
            vb("text_encoder_2", DType::F32),
            &config("text_encoder_2"),
        )
        .unwrap();
        let ones = Tensor::ones((1, 77), DType::F32, &Device::Cpu).unwrap();
        for (prefix, embeds, pooled) in [
            ("", "prompt_embeds", "pooled_prompt_embeds"),
            (
                "neg_",
                "negative_prompt_embeds",
                "negative_pooled_prompt_embeds",
            ),
        ] {
            let (h, p) = enc
                .encode(
                    &ids(&f[&format!("{prefix}ids_l")]),
                    &ones,
                    &ids(&f[&format!("{prefix}ids_g")]),
                    &ones,
                )
                .unwrap();
            assert_close(embeds, &h, &f[embeds], TOL);
            assert_close(pooled, &p, &f[pooled], TOL);
            // Unit weights leave the penultimate states bit-identical.
            let raw = enc
                .clip_l
                .forward(&ids(&f[&format!("{prefix}ids_l")]))
                .unwrap();
            let diff = (h.narrow(2, 0, 16).unwrap().squeeze(0).unwrap()
                - raw.penultimate().squeeze(0).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
            assert_eq!(diff, 0.0);
        }
    }

    #[test]
    fn bad_inputs_are_invalid_arguments() {
        let enc = SdxlTextEncoders::new(clip_l(), clip_g());
        let ids = Tensor::zeros((1, 77), DType::U32, &Device::Cpu).unwrap();
        let w = Tensor::ones((1, 76), DType::F32, &Device::Cpu).unwrap();
        let e = enc.encode(&ids, &w, &ids, &w).unwrap_err();
        assert_eq!(e.code, crate::ErrorCode::InvalidArgument);
        let too_long = Tensor::zeros((1, 78), DType::U32, &Device::Cpu).unwrap();
        assert_eq!(
            enc.clip_l.forward(&too_long).unwrap_err().code,
            crate::ErrorCode::InvalidArgument
        );
        let oov = Tensor::full(49408u32, (1, 3), &Device::Cpu).unwrap();
        assert_eq!(
            enc.clip_l.forward(&oov).unwrap_err().code,
            crate::ErrorCode::InvalidArgument
        );
    }
}
