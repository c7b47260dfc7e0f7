//! Batched generation: several requests that share a resolution and sampler settings denoised in
//! one UNet batch, each with its own prompts, seed, batch size and LoRAs (e.g. a different
//! identity per request).
//!
//! Each request gets what [`SdxlPipeline::generate`] would give it alone with its LoRAs merged
//! (up to rounding): its own text conditioning, its own seeded generator and scheduler (so the
//! initial noise and the per-step noise of euler_ancestral / dpmpp_2m_sde are the very draws of
//! its sequential run), and its LoRAs applied to its rows only through per-sample low-rank
//! updates ([`SampleAdapters`]). LoRAs every request shares are merged beforehand
//! ([`SdxlPipeline::set_loras`]); when all requests carry the same set, merging it and passing
//! none here is faster (no side path).
//!
//! Rows: requests are ordered by LoRA set (so each distinct set is one run of rows) and each
//! contributes `[uncond × batch, cond × batch]` under guidance, `[cond × batch]` without.
//! Requests whose prompts need a different number of 77-token chunks cannot share a UNet call
//! (their text contexts differ in length): they form separate sub-batches, each one UNet call
//! per step.

use std::collections::HashMap;

use candle_core::Tensor;

use crate::error::{Error, Result};
use crate::image::RgbImage;
use crate::lora::{LoraLayer, RowLoras, SampleAdapters};
use crate::sdxl::control::ControlBatch;
use crate::sdxl::model::unet::UNetConditioning;
use crate::sdxl::pipeline::{Conditioning, GenerateParams, SdxlPipeline};
use crate::sdxl::sampling::noise::TorchGenerator;
use crate::sdxl::sampling::sampler::Scheduler;
use crate::task::{CancelToken, Progress, ProgressFn, Stage};

/// One request of a batch: its parameters and the LoRAs applied to its images only.
pub struct BatchRequest<'a> {
    /// Width, height, steps, cfg, sampler and scheduler must be the same in every request of a
    /// batch; there is no init image.
    pub params: GenerateParams,
    /// This request's LoRAs (e.g. identities) with their weights, as for
    /// [`SdxlPipeline::set_loras`]; UNet layers only.
    pub loras: Vec<(&'a [LoraLayer], f32)>,
}

/// Identifies a request's LoRA set: the same layer slices with the same weights.
type SetKey = Vec<(usize, usize, u32)>;

fn set_key(loras: &[(&[LoraLayer], f32)]) -> SetKey {
    loras
        .iter()
        .map(|(layers, w)| (layers.as_ptr() as usize, layers.len(), w.to_bits()))
        .collect()
}

/// Requests that share one UNet call per step.
struct SubBatch<'a> {
    /// Indices into the requests, in row order.
    requests: Vec<usize>,
    cond: UNetConditioning,
    adapters: Option<SampleAdapters>,
    control: Option<ControlBatch<'a>>,
}

/// One request's denoising state.
struct Denoising {
    scheduler: Scheduler,
    generator: TorchGenerator,
    latents: Tensor,
}

impl SdxlPipeline {
    /// Generates every request in one batch (see the module docs); one entry per request, each
    /// with its `batch_size` images, in request order. Progress: `text` (0 then 1 of 1),
    /// `denoise` once per step, `decode` once per request decoded (0 then k of N); `cancel` is
    /// checked before every step and every decode.
    ///
    /// Errors (`INVALID_ARGUMENT`): a request's own parameters (as for `generate`), a setting
    /// that differs from the first request's (the message names it), an init image, a LoRA that
    /// cannot be applied per request (see [`SampleAdapters::new`]).
    pub fn generate_many(
        &self,
        requests: &[BatchRequest<'_>],
        cancel: &CancelToken,
        progress: ProgressFn<'_>,
    ) -> Result<Vec<Vec<RgbImage>>> {
        let latents = self.generate_many_latents(requests, cancel, progress)?;
        let total = latents.len() as u64;
        let mut images = Vec::with_capacity(latents.len());
        for (done, l) in latents.iter().enumerate() {
            cancel.check()?;
            progress(Progress {
                stage: Stage::Decode,
                step: done as u64,
                total,
            });
            images.push(self.decode(l)?);
        }
        progress(Progress {
            stage: Stage::Decode,
            step: total,
            total,
        });
        Ok(images)
    }

    /// Everything but the VAE decode: each request's final latents [batch, 4, h/8, w/8].
    pub fn generate_many_latents(
        &self,
        requests: &[BatchRequest<'_>],
        cancel: &CancelToken,
        progress: ProgressFn<'_>,
    ) -> Result<Vec<Tensor>> {
        let Some(first) = requests.first() else {
            return Ok(Vec::new());
        };
        self.check_batch(requests)?;
        let p = &first.params;
        let guidance = p.guidance_scale > 1.0;

        progress(Progress {
            stage: Stage::Text,
            step: 0,
            total: 1,
        });
        // One encoding per distinct prompt pair: [2 or 1, 77·chunks, 2048] (negative row first).
        let mut encoded: HashMap<(&str, &str), usize> = HashMap::new();
        let mut conditionings: Vec<Conditioning> = Vec::new();
        let mut of_request = Vec::with_capacity(requests.len());
        for r in requests {
            let key = (r.params.prompt.as_str(), r.params.negative_prompt.as_str());
            let index = match encoded.get(&key) {
                Some(&i) => i,
                None => {
                    conditionings
                        .push(self.condition(key.0, key.1, p.width, p.height, 1, guidance)?);
                    encoded.insert(key, conditionings.len() - 1);
                    conditionings.len() - 1
                }
            };
            of_request.push(index);
        }
        progress(Progress {
            stage: Stage::Text,
            step: 1,
            total: 1,
        });
        cancel.check()?;

        let sub_batches = self.sub_batches(requests, &conditionings, &of_request, guidance)?;
        let f = self.vae_scale_factor();
        let mut states = requests
            .iter()
            .map(|r| {
                let scheduler =
                    Scheduler::new(self.scheduler_config(), p.sampler, p.schedule, p.steps)?;
                let mut generator = TorchGenerator::new(r.params.seed);
                let shape = (
                    r.params.batch_size,
                    self.unet.config().in_channels,
                    p.height / f,
                    p.width / f,
                );
                let latents = (generator.randn(shape)?.to_device(self.device())?
                    * scheduler.init_noise_sigma())?;
                Ok(Denoising {
                    scheduler,
                    generator,
                    latents,
                })
            })
            .collect::<Result<Vec<_>>>()?;

        let steps = states[0].scheduler.num_inference_steps();
        for i in 0..steps {
            cancel.check()?;
            for sb in &sub_batches {
                let inputs: Vec<&Tensor> = sb
                    .requests
                    .iter()
                    .flat_map(|&r| {
                        let l = &states[r].latents;
                        if guidance {
                            vec![l, l]
                        } else {
                            vec![l]
                        }
                    })
                    .collect();
                // The schedules are identical, so any request's scheduler scales the batch.
                let input = states[sb.requests[0]]
                    .scheduler
                    .scale_model_input(&Tensor::cat(&inputs, 0)?, i)?;
                let t = states[sb.requests[0]].scheduler.timestep(i);
                let residuals = match &sb.control {
                    Some(c) => c.residuals(&input, t, i, steps)?,
                    None => None,
                };
                let eps = self.unet.forward_controlled(
                    &input,
                    t,
                    &sb.cond,
                    sb.adapters.as_ref(),
                    residuals.as_ref(),
                )?;
                let mut row = 0;
                for &r in &sb.requests {
                    let b = requests[r].params.batch_size;
                    let eps = if guidance {
                        let uncond = eps.narrow(0, row, b)?;
                        let text = eps.narrow(0, row + b, b)?;
                        row += 2 * b;
                        (&uncond + ((text - &uncond)? * p.guidance_scale)?)?
                    } else {
                        row += b;
                        eps.narrow(0, row - b, b)?
                    };
                    let s = &mut states[r];
                    s.latents = s.scheduler.step(&eps, i, &s.latents, &mut s.generator)?;
                }
            }
            progress(Progress {
                stage: Stage::Denoise,
                step: i as u64 + 1,
                total: steps as u64,
            });
        }
        Ok(states.into_iter().map(|s| s.latents).collect())
    }

    /// Each request valid on its own and sharing the first request's settings.
    fn check_batch(&self, requests: &[BatchRequest<'_>]) -> Result<()> {
        let first = &requests[0].params;
        for (i, r) in requests.iter().enumerate() {
            let p = &r.params;
            self.validate(p)
                .map_err(|e| e.context(format!("requests[{i}]")))?;
            if p.init_image.is_some() {
                return Err(Error::invalid_argument(format!(
                    "requests[{i}].initImage: batched requests cannot start from an image"
                )));
            }
            let differs = [
                (
                    "width",
                    p.width != first.width,
                    p.width.to_string(),
                    first.width.to_string(),
                ),
                (
                    "height",
                    p.height != first.height,
                    p.height.to_string(),
                    first.height.to_string(),
                ),
                (
                    "steps",
                    p.steps != first.steps,
                    p.steps.to_string(),
                    first.steps.to_string(),
                ),
                (
                    "cfg",
                    p.guidance_scale.to_bits() != first.guidance_scale.to_bits(),
                    p.guidance_scale.to_string(),
                    first.guidance_scale.to_string(),
                ),
                (
                    "sampler",
                    p.sampler != first.sampler,
                    p.sampler.as_str().to_string(),
                    first.sampler.as_str().to_string(),
                ),
                (
                    "scheduler",
                    p.schedule != first.schedule,
                    p.schedule.as_str().to_string(),
                    first.schedule.as_str().to_string(),
                ),
            ];
            let same_controls = p.controlnets.len() == first.controlnets.len()
                && p.controlnets
                    .iter()
                    .zip(&first.controlnets)
                    .all(|(a, b)| a.same_settings(b));
            if !same_controls {
                return Err(Error::invalid_argument(format!(
                    "requests[{i}].controlnets differ from requests[0]'s: a batch shares its ControlNets, strengths and windows (the images may differ)"
                )));
            }
            if let Some((field, _, ours, theirs)) = differs.into_iter().find(|d| d.1) {
                return Err(Error::invalid_argument(format!(
                    "requests[{i}].{field} is {ours} but requests[0].{field} is {theirs}: a batch shares width, height, steps, cfg, sampler and scheduler"
                )));
            }
        }
        let images = requests.iter().map(|r| r.params.batch_size).sum();
        self.check_memory(images, first.width, first.height)
    }

    /// Groups the requests by text-context length, orders each group by LoRA set and assembles
    /// its conditioning rows and per-sample LoRA updates.
    fn sub_batches<'r>(
        &self,
        requests: &'r [BatchRequest<'_>],
        conditionings: &[Conditioning],
        of_request: &[usize],
        guidance: bool,
    ) -> Result<Vec<SubBatch<'r>>> {
        let context_len = |r: usize| conditionings[of_request[r]].context.dim(1);
        let mut order = (0..requests.len())
            .map(|r| Ok((context_len(r)?, set_key(&requests[r].loras), r)))
            .collect::<Result<Vec<_>>>()?;
        order.sort();

        let mut out: Vec<SubBatch> = Vec::new();
        let mut start = 0;
        while start < order.len() {
            let len = order[start].0;
            let end = start + order[start..].iter().take_while(|o| o.0 == len).count();
            let group = &order[start..end];
            let (mut contexts, mut pooled, mut runs) = (Vec::new(), Vec::new(), Vec::new());
            let mut rows = 0;
            for (k, (_, key, r)) in group.iter().enumerate() {
                let c = &conditionings[of_request[*r]];
                let b = requests[*r].params.batch_size;
                // [negative, positive] rows of the prompt pair, each repeated for the batch.
                let halves = if guidance { vec![0, 1] } else { vec![0] };
                for h in halves {
                    contexts.push(c.context.narrow(0, h, 1)?.repeat((b, 1, 1))?);
                    pooled.push(c.pooled.narrow(0, h, 1)?.repeat((b, 1))?);
                }
                let n = if guidance { 2 * b } else { b };
                let loras = requests[*r].loras.as_slice();
                let continues = k > 0 && group[k - 1].1 == *key;
                match runs.last_mut() {
                    Some(RowLoras { rows: run, .. }) if continues && !loras.is_empty() => {
                        run.end += n
                    }
                    _ if !loras.is_empty() => runs.push(RowLoras {
                        rows: rows..rows + n,
                        loras,
                    }),
                    _ => {}
                }
                rows += n;
            }
            let adapters = if runs.is_empty() {
                None
            } else {
                Some(SampleAdapters::new(&self.unet.linears(), &runs, rows)?)
            };
            let time_ids = conditionings[of_request[group[0].2]]
                .time_ids
                .narrow(0, 0, 1)?
                .repeat((rows, 1))?;
            let (context, pooled) = (Tensor::cat(&contexts, 0)?, Tensor::cat(&pooled, 0)?);
            let controls: Vec<_> = group
                .iter()
                .map(|o| {
                    let p = &requests[o.2].params;
                    (p.controlnets.as_slice(), p.batch_size)
                })
                .collect();
            let p = &requests[group[0].2].params;
            out.push(SubBatch {
                requests: group.iter().map(|o| o.2).collect(),
                cond: self.unet.condition(&context, &pooled, &time_ids)?,
                adapters,
                control: ControlBatch::new(
                    &controls, guidance, &context, &pooled, &time_ids, p.width, p.height,
                )?,
            });
            start = end;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;
    use crate::error::ErrorCode;
    use crate::lora::{read_lora_file, LoraComponent};
    use crate::sdxl::pipeline::InitImage;
    use crate::sdxl::sampling::sampler::{Sampler, SigmaSchedule};
    use crate::testing::{assert_close, fixture, max_abs_diff, tiny_sdxl};

    /// An identity-like LoRA: rank 4 on every attention projection of the tiny UNet (the layers
    /// HyperLoRA's identities target), from a seeded generator.
    fn identity(pipe: &SdxlPipeline, seed: u64) -> Vec<LoraLayer> {
        let mut g = TorchGenerator::new(seed);
        let mut randn = |shape: (usize, usize)| (g.randn(shape).unwrap() * 0.5).unwrap();
        pipe.unet
            .linears()
            .into_iter()
            .filter(|(name, _)| name.contains(".attn"))
            .map(|(module, linear)| {
                let (out_f, in_f) = linear.weight().dims2().unwrap();
                LoraLayer::low_rank(
                    LoraComponent::Unet,
                    module.clone(),
                    randn((4, in_f)),
                    randn((out_f, 4)),
                    Some(2.0),
                    format!("identity{seed}.{module}"),
                )
            })
            .collect()
    }

    fn params(
        sampler: Sampler,
        prompt: &str,
        negative: &str,
        seed: u64,
        batch: usize,
    ) -> GenerateParams {
        GenerateParams {
            prompt: prompt.into(),
            negative_prompt: negative.into(),
            width: 64,
            height: 48,
            steps: 4,
            guidance_scale: 5.0,
            sampler,
            schedule: SigmaSchedule::Karras,
            seed,
            batch_size: batch,
            init_image: None,
            controlnets: Vec::new(),
        }
    }

    /// Four requests in one batch (no identity; identity X with two images; X·0.85 + Y·(−0.5)
    /// sharing the first request's prompt; Y with a prompt of two 77-token chunks, so a second
    /// sub-batch), on top of a LoRA file merged for all: each request's latents equal the
    /// request run alone with its whole LoRA set merged, for a deterministic and two stochastic
    /// samplers (their per-step noise comes from each request's own generator).
    #[test]
    fn a_mixed_identity_batch_equals_each_request_run_alone() {
        let mut pipe = tiny_sdxl();
        let (x, y) = (identity(&pipe, 7), identity(&pipe, 8));
        let shared = read_lora_file(
            fixture("lora_apply", "kohya_diffusers.safetensors"),
            &Device::Cpu,
        )
        .unwrap()
        .layers;
        let long = "a portrait photo, ".repeat(30);
        for sampler in [
            Sampler::DpmPp2m,
            Sampler::EulerAncestral,
            Sampler::DpmPp2mSde,
        ] {
            let requests = [
                BatchRequest {
                    params: params(sampler, "a photo of a person", "", 11, 1),
                    loras: vec![],
                },
                BatchRequest {
                    params: params(sampler, "a painting", "blurry", 12, 2),
                    loras: vec![(&x, 1.0)],
                },
                BatchRequest {
                    params: params(sampler, "a photo of a person", "", 13, 1),
                    loras: vec![(&x, 0.85), (&y, -0.5)],
                },
                BatchRequest {
                    params: params(sampler, &long, "", 14, 1),
                    loras: vec![(&y, 1.0)],
                },
            ];
            pipe.set_loras(&[(&shared, 0.6)]).unwrap();
            let batched = pipe
                .generate_many_latents(&requests, &CancelToken::new(), &mut |_| {})
                .unwrap();
            let mut alone = Vec::new();
            for (i, r) in requests.iter().enumerate() {
                let mut set = vec![(shared.as_slice(), 0.6)];
                set.extend(r.loras.iter().copied());
                pipe.set_loras(&set).unwrap();
                let expected = pipe
                    .generate_latents(&r.params, &CancelToken::new(), &mut |_| {})
                    .unwrap();
                let what = format!("{} request {i}", sampler.as_str());
                assert_close(&what, &batched[i], &expected, 1e-3);
                alone.push(expected);
            }
            // The identities do change the pictures (the same prompt and seed differ).
            let (d, ..) = max_abs_diff(&alone[2], &{
                pipe.set_loras(&[(&shared, 0.6)]).unwrap();
                pipe.generate_latents(&requests[2].params, &CancelToken::new(), &mut |_| {})
                    .unwrap()
            });
            assert!(d > 1e-2, "identity had no effect ({d})");
        }
    }

    /// A LoCon style file (convolutions and Linears outside the transformers) shared by a batch
    /// that mixes identities is merged for the whole batch: each request equals the request run
    /// alone with the style and its identity merged.
    #[test]
    fn a_conv_lora_shared_by_a_mixed_batch_equals_each_request_alone() {
        let mut pipe = tiny_sdxl();
        let x = identity(&pipe, 7);
        let style = read_lora_file(fixture("lora_kinds", "locon.safetensors"), &Device::Cpu)
            .unwrap()
            .layers;
        let requests = [
            BatchRequest {
                params: params(Sampler::DpmPp2m, "a photo of a person", "", 21, 1),
                loras: vec![],
            },
            BatchRequest {
                params: params(Sampler::DpmPp2m, "a painting", "blurry", 22, 1),
                loras: vec![(&x, 0.85)],
            },
        ];
        pipe.set_loras(&[(&style, 0.8)]).unwrap();
        let batched = pipe
            .generate_many_latents(&requests, &CancelToken::new(), &mut |_| {})
            .unwrap();
        for (i, r) in requests.iter().enumerate() {
            let mut set = vec![(style.as_slice(), 0.8)];
            set.extend(r.loras.iter().copied());
            pipe.set_loras(&set).unwrap();
            let alone = pipe
                .generate_latents(&r.params, &CancelToken::new(), &mut |_| {})
                .unwrap();
            assert_close(&format!("request {i}"), &batched[i], &alone, 1e-3);
        }
        // The style does change the pictures.
        pipe.set_loras(&[]).unwrap();
        let plain = pipe
            .generate_latents(&requests[0].params, &CancelToken::new(), &mut |_| {})
            .unwrap();
        assert!(max_abs_diff(&plain, &batched[0]).0 > 1e-2);
    }

    #[test]
    fn requests_that_cannot_share_a_batch_are_refused_by_field() {
        let pipe = tiny_sdxl();
        let base = params(Sampler::Euler, "a", "", 1, 1);
        let with = |f: &dyn Fn(&mut GenerateParams)| {
            let mut p = base.clone();
            f(&mut p);
            p
        };
        let cases: [(GenerateParams, &str); 8] = [
            (with(&|p| p.width = 32), "requests[1].width"),
            (with(&|p| p.height = 32), "requests[1].height"),
            (with(&|p| p.steps = 3), "requests[1].steps"),
            (with(&|p| p.guidance_scale = 7.0), "requests[1].cfg"),
            (with(&|p| p.sampler = Sampler::Ddim), "requests[1].sampler"),
            (
                with(&|p| p.schedule = SigmaSchedule::Normal),
                "requests[1].scheduler",
            ),
            (with(&|p| p.batch_size = 0), "requests[1]: batchSize"),
            (
                with(&|p| {
                    p.init_image = Some(InitImage {
                        image: RgbImage {
                            width: 64,
                            height: 48,
                            data: vec![0; 64 * 48 * 3],
                        },
                        strength: 0.5,
                    })
                }),
                "requests[1].initImage",
            ),
        ];
        for (other, needle) in cases {
            let requests = [
                BatchRequest {
                    params: base.clone(),
                    loras: vec![],
                },
                BatchRequest {
                    params: other,
                    loras: vec![],
                },
            ];
            let e = pipe
                .generate_many(&requests, &CancelToken::new(), &mut |_| {})
                .unwrap_err();
            assert_eq!(e.code, ErrorCode::InvalidArgument, "{e}");
            assert!(e.message.contains(needle), "{needle}: {e}");
        }
        // A text-encoder LoRA cannot be applied to part of a batch.
        let te = read_lora_file(fixture("lora_apply", "te.safetensors"), &Device::Cpu)
            .unwrap()
            .layers;
        let requests = [BatchRequest {
            params: base.clone(),
            loras: vec![(&te, 1.0)],
        }];
        let e = pipe
            .generate_many(&requests, &CancelToken::new(), &mut |_| {})
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidArgument, "{e}");
        assert!(e.message.contains("only target the UNet"), "{e}");
    }

    #[test]
    fn reports_every_stage_and_stops_within_one_step_of_abort() {
        let pipe = tiny_sdxl();
        let x = identity(&pipe, 7);
        let requests = [
            BatchRequest {
                params: params(Sampler::Euler, "a", "", 1, 1),
                loras: vec![(&x, 1.0)],
            },
            BatchRequest {
                params: params(Sampler::Euler, "b", "", 2, 1),
                loras: vec![],
            },
        ];
        let mut stages = Vec::new();
        let images = pipe
            .generate_many(&requests, &CancelToken::new(), &mut |e| {
                stages.push((e.stage, e.step, e.total))
            })
            .unwrap();
        assert_eq!(images.len(), 2);
        assert!(images
            .iter()
            .all(|i| i.len() == 1 && i[0].width == 64 && i[0].height == 48));
        let expected: Vec<(Stage, u64, u64)> = [(Stage::Text, 0, 1), (Stage::Text, 1, 1)]
            .into_iter()
            .chain((1..=4).map(|s| (Stage::Denoise, s, 4)))
            .chain((0..=2).map(|s| (Stage::Decode, s, 2)))
            .collect();
        assert_eq!(stages, expected);

        let cancel = CancelToken::new();
        let mut denoise = Vec::new();
        let e = pipe
            .generate_many(&requests, &cancel, &mut |e| {
                if e.stage == Stage::Denoise {
                    denoise.push(e.step);
                    if e.step == 2 {
                        cancel.cancel();
                    }
                }
            })
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::Aborted);
        assert_eq!(denoise, [1, 2]);
        assert!(pipe
            .generate_many(&[], &CancelToken::new(), &mut |_| {})
            .unwrap()
            .is_empty());
    }
}
