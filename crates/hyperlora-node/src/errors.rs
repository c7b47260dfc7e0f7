//! Error mapping at the boundary: engine errors keep their code in a `[CODE] message` prefix that
//! the TypeScript layer turns into `HyperLoraError.code`; panics are caught and become `INTERNAL`.

use std::panic::{catch_unwind, AssertUnwindSafe};

use hyperlora::Error;

pub fn to_napi(err: Error) -> napi::Error {
    napi::Error::from_reason(err.to_string())
}

/// Runs engine work, turning an unwinding panic into an `INTERNAL` error so it never reaches Node.
pub fn guarded<T>(work: impl FnOnce() -> hyperlora::Result<T>) -> napi::Result<T> {
    match catch_unwind(AssertUnwindSafe(work)) {
        Ok(result) => result.map_err(to_napi),
        Err(payload) => {
            let what = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".to_string());
            Err(to_napi(Error::internal(format!("native panic: {what}"))))
        }
    }
}
