//! PyTorch `.bin`/`.pt` checkpoints (the zip format of `torch.save` since 1.6): `<root>/data.pkl`
//! run by the refusing pickle VM of [`super::pickle`], tensors read from the stored
//! `<root>/data/<key>` entries (little-endian, as `<root>/byteorder` says when present).
//!
//! Returns named tensors like candle's safetensors loaders. Nested dicts become dotted names:
//! InstantID's `ip-adapter.bin`, `{"image_proj": {...}, "ip_adapter": {...}}`, gives
//! `image_proj.latents`, `ip_adapter.1.to_k_ip.weight`, .... Values that are not tensors (an
//! epoch counter, a config string) are skipped.

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

use candle_core::{Device, Tensor};

use super::pickle::{self, StorageRef, TensorRef, Value};
use crate::error::ResultExt;
use crate::{Error, Result};

/// `data.pkl` larger than this is not a state dict.
const MAX_PICKLE_BYTES: u64 = 64 << 20;

/// Reads every tensor of a checkpoint onto `device`, in its stored dtype.
pub fn load(path: impl AsRef<Path>, device: &Device) -> Result<HashMap<String, Tensor>> {
    let path = path.as_ref();
    load_inner(path, device).context(path.display())
}

fn bad(what: impl std::fmt::Display) -> Error {
    Error::bad_weights(what.to_string())
}

fn zip_err(e: zip::result::ZipError) -> Error {
    match e {
        zip::result::ZipError::Io(io) => Error::from(io),
        other => bad(format!("not a torch.save zip archive: {other}")),
    }
}

fn load_inner(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    let file = std::fs::File::open(path)?;
    let file_len = file.metadata()?.len();
    let mut zip = zip::ZipArchive::new(std::io::BufReader::new(file)).map_err(zip_err)?;
    // The root folder is the archive's name ("archive" or the file's stem): the one holding data.pkl.
    let names = zip
        .file_names()
        .map(|n| n.map(|n| n.into_owned()))
        .collect::<zip::result::ZipResult<Vec<String>>>()
        .map_err(zip_err)?;
    let pkl = names
        .iter()
        .find(|n| n.ends_with("/data.pkl") && n.matches('/').count() == 1)
        .ok_or_else(|| bad("no <archive>/data.pkl: not a torch.save zip checkpoint"))?
        .clone();
    let root = pkl.trim_end_matches("data.pkl").to_string();
    if names.contains(&format!("{root}byteorder")) {
        let order = read_entry(&mut zip, &format!("{root}byteorder"), 16)?;
        if order != b"little" {
            return Err(bad("a big-endian checkpoint"));
        }
    }
    let data = read_entry(&mut zip, &pkl, MAX_PICKLE_BYTES.min(file_len))?;
    let object = pickle::load(&data)?;
    let mut refs = Vec::new();
    collect(&object, "", &mut refs)?;
    let mut storages: HashMap<String, Vec<u8>> = HashMap::new();
    let mut out = HashMap::with_capacity(refs.len());
    for (name, t) in refs {
        let s = &t.storage;
        if !storages.contains_key(&s.key) {
            let bytes = read_storage(&mut zip, &root, s, file_len).context(&name)?;
            storages.insert(s.key.clone(), bytes);
        }
        let tensor = build(&t, &storages[&s.key], device).context(&name)?;
        out.insert(name, tensor);
    }
    Ok(out)
}

fn read_entry<R: Read + std::io::Seek>(
    zip: &mut zip::ZipArchive<R>,
    name: &str,
    limit: u64,
) -> Result<Vec<u8>> {
    let entry = zip.by_name(name).map_err(zip_err)?;
    if entry.size() > limit {
        return Err(bad(format!("{name} has {} bytes", entry.size())));
    }
    let mut buf = Vec::with_capacity(entry.size() as usize);
    entry
        .take(limit)
        .read_to_end(&mut buf)
        .map_err(|e| bad(format!("{name}: {e}")))?;
    Ok(buf)
}

fn read_storage<R: Read + std::io::Seek>(
    zip: &mut zip::ZipArchive<R>,
    root: &str,
    s: &StorageRef,
    file_len: u64,
) -> Result<Vec<u8>> {
    let need = s
        .numel
        .checked_mul(s.dtype.size_in_bytes())
        .filter(|&n| (n as u64) <= file_len)
        .ok_or_else(|| bad(format!("storage {} claims {} elements", s.key, s.numel)))?;
    let bytes = read_entry(zip, &format!("{root}data/{}", s.key), file_len)?;
    if bytes.len() < need {
        return Err(bad(format!(
            "storage {} has {} bytes, {need} needed",
            s.key,
            bytes.len()
        )));
    }
    Ok(bytes)
}

/// Dotted names of every tensor under `v`.
fn collect(v: &Value, prefix: &str, out: &mut Vec<(String, TensorRef)>) -> Result<()> {
    match v {
        Value::Tensor(t) => out.push((prefix.to_string(), t.clone())),
        Value::Dict(d) => {
            for (k, v) in &d.items {
                let key = match k {
                    Value::Str(s) => s.clone(),
                    Value::Int(i) => i.to_string(),
                    _ => continue,
                };
                let name = if prefix.is_empty() {
                    key
                } else {
                    format!("{prefix}.{key}")
                };
                collect(v, &name, out)?;
            }
        }
        Value::Storage(_) => return Err(bad(format!("{prefix}: a bare storage"))),
        _ => {}
    }
    Ok(())
}

/// The tensor `t` views in `storage`: offset and strides in elements, gathered when the view is
/// not contiguous.
fn build(t: &TensorRef, storage: &[u8], device: &Device) -> Result<Tensor> {
    let es = t.storage.dtype.size_in_bytes();
    let numel = t
        .shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| bad(format!("size {:?} overflows", t.shape)))?;
    // Last element the view touches.
    let last = t
        .shape
        .iter()
        .zip(&t.stride)
        .try_fold(t.offset, |a, (&d, &s)| {
            if d == 0 {
                Some(a)
            } else {
                a.checked_add((d - 1).checked_mul(s)?)
            }
        })
        .ok_or_else(|| bad("view offsets overflow"))?;
    if numel > 0 && last >= t.storage.numel {
        return Err(bad(format!(
            "size {:?}, stride {:?}, offset {} reach past a storage of {} elements",
            t.shape, t.stride, t.offset, t.storage.numel
        )));
    }
    let contiguous = {
        let mut expect = 1;
        let mut ok = true;
        for (&d, &s) in t.shape.iter().zip(&t.stride).rev() {
            if d != 1 && s != expect {
                ok = false;
            }
            expect *= d;
        }
        ok
    };
    let bytes: std::borrow::Cow<[u8]> = if numel == 0 {
        std::borrow::Cow::Owned(Vec::new())
    } else if contiguous {
        std::borrow::Cow::Borrowed(&storage[t.offset * es..(t.offset + numel) * es])
    } else {
        let mut out = Vec::with_capacity(numel * es);
        let mut idx = vec![0usize; t.shape.len()];
        for _ in 0..numel {
            let at = t.offset + idx.iter().zip(&t.stride).map(|(i, s)| i * s).sum::<usize>();
            out.extend_from_slice(&storage[at * es..(at + 1) * es]);
            for k in (0..idx.len()).rev() {
                idx[k] += 1;
                if idx[k] < t.shape[k] {
                    break;
                }
                idx[k] = 0;
            }
        }
        std::borrow::Cow::Owned(out)
    };
    Ok(Tensor::from_raw_buffer(
        &bytes,
        t.storage.dtype,
        &t.shape,
        device,
    )?)
}
