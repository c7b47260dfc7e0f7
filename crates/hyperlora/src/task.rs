//! What every long engine call takes: a way to be cancelled and a place to report progress.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::error::{Error, Result};

/// Shared cancellation flag. Cloning shares the flag; the engine polls it between steps.
#[derive(Clone, Debug, Default)]
pub struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
    /// `Err(ABORTED)` once cancelled: call it at every step boundary with `?`.
    pub fn check(&self) -> Result<()> {
        if self.is_cancelled() {
            Err(Error::aborted())
        } else {
            Ok(())
        }
    }
}

/// What a long call is doing. The bindings publish these names to JavaScript, so a stage is added
/// here, never spelled out elsewhere.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// Face analysis, photo by photo.
    Face,
    /// Identity creation: CLIP photo by photo, then the hypernetwork as the last step.
    Identity,
    /// Prompt encoding.
    Text,
    /// Denoising, step by step.
    Denoise,
    /// VAE decoding.
    Decode,
    /// The face refine pass: its denoising steps over all faces.
    Refine,
    /// Hashing a weights file.
    Hash,
    /// Scoring pictures (likeness, prompt alignment), picture by picture.
    Score,
}

/// One progress report: which stage, and how far through it.
#[derive(Clone, Debug, PartialEq)]
pub struct Progress {
    pub stage: Stage,
    pub step: u64,
    pub total: u64,
}

/// Receives progress reports; called on the engine's thread, so it must be cheap.
pub type ProgressFn<'a> = &'a mut dyn FnMut(Progress);
