//! SCRFD face detector (antelopev2 `scrfd_10g_bnkps.onnx`, buffalo_l `det_10g.onnx`), as
//! insightface's `model_zoo.SCRFD.detect` runs it: keep-aspect resize into the square input
//! (cv2 INTER_LINEAR, zero padding right/bottom), (x - 127.5) / 128 on RGB, three strides x two
//! anchors, score >= 0.5, distance decoding of boxes and 5 keypoints, NMS 0.4 (+1 areas).

use std::path::Path;

use super::onnx::{Dim, OnnxModel};
use crate::error::Result;
use crate::image::cv_resize_linear;
use crate::image::RgbImage;

/// One detected face in image coordinates.
#[derive(Clone, Debug, PartialEq)]
pub struct Detection {
    /// x1, y1, x2, y2.
    pub bbox: [f32; 4],
    pub score: f32,
    /// Left eye, right eye, nose, left and right mouth corners.
    pub kps: [[f32; 2]; 5],
}

impl Detection {
    pub fn area(&self) -> f32 {
        (self.bbox[2] - self.bbox[0]) * (self.bbox[3] - self.bbox[1])
    }
}

pub struct Detector {
    model: OnnxModel,
    pub score_threshold: f32,
    pub nms_threshold: f32,
}

const STRIDES: [usize; 3] = [8, 16, 32];
const ANCHORS: usize = 2;

impl Detector {
    /// Loads and checks the signature insightface expects: one NCHW 3-channel input (size may
    /// be dynamic), 9 outputs = 3 strides x (score [N,1], bbox [N,4], kps [N,10]), 2-D or with a
    /// leading batch axis.
    pub fn load(path: &Path) -> Result<Self> {
        let model = OnnxModel::load(path)?;
        let input = &model.inputs[0];
        if model.inputs.len() != 1 || input.shape.len() != 4 || input.shape[1] != Dim::Fixed(3) {
            return Err(model.signature_error("not an SCRFD detector: expected one 1x3xHxW input"));
        }
        if model.outputs.len() != 9 {
            return Err(model.signature_error(format!(
                "not an SCRFD detector with keypoints: expected 9 outputs, found {}",
                model.outputs.len()
            )));
        }
        for (i, o) in model.outputs.iter().enumerate() {
            let want = [1, 4, 10][i / 3];
            let ok = matches!(o.shape.len(), 2 | 3)
                && o.shape
                    .last()
                    .and_then(Dim::fixed)
                    .is_none_or(|d| d == want);
            if !ok {
                return Err(model.signature_error(format!(
                    "not an SCRFD detector: output {i} ({}) should be [N, {want}]",
                    o.name
                )));
            }
        }
        Ok(Self {
            model,
            score_threshold: 0.5,
            nms_threshold: 0.4,
        })
    }

    /// The detector input size if the file fixes it (then only that size is used).
    pub fn fixed_input_size(&self) -> Option<usize> {
        self.model.inputs[0].shape[3].fixed().map(|v| v as usize)
    }

    /// Faces at one square input size, best score first (after NMS).
    pub fn detect(&self, img: &RgbImage, size: usize) -> Result<Vec<Detection>> {
        let size = self.fixed_input_size().unwrap_or(size);
        let im_ratio = img.height as f64 / img.width as f64;
        let (nw, nh) = if im_ratio > 1.0 {
            ((size as f64 / im_ratio) as usize, size)
        } else {
            (size, (size as f64 * im_ratio) as usize)
        };
        let det_scale = (nh as f32 as f64 / img.height as f64) as f32;
        let resized = cv_resize_linear(img, nw.max(1), nh.max(1));
        let plane = size * size;
        let mut blob = vec![(0.0 - 127.5) / 128.0; 3 * plane];
        for y in 0..resized.height {
            for x in 0..resized.width {
                for c in 0..3 {
                    let v = resized.data[(y * resized.width + x) * 3 + c] as f32;
                    blob[c * plane + y * size + x] = (v - 127.5) / 128.0;
                }
            }
        }
        let outs = self.model.run(&blob, size, size)?;
        let mut cands: Vec<Detection> = Vec::new();
        for (si, &stride) in STRIDES.iter().enumerate() {
            let scores = &outs[si].1;
            let boxes = &outs[si + 3].1;
            let kps = &outs[si + 6].1;
            let (fh, fw) = (size / stride, size / stride);
            let n = fh * fw * ANCHORS;
            if scores.len() != n || boxes.len() != n * 4 || kps.len() != n * 10 {
                return Err(self.model.signature_error(format!(
                    "stride {stride} outputs have {} / {} / {} values, expected {n} anchors",
                    scores.len(),
                    boxes.len(),
                    kps.len()
                )));
            }
            for (i, &score) in scores.iter().enumerate() {
                if score < self.score_threshold {
                    continue;
                }
                let cell = i / ANCHORS;
                let cx = ((cell % fw) * stride) as f32;
                let cy = ((cell / fw) * stride) as f32;
                let d = |j: usize| boxes[i * 4 + j] * stride as f32;
                let k = |j: usize| kps[i * 10 + j] * stride as f32;
                let bbox = [
                    (cx - d(0)) / det_scale,
                    (cy - d(1)) / det_scale,
                    (cx + d(2)) / det_scale,
                    (cy + d(3)) / det_scale,
                ];
                let kps = std::array::from_fn(|p| {
                    [(cx + k(2 * p)) / det_scale, (cy + k(2 * p + 1)) / det_scale]
                });
                cands.push(Detection { bbox, score, kps });
            }
        }
        // insightface: stable sort by descending score, then greedy NMS.
        cands.sort_by(|a, b| b.score.partial_cmp(&a.score).unwrap());
        Ok(nms(cands, self.nms_threshold))
    }

    /// Tries each size in turn (the reference's 640, 512, 384, 256) until a face is found.
    pub fn detect_with_retries(
        &self,
        img: &RgbImage,
        sizes: &[usize],
    ) -> Result<(Vec<Detection>, usize)> {
        for &s in sizes {
            let d = self.detect(img, s)?;
            if !d.is_empty() {
                return Ok((d, s));
            }
            if self.fixed_input_size().is_some() {
                break;
            }
        }
        Ok((Vec::new(), 0))
    }
}

fn nms(dets: Vec<Detection>, thresh: f32) -> Vec<Detection> {
    let area = |d: &Detection| (d.bbox[2] - d.bbox[0] + 1.0) * (d.bbox[3] - d.bbox[1] + 1.0);
    let mut order: Vec<usize> = (0..dets.len()).collect();
    let mut keep = Vec::new();
    while let Some(&i) = order.first() {
        keep.push(i);
        let a = &dets[i];
        order = order[1..]
            .iter()
            .copied()
            .filter(|&j| {
                let b = &dets[j];
                let w = (a.bbox[2].min(b.bbox[2]) - a.bbox[0].max(b.bbox[0]) + 1.0).max(0.0);
                let h = (a.bbox[3].min(b.bbox[3]) - a.bbox[1].max(b.bbox[1]) + 1.0).max(0.0);
                let inter = w * h;
                inter / (area(a) + area(b) - inter) <= thresh
            })
            .collect();
    }
    keep.into_iter().map(|i| dets[i].clone()).collect()
}
