//! The HyperLoRA hypernetwork (docs/hyperlora-model.md §4): identity conditions of 1..N photos → a kohya LoRA
//! for the SDXL UNet.
//!
//! ```text
//! id_embeds [N,1,512] ─ IdProjector ─► [N,16,1024] ─┐
//!                                                    ├─ Resampler ─► mean over N ─► L2 ─► [1, 8·M, 128] ─ LoraBank ─► ID-LoRA
//! CLIP penultimate [N,257,1024] ─────────────────────┘
//! CLIP penultimate of the whole photo ─ base Resampler ─► … ─ LoraBank (base bases, rank/2) ─► Base-LoRA
//! ```
//! Load a released folder with [`HyperLora::load`]; see [`folder`] for the layout and the
//! optional `hyper_lora_config.json`.

pub mod coefficients;
pub mod folder;
pub mod lora_bank;
pub mod projector;
pub mod resampler;

use std::path::Path;

use candle_core::{DType, Device, Tensor};

pub use coefficients::{IdentityCoefficients, Tokens};
pub use folder::{HyperLoraConfig, HyperLoraConfigFile, IdConditioning, ModuleInfo, Proj};
pub use lora_bank::{LoraBank, LoraKind};
pub use projector::IdProjector;
pub use resampler::Resampler;

use crate::lora::KohyaLora;
use crate::{Error, Result};

/// The ID-LoRA and, for models that have one, the Base-LoRA of one identity, with the
/// coefficients they were expanded from.
#[derive(Debug, Clone)]
pub struct HyperLoraOutput {
    pub id: KohyaLora,
    pub base: Option<KohyaLora>,
    pub coefficients: IdentityCoefficients,
}

/// A loaded HyperLoRA model.
#[derive(Debug, Clone)]
pub struct HyperLora {
    config: HyperLoraConfig,
    projector: Option<IdProjector>,
    resampler: Resampler,
    base_resampler: Option<Resampler>,
    bank: LoraBank,
    /// [`coefficients::model_id`] of the folder.
    model_id: [u8; 32],
    dtype: DType,
    device: Device,
}

impl HyperLora {
    /// Loads a HyperLoRA folder (released layout, f32/f16/bf16 files), converting the weights to
    /// `dtype` on `device`. A missing folder is `MODEL_NOT_FOUND`; a missing file, tensor or any
    /// shape disagreement is `BAD_WEIGHTS` naming the file and tensor.
    pub fn load(dir: impl AsRef<Path>, dtype: DType, device: &Device) -> Result<Self> {
        let dir = dir.as_ref();
        let w = folder::load_folder(dir, dtype, device)?;
        let cfg = w.config;
        let projector = match (&w.id_projector, cfg.id_embed_dim, cfg.num_id_tokens) {
            (Some(vb), Some(d), Some(t)) => Some(IdProjector::load(
                vb.clone(),
                d,
                t,
                cfg.resampler.embedding_dim,
            )?),
            _ => None,
        };
        let resampler = Resampler::load(&cfg.resampler, w.resampler)?;
        let base_resampler = match (&cfg.base_resampler, w.base_resampler) {
            (Some(s), Some(vb)) => Some(Resampler::load(s, vb)?),
            _ => None,
        };
        let bank = LoraBank::new(
            w.modules,
            &w.bases,
            cfg.hyper_dim,
            base_resampler.is_some(),
            dtype,
        )?;
        Ok(Self {
            config: cfg,
            projector,
            resampler,
            base_resampler,
            bank,
            model_id: coefficients::model_id(dir)?,
            dtype,
            device: device.clone(),
        })
    }

    /// The resolved hyper-parameters.
    pub fn config(&self) -> &HyperLoraConfig {
        &self.config
    }

    /// The targeted SDXL attention modules, in `hyper_lora_modules.json` order.
    pub fn modules(&self) -> &[ModuleInfo] {
        self.bank.modules()
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Identifies the loaded weights (see [`coefficients::model_id`]).
    pub fn model_id(&self) -> &[u8; 32] {
        &self.model_id
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Whether [`HyperLora::id_tokens`] needs ArcFace embeddings.
    pub fn uses_id_embeds(&self) -> bool {
        self.config.conditioning.uses_arcface()
    }

    /// Whether [`HyperLora::id_tokens`] needs CLIP penultimate states of the face crops.
    pub fn uses_clip(&self) -> bool {
        self.config.conditioning.uses_clip()
    }

    pub fn has_base_lora(&self) -> bool {
        self.base_resampler.is_some()
    }

    /// The CLIP hidden width the resampler expects (1024 released).
    pub fn clip_hidden_size(&self) -> usize {
        self.config.resampler.embedding_dim
    }

    fn input(&self, t: &Tensor) -> Result<Tensor> {
        Ok(t.to_device(&self.device)?.to_dtype(self.dtype)?)
    }

    /// The ID resampler's output for N photos: `[1, 8 × modules, hyper_dim]` in f32, averaged
    /// over the photos and L2-normalised per token.
    ///
    /// `id_embeds`: ArcFace embeddings `[N, 1, 512]` (or `[N, 512]`); `clip_penultimate`: CLIP
    /// ViT penultimate states of the face crops `[N, 257, 1024]`. Both are required for the
    /// released models; a single-encoder model needs only its own (the other is ignored).
    pub fn id_tokens(
        &self,
        id_embeds: Option<&Tensor>,
        clip_penultimate: Option<&Tensor>,
    ) -> Result<Tensor> {
        fn need<'a>(t: Option<&'a Tensor>, what: &str) -> Result<&'a Tensor> {
            t.ok_or_else(|| Error::invalid_argument(format!("this HyperLoRA model needs {what}")))
        }
        let id_tokens = |e: &Tensor| -> Result<Tensor> {
            let p = self
                .projector
                .as_ref()
                .expect("ArcFace models have a projector");
            p.forward(&self.input(e)?)
        };
        match self.config.conditioning {
            IdConditioning::ArcfaceAndClip => {
                let e = need(id_embeds, "ArcFace embeddings (id_embeds)")?;
                let c = need(clip_penultimate, "CLIP penultimate states")?;
                let (ne, nc) = (e.dim(0)?, c.dim(0)?);
                if ne != nc {
                    return Err(Error::invalid_argument(format!(
                        "{ne} ArcFace embeddings but {nc} CLIP conditions: one of each per photo"
                    )));
                }
                self.resampler
                    .forward(&id_tokens(e)?, Some(&self.input(c)?))
            }
            IdConditioning::Arcface => {
                let e = need(id_embeds, "ArcFace embeddings (id_embeds)")?;
                self.resampler.forward(&id_tokens(e)?, None)
            }
            IdConditioning::Clip => {
                let c = need(clip_penultimate, "CLIP penultimate states")?;
                self.resampler.forward(&self.input(c)?, None)
            }
        }
    }

    /// The Base-LoRA resampler's output for N photos (CLIP penultimate states of the whole,
    /// not face-cropped photos, `[N, 257, 1024]`): `[1, 8 × modules, hyper_dim]` in f32.
    pub fn base_tokens(&self, base_clip_penultimate: &Tensor) -> Result<Tensor> {
        let r = self
            .base_resampler
            .as_ref()
            .ok_or_else(|| Error::invalid_argument("this HyperLoRA model has no Base-LoRA"))?;
        r.forward(&self.input(base_clip_penultimate)?, None)
    }

    /// Resampler tokens → LoRA (in the model's dtype, on its device).
    pub fn lora_from_tokens(&self, tokens: &Tensor, kind: LoraKind) -> Result<KohyaLora> {
        self.bank.lora(tokens, kind)
    }

    /// The identity LoRA of 1..N photos (see [`HyperLora::id_tokens`] for the inputs).
    pub fn id_lora(
        &self,
        id_embeds: Option<&Tensor>,
        clip_penultimate: Option<&Tensor>,
    ) -> Result<KohyaLora> {
        let tokens = self.id_tokens(id_embeds, clip_penultimate)?;
        let mut lora = self.lora_from_tokens(&tokens, LoraKind::Id)?;
        lora.metadata.insert(
            "hyperlora_num_photos".into(),
            tokens_photos(id_embeds, clip_penultimate),
        );
        Ok(lora)
    }

    /// The Base-LoRA (rank / 2) of 1..N photos.
    pub fn base_lora(&self, base_clip_penultimate: &Tensor) -> Result<KohyaLora> {
        let tokens = self.base_tokens(base_clip_penultimate)?;
        let mut lora = self.lora_from_tokens(&tokens, LoraKind::Base)?;
        lora.metadata.insert(
            "hyperlora_num_photos".into(),
            base_clip_penultimate.dim(0)?.to_string(),
        );
        Ok(lora)
    }

    /// Both LoRAs of one identity, and its coefficients. `base_clip_penultimate` is needed (and
    /// used) only when the model has a Base-LoRA; without it `base` is `None`. The LoRAs are
    /// [`HyperLora::expand`] of the coefficients, so a stored identity expands bit-equal.
    pub fn create_lora(
        &self,
        id_embeds: Option<&Tensor>,
        clip_penultimate: Option<&Tensor>,
        base_clip_penultimate: Option<&Tensor>,
    ) -> Result<HyperLoraOutput> {
        let id = self.id_tokens(id_embeds, clip_penultimate)?;
        let photos = tokens_photos(id_embeds, clip_penultimate)
            .parse()
            .unwrap_or(0);
        let base = match (self.has_base_lora(), base_clip_penultimate) {
            (true, Some(b)) => Some(Tokens::from_tensor(&self.base_tokens(b)?, b.dim(0)?)?),
            _ => None,
        };
        let coefficients = IdentityCoefficients {
            model_id: self.model_id,
            queries: (8 * self.modules().len()) as u32,
            hyper_dim: self.config.hyper_dim as u32,
            id: Tokens::from_tensor(&id, photos)?,
            base,
            arcface: None,
        };
        self.expand(coefficients)
    }

    /// The LoRAs of stored coefficients. Coefficients of another HyperLoRA model (another
    /// [`HyperLora::model_id`]) or shape are `INVALID_ARGUMENT`: its bases would give another
    /// person, not an error.
    pub fn expand(&self, coefficients: IdentityCoefficients) -> Result<HyperLoraOutput> {
        let c = &coefficients;
        if c.model_id != self.model_id {
            return Err(Error::invalid_argument(format!(
                "these identity coefficients were made by HyperLoRA model {}, this one is {}: \
                 expand them with the model that made them",
                coefficients::short_id(&c.model_id),
                coefficients::short_id(&self.model_id)
            )));
        }
        let q = 8 * self.modules().len();
        if (c.queries as usize, c.hyper_dim as usize) != (q, self.config.hyper_dim) {
            return Err(Error::invalid_argument(format!(
                "identity coefficients are [{}, {}], this model takes [{q}, {}]",
                c.queries, c.hyper_dim, self.config.hyper_dim
            )));
        }
        let lora = |t: &Tokens, kind: LoraKind| -> Result<KohyaLora> {
            let tokens =
                Tensor::from_slice(&t.values, (1, q, self.config.hyper_dim), &self.device)?;
            let mut lora = self.lora_from_tokens(&tokens, kind)?;
            lora.metadata
                .insert("hyperlora_num_photos".into(), t.num_photos.to_string());
            Ok(lora)
        };
        let id = lora(&c.id, LoraKind::Id)?;
        let base = match &c.base {
            Some(t) if self.has_base_lora() => Some(lora(t, LoraKind::Base)?),
            Some(_) => {
                return Err(Error::invalid_argument(
                    "identity coefficients have a Base-LoRA but this model has none",
                ))
            }
            None => None,
        };
        Ok(HyperLoraOutput {
            id,
            base,
            coefficients,
        })
    }
}

fn tokens_photos(a: Option<&Tensor>, b: Option<&Tensor>) -> String {
    a.or(b)
        .and_then(|t| t.dims().first().copied())
        .map(|n| n.to_string())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::path::PathBuf;

    use super::*;
    use crate::lora::format::{read_safetensors, serialize_safetensors};
    use crate::testing::{
        assert_close, check_hyperlora_lora as check_lora, first_rows as first,
        hyperlora_inputs as inputs, tiny_hyperlora as tiny, tiny_model,
    };
    use crate::ErrorCode;

    const TOL: f32 = 1e-5;

    #[test]
    fn tiny_folder_config() {
        let h = tiny(DType::F32);
        let c = h.config();
        assert_eq!(c.conditioning, IdConditioning::ArcfaceAndClip);
        assert_eq!(
            (
                c.resampler.dim,
                c.resampler.heads,
                c.resampler.dim_head,
                c.resampler.depth
            ),
            (48, 2, 20, 2)
        );
        assert_eq!((c.resampler.ff_inner, c.resampler.num_queries), (192, 272));
        assert_eq!((c.hyper_dim, c.lora_rank, c.num_modules), (5, 4, 34));
        assert_eq!((c.id_embed_dim, c.num_id_tokens), (Some(512), Some(4)));
        assert!(h.has_base_lora() && h.uses_clip() && h.uses_id_embeds());
        assert_eq!(h.clip_hidden_size(), 32);
        let m = &h.modules()[1];
        assert_eq!(
            m.name,
            "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2"
        );
        assert_eq!(m.cross_attention_dim, Some(32));
        // diffusers' attn_processors order: down, up, then mid.
        assert!(h.modules()[30].name.starts_with("lora_unet_mid_block"));
    }

    #[test]
    fn id_projector_and_tokens_match_reference() {
        let h = tiny(DType::F32);
        let f = inputs();
        let p = h
            .projector
            .as_ref()
            .unwrap()
            .forward(&f["id_embeds"])
            .unwrap();
        assert_close("id_tokens", &p, &f["id_tokens"], TOL);
        for n in [1, 3] {
            let t = h
                .id_tokens(
                    Some(&first(&f["id_embeds"], n)),
                    Some(&first(&f["clip_penultimate"], n)),
                )
                .unwrap();
            assert_close(
                &format!("resampler tokens N={n}"),
                &t,
                &f[&format!("resampler_tokens_n{n}")],
                TOL,
            );
            let b = h
                .base_tokens(&first(&f["base_clip_penultimate"], n))
                .unwrap();
            assert_close(
                &format!("base tokens N={n}"),
                &b,
                &f[&format!("base_tokens_n{n}")],
                TOL,
            );
        }
    }

    /// CPU timing at the released sizes with random weights (resampler dim 1024, depth 4,
    /// 12 × 64 heads, 1120 latents, 16 ID tokens, 257 CLIP tokens; bank hyper_dim 128, rank 8
    /// over SDXL's 140 attention modules, timed on a 14-module slice and scaled).
    /// `cargo test -p hyperlora --lib bench_released_dimensions -- --ignored --nocapture`
    #[test]
    #[ignore = "benchmark"]
    fn bench_released_dimensions() {
        use std::time::Instant;
        let dev = Device::Cpu;
        let dtype = DType::F32;
        let shape = folder::ResamplerShape {
            dim: 1024,
            depth: 4,
            heads: 12,
            dim_head: 64,
            ff_inner: 4096,
            num_queries: 1120,
            embedding_dim: 1024,
            output_dim: 128,
            two_conditions: true,
        };
        let varmap = candle_nn::VarMap::new();
        let vb = candle_nn::VarBuilder::from_varmap(&varmap, dtype, &dev);
        let resampler = Resampler::load(&shape, vb.pp("resampler")).unwrap();
        let projector = IdProjector::load(vb.pp("id_projector"), 512, 16, 1024).unwrap();
        // SDXL's attention modules: (hidden, count of attn1/attn2 pairs).
        let mut modules = Vec::new();
        for (hidden, pairs) in [
            (640usize, 4usize),
            (1280, 20),
            (1280, 30),
            (640, 6),
            (1280, 10),
        ] {
            for _ in 0..pairs {
                for cross in [None, Some(2048)] {
                    let name = format!("m{}", modules.len());
                    modules.push(ModuleInfo {
                        name,
                        hidden_size: hidden,
                        cross_attention_dim: cross,
                    });
                }
            }
        }
        assert_eq!(modules.len(), 140);
        let total_params: usize = modules
            .iter()
            .map(|m| {
                Proj::ALL
                    .iter()
                    .map(|&p| {
                        let (i, o) = m.in_out(p);
                        128 * 8 * (i + o)
                    })
                    .sum::<usize>()
            })
            .sum();
        // A representative slice: every 10th module.
        let slice: Vec<ModuleInfo> = modules.iter().step_by(10).cloned().collect();
        let slice_params: usize = slice
            .iter()
            .map(|m| {
                Proj::ALL
                    .iter()
                    .map(|&p| {
                        let (i, o) = m.in_out(p);
                        128 * 8 * (i + o)
                    })
                    .sum::<usize>()
            })
            .sum();
        let mut bases = HashMap::new();
        for (i, m) in slice.iter().enumerate() {
            for p in Proj::ALL {
                let (inp, out) = m.in_out(p);
                let k = |d: &str| format!("{i}.{}.id_{d}_basis", p.file_name());
                bases.insert(
                    k("down"),
                    Tensor::randn(0f32, 0.02, (128, inp, 8), &dev).unwrap(),
                );
                bases.insert(
                    k("up"),
                    Tensor::randn(0f32, 0.02, (128, 8, out), &dev).unwrap(),
                );
            }
        }
        let bank = LoraBank::new(slice.clone(), &bases, 128, false, dtype).unwrap();
        for n in [1usize, 4] {
            let id = Tensor::randn(0f32, 1.0, (n, 1, 512), &dev).unwrap();
            let clip = Tensor::randn(0f32, 1.0, (n, 257, 1024), &dev).unwrap();
            let t0 = Instant::now();
            let x = projector.forward(&id).unwrap();
            let tokens = resampler.forward(&x, Some(&clip)).unwrap();
            let t_res = t0.elapsed();
            let t1 = Instant::now();
            let lora = bank
                .lora(&tokens.narrow(1, 0, 8 * slice.len()).unwrap(), LoraKind::Id)
                .unwrap();
            let t_bank = t1.elapsed();
            let scaled = t_bank.as_secs_f64() * total_params as f64 / slice_params as f64;
            eprintln!(
                "N={n}: projector+resampler {:.3} s; bank {:.3} s for {} of 140 modules ({:.0}M of {:.0}M basis params) → ≈{:.2} s for all; LoRA slice {} params",
                t_res.as_secs_f64(),
                t_bank.as_secs_f64(),
                slice.len(),
                slice_params as f64 / 1e6,
                total_params as f64 / 1e6,
                scaled,
                lora.num_parameters()
            );
        }
    }

    #[test]
    fn interpolating_loras_equals_interpolating_coefficients() {
        let h = tiny(DType::F32);
        let f = inputs();
        let ta = f["resampler_tokens_n1"].clone();
        let tb = f["base_tokens_n1"].clone();
        let a = h.lora_from_tokens(&ta, LoraKind::Id).unwrap();
        let b = h.lora_from_tokens(&tb, LoraKind::Id).unwrap();
        let mid = KohyaLora::lerp(&a, &b, 0.3).unwrap();
        let tm = ((&ta * 0.7).unwrap() + (&tb * 0.3).unwrap()).unwrap();
        let direct = h.lora_from_tokens(&tm, LoraKind::Id).unwrap();
        for ((n, x), (_, y)) in mid.iter().zip(direct.iter()) {
            assert_close(n, &x.down, &y.down, 1e-6);
            assert_close(n, &x.up, &y.up, 1e-6);
        }
    }

    #[test]
    fn bad_inputs_are_invalid_arguments() {
        let h = tiny(DType::F32);
        let f = inputs();
        let e = first(&f["id_embeds"], 2);
        let c = first(&f["clip_penultimate"], 3);
        for err in [
            h.id_lora(Some(&e), Some(&c)).unwrap_err(),
            h.id_lora(None, Some(&c)).unwrap_err(),
            h.id_lora(Some(&e), None).unwrap_err(),
            h.id_lora(Some(&e.narrow(2, 0, 100).unwrap()), Some(&first(&c, 2)))
                .unwrap_err(),
            h.id_lora(Some(&e), Some(&first(&c, 2).narrow(2, 0, 16).unwrap()))
                .unwrap_err(),
            h.lora_from_tokens(&f["id_tokens"], LoraKind::Id)
                .unwrap_err(),
        ] {
            assert_eq!(err.code, ErrorCode::InvalidArgument, "{err}");
        }
    }

    // ---- folder validation -------------------------------------------------------------

    struct TmpFolder(PathBuf);

    impl TmpFolder {
        fn copy(tag: &str) -> Self {
            let dir =
                std::env::temp_dir().join(format!("hyperlora-folder-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            for e in std::fs::read_dir(tiny_model("hyperlora")).unwrap() {
                let e = e.unwrap();
                std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
            }
            Self(dir)
        }

        fn path(&self, name: &str) -> PathBuf {
            self.0.join(name)
        }

        /// Rewrites one safetensors file through `edit`.
        fn edit(&self, name: &str, edit: impl FnOnce(&mut Vec<(String, Tensor)>)) {
            let (mut t, meta) = read_safetensors(&self.path(name), &Device::Cpu).unwrap();
            edit(&mut t);
            std::fs::write(self.path(name), serialize_safetensors(&t, &meta).unwrap()).unwrap();
        }

        fn load_err(&self) -> Error {
            HyperLora::load(&self.0, DType::F32, &Device::Cpu).unwrap_err()
        }
    }

    impl Drop for TmpFolder {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn assert_bad(err: &Error, needles: &[&str]) {
        assert_eq!(err.code, ErrorCode::BadWeights, "{err}");
        for n in needles {
            assert!(err.message.contains(n), "{n:?} not in: {err}");
        }
    }

    #[test]
    fn missing_folder_and_files() {
        let err = HyperLora::load("/nonexistent/hyperlora", DType::F32, &Device::Cpu).unwrap_err();
        assert_eq!(err.code, ErrorCode::ModelNotFound);
        for file in [
            folder::MODULES_JSON,
            folder::MODULES_FILE,
            folder::RESAMPLER_FILE,
            folder::ID_PROJECTOR_FILE,
        ] {
            let d = TmpFolder::copy("missing");
            std::fs::remove_file(d.path(file)).unwrap();
            assert_bad(&d.load_err(), &[file]);
        }
        // hyper_lora_config.json asks for the Base-LoRA: its resampler must be there.
        let d = TmpFolder::copy("missing-base");
        std::fs::remove_file(d.path(folder::BASE_RESAMPLER_FILE)).unwrap();
        assert_bad(&d.load_err(), &[folder::BASE_RESAMPLER_FILE]);
        // Garbage instead of a safetensors file.
        let d = TmpFolder::copy("garbage");
        std::fs::write(d.path(folder::RESAMPLER_FILE), b"not safetensors at all").unwrap();
        assert_bad(&d.load_err(), &[folder::RESAMPLER_FILE]);
    }

    #[test]
    fn released_layout_without_base_or_config() {
        // As released: no base_resampler, no base bases, no config (dim_head then defaults to
        // 64, which the tiny inner width 40 does not split into: the error says what to set).
        let d = TmpFolder::copy("released");
        std::fs::remove_file(d.path(folder::BASE_RESAMPLER_FILE)).unwrap();
        d.edit(folder::MODULES_FILE, |t| {
            t.retain(|(k, _)| !k.contains("base_"))
        });
        std::fs::write(
            d.path(folder::CONFIG_FILE),
            r#"{"resampler": {"heads": 2}}"#,
        )
        .unwrap();
        let h = HyperLora::load(&d.0, DType::F32, &Device::Cpu).unwrap();
        assert!(!h.has_base_lora());
        let f = inputs();
        let out = h
            .create_lora(
                Some(&f["id_embeds"]),
                Some(&f["clip_penultimate"]),
                Some(&f["base_clip_penultimate"]),
            )
            .unwrap();
        assert!(out.base.is_none());
        check_lora(
            "ID-LoRA without base",
            &out.id,
            "id_lora_n3.safetensors",
            TOL,
        );
        std::fs::remove_file(d.path(folder::CONFIG_FILE)).unwrap();
        assert_bad(
            &d.load_err(),
            &[
                "resampler.safetensors",
                "layers.0.attn1.to_q.weight",
                "40",
                "hyper_lora_config.json",
            ],
        );
    }

    #[test]
    fn f32_and_bf16_files_load() {
        let f = inputs();
        for (file_dtype, tol) in [(DType::F32, TOL), (DType::BF16, 5e-2)] {
            let d = TmpFolder::copy(&format!("{file_dtype:?}"));
            for name in [
                folder::MODULES_FILE,
                folder::RESAMPLER_FILE,
                folder::BASE_RESAMPLER_FILE,
                folder::ID_PROJECTOR_FILE,
            ] {
                d.edit(name, |t| {
                    for (_, v) in t.iter_mut() {
                        *v = v.to_dtype(file_dtype).unwrap();
                    }
                });
            }
            let h = HyperLora::load(&d.0, DType::F32, &Device::Cpu).unwrap();
            let out = h
                .create_lora(
                    Some(&f["id_embeds"]),
                    Some(&f["clip_penultimate"]),
                    Some(&f["base_clip_penultimate"]),
                )
                .unwrap();
            let what = format!("{file_dtype:?} files");
            check_lora(&what, &out.id, "id_lora_n3.safetensors", tol);
            check_lora(&what, &out.base.unwrap(), "base_lora_n3.safetensors", tol);
        }
        // bf16 compute on the fp16 folder.
        let h = tiny(DType::BF16);
        let lora = h
            .id_lora(Some(&f["id_embeds"]), Some(&f["clip_penultimate"]))
            .unwrap();
        assert_eq!(lora.iter().next().unwrap().1.up.dtype(), DType::BF16);
        check_lora("bf16 compute", &lora, "id_lora_n3.safetensors", 5e-2);
    }

    #[test]
    fn wrong_shapes_name_file_and_tensor() {
        let d = TmpFolder::copy("shape");
        d.edit(folder::MODULES_FILE, |t| {
            for (k, v) in t.iter_mut() {
                if k == "7.to_k.id_down_basis" {
                    *v = Tensor::zeros((5, 31, 4), DType::F16, &Device::Cpu).unwrap();
                }
            }
        });
        assert_bad(
            &d.load_err(),
            &[
                "hyper_lora_modules.safetensors",
                "7.to_k.id_down_basis",
                "[5, 31, 4]",
                "[5, 32, 4]",
            ],
        );

        let d = TmpFolder::copy("shape2");
        d.edit(folder::RESAMPLER_FILE, |t| {
            for (k, v) in t.iter_mut() {
                if k == "layers.1.attn3.to_v.weight" {
                    *v = Tensor::zeros((40, 47), DType::F16, &Device::Cpu).unwrap();
                }
            }
        });
        assert_bad(
            &d.load_err(),
            &[
                "resampler.safetensors",
                "layers.1.attn3.to_v.weight",
                "[40, 47]",
                "[40, 48]",
            ],
        );

        let d = TmpFolder::copy("missing-tensor");
        d.edit(folder::BASE_RESAMPLER_FILE, |t| {
            t.retain(|(k, _)| k != "layers.0.norm_ff.bias")
        });
        assert_bad(
            &d.load_err(),
            &[
                "base_resampler.safetensors",
                "layers.0.norm_ff.bias",
                "missing",
            ],
        );

        let d = TmpFolder::copy("extra");
        d.edit(folder::ID_PROJECTOR_FILE, |t| {
            t.push((
                "3.weight".into(),
                Tensor::zeros(4, DType::F16, &Device::Cpu).unwrap(),
            ))
        });
        assert_bad(
            &d.load_err(),
            &["id_projector.safetensors", "unexpected", "3.weight"],
        );

        // A cross-attention width in the json that the bases do not have.
        let d = TmpFolder::copy("json");
        let text = std::fs::read_to_string(d.path(folder::MODULES_JSON)).unwrap();
        let text = text.replacen(
            "\"cross_attention_dim\": 32",
            "\"cross_attention_dim\": 2048",
            1,
        );
        std::fs::write(d.path(folder::MODULES_JSON), text).unwrap();
        assert_bad(
            &d.load_err(),
            &[
                "1.to_k.id_down_basis",
                "[5, 32, 4]",
                "[5, 2048, 4]",
                "cross_attention_dim 2048",
            ],
        );

        // One module too many in the json: the latents no longer fit.
        let d = TmpFolder::copy("count");
        let text = std::fs::read_to_string(d.path(folder::MODULES_JSON)).unwrap();
        let text = text.replacen(
            '{',
            "{\n  \"lora_unet_extra_attn1\": {\"hidden_size\": 32, \"cross_attention_dim\": null},",
            1,
        );
        std::fs::write(d.path(folder::MODULES_JSON), text).unwrap();
        assert_bad(
            &d.load_err(),
            &["resampler.safetensors", "latents", "35 modules", "280"],
        );

        // A config that contradicts the shapes.
        let d = TmpFolder::copy("config");
        std::fs::write(
            d.path(folder::CONFIG_FILE),
            r#"{"lora_rank": 8, "resampler": {"dim_head": 20}}"#,
        )
        .unwrap();
        assert_bad(
            &d.load_err(),
            &[
                "hyper_lora_modules.safetensors",
                "lora_rank = 8",
                "0.to_q.id_down_basis",
            ],
        );
        std::fs::write(
            d.path(folder::CONFIG_FILE),
            r#"{"resampler": {"dim_head": 20, "depth": 4}}"#,
        )
        .unwrap();
        assert_bad(&d.load_err(), &["resampler.safetensors", "depth = 4"]);
        std::fs::write(
            d.path(folder::CONFIG_FILE),
            r#"{"resampler": {"dimhead": 20}}"#,
        )
        .unwrap();
        assert_eq!(d.load_err().code, ErrorCode::InvalidArgument);
    }

    #[test]
    fn modules_json_keeps_document_order() {
        let m = folder::parse_modules_json(
            r#"{"z_attn1": {"hidden_size": 640, "cross_attention_dim": null},
                "a_attn2": {"hidden_size": 640, "cross_attention_dim": 2048}}"#,
        )
        .unwrap();
        assert_eq!(m[0].name, "z_attn1");
        assert_eq!(m[1].in_out(Proj::K), (2048, 640));
        assert_eq!(m[0].in_out(Proj::V), (640, 640));
        for bad in [
            "[]",
            "{}",
            r#"{"a": {"hidden_size": 0}}"#,
            r#"{"a": {"cross_attention_dim": 3}}"#,
            r#"{"a": {"hidden_size": 4}, "a": {"hidden_size": 4}}"#,
        ] {
            assert_eq!(
                folder::parse_modules_json(bad).unwrap_err().code,
                ErrorCode::BadWeights,
                "{bad}"
            );
        }
    }
}
