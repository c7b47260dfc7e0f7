//! Applying LoRAs to SDXL (docs/hyperlora-model.md §5): for every targeted layer,
//! `W' = W_base + Σ_loras weight × scale × ΔW` with `scale = alpha / rank` (1 without an alpha)
//! and `ΔW` the module's update in whichever form its file stores it ([`LoraUpdate`]: `up @ down`
//! for LoRA and LoCon, LyCORIS LoHa / LoKr rebuilt, full differences, whose `diff_b` also moves
//! the bias). Weights may be negative; several LoRAs may target the same layer (identity + style,
//! or a concept slider: identity A at −0.7 plus identity B at +0.7). This is diffusers'
//! `fuse_lora(lora_scale=weight)` (PEFT's merge), with all LoRAs of a layer summed at once.
//!
//! The mechanism is a **merge into working copies**, never a reload: [`LoraMerger`] keeps the
//! base weight (and bias) tensors of each layer it has touched (candle tensors are
//! reference-counted, so this is the very tensor the model was loaded with, not a copy) and
//! rebuilds only the targeted layers as merged copies on the weight's device and dtype (the
//! update is computed in f32, added to the base in f32 and cast back). Applying a new set first
//! puts back the base of every layer the new set no longer touches; an empty set restores the
//! base exactly (the original tensors, so outputs are bit-identical to the unmodified model). A
//! low-rank side path (`y = Wx + Σ w·s·up(down(x))`) was measured as the alternative (see
//! `bench_switch_and_side_path` below; CPU, SDXL base's 560 attention Linears, rank 8): a switch
//! by merge took ~5 s (f16 weights, 2 shared cores), while the side path added ~6.5% to those
//! Linears, ~1.1 s per denoising step at 1024² — more than a merge after 5 steps of a 20-step
//! generation — so merge is the mechanism (diffusers' `fuse_lora`). A batch whose samples carry
//! different LoRAs cannot be merged; it takes the side path ([`super::per_sample`]).
//!
//! Every layer community SDXL LoRAs target can be merged ([`crate::sdxl::pipeline::sdxl_targets`]): the UNet's
//! transformer Linears, its resnets' `conv1`/`conv2`/`conv_shortcut`/`time_emb_proj`, the
//! down/upsamplers' convolutions, `conv_in`/`conv_out`, the time and add embeddings'
//! `linear_1`/`linear_2`, conv-form `proj_in`/`proj_out`, and the text encoders' layer Linears.
//! A module the model does not have, or whose `ΔW` does not fit its layer's weight, is left out
//! and reported (as diffusers logs them); a LoRA none of whose modules fits is refused with
//! `INVALID_ARGUMENT`, and nothing is changed when a set is refused.

use std::collections::{BTreeMap, HashMap, HashSet};

use candle_core::{DType, Tensor};
use candle_nn::Linear;

use super::names::{summarize_skipped, LoraComponent, LoraLayer, SkippedKey};
use super::update::LoraUpdate;
use crate::{Error, Result};

/// A layer a LoRA may merge into: a Linear or a convolution, whose weight (`[out, in]` or
/// `[out, in, kh, kw]`) and bias can be read and replaced. The models implement it for their own
/// layer types, so this module needs to know none of them.
pub trait MergeTarget {
    fn weight(&self) -> &Tensor;
    fn bias(&self) -> Option<&Tensor>;
    fn replace(&mut self, weight: Tensor, bias: Option<Tensor>);
}

impl MergeTarget for Linear {
    fn weight(&self) -> &Tensor {
        Linear::weight(self)
    }

    fn bias(&self) -> Option<&Tensor> {
        Linear::bias(self)
    }

    fn replace(&mut self, weight: Tensor, bias: Option<Tensor>) {
        *self = Linear::new(weight, bias);
    }
}

/// A layer of a model, borrowed for merging.
pub type LayerMut<'a> = &'a mut dyn MergeTarget;

/// A layer a LoRA may target: its component and module path (diffusers naming for the UNet,
/// transformers' `text_model.encoder.layers.N.…` for the text encoders).
pub struct LoraTarget<'a> {
    pub component: LoraComponent,
    pub module: String,
    pub layer: LayerMut<'a>,
}

/// Text-encoder modules are named `text_model.encoder…`; files written against transformers 5's
/// flattened `CLIPTextModel` say `encoder…`. Both resolve to the same layer.
fn canonical(component: LoraComponent, module: &str) -> String {
    if component != LoraComponent::Unet && !module.starts_with("text_model.") {
        format!("text_model.{module}")
    } else {
        module.to_string()
    }
}

type Key = (LoraComponent, String);

/// The tensors a merged layer had before its first merge.
#[derive(Debug)]
struct Original {
    weight: Tensor,
    bias: Option<Tensor>,
    /// Whether the working copy has its own bias too (a `diff_b`).
    bias_copied: bool,
}

/// Keeps the base weights of the layers a LoRA set has replaced and applies LoRA sets by merging
/// (see the module docs). One merger belongs to one model: always pass it the same model's
/// targets.
#[derive(Debug, Default)]
pub struct LoraMerger {
    /// The base tensors of every layer that currently holds a merged copy.
    originals: HashMap<Key, Original>,
}

impl LoraMerger {
    pub fn new() -> Self {
        Self::default()
    }

    /// How many layers currently hold merged copies.
    pub fn merged_layers(&self) -> usize {
        self.originals.len()
    }

    /// The memory the applied set costs on top of the base model: one working copy per merged
    /// layer (the base tensors are the model's own, kept alive here instead of in the layer).
    pub fn overhead_bytes(&self) -> usize {
        let bytes = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        self.originals
            .values()
            .map(|o| bytes(&o.weight) + o.bias.as_ref().filter(|_| o.bias_copied).map_or(0, bytes))
            .sum()
    }

    /// Makes `loras` (each LoRA's layers with its weight) the active set on the model whose
    /// layers `targets` lists: layers of the previous set that `loras` does not touch get their
    /// base weights back, targeted layers become `W_base + Σ weight · scale · ΔW`. Contributions
    /// with weight 0 are dropped (a layer left with none keeps its base weight). `loras` empty
    /// restores the base model exactly.
    ///
    /// Returns, per LoRA of `loras`, the modules left out: the model has no such layer, or the
    /// module's `ΔW` (or `diff_b`) does not fit it.
    ///
    /// Errors (`INVALID_ARGUMENT`, the model unchanged): a LoRA none of whose modules fits, a
    /// non-finite weight. Should the merge itself fail (e.g. out of device memory), every layer
    /// is restored to its base weight before the error is returned.
    pub fn apply(
        &mut self,
        targets: Vec<LoraTarget<'_>>,
        loras: &[(&[LoraLayer], f32)],
    ) -> Result<Vec<Vec<SkippedKey>>> {
        let mut by_key: HashMap<Key, LayerMut> = targets
            .into_iter()
            .map(|t| ((t.component, t.module), t.layer))
            .collect();

        // 1. Validate everything before touching the model.
        let mut plan: BTreeMap<Key, Vec<(&LoraLayer, f32)>> = BTreeMap::new();
        let mut report = Vec::with_capacity(loras.len());
        for (layers, weight) in loras {
            if !weight.is_finite() {
                return Err(Error::invalid_argument(format!(
                    "LoRA weight {weight} is not finite"
                )));
            }
            let mut skipped = Vec::new();
            for layer in layers.iter() {
                let key = (layer.component, canonical(layer.component, &layer.module));
                if let Some(reason) = unfit(layer, by_key.get(&key)) {
                    skipped.push(SkippedKey {
                        key: layer.source.clone(),
                        reason,
                    });
                    continue;
                }
                let contributions = plan.entry(key).or_default();
                if *weight != 0.0 {
                    contributions.push((layer, *weight));
                }
            }
            if !layers.is_empty() && skipped.len() == layers.len() {
                return Err(Error::invalid_argument(format!(
                    "none of the LoRA's {} modules fits a layer of this model ({})",
                    layers.len(),
                    summarize_skipped(&skipped)
                )));
            }
            report.push(skipped);
        }
        plan.retain(|_, c| !c.is_empty());

        // 2. Layers of the previous set that the new one leaves alone get their base back.
        let stale: Vec<Key> = self
            .originals
            .keys()
            .filter(|k| !plan.contains_key(*k))
            .cloned()
            .collect();
        for key in stale {
            let base = self.originals.remove(&key).expect("listed");
            if let Some(layer) = by_key.get_mut(&key) {
                layer.replace(base.weight, base.bias);
            }
        }

        // 3. Merge the targeted layers, each from its base weight.
        let mut failure = None;
        for (key, contributions) in &plan {
            let layer = by_key.get_mut(key).expect("validated");
            let base = self
                .originals
                .entry(key.clone())
                .or_insert_with(|| Original {
                    weight: layer.weight().clone(),
                    bias: layer.bias().cloned(),
                    bias_copied: false,
                });
            match merged(base, contributions) {
                Ok((w, b)) => {
                    base.bias_copied = b.is_some();
                    let bias = b.or_else(|| base.bias.clone());
                    layer.replace(w, bias);
                }
                Err(e) => {
                    failure = Some(e.context(format!("merging LoRAs into {}", key.1)));
                    break;
                }
            }
        }
        if let Some(e) = failure {
            for (key, base) in self.originals.drain() {
                if let Some(layer) = by_key.get_mut(&key) {
                    layer.replace(base.weight, base.bias);
                }
            }
            return Err(e);
        }
        Ok(report)
    }

    /// The layers that currently hold merged copies.
    pub fn merged(&self) -> HashSet<(LoraComponent, String)> {
        self.originals.keys().cloned().collect()
    }
}

/// The modules of `layers` that [`LoraMerger::apply`] would leave out on the model whose layers
/// `targets` lists, with the reason (e.g. to name the file none of whose modules fits).
pub fn unfit_layers(targets: Vec<LoraTarget<'_>>, layers: &[LoraLayer]) -> Vec<SkippedKey> {
    let by_key: HashMap<Key, LayerMut> = targets
        .into_iter()
        .map(|t| ((t.component, t.module), t.layer))
        .collect();
    layers
        .iter()
        .filter_map(|layer| {
            let key = (layer.component, canonical(layer.component, &layer.module));
            unfit(layer, by_key.get(&key)).map(|reason| SkippedKey {
                key: layer.source.clone(),
                reason,
            })
        })
        .collect()
}

/// Why `layer` cannot merge into `target` (`None`: the model has no such layer), if it cannot.
fn unfit(layer: &LoraLayer, target: Option<&LayerMut>) -> Option<String> {
    match target {
        None => Some(format!(
            "SDXL has no {} layer {}",
            layer.component.as_str(),
            layer.module
        )),
        Some(t) => misfit(layer, t.weight().dims(), t.bias().is_some()),
    }
}

/// How messages name a LoRA layer: its key in the file and the module it targets.
pub(crate) fn describe(layer: &LoraLayer) -> String {
    format!(
        "LoRA module {} ({} {})",
        layer.source,
        layer.component.as_str(),
        layer.module
    )
}

/// Why `layer` cannot merge into a layer with this weight shape (and a bias or not), if it
/// cannot.
fn misfit(layer: &LoraLayer, weight: &[usize], has_bias: bool) -> Option<String> {
    if !layer.update.fits(weight) {
        let shape = match &layer.update {
            LoraUpdate::LowRank { down, up } => {
                format!("up {:?} @ down {:?}", up.dims(), down.dims())
            }
            u => format!("{:?}", u.delta_dims().unwrap_or_default()),
        };
        return Some(format!(
            "its {} update {shape} does not fit the layer's weight {weight:?}",
            layer.update.kind()
        ));
    }
    if let LoraUpdate::Full {
        diff_b: Some(_), ..
    } = layer.update
    {
        if !has_bias {
            return Some("diff_b for a layer without a bias".into());
        }
    }
    None
}

/// The `(down, up)` of a linear low-rank layer; anything else is `INVALID_ARGUMENT` (the
/// per-sample path applies only those).
pub(crate) fn check_linear(layer: &LoraLayer) -> Result<(&Tensor, &Tensor)> {
    match layer.update.low_rank() {
        Some((down, up)) if down.rank() == 2 && up.rank() == 2 => Ok((down, up)),
        _ => Err(Error::invalid_argument(format!(
            "{}: a {} module cannot be applied to some images of a batch only (only linear LoRAs can; apply it to the whole batch)",
            describe(layer),
            layer.update.kind()
        ))),
    }
}

/// Refuses (`INVALID_ARGUMENT`) a layer whose `ΔW` is not the shape of `linear`'s weight.
pub(crate) fn check_fits(layer: &LoraLayer, linear: &Linear) -> Result<()> {
    match misfit(layer, linear.weight().dims(), linear.bias().is_some()) {
        None => Ok(()),
        Some(reason) => Err(Error::invalid_argument(format!(
            "{}: {reason}",
            describe(layer)
        ))),
    }
}

/// `base + Σ weight · scale · ΔW`, computed in f32 on the base's device, returned in the base's
/// dtype, and the bias moved by the `diff_b`s (`None`: the bias stays). The low-rank LoRAs of a
/// layer are stacked (`[up₁·w₁s₁ | up₂·w₂s₂ | …] @ [down₁; down₂; …]`), so their full-size work
/// is one matmul whatever their number; other forms add their rebuilt `ΔW`.
fn merged(
    base: &Original,
    contributions: &[(&LoraLayer, f32)],
) -> Result<(Tensor, Option<Tensor>)> {
    let device = base.weight.device();
    let shape = base.weight.dims();
    let out = shape[0];
    let f32 = |t: &Tensor| -> Result<Tensor> { Ok(t.to_device(device)?.to_dtype(DType::F32)?) };
    let mut ups = Vec::new();
    let mut downs = Vec::new();
    let mut delta: Option<Tensor> = None;
    let mut bias = None;
    let add = |acc: Option<Tensor>, d: Tensor| -> Result<Option<Tensor>> {
        Ok(Some(match acc {
            Some(a) => (a + d)?,
            None => d,
        }))
    };
    for (layer, weight) in contributions {
        let s = *weight as f64 * layer.scale() as f64;
        match &layer.update {
            LoraUpdate::LowRank { down, up } => {
                let r = down.dim(0)?;
                ups.push((f32(up)?.reshape((out, r))? * s)?);
                downs.push(f32(down)?.reshape((r, ()))?);
            }
            update => {
                delta = add(delta, (update.delta_matrix(device)? * s)?)?;
                if let LoraUpdate::Full {
                    diff_b: Some(b), ..
                } = update
                {
                    bias = add(bias, (f32(b)? * *weight as f64)?)?;
                }
            }
        }
    }
    if !ups.is_empty() {
        delta = add(
            delta,
            Tensor::cat(&ups, 1)?.matmul(&Tensor::cat(&downs, 0)?)?,
        )?;
    }
    let mut w = base.weight.to_dtype(DType::F32)?;
    if let Some(d) = delta {
        w = (w + d.reshape(shape)?)?;
    }
    let bias = match (bias, &base.bias) {
        (Some(d), Some(b)) => Some((b.to_dtype(DType::F32)? + d)?.to_dtype(b.dtype())?),
        _ => None,
    };
    Ok((w.to_dtype(base.weight.dtype())?, bias))
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    /// Benchmark, not a test: `cargo test --release -p hyperlora --lib lora::apply::tests::bench
    /// -- --ignored --nocapture`. On the CPU, with SDXL base's attention Linears (the layers an
    /// identity LoRA targets: `to_q|to_k|to_v|to_out.0` of attn1 and attn2 in 70 transformer
    /// blocks; 10 at 640 channels, 60 at 1280; cross-attention from 2048), rank 8:
    /// (a) the time to switch identity by merging (f16 weights, full size), and (b) the per-step
    /// cost of those Linears at 1024×1024 merged vs with a low-rank side path, measured on one
    /// block per width (f32) and scaled to the 70 blocks.
    #[test]
    #[ignore]
    fn bench_switch_and_side_path() {
        use std::time::Instant;
        let dev = Device::Cpu;
        let rank = 8;
        // (channels, blocks, image tokens at 1024²)
        let levels = [(640usize, 10usize, 4096usize), (1280, 60, 1024)];
        let random_lora = |module: &str, o: usize, i: usize| {
            LoraLayer::low_rank(
                LoraComponent::Unet,
                module,
                (Tensor::randn(0f32, 1.0, (rank, i), &dev).unwrap() * 0.01).unwrap(),
                (Tensor::randn(0f32, 1.0, (o, rank), &dev).unwrap() * 0.01).unwrap(),
                Some(rank as f32 / 2.0),
                module,
            )
        };

        // (a) switch time, full size, f16.
        let mut linears = Vec::new();
        let (mut id_a, mut id_b) = (Vec::new(), Vec::new());
        for (c, blocks, _) in levels {
            for b in 0..blocks {
                for (name, o, i) in crate::testing::sdxl_attention_linears(c) {
                    let module = format!("c{c}.block{b}.{name}");
                    let w = Tensor::zeros((o, i), DType::F16, &dev).unwrap();
                    linears.push((module.clone(), Linear::new(w, None)));
                    id_a.push(random_lora(&module, o, i));
                    id_b.push(random_lora(&module, o, i));
                }
            }
        }
        let params: usize = linears.iter().map(|(_, l)| l.weight().elem_count()).sum();
        let mut merger = LoraMerger::new();
        let run = |merger: &mut LoraMerger,
                   linears: &mut Vec<(String, Linear)>,
                   set: &[(&[LoraLayer], f32)]| {
            let targets = linears
                .iter_mut()
                .map(|(m, l)| LoraTarget {
                    component: LoraComponent::Unet,
                    module: m.clone(),
                    layer: l,
                })
                .collect();
            let t0 = Instant::now();
            merger.apply(targets, set).unwrap();
            t0.elapsed().as_secs_f64()
        };
        let first = run(&mut merger, &mut linears, &[(&id_a, 0.85)]);
        let mut switches = Vec::new();
        for k in 0..3 {
            let id = if k % 2 == 0 { &id_b } else { &id_a };
            switches.push(run(&mut merger, &mut linears, &[(id, 0.85)]));
        }
        let slider = run(&mut merger, &mut linears, &[(&id_a, -0.7), (&id_b, 0.7)]);
        let overhead = merger.overhead_bytes();
        let restore = run(&mut merger, &mut linears, &[]);
        switches.sort_by(f64::total_cmp);
        println!(
            "merge, {} Linears, {:.0} M params, f16, rank {rank}: first apply {:.2} s, switch A<->B median {:.2} s, slider (2 LoRAs) {:.2} s, restore base {:.4} s, overhead {:.2} GB",
            linears.len(),
            params as f64 / 1e6,
            first,
            switches[1],
            slider,
            restore,
            overhead as f64 / 1e9
        );
        drop(linears);

        // (b) per-step cost: one block per width, f32.
        let time = |f: &dyn Fn() -> Tensor| {
            f(); // warm-up
            let t0 = Instant::now();
            let reps = 3;
            for _ in 0..reps {
                f();
            }
            t0.elapsed().as_secs_f64() / reps as f64
        };
        let (mut merged_total, mut side_total) = (0.0, 0.0);
        for (c, blocks, tokens) in levels {
            let x_img = Tensor::randn(0f32, 1.0, (1, tokens, c), &dev).unwrap();
            let x_txt = Tensor::randn(0f32, 1.0, (1, 77, 2048), &dev).unwrap();
            let (mut merged, mut side) = (0.0, 0.0);
            for (name, o, i) in crate::testing::sdxl_attention_linears(c) {
                let x = if i == 2048 { &x_txt } else { &x_img };
                let w = Tensor::randn(0f32, 0.02, (o, i), &dev).unwrap();
                let lin = Linear::new(w, None);
                let l = random_lora(name, o, i);
                let (down, up) = l.update.low_rank().unwrap();
                let (down_t, up_t) = (down.t().unwrap(), up.t().unwrap());
                let s = 0.85 * l.scale() as f64;
                merged += time(&|| candle_core::Module::forward(&lin, x).unwrap());
                side += time(&|| {
                    let y = candle_core::Module::forward(&lin, x).unwrap();
                    let lo = x
                        .broadcast_matmul(&down_t)
                        .unwrap()
                        .broadcast_matmul(&up_t)
                        .unwrap();
                    (y + (lo * s).unwrap()).unwrap()
                });
            }
            println!(
                "per step, {c} ch, {tokens} tokens: merged {:.1} ms/block, side path {:.1} ms/block (+{:.1}%)",
                merged * 1e3,
                side * 1e3,
                (side / merged - 1.0) * 100.0
            );
            merged_total += merged * blocks as f64;
            side_total += side * blocks as f64;
        }
        println!(
            "per step, 70 blocks' attention Linears at 1024²: merged {:.2} s, side path {:.2} s (+{:.2} s per step, +{:.1}%)",
            merged_total,
            side_total,
            side_total - merged_total,
            (side_total / merged_total - 1.0) * 100.0
        );
    }
}
