//! A model held by a JavaScript object until `dispose()`. Running tasks hold their own `Arc`, so
//! disposing during a call is safe: the memory goes when the last task using it ends.

use std::sync::{Arc, Mutex, PoisonError};

use hyperlora::Error;

pub struct Resident<T> {
    slot: Mutex<Option<Arc<T>>>,
}

impl<T> Resident<T> {
    pub fn new(value: T) -> Self {
        Self {
            slot: Mutex::new(Some(Arc::new(value))),
        }
    }

    /// The model, or `INVALID_ARGUMENT` once disposed.
    pub fn get(&self) -> napi::Result<Arc<T>> {
        self.slot
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .ok_or_else(|| {
                crate::errors::to_napi(Error::invalid_argument("the model was disposed"))
            })
    }

    pub fn dispose(&self) {
        self.slot
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
    }
}
