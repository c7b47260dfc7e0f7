//! SDXL text-to-image: models, tokenizer, sampler and pipeline.

pub mod attention;
pub mod resnet;
pub mod unet;
pub mod vae;
