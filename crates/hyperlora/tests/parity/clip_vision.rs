//! Parity of the CLIP vision tower with transformers' on a tiny CLIP ViT
//! (scripts/fixtures/clip_vision.py).

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use hyperlora::clip::vision::{ClipVisionConfig, ClipVisionModel, ClipVisionOutput};

use crate::common::{assert_close, load_fixture, tiny_clip_vision as tiny, tiny_model};

const STAGE: &str = "clip_vision";

const TOL: f32 = 1e-4;

fn check(what: &str, out: &ClipVisionOutput, f: &HashMap<String, Tensor>, tol: f32) {
    assert_eq!(out.hidden_states.len(), 4);
    for i in 0..2 {
        assert_close(
            &format!("{what} hidden_states.{i}"),
            &out.hidden_states[i],
            &f[&format!("hidden_states.{i}")],
            tol,
        );
    }
    assert_close(
        &format!("{what} penultimate"),
        out.penultimate(),
        &f["penultimate"],
        tol,
    );
    assert_close(
        &format!("{what} last_hidden_state"),
        out.last_hidden_state(),
        &f["last_hidden_state"],
        tol,
    );
    assert_close(&format!("{what} pooled"), &out.pooled, &f["pooled"], tol);
    assert_close(
        &format!("{what} image_embeds"),
        out.image_embeds.as_ref().expect("projection"),
        &f["image_embeds"],
        tol,
    );
}

#[test]
fn matches_transformers() {
    let f = load_fixture(STAGE, "batch.safetensors");
    let model = tiny(DType::F32);
    assert!(model.has_projection());
    let out = model.forward(&f["pixel_values"]).unwrap();
    check("clip vision", &out, &f, TOL);
    let pen = model.penultimate(&f["pixel_values"]).unwrap();
    assert_eq!(pen.dims(), [2, 5, 32]);
    assert_close("penultimate()", &pen, &f["penultimate"], TOL);
}

#[test]
fn unprefixed_layout_and_missing_projection_load() {
    // transformers 5's bare CLIPVisionModel writes `embeddings.…` with no prefix and has
    // no `visual_projection`.
    let path = tiny_model("clip-vision/model.safetensors");
    let tensors: HashMap<String, Tensor> = candle_core::safetensors::load(path, &Device::Cpu)
        .unwrap()
        .into_iter()
        .filter(|(k, _)| k.starts_with("vision_model."))
        .map(|(k, v)| (k["vision_model.".len()..].to_string(), v))
        .collect();
    let vb = VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
    let cfg = ClipVisionConfig::from_json_file(tiny_model("clip-vision/config.json")).unwrap();
    let model = ClipVisionModel::load(vb, &cfg).unwrap();
    assert!(!model.has_projection());
    let f = load_fixture(STAGE, "batch.safetensors");
    let out = model.forward(&f["pixel_values"]).unwrap();
    assert!(out.image_embeds.is_none());
    assert_close(
        "unprefixed penultimate",
        out.penultimate(),
        &f["penultimate"],
        TOL,
    );
    assert_close("unprefixed pooled", &out.pooled, &f["pooled"], TOL);
}

#[test]
fn f16_weights_run_close() {
    let f = load_fixture(STAGE, "batch.safetensors");
    let model = tiny(DType::F16);
    let pen = model.penultimate(&f["pixel_values"]).unwrap();
    assert_eq!(pen.dtype(), DType::F16);
    assert_close("clip vision f16 penultimate", &pen, &f["penultimate"], 2e-2);
}
