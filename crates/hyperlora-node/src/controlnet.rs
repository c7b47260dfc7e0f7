//! `loadControlNet` and the `ControlNet` class: a ControlNet loaded for one pipeline (its config
//! may be read off that pipeline's UNet), held until `dispose()` like the other models, and the
//! request field that applies it.

use std::path::PathBuf;

use hyperlora::image::{canny, RgbImage};
use hyperlora::sdxl::control::{self, ControlNetUse};
use hyperlora::Error;
use napi::bindgen_prelude::{AsyncTask, ClassInstance, Float32Array};
use napi_derive::napi;

use crate::call::{call, Call, CallContext};
use crate::errors::to_napi;
use crate::pipeline::{lock, Pipeline, RawImage};
use crate::resident::Resident;

/// A loaded SDXL ControlNet (e.g. OpenPose). Weights stay resident until `dispose()` or garbage
/// collection; requests that use it hold it while they run.
#[napi]
pub struct ControlNet {
    inner: Resident<control::ControlNet>,
    name: String,
}

#[napi]
impl ControlNet {
    /// The file or folder name it was loaded from.
    #[napi(getter)]
    pub fn name(&self) -> String {
        self.name.clone()
    }

    /// Frees the weights once no running request uses them; later requests that name it fail
    /// with `INVALID_ARGUMENT`.
    #[napi]
    pub fn dispose(&self) {
        self.inner.dispose();
    }
}

/// A ControlNet in a request: its control image (any size: resized to the output size with
/// Lanczos, as diffusers does), `strength` (default 1, diffusers' `controlnet_conditioning_scale`)
/// and the fraction of the steps it acts on, `start` (default 0) to `end` (default 1).
#[napi(object, object_to_js = false)]
pub struct ControlNetRequest<'a> {
    pub model: ClassInstance<'a, ControlNet>,
    pub image: RawImage,
    pub strength: Option<f64>,
    pub start: Option<f64>,
    pub end: Option<f64>,
    /// InstantID: the raw ArcFace embedding of the face whose keypoints `image` shows
    /// (`FaceAnalyzer.instantidFace`).
    pub face_embedding: Option<Float32Array>,
    /// `canny`: `image` becomes its Canny edges first (docs/instantid.md), with thresholds
    /// `low` (default 100) and `high` (default 200).
    pub preprocess: Option<String>,
    pub low: Option<f64>,
    pub high: Option<f64>,
}

/// A ControlNet as a request was drawn with it.
#[napi(object)]
pub struct ControlNetSettings {
    pub name: String,
    pub strength: f64,
    pub start: f64,
    pub end: f64,
}

/// The engine's uses of a request's ControlNets, defaults filled in, with their settings.
pub(crate) fn control_uses(
    requests: &[ControlNetRequest],
) -> napi::Result<(Vec<ControlNetUse>, Vec<ControlNetSettings>)> {
    let mut uses = Vec::with_capacity(requests.len());
    let mut settings = Vec::with_capacity(requests.len());
    for r in requests {
        let net = (*r.model.inner.get()?).clone();
        let image: RgbImage = (&r.image).into();
        let image = match r.preprocess.as_deref() {
            None => image,
            Some("canny") => canny::canny(
                &image,
                r.low.unwrap_or(canny::DEFAULT_LOW),
                r.high.unwrap_or(canny::DEFAULT_HIGH),
            ),
            Some(other) => {
                return Err(to_napi(Error::invalid_argument(format!(
                    "controlnet preprocess must be 'canny', got {other:?}"
                ))))
            }
        };
        let use_ = ControlNetUse {
            image,
            face: r.face_embedding.as_ref().map(|e| e.to_vec()),
            // InstantID's IdentityNet defaults to the reference workflow's 0.6.
            scale: r.strength.unwrap_or(if net.image_proj().is_some() {
                hyperlora::instantid::DEFAULT_STRENGTH
            } else {
                ControlNetUse::DEFAULT_SCALE
            }),
            start: r.start.unwrap_or(ControlNetUse::DEFAULT_START),
            end: r.end.unwrap_or(ControlNetUse::DEFAULT_END),
            net,
        };
        settings.push(ControlNetSettings {
            name: use_.net.name().to_string(),
            strength: use_.scale,
            start: use_.start,
            end: use_.end,
        });
        uses.push(use_);
    }
    Ok((uses, settings))
}

/// Loads a ControlNet for `pipeline` (same device and precision): a diffusers folder or a
/// single `.safetensors` file in diffusers naming (its config read off the tensor shapes and
/// the pipeline's UNet when there is no `config.json` beside it).
#[napi(ts_return_type = "Promise<ControlNet>")]
pub fn load_control_net(
    pipeline: &Pipeline,
    path: String,
) -> napi::Result<AsyncTask<Call<control::ControlNet, ControlNet>>> {
    let session = pipeline.inner.get()?;
    Ok(call(
        CallContext::default(),
        |net| {
            Ok(ControlNet {
                name: net.name().to_string(),
                inner: Resident::new(net),
            })
        },
        move |_, _| {
            let (config, device, dtype) = {
                let session = lock(&session);
                let p = session.pipeline();
                (p.unet.config().clone(), p.device().clone(), p.unet.dtype())
            };
            control::ControlNet::load(&PathBuf::from(path), &config, &device, dtype)
        },
    ))
}
