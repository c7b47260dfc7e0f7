//! Progress reports from worker threads to a JavaScript callback.

use napi::threadsafe_function::{ThreadsafeFunction, ThreadsafeFunctionCallMode};
use napi::Status;
use napi_derive::napi;

/// One progress report, as the JavaScript callback receives it.
#[napi(object)]
pub struct ProgressEvent {
    pub stage: String,
    pub step: f64,
    pub total: f64,
}

/// The JavaScript `(event) => void` callback, callable from any thread.
pub type ProgressCallback = ThreadsafeFunction<ProgressEvent, (), ProgressEvent, Status, false>;

/// Forwards engine progress to JavaScript without waiting for it (never blocks the worker).
pub fn reporter(callback: Option<&ProgressCallback>) -> impl FnMut(hyperlora::Progress) + '_ {
    move |p| {
        if let Some(cb) = callback {
            cb.call(
                ProgressEvent {
                    stage: p.stage.to_string(),
                    step: p.step as f64,
                    total: p.total as f64,
                },
                ThreadsafeFunctionCallMode::NonBlocking,
            );
        }
    }
}
