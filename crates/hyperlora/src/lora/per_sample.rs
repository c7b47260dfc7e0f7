//! Per-sample low-rank updates: one UNet batch whose samples carry different LoRAs (e.g. one
//! identity per request), in one pass.
//!
//! Merging ([`super::apply`]) changes a layer's weight for every row of the batch, so a batch
//! that mixes identities cannot be merged. Instead each targeted Linear computes, for a row r,
//! `y_r = x_r Wᵀ + b + Σ_k w_k · s_k · (x_r A_kᵀ) B_kᵀ` with the down A_k, up B_k, weight w_k and
//! scale s_k = alpha/rank of the LoRAs of row r's own sample — what merging those LoRAs would
//! give that row, up to rounding. The shared weights W stay as they are (LoRAs that every row
//! shares are merged beforehand with [`super::LoraMerger`]).
//!
//! Rows are described in runs ([`RowLoras`]): consecutive rows that carry the same LoRA set
//! (under classifier-free guidance a sample's uncond and cond rows carry the same set, and a
//! caller that orders its samples by set gets one run per distinct set). Per layer and run, the
//! LoRAs are stacked once (`[A₁; A₂; …]` and `[w₁s₁B₁ | w₂s₂B₂ | …]`, zero-padded to the layer's
//! largest stacked rank K); a forward expands them to one [rows, in, K] / [rows, K, out] pair
//! (zeros for rows in no run) and adds `(x Aᵀ) Bᵀ` with two batched matmuls over the whole batch.
//!
//! Why one padded batched matmul rather than two thin matmuls per run on its rows (then joining
//! the rows back), one matmul against all runs' ranks with a row mask, or each run's weight
//! merged on the fly: measured on the CPU (2 shared cores, f32) with SDXL's attention Linears
//! and a batch of 4 requests under guidance (see `bench_grouping_strategies` below), at 1024²
//! the padded batched matmul added the least in each of three runs (+5 to +23% on those
//! Linears' time; per-run matmuls +10 to +32%, masked +17 to +26%, merged per run +16 to +32%);
//! at 512² the first three were within noise of each other (+11 to +13%) and merging per run
//! cost +50%. The update is memory-bound, not compute-bound: what costs is passes over the
//! activations, and this way makes one product and one sum over the whole batch, with no
//! narrowing and no re-joining (and, on a GPU, the same two kernels whatever the number of
//! runs); the padded rank columns and the rows without LoRAs cost a little arithmetic only.
//!
//! Layers are found by their weight tensor's id ([`candle_core::TensorId`]): the adapters are
//! built against the model's current Linears (after any merge) and the model is borrowed
//! immutably while they are in use, so the ids cannot go stale, and the forward pass needs no
//! module names.

use std::collections::HashMap;
use std::ops::Range;

use candle_core::{DType, Tensor, TensorId};
use candle_nn::Linear;

use super::apply::{check_fits, check_linear, describe};
use super::names::{LoraComponent, LoraLayer};
use crate::{Error, Result};

/// Consecutive rows of a batch and the LoRAs (with weights) their samples carry.
#[derive(Clone)]
pub struct RowLoras<'a> {
    pub rows: Range<usize>,
    pub loras: &'a [(&'a [LoraLayer], f32)],
}

/// Per updated layer (by weight id): the Linear and, per run index, the LoRAs to stack.
type Plan<'l> = HashMap<TensorId, (&'l Linear, Vec<(usize, Vec<(&'l LoraLayer, f32)>)>)>;

/// One layer's stacked update for one run of rows.
struct RunUpdate {
    rows: Range<usize>,
    /// [in, K]: the run's downs, stacked, transposed and zero-padded to the layer's K, in the
    /// weight's dtype.
    down_t: Tensor,
    /// [K, out]: the run's ups times weight · scale, stacked, transposed and zero-padded.
    up_t: Tensor,
}

/// The per-row low-rank updates of one batch, ready for [`forward_linear`].
pub struct SampleAdapters {
    rows: usize,
    /// Each updated layer's runs, in row order, by the id of the layer's weight.
    by_weight: HashMap<TensorId, Vec<RunUpdate>>,
}

impl SampleAdapters {
    /// Prepares the updates of a batch of `rows` rows for the Linears `targets` (the UNet's, by
    /// diffusers name; see [`crate::sdxl::model::unet::UNet2DConditionModel::linears`]).
    ///
    /// Errors (`INVALID_ARGUMENT`): a layer for another component than the UNet (per-sample
    /// text conditioning would need per-sample text encoders; merge such LoRAs for the whole
    /// batch instead), a module the model does not have, a convolution LoRA, a shape that does
    /// not fit, a non-finite weight; runs that overlap, are out of order or exceed `rows`.
    pub fn new(targets: &[(String, &Linear)], runs: &[RowLoras<'_>], rows: usize) -> Result<Self> {
        let mut end = 0;
        for run in runs {
            if run.rows.start < end || run.rows.end > rows || run.rows.is_empty() {
                return Err(Error::invalid_argument(format!(
                    "row runs must be non-empty, ordered, disjoint and within {rows} rows; got {:?}",
                    runs.iter().map(|r| r.rows.clone()).collect::<Vec<_>>()
                )));
            }
            end = run.rows.end;
        }
        let by_name: HashMap<&str, &Linear> =
            targets.iter().map(|(n, l)| (n.as_str(), *l)).collect();

        // Per layer and run, the contributions to stack (validated before any tensor work).
        let mut plan: Plan = HashMap::new();
        for (r, run) in runs.iter().enumerate() {
            for (layers, weight) in run.loras {
                if !weight.is_finite() {
                    return Err(Error::invalid_argument(format!(
                        "LoRA weight {weight} is not finite"
                    )));
                }
                for layer in layers.iter() {
                    if layer.component != LoraComponent::Unet {
                        return Err(Error::invalid_argument(format!(
                            "{}: a LoRA applied to some images of a batch can only target the UNet (apply text-encoder LoRAs to the whole batch)",
                            describe(layer)
                        )));
                    }
                    check_linear(layer)?;
                    let Some(linear) = by_name.get(layer.module.as_str()) else {
                        return Err(Error::invalid_argument(format!(
                            "{}: the model has no such layer (LoRAs can target the Linears of the UNet's transformers)",
                            describe(layer)
                        )));
                    };
                    check_fits(layer, linear)?;
                    if *weight == 0.0 {
                        continue;
                    }
                    let (_, per_run) = plan
                        .entry(linear.weight().id())
                        .or_insert_with(|| (linear, Vec::new()));
                    match per_run.last_mut() {
                        Some((last, contributions)) if *last == r => {
                            contributions.push((layer, *weight))
                        }
                        _ => per_run.push((r, vec![(layer, *weight)])),
                    }
                }
            }
        }

        let mut by_weight = HashMap::with_capacity(plan.len());
        for (id, (linear, per_run)) in plan {
            let k = per_run
                .iter()
                .map(|(_, c)| c.iter().map(|(l, _)| l.rank().unwrap_or(0)).sum::<usize>())
                .max()
                .unwrap_or(0);
            let updates = per_run
                .into_iter()
                .map(|(r, contributions)| {
                    let (down_t, up_t) = stacked(linear.weight(), &contributions, k)?;
                    Ok(RunUpdate {
                        rows: runs[r].rows.clone(),
                        down_t,
                        up_t,
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            by_weight.insert(id, updates);
        }
        Ok(Self { rows, by_weight })
    }

    /// How many Linears get per-row updates.
    pub fn layers(&self) -> usize {
        self.by_weight.len()
    }

    /// `linear(x)` plus each run's update on its rows. `x`: [rows, …, in] → [rows, …, out].
    fn forward(&self, linear: &Linear, x: &Tensor) -> Result<Tensor> {
        let y = crate::cuda::linear(linear, x)?;
        let Some(updates) = self.by_weight.get(&linear.weight().id()) else {
            return Ok(y);
        };
        if x.dim(0)? != self.rows {
            return Err(Error::internal(format!(
                "per-sample LoRAs prepared for {} rows, layer input {:?}",
                self.rows,
                x.dims()
            )));
        }
        // Every row's (padded) stack: the run's, or zeros between runs. [rows, in, K], [rows, K, out]
        let (in_f, k) = updates[0].down_t.dims2()?;
        let out_f = updates[0].up_t.dim(1)?;
        let (mut downs, mut ups) = (Vec::new(), Vec::new());
        let zeros = |rows: usize, downs: &mut Vec<Tensor>, ups: &mut Vec<Tensor>| -> Result<()> {
            let (dtype, device) = (x.dtype(), x.device());
            downs.push(Tensor::zeros((rows, in_f, k), dtype, device)?);
            ups.push(Tensor::zeros((rows, k, out_f), dtype, device)?);
            Ok(())
        };
        let mut at = 0;
        for u in updates {
            if u.rows.start > at {
                zeros(u.rows.start - at, &mut downs, &mut ups)?;
            }
            let n = u.rows.len();
            downs.push(u.down_t.unsqueeze(0)?.broadcast_as((n, in_f, k))?);
            ups.push(u.up_t.unsqueeze(0)?.broadcast_as((n, k, out_f))?);
            at = u.rows.end;
        }
        if at < self.rows {
            zeros(self.rows - at, &mut downs, &mut ups)?;
        }
        let tokens = x.elem_count() / (self.rows * in_f);
        let delta = x
            .contiguous()?
            .reshape((self.rows, tokens, in_f))?
            .matmul(&Tensor::cat(&downs, 0)?)?
            .matmul(&Tensor::cat(&ups, 0)?)?;
        let delta = delta.reshape(y.shape())?;
        Ok((y + delta)?)
    }
}

/// `linear(x)`, plus the per-row LoRA updates `adapters` holds for this layer if any.
pub fn forward_linear(
    linear: &Linear,
    x: &Tensor,
    adapters: Option<&SampleAdapters>,
) -> Result<Tensor> {
    match adapters {
        Some(a) => a.forward(linear, x),
        None => match crate::cpu::linear(linear, x, None)? {
            Some(y) => Ok(y),
            None => Ok(crate::cuda::linear(linear, x)?),
        },
    }
}

/// [`forward_linear`] plus `residual` (its output's shape), fused on CUDA without adapters.
pub fn forward_linear_residual(
    linear: &Linear,
    x: &Tensor,
    adapters: Option<&SampleAdapters>,
    residual: &Tensor,
) -> Result<Tensor> {
    match adapters {
        Some(a) => Ok((a.forward(linear, x)? + residual)?),
        None => match crate::cpu::linear(linear, x, Some(residual))? {
            Some(y) => Ok(y),
            None => Ok(crate::cuda::linear_residual(linear, x, residual)?),
        },
    }
}

/// (`[A₁; A₂; …]ᵀ` [in, k], `[w₁s₁B₁ | w₂s₂B₂ | …]ᵀ` [k, out]), zero-padded from the summed
/// ranks to `k`, on `weight`'s device and in its dtype; the scaling happens in f32.
fn stacked(
    weight: &Tensor,
    contributions: &[(&LoraLayer, f32)],
    k: usize,
) -> Result<(Tensor, Tensor)> {
    let device = weight.device();
    let mut ups = Vec::with_capacity(contributions.len() + 1);
    let mut downs = Vec::with_capacity(contributions.len() + 1);
    let mut rank = 0;
    for (layer, w) in contributions {
        let (down, up) = check_linear(layer)?;
        let up = up.to_device(device)?.to_dtype(DType::F32)?;
        ups.push((up * (*w as f64 * layer.scale() as f64))?);
        downs.push(down.to_device(device)?.to_dtype(DType::F32)?);
        rank += down.dim(0)?;
    }
    if rank < k {
        let (out_f, in_f) = weight.dims2()?;
        ups.push(Tensor::zeros((out_f, k - rank), DType::F32, device)?);
        downs.push(Tensor::zeros((k - rank, in_f), DType::F32, device)?);
    }
    let dtype = weight.dtype();
    let down_t = Tensor::cat(&downs, 0)?.to_dtype(dtype)?.t()?.contiguous()?;
    let up_t = Tensor::cat(&ups, 1)?.to_dtype(dtype)?.t()?.contiguous()?;
    Ok((down_t, up_t))
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Module};

    use super::*;
    use crate::lora::{LoraMerger, LoraTarget};
    use crate::testing::assert_close;
    use crate::ErrorCode;

    fn randn(shape: (usize, usize), std: f64) -> Tensor {
        (Tensor::randn(0f32, 1.0, shape, &Device::Cpu).unwrap() * std).unwrap()
    }

    fn lora(module: &str, out_f: usize, in_f: usize, rank: usize) -> LoraLayer {
        LoraLayer::low_rank(
            LoraComponent::Unet,
            module,
            randn((rank, in_f), 0.3),
            randn((out_f, rank), 0.3),
            Some(rank as f32 / 2.0),
            format!("lora_unet_{module}"),
        )
    }

    /// Two layers (one with a bias), two LoRAs of different ranks, six rows in four runs:
    /// every row equals the layer with its own LoRA set merged in.
    #[test]
    fn every_row_gets_what_merging_its_loras_would_give() {
        let (in_f, out_f) = (12, 10);
        let mut linears = [
            (
                "a".to_string(),
                Linear::new(randn((out_f, in_f), 0.2), None),
            ),
            (
                "b".to_string(),
                Linear::new(
                    randn((out_f, in_f), 0.2),
                    Some(Tensor::randn(0f32, 1.0, out_f, &Device::Cpu).unwrap()),
                ),
            ),
        ];
        let id_a = vec![lora("a", out_f, in_f, 4), lora("b", out_f, in_f, 4)];
        let id_b = vec![lora("a", out_f, in_f, 2)];
        let only_a: [(&[LoraLayer], f32); 1] = [(&id_a, 0.85)];
        let both: [(&[LoraLayer], f32); 2] = [(&id_a, 0.85), (&id_b, -0.5)];
        let only_b: [(&[LoraLayer], f32); 1] = [(&id_b, 1.0)];
        // Rows: 0 none, 1-2 A, 3 A+B, 4 none, 5 B.
        let runs = [
            RowLoras {
                rows: 1..3,
                loras: &only_a,
            },
            RowLoras {
                rows: 3..4,
                loras: &both,
            },
            RowLoras {
                rows: 5..6,
                loras: &only_b,
            },
        ];
        let per_row: [&[(&[LoraLayer], f32)]; 6] = [&[], &only_a, &only_a, &both, &[], &only_b];
        let x = Tensor::randn(0f32, 1.0, (6, 7, in_f), &Device::Cpu).unwrap();

        let targets: Vec<(String, &Linear)> = linears.iter().map(|(n, l)| (n.clone(), l)).collect();
        let adapters = SampleAdapters::new(&targets, &runs, 6).unwrap();
        assert_eq!(adapters.layers(), 2);
        let batched: Vec<Tensor> = linears
            .iter()
            .map(|(_, l)| forward_linear(l, &x, Some(&adapters)).unwrap())
            .collect();

        let mut merger = LoraMerger::new();
        for (row, set) in per_row.iter().enumerate() {
            let targets = linears
                .iter_mut()
                .map(|(module, linear)| LoraTarget {
                    component: LoraComponent::Unet,
                    module: module.clone(),
                    layer: linear,
                })
                .collect();
            merger.apply(targets, set).unwrap();
            let xr = x.narrow(0, row, 1).unwrap();
            for ((name, linear), out) in linears.iter().zip(&batched) {
                let merged = forward_linear(linear, &xr, None).unwrap();
                let ours = out.narrow(0, row, 1).unwrap();
                assert_close(&format!("layer {name} row {row}"), &ours, &merged, 1e-5);
            }
        }
    }

    #[test]
    fn unusable_sets_are_refused() {
        let linear = Linear::new(randn((8, 6), 0.2), None);
        let targets = [("q".to_string(), &linear)];
        let check =
            |layers: Vec<LoraLayer>, weight: f32, runs: &[(usize, usize)], rows, needle: &str| {
                let set: [(&[LoraLayer], f32); 1] = [(&layers, weight)];
                let runs: Vec<RowLoras> = runs
                    .iter()
                    .map(|&(start, end)| RowLoras {
                        rows: start..end,
                        loras: &set,
                    })
                    .collect();
                let e = SampleAdapters::new(&targets, &runs, rows).err().unwrap();
                assert_eq!(e.code, ErrorCode::InvalidArgument, "{e}");
                assert!(e.message.contains(needle), "{needle}: {e}");
            };
        let mut te = lora("q", 8, 6, 2);
        te.component = LoraComponent::TextEncoder;
        check(vec![te], 1.0, &[(0, 1)], 2, "only target the UNet");
        check(vec![lora("k", 8, 6, 2)], 1.0, &[(0, 1)], 2, "no such layer");
        check(vec![lora("q", 8, 5, 2)], 1.0, &[(0, 1)], 2, "does not fit");
        check(
            vec![lora("q", 8, 6, 2)],
            f32::NAN,
            &[(0, 1)],
            2,
            "not finite",
        );
        check(
            vec![lora("q", 8, 6, 2)],
            1.0,
            &[(0, 2), (1, 3)],
            3,
            "disjoint",
        );
        check(vec![lora("q", 8, 6, 2)], 1.0, &[(0, 3)], 2, "within 2 rows");
    }

    /// Benchmark, not a test: `cargo test --release -p hyperlora --lib
    /// lora::per_sample::tests::bench -- --ignored --nocapture`. SDXL's attention Linears of one
    /// 640-channel and one 1280-channel transformer block (image tokens at 512² and 1024², 77
    /// text tokens from 2048 channels), f32, for a batch of 4 requests under guidance (8 rows):
    /// no identity, identity A, identity B, A·0.85 + B·(−0.5), rank 8 each. Compares the plain
    /// layers (what a merged batch costs) with four ways of adding the per-row updates: the
    /// implementation (one zero-padded batched matmul), two thin matmuls per run on its rows then
    /// re-joined, one matmul against all runs' ranks with a row mask, and each run's weight
    /// merged on the fly; totals are scaled to SDXL's 10 + 60 blocks.
    #[test]
    #[ignore]
    fn bench_grouping_strategies() {
        use std::time::Instant;
        const NAMES: [&str; 5] = [
            "plain",
            "padded bmm",
            "per-run matmuls",
            "masked",
            "merged per run",
        ];
        let dev = Device::Cpu;
        let (rank, rows) = (8, 8);
        let time = |f: &dyn Fn() -> Tensor| {
            f();
            let reps = 3;
            let t0 = Instant::now();
            for _ in 0..reps {
                f();
            }
            t0.elapsed().as_secs_f64() / reps as f64
        };
        let report = |what: String, t: &[f64; 5]| {
            let extra: Vec<String> = (1..5)
                .map(|i| format!("{} +{:.1}%", NAMES[i], (t[i] / t[0] - 1.0) * 100.0))
                .collect();
            println!("{what}: plain {:.2} s; {}", t[0], extra.join(", "));
        };
        for side in [512usize, 1024] {
            let mut step = [0.0f64; 5];
            for (c, blocks) in [(640usize, 10.0), (1280, 60.0)] {
                let tokens = (side / if c == 640 { 16 } else { 32 }).pow(2);
                let mut level = [0.0f64; 5];
                for (name, o, i) in crate::testing::sdxl_attention_linears(c) {
                    let s = if i == 2048 { 77 } else { tokens };
                    let x = Tensor::randn(0f32, 1.0, (rows, s, i), &dev).unwrap();
                    let linear = Linear::new(randn((o, i), 0.02), None);
                    let (a, b) = (vec![lora(name, o, i, rank)], vec![lora(name, o, i, rank)]);
                    let sa: [(&[LoraLayer], f32); 1] = [(&a, 1.0)];
                    let sb: [(&[LoraLayer], f32); 1] = [(&b, 1.0)];
                    let sab: [(&[LoraLayer], f32); 2] = [(&a, 0.85), (&b, -0.5)];
                    // Request k owns rows 2k (uncond) and 2k + 1 (cond); request 0 has no identity.
                    let runs = [
                        RowLoras {
                            rows: 2..4,
                            loras: &sa,
                        },
                        RowLoras {
                            rows: 4..6,
                            loras: &sb,
                        },
                        RowLoras {
                            rows: 6..8,
                            loras: &sab,
                        },
                    ];
                    let targets = [(name.to_string(), &linear)];
                    let adapters = SampleAdapters::new(&targets, &runs, rows).unwrap();
                    let sets: [Vec<(&LoraLayer, f32)>; 3] = [
                        vec![(&a[0], 1.0)],
                        vec![(&b[0], 1.0)],
                        vec![(&a[0], 0.85), (&b[0], -0.5)],
                    ];
                    let unpadded: Vec<(Range<usize>, Tensor, Tensor)> = runs
                        .iter()
                        .zip(&sets)
                        .map(|(r, c)| {
                            let k = c.len() * rank;
                            let (d, u) = stacked(linear.weight(), c, k).unwrap();
                            (r.rows.clone(), d, u)
                        })
                        .collect();
                    let per_run = || {
                        let y = linear.forward(&x).unwrap();
                        let mut pieces = vec![y.narrow(0, 0, 2).unwrap()];
                        for (r, d, u) in &unpadded {
                            let xr = x
                                .narrow(0, r.start, r.len())
                                .unwrap()
                                .reshape((r.len() * s, i))
                                .unwrap();
                            let delta = xr
                                .matmul(d)
                                .unwrap()
                                .matmul(u)
                                .unwrap()
                                .reshape((r.len(), s, o))
                                .unwrap();
                            pieces.push((y.narrow(0, r.start, r.len()).unwrap() + delta).unwrap());
                        }
                        Tensor::cat(&pieces, 0).unwrap()
                    };
                    let all: Vec<(&LoraLayer, f32)> = sets.iter().flatten().copied().collect();
                    let (all_down, all_up) = stacked(linear.weight(), &all, 4 * rank).unwrap();
                    let mask: Vec<f32> = (0..rows)
                        .flat_map(|row| {
                            let run = (row / 2).checked_sub(1);
                            (0..32).map(move |k| {
                                run.is_some_and(|r| [0..8, 8..16, 16..32][r].contains(&k)) as u8
                                    as f32
                            })
                        })
                        .collect();
                    let mask = Tensor::from_vec(mask, (rows, 1, 32), &dev).unwrap();
                    let masked = || {
                        let y = linear.forward(&x).unwrap();
                        let h = x.reshape((rows * s, i)).unwrap().matmul(&all_down).unwrap();
                        let h = h
                            .reshape((rows, s, 32))
                            .unwrap()
                            .broadcast_mul(&mask)
                            .unwrap();
                        let d = h.reshape((rows * s, 32)).unwrap().matmul(&all_up).unwrap();
                        (y + d.reshape((rows, s, o)).unwrap()).unwrap()
                    };
                    let merged = || {
                        let mut pieces = vec![linear.forward(&x.narrow(0, 0, 2).unwrap()).unwrap()];
                        for (r, d, u) in &unpadded {
                            let wt = (linear.weight().t().unwrap() + d.matmul(u).unwrap()).unwrap();
                            let xr = x
                                .narrow(0, r.start, r.len())
                                .unwrap()
                                .reshape((r.len() * s, i))
                                .unwrap();
                            pieces.push(xr.matmul(&wt).unwrap().reshape((r.len(), s, o)).unwrap());
                        }
                        Tensor::cat(&pieces, 0).unwrap()
                    };
                    let padded = || forward_linear(&linear, &x, Some(&adapters)).unwrap();
                    for other in [per_run(), masked(), merged()] {
                        assert_close("strategies agree", &other, &padded(), 1e-3);
                    }
                    let plain = || linear.forward(&x).unwrap();
                    let fs: [&dyn Fn() -> Tensor; 5] =
                        [&plain, &padded, &per_run, &masked, &merged];
                    for (t, f) in level.iter_mut().zip(fs) {
                        *t += time(f);
                    }
                }
                report(
                    format!("{side}², {c} ch ({tokens} tokens), one block's 8 attention Linears"),
                    &level,
                );
                for (t, v) in step.iter_mut().zip(level) {
                    *t += v * blocks;
                }
            }
            report(
                format!("{side}², per UNet step (70 blocks' attention Linears)"),
                &step,
            );
        }
    }
}
