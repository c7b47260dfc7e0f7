//! From a prompt to SDXL's text conditioning: CLIP's tokenizer, A1111 prompt weights and chunks,
//! and the two text encoders side by side.

pub mod encoders;
pub mod prompt;
pub mod tokenizer;
