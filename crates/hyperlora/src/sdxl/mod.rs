//! SDXL: text encoders, UNet, VAE, samplers and the pipeline.

pub mod text_encoder;
