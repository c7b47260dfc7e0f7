//! The CLIP transformer encoder that CLIP's text and vision towers share, as transformers 5.24
//! runs it: pre-norm layers of self-attention and an MLP ([`ClipEncoderLayer`]), with torch's
//! LayerNorm numerics, plus the reader for transformers' CLIP `config.json` files.
//!
//! The encoder takes hidden states and an optional additive mask, so the text tower (causal
//! mask) and the vision tower (no mask) load it under the same transformers weight names.

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{Linear, VarBuilder};

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
        let fused = match self {
            Self::QuickGelu => crate::cpu::gelu(x, true)?,
            Self::Gelu => crate::cpu::gelu(x, false)?,
            Self::GeluTanh => None,
        };
        if let Some(y) = fused {
            return Ok(y);
        }
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
        if crate::cpu::applies(x) && x.is_contiguous() {
            // One fused pass (the same statistics in f32).
            return candle_nn::ops::layer_norm(x, &self.weight, &self.bias, self.eps as f32);
        }
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

/// `l.forward(x)` (+ `residual`), through the CPU fast path where it applies.
fn linear(l: &Linear, x: &Tensor, residual: Option<&Tensor>) -> candle_core::Result<Tensor> {
    match (crate::cpu::linear(l, x, residual)?, residual) {
        (Some(y), _) => Ok(y),
        (None, Some(r)) => r + l.forward(x)?,
        (None, None) => l.forward(x),
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
        self.forward_residual(x, mask, None)
    }

    /// [`forward`](Self::forward) + `residual` (its output's shape), added inside `out_proj`.
    fn forward_residual(
        &self,
        x: &Tensor,
        mask: Option<&Tensor>,
        residual: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        let (b, t, c) = x.dims3()?;
        let heads = |p: &Linear| -> candle_core::Result<Tensor> {
            linear(p, x, None)?
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
        linear(&self.out_proj, &out, residual)
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

    /// `fc2(act(fc1(x)))` + `residual`, added inside `fc2`.
    pub fn forward_residual(&self, x: &Tensor, residual: &Tensor) -> candle_core::Result<Tensor> {
        let h = self.act.forward(&linear(&self.fc1, x, None)?)?;
        linear(&self.fc2, &h, Some(residual))
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
        let h = self
            .self_attn
            .forward_residual(&self.layer_norm1.forward(x)?, mask, Some(x))?;
        self.mlp
            .forward_residual(&self.layer_norm2.forward(&h)?, &h)
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
