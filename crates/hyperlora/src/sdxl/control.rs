//! ControlNets in the SDXL pipelines, as diffusers' `StableDiffusionXLControlNetPipeline` runs
//! them: loading a ControlNet ([`ControlNet::load`]), preparing control images
//! ([`prepare_image`]), the per-step window ([`ControlNetUse::keep`]) and the residuals of one
//! UNet batch ([`ControlBatch`]), several ControlNets summed (diffusers' `MultiControlNetModel`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::image::{pil_resize_lanczos, RgbImage};
use crate::instantid::{self, Resampler};
use crate::sdxl::model::controlnet::{Config, ControlNetModel};
use crate::sdxl::model::unet::{self, ControlResiduals, UNetConditioning};
use crate::weights::inspect::check_tensors;
use crate::weights::{Component, ComponentFiles};

/// Largest accepted `conditioning_scale`: beyond it the residuals swamp the UNet's features.
const MAX_SCALE: f64 = 10.0;

/// A loaded ControlNet with a process-unique id (requests that name the same id can share a
/// UNet batch). Cloning shares the weights.
#[derive(Clone, Debug)]
pub struct ControlNet {
    id: u64,
    name: String,
    model: Arc<ControlNetModel>,
    /// InstantID's face projection: IdentityNet reads face tokens, not the prompt.
    image_proj: Option<Arc<Resampler>>,
}

impl ControlNet {
    /// Wraps a model built elsewhere (e.g. random weights for a benchmark).
    pub fn new(model: ControlNetModel, name: impl Into<String>) -> Self {
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        Self {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            name: name.into(),
            model: Arc::new(model),
            image_proj: None,
        }
    }

    /// Loads a diffusers ControlNet folder (`config.json` + `diffusion_pytorch_model[.fp16]
    /// .safetensors`, or shards) or a single safetensors file in diffusers naming
    /// (`diffusion_pytorch_model.safetensors` with its `config.json` beside it, or a community
    /// file such as `controlnet-openpose-sdxl-1.0.safetensors`, whose config is read off its
    /// tensor shapes and `unet`, the UNet it will drive). Original-layout (`control_model.*`)
    /// files and control-LoRAs are refused (`BAD_WEIGHTS`, saying which was found).
    ///
    /// An InstantID folder (`ControlNetModel/` and `ip-adapter.bin`, docs/instantid.md) loads
    /// IdentityNet with its face projection.
    pub fn load(path: &Path, unet: &unet::Config, device: &Device, dtype: DType) -> Result<Self> {
        let (identitynet, proj) = (path.join("ControlNetModel"), path.join("ip-adapter.bin"));
        if identitynet.is_dir() && proj.is_file() {
            let image_proj = instantid::load_image_proj(&proj, dtype, device)?;
            let mut net = Self::load(&identitynet, unet, device, dtype)?;
            net.name = path.file_name().map_or_else(
                || path.display().to_string(),
                |n| n.to_string_lossy().into_owned(),
            );
            net.image_proj = Some(Arc::new(image_proj));
            return Ok(net);
        }
        let context = || format!("controlnet {}", path.display());
        let files = if path.is_dir() {
            ComponentFiles::locate(path, Component::Unet, None).map_err(|e| e.context(context()))?
        } else if path.is_file() {
            let dir = path.parent().unwrap_or(Path::new(".")).to_path_buf();
            ComponentFiles {
                component: Component::Unet,
                config: dir.join("config.json"),
                dir,
                weights: vec![path.to_path_buf()],
            }
        } else {
            return Err(Error::model_not_found(format!(
                "{}: no such file",
                context()
            )));
        };
        let config = if path.is_dir() || (is_diffusers_file(path) && files.config.is_file()) {
            Config::from_json(&files.config)?
        } else {
            tensor_shapes(&files.weights)
                .and_then(|shapes| Config::infer(&shapes, unet))
                .map_err(|e| e.context(context()))?
        };
        let vb = files.var_builder(dtype, device)?;
        let model = ControlNetModel::new(vb, &config).map_err(|e| e.context(context()))?;
        device.synchronize()?;
        let name = path.file_name().map_or_else(
            || path.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        );
        Ok(Self::new(model, name))
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    /// The file or folder name it was loaded from, for messages.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn model(&self) -> &ControlNetModel {
        &self.model
    }

    /// InstantID's face projection, for IdentityNet.
    pub fn image_proj(&self) -> Option<&Resampler> {
        self.image_proj.as_deref()
    }

    /// `INVALID_ARGUMENT` unless its residuals fit `unet`'s skip connections.
    pub fn check_fits(&self, unet: &unet::Config) -> Result<()> {
        let c = &self.model.config().unet;
        let n = c.block_out_channels.len();
        let layers = |cfg: &unet::Config| unet::per_block(&cfg.layers_per_block, n, "layers");
        if c.block_out_channels != unet.block_out_channels
            || c.in_channels != unet.in_channels
            || layers(c)? != layers(unet).unwrap_or_default()
        {
            return Err(Error::invalid_argument(format!(
                "controlnet {}: made for a UNet with blocks {:?} of {:?} layers, this one has {:?} of {:?}",
                self.name, c.block_out_channels, c.layers_per_block, unet.block_out_channels, unet.layers_per_block
            )));
        }
        Ok(())
    }
}

fn is_diffusers_file(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with("diffusion_pytorch_model"))
}

/// Every tensor's shape, after recognising the layouts we do not read.
fn tensor_shapes(files: &[PathBuf]) -> Result<HashMap<String, Vec<usize>>> {
    // SAFETY: mapped read-only, as every safetensors reader does.
    let st = unsafe { MmapedSafetensors::multi(files) }?;
    let label = files
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ");
    check_tensors(&label, st.tensors())?;
    let shapes: HashMap<String, Vec<usize>> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.shape().to_vec()))
        .collect();
    let has = |f: &dyn Fn(&str) -> bool| shapes.keys().any(|k| f(k));
    if has(&|k| k.contains("lora") || k.ends_with(".up") || k.ends_with(".down")) {
        return Err(Error::bad_weights(
            "LoRA keys were found (a control-LoRA, or another LoRA): only full ControlNets in diffusers naming are read",
        ));
    }
    if has(&|k| {
        k.starts_with("control_model.")
            || k.starts_with("input_blocks.")
            || k.starts_with("zero_convs.")
    }) {
        return Err(Error::bad_weights(
            "an original-layout ControlNet (control_model.* / input_blocks.* names) was found; convert it to diffusers naming",
        ));
    }
    if !shapes.contains_key("controlnet_cond_embedding.conv_in.weight") {
        let mut some: Vec<&String> = shapes.keys().collect();
        some.sort();
        return Err(Error::bad_weights(format!(
            "no tensor controlnet_cond_embedding.conv_in.weight: not a diffusers ControlNet (it holds {} tensors, e.g. {})",
            shapes.len(),
            some.first().map_or("none", |s| s.as_str())
        )));
    }
    Ok(shapes)
}

/// One ControlNet applied to a request: diffusers' `controlnet_conditioning_scale`,
/// `control_guidance_start` and `control_guidance_end`, with its control image.
#[derive(Clone, Debug)]
pub struct ControlNetUse {
    pub net: ControlNet,
    /// Any size: resized to the output size (see [`prepare_image`]).
    pub image: RgbImage,
    /// diffusers' default 1.0; 0 is the same as no ControlNet.
    pub scale: f64,
    /// Fractions of the denoising steps: the ControlNet acts on step `i` of `n` unless
    /// `i / n < start` or `(i + 1) / n > end`.
    pub start: f64,
    pub end: f64,
    /// IdentityNet's face: the raw ArcFace embedding of the face whose keypoints `image`
    /// shows (`FaceAnalyzer::keypoint_face`); required exactly for InstantID.
    pub face: Option<Vec<f32>>,
}

impl ControlNetUse {
    pub const DEFAULT_SCALE: f64 = 1.0;
    pub const DEFAULT_START: f64 = 0.0;
    pub const DEFAULT_END: f64 = 1.0;

    /// At diffusers' defaults: scale 1, all steps.
    pub fn new(net: ControlNet, image: RgbImage) -> Self {
        Self {
            net,
            image,
            scale: Self::DEFAULT_SCALE,
            start: Self::DEFAULT_START,
            end: Self::DEFAULT_END,
            face: None,
        }
    }

    /// diffusers' `controlnet_keep[i]` for step `i` of `steps`: 1 inside the window, else 0.
    pub fn keep(&self, i: usize, steps: usize) -> f64 {
        let (i, n) = (i as f64, steps as f64);
        if i / n < self.start || (i + 1.0) / n > self.end {
            0.0
        } else {
            1.0
        }
    }

    /// Same ControlNet, scale and window (the image may differ): such uses share a UNet batch.
    pub fn same_settings(&self, other: &Self) -> bool {
        self.net.id == other.net.id
            && self.scale.to_bits() == other.scale.to_bits()
            && self.start.to_bits() == other.start.to_bits()
            && self.end.to_bits() == other.end.to_bits()
    }

    /// Checks the settings and that the ControlNet fits `unet` at a latent `factor`× smaller.
    pub fn validate(&self, unet: &unet::Config, factor: usize) -> Result<()> {
        let name = self.net.name();
        if !(0.0..=MAX_SCALE).contains(&self.scale) {
            return Err(Error::invalid_argument(format!(
                "controlnet {name}: strength must be in [0, {MAX_SCALE}], got {}",
                self.scale
            )));
        }
        // diffusers: start < end, start >= 0, end <= 1.
        if !(0.0..=1.0).contains(&self.start)
            || !(0.0..=1.0).contains(&self.end)
            || self.start >= self.end
        {
            return Err(Error::invalid_argument(format!(
                "controlnet {name}: start and end must satisfy 0 <= start < end <= 1, got {} and {}",
                self.start, self.end
            )));
        }
        let img = &self.image;
        if img.width == 0 || img.height == 0 || img.data.len() != img.width * img.height * 3 {
            return Err(Error::invalid_argument(format!(
                "controlnet {name}: image buffer holds {} bytes for {}x{} RGB",
                img.data.len(),
                img.width,
                img.height
            )));
        }
        match (self.net.image_proj(), &self.face) {
            (Some(_), None) => {
                return Err(Error::invalid_argument(format!(
                    "controlnet {name}: InstantID needs a face (keypointsFrom)"
                )))
            }
            (None, Some(_)) => {
                return Err(Error::invalid_argument(format!(
                    "controlnet {name}: a face is given but it is not InstantID"
                )))
            }
            _ => {}
        }
        self.net.check_fits(unet)?;
        let config = self.net.model().config();
        if config.downscale() != factor || config.conditioning_channels != 3 {
            return Err(Error::invalid_argument(format!(
                "controlnet {name}: takes {}-channel images {}x the latent size, the pipeline has RGB at {factor}x",
                config.conditioning_channels,
                config.downscale()
            )));
        }
        Ok(())
    }
}

/// diffusers' ControlNet image processor (`VaeImageProcessor(do_convert_rgb=True,
/// do_normalize=False)`): resized to `width`×`height` with Pillow's Lanczos, then `x / 255` in
/// f32, no normalisation to [-1, 1]. Returns [1, 3, height, width].
pub fn prepare_image(
    image: &RgbImage,
    width: usize,
    height: usize,
    device: &Device,
) -> Result<Tensor> {
    let resized = pil_resize_lanczos(image, width, height);
    let t = Tensor::from_vec(resized.data, (height, width, 3), device)?
        .permute((2, 0, 1))?
        .to_dtype(DType::F32)?;
    Ok((t / 255.0)?.unsqueeze(0)?)
}

/// One ControlNet of a UNet batch, with every row's inputs prepared.
struct Prepared<'a> {
    use_: &'a ControlNetUse,
    /// [rows, 3, H, W]: each request's control image for each of its rows.
    images: Tensor,
    cond: UNetConditioning,
}

/// The ControlNets of one UNet batch for a whole denoising loop: every request of the batch has
/// the same ControlNets with the same settings (its own images).
pub(crate) struct ControlBatch<'a> {
    nets: Vec<Prepared<'a>>,
    /// Guess mode under guidance: 1 on the text rows, 0 on the unconditional rows (diffusers
    /// runs the ControlNet on the text half only and adds zeros to the other).
    cond_rows: Option<Tensor>,
}

impl<'a> ControlBatch<'a> {
    /// `requests`: each request's ControlNets and image count, in row order (each contributes
    /// `[uncond × b, text × b]` under guidance, `[text × b]` without). `context`, `pooled` and
    /// `time_ids` are the batch's rows as the UNet gets them. `None` without ControlNets.
    pub(crate) fn new(
        requests: &[(&'a [ControlNetUse], usize)],
        guidance: bool,
        context: &Tensor,
        pooled: &Tensor,
        time_ids: &Tensor,
        width: usize,
        height: usize,
    ) -> Result<Option<Self>> {
        let Some(&(first, _)) = requests.first() else {
            return Ok(None);
        };
        if first.is_empty() {
            return Ok(None);
        }
        let device = context.device();
        let copies = if guidance { 2 } else { 1 };
        let mut nets = Vec::with_capacity(first.len());
        for (k, use_) in first.iter().enumerate() {
            let mut rows = Vec::new();
            for (uses, b) in requests {
                let image = uses.get(k).ok_or_else(|| {
                    Error::internal("requests of one batch have different ControlNets")
                })?;
                let image = prepare_image(&image.image, width, height, device)?;
                rows.push(image.repeat((copies * b, 1, 1, 1))?);
            }
            // IdentityNet attends to each request's face tokens instead of the prompt, with the
            // projection of a zero embedding on the unconditional rows (InstantID's
            // `_encode_prompt_image_emb`).
            let context = match use_.net.image_proj() {
                Some(proj) => {
                    let mut rows = Vec::new();
                    for (uses, b) in requests {
                        let face = uses[k].face.as_deref().ok_or_else(|| {
                            Error::invalid_argument("InstantID needs a face (keypointsFrom)")
                        })?;
                        let (neg, pos) = instantid::face_tokens(proj, face)?;
                        if guidance {
                            rows.push(neg.repeat((*b, 1, 1))?);
                        }
                        rows.push(pos.repeat((*b, 1, 1))?);
                    }
                    Tensor::cat(&rows, 0)?
                }
                None => context.clone(),
            };
            nets.push(Prepared {
                use_,
                images: Tensor::cat(&rows, 0)?,
                cond: use_.net.model().condition(&context, pooled, time_ids)?,
            });
        }
        // diffusers: guess_mode = guess_mode or the (first) ControlNet's global_pool_conditions.
        let guess_mode = first[0].net.model().config().global_pool_conditions;
        let cond_rows = if guess_mode && guidance {
            let mask: Vec<f32> = requests
                .iter()
                .flat_map(|&(_, b)| {
                    std::iter::repeat_n(0f32, b).chain(std::iter::repeat_n(1f32, b))
                })
                .collect();
            let n = mask.len();
            Some(Tensor::from_vec(mask, (n, 1, 1, 1), device)?)
        } else {
            None
        };
        Ok(Some(Self { nets, cond_rows }))
    }

    /// The summed residuals for step `step` of `steps` (counted from the first step run), or
    /// `None` when no ControlNet acts on it (all outside their windows or at scale 0: adding
    /// diffusers' zero residuals changes nothing).
    pub(crate) fn residuals(
        &self,
        input: &Tensor,
        timestep: f64,
        step: usize,
        steps: usize,
    ) -> Result<Option<ControlResiduals>> {
        let mut sum: Option<ControlResiduals> = None;
        for net in &self.nets {
            let scale = net.use_.scale * net.use_.keep(step, steps);
            if scale == 0.0 {
                continue;
            }
            let model = net.use_.net.model();
            let guess_mode = model.config().global_pool_conditions;
            let mut r =
                model.forward(input, timestep, &net.cond, &net.images, scale, guess_mode)?;
            if let Some(mask) = &self.cond_rows {
                let mask = mask.to_dtype(r.mid.dtype())?;
                r = ControlResiduals {
                    down: r
                        .down
                        .iter()
                        .map(|d| d.broadcast_mul(&mask))
                        .collect::<candle_core::Result<_>>()?,
                    mid: r.mid.broadcast_mul(&mask)?,
                };
            }
            sum = Some(match sum {
                None => r,
                Some(s) => s.add(&r)?,
            });
        }
        Ok(sum)
    }
}
