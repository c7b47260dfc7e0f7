//! CLIP: the transformer encoder its towers share, the text tower (SDXL's two text encoders are
//! CLIP text towers) and the vision tower (HyperLoRA's face-crop features).

pub mod encoder;
pub mod text;
pub mod vision;
