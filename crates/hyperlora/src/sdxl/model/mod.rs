//! SDXL's networks: the UNet with its blocks, and the VAE.

pub mod attention;
pub mod controlnet;
pub mod conv;
pub mod norm;
pub mod resnet;
pub mod unet;
pub mod vae;
