//! `loadPipeline`, `Pipeline.generate` and `Pipeline.generateMany`: SDXL text-to-image /
//! image-to-image off the event loop, one request or a batch of requests with different
//! identities.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use hyperlora::device::{device_name, select_device, select_dtype};
use hyperlora::lora::{read_lora_file, summarize_skipped, KohyaLora, LoraLayer};
use hyperlora::sdxl::batch::BatchRequest;
use hyperlora::sdxl::pipeline::{GenerateParams, InitImage, LoadOptions, RgbImage, SdxlPipeline};
use hyperlora::sdxl::sampler::{Sampler, SigmaSchedule};
use hyperlora::Error;
use napi::bindgen_prelude::{AsyncTask, BigInt, Buffer, ClassInstance};
use napi::{Env, Task};
use napi_derive::napi;

use crate::errors::{guarded, to_napi};
use crate::identity::Identity;
use crate::progress::{CallContext, ProgressCallback};
use crate::resident::Resident;
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
    pub(crate) inner: Resident<Mutex<Loaded>>,
    device: &'static str,
}

/// The model and the LoRA set merged into it. Calls take turns: each needs its own LoRA set.
pub struct Loaded {
    pub(crate) pipeline: SdxlPipeline,
    active: Vec<ActiveLora>,
    /// What merging `active` left out, one line per LoRA file (see [`Loaded::activate`]).
    warnings: Vec<String>,
}

/// One LoRA of a request: an identity held in memory or a file, with its weight.
#[derive(Clone)]
pub struct ActiveLora {
    source: LoraSource,
    weight: f32,
}

#[derive(Clone)]
enum LoraSource {
    Identity(Arc<KohyaLora>),
    File(PathBuf),
}

impl PartialEq for ActiveLora {
    fn eq(&self, other: &Self) -> bool {
        let same = match (&self.source, &other.source) {
            (LoraSource::Identity(a), LoraSource::Identity(b)) => Arc::ptr_eq(a, b),
            (LoraSource::File(a), LoraSource::File(b)) => a == b,
            _ => false,
        };
        same && self.weight.to_bits() == other.weight.to_bits()
    }
}

impl Loaded {
    /// Takes the model for one call. A panic while merging poisons the lock; the active set is
    /// then marked unknown, so the next merge is redone from the resident base weights and the
    /// model stays usable.
    pub(crate) fn lock(model: &Mutex<Loaded>) -> MutexGuard<'_, Loaded> {
        model.lock().unwrap_or_else(|poisoned| {
            let mut loaded = poisoned.into_inner();
            loaded.active = vec![ActiveLora {
                source: LoraSource::File(PathBuf::new()),
                weight: f32::NAN,
            }];
            loaded
        })
    }

    /// Merges `loras` unless they are already the active set (switching never reloads the base).
    /// Returns one warning line per LoRA with keys that were not applied (unknown keys, modules
    /// SDXL does not have or that do not fit); a file none of whose modules applies is
    /// `INVALID_ARGUMENT` naming it.
    pub(crate) fn activate(&mut self, loras: &[ActiveLora]) -> hyperlora::Result<Vec<String>> {
        if self.active == loras {
            return Ok(self.warnings.clone());
        }
        let device = self.pipeline.device().clone();
        let mut read = Vec::with_capacity(loras.len());
        for lora in loras {
            let (name, layers, skipped) = match &lora.source {
                LoraSource::Identity(id) => ("identity".to_string(), id.to_layers()?, Vec::new()),
                LoraSource::File(path) => {
                    let parsed = read_lora_file(path, &device)?;
                    let name = path.file_name().map_or_else(
                        || path.display().to_string(),
                        |n| n.to_string_lossy().into_owned(),
                    );
                    (name, parsed.layers, parsed.skipped)
                }
            };
            let unfit = self.pipeline.unfit_lora_layers(&layers);
            if !layers.is_empty() && unfit.len() == layers.len() {
                return Err(Error::invalid_argument(format!(
                    "{name}: none of its {} LoRA modules fits a layer of this SDXL model ({})",
                    layers.len(),
                    summarize_skipped(&unfit)
                )));
            }
            read.push((name, layers, skipped));
        }
        let set: Vec<(&[LoraLayer], f32)> = read
            .iter()
            .zip(loras)
            .map(|((_, layers, _), a)| (layers.as_slice(), a.weight))
            .collect();
        // Until the merge succeeds the active set is unknown: a failure leaves it to be redone.
        self.active.clear();
        let report = self.pipeline.set_loras(&set)?;
        self.warnings = read
            .into_iter()
            .zip(report)
            .filter_map(|((name, _, mut skipped), unfit)| {
                skipped.extend(unfit);
                (!skipped.is_empty()).then(|| format!("{name}: {}", summarize_skipped(&skipped)))
            })
            .collect();
        self.active = loras.to_vec();
        Ok(self.warnings.clone())
    }
}

/// A LoRA file to apply to a generation.
#[napi(object)]
pub struct LoraFile {
    pub path: String,
    pub weight: f64,
}

/// A request's LoRA set: the identities with their weights, then the files.
pub(crate) fn lora_set(
    identities: &[ClassInstance<Identity>],
    identity_weights: Vec<f64>,
    loras: Vec<LoraFile>,
) -> hyperlora::Result<Vec<ActiveLora>> {
    if identities.len() != identity_weights.len() {
        return Err(Error::invalid_argument("one weight per identity"));
    }
    let identities = identities
        .iter()
        .zip(identity_weights)
        .map(|(i, w)| ActiveLora {
            source: LoraSource::Identity(i.lora.clone()),
            weight: w as f32,
        });
    let files = loras.into_iter().map(ActiveLora::file);
    Ok(identities.chain(files).collect())
}

/// A seed from JavaScript (a bigint, so seeds above 2^53 survive).
pub(crate) fn seed_u64(seed: &BigInt) -> hyperlora::Result<u64> {
    let (sign, seed, lossless) = seed.get_u64();
    if sign || !lossless {
        return Err(Error::invalid_argument(
            "seed must be an integer in [0, 2^64)",
        ));
    }
    Ok(seed)
}

impl ActiveLora {
    fn file(l: LoraFile) -> Self {
        Self {
            source: LoraSource::File(PathBuf::from(l.path)),
            weight: l.weight as f32,
        }
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

    /// Test hook: panics in a worker while holding the model (poisoning its lock), so tests can
    /// prove the call fails with `INTERNAL` and the model keeps working.
    #[napi(js_name = "__panicWhileBusyForTests", ts_return_type = "Promise<void>")]
    pub fn panic_while_busy_for_tests(&self) -> napi::Result<AsyncTask<PanicWhileBusyTask>> {
        Ok(AsyncTask::new(PanicWhileBusyTask {
            pipeline: self.inner.get()?,
        }))
    }

    /// Generates images with the given identities and LoRA files merged in (weights may be
    /// negative); resolves to raw RGB8 pixels, one entry per image, and the LoRA warnings.
    #[napi(ts_return_type = "Promise<GenerateResult>")]
    #[allow(clippy::too_many_arguments)]
    pub fn generate(
        &self,
        params: GenerateRequest,
        identities: Vec<ClassInstance<Identity>>,
        identity_weights: Vec<f64>,
        loras: Vec<LoraFile>,
        cancel: Option<ClassInstance<CancelHandle>>,
        #[napi(ts_arg_type = "((event: ProgressEvent) => void) | undefined | null")]
        on_progress: Option<ProgressCallback>,
    ) -> napi::Result<AsyncTask<GenerateTask>> {
        // Convert on the JavaScript thread: the task must not touch JS-owned buffers.
        let params = guarded(|| engine_params(&params))?;
        let loras = lora_set(&identities, identity_weights, loras).map_err(to_napi)?;
        Ok(AsyncTask::new(GenerateTask {
            pipeline: self.inner.get()?,
            loras,
            params,
            call: CallContext::new(cancel, on_progress),
        }))
    }

    /// Generates several requests in one UNet batch: they must share width, height, steps,
    /// cfg, sampler and scheduler (and have no init image), and each has its own prompts, seed,
    /// batch size and identities (`identities[i]` with `identityWeights[i]` for `requests[i]`);
    /// `loras` apply to every request. Each request's images equal what `generate` gives it
    /// alone. Resolves to one array of images per request, in request order, and the LoRA
    /// warnings.
    #[napi(ts_return_type = "Promise<GenerateManyResult>")]
    #[allow(clippy::too_many_arguments)]
    pub fn generate_many(
        &self,
        requests: Vec<GenerateRequest>,
        identities: Vec<Vec<ClassInstance<Identity>>>,
        identity_weights: Vec<Vec<f64>>,
        loras: Vec<LoraFile>,
        cancel: Option<ClassInstance<CancelHandle>>,
        #[napi(ts_arg_type = "((event: ProgressEvent) => void) | undefined | null")]
        on_progress: Option<ProgressCallback>,
    ) -> napi::Result<AsyncTask<GenerateManyTask>> {
        let params = guarded(|| {
            if identities.len() != requests.len() || identity_weights.len() != requests.len() {
                return Err(Error::invalid_argument(format!(
                    "identities and identityWeights need one entry per request ({} requests, {} identity sets, {} weight sets)",
                    requests.len(),
                    identities.len(),
                    identity_weights.len()
                )));
            }
            requests
                .iter()
                .enumerate()
                .map(|(i, r)| engine_params(r).map_err(|e| e.context(format!("requests[{i}]"))))
                .collect::<hyperlora::Result<Vec<_>>>()
        })?;
        let identities = identities
            .iter()
            .zip(identity_weights)
            .enumerate()
            .map(|(i, (set, weights))| {
                if set.len() != weights.len() {
                    return Err(crate::errors::to_napi(Error::invalid_argument(format!(
                        "identityWeights[{i}]: one weight per identity ({} identities, {} weights)",
                        set.len(),
                        weights.len()
                    ))));
                }
                Ok(set
                    .iter()
                    .zip(weights)
                    .map(|(identity, w)| (identity.lora.clone(), w as f32))
                    .collect())
            })
            .collect::<napi::Result<Vec<_>>>()?;
        Ok(AsyncTask::new(GenerateManyTask {
            pipeline: self.inner.get()?,
            files: loras.into_iter().map(ActiveLora::file).collect(),
            identities,
            params,
            call: CallContext::new(cancel, on_progress),
        }))
    }
}

pub struct PanicWhileBusyTask {
    pipeline: Arc<Mutex<Loaded>>,
}

impl Task for PanicWhileBusyTask {
    type Output = ();
    type JsValue = ();

    fn compute(&mut self) -> napi::Result<()> {
        guarded(|| {
            let _busy = Loaded::lock(&self.pipeline);
            panic!("injected test panic while the model is busy")
        })
    }

    fn resolve(&mut self, _env: Env, _: ()) -> napi::Result<()> {
        Ok(())
    }
}

pub struct LoadTask {
    path: PathBuf,
    options: LoadOptions,
    device: String,
    dtype: Option<String>,
}

impl Task for LoadTask {
    type Output = Pipeline;
    type JsValue = Pipeline;

    fn compute(&mut self) -> napi::Result<Pipeline> {
        guarded(|| {
            let device = select_device(&self.device)?;
            let dtype = select_dtype(self.dtype.as_deref(), &device)?;
            let pipeline = SdxlPipeline::load(&self.path, &self.options, &device, dtype)?;
            Ok(Pipeline {
                inner: Resident::new(Mutex::new(Loaded {
                    pipeline,
                    active: Vec::new(),
                    warnings: Vec::new(),
                })),
                device: device_name(&device),
            })
        })
    }

    fn resolve(&mut self, _env: Env, pipeline: Pipeline) -> napi::Result<Pipeline> {
        Ok(pipeline)
    }
}

/// Loads an SDXL model: a diffusers folder, a Hugging Face cache entry or a single-file checkpoint.
#[napi(ts_return_type = "Promise<Pipeline>")]
pub fn load_pipeline(path: String, options: Option<LoadPipelineOptions>) -> AsyncTask<LoadTask> {
    let options = options.unwrap_or(LoadPipelineOptions {
        device: None,
        dtype: None,
        config_dir: None,
        merges_file: None,
    });
    AsyncTask::new(LoadTask {
        path: PathBuf::from(path),
        options: LoadOptions {
            config_dir: options.config_dir.map(PathBuf::from),
            merges_file: options.merges_file.map(PathBuf::from),
        },
        device: options.device.unwrap_or_else(|| "auto".to_string()),
        dtype: options.dtype,
    })
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

#[napi(object)]
pub struct GenerateRequest {
    pub prompt: String,
    pub negative_prompt: Option<String>,
    pub width: u32,
    pub height: u32,
    pub steps: u32,
    pub cfg: f64,
    /// `euler`, `euler_ancestral`, `dpmpp_2m`, `dpmpp_2m_sde`, `ddim`.
    pub sampler: String,
    /// `normal`, `karras`, `exponential`.
    pub scheduler: String,
    /// Seeds above 2^53 cannot be represented exactly in JavaScript; pass them as a bigint.
    pub seed: napi::bindgen_prelude::BigInt,
    pub batch_size: u32,
    pub init_image: Option<RawImage>,
    pub strength: Option<f64>,
}

pub struct GenerateTask {
    pipeline: Arc<Mutex<Loaded>>,
    loras: Vec<ActiveLora>,
    params: GenerateParams,
    call: CallContext,
}

fn engine_params(r: &GenerateRequest) -> hyperlora::Result<GenerateParams> {
    let seed = seed_u64(&r.seed)?;
    let init_image = r.init_image.as_ref().map(|image| InitImage {
        image: image.into(),
        strength: r.strength.unwrap_or(0.75),
    });
    Ok(GenerateParams {
        prompt: r.prompt.clone(),
        negative_prompt: r.negative_prompt.clone().unwrap_or_default(),
        width: r.width as usize,
        height: r.height as usize,
        steps: r.steps as usize,
        guidance_scale: r.cfg,
        sampler: Sampler::parse(&r.sampler)?,
        schedule: SigmaSchedule::parse(&r.scheduler)?,
        seed,
        batch_size: r.batch_size as usize,
        init_image,
    })
}

/// What `generate` resolves to.
#[napi(object)]
pub struct GenerateResult {
    pub images: Vec<RawImage>,
    /// One line per LoRA file with keys that were not applied (matched no layer of the model,
    /// did not fit it, or are of a kind hyperlora does not apply): a count and the first keys.
    pub warnings: Vec<String>,
}

/// What `generateMany` resolves to.
#[napi(object)]
pub struct GenerateManyResult {
    /// One array of images per request, in request order.
    pub images: Vec<Vec<RawImage>>,
    /// As `GenerateResult.warnings`.
    pub warnings: Vec<String>,
}

impl Task for GenerateTask {
    type Output = (Vec<RgbImage>, Vec<String>);
    type JsValue = GenerateResult;

    fn compute(&mut self) -> napi::Result<Self::Output> {
        let mut report = self.call.reporter();
        guarded(|| {
            let mut loaded = Loaded::lock(&self.pipeline);
            let warnings = loaded.activate(&self.loras)?;
            let images = loaded
                .pipeline
                .generate(&self.params, &self.call.cancel, &mut report)?;
            Ok((images, warnings))
        })
    }

    fn resolve(
        &mut self,
        _env: Env,
        (images, warnings): Self::Output,
    ) -> napi::Result<GenerateResult> {
        Ok(GenerateResult {
            images: images.into_iter().map(RawImage::from).collect(),
            warnings,
        })
    }
}

pub struct GenerateManyTask {
    pipeline: Arc<Mutex<Loaded>>,
    /// LoRA files shared by every request.
    files: Vec<ActiveLora>,
    /// Each request's identities with their weights.
    identities: Vec<Vec<(Arc<KohyaLora>, f32)>>,
    params: Vec<GenerateParams>,
    call: CallContext,
}

impl GenerateManyTask {
    fn as_active(set: &[(Arc<KohyaLora>, f32)]) -> Vec<ActiveLora> {
        set.iter()
            .map(|(lora, weight)| ActiveLora {
                source: LoraSource::Identity(lora.clone()),
                weight: *weight,
            })
            .collect()
    }
}

impl Task for GenerateManyTask {
    type Output = (Vec<Vec<RgbImage>>, Vec<String>);
    type JsValue = GenerateManyResult;

    fn compute(&mut self) -> napi::Result<Self::Output> {
        let mut report = self.call.reporter();
        guarded(|| {
            let mut loaded = Loaded::lock(&self.pipeline);
            let shared = self
                .identities
                .windows(2)
                .all(|w| Self::as_active(&w[0]) == Self::as_active(&w[1]));
            if shared {
                // One identity set for all: merged with the files, the batch needs no side path.
                let mut set = Self::as_active(self.identities.first().map_or(&[], |s| s));
                set.extend(self.files.iter().cloned());
                let warnings = loaded.activate(&set)?;
                let requests: Vec<BatchRequest> = self
                    .params
                    .iter()
                    .map(|p| BatchRequest {
                        params: p.clone(),
                        loras: Vec::new(),
                    })
                    .collect();
                let images =
                    loaded
                        .pipeline
                        .generate_many(&requests, &self.call.cancel, &mut report)?;
                return Ok((images, warnings));
            }
            // LoRA files (styles, LoCon, LyCORIS) are shared by every request: merged into the
            // weights for the whole batch; only the identities go per sample.
            let warnings = loaded.activate(&self.files)?;
            // Each distinct identity's layers once: requests that share one share its rows' run.
            let mut distinct: Vec<(&Arc<KohyaLora>, Vec<LoraLayer>)> = Vec::new();
            for (lora, _) in self.identities.iter().flatten() {
                if !distinct.iter().any(|(d, _)| Arc::ptr_eq(d, lora)) {
                    distinct.push((lora, lora.to_layers()?));
                }
            }
            let layers_of = |lora: &Arc<KohyaLora>| {
                distinct
                    .iter()
                    .find(|(d, _)| Arc::ptr_eq(d, lora))
                    .map(|(_, layers)| layers.as_slice())
                    .unwrap_or_default()
            };
            let requests: Vec<BatchRequest> = self
                .params
                .iter()
                .zip(&self.identities)
                .map(|(p, set)| BatchRequest {
                    params: p.clone(),
                    loras: set.iter().map(|(l, w)| (layers_of(l), *w)).collect(),
                })
                .collect();
            let images =
                loaded
                    .pipeline
                    .generate_many(&requests, &self.call.cancel, &mut report)?;
            Ok((images, warnings))
        })
    }

    fn resolve(
        &mut self,
        _env: Env,
        (images, warnings): Self::Output,
    ) -> napi::Result<GenerateManyResult> {
        Ok(GenerateManyResult {
            images: images
                .into_iter()
                .map(|set| set.into_iter().map(RawImage::from).collect())
                .collect(),
            warnings,
        })
    }
}
