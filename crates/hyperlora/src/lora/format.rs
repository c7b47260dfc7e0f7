//! The kohya LoRA file format, as HyperLoRA writes it and ComfyUI / A1111 / diffusers read it.
//!
//! One module (a linear layer) is three tensors in a `.safetensors` file:
//! `{module}.lora_down.weight` `[rank, in]`, `{module}.lora_up.weight` `[out, rank]` and
//! `{module}.alpha` (a 0-d f32 scalar); the layer's update is
//! `W' = W + weight · (alpha / rank) · (lora_up @ lora_down)`. Module names are kohya names:
//! `lora_unet_` + the diffusers module path with `.` replaced by `_`
//! (`lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_out_0`), as the HyperLoRA
//! ComfyUI nodes produce them (`{hyper_lora_modules.json key}_{to_q|to_k|to_v|to_out_0}`).
//!
//! Convolution LoRAs (LoCon: `lora_down` `[rank, in, kh, kw]`, `lora_up` `[out, rank, 1, 1]`) are
//! accepted too. Reading LoRA files in other layouts (SGM names, PEFT, old diffusers) for
//! application is [`super::names`]'s job.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::{DType, Device, Tensor};
use memmap2::Mmap;
use safetensors::SafeTensors;

use crate::weights::inspect::check_tensors;
use crate::{Error, ErrorCode, Result};

/// Metadata key listing the module names in their original order (a JSON array), so that a
/// saved LoRA loads back in the hypernetwork's module order (safetensors sorts tensor names).
pub const META_MODULE_ORDER: &str = "hyperlora_module_order";
/// Metadata key holding the crate version that wrote the file.
pub const META_VERSION: &str = "hyperlora_version";

/// One module's low-rank update.
#[derive(Debug, Clone)]
pub struct LoraWeights {
    /// `[rank, in]` (or `[rank, in, kh, kw]` for a convolution).
    pub down: Tensor,
    /// `[out, rank]` (or `[out, rank, 1, 1]`).
    pub up: Tensor,
    /// The update is scaled by `alpha / rank`.
    pub alpha: f32,
}

impl LoraWeights {
    pub fn rank(&self) -> usize {
        self.down.dims()[0]
    }

    /// `alpha / rank`.
    pub fn scale(&self) -> f32 {
        self.alpha / self.rank() as f32
    }

    fn validate(&self, name: &str) -> Result<()> {
        let (d, u) = (self.down.dims(), self.up.dims());
        let ok = match (d.len(), u.len()) {
            (2, 2) => u[1] == d[0],
            (4, 4) => u[1] == d[0] && u[2] == 1 && u[3] == 1,
            _ => false,
        };
        if !ok || d[0] == 0 {
            return Err(Error::bad_weights(format!(
                "LoRA module {name}: lora_down {d:?} and lora_up {u:?} are not a [rank, in] / [out, rank] pair"
            )));
        }
        if !self.alpha.is_finite() {
            return Err(Error::bad_weights(format!(
                "LoRA module {name}: alpha {} is not finite",
                self.alpha
            )));
        }
        Ok(())
    }
}

/// A kohya-format LoRA: module name → update, in insertion order, plus free-form metadata
/// (`__metadata__` of the file).
#[derive(Debug, Clone, Default)]
pub struct KohyaLora {
    modules: Vec<(String, LoraWeights)>,
    index: HashMap<String, usize>,
    pub metadata: BTreeMap<String, String>,
}

impl KohyaLora {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces, keeping its position) a module. `name` is the kohya module name
    /// without the `.lora_down.weight` suffix.
    pub fn insert(&mut self, name: impl Into<String>, weights: LoraWeights) -> Result<()> {
        let name = name.into();
        if name.is_empty() || name.contains('.') {
            return Err(Error::invalid_argument(format!(
                "kohya LoRA module names have no dots, got {name:?}"
            )));
        }
        weights.validate(&name)?;
        match self.index.get(&name) {
            Some(&i) => self.modules[i].1 = weights,
            None => {
                self.index.insert(name.clone(), self.modules.len());
                self.modules.push((name, weights));
            }
        }
        Ok(())
    }

    pub fn get(&self, name: &str) -> Option<&LoraWeights> {
        self.index.get(name).map(|&i| &self.modules[i].1)
    }

    pub fn len(&self) -> usize {
        self.modules.len()
    }

    pub fn is_empty(&self) -> bool {
        self.modules.is_empty()
    }

    /// Modules in order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &LoraWeights)> {
        self.modules.iter().map(|(n, w)| (n.as_str(), w))
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.modules.iter().map(|(n, _)| n.as_str())
    }

    /// The common rank, when every module has the same one.
    pub fn rank(&self) -> Option<usize> {
        let mut ranks = self.modules.iter().map(|(_, w)| w.rank());
        let first = ranks.next()?;
        ranks.all(|r| r == first).then_some(first)
    }

    /// Number of parameters (down + up elements).
    pub fn num_parameters(&self) -> usize {
        self.modules
            .iter()
            .map(|(_, w)| w.down.elem_count() + w.up.elem_count())
            .sum()
    }

    fn map_tensors(&self, f: impl Fn(&Tensor) -> candle_core::Result<Tensor>) -> Result<Self> {
        let mut out = Self {
            metadata: self.metadata.clone(),
            ..Self::default()
        };
        for (name, w) in &self.modules {
            out.insert(
                name.clone(),
                LoraWeights {
                    down: f(&w.down)?,
                    up: f(&w.up)?,
                    alpha: w.alpha,
                },
            )?;
        }
        Ok(out)
    }

    pub fn to_dtype(&self, dtype: DType) -> Result<Self> {
        self.map_tensors(|t| t.to_dtype(dtype))
    }

    pub fn to_device(&self, device: &Device) -> Result<Self> {
        self.map_tensors(|t| t.to_device(device))
    }

    /// `(1 − t)·a + t·b` on every `lora_down` and every `lora_up` separately (same modules, shapes
    /// and alphas required; computed in f32, returned in `a`'s dtype).
    ///
    /// For two HyperLoRA outputs this is exactly the LoRA of the interpolated hypernetwork
    /// coefficients: `lora_down` and `lora_up` are each linear in their coefficient token
    /// (`Σ c[i]·basis[i]`), so the result stays inside the span of the learned bases, whereas
    /// interpolating the products `up @ down` would leave it (and double the rank).
    pub fn lerp(a: &Self, b: &Self, t: f64) -> Result<Self> {
        if !t.is_finite() {
            return Err(Error::invalid_argument(format!(
                "interpolation factor {t} is not finite"
            )));
        }
        if a.len() != b.len() {
            return Err(Error::invalid_argument(format!(
                "cannot interpolate LoRAs with {} and {} modules",
                a.len(),
                b.len()
            )));
        }
        let mut out = Self {
            metadata: a.metadata.clone(),
            ..Self::default()
        };
        for (name, wa) in a.iter() {
            let wb = b.get(name).ok_or_else(|| {
                Error::invalid_argument(format!(
                    "cannot interpolate: module {name} is missing from the second LoRA"
                ))
            })?;
            if wa.down.dims() != wb.down.dims()
                || wa.up.dims() != wb.up.dims()
                || wa.alpha != wb.alpha
            {
                return Err(Error::invalid_argument(format!(
                    "cannot interpolate module {name}: shapes {:?}/{:?} (alpha {}) vs {:?}/{:?} (alpha {})",
                    wa.down.dims(),
                    wa.up.dims(),
                    wa.alpha,
                    wb.down.dims(),
                    wb.up.dims(),
                    wb.alpha
                )));
            }
            let mix = |x: &Tensor, y: &Tensor| -> Result<Tensor> {
                let dtype = x.dtype();
                let x32 = x.to_dtype(DType::F32)?;
                let y32 = y.to_device(x.device())?.to_dtype(DType::F32)?;
                Ok(((x32 * (1.0 - t))? + (y32 * t)?)?.to_dtype(dtype)?)
            };
            out.insert(
                name,
                LoraWeights {
                    down: mix(&wa.down, &wb.down)?,
                    up: mix(&wa.up, &wb.up)?,
                    alpha: wa.alpha,
                },
            )?;
        }
        Ok(out)
    }

    /// The file's tensors: `{name}.lora_down.weight`, `{name}.lora_up.weight` (module dtype, on
    /// the CPU, contiguous) and `{name}.alpha` (0-d f32), in module order.
    pub fn tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::with_capacity(self.modules.len() * 3);
        for (name, w) in &self.modules {
            out.push((
                format!("{name}.lora_down.weight"),
                w.down.to_device(&Device::Cpu)?.contiguous()?,
            ));
            out.push((
                format!("{name}.lora_up.weight"),
                w.up.to_device(&Device::Cpu)?.contiguous()?,
            ));
            out.push((format!("{name}.alpha"), Tensor::new(w.alpha, &Device::Cpu)?));
        }
        Ok(out)
    }

    /// The `__metadata__` written by [`KohyaLora::save`]: `self.metadata`, plus (unless already
    /// set) kohya's `ss_network_module` / `ss_network_dim` / `ss_network_alpha`, our version and
    /// the module order.
    pub fn file_metadata(&self) -> BTreeMap<String, String> {
        let mut meta = self.metadata.clone();
        let mut set = |k: &str, v: String| {
            meta.entry(k.to_string()).or_insert(v);
        };
        set("ss_network_module", "networks.lora".into());
        if let Some(rank) = self.rank() {
            set("ss_network_dim", rank.to_string());
            let alphas: Vec<f32> = self.modules.iter().map(|(_, w)| w.alpha).collect();
            if alphas.windows(2).all(|p| p[0] == p[1]) && !alphas.is_empty() {
                set("ss_network_alpha", format_alpha(alphas[0]));
            }
        }
        set(META_VERSION, env!("CARGO_PKG_VERSION").into());
        let order: Vec<&str> = self.names().collect();
        meta.insert(
            META_MODULE_ORDER.into(),
            serde_json::to_string(&order).expect("strings serialise"),
        );
        meta
    }

    /// The complete `.safetensors` file as bytes. Deterministic: the same LoRA always gives
    /// the same bytes (metadata keys sorted; data in module order, alphas first so every tensor
    /// stays aligned to its element size).
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        if self.is_empty() {
            return Err(Error::invalid_argument("cannot save an empty LoRA"));
        }
        serialize_safetensors(&self.tensors()?, &self.file_metadata())
    }

    /// Writes a `.safetensors` file atomically: a temporary file in the same folder, flushed to
    /// disk, then renamed over `path`. A failure never leaves a half-written `path`.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let bytes = self.to_bytes()?;
        write_atomically(path, &bytes)
    }

    /// Reads a kohya LoRA file (strictly: only `lora_down` / `lora_up` / `alpha` keys of kohya
    /// module names). For arbitrary LoRA files use [`super::names::read_lora_file`].
    pub fn load(path: impl AsRef<Path>, device: &Device) -> Result<Self> {
        let path = path.as_ref();
        let (tensors, metadata) = read_safetensors(path, device)?;
        Self::from_tensors(tensors, metadata).map_err(|e| e.context(path.display()))
    }

    /// Builds a LoRA from kohya-keyed tensors. A missing `.alpha` means `alpha = rank` (scale 1),
    /// as kohya's loaders do. Module order: the `hyperlora_module_order` metadata when it lists
    /// exactly these modules, else sorted by name.
    pub fn from_tensors(
        tensors: impl IntoIterator<Item = (String, Tensor)>,
        metadata: BTreeMap<String, String>,
    ) -> Result<Self> {
        let mut parts: BTreeMap<String, [Option<Tensor>; 3]> = BTreeMap::new();
        for (key, t) in tensors {
            let (name, slot) = if let Some(n) = key.strip_suffix(".lora_down.weight") {
                (n, 0)
            } else if let Some(n) = key.strip_suffix(".lora_up.weight") {
                (n, 1)
            } else if let Some(n) = key.strip_suffix(".alpha") {
                (n, 2)
            } else {
                return Err(Error::bad_weights(format!(
                    "tensor {key} is not a kohya LoRA key (.lora_down.weight / .lora_up.weight / .alpha)"
                )));
            };
            parts.entry(name.to_string()).or_default()[slot] = Some(t);
        }
        let order: Vec<String> = metadata
            .get(META_MODULE_ORDER)
            .and_then(|s| serde_json::from_str::<Vec<String>>(s).ok())
            .filter(|o| {
                o.len() == parts.len()
                    && o.iter().all(|n| parts.contains_key(n))
                    && o.iter().collect::<std::collections::HashSet<_>>().len() == o.len()
            })
            .unwrap_or_else(|| parts.keys().cloned().collect());
        let mut lora = Self {
            metadata,
            ..Self::default()
        };
        for name in order {
            let [down, up, alpha] = parts.remove(&name).expect("order lists known modules");
            let down = down.ok_or_else(|| {
                Error::bad_weights(format!("module {name} has no {name}.lora_down.weight"))
            })?;
            let up = up.ok_or_else(|| {
                Error::bad_weights(format!("module {name} has no {name}.lora_up.weight"))
            })?;
            let alpha = match alpha {
                Some(a) => scalar(&a).map_err(|e| e.context(format!("{name}.alpha")))?,
                None => down.dims().first().copied().unwrap_or(0) as f32,
            };
            // Merged into the model, one infinite or NaN value would blank every picture.
            for (part, t) in [("lora_down", &down), ("lora_up", &up)] {
                if !all_finite(t)? {
                    return Err(Error::bad_weights(format!(
                        "{name}.{part}.weight holds infinite or NaN values"
                    )));
                }
            }
            lora.insert(name, LoraWeights { down, up, alpha })?;
        }
        if lora.is_empty() {
            return Err(Error::bad_weights("the file holds no LoRA modules"));
        }
        Ok(lora)
    }
}

fn format_alpha(a: f32) -> String {
    if a.fract() == 0.0 && a.abs() < 1e7 {
        format!("{a:.1}")
    } else {
        a.to_string()
    }
}

/// Whether every value of a (float) tensor is finite; integer tensors always are.
pub(crate) fn all_finite(t: &Tensor) -> Result<bool> {
    if !t.dtype().is_float() {
        return Ok(true);
    }
    let values = t.flatten_all()?.to_dtype(DType::F32)?;
    Ok(values.to_vec1::<f32>()?.iter().all(|v| v.is_finite()))
}

/// A one-element tensor (`[]` or `[1]`, any float dtype) as f32.
pub(crate) fn scalar(t: &Tensor) -> Result<f32> {
    if t.elem_count() != 1 {
        return Err(Error::bad_weights(format!(
            "expected a scalar, got shape {:?}",
            t.dims()
        )));
    }
    Ok(t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?[0])
}

/// Serialises tensors (CPU) and metadata as a `.safetensors` file, deterministically: entries
/// are stably ordered by decreasing element size (so each tensor's data is aligned to its
/// element size), then by their order in `tensors`; JSON keys are sorted.
pub(crate) fn serialize_safetensors(
    tensors: &[(String, Tensor)],
    metadata: &BTreeMap<String, String>,
) -> Result<Vec<u8>> {
    let mut order: Vec<usize> = (0..tensors.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(tensors[i].1.dtype().size_in_bytes()));
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        header.insert(
            "__metadata__".into(),
            serde_json::to_value(metadata).expect("strings"),
        );
    }
    let mut data: Vec<u8> = Vec::new();
    for &i in &order {
        let (name, t) = &tensors[i];
        if name == "__metadata__" || header.contains_key(name) {
            return Err(Error::invalid_argument(format!(
                "duplicate or reserved tensor name {name}"
            )));
        }
        let dtype: safetensors::Dtype = t.dtype().into();
        let bytes = <Tensor as safetensors::View>::data(t);
        let start = data.len();
        data.extend_from_slice(&bytes);
        header.insert(
            name.clone(),
            serde_json::json!({
                "dtype": dtype,
                "shape": t.dims(),
                "data_offsets": [start, data.len()],
            }),
        );
    }
    let mut json = serde_json::to_vec(&serde_json::Value::Object(header))
        .map_err(|e| Error::internal(format!("cannot serialise a safetensors header: {e}")))?;
    while json.len() % 8 != 0 {
        json.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + json.len() + data.len());
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    out.extend_from_slice(&data);
    Ok(out)
}

/// A file's tensors in file order, and its `__metadata__`.
pub type SafetensorsContents = (Vec<(String, Tensor)>, BTreeMap<String, String>);

/// Reads every tensor of a `.safetensors` file in file (offset) order, plus its metadata.
/// A missing file is `MODEL_NOT_FOUND`; an unreadable or malformed one is `BAD_WEIGHTS`.
/// (candle's loader gives a map, losing the order and the metadata.)
pub fn read_safetensors(path: &Path, device: &Device) -> Result<SafetensorsContents> {
    use candle_core::safetensors::Load;

    let name = path.display();
    let file = File::open(path).map_err(|e| Error::from(e).context(&name))?;
    if file.metadata().map(|m| m.is_dir()).unwrap_or(false) {
        return Err(Error::bad_weights(format!(
            "{name}: is a directory, not a .safetensors file"
        )));
    }
    // SAFETY: read-only map dropped before returning; tensors are copied out of it.
    let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::from(e).context(&name))?;
    let st = SafeTensors::deserialize(&mmap)
        .map_err(|e| Error::bad_weights(format!("{name}: not a valid safetensors file: {e}")))?;
    let (_, header) = SafeTensors::read_metadata(&mmap)
        .map_err(|e| Error::bad_weights(format!("{name}: not a valid safetensors file: {e}")))?;
    let metadata: BTreeMap<String, String> = header
        .metadata()
        .clone()
        .unwrap_or_default()
        .into_iter()
        .collect();
    let mut views = st.tensors();
    check_tensors(&name, views.iter().map(|(k, v)| (k.clone(), v.clone())))?;
    views.sort_by_key(|(_, v)| v.data().as_ptr() as usize);
    let mut out = Vec::with_capacity(views.len());
    for (key, view) in views {
        let t = view
            .load(device)
            .map_err(|e| Error::bad_weights(format!("{name}: cannot read tensor {key}: {e}")))?;
        out.push((key, t));
    }
    Ok((out, metadata))
}

static TMP_COUNTER: AtomicUsize = AtomicUsize::new(0);

/// Writes `bytes` to a temporary sibling of `path`, syncs it, then renames it over `path`.
pub(crate) fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let io = |what: &str, e: std::io::Error| {
        Error::new(
            ErrorCode::Io,
            format!("cannot {what} {}: {e}", path.display()),
        )
    };
    let file_name = path
        .file_name()
        .ok_or_else(|| Error::invalid_argument(format!("{} is not a file path", path.display())))?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let tmp = dir.join(format!(
        ".{}.tmp-{}-{}",
        file_name.to_string_lossy(),
        std::process::id(),
        TMP_COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let result = (|| {
        let mut f = File::create(&tmp).map_err(|e| io("create a temporary file beside", e))?;
        f.write_all(bytes).map_err(|e| io("write", e))?;
        f.sync_all().map_err(|e| io("flush", e))?;
        drop(f);
        std::fs::rename(&tmp, path).map_err(|e| io("rename the temporary file to", e))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, tmp_dir};

    fn small(seed: f32) -> KohyaLora {
        let dev = Device::Cpu;
        let mut l = KohyaLora::new();
        for (i, name) in ["lora_unet_b_to_q", "lora_unet_a_to_k"].iter().enumerate() {
            let down = (Tensor::arange(0f32, 8., &dev)
                .unwrap()
                .reshape((2, 4))
                .unwrap()
                * (seed + i as f32) as f64)
                .unwrap();
            let up = (Tensor::arange(0f32, 6., &dev)
                .unwrap()
                .reshape((3, 2))
                .unwrap()
                - seed as f64)
                .unwrap();
            l.insert(
                *name,
                LoraWeights {
                    down,
                    up,
                    alpha: 1.0,
                },
            )
            .unwrap();
        }
        l
    }

    #[test]
    fn save_load_is_bit_identical_and_keeps_order() {
        let dir = tmp_dir("kohya-rt");
        let path = dir.join("id.safetensors");
        let lora = small(0.5).to_dtype(DType::F16).unwrap();
        lora.save(&path).unwrap();
        let back = KohyaLora::load(&path, &Device::Cpu).unwrap();
        assert_eq!(
            back.names().collect::<Vec<_>>(),
            ["lora_unet_b_to_q", "lora_unet_a_to_k"]
        );
        for ((n1, w1), (n2, w2)) in lora.iter().zip(back.iter()) {
            assert_eq!(n1, n2);
            assert_eq!(w2.down.dtype(), DType::F16);
            assert_eq!(w1.alpha.to_bits(), w2.alpha.to_bits());
            for (a, b) in [(&w1.down, &w2.down), (&w1.up, &w2.up)] {
                // f16 -> f32 is exact, so equal f32 bits mean equal f16 bits.
                let bits = |t: &Tensor| -> Vec<u32> {
                    let v = t.flatten_all().unwrap().to_dtype(DType::F32).unwrap();
                    v.to_vec1::<f32>()
                        .unwrap()
                        .iter()
                        .map(|x| x.to_bits())
                        .collect()
                };
                assert_eq!(bits(a), bits(b));
            }
        }
        // Saving what was loaded reproduces the file byte for byte.
        let path2 = dir.join("again.safetensors");
        back.save(&path2).unwrap();
        assert_eq!(
            std::fs::read(&path).unwrap(),
            std::fs::read(&path2).unwrap()
        );
        assert_eq!(back.metadata["ss_network_module"], "networks.lora");
        assert_eq!(back.metadata["ss_network_dim"], "2");
        assert_eq!(back.metadata["ss_network_alpha"], "1.0");
        // No temporary files are left behind.
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(names.iter().all(|n| !n.contains(".tmp-")), "{names:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn failed_save_leaves_nothing() {
        let dir = tmp_dir("kohya-fail");
        let missing = dir.join("no/such/dir/x.safetensors");
        let err = small(1.0).save(&missing).unwrap_err();
        assert_eq!(err.code, ErrorCode::Io, "{err}");
        // Saving over an existing file replaces it whole.
        let path = dir.join("x.safetensors");
        std::fs::write(&path, b"old").unwrap();
        small(1.0).save(&path).unwrap();
        assert!(KohyaLora::load(&path, &Device::Cpu).is_ok());
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn lerp_interpolates_down_and_up() {
        let a = small(1.0);
        let b = small(3.0);
        let mid = KohyaLora::lerp(&a, &b, 0.25).unwrap();
        let w = mid.get("lora_unet_b_to_q").unwrap();
        let expect = ((&a.get("lora_unet_b_to_q").unwrap().down * 0.75).unwrap()
            + (&b.get("lora_unet_b_to_q").unwrap().down * 0.25).unwrap())
        .unwrap();
        assert_close("lerp down", &w.down, &expect, 1e-6);
        assert_close(
            "lerp t=0",
            &KohyaLora::lerp(&a, &b, 0.0)
                .unwrap()
                .get("lora_unet_a_to_k")
                .unwrap()
                .up,
            &a.get("lora_unet_a_to_k").unwrap().up,
            0.0,
        );
        let mut c = small(1.0);
        c.insert(
            "lora_unet_extra_to_v",
            a.get("lora_unet_b_to_q").unwrap().clone(),
        )
        .unwrap();
        assert_eq!(
            KohyaLora::lerp(&a, &c, 0.5).unwrap_err().code,
            ErrorCode::InvalidArgument
        );
    }

    #[test]
    fn rejects_malformed_modules() {
        let dev = Device::Cpu;
        let down = Tensor::zeros((2, 4), DType::F32, &dev).unwrap();
        let up = Tensor::zeros((3, 5), DType::F32, &dev).unwrap();
        let mut l = KohyaLora::new();
        let err = l
            .insert(
                "lora_unet_x",
                LoraWeights {
                    down: down.clone(),
                    up,
                    alpha: 1.0,
                },
            )
            .unwrap_err();
        assert_eq!(err.code, ErrorCode::BadWeights);
        assert!(err.message.contains("lora_unet_x"), "{err}");
        let only_down = vec![("m.lora_down.weight".to_string(), down)];
        let err = KohyaLora::from_tensors(only_down, BTreeMap::new()).unwrap_err();
        assert!(err.message.contains("m.lora_up.weight"), "{err}");
        let stray = vec![(
            "m.hada_w1_a".to_string(),
            Tensor::zeros(2, DType::F32, &dev).unwrap(),
        )];
        assert_eq!(
            KohyaLora::from_tensors(stray, BTreeMap::new())
                .unwrap_err()
                .code,
            ErrorCode::BadWeights
        );
    }
}
