//! Parity tests: each module loads the committed fixtures of one stage
//! (`tests/fixtures/<stage>/`, made by `scripts/fixtures/<stage>.py`) and the tiny models
//! (`models/tiny/`), runs the engine through its public API and compares with the reference
//! outputs (docs/parity.md). One binary, so the engine is linked once.

#[allow(dead_code)]
mod common;

mod clip_score;
mod clip_vision;
mod controlnet;
mod face;
mod hyperlora;
mod instantid;
mod lora_apply;
mod noise;
mod sdxl_pipeline;
mod sdxl_sampler;
mod sdxl_single_file;
mod sdxl_text;
mod sdxl_tokenizer;
mod sdxl_unet;
mod sdxl_vae;
