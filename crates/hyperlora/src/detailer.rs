//! Face refine, a built-in "FaceDetailer": faces that are small in the frame lose likeness, so
//! each face is re-drawn at high resolution and blended back. Per face:
//! square crop around it → Pillow-bicubic upscale to the refine size → SDXL img2img (the active
//! LoRA set, i.e. the identity, stays merged) → bicubic back to the crop size → blend with a
//! feathered mask of the dilated face box.
//!
//! Defaults follow ComfyUI Impact-Pack's FaceDetailer (crop factor 3, dilation 10 px, feather 5,
//! denoise 0.5): a crop three times the face gives the model the head, hair and shoulders as
//! context, and at the 1024 px refine size the face then spans about a third of the picture,
//! SDXL's own portrait framing. Face detection is not done here: the caller passes the boxes
//! (the face analyzer's `detect` on the decoded image).

use crate::error::{Error, Result};
use crate::image::pil_resize_bicubic;
use crate::image::RgbImage;
use crate::sdxl::pipeline::{GenerateParams, InitImage, SdxlPipeline};
use crate::sdxl::sampling::sampler::{Sampler, SigmaSchedule};
use crate::task::{CancelToken, Progress, ProgressFn, Stage};

/// A face's box in image pixels (the detector's `[x1, y1, x2, y2]`; it may reach past the edges).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FaceBox {
    pub x1: f64,
    pub y1: f64,
    pub x2: f64,
    pub y2: f64,
}

impl FaceBox {
    pub fn from_xyxy([x1, y1, x2, y2]: [f64; 4]) -> Self {
        Self { x1, y1, x2, y2 }
    }

    fn area(&self) -> f64 {
        (self.x2 - self.x1) * (self.y2 - self.y1)
    }

    /// Finite, non-empty and overlapping the `width`×`height` picture.
    fn validate(&self, width: usize, height: usize) -> Result<()> {
        let finite = [self.x1, self.y1, self.x2, self.y2]
            .iter()
            .all(|v| v.is_finite());
        let inside =
            self.x1 < width as f64 && self.y1 < height as f64 && self.x2 > 0.0 && self.y2 > 0.0;
        if !finite || self.x2 <= self.x1 || self.y2 <= self.y1 || !inside {
            return Err(Error::invalid_argument(format!(
                "face box [{}, {}, {}, {}] is empty or outside the {width}x{height} image",
                self.x1, self.y1, self.x2, self.y2
            )));
        }
        Ok(())
    }
}

/// Which of the given faces are refined.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FaceSelection {
    /// Every face, in the order given.
    #[default]
    All,
    /// Only the face with the largest box (the first of equals).
    Largest,
}

impl FaceSelection {
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "all" => Ok(Self::All),
            "largest" => Ok(Self::Largest),
            _ => Err(Error::invalid_argument(format!(
                "faces must be 'all' or 'largest', got {name:?}"
            ))),
        }
    }

    fn select(self, faces: &[FaceBox]) -> Vec<FaceBox> {
        match self {
            Self::All => faces.to_vec(),
            Self::Largest => faces
                .iter()
                .copied()
                .reduce(|best, f| if f.area() > best.area() { f } else { best })
                .into_iter()
                .collect(),
        }
    }
}

/// What a refine pass does; the sampling fields mean what they mean in [`GenerateParams`].
#[derive(Clone, Debug)]
pub struct RefineParams {
    /// The image's prompt, or a prompt written for the face.
    pub prompt: String,
    pub negative_prompt: String,
    /// Scheduler steps; img2img runs `int(steps · strength)` of them (diffusers' semantics).
    pub steps: usize,
    pub guidance_scale: f64,
    pub sampler: Sampler,
    pub schedule: SigmaSchedule,
    /// Face `i` (counted among the selected faces, in order) is re-noised with seed `seed + i`.
    pub seed: u64,
    /// How far each face is re-noised: 0 keeps it, 1 draws it anew (default 0.5).
    pub strength: f64,
    /// Side of the square the crop is re-drawn at, rounded to a multiple of the VAE factor (8)
    /// (default 1024). Crops larger than this are downscaled for the pass.
    pub size: usize,
    /// Crop side = the face box's longer side × `padding` (default 3).
    pub padding: f64,
    /// Smallest crop side in pixels, so tiny faces keep some context (default 128: at the
    /// 1024 refine size that is an 8× upscale, one latent per crop pixel).
    pub min_size: usize,
    /// Pixels the face box grows by before feathering (default 10).
    pub dilate: f64,
    /// Gaussian σ in pixels of the mask's soft edge (default 5; the mask reaches 0 at 3σ
    /// outside the dilated box).
    pub feather: f64,
    pub faces: FaceSelection,
}

impl Default for RefineParams {
    fn default() -> Self {
        let sampling = GenerateParams::default();
        Self {
            prompt: sampling.prompt,
            negative_prompt: sampling.negative_prompt,
            steps: sampling.steps,
            guidance_scale: sampling.guidance_scale,
            sampler: sampling.sampler,
            schedule: sampling.schedule,
            seed: sampling.seed,
            strength: 0.5,
            size: 1024,
            padding: 3.0,
            min_size: 128,
            dilate: 10.0,
            feather: 5.0,
            faces: FaceSelection::All,
        }
    }
}

impl RefineParams {
    /// UNet evaluations per face: diffusers' `min(int(steps · strength), steps)`.
    pub fn denoise_steps(&self) -> usize {
        ((self.steps as f64 * self.strength) as usize).min(self.steps)
    }

    fn validate(&self) -> Result<()> {
        let check = |ok: bool, what: String| {
            if ok {
                Ok(())
            } else {
                Err(Error::invalid_argument(what))
            }
        };
        check(
            self.strength > 0.0 && self.strength <= 1.0,
            format!("refine strength must be in (0, 1], got {}", self.strength),
        )?;
        check(
            self.denoise_steps() >= 1,
            format!(
                "refine steps {} at strength {} leave no denoising step",
                self.steps, self.strength
            ),
        )?;
        check(self.size >= 1, "refine size must be positive".into())?;
        check(
            self.padding.is_finite() && self.padding >= 1.0,
            format!("refine padding must be at least 1, got {}", self.padding),
        )?;
        check(
            self.dilate.is_finite() && self.dilate >= 0.0,
            format!("refine dilate must be ≥ 0, got {}", self.dilate),
        )?;
        check(
            self.feather.is_finite() && self.feather >= 0.0,
            format!("refine feather must be ≥ 0, got {}", self.feather),
        )
    }

    /// The img2img request the refine pass runs for face `index`, from its crop `init` (already
    /// resized to `size`²): a batch of one, seed `seed + index`.
    pub fn face_params(&self, init: RgbImage, index: usize) -> GenerateParams {
        GenerateParams {
            prompt: self.prompt.clone(),
            negative_prompt: self.negative_prompt.clone(),
            width: init.width,
            height: init.height,
            steps: self.steps,
            guidance_scale: self.guidance_scale,
            sampler: self.sampler,
            schedule: self.schedule,
            seed: self.seed.wrapping_add(index as u64),
            init_image: Some(InitImage {
                image: init,
                strength: self.strength,
            }),
            // One image, and whatever else `generate` grows, at its defaults.
            ..GenerateParams::default()
        }
    }
}

/// A square region of the image, in whole pixels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CropRegion {
    pub x: usize,
    pub y: usize,
    pub side: usize,
}

/// The square around `face`: its longer side × `padding` (rounded up), at least `min_size`,
/// centred on the face and shifted to lie inside the image; shrunk only to the image's shorter
/// side when the image is smaller than that.
pub fn crop_region(
    face: &FaceBox,
    width: usize,
    height: usize,
    padding: f64,
    min_size: usize,
) -> CropRegion {
    let long = (face.x2 - face.x1).max(face.y2 - face.y1);
    let side = ((long * padding).ceil() as usize)
        .max(min_size)
        .min(width.min(height));
    let place = |center: f64, len: usize| {
        (center - side as f64 / 2.0)
            .round()
            .clamp(0.0, (len - side) as f64) as usize
    };
    CropRegion {
        x: place((face.x1 + face.x2) / 2.0, width),
        y: place((face.y1 + face.y2) / 2.0, height),
        side,
    }
}

/// `size` rounded to the nearest positive multiple of `factor`.
pub fn refine_side(size: usize, factor: usize) -> usize {
    ((size + factor / 2) / factor).max(1) * factor
}

/// The blend weights over a crop region (zero everywhere outside it).
#[derive(Clone, Debug, PartialEq)]
pub struct FaceMask {
    pub region: CropRegion,
    /// `side × side` weights in [0, 1], rows top to bottom.
    pub weights: Vec<f32>,
}

impl FaceMask {
    /// The weight at image pixel (x, y).
    pub fn at(&self, x: usize, y: usize) -> f32 {
        let r = &self.region;
        if x < r.x || y < r.y || x >= r.x + r.side || y >= r.y + r.side {
            return 0.0;
        }
        self.weights[(y - r.y) * r.side + (x - r.x)]
    }
}

/// The face box grown by `dilate`, blurred by a Gaussian of σ = `feather` (truncated at 3σ),
/// over `region`. A rectangle blurred by a separable kernel is the product of two blurred 1-D
/// profiles, so that is how it is computed.
pub fn face_mask(
    face: &FaceBox,
    region: CropRegion,
    width: usize,
    height: usize,
    dilate: f64,
    feather: f64,
) -> FaceMask {
    let px = mask_profile(
        region.x,
        region.side,
        width,
        face.x1,
        face.x2,
        dilate,
        feather,
    );
    let py = mask_profile(
        region.y,
        region.side,
        height,
        face.y1,
        face.y2,
        dilate,
        feather,
    );
    FaceMask {
        region,
        weights: py
            .iter()
            .flat_map(|wy| px.iter().map(move |wx| wx * wy))
            .collect(),
    }
}

/// One axis of the mask over the crop's `len` pixels starting at `start` (of an image `image_len`
/// long): 1 where the pixel centre lies in `[lo − dilate, hi + dilate]`, then Gaussian-blurred.
///
/// A crop edge inside the image must see weight 0, or the paste would leave a seam: the box is
/// kept `radius + 1` pixels away from such edges before blurring. At an image edge there is
/// nothing to seam with, so the profile is extended past it (edge replication) and a face
/// touching the border stays fully refined up to it.
fn mask_profile(
    start: usize,
    len: usize,
    image_len: usize,
    lo: f64,
    hi: f64,
    dilate: f64,
    feather: f64,
) -> Vec<f32> {
    let radius = (3.0 * feather).ceil() as usize;
    let first = if start > 0 { radius + 1 } else { 0 };
    let end = if start + len < image_len {
        len.saturating_sub(radius + 1)
    } else {
        len
    };
    let inside: Vec<f64> = (0..len)
        .map(|k| {
            let centre = (start + k) as f64 + 0.5;
            let in_box = centre >= lo - dilate && centre <= hi + dilate;
            f64::from(u8::from(in_box && k >= first && k < end))
        })
        .collect();
    if radius == 0 {
        return inside.iter().map(|&v| v as f32).collect();
    }
    let kernel: Vec<f64> = (0..=2 * radius)
        .map(|i| {
            let d = i as f64 - radius as f64;
            (-d * d / (2.0 * feather * feather)).exp()
        })
        .collect();
    let sum: f64 = kernel.iter().sum();
    (0..len)
        .map(|k| {
            let v: f64 = kernel
                .iter()
                .enumerate()
                .map(|(i, w)| {
                    let j = (k + i).saturating_sub(radius).min(len - 1);
                    w * inside[j]
                })
                .sum();
            (v / sum).min(1.0) as f32
        })
        .collect()
}

/// The pixels of `region`.
pub fn crop(image: &RgbImage, region: CropRegion) -> RgbImage {
    let row = region.side * 3;
    let data = (region.y..region.y + region.side)
        .flat_map(|y| {
            let at = (y * image.width + region.x) * 3;
            image.data[at..at + row].iter().copied()
        })
        .collect();
    RgbImage {
        width: region.side,
        height: region.side,
        data,
    }
}

/// `out = base·(1 − m) + refined·m`, rounded, over the mask's region; `refined` is the region's
/// size. Where m = 0 the base pixel is kept bit for bit, where m = 1 the refined one is taken.
pub fn blend(base: &mut RgbImage, refined: &RgbImage, mask: &FaceMask) {
    let r = mask.region;
    for dy in 0..r.side {
        for dx in 0..r.side {
            let m = mask.weights[dy * r.side + dx];
            if m == 0.0 {
                continue;
            }
            let at = ((r.y + dy) * base.width + r.x + dx) * 3;
            let from = (dy * r.side + dx) * 3;
            for c in 0..3 {
                let b = f32::from(base.data[at + c]);
                let v = f32::from(refined.data[from + c]);
                base.data[at + c] = (b + (v - b) * m).round() as u8;
            }
        }
    }
}

/// Re-draws the faces of `image` (see the module docs) with the pipeline's active LoRA set and
/// returns the result; faces are refined in turn, each on the result of the previous one.
/// Progress: stage `refine`, one step per denoising step plus one per face for decode and
/// paste-back, counted across all faces. `cancel` is checked before every denoising step.
pub fn refine_faces(
    pipeline: &SdxlPipeline,
    image: &RgbImage,
    faces: &[FaceBox],
    params: &RefineParams,
    cancel: &CancelToken,
    progress: ProgressFn<'_>,
) -> Result<RgbImage> {
    params.validate()?;
    if image.width == 0 || image.height == 0 || image.data.len() != image.width * image.height * 3 {
        return Err(Error::invalid_argument(format!(
            "image buffer holds {} bytes, expected {}x{}x3",
            image.data.len(),
            image.width,
            image.height
        )));
    }
    for face in faces {
        face.validate(image.width, image.height)?;
    }
    let chosen = params.faces.select(faces);
    let side = refine_side(params.size, pipeline.vae_scale_factor());
    let per_face = params.denoise_steps() as u64 + 1;
    let total = per_face * chosen.len() as u64;
    let mut out = image.clone();
    for (index, face) in chosen.iter().enumerate() {
        cancel.check()?;
        let (w, h) = (out.width, out.height);
        let region = crop_region(face, w, h, params.padding, params.min_size);
        let mask = face_mask(face, region, w, h, params.dilate, params.feather);
        let init = pil_resize_bicubic(&crop(&out, region), side, side);
        let done = index as u64 * per_face;
        let mut forward = |p: Progress| {
            if p.stage == Stage::Denoise {
                progress(Progress {
                    stage: Stage::Refine,
                    step: done + p.step,
                    total,
                });
            }
        };
        let mut drawn =
            pipeline.generate(&params.face_params(init, index), cancel, &mut forward)?;
        let refined = pil_resize_bicubic(&drawn.remove(0), region.side, region.side);
        blend(&mut out, &refined, &mask);
        progress(Progress {
            stage: Stage::Refine,
            step: done + per_face,
            total,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorCode;
    use crate::testing::{astronaut_photo as astronaut, tiny_sdxl};

    fn face(b: [f64; 4]) -> FaceBox {
        FaceBox::from_xyxy(b)
    }

    fn region(x: usize, y: usize, side: usize) -> CropRegion {
        CropRegion { x, y, side }
    }

    /// Hand-computed: side = ceil(longer side × padding) ≥ min_size ≤ the image's shorter side;
    /// start = round(centre − side/2) clamped into the image.
    #[test]
    fn crop_regions_by_hand() {
        let cases = [
            // Centred: long 40 → 120 → min 128; centre (120, 115).
            (
                [100.0, 100.0, 140.0, 130.0],
                (256, 256),
                3.0,
                128,
                region(56, 51, 128),
            ),
            // Non-square image: long 80 → 240; centre (240, 140).
            (
                [200.0, 100.0, 280.0, 180.0],
                (512, 384),
                3.0,
                128,
                region(120, 20, 240),
            ),
            // Top-left corner: shifted to 0, 0.
            (
                [0.0, 0.0, 30.0, 40.0],
                (512, 512),
                3.0,
                128,
                region(0, 0, 128),
            ),
            // Bottom-right corner: 437, 442 shifted back to 512 − 128.
            (
                [490.0, 500.0, 512.0, 512.0],
                (512, 512),
                3.0,
                128,
                region(384, 384, 128),
            ),
            // A detector box past the left edge: long 60 → 180, x −80 → 0.
            (
                [-10.0, 200.0, 30.0, 260.0],
                (512, 512),
                3.0,
                128,
                region(0, 140, 180),
            ),
            // A face bigger than the image: the whole shorter side, centred on x.
            (
                [-20.0, -30.0, 220.0, 130.0],
                (200, 100),
                3.0,
                128,
                region(50, 0, 100),
            ),
            // Narrow image, face at its right edge: min 128 shrunk to the width 100.
            (
                [60.0, 150.0, 100.0, 190.0],
                (100, 300),
                3.0,
                128,
                region(0, 120, 100),
            ),
            // Tiny face: 5 → 15 → min 128; y 238.5 rounds half away from zero.
            (
                [300.0, 300.0, 304.0, 305.0],
                (1024, 768),
                3.0,
                128,
                region(238, 239, 128),
            ),
            // Fractional box: 59.4 × 2.5 = 148.5 → 149; 361.05 → 361, 275.9 → 276.
            (
                [410.2, 320.7, 460.9, 380.1],
                (1000, 1000),
                2.5,
                0,
                region(361, 276, 149),
            ),
            // The parity fixture's face in the bundled photo: 52 × 3 = 156, x 75.5 → 76.
            (
                [128.0, 38.0, 179.0, 90.0],
                (256, 256),
                3.0,
                128,
                region(76, 0, 156),
            ),
        ];
        for (b, (w, h), padding, min_size, want) in cases {
            assert_eq!(
                crop_region(&face(b), w, h, padding, min_size),
                want,
                "{b:?} in {w}x{h}"
            );
        }
    }

    #[test]
    fn refine_side_rounds_to_the_vae_factor() {
        for (size, want) in [
            (1024, 1024),
            (1000, 1000),
            (1003, 1000),
            (1004, 1008),
            (3, 8),
        ] {
            assert_eq!(refine_side(size, 8), want, "{size}");
        }
    }

    fn assert_profile(got: &[f32], want: &[f32]) {
        assert_eq!(got.len(), want.len());
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!((g - w).abs() <= 1e-5, "index {i}: {got:?} vs {want:?}");
        }
    }

    #[test]
    fn mask_profiles_by_hand() {
        // No feather: pixel centres in [3 − 1, 5 + 1] → pixels 2..=5.
        assert_profile(
            &mask_profile(0, 10, 20, 3.0, 5.0, 1.0, 0.0),
            &[0., 0., 1., 1., 1., 1., 0., 0., 0., 0.],
        );
        // A box covering the whole crop, which lies inside the image: kept off both edges.
        assert_profile(
            &mask_profile(5, 10, 30, -100.0, 100.0, 0.0, 0.0),
            &[0., 1., 1., 1., 1., 1., 1., 1., 1., 0.],
        );
        // σ = 1 (radius 3) on a box covering pixels 0, 1 at the image's left edge, extended
        // past it: Σ of e^(−d²/2) over the covered offsets / Σ over all seven.
        assert_profile(
            &mask_profile(0, 12, 12, -5.0, 2.0, 0.0, 1.0),
            &[
                0.941561, 0.699525, 0.300475, 0.058439, 0.004433, 0., 0., 0., 0., 0., 0., 0.,
            ],
        );
    }

    /// A crop edge inside the image sees weight 0 (no seam); at the image edge the face stays
    /// fully refined.
    #[test]
    fn mask_is_zero_on_inner_crop_edges_and_full_at_image_edges() {
        // The face fills its crop, which is inside the image: every edge weight must be 0.
        let f = face([100.0, 100.0, 228.0, 228.0]);
        let r = region(100, 100, 128);
        let m = face_mask(&f, r, 512, 512, 10.0, 5.0);
        for i in 0..128 {
            for (x, y) in [(i, 0), (i, 127), (0, i), (127, i)] {
                assert_eq!(m.weights[y * 128 + x], 0.0, "edge pixel {x},{y}");
            }
        }
        assert!((m.at(164, 164) - 1.0).abs() < 1e-6);
        assert_eq!(m.at(99, 164), 0.0);

        // A face in the top-left corner: the corner pixel is fully refined.
        let f = face([-5.0, -5.0, 40.0, 40.0]);
        let r = crop_region(&f, 512, 512, 3.0, 128);
        let m = face_mask(&f, r, 512, 512, 10.0, 5.0);
        assert!((m.at(0, 0) - 1.0).abs() < 1e-6, "{}", m.at(0, 0));
        assert_eq!(m.at(r.side - 1, 0), 0.0);
    }

    /// Deterministic bytes (a small LCG), for blend tests.
    fn noise_image(width: usize, height: usize, mut state: u32) -> RgbImage {
        let data = (0..width * height * 3)
            .map(|_| {
                state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (state >> 24) as u8
            })
            .collect();
        RgbImage {
            width,
            height,
            data,
        }
    }

    #[test]
    fn blend_keeps_base_pixels_exactly_where_the_mask_is_zero() {
        let (w, h) = (200, 150);
        let base = noise_image(w, h, 1);
        let f = face([150.0, 20.0, 190.0, 70.0]);
        let r = crop_region(&f, w, h, 3.0, 64);
        let m = face_mask(&f, r, w, h, 6.0, 3.0);
        let refined = noise_image(r.side, r.side, 2);
        let mut out = base.clone();
        blend(&mut out, &refined, &m);
        let (mut zero, mut one, mut soft) = (0, 0, 0);
        for y in 0..h {
            for x in 0..w {
                let at = (y * w + x) * 3;
                let got = &out.data[at..at + 3];
                let weight = m.at(x, y);
                if weight == 0.0 {
                    assert_eq!(got, &base.data[at..at + 3], "pixel {x},{y}");
                    zero += 1;
                } else if weight == 1.0 {
                    let from = ((y - r.y) * r.side + x - r.x) * 3;
                    assert_eq!(got, &refined.data[from..from + 3], "pixel {x},{y}");
                    one += 1;
                } else {
                    soft += 1;
                }
            }
        }
        assert!(zero > 0 && one > 0 && soft > 0, "{zero} {one} {soft}");
    }

    #[test]
    fn selection_and_validation() {
        let small = face([0.0, 0.0, 10.0, 10.0]);
        let big = face([50.0, 50.0, 80.0, 70.0]);
        assert_eq!(FaceSelection::Largest.select(&[small, big, small]), [big]);
        assert_eq!(FaceSelection::All.select(&[small, big]), [small, big]);
        assert_eq!(
            FaceSelection::parse("largest").unwrap(),
            FaceSelection::Largest
        );
        assert!(FaceSelection::parse("best").is_err());

        for b in [
            [10.0, 10.0, 10.0, 20.0],
            [f64::NAN, 0.0, 5.0, 5.0],
            [300.0, 10.0, 320.0, 30.0],
            [-30.0, 10.0, -1.0, 30.0],
        ] {
            assert!(face(b).validate(256, 256).is_err(), "{b:?}");
        }
        let bad = [
            RefineParams {
                strength: 0.0,
                ..RefineParams::default()
            },
            RefineParams {
                steps: 1,
                strength: 0.5,
                ..RefineParams::default()
            },
            RefineParams {
                padding: 0.5,
                ..RefineParams::default()
            },
            RefineParams {
                feather: -1.0,
                ..RefineParams::default()
            },
        ];
        for p in bad {
            assert_eq!(p.validate().unwrap_err().code, ErrorCode::InvalidArgument);
        }
        assert_eq!(RefineParams::default().denoise_steps(), 10);
    }

    const PROMPT: &str = "a photo of an astronaut riding a horse on the moon";

    /// Two faces of the bundled photo, one past its left edge.
    fn two_faces() -> [FaceBox; 2] {
        [
            face([128.0, 38.0, 179.0, 90.0]),
            face([-25.6, 166.2, 25.7, 217.5]),
        ]
    }

    fn small_params() -> RefineParams {
        RefineParams {
            prompt: PROMPT.into(),
            steps: 4,
            size: 64,
            seed: 7,
            ..RefineParams::default()
        }
    }

    /// Outside every face's mask the output is the input bit for bit; inside it the face
    /// changed; the same seed gives the same picture, another seed another one; progress counts
    /// 2 denoising steps + 1 paste per face as stage `refine`.
    #[test]
    fn refine_changes_only_the_masked_faces_and_is_deterministic() {
        let pipe = tiny_sdxl();
        let photo = astronaut();
        let faces = two_faces();
        let params = small_params();
        let mut events = Vec::new();
        let out = refine_faces(
            &pipe,
            &photo,
            &faces,
            &params,
            &CancelToken::new(),
            &mut |p| events.push((p.stage, p.step, p.total)),
        )
        .unwrap();
        let want: Vec<_> = (1..=6).map(|s| (Stage::Refine, s, 6)).collect();
        assert_eq!(events, want);

        let masks: Vec<FaceMask> = faces
            .iter()
            .map(|f| {
                let r = crop_region(f, 256, 256, params.padding, params.min_size);
                face_mask(f, r, 256, 256, params.dilate, params.feather)
            })
            .collect();
        let mut changed_inside = 0;
        for y in 0..256 {
            for x in 0..256 {
                let at = (y * 256 + x) * 3;
                let (a, b) = (&out.data[at..at + 3], &photo.data[at..at + 3]);
                if masks.iter().all(|m| m.at(x, y) == 0.0) {
                    assert_eq!(a, b, "pixel {x},{y} outside the masks changed");
                } else if a != b {
                    changed_inside += 1;
                }
            }
        }
        assert!(
            changed_inside > 1000,
            "only {changed_inside} pixels changed"
        );

        let again = refine_faces(
            &pipe,
            &photo,
            &faces,
            &params,
            &CancelToken::new(),
            &mut |_| {},
        );
        assert_eq!(again.unwrap(), out);
        let reseeded = RefineParams {
            seed: 8,
            ..small_params()
        };
        let other = refine_faces(
            &pipe,
            &photo,
            &faces,
            &reseeded,
            &CancelToken::new(),
            &mut |_| {},
        );
        assert_ne!(other.unwrap(), out);

        let none = refine_faces(
            &pipe,
            &photo,
            &[],
            &params,
            &CancelToken::new(),
            &mut |_| {},
        );
        assert_eq!(none.unwrap(), photo);
    }

    #[test]
    fn refine_stops_within_one_step_of_abort() {
        let pipe = tiny_sdxl();
        let cancel = CancelToken::new();
        let mut steps = Vec::new();
        let err = refine_faces(
            &pipe,
            &astronaut(),
            &two_faces(),
            &small_params(),
            &cancel,
            &mut |p| {
                steps.push(p.step);
                cancel.cancel();
            },
        )
        .unwrap_err();
        assert_eq!(err.code, ErrorCode::Aborted);
        assert_eq!(steps, [1]);
    }

    /// One face refined at 512² and at the default 1024² on the tiny model, timed:
    /// `cargo test -p hyperlora --lib detailer::tests::timing -- --ignored --nocapture`
    #[test]
    #[ignore = "timing, run by hand"]
    fn timing_one_face() {
        let pipe = tiny_sdxl();
        for size in [512, 1024] {
            let params = RefineParams {
                prompt: PROMPT.into(),
                size,
                ..RefineParams::default()
            };
            let start = std::time::Instant::now();
            let face = &two_faces()[..1];
            refine_faces(
                &pipe,
                &astronaut(),
                face,
                &params,
                &CancelToken::new(),
                &mut |_| {},
            )
            .unwrap();
            eprintln!(
                "refine, 1 face, 156² crop → {size}², {} of {} steps: {:.2} s",
                params.denoise_steps(),
                params.steps,
                start.elapsed().as_secs_f64()
            );
        }
    }
}
