//! Identities: `loadIdentityEncoder`, `IdentityEncoder.create`, `Identity.save`, `loadIdentity`,
//! `interpolateIdentities`. An identity is a kohya LoRA held in native memory.

use std::path::PathBuf;
use std::sync::Arc;

use candle_core::Device;
use hyperlora::device::{select_device, select_dtype};
use hyperlora::face::FaceConditions;
use hyperlora::identity::IdentityEncoder as Encoder;
use hyperlora::image::RgbImage;
use hyperlora::lora::KohyaLora;
use hyperlora::Error;
use napi::bindgen_prelude::{AsyncTask, ClassInstance, Float32Array};
use napi::{Env, Task};
use napi_derive::napi;

use crate::errors::guarded;
use crate::pipeline::RawImage;
use crate::progress::{CallContext, ProgressCallback};
use crate::resident::Resident;
use crate::CancelHandle;

/// A person's identity: the LoRA the hypernetwork wrote for them.
#[napi]
pub struct Identity {
    pub(crate) lora: Arc<KohyaLora>,
}

#[napi]
impl Identity {
    /// Number of LoRA modules (UNet attention layers × projections).
    #[napi(getter)]
    pub fn modules(&self) -> u32 {
        self.lora.len() as u32
    }

    #[napi(getter)]
    pub fn rank(&self) -> u32 {
        self.lora.rank().unwrap_or(0) as u32
    }

    /// The LoRA's tensors (f32 copies), module by module in file order.
    #[napi(ts_return_type = "Promise<Array<LoraModuleTensors>>")]
    pub fn tensors(&self) -> AsyncTask<TensorsTask> {
        AsyncTask::new(TensorsTask {
            lora: self.lora.clone(),
        })
    }

    /// Writes the identity as a kohya-format `.safetensors` LoRA (temp file, then rename).
    #[napi(ts_return_type = "Promise<void>")]
    pub fn save(&self, path: String) -> AsyncTask<SaveTask> {
        AsyncTask::new(SaveTask {
            lora: self.lora.clone(),
            path: PathBuf::from(path),
        })
    }
}

/// One LoRA module: `delta W = alpha / rank · up @ down`.
#[napi(object)]
pub struct LoraModuleTensors {
    /// kohya module name, e.g. `lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q`.
    pub name: String,
    /// `[rank, in]`, row-major.
    pub down: Float32Array,
    pub down_shape: Vec<u32>,
    /// `[out, rank]`, row-major.
    pub up: Float32Array,
    pub up_shape: Vec<u32>,
    pub alpha: f64,
}

pub struct TensorsTask {
    lora: Arc<KohyaLora>,
}

/// A module's tensors as host f32 vectors with their shapes.
type ModuleData = (String, (Vec<f32>, Vec<u32>), (Vec<f32>, Vec<u32>), f64);

impl Task for TensorsTask {
    type Output = Vec<ModuleData>;
    type JsValue = Vec<LoraModuleTensors>;
    fn compute(&mut self) -> napi::Result<Self::Output> {
        let host = |t: &candle_core::Tensor| -> hyperlora::Result<(Vec<f32>, Vec<u32>)> {
            let shape = t.dims().iter().map(|d| *d as u32).collect();
            let data = t
                .to_dtype(candle_core::DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            Ok((data, shape))
        };
        guarded(|| {
            self.lora
                .iter()
                .map(|(name, w)| {
                    Ok((
                        name.to_string(),
                        host(&w.down)?,
                        host(&w.up)?,
                        w.alpha as f64,
                    ))
                })
                .collect()
        })
    }
    fn resolve(
        &mut self,
        _env: Env,
        modules: Self::Output,
    ) -> napi::Result<Vec<LoraModuleTensors>> {
        Ok(modules
            .into_iter()
            .map(
                |(name, (down, down_shape), (up, up_shape), alpha)| LoraModuleTensors {
                    name,
                    down: down.into(),
                    down_shape,
                    up: up.into(),
                    up_shape,
                    alpha,
                },
            )
            .collect())
    }
}

pub struct SaveTask {
    lora: Arc<KohyaLora>,
    path: PathBuf,
}

impl Task for SaveTask {
    type Output = ();
    type JsValue = ();
    fn compute(&mut self) -> napi::Result<()> {
        guarded(|| self.lora.save(&self.path))
    }
    fn resolve(&mut self, _env: Env, _: ()) -> napi::Result<()> {
        Ok(())
    }
}

pub struct LoadIdentityTask {
    path: PathBuf,
}

impl Task for LoadIdentityTask {
    type Output = KohyaLora;
    type JsValue = Identity;
    fn compute(&mut self) -> napi::Result<KohyaLora> {
        guarded(|| KohyaLora::load(&self.path, &Device::Cpu))
    }
    fn resolve(&mut self, _env: Env, lora: KohyaLora) -> napi::Result<Identity> {
        Ok(Identity {
            lora: Arc::new(lora),
        })
    }
}

/// Loads an identity saved with `Identity.save` (any kohya LoRA in the same layout works).
#[napi(ts_return_type = "Promise<Identity>")]
pub fn load_identity(path: String) -> AsyncTask<LoadIdentityTask> {
    AsyncTask::new(LoadIdentityTask {
        path: PathBuf::from(path),
    })
}

pub struct InterpolateTask {
    a: Arc<KohyaLora>,
    b: Arc<KohyaLora>,
    t: f64,
}

impl Task for InterpolateTask {
    type Output = KohyaLora;
    type JsValue = Identity;
    fn compute(&mut self) -> napi::Result<KohyaLora> {
        guarded(|| KohyaLora::lerp(&self.a, &self.b, self.t))
    }
    fn resolve(&mut self, _env: Env, lora: KohyaLora) -> napi::Result<Identity> {
        Ok(Identity {
            lora: Arc::new(lora),
        })
    }
}

/// `(1 − t)·a + t·b` of the LoRA tensors (down and up separately). Both are linear in the
/// hypernetwork's output tokens, so this is the identity of the interpolated tokens.
#[napi(ts_return_type = "Promise<Identity>")]
pub fn interpolate_identities(
    a: &Identity,
    b: &Identity,
    t: f64,
) -> napi::Result<AsyncTask<InterpolateTask>> {
    if !t.is_finite() {
        return Err(crate::errors::to_napi(Error::invalid_argument(
            "t must be a finite number",
        )));
    }
    Ok(AsyncTask::new(InterpolateTask {
        a: a.lora.clone(),
        b: b.lora.clone(),
        t,
    }))
}

/// One photo's conditions: its ArcFace embedding, its CLIP-sized face crop and, for models with
/// a Base-LoRA, its CLIP-sized base crop.
#[napi(object)]
pub struct FaceConditionsInput {
    pub arcface: Float32Array,
    pub clip_crop: RawImage,
    pub base_crop: Option<RawImage>,
}

/// CLIP vision tower + HyperLoRA hypernetwork.
#[napi]
pub struct IdentityEncoder {
    inner: Resident<Encoder>,
    clip_image_size: u32,
}

#[napi]
impl IdentityEncoder {
    /// Side of the square face crop the CLIP tower takes (224 for ViT-L/14).
    #[napi(getter)]
    pub fn clip_image_size(&self) -> u32 {
        self.clip_image_size
    }

    /// Frees the models; running calls finish first, later calls fail with `INVALID_ARGUMENT`.
    #[napi]
    pub fn dispose(&self) {
        self.inner.dispose();
    }

    /// Creates the identity of 1..N photos of one person.
    #[napi(ts_return_type = "Promise<Identity>")]
    pub fn create(
        &self,
        photos: Vec<FaceConditionsInput>,
        cancel: Option<ClassInstance<CancelHandle>>,
        #[napi(ts_arg_type = "((event: ProgressEvent) => void) | undefined | null")]
        on_progress: Option<ProgressCallback>,
    ) -> napi::Result<AsyncTask<CreateIdentityTask>> {
        let encoder = self.inner.get()?;
        // Copied on the JavaScript thread: the task must not touch JS-owned buffers.
        let photos = photos
            .into_iter()
            .map(|p| FaceConditions {
                arcface: p.arcface.to_vec(),
                clip_crop: RgbImage::from(&p.clip_crop),
                base_crop: p.base_crop.as_ref().map(RgbImage::from),
            })
            .collect();
        Ok(AsyncTask::new(CreateIdentityTask {
            encoder,
            photos,
            call: CallContext::new(cancel, on_progress),
        }))
    }
}

pub struct CreateIdentityTask {
    encoder: Arc<Encoder>,
    photos: Vec<FaceConditions>,
    call: CallContext,
}

impl Task for CreateIdentityTask {
    type Output = KohyaLora;
    type JsValue = Identity;
    fn compute(&mut self) -> napi::Result<KohyaLora> {
        let mut report = self.call.reporter();
        guarded(|| {
            Ok(self
                .encoder
                .create(&self.photos, &self.call.cancel, &mut report)?
                .id)
        })
    }
    fn resolve(&mut self, _env: Env, lora: KohyaLora) -> napi::Result<Identity> {
        Ok(Identity {
            lora: Arc::new(lora),
        })
    }
}

pub struct LoadEncoderTask {
    hyperlora: PathBuf,
    clip_vision: PathBuf,
    device: String,
    dtype: Option<String>,
}

impl Task for LoadEncoderTask {
    type Output = Encoder;
    type JsValue = IdentityEncoder;
    fn compute(&mut self) -> napi::Result<Encoder> {
        guarded(|| {
            let device = select_device(&self.device)?;
            let dtype = select_dtype(self.dtype.as_deref(), &device)?;
            Encoder::load(&self.hyperlora, &self.clip_vision, dtype, &device)
        })
    }
    fn resolve(&mut self, _env: Env, encoder: Encoder) -> napi::Result<IdentityEncoder> {
        Ok(IdentityEncoder {
            clip_image_size: encoder.clip_image_size() as u32,
            inner: Resident::new(encoder),
        })
    }
}

#[napi(object)]
pub struct DeviceOptions {
    /// `auto` (default), `cpu`, `cuda` or `metal`.
    pub device: Option<String>,
    /// `auto` (default: f16 on GPUs, f32 on CPU), `f32`, `f16` or `bf16`.
    pub dtype: Option<String>,
}

/// Loads a HyperLoRA release folder and a CLIP ViT-L/14 vision folder (transformers layout).
#[napi(ts_return_type = "Promise<IdentityEncoder>")]
pub fn load_identity_encoder(
    hyperlora: String,
    clip_vision: String,
    options: Option<DeviceOptions>,
) -> AsyncTask<LoadEncoderTask> {
    let (device, dtype) = options.map(|o| (o.device, o.dtype)).unwrap_or((None, None));
    AsyncTask::new(LoadEncoderTask {
        hyperlora: PathBuf::from(hyperlora),
        clip_vision: PathBuf::from(clip_vision),
        device: device.unwrap_or_else(|| "auto".to_string()),
        dtype,
    })
}
