//! CLIP image–text similarity: the HyperLoRA paper's CLIP-T metric, with transformers'
//! `CLIPModel` (openai/clip-vit-large-patch14) as the reference.
//!
//! The image side is the vision tower the identity encoder already holds (its pooled output
//! through `visual_projection`); the text side is the same file's `text_model.*` and
//! `text_projection`, loaded on the first prompt asked about and kept. The score is the plain
//! cosine of the two projected embeddings (`CLIPModel`'s `logits_per_image` divided by
//! `logit_scale`); CLIPScore-style figures are `100 · max(cosine, 0)`.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use super::text::{ClipTextConfig, ClipTextModelWithProjection};
use super::vision::ClipVisionModel;
use crate::image::{pil_resize_bicubic, RgbImage};
use crate::sdxl::text::tokenizer::{ClipTokenizer, SDXL_PAD_TOKEN};
use crate::{Error, Result};

/// `CLIPImageProcessor`'s `image_mean` / `image_std` for openai/clip-vit-large-patch14.
const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_6, 0.275_777_1];

/// transformers' `CLIPImageProcessor` on an RGB8 picture: the shortest side resized to `size`
/// (PIL bicubic, the long side `int(size · long / short)`), the centre `size²` cropped
/// (top-left at `(dim - size) // 2`), scaled by 1/255 and normalised per channel.
/// Returns `[3, size, size]` values, channel-major.
pub fn clip_pixels(img: &RgbImage, size: usize) -> Result<Vec<f32>> {
    let (w, h) = (img.width, img.height);
    if w == 0 || h == 0 || img.data.len() != w * h * 3 {
        return Err(Error::invalid_argument(format!(
            "expected a packed RGB8 image, got {w}x{h} with {} bytes",
            img.data.len()
        )));
    }
    let (short, long) = (w.min(h), w.max(h));
    let long_out = size * long / short;
    let (rw, rh) = if w <= h {
        (size, long_out)
    } else {
        (long_out, size)
    };
    let resized = pil_resize_bicubic(img, rw, rh);
    let (top, left) = ((rh - size) / 2, (rw - size) / 2);
    let mut out = vec![0f32; 3 * size * size];
    for y in 0..size {
        for x in 0..size {
            let at = ((top + y) * rw + left + x) * 3;
            for c in 0..3 {
                // numpy: rescale in f64, stored as f32, then normalised in f32.
                let v = (resized.data[at + c] as f64 / 255.0) as f32;
                out[(c * size + y) * size + x] = (v - CLIP_MEAN[c]) / CLIP_STD[c];
            }
        }
    }
    Ok(out)
}

/// The text tower and its tokenizer, loaded on first use.
struct TextTower {
    model: ClipTextModelWithProjection,
    tokenizer: ClipTokenizer,
}

/// Image and prompt embeddings of one CLIP model, and their cosine.
pub struct ClipScorer {
    vision: ClipVisionModel,
    dir: PathBuf,
    merges_file: Option<PathBuf>,
    text: Mutex<Option<Arc<TextTower>>>,
}

impl ClipScorer {
    /// `vision`: the tower loaded from `dir` (it must have `visual_projection`, as the full
    /// `CLIPModel` file has). The text tower comes from the same folder when first needed; its
    /// tokenizer is the folder's `vocab.json` + `merges.txt` when present, else `merges_file`
    /// (CLIP's BPE merges; the vocabulary is derived from them).
    pub fn new(vision: ClipVisionModel, dir: &Path, merges_file: Option<&Path>) -> Self {
        Self {
            vision,
            dir: dir.to_path_buf(),
            merges_file: merges_file.map(Path::to_path_buf),
            text: Mutex::new(None),
        }
    }

    pub fn image_size(&self) -> usize {
        self.vision.config().image_size
    }

    /// L2-normalised `visual_projection(pooled)` of each picture, `[N, projection_dim]` (f32).
    pub fn image_embeds(&self, images: &[&RgbImage]) -> Result<Tensor> {
        if !self.vision.has_projection() {
            return Err(Error::bad_weights(format!(
                "{}: no visual_projection.weight (prompt scores need the full CLIPModel file)",
                self.dir.display()
            )));
        }
        let s = self.image_size();
        let pixels = images
            .iter()
            .map(|img| {
                Tensor::from_vec(clip_pixels(img, s)?, (3, s, s), &Device::Cpu).map_err(Error::from)
            })
            .collect::<Result<Vec<_>>>()?;
        let pixels = Tensor::stack(&pixels, 0)?;
        let out = self.vision.forward(&pixels)?;
        let embeds = out.image_embeds.expect("checked above");
        normalize(&embeds.to_dtype(DType::F32)?)
    }

    /// L2-normalised `text_projection(pooled)` of a prompt, `[1, projection_dim]` (f32). The
    /// prompt is tokenized as `CLIPProcessor` does (BOS, at most 75 tokens, EOS: longer prompts
    /// are cut), no prompt-weight syntax.
    pub fn text_embeds(&self, prompt: &str) -> Result<Tensor> {
        let tower = self.text_tower()?;
        let ids = tower.tokenizer.encode_window(prompt);
        let ids = Tensor::new(&ids[..], self.vision.device())?.unsqueeze(0)?;
        let out = tower.model.forward(&ids)?;
        let embeds = out.text_embeds.expect("a model with projection");
        normalize(&embeds.to_dtype(DType::F32)?)
    }

    /// The cosine of a picture with a prompt's [`text_embeds`](Self::text_embeds).
    pub fn alignment(&self, image: &RgbImage, text_embeds: &Tensor) -> Result<f32> {
        let image = self.image_embeds(&[image])?;
        let text = text_embeds.to_device(image.device())?;
        Ok(image.matmul(&text.t()?)?.flatten_all()?.to_vec1::<f32>()?[0])
    }

    fn text_tower(&self) -> Result<Arc<TextTower>> {
        let mut slot = self.text.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(t) = slot.as_ref() {
            return Ok(t.clone());
        }
        let tower = Arc::new(self.load_text_tower()?);
        *slot = Some(tower.clone());
        Ok(tower)
    }

    fn load_text_tower(&self) -> Result<TextTower> {
        let dir = &self.dir;
        let config_path = dir.join("config.json");
        let text = std::fs::read_to_string(&config_path).map_err(|e| {
            Error::from(e).context(format!("cannot read {}", config_path.display()))
        })?;
        let mut config =
            ClipTextConfig::from_json(&text).map_err(|e| e.context(config_path.display()))?;
        // CLIPModel projects both towers to its top-level projection_dim.
        if let Some(p) = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v.get("projection_dim").and_then(|p| p.as_u64()))
        {
            config.projection_dim = p as usize;
        }
        let weights = ["model.safetensors", "model.fp16.safetensors"]
            .iter()
            .map(|n| dir.join(n))
            .find(|p| p.is_file())
            .ok_or_else(|| {
                Error::model_not_found(format!("{}: no model.safetensors", dir.display()))
            })?;
        crate::weights::inspect::check_loadable(&weights)?;
        // SAFETY: model files are not modified while they are mapped (as for every
        // memory-mapped weights file in this crate).
        let vb = unsafe {
            VarBuilder::from_mmaped_safetensors(
                &[&weights],
                self.vision.dtype(),
                self.vision.device(),
            )
        }
        .map_err(|e| Error::bad_weights(format!("{}: {e}", weights.display())))?;
        if !vb.contains_tensor("text_model.embeddings.token_embedding.weight") {
            return Err(Error::bad_weights(format!(
                "{}: no text_model.* tensors (prompt scores need the full CLIPModel file of \
                 openai/clip-vit-large-patch14, not a vision-only one)",
                weights.display()
            )));
        }
        let model = ClipTextModelWithProjection::load(vb, &config)
            .map_err(|e| e.context(weights.display()))?;
        let tokenizer = if dir.join("vocab.json").is_file() && dir.join("merges.txt").is_file() {
            ClipTokenizer::from_dir(dir)?
        } else {
            let merges = self.merges_file.as_ref().ok_or_else(|| {
                Error::model_not_found(format!(
                    "{}: no vocab.json + merges.txt, and no CLIP merges file was given",
                    dir.display()
                ))
            })?;
            ClipTokenizer::from_merges_file(merges, SDXL_PAD_TOKEN)?
        };
        Ok(TextTower { model, tokenizer })
    }
}

/// Rows divided by their L2 norm.
fn normalize(x: &Tensor) -> Result<Tensor> {
    let norm = x.sqr()?.sum_keepdim(1)?.sqrt()?;
    Ok(x.broadcast_div(&norm)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preprocessing_resizes_the_short_side_and_crops_the_centre() {
        // A wide picture, white in its middle third: the centre crop keeps the middle.
        let mut img = RgbImage {
            width: 60,
            height: 30,
            data: vec![0; 60 * 30 * 3],
        };
        for y in 0..30 {
            for x in 20..40 {
                let at = (y * 60 + x) * 3;
                img.data[at..at + 3].copy_from_slice(&[255, 255, 255]);
            }
        }
        let px = clip_pixels(&img, 10).unwrap();
        assert_eq!(px.len(), 300);
        // 60x30 → 20x10, the crop is columns 5..15 of it: its column 5 is column 10, white.
        let white = (1.0 - CLIP_MEAN[0]) / CLIP_STD[0];
        assert!((px[5] - white).abs() < 1e-6, "{}", px[5]);
        assert!(clip_pixels(
            &RgbImage {
                width: 2,
                height: 2,
                data: vec![]
            },
            10
        )
        .is_err());
    }
}
