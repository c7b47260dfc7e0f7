//! Face analysis in-process: antelopev2's SCRFD detector, 106-point landmarks and ArcFace run
//! with a pure-Rust ONNX engine ([`onnx`]), and HyperLoRA's face preprocessing (docs/hyperlora-model.md §3)
//! producing the [`FaceConditions`] the identity encoder takes.
//!
//! Which face, when a photo has several ([`FaceChoice`]): the highest detector score (the
//! reference's "first face"), the largest box, or an explicit index into [`FaceAnalyzer::detect`]'s
//! list (sorted by score). The ArcFace step always re-detects on its 2x crop and takes the best
//! face there, as the reference does.

pub mod align;
pub mod arcface;
pub mod detector;
pub mod landmarks;
pub mod likeness;
pub mod onnx;
pub mod preprocess;

use std::path::Path;

pub use arcface::ArcFaceModel;
pub use detector::{Detection, Detector};
pub use landmarks::LandmarkModel;

use crate::error::{Error, ErrorCode, Result};
use crate::image::RgbImage;
use crate::task::{CancelToken, Progress, ProgressFn, Stage};

/// What one photo contributes: its ArcFace embedding and its face crop for CLIP.
#[derive(Clone, Debug)]
pub struct FaceConditions {
    /// L2-normalised ArcFace embedding (512 values for antelopev2's glintr100).
    pub arcface: Vec<f32>,
    /// The face crop, already at the CLIP model's input size (224² for ViT-L/14).
    pub clip_crop: RgbImage,
    /// The Base-LoRA's input at the same size: the surroundings of the face, the face itself
    /// blurred away (see [`preprocess::base_crop`]). Used only by models with a Base-LoRA, and
    /// only when every photo has one.
    pub base_crop: Option<RgbImage>,
}

/// Detector sizes tried in turn until a face is found (docs/hyperlora-model.md §3 step 1).
pub const DETECT_SIZES: [usize; 4] = [640, 512, 384, 256];

/// A detected face with its 106 landmarks.
#[derive(Clone, Debug)]
pub struct FaceInfo {
    pub detection: Detection,
    pub landmarks: Vec<[f32; 2]>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FaceChoice {
    #[default]
    HighestScore,
    Largest,
    Index(usize),
}

#[derive(Clone, Debug)]
pub struct AnalyzeOptions {
    /// Background removal, docs/hyperlora-model.md §3 step 2 (default true).
    pub remove_background: bool,
    /// Grey CLIP crop (default false).
    pub grayscale: bool,
    pub choice: FaceChoice,
    /// Side of the CLIP crop: `IdentityEncoder::clip_image_size()` (224 for ViT-L/14).
    pub clip_size: usize,
}

impl Default for AnalyzeOptions {
    fn default() -> Self {
        Self {
            remove_background: true,
            grayscale: false,
            choice: FaceChoice::HighestScore,
            clip_size: 224,
        }
    }
}

/// Everything one photo yields.
#[derive(Clone, Debug)]
pub struct FaceAnalysis {
    pub conditions: FaceConditions,
    /// The chosen face (box, score, 5 keypoints, 106 landmarks) in photo coordinates.
    pub face: FaceInfo,
    /// The face crop (background removed when asked) at 512x512, for the user.
    pub preview: RgbImage,
    /// The detector size that found the face (640, 512, 384 or 256).
    pub det_size: usize,
}

/// A photo skipped in a multi-photo batch.
#[derive(Clone, Debug, PartialEq)]
pub struct SkippedPhoto {
    pub index: usize,
    pub name: Option<String>,
    pub message: String,
}

/// The photos of a batch that have a face (with their index) and those skipped.
#[derive(Clone, Debug)]
pub struct AnalyzedPhotos {
    pub analyzed: Vec<(usize, FaceAnalysis)>,
    pub skipped: Vec<SkippedPhoto>,
}

pub struct FaceAnalyzer {
    pub detector: Detector,
    pub landmarks: LandmarkModel,
    pub arcface: ArcFaceModel,
}

fn first_existing(dir: &Path, names: &[&str]) -> std::path::PathBuf {
    names
        .iter()
        .map(|n| dir.join(n))
        .find(|p| p.is_file())
        .unwrap_or_else(|| dir.join(names[0]))
}

fn no_face(index: usize, name: Option<&str>, what: &str) -> Error {
    let who = match name {
        Some(n) => format!("photo {index} ({n})"),
        None => format!("photo {index}"),
    };
    Error::new(ErrorCode::NoFace, format!("{who}: {what}"))
}

impl FaceAnalyzer {
    /// An antelopev2 folder (`scrfd_10g_bnkps.onnx`, `2d106det.onnx`, `glintr100.onnx`), or a
    /// buffalo_l one (`det_10g.onnx`, `2d106det.onnx`, `w600k_r50.onnx`).
    pub fn load(dir: &Path) -> Result<Self> {
        Self::load_files(
            &first_existing(dir, &["scrfd_10g_bnkps.onnx", "det_10g.onnx"]),
            &dir.join("2d106det.onnx"),
            &first_existing(dir, &["glintr100.onnx", "w600k_r50.onnx"]),
        )
    }

    pub fn load_files(detector: &Path, landmarks: &Path, arcface: &Path) -> Result<Self> {
        Ok(Self {
            detector: Detector::load(detector)?,
            landmarks: LandmarkModel::load(landmarks)?,
            arcface: ArcFaceModel::load(arcface)?,
        })
    }

    /// All faces (best score first) with landmarks; retries smaller detector sizes when none.
    pub fn detect(&self, img: &RgbImage, cancel: &CancelToken) -> Result<(Vec<FaceInfo>, usize)> {
        check_image(img)?;
        let (dets, size) = self.detector.detect_with_retries(img, &DETECT_SIZES)?;
        let mut faces = Vec::with_capacity(dets.len());
        for d in dets {
            cancel.check()?;
            let landmarks = self.landmarks.landmarks(img, &d)?;
            faces.push(FaceInfo {
                detection: d,
                landmarks,
            });
        }
        Ok((faces, size))
    }

    /// One photo → conditions + preview. `index`/`name` only label a `NO_FACE` error.
    pub fn analyze(
        &self,
        img: &RgbImage,
        opts: &AnalyzeOptions,
        index: usize,
        name: Option<&str>,
        cancel: &CancelToken,
        progress: ProgressFn<'_>,
    ) -> Result<FaceAnalysis> {
        check_image(img)?;
        let step = |s: u64, progress: &mut dyn FnMut(Progress)| {
            progress(Progress {
                stage: Stage::Face,
                step: s,
                total: 4,
            })
        };
        let (dets, det_size) = self.detector.detect_with_retries(img, &DETECT_SIZES)?;
        step(1, progress);
        if dets.is_empty() {
            return Err(no_face(
                index,
                name,
                "no face detected (tried 640, 512, 384 and 256)",
            ));
        }
        let pick = match opts.choice {
            FaceChoice::HighestScore => 0,
            FaceChoice::Largest => (0..dets.len())
                .max_by(|&a, &b| {
                    dets[a]
                        .area()
                        .partial_cmp(&dets[b].area())
                        .unwrap()
                        .then(b.cmp(&a))
                })
                .unwrap(),
            FaceChoice::Index(i) if i < dets.len() => i,
            FaceChoice::Index(i) => {
                return Err(Error::invalid_argument(format!(
                    "face index {i} is out of range: photo {index} has {} faces",
                    dets.len()
                )))
            }
        };
        cancel.check()?;
        let det = dets[pick].clone();
        let lmk = self.landmarks.landmarks(img, &det)?;
        step(2, progress);
        cancel.check()?;
        let processed = if opts.remove_background {
            preprocess::remove_background(img, &lmk)
        } else {
            img.clone()
        };
        let clip_crop = preprocess::clip_crop(&processed, &lmk, opts.clip_size, opts.grayscale);
        let base_crop = Some(preprocess::base_crop(img, &lmk, opts.clip_size));
        let preview = preprocess::preview(&processed, &lmk);
        step(3, progress);
        cancel.check()?;
        let crop2 = preprocess::arcface_crop(img, &lmk);
        let again = if crop2.width > 0 && crop2.height > 0 {
            self.detector.detect(&crop2, 640)?
        } else {
            Vec::new()
        };
        let Some(face2) = again.first() else {
            return Err(no_face(
                index,
                name,
                "the face was found but not again in its ArcFace crop",
            ));
        };
        let arcface = self.arcface.embed(&crop2, face2)?;
        step(4, progress);
        Ok(FaceAnalysis {
            conditions: FaceConditions {
                arcface,
                clip_crop,
                base_crop,
            },
            face: FaceInfo {
                detection: det,
                landmarks: lmk,
            },
            preview,
            det_size,
        })
    }

    /// Several photos of one person: photos without a face are skipped (returned so the caller
    /// can warn); `NO_FACE` only when none has one. Other errors stop the batch.
    pub fn analyze_photos(
        &self,
        photos: &[(&RgbImage, Option<&str>)],
        opts: &AnalyzeOptions,
        cancel: &CancelToken,
        progress: ProgressFn<'_>,
    ) -> Result<AnalyzedPhotos> {
        let (mut ok, mut skipped) = (Vec::new(), Vec::new());
        for (i, (img, name)) in photos.iter().enumerate() {
            cancel.check()?;
            match self.analyze(img, opts, i, *name, cancel, &mut |_| {}) {
                Ok(a) => ok.push((i, a)),
                Err(e) if e.code == ErrorCode::NoFace => skipped.push(SkippedPhoto {
                    index: i,
                    name: name.map(str::to_string),
                    message: e.message,
                }),
                Err(e) => return Err(e),
            }
            progress(Progress {
                stage: Stage::Face,
                step: i as u64 + 1,
                total: photos.len() as u64,
            });
        }
        if ok.is_empty() {
            let list: Vec<String> = skipped.iter().map(|s| s.message.clone()).collect();
            return Err(Error::new(
                ErrorCode::NoFace,
                format!("no face in any photo: {}", list.join("; ")),
            ));
        }
        Ok(AnalyzedPhotos {
            analyzed: ok,
            skipped,
        })
    }
}

/// What InstantID takes from a photo: the largest face's 5 keypoints and raw ArcFace embedding.
#[derive(Clone, Debug)]
pub struct KeypointFace {
    pub detection: Detection,
    /// insightface's `face.embedding`: not normalised.
    pub embedding: Vec<f32>,
}

/// Detector sizes ComfyUI_InstantID tries in turn (`range(640, 256, -64)`).
pub const INSTANTID_DETECT_SIZES: [usize; 6] = [640, 576, 512, 448, 384, 320];

impl FaceAnalyzer {
    /// InstantID's face analysis: insightface's `FaceAnalysis.get` on the whole photo, the
    /// face of largest box (the last of equal ones), its keypoints and its raw embedding of
    /// the 5-point-aligned crop. `NO_FACE` when no size finds one.
    pub fn keypoint_face(&self, img: &RgbImage, what: &str) -> Result<KeypointFace> {
        check_image(img)?;
        let (dets, _) = self
            .detector
            .detect_with_retries(img, &INSTANTID_DETECT_SIZES)?;
        let Some(face) = dets
            .into_iter()
            .max_by(|a, b| a.area().total_cmp(&b.area()))
        else {
            return Err(Error::new(
                ErrorCode::NoFace,
                format!("{what}: no face detected (tried sizes 640 to 320)"),
            ));
        };
        let embedding = self.arcface.raw_embedding(img, &face)?;
        Ok(KeypointFace {
            detection: face,
            embedding,
        })
    }
}

fn check_image(img: &RgbImage) -> Result<()> {
    if img.width == 0 || img.height == 0 || img.data.len() != img.width * img.height * 3 {
        return Err(Error::invalid_argument(format!(
            "expected a packed RGB8 image, got {}x{} with {} bytes",
            img.width,
            img.height,
            img.data.len()
        )));
    }
    Ok(())
}
