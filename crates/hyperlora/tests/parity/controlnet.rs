//! Parity of ControlNet generations with diffusers' StableDiffusionXLControlNetPipeline on the
//! tiny SDXL and two tiny ControlNets (a diffusers folder and a single file without config):
//! one and two ControlNets, guidance windows, a control image of another size, no guidance,
//! and Pillow's Lanczos resize (scripts/fixtures/controlnet.py).

use candle_core::{DType, Device, Tensor};
use hyperlora::image::pil_resize_lanczos;
use hyperlora::sdxl::control::{ControlNet, ControlNetUse};
use hyperlora::sdxl::pipeline::{GenerateParams, SdxlPipeline};
use hyperlora::ErrorCode;

use crate::common::{
    assert_close, fixture, generate_params, load_fixture, rgb_image as rgb, run_pipeline as run,
    tiny_model, tiny_sdxl,
};

const STAGE: &str = "controlnet";

fn load(pipe: &SdxlPipeline, name: &str) -> ControlNet {
    ControlNet::load(
        &tiny_model(name),
        pipe.unet.config(),
        &Device::Cpu,
        DType::F32,
    )
    .unwrap()
}

/// The case's parameters and ControlNets, as the generator script recorded them.
fn case_params(pipe: &SdxlPipeline, case: &str) -> (GenerateParams, Tensor, Vec<u8>) {
    let text = std::fs::read_to_string(fixture(STAGE, &format!("{case}.json"))).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    let p = &json["params"];
    let expected = load_fixture(STAGE, &format!("{case}.safetensors"));
    let controlnets = p["controlnets"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
        .map(|(k, c)| ControlNetUse {
            net: load(pipe, c["model"].as_str().unwrap()),
            image: rgb(&expected[&format!("control{k}")]),
            scale: c["scale"].as_f64().unwrap(),
            start: c["start"].as_f64().unwrap(),
            end: c["end"].as_f64().unwrap(),
            face: None,
        })
        .collect();
    let params = GenerateParams {
        controlnets,
        ..generate_params(p)
    };
    let image = expected["image"].flatten_all().unwrap().to_vec1().unwrap();
    (params, expected["latents"].clone(), image)
}

fn check(
    case: &str,
    latents: &Tensor,
    images: &[hyperlora::image::RgbImage],
    want: &Tensor,
    want_image: &[u8],
) {
    assert_close(&format!("{case} latents"), latents, want, 1e-3);
    let got: Vec<u8> = images.iter().flat_map(|i| i.data.iter().copied()).collect();
    assert_eq!(got.len(), want_image.len(), "{case}: image size");
    let worst = got
        .iter()
        .zip(want_image)
        .map(|(a, b)| a.abs_diff(*b))
        .max()
        .unwrap();
    assert!(worst <= 1, "{case}: image differs by {worst} levels");
}

#[test]
fn controlnet_generations_match_diffusers() {
    let pipe = tiny_sdxl();
    for case in [
        "one_euler",
        "window_resized_dpmpp_batch2",
        "no_cfg_euler_ancestral",
        "multi_euler",
    ] {
        let (p, want, want_image) = case_params(&pipe, case);
        let (latents, images) = run(&pipe, &p);
        check(case, &latents, &images, &want, &want_image);
    }
}

#[test]
fn control_images_resize_as_pillow_lanczos() {
    let expected = load_fixture(STAGE, "lanczos_resize.safetensors");
    for k in 0..4 {
        let src = rgb(&expected[&format!("src{k}")]);
        let want = rgb(&expected[&format!("lanczos{k}")]);
        let got = pil_resize_lanczos(&src, want.width, want.height);
        assert_eq!(
            got, want,
            "resize {k}: {}x{} -> {}x{}",
            src.width, src.height, want.width, want.height
        );
    }
}

#[test]
fn scale_zero_or_an_empty_window_equals_no_controlnet() {
    let pipe = tiny_sdxl();
    let (mut p, _, _) = case_params(&pipe, "one_euler");
    let controls = std::mem::take(&mut p.controlnets);
    let (plain, plain_images) = run(&pipe, &p);
    p.controlnets = controls.clone();
    p.controlnets[0].scale = 0.0;
    let (zero, zero_images) = run(&pipe, &p);
    assert_close("scale 0 vs none", &zero, &plain, 0.0);
    assert_eq!(zero_images, plain_images);
    // A window that holds no step of four: [0.3, 0.45] (step 1 ends at 0.5).
    p.controlnets = controls;
    p.controlnets[0].start = 0.3;
    p.controlnets[0].end = 0.45;
    let (outside, _) = run(&pipe, &p);
    assert_close("empty window vs none", &outside, &plain, 0.0);
}

#[test]
fn a_wrong_file_is_bad_weights_naming_the_tensor() {
    let pipe = tiny_sdxl();
    let config = pipe.unet.config();
    // A UNet is no ControlNet: with its config.json beside it, the first ControlNet tensor it
    // lacks is named.
    let err = ControlNet::load(
        &tiny_model("sdxl/unet/diffusion_pytorch_model.safetensors"),
        config,
        &Device::Cpu,
        DType::F32,
    )
    .unwrap_err();
    assert_eq!(err.code, ErrorCode::BadWeights, "{err}");
    assert!(err.message.contains("'controlnet_cond_embedding."), "{err}");
    // Alone (no config), it is recognised as no ControlNet.
    let dir = crate::common::tmp_dir("controlnet-missing");
    let lone = dir.join("unet-sdxl.safetensors");
    std::fs::copy(
        tiny_model("sdxl/unet/diffusion_pytorch_model.safetensors"),
        &lone,
    )
    .unwrap();
    let err = ControlNet::load(&lone, config, &Device::Cpu, DType::F32).unwrap_err();
    assert_eq!(err.code, ErrorCode::BadWeights, "{err}");
    assert!(
        err.message
            .contains("controlnet_cond_embedding.conv_in.weight"),
        "{err}"
    );
    // A ControlNet with a tensor missing: named.
    let src = tiny_model("controlnet-b-sdxl-tiny.safetensors");
    let mut tensors = candle_core::safetensors::load(&src, &Device::Cpu).unwrap();
    tensors.remove("controlnet_mid_block.weight");
    let path = dir.join("controlnet-broken-sdxl.safetensors");
    candle_core::safetensors::save(&tensors, &path).unwrap();
    let err = ControlNet::load(&path, config, &Device::Cpu, DType::F32).unwrap_err();
    assert_eq!(err.code, ErrorCode::BadWeights, "{err}");
    assert!(err.message.contains("controlnet_mid_block.weight"), "{err}");
    // The original layout is named as such.
    let mut original = std::collections::HashMap::new();
    original.insert(
        "control_model.input_hint_block.0.weight".to_string(),
        Tensor::zeros((16, 3, 3, 3), DType::F32, &Device::Cpu).unwrap(),
    );
    let path = dir.join("control_sd_xl_openpose.safetensors");
    candle_core::safetensors::save(&original, &path).unwrap();
    let err = ControlNet::load(&path, config, &Device::Cpu, DType::F32).unwrap_err();
    assert_eq!(err.code, ErrorCode::BadWeights, "{err}");
    assert!(err.message.contains("control_model"), "{err}");
}

#[test]
fn single_file_config_is_read_off_its_shapes() {
    let pipe = tiny_sdxl();
    let folder = load(&pipe, "controlnet");
    let single = load(&pipe, "controlnet-b-sdxl-tiny.safetensors");
    let (a, b) = (single.model().config(), folder.model().config());
    assert_eq!(
        a.conditioning_embedding_out_channels,
        b.conditioning_embedding_out_channels
    );
    assert_eq!(a.conditioning_channels, b.conditioning_channels);
    let (a, b) = (&a.unet, &b.unet);
    assert_eq!(a.block_out_channels, b.block_out_channels);
    assert_eq!(a.down_block_types, b.down_block_types);
    assert_eq!(a.layers_per_block, b.layers_per_block);
    assert_eq!(a.attention_head_dim, b.attention_head_dim);
    assert_eq!(
        a.transformer_layers_per_block,
        b.transformer_layers_per_block
    );
    assert_eq!(a.cross_attention_dim, b.cross_attention_dim);
    assert_eq!(a.addition_time_embed_dim, b.addition_time_embed_dim);
    assert_eq!(
        a.projection_class_embeddings_input_dim,
        b.projection_class_embeddings_input_dim
    );
    assert_eq!(a.use_linear_projection, b.use_linear_projection);
    assert_eq!(a.time_embed_dim(), b.time_embed_dim());
}

/// Requests with different control images share a batch and draw what they draw alone; other
/// strengths or windows split the plan.
#[test]
fn batches_keep_each_requests_control_image() {
    use hyperlora::session::{plan_batches, Request, Session};
    let pipe = tiny_sdxl();
    let (p, _, _) = case_params(&pipe, "one_euler");
    let other_image = rgb(&load_fixture(STAGE, "multi_euler.safetensors")["control1"]);
    let mut a = Request::new(p.clone());
    a.params.steps = 3;
    let mut b = a.clone();
    b.params.seed = 5;
    b.params.controlnets[0].image = other_image;
    let mut c = a.clone();
    c.params.controlnets[0].scale = 0.5;
    let mut d = a.clone();
    d.params.controlnets[0].end = 0.5;
    let requests = [a.clone(), b.clone(), c, d];
    assert_eq!(
        plan_batches(&requests, 8),
        vec![vec![0, 1], vec![2], vec![3]]
    );

    let mut session = Session::new(pipe);
    let cancel = hyperlora::CancelToken::new();
    let batch = session
        .generate_many(&[a.clone(), b.clone()], &cancel, &mut |_| {})
        .unwrap();
    for (r, images) in [a, b].iter().zip(&batch) {
        let alone = session.generate(r, &cancel, &mut |_| {}).unwrap();
        let worst = alone[0]
            .data
            .iter()
            .zip(&images[0].data)
            .map(|(x, y)| x.abs_diff(*y))
            .max()
            .unwrap();
        assert!(worst <= 1, "batched vs alone: {worst} levels");
    }
    assert_ne!(batch[0][0].data, batch[1][0].data);
}
