//! `loadPipeline` and `Pipeline.generate`: SDXL text-to-image / image-to-image off the event loop.

use std::path::PathBuf;
use std::sync::Arc;

use hyperlora::device::{device_name, select_device, select_dtype};
use hyperlora::sdxl::pipeline::{GenerateParams, InitImage, LoadOptions, RgbImage, SdxlPipeline};
use hyperlora::sdxl::sampler::{Sampler, SigmaSchedule};
use hyperlora::Error;
use napi::bindgen_prelude::{AsyncTask, Buffer, ClassInstance};
use napi::{Env, Task};
use napi_derive::napi;

use crate::errors::guarded;
use crate::progress::{CallContext, ProgressCallback};
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

/// A loaded SDXL model. Weights stay resident until the object is garbage-collected.
#[napi]
pub struct Pipeline {
    inner: Arc<SdxlPipeline>,
    device: &'static str,
}

#[napi]
impl Pipeline {
    /// `cpu`, `cuda` or `metal`: where the model runs.
    #[napi(getter)]
    pub fn device(&self) -> String {
        self.device.to_string()
    }

    /// Generates images; resolves to raw RGB8 pixels, one entry per image.
    #[napi(ts_return_type = "Promise<Array<RawImage>>")]
    pub fn generate(
        &self,
        params: GenerateRequest,
        cancel: Option<ClassInstance<CancelHandle>>,
        #[napi(ts_arg_type = "((event: ProgressEvent) => void) | undefined | null")]
        on_progress: Option<ProgressCallback>,
    ) -> napi::Result<AsyncTask<GenerateTask>> {
        // Convert on the JavaScript thread: the task must not touch JS-owned buffers.
        let params = guarded(|| engine_params(&params))?;
        Ok(AsyncTask::new(GenerateTask {
            pipeline: self.inner.clone(),
            params,
            call: CallContext::new(cancel, on_progress),
        }))
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
            let inner = SdxlPipeline::load(&self.path, &self.options, &device, dtype)?;
            Ok(Pipeline {
                inner: Arc::new(inner),
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
    pipeline: Arc<SdxlPipeline>,
    params: GenerateParams,
    call: CallContext,
}

fn engine_params(r: &GenerateRequest) -> hyperlora::Result<GenerateParams> {
    let (sign, seed, lossless) = r.seed.get_u64();
    if sign || !lossless {
        return Err(Error::invalid_argument(
            "seed must be an integer in [0, 2^64)",
        ));
    }
    let init_image = r.init_image.as_ref().map(|image| InitImage {
        image: RgbImage {
            width: image.width as usize,
            height: image.height as usize,
            data: image.data.to_vec(),
        },
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
            self.pipeline
                .generate(&self.params, &self.call.cancel, &mut report)
        })
    }

    fn resolve(&mut self, _env: Env, images: Vec<RgbImage>) -> napi::Result<Vec<RawImage>> {
        Ok(images
            .into_iter()
            .map(|i| RawImage {
                width: i.width as u32,
                height: i.height as u32,
                data: i.data.into(),
            })
            .collect())
    }
}
