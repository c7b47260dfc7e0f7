//! Test hooks, only in builds with `--features test-hooks` (`npm run build`, which `npm test`
//! uses; never release builds). They stay out of `index.d.ts`: tests reach them through a cast.
//! The pipeline's hook (`__panicWhileBusyForTests`) lives in `pipeline.rs`, next to the lock it
//! holds.

use napi::bindgen_prelude::AsyncTask;
use napi::{Env, Task};
use napi_derive::napi;

use crate::errors::guarded;

/// Panics inside a worker task so tests can prove panics never cross into Node.
#[napi(js_name = "__panicForTests", skip_typescript)]
pub fn panic_for_tests() -> AsyncTask<PanicTask> {
    AsyncTask::new(PanicTask)
}

pub struct PanicTask;

impl Task for PanicTask {
    type Output = ();
    type JsValue = ();

    fn compute(&mut self) -> napi::Result<()> {
        guarded(|| panic!("injected test panic"))
    }

    fn resolve(&mut self, _env: Env, _: ()) -> napi::Result<()> {
        Ok(())
    }
}
