//! Reading LoRA files of every common layout into one representation for application:
//! a target component (UNet, CLIP-L text encoder, bigG text encoder), the module path in
//! diffusers / transformers naming, `down`, `up` and an optional alpha.
//!
//! Layouts understood (the names diffusers 0.42's `load_lora_weights` accepts for SDXL):
//! - kohya, diffusers module names: `lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q`
//!   `.lora_down.weight` / `.lora_up.weight` / `.alpha`;
//! - kohya, original SGM (LDM) module names: `lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`,
//!   `lora_unet_middle_block_1_…`, `lora_unet_output_blocks_…`, `lora_unet_time_embed_0`, … mapped with
//!   [`sgm_to_diffusers`] (the single-file checkpoint table of `weights::sgm_names`, SDXL layout);
//! - kohya text encoders: `lora_te1_text_model_encoder_layers_0_self_attn_q_proj` (also `lora_te_`),
//!   `lora_te2_…`;
//! - diffusers / PEFT: `unet.{path}.lora_A.weight` / `.lora_B.weight` (optionally `lora_A.{adapter}.weight`,
//!   `base_model.model.` prefixes, `text_encoder.` / `text_encoder_2.` components), alphas from the
//!   `lora_adapter_metadata` JSON (`{component}.lora_alpha`, `{component}.alpha_pattern`) or
//!   `{path}.alpha` tensors;
//! - old diffusers: `{path}.lora.down.weight` / `.lora.up.weight`, `{path}.lora_linear_layer.down.weight`,
//!   attention processors `{attn}.processor.to_q_lora.down.weight` (`to_out_lora` = `to_out.0`; for the
//!   text encoders `to_q_lora` = `q_proj`, `to_out_lora` = `out_proj`).
//!
//! Every module of those layouts may also be in a LyCORIS form instead of `lora_down`/`lora_up`
//! (kohya-LyCORIS files; see [`LoraUpdate`]): LoCon (4-d `lora_down`, Tucker `lora_mid`), LoHa
//! (`hada_w1_a/b`, `hada_w2_a/b`, optional `hada_t1/t2`), LoKr (`lokr_w1` or `lokr_w1_a/b`,
//! `lokr_w2` or `lokr_w2_a/b`, optional `lokr_t2`), full differences (`diff`, `diff_b`).
//! Anything else (DoRA's `dora_scale`, norm-layer keys, unknown names) is listed in [`ParsedLora::skipped`] with the reason rather than silently dropped.
//!
//! Text-encoder module paths are transformers' classic names
//! (`text_model.encoder.layers.0.self_attn.q_proj`).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{Device, Tensor};

use super::format::{all_finite, read_safetensors, scalar, KohyaLora};
use super::lycoris::{KronFactor, Loha, Lokr};
use super::update::LoraUpdate;
use crate::{Error, Result};

/// Which model a LoRA layer targets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LoraComponent {
    /// The SDXL UNet (diffusers module paths).
    Unet,
    /// `text_encoder` (CLIP ViT-L/14 text).
    TextEncoder,
    /// `text_encoder_2` (OpenCLIP ViT-bigG/14 text).
    TextEncoder2,
}

impl LoraComponent {
    /// The diffusers pipeline attribute name (`unet`, `text_encoder`, `text_encoder_2`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unet => "unet",
            Self::TextEncoder => "text_encoder",
            Self::TextEncoder2 => "text_encoder_2",
        }
    }

    /// The kohya prefix (`lora_unet_`, `lora_te1_`, `lora_te2_`).
    pub fn kohya_prefix(self) -> &'static str {
        match self {
            Self::Unet => "lora_unet_",
            Self::TextEncoder => "lora_te1_",
            Self::TextEncoder2 => "lora_te2_",
        }
    }
}

/// One module's update: `W' = W + weight · scale · ΔW` (see [`LoraUpdate`] for `ΔW`).
#[derive(Debug, Clone)]
pub struct LoraLayer {
    pub component: LoraComponent,
    /// Module path in diffusers (UNet) / transformers (text encoders) naming, e.g.
    /// `down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0`.
    pub module: String,
    pub update: LoraUpdate,
    /// `None`: the file gives no alpha, which means `alpha = rank` (scale 1).
    pub alpha: Option<f32>,
    /// The key prefix in the file this came from (for messages).
    pub source: String,
}

impl LoraLayer {
    /// A LoRA (`up @ down`) layer.
    pub fn low_rank(
        component: LoraComponent,
        module: impl Into<String>,
        down: Tensor,
        up: Tensor,
        alpha: Option<f32>,
        source: impl Into<String>,
    ) -> Self {
        Self {
            component,
            module: module.into(),
            update: LoraUpdate::LowRank { down, up },
            alpha,
            source: source.into(),
        }
    }

    /// The rank `alpha` divides (see [`LoraUpdate::rank`]).
    pub fn rank(&self) -> Option<usize> {
        self.update.rank()
    }

    /// `alpha / rank`; 1 without an alpha or without a rank. A LyCORIS module's alpha 0 also
    /// means 1 (LyCORIS reads 0 as `alpha = lora_dim`).
    pub fn scale(&self) -> f32 {
        let lycoris = matches!(
            self.update,
            LoraUpdate::LoHa(_) | LoraUpdate::LoKr(_) | LoraUpdate::LoConTucker { .. }
        );
        match (self.alpha, self.rank()) {
            (Some(a), _) if lycoris && a == 0.0 => 1.0,
            (Some(a), Some(r)) => a / r as f32,
            _ => 1.0,
        }
    }
}

/// Which naming a file used (informative).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoraNaming {
    Kohya,
    KohyaSgm,
    Diffusers,
    Mixed,
}

/// A key (or key prefix) that was not turned into a layer, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkippedKey {
    pub key: String,
    pub reason: String,
}

/// Every layer of a LoRA file, in file order.
#[derive(Debug, Clone)]
pub struct ParsedLora {
    pub layers: Vec<LoraLayer>,
    pub skipped: Vec<SkippedKey>,
    pub naming: LoraNaming,
    pub metadata: BTreeMap<String, String>,
}

impl ParsedLora {
    pub fn component(&self, c: LoraComponent) -> impl Iterator<Item = &LoraLayer> {
        self.layers.iter().filter(move |l| l.component == c)
    }
}

/// Reads any supported LoRA `.safetensors` file (see the module docs). A file in which no key
/// is a module of a layer hyperlora knows is `INVALID_ARGUMENT` (naming the file and the first
/// keys); keys that were not understood are in [`ParsedLora::skipped`].
pub fn read_lora_file(path: impl AsRef<Path>, device: &Device) -> Result<ParsedLora> {
    let path = path.as_ref();
    let (tensors, metadata) = read_safetensors(path, device)?;
    let parsed = parse_lora(tensors, metadata).map_err(|e| e.context(path.display()))?;
    if parsed.layers.is_empty() {
        return Err(Error::invalid_argument(format!(
            "{}: no LoRA module in this file targets a layer of SDXL ({})",
            path.display(),
            summarize_skipped(&parsed.skipped)
        )));
    }
    Ok(parsed)
}

/// `N keys ignored: a (why), b (why), c (why), …` — the first few of a list of skipped keys.
pub fn summarize_skipped(skipped: &[SkippedKey]) -> String {
    const SHOWN: usize = 3;
    if skipped.is_empty() {
        return "it holds no tensors".into();
    }
    let first: Vec<String> = skipped
        .iter()
        .take(SHOWN)
        .map(|s| format!("{} ({})", s.key, s.reason))
        .collect();
    let more = if skipped.len() > SHOWN { ", …" } else { "" };
    let noun = if skipped.len() == 1 { "key" } else { "keys" };
    format!(
        "{} {noun} ignored: {}{more}",
        skipped.len(),
        first.join(", ")
    )
}

impl KohyaLora {
    /// This LoRA's modules as [`LoraLayer`]s (kohya names resolved to diffusers paths).
    pub fn to_layers(&self) -> Result<Vec<LoraLayer>> {
        let mut skipped = Vec::new();
        let mut layers = Vec::with_capacity(self.len());
        for (name, w) in self.iter() {
            match kohya_to_module(name) {
                Some((component, module)) => layers.push(LoraLayer::low_rank(
                    component,
                    module,
                    w.down.clone(),
                    w.up.clone(),
                    Some(w.alpha),
                    name,
                )),
                None => skipped.push(name.to_string()),
            }
        }
        if !skipped.is_empty() {
            return Err(Error::bad_weights(format!(
                "LoRA module names not understood: {}",
                skipped.join(", ")
            )));
        }
        Ok(layers)
    }
}

/// What a key holds for its module.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Part {
    Down,
    Up,
    Alpha,
    HadaW1A,
    HadaW1B,
    HadaW2A,
    HadaW2B,
    HadaT1,
    HadaT2,
    LokrW1,
    LokrW1A,
    LokrW1B,
    LokrW2,
    LokrW2A,
    LokrW2B,
    LokrT2,
    Diff,
    DiffB,
    /// Recognised so the module can be reported as a whole, never applied.
    DoraScale,
    /// LoCon's Tucker core.
    LoraMid,
}

/// The LyCORIS key suffixes (kohya-LyCORIS files; LyCORIS `weight_list`s).
const LYCORIS_SUFFIXES: [(&str, Part); 16] = [
    (".hada_w1_a", Part::HadaW1A),
    (".hada_w1_b", Part::HadaW1B),
    (".hada_w2_a", Part::HadaW2A),
    (".hada_w2_b", Part::HadaW2B),
    (".hada_t1", Part::HadaT1),
    (".hada_t2", Part::HadaT2),
    (".lokr_w1", Part::LokrW1),
    (".lokr_w1_a", Part::LokrW1A),
    (".lokr_w1_b", Part::LokrW1B),
    (".lokr_w2", Part::LokrW2),
    (".lokr_w2_a", Part::LokrW2A),
    (".lokr_w2_b", Part::LokrW2B),
    (".lokr_t2", Part::LokrT2),
    (".diff", Part::Diff),
    (".diff_b", Part::DiffB),
    (".dora_scale", Part::DoraScale),
];

/// The role of a key: (module prefix, part).
fn split_key(key: &str) -> Option<(String, Part)> {
    const SUFFIXES: [(&str, Part); 11] = [
        (".lora_down.weight", Part::Down),
        (".lora_up.weight", Part::Up),
        (".lora_A.weight", Part::Down),
        (".lora_B.weight", Part::Up),
        (".lora.down.weight", Part::Down),
        (".lora.up.weight", Part::Up),
        (".lora_linear_layer.down.weight", Part::Down),
        (".lora_linear_layer.up.weight", Part::Up),
        (".lora_mid.weight", Part::LoraMid),
        // PEFT's DoRA magnitude (as diffusers saves it), reported like LyCORIS's dora_scale.
        (".lora_magnitude_vector.weight", Part::DoraScale),
        (".lora_magnitude_vector", Part::DoraScale),
    ];
    for (suffix, part) in SUFFIXES.into_iter().chain(LYCORIS_SUFFIXES) {
        if let Some(p) = key.strip_suffix(suffix) {
            return Some((p.to_string(), part));
        }
    }
    // Old attention processors: `….processor.to_q_lora.down.weight`.
    for (suffix, part) in [
        ("_lora.down.weight", Part::Down),
        ("_lora.up.weight", Part::Up),
    ] {
        if let Some(p) = key.strip_suffix(suffix) {
            return Some((p.to_string(), part));
        }
    }
    // PEFT with an adapter name: `….lora_A.default.weight`.
    for (marker, part) in [(".lora_A.", Part::Down), (".lora_B.", Part::Up)] {
        if let Some(i) = key.find(marker) {
            let rest = &key[i + marker.len()..];
            if rest.ends_with(".weight") && !rest[..rest.len() - 7].contains('.') {
                return Some((key[..i].to_string(), part));
            }
        }
    }
    key.strip_suffix(".alpha")
        .map(|p| (p.to_string(), Part::Alpha))
}

/// One module's tensors by part, with their keys.
type Parts = BTreeMap<Part, (String, Tensor)>;

/// The module's update from its parts (`Ok(Err(reason))`: a form hyperlora recognises but does
/// not apply). Malformed or incomplete modules are `BAD_WEIGHTS` naming the tensor.
fn build_update(prefix: &str, p: &mut Parts) -> Result<std::result::Result<LoraUpdate, String>> {
    use Part::*;
    // DoRA rescales each weight column (LyCORIS `dora_scale`, `[1, in]`) or row (PEFT's
    // magnitude, `[out]`) after the update, and the two disagree on the axis: rather than merge a
    // module wrongly, it is left out and reported.
    if p.contains_key(&DoraScale) {
        return Ok(Err("DoRA (dora_scale) is not supported".into()));
    }
    let family = |parts: &[Part]| parts.iter().any(|x| p.contains_key(x));
    let families = [
        family(&[Down, Up, LoraMid]),
        family(&[HadaW1A, HadaW1B, HadaW2A, HadaW2B, HadaT1, HadaT2]),
        family(&[LokrW1, LokrW1A, LokrW1B, LokrW2, LokrW2A, LokrW2B, LokrT2]),
        family(&[Diff, DiffB]),
    ];
    if families.iter().filter(|f| **f).count() > 1 {
        return Err(Error::bad_weights(format!(
            "{prefix}: mixes the keys of several LoRA kinds ({})",
            p.values()
                .map(|(k, _)| k.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    let mut take = |part: Part, name: &str| -> Result<Tensor> {
        p.remove(&part)
            .map(|(_, t)| t)
            .ok_or_else(|| Error::bad_weights(format!("{prefix}: {prefix}.{name} is missing")))
    };
    let update = if families[0] {
        let ((down_key, down), (up_key, up)) = match (p.remove(&Down), p.remove(&Up)) {
            (Some(d), Some(u)) => (d, u),
            (d, u) => {
                let (key, other) = match (d, u) {
                    (Some((key, _)), _) => (key, "up"),
                    (_, Some((key, _))) => (key, "down"),
                    _ => (prefix.to_string(), "down or up"),
                };
                return Err(Error::bad_weights(format!(
                    "LoRA tensor {key} has no matching {other} tensor"
                )));
            }
        };
        if let Some((mid_key, mid)) = p.remove(&LoraMid) {
            // LoCon in Tucker form: 1x1 down and up around a [r_up, r_down, kh, kw] core.
            let (d, m, u) = (down.dims(), mid.dims(), up.dims());
            let ok = matches!((d, m, u), ([rd, _, 1, 1], [ru, rd2, _, _], [_, ru2, 1, 1])
                if rd == rd2 && ru == ru2 && *rd > 0 && *ru > 0);
            if !ok {
                return Err(Error::bad_weights(format!(
                    "{down_key} {d:?}, {mid_key} {m:?} and {up_key} {u:?} are not a LoCon Tucker triple ([r, in, 1, 1], [r, r, kh, kw], [out, r, 1, 1])"
                )));
            }
            return Ok(Ok(LoraUpdate::LoConTucker { down, mid, up }));
        }
        let (d, u) = (down.dims(), up.dims());
        let ok = match (d.len(), u.len()) {
            (2, 2) => u[1] == d[0],
            (4, 4) => u[1] == d[0] && u[2] == 1 && u[3] == 1,
            _ => false,
        };
        if !ok || d[0] == 0 {
            return Err(Error::bad_weights(format!(
                "{down_key} {d:?} and {up_key} {u:?} are not a [rank, in] / [out, rank] pair"
            )));
        }
        LoraUpdate::LowRank { down, up }
    } else if families[1] {
        let (w1a, w1b) = (take(HadaW1A, "hada_w1_a")?, take(HadaW1B, "hada_w1_b")?);
        let (w2a, w2b) = (take(HadaW2A, "hada_w2_a")?, take(HadaW2B, "hada_w2_b")?);
        let tucker = match (p.remove(&HadaT1), p.remove(&HadaT2)) {
            (Some((_, t1)), Some((_, t2))) => Some((t1, t2)),
            (None, None) => None,
            _ => {
                return Err(Error::bad_weights(format!(
                    "{prefix}: has one of hada_t1 / hada_t2 without the other"
                )))
            }
        };
        let loha = Loha {
            w1a,
            w1b,
            w2a,
            w2b,
            tucker,
        };
        loha.validate(prefix)?;
        LoraUpdate::LoHa(loha)
    } else if families[2] {
        let mut factor = |whole: Part, a: Part, b: Part, t: Option<Part>, n: &str| {
            let (whole, a, b) = (p.remove(&whole), p.remove(&a), p.remove(&b));
            let t = t.and_then(|t| p.remove(&t));
            match (whole, a, b, t) {
                (Some((_, w)), None, None, None) => Ok(KronFactor::Full(w)),
                (None, Some((_, a)), Some((_, b)), None) => Ok(KronFactor::Product { a, b }),
                (None, Some((_, a)), Some((_, b)), Some((_, t))) => {
                    Ok(KronFactor::Tucker { t, a, b })
                }
                _ => Err(Error::bad_weights(format!(
                    "{prefix}: needs either {prefix}.lokr_{n} or both {prefix}.lokr_{n}_a and {prefix}.lokr_{n}_b"
                ))),
            }
        };
        let w1 = factor(LokrW1, LokrW1A, LokrW1B, None, "w1")?;
        let w2 = factor(LokrW2, LokrW2A, LokrW2B, Some(LokrT2), "w2")?;
        let lokr = Lokr { w1, w2 };
        lokr.validate(prefix)?;
        LoraUpdate::LoKr(lokr)
    } else if families[3] {
        let diff = take(Diff, "diff")?;
        let diff_b = p.remove(&DiffB).map(|(_, t)| t);
        if !matches!(diff.rank(), 2 | 4) || diff.elem_count() == 0 {
            return Err(Error::bad_weights(format!(
                "{prefix}.diff has shape {:?}, expected [out, in] or [out, in, kh, kw]",
                diff.dims()
            )));
        }
        if let Some(b) = &diff_b {
            if b.dims() != [diff.dims()[0]] {
                return Err(Error::bad_weights(format!(
                    "{prefix}.diff_b has shape {:?}, expected [{}]",
                    b.dims(),
                    diff.dims()[0]
                )));
            }
        }
        LoraUpdate::Full { diff, diff_b }
    } else {
        return Ok(Err("alpha without weights".into()));
    };
    Ok(Ok(update))
}

/// Parses LoRA tensors (see the module docs). `metadata` is the file's `__metadata__`.
pub fn parse_lora(
    tensors: Vec<(String, Tensor)>,
    metadata: BTreeMap<String, String>,
) -> Result<ParsedLora> {
    let mut order: Vec<String> = Vec::new();
    let mut parts: HashMap<String, Parts> = HashMap::new();
    let mut skipped = Vec::new();
    for (key, t) in tensors {
        let Some((prefix, part)) = split_key(&key) else {
            skipped.push(SkippedKey {
                reason: "not a tensor of a LoRA kind hyperlora knows".into(),
                key,
            });
            continue;
        };
        let entry = parts.entry(prefix.clone()).or_insert_with(|| {
            order.push(prefix.clone());
            Parts::new()
        });
        if entry.contains_key(&part) {
            return Err(Error::bad_weights(format!(
                "two tensors give the same LoRA part of {prefix} (second: {key})"
            )));
        }
        entry.insert(part, (key, t));
    }

    let peft_alphas = PeftAlphas::from_metadata(&metadata);
    let mut resolved: Vec<(LoraLayer, bool)> = Vec::new();
    let (mut kohya, mut kohya_sgm, mut dotted) = (false, false, false);
    for prefix in order {
        let mut p = parts.remove(&prefix).expect("recorded");
        let alpha_tensor = p.remove(&Part::Alpha);
        let update = match build_update(&prefix, &mut p)? {
            Ok(u) => u,
            Err(reason) => {
                let key = match &alpha_tensor {
                    Some((k, _)) if p.is_empty() => k.clone(),
                    _ => prefix.clone(),
                };
                skipped.push(SkippedKey { key, reason });
                continue;
            }
        };
        if let Some((key, _)) = p.values().next() {
            return Err(Error::bad_weights(format!(
                "{key} does not belong with the other tensors of {prefix}"
            )));
        }
        let (target, is_sgm) = if let Some(t) = kohya_target(&prefix) {
            kohya = true;
            t
        } else if let Some(t) = dotted_target(&prefix) {
            dotted = true;
            t
        } else {
            (None, false)
        };
        kohya_sgm |= is_sgm;
        let Some((component, module)) = target else {
            skipped.push(SkippedKey {
                key: prefix.clone(),
                reason: "module name not understood".into(),
            });
            continue;
        };
        let alpha = match alpha_tensor {
            Some((key, t)) => Some(scalar(&t).map_err(|e| e.context(&key))?),
            None if update.low_rank().is_some() => {
                peft_alphas.alpha(component, &module, update.rank().unwrap_or(0))
            }
            None => None,
        };
        // Merged into the model, one infinite or NaN value would blank every picture.
        if let Some(a) = alpha.filter(|a| !a.is_finite()) {
            return Err(Error::bad_weights(format!(
                "{prefix}: alpha {a} is not finite"
            )));
        }
        for t in update.tensors() {
            if !all_finite(t)? {
                return Err(Error::bad_weights(format!(
                    "{prefix}: its {} tensors hold infinite or NaN values",
                    update.kind()
                )));
            }
        }
        resolved.push((
            LoraLayer {
                component,
                module,
                update,
                alpha,
                source: prefix,
            },
            is_sgm,
        ));
    }
    // As diffusers does: when a kohya file mixes SGM and diffusers UNet names, the SGM ones
    // are dropped.
    let mixed_unet = resolved
        .iter()
        .any(|(l, sgm)| *sgm && l.component == LoraComponent::Unet)
        && resolved
            .iter()
            .any(|(l, sgm)| !*sgm && l.component == LoraComponent::Unet);
    let mut layers = Vec::with_capacity(resolved.len());
    for (layer, sgm) in resolved {
        if mixed_unet && sgm {
            skipped.push(SkippedKey {
                key: layer.source,
                reason: "SGM-named module in a file that also has diffusers-named UNet modules (diffusers ignores these too)".into(),
            });
        } else {
            layers.push(layer);
        }
    }
    // Two entries for one module would apply twice.
    let mut seen = HashMap::new();
    for l in &layers {
        if let Some(prev) = seen.insert((l.component, l.module.clone()), l.source.clone()) {
            return Err(Error::bad_weights(format!(
                "LoRA modules {prev} and {} both target {} {}",
                l.source,
                l.component.as_str(),
                l.module
            )));
        }
    }
    let naming = match (kohya, kohya_sgm, dotted) {
        (true, false, false) => LoraNaming::Kohya,
        (true, true, false) => LoraNaming::KohyaSgm,
        (false, _, true) => LoraNaming::Diffusers,
        _ => LoraNaming::Mixed,
    };
    Ok(ParsedLora {
        layers,
        skipped,
        naming,
        metadata,
    })
}

/// A kohya prefix's target: `Some((Some((component, path)), is_sgm))` when the prefix is a
/// kohya name, the inner `None` when its module path is not understood.
#[allow(clippy::type_complexity)]
fn kohya_target(prefix: &str) -> Option<(Option<(LoraComponent, String)>, bool)> {
    let (component, rest) = if let Some(r) = prefix.strip_prefix("lora_unet_") {
        (LoraComponent::Unet, r)
    } else if let Some(r) = prefix.strip_prefix("lora_te1_") {
        (LoraComponent::TextEncoder, r)
    } else if let Some(r) = prefix.strip_prefix("lora_te2_") {
        (LoraComponent::TextEncoder2, r)
    } else if let Some(r) = prefix.strip_prefix("lora_te_") {
        (LoraComponent::TextEncoder, r)
    } else {
        return None;
    };
    if prefix.contains('.') {
        return Some((None, false));
    }
    let Some(dotted) = underscores_to_path(rest) else {
        return Some((None, false));
    };
    if component == LoraComponent::Unet && is_sgm_path(&dotted) {
        return Some((sgm_to_diffusers(&dotted).map(|p| (component, p)), true));
    }
    Some((Some((component, dotted)), false))
}

/// Resolves a kohya module name (`lora_unet_…`, `lora_te1_…`, `lora_te2_…`, SGM names
/// included) to its component and diffusers / transformers module path.
pub fn kohya_to_module(name: &str) -> Option<(LoraComponent, String)> {
    kohya_target(name).and_then(|(t, _)| t)
}

/// The kohya name of a module (diffusers naming): `lora_unet_` + path with `_` for `.`.
pub fn module_to_kohya(component: LoraComponent, module: &str) -> String {
    format!("{}{}", component.kohya_prefix(), module.replace('.', "_"))
}

#[allow(clippy::type_complexity)]
fn dotted_target(prefix: &str) -> Option<(Option<(LoraComponent, String)>, bool)> {
    let mut p = prefix;
    for strip in ["base_model.model.", "model."] {
        if let Some(r) = p.strip_prefix(strip) {
            p = r;
        }
    }
    let (component, path) = if let Some(r) = p.strip_prefix("unet.") {
        (LoraComponent::Unet, r)
    } else if let Some(r) = p.strip_prefix("text_encoder_2.") {
        (LoraComponent::TextEncoder2, r)
    } else if let Some(r) = p.strip_prefix("text_encoder.") {
        (LoraComponent::TextEncoder, r)
    } else if let Some(r) = p.strip_prefix("diffusion_model.") {
        (LoraComponent::Unet, r)
    } else if p.starts_with("text_model.") {
        (LoraComponent::TextEncoder, p)
    } else {
        (LoraComponent::Unet, p)
    };
    if path.is_empty() || path.contains("..") || !path.contains('.') && !is_top_level_unet(path) {
        return None;
    }
    let mut path = path.to_string();
    // Old attention-processor names.
    let te = component != LoraComponent::Unet;
    for (old, unet_new, te_new) in [
        (".processor.to_q", ".to_q", ".q_proj"),
        (".processor.to_k", ".to_k", ".k_proj"),
        (".processor.to_v", ".to_v", ".v_proj"),
        (".processor.to_out", ".to_out.0", ".out_proj"),
        (".to_q", ".to_q", ".q_proj"),
        (".to_k", ".to_k", ".k_proj"),
        (".to_v", ".to_v", ".v_proj"),
        (".to_out", ".to_out.0", ".out_proj"),
    ] {
        if let Some(base) = path.strip_suffix(old) {
            // `….to_out` alone is the old processor spelling; `….to_out.0` is already a module.
            if old.starts_with(".processor") || te || old == ".to_out" {
                path = format!("{base}{}", if te { te_new } else { unet_new });
            }
            break;
        }
    }
    if component == LoraComponent::Unet && is_sgm_path(&path) {
        return Some((sgm_to_diffusers(&path).map(|p| (component, p)), true));
    }
    Some((Some((component, path)), false))
}

fn is_top_level_unet(path: &str) -> bool {
    matches!(path, "conv_in" | "conv_out")
}

fn is_sgm_path(path: &str) -> bool {
    let first = path.split('.').next().unwrap_or("");
    matches!(
        first,
        "input_blocks" | "middle_block" | "output_blocks" | "time_embed" | "label_emb" | "out"
    )
}

/// Identifiers that contain underscores (or are needed to split a kohya name), longest match
/// first. Digits-only segments are indices.
const WORDS: &[&str] = &[
    // diffusers UNet
    "down_blocks",
    "up_blocks",
    "mid_block",
    "attentions",
    "resnets",
    "transformer_blocks",
    "attn1",
    "attn2",
    "to_q",
    "to_k",
    "to_v",
    "to_out",
    "ff",
    "net",
    "proj",
    "proj_in",
    "proj_out",
    "norm",
    "norm1",
    "norm2",
    "norm3",
    "conv1",
    "conv2",
    "conv_shortcut",
    "time_emb_proj",
    "downsamplers",
    "upsamplers",
    "conv",
    "conv_in",
    "conv_out",
    "conv_norm_out",
    "time_embedding",
    "add_embedding",
    "linear_1",
    "linear_2",
    // SGM (LDM) UNet
    "input_blocks",
    "middle_block",
    "output_blocks",
    "in_layers",
    "out_layers",
    "emb_layers",
    "skip_connection",
    "op",
    "time_embed",
    "label_emb",
    "out",
    // CLIP text (transformers)
    "text_model",
    "encoder",
    "layers",
    "self_attn",
    "q_proj",
    "k_proj",
    "v_proj",
    "out_proj",
    "mlp",
    "fc1",
    "fc2",
    "text_projection",
    "embeddings",
    "token_embedding",
    "position_embedding",
    "final_layer_norm",
    "layer_norm1",
    "layer_norm2",
];

/// `down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q` →
/// `down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`, by longest known identifier
/// (or digit run) at each `_` boundary. `None` when a segment is not a known identifier.
pub fn underscores_to_path(name: &str) -> Option<String> {
    let mut out: Vec<&str> = Vec::new();
    let mut rest = name;
    while !rest.is_empty() {
        let boundary = |len: usize| len == rest.len() || rest.as_bytes()[len] == b'_';
        let digits = rest.bytes().take_while(|b| b.is_ascii_digit()).count();
        let len = if digits > 0 && boundary(digits) {
            digits
        } else {
            WORDS
                .iter()
                .filter(|w| rest.starts_with(*w) && boundary(w.len()))
                .map(|w| w.len())
                .max()?
        };
        out.push(&rest[..len]);
        rest = rest[len..].strip_prefix('_').unwrap_or(&rest[len..]);
        if rest.is_empty() && name.ends_with('_') {
            return None;
        }
    }
    if out.is_empty() {
        None
    } else {
        Some(out.join("."))
    }
}

/// Maps an SGM (original LDM) UNet module path (`input_blocks.4.1.transformer_blocks.0.attn1.to_q`,
/// `middle_block.0.emb_layers.1`, `output_blocks.2.2.conv`, `time_embed.0`, `out.2`, …) to
/// diffusers naming, with the single-file checkpoint table
/// ([`crate::weights::sgm_names::NameTable::unet`]) for SDXL base's layout (docs/hyperlora-model.md §5: input_blocks
/// 4,5 / 7,8 = down_blocks.1 / 2 attentions, middle_block.1 = mid_block.attentions.0,
/// output_blocks 0-2 / 3-5 = up_blocks.0 / 1 attentions). `None` when no rule covers the path.
pub fn sgm_to_diffusers(path: &str) -> Option<String> {
    use crate::weights::sgm_names::{NameTable, Transform, UnetLayout};
    static TABLE: std::sync::OnceLock<NameTable> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| NameTable::unet(&UnetLayout::sdxl_base()));
    let mut names = table.to_diffusers(&format!("{}{path}", table.prefix()));
    match (names.len(), names.pop()) {
        (1, Some((name, Transform::Identity))) => Some(name),
        _ => None,
    }
}

/// Alphas of a diffusers/PEFT file from its `lora_adapter_metadata` (`{component}.lora_alpha`,
/// `{component}.alpha_pattern`, `{component}.use_rslora`).
#[derive(Default)]
struct PeftAlphas {
    by_component: HashMap<&'static str, ComponentAlphas>,
}

/// `lora_alpha`, `alpha_pattern` entries, `use_rslora`.
type ComponentAlphas = (Option<f64>, Vec<(String, f64)>, bool);

impl PeftAlphas {
    fn from_metadata(metadata: &BTreeMap<String, String>) -> Self {
        let mut out = Self::default();
        let Some(raw) = metadata.get("lora_adapter_metadata") else {
            return out;
        };
        let Ok(serde_json::Value::Object(map)) = serde_json::from_str::<serde_json::Value>(raw)
        else {
            return out;
        };
        for c in [
            LoraComponent::Unet,
            LoraComponent::TextEncoder,
            LoraComponent::TextEncoder2,
        ] {
            let name = c.as_str();
            let get = |k: &str| map.get(&format!("{name}.{k}"));
            let alpha = get("lora_alpha").and_then(|v| v.as_f64());
            let pattern = match get("alpha_pattern") {
                Some(serde_json::Value::Object(p)) => p
                    .iter()
                    .filter_map(|(k, v)| v.as_f64().map(|a| (k.clone(), a)))
                    .collect(),
                _ => Vec::new(),
            };
            let rslora = get("use_rslora").and_then(|v| v.as_bool()).unwrap_or(false);
            if alpha.is_some() || !pattern.is_empty() {
                out.by_component.insert(name, (alpha, pattern, rslora));
            }
        }
        out
    }

    /// The alpha to store so that `alpha / rank` is PEFT's scale for this module.
    fn alpha(&self, component: LoraComponent, module: &str, rank: usize) -> Option<f32> {
        let (alpha, pattern, rslora) = self.by_component.get(component.as_str())?;
        let a = pattern
            .iter()
            .find(|(k, _)| module == k || module.ends_with(&format!(".{k}")))
            .map(|(_, a)| *a)
            .or(*alpha)?;
        // rsLoRA scales by alpha / sqrt(rank).
        let a = if *rslora { a * (rank as f64).sqrt() } else { a };
        Some(a as f32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;

    fn pair(prefix: &str, down_suffix: &str, up_suffix: &str) -> Vec<(String, Tensor)> {
        let dev = Device::Cpu;
        vec![
            (
                format!("{prefix}{down_suffix}"),
                Tensor::ones((2, 8), DType::F32, &dev).unwrap(),
            ),
            (
                format!("{prefix}{up_suffix}"),
                Tensor::ones((6, 2), DType::F32, &dev).unwrap(),
            ),
        ]
    }

    fn one(tensors: Vec<(String, Tensor)>, meta: BTreeMap<String, String>) -> LoraLayer {
        let p = parse_lora(tensors, meta).unwrap();
        assert!(p.skipped.is_empty(), "{:?}", p.skipped);
        assert_eq!(p.layers.len(), 1);
        p.layers.into_iter().next().unwrap()
    }

    #[test]
    fn kohya_file_with_alpha() {
        let mut t = pair(
            "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
            ".lora_down.weight",
            ".lora_up.weight",
        );
        t.push((
            "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.alpha".into(),
            Tensor::new(1f32, &Device::Cpu).unwrap(),
        ));
        let p = parse_lora(t, BTreeMap::new()).unwrap();
        assert_eq!(p.naming, LoraNaming::KohyaSgm);
        let l = &p.layers[0];
        assert_eq!(l.component, LoraComponent::Unet);
        assert_eq!(
            l.module,
            "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
        );
        assert_eq!((l.rank(), l.alpha, l.scale()), (Some(2), Some(1.0), 0.5));
    }

    #[test]
    fn peft_and_old_diffusers_names() {
        let m = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_out.0";
        for (prefix, down, up) in [
            (format!("unet.{m}"), ".lora_A.weight", ".lora_B.weight"),
            (
                format!("base_model.model.{m}"),
                ".lora_A.default.weight",
                ".lora_B.default.weight",
            ),
            (format!("unet.{m}"), ".lora.down.weight", ".lora.up.weight"),
            (
                "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.processor.to_out"
                    .into(),
                "_lora.down.weight",
                "_lora.up.weight",
            ),
            (
                "down_blocks.1.attentions.0.transformer_blocks.0.attn2.processor.to_out".into(),
                "_lora.down.weight",
                "_lora.up.weight",
            ),
        ] {
            let l = one(pair(&prefix, down, up), BTreeMap::new());
            assert_eq!(
                (l.component, l.module.as_str()),
                (LoraComponent::Unet, m),
                "{prefix}{down}"
            );
            assert_eq!(l.alpha, None);
            assert_eq!(l.scale(), 1.0);
        }
        let te = "text_model.encoder.layers.3.self_attn.q_proj";
        for (prefix, down, up, c) in [
            (
                format!("text_encoder.{te}"),
                ".lora_A.weight",
                ".lora_B.weight",
                LoraComponent::TextEncoder,
            ),
            (
                format!("text_encoder_2.{te}"),
                ".lora_A.weight",
                ".lora_B.weight",
                LoraComponent::TextEncoder2,
            ),
            (
                "text_encoder.text_model.encoder.layers.3.self_attn.to_q".into(),
                "_lora.down.weight",
                "_lora.up.weight",
                LoraComponent::TextEncoder,
            ),
            (
                "lora_te1_text_model_encoder_layers_3_self_attn_q_proj".into(),
                ".lora_down.weight",
                ".lora_up.weight",
                LoraComponent::TextEncoder,
            ),
            (
                "lora_te_text_model_encoder_layers_3_self_attn_q_proj".into(),
                ".lora_down.weight",
                ".lora_up.weight",
                LoraComponent::TextEncoder,
            ),
            (
                "lora_te2_text_model_encoder_layers_3_self_attn_q_proj".into(),
                ".lora_down.weight",
                ".lora_up.weight",
                LoraComponent::TextEncoder2,
            ),
        ] {
            let l = one(pair(&prefix, down, up), BTreeMap::new());
            assert_eq!((l.component, l.module.as_str()), (c, te), "{prefix}{down}");
        }
        let mlp = one(
            pair(
                "text_encoder.text_model.encoder.layers.0.mlp.fc1",
                ".lora_linear_layer.down.weight",
                ".lora_linear_layer.up.weight",
            ),
            BTreeMap::new(),
        );
        assert_eq!(mlp.module, "text_model.encoder.layers.0.mlp.fc1");
        // SGM dotted names (ComfyUI-style PEFT keys).
        let sgm = one(
            pair(
                "diffusion_model.output_blocks.2.1.transformer_blocks.9.attn2.to_k",
                ".lora_A.weight",
                ".lora_B.weight",
            ),
            BTreeMap::new(),
        );
        assert_eq!(
            sgm.module,
            "up_blocks.0.attentions.2.transformer_blocks.9.attn2.to_k"
        );
    }

    #[test]
    fn peft_alphas_from_metadata() {
        let mut meta = BTreeMap::new();
        meta.insert(
            "lora_adapter_metadata".to_string(),
            r#"{"unet.lora_alpha": 8, "unet.r": 2, "unet.alpha_pattern": {"attn2.to_k": 4},
               "text_encoder.lora_alpha": 1}"#
                .to_string(),
        );
        let mut t = pair(
            "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q",
            ".lora_A.weight",
            ".lora_B.weight",
        );
        t.extend(pair(
            "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k",
            ".lora_A.weight",
            ".lora_B.weight",
        ));
        t.extend(pair(
            "text_encoder.text_model.encoder.layers.0.self_attn.k_proj",
            ".lora_A.weight",
            ".lora_B.weight",
        ));
        let p = parse_lora(t, meta).unwrap();
        let alphas: Vec<_> = p.layers.iter().map(|l| l.alpha).collect();
        assert_eq!(alphas, [Some(8.0), Some(4.0), Some(1.0)]);
        assert_eq!(p.naming, LoraNaming::Diffusers);
    }

    #[test]
    fn unknown_and_broken_entries() {
        let mut t = pair(
            "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q",
            ".lora_down.weight",
            ".lora_up.weight",
        );
        t.push((
            "lora_unet_down_blocks_1_attentions_0_proj_in.w_norm".into(),
            Tensor::ones((2, 2), DType::F32, &Device::Cpu).unwrap(),
        ));
        t.push((
            "lora_unet_mid_block_resnets_0_conv1.dora_scale".into(),
            Tensor::ones((1, 2), DType::F32, &Device::Cpu).unwrap(),
        ));
        t.extend(pair(
            "unet.mid_block.resnets.1.time_emb_proj",
            ".lora_A.weight",
            ".lora_B.weight",
        ));
        t.push((
            "unet.mid_block.resnets.1.time_emb_proj.lora_magnitude_vector".into(),
            Tensor::ones(6, DType::F32, &Device::Cpu).unwrap(),
        ));
        t.extend(pair(
            "lora_unet_frobnicator_7",
            ".lora_down.weight",
            ".lora_up.weight",
        ));
        let p = parse_lora(t, BTreeMap::new()).unwrap();
        assert_eq!(p.layers.len(), 1);
        let reasons: Vec<&str> = p.skipped.iter().map(|s| s.reason.as_str()).collect();
        assert_eq!(
            reasons,
            [
                "not a tensor of a LoRA kind hyperlora knows",
                "DoRA (dora_scale) is not supported",
                "DoRA (dora_scale) is not supported",
                "module name not understood"
            ],
            "{:?}",
            p.skipped
        );
        // An incomplete LyCORIS module is malformed, naming what is missing.
        let lone = vec![(
            "lora_unet_conv_in.hada_w1_a".to_string(),
            Tensor::ones((2, 2), DType::F32, &Device::Cpu).unwrap(),
        )];
        let err = parse_lora(lone, BTreeMap::new()).unwrap_err();
        assert!(err.message.contains("lora_unet_conv_in.hada_w1_b"), "{err}");
        // Mixed SGM + diffusers UNet names: the SGM ones are dropped, as diffusers does.
        let mut t = pair(
            "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q",
            ".lora_down.weight",
            ".lora_up.weight",
        );
        t.extend(pair(
            "lora_unet_input_blocks_5_1_proj_in",
            ".lora_down.weight",
            ".lora_up.weight",
        ));
        let p = parse_lora(t, BTreeMap::new()).unwrap();
        assert_eq!(p.layers.len(), 1);
        assert_eq!(p.skipped[0].key, "lora_unet_input_blocks_5_1_proj_in");
        // Rank mismatch and a lone down are BAD_WEIGHTS naming the key.
        let dev = Device::Cpu;
        let bad = vec![
            (
                "proj_in.lora_down.weight".to_string(),
                Tensor::ones((2, 8), DType::F32, &dev).unwrap(),
            ),
            (
                "proj_in.lora_up.weight".to_string(),
                Tensor::ones((6, 3), DType::F32, &dev).unwrap(),
            ),
        ];
        let bad: Vec<_> = bad
            .into_iter()
            .map(|(k, v)| (format!("lora_unet_mid_block_attentions_0_{k}"), v))
            .collect();
        let err = parse_lora(bad, BTreeMap::new()).unwrap_err();
        assert_eq!(err.code, crate::ErrorCode::BadWeights);
        assert!(err.message.contains("lora_up.weight"), "{err}");
        let lone = vec![(
            "lora_unet_conv_in.lora_down.weight".to_string(),
            Tensor::ones((2, 8), DType::F32, &dev).unwrap(),
        )];
        assert!(parse_lora(lone, BTreeMap::new())
            .unwrap_err()
            .message
            .contains("lora_unet_conv_in.lora_down.weight"));
    }

    /// kohya's SDXL LoCon files (sd-scripts) name the original UNet's layers: every conv and
    /// Linear outside the transformers resolves to its diffusers module.
    #[test]
    fn sgm_names_of_convs_and_embeddings() {
        for (kohya, module) in [
            ("lora_unet_input_blocks_0_0", "conv_in"),
            (
                "lora_unet_input_blocks_1_0_in_layers_2",
                "down_blocks.0.resnets.0.conv1",
            ),
            (
                "lora_unet_input_blocks_1_0_emb_layers_1",
                "down_blocks.0.resnets.0.time_emb_proj",
            ),
            (
                "lora_unet_input_blocks_2_0_out_layers_3",
                "down_blocks.0.resnets.1.conv2",
            ),
            (
                "lora_unet_input_blocks_3_0_op",
                "down_blocks.0.downsamplers.0.conv",
            ),
            (
                "lora_unet_input_blocks_4_0_skip_connection",
                "down_blocks.1.resnets.0.conv_shortcut",
            ),
            (
                "lora_unet_middle_block_2_in_layers_2",
                "mid_block.resnets.1.conv1",
            ),
            (
                "lora_unet_output_blocks_2_2_conv",
                "up_blocks.0.upsamplers.0.conv",
            ),
            (
                "lora_unet_output_blocks_8_0_skip_connection",
                "up_blocks.2.resnets.2.conv_shortcut",
            ),
            ("lora_unet_time_embed_0", "time_embedding.linear_1"),
            ("lora_unet_time_embed_2", "time_embedding.linear_2"),
            ("lora_unet_label_emb_0_0", "add_embedding.linear_1"),
            ("lora_unet_label_emb_0_2", "add_embedding.linear_2"),
            ("lora_unet_out_2", "conv_out"),
        ] {
            assert_eq!(
                kohya_to_module(kohya),
                Some((LoraComponent::Unet, module.to_string())),
                "{kohya}"
            );
        }
    }

    #[test]
    fn underscore_paths() {
        assert_eq!(
            underscores_to_path("up_blocks_0_attentions_1_transformer_blocks_3_ff_net_0_proj")
                .unwrap(),
            "up_blocks.0.attentions.1.transformer_blocks.3.ff.net.0.proj"
        );
        assert_eq!(
            underscores_to_path("time_embedding_linear_1").unwrap(),
            "time_embedding.linear_1"
        );
        assert_eq!(
            underscores_to_path("mid_block_attentions_0_to_out_0").unwrap(),
            "mid_block.attentions.0.to_out.0"
        );
        assert!(underscores_to_path("mid_blocks_0").is_none());
        assert!(underscores_to_path("").is_none());
        assert_eq!(
            sgm_to_diffusers("input_blocks.6.0.op"),
            Some("down_blocks.1.downsamplers.0.conv".into())
        );
        // SDXL's last level has no downsampler, and the middle block three parts.
        assert_eq!(sgm_to_diffusers("input_blocks.9.0.op"), None);
        assert_eq!(sgm_to_diffusers("middle_block.3.proj_in"), None);
    }
}
