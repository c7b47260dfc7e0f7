//! `inspectWeights`: the index of a safetensors file, off the event loop.

use std::collections::HashMap;
use std::path::PathBuf;

use hyperlora::weights::inspect::{inspect_safetensors, InspectOptions, WeightsIndex};
use napi::bindgen_prelude::{AsyncTask, ClassInstance};
use napi::{Env, Task};
use napi_derive::napi;

use crate::errors::guarded;
use crate::progress::{CallContext, ProgressCallback};
use crate::CancelHandle;

#[napi(object)]
pub struct TensorEntry {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<f64>,
    pub offset: f64,
    pub byte_size: f64,
}

#[napi(object)]
pub struct WeightsIndexResult {
    pub file_size: f64,
    pub header_size: f64,
    pub tensors: Vec<TensorEntry>,
    pub metadata: HashMap<String, String>,
    pub sha256: Option<String>,
}

#[napi(object)]
pub struct InspectWeightsOptions {
    /// Also compute the SHA-256 of the whole file (reads every byte).
    pub sha256: Option<bool>,
}

pub struct InspectTask {
    path: PathBuf,
    options: InspectOptions,
    call: CallContext,
}

impl Task for InspectTask {
    type Output = WeightsIndex;
    type JsValue = WeightsIndexResult;

    fn compute(&mut self) -> napi::Result<WeightsIndex> {
        let mut report = self.call.reporter();
        guarded(|| inspect_safetensors(&self.path, self.options, &self.call.cancel, &mut report))
    }

    fn resolve(&mut self, _env: Env, index: WeightsIndex) -> napi::Result<WeightsIndexResult> {
        Ok(WeightsIndexResult {
            file_size: index.file_size as f64,
            header_size: index.header_size as f64,
            tensors: index
                .tensors
                .into_iter()
                .map(|t| TensorEntry {
                    name: t.name,
                    dtype: t.dtype,
                    shape: t.shape.into_iter().map(|d| d as f64).collect(),
                    offset: t.offset as f64,
                    byte_size: t.byte_size as f64,
                })
                .collect(),
            metadata: index.metadata.into_iter().collect(),
            sha256: index.sha256,
        })
    }
}

/// Reads the tensor index of a `.safetensors` file (memory-mapped; data is not loaded).
#[napi(ts_return_type = "Promise<WeightsIndexResult>")]
pub fn inspect_weights(
    path: String,
    options: Option<InspectWeightsOptions>,
    cancel: Option<ClassInstance<CancelHandle>>,
    #[napi(ts_arg_type = "((event: ProgressEvent) => void) | undefined | null")]
    on_progress: Option<ProgressCallback>,
) -> AsyncTask<InspectTask> {
    let options = InspectOptions {
        sha256: options.and_then(|o| o.sha256).unwrap_or(false),
    };
    AsyncTask::new(InspectTask {
        path: PathBuf::from(path),
        options,
        call: CallContext::new(cancel, on_progress),
    })
}
