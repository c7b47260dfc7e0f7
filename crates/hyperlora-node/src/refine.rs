//! `Pipeline.refineFaces`: the face refine pass (img2img on each face region) off the event loop.

use hyperlora::detailer::{refine_faces, FaceBox as EngineFaceBox, FaceSelection, RefineParams};
use hyperlora::image::RgbImage;
use hyperlora::Error;
use napi::bindgen_prelude::{AsyncTask, BigInt, ClassInstance};
use napi_derive::napi;

use crate::call::{call, Call, CallContext, ProgressCallback};
use crate::errors::to_napi;
use crate::pipeline::{lock, seed_u64, with_loras, IdentityUse, LoraFile, Pipeline, RawImage};
use crate::words::{Sampler, SigmaSchedule};
use crate::CancelHandle;

/// A face to refine, in image pixels. A `DetectedFace` from `FaceAnalyzer.detect` fits as is.
#[napi(object)]
pub struct FaceBox {
    /// `[x1, y1, x2, y2]`; may reach past the image's edges.
    pub bbox: Vec<f64>,
}

/// The refine pass's sampling and region options; unset options take the engine's defaults
/// (the sampling ones those of `generate`).
#[napi(object, object_to_js = false)]
pub struct RefineRequest<'a> {
    /// The image's prompt or one written for the face.
    pub prompt: String,
    pub negative_prompt: Option<String>,
    /// Scheduler steps; `int(steps × strength)` of them run per face.
    pub steps: Option<u32>,
    pub cfg: Option<f64>,
    pub sampler: Option<Sampler>,
    pub schedule: Option<SigmaSchedule>,
    /// Face `i` (among the refined faces, in order) uses `seed + i`.
    pub seed: Option<BigInt>,
    /// Re-noising strength in (0, 1] (default 0.5).
    pub strength: Option<f64>,
    /// Side the face's square crop is re-drawn at, rounded to a multiple of 8 (default 1024).
    pub size: Option<u32>,
    /// Crop side = the face box's longer side × padding (default 3).
    pub padding: Option<f64>,
    /// Smallest crop side in pixels (default 128).
    pub min_size: Option<u32>,
    /// Pixels the face box grows by in the blend mask (default 10).
    pub dilate: Option<f64>,
    /// Gaussian σ in pixels of the mask's soft edge (default 5).
    pub feather: Option<f64>,
    /// `all` (default) or `largest`.
    pub faces: Option<String>,
    pub identities: Option<Vec<IdentityUse<'a>>>,
    pub loras: Option<Vec<LoraFile>>,
}

/// The settings a refine pass ran with, every default filled in.
#[napi(object)]
pub struct RefineSettings {
    pub prompt: String,
    pub negative_prompt: String,
    pub steps: u32,
    pub cfg: f64,
    pub sampler: Sampler,
    pub schedule: SigmaSchedule,
    /// The seed of the first refined face; face `i` has `seed + i`.
    pub seed: BigInt,
    pub strength: f64,
    pub size: u32,
    /// As in `GenerateSettings`.
    pub identity_weights: Vec<f64>,
    pub loras: Vec<LoraFile>,
}

/// A refined picture, the settings used, and LoRA keys that were left out (one line per file).
#[napi(object)]
pub struct Refined {
    pub image: RawImage,
    pub settings: RefineSettings,
    pub warnings: Vec<String>,
}

fn refine_params(r: &RefineRequest) -> hyperlora::Result<RefineParams> {
    let d = RefineParams::default();
    Ok(RefineParams {
        prompt: r.prompt.clone(),
        negative_prompt: r.negative_prompt.clone().unwrap_or(d.negative_prompt),
        steps: r.steps.map_or(d.steps, |s| s as usize),
        guidance_scale: r.cfg.unwrap_or(d.guidance_scale),
        sampler: r.sampler.map_or(d.sampler, Into::into),
        schedule: r.schedule.map_or(d.schedule, Into::into),
        seed: seed_u64(r.seed.as_ref())?,
        strength: r.strength.unwrap_or(d.strength),
        size: r.size.map_or(d.size, |s| s as usize),
        padding: r.padding.unwrap_or(d.padding),
        min_size: r.min_size.map_or(d.min_size, |s| s as usize),
        dilate: r.dilate.unwrap_or(d.dilate),
        feather: r.feather.unwrap_or(d.feather),
        faces: r
            .faces
            .as_deref()
            .map_or(Ok(d.faces), FaceSelection::parse)?,
    })
}

fn face_boxes(faces: &[FaceBox]) -> hyperlora::Result<Vec<EngineFaceBox>> {
    faces
        .iter()
        .map(|f| match f.bbox[..] {
            [x1, y1, x2, y2] => Ok(EngineFaceBox::from_xyxy([x1, y1, x2, y2])),
            _ => Err(Error::invalid_argument(format!(
                "a face bbox is [x1, y1, x2, y2], got {} numbers",
                f.bbox.len()
            ))),
        })
        .collect()
}

#[napi]
impl Pipeline {
    /// Re-draws each face of `image` at high resolution with the given identities and LoRA
    /// files merged in (img2img on a square crop around the face, blended back with a feathered
    /// mask); pixels outside the masks are returned unchanged. Progress stage: `refine`.
    #[napi(ts_return_type = "Promise<Refined>")]
    pub fn refine_faces(
        &self,
        image: RawImage,
        faces: Vec<FaceBox>,
        request: RefineRequest,
        cancel: Option<ClassInstance<CancelHandle>>,
        #[napi(ts_arg_type = "((event: ProgressEvent | null) => void) | undefined | null")]
        on_progress: Option<ProgressCallback>,
    ) -> napi::Result<AsyncTask<Call<Refined, Refined>>> {
        // Convert on the JavaScript thread: the task must not touch JS-owned buffers.
        let params = refine_params(&request).map_err(to_napi)?;
        let faces = face_boxes(&faces).map_err(to_napi)?;
        let (loras, identity_weights, files) = with_loras(
            Default::default(),
            request.identities.as_deref().unwrap_or_default(),
            request.loras.as_deref().unwrap_or_default(),
        )
        .map_err(to_napi)?;
        let image = RgbImage::from(&image);
        let settings = RefineSettings {
            prompt: params.prompt.clone(),
            negative_prompt: params.negative_prompt.clone(),
            steps: params.steps as u32,
            cfg: params.guidance_scale,
            sampler: params.sampler.into(),
            schedule: params.schedule.into(),
            seed: BigInt::from(params.seed),
            strength: params.strength,
            size: params.size as u32,
            identity_weights,
            loras: files,
        };
        let session = self.inner.get()?;
        Ok(call(
            CallContext::new(cancel, on_progress),
            Ok,
            move |cancel, progress| {
                let mut session = lock(&session);
                let warnings = session.activate(&loras.lora_set())?;
                let image = refine_faces(
                    session.pipeline(),
                    &image,
                    &faces,
                    &params,
                    cancel,
                    progress,
                )?;
                Ok(Refined {
                    image: image.into(),
                    settings,
                    warnings,
                })
            },
        ))
    }
}
