//! SDXL text-to-image, numerically faithful to diffusers: the networks (`model`), prompt
//! handling and text conditioning (`text`), samplers and seeded noise (`sampling`), and the
//! pipelines that run one request or a batch of requests with different identities.

pub mod batch;
pub mod control;
pub mod model;
pub mod pipeline;
pub mod sampling;
pub mod text;
