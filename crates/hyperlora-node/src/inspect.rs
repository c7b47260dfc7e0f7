//! `inspectWeights`: the index of a safetensors file, off the event loop.

use std::collections::HashMap;
use std::path::PathBuf;

use hyperlora::weights::inspect::{inspect_safetensors, InspectOptions, WeightsIndex};
use napi::bindgen_prelude::{AsyncTask, ClassInstance};
use napi_derive::napi;

use crate::call::{call, Call, CallContext, ProgressCallback};
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

fn index_result(index: WeightsIndex) -> napi::Result<WeightsIndexResult> {
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

/// Reads the tensor index of a `.safetensors` file (memory-mapped; data is not loaded).
#[napi(ts_return_type = "Promise<WeightsIndexResult>")]
pub fn inspect_weights(
    path: String,
    options: Option<InspectWeightsOptions>,
    cancel: Option<ClassInstance<CancelHandle>>,
    #[napi(ts_arg_type = "((event: ProgressEvent | null) => void) | undefined | null")]
    on_progress: Option<ProgressCallback>,
) -> AsyncTask<Call<WeightsIndex, WeightsIndexResult>> {
    let options = InspectOptions {
        sha256: options.and_then(|o| o.sha256).unwrap_or(false),
    };
    call(
        CallContext::new(cancel, on_progress),
        index_result,
        move |cancel, progress| {
            inspect_safetensors(&PathBuf::from(path), options, cancel, progress)
        },
    )
}
