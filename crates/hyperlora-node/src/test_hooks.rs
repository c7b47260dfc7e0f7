//! Test hooks, only in builds with `--features test-hooks` (`npm run build`, which `npm test`
//! uses; never release builds). They stay out of `index.d.ts`: tests reach them through a cast.

use napi::bindgen_prelude::AsyncTask;
use napi_derive::napi;

use crate::call::{call, Call, CallContext};
use crate::pipeline::{lock, Pipeline};

/// Panics inside a worker task so tests can prove panics never cross into Node.
#[napi(js_name = "__panicForTests", skip_typescript)]
pub fn panic_for_tests() -> AsyncTask<Call<(), ()>> {
    call(CallContext::default(), Ok, |_, _| {
        panic!("injected test panic")
    })
}

/// Panics in a worker while holding `pipeline`'s model (poisoning its lock), so tests can prove
/// the call fails with `INTERNAL` and the model keeps working.
#[napi(js_name = "__panicWhileBusyForTests", skip_typescript)]
pub fn panic_while_busy_for_tests(pipeline: &Pipeline) -> napi::Result<AsyncTask<Call<(), ()>>> {
    let session = pipeline.inner.get()?;
    Ok(call(CallContext::default(), Ok, move |_, _| {
        let _busy = lock(&session);
        panic!("injected test panic while the model is busy")
    }))
}
