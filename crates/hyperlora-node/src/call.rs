//! How every engine call runs: [`call`] makes one async task whose work runs on a libuv worker
//! thread, guarded against panics, with the call's cancel flag and progress callback.
//!
//! Progress reports travel through a thread-safe function, a queue of its own that JavaScript
//! drains on its own schedule, possibly after the promise has settled. So the worker ends every
//! call that has a callback with one last report, `null`, through the same queue: when
//! JavaScript sees it, every report has arrived, and the TypeScript layer settles its promise
//! only then (no polling).

use hyperlora::{CancelToken, Progress};
use napi::bindgen_prelude::{AsyncTask, ClassInstance, ToNapiValue, TypeName};
use napi::threadsafe_function::{ThreadsafeFunction, ThreadsafeFunctionCallMode};
use napi::{Env, Status, Task};
use napi_derive::napi;

use crate::errors::guarded;
use crate::words::Stage;

/// One progress report, as the JavaScript callback receives it.
#[napi(object)]
pub struct ProgressEvent {
    pub stage: Stage,
    pub step: f64,
    pub total_steps: f64,
}

/// The JavaScript callback, callable from any thread: a report, or `null` after the last one.
pub type ProgressCallback =
    ThreadsafeFunction<Option<ProgressEvent>, (), Option<ProgressEvent>, Status, false>;

/// A call's cancellation flag. The TypeScript layer calls `cancel()` from an `AbortSignal`'s abort
/// event.
#[napi]
#[derive(Default)]
pub struct CancelHandle {
    token: CancelToken,
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
}

/// The worker's side of one call: its cancel flag and progress callback.
#[derive(Default)]
pub struct CallContext {
    cancel: CancelToken,
    on_progress: Option<ProgressCallback>,
}

impl CallContext {
    pub fn new(
        handle: Option<ClassInstance<CancelHandle>>,
        on_progress: Option<ProgressCallback>,
    ) -> Self {
        Self {
            cancel: handle.map(|h| h.token.clone()).unwrap_or_default(),
            on_progress,
        }
    }

    fn send(&self, event: Option<ProgressEvent>) {
        if let Some(callback) = &self.on_progress {
            callback.call(event, ThreadsafeFunctionCallMode::NonBlocking);
        }
    }
}

type Work<T> =
    Box<dyn FnOnce(&CancelToken, &mut dyn FnMut(Progress)) -> hyperlora::Result<T> + Send>;

/// One engine call (see the module docs). `to_js` runs on the JavaScript thread.
pub struct Call<T, J> {
    work: Option<Work<T>>,
    context: CallContext,
    to_js: fn(T) -> napi::Result<J>,
}

/// The async task of one call: `work` gets the cancel flag and a progress sink.
pub fn call<T, J>(
    context: CallContext,
    to_js: fn(T) -> napi::Result<J>,
    work: impl FnOnce(&CancelToken, &mut dyn FnMut(Progress)) -> hyperlora::Result<T> + Send + 'static,
) -> AsyncTask<Call<T, J>>
where
    T: Send + 'static,
    J: ToNapiValue + TypeName,
{
    AsyncTask::new(Call {
        work: Some(Box::new(work)),
        context,
        to_js,
    })
}

impl<T, J> Task for Call<T, J>
where
    T: Send + 'static,
    J: ToNapiValue + TypeName,
{
    type Output = T;
    type JsValue = J;

    fn compute(&mut self) -> napi::Result<T> {
        let context = &self.context;
        let result = match self.work.take() {
            Some(work) => guarded(|| {
                work(&context.cancel, &mut |p: Progress| {
                    context.send(Some(ProgressEvent {
                        stage: p.stage.into(),
                        step: p.step as f64,
                        total_steps: p.total as f64,
                    }))
                })
            }),
            None => Err(crate::errors::to_napi(hyperlora::Error::internal(
                "a call ran twice",
            ))),
        };
        context.send(None);
        result
    }

    fn resolve(&mut self, _env: Env, output: T) -> napi::Result<J> {
        (self.to_js)(output)
    }
}
