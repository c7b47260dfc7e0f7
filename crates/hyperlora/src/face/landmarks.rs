//! 106-point 2-D landmarks (antelopev2/buffalo_l `2d106det.onnx`) as insightface's
//! `model_zoo.Landmark.get` runs it: a square crop around the box (scale 1.5) warped to the
//! model input, prediction in [-1, 1] mapped back through the inverse transform.

use std::path::Path;

use super::detector::Detection;
use super::onnx::{Dim, OnnxModel};
use crate::error::Result;
use crate::image::RgbImage;
use crate::image::{invert_affine, warp_affine};

/// insightface's input normalisation rule: a graph that subtracts and multiplies in its first
/// nodes (or starts with a `bn_data` BatchNorm) takes raw pixels; otherwise (x - 127.5) / s.
pub(crate) fn input_norm(model: &OnnxModel, default_std: f32) -> (f32, f32) {
    let (mut sub, mut mul) = (false, false);
    for (i, name) in model.first_node_names.iter().enumerate() {
        if name.starts_with("Sub") || name.starts_with("_minus") {
            sub = true;
        }
        if name.starts_with("Mul") || name.starts_with("_mul") {
            mul = true;
        }
        if i < 3 && name == "bn_data" {
            sub = true;
            mul = true;
        }
    }
    if sub && mul {
        (0.0, 1.0)
    } else {
        (127.5, default_std)
    }
}

/// NCHW blob from an RGB8 image: (x - mean) / std.
pub(crate) fn blob(img: &RgbImage, mean: f32, std: f32) -> Vec<f32> {
    let plane = img.width * img.height;
    let mut out = vec![0f32; 3 * plane];
    for (i, p) in img.data.chunks_exact(3).enumerate() {
        for c in 0..3 {
            out[c * plane + i] = (p[c] as f32 - mean) * (1.0 / std);
        }
    }
    out
}

pub struct LandmarkModel {
    model: OnnxModel,
    size: usize,
    points: usize,
    mean: f32,
    std: f32,
}

impl LandmarkModel {
    /// Checks the 2d106det signature: one 1x3xSxS input, one output of 212 values.
    pub fn load(path: &Path) -> Result<Self> {
        let model = OnnxModel::load(path)?;
        let ins = &model.inputs[0].shape;
        let size = match (
            ins.len(),
            ins.get(1),
            ins.get(2).and_then(Dim::fixed),
            ins.get(3).and_then(Dim::fixed),
        ) {
            (4, Some(Dim::Fixed(3)), Some(h), Some(w)) if h == w => h as usize,
            _ => {
                return Err(model
                    .signature_error("not a 2d106det landmark model: expected a 1x3xSxS input"))
            }
        };
        let out_len = model.outputs[0].shape.last().and_then(Dim::fixed);
        if model.inputs.len() != 1 || model.outputs.len() != 1 || out_len != Some(212) {
            return Err(model.signature_error(
                "not a 2d106det landmark model: expected one output of 212 values (106 x 2)",
            ));
        }
        let (mean, std) = input_norm(&model, 128.0);
        Ok(Self {
            model,
            size,
            points: 106,
            mean,
            std,
        })
    }

    pub fn input_size(&self) -> usize {
        self.size
    }

    /// The 106 landmarks of one detected face, in image coordinates.
    pub fn landmarks(&self, img: &RgbImage, face: &Detection) -> Result<Vec<[f32; 2]>> {
        let b = face.bbox;
        let (w, h) = (b[2] - b[0], b[3] - b[1]);
        let center = ((b[2] + b[0]) / 2.0, (b[3] + b[1]) / 2.0);
        let scale = self.size as f32 / (w.max(h) * 1.5);
        let half = (self.size / 2) as f64;
        let m = [
            [scale as f64, 0.0, -((center.0 * scale) as f64) + half],
            [0.0, scale as f64, -((center.1 * scale) as f64) + half],
        ];
        let crop = warp_affine(img, &m, self.size, self.size);
        let outs = self
            .model
            .run(&blob(&crop, self.mean, self.std), self.size, self.size)?;
        let pred = &outs[0].1;
        let Some(start) = pred.len().checked_sub(self.points * 2) else {
            return Err(self.model.signature_error(format!(
                "the landmark output has {} values, expected {}",
                pred.len(),
                self.points * 2
            )));
        };
        let pred = &pred[start..];
        let im = invert_affine(&m);
        let k = (self.size / 2) as f32;
        Ok((0..self.points)
            .map(|i| {
                let x = ((pred[2 * i] + 1.0) * k) as f64;
                let y = ((pred[2 * i + 1] + 1.0) * k) as f64;
                [
                    (im[0][0] * x + im[0][1] * y + im[0][2]) as f32,
                    (im[1][0] * x + im[1][1] * y + im[1][2]) as f32,
                ]
            })
            .collect())
    }
}
