//! Likeness: the HyperLoRA paper's Face Sim, the ArcFace cosine between a picture's face and the
//! person's reference embedding.
//!
//! The picture's face is found as insightface's `FaceAnalysis.get` finds it (SCRFD on the whole
//! picture, ArcFace on `norm_crop` of its five keypoints, no re-detection on a crop), retried at
//! the smaller detector sizes like every detection here. When several faces are found the
//! *largest* box is scored: in a portrait the subject is the biggest face, while the detector's
//! score can favour a small sharp face in the background.
//!
//! The reference is the normalised mean of the per-photo normalised embeddings, the
//! embedding an identity was made from ([`mean_embedding`]); it travels in the identity's LoRA
//! file under [`ARCFACE_METADATA_KEY`].

use super::{Detection, FaceAnalyzer, DETECT_SIZES};
use crate::error::{Error, Result};
use crate::image::RgbImage;
use crate::task::CancelToken;

/// The `__metadata__` key of an identity's LoRA file that holds its mean ArcFace embedding, as
/// a JSON array of numbers.
pub const ARCFACE_METADATA_KEY: &str = "hyperlora_arcface";

/// The reason given for a picture without a face.
pub const NO_FACE_REASON: &str = "no face";

/// One picture's likeness: the cosine and the face scored, or why there is none.
#[derive(Clone, Debug, PartialEq)]
pub struct Likeness {
    pub cosine: Option<f32>,
    /// Set when `cosine` is `None`.
    pub reason: Option<String>,
    /// The face the cosine is of (photo coordinates).
    pub face: Option<Detection>,
}

/// The normalised mean of L2-normalised embeddings (each is normalised again here, so any
/// non-zero ArcFace outputs may be given). `INVALID_ARGUMENT` for none, differing lengths or a
/// zero/non-finite embedding.
pub fn mean_embedding(embeddings: &[Vec<f32>]) -> Result<Vec<f32>> {
    let Some(first) = embeddings.first() else {
        return Err(Error::invalid_argument(
            "a reference embedding needs at least one face",
        ));
    };
    let mut sum = vec![0f32; first.len()];
    for e in embeddings {
        if e.len() != first.len() {
            return Err(Error::invalid_argument(format!(
                "ArcFace embeddings of different lengths: {} and {}",
                first.len(),
                e.len()
            )));
        }
        let unit = normalized(e)?;
        sum.iter_mut().zip(&unit).for_each(|(s, v)| *s += v);
    }
    normalized(&sum)
}

fn normalized(e: &[f32]) -> Result<Vec<f32>> {
    let n = e.iter().map(|v| v * v).sum::<f32>().sqrt();
    if !(n > 0.0 && n.is_finite()) || e.is_empty() {
        return Err(Error::invalid_argument(
            "an ArcFace embedding is empty, zero or not finite",
        ));
    }
    Ok(e.iter().map(|v| v / n).collect())
}

/// An embedding as stored under [`ARCFACE_METADATA_KEY`].
pub fn encode_embedding(e: &[f32]) -> String {
    serde_json::to_string(e).expect("numbers serialise")
}

/// The embedding stored under [`ARCFACE_METADATA_KEY`]; `BAD_WEIGHTS` when it is not a list of
/// finite numbers.
pub fn decode_embedding(text: &str) -> Result<Vec<f32>> {
    let e: Vec<f32> = serde_json::from_str(text).map_err(|err| {
        Error::bad_weights(format!(
            "metadata {ARCFACE_METADATA_KEY} is not a list of numbers: {err}"
        ))
    })?;
    normalized(&e).map_err(|_| {
        Error::bad_weights(format!(
            "metadata {ARCFACE_METADATA_KEY} is not a usable embedding"
        ))
    })?;
    Ok(e)
}

impl FaceAnalyzer {
    /// The likeness of the largest face in `img` to `reference` (see the module docs); a
    /// picture without a face gives `cosine: None` with the reason [`NO_FACE_REASON`].
    pub fn likeness(
        &self,
        img: &RgbImage,
        reference: &[f32],
        cancel: &CancelToken,
    ) -> Result<Likeness> {
        let reference = normalized(reference)?;
        let (dets, _) = self.detector.detect_with_retries(img, &DETECT_SIZES)?;
        cancel.check()?;
        // The first of equal areas: the better detector score.
        let Some(face) = dets.iter().fold(None::<&Detection>, |best, d| match best {
            Some(b) if b.area() >= d.area() => Some(b),
            _ => Some(d),
        }) else {
            return Ok(Likeness {
                cosine: None,
                reason: Some(NO_FACE_REASON.to_string()),
                face: None,
            });
        };
        let e = self.arcface.embed(img, face)?;
        if e.len() != reference.len() {
            return Err(Error::invalid_argument(format!(
                "the reference embedding has {} values, this ArcFace model gives {}",
                reference.len(),
                e.len()
            )));
        }
        let cosine = e.iter().zip(&reference).map(|(a, b)| a * b).sum();
        Ok(Likeness {
            cosine: Some(cosine),
            reason: None,
            face: Some(face.clone()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_is_normalised_and_round_trips_through_metadata() {
        let m = mean_embedding(&[vec![3.0, 0.0], vec![0.0, 0.5]]).unwrap();
        let s = std::f32::consts::FRAC_1_SQRT_2;
        assert!((m[0] - s).abs() < 1e-6 && (m[1] - s).abs() < 1e-6, "{m:?}");
        assert_eq!(decode_embedding(&encode_embedding(&m)).unwrap(), m);
        assert!(mean_embedding(&[]).is_err());
        assert!(mean_embedding(&[vec![1.0], vec![1.0, 0.0]]).is_err());
        assert!(mean_embedding(&[vec![0.0, 0.0]]).is_err());
        assert_eq!(
            decode_embedding("[1, \"x\"]").unwrap_err().code,
            crate::ErrorCode::BadWeights
        );
    }
}
