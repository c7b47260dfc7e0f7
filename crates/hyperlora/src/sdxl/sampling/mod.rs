//! Samplers and sigma schedules (diffusers' schedulers, A1111 names) and torch-compatible noise.

pub mod noise;
pub mod sampler;
