//! Applying LoRAs to SDXL (docs/hyperlora-model.md §5): for every targeted Linear,
//! `W' = W_base + Σ_loras weight × scale × (up @ down)` with `scale = alpha / rank` (1 without
//! an alpha). Weights may be negative; several LoRAs may target the same layer (identity + style,
//! or a concept slider: identity A at −0.7 plus identity B at +0.7). This is diffusers'
//! `fuse_lora(lora_scale=weight)` (PEFT's merge), with all LoRAs of a layer summed at once.
//!
//! The mechanism is a **merge into working copies**, never a reload: [`LoraMerger`] keeps the
//! base weight tensor of each layer it has touched (candle tensors are reference-counted, so this
//! is the very tensor the model was loaded with, not a copy) and rebuilds only the targeted layers
//! as merged copies on the weight's device and dtype (the update is computed in f32, added to the
//! base in f32 and cast back). Applying a new set first puts back the base of every layer the new
//! set no longer touches; an empty set restores the base exactly (the original tensors, so outputs
//! are bit-identical to the unmodified model). A low-rank side path (`y = Wx + Σ w·s·up(down(x))`)
//! was measured as the alternative (see `bench_switch_and_side_path` below; CPU, SDXL base's 560
//! attention Linears, rank 8): a switch by merge took ~5 s (f16 weights, 2 shared cores), while the
//! side path added ~6.5% to those Linears, ~1.1 s per denoising step at 1024² — more than a merge
//! after 5 steps of a 20-step generation — so merge is the mechanism (diffusers' `fuse_lora`).
//! A batch whose samples carry different LoRAs cannot be merged; it takes the side path
//! ([`super::per_sample`]).
//!
//! Only the Linears of the UNet's transformers (`attn1/attn2.to_q|to_k|to_v|to_out.0`,
//! `ff.net.0.proj`, `ff.net.2`, `proj_in`/`proj_out` when linear) and of the text encoders'
//! layers (`self_attn.{q,k,v,out}_proj`, `mlp.fc1|fc2`) can be targeted. Convolution LoRAs (LoCon,
//! 4-d `down`/`up`, e.g. for the `proj_in`/`proj_out` of models without linear projections; SDXL
//! uses linear ones) are refused with `INVALID_ARGUMENT`, as are modules the model does not have
//! and shape mismatches; nothing is changed when a set is refused.

use std::collections::{BTreeMap, HashMap, HashSet};

use candle_core::{DType, Tensor};
use candle_nn::Linear;

use super::names::{LoraComponent, LoraLayer};
use crate::sdxl::model::unet::UNet2DConditionModel;
use crate::sdxl::text::encoders::SdxlTextEncoders;
use crate::{Error, Result};

/// A Linear a LoRA may target: its component and module path (diffusers naming for the UNet,
/// transformers' `text_model.encoder.layers.N.…` for the text encoders).
pub struct LoraTarget<'a> {
    pub component: LoraComponent,
    pub module: String,
    pub linear: &'a mut Linear,
}

/// Every LoRA-targetable Linear of SDXL's UNet and two text encoders.
pub fn sdxl_targets<'a>(
    unet: &'a mut UNet2DConditionModel,
    text: &'a mut SdxlTextEncoders,
) -> Vec<LoraTarget<'a>> {
    let SdxlTextEncoders { clip_l, clip_g } = text;
    let tag = |component: LoraComponent| {
        move |(module, linear): (String, &'a mut Linear)| LoraTarget {
            component,
            module,
            linear,
        }
    };
    let mut out: Vec<LoraTarget<'a>> = unet
        .linears_mut()
        .into_iter()
        .map(tag(LoraComponent::Unet))
        .collect();
    out.extend(
        clip_l
            .linears_mut()
            .into_iter()
            .map(tag(LoraComponent::TextEncoder)),
    );
    out.extend(
        clip_g
            .linears_mut()
            .into_iter()
            .map(tag(LoraComponent::TextEncoder2)),
    );
    out
}

/// Text-encoder modules are named `text_model.encoder…`; files written against transformers 5's
/// flattened `CLIPTextModel` say `encoder…`. Both resolve to the same layer.
fn canonical(component: LoraComponent, module: &str) -> String {
    if component != LoraComponent::Unet && !module.starts_with("text_model.") {
        format!("text_model.{module}")
    } else {
        module.to_string()
    }
}

type Key = (LoraComponent, String);

/// Keeps the base weights of the layers a LoRA set has replaced and applies LoRA sets by merging
/// (see the module docs). One merger belongs to one model: always pass it the same model's
/// targets.
#[derive(Debug, Default)]
pub struct LoraMerger {
    /// The base weight of every layer that currently holds a merged copy.
    originals: HashMap<Key, Tensor>,
}

impl LoraMerger {
    pub fn new() -> Self {
        Self::default()
    }

    /// How many layers currently hold merged copies.
    pub fn merged_layers(&self) -> usize {
        self.originals.len()
    }

    /// The memory the applied set costs on top of the base model: one working copy per merged
    /// layer (the base tensors are the model's own, kept alive here instead of in the layer).
    pub fn overhead_bytes(&self) -> usize {
        self.originals
            .values()
            .map(|t| t.elem_count() * t.dtype().size_in_bytes())
            .sum()
    }

    /// Makes `loras` (each LoRA's layers with its weight) the active set on the model whose
    /// Linears `targets` lists: layers of the previous set that `loras` does not touch get their
    /// base weights back, targeted layers become `W_base + Σ weight · scale · (up @ down)`.
    /// Contributions with weight 0 are dropped (a layer left with none keeps its base weight).
    /// `loras` empty restores the base model exactly.
    ///
    /// Errors (`INVALID_ARGUMENT`, the model unchanged): a module the model does not have, a
    /// shape that does not match the layer, a convolution LoRA, a non-finite weight. Should the
    /// merge itself fail (e.g. out of device memory), every layer is restored to its base weight
    /// before the error is returned.
    pub fn apply(
        &mut self,
        targets: Vec<LoraTarget<'_>>,
        loras: &[(&[LoraLayer], f32)],
    ) -> Result<()> {
        let mut by_key: HashMap<Key, &mut Linear> = targets
            .into_iter()
            .map(|t| ((t.component, t.module), t.linear))
            .collect();

        // 1. Validate everything before touching the model.
        let mut plan: BTreeMap<Key, Vec<(&LoraLayer, f32)>> = BTreeMap::new();
        for (layers, weight) in loras {
            if !weight.is_finite() {
                return Err(Error::invalid_argument(format!(
                    "LoRA weight {weight} is not finite"
                )));
            }
            for layer in layers.iter() {
                let key = (layer.component, canonical(layer.component, &layer.module));
                check_linear(layer)?;
                let Some(linear) = by_key.get(&key) else {
                    return Err(Error::invalid_argument(format!(
                        "{}: the model has no such layer (LoRAs can target the Linears of the UNet's transformers and of the text encoders' layers)",
                        describe(layer)
                    )));
                };
                check_fits(layer, linear)?;
                let contributions = plan.entry(key).or_default();
                if *weight != 0.0 {
                    contributions.push((layer, *weight));
                }
            }
        }
        plan.retain(|_, c| !c.is_empty());

        // 2. Layers of the previous set that the new one leaves alone get their base back.
        let stale: Vec<Key> = self
            .originals
            .keys()
            .filter(|k| !plan.contains_key(*k))
            .cloned()
            .collect();
        for key in stale {
            let base = self.originals.remove(&key).expect("listed");
            if let Some(linear) = by_key.get_mut(&key) {
                **linear = Linear::new(base, linear.bias().cloned());
            }
        }

        // 3. Merge the targeted layers, each from its base weight.
        let mut failure = None;
        for (key, contributions) in &plan {
            let linear = by_key.get_mut(key).expect("validated");
            let base = self
                .originals
                .entry(key.clone())
                .or_insert_with(|| linear.weight().clone())
                .clone();
            match merged_weight(&base, contributions) {
                Ok(w) => **linear = Linear::new(w, linear.bias().cloned()),
                Err(e) => {
                    failure = Some(e.context(format!("merging LoRAs into {}", key.1)));
                    break;
                }
            }
        }
        if let Some(e) = failure {
            for (key, base) in self.originals.drain() {
                if let Some(linear) = by_key.get_mut(&key) {
                    **linear = Linear::new(base, linear.bias().cloned());
                }
            }
            return Err(e);
        }
        Ok(())
    }

    /// The layers that currently hold merged copies.
    pub fn merged(&self) -> HashSet<(LoraComponent, String)> {
        self.originals.keys().cloned().collect()
    }
}

/// How messages name a LoRA layer: its key in the file and the module it targets.
pub(crate) fn describe(layer: &LoraLayer) -> String {
    format!(
        "LoRA module {} ({} {})",
        layer.source,
        layer.component.as_str(),
        layer.module
    )
}

/// Refuses (`INVALID_ARGUMENT`) a convolution LoRA (4-d `down`/`up`).
pub(crate) fn check_linear(layer: &LoraLayer) -> Result<()> {
    if layer.down.rank() != 2 || layer.up.rank() != 2 {
        return Err(Error::invalid_argument(format!(
            "{}: convolution LoRAs (down {:?}, up {:?}) are not supported; SDXL's transformer projections are linear",
            describe(layer),
            layer.down.dims(),
            layer.up.dims()
        )));
    }
    Ok(())
}

/// Refuses (`INVALID_ARGUMENT`) a linear LoRA layer whose `up @ down` is not the shape of
/// `linear`'s weight.
pub(crate) fn check_fits(layer: &LoraLayer, linear: &Linear) -> Result<()> {
    let (out_f, in_f) = linear.weight().dims2()?;
    let (r, d_in) = layer.down.dims2()?;
    let (u_out, u_r) = layer.up.dims2()?;
    if d_in != in_f || u_out != out_f || u_r != r {
        return Err(Error::invalid_argument(format!(
            "{}: LoRA shapes up {:?} @ down {:?} do not fit the layer's weight [{out_f}, {in_f}]",
            describe(layer),
            layer.up.dims(),
            layer.down.dims()
        )));
    }
    Ok(())
}

/// `base + Σ weight · scale · (up @ down)`, computed in f32 on the base's device, returned in
/// the base's dtype. The LoRAs of a layer are stacked (`[up₁·w₁s₁ | up₂·w₂s₂ | …] @ [down₁; down₂;
/// …]`), so the full-size work is one matmul, one add and the two casts whatever their number.
fn merged_weight(base: &Tensor, contributions: &[(&LoraLayer, f32)]) -> Result<Tensor> {
    let device = base.device();
    let mut ups = Vec::with_capacity(contributions.len());
    let mut downs = Vec::with_capacity(contributions.len());
    for (layer, weight) in contributions {
        let up = layer.up.to_device(device)?.to_dtype(DType::F32)?;
        ups.push((up * (*weight as f64 * layer.scale() as f64))?);
        downs.push(layer.down.to_device(device)?.to_dtype(DType::F32)?);
    }
    let delta = Tensor::cat(&ups, 1)?.matmul(&Tensor::cat(&downs, 0)?)?;
    Ok((base.to_dtype(DType::F32)? + delta)?.to_dtype(base.dtype())?)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use candle_core::{DType, Device, Tensor};
    use candle_nn::VarBuilder;

    use super::*;
    use crate::clip::text::{ClipTextConfig, ClipTextModel, ClipTextModelWithProjection};
    use crate::lora::names::read_lora_file;
    use crate::sdxl::model::unet::{Config, UNet2DConditionModel};
    use crate::testing::{assert_close, fixture, load_fixture, max_abs_diff, tiny_model};
    use crate::ErrorCode;

    const STAGE: &str = "lora_apply";
    const TOL: f32 = 1e-4;
    const T: f64 = 421.0;

    struct Sdxl {
        unet: UNet2DConditionModel,
        text: SdxlTextEncoders,
        merger: LoraMerger,
    }

    fn vb(file: &str, dtype: DType) -> VarBuilder<'static> {
        // SAFETY: the tiny model files are not modified while the tests run.
        unsafe {
            VarBuilder::from_mmaped_safetensors(&[tiny_model(file)], dtype, &Device::Cpu).unwrap()
        }
    }

    fn tiny(dtype: DType) -> Sdxl {
        let config = Config::from_json(tiny_model("sdxl/unet/config.json")).unwrap();
        let unet = UNet2DConditionModel::new(
            vb("sdxl/unet/diffusion_pytorch_model.safetensors", dtype),
            &config,
        )
        .unwrap();
        let cfg = |sub: &str| {
            ClipTextConfig::from_json_file(tiny_model(&format!("sdxl/{sub}/config.json"))).unwrap()
        };
        let clip_l = ClipTextModel::load(
            vb("sdxl/text_encoder/model.fp16.safetensors", dtype),
            &cfg("text_encoder"),
        )
        .unwrap();
        let clip_g = ClipTextModelWithProjection::load(
            vb("sdxl/text_encoder_2/model.fp16.safetensors", dtype),
            &cfg("text_encoder_2"),
        )
        .unwrap();
        Sdxl {
            unet,
            text: SdxlTextEncoders::new(clip_l, clip_g),
            merger: LoraMerger::new(),
        }
    }

    impl Sdxl {
        fn apply(&mut self, loras: &[(&[LoraLayer], f32)]) -> Result<()> {
            let targets = sdxl_targets(&mut self.unet, &mut self.text);
            self.merger.apply(targets, loras)
        }

        fn unet_out(&self, f: &HashMap<String, Tensor>) -> Tensor {
            let dtype = self.unet.dtype();
            let get = |k: &str| f[k].to_dtype(dtype).unwrap();
            self.unet
                .forward(
                    &get("sample"),
                    T,
                    &get("encoder_hidden_states"),
                    &get("text_embeds"),
                    &get("time_ids"),
                )
                .unwrap()
        }

        /// (te1 penultimate, te2 penultimate, te2 text_embeds)
        fn text_out(&self, f: &HashMap<String, Tensor>) -> [Tensor; 3] {
            let ids = |k: &str| f[k].to_dtype(DType::U32).unwrap();
            let l = self.text.clip_l.forward(&ids("te_input_ids_l")).unwrap();
            let g = self.text.clip_g.forward(&ids("te_input_ids_g")).unwrap();
            [
                l.penultimate().clone(),
                g.penultimate().clone(),
                g.text_embeds.clone().unwrap(),
            ]
        }
    }

    fn lora(name: &str) -> Vec<LoraLayer> {
        let parsed =
            read_lora_file(fixture(STAGE, &format!("{name}.safetensors")), &Device::Cpu).unwrap();
        assert!(parsed.skipped.is_empty(), "{name}: {:?}", parsed.skipped);
        parsed.layers
    }

    /// One model for every case, switched from LoRA to LoRA without reloading: each switch must
    /// leave no trace of the previous set.
    #[test]
    fn every_layout_matches_diffusers_fuse_lora_across_switches() {
        let f = load_fixture(STAGE, "expected.safetensors");
        let mut m = tiny(DType::F32);
        assert_close("base", &m.unet_out(&f), &f["unet_base"], TOL);
        for name in ["kohya_diffusers", "kohya_sgm", "peft", "te"] {
            let layers = lora(name);
            for w in [0.85f32, -0.7] {
                m.apply(&[(&layers, w)]).unwrap();
                assert_eq!(m.merger.merged_layers(), layers.len());
                let what = format!("{name} w={w}");
                assert_close(
                    &what,
                    &m.unet_out(&f),
                    &f[&format!("unet_{name}_w{w}")],
                    TOL,
                );
                if name == "te" {
                    let [l, g, e] = m.text_out(&f);
                    let key = |k: &str| format!("{k}_te_w{w}");
                    assert_close(&what, &l, &f[&key("te1_penultimate")], TOL);
                    assert_close(&what, &g, &f[&key("te2_penultimate")], TOL);
                    assert_close(&what, &e, &f[&key("te2_text_embeds")], TOL);
                }
            }
        }
        let (a, b) = (lora("kohya_diffusers"), lora("slider_b"));
        m.apply(&[(&a, -0.7), (&b, 0.7)]).unwrap();
        assert_close("slider", &m.unet_out(&f), &f["unet_slider"], TOL);
        // Back to the base: text encoders too.
        m.apply(&[]).unwrap();
        assert_eq!(m.merger.merged_layers(), 0);
        assert_close("base again", &m.unet_out(&f), &f["unet_base"], TOL);
        let [l, g, e] = m.text_out(&f);
        assert_close("te1 base", &l, &f["te1_penultimate_base"], TOL);
        assert_close("te2 base", &g, &f["te2_penultimate_base"], TOL);
        assert_close("te2 embeds base", &e, &f["te2_text_embeds_base"], TOL);
    }

    /// diffusers' "scale 0 equals baseline": an empty set (or weight 0) gives exactly the
    /// unmodified model's outputs, and the layers hold the very tensors they were loaded with.
    #[test]
    fn an_empty_set_restores_the_base_bit_for_bit() {
        let f = load_fixture(STAGE, "expected.safetensors");
        let mut m = tiny(DType::F32);
        let before = m.unet_out(&f);
        let text_before = m.text_out(&f);
        let ids: HashMap<Key, candle_core::TensorId> = sdxl_targets(&mut m.unet, &mut m.text)
            .into_iter()
            .map(|t| ((t.component, t.module), t.linear.weight().id()))
            .collect();
        let (a, te) = (lora("kohya_diffusers"), lora("te"));
        m.apply(&[(&a, 0.85), (&te, -0.7)]).unwrap();
        assert!(max_abs_diff(&m.unet_out(&f), &before).0 > 1e-3);
        m.apply(&[]).unwrap();
        assert_close("restored", &m.unet_out(&f), &before, 0.0);
        for (x, y) in m.text_out(&f).iter().zip(&text_before) {
            assert_close("restored text", x, y, 0.0);
        }
        for t in sdxl_targets(&mut m.unet, &mut m.text) {
            let id = ids[&(t.component, t.module.clone())];
            assert_eq!(t.linear.weight().id(), id, "{}", t.module);
        }
        m.apply(&[(&a, 0.0)]).unwrap();
        assert_eq!(m.merger.merged_layers(), 0);
        assert_close("weight 0", &m.unet_out(&f), &before, 0.0);
    }

    #[test]
    fn switching_keeps_only_the_new_sets_layers_and_reports_the_overhead() {
        let mut m = tiny(DType::F32);
        let (a, sgm) = (lora("kohya_diffusers"), lora("kohya_sgm"));
        m.apply(&[(&a, 1.0)]).unwrap();
        let first = m.merger.merged();
        assert_eq!(first.len(), a.len());
        m.apply(&[(&sgm, 1.0)]).unwrap();
        let second = m.merger.merged();
        assert_eq!(second.len(), sgm.len());
        assert!(first.is_disjoint(&second));
        let bytes: usize = sgm
            .iter()
            .map(|l| l.up.dims()[0] * l.down.dims()[1] * 4)
            .sum();
        assert_eq!(m.merger.overhead_bytes(), bytes);
    }

    fn layer(module: &str, out_f: usize, in_f: usize, r: usize) -> LoraLayer {
        LoraLayer {
            component: LoraComponent::Unet,
            module: module.into(),
            down: Tensor::ones((r, in_f), DType::F32, &Device::Cpu).unwrap(),
            up: Tensor::ones((out_f, r), DType::F32, &Device::Cpu).unwrap(),
            alpha: None,
            source: format!("test_{module}"),
        }
    }

    const Q: &str = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q";

    #[test]
    fn bad_sets_are_refused_and_leave_the_model_unchanged() {
        let f = load_fixture(STAGE, "expected.safetensors");
        let mut m = tiny(DType::F32);
        let a = lora("kohya_diffusers");
        m.apply(&[(&a, 0.85)]).unwrap();
        let applied = m.merger.merged();

        let missing = "down_blocks.7.attentions.0.transformer_blocks.0.attn1.to_q";
        let bad = [layer(Q, 32, 32, 2), layer(missing, 32, 32, 2)];
        let e = m.apply(&[(&bad, 1.0)]).unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidArgument);
        assert!(e.message.contains(missing), "{e}");

        let bad = [layer(Q, 32, 16, 2)];
        let e = m.apply(&[(&bad, 1.0)]).unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidArgument);
        assert!(
            e.message.contains(Q)
                && e.message.contains("[32, 2]")
                && e.message.contains("[2, 16]")
                && e.message.contains("[32, 32]"),
            "{e}"
        );

        let mut conv = layer(Q, 32, 32, 2);
        conv.down = conv.down.reshape((2, 32, 1, 1)).unwrap();
        conv.up = conv.up.reshape((32, 2, 1, 1)).unwrap();
        let e = m.apply(&[(&[conv], 1.0)]).unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidArgument);
        assert!(e.message.contains("convolution"), "{e}");

        let e = m.apply(&[(&a, f32::NAN)]).unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidArgument);

        assert_eq!(m.merger.merged(), applied);
        assert_close(
            "unchanged",
            &m.unet_out(&f),
            &f["unet_kohya_diffusers_w0.85"],
            TOL,
        );
    }

    #[test]
    fn text_encoder_modules_resolve_with_or_without_text_model() {
        let mut m = tiny(DType::F32);
        let te = lora("te");
        let flat: Vec<LoraLayer> = te
            .iter()
            .map(|l| LoraLayer {
                module: l.module.trim_start_matches("text_model.").to_string(),
                ..l.clone()
            })
            .collect();
        let f = load_fixture(STAGE, "expected.safetensors");
        m.apply(&[(&flat, 0.85)]).unwrap();
        let [l, ..] = m.text_out(&f);
        assert_close("flat names", &l, &f["te1_penultimate_te_w0.85"], TOL);
    }

    /// f16 weights: the merge happens in f32 and is cast back; the layers stay f16.
    #[test]
    fn f16_weights_stay_f16_and_close() {
        let f = load_fixture(STAGE, "expected.safetensors");
        let mut m = tiny(DType::F16);
        let (a, b) = (lora("kohya_diffusers"), lora("slider_b"));
        m.apply(&[(&a, -0.7), (&b, 0.7)]).unwrap();
        for t in sdxl_targets(&mut m.unet, &mut m.text) {
            assert_eq!(t.linear.weight().dtype(), DType::F16);
        }
        let out = m.unet_out(&f);
        assert_eq!(out.dtype(), DType::F16);
        assert_close("slider f16", &out, &f["unet_slider"], 3e-2);
    }

    /// Benchmark, not a test: `cargo test --release -p hyperlora --lib lora::apply::tests::bench
    /// -- --ignored --nocapture`. On the CPU, with SDXL base's attention Linears (the layers an
    /// identity LoRA targets: `to_q|to_k|to_v|to_out.0` of attn1 and attn2 in 70 transformer
    /// blocks; 10 at 640 channels, 60 at 1280; cross-attention from 2048), rank 8:
    /// (a) the time to switch identity by merging (f16 weights, full size), and (b) the per-step
    /// cost of those Linears at 1024×1024 merged vs with a low-rank side path, measured on one
    /// block per width (f32) and scaled to the 70 blocks.
    #[test]
    #[ignore]
    fn bench_switch_and_side_path() {
        use std::time::Instant;
        let dev = Device::Cpu;
        let rank = 8;
        // (channels, blocks, image tokens at 1024²)
        let levels = [(640usize, 10usize, 4096usize), (1280, 60, 1024)];
        let random_lora = |module: &str, o: usize, i: usize| LoraLayer {
            component: LoraComponent::Unet,
            module: module.into(),
            down: (Tensor::randn(0f32, 1.0, (rank, i), &dev).unwrap() * 0.01).unwrap(),
            up: (Tensor::randn(0f32, 1.0, (o, rank), &dev).unwrap() * 0.01).unwrap(),
            alpha: Some(rank as f32 / 2.0),
            source: module.into(),
        };

        // (a) switch time, full size, f16.
        let mut linears = Vec::new();
        let (mut id_a, mut id_b) = (Vec::new(), Vec::new());
        for (c, blocks, _) in levels {
            for b in 0..blocks {
                for (name, o, i) in crate::testing::sdxl_attention_linears(c) {
                    let module = format!("c{c}.block{b}.{name}");
                    let w = Tensor::zeros((o, i), DType::F16, &dev).unwrap();
                    linears.push((module.clone(), Linear::new(w, None)));
                    id_a.push(random_lora(&module, o, i));
                    id_b.push(random_lora(&module, o, i));
                }
            }
        }
        let params: usize = linears.iter().map(|(_, l)| l.weight().elem_count()).sum();
        let mut merger = LoraMerger::new();
        let run = |merger: &mut LoraMerger,
                   linears: &mut Vec<(String, Linear)>,
                   set: &[(&[LoraLayer], f32)]| {
            let targets = linears
                .iter_mut()
                .map(|(m, l)| LoraTarget {
                    component: LoraComponent::Unet,
                    module: m.clone(),
                    linear: l,
                })
                .collect();
            let t0 = Instant::now();
            merger.apply(targets, set).unwrap();
            t0.elapsed().as_secs_f64()
        };
        let first = run(&mut merger, &mut linears, &[(&id_a, 0.85)]);
        let mut switches = Vec::new();
        for k in 0..3 {
            let id = if k % 2 == 0 { &id_b } else { &id_a };
            switches.push(run(&mut merger, &mut linears, &[(id, 0.85)]));
        }
        let slider = run(&mut merger, &mut linears, &[(&id_a, -0.7), (&id_b, 0.7)]);
        let overhead = merger.overhead_bytes();
        let restore = run(&mut merger, &mut linears, &[]);
        switches.sort_by(f64::total_cmp);
        println!(
            "merge, {} Linears, {:.0} M params, f16, rank {rank}: first apply {:.2} s, switch A<->B median {:.2} s, slider (2 LoRAs) {:.2} s, restore base {:.4} s, overhead {:.2} GB",
            linears.len(),
            params as f64 / 1e6,
            first,
            switches[1],
            slider,
            restore,
            overhead as f64 / 1e9
        );
        drop(linears);

        // (b) per-step cost: one block per width, f32.
        let time = |f: &dyn Fn() -> Tensor| {
            f(); // warm-up
            let t0 = Instant::now();
            let reps = 3;
            for _ in 0..reps {
                f();
            }
            t0.elapsed().as_secs_f64() / reps as f64
        };
        let (mut merged_total, mut side_total) = (0.0, 0.0);
        for (c, blocks, tokens) in levels {
            let x_img = Tensor::randn(0f32, 1.0, (1, tokens, c), &dev).unwrap();
            let x_txt = Tensor::randn(0f32, 1.0, (1, 77, 2048), &dev).unwrap();
            let (mut merged, mut side) = (0.0, 0.0);
            for (name, o, i) in crate::testing::sdxl_attention_linears(c) {
                let x = if i == 2048 { &x_txt } else { &x_img };
                let w = Tensor::randn(0f32, 0.02, (o, i), &dev).unwrap();
                let lin = Linear::new(w, None);
                let l = random_lora(name, o, i);
                let (down_t, up_t) = (l.down.t().unwrap(), l.up.t().unwrap());
                let s = 0.85 * l.scale() as f64;
                merged += time(&|| candle_core::Module::forward(&lin, x).unwrap());
                side += time(&|| {
                    let y = candle_core::Module::forward(&lin, x).unwrap();
                    let lo = x
                        .broadcast_matmul(&down_t)
                        .unwrap()
                        .broadcast_matmul(&up_t)
                        .unwrap();
                    (y + (lo * s).unwrap()).unwrap()
                });
            }
            println!(
                "per step, {c} ch, {tokens} tokens: merged {:.1} ms/block, side path {:.1} ms/block (+{:.1}%)",
                merged * 1e3,
                side * 1e3,
                (side / merged - 1.0) * 100.0
            );
            merged_total += merged * blocks as f64;
            side_total += side * blocks as f64;
        }
        println!(
            "per step, 70 blocks' attention Linears at 1024²: merged {:.2} s, side path {:.2} s (+{:.2} s per step, +{:.1}%)",
            merged_total,
            side_total,
            side_total - merged_total,
            (side_total / merged_total - 1.0) * 100.0
        );
    }
}
