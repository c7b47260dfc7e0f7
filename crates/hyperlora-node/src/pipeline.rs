//! `loadPipeline` and the `Pipeline` class: conversions between JavaScript requests and the
//! engine's [`Session`], which owns the LoRA sets, batching and defaults. Unset request fields
//! take the engine's defaults, and every result says which settings it was drawn with.

use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};

use hyperlora::device::{device_name, select_device, select_dtype};
use hyperlora::image::RgbImage;
use hyperlora::sdxl::control::ControlNetUse;
use hyperlora::sdxl::pipeline::{GenerateParams, InitImage, LoadOptions, SdxlPipeline};
use hyperlora::session::{self, plan_batches, random_seed, Session, DEFAULT_IDENTITY_WEIGHT};
use hyperlora::Error;
use napi::bindgen_prelude::{AsyncTask, BigInt, Buffer, ClassInstance};
use napi_derive::napi;

use crate::call::{call, Call, CallContext, ProgressCallback};
use crate::controlnet::{control_uses, ControlNetRequest, ControlNetSettings};
use crate::errors::{guarded, to_napi};
use crate::identity::Identity;
use crate::resident::Resident;
use crate::words::{Sampler, SigmaSchedule};
use crate::CancelHandle;

#[napi(object)]
pub struct LoadPipelineOptions {
    /// `auto` (default), `cpu`, `cuda` or `metal`.
    pub device: Option<String>,
    /// `auto` (default: f16 on GPUs, f32 on CPU), `f32`, `f16` or `bf16`.
    pub dtype: Option<String>,
    /// A diffusers folder with the configs/tokenizers a single-file checkpoint lacks.
    pub config_dir: Option<String>,
    /// CLIP merges for single-file checkpoints without `configDir`.
    pub merges_file: Option<String>,
}

/// A loaded SDXL model. Weights stay resident until `dispose()` or garbage collection.
#[napi]
pub struct Pipeline {
    pub(crate) inner: Resident<Mutex<Session>>,
    device: &'static str,
}

/// Takes the session for one call. A panic while it was held poisons the lock; the merged set
/// is then unknown, so the next call merges its own afresh and the model stays usable.
pub(crate) fn lock(session: &Mutex<Session>) -> MutexGuard<'_, Session> {
    session.lock().unwrap_or_else(|poisoned| {
        let mut session = poisoned.into_inner();
        session.forget_active_set();
        session
    })
}

/// An identity to draw, with its LoRA weight (default 0.85; negative weights subtract) and the
/// weight of its Base-LoRA (default 0: off, as the reference workflows leave it).
#[napi(object, object_to_js = false)]
pub struct IdentityUse<'a> {
    pub identity: ClassInstance<'a, Identity>,
    pub weight: Option<f64>,
    pub base_weight: Option<f64>,
}

/// A LoRA file to apply, with its weight (default 1).
#[napi(object)]
pub struct LoraFile {
    pub path: String,
    pub weight: Option<f64>,
}

/// `params` with a request's identities (and the Base-LoRAs asked for) and LoRA files, weights
/// defaulted; and those weights as JavaScript gave them, for the settings.
pub(crate) fn with_loras(
    params: GenerateParams,
    identities: &[IdentityUse],
    loras: &[LoraFile],
) -> hyperlora::Result<(session::Request, Vec<f64>, Vec<LoraFile>)> {
    let mut held = Vec::new();
    let mut weights = Vec::new();
    for (i, u) in identities.iter().enumerate() {
        let weight = u.weight.unwrap_or(DEFAULT_IDENTITY_WEIGHT);
        held.push((u.identity.lora.clone(), weight as f32));
        weights.push(weight);
        match (u.base_weight.unwrap_or(0.0), &u.identity.base) {
            (0.0, _) => {}
            (w, Some(base)) => {
                held.push((base.clone(), w as f32));
                weights.push(w);
            }
            (_, None) => {
                return Err(Error::invalid_argument(format!(
                    "identities[{i}].baseWeight: this identity has no Base-LoRA (its HyperLoRA model has none)"
                )))
            }
        }
    }
    let files: Vec<LoraFile> = loras
        .iter()
        .map(|l| LoraFile {
            path: l.path.clone(),
            weight: Some(l.weight.unwrap_or(1.0)),
        })
        .collect();
    let request = session::Request {
        params,
        identities: held,
        files: files
            .iter()
            .map(|l| (PathBuf::from(&l.path), l.weight.unwrap_or(1.0) as f32))
            .collect(),
    };
    Ok((request, weights, files))
}

/// A seed from JavaScript (a bigint, so seeds above 2^53 survive); none gives a random one.
pub(crate) fn seed_u64(seed: Option<&BigInt>) -> hyperlora::Result<u64> {
    let Some(seed) = seed else {
        return Ok(random_seed());
    };
    let (sign, seed, lossless) = seed.get_u64();
    if sign || !lossless {
        return Err(Error::invalid_argument(
            "seed must be an integer in [0, 2^64)",
        ));
    }
    Ok(seed)
}

/// An RGB8 picture handed in or out of the engine.
#[napi(object)]
pub struct RawImage {
    pub width: u32,
    pub height: u32,
    /// width × height × 3 bytes, rows top to bottom.
    pub data: Buffer,
}

impl From<&RawImage> for RgbImage {
    fn from(image: &RawImage) -> Self {
        RgbImage {
            width: image.width as usize,
            height: image.height as usize,
            data: image.data.to_vec(),
        }
    }
}

impl From<RgbImage> for RawImage {
    fn from(image: RgbImage) -> Self {
        RawImage {
            width: image.width as u32,
            height: image.height as u32,
            data: image.data.into(),
        }
    }
}

/// One generation request. Unset fields take the engine's defaults: 1024², 20 steps, cfg 5,
/// `dpmpp_2m` with `karras` sigmas, a random seed, one image, strength 0.75 with an init image.
#[napi(object, object_to_js = false)]
pub struct GenerateRequest<'a> {
    pub prompt: String,
    pub negative_prompt: Option<String>,
    pub width: Option<u32>,
    pub height: Option<u32>,
    pub steps: Option<u32>,
    pub cfg: Option<f64>,
    pub sampler: Option<Sampler>,
    pub schedule: Option<SigmaSchedule>,
    /// Image `k` is drawn from `seed + k`. Seeds above 2^53 need a bigint.
    pub seed: Option<BigInt>,
    pub batch_size: Option<u32>,
    pub init_image: Option<RawImage>,
    pub strength: Option<f64>,
    pub identities: Option<Vec<IdentityUse<'a>>>,
    pub loras: Option<Vec<LoraFile>>,
    /// ControlNets with their control images (several are summed, as diffusers'
    /// MultiControlNet).
    pub controlnets: Option<Vec<ControlNetRequest<'a>>>,
}

/// The settings a request was drawn with, every default filled in.
#[napi(object)]
pub struct GenerateSettings {
    pub prompt: String,
    pub negative_prompt: String,
    pub width: u32,
    pub height: u32,
    pub steps: u32,
    pub cfg: f64,
    pub sampler: Sampler,
    pub schedule: SigmaSchedule,
    /// The seed of image 0; image `k` has `seed + k` (wrapping at 2^64).
    pub seed: BigInt,
    pub batch_size: u32,
    /// Only with an init image.
    pub strength: Option<f64>,
    /// The weight of each identity, in request order (a Base-LoRA in use follows its
    /// identity).
    pub identity_weights: Vec<f64>,
    pub loras: Vec<LoraFile>,
    pub controlnets: Vec<ControlNetSettings>,
}

/// What a request gets for the fields it leaves unset.
#[napi(object)]
pub struct GenerateDefaults {
    pub width: u32,
    pub height: u32,
    pub steps: u32,
    pub cfg: f64,
    pub sampler: Sampler,
    pub schedule: SigmaSchedule,
    pub batch_size: u32,
    /// With an init image.
    pub strength: f64,
    pub identity_weight: f64,
    /// A ControlNet's strength, start and end.
    pub controlnet_strength: f64,
    pub controlnet_start: f64,
    pub controlnet_end: f64,
}

/// The engine's defaults (the one place they are written is the engine).
#[napi]
pub fn generate_defaults() -> GenerateDefaults {
    let d = GenerateParams::default();
    GenerateDefaults {
        width: d.width as u32,
        height: d.height as u32,
        steps: d.steps as u32,
        cfg: d.guidance_scale,
        sampler: d.sampler.into(),
        schedule: d.schedule.into(),
        batch_size: d.batch_size as u32,
        strength: InitImage::DEFAULT_STRENGTH,
        identity_weight: DEFAULT_IDENTITY_WEIGHT,
        controlnet_strength: ControlNetUse::DEFAULT_SCALE,
        controlnet_start: ControlNetUse::DEFAULT_START,
        controlnet_end: ControlNetUse::DEFAULT_END,
    }
}

/// What one request drew: its images, the settings used, and what the caller should know (LoRA
/// keys that were left out, one line per file).
#[napi(object)]
pub struct Generated {
    pub images: Vec<RawImage>,
    pub settings: GenerateSettings,
    pub warnings: Vec<String>,
}

/// A request in the engine's terms (defaults filled in), with its settings for the result.
/// Runs on the JavaScript thread: the task must not touch JS-owned buffers.
fn engine_request(r: &GenerateRequest) -> napi::Result<(session::Request, GenerateSettings)> {
    let (controlnets, controlnet_settings) =
        control_uses(r.controlnets.as_deref().unwrap_or_default())?;
    request_with(r, controlnets, controlnet_settings).map_err(to_napi)
}

fn request_with(
    r: &GenerateRequest,
    controlnets: Vec<ControlNetUse>,
    controlnet_settings: Vec<ControlNetSettings>,
) -> hyperlora::Result<(session::Request, GenerateSettings)> {
    let d = GenerateParams::default();
    let seed = seed_u64(r.seed.as_ref())?;
    let init_image = r.init_image.as_ref().map(|image| InitImage {
        image: image.into(),
        strength: r.strength.unwrap_or(InitImage::DEFAULT_STRENGTH),
    });
    let params = GenerateParams {
        prompt: r.prompt.clone(),
        negative_prompt: r.negative_prompt.clone().unwrap_or(d.negative_prompt),
        width: r.width.map_or(d.width, |v| v as usize),
        height: r.height.map_or(d.height, |v| v as usize),
        steps: r.steps.map_or(d.steps, |v| v as usize),
        guidance_scale: r.cfg.unwrap_or(d.guidance_scale),
        sampler: r.sampler.map_or(d.sampler, Into::into),
        schedule: r.schedule.map_or(d.schedule, Into::into),
        seed,
        batch_size: r.batch_size.map_or(d.batch_size, |v| v as usize),
        init_image,
        controlnets,
    };
    let (request, identity_weights, loras) = with_loras(
        params,
        r.identities.as_deref().unwrap_or_default(),
        r.loras.as_deref().unwrap_or_default(),
    )?;
    let params = &request.params;
    let settings = GenerateSettings {
        prompt: params.prompt.clone(),
        negative_prompt: params.negative_prompt.clone(),
        width: params.width as u32,
        height: params.height as u32,
        steps: params.steps as u32,
        cfg: params.guidance_scale,
        sampler: params.sampler.into(),
        schedule: params.schedule.into(),
        seed: BigInt::from(seed),
        batch_size: params.batch_size as u32,
        strength: params.init_image.as_ref().map(|i| i.strength),
        identity_weights,
        loras,
        controlnets: controlnet_settings,
    };
    Ok((request, settings))
}

fn engine_requests(
    requests: &[GenerateRequest],
) -> napi::Result<(Vec<session::Request>, Vec<GenerateSettings>)> {
    requests
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let (controlnets, settings) =
                control_uses(r.controlnets.as_deref().unwrap_or_default())?;
            request_with(r, controlnets, settings)
                .map_err(|e| to_napi(e.context(format!("requests[{i}]"))))
        })
        .collect::<napi::Result<Vec<_>>>()
        .map(|pairs| pairs.into_iter().unzip())
}

fn generated(images: Vec<RgbImage>, settings: GenerateSettings, warnings: &[String]) -> Generated {
    Generated {
        images: images.into_iter().map(RawImage::from).collect(),
        settings,
        warnings: warnings.to_vec(),
    }
}

#[napi]
impl Pipeline {
    /// `cpu`, `cuda` or `metal`: where the model runs.
    #[napi(getter)]
    pub fn device(&self) -> String {
        self.device.to_string()
    }

    /// Frees the model; a running call finishes first, later calls fail with `INVALID_ARGUMENT`.
    #[napi]
    pub fn dispose(&self) {
        self.inner.dispose();
    }

    /// Draws one request with its identities and LoRA files merged in (weights may be
    /// negative). Image `k` is drawn from `seed + k`, so each redraws alone with its seed.
    #[napi(ts_return_type = "Promise<Generated>")]
    pub fn generate(
        &self,
        request: GenerateRequest,
        cancel: Option<ClassInstance<CancelHandle>>,
        #[napi(ts_arg_type = "((event: ProgressEvent | null) => void) | undefined | null")]
        on_progress: Option<ProgressCallback>,
    ) -> napi::Result<AsyncTask<Call<Generated, Generated>>> {
        let (request, settings) = engine_request(&request)?;
        let session = self.inner.get()?;
        Ok(call(
            CallContext::new(cancel, on_progress),
            Ok,
            move |cancel, progress| {
                let mut session = lock(&session);
                let images = session.generate(&request, cancel, progress)?;
                Ok(generated(images, settings, session.warnings()))
            },
        ))
    }

    /// Splits requests into batches to run one after the other (indices into `requests`):
    /// requests that share size, steps, cfg, sampler, sigma schedule and LoRA files, without an
    /// init image, share a batch of at most `maxImages` images, whatever their identities.
    #[napi]
    pub fn plan_batches(
        &self,
        requests: Vec<GenerateRequest>,
        max_images: u32,
    ) -> napi::Result<Vec<Vec<u32>>> {
        let (requests, _) = guarded(|| Ok(engine_requests(&requests)))??;
        Ok(plan_batches(&requests, max_images as usize)
            .into_iter()
            .map(|batch| batch.into_iter().map(|i| i as u32).collect())
            .collect())
    }

    /// Draws requests that `planBatches` put in one batch as one UNet batch, each with its own
    /// prompts, seed, batch size and identities; each request's images equal what `generate`
    /// draws for it alone. One result per request, in order.
    #[napi(ts_return_type = "Promise<Array<Generated>>")]
    pub fn generate_many(
        &self,
        requests: Vec<GenerateRequest>,
        cancel: Option<ClassInstance<CancelHandle>>,
        #[napi(ts_arg_type = "((event: ProgressEvent | null) => void) | undefined | null")]
        on_progress: Option<ProgressCallback>,
    ) -> napi::Result<AsyncTask<Call<Vec<Generated>, Vec<Generated>>>> {
        let (requests, settings) = engine_requests(&requests)?;
        let session = self.inner.get()?;
        Ok(call(
            CallContext::new(cancel, on_progress),
            Ok,
            move |cancel, progress| {
                let mut session = lock(&session);
                let images = session.generate_many(&requests, cancel, progress)?;
                let warnings = session.warnings();
                Ok(images
                    .into_iter()
                    .zip(settings)
                    .map(|(i, s)| generated(i, s, warnings))
                    .collect())
            },
        ))
    }
}

/// Loads an SDXL model: a diffusers folder, a Hugging Face cache entry or a single-file checkpoint.
#[napi(ts_return_type = "Promise<Pipeline>")]
pub fn load_pipeline(
    path: String,
    options: Option<LoadPipelineOptions>,
) -> AsyncTask<Call<(SdxlPipeline, &'static str), Pipeline>> {
    let options = options.unwrap_or(LoadPipelineOptions {
        device: None,
        dtype: None,
        config_dir: None,
        merges_file: None,
    });
    let load = LoadOptions {
        config_dir: options.config_dir.map(PathBuf::from),
        merges_file: options.merges_file.map(PathBuf::from),
    };
    let device = options.device.unwrap_or_else(|| "auto".to_string());
    call(
        CallContext::default(),
        |(pipeline, device)| {
            Ok(Pipeline {
                inner: Resident::new(Mutex::new(Session::new(pipeline))),
                device,
            })
        },
        move |_, _| {
            let device = select_device(&device)?;
            let dtype = select_dtype(options.dtype.as_deref(), &device)?;
            let pipeline = SdxlPipeline::load(&PathBuf::from(path), &load, &device, dtype)?;
            Ok((pipeline, device_name(&device)))
        },
    )
}
