//! Parity of whole generations with diffusers' StableDiffusionXLPipeline on the tiny SDXL:
//! text-to-image, image-to-image, the single-file checkpoint and LoRAs
//! (scripts/fixtures/sdxl_pipeline.py).

use candle_core::{DType, Device, Tensor};
use hyperlora::detailer::{crop, crop_region, CropRegion, FaceBox, RefineParams};
use hyperlora::image::{pil_resize_bicubic, RgbImage};
use hyperlora::lora::LoraLayer;
use hyperlora::sdxl::pipeline::{InitImage, LoadOptions, SdxlPipeline};
use hyperlora::sdxl::sampling::sampler::{Sampler, SigmaSchedule};
use hyperlora::CancelToken;
use hyperlora::ErrorCode;

use crate::common::{
    assert_close, astronaut_photo as astronaut, check_pipeline_case as check, fixture,
    load_fixture, max_abs_diff, pipeline_case_params as params, rgb_image as rgb,
    run_pipeline as run, tiny_model, tiny_sdxl, PIPELINE_CASES,
};

const STAGE: &str = "sdxl_pipeline";

#[test]
fn text_to_image_matches_diffusers() {
    let pipe = tiny_sdxl();
    for case in PIPELINE_CASES {
        let (latents, images) = run(&pipe, &params(case));
        check(case, &latents, &images);
    }
}

#[test]
fn image_to_image_matches_diffusers() {
    let pipe = tiny_sdxl();
    let case = "img2img_euler_strength06";
    let expected = load_fixture(STAGE, &format!("{case}.safetensors"));
    let init = &expected["init"];
    let (h, w, _) = init.dims3().unwrap();
    let mut p = params(case);
    p.init_image = Some(InitImage {
        image: RgbImage {
            width: w,
            height: h,
            data: init.flatten_all().unwrap().to_vec1().unwrap(),
        },
        strength: 0.6,
    });
    let (latents, images) = run(&pipe, &p);
    check(case, &latents, &images);
}

#[test]
fn single_file_checkpoint_gives_identical_outputs() {
    let folder = tiny_sdxl();
    let options = LoadOptions {
        config_dir: Some(tiny_model("sdxl")),
        merges_file: None,
    };
    let single = SdxlPipeline::load(
        &tiny_model("sdxl-single-file.safetensors"),
        &options,
        &Device::Cpu,
        DType::F32,
    )
    .unwrap();
    let p = params("dpmpp_2m_karras_negative_batch2");
    let (a, images_a) = run(&folder, &p);
    let (b, images_b) = run(&single, &p);
    assert_close("single-file vs folder latents", &b, &a, 0.0);
    assert_eq!(images_a, images_b);
}

/// Community LoRA kinds (LoCon, LoHa, LoKr, full differences, an f16 file with both text
/// encoders) give diffusers' pictures: latents within 1e-3 and RGB8 within one level of the
/// pipeline with the same LoRA fused (or merged by the LyCORIS formulas), at 0.8 and −0.6.
#[test]
fn community_lora_kinds_draw_the_reference_pictures() {
    let expected = load_fixture("lora_kinds", "expected.safetensors");
    let mut pipe = tiny_sdxl();
    let p = params("euler_cfg5");
    let compare = |what: &str, (latents, images): (Tensor, Vec<RgbImage>), key: &str| {
        assert_close(what, &latents, &expected[&format!("latents_{key}")], 1e-3);
        let want = expected[&format!("image_{key}")]
            .flatten_all()
            .unwrap()
            .to_vec1::<u8>()
            .unwrap();
        let got: Vec<u8> = images.iter().flat_map(|i| i.data.iter().copied()).collect();
        assert_eq!(got.len(), want.len(), "{what}");
        let worst = got.iter().zip(&want).map(|(a, b)| a.abs_diff(*b)).max();
        assert!(
            worst <= Some(1),
            "{what}: image differs by {worst:?} levels"
        );
    };
    compare("base", run(&pipe, &p), "base");
    for name in ["locon", "mixed", "loha", "lokr", "locon_tucker", "diff"] {
        let layers = hyperlora::lora::read_lora_file(
            fixture("lora_kinds", &format!("{name}.safetensors")),
            &Device::Cpu,
        )
        .unwrap()
        .layers;
        for w in [0.8f32, -0.6] {
            pipe.set_loras(&[(&layers, w)]).unwrap();
            compare(
                &format!("{name} w={w}"),
                run(&pipe, &p),
                &format!("{name}_w{w}"),
            );
        }
    }
}

/// LoRA sets switch in place: a text-encoder + UNet LoRA and a concept slider change the
/// picture, an unknown module is refused without effect, and the empty set gives back the
/// base model's latents bit for bit.
#[test]
fn set_loras_switches_in_place_and_the_empty_set_restores_the_base() {
    let mut pipe = tiny_sdxl();
    let p = params("euler_cfg5");
    let base = run(&pipe, &p).0;
    let read = |name: &str| {
        hyperlora::lora::read_lora_file(fixture("lora_apply", name), &Device::Cpu)
            .unwrap()
            .layers
    };
    let (te, a, b) = (
        read("te.safetensors"),
        read("kohya_diffusers.safetensors"),
        read("slider_b.safetensors"),
    );
    pipe.set_loras(&[(&te, 0.85)]).unwrap();
    let with_te = run(&pipe, &p).0;
    assert!(max_abs_diff(&with_te, &base).0 > 1e-3);
    pipe.set_loras(&[(&a, -0.7), (&b, 0.7)]).unwrap();
    assert_eq!(pipe.loras().merged_layers(), b.len());
    let slider = run(&pipe, &p).0;
    assert!(max_abs_diff(&slider, &with_te).0 > 1e-3);

    // A LoRA none of whose modules is a layer of the model is refused without effect.
    let bad: Vec<LoraLayer> = a
        .iter()
        .map(|l| LoraLayer {
            module: format!("up_blocks.9.{}", l.module),
            ..l.clone()
        })
        .collect();
    let err = pipe.set_loras(&[(&bad, 1.0)]).unwrap_err();
    assert_eq!(err.code, ErrorCode::InvalidArgument, "{err}");
    assert!(err.message.contains("up_blocks.9.down_blocks"), "{err}");
    assert_close("slider kept", &run(&pipe, &p).0, &slider, 0.0);

    pipe.set_loras(&[]).unwrap();
    assert_eq!(pipe.loras().merged_layers(), 0);
    assert_close("base restored", &run(&pipe, &p).0, &base, 0.0);
}

/// One refine pass's img2img at the refine defaults (strength 0.5, DPM++ 2M Karras) matches
/// diffusers' StableDiffusionXLImg2ImgPipeline, from the crop this module makes of the photo.
#[test]
fn face_img2img_matches_diffusers() {
    let case = "img2img_refine_dpmpp_2m_karras_strength05";
    let expected = load_fixture("sdxl_pipeline", &format!("{case}.safetensors"));
    let text = std::fs::read_to_string(fixture("sdxl_pipeline", &format!("{case}.json")));
    let json: serde_json::Value = serde_json::from_str(&text.unwrap()).unwrap();
    let j = &json["params"];
    let b: Vec<f64> = serde_json::from_value(j["face_box"].clone()).unwrap();
    let c: Vec<usize> = serde_json::from_value(j["crop"].clone()).unwrap();

    let params = RefineParams {
        prompt: j["prompt"].as_str().unwrap().into(),
        steps: j["steps"].as_u64().unwrap() as usize,
        guidance_scale: j["cfg"].as_f64().unwrap(),
        sampler: Sampler::parse(j["sampler"].as_str().unwrap()).unwrap(),
        schedule: SigmaSchedule::parse(j["schedule"].as_str().unwrap()).unwrap(),
        seed: j["seed"].as_u64().unwrap(),
        size: j["width"].as_u64().unwrap() as usize,
        ..RefineParams::default()
    };
    assert_eq!(params.strength, j["strength"].as_f64().unwrap());
    let photo = astronaut();
    let r = crop_region(
        &FaceBox::from_xyxy([b[0], b[1], b[2], b[3]]),
        photo.width,
        photo.height,
        params.padding,
        params.min_size,
    );
    assert_eq!(
        r,
        CropRegion {
            x: c[0],
            y: c[1],
            side: c[2]
        }
    );
    let init = pil_resize_bicubic(&crop(&photo, r), params.size, params.size);
    assert_eq!(init, rgb(&expected["init"]), "crop + Pillow bicubic");

    let pipe = tiny_sdxl();
    let latents = pipe
        .generate_latents(
            &params.face_params(init, 0),
            &CancelToken::new(),
            &mut |_| {},
        )
        .unwrap();
    let (worst, ..) = max_abs_diff(&latents, &expected["latents"]);
    eprintln!("refine img2img latents: max abs diff {worst:e}");
    assert_close(
        "refine img2img latents",
        &latents,
        &expected["latents"],
        1e-3,
    );
    let image = pipe.decode(&latents).unwrap().remove(0);
    let want = rgb(&expected["image"].squeeze(0).unwrap());
    let worst = image
        .data
        .iter()
        .zip(&want.data)
        .map(|(a, b)| a.abs_diff(*b))
        .max()
        .unwrap();
    assert!(worst <= 1, "decoded image differs by {worst} levels");
}
