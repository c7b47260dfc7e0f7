//! Parity of LoRA merging with diffusers' `fuse_lora` and the LyCORIS formulas on the tiny SDXL
//! (scripts/fixtures/lora_apply.py: the `lora_apply` and `lora_kinds` stages).

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use hyperlora::clip::text::{ClipTextConfig, ClipTextModel, ClipTextModelWithProjection};
use hyperlora::lora::{
    read_lora_file, LoraComponent, LoraLayer, LoraMerger, LoraUpdate, SkippedKey,
};
use hyperlora::sdxl::model::unet::{Config, UNet2DConditionModel};
use hyperlora::sdxl::pipeline::sdxl_targets;
use hyperlora::sdxl::text::encoders::SdxlTextEncoders;
use hyperlora::{ErrorCode, Result};

use crate::common::{assert_close, fixture, load_fixture, max_abs_diff, tiny_model};

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
    fn apply(&mut self, loras: &[(&[LoraLayer], f32)]) -> Result<Vec<Vec<SkippedKey>>> {
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

const KINDS: &str = "lora_kinds";

fn kind(name: &str) -> Vec<LoraLayer> {
    let parsed =
        read_lora_file(fixture(KINDS, &format!("{name}.safetensors")), &Device::Cpu).unwrap();
    assert!(parsed.skipped.is_empty(), "{name}: {:?}", parsed.skipped);
    parsed.layers
}

/// LoCon (3x3 and 1x1 convolutions, Linears outside the transformers; plain and Tucker),
/// LoHa (flattened and Tucker), LoKr (every factor form), full differences (with bias), and
/// an f16 file mixing
/// UNet convolutions and Linears with both text encoders: each merged at 0.8 and −0.6 equals
/// its reference (diffusers' fuse_lora, or the LyCORIS formulas in PyTorch), switching from
/// one to the next in place; weight 0 is the base model bit for bit.
#[test]
fn every_lora_kind_matches_its_reference() {
    let f = load_fixture(KINDS, "expected.safetensors");
    let mut m = tiny(DType::F32);
    let base = m.unet_out(&f);
    assert_close("base", &base, &f["unet_base"], TOL);
    for name in ["locon", "mixed", "loha", "lokr", "locon_tucker", "diff"] {
        let layers = kind(name);
        for w in [0.8f32, -0.6] {
            let report = m.apply(&[(&layers, w)]).unwrap();
            assert!(report[0].is_empty(), "{name}: {:?}", report[0]);
            assert_eq!(m.merger.merged_layers(), layers.len(), "{name}");
            let what = format!("{name} w={w}");
            let key = |k: &str| format!("{k}_{name}_w{w}");
            assert_close(&what, &m.unet_out(&f), &f[&key("unet")], TOL);
            if name == "mixed" {
                let [l, g, e] = m.text_out(&f);
                assert_close(&what, &l, &f[&key("te1_penultimate")], TOL);
                assert_close(&what, &g, &f[&key("te2_penultimate")], TOL);
                assert_close(&what, &e, &f[&key("te2_text_embeds")], TOL);
            }
        }
        m.apply(&[(&layers, 0.0)]).unwrap();
        assert_eq!(m.merger.merged_layers(), 0);
        assert_close(&format!("{name} w=0"), &m.unet_out(&f), &base, 0.0);
    }
    // Convolutions and biases are put back exactly too.
    let (locon, diff) = (kind("locon"), kind("diff"));
    m.apply(&[(&locon, 0.8), (&diff, -0.6)]).unwrap();
    assert!(max_abs_diff(&m.unet_out(&f), &base).0 > 1e-2);
    m.apply(&[]).unwrap();
    assert_close("restored", &m.unet_out(&f), &base, 0.0);
}

/// A file with modules that match no layer applies the rest and says what it left out; one
/// where nothing matches is refused, naming the file.
#[test]
fn unmatched_keys_are_reported_and_a_file_of_them_refused() {
    let f = load_fixture(KINDS, "expected.safetensors");
    let path = fixture(KINDS, "partial.safetensors");
    let parsed = read_lora_file(&path, &Device::Cpu).unwrap();
    let skipped: Vec<&str> = parsed.skipped.iter().map(|s| s.key.as_str()).collect();
    assert_eq!(
        skipped,
        [
            "lora_unet_mid_block_resnets_0_norm1.w_norm",
            "lora_unet_frobnicator_7",
            "lora_unet_mid_block_resnets_0_conv2"
        ],
        "{:?}",
        parsed.skipped
    );
    let mut m = tiny(DType::F32);
    let report = m.apply(&[(&parsed.layers, 0.8)]).unwrap();
    assert_eq!(report[0].len(), 1, "{report:?}");
    assert_eq!(report[0][0].key, "lora_unet_down_blocks_0_resnets_0_conv1");
    assert!(
        report[0][0].reason.contains("[320, 2, 1, 1]")
            && report[0][0].reason.contains("[16, 16, 3, 3]"),
        "{report:?}"
    );
    assert_close("partial", &m.unet_out(&f), &f["unet_partial_w0.8"], TOL);

    let nothing = fixture(KINDS, "nothing.safetensors");
    let e = read_lora_file(&nothing, &Device::Cpu).unwrap_err();
    assert_eq!(e.code, ErrorCode::InvalidArgument, "{e}");
    assert!(
        e.message.contains("nothing.safetensors") && e.message.contains("2 keys ignored"),
        "{e}"
    );
}

/// f16 weights: LoCon, LoHa and LoKr merge in f32 and are cast back; convolutions stay f16.
#[test]
fn f16_convolutions_stay_f16_and_close() {
    let f = load_fixture(KINDS, "expected.safetensors");
    let mut m = tiny(DType::F16);
    let (locon, loha, lokr) = (kind("locon"), kind("loha"), kind("lokr"));
    for (name, layers) in [("locon", &locon), ("loha", &loha), ("lokr", &lokr)] {
        m.apply(&[(layers, 0.8)]).unwrap();
        for t in sdxl_targets(&mut m.unet, &mut m.text) {
            assert_eq!(t.layer.weight().dtype(), DType::F16);
        }
        let out = m.unet_out(&f);
        assert_close(name, &out, &f[&format!("unet_{name}_w0.8")], 5e-2);
    }
}

/// diffusers' "scale 0 equals baseline": an empty set (or weight 0) gives exactly the
/// unmodified model's outputs, and the layers hold the very tensors they were loaded with.
#[test]
fn an_empty_set_restores_the_base_bit_for_bit() {
    let f = load_fixture(STAGE, "expected.safetensors");
    let mut m = tiny(DType::F32);
    let before = m.unet_out(&f);
    let text_before = m.text_out(&f);
    let ids: HashMap<(LoraComponent, String), candle_core::TensorId> =
        sdxl_targets(&mut m.unet, &mut m.text)
            .into_iter()
            .map(|t| ((t.component, t.module), t.layer.weight().id()))
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
        assert_eq!(t.layer.weight().id(), id, "{}", t.module);
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
        .map(|l| l.update.delta_dims().unwrap().iter().product::<usize>() * 4)
        .sum();
    assert_eq!(m.merger.overhead_bytes(), bytes);
}

fn layer(module: &str, out_f: usize, in_f: usize, r: usize) -> LoraLayer {
    LoraLayer::low_rank(
        LoraComponent::Unet,
        module,
        Tensor::ones((r, in_f), DType::F32, &Device::Cpu).unwrap(),
        Tensor::ones((out_f, r), DType::F32, &Device::Cpu).unwrap(),
        None,
        format!("test_{module}"),
    )
}

const Q: &str = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q";

/// Modules without a layer, or whose update does not fit it, are left out and reported; a
/// LoRA none of whose modules fits, or a non-finite weight, is refused without effect.
#[test]
fn unfit_modules_are_reported_and_unusable_sets_refused() {
    let f = load_fixture(STAGE, "expected.safetensors");
    let mut m = tiny(DType::F32);
    let a = lora("kohya_diffusers");
    m.apply(&[(&a, 0.85)]).unwrap();
    let applied = m.merger.merged();

    let missing = "down_blocks.7.attentions.0.transformer_blocks.0.attn1.to_q";
    let narrow = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k";
    let set = [
        layer(Q, 32, 32, 2),
        layer(missing, 32, 32, 2),
        layer(narrow, 32, 16, 2),
    ];
    let report = m.apply(&[(&set, 1.0)]).unwrap();
    assert_eq!(m.merger.merged_layers(), 1);
    let why: Vec<(&str, &str)> = report[0]
        .iter()
        .map(|s| (s.key.as_str(), s.reason.as_str()))
        .collect();
    assert_eq!(why.len(), 2, "{why:?}");
    assert!(
        why[0].0.contains(missing) && why[0].1.contains("no unet layer"),
        "{why:?}"
    );
    assert!(
        why[1].1.contains("up [32, 2] @ down [2, 16]") && why[1].1.contains("[32, 32]"),
        "{why:?}"
    );
    m.apply(&[(&a, 0.85)]).unwrap();

    let mut conv = layer(Q, 32, 32, 2);
    conv.update = LoraUpdate::LowRank {
        down: Tensor::ones((2, 32, 3, 3), DType::F32, &Device::Cpu).unwrap(),
        up: Tensor::ones((32, 2, 1, 1), DType::F32, &Device::Cpu).unwrap(),
    };
    for bad in [vec![layer(missing, 32, 32, 2)], vec![conv]] {
        let e = m.apply(&[(&a, 0.5), (&bad, 1.0)]).unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidArgument);
        assert!(e.message.contains("none of the LoRA's 1 modules"), "{e}");
    }
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
        assert_eq!(t.layer.weight().dtype(), DType::F16);
    }
    let out = m.unet_out(&f);
    assert_eq!(out.dtype(), DType::F16);
    assert_close("slider f16", &out, &f["unet_slider"], 3e-2);
}
