//! Parity with insightface (onnxruntime) and a PIL implementation of docs/hyperlora-model.md §3, on the
//! tiny antelopev2-shaped models (scripts/fixtures/face.py).

use std::collections::HashMap;

use candle_core::{DType, Tensor};

use hyperlora::face::{
    arcface, preprocess, AnalyzeOptions, AnalyzedPhotos, ArcFaceModel, Detection, Detector,
    FaceAnalyzer, FaceChoice, LandmarkModel,
};
use hyperlora::image::RgbImage;
use hyperlora::{CancelToken, ErrorCode};

use crate::common::{load_fixture, rgb_image as rgb, tiny_model};

fn fixture() -> HashMap<String, Tensor> {
    load_fixture("face", "face.safetensors")
}

fn analyzer() -> FaceAnalyzer {
    FaceAnalyzer::load(&tiny_model("antelopev2")).unwrap()
}

fn floats(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn max_u8_diff(what: &str, a: &RgbImage, e: &RgbImage) -> u8 {
    assert_eq!((a.width, a.height), (e.width, e.height), "{what}: size");
    a.data
        .iter()
        .zip(&e.data)
        .map(|(x, y)| x.abs_diff(*y))
        .max()
        .unwrap_or(0)
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let d: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    d / (a.iter().map(|x| x * x).sum::<f32>().sqrt() * b.iter().map(|x| x * x).sum::<f32>().sqrt())
}

fn assert_dets(what: &str, ours: &[Detection], det: &Tensor, kps: &Tensor) {
    let d = floats(det);
    let k = floats(kps);
    let mut worst = 0f32;
    for (i, o) in ours.iter().enumerate() {
        for j in 0..4 {
            worst = worst.max((o.bbox[j] - d[i * 5 + j]).abs());
        }
        for p in 0..5 {
            for c in 0..2 {
                worst = worst.max((o.kps[p][c] - k[i * 10 + p * 2 + c]).abs());
            }
        }
    }
    eprintln!("{what}: {} faces, box/kps worst {worst} px", ours.len());
    assert_eq!(ours.len(), d.len() / 5, "{what}: number of faces");
    for (i, o) in ours.iter().enumerate() {
        for j in 0..4 {
            assert!(
                (o.bbox[j] - d[i * 5 + j]).abs() <= 0.5,
                "{what} face {i} box {:?} vs {:?}",
                o.bbox,
                &d[i * 5..i * 5 + 4]
            );
        }
        assert!(
            (o.score - d[i * 5 + 4]).abs() <= 1e-4,
            "{what} face {i} score"
        );
        for p in 0..5 {
            for c in 0..2 {
                assert!(
                    (o.kps[p][c] - k[i * 10 + p * 2 + c]).abs() <= 0.5,
                    "{what} face {i} kps"
                );
            }
        }
    }
}

#[test]
fn detector_landmarks_and_arcface_match_insightface() {
    let f = fixture();
    let a = analyzer();
    let cancel = CancelToken::new();
    for name in ["astronaut", "tall", "grey"] {
        let img = rgb(&f[&format!("{name}.image")]);
        let (faces, _) = a.detect(&img, &cancel).unwrap();
        let dets: Vec<Detection> = faces.iter().map(|x| x.detection.clone()).collect();
        assert_dets(
            name,
            &dets,
            &f[&format!("{name}.det")],
            &f[&format!("{name}.kps")],
        );
        if faces.is_empty() {
            continue;
        }
        let lm = floats(&f[&format!("{name}.landmarks")]);
        let mut worst = 0f32;
        for (i, face) in faces.iter().enumerate() {
            for (p, q) in face.landmarks.iter().enumerate() {
                for c in 0..2 {
                    worst = worst.max((q[c] - lm[(i * 106 + p) * 2 + c]).abs());
                }
            }
        }
        assert!(worst <= 0.5, "{name}: landmarks off by {worst} px");
        eprintln!("{name}: landmarks worst {worst} px");
        let aligned = arcface::norm_crop(&img, &faces[0].detection.kps, 112);
        let diff = max_u8_diff(
            "aligned",
            &aligned,
            &rgb(&f[&format!("{name}.direct_aligned")]),
        );
        assert!(diff <= 1, "{name}: norm_crop differs by {diff}");
        let e = a.arcface.embed(&img, &faces[0].detection).unwrap();
        let cos = cosine(&e, &floats(&f[&format!("{name}.direct_embedding")]));
        assert!(cos >= 0.9999, "{name}: embedding cosine {cos}");
        eprintln!("{name}: direct embedding cosine {cos}, norm_crop max diff {diff}");
    }
}

#[test]
fn preprocessing_matches_pil() {
    let f = fixture();
    for name in ["astronaut", "tall"] {
        let img = rgb(&f[&format!("{name}.image")]);
        let lm = floats(&f[&format!("{name}.landmarks")]);
        let lmk: Vec<[f32; 2]> = (0..106).map(|i| [lm[2 * i], lm[2 * i + 1]]).collect();
        let mask = preprocess::outline_mask(img.width, img.height, &lmk);
        let emask: Vec<u8> = f[&format!("{name}.mask")]
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let mask_diff = mask.data.iter().zip(&emask).filter(|(a, b)| a != b).count();
        let nobg = preprocess::remove_background(&img, &lmk);
        let d_nobg = max_u8_diff("nobg", &nobg, &rgb(&f[&format!("{name}.nobg")]));
        let d28 = max_u8_diff(
            "clip28",
            &preprocess::clip_crop(&nobg, &lmk, 28, false),
            &rgb(&f[&format!("{name}.clip28")]),
        );
        let d28g = max_u8_diff(
            "clip28g",
            &preprocess::clip_crop(&nobg, &lmk, 28, true),
            &rgb(&f[&format!("{name}.clip28_grey")]),
        );
        let exact_nobg = rgb(&f[&format!("{name}.nobg")]);
        let d28r = max_u8_diff(
            "clip28raw",
            &preprocess::clip_crop(&img, &lmk, 28, false),
            &rgb(&f[&format!("{name}.clip28_raw")]),
        );
        let d28e = max_u8_diff(
            "clip28 from the reference's nobg",
            &preprocess::clip_crop(&exact_nobg, &lmk, 28, false),
            &rgb(&f[&format!("{name}.clip28")]),
        );
        eprintln!("{name}: mask pixels differing {mask_diff}, nobg {d_nobg}, clip28 {d28}, grey {d28g}, raw {d28r}, from-ref {d28e}");
        assert_eq!(d28r, 0, "{name}: CLIP crop of the original photo");
        assert_eq!(
            d28e, 0,
            "{name}: CLIP crop of the reference's background-free photo"
        );
        // Every step reimplements PIL's integer arithmetic: equal, not just within 2/255.
        assert_eq!(mask_diff, 0, "{name}: outline mask");
        assert!(
            d_nobg == 0 && d28 == 0 && d28g == 0,
            "{name}: preprocessing differs from PIL"
        );
        let base28 = max_u8_diff(
            "base28",
            &preprocess::base_crop(&img, &lmk, 28),
            &rgb(&f[&format!("{name}.base28")]),
        );
        assert_eq!(base28, 0, "{name}: Base-LoRA crop");
        if name == "astronaut" {
            let d224 = max_u8_diff(
                "clip224",
                &preprocess::clip_crop(&exact_nobg, &lmk, 224, false),
                &rgb(&f["astronaut.clip224"]),
            );
            assert_eq!(d224, 0, "224 crop");
            let base224 = max_u8_diff(
                "base224",
                &preprocess::base_crop(&img, &lmk, 224),
                &rgb(&f["astronaut.base224"]),
            );
            assert_eq!(base224, 0, "224 Base-LoRA crop");
        }
    }
}

#[test]
fn analyze_gives_identity_conditions_and_names_photos_without_faces() {
    let f = fixture();
    let a = analyzer();
    let cancel = CancelToken::new();
    let img = rgb(&f["astronaut.image"]);
    let opts = AnalyzeOptions {
        clip_size: 28,
        ..Default::default()
    };
    let mut steps = 0;
    let r = a
        .analyze(&img, &opts, 0, Some("a.jpg"), &cancel, &mut |_| steps += 1)
        .unwrap();
    assert_eq!(steps, 4);
    assert_eq!(r.det_size, 640);
    let cos = cosine(&r.conditions.arcface, &floats(&f["astronaut.embedding"]));
    assert!(cos >= 0.9999, "embedding through the 2x crop: cosine {cos}");
    eprintln!("analyze: embedding through the 2x crop, cosine {cos}");
    let d = max_u8_diff(
        "clip",
        &r.conditions.clip_crop,
        &rgb(&f["astronaut.clip28"]),
    );
    assert_eq!(d, 0, "clip crop differs by {d}");
    assert_eq!((r.preview.width, r.preview.height), (512, 512));

    let grey = rgb(&f["grey.image"]);
    let e = a
        .analyze(&grey, &opts, 3, Some("wall.png"), &cancel, &mut |_| {})
        .err()
        .unwrap();
    assert_eq!(e.code, ErrorCode::NoFace);
    assert!(e.message.contains("photo 3 (wall.png)"), "{e}");

    let AnalyzedPhotos {
        analyzed: ok,
        skipped,
    } = a
        .analyze_photos(
            &[(&grey, None), (&img, Some("a.jpg"))],
            &opts,
            &cancel,
            &mut |_| {},
        )
        .unwrap();
    assert_eq!(ok.len(), 1);
    assert_eq!(ok[0].0, 1);
    assert_eq!(skipped.len(), 1);
    assert_eq!(skipped[0].index, 0);
    let e = a
        .analyze_photos(&[(&grey, None)], &opts, &cancel, &mut |_| {})
        .err()
        .unwrap();
    assert_eq!(e.code, ErrorCode::NoFace);

    let largest = a
        .analyze(
            &img,
            &AnalyzeOptions {
                choice: FaceChoice::Largest,
                ..opts.clone()
            },
            0,
            None,
            &cancel,
            &mut |_| {},
        )
        .unwrap();
    let (faces, _) = a.detect(&img, &cancel).unwrap();
    let max_area = faces
        .iter()
        .map(|x| x.detection.area())
        .fold(0f32, f32::max);
    assert_eq!(largest.face.detection.area(), max_area);
    let e = a
        .analyze(
            &img,
            &AnalyzeOptions {
                choice: FaceChoice::Index(99),
                ..opts
            },
            0,
            None,
            &cancel,
            &mut |_| {},
        )
        .err()
        .unwrap();
    assert_eq!(e.code, ErrorCode::InvalidArgument);
}

#[test]
fn loader_checks_the_antelopev2_signatures() {
    let dir = tiny_model("antelopev2");
    let e = Detector::load(&dir.join("glintr100.onnx")).err().unwrap();
    assert_eq!(e.code, ErrorCode::BadWeights);
    assert!(e.message.contains("glintr100.onnx"), "{e}");
    let e = ArcFaceModel::load(&dir.join("2d106det.onnx"))
        .err()
        .unwrap();
    assert_eq!(e.code, ErrorCode::BadWeights);
    let e = LandmarkModel::load(&dir.join("scrfd_10g_bnkps.onnx"))
        .err()
        .unwrap();
    assert_eq!(e.code, ErrorCode::BadWeights);
    let a = analyzer();
    assert_eq!(a.landmarks.input_size(), 192);
    assert_eq!(a.detector.fixed_input_size(), None);
}

#[test]
fn matches_skimage_similarity_transform() {
    let f = load_fixture("face", "face.safetensors");
    let lm = f["ops.lm5"]
        .to_dtype(DType::F32)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    let kps: [[f32; 2]; 5] = std::array::from_fn(|i| [lm[i][0], lm[i][1]]);
    let m = hyperlora::face::align::estimate_norm(&kps, 112);
    let e = f["ops.norm_m"]
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec2::<f64>()
        .unwrap();
    for r in 0..2 {
        for c in 0..3 {
            assert!((m[r][c] - e[r][c]).abs() < 1e-5, "{m:?} vs {e:?}");
        }
    }
}

fn max_diff(a: &[u8], b: &[u8]) -> u8 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| x.abs_diff(*y))
        .max()
        .unwrap_or(0)
}

#[test]
fn cv_resize_and_warp_match_opencv() {
    let f = load_fixture("face", "face.safetensors");
    let src = rgb(&f["ops.src"]);
    for (w, h) in [(90, 64), (20, 15), (53, 37), (26, 18)] {
        let r = hyperlora::image::cv_resize_linear(&src, w, h);
        let e = rgb(&f[&format!("ops.resize_{w}x{h}")]);
        assert_eq!(max_diff(&r.data, &e.data), 0, "resize to {w}x{h}");
    }
    let m = f["ops.warp_m"]
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec2::<f64>()
        .unwrap();
    let m = [[m[0][0], m[0][1], m[0][2]], [m[1][0], m[1][1], m[1][2]]];
    let r = hyperlora::image::warp_affine(&src, &m, 40, 40);
    assert!(max_diff(&r.data, &rgb(&f["ops.warp_40"]).data) <= 1);
}

/// Timing of one 1024x1024 photo (bench/face_cpu.sh). Uses `HYPERLORA_ANTELOPEV2` (a real
/// antelopev2 folder, or random weights of the real sizes) or else the tiny models.
#[test]
#[ignore]
fn bench_face_cpu() {
    use std::time::Instant;
    let dir = std::env::var("HYPERLORA_ANTELOPEV2")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| tiny_model("antelopev2"));
    let a = analyzer_at(&dir);
    let f = fixture();
    let small = rgb(&f["astronaut.image"]);
    let img = hyperlora::image::cv_resize_linear(&small, 1024, 1024);
    let cancel = CancelToken::new();
    // Warm-up builds the per-size plans.
    let _ = a.analyze(
        &img,
        &AnalyzeOptions::default(),
        0,
        None,
        &cancel,
        &mut |_| {},
    );
    let t = Instant::now();
    let dets = a.detector.detect(&img, 640).unwrap();
    let t_det = t.elapsed();
    // Random weights of the real sizes find no face: then the box and keypoints come from the
    // tiny models' detector on the same photo, so the later stages still run on a face-shaped crop.
    let face = match dets.first() {
        Some(face) => face.clone(),
        None => {
            eprintln!("no face with these weights; landmarks/arcface/preprocessing use the tiny detector's box");
            let tiny = analyzer_at(&tiny_model("antelopev2"));
            tiny.detector.detect(&img, 640).unwrap()[0].clone()
        }
    };
    let face = &face;
    let t = Instant::now();
    let lmk = a.landmarks.landmarks(&img, face).unwrap();
    let t_lmk = t.elapsed();
    let t = Instant::now();
    let _ = a.arcface.embed(&img, face).unwrap();
    let t_arc = t.elapsed();
    let t = Instant::now();
    let nobg = preprocess::remove_background(&img, &lmk);
    let _ = preprocess::clip_crop(&nobg, &lmk, 224, false);
    let _ = preprocess::preview(&nobg, &lmk);
    let t_pre = t.elapsed();
    let t = Instant::now();
    let _ = a.analyze(
        &img,
        &AnalyzeOptions::default(),
        0,
        None,
        &cancel,
        &mut |_| {},
    );
    eprintln!(
        "{}: detector(640) {t_det:?}, landmarks {t_lmk:?}, arcface {t_arc:?}, preprocessing {t_pre:?}, whole analyze {:?}",
        dir.display(),
        t.elapsed()
    );
}

fn analyzer_at(dir: &std::path::Path) -> FaceAnalyzer {
    FaceAnalyzer::load(dir).unwrap()
}
