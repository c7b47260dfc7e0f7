//! SDXL text-to-image (and image-to-image) as diffusers' `StableDiffusionXLPipeline` /
//! `StableDiffusionXLImg2ImgPipeline` run it: same conditioning, guidance, noise and decoding, so
//! a seed gives the same picture. Prompts go through A1111's weighting and 75-token chunking;
//! for a plain prompt of at most 75 tokens that is exactly diffusers' text conditioning.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::clip::text::ClipTextConfig;
use crate::error::{Error, Result, ResultExt};
use crate::image::RgbImage;
use crate::lora::apply::unfit_layers;
use crate::lora::{LoraComponent, LoraLayer, LoraMerger, LoraTarget, SkippedKey};
use crate::sdxl::control::{ControlBatch, ControlNetUse};
use crate::sdxl::model::{unet, vae};
use crate::sdxl::sampling::noise::TorchGenerator;
use crate::sdxl::sampling::sampler::{Sampler, Scheduler, SchedulerConfig, SigmaSchedule};
use crate::sdxl::text::encoders::SdxlTextEncoders;
use crate::sdxl::text::prompt::{tokenize_sdxl, PromptOptions, TokenChunks};
use crate::sdxl::text::tokenizer::{ClipTokenizer, SDXL_PAD_TOKEN, SDXL_PAD_TOKEN_2};
use crate::task::{CancelToken, Progress, ProgressFn, Stage};
use crate::weights::{Component, ModelSource};

/// Request bounds: beyond them a request is a mistake or an attack, not a picture.
const MIN_SIDE: usize = 8;
const MAX_SIDE: usize = 4096;
const MAX_STEPS: usize = 1000;
const MAX_BATCH: usize = 64;
const MAX_CFG: f64 = 100.0;
/// Longer prompts are chunked (A1111); past this many chunks the cross-attention context grows
/// without adding meaning, so such a prompt is refused rather than run.
const MAX_PROMPT_CHUNKS: usize = 32;

/// Where the parts a checkpoint does not carry come from.
#[derive(Clone, Debug, Default)]
pub struct LoadOptions {
    /// A diffusers folder whose `config.json`s, scheduler and tokenizers describe a single-file
    /// checkpoint (diffusers' `config=`). Without it, SDXL base's published configs are used.
    pub config_dir: Option<PathBuf>,
    /// CLIP's BPE merges (`models/clip-tokenizer/merges.txt`), for single-file checkpoints
    /// loaded without `config_dir`: they carry no tokenizer.
    pub merges_file: Option<PathBuf>,
}

/// Image-to-image: start from this picture, re-noised to `strength` (0 keeps it, 1 ignores it).
#[derive(Clone, Debug)]
pub struct InitImage {
    pub image: RgbImage,
    pub strength: f64,
}

impl InitImage {
    /// diffusers' default for image-to-image.
    pub const DEFAULT_STRENGTH: f64 = 0.75;
}

#[derive(Clone, Debug)]
pub struct GenerateParams {
    pub prompt: String,
    pub negative_prompt: String,
    pub width: usize,
    pub height: usize,
    pub steps: usize,
    /// Classifier-free guidance scale; at 1 or below the negative branch is skipped, as diffusers does.
    pub guidance_scale: f64,
    pub sampler: Sampler,
    pub schedule: SigmaSchedule,
    pub seed: u64,
    pub batch_size: usize,
    pub init_image: Option<InitImage>,
    /// ControlNets whose residuals guide the UNet (several are summed, as diffusers'
    /// MultiControlNet does).
    pub controlnets: Vec<ControlNetUse>,
}

impl Default for GenerateParams {
    fn default() -> Self {
        Self {
            prompt: String::new(),
            negative_prompt: String::new(),
            width: 1024,
            height: 1024,
            steps: 20,
            guidance_scale: 5.0,
            sampler: Sampler::DpmPp2m,
            schedule: SigmaSchedule::Karras,
            seed: 0,
            batch_size: 1,
            init_image: None,
            controlnets: Vec::new(),
        }
    }
}

/// The text conditioning of one prompt pair, ready for the UNet.
pub struct Conditioning {
    /// [B, 77·chunks, 2048]: negative rows first when guidance is on (diffusers' order).
    pub context: Tensor,
    /// [B, 1280] pooled bigG output.
    pub pooled: Tensor,
    /// [B, 6] original size, crop offset, target size.
    pub time_ids: Tensor,
}

pub struct SdxlPipeline {
    pub unet: unet::UNet2DConditionModel,
    pub vae: vae::AutoencoderKL,
    pub text: SdxlTextEncoders,
    tokenizers: [ClipTokenizer; 2],
    scheduler_config: SchedulerConfig,
    /// diffusers' SDXL setting: an empty negative prompt is a zero embedding, not the encoded "".
    force_zeros_for_empty_prompt: bool,
    device: Device,
    /// The active LoRA set's merged layers and the base weights they replace.
    loras: LoraMerger,
}

/// Where each part's configuration is read from.
struct Configs<'a> {
    source: &'a ModelSource,
    config_dir: Option<&'a Path>,
}

impl Configs<'_> {
    /// `<folder>/<sub>/<file>` from the model itself, else from `config_dir`.
    fn file(&self, sub: &str, file: &str) -> Option<PathBuf> {
        let from_source = match self.source {
            ModelSource::Diffusers(model) => Some(model.subfolder(sub).join(file)),
            ModelSource::SingleFile(_) => None,
        };
        from_source
            .into_iter()
            .chain(self.config_dir.map(|d| d.join(sub).join(file)))
            .find(|p| p.is_file())
    }

    fn component(&self, component: Component) -> Option<PathBuf> {
        self.file(component.subfolder(), "config.json")
    }

    fn tokenizer_dir(&self, sub: &str) -> Option<PathBuf> {
        self.file(sub, "tokenizer_config.json")
            .or_else(|| self.file(sub, "vocab.json"))
            .and_then(|p| p.parent().map(Path::to_path_buf))
    }

    fn force_zeros_for_empty_prompt(&self) -> Result<bool> {
        let index = match self.source {
            ModelSource::Diffusers(model) => Some(model.root().join("model_index.json")),
            ModelSource::SingleFile(_) => self.config_dir.map(|d| d.join("model_index.json")),
        };
        let Some(index) = index.filter(|p| p.is_file()) else {
            return Ok(true);
        };
        let text = std::fs::read_to_string(&index).context(index.display())?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::bad_weights(format!("{}: {e}", index.display())))?;
        Ok(json
            .get("force_zeros_for_empty_prompt")
            .and_then(|v| v.as_bool())
            .unwrap_or(true))
    }
}

impl SdxlPipeline {
    /// Loads a diffusers folder, a Hugging Face cache entry or a single-file SGM checkpoint.
    /// `dtype` is the UNet's and text encoders' precision; the VAE runs in f32 where f16 would
    /// overflow (`force_upcast`).
    pub fn load(path: &Path, options: &LoadOptions, device: &Device, dtype: DType) -> Result<Self> {
        let source = ModelSource::open(path)?;
        let configs = Configs {
            source: &source,
            config_dir: options.config_dir.as_deref(),
        };

        let unet_config = match configs.component(Component::Unet) {
            Some(p) => unet::Config::from_json(&p)?,
            None => unet::Config::sdxl_base(),
        };
        let vae_config = match configs.component(Component::Vae) {
            Some(p) => vae::Config::from_json(&p)?,
            None => vae::Config::sdxl_base(),
        };
        let clip_l = match configs.component(Component::TextEncoder) {
            Some(p) => ClipTextConfig::from_json_file(&p)?,
            None => ClipTextConfig::sdxl_clip_l(),
        };
        let clip_g = match configs.component(Component::TextEncoder2) {
            Some(p) => ClipTextConfig::from_json_file(&p)?,
            None => ClipTextConfig::sdxl_clip_g(),
        };
        let scheduler_config = match configs.file("scheduler", "scheduler_config.json") {
            Some(p) => SchedulerConfig::from_file(&p)?,
            None => SchedulerConfig::sdxl_base(),
        };
        let tokenizers = match (
            configs.tokenizer_dir("tokenizer"),
            configs.tokenizer_dir("tokenizer_2"),
        ) {
            (Some(a), Some(b)) => [ClipTokenizer::from_dir(a)?, ClipTokenizer::from_dir(b)?],
            _ => {
                let merges = options.merges_file.as_ref().ok_or_else(|| {
                    Error::invalid_argument(format!(
                        "{}: the checkpoint carries no tokenizer; give a config folder or CLIP's merges file",
                        path.display()
                    ))
                })?;
                [
                    ClipTokenizer::from_merges_file(merges, SDXL_PAD_TOKEN)?,
                    ClipTokenizer::from_merges_file(merges, SDXL_PAD_TOKEN_2)?,
                ]
            }
        };

        let vb = |c: Component, dtype: DType| source.var_builder(c, dtype, device);
        let unet = unet::UNet2DConditionModel::new(vb(Component::Unet, dtype)?, &unet_config)
            .map_err(|e| e.context("unet"))?;
        let vae = vae::AutoencoderKL::new(
            vb(Component::Vae, vae_config.compute_dtype(dtype))?,
            &vae_config,
        )
        .map_err(|e| e.context("vae"))?;
        let text = SdxlTextEncoders::load(
            vb(Component::TextEncoder, dtype)?,
            &clip_l,
            vb(Component::TextEncoder2, dtype)?,
            &clip_g,
        )
        .map_err(|e| e.context("text encoders"))?;
        // candle queues GPU work on the calling thread's stream, and Node's worker pool may run
        // the next call on another thread: the uploads finish before the models are handed out.
        device.synchronize()?;
        Ok(Self {
            unet,
            vae,
            text,
            tokenizers,
            scheduler_config,
            force_zeros_for_empty_prompt: configs.force_zeros_for_empty_prompt()?,
            device: device.clone(),
            loras: LoraMerger::new(),
        })
    }

    /// Makes `loras` the active LoRA set (each LoRA's layers with its weight, which may be
    /// negative; e.g. `&[(&identity.layers, 0.85), (&style, 1.0)]`, or a concept slider
    /// `&[(&a, -0.7), (&b, 0.7)]`), replacing the previous set. UNet and text-encoder
    /// (`lora_te1_`/`lora_te2_`) layers are merged into working copies of the targeted layers;
    /// the base weights stay resident and are never reloaded. An empty slice restores the base
    /// model exactly. Returns, per LoRA, the modules that matched no layer or did not fit; see
    /// [`LoraMerger::apply`] for the errors (the pipeline is unchanged then).
    pub fn set_loras(&mut self, loras: &[(&[LoraLayer], f32)]) -> Result<Vec<Vec<SkippedKey>>> {
        let targets = sdxl_targets(&mut self.unet, &mut self.text);
        self.loras.apply(targets, loras)
    }

    /// The modules of `layers` that [`Self::set_loras`] would leave out (no such layer, or an
    /// update that does not fit it), with the reason.
    pub fn unfit_lora_layers(&mut self, layers: &[LoraLayer]) -> Vec<SkippedKey> {
        unfit_layers(sdxl_targets(&mut self.unet, &mut self.text), layers)
    }

    /// The active LoRA set's bookkeeping (merged layers, memory overhead).
    pub fn loras(&self) -> &LoraMerger {
        &self.loras
    }

    /// A pipeline from models built elsewhere (e.g. random weights for a benchmark), with SDXL's
    /// `force_zeros_for_empty_prompt`. The models must live on `device`.
    pub fn from_parts(
        unet: unet::UNet2DConditionModel,
        vae: vae::AutoencoderKL,
        text: SdxlTextEncoders,
        tokenizers: [ClipTokenizer; 2],
        scheduler_config: SchedulerConfig,
        device: &Device,
    ) -> Self {
        Self {
            unet,
            vae,
            text,
            tokenizers,
            scheduler_config,
            force_zeros_for_empty_prompt: true,
            device: device.clone(),
            loras: LoraMerger::new(),
        }
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The scheduler settings every generation starts from.
    pub fn scheduler_config(&self) -> &SchedulerConfig {
        &self.scheduler_config
    }

    /// Latent pixels per image pixel side (8 for SDXL).
    pub fn vae_scale_factor(&self) -> usize {
        1 << (self.vae.config().block_out_channels.len() - 1)
    }

    /// Checks a request against the limits `generate` enforces (size, steps, batch, cfg, strength).
    pub fn validate(&self, p: &GenerateParams) -> Result<()> {
        let f = self.vae_scale_factor();
        if !(MIN_SIDE..=MAX_SIDE).contains(&p.width)
            || !(MIN_SIDE..=MAX_SIDE).contains(&p.height)
            || !p.width.is_multiple_of(f)
            || !p.height.is_multiple_of(f)
        {
            return Err(Error::invalid_argument(format!(
                "width and height must be multiples of {f} in [{MIN_SIDE}, {MAX_SIDE}], got {}x{}",
                p.width, p.height
            )));
        }
        if p.steps > MAX_STEPS {
            return Err(Error::invalid_argument(format!(
                "steps must be at most {MAX_STEPS}, got {}",
                p.steps
            )));
        }
        if p.batch_size > MAX_BATCH {
            return Err(Error::invalid_argument(format!(
                "batchSize must be at most {MAX_BATCH}, got {}",
                p.batch_size
            )));
        }
        if !(0.0..=MAX_CFG).contains(&p.guidance_scale) {
            return Err(Error::invalid_argument(format!(
                "cfg must be a number in [0, {MAX_CFG}], got {}",
                p.guidance_scale
            )));
        }
        if p.steps == 0 {
            return Err(Error::invalid_argument("steps must be at least 1"));
        }
        if p.batch_size == 0 {
            return Err(Error::invalid_argument("batchSize must be at least 1"));
        }
        if let Some(init) = &p.init_image {
            if !(0.0..=1.0).contains(&init.strength) {
                return Err(Error::invalid_argument(format!(
                    "strength must be in [0, 1], got {}",
                    init.strength
                )));
            }
        }
        for c in &p.controlnets {
            c.validate(self.unet.config(), f)?;
        }
        self.check_memory(p.batch_size, p.width, p.height)
    }

    /// `OUT_OF_MEMORY` when denoising and decoding `images` pictures at this size cannot fit in
    /// the memory available now (weights are already resident; this is the working memory).
    pub(crate) fn check_memory(&self, images: usize, width: usize, height: usize) -> Result<()> {
        let images = images as u64;
        let latent_pixels = (width / 8 * height / 8) as u64;
        // UNet: about 24 live activations the size of its first level (skip connections
        // included) for each image's two guidance rows, plus one attention score chunk (f32
        // scores and probabilities).
        let c0 = self.unet.config().block_out_channels[0] as u64;
        let act = self.unet.dtype().size_in_bytes() as u64;
        let unet = 2 * images * 24 * c0 * latent_pixels * act
            + 2 * 4 * crate::sdxl::model::attention::MAX_SCORE_ELEMENTS as u64;
        // VAE decode: about 6 live full-resolution maps of its top level, in f32.
        let top = self.vae.config().block_out_channels[0] as u64;
        let vae = images * 6 * top * (width * height) as u64 * 4;
        crate::memory::check(
            unet.max(vae),
            &self.device,
            &format!("{images} image(s) at {width}x{height}"),
        )
    }

    /// One prompt through both tokenizers and encoders: ([1, 77·C, 2048], [1, 1280]).
    fn encode_chunks(&self, chunks: &[TokenChunks; 2]) -> Result<(Tensor, Tensor)> {
        let tensors = |c: &TokenChunks| -> Result<(Tensor, Tensor)> {
            let n = c.len();
            Ok((
                Tensor::from_vec(c.flat_ids(), (n, 77), &self.device)?,
                Tensor::from_vec(c.flat_weights(), (n, 77), &self.device)?,
            ))
        };
        let (ids_l, w_l) = tensors(&chunks[0])?;
        let (ids_g, w_g) = tensors(&chunks[1])?;
        self.text.encode(&ids_l, &w_l, &ids_g, &w_g)
    }

    /// The text conditioning for `batch` images, with the negative half first when `guidance`.
    pub fn condition(
        &self,
        prompt: &str,
        negative_prompt: &str,
        width: usize,
        height: usize,
        batch: usize,
        guidance: bool,
    ) -> Result<Conditioning> {
        let chunks = tokenize_sdxl(
            [&self.tokenizers[0], &self.tokenizers[1]],
            prompt,
            negative_prompt,
            &PromptOptions::default(),
        )?;
        let longest = chunks
            .positive
            .iter()
            .chain(&chunks.negative)
            .map(TokenChunks::len)
            .max()
            .unwrap_or(0);
        if longest > MAX_PROMPT_CHUNKS {
            return Err(Error::invalid_argument(format!(
                "a prompt is {longest} chunks of 75 tokens; at most {MAX_PROMPT_CHUNKS} ({} tokens) are accepted",
                MAX_PROMPT_CHUNKS * 75
            )));
        }
        let (context, pooled) = self.encode_chunks(&chunks.positive)?;
        let (context, pooled) = (context.repeat((batch, 1, 1))?, pooled.repeat((batch, 1))?);
        let size = [
            height as f32,
            width as f32,
            0.0,
            0.0,
            height as f32,
            width as f32,
        ];
        let rows = if guidance { 2 * batch } else { batch };
        let time_ids = Tensor::new(&size, &self.device)?
            .unsqueeze(0)?
            .repeat((rows, 1))?;
        if !guidance {
            return Ok(Conditioning {
                context,
                pooled,
                time_ids,
            });
        }
        let (neg_context, neg_pooled) =
            if negative_prompt.is_empty() && self.force_zeros_for_empty_prompt {
                (context.zeros_like()?, pooled.zeros_like()?)
            } else {
                let (c, p) = self.encode_chunks(&chunks.negative)?;
                (c.repeat((batch, 1, 1))?, p.repeat((batch, 1))?)
            };
        Ok(Conditioning {
            context: Tensor::cat(&[&neg_context, &context], 0)?,
            pooled: Tensor::cat(&[&neg_pooled, &pooled], 0)?,
            time_ids,
        })
    }

    /// Denoises from seeded noise (or the re-noised init image) and decodes to RGB8 images.
    /// `progress` sees `text`, then `denoise` once per step, then `decode`; `cancel` is checked
    /// between steps, so an abort takes effect within one UNet evaluation.
    pub fn generate(
        &self,
        params: &GenerateParams,
        cancel: &CancelToken,
        progress: ProgressFn<'_>,
    ) -> Result<Vec<RgbImage>> {
        let latents = self.generate_latents(params, cancel, progress)?;
        cancel.check()?;
        progress(Progress {
            stage: Stage::Decode,
            step: 0,
            total: 1,
        });
        let images = self.decode(&latents)?;
        progress(Progress {
            stage: Stage::Decode,
            step: 1,
            total: 1,
        });
        Ok(images)
    }

    /// Everything but the VAE decode: the final latents [B, 4, h/8, w/8] (diffusers'
    /// `output_type="latent"`).
    pub fn generate_latents(
        &self,
        params: &GenerateParams,
        cancel: &CancelToken,
        progress: ProgressFn<'_>,
    ) -> Result<Tensor> {
        self.validate(params)?;
        let guidance = params.guidance_scale > 1.0;
        let b = params.batch_size;
        progress(Progress {
            stage: Stage::Text,
            step: 0,
            total: 1,
        });
        let cond = self.condition(
            &params.prompt,
            &params.negative_prompt,
            params.width,
            params.height,
            b,
            guidance,
        )?;
        progress(Progress {
            stage: Stage::Text,
            step: 1,
            total: 1,
        });
        cancel.check()?;

        let mut scheduler = Scheduler::new(
            &self.scheduler_config,
            params.sampler,
            params.schedule,
            params.steps,
        )?;
        let mut generator = TorchGenerator::new(params.seed);
        let f = self.vae_scale_factor();
        let shape = (
            b,
            self.unet.config().in_channels,
            params.height / f,
            params.width / f,
        );
        let mut latents = match &params.init_image {
            None => {
                (generator.randn(shape)?.to_device(&self.device)? * scheduler.init_noise_sigma())?
            }
            Some(init) => self.noised_init_latents(init, b, &mut scheduler, &mut generator)?,
        };

        let unet_cond = self
            .unet
            .condition(&cond.context, &cond.pooled, &cond.time_ids)?;
        let control = ControlBatch::new(
            &[(params.controlnets.as_slice(), b)],
            guidance,
            &cond.context,
            &cond.pooled,
            &cond.time_ids,
            params.width,
            params.height,
        )?;
        let first = scheduler.begin_index();
        let total = (scheduler.num_inference_steps() - first) as u64;
        for (done, i) in (first..scheduler.num_inference_steps()).enumerate() {
            cancel.check()?;
            let input = if guidance {
                Tensor::cat(&[&latents, &latents], 0)?
            } else {
                latents.clone()
            };
            let input = scheduler.scale_model_input(&input, i)?;
            let t = scheduler.timestep(i);
            let residuals = match &control {
                Some(c) => c.residuals(&input, t, done, total as usize)?,
                None => None,
            };
            let eps =
                self.unet
                    .forward_controlled(&input, t, &unet_cond, None, residuals.as_ref())?;
            let eps = if guidance {
                let uncond = eps.narrow(0, 0, b)?;
                let text = eps.narrow(0, b, b)?;
                (&uncond + ((text - &uncond)? * params.guidance_scale)?)?
            } else {
                eps
            };
            latents = scheduler.step(&eps, i, &latents, &mut generator)?;
            progress(Progress {
                stage: Stage::Denoise,
                step: done as u64 + 1,
                total,
            });
        }
        Ok(latents)
    }

    /// SDXL img2img's `prepare_latents`: encode, sample the latent distribution and add noise
    /// at the strength's first timestep, both from the one generator, in diffusers' order.
    fn noised_init_latents(
        &self,
        init: &InitImage,
        batch: usize,
        scheduler: &mut Scheduler,
        generator: &mut TorchGenerator,
    ) -> Result<Tensor> {
        let start = scheduler.img2img_start(init.strength)?;
        let pixels = self.image_to_tensor(&init.image)?;
        let (mean, logvar) = self.vae.encode(&pixels)?;
        let std = (logvar * 0.5)?.exp()?;
        let sample = (&mean + (std * generator.randn_like(&mean)?)?)?;
        let latents = self
            .scale_latents(&sample.to_dtype(DType::F32)?)?
            .repeat((batch, 1, 1, 1))?;
        let noise = generator.randn_like(&latents)?;
        scheduler.add_noise(&latents, &noise, start)
    }

    /// [1, 3, H, W] in [-1, 1] from RGB8.
    fn image_to_tensor(&self, image: &RgbImage) -> Result<Tensor> {
        if image.data.len() != image.width * image.height * 3 {
            return Err(Error::invalid_argument(format!(
                "image buffer holds {} bytes, expected {}x{}x3",
                image.data.len(),
                image.width,
                image.height
            )));
        }
        let t = Tensor::from_slice(&image.data, (image.height, image.width, 3), &self.device)?
            .permute((2, 0, 1))?
            .to_dtype(DType::F32)?;
        // diffusers' image processor: x / 255, then 2x - 1 (same rounding as theirs).
        Ok((((t / 255.0)? * 2.0)? - 1.0)?.unsqueeze(0)?)
    }

    /// UNet latents from VAE latents: `(z - shift) * scaling_factor`.
    fn scale_latents(&self, z: &Tensor) -> Result<Tensor> {
        let c = self.vae.config();
        Ok(((z - c.shift_factor.unwrap_or(0.0))? * c.scaling_factor)?)
    }

    /// VAE decode of UNet latents [B, 4, h, w] into RGB8 images, rounding as diffusers'
    /// image processor does.
    pub fn decode(&self, latents: &Tensor) -> Result<Vec<RgbImage>> {
        let c = self.vae.config();
        let z =
            ((latents.to_dtype(DType::F32)? / c.scaling_factor)? + c.shift_factor.unwrap_or(0.0))?;
        let x = self.vae.decode(&z)?.to_dtype(DType::F32)?;
        let x = ((x / 2.0)? + 0.5)?.clamp(0f32, 1f32)?;
        let x = (x * 255.0)?
            .round()?
            .to_dtype(DType::U8)?
            .permute((0, 2, 3, 1))?;
        let (b, height, width, _) = x.dims4()?;
        (0..b)
            .map(|i| {
                Ok(RgbImage {
                    width,
                    height,
                    data: x.get(i)?.flatten_all()?.to_vec1::<u8>()?,
                })
            })
            .collect()
    }
}

/// Every LoRA-targetable layer of SDXL's UNet and two text encoders.
pub fn sdxl_targets<'a>(
    unet: &'a mut unet::UNet2DConditionModel,
    text: &'a mut SdxlTextEncoders,
) -> Vec<LoraTarget<'a>> {
    let SdxlTextEncoders { clip_l, clip_g } = text;
    let linear = |component: LoraComponent| {
        move |(module, l): (String, &'a mut candle_nn::Linear)| LoraTarget {
            component,
            module,
            layer: l,
        }
    };
    let (linears, convs) = unet.lora_layers_mut();
    let mut out: Vec<LoraTarget<'a>> = linears
        .into_iter()
        .map(linear(LoraComponent::Unet))
        .collect();
    out.extend(convs.into_iter().map(|(module, c)| LoraTarget {
        component: LoraComponent::Unet,
        module,
        layer: c,
    }));
    out.extend(
        clip_l
            .linears_mut()
            .into_iter()
            .map(linear(LoraComponent::TextEncoder)),
    );
    out.extend(
        clip_g
            .linears_mut()
            .into_iter()
            .map(linear(LoraComponent::TextEncoder2)),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorCode;
    use crate::testing::{pipeline_case_params as params, tiny_sdxl};

    #[test]
    fn reports_every_step_and_stops_within_one_step_of_abort() {
        let pipe = tiny_sdxl();
        let mut p = params("euler_cfg5");
        p.steps = 6;
        let cancel = CancelToken::new();
        let mut denoise_steps = Vec::new();
        let err = pipe
            .generate(&p, &cancel, &mut |e| {
                if e.stage == Stage::Denoise {
                    denoise_steps.push(e.step);
                    if e.step == 2 {
                        cancel.cancel();
                    }
                }
            })
            .unwrap_err();
        assert_eq!(err.code, ErrorCode::Aborted);
        assert_eq!(denoise_steps, [1, 2]);

        let mut stages = Vec::new();
        pipe.generate(&p, &CancelToken::new(), &mut |e| {
            stages.push((e.stage, e.step, e.total))
        })
        .unwrap();
        let denoise: Vec<_> = stages
            .iter()
            .filter(|s| s.0 == Stage::Denoise)
            .map(|s| s.1)
            .collect();
        assert_eq!(denoise, (1..=6).collect::<Vec<_>>());
        assert_eq!(stages.first().unwrap().0, Stage::Text);
        assert_eq!(stages.last().unwrap(), &(Stage::Decode, 1, 1));
    }

    #[test]
    fn rejects_bad_parameters() {
        let pipe = tiny_sdxl();
        let cases = [
            GenerateParams {
                width: 60,
                height: 64,
                ..params("euler_cfg5")
            },
            GenerateParams {
                steps: 0,
                ..params("euler_cfg5")
            },
            GenerateParams {
                batch_size: 0,
                ..params("euler_cfg5")
            },
            GenerateParams {
                guidance_scale: f64::NAN,
                ..params("euler_cfg5")
            },
            GenerateParams {
                guidance_scale: -1.0,
                ..params("euler_cfg5")
            },
            GenerateParams {
                width: 0,
                ..params("euler_cfg5")
            },
            GenerateParams {
                width: 4104,
                ..params("euler_cfg5")
            },
            GenerateParams {
                steps: 1001,
                ..params("euler_cfg5")
            },
            GenerateParams {
                batch_size: 65,
                ..params("euler_cfg5")
            },
            GenerateParams {
                prompt: "word ".repeat(2500),
                ..params("euler_cfg5")
            },
        ];
        for p in cases {
            let err = pipe
                .generate(&p, &CancelToken::new(), &mut |_| {})
                .unwrap_err();
            assert_eq!(err.code, ErrorCode::InvalidArgument, "{err}");
        }
    }

    /// A request whose working memory cannot fit is refused before anything is allocated.
    #[test]
    fn refuses_requests_that_cannot_fit_in_memory() {
        let pipe = tiny_sdxl();
        if crate::memory::available(pipe.device()).is_none() {
            return; // no figure to check against on this system
        }
        let p = GenerateParams {
            width: 4096,
            height: 4096,
            batch_size: 64,
            ..params("euler_cfg5")
        };
        let err = pipe
            .generate(&p, &CancelToken::new(), &mut |_| {})
            .unwrap_err();
        assert_eq!(err.code, ErrorCode::OutOfMemory, "{err}");
        assert!(err.message.contains("64 image(s) at 4096x4096"), "{err}");
    }
}
