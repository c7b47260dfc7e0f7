//! InstantID (docs/instantid.md): IdentityNet, an SDXL ControlNet whose cross-attention input
//! is the face embedding projected by [`resampler::Resampler`] rather than the prompt, and whose
//! control image is the face's five keypoints drawn as InstantID draws them.
//!
//! The IP-Adapter attention processors of `ip-adapter.bin` (`ip_adapter.*`) are not loaded: the
//! reference HyperLoRA + InstantID workflow runs them at weight 0.

pub mod resampler;

use std::path::Path;

use candle_core::{DType, Device, Tensor};

pub use resampler::Resampler;

use crate::face::KeypointFace;
use crate::image::draw::draw_kps;
use crate::image::RgbImage;
use crate::weights::torch_checkpoint;
use crate::Result;

/// InstantID's default IdentityNet strength in the reference HyperLoRA workflow.
pub const DEFAULT_STRENGTH: f64 = 0.6;

/// The image projection model of an InstantID `ip-adapter.bin` (a torch.save checkpoint) or of
/// a safetensors conversion with the same names.
pub fn load_image_proj(path: &Path, dtype: DType, device: &Device) -> Result<Resampler> {
    let is_safetensors = path.extension().is_some_and(|e| e == "safetensors");
    let tensors = if is_safetensors {
        candle_core::safetensors::load(path, device)?
    } else {
        torch_checkpoint::load(path, device)?
    };
    Resampler::from_checkpoint(&tensors, dtype, device).map_err(|e| e.context(path.display()))
}

/// IdentityNet's `encoder_hidden_states` for one face: `(negative, positive)`, each
/// `[1, num_queries, output_dim]`. As `_encode_prompt_image_emb` does, the negative is the
/// projection of a zero embedding (not zero tokens).
pub fn face_tokens(proj: &Resampler, embedding: &[f32]) -> Result<(Tensor, Tensor)> {
    let e = proj.config().embedding_dim;
    if embedding.len() != e {
        return Err(crate::Error::invalid_argument(format!(
            "the face embedding has {} values, InstantID's projection takes {e}",
            embedding.len()
        )));
    }
    let pos = Tensor::from_slice(embedding, (1, 1, e), proj.device())?;
    let both = Tensor::cat(&[&pos.zeros_like()?, &pos], 0)?;
    let tokens = proj.forward(&both)?;
    Ok((tokens.narrow(0, 0, 1)?, tokens.narrow(0, 1, 1)?))
}

/// IdentityNet's control image: the face's keypoints drawn on a black picture of the photo's
/// size (`draw_kps(face_image, face_info['kps'])`); the ControlNet path resizes it like any
/// control image.
pub fn keypoint_image(face: &KeypointFace, width: usize, height: usize) -> RgbImage {
    draw_kps(width, height, &face.detection.kps)
}
