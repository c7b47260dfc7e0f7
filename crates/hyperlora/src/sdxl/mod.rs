//! SDXL text-to-image: models, samplers and seeded noise, numerically faithful to diffusers.

pub mod noise;
pub mod sampler;
pub mod text_encoder;
