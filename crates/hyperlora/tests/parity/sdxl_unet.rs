//! Parity of the UNet with diffusers' UNet2DConditionModel on the tiny SDXL's UNet
//! (scripts/fixtures/sdxl_unet.py).

use candle_core::DType;
use candle_nn::Linear;
use hyperlora::sdxl::model::unet::UNet2DConditionModel;

use crate::common::{assert_close, load_fixture, max_abs_diff, tiny_unet};

const STAGE: &str = "sdxl_unet";

#[test]
fn forward_matches_diffusers() {
    let unet = tiny_unet(DType::F32);
    let f = load_fixture(STAGE, "forward.safetensors");
    for t in [999.0, 421.0] {
        let out = unet
            .forward(
                &f["sample"],
                t,
                &f["encoder_hidden_states"],
                &f["text_embeds"],
                &f["time_ids"],
            )
            .unwrap();
        assert_close(&format!("unet t={t}"), &out, &f[&format!("out_t{t}")], 1e-4);
    }
}

#[test]
fn forward_on_latents_not_divisible_by_four_matches_diffusers() {
    let unet = tiny_unet(DType::F32);
    let f = load_fixture(STAGE, "forward_odd.safetensors");
    let out = unet
        .forward(
            &f["sample"],
            37.5,
            &f["encoder_hidden_states"],
            &f["text_embeds"],
            &f["time_ids"],
        )
        .unwrap();
    assert_close("unet 10x6", &out, &f["out"], 1e-4);
}

#[test]
fn a_replaced_linear_changes_the_output() {
    let f = load_fixture(STAGE, "forward.safetensors");
    let mut unet = tiny_unet(DType::F32);
    let run = |unet: &UNet2DConditionModel| {
        unet.forward(
            &f["sample"],
            421.0,
            &f["encoder_hidden_states"],
            &f["text_embeds"],
            &f["time_ids"],
        )
        .unwrap()
    };
    for (name, linear) in unet.linears_mut() {
        if name == "mid_block.attentions.0.transformer_blocks.0.attn1.to_q" {
            *linear = Linear::new((linear.weight() * 3.0).unwrap(), None);
        }
    }
    let (diff, ..) = max_abs_diff(&run(&unet), &f["out_t421"]);
    assert!(diff > 1e-3, "output unchanged ({diff})");
}

/// f16 weights: same values (the tiny model is f16-exact), half-precision arithmetic.
/// (candle's CPU backend has no bf16 matmul, so bf16 can only be checked on a GPU.)
#[test]
fn f16_weights_give_close_results() {
    let f = load_fixture(STAGE, "forward.safetensors");
    let unet = tiny_unet(DType::F16);
    let out = unet
        .forward(
            &f["sample"],
            999.0,
            &f["encoder_hidden_states"],
            &f["text_embeds"],
            &f["time_ids"],
        )
        .unwrap();
    assert_eq!(out.dtype(), DType::F16);
    assert_close("unet f16", &out, &f["out_t999"], 2e-2);
}
