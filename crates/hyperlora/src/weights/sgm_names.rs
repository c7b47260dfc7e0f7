//! The one name-conversion table between single-file SGM checkpoints and diffusers/transformers.
//!
//! SDXL checkpoints as distributed for RealVisXL, LEOSAM or CyberRealistic hold four models in
//! one safetensors file, each under its own prefix and in its original code base's naming:
//!
//! | component        | SGM prefix                             | naming                          |
//! |------------------|----------------------------------------|---------------------------------|
//! | `unet`           | `model.diffusion_model.`               | LDM `openaimodel.py`            |
//! | `vae`            | `first_stage_model.`                   | LDM `autoencoder.py`            |
//! | `text_encoder`   | `conditioner.embedders.0.transformer.` | transformers `CLIPTextModel`    |
//! | `text_encoder_2` | `conditioner.embedders.1.model.`       | OpenCLIP (`resblocks`, fused qkv) |
//!
//! A [`NameTable`] is a list of block rules (`SGM prefix ↔ diffusers prefix`, plus the kind of
//! block), generated from the model's structure (number of levels, layers per block, which levels
//! have attention), and, per kind of block, a fixed list of leaf rules for the names inside the
//! block. Every rule says how the stored tensor becomes the diffusers one ([`Transform`]):
//! OpenCLIP's fused `in_proj` is cut in thirds, its `text_projection` (used as `x @ P`) is
//! transposed, the LDM VAE's 1x1-conv attention weights lose their trailing unit dimensions.
//! The table is read in both directions: [`NameTable::to_sgm`] for loading by diffusers name,
//! [`NameTable::to_diffusers`] for checking that every stored tensor is accounted for and for
//! other SGM-named inputs (LoRA module names).

use std::collections::BTreeSet;

use crate::weights::diffusers::Component;
use crate::{Error, Result};

use Transform::{ConvToLinear, Identity, Third, Transpose};

/// How a stored SGM tensor becomes the diffusers tensor of the same weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transform {
    /// Same values, same shape.
    Identity,
    /// A 1x1 convolution weight `[o, i, 1, 1]` (or `[o, i, 1]`) used as a linear weight `[o, i]`;
    /// tensors without trailing unit dimensions (biases, already-linear weights) pass unchanged.
    ConvToLinear,
    /// Transposed matrix (OpenCLIP `text_projection` is applied as `x @ P`, a `Linear` holds `Pᵀ`).
    Transpose,
    /// Part `k` of 3 equal parts along dimension 0 (OpenCLIP's fused q/k/v `in_proj`).
    Third(usize),
}

impl Transform {
    /// The diffusers shape of a stored tensor of shape `stored`, or `None` when the transform
    /// does not apply to it (a non-matrix to transpose, rows not divisible by 3).
    pub fn shape(self, stored: &[usize]) -> Option<Vec<usize>> {
        match (self, stored) {
            (Identity, _) => Some(stored.to_vec()),
            (ConvToLinear, [o, i, 1, 1] | [o, i, 1]) => Some(vec![*o, *i]),
            (ConvToLinear, _) => Some(stored.to_vec()),
            (Transpose, [a, b]) => Some(vec![*b, *a]),
            (Third(k), [n, rest @ ..]) if n % 3 == 0 && k < 3 => Some([&[n / 3], rest].concat()),
            _ => None,
        }
    }
}

/// Where a diffusers tensor lives in a single-file checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SgmTensor {
    /// The full checkpoint key, component prefix included.
    pub key: String,
    pub transform: Transform,
}

/// The kinds of blocks whose inner names differ between the two namings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Inner names are the same (attention transformers, convolutions, norms, embeddings).
    Same,
    /// LDM UNet `ResBlock`.
    Resnet,
    /// LDM VAE `ResnetBlock`.
    VaeResnet,
    /// LDM VAE `AttnBlock` (1x1 convolutions).
    VaeAttention,
    /// OpenCLIP `ResidualAttentionBlock`.
    OpenClipLayer,
}

/// One leaf rule: `sgm` and `diffusers` are name prefixes inside a block, at dot boundaries.
struct Leaf {
    sgm: &'static str,
    diffusers: &'static str,
    transform: Transform,
}

const fn leaf(sgm: &'static str, diffusers: &'static str, transform: Transform) -> Leaf {
    Leaf {
        sgm,
        diffusers,
        transform,
    }
}

const RESNET: &[Leaf] = &[
    leaf("in_layers.0", "norm1", Identity),
    leaf("in_layers.2", "conv1", Identity),
    leaf("emb_layers.1", "time_emb_proj", Identity),
    leaf("out_layers.0", "norm2", Identity),
    leaf("out_layers.3", "conv2", Identity),
    leaf("skip_connection", "conv_shortcut", Identity),
];

const VAE_RESNET: &[Leaf] = &[leaf("nin_shortcut", "conv_shortcut", Identity)];

const VAE_ATTENTION: &[Leaf] = &[
    leaf("norm", "group_norm", Identity),
    leaf("q", "to_q", ConvToLinear),
    leaf("k", "to_k", ConvToLinear),
    leaf("v", "to_v", ConvToLinear),
    leaf("proj_out", "to_out.0", ConvToLinear),
];

const OPEN_CLIP_LAYER: &[Leaf] = &[
    leaf("attn.in_proj_weight", "self_attn.q_proj.weight", Third(0)),
    leaf("attn.in_proj_weight", "self_attn.k_proj.weight", Third(1)),
    leaf("attn.in_proj_weight", "self_attn.v_proj.weight", Third(2)),
    leaf("attn.in_proj_bias", "self_attn.q_proj.bias", Third(0)),
    leaf("attn.in_proj_bias", "self_attn.k_proj.bias", Third(1)),
    leaf("attn.in_proj_bias", "self_attn.v_proj.bias", Third(2)),
    leaf("attn.out_proj", "self_attn.out_proj", Identity),
    leaf("ln_1", "layer_norm1", Identity),
    leaf("ln_2", "layer_norm2", Identity),
    leaf("mlp.c_fc", "mlp.fc1", Identity),
    leaf("mlp.c_proj", "mlp.fc2", Identity),
];

fn leaves(kind: Kind) -> &'static [Leaf] {
    match kind {
        Kind::Same => &[],
        Kind::Resnet => RESNET,
        Kind::VaeResnet => VAE_RESNET,
        Kind::VaeAttention => VAE_ATTENTION,
        Kind::OpenClipLayer => OPEN_CLIP_LAYER,
    }
}

/// One block rule. `alias` rules accept another spelling of a diffusers name (transformers ≥ 5.6
/// saves `CLIPTextModel` without its `text_model.` wrapper); [`NameTable::to_diffusers`] skips them.
#[derive(Debug, Clone)]
struct Block {
    sgm: String,
    diffusers: String,
    kind: Kind,
    transform: Transform,
    alias: bool,
}

/// The rest of `name` after `prefix` at a dot boundary: `Some("")` for an exact match,
/// `Some(".x.y")` for a longer name, `None` otherwise.
fn strip<'a>(name: &'a str, prefix: &str) -> Option<&'a str> {
    let rest = name.strip_prefix(prefix)?;
    (rest.is_empty() || rest.starts_with('.')).then_some(rest)
}

/// Structure of an SDXL-family UNet, as far as names depend on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnetLayout {
    /// ResNets per down level (`layers_per_block`); up levels have one more.
    pub layers: Vec<usize>,
    /// Whether down level `l` has attention blocks (`CrossAttnDownBlock2D`).
    pub down_attention: Vec<bool>,
    /// Whether up level `u` has attention blocks (`CrossAttnUpBlock2D`), `u = 0` the lowest resolution.
    pub up_attention: Vec<bool>,
}

impl UnetLayout {
    /// stabilityai/stable-diffusion-xl-base-1.0.
    pub fn sdxl_base() -> Self {
        Self {
            layers: vec![2, 2, 2],
            down_attention: vec![false, true, true],
            up_attention: vec![true, true, false],
        }
    }

    /// From a diffusers `unet/config.json` (`down_block_types`, `up_block_types`, `layers_per_block`).
    pub fn from_config(config: &serde_json::Value) -> Result<Self> {
        let types = |key: &str| -> Result<Vec<bool>> {
            let list = config[key]
                .as_array()
                .ok_or_else(|| Error::bad_weights(format!("UNet config has no list `{key}`")))?;
            list.iter()
                .map(|t| {
                    t.as_str().map(|t| t.contains("CrossAttn")).ok_or_else(|| {
                        Error::bad_weights(format!("UNet config `{key}`: {t} is not a block type"))
                    })
                })
                .collect()
        };
        let down_attention = types("down_block_types")?;
        let up_attention = types("up_block_types")?;
        let levels = down_attention.len();
        let layers = match &config["layers_per_block"] {
            serde_json::Value::Number(n) => vec![n.as_u64().unwrap_or(0) as usize; levels],
            serde_json::Value::Array(a) => {
                a.iter().map(|n| n.as_u64().unwrap_or(0) as usize).collect()
            }
            other => {
                return Err(Error::bad_weights(format!(
                    "UNet config: layers_per_block {other} is neither a number nor a list"
                )))
            }
        };
        if up_attention.len() != levels || layers.len() != levels || levels == 0 {
            return Err(Error::bad_weights(format!(
                "UNet config: {} down blocks, {} up blocks, {} layers_per_block entries",
                levels,
                up_attention.len(),
                layers.len()
            )));
        }
        Ok(Self {
            layers,
            down_attention,
            up_attention,
        })
    }

    /// From the keys of an SGM UNet (without the `model.diffusion_model.` prefix): input blocks
    /// are walked in order, a downsampler (`input_blocks.{i}.0.op`) closes a level.
    pub fn infer<'a>(keys: impl IntoIterator<Item = &'a str>) -> Result<Self> {
        let keys: BTreeSet<&str> = keys.into_iter().collect();
        let indices = |block: &str| -> BTreeSet<usize> {
            keys.iter()
                .filter_map(|k| k.strip_prefix(block)?.split('.').next()?.parse().ok())
                .collect()
        };
        let has_prefix = |prefix: String| {
            keys.range(prefix.as_str()..)
                .next()
                .is_some_and(|k| k.starts_with(&prefix))
        };
        let inputs = indices("input_blocks.");
        let outputs = indices("output_blocks.");
        let (mut layers, mut down_attention) = (vec![], vec![]);
        let (mut count, mut attention) = (0usize, false);
        for &i in inputs.iter().filter(|&&i| i > 0) {
            if keys.contains(format!("input_blocks.{i}.0.op.weight").as_str()) {
                layers.push(count);
                down_attention.push(attention);
                (count, attention) = (0, false);
            } else {
                count += 1;
                attention |= has_prefix(format!("input_blocks.{i}.1."));
            }
        }
        layers.push(count);
        down_attention.push(attention);
        let levels = layers.len();
        let expected_inputs: usize = 1 + layers.iter().sum::<usize>() + levels - 1;
        let expected_outputs: usize = layers.iter().map(|l| l + 1).sum();
        let contiguous =
            |set: &BTreeSet<usize>, n: usize| set.len() == n && set.iter().copied().eq(0..n);
        if count == 0
            || !contiguous(&inputs, expected_inputs)
            || !contiguous(&outputs, expected_outputs)
        {
            return Err(Error::bad_weights(format!(
                "cannot infer the UNet structure: {} input blocks and {} output blocks do not fit \
                 levels with {layers:?} ResNets",
                inputs.len(),
                outputs.len()
            )));
        }
        let mut up_attention = vec![];
        let mut first = 0;
        for l in layers.iter().rev() {
            up_attention.push(has_prefix(format!(
                "output_blocks.{first}.1.transformer_blocks."
            )));
            first += l + 1;
        }
        Ok(Self {
            layers,
            down_attention,
            up_attention,
        })
    }

    pub fn levels(&self) -> usize {
        self.layers.len()
    }
}

/// Structure of an AutoencoderKL, as far as names depend on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VaeLayout {
    pub levels: usize,
    /// ResNets per encoder level; decoder levels have one more.
    pub layers_per_block: usize,
}

impl VaeLayout {
    /// The SDXL VAE.
    pub fn sdxl() -> Self {
        Self {
            levels: 4,
            layers_per_block: 2,
        }
    }

    /// From a diffusers `vae/config.json` (`block_out_channels`, `layers_per_block`).
    pub fn from_config(config: &serde_json::Value) -> Result<Self> {
        let levels = config["block_out_channels"].as_array().map(Vec::len);
        let layers = config["layers_per_block"].as_u64();
        match (levels, layers) {
            (Some(levels), Some(layers)) if levels > 0 => Ok(Self {
                levels,
                layers_per_block: layers as usize,
            }),
            _ => Err(Error::bad_weights(
                "VAE config lacks block_out_channels or layers_per_block",
            )),
        }
    }

    /// From the keys of an LDM VAE (without the `first_stage_model.` prefix).
    pub fn infer<'a>(keys: impl IntoIterator<Item = &'a str>) -> Result<Self> {
        let (mut levels, mut layers) = (0, 0);
        for k in keys {
            if let Some(rest) = k.strip_prefix("encoder.down.") {
                let mut parts = rest.split('.');
                if let Some(Ok(level)) = parts.next().map(str::parse::<usize>) {
                    levels = levels.max(level + 1);
                    if parts.next() == Some("block") {
                        if let Some(Ok(j)) = parts.next().map(str::parse::<usize>) {
                            layers = layers.max(j + 1);
                        }
                    }
                }
            }
        }
        if levels == 0 || layers == 0 {
            return Err(Error::bad_weights(
                "cannot infer the VAE structure: no encoder.down.{i}.block.{j} keys",
            ));
        }
        Ok(Self {
            levels,
            layers_per_block: layers,
        })
    }
}

/// The name table of one component.
#[derive(Debug, Clone)]
pub struct NameTable {
    component: Component,
    blocks: Vec<Block>,
}

impl NameTable {
    fn new(component: Component) -> Self {
        Self {
            component,
            blocks: vec![],
        }
    }

    fn rule(
        &mut self,
        sgm: impl Into<String>,
        diffusers: impl Into<String>,
        kind: Kind,
    ) -> &mut Self {
        self.blocks.push(Block {
            sgm: sgm.into(),
            diffusers: diffusers.into(),
            kind,
            transform: Identity,
            alias: false,
        });
        self
    }

    fn rule_with(&mut self, sgm: &str, diffusers: &str, transform: Transform) -> &mut Self {
        self.rule(sgm, diffusers, Kind::Same);
        self.blocks.last_mut().expect("just pushed").transform = transform;
        self
    }

    /// Adds, for every rule so far whose diffusers name starts with `text_model.`, an alias
    /// without that wrapper.
    fn unwrapped_text_model_aliases(&mut self) {
        let aliases: Vec<Block> = self
            .blocks
            .iter()
            .filter_map(|b| {
                let rest = b.diffusers.strip_prefix("text_model.")?;
                Some(Block {
                    diffusers: rest.to_string(),
                    alias: true,
                    ..b.clone()
                })
            })
            .collect();
        self.blocks.extend(aliases);
    }

    /// UNet: LDM `input_blocks`/`middle_block`/`output_blocks` ↔ diffusers levels.
    pub fn unet(layout: &UnetLayout) -> Self {
        let mut t = Self::new(Component::Unet);
        t.rule("time_embed.0", "time_embedding.linear_1", Kind::Same)
            .rule("time_embed.2", "time_embedding.linear_2", Kind::Same)
            .rule("label_emb.0.0", "add_embedding.linear_1", Kind::Same)
            .rule("label_emb.0.2", "add_embedding.linear_2", Kind::Same)
            .rule("input_blocks.0.0", "conv_in", Kind::Same)
            .rule("out.0", "conv_norm_out", Kind::Same)
            .rule("out.2", "conv_out", Kind::Same)
            .rule("middle_block.0", "mid_block.resnets.0", Kind::Resnet)
            .rule("middle_block.1", "mid_block.attentions.0", Kind::Same)
            .rule("middle_block.2", "mid_block.resnets.1", Kind::Resnet);
        let levels = layout.levels();
        let mut i = 1;
        for (l, (&layers, &attention)) in
            layout.layers.iter().zip(&layout.down_attention).enumerate()
        {
            for j in 0..layers {
                t.rule(
                    format!("input_blocks.{i}.0"),
                    format!("down_blocks.{l}.resnets.{j}"),
                    Kind::Resnet,
                );
                if attention {
                    t.rule(
                        format!("input_blocks.{i}.1"),
                        format!("down_blocks.{l}.attentions.{j}"),
                        Kind::Same,
                    );
                }
                i += 1;
            }
            if l + 1 < levels {
                t.rule(
                    format!("input_blocks.{i}.0.op"),
                    format!("down_blocks.{l}.downsamplers.0.conv"),
                    Kind::Same,
                );
                i += 1;
            }
        }
        let mut i = 0;
        for (u, (&layers, &attention)) in layout
            .layers
            .iter()
            .rev()
            .zip(&layout.up_attention)
            .enumerate()
        {
            for j in 0..=layers {
                t.rule(
                    format!("output_blocks.{i}.0"),
                    format!("up_blocks.{u}.resnets.{j}"),
                    Kind::Resnet,
                );
                if attention {
                    t.rule(
                        format!("output_blocks.{i}.1"),
                        format!("up_blocks.{u}.attentions.{j}"),
                        Kind::Same,
                    );
                }
                if u + 1 < levels && j == layers {
                    let k = if attention { 2 } else { 1 };
                    t.rule(
                        format!("output_blocks.{i}.{k}.conv"),
                        format!("up_blocks.{u}.upsamplers.0.conv"),
                        Kind::Same,
                    );
                }
                i += 1;
            }
        }
        t
    }

    /// VAE: LDM `encoder.down.{i}.block.{j}`, `decoder.up.{i}` (numbered from full resolution,
    /// so in reverse order of diffusers' `up_blocks`), `mid.block_1/attn_1/block_2`.
    pub fn vae(layout: &VaeLayout) -> Self {
        let mut t = Self::new(Component::Vae);
        t.rule("quant_conv", "quant_conv", Kind::Same).rule(
            "post_quant_conv",
            "post_quant_conv",
            Kind::Same,
        );
        for part in ["encoder", "decoder"] {
            t.rule(
                format!("{part}.conv_in"),
                format!("{part}.conv_in"),
                Kind::Same,
            )
            .rule(
                format!("{part}.conv_out"),
                format!("{part}.conv_out"),
                Kind::Same,
            )
            .rule(
                format!("{part}.norm_out"),
                format!("{part}.conv_norm_out"),
                Kind::Same,
            )
            .rule(
                format!("{part}.mid.block_1"),
                format!("{part}.mid_block.resnets.0"),
                Kind::VaeResnet,
            )
            .rule(
                format!("{part}.mid.block_2"),
                format!("{part}.mid_block.resnets.1"),
                Kind::VaeResnet,
            )
            .rule(
                format!("{part}.mid.attn_1"),
                format!("{part}.mid_block.attentions.0"),
                Kind::VaeAttention,
            );
        }
        let n = layout.levels;
        for l in 0..n {
            for j in 0..layout.layers_per_block {
                t.rule(
                    format!("encoder.down.{l}.block.{j}"),
                    format!("encoder.down_blocks.{l}.resnets.{j}"),
                    Kind::VaeResnet,
                );
            }
            if l + 1 < n {
                t.rule(
                    format!("encoder.down.{l}.downsample.conv"),
                    format!("encoder.down_blocks.{l}.downsamplers.0.conv"),
                    Kind::Same,
                );
            }
        }
        for u in 0..n {
            let ldm = n - 1 - u;
            for j in 0..=layout.layers_per_block {
                t.rule(
                    format!("decoder.up.{ldm}.block.{j}"),
                    format!("decoder.up_blocks.{u}.resnets.{j}"),
                    Kind::VaeResnet,
                );
            }
            if u + 1 < n {
                t.rule(
                    format!("decoder.up.{ldm}.upsample.conv"),
                    format!("decoder.up_blocks.{u}.upsamplers.0.conv"),
                    Kind::Same,
                );
            }
        }
        t
    }

    /// CLIP ViT-L text: transformers names under the SGM prefix.
    pub fn text_encoder() -> Self {
        let mut t = Self::new(Component::TextEncoder);
        for part in [
            "text_model.embeddings",
            "text_model.encoder",
            "text_model.final_layer_norm",
        ] {
            t.rule(part, part, Kind::Same);
        }
        t.unwrapped_text_model_aliases();
        t
    }

    /// OpenCLIP ViT-bigG text with `layers` residual blocks.
    pub fn text_encoder_2(layers: usize) -> Self {
        let mut t = Self::new(Component::TextEncoder2);
        t.rule(
            "token_embedding",
            "text_model.embeddings.token_embedding",
            Kind::Same,
        )
        .rule_with(
            "positional_embedding",
            "text_model.embeddings.position_embedding.weight",
            Identity,
        )
        .rule("ln_final", "text_model.final_layer_norm", Kind::Same)
        .rule_with("text_projection", "text_projection.weight", Transpose);
        for i in 0..layers {
            t.rule(
                format!("transformer.resblocks.{i}"),
                format!("text_model.encoder.layers.{i}"),
                Kind::OpenClipLayer,
            );
        }
        t.unwrapped_text_model_aliases();
        t
    }

    pub fn component(&self) -> Component {
        self.component
    }

    /// The checkpoint key prefix of this component.
    pub fn prefix(&self) -> &'static str {
        self.component.sgm_prefix()
    }

    /// Where the diffusers tensor `name` is stored, or `None` when no rule covers the name.
    pub fn to_sgm(&self, name: &str) -> Option<SgmTensor> {
        let (block, rest) = self
            .blocks
            .iter()
            .filter_map(|b| Some((b, strip(name, &b.diffusers)?)))
            .max_by_key(|(b, _)| b.diffusers.len())?;
        let mut key = format!("{}{}", self.prefix(), block.sgm);
        let mut transform = block.transform;
        let inner = rest.strip_prefix('.').unwrap_or(rest);
        let found = leaves(block.kind)
            .iter()
            .filter_map(|l| Some((l, strip(inner, l.diffusers)?)))
            .max_by_key(|(l, _)| l.diffusers.len());
        match found {
            Some((l, tail)) => {
                key.push('.');
                key.push_str(l.sgm);
                key.push_str(tail);
                transform = l.transform;
            }
            None => key.push_str(rest),
        }
        Some(SgmTensor { key, transform })
    }

    /// The diffusers names (and transforms) a checkpoint key holds: one, or three for a fused
    /// OpenCLIP `in_proj`; empty for keys outside this component or without a rule.
    pub fn to_diffusers(&self, key: &str) -> Vec<(String, Transform)> {
        let Some(name) = key.strip_prefix(self.prefix()) else {
            return vec![];
        };
        let Some((block, rest)) = self
            .blocks
            .iter()
            .filter(|b| !b.alias)
            .filter_map(|b| Some((b, strip(name, &b.sgm)?)))
            .max_by_key(|(b, _)| b.sgm.len())
        else {
            return vec![];
        };
        let inner = rest.strip_prefix('.').unwrap_or(rest);
        let matches: Vec<(&Leaf, &str)> = leaves(block.kind)
            .iter()
            .filter_map(|l| Some((l, strip(inner, l.sgm)?)))
            .collect();
        let longest = matches.iter().map(|(l, _)| l.sgm.len()).max();
        let mut out: Vec<(String, Transform)> = matches
            .iter()
            .filter(|(l, _)| Some(l.sgm.len()) == longest)
            .map(|(l, tail)| {
                (
                    format!("{}.{}{}", block.diffusers, l.diffusers, tail),
                    l.transform,
                )
            })
            .collect();
        if out.is_empty() {
            out.push((format!("{}{}", block.diffusers, rest), block.transform));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sgm(t: &NameTable, name: &str) -> String {
        t.to_sgm(name)
            .unwrap_or_else(|| panic!("no rule for {name}"))
            .key
    }

    #[test]
    fn unet_sdxl_base_matches_the_published_correspondence() {
        let t = NameTable::unet(&UnetLayout::sdxl_base());
        let p = "model.diffusion_model.";
        // docs/hyperlora-model.md §5: input_blocks 4,5 / 7,8, middle_block.1, output_blocks 0-2 / 3-5.
        for (s, d) in [
            ("input_blocks.4.1", "down_blocks.1.attentions.0"),
            ("input_blocks.5.1", "down_blocks.1.attentions.1"),
            ("input_blocks.7.1", "down_blocks.2.attentions.0"),
            ("input_blocks.8.1", "down_blocks.2.attentions.1"),
            ("middle_block.1", "mid_block.attentions.0"),
            ("output_blocks.0.1", "up_blocks.0.attentions.0"),
            ("output_blocks.2.1", "up_blocks.0.attentions.2"),
            ("output_blocks.3.1", "up_blocks.1.attentions.0"),
            ("output_blocks.5.1", "up_blocks.1.attentions.2"),
        ] {
            let leafname = "transformer_blocks.9.attn2.to_k.weight";
            assert_eq!(
                sgm(&t, &format!("{d}.{leafname}")),
                format!("{p}{s}.{leafname}")
            );
        }
        for (s, d) in [
            ("input_blocks.0.0.weight", "conv_in.weight"),
            (
                "input_blocks.1.0.in_layers.0.weight",
                "down_blocks.0.resnets.0.norm1.weight",
            ),
            (
                "input_blocks.2.0.out_layers.3.bias",
                "down_blocks.0.resnets.1.conv2.bias",
            ),
            (
                "input_blocks.3.0.op.weight",
                "down_blocks.0.downsamplers.0.conv.weight",
            ),
            (
                "input_blocks.4.0.skip_connection.weight",
                "down_blocks.1.resnets.0.conv_shortcut.weight",
            ),
            (
                "input_blocks.6.0.op.bias",
                "down_blocks.1.downsamplers.0.conv.bias",
            ),
            (
                "input_blocks.8.0.emb_layers.1.weight",
                "down_blocks.2.resnets.1.time_emb_proj.weight",
            ),
            (
                "middle_block.2.in_layers.2.weight",
                "mid_block.resnets.1.conv1.weight",
            ),
            (
                "output_blocks.2.2.conv.weight",
                "up_blocks.0.upsamplers.0.conv.weight",
            ),
            (
                "output_blocks.5.2.conv.bias",
                "up_blocks.1.upsamplers.0.conv.bias",
            ),
            (
                "output_blocks.8.0.skip_connection.weight",
                "up_blocks.2.resnets.2.conv_shortcut.weight",
            ),
            ("time_embed.2.weight", "time_embedding.linear_2.weight"),
            ("label_emb.0.0.weight", "add_embedding.linear_1.weight"),
            ("out.0.bias", "conv_norm_out.bias"),
            ("out.2.weight", "conv_out.weight"),
        ] {
            assert_eq!(sgm(&t, d), format!("{p}{s}"), "{d}");
            assert_eq!(
                t.to_diffusers(&format!("{p}{s}")),
                vec![(d.to_string(), Identity)]
            );
        }
        // Up levels without attention put the upsampler at .1 (SD 1.x style level).
        let mut plain = UnetLayout::sdxl_base();
        plain.up_attention = vec![false, true, false];
        assert_eq!(
            sgm(
                &NameTable::unet(&plain),
                "up_blocks.0.upsamplers.0.conv.weight"
            ),
            format!("{p}output_blocks.2.1.conv.weight")
        );
        assert!(t.to_sgm("down_blocks.3.resnets.0.conv1.weight").is_none());
        assert!(t.to_sgm("conv_inx.weight").is_none());
    }

    #[test]
    fn unet_layout_from_config_and_from_keys_agree() {
        let config = serde_json::json!({
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            "layers_per_block": 2
        });
        let layout = UnetLayout::from_config(&config).unwrap();
        assert_eq!(layout, UnetLayout::sdxl_base());
        // Every SGM key the table produces, fed back to inference, gives the same layout.
        let t = NameTable::unet(&layout);
        let keys: Vec<String> = t
            .blocks
            .iter()
            .map(|b| format!("{}.weight", b.sgm))
            .chain(["input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight".into()])
            .chain(["output_blocks.0.1.transformer_blocks.0.attn1.to_q.weight".into()])
            .chain(["output_blocks.3.1.transformer_blocks.0.attn1.to_q.weight".into()])
            .collect();
        assert_eq!(
            UnetLayout::infer(keys.iter().map(String::as_str)).unwrap(),
            layout
        );
        let err =
            UnetLayout::infer(["input_blocks.0.0.weight", "output_blocks.0.0.weight"]).unwrap_err();
        assert_eq!(err.code, crate::ErrorCode::BadWeights);
    }

    #[test]
    fn vae_reverses_decoder_levels_and_reshapes_attention() {
        let t = NameTable::vae(&VaeLayout::sdxl());
        let p = "first_stage_model.";
        for (s, d, tr) in [
            (
                "decoder.up.3.block.0.conv1.weight",
                "decoder.up_blocks.0.resnets.0.conv1.weight",
                Identity,
            ),
            (
                "decoder.up.3.upsample.conv.weight",
                "decoder.up_blocks.0.upsamplers.0.conv.weight",
                Identity,
            ),
            (
                "decoder.up.0.block.2.nin_shortcut.bias",
                "decoder.up_blocks.3.resnets.2.conv_shortcut.bias",
                Identity,
            ),
            (
                "encoder.down.1.block.0.nin_shortcut.weight",
                "encoder.down_blocks.1.resnets.0.conv_shortcut.weight",
                Identity,
            ),
            (
                "encoder.down.2.downsample.conv.bias",
                "encoder.down_blocks.2.downsamplers.0.conv.bias",
                Identity,
            ),
            (
                "encoder.mid.attn_1.q.weight",
                "encoder.mid_block.attentions.0.to_q.weight",
                ConvToLinear,
            ),
            (
                "decoder.mid.attn_1.proj_out.bias",
                "decoder.mid_block.attentions.0.to_out.0.bias",
                ConvToLinear,
            ),
            (
                "decoder.mid.attn_1.norm.weight",
                "decoder.mid_block.attentions.0.group_norm.weight",
                Identity,
            ),
            (
                "decoder.mid.block_2.norm1.weight",
                "decoder.mid_block.resnets.1.norm1.weight",
                Identity,
            ),
            (
                "encoder.norm_out.weight",
                "encoder.conv_norm_out.weight",
                Identity,
            ),
            ("post_quant_conv.weight", "post_quant_conv.weight", Identity),
        ] {
            assert_eq!(
                t.to_sgm(d),
                Some(SgmTensor {
                    key: format!("{p}{s}"),
                    transform: tr
                }),
                "{d}"
            );
            assert_eq!(
                t.to_diffusers(&format!("{p}{s}")),
                vec![(d.to_string(), tr)]
            );
        }
        assert!(t
            .to_sgm("encoder.down_blocks.3.downsamplers.0.conv.weight")
            .is_none());
        assert_eq!(
            VaeLayout::infer([
                "encoder.down.3.block.1.conv1.weight",
                "encoder.down.0.block.0.norm1.weight"
            ])
            .unwrap(),
            VaeLayout::sdxl()
        );
    }

    #[test]
    fn open_clip_splits_fused_projections_and_transposes_text_projection() {
        let t = NameTable::text_encoder_2(32);
        let p = "conditioner.embedders.1.model.";
        let fused = format!("{p}transformer.resblocks.31.attn.in_proj_weight");
        for (name, k) in [("q", 0), ("k", 1), ("v", 2)] {
            let d = format!("text_model.encoder.layers.31.self_attn.{name}_proj.weight");
            assert_eq!(
                t.to_sgm(&d),
                Some(SgmTensor {
                    key: fused.clone(),
                    transform: Third(k)
                })
            );
            // Transformers >= 5.6 spelling without the wrapper.
            assert_eq!(
                t.to_sgm(d.strip_prefix("text_model.").unwrap())
                    .unwrap()
                    .key,
                fused
            );
        }
        assert_eq!(t.to_diffusers(&fused).len(), 3);
        for (s, d, tr) in [
            ("text_projection", "text_projection.weight", Transpose),
            (
                "positional_embedding",
                "text_model.embeddings.position_embedding.weight",
                Identity,
            ),
            (
                "token_embedding.weight",
                "text_model.embeddings.token_embedding.weight",
                Identity,
            ),
            (
                "ln_final.bias",
                "text_model.final_layer_norm.bias",
                Identity,
            ),
            (
                "transformer.resblocks.0.attn.out_proj.weight",
                "text_model.encoder.layers.0.self_attn.out_proj.weight",
                Identity,
            ),
            (
                "transformer.resblocks.1.ln_2.bias",
                "text_model.encoder.layers.1.layer_norm2.bias",
                Identity,
            ),
            (
                "transformer.resblocks.2.mlp.c_fc.weight",
                "text_model.encoder.layers.2.mlp.fc1.weight",
                Identity,
            ),
            (
                "transformer.resblocks.2.mlp.c_proj.bias",
                "text_model.encoder.layers.2.mlp.fc2.bias",
                Identity,
            ),
        ] {
            assert_eq!(
                t.to_sgm(d),
                Some(SgmTensor {
                    key: format!("{p}{s}"),
                    transform: tr
                }),
                "{d}"
            );
            assert_eq!(
                t.to_diffusers(&format!("{p}{s}")),
                vec![(d.to_string(), tr)]
            );
        }
        assert!(t
            .to_sgm("text_model.encoder.layers.32.mlp.fc1.weight")
            .is_none());
        assert!(t.to_diffusers(&format!("{p}logit_scale")).is_empty());

        let t1 = NameTable::text_encoder();
        let key = "conditioner.embedders.0.transformer.text_model.encoder.layers.11.mlp.fc1.weight";
        assert_eq!(sgm(&t1, "text_model.encoder.layers.11.mlp.fc1.weight"), key);
        assert_eq!(sgm(&t1, "encoder.layers.11.mlp.fc1.weight"), key);
        assert_eq!(
            t1.to_diffusers(key),
            vec![(
                "text_model.encoder.layers.11.mlp.fc1.weight".into(),
                Identity
            )]
        );
    }
}
