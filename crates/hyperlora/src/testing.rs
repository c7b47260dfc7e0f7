//! Helpers for parity tests: fixture paths and comparisons that name the worst element.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};

/// Repository root: `HYPERLORA_REPO` when set (a test binary run from another checkout, as on a
/// GPU host), else two levels above this crate.
pub fn repo_root() -> PathBuf {
    std::env::var_os("HYPERLORA_REPO")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.."))
}

/// `crates/hyperlora/tests/fixtures/<stage>/<name>`.
pub fn fixture(stage: &str, name: &str) -> PathBuf {
    repo_root()
        .join("crates/hyperlora/tests/fixtures")
        .join(stage)
        .join(name)
}

/// `models/tiny/<name>`: the small random-weight models in real layouts.
pub fn tiny_model(name: &str) -> PathBuf {
    repo_root().join("models/tiny").join(name)
}

/// The bundled tiny SDXL (`models/tiny/sdxl`), in f32 on the CPU.
pub fn tiny_sdxl() -> crate::sdxl::pipeline::SdxlPipeline {
    crate::sdxl::pipeline::SdxlPipeline::load(
        &tiny_model("sdxl"),
        &Default::default(),
        &Device::Cpu,
        DType::F32,
    )
    .unwrap()
}

/// Loads every tensor of a fixture safetensors file onto the CPU.
pub fn load_fixture(stage: &str, name: &str) -> std::collections::HashMap<String, Tensor> {
    let path = fixture(stage, name);
    candle_core::safetensors::load(&path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("cannot read fixture {}: {e}", path.display()))
}

/// SDXL's attention Linears in a transformer block of width `c` (the layers an identity LoRA
/// targets): (module name, out features, in features); cross-attention reads 2048 features.
pub fn sdxl_attention_linears(c: usize) -> [(&'static str, usize, usize); 8] {
    [
        ("attn1.to_q", c, c),
        ("attn1.to_k", c, c),
        ("attn1.to_v", c, c),
        ("attn1.to_out.0", c, c),
        ("attn2.to_q", c, c),
        ("attn2.to_k", c, 2048),
        ("attn2.to_v", c, 2048),
        ("attn2.to_out.0", c, c),
    ]
}

/// Whether every element is finite.
pub fn all_finite(t: &Tensor) -> bool {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .all(|x| x.is_finite())
}

/// Largest absolute difference, with its flat index and both values.
pub fn max_abs_diff(actual: &Tensor, expected: &Tensor) -> (f32, usize, f32, f32) {
    assert_eq!(actual.dims(), expected.dims(), "shape mismatch");
    let a = actual
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let e = expected
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let mut worst = (0f32, 0usize, 0f32, 0f32);
    for (i, (x, y)) in a.iter().zip(e.iter()).enumerate() {
        let d = (x - y).abs();
        if d > worst.0 || d.is_nan() {
            worst = (d, i, *x, *y);
            if d.is_nan() {
                break;
            }
        }
    }
    worst
}

/// Panics with the worst element when `actual` and `expected` differ by more than `tol`.
#[track_caller]
pub fn assert_close(what: &str, actual: &Tensor, expected: &Tensor, tol: f32) {
    let (d, i, a, e) = max_abs_diff(actual, expected);
    assert!(
        d <= tol && !d.is_nan(),
        "{what}: max abs diff {d} > {tol} at flat index {i} (shape {:?}): ours {a}, reference {e}",
        expected.dims()
    );
}

const PIPELINE_STAGE: &str = "sdxl_pipeline";

/// The text-to-image cases of the whole-pipeline fixtures.
pub const PIPELINE_CASES: [&str; 5] = [
    "euler_cfg5",
    "dpmpp_2m_karras_negative_batch2",
    "euler_ancestral_no_cfg",
    "dpmpp_2m_sde_karras",
    "ddim_exact_steps",
];

/// A whole-pipeline fixture case's parameters, as the generator script recorded them.
pub fn pipeline_case_params(case: &str) -> crate::sdxl::pipeline::GenerateParams {
    use crate::sdxl::sampling::sampler::{Sampler, SigmaSchedule};
    let text = std::fs::read_to_string(fixture(PIPELINE_STAGE, &format!("{case}.json"))).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    let p = &json["params"];
    let s = |k: &str| p[k].as_str().unwrap().to_string();
    let n = |k: &str| p[k].as_u64().unwrap() as usize;
    crate::sdxl::pipeline::GenerateParams {
        prompt: s("prompt"),
        negative_prompt: s("negative_prompt"),
        width: n("width"),
        height: n("height"),
        steps: n("steps"),
        guidance_scale: p["cfg"].as_f64().unwrap(),
        sampler: Sampler::parse(&s("sampler")).unwrap(),
        schedule: SigmaSchedule::parse(&s("schedule")).unwrap(),
        seed: p["seed"].as_u64().unwrap(),
        batch_size: n("batch"),
        init_image: None,
    }
}

/// Latents and decoded images of one generation.
pub fn run_pipeline(
    pipe: &crate::sdxl::pipeline::SdxlPipeline,
    p: &crate::sdxl::pipeline::GenerateParams,
) -> (Tensor, Vec<crate::image::RgbImage>) {
    let latents = pipe
        .generate_latents(p, &crate::CancelToken::new(), &mut |_| {})
        .unwrap();
    let images = pipe.decode(&latents).unwrap();
    (latents, images)
}

/// Latents within 1e-3 and images within one level of diffusers' for the fixture case.
pub fn check_pipeline_case(case: &str, latents: &Tensor, images: &[crate::image::RgbImage]) {
    let expected = load_fixture(PIPELINE_STAGE, &format!("{case}.safetensors"));
    assert_close(
        &format!("{case} latents"),
        latents,
        &expected["latents"],
        1e-3,
    );
    let want = expected["image"]
        .flatten_all()
        .unwrap()
        .to_vec1::<u8>()
        .unwrap();
    let got: Vec<u8> = images.iter().flat_map(|i| i.data.iter().copied()).collect();
    assert_eq!(got.len(), want.len(), "{case}: image size");
    let worst = got
        .iter()
        .zip(&want)
        .map(|(a, b)| a.abs_diff(*b))
        .max()
        .unwrap();
    assert!(worst <= 1, "{case}: image differs by {worst} levels");
}

/// The weights of one of the tiny SDXL's text encoders (`text_encoder` or `text_encoder_2`).
pub fn tiny_text_vb(sub: &str, dtype: DType) -> candle_nn::VarBuilder<'static> {
    let path = tiny_model(&format!("sdxl/{sub}/model.fp16.safetensors"));
    // SAFETY: the fixture files are not modified while the test runs.
    unsafe { candle_nn::VarBuilder::from_mmaped_safetensors(&[path], dtype, &Device::Cpu).unwrap() }
}

/// The config of one of the tiny SDXL's text encoders.
pub fn tiny_text_config(sub: &str) -> crate::clip::text::ClipTextConfig {
    crate::clip::text::ClipTextConfig::from_json_file(tiny_model(&format!(
        "sdxl/{sub}/config.json"
    )))
    .unwrap()
}

/// The tiny SDXL's CLIP-L text encoder, in f32.
pub fn tiny_clip_l() -> crate::clip::text::ClipTextModel {
    crate::clip::text::ClipTextModel::load(
        tiny_text_vb("text_encoder", DType::F32),
        &tiny_text_config("text_encoder"),
    )
    .unwrap()
}

/// The tiny SDXL's bigG text encoder (with projection), in f32.
pub fn tiny_clip_g() -> crate::clip::text::ClipTextModelWithProjection {
    crate::clip::text::ClipTextModelWithProjection::load(
        tiny_text_vb("text_encoder_2", DType::F32),
        &tiny_text_config("text_encoder_2"),
    )
    .unwrap()
}
