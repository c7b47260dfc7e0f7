//! ArcFace recognition (antelopev2 `glintr100.onnx`, buffalo_l `w600k_r50.onnx`) as
//! insightface's `ArcFaceONNX.get` runs it: `norm_crop` (5-point similarity onto the ArcFace
//! template, cv2.warpAffine to 112x112), the model's normalisation, then we L2-normalise.

use std::path::Path;

use super::align::estimate_norm;
use super::detector::Detection;
use super::landmarks::{blob, input_norm};
use super::onnx::{Dim, OnnxModel};
use crate::error::{Error, Result};
use crate::image::warp_affine;
use crate::image::RgbImage;

pub struct ArcFaceModel {
    model: OnnxModel,
    size: usize,
    dim: usize,
    mean: f32,
    std: f32,
}

/// insightface `norm_crop(img, kps, size)`: the aligned face crop.
pub fn norm_crop(img: &RgbImage, kps: &[[f32; 2]; 5], size: usize) -> RgbImage {
    let m = estimate_norm(kps, size);
    warp_affine(img, &m, size, size)
}

impl ArcFaceModel {
    /// Checks the glintr100 signature: one 1x3x112x112 input, one output of 512 values.
    pub fn load(path: &Path) -> Result<Self> {
        let model = OnnxModel::load(path)?;
        let ins = &model.inputs[0].shape;
        let ok_in = ins.len() == 4
            && ins[1] == Dim::Fixed(3)
            && ins[2].fixed() == Some(112)
            && ins[3].fixed() == Some(112);
        let dim = model.outputs[0].shape.last().and_then(Dim::fixed);
        if model.inputs.len() != 1 || !ok_in || model.outputs.len() != 1 || dim != Some(512) {
            return Err(model.signature_error(
                "not an ArcFace model: expected one 1x3x112x112 input and one 512-value output",
            ));
        }
        let (mean, std) = input_norm(&model, 127.5);
        Ok(Self {
            model,
            size: 112,
            dim: 512,
            mean,
            std,
        })
    }

    /// The model's output for an aligned 112x112 crop, not normalised: insightface's
    /// `face.embedding` (InstantID's face condition), where `face.normed_embedding` is
    /// [`Self::embed_aligned`].
    pub fn raw_embedding_aligned(&self, aligned: &RgbImage) -> Result<Vec<f32>> {
        let outs = self
            .model
            .run(&blob(aligned, self.mean, self.std), self.size, self.size)?;
        let e = outs[0].1.clone();
        if e.len() != self.dim {
            return Err(self
                .model
                .signature_error(format!("embedding has {} values", e.len())));
        }
        Ok(e)
    }

    /// The L2-normalised embedding of an aligned 112x112 crop.
    pub fn embed_aligned(&self, aligned: &RgbImage) -> Result<Vec<f32>> {
        let mut e = self.raw_embedding_aligned(aligned)?;
        let n = e.iter().map(|v| v * v).sum::<f32>().sqrt();
        if !(n > 0.0 && n.is_finite()) {
            // Pixels are bounded, so only broken weights make this.
            return Err(Error::bad_weights(format!(
                "{}: ArcFace produced a zero or non-finite embedding",
                self.model.path().display()
            )));
        }
        e.iter_mut().for_each(|v| *v /= n);
        Ok(e)
    }

    /// Aligns the face by its 5 keypoints; the raw (not normalised) embedding.
    pub fn raw_embedding(&self, img: &RgbImage, face: &Detection) -> Result<Vec<f32>> {
        self.raw_embedding_aligned(&norm_crop(img, &face.kps, self.size))
    }

    /// Aligns the face by its 5 keypoints and embeds it.
    pub fn embed(&self, img: &RgbImage, face: &Detection) -> Result<Vec<f32>> {
        self.embed_aligned(&norm_crop(img, &face.kps, self.size))
    }
}
