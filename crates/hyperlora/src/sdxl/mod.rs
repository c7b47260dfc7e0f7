//! SDXL text-to-image: models, samplers and seeded noise, numerically faithful to diffusers.

pub mod prompt;
pub mod tokenizer;
