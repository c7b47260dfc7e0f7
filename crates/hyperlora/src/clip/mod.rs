//! CLIP: the transformer encoder its towers share, the text tower (SDXL's two text encoders are
//! CLIP text towers), the vision tower (HyperLoRA's face-crop features) and their image–text
//! similarity (prompt scores).

pub mod encoder;
pub mod score;
pub mod text;
pub mod vision;
