//! The engine's word lists as JavaScript sees them: napi generates each enum into `index.d.ts` as
//! a union of strings, so TypeScript never spells them out itself. The conversions are
//! exhaustive matches, so the engine and these lists cannot drift apart.

use hyperlora::sdxl::sampling::sampler;
use napi_derive::napi;

/// What a long call is doing. `download` and `loading` are reported by the TypeScript layer
/// (model files fetched, models loaded); the engine reports the others.
#[napi(string_enum)]
pub enum Stage {
    #[napi(value = "download")]
    Download,
    #[napi(value = "loading")]
    Loading,
    /// Face analysis, photo by photo.
    #[napi(value = "face")]
    Face,
    /// Identity creation: CLIP photo by photo, then the hypernetwork as the last step.
    #[napi(value = "identity")]
    Identity,
    /// Prompt encoding.
    #[napi(value = "text")]
    Text,
    /// Denoising, step by step.
    #[napi(value = "denoise")]
    Denoise,
    /// VAE decoding.
    #[napi(value = "decode")]
    Decode,
    /// The face refine pass: its denoising steps over all faces.
    #[napi(value = "refine")]
    Refine,
    /// Hashing a weights file.
    #[napi(value = "hash")]
    Hash,
    /// Scoring pictures (likeness, prompt alignment), picture by picture.
    #[napi(value = "score")]
    Score,
}

impl From<hyperlora::Stage> for Stage {
    fn from(stage: hyperlora::Stage) -> Self {
        match stage {
            hyperlora::Stage::Face => Self::Face,
            hyperlora::Stage::Identity => Self::Identity,
            hyperlora::Stage::Text => Self::Text,
            hyperlora::Stage::Denoise => Self::Denoise,
            hyperlora::Stage::Decode => Self::Decode,
            hyperlora::Stage::Refine => Self::Refine,
            hyperlora::Stage::Hash => Self::Hash,
            hyperlora::Stage::Score => Self::Score,
        }
    }
}

/// Samplers, as diffusers' schedulers of the same names (A1111: Euler, Euler a, DPM++ 2M,
/// DPM++ 2M SDE, DDIM).
#[napi(string_enum)]
#[derive(Clone, Copy)]
pub enum Sampler {
    #[napi(value = "euler")]
    Euler,
    #[napi(value = "euler_ancestral")]
    EulerAncestral,
    #[napi(value = "dpmpp_2m")]
    DpmPp2m,
    #[napi(value = "dpmpp_2m_sde")]
    DpmPp2mSde,
    #[napi(value = "ddim")]
    Ddim,
}

impl From<Sampler> for sampler::Sampler {
    fn from(s: Sampler) -> Self {
        match s {
            Sampler::Euler => Self::Euler,
            Sampler::EulerAncestral => Self::EulerAncestral,
            Sampler::DpmPp2m => Self::DpmPp2m,
            Sampler::DpmPp2mSde => Self::DpmPp2mSde,
            Sampler::Ddim => Self::Ddim,
        }
    }
}

impl From<sampler::Sampler> for Sampler {
    fn from(s: sampler::Sampler) -> Self {
        match s {
            sampler::Sampler::Euler => Self::Euler,
            sampler::Sampler::EulerAncestral => Self::EulerAncestral,
            sampler::Sampler::DpmPp2m => Self::DpmPp2m,
            sampler::Sampler::DpmPp2mSde => Self::DpmPp2mSde,
            sampler::Sampler::Ddim => Self::Ddim,
        }
    }
}

/// How the sampler spaces its noise levels (A1111's "Schedule type").
#[napi(string_enum)]
#[derive(Clone, Copy)]
pub enum SigmaSchedule {
    /// The scheduler's own spacing.
    #[napi(value = "normal")]
    Normal,
    /// Karras et al.'s (rho 7).
    #[napi(value = "karras")]
    Karras,
    #[napi(value = "exponential")]
    Exponential,
}

impl From<SigmaSchedule> for sampler::SigmaSchedule {
    fn from(s: SigmaSchedule) -> Self {
        match s {
            SigmaSchedule::Normal => Self::Normal,
            SigmaSchedule::Karras => Self::Karras,
            SigmaSchedule::Exponential => Self::Exponential,
        }
    }
}

impl From<sampler::SigmaSchedule> for SigmaSchedule {
    fn from(s: sampler::SigmaSchedule) -> Self {
        match s {
            sampler::SigmaSchedule::Normal => Self::Normal,
            sampler::SigmaSchedule::Karras => Self::Karras,
            sampler::SigmaSchedule::Exponential => Self::Exponential,
        }
    }
}

/// The codes engine errors carry, in their `[CODE] message` prefix (`errors.rs`).
#[napi(string_enum)]
pub enum ErrorCode {
    #[napi(value = "BAD_WEIGHTS")]
    BadWeights,
    #[napi(value = "MODEL_NOT_FOUND")]
    ModelNotFound,
    #[napi(value = "INVALID_ARGUMENT")]
    InvalidArgument,
    #[napi(value = "NO_FACE")]
    NoFace,
    #[napi(value = "OUT_OF_MEMORY")]
    OutOfMemory,
    #[napi(value = "ABORTED")]
    Aborted,
    #[napi(value = "IO")]
    Io,
    #[napi(value = "INTERNAL")]
    Internal,
}

impl From<hyperlora::ErrorCode> for ErrorCode {
    fn from(code: hyperlora::ErrorCode) -> Self {
        match code {
            hyperlora::ErrorCode::BadWeights => Self::BadWeights,
            hyperlora::ErrorCode::ModelNotFound => Self::ModelNotFound,
            hyperlora::ErrorCode::InvalidArgument => Self::InvalidArgument,
            hyperlora::ErrorCode::NoFace => Self::NoFace,
            hyperlora::ErrorCode::OutOfMemory => Self::OutOfMemory,
            hyperlora::ErrorCode::Aborted => Self::Aborted,
            hyperlora::ErrorCode::Io => Self::Io,
            hyperlora::ErrorCode::Internal => Self::Internal,
        }
    }
}
