//! GroupNorm (PyTorch `nn.GroupNorm`, affine), optionally followed by SiLU, in two passes over
//! each group: statistics, then normalise-scale-shift(-SiLU) straight into the output.

use candle_core::Tensor;
use rayon::prelude::*;

use super::math::{for_cpu, silu};

/// `x` [B, C, ...] normalised over groups of `C / groups` channels; `weight`, `bias` [C].
pub fn group_norm(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    groups: usize,
    eps: f64,
    silu: bool,
) -> candle_core::Result<Option<Tensor>> {
    if !super::applies(x) || x.rank() < 3 || weight.dtype() != x.dtype() {
        return Ok(None);
    }
    let (b, c) = (x.dim(0)?, x.dim(1)?);
    if groups == 0 || c % groups != 0 || x.elem_count() == 0 {
        return Ok(None);
    }
    let hw = x.elem_count() / (b * c);
    let cg = c / groups;
    let weight = weight.to_vec1::<f32>()?;
    let bias = bias.to_vec1::<f32>()?;
    let out = super::with_f32(x, |src| {
        let mut out = vec![0f32; src.len()];
        out.par_chunks_mut(cg * hw)
            .zip(src.par_chunks(cg * hw))
            .enumerate()
            .for_each(|(i, (dst, src))| {
                let g = i % groups;
                let channels = g * cg..(g + 1) * cg;
                normalize(src, dst, &weight[channels.clone()], &bias[channels], hw, eps, silu);
            });
        out
    })?;
    Ok(Some(super::tensor(out, x.shape())?))
}

/// Lanes summed separately, so that the sums vectorise (and round less than one running sum).
const LANES: usize = 16;

for_cpu! {
    /// One group: `src` holds `weight.len()` channels of `hw` values each.
    fn normalize(src: &[f32], dst: &mut [f32], weight: &[f32], bias: &[f32], hw: usize, eps: f64, silu_after: bool) {
        let n = src.len() as f64;
        let chunks = src.chunks_exact(LANES);
        let tail = chunks.remainder();
        let mut acc = [0f32; LANES];
        for chunk in chunks.clone() {
            for (a, &v) in acc.iter_mut().zip(chunk) {
                *a += v;
            }
        }
        let total = acc.iter().chain(tail).map(|&a| a as f64).sum::<f64>();
        let mean = (total / n) as f32;
        let mut acc = [0f32; LANES];
        for chunk in chunks {
            for (a, &v) in acc.iter_mut().zip(chunk) {
                *a += (v - mean) * (v - mean);
            }
        }
        let squares = tail.iter().map(|&v| (v - mean) * (v - mean));
        let var = acc.iter().copied().chain(squares).map(|a| a as f64).sum::<f64>() / n;
        let rstd = (1.0 / (var + eps).sqrt()) as f32;
        for (ch, (src, dst)) in src.chunks_exact(hw).zip(dst.chunks_exact_mut(hw)).enumerate() {
            let scale = rstd * weight[ch];
            let shift = bias[ch] - mean * scale;
            if silu_after {
                for (d, &s) in dst.iter_mut().zip(src) {
                    *d = silu(s * scale + shift);
                }
            } else {
                for (d, &s) in dst.iter_mut().zip(src) {
                    *d = s * scale + shift;
                }
            }
        }
    }
}
