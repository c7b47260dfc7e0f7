//! Diffusers folders: `unet/`, `vae/`, `text_encoder/`, `text_encoder_2/` (plus `tokenizer*/`,
//! `scheduler/`), each with a `config.json` and safetensors weights, possibly as an fp16 `variant`
//! (`model.fp16.safetensors`) or sharded (`*.safetensors.index.json`). Also the Hugging Face cache
//! layout (`models--org--name/snapshots/<rev>/`), by path logic only.
//!
//! A component opens as a [`candle_nn::VarBuilder`] serving the published diffusers/transformers
//! names, memory-mapped: each tensor is read from the mapping when the model asks for it and
//! converted to the builder's dtype.

use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

use crate::error::ResultExt;
use crate::weights::inspect::check_tensors;
use crate::{Error, Result};

/// The weighted components of an SDXL pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Component {
    Unet,
    Vae,
    /// CLIP ViT-L/14 text (`CLIPTextModel`).
    TextEncoder,
    /// OpenCLIP ViT-bigG/14 text (`CLIPTextModelWithProjection`).
    TextEncoder2,
}

impl Component {
    pub const ALL: [Component; 4] = [Self::Unet, Self::Vae, Self::TextEncoder, Self::TextEncoder2];

    /// The folder of a diffusers pipeline holding this component.
    pub fn subfolder(self) -> &'static str {
        match self {
            Self::Unet => "unet",
            Self::Vae => "vae",
            Self::TextEncoder => "text_encoder",
            Self::TextEncoder2 => "text_encoder_2",
        }
    }

    /// File name stem of the weights: diffusers models vs transformers models.
    pub fn weights_stem(self) -> &'static str {
        match self {
            Self::Unet | Self::Vae => "diffusion_pytorch_model",
            Self::TextEncoder | Self::TextEncoder2 => "model",
        }
    }

    /// Key prefix of this component in a single-file SGM checkpoint.
    pub fn sgm_prefix(self) -> &'static str {
        match self {
            Self::Unet => "model.diffusion_model.",
            Self::Vae => "first_stage_model.",
            Self::TextEncoder => "conditioner.embedders.0.transformer.",
            Self::TextEncoder2 => "conditioner.embedders.1.model.",
        }
    }
}

impl fmt::Display for Component {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.subfolder())
    }
}

/// Turns a Hugging Face cache repository folder (`.../models--org--name`, holding `refs/` and
/// `snapshots/`) into its snapshot folder: the revision named by `refs/main`, else the only
/// snapshot. Any other path is returned unchanged.
pub fn resolve_hf_cache(path: &Path) -> Result<PathBuf> {
    let snapshots = path.join("snapshots");
    if !snapshots.is_dir() {
        return Ok(path.to_path_buf());
    }
    if let Ok(rev) = std::fs::read_to_string(path.join("refs").join("main")) {
        let dir = snapshots.join(rev.trim());
        if dir.is_dir() {
            return Ok(dir);
        }
    }
    let mut revs: Vec<PathBuf> = std::fs::read_dir(&snapshots)
        .context(snapshots.display())?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    match revs.len() {
        1 => Ok(revs.remove(0)),
        0 => Err(Error::model_not_found(format!("{}: the cache holds no snapshot", path.display()))),
        n => Err(Error::model_not_found(format!(
            "{}: {n} snapshots and no refs/main naming one of them; pass the snapshot folder itself",
            path.display()
        ))),
    }
}

/// A diffusers pipeline folder (`model_index.json`, `unet/`, `vae/`, ...).
#[derive(Debug, Clone)]
pub struct DiffusersModel {
    root: PathBuf,
}

impl DiffusersModel {
    /// Opens a pipeline folder, or a Hugging Face cache repository folder holding one.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        if !path.exists() {
            return Err(Error::model_not_found(format!(
                "{}: no such folder",
                path.display()
            )));
        }
        let root = resolve_hf_cache(path)?;
        if !root.is_dir() {
            return Err(Error::model_not_found(format!(
                "{}: not a folder",
                root.display()
            )));
        }
        if !root.join("model_index.json").is_file() && !root.join("unet").is_dir() {
            return Err(Error::model_not_found(format!(
                "{}: not a diffusers folder (no model_index.json and no unet/)",
                root.display()
            )));
        }
        Ok(Self { root })
    }

    /// The (resolved) pipeline folder.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// A folder of the pipeline that holds no weights (`tokenizer`, `tokenizer_2`, `scheduler`).
    pub fn subfolder(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    pub fn has(&self, component: Component) -> bool {
        self.root.join(component.subfolder()).is_dir()
    }

    /// Finds a component's config and weight files; `variant` (e.g. `Some("fp16")`) is preferred
    /// when present, see [`ComponentFiles::locate`].
    pub fn component(&self, component: Component, variant: Option<&str>) -> Result<ComponentFiles> {
        let dir = self.root.join(component.subfolder());
        if !dir.is_dir() {
            return Err(Error::model_not_found(format!(
                "{}: no {}/ folder in this diffusers model",
                self.root.display(),
                component.subfolder()
            )));
        }
        ComponentFiles::locate(dir, component, variant)
    }

    /// The component's weights under their diffusers/transformers names, converted to `dtype`.
    pub fn var_builder(
        &self,
        component: Component,
        variant: Option<&str>,
        dtype: DType,
        device: &Device,
    ) -> Result<VarBuilder<'static>> {
        self.component(component, variant)?
            .var_builder(dtype, device)
    }
}

/// The files of one component folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ComponentFiles {
    pub component: Component,
    pub dir: PathBuf,
    /// `config.json` (diffusers model config or transformers config).
    pub config: PathBuf,
    /// One file, or the shards of a `*.safetensors.index*.json`.
    pub weights: Vec<PathBuf>,
}

impl ComponentFiles {
    /// Finds the files of a component folder (also a standalone one, such as a separately
    /// distributed VAE). Weights, first found wins, with `stem` = `diffusion_pytorch_model` or
    /// `model`: with a variant `v`, `stem.v.safetensors` then `stem.safetensors.index.v.json`;
    /// then `stem.safetensors`, `stem.safetensors.index.json`; then, without a variant asked
    /// for, `stem.fp16.safetensors` and its index; then any other `stem.*.safetensors`
    /// (alphabetically). Only safetensors are read; pickles are reported as such.
    pub fn locate(
        dir: impl AsRef<Path>,
        component: Component,
        variant: Option<&str>,
    ) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        if !dir.is_dir() {
            return Err(Error::model_not_found(format!(
                "{}: no such folder",
                dir.display()
            )));
        }
        let config = dir.join("config.json");
        if !config.is_file() {
            return Err(Error::model_not_found(format!(
                "{}: missing",
                config.display()
            )));
        }
        let stem = component.weights_stem();
        let mut variants: Vec<String> = variant.map(str::to_string).into_iter().collect();
        variants.push(String::new());
        if variant.is_none() {
            variants.push("fp16".into());
        }
        let mut others: Vec<String> = std::fs::read_dir(&dir)
            .context(dir.display())?
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter_map(|n| {
                Some(
                    n.strip_prefix(stem)?
                        .strip_prefix('.')?
                        .strip_suffix(".safetensors")?
                        .to_string(),
                )
            })
            .filter(|v| !v.is_empty() && !v.contains('.'))
            .collect();
        others.sort();
        variants.extend(others);
        for v in &variants {
            let (single, index) = if v.is_empty() {
                (
                    format!("{stem}.safetensors"),
                    format!("{stem}.safetensors.index.json"),
                )
            } else {
                (
                    format!("{stem}.{v}.safetensors"),
                    format!("{stem}.safetensors.index.{v}.json"),
                )
            };
            if dir.join(&single).is_file() {
                return Ok(Self {
                    component,
                    dir: dir.clone(),
                    config,
                    weights: vec![dir.join(single)],
                });
            }
            if dir.join(&index).is_file() {
                let weights = read_index(&dir.join(&index))?;
                return Ok(Self {
                    component,
                    dir: dir.clone(),
                    config,
                    weights,
                });
            }
        }
        let pickles: Vec<String> = std::fs::read_dir(&dir)
            .context(dir.display())?
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| {
                n.ends_with(".bin")
                    || n.ends_with(".ckpt")
                    || n.ends_with(".pt")
                    || n.ends_with(".pth")
            })
            .collect();
        if !pickles.is_empty() {
            return Err(Error::bad_weights(format!(
                "{}: only safetensors weights are read, found {}",
                dir.display(),
                pickles.join(", ")
            )));
        }
        Err(Error::model_not_found(format!(
            "{}: no weights ({stem}.safetensors, a variant such as {stem}.fp16.safetensors, or a \
             sharded {stem}.safetensors.index.json)",
            dir.display()
        )))
    }

    /// The parsed `config.json`.
    pub fn read_config(&self) -> Result<serde_json::Value> {
        let text = std::fs::read_to_string(&self.config).context(self.config.display())?;
        serde_json::from_str(&text).map_err(|e| {
            Error::bad_weights(format!("{}: invalid JSON: {e}", self.config.display()))
        })
    }

    /// Names of all stored tensors.
    pub fn tensor_names(&self) -> Result<Vec<String>> {
        let st = self.mmap()?;
        let mut names: Vec<String> = st.tensors().into_iter().map(|(n, _)| n).collect();
        names.sort();
        Ok(names)
    }

    fn mmap(&self) -> Result<MmapedSafetensors> {
        // SAFETY: the files are mapped read-only; like every safetensors reader we rely on
        // them not being truncated or rewritten while the model is loaded.
        let context = || format!("{} weights in {}", self.component, self.dir.display());
        let st = unsafe { MmapedSafetensors::multi(&self.weights) }
            .map_err(|e| Error::from(e).context(context()))?;
        check_tensors(&context(), st.tensors())?;
        Ok(st)
    }

    /// A builder serving this component's tensors by their diffusers/transformers names,
    /// converted to `dtype` on `device`. Also accepts the other spelling of text-encoder names
    /// (with or without the `text_model.` wrapper) and old diffusers VAE attention names
    /// (`query`/`key`/`value`/`proj_attn` for `to_q`/`to_k`/`to_v`/`to_out.0`).
    pub fn var_builder(&self, dtype: DType, device: &Device) -> Result<VarBuilder<'static>> {
        let st = self.mmap()?;
        let names = st.tensors().into_iter().map(|(n, _)| n).collect();
        let files = self
            .weights
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ");
        let backend = FolderBackend {
            st,
            names,
            component: self.component,
            files: Arc::new(files),
        };
        Ok(VarBuilder::from_backend(
            Box::new(backend),
            dtype,
            device.clone(),
        ))
    }
}

/// The shard files of a `*.safetensors.index*.json`, in order of first mention.
fn read_index(index: &Path) -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string(index).context(index.display())?;
    let json: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::bad_weights(format!("{}: invalid JSON: {e}", index.display())))?;
    let map = json["weight_map"]
        .as_object()
        .ok_or_else(|| Error::bad_weights(format!("{}: no weight_map", index.display())))?;
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut files: Vec<PathBuf> = vec![];
    for file in map.values() {
        let file = file.as_str().ok_or_else(|| {
            Error::bad_weights(format!(
                "{}: weight_map value {file} is not a file name",
                index.display()
            ))
        })?;
        let path = dir.join(file);
        if !files.contains(&path) {
            if !path.is_file() {
                return Err(Error::model_not_found(format!(
                    "{}: shard listed in {} is missing",
                    path.display(),
                    index.display()
                )));
            }
            files.push(path);
        }
    }
    if files.is_empty() {
        return Err(Error::bad_weights(format!(
            "{}: empty weight_map",
            index.display()
        )));
    }
    Ok(files)
}

/// Other spellings of a diffusers name found in published folders.
fn aliases(component: Component, name: &str) -> Vec<String> {
    match component {
        Component::TextEncoder | Component::TextEncoder2 => {
            match name.strip_prefix("text_model.") {
                Some(rest) => vec![rest.to_string()],
                None => vec![format!("text_model.{name}")],
            }
        }
        Component::Vae => {
            const OLD: [(&str, &str); 4] = [
                (".to_q.", ".query."),
                (".to_k.", ".key."),
                (".to_v.", ".value."),
                (".to_out.0.", ".proj_attn."),
            ];
            OLD.iter()
                .filter(|(new, _)| name.contains(new))
                .map(|(new, old)| name.replace(new, old))
                .collect()
        }
        Component::Unet => vec![],
    }
}

struct FolderBackend {
    st: MmapedSafetensors,
    names: HashSet<String>,
    component: Component,
    files: Arc<String>,
}

impl FolderBackend {
    fn resolve(&self, name: &str) -> candle_core::Result<String> {
        if self.names.contains(name) {
            return Ok(name.to_string());
        }
        aliases(self.component, name)
            .into_iter()
            .find(|a| self.names.contains(a))
            .ok_or_else(|| candle_core::Error::CannotFindTensor {
                path: format!("{} '{name}' in {}", self.component, self.files),
            })
    }
}

impl SimpleBackend for FolderBackend {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let tensor = self.get_unchecked(name, dtype, dev)?;
        if tensor.shape() != &s {
            return Err(candle_core::Error::UnexpectedShape {
                msg: format!(
                    "shape mismatch for {} '{name}' in {}",
                    self.component, self.files
                ),
                expected: s,
                got: tensor.shape().clone(),
            });
        }
        Ok(tensor)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let key = self.resolve(name)?;
        self.st.load(&key, dev)?.to_dtype(dtype)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.resolve(name).is_ok()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::testing::tiny_model;
    use crate::ErrorCode;

    /// A fresh empty folder under the system temp dir.
    pub(crate) fn scratch(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("hyperlora-weights-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn write(dir: &Path, file: &str, value: f32) {
        let t = Tensor::full(value, (2, 3), &Device::Cpu).unwrap();
        candle_core::safetensors::save(
            &[("w".to_string(), t)].into_iter().collect(),
            dir.join(file),
        )
        .unwrap();
    }

    fn chosen(dir: &Path, variant: Option<&str>) -> Vec<String> {
        let files = ComponentFiles::locate(dir, Component::Unet, variant).unwrap();
        files
            .weights
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn variant_selection() {
        let dir = scratch("variants");
        std::fs::write(dir.join("config.json"), "{}").unwrap();
        write(&dir, "diffusion_pytorch_model.fp16.safetensors", 2.0);
        assert_eq!(
            chosen(&dir, None),
            ["diffusion_pytorch_model.fp16.safetensors"]
        );
        write(&dir, "diffusion_pytorch_model.bf16.safetensors", 3.0);
        assert_eq!(
            chosen(&dir, Some("bf16")),
            ["diffusion_pytorch_model.bf16.safetensors"]
        );
        write(&dir, "diffusion_pytorch_model.safetensors", 1.0);
        assert_eq!(chosen(&dir, None), ["diffusion_pytorch_model.safetensors"]);
        assert_eq!(
            chosen(&dir, Some("fp16")),
            ["diffusion_pytorch_model.fp16.safetensors"]
        );
        // A missing variant falls back to the plain weights.
        assert_eq!(
            chosen(&dir, Some("int8")),
            ["diffusion_pytorch_model.safetensors"]
        );
        // The chosen file is what the builder serves.
        let vb = ComponentFiles::locate(&dir, Component::Unet, Some("fp16"))
            .unwrap()
            .var_builder(DType::F32, &Device::Cpu)
            .unwrap();
        assert_eq!(
            vb.get((2, 3), "w").unwrap().to_vec2::<f32>().unwrap()[1][2],
            2.0
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn sharded_index() {
        let dir = scratch("sharded");
        std::fs::write(dir.join("config.json"), "{}").unwrap();
        let shard = |i: usize, name: &str, v: f32| {
            let file = format!("model-0000{i}-of-00002.fp16.safetensors");
            let t = Tensor::full(v, 4, &Device::Cpu).unwrap();
            candle_core::safetensors::save(
                &[(name.to_string(), t)].into_iter().collect(),
                dir.join(&file),
            )
            .unwrap();
            file
        };
        let (a, b) = (shard(1, "text_model.a", 1.0), shard(2, "text_model.b", 2.0));
        let index = serde_json::json!({"metadata": {}, "weight_map": {"text_model.a": a, "text_model.b": b}});
        std::fs::write(
            dir.join("model.safetensors.index.fp16.json"),
            index.to_string(),
        )
        .unwrap();
        let files = ComponentFiles::locate(&dir, Component::TextEncoder, None).unwrap();
        assert_eq!(files.weights, vec![dir.join(&a), dir.join(&b)]);
        let vb = files.var_builder(DType::BF16, &Device::Cpu).unwrap();
        let t = vb.get(4, "text_model.b").unwrap();
        assert_eq!(t.dtype(), DType::BF16);
        assert_eq!(
            t.to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap(),
            [2.0; 4]
        );
        // Either spelling of transformers' text-model names.
        assert!(vb.contains_tensor("a") && vb.contains_tensor("text_model.a"));
        std::fs::remove_file(dir.join(&b)).unwrap();
        let err = ComponentFiles::locate(&dir, Component::TextEncoder, None).unwrap_err();
        assert_eq!(err.code, ErrorCode::ModelNotFound);
        assert!(
            err.message.contains(&b) && err.message.contains("index"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn errors_name_the_folder_and_file() {
        let dir = scratch("errors");
        let err = DiffusersModel::open(&dir).unwrap_err();
        assert_eq!(err.code, ErrorCode::ModelNotFound);
        assert!(err.message.contains("not a diffusers folder"), "{err}");
        let err = DiffusersModel::open(dir.join("nope")).unwrap_err();
        assert_eq!(err.code, ErrorCode::ModelNotFound);

        std::fs::write(dir.join("model_index.json"), "{}").unwrap();
        let model = DiffusersModel::open(&dir).unwrap();
        let err = model.component(Component::Vae, None).unwrap_err();
        assert_eq!(err.code, ErrorCode::ModelNotFound);
        assert!(err.message.contains("no vae/ folder"), "{err}");

        let unet = dir.join("unet");
        std::fs::create_dir_all(&unet).unwrap();
        let err = model.component(Component::Unet, None).unwrap_err();
        assert!(
            err.message.contains("config.json") && err.message.contains("missing"),
            "{err}"
        );
        std::fs::write(unet.join("config.json"), "{").unwrap();
        let err = model.component(Component::Unet, None).unwrap_err();
        assert_eq!(err.code, ErrorCode::ModelNotFound);
        assert!(
            err.message.contains("diffusion_pytorch_model.safetensors"),
            "{err}"
        );
        std::fs::write(unet.join("diffusion_pytorch_model.bin"), "pickle").unwrap();
        let err = model.component(Component::Unet, None).unwrap_err();
        assert_eq!(err.code, ErrorCode::BadWeights);
        assert!(err.message.contains("diffusion_pytorch_model.bin"), "{err}");

        write(&unet, "diffusion_pytorch_model.safetensors", 1.0);
        let files = model.component(Component::Unet, None).unwrap();
        assert_eq!(files.read_config().unwrap_err().code, ErrorCode::BadWeights);
        let vb = files.var_builder(DType::F32, &Device::Cpu).unwrap();
        let err = Error::from(vb.pp("conv_in").get((2, 3), "weight").unwrap_err());
        assert_eq!(err.code, ErrorCode::BadWeights);
        assert!(err.message.contains("unet 'conv_in.weight'"), "{err}");
        assert!(
            err.message.contains("diffusion_pytorch_model.safetensors"),
            "{err}"
        );
        let err = Error::from(vb.get((3, 2), "w").unwrap_err());
        assert_eq!(err.code, ErrorCode::BadWeights);
        assert!(err.message.contains("shape mismatch for unet 'w'"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn hugging_face_cache_snapshot() {
        let repo = scratch("models--org--tiny");
        let (a, b) = (repo.join("snapshots/aaaa"), repo.join("snapshots/bbbb"));
        std::fs::create_dir_all(a.join("unet")).unwrap();
        assert_eq!(DiffusersModel::open(&repo).unwrap().root(), a);
        std::fs::create_dir_all(b.join("unet")).unwrap();
        assert_eq!(
            resolve_hf_cache(&repo).unwrap_err().code,
            ErrorCode::ModelNotFound
        );
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs/main"), "bbbb\n").unwrap();
        assert_eq!(DiffusersModel::open(&repo).unwrap().root(), b);
        assert_eq!(resolve_hf_cache(&b).unwrap(), b);
        std::fs::remove_dir_all(&repo).unwrap();
    }

    #[test]
    fn tiny_folder_components() {
        let model = DiffusersModel::open(tiny_model("sdxl")).unwrap();
        for c in Component::ALL {
            let files = model.component(c, None).unwrap();
            assert_eq!(files.weights.len(), 1, "{c}");
            assert!(files.read_config().unwrap().is_object(), "{c}");
        }
        let te = model.component(Component::TextEncoder, None).unwrap();
        assert!(te.weights[0].ends_with("model.fp16.safetensors"));
        let vb = model
            .var_builder(Component::Vae, None, DType::F16, &Device::Cpu)
            .unwrap();
        let w = vb.get((4, 4), "decoder.mid_block.attentions.0.to_q.weight");
        assert!(w.is_err(), "tiny VAE mid attention is 16 wide");
        let w = vb
            .get((16, 16), "decoder.mid_block.attentions.0.to_q.weight")
            .unwrap();
        assert_eq!(w.dtype(), DType::F16);
    }
}
