//! Single-file SGM checkpoints (RealVisXL, LEOSAM HelloWorld XL, CyberRealistic XL, ...): one
//! safetensors file with the UNet, VAE and both text encoders in their original namings.
//!
//! [`SingleFileCheckpoint::open`] maps the file once and checks it is an SDXL (base
//! architecture) checkpoint; [`SingleFileCheckpoint::var_builder`] then gives, per component, a
//! [`VarBuilder`] that serves the diffusers/transformers names: each request is translated by the
//! [`NameTable`], the stored tensor is read from the mapping (only the needed third of a fused
//! OpenCLIP `in_proj`), reshaped or transposed as the table says and converted to the builder's
//! dtype. Nothing is converted ahead of time and no second copy of the file is made.
//!
//! [`ModelSource`] opens either layout from a path, for the pipeline.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

use crate::weights::diffusers::{Component, DiffusersModel};
use crate::weights::inspect::check_tensors;
use crate::weights::sgm_names::{NameTable, SgmTensor, Transform, UnetLayout, VaeLayout};
use crate::{Error, Result};

struct Mapped {
    path: PathBuf,
    st: MmapedSafetensors,
    keys: HashSet<String>,
}

/// An SDXL checkpoint in the single-file SGM layout, memory-mapped.
#[derive(Clone)]
pub struct SingleFileCheckpoint {
    file: Arc<Mapped>,
    tables: BTreeMap<Component, Arc<NameTable>>,
    unet_layout: UnetLayout,
    vae_layout: Option<VaeLayout>,
}

impl std::fmt::Debug for SingleFileCheckpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SingleFileCheckpoint")
            .field("path", &self.file.path)
            .field("components", &self.tables.keys().collect::<Vec<_>>())
            .field("unet_layout", &self.unet_layout)
            .finish()
    }
}

/// Keys of `keys` under `prefix`, without it.
fn under<'a>(keys: &'a HashSet<String>, prefix: &'a str) -> impl Iterator<Item = &'a str> + 'a {
    keys.iter().filter_map(move |k| k.strip_prefix(prefix))
}

impl SingleFileCheckpoint {
    /// Maps `path` and recognises an SDXL checkpoint by its keys; the structure (levels,
    /// layers per block, text-encoder depth) is read from the keys too.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let shown = path.display().to_string();
        if !path.is_file() {
            return Err(Error::model_not_found(format!("{shown}: no such file")));
        }
        // SAFETY: the file is mapped read-only; like every safetensors reader we rely on it not
        // being truncated or rewritten while the model is loaded.
        let st = unsafe { MmapedSafetensors::new(&path) }.map_err(|e| {
            Error::bad_weights(format!("{shown}: not a readable safetensors file: {e}"))
        })?;
        check_tensors(&shown, st.tensors())?;
        let keys: HashSet<String> = st.tensors().into_iter().map(|(k, _)| k).collect();
        let has = |prefix: &str| keys.iter().any(|k| k.starts_with(prefix));
        let not_sdxl = |why: &str| {
            Err(Error::bad_weights(format!(
                "{shown}: not an SDXL checkpoint: {why}"
            )))
        };
        if !has(Component::Unet.sgm_prefix()) {
            if keys.contains("conv_in.weight")
                || has("down_blocks.")
                || has("encoder.down_blocks.")
                || has("text_model.")
            {
                return not_sdxl(
                    "it holds one diffusers/transformers model (unprefixed names); open its diffusers folder instead",
                );
            }
            return not_sdxl("no UNet weights (model.diffusion_model.*)");
        }
        if has("cond_stage_model.") {
            return not_sdxl("it is a Stable Diffusion 1.x/2.x checkpoint (cond_stage_model.*)");
        }
        if has("conditioner.embedders.0.model.") {
            return not_sdxl("it is an SDXL refiner (OpenCLIP as embedders.0), only base-architecture models are supported");
        }
        if !keys.contains("model.diffusion_model.label_emb.0.0.weight") {
            return not_sdxl("the UNet has no text_time embedding (label_emb.0.0)");
        }
        let context = |e: Error| e.context(&shown);
        let unet_layout =
            UnetLayout::infer(under(&keys, Component::Unet.sgm_prefix())).map_err(context)?;
        let mut tables = BTreeMap::new();
        tables.insert(Component::Unet, Arc::new(NameTable::unet(&unet_layout)));
        let mut vae_layout = None;
        if has(Component::Vae.sgm_prefix()) {
            let layout =
                VaeLayout::infer(under(&keys, Component::Vae.sgm_prefix())).map_err(context)?;
            tables.insert(Component::Vae, Arc::new(NameTable::vae(&layout)));
            vae_layout = Some(layout);
        }
        if has(Component::TextEncoder.sgm_prefix()) {
            tables.insert(Component::TextEncoder, Arc::new(NameTable::text_encoder()));
        }
        let resblocks = under(&keys, Component::TextEncoder2.sgm_prefix())
            .filter_map(|k| {
                k.strip_prefix("transformer.resblocks.")?
                    .split('.')
                    .next()?
                    .parse::<usize>()
                    .ok()
            })
            .max();
        if let Some(last) = resblocks {
            tables.insert(
                Component::TextEncoder2,
                Arc::new(NameTable::text_encoder_2(last + 1)),
            );
        }
        Ok(Self {
            file: Arc::new(Mapped { path, st, keys }),
            tables,
            unet_layout,
            vae_layout,
        })
    }

    pub fn path(&self) -> &Path {
        &self.file.path
    }

    /// Whether the checkpoint holds this component (some ship without a VAE, for example).
    pub fn has(&self, component: Component) -> bool {
        self.tables.contains_key(&component)
    }

    /// UNet structure read from the keys.
    pub fn unet_layout(&self) -> &UnetLayout {
        &self.unet_layout
    }

    /// VAE structure read from the keys, when the checkpoint has a VAE.
    pub fn vae_layout(&self) -> Option<&VaeLayout> {
        self.vae_layout.as_ref()
    }

    /// The name table of a component the checkpoint holds.
    pub fn table(&self, component: Component) -> Option<&NameTable> {
        self.tables.get(&component).map(Arc::as_ref)
    }

    /// All checkpoint keys (sorted).
    pub fn keys(&self) -> Vec<&str> {
        let mut keys: Vec<&str> = self.file.keys.iter().map(String::as_str).collect();
        keys.sort_unstable();
        keys
    }

    /// Shape of the tensor served under a diffusers name, without reading it (to size a model
    /// from the weights, e.g. a text encoder's width).
    pub fn shape(&self, component: Component, name: &str) -> Option<Vec<usize>> {
        let m = self.table(component)?.to_sgm(name)?;
        let view = self.file.st.get(&m.key).ok()?;
        m.transform.shape(view.shape())
    }

    /// A builder serving the component's tensors under their diffusers/transformers names,
    /// converted to `dtype` on `device`. Text-encoder names are accepted with or without the
    /// `text_model.` wrapper.
    pub fn var_builder(
        &self,
        component: Component,
        dtype: DType,
        device: &Device,
    ) -> Result<VarBuilder<'static>> {
        let table = self.tables.get(&component).ok_or_else(|| {
            Error::model_not_found(format!(
                "{}: this checkpoint has no {component} weights ({}*)",
                self.file.path.display(),
                component.sgm_prefix()
            ))
        })?;
        let backend = SgmBackend {
            file: self.file.clone(),
            table: table.clone(),
        };
        Ok(VarBuilder::from_backend(
            Box::new(backend),
            dtype,
            device.clone(),
        ))
    }
}

struct SgmBackend {
    file: Arc<Mapped>,
    table: Arc<NameTable>,
}

impl SgmBackend {
    fn locate(&self, name: &str) -> candle_core::Result<SgmTensor> {
        let component = self.table.component();
        let file = self.file.path.display();
        let m = self
            .table
            .to_sgm(name)
            .ok_or_else(|| candle_core::Error::CannotFindTensor {
                path: format!("{component} '{name}' (no SGM name for it) in {file}"),
            })?;
        if !self.file.keys.contains(&m.key) {
            return Err(candle_core::Error::CannotFindTensor {
                path: format!("{component} '{name}' (SGM key '{}') in {file}", m.key),
            });
        }
        Ok(m)
    }

    fn load(&self, m: &SgmTensor, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let view = self.file.st.get(&m.key)?;
        let stored = DType::try_from(view.dtype())?;
        // A stored shape the transform cannot apply to (an `in_proj` whose rows do not split
        // in three, say) is a shape mismatch: BAD_WEIGHTS.
        let shape = m.transform.shape(view.shape()).ok_or_else(|| {
            candle_core::Error::Msg(format!(
                "shape mismatch for '{}' in {}: stored shape {:?} does not allow {:?}",
                m.key,
                self.file.path.display(),
                view.shape(),
                m.transform
            ))
        })?;
        let data = view.data();
        let tensor = match m.transform {
            Transform::Third(k) => {
                // Rows are contiguous: read only the k-th third of the bytes.
                let part = data.len() / 3;
                Tensor::from_raw_buffer(&data[k * part..(k + 1) * part], stored, &shape, dev)?
            }
            Transform::Transpose => Tensor::from_raw_buffer(data, stored, view.shape(), dev)?
                .t()?
                .contiguous()?,
            Transform::Identity | Transform::ConvToLinear => {
                Tensor::from_raw_buffer(data, stored, &shape, dev)?
            }
        };
        tensor.to_dtype(dtype)
    }
}

impl SimpleBackend for SgmBackend {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let m = self.locate(name)?;
        let tensor = self.load(&m, dtype, dev)?;
        if tensor.shape() != &s {
            return Err(candle_core::Error::UnexpectedShape {
                msg: format!(
                    "shape mismatch for {} '{name}' (SGM key '{}') in {}",
                    self.table.component(),
                    m.key,
                    self.file.path.display()
                ),
                expected: s,
                got: tensor.shape().clone(),
            });
        }
        Ok(tensor)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let m = self.locate(name)?;
        self.load(&m, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.locate(name).is_ok()
    }
}

/// Where the pipeline's weights come from: a diffusers folder or a single-file checkpoint.
#[derive(Debug, Clone)]
pub enum ModelSource {
    Diffusers(DiffusersModel),
    SingleFile(SingleFileCheckpoint),
}

impl ModelSource {
    /// A file is opened as a single-file checkpoint, a folder as a diffusers model (or a
    /// Hugging Face cache repository folder holding one).
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        if path.is_file() {
            let ext = path
                .extension()
                .and_then(|e| e.to_str())
                .unwrap_or("")
                .to_ascii_lowercase();
            if matches!(ext.as_str(), "ckpt" | "pt" | "pth" | "bin") {
                return Err(Error::bad_weights(format!(
                    "{}: pickled checkpoints are not read, use the .safetensors release",
                    path.display()
                )));
            }
            return Ok(Self::SingleFile(SingleFileCheckpoint::open(path)?));
        }
        Ok(Self::Diffusers(DiffusersModel::open(path)?))
    }

    pub fn has(&self, component: Component) -> bool {
        match self {
            Self::Diffusers(m) => m.has(component),
            Self::SingleFile(c) => c.has(component),
        }
    }

    /// The component's `config.json` in a diffusers folder; `None` for a single file, whose
    /// configuration is the architecture's (e.g. SDXL base) with the structure in
    /// [`SingleFileCheckpoint::unet_layout`].
    pub fn config_path(&self, component: Component) -> Option<PathBuf> {
        match self {
            Self::Diffusers(m) => Some(m.root().join(component.subfolder()).join("config.json")),
            Self::SingleFile(_) => None,
        }
    }

    /// The component's weights under diffusers/transformers names, converted to `dtype`
    /// (diffusers folders: plain weights preferred, else the fp16 variant).
    pub fn var_builder(
        &self,
        component: Component,
        dtype: DType,
        device: &Device,
    ) -> Result<VarBuilder<'static>> {
        match self {
            Self::Diffusers(m) => m.var_builder(component, None, dtype, device),
            Self::SingleFile(c) => c.var_builder(component, dtype, device),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::testing::tiny_model;
    use crate::ErrorCode;

    fn single() -> SingleFileCheckpoint {
        SingleFileCheckpoint::open(tiny_model("sdxl-single-file.safetensors")).unwrap()
    }

    fn folder() -> DiffusersModel {
        DiffusersModel::open(tiny_model("sdxl")).unwrap()
    }

    fn values(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    }

    /// The proof that both layouts load the same model: every tensor of every component of the
    /// diffusers folder equals, exactly in f32, what the single file serves under the same name.
    #[test]
    fn single_file_serves_every_folder_tensor_exactly() {
        let (ckpt, model) = (single(), folder());
        for c in Component::ALL {
            let files = model.component(c, None).unwrap();
            let names = files.tensor_names().unwrap();
            let from_folder = files.var_builder(DType::F32, &Device::Cpu).unwrap();
            let from_single = ckpt.var_builder(c, DType::F32, &Device::Cpu).unwrap();
            for name in &names {
                let want = from_folder.get_unchecked(name).unwrap();
                let got = from_single
                    .get(want.shape(), name)
                    .unwrap_or_else(|e| panic!("{c} {name}: {e}"));
                assert_eq!(got.dtype(), DType::F32);
                assert!(values(&got) == values(&want), "{c} {name}: values differ");
                assert_eq!(
                    ckpt.shape(c, name).as_deref(),
                    Some(want.dims()),
                    "{c} {name}"
                );
            }
            // And nothing in the file is left over: each checkpoint key of the component names
            // folder tensors (three for a fused in_proj) that map back to it.
            let table = ckpt.table(c).unwrap();
            let mut served = BTreeSet::new();
            for key in ckpt
                .keys()
                .into_iter()
                .filter(|k| k.starts_with(c.sgm_prefix()))
            {
                let names = table.to_diffusers(key);
                assert!(!names.is_empty(), "{key}: no diffusers name");
                for (name, _) in names {
                    assert_eq!(table.to_sgm(&name).unwrap().key, key, "{name}");
                    assert!(
                        from_folder.contains_tensor(&name),
                        "{key} -> {name}: not in the folder"
                    );
                    served.insert(name);
                }
            }
            assert_eq!(
                served.len(),
                names.len(),
                "{c}: tensors in folder vs single file"
            );
            eprintln!("{c}: {} tensors identical", names.len());
        }
    }

    #[test]
    fn layouts_inferred_from_keys_match_the_configs() {
        let (ckpt, model) = (single(), folder());
        let unet = model
            .component(Component::Unet, None)
            .unwrap()
            .read_config()
            .unwrap();
        assert_eq!(ckpt.unet_layout(), &UnetLayout::from_config(&unet).unwrap());
        let vae = model
            .component(Component::Vae, None)
            .unwrap()
            .read_config()
            .unwrap();
        assert_eq!(
            ckpt.vae_layout(),
            Some(&VaeLayout::from_config(&vae).unwrap())
        );
        assert!(Component::ALL.iter().all(|&c| ckpt.has(c)));
    }

    #[test]
    fn dtypes_and_both_text_model_spellings() {
        let (ckpt, model) = (single(), folder());
        let reference = model
            .var_builder(Component::TextEncoder2, None, DType::F32, &Device::Cpu)
            .unwrap();
        let name = "text_model.encoder.layers.1.self_attn.v_proj.weight";
        let want = reference.get_unchecked(name).unwrap();
        for dtype in [DType::F16, DType::BF16, DType::F32] {
            let vb = ckpt
                .var_builder(Component::TextEncoder2, dtype, &Device::Cpu)
                .unwrap();
            let got = vb
                .pp("text_model.encoder")
                .get((16, 16), "layers.1.self_attn.v_proj.weight")
                .unwrap();
            assert_eq!(got.dtype(), dtype);
            let back = want.to_dtype(dtype).unwrap().to_dtype(DType::F32).unwrap();
            assert!(
                values(&got.to_dtype(DType::F32).unwrap()) == values(&back),
                "{dtype:?}"
            );
        }
        let te1 = ckpt
            .var_builder(Component::TextEncoder, DType::F32, &Device::Cpu)
            .unwrap();
        let a = te1
            .get((16,), "text_model.final_layer_norm.weight")
            .unwrap();
        let b = te1.get((16,), "final_layer_norm.weight").unwrap();
        assert!(values(&a) == values(&b));
        let proj = ckpt
            .var_builder(Component::TextEncoder2, DType::F32, &Device::Cpu)
            .unwrap();
        assert!(proj.contains_tensor("text_projection.weight"));
        assert!(!proj.contains_tensor("text_model.encoder.layers.3.mlp.fc1.weight"));
    }

    #[test]
    fn missing_tensor_names_both_keys() {
        // A copy of the tiny checkpoint without one q/k/v in_proj and without its VAE.
        let dir = crate::weights::diffusers::tests::scratch("single-missing");
        let path = dir.join("broken.safetensors");
        let mut tensors = candle_core::safetensors::load(
            tiny_model("sdxl-single-file.safetensors"),
            &Device::Cpu,
        )
        .unwrap();
        let fused = "conditioner.embedders.1.model.transformer.resblocks.2.attn.in_proj_weight";
        assert!(tensors.remove(fused).is_some());
        tensors.retain(|k, _| !k.starts_with("first_stage_model."));
        candle_core::safetensors::save(&tensors, &path).unwrap();

        let ckpt = SingleFileCheckpoint::open(&path).unwrap();
        assert!(!ckpt.has(Component::Vae));
        let err = ckpt
            .var_builder(Component::Vae, DType::F32, &Device::Cpu)
            .err()
            .unwrap();
        assert_eq!(err.code, ErrorCode::ModelNotFound);
        assert!(
            err.message.contains("no vae weights (first_stage_model.*)"),
            "{err}"
        );

        let vb = ckpt
            .var_builder(Component::TextEncoder2, DType::F32, &Device::Cpu)
            .unwrap();
        let err = Error::from(
            vb.get(
                (16, 16),
                "text_model.encoder.layers.2.self_attn.k_proj.weight",
            )
            .unwrap_err(),
        );
        assert_eq!(err.code, ErrorCode::BadWeights);
        for part in [
            "text_model.encoder.layers.2.self_attn.k_proj.weight",
            fused,
            "broken.safetensors",
        ] {
            assert!(err.message.contains(part), "{err} lacks {part}");
        }
        let err = Error::from(
            vb.get((16, 16), "text_model.encoder.layers.9.mlp.fc1.weight")
                .unwrap_err(),
        );
        assert_eq!(err.code, ErrorCode::BadWeights);
        assert!(err.message.contains("no SGM name"), "{err}");
        let err = Error::from(
            vb.get(
                (16, 15),
                "text_model.encoder.layers.1.self_attn.q_proj.weight",
            )
            .unwrap_err(),
        );
        assert_eq!(err.code, ErrorCode::BadWeights);
        assert!(
            err.message.contains("shape mismatch") && err.message.contains("in_proj_weight"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn recognises_what_is_not_an_sdxl_checkpoint() {
        let dir = crate::weights::diffusers::tests::scratch("not-sdxl");
        let t = || Tensor::zeros(2, DType::F16, &Device::Cpu).unwrap();
        let cases = [
            (
                vec![
                    "model.diffusion_model.input_blocks.0.0.weight",
                    "cond_stage_model.transformer.x",
                ],
                "1.x/2.x",
            ),
            (
                vec![
                    "model.diffusion_model.label_emb.0.0.weight",
                    "conditioner.embedders.0.model.x",
                ],
                "refiner",
            ),
            (
                vec!["model.diffusion_model.input_blocks.0.0.weight"],
                "text_time",
            ),
            (
                vec!["conv_in.weight", "down_blocks.0.resnets.0.conv1.weight"],
                "diffusers folder",
            ),
            (vec!["something.else"], "no UNet"),
        ];
        for (i, (keys, why)) in cases.iter().enumerate() {
            let path = dir.join(format!("{i}.safetensors"));
            let tensors = keys.iter().map(|k| (k.to_string(), t())).collect();
            candle_core::safetensors::save(&tensors, &path).unwrap();
            let err = SingleFileCheckpoint::open(&path).unwrap_err();
            assert_eq!(err.code, ErrorCode::BadWeights, "{err}");
            assert!(
                err.message.contains(why) && err.message.contains("not an SDXL checkpoint"),
                "{err}"
            );
        }
        let err = SingleFileCheckpoint::open(dir.join("absent.safetensors")).unwrap_err();
        assert_eq!(err.code, ErrorCode::ModelNotFound);
        std::fs::write(dir.join("junk.safetensors"), b"not safetensors").unwrap();
        assert_eq!(
            SingleFileCheckpoint::open(dir.join("junk.safetensors"))
                .unwrap_err()
                .code,
            ErrorCode::BadWeights
        );
        std::fs::write(dir.join("old.ckpt"), b"pickle").unwrap();
        assert_eq!(
            ModelSource::open(dir.join("old.ckpt")).unwrap_err().code,
            ErrorCode::BadWeights
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn model_source_opens_both_layouts() {
        let a = ModelSource::open(tiny_model("sdxl")).unwrap();
        let b = ModelSource::open(tiny_model("sdxl-single-file.safetensors")).unwrap();
        assert!(matches!(a, ModelSource::Diffusers(_)) && matches!(b, ModelSource::SingleFile(_)));
        assert!(a.config_path(Component::Unet).unwrap().is_file());
        assert!(b.config_path(Component::Unet).is_none());
        let name = "up_blocks.0.attentions.2.transformer_blocks.0.attn2.to_k.weight";
        let x = a
            .var_builder(Component::Unet, DType::F32, &Device::Cpu)
            .unwrap()
            .get((32, 32), name)
            .unwrap();
        let y = b
            .var_builder(Component::Unet, DType::F32, &Device::Cpu)
            .unwrap()
            .get((32, 32), name)
            .unwrap();
        assert!(values(&x) == values(&y));
    }
}
