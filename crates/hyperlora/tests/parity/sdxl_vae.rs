//! Parity of the VAE with diffusers' AutoencoderKL on the tiny SDXL's VAE
//! (scripts/fixtures/sdxl_vae.py).

use candle_core::DType;

use crate::common::{all_finite, assert_close, load_fixture, tiny_vae};

const STAGE: &str = "sdxl_vae";

#[test]
fn decode_matches_diffusers() {
    let vae = tiny_vae(DType::F32);
    let f = load_fixture(STAGE, "decode.safetensors");
    assert_close(
        "vae decode",
        &vae.decode(&f["z"]).unwrap(),
        &f["image"],
        1e-4,
    );
}

#[test]
fn encode_matches_diffusers() {
    let vae = tiny_vae(DType::F32);
    let f = load_fixture(STAGE, "encode.safetensors");
    let (mean, logvar) = vae.encode(&f["x"]).unwrap();
    assert_close("vae mean", &mean, &f["mean"], 1e-4);
    assert_close("vae logvar", &logvar, &f["logvar"], 1e-4);
}

/// f16 weights (the tiny model does not overflow f16, unlike the real one): the f32
/// GroupNorm and softmax paths keep the result finite and close. (candle's CPU backend has
/// no bf16 matmul, so bf16 can only be checked on a GPU.)
#[test]
fn f16_weights_give_close_results() {
    let vae = tiny_vae(DType::F16);
    let f = load_fixture(STAGE, "decode.safetensors");
    let image = vae.decode(&f["z"]).unwrap();
    assert_eq!(image.dtype(), DType::F16);
    assert!(all_finite(&image));
    assert_close("vae decode f16", &image, &f["image"], 2e-2);
    let f = load_fixture(STAGE, "encode.safetensors");
    let (mean, logvar) = vae.encode(&f["x"]).unwrap();
    assert!(all_finite(&mean) && all_finite(&logvar));
    assert_close("vae mean f16", &mean, &f["mean"], 1e-2);
    assert_close("vae logvar f16", &logvar, &f["logvar"], 1e-2);
}
