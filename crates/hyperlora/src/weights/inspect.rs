//! Reads the index of a `.safetensors` file without loading its data, and optionally hashes it.
//!
//! This is the first thing a user's file meets, so every malformed header becomes a
//! `BAD_WEIGHTS` error naming the file rather than a panic or an out-of-bounds read.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::Path;

use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::task::{CancelToken, Progress, ProgressFn, Stage};

/// One tensor's entry in the file header.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// safetensors dtype name: `F32`, `F16`, `BF16`, `I64`, ...
    pub dtype: String,
    pub shape: Vec<usize>,
    /// Byte offset of the data from the start of the file.
    pub offset: usize,
    pub byte_size: usize,
}

/// The tensor index of a safetensors file, in file order.
#[derive(Clone, Debug, PartialEq)]
pub struct WeightsIndex {
    pub file_size: u64,
    pub header_size: u64,
    pub tensors: Vec<TensorInfo>,
    /// The free-form `__metadata__` string map.
    pub metadata: BTreeMap<String, String>,
    /// Lower-case hex SHA-256 of the whole file, when asked for.
    pub sha256: Option<String>,
}

#[derive(Clone, Copy, Debug, Default)]
pub struct InspectOptions {
    /// Also hash the whole file (reads every byte; reports progress and honours cancellation).
    pub sha256: bool,
}

/// Bytes hashed between progress reports and cancellation checks.
const HASH_CHUNK: usize = 16 << 20;

/// Largest element count a shape may describe, zero dimensions left out. A zero-size tensor
/// passes safetensors' size check whatever its other dimensions are, and candle's stride
/// arithmetic overflows on such a shape (a panic); no real weight comes near (SDXL's largest
/// holds 2^25 elements).
const MAX_ELEMENTS: u128 = 1 << 48;

/// Checks one tensor of a safetensors header before its data is read: a shape candle can
/// index and a dtype it can convert to a float type. Everything else the header says (offsets
/// inside the file, byte size matching shape × dtype) the safetensors parser has checked.
pub(crate) fn check_tensor(name: &str, dtype: Dtype, shape: &[usize]) -> Result<()> {
    let count = shape
        .iter()
        .filter(|&&d| d != 0)
        .try_fold(1u128, |n, &d| n.checked_mul(d as u128));
    if count.is_none_or(|n| n > MAX_ELEMENTS) {
        return Err(Error::bad_weights(format!(
            "tensor {name}: shape {shape:?} is too large"
        )));
    }
    // Candle holds the micro-scaling formats as opaque bytes that nothing converts.
    if matches!(
        dtype,
        Dtype::F4 | Dtype::F6_E2M3 | Dtype::F6_E3M2 | Dtype::F8_E8M0
    ) {
        return Err(Error::bad_weights(format!(
            "tensor {name}: dtype {dtype:?} is not supported"
        )));
    }
    Ok(())
}

/// Checks every tensor of a parsed file (see [`check_tensor`]), naming the file.
pub(crate) fn check_tensors<'a>(
    file: &dyn std::fmt::Display,
    tensors: impl IntoIterator<Item = (String, safetensors::tensor::TensorView<'a>)>,
) -> Result<()> {
    for (name, view) in tensors {
        check_tensor(&name, view.dtype(), view.shape()).map_err(|e| e.context(file))?;
    }
    Ok(())
}

/// Checks that `path` is a safetensors file whose every tensor candle can load, for callers
/// that hand the file to candle's own var builder.
pub(crate) fn check_loadable(path: &Path) -> Result<()> {
    inspect_safetensors(
        path,
        InspectOptions::default(),
        &CancelToken::new(),
        &mut |_| {},
    )
    .map(drop)
}

pub fn inspect_safetensors(
    path: &Path,
    options: InspectOptions,
    cancel: &CancelToken,
    progress: ProgressFn<'_>,
) -> Result<WeightsIndex> {
    let name = path.display();
    let file = File::open(path).map_err(|e| Error::from(e).context(&name))?;
    let meta = file.metadata().map_err(|e| Error::from(e).context(&name))?;
    if meta.is_dir() {
        return Err(Error::bad_weights(format!(
            "{name}: is a directory, not a .safetensors file"
        )));
    }
    let file_size = meta.len();
    if file_size < 8 {
        return Err(Error::bad_weights(format!(
            "{name}: {file_size} bytes is too short for a safetensors header"
        )));
    }
    // SAFETY: the map is read-only and dropped before we return; a file truncated underneath us
    // by another process is the one case mmap cannot guard against, as with every mmap loader.
    let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::from(e).context(&name))?;
    let header_size = u64::from_le_bytes(mmap[..8].try_into().expect("8 bytes"));
    if header_size > file_size - 8 {
        return Err(Error::bad_weights(format!(
            "{name}: header claims {header_size} bytes but the file has only {} after the length field",
            file_size - 8
        )));
    }
    let (_, st_meta) = SafeTensors::read_metadata(&mmap[..])
        .map_err(|e| Error::bad_weights(format!("{name}: not a valid safetensors file: {e}")))?;
    for (tensor_name, info) in st_meta.tensors() {
        check_tensor(&tensor_name, info.dtype, &info.shape).map_err(|e| e.context(&name))?;
    }
    let data_start = 8 + header_size as usize;
    let mut tensors: Vec<TensorInfo> = st_meta
        .tensors()
        .into_iter()
        .map(|(tensor_name, info)| TensorInfo {
            name: tensor_name,
            dtype: format!("{:?}", info.dtype),
            shape: info.shape.clone(),
            offset: data_start + info.data_offsets.0,
            byte_size: info.data_offsets.1 - info.data_offsets.0,
        })
        .collect();
    tensors.sort_by_key(|t| t.offset);
    let metadata = st_meta
        .metadata()
        .clone()
        .unwrap_or_default()
        .into_iter()
        .collect();

    let sha256 = if options.sha256 {
        Some(hash(&mmap, cancel, progress)?)
    } else {
        None
    };
    Ok(WeightsIndex {
        file_size,
        header_size,
        tensors,
        metadata,
        sha256,
    })
}

fn hash(bytes: &[u8], cancel: &CancelToken, progress: ProgressFn<'_>) -> Result<String> {
    let total = bytes.len() as u64;
    let mut hasher = Sha256::new();
    let mut done = 0u64;
    for chunk in bytes.chunks(HASH_CHUNK) {
        cancel.check()?;
        hasher.update(chunk);
        done += chunk.len() as u64;
        progress(Progress {
            stage: Stage::Hash,
            step: done,
            total,
        });
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorCode;
    use std::io::Write;

    fn write(name: &str, bytes: &[u8]) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("hyperlora-inspect-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::File::create(&path)
            .unwrap()
            .write_all(bytes)
            .unwrap();
        path
    }

    fn valid_file() -> Vec<u8> {
        let header = br#"{"__metadata__":{"format":"pt"},"b":{"dtype":"F16","shape":[2],"data_offsets":[8,12]},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#;
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header);
        bytes.extend_from_slice(&[0u8; 12]);
        bytes
    }

    fn inspect(path: &Path, sha256: bool) -> Result<WeightsIndex> {
        inspect_safetensors(
            path,
            InspectOptions { sha256 },
            &CancelToken::new(),
            &mut |_| {},
        )
    }

    #[test]
    fn reads_index_in_file_order_with_metadata_and_hash() {
        let path = write("ok.safetensors", &valid_file());
        let index = inspect(&path, true).unwrap();
        let names: Vec<_> = index.tensors.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
        assert_eq!(index.tensors[1].dtype, "F16");
        assert_eq!(index.tensors[1].byte_size, 4);
        assert_eq!(index.metadata["format"], "pt");
        let expected: String = Sha256::digest(valid_file())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(index.sha256.unwrap(), expected);
    }

    #[test]
    fn malformed_files_are_bad_weights() {
        let mut truncated = valid_file();
        truncated.truncate(truncated.len() - 3);
        let mut lying = valid_file();
        lying[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
        let cases = [
            ("truncated.safetensors", truncated),
            ("lying.safetensors", lying),
            (
                "text.safetensors",
                b"this is not a safetensors file at all".to_vec(),
            ),
            ("tiny.safetensors", b"abc".to_vec()),
        ];
        for (name, bytes) in cases {
            let err = inspect(&write(name, &bytes), false).unwrap_err();
            assert_eq!(err.code, ErrorCode::BadWeights, "{name}: {err}");
            assert!(err.message.contains(name), "{err}");
        }
    }

    #[test]
    fn missing_file_is_model_not_found() {
        let err = inspect(Path::new("/nonexistent/model.safetensors"), false).unwrap_err();
        assert_eq!(err.code, ErrorCode::ModelNotFound);
    }

    #[test]
    fn cancelled_hash_is_aborted() {
        let path = write("cancel.safetensors", &valid_file());
        let cancel = CancelToken::new();
        cancel.cancel();
        let err = inspect_safetensors(&path, InspectOptions { sha256: true }, &cancel, &mut |_| {})
            .unwrap_err();
        assert_eq!(err.code, ErrorCode::Aborted);
    }
}
