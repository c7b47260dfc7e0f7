//! Node.js bindings for the hyperlora engine. Bindings only: types, async tasks, progress
//! callbacks and error mapping; all work happens in the `hyperlora` crate.
//!
//! Every engine call follows one pattern ([`call::call`]): an async task runs the work on a libuv
//! worker thread, a [`CancelHandle`] (wired to an `AbortSignal` by the TypeScript layer) stops it
//! at the next step, progress flows back through a thread-safe function, and any error or panic
//! becomes a rejected promise whose message starts with `[CODE]`.

// napi-derive registers exports only outside `cfg(test)`, so under test everything looks unused;
// the bindings are tested from JavaScript (vitest).
#![cfg_attr(test, allow(dead_code))]

mod call;
mod controlnet;
mod errors;
mod face;
mod identity;
mod inspect;
mod pipeline;
mod refine;
mod resident;
#[cfg(feature = "test-hooks")]
mod test_hooks;
mod words;

pub use call::CancelHandle;

use napi_derive::napi;

/// What this native binary can run on.
#[napi(object)]
pub struct BackendInfo {
    /// Crate version of the native engine.
    pub version: String,
    /// Compiled-in accelerators besides the CPU: `cuda`, `metal`.
    pub features: Vec<String>,
    /// Threads the CPU backend uses.
    pub cpu_threads: u32,
}

#[napi]
pub fn backend_info() -> BackendInfo {
    let mut features = Vec::new();
    if cfg!(feature = "cuda") {
        features.push("cuda".to_string());
    }
    if cfg!(feature = "metal") {
        features.push("metal".to_string());
    }
    BackendInfo {
        version: env!("CARGO_PKG_VERSION").to_string(),
        features,
        cpu_threads: std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
    }
}

/// Every code an engine error can carry (in its `[CODE] message` prefix).
#[napi]
pub fn error_codes() -> Vec<words::ErrorCode> {
    hyperlora::ErrorCode::ALL
        .into_iter()
        .map(words::ErrorCode::from)
        .collect()
}
