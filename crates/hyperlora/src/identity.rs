//! Photos' conditions → an identity LoRA: the CLIP vision tower and the HyperLoRA hypernetwork
//! together (docs/hyperlora-model.md §3, steps 3–5 from the crop onwards, and §4).
//!
//! Face detection and cropping produce the inputs ([`FaceConditions`]); this module starts from
//! them, so it is testable without a face detector.

use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::clip::vision::ClipVisionModel;
use crate::error::{Error, Result};
use crate::face::likeness::{encode_embedding, mean_embedding, ARCFACE_METADATA_KEY};
use crate::face::FaceConditions;
use crate::hypernet::{HyperLora, HyperLoraOutput, IdentityCoefficients};
use crate::image::RgbImage;
use crate::task::{CancelToken, Progress, ProgressFn, Stage};

/// openai/clip-vit-large-patch14's preprocessing constants.
const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_6, 0.275_777_1];

pub struct IdentityEncoder {
    clip: ClipVisionModel,
    hyper: HyperLora,
    device: Device,
}

impl IdentityEncoder {
    /// `hyperlora_dir`: a released HyperLoRA folder; `clip_dir`: a transformers CLIP vision folder.
    pub fn load(
        hyperlora_dir: &Path,
        clip_dir: &Path,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let clip = ClipVisionModel::load_dir(clip_dir, dtype, device)?;
        let hyper = HyperLora::load(hyperlora_dir, dtype, device)?;
        if hyper.uses_clip() && hyper.clip_hidden_size() != clip.config().hidden_size {
            return Err(Error::bad_weights(format!(
                "{}: the hypernetwork expects CLIP features of width {}, but {} has {}",
                hyperlora_dir.display(),
                hyper.clip_hidden_size(),
                clip_dir.display(),
                clip.config().hidden_size
            )));
        }
        // Finished before use from another thread's stream (see `SdxlPipeline::load`).
        device.synchronize()?;
        Ok(Self {
            clip,
            hyper,
            device: device.clone(),
        })
    }

    /// The side of the square face crop the CLIP tower takes.
    pub fn clip_image_size(&self) -> usize {
        self.clip.config().image_size
    }

    pub fn hypernet(&self) -> &HyperLora {
        &self.hyper
    }

    /// The CLIP vision tower (prompt scores use it too, see [`crate::clip::score`]).
    pub fn clip(&self) -> &ClipVisionModel {
        &self.clip
    }

    /// CLIP pixel values [N, 3, S, S] from RGB8 crops: scale to [0, 1], normalise per channel.
    fn clip_pixels(&self, crops: &[&RgbImage]) -> Result<Tensor> {
        let s = self.clip_image_size();
        let mean = Tensor::new(&CLIP_MEAN, &self.device)?.reshape((1, 3, 1, 1))?;
        let std = Tensor::new(&CLIP_STD, &self.device)?.reshape((1, 3, 1, 1))?;
        let images = crops
            .iter()
            .map(|c| {
                if c.width != s || c.height != s || c.data.len() != s * s * 3 {
                    return Err(Error::invalid_argument(format!(
                        "CLIP face crop must be {s}x{s} RGB8, got {}x{} ({} bytes)",
                        c.width,
                        c.height,
                        c.data.len()
                    )));
                }
                Ok(Tensor::from_slice(&c.data, (s, s, 3), &self.device)?.permute((2, 0, 1))?)
            })
            .collect::<Result<Vec<_>>>()?;
        let x = (Tensor::stack(&images, 0)?.to_dtype(DType::F32)? / 255.0)?;
        Ok(x.broadcast_sub(&mean)?.broadcast_div(&std)?)
    }

    /// CLIP's penultimate hidden states of one crop: [1, 257, hidden].
    fn clip_features(&self, crop: &RgbImage) -> Result<Tensor> {
        let pixels = self.clip_pixels(&[crop])?.to_dtype(self.clip.dtype())?;
        self.clip.penultimate(&pixels)
    }

    /// The identity of 1..N photos of one person: the resampler output is averaged over them.
    /// With a model that has a Base-LoRA and photos that all have base crops, the Base-LoRA of
    /// those crops comes too.
    /// The ID-LoRA's metadata keeps the photos' mean ArcFace embedding (under
    /// [`ARCFACE_METADATA_KEY`]), so a saved and reloaded identity can still be scored.
    /// Progress: `identity`, one step per photo (CLIP), then one for the hypernetwork.
    pub fn create(
        &self,
        photos: &[FaceConditions],
        cancel: &CancelToken,
        progress: ProgressFn<'_>,
    ) -> Result<HyperLoraOutput> {
        if photos.is_empty() {
            return Err(Error::invalid_argument(
                "an identity needs at least one photo",
            ));
        }
        let n = photos.len();
        let with_base = self.hyper.has_base_lora() && photos.iter().all(|p| p.base_crop.is_some());
        let mut penultimate = Vec::with_capacity(n);
        let mut base_penultimate = Vec::new();
        for (i, photo) in photos.iter().enumerate() {
            cancel.check()?;
            penultimate.push(self.clip_features(&photo.clip_crop)?);
            if let (true, Some(crop)) = (with_base, &photo.base_crop) {
                base_penultimate.push(self.clip_features(crop)?);
            }
            progress(Progress {
                stage: Stage::Identity,
                step: i as u64 + 1,
                total: n as u64 + 1,
            });
        }
        let clip = Tensor::cat(&penultimate, 0)?;
        let base = if with_base {
            Some(Tensor::cat(&base_penultimate, 0)?)
        } else {
            None
        };
        let embeds = photos
            .iter()
            .map(|p| Tensor::new(p.arcface.as_slice(), &self.device)?.unsqueeze(0))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let id = Tensor::stack(&embeds, 0)?; // [N, 1, 512]
        cancel.check()?;
        let mut out = self.hyper.create_lora(
            self.hyper.uses_id_embeds().then_some(&id),
            self.hyper.uses_clip().then_some(&clip),
            base.as_ref(),
        )?;
        let arcface: Vec<Vec<f32>> = photos.iter().map(|p| p.arcface.clone()).collect();
        out.coefficients.arcface = Some(mean_embedding(&arcface)?);
        keep_arcface(&mut out);
        // The LoRA may be merged from another thread's stream (see `SdxlPipeline::load`).
        self.device.synchronize()?;
        progress(Progress {
            stage: Stage::Identity,
            step: n as u64 + 1,
            total: n as u64 + 1,
        });
        Ok(out)
    }

    /// The identity of stored coefficients ([`IdentityCoefficients`]), with the ArcFace
    /// embedding they carry in its metadata as [`IdentityEncoder::create`] writes it.
    pub fn expand(&self, coefficients: IdentityCoefficients) -> Result<HyperLoraOutput> {
        let mut out = self.hyper.expand(coefficients)?;
        keep_arcface(&mut out);
        Ok(out)
    }
}

/// Writes the coefficients' ArcFace embedding into the ID-LoRA's metadata, where saved and
/// loaded identities keep it for likeness scores.
fn keep_arcface(out: &mut HyperLoraOutput) {
    if let Some(e) = &out.coefficients.arcface {
        out.id
            .metadata
            .insert(ARCFACE_METADATA_KEY.to_string(), encode_embedding(e));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorCode;
    use crate::testing::tiny_model;

    fn encoder() -> IdentityEncoder {
        IdentityEncoder::load(
            &tiny_model("hyperlora"),
            &tiny_model("clip-vision"),
            DType::F32,
            &Device::Cpu,
        )
        .unwrap()
    }

    fn photo(seed: u8, size: usize) -> FaceConditions {
        let data: Vec<u8> = (0..size * size * 3)
            .map(|i| (i as u8).wrapping_mul(seed))
            .collect();
        let mut arcface: Vec<f32> = (0..512)
            .map(|i| ((i * seed as usize) % 7) as f32 - 3.0)
            .collect();
        let norm = arcface.iter().map(|x| x * x).sum::<f32>().sqrt();
        arcface.iter_mut().for_each(|x| *x /= norm);
        let base = data.iter().map(|v: &u8| v.wrapping_add(seed)).collect();
        FaceConditions {
            arcface,
            clip_crop: RgbImage {
                width: size,
                height: size,
                data,
            },
            base_crop: Some(RgbImage {
                width: size,
                height: size,
                data: base,
            }),
        }
    }

    #[test]
    fn photos_become_an_id_lora_averaged_over_photos() {
        let enc = encoder();
        let s = enc.clip_image_size();
        let mut stages = Vec::new();
        let one = enc
            .create(&[photo(3, s)], &CancelToken::new(), &mut |p| {
                stages.push((p.stage, p.step, p.total))
            })
            .unwrap();
        assert_eq!(stages, [(Stage::Identity, 1, 2), (Stage::Identity, 2, 2)]);
        assert_eq!(one.id.len(), enc.hypernet().modules().len() * 4);
        // The tiny model has a Base-LoRA: computed from the base crops, at half the rank.
        let base = one.base.as_ref().expect("the tiny model has a Base-LoRA");
        assert_eq!(base.rank(), one.id.rank().map(|r| r / 2));
        let features = enc
            .clip_features(photo(3, s).base_crop.as_ref().unwrap())
            .unwrap();
        let expected = enc.hypernet().base_lora(&features).unwrap();
        for (name, w) in base.iter() {
            let e = expected.get(name).unwrap();
            assert_eq!(
                w.down.to_vec2::<f32>().unwrap(),
                e.down.to_vec2::<f32>().unwrap()
            );
        }
        let two = enc
            .create(
                &[photo(3, s), photo(5, s)],
                &CancelToken::new(),
                &mut |_| {},
            )
            .unwrap();
        let same = enc
            .create(
                &[photo(3, s), photo(3, s)],
                &CancelToken::new(),
                &mut |_| {},
            )
            .unwrap();
        let (name, a) = one.id.iter().next().unwrap();
        let b = same.id.get(name).unwrap();
        let c = two.id.get(name).unwrap();
        let diff = |x: &Tensor, y: &Tensor| {
            (x - y)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        // The mean of two identical photos is that photo; a different second photo moves it.
        assert!(diff(&a.down, &b.down) < 1e-5);
        assert!(diff(&a.down, &c.down) > 1e-4);
    }

    #[test]
    fn coefficients_expand_bit_equal_and_only_on_their_model() {
        let enc = encoder();
        let s = enc.clip_image_size();
        let made = enc
            .create(
                &[photo(3, s), photo(5, s)],
                &CancelToken::new(),
                &mut |_| {},
            )
            .unwrap();
        let bytes = made.coefficients.to_bytes();
        let parsed = IdentityCoefficients::from_bytes(&bytes).unwrap();
        let back = enc.expand(parsed.clone()).unwrap();
        let bits = |t: &Tensor| -> Vec<u32> {
            let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            v.iter().map(|x| x.to_bits()).collect()
        };
        let same = |a: &crate::lora::KohyaLora, b: &crate::lora::KohyaLora| {
            assert_eq!(a.len(), b.len());
            assert_eq!(a.metadata, b.metadata);
            for ((na, wa), (nb, wb)) in a.iter().zip(b.iter()) {
                assert_eq!(na, nb);
                assert_eq!(bits(&wa.down), bits(&wb.down), "{na}");
                assert_eq!(bits(&wa.up), bits(&wb.up), "{na}");
                assert_eq!(wa.alpha.to_bits(), wb.alpha.to_bits());
            }
        };
        same(&made.id, &back.id);
        same(made.base.as_ref().unwrap(), back.base.as_ref().unwrap());
        assert_eq!(made.id.metadata["hyperlora_num_photos"], "2");
        // A compact identity is far smaller than its LoRA even at the tiny sizes.
        let lora_floats: usize = made
            .id
            .iter()
            .map(|(_, w)| w.down.elem_count() + w.up.elem_count())
            .sum();
        assert!(bytes.len() < lora_floats * 4, "{} bytes", bytes.len());

        let mut other = parsed;
        other.model_id[0] ^= 1;
        let err = enc.expand(other).unwrap_err();
        assert_eq!(err.code, ErrorCode::InvalidArgument, "{err}");
        assert!(err.to_string().contains("made by HyperLoRA model"), "{err}");
    }

    #[test]
    fn rejects_wrong_inputs() {
        let enc = encoder();
        let err = enc
            .create(&[], &CancelToken::new(), &mut |_| {})
            .unwrap_err();
        assert_eq!(err.code, ErrorCode::InvalidArgument);
        let s = enc.clip_image_size();
        let err = enc
            .create(&[photo(3, s + 1)], &CancelToken::new(), &mut |_| {})
            .unwrap_err();
        assert_eq!(err.code, ErrorCode::InvalidArgument, "{err}");
        let cancel = CancelToken::new();
        cancel.cancel();
        assert_eq!(
            enc.create(&[photo(3, s)], &cancel, &mut |_| {})
                .unwrap_err()
                .code,
            ErrorCode::Aborted
        );
    }
}
