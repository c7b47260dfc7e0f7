//! What every async call carries from JavaScript into its worker: the cancel flag and the
//! progress callback, with a count of reports sent so JavaScript can wait for the last ones
//! (thread-safe calls are delivered on their own schedule, possibly after the promise settles).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use hyperlora::{CancelToken, Progress};
use napi::bindgen_prelude::ClassInstance;
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

/// A call's cancellation flag and progress counter, shared with its task. The TypeScript layer
/// calls `cancel()` from an `AbortSignal`'s abort event and reads `progressSent` at the end.
#[napi]
#[derive(Default)]
pub struct CancelHandle {
    token: CancelToken,
    sent: Arc<AtomicU64>,
}

#[napi]
impl CancelHandle {
    #[napi(constructor)]
    pub fn new() -> Self {
        Self::default()
    }

    #[napi]
    pub fn cancel(&self) {
        self.token.cancel();
    }

    #[napi(getter)]
    pub fn cancelled(&self) -> bool {
        self.token.is_cancelled()
    }

    /// Progress reports the task has sent so far.
    #[napi(getter)]
    pub fn progress_sent(&self) -> f64 {
        self.sent.load(Ordering::SeqCst) as f64
    }
}

/// The worker's side of one call.
pub struct CallContext {
    pub cancel: CancelToken,
    sent: Arc<AtomicU64>,
    on_progress: Option<ProgressCallback>,
}

impl CallContext {
    pub fn new(
        handle: Option<ClassInstance<CancelHandle>>,
        on_progress: Option<ProgressCallback>,
    ) -> Self {
        let handle = handle.map(|h| (h.token.clone(), h.sent.clone()));
        let (cancel, sent) = handle.unwrap_or_default();
        Self {
            cancel,
            sent,
            on_progress,
        }
    }

    /// Forwards engine progress to JavaScript without waiting for it (never blocks the worker).
    pub fn reporter(&self) -> impl FnMut(Progress) + '_ {
        move |p| {
            if let Some(cb) = &self.on_progress {
                self.sent.fetch_add(1, Ordering::SeqCst);
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
}
