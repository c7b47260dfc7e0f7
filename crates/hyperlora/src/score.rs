//! Scores of generated portraits as the HyperLoRA paper measures methods: likeness (ArcFace
//! cosine to the person, [`crate::face::likeness`]) and prompt alignment (CLIP image–text cosine,
//! [`crate::clip::score`]), and the order best-of-N keeps candidates in ([`rank`]).

use std::cmp::Ordering;

use crate::clip::score::ClipScorer;
use crate::error::{Error, Result};
use crate::face::likeness::Likeness;
use crate::face::FaceAnalyzer;
use crate::image::RgbImage;
use crate::task::{CancelToken, Progress, ProgressFn, Stage};

/// One picture's scores; a part not asked for is `None`.
#[derive(Clone, Debug, PartialEq)]
pub struct ImageScore {
    /// `None` when no reference was given, or (with `likeness.reason`) when the picture has no face.
    pub likeness: Option<Likeness>,
    pub prompt_alignment: Option<f32>,
}

/// What best-of-N sorts by, best first.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Rank {
    Likeness,
    Prompt,
    /// `likeness · w_likeness + prompt · w_prompt`.
    Weighted {
        likeness: f32,
        prompt: f32,
    },
}

impl Rank {
    /// The value sorted on; `None` ranks last (a picture without a face, or a score not taken).
    fn key(self, s: &ImageScore) -> Option<f32> {
        let likeness = s.likeness.as_ref().and_then(|l| l.cosine);
        match self {
            Rank::Likeness => likeness,
            Rank::Prompt => s.prompt_alignment,
            Rank::Weighted {
                likeness: wl,
                prompt: wp,
            } => {
                let part = |w: f32, v: Option<f32>| {
                    if w == 0.0 {
                        Some(0.0)
                    } else {
                        v.map(|v| w * v)
                    }
                };
                Some(part(wl, likeness)? + part(wp, s.prompt_alignment)?)
            }
        }
    }

    fn check(self) -> Result<()> {
        if let Rank::Weighted { likeness, prompt } = self {
            if !(likeness.is_finite() && prompt.is_finite()) || (likeness == 0.0 && prompt == 0.0) {
                return Err(Error::invalid_argument(format!(
                    "rank weights must be finite and not both 0, got likeness {likeness}, prompt {prompt}"
                )));
            }
        }
        Ok(())
    }
}

/// Positions of `scores` best first; pictures without the value ranked on come last, and equal
/// values keep their order (a stable sort).
pub fn rank(scores: &[ImageScore], by: Rank) -> Result<Vec<usize>> {
    by.check()?;
    let keys: Vec<Option<f32>> = scores.iter().map(|s| by.key(s)).collect();
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| match (keys[a], keys[b]) {
        (Some(x), Some(y)) => y.partial_cmp(&x).unwrap_or(Ordering::Equal),
        (Some(_), None) => Ordering::Less,
        (None, Some(_)) => Ordering::Greater,
        (None, None) => Ordering::Equal,
    });
    Ok(order)
}

/// Scores each picture: likeness to `reference` (a mean ArcFace embedding) when given, prompt
/// alignment when `prompt` is given. Progress: `score`, one step per picture.
pub fn score_images(
    faces: &FaceAnalyzer,
    clip: &ClipScorer,
    images: &[RgbImage],
    reference: Option<&[f32]>,
    prompt: Option<&str>,
    cancel: &CancelToken,
    progress: ProgressFn<'_>,
) -> Result<Vec<ImageScore>> {
    if reference.is_none() && prompt.is_none() {
        return Err(Error::invalid_argument(
            "nothing to score: give an identity (or photos) and/or a prompt",
        ));
    }
    // The text tower runs once (and is loaded on the first prompt ever asked about).
    let text = prompt.map(|p| clip.text_embeds(p)).transpose()?;
    let total = images.len() as u64;
    let mut scores = Vec::with_capacity(images.len());
    for (i, img) in images.iter().enumerate() {
        cancel.check()?;
        let likeness = reference
            .map(|r| faces.likeness(img, r, cancel))
            .transpose()
            .map_err(|e| e.context(format!("picture {i}")))?;
        // One picture at a time: its score does not depend on what is scored beside it.
        let prompt_alignment = text.as_ref().map(|t| clip.alignment(img, t)).transpose()?;
        scores.push(ImageScore {
            likeness,
            prompt_alignment,
        });
        progress(Progress {
            stage: Stage::Score,
            step: i as u64 + 1,
            total,
        });
    }
    Ok(scores)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn score(likeness: Option<f32>, prompt: Option<f32>) -> ImageScore {
        ImageScore {
            likeness: Some(Likeness {
                cosine: likeness,
                reason: likeness.is_none().then(|| "no face".to_string()),
                face: None,
            }),
            prompt_alignment: prompt,
        }
    }

    #[test]
    fn ranks_best_first_faceless_last_ties_stable() {
        let s = [
            score(Some(0.2), Some(0.30)),
            score(None, Some(0.9)),
            score(Some(0.5), Some(0.10)),
            score(Some(0.2), Some(0.20)),
        ];
        assert_eq!(rank(&s, Rank::Likeness).unwrap(), [2, 0, 3, 1]);
        assert_eq!(rank(&s, Rank::Prompt).unwrap(), [1, 0, 3, 2]);
        let w = Rank::Weighted {
            likeness: 1.0,
            prompt: 2.0,
        };
        // 0.8, -, 0.7, 0.6: the faceless picture is last even with the best prompt score.
        assert_eq!(rank(&s, w).unwrap(), [0, 2, 3, 1]);
        let prompt_only = Rank::Weighted {
            likeness: 0.0,
            prompt: 1.0,
        };
        assert_eq!(rank(&s, prompt_only).unwrap(), [1, 0, 3, 2]);
        let none = Rank::Weighted {
            likeness: 0.0,
            prompt: 0.0,
        };
        assert_eq!(
            rank(&s, none).unwrap_err().code,
            crate::ErrorCode::InvalidArgument
        );
    }
}
