//! Helpers for parity tests: fixture paths and comparisons that name the worst element.
//!
//! One file for both test crates: the parity binary (`tests/parity/main.rs`) declares it as a
//! module and the engine's inline unit tests include it through `src/testing.rs`, so it uses
//! the engine through `hyperlora::` paths (the library names itself so when built for tests).

use std::collections::HashMap;
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

/// Loads every tensor of a fixture safetensors file onto the CPU.
pub fn load_fixture(stage: &str, name: &str) -> HashMap<String, Tensor> {
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

/// The bundled tiny SDXL (`models/tiny/sdxl`), in f32 on the CPU.
pub fn tiny_sdxl() -> hyperlora::sdxl::pipeline::SdxlPipeline {
    hyperlora::sdxl::pipeline::SdxlPipeline::load(
        &tiny_model("sdxl"),
        &Default::default(),
        &Device::Cpu,
        DType::F32,
    )
    .unwrap()
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
pub fn pipeline_case_params(case: &str) -> hyperlora::sdxl::pipeline::GenerateParams {
    let text = std::fs::read_to_string(fixture(PIPELINE_STAGE, &format!("{case}.json"))).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    generate_params(&json["params"])
}

/// The request of a generator script's `params` record (no init image, no ControlNets).
pub fn generate_params(p: &serde_json::Value) -> hyperlora::sdxl::pipeline::GenerateParams {
    use hyperlora::sdxl::sampling::sampler::{Sampler, SigmaSchedule};
    let s = |k: &str| p[k].as_str().unwrap().to_string();
    let n = |k: &str| p[k].as_u64().unwrap() as usize;
    hyperlora::sdxl::pipeline::GenerateParams {
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
        controlnets: Vec::new(),
    }
}

/// Latents and decoded images of one generation.
pub fn run_pipeline(
    pipe: &hyperlora::sdxl::pipeline::SdxlPipeline,
    p: &hyperlora::sdxl::pipeline::GenerateParams,
) -> (Tensor, Vec<hyperlora::image::RgbImage>) {
    let latents = pipe
        .generate_latents(p, &hyperlora::CancelToken::new(), &mut |_| {})
        .unwrap();
    let images = pipe.decode(&latents).unwrap();
    (latents, images)
}

/// Latents within 1e-3 and images within one level of diffusers' for the fixture case.
pub fn check_pipeline_case(case: &str, latents: &Tensor, images: &[hyperlora::image::RgbImage]) {
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
pub fn tiny_text_config(sub: &str) -> hyperlora::clip::text::ClipTextConfig {
    hyperlora::clip::text::ClipTextConfig::from_json_file(tiny_model(&format!(
        "sdxl/{sub}/config.json"
    )))
    .unwrap()
}

/// The tiny SDXL's CLIP-L text encoder, in f32.
pub fn tiny_clip_l() -> hyperlora::clip::text::ClipTextModel {
    hyperlora::clip::text::ClipTextModel::load(
        tiny_text_vb("text_encoder", DType::F32),
        &tiny_text_config("text_encoder"),
    )
    .unwrap()
}

/// The tiny SDXL's bigG text encoder (with projection), in f32.
pub fn tiny_clip_g() -> hyperlora::clip::text::ClipTextModelWithProjection {
    hyperlora::clip::text::ClipTextModelWithProjection::load(
        tiny_text_vb("text_encoder_2", DType::F32),
        &tiny_text_config("text_encoder_2"),
    )
    .unwrap()
}

/// The tiny SDXL's VAE with its weights in `dtype`, on the CPU.
pub fn tiny_vae(dtype: DType) -> hyperlora::sdxl::model::vae::AutoencoderKL {
    use hyperlora::sdxl::model::vae::{AutoencoderKL, Config};
    let config = Config::from_json(tiny_model("sdxl/vae/config.json")).unwrap();
    let weights = tiny_model("sdxl/vae/diffusion_pytorch_model.safetensors");
    // SAFETY: the model files are not modified while the test runs.
    let vb = unsafe {
        candle_nn::VarBuilder::from_mmaped_safetensors(&[weights], dtype, &Device::Cpu).unwrap()
    };
    AutoencoderKL::new(vb, &config).unwrap()
}

/// The tiny SDXL's UNet with its weights in `dtype`, on the CPU.
pub fn tiny_unet(dtype: DType) -> hyperlora::sdxl::model::unet::UNet2DConditionModel {
    use hyperlora::sdxl::model::unet::{Config, UNet2DConditionModel};
    let config = Config::from_json(tiny_model("sdxl/unet/config.json")).unwrap();
    let weights = tiny_model("sdxl/unet/diffusion_pytorch_model.safetensors");
    // SAFETY: the model files are not modified while the test runs.
    let vb = unsafe {
        candle_nn::VarBuilder::from_mmaped_safetensors(&[weights], dtype, &Device::Cpu).unwrap()
    };
    UNet2DConditionModel::new(vb, &config).unwrap()
}

/// The tiny SDXL's scheduler config.
pub fn tiny_scheduler_config() -> hyperlora::sdxl::sampling::sampler::SchedulerConfig {
    hyperlora::sdxl::sampling::sampler::SchedulerConfig::from_file(tiny_model(
        "sdxl/scheduler/scheduler_config.json",
    ))
    .unwrap()
}

/// The tiny CLIP vision tower (`models/tiny/clip-vision`) with its weights in `dtype`.
pub fn tiny_clip_vision(dtype: DType) -> hyperlora::clip::vision::ClipVisionModel {
    hyperlora::clip::vision::ClipVisionModel::load_dir(
        tiny_model("clip-vision"),
        dtype,
        &Device::Cpu,
    )
    .unwrap()
}

/// The tiny SDXL's two tokenizers, with their folder names (the keys of the tokenizer cases).
pub fn tiny_tokenizers() -> Vec<(
    &'static str,
    hyperlora::sdxl::text::tokenizer::ClipTokenizer,
)> {
    use hyperlora::sdxl::text::tokenizer::ClipTokenizer;
    vec![
        (
            "tokenizer",
            ClipTokenizer::from_dir(tiny_model("sdxl/tokenizer")).unwrap(),
        ),
        (
            "tokenizer_2",
            ClipTokenizer::from_dir(tiny_model("sdxl/tokenizer_2")).unwrap(),
        ),
    ]
}

/// The prompts of the tokenizer fixture with transformers' ids for each tokenizer.
pub fn tokenizer_cases() -> Vec<serde_json::Value> {
    let path = fixture("sdxl_tokenizer", "cases.json");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    json["cases"].as_array().unwrap().clone()
}

/// A JSON array of token ids.
pub fn json_ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// A fresh folder under the system's temporary folder, named after `tag` and this process.
pub fn tmp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("hyperlora-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The tiny HyperLoRA folder (`models/tiny/hyperlora`) with its weights in `dtype`.
pub fn tiny_hyperlora(dtype: DType) -> hyperlora::hypernet::HyperLora {
    hyperlora::hypernet::HyperLora::load(tiny_model("hyperlora"), dtype, &Device::Cpu).unwrap()
}

/// The HyperLoRA fixture's inputs and intermediate results.
pub fn hyperlora_inputs() -> HashMap<String, Tensor> {
    load_fixture("hyperlora", "inputs.safetensors")
}

/// The first `n` entries of a batch.
pub fn first_rows(t: &Tensor, n: usize) -> Tensor {
    t.narrow(0, 0, n).unwrap()
}

/// Every module of a generated LoRA within `tol` of the HyperLoRA fixture file `expected`.
pub fn check_hyperlora_lora(
    what: &str,
    lora: &hyperlora::lora::KohyaLora,
    expected: &str,
    tol: f32,
) {
    let want =
        hyperlora::lora::KohyaLora::load(fixture("hyperlora", expected), &Device::Cpu).unwrap();
    assert_eq!(lora.len(), want.len(), "{what}: module count");
    // The reference file is name-sorted; ours follows hyper_lora_modules.json.
    for (n, w) in lora.iter() {
        let ew = want
            .get(n)
            .unwrap_or_else(|| panic!("{what}: unexpected module {n}"));
        assert_eq!(w.alpha, ew.alpha, "{what}: alpha of {n}");
        assert_close(&format!("{what} {n}.lora_down"), &w.down, &ew.down, tol);
        assert_close(&format!("{what} {n}.lora_up"), &w.up, &ew.up, tol);
    }
}

/// An 8-bit `[height, width, 3]` fixture tensor as an image.
pub fn rgb_image(t: &Tensor) -> hyperlora::image::RgbImage {
    let (h, w, _) = t.dims3().unwrap();
    hyperlora::image::RgbImage {
        width: w,
        height: h,
        data: t
            .to_dtype(DType::U8)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap(),
    }
}

/// The bundled photo (`models/tiny/photos/astronaut.png`'s pixels).
pub fn astronaut_photo() -> hyperlora::image::RgbImage {
    rgb_image(&load_fixture("face", "face.safetensors")["astronaut.image"])
}
