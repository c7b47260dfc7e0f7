//! Face analysis: `loadFaceAnalyzer`, `FaceAnalyzer.detect` and `FaceAnalyzer.analyze`.

use std::path::PathBuf;

use hyperlora::face::{
    AnalyzeOptions, AnalyzedPhotos, FaceAnalyzer as Analyzer, FaceChoice, FaceInfo,
    KeypointFace as EngineKeypointFace,
};
use hyperlora::image::RgbImage;
use hyperlora::Error;
use napi::bindgen_prelude::{AsyncTask, ClassInstance, Float32Array};
use napi_derive::napi;

use crate::call::{call, Call, CallContext, ProgressCallback};
use crate::errors::to_napi;
use crate::pipeline::RawImage;
use crate::resident::Resident;
use crate::CancelHandle;

/// A detected face, in image pixels.
#[napi(object)]
pub struct DetectedFace {
    /// `[x1, y1, x2, y2]`.
    pub bbox: Vec<f64>,
    pub score: f64,
    /// Left eye, right eye, nose, left and right mouth corners: `[[x, y], …]`.
    pub keypoints: Vec<Vec<f64>>,
    /// The 106 landmarks of insightface's 2d106det: `[[x, y], …]`.
    pub landmarks: Vec<Vec<f64>>,
}

fn points(p: &[[f32; 2]]) -> Vec<Vec<f64>> {
    p.iter().map(|[x, y]| vec![*x as f64, *y as f64]).collect()
}

impl From<&FaceInfo> for DetectedFace {
    fn from(f: &FaceInfo) -> Self {
        Self {
            bbox: f.detection.bbox.iter().map(|v| *v as f64).collect(),
            score: f.detection.score as f64,
            keypoints: points(&f.detection.kps),
            landmarks: points(&f.landmarks),
        }
    }
}

#[napi(object)]
pub struct AnalyzeFacesOptions {
    /// Background removal (docs/hyperlora-model.md §3 step 2): grey out everything outside the
    /// face outline (default true).
    pub remove_background: Option<bool>,
    /// Grey CLIP crop (default false).
    pub grayscale: Option<bool>,
    /// `best` (highest detector score, default), `largest`, or a face index as a string.
    pub face: Option<String>,
    /// Side of the CLIP crop (the identity encoder's `clipImageSize`; default 224).
    pub clip_size: Option<u32>,
}

/// One photo's analysis: the identity conditions plus what the user may want to show.
#[napi(object)]
pub struct AnalyzedFace {
    /// Position of the photo in the request.
    pub index: u32,
    pub arcface: Float32Array,
    pub clip_crop: RawImage,
    /// The Base-LoRA's input: the face's surroundings with the face blurred away, CLIP-sized.
    pub base_crop: Option<RawImage>,
    pub face: DetectedFace,
    /// The background-removed face region at 512².
    pub preview: RawImage,
    /// Detector input size that found the face (640, 512, 384 or 256).
    pub det_size: u32,
}

#[napi(object)]
pub struct SkippedPhoto {
    pub index: u32,
    pub name: Option<String>,
    pub message: String,
}

#[napi(object)]
pub struct FaceAnalysisResult {
    pub faces: Vec<AnalyzedFace>,
    /// Photos without a usable face (only when at least one other photo had one).
    pub skipped: Vec<SkippedPhoto>,
}

fn analyze_options(o: Option<AnalyzeFacesOptions>) -> hyperlora::Result<AnalyzeOptions> {
    let mut options = AnalyzeOptions::default();
    let Some(o) = o else { return Ok(options) };
    options.remove_background = o.remove_background.unwrap_or(options.remove_background);
    options.grayscale = o.grayscale.unwrap_or(options.grayscale);
    options.clip_size = o.clip_size.map_or(options.clip_size, |s| s as usize);
    options.choice = match o.face.as_deref() {
        None | Some("best") => FaceChoice::HighestScore,
        Some("largest") => FaceChoice::Largest,
        Some(i) => FaceChoice::Index(i.parse().map_err(|_| {
            Error::invalid_argument(format!(
                "face must be 'best', 'largest' or an index, got {i:?}"
            ))
        })?),
    };
    Ok(options)
}

/// antelopev2's detector, landmark model and ArcFace, run in-process.
#[napi]
pub struct FaceAnalyzer {
    pub(crate) inner: Resident<Analyzer>,
}

#[napi]
impl FaceAnalyzer {
    /// Frees the models; running calls finish first, later calls fail with `INVALID_ARGUMENT`.
    #[napi]
    pub fn dispose(&self) {
        self.inner.dispose();
    }

    /// Every face in the picture, best score first (detector retried at 640, 512, 384, 256).
    #[napi(ts_return_type = "Promise<Array<DetectedFace>>")]
    pub fn detect(
        &self,
        image: RawImage,
        cancel: Option<ClassInstance<CancelHandle>>,
    ) -> napi::Result<AsyncTask<Call<Vec<FaceInfo>, Vec<DetectedFace>>>> {
        let analyzer = self.inner.get()?;
        let image = RgbImage::from(&image);
        Ok(call(
            CallContext::new(cancel, None),
            |faces: Vec<FaceInfo>| Ok(faces.iter().map(DetectedFace::from).collect()),
            move |cancel, _| Ok(analyzer.detect(&image, cancel)?.0),
        ))
    }

    /// The identity conditions of each photo (docs/hyperlora-model.md §3); photos without a
    /// face are skipped when others have one, else the call fails with `NO_FACE` naming the photo.
    #[napi(ts_return_type = "Promise<FaceAnalysisResult>")]
    pub fn analyze(
        &self,
        photos: Vec<RawImage>,
        names: Vec<Option<String>>,
        options: Option<AnalyzeFacesOptions>,
        cancel: Option<ClassInstance<CancelHandle>>,
        #[napi(ts_arg_type = "((event: ProgressEvent | null) => void) | undefined | null")]
        on_progress: Option<ProgressCallback>,
    ) -> napi::Result<AsyncTask<Call<AnalyzedPhotos, FaceAnalysisResult>>> {
        let options = analyze_options(options).map_err(to_napi)?;
        let analyzer = self.inner.get()?;
        let photos: Vec<RgbImage> = photos.iter().map(RgbImage::from).collect();
        Ok(call(
            CallContext::new(cancel, on_progress),
            analysis_result,
            move |cancel, progress| {
                let photos: Vec<(&RgbImage, Option<&str>)> = photos
                    .iter()
                    .enumerate()
                    .map(|(i, p)| (p, names.get(i).and_then(|n| n.as_deref())))
                    .collect();
                analyzer.analyze_photos(&photos, &options, cancel, progress)
            },
        ))
    }

    /// InstantID's face analysis of one photo: the largest face's keypoints, raw ArcFace
    /// embedding and keypoint picture. `NO_FACE` (naming `label`) when it has none.
    #[napi(ts_return_type = "Promise<KeypointFace>")]
    pub fn instantid_face(
        &self,
        image: RawImage,
        label: String,
        cancel: Option<ClassInstance<CancelHandle>>,
    ) -> napi::Result<AsyncTask<Call<(EngineKeypointFace, RgbImage), KeypointFace>>> {
        let analyzer = self.inner.get()?;
        let image = RgbImage::from(&image);
        Ok(call(
            CallContext::new(cancel, None),
            keypoint_face,
            move |cancel, _| {
                cancel.check()?;
                let face = analyzer.keypoint_face(&image, &label)?;
                let picture =
                    hyperlora::instantid::keypoint_image(&face, image.width, image.height);
                Ok((face, picture))
            },
        ))
    }
}

/// What InstantID takes from a photo (docs/instantid.md): its largest face.
#[napi(object)]
pub struct KeypointFace {
    /// `[x1, y1, x2, y2]`.
    pub bbox: Vec<f64>,
    pub score: f64,
    /// Left eye, right eye, nose, left and right mouth corners: `[[x, y], …]`.
    pub keypoints: Vec<Vec<f64>>,
    /// insightface's raw ArcFace `embedding` (not normalised): IdentityNet's face condition.
    pub embedding: Float32Array,
    /// The keypoints drawn as InstantID's `draw_kps` draws them, at the photo's size:
    /// IdentityNet's control image.
    pub keypoints_image: RawImage,
}

fn keypoint_face((face, image): (EngineKeypointFace, RgbImage)) -> napi::Result<KeypointFace> {
    let d = &face.detection;
    Ok(KeypointFace {
        bbox: d.bbox.iter().map(|v| *v as f64).collect(),
        score: d.score as f64,
        keypoints: points(&d.kps),
        embedding: Float32Array::new(face.embedding),
        keypoints_image: RawImage::from(image),
    })
}

fn analysis_result(result: AnalyzedPhotos) -> napi::Result<FaceAnalysisResult> {
    Ok(FaceAnalysisResult {
        faces: result
            .analyzed
            .into_iter()
            .map(|(index, a)| AnalyzedFace {
                index: index as u32,
                face: DetectedFace::from(&a.face),
                arcface: Float32Array::new(a.conditions.arcface),
                clip_crop: RawImage::from(a.conditions.clip_crop),
                base_crop: a.conditions.base_crop.map(RawImage::from),
                preview: RawImage::from(a.preview),
                det_size: a.det_size as u32,
            })
            .collect(),
        skipped: result
            .skipped
            .into_iter()
            .map(|s| SkippedPhoto {
                index: s.index as u32,
                name: s.name,
                message: s.message,
            })
            .collect(),
    })
}

/// Loads an insightface antelopev2 folder (`scrfd_10g_bnkps.onnx`, `2d106det.onnx`,
/// `glintr100.onnx`; buffalo_l's equivalents are accepted).
#[napi(ts_return_type = "Promise<FaceAnalyzer>")]
pub fn load_face_analyzer(dir: String) -> AsyncTask<Call<Analyzer, FaceAnalyzer>> {
    call(
        CallContext::default(),
        |analyzer| {
            Ok(FaceAnalyzer {
                inner: Resident::new(analyzer),
            })
        },
        move |_, _| Analyzer::load(&PathBuf::from(dir)),
    )
}
