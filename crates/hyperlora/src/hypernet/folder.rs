//! The released HyperLoRA model folder (docs/hyperlora-model.md §2) and its validation.
//!
//! ```text
//! sdxl_hyper_id_lora_v1_fidelity/
//!   hyper_lora_modules.json          {kohya module name: {"hidden_size", "cross_attention_dim"}}, ordered
//!   hyper_lora_modules.safetensors   {i}.{to_q|to_k|to_v|to_out}.{id|base}_{down|up}_basis
//!   resampler.safetensors            perceiver resampler (one or two conditions)
//!   id_projector.safetensors         0.weight, 0.bias (Linear), 2.weight, 2.bias (LayerNorm)
//!   base_resampler.safetensors       optional, one condition
//!   hyper_lora_config.json           optional, ours (see [`HyperLoraConfigFile`])
//! ```
//!
//! Every size the tensors carry is read from their shapes: resampler width, depth, FF width,
//! attention inner width, number of latents, condition width, hyper_dim, LoRA rank, number of
//! ID tokens, ArcFace width. The only split the shapes cannot tell is the attention inner width
//! into `heads × dim_head`: it defaults to the released `dim_head = 64` and can be set in
//! `hyper_lora_config.json`. Any mismatch is `BAD_WEIGHTS` naming the file, the tensor and both
//! shapes.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;

use crate::lora::format::read_safetensors;
use crate::{Error, Result};

pub const MODULES_JSON: &str = "hyper_lora_modules.json";
pub const MODULES_FILE: &str = "hyper_lora_modules.safetensors";
pub const RESAMPLER_FILE: &str = "resampler.safetensors";
pub const BASE_RESAMPLER_FILE: &str = "base_resampler.safetensors";
pub const ID_PROJECTOR_FILE: &str = "id_projector.safetensors";
pub const CONFIG_FILE: &str = "hyper_lora_config.json";

/// The released models' `dim_head` (heads 12 × 64 = 768 inner width at dim 1024).
pub const DEFAULT_DIM_HEAD: usize = 64;

/// The four attention projections each module's LoRA covers, in token order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Proj {
    Q,
    K,
    V,
    Out,
}

impl Proj {
    pub const ALL: [Proj; 4] = [Proj::Q, Proj::K, Proj::V, Proj::Out];

    /// The name inside `hyper_lora_modules.safetensors` (`to_q` … `to_out`).
    pub fn file_name(self) -> &'static str {
        match self {
            Proj::Q => "to_q",
            Proj::K => "to_k",
            Proj::V => "to_v",
            Proj::Out => "to_out",
        }
    }

    /// The kohya module suffix (`to_q` … `to_out_0`).
    pub fn kohya_suffix(self) -> &'static str {
        match self {
            Proj::Q => "to_q",
            Proj::K => "to_k",
            Proj::V => "to_v",
            Proj::Out => "to_out_0",
        }
    }
}

/// One entry of `hyper_lora_modules.json`: an SDXL attention block the LoRA targets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleInfo {
    /// Kohya module name, e.g. `lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1`.
    pub name: String,
    pub hidden_size: usize,
    /// `None` for self-attention (`attn1`).
    pub cross_attention_dim: Option<usize>,
}

impl ModuleInfo {
    /// `(in_features, out_features)` of a projection: `to_k`/`to_v` read the cross-attention
    /// context (or the hidden states), everything writes `hidden_size`.
    pub fn in_out(&self, proj: Proj) -> (usize, usize) {
        let h = self.hidden_size;
        match proj {
            Proj::Q | Proj::Out => (h, h),
            Proj::K | Proj::V => (self.cross_attention_dim.unwrap_or(h), h),
        }
    }
}

/// Parses `hyper_lora_modules.json`, keeping the document's key order (the i-th key is
/// module i). Errors are `BAD_WEIGHTS` naming the key.
pub fn parse_modules_json(text: &str) -> Result<Vec<ModuleInfo>> {
    struct Ordered(Vec<(String, serde_json::Value)>);
    impl<'de> Deserialize<'de> for Ordered {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
            struct V;
            impl<'de> serde::de::Visitor<'de> for V {
                type Value = Ordered;
                fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                    f.write_str("a JSON object")
                }
                fn visit_map<A: serde::de::MapAccess<'de>>(
                    self,
                    mut map: A,
                ) -> std::result::Result<Ordered, A::Error> {
                    let mut out = Vec::new();
                    while let Some((k, v)) = map.next_entry::<String, serde_json::Value>()? {
                        out.push((k, v));
                    }
                    Ok(Ordered(out))
                }
            }
            d.deserialize_map(V)
        }
    }
    let Ordered(entries) = serde_json::from_str(text)
        .map_err(|e| Error::bad_weights(format!("not a JSON object of modules: {e}")))?;
    if entries.is_empty() {
        return Err(Error::bad_weights("lists no modules"));
    }
    let mut seen = BTreeSet::new();
    let mut out = Vec::with_capacity(entries.len());
    for (name, v) in entries {
        if !seen.insert(name.clone()) {
            return Err(Error::bad_weights(format!("module {name} is listed twice")));
        }
        let field = |k: &str| -> Result<Option<usize>> {
            match v.get(k) {
                None | Some(serde_json::Value::Null) => Ok(None),
                Some(x) => match x.as_u64() {
                    Some(n) if n > 0 => Ok(Some(n as usize)),
                    _ => Err(Error::bad_weights(format!(
                        "module {name}: {k} must be a positive integer or null, got {x}"
                    ))),
                },
            }
        };
        if !v.is_object() {
            return Err(Error::bad_weights(format!(
                "module {name}: expected {{\"hidden_size\", \"cross_attention_dim\"}}, got {v}"
            )));
        }
        let hidden_size = field("hidden_size")?
            .ok_or_else(|| Error::bad_weights(format!("module {name}: no hidden_size")))?;
        let cross_attention_dim = field("cross_attention_dim")?;
        out.push(ModuleInfo {
            name,
            hidden_size,
            cross_attention_dim,
        });
    }
    Ok(out)
}

/// Resampler overrides of [`HyperLoraConfigFile`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResamplerConfigFile {
    pub dim: Option<usize>,
    pub dim_head: Option<usize>,
    pub heads: Option<usize>,
    pub depth: Option<usize>,
    pub ff_mult: Option<usize>,
}

/// `hyper_lora_config.json`, our optional file beside the released ones. It mirrors the
/// HyperLoRA ComfyUI config node; every field is optional. Only `resampler.dim_head` /
/// `resampler.heads` add information (how the attention width splits into heads, default
/// `dim_head = 64`); every other field is checked against the tensor shapes.
///
/// ```json
/// {
///   "resampler": { "dim": 1024, "dim_head": 64, "heads": 12, "depth": 4, "ff_mult": 4 },
///   "encoder_types": ["clip", "arcface"],
///   "id_embed_dim": 512, "num_id_tokens": 16, "hyper_dim": 128, "lora_rank": 8,
///   "has_base_lora": false
/// }
/// ```
/// `encoder_types` chooses the condition of a one-condition resampler (`["clip"]` or
/// `["arcface"]`; default: ArcFace when `id_projector.safetensors` exists, else CLIP);
/// a two-condition resampler is always ArcFace tokens then CLIP tokens. `has_base_lora`
/// (default: whether `base_resampler.safetensors` exists) requires or ignores the Base-LoRA.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HyperLoraConfigFile {
    pub resampler: Option<ResamplerConfigFile>,
    pub encoder_types: Option<Vec<String>>,
    pub id_embed_dim: Option<usize>,
    pub num_id_tokens: Option<usize>,
    pub hyper_dim: Option<usize>,
    pub lora_rank: Option<usize>,
    pub has_base_lora: Option<bool>,
}

impl HyperLoraConfigFile {
    pub fn from_json(text: &str) -> Result<Self> {
        serde_json::from_str(text)
            .map_err(|e| Error::invalid_argument(format!("{CONFIG_FILE}: {e}")))
    }
}

/// The shape of one resampler, as read from its file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResamplerShape {
    /// Latent width.
    pub dim: usize,
    pub depth: usize,
    pub heads: usize,
    pub dim_head: usize,
    /// `ff.net.0.proj` output width (`ff_mult × dim`).
    pub ff_inner: usize,
    /// Number of latents (`8 × modules`).
    pub num_queries: usize,
    /// Width of the condition tokens (`proj_in` input).
    pub embedding_dim: usize,
    /// `proj_out` width.
    pub output_dim: usize,
    /// `proj_in_2` / `attn3` present.
    pub two_conditions: bool,
}

impl ResamplerShape {
    pub fn inner_dim(&self) -> usize {
        self.heads * self.dim_head
    }
}

/// Which encoder feeds which resampler input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdConditioning {
    /// ArcFace tokens (through the ID projector) → `proj_in`, CLIP tokens → `proj_in_2`:
    /// the released models ("clip + arcface").
    ArcfaceAndClip,
    /// ArcFace tokens only.
    Arcface,
    /// CLIP tokens only.
    Clip,
}

impl IdConditioning {
    pub fn uses_arcface(self) -> bool {
        !matches!(self, Self::Clip)
    }
    pub fn uses_clip(self) -> bool {
        !matches!(self, Self::Arcface)
    }
}

/// Everything resolved about a folder: what the shapes say plus the config's head split.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HyperLoraConfig {
    pub resampler: ResamplerShape,
    pub base_resampler: Option<ResamplerShape>,
    pub conditioning: IdConditioning,
    /// ArcFace embedding width (512), when ArcFace is used.
    pub id_embed_dim: Option<usize>,
    /// Tokens the ID projector makes from one embedding (16 released).
    pub num_id_tokens: Option<usize>,
    /// Coefficients per LoRA matrix (`proj_out` width; 128 released).
    pub hyper_dim: usize,
    /// ID-LoRA rank (8 released); the Base-LoRA has `lora_rank / 2`.
    pub lora_rank: usize,
    pub num_modules: usize,
}

/// The validated contents of a folder, ready to build the networks from.
pub(crate) struct FolderWeights {
    pub config: HyperLoraConfig,
    pub modules: Vec<ModuleInfo>,
    pub resampler: VarBuilder<'static>,
    pub base_resampler: Option<VarBuilder<'static>>,
    pub id_projector: Option<VarBuilder<'static>>,
    /// `{i}.{proj}.{id|base}_{down|up}_basis`, converted to the requested dtype.
    pub bases: HashMap<String, Tensor>,
}

fn shape_str(s: &[usize]) -> String {
    format!("{s:?}")
}

/// One safetensors file of the folder, checked tensor by tensor.
struct TensorFile {
    label: &'static str,
    path: PathBuf,
    tensors: HashMap<String, Tensor>,
    taken: HashMap<String, Tensor>,
    dtype: DType,
    device: Device,
}

impl TensorFile {
    fn open(dir: &Path, label: &'static str, dtype: DType, device: &Device) -> Result<Self> {
        let path = dir.join(label);
        if !path.is_file() {
            return Err(Error::bad_weights(format!(
                "{}: the HyperLoRA folder has no {label}",
                dir.display()
            )));
        }
        let (list, _) = read_safetensors(&path, device).map_err(|e| {
            // A present but unreadable file is a bad model file.
            Error::bad_weights(e.message)
        })?;
        for (k, t) in &list {
            if !t.dtype().is_float() {
                return Err(Error::bad_weights(format!(
                    "{label}: tensor {k} has dtype {:?}, expected a float type",
                    t.dtype()
                )));
            }
        }
        Ok(Self {
            label,
            path,
            tensors: list.into_iter().collect(),
            taken: HashMap::new(),
            dtype,
            device: device.clone(),
        })
    }

    fn err(&self, msg: String) -> Error {
        Error::bad_weights(format!("{} ({}): {msg}", self.label, self.path.display()))
    }

    fn shape(&self, key: &str) -> Option<Vec<usize>> {
        self.tensors
            .get(key)
            .or_else(|| self.taken.get(key))
            .map(|t| t.dims().to_vec())
    }

    fn require_shape(&self, key: &str, what: &str) -> Result<Vec<usize>> {
        self.shape(key)
            .ok_or_else(|| self.err(format!("tensor {key} ({what}) is missing")))
    }

    fn has(&self, key: &str) -> bool {
        self.tensors.contains_key(key) || self.taken.contains_key(key)
    }

    /// Takes `key`, checking its shape, converted to the requested dtype.
    fn take(&mut self, key: &str, shape: &[usize], why: &str) -> Result<Tensor> {
        let Some(t) = self.tensors.remove(key) else {
            return Err(if self.taken.contains_key(key) {
                self.err(format!("tensor {key} requested twice"))
            } else {
                self.err(format!(
                    "tensor {key} is missing (expected shape {}{why})",
                    shape_str(shape)
                ))
            });
        };
        if t.dims() != shape {
            return Err(self.err(format!(
                "tensor {key} has shape {}, expected {}{why}",
                shape_str(t.dims()),
                shape_str(shape)
            )));
        }
        let t = t.to_dtype(self.dtype)?;
        self.taken.insert(key.to_string(), t.clone());
        Ok(t)
    }

    /// Fails on tensors nobody asked for (as PyTorch's strict `load_state_dict`).
    fn finish(self, hint: &str) -> Result<HashMap<String, Tensor>> {
        if !self.tensors.is_empty() {
            let mut extra: Vec<&String> = self.tensors.keys().collect();
            extra.sort();
            let n = extra.len();
            let shown: Vec<String> = extra
                .iter()
                .take(5)
                .map(|k| format!("{k} {}", shape_str(self.tensors[*k].dims())))
                .collect();
            return Err(self.err(format!(
                "{n} unexpected tensor{} ({}{}){hint}",
                if n == 1 { "" } else { "s" },
                shown.join(", "),
                if n > 5 { ", …" } else { "" }
            )));
        }
        Ok(self.taken)
    }

    fn into_var_builder(self, hint: &str) -> Result<VarBuilder<'static>> {
        let (dtype, device) = (self.dtype, self.device.clone());
        Ok(VarBuilder::from_tensors(self.finish(hint)?, dtype, &device))
    }
}

/// Reads a resampler's shape from its tensors (no data checked yet).
fn infer_resampler(
    f: &TensorFile,
    rc: &ResamplerConfigFile,
    num_modules: usize,
) -> Result<ResamplerShape> {
    let lat = f.require_shape("latents", "learned queries [1, 8 × modules, dim]")?;
    if lat.len() != 3 || lat[0] != 1 {
        return Err(f.err(format!(
            "tensor latents has shape {}, expected [1, queries, dim]",
            shape_str(&lat)
        )));
    }
    let (num_queries, dim) = (lat[1], lat[2]);
    if num_queries != 8 * num_modules {
        return Err(f.err(format!(
            "tensor latents has shape {}: {num_queries} queries, but {MODULES_JSON} lists {num_modules} modules, which need {} (8 per module)",
            shape_str(&lat),
            8 * num_modules
        )));
    }
    let matrix = |key: &str, what: &str| -> Result<(usize, usize)> {
        let s = f.require_shape(key, what)?;
        if s.len() != 2 {
            return Err(f.err(format!(
                "tensor {key} has shape {}, expected a matrix",
                shape_str(&s)
            )));
        }
        Ok((s[0], s[1]))
    };
    let (_, embedding_dim) = matrix("proj_in.weight", "condition projection")?;
    let (output_dim, _) = matrix("proj_out.weight", "output projection [hyper_dim, dim]")?;
    let two_conditions = f.has("proj_in_2.weight");
    let mut depth = 0;
    for k in f.tensors.keys() {
        if let Some(rest) = k.strip_prefix("layers.") {
            if let Some(l) = rest.split('.').next().and_then(|s| s.parse::<usize>().ok()) {
                depth = depth.max(l + 1);
            }
        }
    }
    if depth == 0 {
        return Err(f.err("has no layers.0.* tensors (resampler depth 0)".into()));
    }
    let (inner, _) = matrix("layers.0.attn1.to_q.weight", "attention query")?;
    let (ff_inner, _) = matrix("layers.0.ff.net.0.proj.weight", "feed-forward input")?;
    let check = |name: &str, given: Option<usize>, found: usize, source: &str| -> Result<()> {
        match given {
            Some(g) if g != found => Err(f.err(format!(
                "{CONFIG_FILE} says resampler.{name} = {g}, but {source} gives {found}"
            ))),
            _ => Ok(()),
        }
    };
    check("dim", rc.dim, dim, "tensor latents")?;
    check("depth", rc.depth, depth, "the layers.* tensors")?;
    if let Some(m) = rc.ff_mult {
        if m.checked_mul(dim) != Some(ff_inner) {
            return Err(f.err(format!(
                "{CONFIG_FILE} says resampler.ff_mult = {m}, but tensor layers.0.ff.net.0.proj.weight has {ff_inner} rows for dim {dim}"
            )));
        }
    }
    let (heads, dim_head) = match (rc.heads, rc.dim_head) {
        (Some(h), Some(d)) if h.checked_mul(d) == Some(inner) => (h, d),
        (Some(h), Some(d)) => {
            return Err(f.err(format!(
                "{CONFIG_FILE} says resampler.heads × dim_head = {h} × {d}, but tensor layers.0.attn1.to_q.weight has {inner} rows"
            )))
        }
        (Some(h), None) if h > 0 && inner.is_multiple_of(h) => (h, inner / h),
        (None, Some(d)) if d > 0 && inner.is_multiple_of(d) => (inner / d, d),
        (None, None) if inner.is_multiple_of(DEFAULT_DIM_HEAD) => {
            (inner / DEFAULT_DIM_HEAD, DEFAULT_DIM_HEAD)
        }
        _ => {
            return Err(f.err(format!(
                "the attention inner width {inner} (tensor layers.0.attn1.to_q.weight) does not split into heads of {}; set resampler.heads / resampler.dim_head in {CONFIG_FILE}",
                rc.dim_head.unwrap_or(DEFAULT_DIM_HEAD)
            )))
        }
    };
    Ok(ResamplerShape {
        dim,
        depth,
        heads,
        dim_head,
        ff_inner,
        num_queries,
        embedding_dim,
        output_dim,
        two_conditions,
    })
}

/// Checks every resampler tensor against `s` and returns them as a VarBuilder.
fn validate_resampler(mut f: TensorFile, s: &ResamplerShape) -> Result<VarBuilder<'static>> {
    let (d, e, inner) = (s.dim, s.embedding_dim, s.inner_dim());
    let why = |w: &str| format!(" ({w})");
    f.take("latents", &[1, s.num_queries, d], &why("queries, dim"))?;
    f.take("proj_in.weight", &[d, e], &why("dim, condition width"))?;
    f.take("proj_in.bias", &[d], "")?;
    if s.two_conditions {
        f.take("proj_in_2.weight", &[d, e], &why("dim, condition width"))?;
        f.take("proj_in_2.bias", &[d], "")?;
    }
    f.take(
        "proj_out.weight",
        &[s.output_dim, d],
        &why("hyper_dim, dim"),
    )?;
    f.take("proj_out.bias", &[s.output_dim], "")?;
    let mut norms = vec!["norm_attn1", "norm_attn2_l", "norm_attn2_x", "norm_ff"];
    let mut attns = vec!["attn1", "attn2"];
    if s.two_conditions {
        norms.extend(["norm_attn3_l", "norm_attn3_y"]);
        attns.push("attn3");
    }
    for l in 0..s.depth {
        for n in &norms {
            f.take(&format!("layers.{l}.{n}.weight"), &[d], "")?;
            f.take(&format!("layers.{l}.{n}.bias"), &[d], "")?;
        }
        let hd = why(&format!(
            "heads × dim_head = {} × {}, dim",
            s.heads, s.dim_head
        ));
        for a in &attns {
            for p in ["to_q", "to_k", "to_v"] {
                f.take(&format!("layers.{l}.{a}.{p}.weight"), &[inner, d], &hd)?;
            }
            f.take(&format!("layers.{l}.{a}.to_out.0.weight"), &[d, inner], "")?;
        }
        f.take(
            &format!("layers.{l}.ff.net.0.proj.weight"),
            &[s.ff_inner, d],
            "",
        )?;
        f.take(&format!("layers.{l}.ff.net.0.proj.bias"), &[s.ff_inner], "")?;
        f.take(&format!("layers.{l}.ff.net.2.weight"), &[d, s.ff_inner], "")?;
        f.take(&format!("layers.{l}.ff.net.2.bias"), &[d], "")?;
    }
    let hint = if s.two_conditions {
        ""
    } else {
        " — a one-condition resampler has no attn3 / norm_attn3_*"
    };
    f.into_var_builder(hint)
}

/// Reads and validates a HyperLoRA folder, converting every tensor to `dtype` on `device`.
pub(crate) fn load_folder(dir: &Path, dtype: DType, device: &Device) -> Result<FolderWeights> {
    if !dir.is_dir() {
        return Err(Error::model_not_found(format!(
            "HyperLoRA model folder {} does not exist",
            dir.display()
        )));
    }
    if !dtype.is_float() {
        return Err(Error::invalid_argument(format!(
            "HyperLoRA dtype must be a float type, got {dtype:?}"
        )));
    }
    let config_path = dir.join(CONFIG_FILE);
    let cfg = if config_path.is_file() {
        let text = std::fs::read_to_string(&config_path)
            .map_err(|e| Error::from(e).context(config_path.display()))?;
        HyperLoraConfigFile::from_json(&text).map_err(|e| e.context(dir.display()))?
    } else {
        HyperLoraConfigFile::default()
    };
    let rc = cfg.resampler.clone().unwrap_or_default();

    let json_path = dir.join(MODULES_JSON);
    if !json_path.is_file() {
        return Err(Error::bad_weights(format!(
            "{}: the HyperLoRA folder has no {MODULES_JSON}",
            dir.display()
        )));
    }
    let text = std::fs::read_to_string(&json_path)
        .map_err(|e| Error::bad_weights(format!("{}: {e}", json_path.display())))?;
    let modules = parse_modules_json(&text)
        .map_err(|e| e.context(format!("{MODULES_JSON} ({})", json_path.display())))?;
    let num_modules = modules.len();

    // The ID resampler.
    let res_file = TensorFile::open(dir, RESAMPLER_FILE, dtype, device)?;
    let resampler = infer_resampler(&res_file, &rc, num_modules)?;
    let hyper_dim = resampler.output_dim;
    if let Some(h) = cfg.hyper_dim {
        if h != hyper_dim {
            return Err(res_file.err(format!(
                "{CONFIG_FILE} says hyper_dim = {h}, but tensor proj_out.weight gives {hyper_dim}"
            )));
        }
    }
    let has_projector_file = dir.join(ID_PROJECTOR_FILE).is_file();
    let conditioning = if resampler.two_conditions {
        if let Some(t) = &cfg.encoder_types {
            if t.len() != 2 {
                return Err(res_file.err(format!(
                    "has proj_in_2 (two conditions) but {CONFIG_FILE} lists encoder_types {t:?}"
                )));
            }
        }
        IdConditioning::ArcfaceAndClip
    } else {
        match cfg.encoder_types.as_deref() {
            Some([one]) if one == "clip" => IdConditioning::Clip,
            Some([one]) if one == "arcface" => IdConditioning::Arcface,
            Some(t) => {
                return Err(res_file.err(format!(
                    "has one condition (no proj_in_2) but {CONFIG_FILE} lists encoder_types {t:?} (expected [\"clip\"] or [\"arcface\"])"
                )))
            }
            None if has_projector_file => IdConditioning::Arcface,
            None => IdConditioning::Clip,
        }
    };
    let resampler_vb = validate_resampler(res_file, &resampler)?;

    // The ID projector: ArcFace embedding → num_id_tokens tokens of the condition width.
    let (id_projector, id_embed_dim, num_id_tokens) = if conditioning.uses_arcface() {
        let mut f = TensorFile::open(dir, ID_PROJECTOR_FILE, dtype, device)?;
        let e = resampler.embedding_dim;
        let w = f.require_shape("0.weight", "Linear(id_embed_dim → tokens × width)")?;
        if w.len() != 2 || w[0] == 0 || !w[0].is_multiple_of(e) {
            return Err(f.err(format!(
                "tensor 0.weight has shape {}, expected [num_id_tokens × {e}, id_embed_dim] ({e} = the width of {RESAMPLER_FILE} proj_in)",
                shape_str(&w)
            )));
        }
        let (tokens, id_dim) = (w[0] / e, w[1]);
        for (name, given, found) in [
            ("num_id_tokens", cfg.num_id_tokens, tokens),
            ("id_embed_dim", cfg.id_embed_dim, id_dim),
        ] {
            if let Some(g) = given {
                if g != found {
                    return Err(f.err(format!(
                        "{CONFIG_FILE} says {name} = {g}, but tensor 0.weight {} gives {found}",
                        shape_str(&w)
                    )));
                }
            }
        }
        f.take("0.weight", &[tokens * e, id_dim], "")?;
        f.take("0.bias", &[tokens * e], "")?;
        let why = format!(" (LayerNorm over the {e}-wide tokens)");
        f.take("2.weight", &[e], &why)?;
        f.take("2.bias", &[e], &why)?;
        (Some(f.into_var_builder("")?), Some(id_dim), Some(tokens))
    } else {
        (None, None, None)
    };

    // The Base-LoRA resampler.
    let has_base = cfg
        .has_base_lora
        .unwrap_or_else(|| dir.join(BASE_RESAMPLER_FILE).is_file());
    let (base_resampler, base_vb) = if has_base {
        let f = TensorFile::open(dir, BASE_RESAMPLER_FILE, dtype, device)?;
        // Same head split as the ID resampler's unless the shapes say otherwise.
        let base_rc = ResamplerConfigFile {
            dim_head: Some(rc.dim_head.unwrap_or(resampler.dim_head)),
            heads: None,
            ..rc.clone()
        };
        let s = infer_resampler(&f, &base_rc, num_modules)?;
        if s.two_conditions {
            return Err(f.err(
                "has proj_in_2, but the Base-LoRA resampler takes one condition (CLIP tokens)"
                    .into(),
            ));
        }
        if s.output_dim != hyper_dim {
            return Err(f.err(format!(
                "tensor proj_out.weight gives hyper_dim {}, but {RESAMPLER_FILE} gives {hyper_dim}",
                s.output_dim
            )));
        }
        let vb = validate_resampler(f, &s)?;
        (Some(s), Some(vb))
    } else {
        (None, None)
    };

    // The basis bank.
    let mut f = TensorFile::open(dir, MODULES_FILE, dtype, device)?;
    let rank_key = "0.to_q.id_down_basis";
    let s0 = f.require_shape(rank_key, "ID down basis of module 0")?;
    if s0.len() != 3 {
        return Err(f.err(format!(
            "tensor {rank_key} has shape {}, expected [hyper_dim, in_features, rank]",
            shape_str(&s0)
        )));
    }
    let lora_rank = s0[2];
    if let Some(r) = cfg.lora_rank {
        if r != lora_rank {
            return Err(f.err(format!(
                "{CONFIG_FILE} says lora_rank = {r}, but tensor {rank_key} {} gives {lora_rank}",
                shape_str(&s0)
            )));
        }
    }
    if lora_rank == 0 || (has_base && lora_rank < 2) {
        return Err(f.err(format!(
            "tensor {rank_key} {} gives LoRA rank {lora_rank}",
            shape_str(&s0)
        )));
    }
    let mut bases = HashMap::new();
    for (i, m) in modules.iter().enumerate() {
        for p in Proj::ALL {
            let (inp, out) = m.in_out(p);
            let src = match p {
                Proj::K | Proj::V if m.cross_attention_dim.is_some() => "cross_attention_dim",
                _ => "hidden_size",
            };
            let why = format!(
                " = [hyper_dim, in, rank] for module {i} {} (in = {src} {inp})",
                m.name
            );
            let whyu = format!(
                " = [hyper_dim, rank, out] for module {i} {} (out = hidden_size {out})",
                m.name
            );
            let mut kinds = vec![("id", lora_rank)];
            if has_base {
                kinds.push(("base", lora_rank / 2));
            }
            for (kind, r) in kinds {
                let dk = format!("{i}.{}.{kind}_down_basis", p.file_name());
                let uk = format!("{i}.{}.{kind}_up_basis", p.file_name());
                let d = f.take(&dk, &[hyper_dim, inp, r], &why)?;
                let u = f.take(&uk, &[hyper_dim, r, out], &whyu)?;
                bases.insert(dk, d);
                bases.insert(uk, u);
            }
            if !has_base {
                // Base bases of a folder used without its Base-LoRA are ignored.
                for k in ["base_down_basis", "base_up_basis"] {
                    f.tensors.remove(&format!("{i}.{}.{k}", p.file_name()));
                }
            }
        }
    }
    f.finish(&format!(" ({MODULES_JSON} lists {num_modules} modules)"))?;

    Ok(FolderWeights {
        config: HyperLoraConfig {
            resampler,
            base_resampler,
            conditioning,
            id_embed_dim,
            num_id_tokens,
            hyper_dim,
            lora_rank,
            num_modules,
        },
        modules,
        resampler: resampler_vb,
        base_resampler: base_vb,
        id_projector,
        bases,
    })
}
