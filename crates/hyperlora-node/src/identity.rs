//! Identities: `loadIdentityEncoder`, `IdentityEncoder.create`, `Identity.save`, `loadIdentity`,
//! `interpolateIdentities`, `Identity.toCoefficients`, `IdentityEncoder.expandCoefficients`. An
//! identity is the LoRA the hypernetwork wrote (and, for models with one, its Base-LoRA), held in
//! native memory under the engine's stable ids, with the coefficients it was expanded from when
//! the hypernetwork made it.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use candle_core::Device;
use hyperlora::clip::score::ClipScorer;
use hyperlora::device::{select_device, select_dtype};
use hyperlora::face::likeness::{decode_embedding, ARCFACE_METADATA_KEY};
use hyperlora::face::FaceConditions;
use hyperlora::hypernet::{HyperLoraOutput, IdentityCoefficients};
use hyperlora::identity::IdentityEncoder as Encoder;
use hyperlora::image::RgbImage;
use hyperlora::lora::KohyaLora;
use hyperlora::session::HeldLora;
use hyperlora::Error;
use napi::bindgen_prelude::{AsyncTask, Buffer, ClassInstance, Float32Array};
use napi_derive::napi;

use crate::call::{call, Call, CallContext, ProgressCallback};
use crate::errors::to_napi;
use crate::pipeline::RawImage;
use crate::resident::Resident;
use crate::CancelHandle;

/// A person's identity: the LoRA the hypernetwork wrote for them, and its Base-LoRA when the
/// model has one.
#[napi]
pub struct Identity {
    pub(crate) lora: HeldLora,
    pub(crate) base: Option<HeldLora>,
    /// `None` for identities loaded from a LoRA file or interpolated.
    coefficients: Option<Arc<IdentityCoefficients>>,
}

impl Identity {
    fn new(id: KohyaLora, base: Option<KohyaLora>) -> Self {
        Self {
            lora: HeldLora::new(id),
            base: base.map(HeldLora::new),
            coefficients: None,
        }
    }

    /// The ID-LoRA, or the Base-LoRA (`INVALID_ARGUMENT` when there is none).
    fn part(&self, base: bool) -> napi::Result<HeldLora> {
        match (base, &self.base) {
            (false, _) => Ok(self.lora.clone()),
            (true, Some(b)) => Ok(b.clone()),
            (true, None) => Err(to_napi(Error::invalid_argument(
                "this identity has no Base-LoRA (its HyperLoRA model has none)",
            ))),
        }
    }
}

#[napi]
impl Identity {
    /// Number of LoRA modules (UNet attention layers × projections).
    #[napi(getter)]
    pub fn modules(&self) -> u32 {
        self.lora.lora().len() as u32
    }

    #[napi(getter)]
    pub fn rank(&self) -> u32 {
        self.lora.lora().rank().unwrap_or(0) as u32
    }

    /// Whether the identity has a Base-LoRA (clothes, background, lighting).
    #[napi(getter)]
    pub fn has_base_lora(&self) -> bool {
        self.base.is_some()
    }

    /// Bytes the LoRA tensors (and the Base-LoRA's) take in memory.
    #[napi(getter)]
    pub fn size_bytes(&self) -> f64 {
        let bytes = |l: &KohyaLora| -> usize {
            l.iter()
                .map(|(_, w)| {
                    w.down.elem_count() * w.down.dtype().size_in_bytes()
                        + w.up.elem_count() * w.up.dtype().size_in_bytes()
                })
                .sum()
        };
        (bytes(self.lora.lora()) + self.base.as_ref().map_or(0, |b| bytes(b.lora()))) as f64
    }

    /// The compact form: the hypernetwork's output coefficients and its model's id, which
    /// `IdentityEncoder.expandCoefficients` (TypeScript: `Identity.fromCoefficients`) expands
    /// back bit-equal. `INVALID_ARGUMENT` for an identity loaded from a LoRA file or
    /// interpolated (it has no coefficients).
    #[napi(ts_return_type = "Promise<Buffer>")]
    pub fn to_coefficients(&self) -> napi::Result<AsyncTask<Call<Vec<u8>, Buffer>>> {
        let c = self.coefficients.clone().ok_or_else(|| {
            to_napi(Error::invalid_argument(
                "this identity has no coefficients: only identities the hypernetwork made \
                 (createIdentity, Identity.fromCoefficients) have them, not loaded or interpolated ones",
            ))
        })?;
        Ok(call(
            CallContext::default(),
            |b: Vec<u8>| Ok(b.into()),
            move |_, _| Ok(c.to_bytes()),
        ))
    }

    /// The mean ArcFace embedding of the photos the identity was made from (kept in the LoRA
    /// file's metadata), or `null` for a LoRA without one.
    #[napi]
    pub fn arcface(&self) -> napi::Result<Option<Float32Array>> {
        self.lora
            .lora()
            .metadata
            .get(ARCFACE_METADATA_KEY)
            .map(|text| decode_embedding(text).map(Float32Array::new))
            .transpose()
            .map_err(to_napi)
    }

    /// The LoRA's tensors (f32 copies), module by module in file order; `base` for the
    /// Base-LoRA's.
    #[napi(ts_return_type = "Promise<Array<LoraModuleTensors>>")]
    pub fn tensors(
        &self,
        base: Option<bool>,
    ) -> napi::Result<AsyncTask<Call<Vec<ModuleData>, Vec<LoraModuleTensors>>>> {
        let lora = self.part(base.unwrap_or(false))?;
        Ok(call(CallContext::default(), module_tensors, move |_, _| {
            lora.lora()
                .iter()
                .map(|(name, w)| module_data(name, w))
                .collect()
        }))
    }

    /// Writes the identity (or, with `base`, its Base-LoRA) as a kohya-format `.safetensors`
    /// LoRA (temp file, then rename).
    #[napi(ts_return_type = "Promise<void>")]
    pub fn save(&self, path: String, base: Option<bool>) -> napi::Result<AsyncTask<Call<(), ()>>> {
        let lora = self.part(base.unwrap_or(false))?;
        Ok(call(CallContext::default(), Ok, move |_, _| {
            lora.lora().save(PathBuf::from(path))
        }))
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

/// The ID-LoRA and the Base-LoRA a call makes an identity of.
type IdentityLoras = (KohyaLora, Option<KohyaLora>);
type IdentityCall = AsyncTask<Call<IdentityLoras, Identity>>;
type EncodedIdentityCall = AsyncTask<Call<HyperLoraOutput, Identity>>;

/// A module's tensors as host f32 vectors with their shapes.
type ModuleData = (String, (Vec<f32>, Vec<u32>), (Vec<f32>, Vec<u32>), f64);

fn module_data(name: &str, w: &hyperlora::lora::LoraWeights) -> hyperlora::Result<ModuleData> {
    let host = |t: &candle_core::Tensor| -> hyperlora::Result<(Vec<f32>, Vec<u32>)> {
        let shape = t.dims().iter().map(|d| *d as u32).collect();
        let data = t
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        Ok((data, shape))
    };
    Ok((
        name.to_string(),
        host(&w.down)?,
        host(&w.up)?,
        w.alpha as f64,
    ))
}

fn module_tensors(modules: Vec<ModuleData>) -> napi::Result<Vec<LoraModuleTensors>> {
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

fn identity((id, base): IdentityLoras) -> napi::Result<Identity> {
    Ok(Identity::new(id, base))
}

fn encoded_identity(out: HyperLoraOutput) -> napi::Result<Identity> {
    Ok(Identity {
        coefficients: Some(Arc::new(out.coefficients)),
        ..Identity::new(out.id, out.base)
    })
}

/// Loads an identity saved with `Identity.save` (any kohya LoRA in the same layout works).
#[napi(ts_return_type = "Promise<Identity>")]
pub fn load_identity(path: String) -> IdentityCall {
    call(CallContext::default(), identity, move |_, _| {
        Ok((KohyaLora::load(PathBuf::from(path), &Device::Cpu)?, None))
    })
}

/// `(1 − t)·a + t·b` of the LoRA tensors (down and up separately). Both are linear in the
/// hypernetwork's output tokens, so this is the identity of the interpolated tokens. The
/// Base-LoRAs blend the same way when both identities have one.
#[napi(ts_return_type = "Promise<Identity>")]
pub fn interpolate_identities(a: &Identity, b: &Identity, t: f64) -> napi::Result<IdentityCall> {
    if !t.is_finite() {
        return Err(to_napi(Error::invalid_argument(
            "t must be a finite number",
        )));
    }
    let (a_id, b_id) = (a.lora.clone(), b.lora.clone());
    let bases = a.base.clone().zip(b.base.clone());
    Ok(call(CallContext::default(), identity, move |_, _| {
        let mut id = KohyaLora::lerp(a_id.lora(), b_id.lora(), t)?;
        // The ends are the identities themselves; a blend is nobody's face, with no reference
        // embedding to score against.
        let ends = [(0.0, &a_id), (1.0, &b_id)];
        match ends.iter().find(|(end, _)| t == *end) {
            Some((_, lora)) => match lora.lora().metadata.get(ARCFACE_METADATA_KEY) {
                Some(e) => id
                    .metadata
                    .insert(ARCFACE_METADATA_KEY.to_string(), e.clone()),
                None => id.metadata.remove(ARCFACE_METADATA_KEY),
            },
            None => id.metadata.remove(ARCFACE_METADATA_KEY),
        };
        let base = bases
            .map(|(a, b)| KohyaLora::lerp(a.lora(), b.lora(), t))
            .transpose()?;
        Ok((id, base))
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
    clip_dir: PathBuf,
    /// Made on the first prompt score; it keeps the text tower once loaded.
    scorer: Mutex<Option<Arc<ClipScorer>>>,
}

impl IdentityEncoder {
    /// The CLIP scorer over this encoder's vision tower (`merges_file`: CLIP's BPE merges, for
    /// a CLIP folder without a tokenizer; used when the text tower is first loaded).
    pub(crate) fn scorer(&self, merges_file: Option<&Path>) -> napi::Result<Arc<ClipScorer>> {
        let encoder = self.inner.get()?;
        let mut slot = self.scorer.lock().unwrap_or_else(PoisonError::into_inner);
        Ok(slot
            .get_or_insert_with(|| {
                Arc::new(ClipScorer::new(
                    encoder.clip().clone(),
                    &self.clip_dir,
                    merges_file,
                ))
            })
            .clone())
    }
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
        self.scorer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
    }

    /// Creates the identity of 1..N photos of one person (with its Base-LoRA when the model has
    /// one and every photo has a base crop).
    #[napi(ts_return_type = "Promise<Identity>")]
    pub fn create(
        &self,
        photos: Vec<FaceConditionsInput>,
        cancel: Option<ClassInstance<CancelHandle>>,
        #[napi(ts_arg_type = "((event: ProgressEvent | null) => void) | undefined | null")]
        on_progress: Option<ProgressCallback>,
    ) -> napi::Result<EncodedIdentityCall> {
        let encoder = self.inner.get()?;
        // Copied on the JavaScript thread: the task must not touch JS-owned buffers.
        let photos: Vec<FaceConditions> = photos
            .into_iter()
            .map(|p| FaceConditions {
                arcface: p.arcface.to_vec(),
                clip_crop: RgbImage::from(&p.clip_crop),
                base_crop: p.base_crop.as_ref().map(RgbImage::from),
            })
            .collect();
        Ok(call(
            CallContext::new(cancel, on_progress),
            encoded_identity,
            move |cancel, progress| encoder.create(&photos, cancel, progress),
        ))
    }

    /// Expands `Identity.toCoefficients` output back into the identity, bit-equal on an encoder
    /// loaded with the same HyperLoRA model, dtype and device. Coefficients of another model,
    /// or a damaged buffer, are `INVALID_ARGUMENT`.
    #[napi(ts_return_type = "Promise<Identity>")]
    pub fn expand_coefficients(&self, coefficients: Buffer) -> napi::Result<EncodedIdentityCall> {
        let encoder = self.inner.get()?;
        let bytes = coefficients.to_vec();
        Ok(call(
            CallContext::default(),
            encoded_identity,
            move |_, _| {
                let c = IdentityCoefficients::from_bytes(&bytes)?;
                let out = encoder.expand(c)?;
                // Merged from another thread's stream, as after `create`.
                encoder.hypernet().device().synchronize()?;
                Ok(out)
            },
        ))
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
) -> AsyncTask<Call<(Encoder, PathBuf), IdentityEncoder>> {
    let (device, dtype) = options.map(|o| (o.device, o.dtype)).unwrap_or((None, None));
    let device = device.unwrap_or_else(|| "auto".to_string());
    call(
        CallContext::default(),
        |(encoder, clip_dir): (Encoder, PathBuf)| {
            Ok(IdentityEncoder {
                clip_image_size: encoder.clip_image_size() as u32,
                inner: Resident::new(encoder),
                clip_dir,
                scorer: Mutex::new(None),
            })
        },
        move |_, _| {
            let device = select_device(&device)?;
            let dtype = select_dtype(dtype.as_deref(), &device)?;
            let clip_dir = PathBuf::from(clip_vision);
            let encoder = Encoder::load(&PathBuf::from(hyperlora), &clip_dir, dtype, &device)?;
            Ok((encoder, clip_dir))
        },
    )
}
