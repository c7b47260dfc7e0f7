//! Fuzz targets: every loader a user's file or string reaches, each fed one byte string.
//!
//! Shared by the bounded fuzzer (`src/main.rs`, run by `bench/fuzz.sh`) and the replay test
//! below, which runs every input kept in `corpus/<target>/` through its target. Only the
//! engine's public API is used: the targets reach what a program using the crate reaches.
//! A crash is a panic, an `INTERNAL` error or a broken invariant (reported as `INTERNAL` too):
//! every malformed input must come back as a coded error (`BAD_WEIGHTS`, `INVALID_ARGUMENT`, ...).
//!
//! An input is the bytes of one file (or one prompt). Where a target covers several files, the
//! first byte picks which one ([`Target::variants`], modulo their number) and the rest is the
//! file. Loaders that take paths read the bytes from a scratch copy of the tiny model folder in
//! which only that file is replaced.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use candle_core::{DType, Device, Tensor};

use hyperlora::clip::text::ClipTextConfig;
use hyperlora::clip::vision::ClipVisionModel;
use hyperlora::face::{ArcFaceModel, Detection, Detector, LandmarkModel};
use hyperlora::hypernet::HyperLora;
use hyperlora::image::RgbImage;
use hyperlora::instantid;
use hyperlora::lora::{read_lora_file, KohyaLora, LoraLayer};
use hyperlora::sdxl::model::{unet, vae};
use hyperlora::sdxl::pipeline::{GenerateParams, LoadOptions, SdxlPipeline};
use hyperlora::sdxl::sampling::sampler::{Sampler, SchedulerConfig, SigmaSchedule};
use hyperlora::sdxl::text::prompt::{tokenize_sdxl, PromptOptions, SdxlPromptChunks};
use hyperlora::sdxl::text::tokenizer::{ClipTokenizer, CONTEXT_LENGTH};
use hyperlora::task::CancelToken;
use hyperlora::weights::inspect::{inspect_safetensors, InspectOptions};
use hyperlora::weights::{pickle, torch_checkpoint};
use hyperlora::weights::{Component, ComponentFiles, ModelSource, SingleFileCheckpoint};
use hyperlora::{Error, ErrorCode, Result};

/// An input class of the fuzzer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Target {
    /// Any `.safetensors` file: `weights::inspect`, single-file checkpoints (open, every tensor
    /// through the var builders, the whole pipeline load) and diffusers component weights.
    Safetensors,
    /// The JSON configs of a diffusers SDXL folder and of a CLIP vision folder.
    Configs,
    /// The antelopev2 ONNX graphs (load, then one run on a small picture).
    Onnx,
    /// LoRA files of every kind (LoRA, LoCon, LoHa, LoKr, diff): `read_lora_file`,
    /// `KohyaLora::load`, then applied to the tiny SDXL.
    Lora,
    /// The HyperLoRA folder's files (JSON and safetensors), then one identity LoRA.
    Hyperlora,
    /// Prompt strings (bytes decoded lossily as UTF-8): A1111 parsing + both CLIP tokenizers.
    Prompts,
    /// PyTorch checkpoints (`torch.save` zips, e.g. InstantID's `ip-adapter.bin`): the whole
    /// file through `weights::torch_checkpoint` and InstantID's image projection (variant 0),
    /// or a `data.pkl` alone through the refusing pickle VM (variant 1; the zip's CRC would
    /// stop most mutations of a pickle inside a zip).
    Torch,
}

impl Target {
    pub const ALL: [Target; 7] = [
        Target::Safetensors,
        Target::Configs,
        Target::Onnx,
        Target::Lora,
        Target::Hyperlora,
        Target::Prompts,
        Target::Torch,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Target::Safetensors => "safetensors",
            Target::Configs => "configs",
            Target::Onnx => "onnx",
            Target::Lora => "lora",
            Target::Hyperlora => "hyperlora",
            Target::Prompts => "prompts",
            Target::Torch => "torch",
        }
    }

    pub fn parse(name: &str) -> Option<Target> {
        Target::ALL.into_iter().find(|t| t.name() == name)
    }

    /// The files a leading variant byte chooses between; empty: the input is the whole file.
    pub fn variants(self) -> &'static [&'static str] {
        match self {
            Target::Configs => &CONFIG_FILES,
            Target::Onnx => &ONNX_FILES,
            Target::Hyperlora => &HYPERLORA_FILES,
            Target::Torch => &TORCH_FILES,
            Target::Safetensors | Target::Lora | Target::Prompts => &[],
        }
    }

    /// `(variant index, file bytes)` of an input.
    pub fn split(self, input: &[u8]) -> (usize, &[u8]) {
        let n = self.variants().len();
        match input.split_first() {
            Some((&v, rest)) if n > 0 => (v as usize % n, rest),
            _ => (0, input),
        }
    }

    /// The real files this target's inputs start from: (variant, path).
    pub fn seeds(self) -> Vec<(usize, PathBuf)> {
        let tiny = repo_root().join("models/tiny");
        let fixtures = fixtures_dir();
        let indexed = |dir: PathBuf, files: &[&str]| {
            files
                .iter()
                .enumerate()
                .map(|(i, f)| (i, dir.join(f)))
                .collect::<Vec<_>>()
        };
        match self {
            Target::Safetensors => {
                let mut files = Vec::new();
                for dir in [tiny.clone(), fixtures] {
                    collect_files(&dir, "safetensors", &mut files);
                }
                files.into_iter().map(|p| (0, p)).collect()
            }
            Target::Configs => CONFIG_FILES
                .iter()
                .enumerate()
                .map(|(i, f)| (i, tiny.join(f)))
                .collect(),
            Target::Onnx => indexed(tiny.join("antelopev2"), &ONNX_FILES),
            Target::Lora => {
                let mut files = Vec::new();
                // LoRA, LoCon, LoHa, LoKr and diff modules, text encoders, unknown keys.
                for stage in ["lora_apply", "lora_kinds"] {
                    collect_files(&fixtures.join(stage), "safetensors", &mut files);
                }
                files.retain(|p| !p.ends_with("expected.safetensors"));
                for f in ["id_lora_n1.safetensors", "base_lora_n1.safetensors"] {
                    files.push(fixtures.join("hyperlora").join(f));
                }
                files.into_iter().map(|p| (0, p)).collect()
            }
            Target::Hyperlora => indexed(tiny.join("hyperlora"), &HYPERLORA_FILES),
            // Prompt seeds are strings; the fuzzer has its own list.
            Target::Prompts => Vec::new(),
            Target::Torch => {
                let f = fixtures.join("instantid");
                vec![
                    (0, tiny.join("instantid/ip-adapter.bin")),
                    (0, f.join("views.bin")),
                    (1, f.join("ip-adapter.pkl")),
                    (1, f.join("views.pkl")),
                ]
            }
        }
    }
}

/// Config files under `models/tiny/`, by variant.
const CONFIG_FILES: [&str; 9] = [
    "sdxl/unet/config.json",
    "sdxl/vae/config.json",
    "sdxl/text_encoder/config.json",
    "sdxl/text_encoder_2/config.json",
    "sdxl/model_index.json",
    "sdxl/scheduler/scheduler_config.json",
    "sdxl/tokenizer/tokenizer_config.json",
    "sdxl/tokenizer/special_tokens_map.json",
    "clip-vision/config.json",
];

const ONNX_FILES: [&str; 3] = ["scrfd_10g_bnkps.onnx", "2d106det.onnx", "glintr100.onnx"];

const TORCH_FILES: [&str; 2] = ["checkpoint.bin", "data.pkl"];

const HYPERLORA_FILES: [&str; 6] = [
    "hyper_lora_config.json",
    "hyper_lora_modules.json",
    "hyper_lora_modules.safetensors",
    "resampler.safetensors",
    "id_projector.safetensors",
    "base_resampler.safetensors",
];

fn crate_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn repo_root() -> PathBuf {
    crate_root().join("../..")
}

/// `crates/hyperlora-fuzz/corpus`: the kept inputs, one folder per target.
pub fn corpus_dir() -> PathBuf {
    crate_root().join("corpus")
}

/// `crates/hyperlora/tests/fixtures`: the engine's parity fixtures, which seed some targets.
pub fn fixtures_dir() -> PathBuf {
    repo_root().join("crates/hyperlora/tests/fixtures")
}

fn collect_files(dir: &Path, ext: &str, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut paths: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    paths.sort();
    for p in paths {
        if p.is_dir() {
            collect_files(&p, ext, out);
        } else if p.extension().is_some_and(|e| e == ext) {
            out.push(p);
        }
    }
}

/// Replaces `path` with a new file holding `bytes`. The old entry is removed first: scratch
/// folders hard-link the tiny models, and writing through a link would change the original.
fn replace_file(path: &Path, bytes: &[u8]) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e.into()),
    }
    std::fs::write(path, bytes).map_err(|e| Error::internal(format!("fuzz scratch: {e}")))
}

/// Copies a folder tree, hard-linking files where the file system allows.
fn mirror_tree(src: &Path, dst: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dst)?;
    for entry in std::fs::read_dir(src)? {
        let entry = entry?;
        let (from, to) = (entry.path(), dst.join(entry.file_name()));
        if from.is_dir() {
            mirror_tree(&from, &to)?;
        } else if !to.exists() && std::fs::hard_link(&from, &to).is_err() {
            std::fs::copy(&from, &to)?;
        }
    }
    Ok(())
}

/// Keeps the first error, preferring `INTERNAL` (a crash) over any coded error, so that a
/// later step's crash is not hidden by an earlier step's expected refusal.
fn combine(results: impl IntoIterator<Item = Result<()>>) -> Result<()> {
    let mut first: Option<Error> = None;
    for r in results {
        if let Err(e) = r {
            if e.code == ErrorCode::Internal {
                return Err(e);
            }
            first.get_or_insert(e);
        }
    }
    first.map_or(Ok(()), Err)
}

fn broken(what: impl std::fmt::Display) -> Error {
    Error::internal(format!("invariant broken: {what}"))
}

/// Runs inputs through the targets. Models the targets share (tokenizers, the tiny SDXL that
/// LoRAs are applied to) load once; scratch folders live under `scratch`.
pub struct Harness {
    scratch: PathBuf,
    mirrors: Mutex<HashSet<String>>,
    tokenizers: OnceLock<[ClipTokenizer; 2]>,
    pipeline: OnceLock<Mutex<SdxlPipeline>>,
}

impl Harness {
    pub fn new(scratch: impl Into<PathBuf>) -> Self {
        Self {
            scratch: scratch.into(),
            mirrors: Mutex::new(HashSet::new()),
            tokenizers: OnceLock::new(),
            pipeline: OnceLock::new(),
        }
    }

    /// Loads what `target` shares between inputs, so that a setup failure is not blamed on
    /// the first input (and the first input is not slower than the others).
    pub fn warm(&self, target: Target) {
        match target {
            Target::Prompts => {
                self.tokenizers();
            }
            Target::Lora | Target::Hyperlora | Target::Configs => {
                self.pipeline();
            }
            Target::Safetensors | Target::Onnx | Target::Torch => {}
        }
    }

    fn tokenizers(&self) -> &[ClipTokenizer; 2] {
        self.tokenizers.get_or_init(|| {
            let dir = repo_root().join("models/tiny/sdxl");
            [
                ClipTokenizer::from_dir(dir.join("tokenizer")).expect("tiny tokenizer"),
                ClipTokenizer::from_dir(dir.join("tokenizer_2")).expect("tiny tokenizer_2"),
            ]
        })
    }

    fn pipeline(&self) -> &Mutex<SdxlPipeline> {
        self.pipeline.get_or_init(|| {
            let dir = repo_root().join("models/tiny/sdxl");
            let p = SdxlPipeline::load(&dir, &LoadOptions::default(), &Device::Cpu, DType::F32)
                .expect("tiny SDXL");
            Mutex::new(p)
        })
    }

    /// `scratch/<name>`: a mirror of `models/tiny/<name>` made on first use.
    fn mirror(&self, name: &str) -> Result<PathBuf> {
        let dst = self.scratch.join("mirror").join(name);
        let mut made = self.mirrors.lock().unwrap_or_else(|p| p.into_inner());
        if !made.contains(name) {
            let src = repo_root().join("models/tiny").join(name);
            mirror_tree(&src, &dst)
                .map_err(|e| Error::internal(format!("fuzz scratch {}: {e}", dst.display())))?;
            made.insert(name.to_string());
        }
        Ok(dst)
    }

    /// `scratch/<name>/`, created empty if needed.
    fn dir(&self, name: &str) -> Result<PathBuf> {
        let dir = self.scratch.join(name);
        std::fs::create_dir_all(&dir)
            .map_err(|e| Error::internal(format!("fuzz scratch {}: {e}", dir.display())))?;
        Ok(dir)
    }

    /// Runs one input. `Err` with code `INTERNAL` is a crash, as is a panic (not caught here).
    pub fn run(&self, target: Target, input: &[u8]) -> Result<()> {
        let (variant, bytes) = target.split(input);
        match target {
            Target::Safetensors => self.safetensors(bytes),
            Target::Configs => self.config(variant, bytes),
            Target::Onnx => self.onnx(variant, bytes),
            Target::Lora => self.lora(bytes),
            Target::Hyperlora => self.hyperlora(variant, bytes),
            Target::Prompts => self.prompt(&String::from_utf8_lossy(bytes)),
            Target::Torch => self.torch(variant, bytes),
        }
    }

    fn torch(&self, variant: usize, bytes: &[u8]) -> Result<()> {
        if variant == 1 {
            return pickle::load(bytes).map(drop);
        }
        let dir = self.dir("torch")?;
        let file = dir.join(TORCH_FILES[0]);
        replace_file(&file, bytes)?;
        let tensors = torch_checkpoint::load(&file, &Device::Cpu)?;
        let proj = instantid::Resampler::from_checkpoint(&tensors, DType::F32, &Device::Cpu)?;
        let c = *proj.config();
        // One projection when the sizes are small enough to run quickly.
        if c.dim * c.depth * c.ff_mult <= 1 << 12 && c.num_queries <= 64 && c.heads <= 64 {
            let emb = vec![0.5f32; c.embedding_dim];
            let (neg, pos) = instantid::face_tokens(&proj, &emb)?;
            if neg.dims() != [1, c.num_queries, c.output_dim] || neg.dims() != pos.dims() {
                return Err(broken(format!("face tokens of shape {:?}", pos.dims())));
            }
        }
        Ok(())
    }

    fn safetensors(&self, bytes: &[u8]) -> Result<()> {
        let dir = self.dir("safetensors")?;
        let file = dir.join("model.safetensors");
        replace_file(&file, bytes)?;
        let inspected = inspect_safetensors(
            &file,
            InspectOptions::default(),
            &CancelToken::new(),
            &mut |_| {},
        )
        .map(drop);
        let single = match ModelSource::open(&file) {
            Ok(ModelSource::SingleFile(ckpt)) => self.single_file(&ckpt, &file),
            Ok(ModelSource::Diffusers(_)) => Err(broken("a file opened as a diffusers folder")),
            Err(e) => Err(e),
        };
        // The same bytes as the weights of a diffusers UNet folder.
        let unet = dir.join("unet");
        std::fs::create_dir_all(&unet)?;
        let config = repo_root().join("models/tiny/sdxl/unet/config.json");
        replace_file(&unet.join("config.json"), &std::fs::read(config)?)?;
        replace_file(&unet.join("diffusion_pytorch_model.safetensors"), bytes)?;
        let component = (|| {
            let files = ComponentFiles::locate(&unet, Component::Unet, None)?;
            let vb = files.var_builder(DType::F32, &Device::Cpu)?;
            for name in files.tensor_names()? {
                vb.get_unchecked(&name)?;
            }
            Ok(())
        })();
        combine([inspected, single, component])
    }

    /// Every tensor of every component through its var builder, then the whole pipeline.
    fn single_file(&self, ckpt: &SingleFileCheckpoint, file: &Path) -> Result<()> {
        for c in Component::ALL {
            let Some(table) = ckpt.table(c) else { continue };
            let vb = ckpt.var_builder(c, DType::F32, &Device::Cpu)?;
            for key in ckpt
                .keys()
                .into_iter()
                .filter(|k| k.starts_with(c.sgm_prefix()))
            {
                for (name, _) in table.to_diffusers(key) {
                    let _ = ckpt.shape(c, &name);
                    vb.get_unchecked(&name)?;
                }
            }
        }
        let options = LoadOptions {
            config_dir: Some(repo_root().join("models/tiny/sdxl")),
            merges_file: None,
        };
        SdxlPipeline::load(file, &options, &Device::Cpu, DType::F32).map(drop)
    }

    fn config(&self, variant: usize, bytes: &[u8]) -> Result<()> {
        let rel = CONFIG_FILES[variant];
        let (model, inner) = rel.split_once('/').expect("model/file");
        let root = self.mirror(model)?;
        let file = root.join(inner);
        replace_file(&file, bytes)?;
        let result = self.config_in(&root, variant, bytes);
        // Put the original back for the next input.
        let original = repo_root().join("models/tiny").join(rel);
        replace_file(&file, &std::fs::read(original)?)?;
        result
    }

    fn config_in(&self, root: &Path, variant: usize, bytes: &[u8]) -> Result<()> {
        let text = std::str::from_utf8(bytes).ok();
        // The parsers alone first (cheap); the full load only for configs they accept, and for
        // undecodable text, whose error the loader itself must report.
        let parsed = match (variant, text) {
            (_, None) => Ok(()),
            (0, Some(t)) => unet::Config::from_json_str(t).map(drop),
            (1, Some(t)) => vae::Config::from_json_str(t).map(drop),
            (2 | 3, Some(t)) => ClipTextConfig::from_json(t).map(drop),
            (5, Some(t)) => SchedulerConfig::from_json_str(t).map(drop),
            _ => Ok(()),
        };
        if parsed
            .as_ref()
            .is_err_and(|e| e.code != ErrorCode::Internal)
        {
            return parsed;
        }
        parsed?;
        match variant {
            6 | 7 => {
                let t = ClipTokenizer::from_dir(root.join("tokenizer"))?;
                let ids = t.encode("a photo of a cat, <|endoftext|> !");
                if ids.is_empty() {
                    return Err(broken("a prompt tokenized to nothing"));
                }
                Ok(())
            }
            8 => {
                let model = ClipVisionModel::load_dir(root, DType::F32, &Device::Cpu)?;
                let size = model.config().image_size;
                if size <= 256 {
                    let pixels = Tensor::zeros((1, 3, size, size), DType::F32, &Device::Cpu)?;
                    model.forward(&pixels)?;
                }
                Ok(())
            }
            _ => {
                let p =
                    SdxlPipeline::load(root, &LoadOptions::default(), &Device::Cpu, DType::F32)?;
                let params = GenerateParams {
                    prompt: "a photo of a cat".into(),
                    width: 64,
                    height: 64,
                    steps: 1,
                    sampler: Sampler::Euler,
                    schedule: SigmaSchedule::Normal,
                    ..GenerateParams::default()
                };
                p.generate(&params, &CancelToken::new(), &mut |_| {})
                    .map(drop)
            }
        }
    }

    fn onnx(&self, variant: usize, bytes: &[u8]) -> Result<()> {
        let dir = self.dir("onnx")?;
        let file = dir.join(ONNX_FILES[variant]);
        replace_file(&file, bytes)?;
        let gray = |w: usize, h: usize| RgbImage {
            width: w,
            height: h,
            data: vec![128; w * h * 3],
        };
        match variant {
            0 => {
                let detector = Detector::load(&file)?;
                detector.detect(&gray(48, 40), 64).map(drop)
            }
            1 => {
                let model = LandmarkModel::load(&file)?;
                let face = Detection {
                    bbox: [8.0, 8.0, 40.0, 40.0],
                    score: 0.9,
                    kps: [[16.0, 16.0]; 5],
                };
                model.landmarks(&gray(48, 48), &face).map(drop)
            }
            _ => {
                let model = ArcFaceModel::load(&file)?;
                model.embed_aligned(&gray(112, 112)).map(drop)
            }
        }
    }

    fn lora(&self, bytes: &[u8]) -> Result<()> {
        let dir = self.dir("lora")?;
        let file = dir.join("lora.safetensors");
        replace_file(&file, bytes)?;
        let any = read_lora_file(&file, &Device::Cpu).and_then(|l| self.apply(&l.layers));
        // The strict kohya reader refuses most layouts: only its crashes count.
        let kohya = KohyaLora::load(&file, &Device::Cpu)
            .and_then(|l| l.to_layers())
            .and_then(|layers| self.apply(&layers));
        match kohya {
            Err(e) if e.code == ErrorCode::Internal => Err(e),
            _ => any,
        }
    }

    /// Applies `layers` to the tiny SDXL, then restores it.
    fn apply(&self, layers: &[LoraLayer]) -> Result<()> {
        let mut p = self.pipeline().lock().unwrap_or_else(|p| p.into_inner());
        let applied = p.set_loras(&[(layers, 0.8)]).map(drop);
        let restored = p.set_loras(&[]).map(drop);
        combine([applied, restored])
    }

    fn hyperlora(&self, variant: usize, bytes: &[u8]) -> Result<()> {
        let root = self.mirror("hyperlora")?;
        let file = root.join(HYPERLORA_FILES[variant]);
        replace_file(&file, bytes)?;
        let result = self.hyperlora_in(&root);
        // Put the original back for the next input.
        let original = repo_root()
            .join("models/tiny/hyperlora")
            .join(HYPERLORA_FILES[variant]);
        replace_file(&file, &std::fs::read(original)?)?;
        result
    }

    fn hyperlora_in(&self, root: &Path) -> Result<()> {
        let h = HyperLora::load(root, DType::F32, &Device::Cpu)?;
        let cpu = &Device::Cpu;
        let id = match h.config().id_embed_dim {
            Some(d) if h.uses_id_embeds() => Some(Tensor::ones((1, d), DType::F32, cpu)?),
            _ => None,
        };
        let clip = if h.uses_clip() {
            let t = Tensor::ones((1, 5, h.clip_hidden_size()), DType::F32, cpu)?;
            Some((t * 0.1)?)
        } else {
            None
        };
        let base = match &h.config().base_resampler {
            Some(s) => Some(Tensor::ones((1, 5, s.embedding_dim), DType::F32, cpu)?),
            None => None,
        };
        let out = h.create_lora(id.as_ref(), clip.as_ref(), base.as_ref())?;
        let mut layers = out.id.to_layers()?;
        if let Some(b) = out.base {
            layers.extend(b.to_layers()?);
        }
        self.apply(&layers)
    }

    fn prompt(&self, prompt: &str) -> Result<()> {
        let [t1, t2] = self.tokenizers();
        for emphasis in [true, false] {
            let options = PromptOptions {
                emphasis,
                ..PromptOptions::default()
            };
            let chunks = tokenize_sdxl([t1, t2], prompt, "", &options)?;
            check_chunks(&chunks)?;
        }
        Ok(())
    }
}

/// What the text encoders rely on: four chunk lists of one length, windows starting with BOS,
/// ids inside the vocabulary, finite weights (the embeddings are multiplied by them).
fn check_chunks(chunks: &SdxlPromptChunks) -> Result<()> {
    let n = chunks.len();
    for c in chunks.positive.iter().chain(chunks.negative.iter()) {
        if c.len() != n || c.ids.len() != c.weights.len() || n == 0 {
            return Err(broken(format!("chunk counts {} / {}", c.len(), n)));
        }
        for (ids, weights) in c.ids.iter().zip(&c.weights) {
            if ids.len() != CONTEXT_LENGTH || ids[0] != hyperlora::sdxl::text::tokenizer::BOS_ID {
                return Err(broken("a window does not start with BOS"));
            }
            if ids
                .iter()
                .any(|&id| id as usize >= hyperlora::sdxl::text::tokenizer::VOCAB_SIZE)
            {
                return Err(broken("a token id outside the vocabulary"));
            }
            if let Some(w) = weights.iter().find(|w| !w.is_finite()) {
                return Err(broken(format!("prompt weight {w}")));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    /// Every kept input (crashes the fuzzer found, now fixed, and hand-made hostile files)
    /// comes back as `Ok` or a coded error, never a panic or `INTERNAL`.
    #[test]
    fn corpus_replays_without_crashing() {
        let scratch = std::env::temp_dir().join(format!("hyperlora-fuzz-{}", std::process::id()));
        let harness = Harness::new(&scratch);
        let start = Instant::now();
        let mut failures = Vec::new();
        let mut replayed = 0;
        for target in Target::ALL {
            let mut files = Vec::new();
            collect_files(&corpus_dir().join(target.name()), "bin", &mut files);
            if files.is_empty() {
                continue;
            }
            harness.warm(target);
            for file in files {
                let input = std::fs::read(&file).unwrap();
                let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    harness.run(target, &input)
                }));
                replayed += 1;
                match outcome {
                    Ok(Err(e)) if e.code == ErrorCode::Internal => {
                        failures.push(format!("{}: {e}", file.display()))
                    }
                    Ok(_) => {}
                    Err(_) => failures.push(format!("{}: panicked", file.display())),
                }
            }
        }
        let _ = std::fs::remove_dir_all(&scratch);
        eprintln!("replayed {replayed} corpus inputs in {:?}", start.elapsed());
        // A corpus that is not where it is looked for must not pass as "nothing crashed".
        assert!(replayed > 0, "no inputs under {}", corpus_dir().display());
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }
}
