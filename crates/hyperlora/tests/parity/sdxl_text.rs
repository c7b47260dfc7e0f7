//! Parity of the CLIP text encoders with transformers' and of the SDXL prompt encoding with
//! diffusers' `encode_prompt` and A1111's emphasis, on the tiny SDXL's text encoders
//! (scripts/fixtures/sdxl_text.py).

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use hyperlora::clip::text::{ClipTextModel, ClipTextModelWithProjection, ClipTextOutput};
use hyperlora::sdxl::text::encoders::SdxlTextEncoders;

use crate::common::{
    assert_close, load_fixture, tiny_clip_g, tiny_clip_l, tiny_model, tiny_text_config,
    tiny_text_vb,
};

const STAGE: &str = "sdxl_text";

const TOL: f32 = 1e-4;

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
fn clip_l_matches_transformers() {
    let f = load_fixture(STAGE, "clip_l_batch.safetensors");
    let out = tiny_clip_l().forward(&ids(&f["input_ids"])).unwrap();
    assert_eq!(out.hidden_states.len(), 4);
    check_output("clip_l", &out, &f);
}

#[test]
fn clip_g_matches_transformers() {
    let f = load_fixture(STAGE, "clip_g_batch.safetensors");
    let out = tiny_clip_g().forward(&ids(&f["input_ids"])).unwrap();
    check_output("clip_g", &out, &f);
}

#[test]
fn first_eos_pooling_for_new_configs() {
    let f = load_fixture(STAGE, "clip_g_eos49407.safetensors");
    let mut cfg = tiny_text_config("text_encoder_2");
    cfg.eos_token_id = 49407;
    let model = ClipTextModelWithProjection::load(tiny_text_vb("text_encoder_2", DType::F32), &cfg)
        .unwrap();
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
    let model = ClipTextModel::load(prefixed, &tiny_text_config("text_encoder")).unwrap();
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
        tiny_text_vb("text_encoder_2", DType::F16),
        &tiny_text_config("text_encoder_2"),
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
    let enc = SdxlTextEncoders::new(tiny_clip_l(), tiny_clip_g());
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
        tiny_text_vb("text_encoder", DType::F32),
        &tiny_text_config("text_encoder"),
        tiny_text_vb("text_encoder_2", DType::F32),
        &tiny_text_config("text_encoder_2"),
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
