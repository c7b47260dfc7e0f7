//! `loadPipeline`, `Pipeline.generate` and `Pipeline.generateMany`: SDXL text-to-image /
//! image-to-image off the event loop, one request or a batch of requests with different
//! identities.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use hyperlora::device::{device_name, select_device, select_dtype};
use hyperlora::image::RgbImage;
use hyperlora::lora::{read_lora_file, KohyaLora, LoraLayer};
use hyperlora::sdxl::batch::BatchRequest;
use hyperlora::sdxl::pipeline::{GenerateParams, InitImage, LoadOptions, SdxlPipeline};
use hyperlora::sdxl::sampling::sampler::{Sampler, SigmaSchedule};
use hyperlora::{CancelToken, Error, Progress};
use napi::bindgen_prelude::{AsyncTask, BigInt, Buffer, ClassInstance};
use napi::{Env, Task};
use napi_derive::napi;

use crate::errors::{guarded, to_napi};
use crate::identity::Identity;
use crate::progress::{CallContext, ProgressCallback};
use crate::resident::Resident;
use crate::seeds;
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
    pub(crate) fn activate(&mut self, loras: &[ActiveLora]) -> hyperlora::Result<()> {
        if self.active == loras {
            return Ok(());
        }
        let device = self.pipeline.device().clone();
        let layers = loras
            .iter()
            .map(|l| match &l.source {
                LoraSource::Identity(lora) => lora.to_layers(),
                LoraSource::File(path) => Ok(read_lora_file(path, &device)?.layers),
            })
            .collect::<hyperlora::Result<Vec<Vec<LoraLayer>>>>()?;
        let set: Vec<(&[LoraLayer], f32)> = layers
            .iter()
            .zip(loras)
            .map(|(l, a)| (l.as_slice(), a.weight))
            .collect();
        // Until the merge succeeds the active set is unknown: a failure leaves it to be redone.
        self.active.clear();
        self.pipeline.set_loras(&set)?;
        self.active = loras.to_vec();
        Ok(())
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

    /// Generates images with the given identities and LoRA files merged in (weights may be
    /// negative); resolves to raw RGB8 pixels, one entry per image. Image `k` is drawn from
    /// `seed + k` (wrapping at 2^64), so each one can be redrawn alone with its seed.
    #[napi(ts_return_type = "Promise<Array<RawImage>>")]
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
    /// alone (image `k` from the request's `seed + k`). Resolves to one array of images per
    /// request, in request order.
    #[napi(ts_return_type = "Promise<Array<Array<RawImage>>>")]
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

/// Test hook, only in builds with `--features test-hooks` (see `test_hooks.rs`): panics in a
/// worker while holding `pipeline`'s model (poisoning its lock), so tests can prove the call
/// fails with `INTERNAL` and the model keeps working. A function rather than a method: napi
/// leaves a stray blank line in `index.d.ts` for a skipped method's `impl` block, and the
/// checked-in file must not change between dev and release builds.
#[cfg(feature = "test-hooks")]
#[napi(js_name = "__panicWhileBusyForTests", skip_typescript)]
pub fn panic_while_busy_for_tests(
    pipeline: ClassInstance<Pipeline>,
) -> napi::Result<AsyncTask<PanicWhileBusyTask>> {
    Ok(AsyncTask::new(PanicWhileBusyTask {
        pipeline: pipeline.inner.get()?,
    }))
}

#[cfg(feature = "test-hooks")]
pub struct PanicWhileBusyTask {
    pipeline: Arc<Mutex<Loaded>>,
}

#[cfg(feature = "test-hooks")]
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

impl Task for GenerateTask {
    type Output = Vec<RgbImage>;
    type JsValue = Vec<RawImage>;

    fn compute(&mut self) -> napi::Result<Vec<RgbImage>> {
        let mut report = self.call.reporter();
        guarded(|| {
            let mut loaded = Loaded::lock(&self.pipeline);
            loaded.activate(&self.loras)?;
            seeds::generate(
                &loaded.pipeline,
                &self.params,
                &self.call.cancel,
                &mut report,
            )
        })
    }

    fn resolve(&mut self, _env: Env, images: Vec<RgbImage>) -> napi::Result<Vec<RawImage>> {
        Ok(images.into_iter().map(RawImage::from).collect())
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

    /// One UNet batch of `params[i]` with `identities[i]` and the shared `files`.
    fn run(
        loaded: &mut Loaded,
        files: &[ActiveLora],
        identities: &[Vec<(Arc<KohyaLora>, f32)>],
        params: &[GenerateParams],
        cancel: &CancelToken,
        report: &mut dyn FnMut(Progress),
    ) -> hyperlora::Result<Vec<Vec<RgbImage>>> {
        let shared = identities
            .windows(2)
            .all(|w| Self::as_active(&w[0]) == Self::as_active(&w[1]));
        if shared {
            // One identity set for all: merged with the files, the batch needs no side path.
            let mut set = Self::as_active(identities.first().map_or(&[], |s| s));
            set.extend(files.iter().cloned());
            loaded.activate(&set)?;
            let requests: Vec<BatchRequest> = params
                .iter()
                .map(|p| BatchRequest {
                    params: p.clone(),
                    loras: Vec::new(),
                })
                .collect();
            return loaded.pipeline.generate_many(&requests, cancel, report);
        }
        loaded.activate(files)?;
        // Each distinct identity's layers once: requests that share one share its rows' run.
        let mut distinct: Vec<(&Arc<KohyaLora>, Vec<LoraLayer>)> = Vec::new();
        for (lora, _) in identities.iter().flatten() {
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
        let requests: Vec<BatchRequest> = params
            .iter()
            .zip(identities)
            .map(|(p, set)| BatchRequest {
                params: p.clone(),
                loras: set.iter().map(|(l, w)| (layers_of(l), *w)).collect(),
            })
            .collect();
        loaded.pipeline.generate_many(&requests, cancel, report)
    }
}

impl Task for GenerateManyTask {
    type Output = Vec<Vec<RgbImage>>;
    type JsValue = Vec<Vec<RawImage>>;

    fn compute(&mut self) -> napi::Result<Vec<Vec<RgbImage>>> {
        let mut report = self.call.reporter();
        guarded(|| {
            let mut loaded = Loaded::lock(&self.pipeline);
            for (i, p) in self.params.iter().enumerate() {
                loaded
                    .pipeline
                    .validate(p)
                    .map_err(|e| e.context(format!("requests[{i}]")))?;
            }
            // One single-image request per image (per-image seeds), regrouped at the end.
            let counts: Vec<usize> = self.params.iter().map(|p| p.batch_size).collect();
            let params: Vec<GenerateParams> =
                self.params.iter().flat_map(seeds::per_image).collect();
            let identities: Vec<Vec<(Arc<KohyaLora>, f32)>> = self
                .identities
                .iter()
                .zip(&counts)
                .flat_map(|(set, &n)| std::iter::repeat_n(set.clone(), n))
                .collect();
            let images = Self::run(
                &mut loaded,
                &self.files,
                &identities,
                &params,
                &self.call.cancel,
                &mut report,
            )?;
            let mut images = images.into_iter().flatten();
            Ok(counts
                .iter()
                .map(|&n| images.by_ref().take(n).collect())
                .collect())
        })
    }

    fn resolve(
        &mut self,
        _env: Env,
        images: Vec<Vec<RgbImage>>,
    ) -> napi::Result<Vec<Vec<RawImage>>> {
        Ok(images
            .into_iter()
            .map(|set| set.into_iter().map(RawImage::from).collect())
            .collect())
    }
}
