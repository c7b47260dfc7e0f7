//! SDXL text-to-image: models, samplers and seeded noise, numerically faithful to diffusers;
//! the face refine pass on top.

pub mod attention;
pub mod batch;
pub mod conv;
pub mod noise;
pub mod norm;
pub mod pipeline;
pub mod prompt;
pub mod refine;
pub mod resnet;
pub mod sampler;
pub mod text_encoder;
pub mod tokenizer;
pub mod unet;
pub mod vae;
