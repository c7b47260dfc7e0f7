//! Parity of the portrait scores (scripts/fixtures/clip_score.py): CLIP's text tower and
//! projections and `CLIPModel`'s image–text cosine against transformers on the tiny CLIPModel,
//! and the likeness against insightface on the face fixture's photos.

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use hyperlora::clip::score::{clip_pixels, ClipScorer};
use hyperlora::clip::text::{ClipTextConfig, ClipTextModelWithProjection};
use hyperlora::face::likeness::{mean_embedding, NO_FACE_REASON};
use hyperlora::face::FaceAnalyzer;
use hyperlora::sdxl::text::tokenizer::{ClipTokenizer, SDXL_PAD_TOKEN};
use hyperlora::CancelToken;

use crate::common::{
    assert_close, load_fixture, repo_root, rgb_image, tiny_clip_vision, tiny_model,
};

const STAGE: &str = "clip_score";
const TOL: f32 = 1e-4;
const PROMPTS: usize = 3;
const IMAGES: [&str; 3] = ["square", "tall", "wide"];

fn prompts() -> Vec<String> {
    let meta: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(crate::common::fixture(STAGE, "clip.json")).unwrap(),
    )
    .unwrap();
    meta["params"]["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap().to_string())
        .collect()
}

fn merges() -> std::path::PathBuf {
    repo_root().join("models/clip-tokenizer/merges.txt")
}

fn scorer() -> ClipScorer {
    ClipScorer::new(
        tiny_clip_vision(DType::F32),
        &tiny_model("clip-vision"),
        Some(&merges()),
    )
}

#[test]
fn text_tower_and_projections_match_transformers() {
    let f = load_fixture(STAGE, "clip.safetensors");
    let dir = tiny_model("clip-vision");
    let config = ClipTextConfig::from_json_file(dir.join("config.json")).unwrap();
    let vb = unsafe {
        VarBuilder::from_mmaped_safetensors(
            &[dir.join("model.safetensors")],
            DType::F32,
            &Device::Cpu,
        )
    }
    .unwrap();
    let model = ClipTextModelWithProjection::load(vb, &config).unwrap();
    // CLIPProcessor's ids (padding to 77, truncation to BOS + 75 + EOS) from CLIP's merges alone.
    let tokenizer = ClipTokenizer::from_merges_file(merges(), SDXL_PAD_TOKEN).unwrap();
    let expected = f["input_ids"]
        .to_dtype(DType::U32)
        .unwrap()
        .to_vec2::<u32>()
        .unwrap();
    for (p, want) in prompts().iter().zip(&expected) {
        assert_eq!(&tokenizer.encode_window(p)[..], &want[..], "{p}");
    }
    let out = model.forward(&f["input_ids"]).unwrap();
    assert_close(
        "text last_hidden_state",
        &out.last_hidden_state,
        &f["text_last_hidden_state"],
        TOL,
    );
    assert_close("text pooled", &out.pooled, &f["text_pooled"], TOL);
    assert_close(
        "text_embeds",
        out.text_embeds.as_ref().unwrap(),
        &f["text_embeds"],
        TOL,
    );
}

#[test]
fn image_processing_and_image_embeds_match_transformers() {
    let f = load_fixture(STAGE, "clip.safetensors");
    let pixels: Vec<Tensor> = IMAGES
        .iter()
        .map(|name| {
            let img = rgb_image(&f[&format!("image.{name}")]);
            Tensor::from_vec(clip_pixels(&img, 28).unwrap(), (3, 28, 28), &Device::Cpu).unwrap()
        })
        .collect();
    let pixels = Tensor::stack(&pixels, 0).unwrap();
    assert_close("pixel_values", &pixels, &f["pixel_values"], 1e-6);
    let out = tiny_clip_vision(DType::F32).forward(&pixels).unwrap();
    assert_close(
        "image_embeds",
        out.image_embeds.as_ref().unwrap(),
        &f["image_embeds"],
        TOL,
    );
}

#[test]
fn image_text_cosine_matches_clip_model() {
    let f = load_fixture(STAGE, "clip.safetensors");
    let expected = f["cosine"].to_vec2::<f32>().unwrap(); // [image, prompt]
    let scorer = scorer();
    let prompts = prompts();
    assert_eq!(prompts.len(), PROMPTS);
    let mut worst = 0f32;
    for (p, prompt) in prompts.iter().enumerate() {
        let text = scorer.text_embeds(prompt).unwrap();
        for (i, name) in IMAGES.iter().enumerate() {
            let img = rgb_image(&f[&format!("image.{name}")]);
            let cos = scorer.alignment(&img, &text).unwrap();
            worst = worst.max((cos - expected[i][p]).abs());
        }
    }
    eprintln!("CLIP-T cosine worst difference {worst:e}");
    assert!(worst <= TOL, "cosine differs by {worst}");
}

#[test]
fn likeness_matches_insightface() {
    let f = load_fixture(STAGE, "likeness.safetensors");
    let face = load_fixture("face", "face.safetensors");
    let embeds: Vec<Vec<f32>> = ["astronaut", "tall"]
        .iter()
        .map(|n| face[&format!("{n}.embedding")].to_vec1::<f32>().unwrap())
        .collect();
    let reference = mean_embedding(&embeds).unwrap();
    assert_close(
        "mean embedding",
        &Tensor::new(reference.as_slice(), &Device::Cpu).unwrap(),
        &f["reference"],
        1e-6,
    );
    let analyzer = FaceAnalyzer::load(&tiny_model("antelopev2")).unwrap();
    for name in ["astronaut", "tall", "grey"] {
        let img = rgb_image(&f[&format!("{name}.image")]);
        let l = analyzer
            .likeness(&img, &reference, &CancelToken::new())
            .unwrap();
        let Some(want) = f.get(&format!("{name}.likeness")) else {
            assert_eq!(
                (l.cosine, l.reason.as_deref()),
                (None, Some(NO_FACE_REASON)),
                "{name}"
            );
            assert!(l.face.is_none());
            continue;
        };
        let want = want.to_vec1::<f32>().unwrap()[0];
        let got = l.cosine.expect("a face");
        assert!(
            (got - want).abs() <= TOL,
            "{name}: likeness {got} vs insightface {want}"
        );
        let bx = f[&format!("{name}.box")].to_vec1::<f32>().unwrap();
        let ours = l.face.unwrap().bbox;
        for c in 0..4 {
            assert!(
                (ours[c] - bx[c]).abs() <= 0.5,
                "{name}: box {ours:?} vs {bx:?}"
            );
        }
    }
}

/// What a prompt score costs on the CPU: `HYPERLORA_CLIP_DIR` (default: the tiny model; a
/// real-size random-weight folder comes from `bench/make_clip_sized.py`). `bench/score_cpu.sh`.
#[test]
#[ignore]
fn bench_clip_score_cpu() {
    use std::time::Instant;
    let dir = std::env::var("HYPERLORA_CLIP_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| tiny_model("clip-vision"));
    let started = Instant::now();
    let vision =
        hyperlora::clip::vision::ClipVisionModel::load_dir(&dir, DType::F32, &Device::Cpu).unwrap();
    let load_vision = started.elapsed();
    let scorer = ClipScorer::new(vision, &dir, Some(&merges()));
    let img = crate::common::astronaut_photo();
    let big = hyperlora::image::pil_resize_bicubic(&img, 1024, 1024);
    let started = Instant::now();
    let text = scorer
        .text_embeds("a portrait photo of an astronaut")
        .unwrap();
    let first_text = started.elapsed();
    let started = Instant::now();
    scorer
        .text_embeds("a portrait photo of an astronaut")
        .unwrap();
    let text_again = started.elapsed();
    scorer.alignment(&big, &text).unwrap(); // warm-up
    let runs = 3;
    let started = Instant::now();
    for _ in 0..runs {
        scorer.alignment(&big, &text).unwrap();
    }
    let image = started.elapsed() / runs;
    eprintln!(
        "{}: vision load {load_vision:?}; text tower load + first prompt {first_text:?}, \
         a prompt {text_again:?}; one 1024² picture (preprocess + vision + projection + cosine) {image:?}",
        dir.display()
    );
}
