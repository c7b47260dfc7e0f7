//! A session: one SDXL pipeline and the decisions about how requests run on it — which LoRA set
//! is merged into its weights, and which requests share a UNet batch. Node.js and Rust users go
//! through the same code, so they get the same images and the same batching.
//!
//! LoRAs are named by stable ids, never by comparing tensors: an identity (any LoRA held in
//! memory) gets a process-unique id when it is wrapped in a [`HeldLora`]; a LoRA file is named by
//! its path. The merged set is remembered, so a request with the set already merged merges
//! nothing, and switching merges only what changes (the base weights stay resident).
//!
//! Seeds: image `k` of a request is drawn from `seed + k` (wrapping at 2^64), as A1111 numbers a
//! batch, so every image has a seed that redraws it alone. (The pipeline's own `generate` seeds
//! one generator for the whole batch, as diffusers does; the session runs a batch as one
//! single-image request per seed, still sharing every UNet call.)
//!
//! Batching ([`plan_batches`], [`Session::generate_many`]): requests that share width, height,
//! steps, cfg, sampler, sigma schedule, LoRA files and ControlNets (model, strength, window; the
//! control images may differ), without an init image, run as one UNet batch; their identities may differ (each sample gets its own identity's low-rank update, see
//! [`crate::sdxl::batch`]). When every request of a batch has the same identities they are
//! merged with the files instead, which needs no per-sample side path.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::image::RgbImage;
use crate::lora::{read_lora_file, summarize_skipped, KohyaLora, LoraLayer, SkippedKey};
use crate::sdxl::batch::BatchRequest;
use crate::sdxl::pipeline::{GenerateParams, SdxlPipeline};
use crate::task::{CancelToken, Progress, ProgressFn};

/// The weight of an identity when the request names none: the HyperLoRA authors' recommendation.
pub const DEFAULT_IDENTITY_WEIGHT: f64 = 0.85;

/// A seed for a request that gave none: random, and below 2^48 so that JavaScript numbers hold
/// it exactly.
pub fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    // `RandomState` keys come from the OS's randomness and change with every instance.
    std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish()
        >> 16
}

/// A LoRA held in memory (an identity, a blend of identities) with a process-unique id.
#[derive(Clone, Debug)]
pub struct HeldLora {
    id: u64,
    lora: Arc<KohyaLora>,
}

impl HeldLora {
    pub fn new(lora: KohyaLora) -> Self {
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        Self {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            lora: Arc::new(lora),
        }
    }

    /// The id two handles of the same LoRA share.
    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn lora(&self) -> &KohyaLora {
        &self.lora
    }
}

/// Where a LoRA of a set comes from.
#[derive(Clone, Debug)]
pub enum LoraSource {
    Held(HeldLora),
    File(PathBuf),
}

impl PartialEq for LoraSource {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::Held(a), Self::Held(b)) => a.id == b.id,
            (Self::File(a), Self::File(b)) => a == b,
            _ => false,
        }
    }
}

/// One LoRA of a set with its weight (negative weights subtract: concept sliders).
#[derive(Clone, Debug)]
pub struct LoraUse {
    pub source: LoraSource,
    pub weight: f32,
}

impl PartialEq for LoraUse {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source && self.weight.to_bits() == other.weight.to_bits()
    }
}

impl LoraUse {
    pub fn held(lora: &HeldLora, weight: f32) -> Self {
        Self {
            source: LoraSource::Held(lora.clone()),
            weight,
        }
    }

    pub fn file(path: impl Into<PathBuf>, weight: f32) -> Self {
        Self {
            source: LoraSource::File(path.into()),
            weight,
        }
    }

    /// The LoRA's layers, its name for messages, and the keys its file holds that are no LoRA
    /// module.
    fn read(&self, pipeline: &SdxlPipeline) -> Result<(String, Vec<LoraLayer>, Vec<SkippedKey>)> {
        match &self.source {
            LoraSource::Held(held) => Ok(("identity".into(), held.lora.to_layers()?, Vec::new())),
            LoraSource::File(path) => {
                let parsed = read_lora_file(path, pipeline.device())?;
                let name = path.file_name().map_or_else(
                    || path.display().to_string(),
                    |n| n.to_string_lossy().into_owned(),
                );
                Ok((name, parsed.layers, parsed.skipped))
            }
        }
    }
}

/// One generation request: its parameters, its identities and the LoRA files it applies.
#[derive(Clone, Debug)]
pub struct Request {
    pub params: GenerateParams,
    /// Identities (or other held LoRAs) with their weights: in a batch, each request keeps its
    /// own.
    pub identities: Vec<(HeldLora, f32)>,
    /// Style LoRA files with their weights: a batch shares them.
    pub files: Vec<(PathBuf, f32)>,
}

impl Request {
    pub fn new(params: GenerateParams) -> Self {
        Self {
            params,
            identities: Vec::new(),
            files: Vec::new(),
        }
    }

    fn identity_set(&self) -> Vec<LoraUse> {
        self.identities
            .iter()
            .map(|(lora, weight)| LoraUse::held(lora, *weight))
            .collect()
    }

    fn file_set(&self) -> Vec<LoraUse> {
        self.files
            .iter()
            .map(|(path, weight)| LoraUse::file(path.clone(), *weight))
            .collect()
    }

    /// One single-image request per image, image `k` seeded with `seed + k`.
    fn per_image(&self) -> Vec<Request> {
        (0..self.params.batch_size.max(1))
            .map(|k| Request {
                params: GenerateParams {
                    seed: self.params.seed.wrapping_add(k as u64),
                    batch_size: 1,
                    ..self.params.clone()
                },
                ..self.clone()
            })
            .collect()
    }

    /// Identities first, then files: the set merged when the request runs alone.
    pub fn lora_set(&self) -> Vec<LoraUse> {
        let mut set = self.identity_set();
        set.extend(self.file_set());
        set
    }

    /// Whether `other` can share this request's UNet batch.
    fn batches_with(&self, other: &Request) -> bool {
        let (a, b) = (&self.params, &other.params);
        a.init_image.is_none()
            && b.init_image.is_none()
            && a.width == b.width
            && a.height == b.height
            && a.steps == b.steps
            && a.guidance_scale.to_bits() == b.guidance_scale.to_bits()
            && a.sampler == b.sampler
            && a.schedule == b.schedule
            && self.file_set() == other.file_set()
            && a.controlnets.len() == b.controlnets.len()
            && a.controlnets
                .iter()
                .zip(&b.controlnets)
                .all(|(x, y)| x.same_settings(y))
    }
}

/// Splits `requests` into batches to run one after the other: each batch holds requests that can
/// share a UNet batch (see the module docs) and at most `max_images` images, unless a single
/// request alone has more. Requests keep their order inside a batch; batches come in the order
/// of their first request. Returns indices into `requests`.
pub fn plan_batches(requests: &[Request], max_images: usize) -> Vec<Vec<usize>> {
    let max_images = max_images.max(1);
    let mut batches: Vec<(Vec<usize>, usize)> = Vec::new();
    // The open batch of each compatibility group: the last one with its first member.
    let mut open: Vec<usize> = Vec::new();
    for (i, request) in requests.iter().enumerate() {
        let images = request.params.batch_size;
        let slot = open
            .iter()
            .position(|&b| requests[batches[b].0[0]].batches_with(request));
        match slot {
            Some(s) if batches[open[s]].1 + images <= max_images => {
                let batch = &mut batches[open[s]];
                batch.0.push(i);
                batch.1 += images;
            }
            Some(s) => {
                batches.push((vec![i], images));
                open[s] = batches.len() - 1;
            }
            None => {
                batches.push((vec![i], images));
                open.push(batches.len() - 1);
            }
        }
    }
    batches.into_iter().map(|(b, _)| b).collect()
}

/// An SDXL pipeline with its merged LoRA set.
pub struct Session {
    pipeline: SdxlPipeline,
    /// The merged set; `None` while unknown (a merge failed or panicked half-way), so the next
    /// activation merges again from the resident base weights.
    active: Option<Vec<LoraUse>>,
    /// What merging the active set left out, one line per LoRA.
    warnings: Vec<String>,
}

impl Session {
    pub fn new(pipeline: SdxlPipeline) -> Self {
        Self {
            pipeline,
            active: Some(Vec::new()),
            warnings: Vec::new(),
        }
    }

    pub fn pipeline(&self) -> &SdxlPipeline {
        &self.pipeline
    }

    /// What merging the active set left out, one line per LoRA (see [`Session::activate`]): after
    /// a call, the warnings of its LoRA files.
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// Forgets which set is merged (after a panic interrupted a call holding the session), so
    /// the next call merges its set afresh.
    pub fn forget_active_set(&mut self) {
        self.active = None;
    }

    /// Makes `set` the merged LoRA set unless it already is. Returns one warning line per LoRA
    /// with keys that were left out (no LoRA module, no such layer in SDXL, or a shape that does
    /// not fit); a LoRA none of whose modules applies is `INVALID_ARGUMENT` naming it.
    pub fn activate(&mut self, set: &[LoraUse]) -> Result<Vec<String>> {
        if self.active.as_deref() == Some(set) {
            return Ok(self.warnings.clone());
        }
        let mut read = Vec::with_capacity(set.len());
        for lora in set {
            let (name, layers, skipped) = lora.read(&self.pipeline)?;
            let unfit = self.pipeline.unfit_lora_layers(&layers);
            if !layers.is_empty() && unfit.len() == layers.len() {
                return Err(Error::invalid_argument(format!(
                    "{name}: none of its {} LoRA modules fits a layer of this SDXL model ({})",
                    layers.len(),
                    summarize_skipped(&unfit)
                )));
            }
            read.push((name, layers, skipped));
        }
        let weighted: Vec<(&[LoraLayer], f32)> = read
            .iter()
            .zip(set)
            .map(|((_, layers, _), l)| (layers.as_slice(), l.weight))
            .collect();
        self.active = None;
        let left_out = self.pipeline.set_loras(&weighted)?;
        self.warnings = read
            .into_iter()
            .zip(left_out)
            .filter_map(|((name, _, mut skipped), unfit)| {
                skipped.extend(unfit);
                (!skipped.is_empty()).then(|| format!("{name}: {}", summarize_skipped(&skipped)))
            })
            .collect();
        self.active = Some(set.to_vec());
        Ok(self.warnings.clone())
    }

    /// Runs one request with its identities and files merged; image `k` from `seed + k`.
    pub fn generate(
        &mut self,
        request: &Request,
        cancel: &CancelToken,
        progress: ProgressFn<'_>,
    ) -> Result<Vec<RgbImage>> {
        let p = &request.params;
        if p.batch_size <= 1 {
            self.activate(&request.lora_set())?;
            return self.pipeline.generate(p, cancel, progress);
        }
        // Checked as one request, so errors read as they would for it (not `requests[k]: …`).
        self.pipeline.validate(p)?;
        let singles = request.per_image();
        if p.init_image.is_none() {
            return Ok(self
                .generate_batch(&singles, cancel, progress)?
                .into_iter()
                .flatten()
                .collect());
        }
        // Image-to-image does not batch: one image after another, one bar per stage across all.
        self.activate(&request.lora_set())?;
        let count = singles.len() as u64;
        let mut images = Vec::with_capacity(singles.len());
        for (k, single) in singles.iter().enumerate() {
            let mut scaled = |e: Progress| {
                progress(Progress {
                    stage: e.stage,
                    step: k as u64 * e.total + e.step,
                    total: count * e.total,
                })
            };
            images.extend(
                self.pipeline
                    .generate(&single.params, cancel, &mut scaled)?,
            );
        }
        Ok(images)
    }

    /// Runs requests that [`plan_batches`] put in one batch as one UNet batch; one list of
    /// images per request, in order. Each request's images equal what [`Session::generate`]
    /// gives it alone (up to rounding).
    pub fn generate_many(
        &mut self,
        requests: &[Request],
        cancel: &CancelToken,
        progress: ProgressFn<'_>,
    ) -> Result<Vec<Vec<RgbImage>>> {
        for (i, r) in requests.iter().enumerate() {
            self.pipeline
                .validate(&r.params)
                .map_err(|e| e.context(format!("requests[{i}]")))?;
            if r.file_set() != requests[0].file_set() {
                return Err(Error::invalid_argument(format!(
                    "requests[{i}] has other LoRA files than requests[0]: a batch shares its files (plan_batches groups requests that can share one)"
                )));
            }
        }
        let singles: Vec<Request> = requests.iter().flat_map(Request::per_image).collect();
        let mut images = self.generate_batch(&singles, cancel, progress)?.into_iter();
        Ok(requests
            .iter()
            .map(|r| {
                images
                    .by_ref()
                    .take(r.params.batch_size.max(1))
                    .flatten()
                    .collect()
            })
            .collect())
    }

    /// One UNet batch of requests, each with its own seeded generator.
    fn generate_batch(
        &mut self,
        requests: &[Request],
        cancel: &CancelToken,
        progress: ProgressFn<'_>,
    ) -> Result<Vec<Vec<RgbImage>>> {
        let Some(first) = requests.first() else {
            return Ok(Vec::new());
        };
        let same_identities = requests
            .iter()
            .all(|r| r.identity_set() == first.identity_set());
        if same_identities {
            self.activate(&first.lora_set())?;
            let batch: Vec<BatchRequest> = requests
                .iter()
                .map(|r| BatchRequest {
                    params: r.params.clone(),
                    loras: Vec::new(),
                })
                .collect();
            return self.pipeline.generate_many(&batch, cancel, progress);
        }
        self.activate(&first.file_set())?;
        // Each distinct identity's layers once: requests that share it share one slice, which
        // the batch keys its rows by.
        let mut distinct: Vec<(u64, Vec<LoraLayer>)> = Vec::new();
        for (held, _) in requests.iter().flat_map(|r| &r.identities) {
            if !distinct.iter().any(|(id, _)| *id == held.id) {
                distinct.push((held.id, held.lora.to_layers()?));
            }
        }
        let layers_of = |held: &HeldLora| {
            distinct
                .iter()
                .find(|(id, _)| *id == held.id)
                .map(|(_, layers)| layers.as_slice())
                .expect("collected above")
        };
        let batch: Vec<BatchRequest> = requests
            .iter()
            .map(|r| BatchRequest {
                params: r.params.clone(),
                loras: r
                    .identities
                    .iter()
                    .map(|(held, weight)| (layers_of(held), *weight))
                    .collect(),
            })
            .collect();
        self.pipeline.generate_many(&batch, cancel, progress)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor};

    use super::*;
    use crate::lora::{module_to_kohya, LoraComponent, LoraWeights};
    use crate::sdxl::sampling::noise::TorchGenerator;
    use crate::sdxl::sampling::sampler::Sampler;
    use crate::testing::{fixture, tiny_sdxl};

    /// An identity-like LoRA: rank 4 on every attention projection of the tiny UNet.
    fn identity(session: &Session, seed: u64) -> HeldLora {
        let mut g = TorchGenerator::new(seed);
        let mut lora = KohyaLora::new();
        for (module, linear) in session.pipeline().unet.linears() {
            if !module.contains(".attn") {
                continue;
            }
            let (out_f, in_f) = linear.weight().dims2().unwrap();
            let weights = LoraWeights {
                down: (g.randn((4, in_f)).unwrap() * 0.5).unwrap(),
                up: (g.randn((out_f, 4)).unwrap() * 0.5).unwrap(),
                alpha: 2.0,
            };
            let name = module_to_kohya(LoraComponent::Unet, &module);
            lora.insert(name, weights).unwrap();
        }
        HeldLora::new(lora)
    }

    fn params(width: usize, batch_size: usize) -> GenerateParams {
        GenerateParams {
            width,
            height: 64,
            steps: 2,
            batch_size,
            ..Default::default()
        }
    }

    #[test]
    fn plan_groups_compatible_requests_and_caps_images() {
        let a = HeldLora::new(KohyaLora::new());
        let b = HeldLora::new(KohyaLora::new());
        let mut requests: Vec<Request> = (0..6).map(|_| Request::new(params(64, 1))).collect();
        requests[1].identities = vec![(a.clone(), 0.85)];
        requests[2].identities = vec![(b, 0.85)];
        requests[3].params.width = 128; // another size: its own batch
        requests[4].files = vec![("style.safetensors".into(), 0.6)]; // other files
        requests[5].params.batch_size = 2;
        assert_eq!(
            plan_batches(&requests, 8),
            vec![vec![0, 1, 2, 5], vec![3], vec![4]]
        );
        // At most 3 images per batch: request 5 (2 images) opens a new batch.
        assert_eq!(
            plan_batches(&requests, 3),
            vec![vec![0, 1, 2], vec![3], vec![4], vec![5]]
        );
        // A sampler differs, or an init image: alone.
        requests[1].params.sampler = Sampler::Euler;
        requests[2].params.init_image = Some(crate::sdxl::pipeline::InitImage {
            image: RgbImage {
                width: 64,
                height: 64,
                data: vec![0; 64 * 64 * 3],
            },
            strength: 0.5,
        });
        assert_eq!(
            plan_batches(&requests, 8),
            vec![vec![0, 5], vec![1], vec![2], vec![3], vec![4]]
        );
    }

    #[test]
    fn a_batch_with_different_files_is_refused() {
        let mut session = Session::new(tiny_sdxl());
        let mut other = Request::new(params(64, 1));
        other.files = vec![("style.safetensors".into(), 0.6)];
        let err = session
            .generate_many(
                &[Request::new(params(64, 1)), other],
                &CancelToken::new(),
                &mut |_| {},
            )
            .unwrap_err();
        assert_eq!(err.code, crate::ErrorCode::InvalidArgument);
        assert!(err.message.starts_with("requests[1] has other LoRA files"));
    }

    #[test]
    fn sets_compare_by_id_and_weight() {
        let a = HeldLora::new(KohyaLora::new());
        let same_tensors = HeldLora::new(KohyaLora::new());
        assert_eq!(LoraUse::held(&a, 0.5), LoraUse::held(&a.clone(), 0.5));
        assert_ne!(LoraUse::held(&a, 0.5), LoraUse::held(&same_tensors, 0.5));
        assert_ne!(LoraUse::held(&a, 0.5), LoraUse::held(&a, 0.6));
        assert_eq!(LoraUse::file("x", 1.0), LoraUse::file("x", 1.0));
    }

    /// A LoRA that fits nothing, or a file that cannot be read, is refused and changes nothing;
    /// a set forgotten (after a panic) is merged afresh by the next call.
    #[test]
    fn refused_sets_change_nothing_and_a_forgotten_set_is_merged_again() {
        let mut session = Session::new(tiny_sdxl());
        let style = LoraUse::file(fixture("lora_apply", "kohya_diffusers.safetensors"), 0.6);
        session.activate(std::slice::from_ref(&style)).unwrap();
        let merged = session.pipeline().loras().merged_layers();
        // Readable, but its one module fits no layer.
        let mut misfit = KohyaLora::new();
        let (module, linear) = session
            .pipeline()
            .unet
            .linears()
            .into_iter()
            .next()
            .unwrap();
        let (out_f, in_f) = linear.weight().dims2().unwrap();
        let weights = LoraWeights {
            down: Tensor::zeros((4, in_f + 1), DType::F32, &Device::Cpu).unwrap(),
            up: Tensor::zeros((out_f, 4), DType::F32, &Device::Cpu).unwrap(),
            alpha: 4.0,
        };
        misfit
            .insert(module_to_kohya(LoraComponent::Unet, &module), weights)
            .unwrap();
        let misfit = HeldLora::new(misfit);
        let err = session
            .activate(&[LoraUse::held(&misfit, 1.0)])
            .unwrap_err();
        assert_eq!(err.code, crate::ErrorCode::InvalidArgument);
        let missing = LoraUse::file("/nonexistent/style.safetensors", 1.0);
        assert!(session.activate(&[missing]).is_err());
        assert_eq!(
            session.active.as_deref(),
            Some(std::slice::from_ref(&style))
        );
        assert_eq!(session.pipeline().loras().merged_layers(), merged);
        session.forget_active_set();
        session.activate(&[]).unwrap();
        assert_eq!(session.active.as_deref(), Some(&[][..]));
        assert_eq!(session.pipeline().loras().merged_layers(), 0);
    }

    /// Mixed identities in one batch, then one identity shared by the whole batch (merged, no
    /// side path): every request's images equal the request run alone.
    #[test]
    fn batches_equal_each_request_run_alone() {
        let mut session = Session::new(tiny_sdxl());
        let (x, y) = (identity(&session, 7), identity(&session, 8));
        let style = fixture("lora_apply", "kohya_diffusers.safetensors");
        let request = |seed: u64, identities: Vec<(HeldLora, f32)>| Request {
            params: GenerateParams {
                prompt: "a portrait".into(),
                seed,
                ..params(64, 1)
            },
            identities,
            files: vec![(style.clone(), 0.6)],
        };
        let mixed = [
            request(1, vec![(x.clone(), 0.85)]),
            request(2, vec![(y.clone(), 0.85)]),
            request(3, vec![(x.clone(), 0.85), (y.clone(), -0.5)]),
            request(4, vec![]),
        ];
        let shared = [
            request(5, vec![(x.clone(), 0.85)]),
            request(6, vec![(x.clone(), 0.85)]),
        ];
        for requests in [&mixed[..], &shared[..]] {
            assert_eq!(plan_batches(requests, 8).len(), 1);
            let batched = session
                .generate_many(requests, &CancelToken::new(), &mut |_| {})
                .unwrap();
            for (r, images) in requests.iter().zip(&batched) {
                let alone = session
                    .generate(r, &CancelToken::new(), &mut |_| {})
                    .unwrap();
                let worst = images[0]
                    .data
                    .iter()
                    .zip(&alone[0].data)
                    .map(|(a, b)| a.abs_diff(*b))
                    .max()
                    .unwrap();
                assert!(worst <= 1, "seed {}: off by {worst} levels", r.params.seed);
            }
        }
    }

    /// The merged set is remembered: asking for it again reads no file.
    #[test]
    fn the_active_set_is_not_merged_again() {
        let mut session = Session::new(tiny_sdxl());
        let dir = std::env::temp_dir().join(format!("hyperlora-session-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let copy = dir.join("style.safetensors");
        std::fs::copy(fixture("lora_apply", "kohya_diffusers.safetensors"), &copy).unwrap();
        let set = [LoraUse::file(copy.clone(), 0.6)];
        session.activate(&set).unwrap();
        let merged = session.pipeline().loras().merged_layers();
        assert!(merged > 0);
        std::fs::remove_file(&copy).unwrap();
        session.activate(&set).unwrap();
        assert_eq!(session.pipeline().loras().merged_layers(), merged);
        // Another weight is another set: the file is read again (and is gone).
        let err = session.activate(&[LoraUse::file(copy, 0.5)]).unwrap_err();
        assert_eq!(err.code, crate::ErrorCode::ModelNotFound);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Image k of a batch is image 0 of the same request seeded with seed + k (wrapping).
    #[test]
    fn image_k_of_a_batch_redraws_alone_with_seed_plus_k() {
        let mut session = Session::new(tiny_sdxl());
        let x = identity(&session, 7);
        let mut request = Request::new(GenerateParams {
            prompt: "a portrait".into(),
            seed: u64::MAX,
            ..params(64, 2)
        });
        request.identities = vec![(x, 0.85)];
        let singles = request.per_image();
        assert_eq!(
            singles.iter().map(|r| r.params.seed).collect::<Vec<_>>(),
            [u64::MAX, 0]
        );
        let batch = session
            .generate(&request, &CancelToken::new(), &mut |_| {})
            .unwrap();
        assert_eq!(batch.len(), 2);
        for (k, single) in singles.iter().enumerate() {
            let alone = session
                .generate(single, &CancelToken::new(), &mut |_| {})
                .unwrap();
            let worst = batch[k]
                .data
                .iter()
                .zip(&alone[0].data)
                .map(|(a, b)| a.abs_diff(*b))
                .max()
                .unwrap();
            assert!(worst <= 1, "image {k}: off by {worst} levels");
        }
    }
}
