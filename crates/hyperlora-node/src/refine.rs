//! `Pipeline.refineFaces`: the face refine pass (img2img on each face region) off the event loop.

use std::sync::{Arc, Mutex};

use hyperlora::sdxl::pipeline::RgbImage;
use hyperlora::sdxl::refine::{
    refine_faces, FaceBox as EngineFaceBox, FaceSelection, RefineParams,
};
use hyperlora::sdxl::sampler::{Sampler, SigmaSchedule};
use hyperlora::Error;
use napi::bindgen_prelude::{AsyncTask, BigInt, ClassInstance};
use napi::{Env, Task};
use napi_derive::napi;

use crate::errors::{guarded, to_napi};
use crate::identity::Identity;
use crate::pipeline::{lora_set, seed_u64, ActiveLora, Loaded, LoraFile, Pipeline, RawImage};
use crate::progress::{CallContext, ProgressCallback};
use crate::CancelHandle;

/// A face to refine, in image pixels. A `DetectedFace` from `FaceAnalyzer.detect` fits as is.
#[napi(object)]
pub struct FaceBox {
    /// `[x1, y1, x2, y2]`; may reach past the image's edges.
    pub bbox: Vec<f64>,
}

/// The refine pass's sampling and region options; unset options take the engine's defaults.
#[napi(object)]
pub struct RefineRequest {
    /// The image's prompt or one written for the face.
    pub prompt: String,
    pub negative_prompt: Option<String>,
    /// Scheduler steps; `int(steps × strength)` of them run per face.
    pub steps: u32,
    pub cfg: f64,
    /// `euler`, `euler_ancestral`, `dpmpp_2m`, `dpmpp_2m_sde`, `ddim`.
    pub sampler: String,
    /// `normal`, `karras`, `exponential`.
    pub scheduler: String,
    /// Face `i` (among the refined faces, in order) uses `seed + i`.
    pub seed: BigInt,
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
}

fn refine_params(r: &RefineRequest) -> hyperlora::Result<RefineParams> {
    let d = RefineParams::default();
    Ok(RefineParams {
        prompt: r.prompt.clone(),
        negative_prompt: r.negative_prompt.clone().unwrap_or_default(),
        steps: r.steps as usize,
        guidance_scale: r.cfg,
        sampler: Sampler::parse(&r.sampler)?,
        schedule: SigmaSchedule::parse(&r.scheduler)?,
        seed: seed_u64(&r.seed)?,
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
    #[napi(ts_return_type = "Promise<RawImage>")]
    #[allow(clippy::too_many_arguments)]
    pub fn refine_faces(
        &self,
        image: RawImage,
        faces: Vec<FaceBox>,
        request: RefineRequest,
        identities: Vec<ClassInstance<Identity>>,
        identity_weights: Vec<f64>,
        loras: Vec<LoraFile>,
        cancel: Option<ClassInstance<CancelHandle>>,
        #[napi(ts_arg_type = "((event: ProgressEvent) => void) | undefined | null")]
        on_progress: Option<ProgressCallback>,
    ) -> napi::Result<AsyncTask<RefineTask>> {
        // Convert on the JavaScript thread: the task must not touch JS-owned buffers.
        let params = refine_params(&request).map_err(to_napi)?;
        let faces = face_boxes(&faces).map_err(to_napi)?;
        let loras = lora_set(&identities, identity_weights, loras).map_err(to_napi)?;
        Ok(AsyncTask::new(RefineTask {
            pipeline: self.inner.get()?,
            loras,
            image: RgbImage::from(&image),
            faces,
            params,
            call: CallContext::new(cancel, on_progress),
        }))
    }
}

pub struct RefineTask {
    pipeline: Arc<Mutex<Loaded>>,
    loras: Vec<ActiveLora>,
    image: RgbImage,
    faces: Vec<EngineFaceBox>,
    params: RefineParams,
    call: CallContext,
}

impl Task for RefineTask {
    type Output = RgbImage;
    type JsValue = RawImage;

    fn compute(&mut self) -> napi::Result<RgbImage> {
        let mut report = self.call.reporter();
        guarded(|| {
            let mut loaded = Loaded::lock(&self.pipeline);
            // The set's warnings went out with the generation this pass refines.
            loaded.activate(&self.loras)?;
            refine_faces(
                &loaded.pipeline,
                &self.image,
                &self.faces,
                &self.params,
                &self.call.cancel,
                &mut report,
            )
        })
    }

    fn resolve(&mut self, _env: Env, image: RgbImage) -> napi::Result<RawImage> {
        Ok(image.into())
    }
}
