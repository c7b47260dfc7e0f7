//! SDXL's text conditioning: CLIP-L and OpenCLIP bigG side by side, and A1111's "Original"
//! emphasis, which scales each token's hidden state by its prompt weight.
//!
//! SDXL conditions on the *penultimate* layer of both encoders (`hidden_states[-2]`, before
//! `final_layer_norm`), concatenated to 2048 features per token, and on bigG's projected pooled
//! output (1280).

use candle_core::{DType, Tensor, D};
use candle_nn::VarBuilder;

use crate::clip::text::{ClipTextConfig, ClipTextModel, ClipTextModelWithProjection};
use crate::{Error, Result};

/// A1111's "Original" emphasis (`modules/sd_emphasis.py`, `EmphasisOriginal`), per chunk:
/// `z * w[..., None]`, then rescaled so the chunk's mean equals its mean before weighting.
/// `z`: `[C, T, D]`; `weights`: `[C, T]`. Computed in f32, returned in `z`'s dtype.
/// With all weights 1.0 the result is `z` exactly.
pub fn apply_emphasis_original(z: &Tensor, weights: &Tensor) -> Result<Tensor> {
    let (c, t, _) = z.dims3()?;
    if weights.dims() != [c, t] {
        return Err(Error::invalid_argument(format!(
            "emphasis weights {:?} do not match hidden states {:?}",
            weights.dims(),
            z.dims()
        )));
    }
    let dtype = z.dtype();
    let z = z.to_dtype(DType::F32)?;
    let w = weights
        .to_device(z.device())?
        .to_dtype(DType::F32)?
        .unsqueeze(2)?;
    // Mean of row means: a two-level sum, close to torch's pairwise `mean()` in f32.
    let chunk_mean = |x: &Tensor| x.mean_keepdim(2)?.mean_keepdim(1);
    let original_mean = chunk_mean(&z)?;
    let weighted = z.broadcast_mul(&w)?;
    let new_mean = chunk_mean(&weighted)?;
    Ok(weighted
        .broadcast_mul(&(original_mean / new_mean)?)?
        .to_dtype(dtype)?)
}

/// SDXL's text conditioning: CLIP-L and OpenCLIP bigG side by side.
#[derive(Debug, Clone)]
pub struct SdxlTextEncoders {
    pub clip_l: ClipTextModel,
    pub clip_g: ClipTextModelWithProjection,
}

impl SdxlTextEncoders {
    pub fn new(clip_l: ClipTextModel, clip_g: ClipTextModelWithProjection) -> Self {
        Self { clip_l, clip_g }
    }

    /// `vb_l`: the `text_encoder` weights; `vb_g`: the `text_encoder_2` weights.
    pub fn load(
        vb_l: VarBuilder,
        config_l: &ClipTextConfig,
        vb_g: VarBuilder,
        config_g: &ClipTextConfig,
    ) -> Result<Self> {
        Ok(Self {
            clip_l: ClipTextModel::load(vb_l, config_l).map_err(|e| e.context("text_encoder"))?,
            clip_g: ClipTextModelWithProjection::load(vb_g, config_g)
                .map_err(|e| e.context("text_encoder_2"))?,
        })
    }

    /// Encodes one prompt given as `C` token windows per encoder (`ids_*`: `[C, T]` u32, normally
    /// `T = 77`; `weights_*`: `[C, T]` f32 A1111 multipliers). Each chunk is encoded on its own,
    /// each encoder's penultimate states get A1111's Original emphasis per chunk, features are
    /// concatenated (768 + 1280) and chunks follow each other along the sequence.
    ///
    /// Returns `(hidden [1, C*T, H_l + H_g], pooled [1, projection_dim])`; `pooled` is bigG's
    /// projected pooled output of the *first* chunk (as A1111 does). With one chunk and unit
    /// weights this is diffusers' `encode_prompt` (`prompt_embeds`, `pooled_prompt_embeds`).
    /// Outputs are in the encoders' dtype on their device.
    pub fn encode(
        &self,
        ids_l: &Tensor,
        weights_l: &Tensor,
        ids_g: &Tensor,
        weights_g: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let (c, t) = ids_l.dims2().map_err(|_| {
            Error::invalid_argument(format!(
                "ids_l must be [chunks, seq], got {:?}",
                ids_l.dims()
            ))
        })?;
        for (name, x) in [
            ("weights_l", weights_l),
            ("ids_g", ids_g),
            ("weights_g", weights_g),
        ] {
            if x.dims() != [c, t] {
                return Err(Error::invalid_argument(format!(
                    "{name} is {:?}, expected [{c}, {t}]",
                    x.dims()
                )));
            }
        }
        if c == 0 {
            return Err(Error::invalid_argument("a prompt needs at least one chunk"));
        }
        let out_l = self.clip_l.forward(ids_l)?;
        let out_g = self.clip_g.forward(ids_g)?;
        let z_l = apply_emphasis_original(out_l.penultimate(), weights_l)?;
        let z_g = apply_emphasis_original(out_g.penultimate(), weights_g)?;
        let z_g = z_g.to_device(z_l.device())?.to_dtype(z_l.dtype())?;
        let hidden = Tensor::cat(&[&z_l, &z_g], D::Minus1)?;
        let width = hidden.dim(D::Minus1)?;
        let hidden = hidden.reshape((1, c * t, width))?;
        let pooled = out_g
            .text_embeds
            .expect("projection model sets text_embeds")
            .narrow(0, 0, 1)?;
        Ok((hidden, pooled))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor};

    use super::*;
    use crate::testing::{tiny_clip_g, tiny_clip_l};

    #[test]
    fn bad_inputs_are_invalid_arguments() {
        let enc = SdxlTextEncoders::new(tiny_clip_l(), tiny_clip_g());
        let ids = Tensor::zeros((1, 77), DType::U32, &Device::Cpu).unwrap();
        let w = Tensor::ones((1, 76), DType::F32, &Device::Cpu).unwrap();
        let e = enc.encode(&ids, &w, &ids, &w).unwrap_err();
        assert_eq!(e.code, crate::ErrorCode::InvalidArgument);
        let too_long = Tensor::zeros((1, 78), DType::U32, &Device::Cpu).unwrap();
        assert_eq!(
            enc.clip_l.forward(&too_long).unwrap_err().code,
            crate::ErrorCode::InvalidArgument
        );
        let oov = Tensor::full(49408u32, (1, 3), &Device::Cpu).unwrap();
        assert_eq!(
            enc.clip_l.forward(&oov).unwrap_err().code,
            crate::ErrorCode::InvalidArgument
        );
    }
}
