//! Portrait scores: `scoreImages` (likeness and prompt alignment per picture) and `rankScores`
//! (the order best-of-N keeps).

use std::path::PathBuf;

use hyperlora::face::likeness::mean_embedding;
use hyperlora::image::RgbImage;
use hyperlora::score::{self, Rank};
use hyperlora::Error;
use napi::bindgen_prelude::{AsyncTask, ClassInstance, Float32Array};
use napi_derive::napi;

use crate::call::{call, Call, CallContext, ProgressCallback};
use crate::errors::to_napi;
use crate::face::FaceAnalyzer;
use crate::identity::IdentityEncoder;
use crate::pipeline::RawImage;
use crate::CancelHandle;

#[napi(object)]
pub struct ScoreImagesOptions {
    /// ArcFace embeddings of the person (an identity's mean, or one per photo): likeness is
    /// taken against their normalised mean. Without them, no likeness.
    pub references: Option<Vec<Float32Array>>,
    /// Without it, no prompt alignment.
    pub prompt: Option<String>,
    /// CLIP's BPE merges, for a CLIP folder without `vocab.json` + `merges.txt`.
    pub merges_file: Option<String>,
}

/// One picture's scores.
#[napi(object)]
pub struct ImageScore {
    /// ArcFace cosine of the picture's largest face with the person; `null` when not asked for
    /// or when the picture has no face (`likenessReason` says which).
    pub likeness: Option<f64>,
    pub likeness_reason: Option<String>,
    /// The face scored, `[x1, y1, x2, y2]` in pixels.
    pub face: Option<Vec<f64>>,
    /// CLIP ViT-L/14 cosine of the picture with the prompt (the paper's CLIP-T), when asked for.
    pub prompt_alignment: Option<f64>,
}

impl From<&score::ImageScore> for ImageScore {
    fn from(s: &score::ImageScore) -> Self {
        let l = s.likeness.as_ref();
        Self {
            likeness: l.and_then(|l| l.cosine).map(f64::from),
            likeness_reason: l.and_then(|l| l.reason.clone()),
            face: l
                .and_then(|l| l.face.as_ref())
                .map(|f| f.bbox.iter().map(|v| *v as f64).collect()),
            prompt_alignment: s.prompt_alignment.map(f64::from),
        }
    }
}

/// Scores each picture: likeness to `references` and/or alignment with `prompt` (at least one).
/// Progress: `score`, one step per picture.
#[napi(ts_return_type = "Promise<Array<ImageScore>>")]
pub fn score_images(
    faces: &FaceAnalyzer,
    encoder: &IdentityEncoder,
    images: Vec<RawImage>,
    options: ScoreImagesOptions,
    cancel: Option<ClassInstance<CancelHandle>>,
    #[napi(ts_arg_type = "((event: ProgressEvent | null) => void) | undefined | null")]
    on_progress: Option<ProgressCallback>,
) -> napi::Result<AsyncTask<Call<Vec<score::ImageScore>, Vec<ImageScore>>>> {
    let reference = options
        .references
        .map(|r| mean_embedding(&r.iter().map(|e| e.to_vec()).collect::<Vec<_>>()))
        .transpose()
        .map_err(to_napi)?;
    let analyzer = faces.inner.get()?;
    let merges = options.merges_file.map(PathBuf::from);
    let scorer = encoder.scorer(merges.as_deref())?;
    let images: Vec<RgbImage> = images.iter().map(RgbImage::from).collect();
    let prompt = options.prompt;
    Ok(call(
        CallContext::new(cancel, on_progress),
        |scores: Vec<score::ImageScore>| Ok(scores.iter().map(ImageScore::from).collect()),
        move |cancel, progress| {
            score::score_images(
                &analyzer,
                &scorer,
                &images,
                reference.as_deref(),
                prompt.as_deref(),
                cancel,
                progress,
            )
        },
    ))
}

/// What to rank by: `likeness`, `prompt`, or `weighted` with both weights.
#[napi(object)]
pub struct RankBy {
    pub by: String,
    pub likeness: Option<f64>,
    pub prompt: Option<f64>,
}

/// Positions of `scores` best first: pictures without the value ranked on (no face, a score not
/// taken) come last, and equal values keep their order.
#[napi]
pub fn rank_scores(scores: Vec<ImageScore>, rank: RankBy) -> napi::Result<Vec<u32>> {
    let by = match rank.by.as_str() {
        "likeness" => Rank::Likeness,
        "prompt" => Rank::Prompt,
        "weighted" => Rank::Weighted {
            likeness: rank.likeness.unwrap_or(0.0) as f32,
            prompt: rank.prompt.unwrap_or(0.0) as f32,
        },
        other => {
            return Err(to_napi(Error::invalid_argument(format!(
                "rank must be 'likeness', 'prompt' or {{ likeness, prompt }} weights, got {other:?}"
            ))))
        }
    };
    let scores: Vec<score::ImageScore> = scores
        .iter()
        .map(|s| score::ImageScore {
            likeness: Some(hyperlora::face::likeness::Likeness {
                cosine: s.likeness.map(|v| v as f32),
                reason: s.likeness_reason.clone(),
                face: None,
            }),
            prompt_alignment: s.prompt_alignment.map(|v| v as f32),
        })
        .collect();
    Ok(score::rank(&scores, by)
        .map_err(to_napi)?
        .into_iter()
        .map(|i| i as u32)
        .collect())
}
