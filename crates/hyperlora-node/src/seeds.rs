//! Per-image seeds: image `k` of a request is drawn from `seed + k` (wrapping at 2^64), as A1111
//! numbers a batch, so every image reports a seed that redraws it alone (`batchSize: 1`).
//!
//! The engine's own `generate` seeds one generator for the whole batch (diffusers' behaviour);
//! here a batch becomes one single-image request per seed. Text-to-image batches still share
//! every UNet call through `generate_many`; image-to-image batches (which `generate_many` does
//! not take) run one image after another.

use hyperlora::image::RgbImage;
use hyperlora::sdxl::batch::BatchRequest;
use hyperlora::sdxl::pipeline::{GenerateParams, SdxlPipeline};
use hyperlora::{CancelToken, Progress, Result};

/// The seed of image `index` of a request seeded with `seed`.
pub(crate) fn image_seed(seed: u64, index: usize) -> u64 {
    seed.wrapping_add(index as u64)
}

/// One single-image request per image of `params`, each with its own seed.
pub(crate) fn per_image(params: &GenerateParams) -> Vec<GenerateParams> {
    (0..params.batch_size)
        .map(|k| GenerateParams {
            seed: image_seed(params.seed, k),
            batch_size: 1,
            ..params.clone()
        })
        .collect()
}

/// `pipeline.generate` with per-image seeds; the LoRAs must already be merged.
pub(crate) fn generate(
    pipeline: &SdxlPipeline,
    params: &GenerateParams,
    cancel: &CancelToken,
    progress: &mut dyn FnMut(Progress),
) -> Result<Vec<RgbImage>> {
    if params.batch_size <= 1 {
        return pipeline.generate(params, cancel, progress);
    }
    // Checked as one request, so errors read as they would for it (not `requests[k]: …`).
    pipeline.validate(params)?;
    if params.init_image.is_none() {
        let requests: Vec<BatchRequest> = per_image(params)
            .into_iter()
            .map(|params| BatchRequest {
                params,
                loras: Vec::new(),
            })
            .collect();
        let images = pipeline.generate_many(&requests, cancel, progress)?;
        return Ok(images.into_iter().flatten().collect());
    }
    let singles = per_image(params);
    let count = singles.len() as u64;
    let mut images = Vec::with_capacity(singles.len());
    for (k, single) in singles.iter().enumerate() {
        // One bar per stage across all images: image k's steps follow image k-1's.
        let mut scaled = |p: Progress| {
            progress(Progress {
                stage: p.stage,
                step: k as u64 * p.total + p.step,
                total: count * p.total,
            })
        };
        images.extend(pipeline.generate(single, cancel, &mut scaled)?);
    }
    Ok(images)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_image_gets_the_next_seed_and_a_batch_of_one() {
        let params = GenerateParams {
            seed: u64::MAX - 1,
            batch_size: 3,
            ..GenerateParams::default()
        };
        let singles = per_image(&params);
        assert_eq!(
            singles.iter().map(|p| p.seed).collect::<Vec<_>>(),
            [u64::MAX - 1, u64::MAX, 0]
        );
        assert!(singles.iter().all(|p| p.batch_size == 1));
    }
}
