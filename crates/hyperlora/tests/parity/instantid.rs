//! InstantID against `scripts/fixtures/instantid.py`: the torch.save reader, the image
//! projection, the face (raw embedding and keypoints of the largest face), `draw_kps`, Canny,
//! IdentityNet given the face tokens, and whole generations with it.

use candle_core::{DType, Device, Tensor};

use crate::common::*;
use hyperlora::face::FaceAnalyzer;
use hyperlora::image::{canny::canny, draw::draw_kps, RgbImage};
use hyperlora::instantid::{face_tokens, keypoint_image, load_image_proj};
use hyperlora::sdxl::control::{ControlNet, ControlNetUse};
use hyperlora::sdxl::pipeline::GenerateParams;
use hyperlora::weights::torch_checkpoint;

const STAGE: &str = "instantid";

fn kps_of(t: &Tensor) -> [[f32; 2]; 5] {
    let v: Vec<Vec<f32>> = t.to_vec2().unwrap();
    std::array::from_fn(|i| [v[i][0], v[i][1]])
}

/// Differing pixels as (x, y, ours, reference), at most 5.
fn pixel_diffs(ours: &RgbImage, reference: &RgbImage) -> Vec<(usize, usize, [u8; 3], [u8; 3])> {
    assert_eq!(
        (ours.width, ours.height),
        (reference.width, reference.height)
    );
    let px = |img: &RgbImage, i: usize| [img.data[i * 3], img.data[i * 3 + 1], img.data[i * 3 + 2]];
    (0..ours.width * ours.height)
        .filter(|&i| px(ours, i) != px(reference, i))
        .take(5)
        .map(|i| {
            (
                i % ours.width,
                i / ours.width,
                px(ours, i),
                px(reference, i),
            )
        })
        .collect()
}

#[test]
fn torch_save_views_dtypes_and_nesting_read_exactly() {
    let got = torch_checkpoint::load(fixture(STAGE, "views.bin"), &Device::Cpu).unwrap();
    let expected = load_fixture(STAGE, "views.safetensors");
    let mut names: Vec<_> = got.keys().cloned().collect();
    names.sort();
    let mut want: Vec<_> = expected.keys().cloned().collect();
    want.sort();
    assert_eq!(
        names, want,
        "non-tensor values are skipped, nested dicts dotted"
    );
    for (name, e) in &expected {
        let g = &got[name];
        assert_eq!(g.dtype(), e.dtype(), "{name}");
        assert_close(name, g, e, 0.0);
    }
}

#[test]
fn image_projection_matches_the_reference_resampler() {
    let proj = load_image_proj(
        &tiny_model("instantid/ip-adapter.bin"),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let f = load_fixture(STAGE, "resampler.safetensors");
    let emb: Vec<f32> = f["embedding"].flatten_all().unwrap().to_vec1().unwrap();
    let (neg, pos) = face_tokens(&proj, &emb).unwrap();
    let tokens = Tensor::cat(&[&neg, &pos], 0).unwrap();
    assert_close(
        "face tokens [negative, positive]",
        &tokens,
        &f["tokens"],
        1e-4,
    );
}

#[test]
fn largest_face_raw_embedding_and_keypoints_match_insightface() {
    let analyzer = FaceAnalyzer::load(&tiny_model("antelopev2")).unwrap();
    let f = load_fixture(STAGE, "face.safetensors");
    let face = analyzer
        .keypoint_face(&astronaut_photo(), "astronaut")
        .unwrap();
    let kps = Tensor::new(&face.detection.kps, &Device::Cpu).unwrap();
    assert_close("kps", &kps, &f["kps"], 1e-3);
    let emb = Tensor::new(face.embedding.as_slice(), &Device::Cpu).unwrap();
    let want = &f["embedding"];
    let norm: f32 = want.sqr().unwrap().sum_all().unwrap().to_scalar().unwrap();
    assert_close("raw embedding", &emb, want, 1e-3 * norm.sqrt());
}

#[test]
fn a_photo_without_a_face_is_no_face() {
    let analyzer = FaceAnalyzer::load(&tiny_model("antelopev2")).unwrap();
    let grey = RgbImage {
        width: 200,
        height: 150,
        data: vec![127; 200 * 150 * 3],
    };
    let e = analyzer
        .keypoint_face(&grey, "keypoints photo")
        .unwrap_err();
    assert_eq!(e.code, hyperlora::ErrorCode::NoFace, "{e}");
}

#[test]
fn draw_kps_is_cv2_exact() {
    let f = load_fixture(STAGE, "draw_kps.safetensors");
    let mut cases: Vec<String> = (0..9).map(|c| format!("case{c}")).collect();
    cases.push("face".into());
    for case in cases {
        let want = rgb_image(&f[&format!("{case}.image")]);
        let kps = kps_of(&f[&format!("{case}.kps")]);
        let got = draw_kps(want.width, want.height, &kps);
        let diffs = pixel_diffs(&got, &want);
        assert!(
            diffs.is_empty(),
            "{case} (kps {kps:?}): (x, y, ours, cv2) {diffs:?}"
        );
    }
}

#[test]
fn canny_is_cv2_exact() {
    let f = load_fixture(STAGE, "canny.safetensors");
    let photo = astronaut_photo();
    for (i, (low, high)) in [
        (100.0, 200.0),
        (50.0, 150.0),
        (20.0, 60.0),
        (200.0, 100.0),
        (80.7, 160.2),
    ]
    .into_iter()
    .enumerate()
    {
        let want: Vec<u8> = f[&format!("case{i}")]
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let got = canny(&photo, low, high);
        let ours: Vec<u8> = got.data.chunks(3).map(|p| p[0]).collect();
        assert!(got.data.chunks(3).all(|p| p[0] == p[1] && p[1] == p[2]));
        let bad: Vec<(usize, usize, u8, u8)> = (0..want.len())
            .filter(|&j| ours[j] != want[j])
            .take(5)
            .map(|j| (j % photo.width, j / photo.width, ours[j], want[j]))
            .collect();
        let count = (0..want.len()).filter(|&j| ours[j] != want[j]).count();
        assert!(
            bad.is_empty(),
            "thresholds {low}/{high}: {count} pixels differ, (x, y, ours, cv2) {bad:?}"
        );
    }
}

fn load_instantid(pipe: &hyperlora::sdxl::pipeline::SdxlPipeline) -> ControlNet {
    ControlNet::load(
        &tiny_model("instantid"),
        pipe.unet.config(),
        &Device::Cpu,
        DType::F32,
    )
    .unwrap()
}

#[test]
fn identitynet_reads_the_face_tokens() {
    let pipe = tiny_sdxl();
    let net = load_instantid(&pipe);
    assert!(net.image_proj().is_some());
    let f = load_fixture(STAGE, "identitynet.safetensors");
    let model = net.model();
    let cond = model
        .condition(&f["face_tokens"], &f["text_embeds"], &f["time_ids"])
        .unwrap();
    let r = model
        .forward(
            &f["sample"].repeat((2, 1, 1, 1)).unwrap(),
            500.0,
            &cond,
            &f["cond"],
            0.6,
            false,
        )
        .unwrap();
    for (k, d) in r.down.iter().enumerate() {
        assert_close(&format!("down.{k}"), d, &f[&format!("down.{k}")], 1e-4);
    }
    assert_close("mid", &r.mid, &f["mid"], 1e-4);
}

#[test]
fn instantid_generations_match_the_reference_pipeline() {
    let pipe = tiny_sdxl();
    let analyzer = FaceAnalyzer::load(&tiny_model("antelopev2")).unwrap();
    let photo = astronaut_photo();
    let face = analyzer.keypoint_face(&photo, "astronaut").unwrap();
    let keypoints = keypoint_image(&face, photo.width, photo.height);
    let net = load_instantid(&pipe);
    for case in ["pipeline_euler", "pipeline_no_cfg_batch2"] {
        let text = std::fs::read_to_string(fixture(STAGE, &format!("{case}.json"))).unwrap();
        let json: serde_json::Value = serde_json::from_str(&text).unwrap();
        let p = &json["params"];
        let use_ = ControlNetUse {
            scale: p["strength"].as_f64().unwrap(),
            face: Some(face.embedding.clone()),
            ..ControlNetUse::new(net.clone(), keypoints.clone())
        };
        let params = GenerateParams {
            controlnets: vec![use_],
            ..generate_params(p)
        };
        let expected = load_fixture(STAGE, &format!("{case}.safetensors"));
        let (latents, images) = run_pipeline(&pipe, &params);
        assert_close(
            &format!("{case} latents"),
            &latents,
            &expected["latents"],
            1e-3,
        );
        let want: Vec<u8> = expected["image"].flatten_all().unwrap().to_vec1().unwrap();
        let got: Vec<u8> = images.iter().flat_map(|i| i.data.iter().copied()).collect();
        let worst = got
            .iter()
            .zip(&want)
            .map(|(a, b)| a.abs_diff(*b))
            .max()
            .unwrap();
        assert!(
            got.len() == want.len() && worst <= 1,
            "{case}: image differs by {worst} levels"
        );
    }
}

#[test]
fn instantid_without_a_face_is_refused() {
    let pipe = tiny_sdxl();
    let net = load_instantid(&pipe);
    let black = RgbImage {
        width: 64,
        height: 64,
        data: vec![0; 64 * 64 * 3],
    };
    let params = GenerateParams {
        width: 64,
        height: 64,
        steps: 1,
        controlnets: vec![ControlNetUse::new(net, black)],
        ..GenerateParams::default()
    };
    let e = pipe
        .generate_latents(&params, &hyperlora::CancelToken::new(), &mut |_| {})
        .unwrap_err();
    assert_eq!(e.code, hyperlora::ErrorCode::InvalidArgument, "{e}");
}
