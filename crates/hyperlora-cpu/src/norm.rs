//! GroupNorm (PyTorch `nn.GroupNorm`, affine), optionally followed by SiLU, in two passes over
//! each group: statistics, then normalise-scale-shift(-SiLU) straight into the output.

use rayon::prelude::*;

use crate::math::{for_cpu, silu};

/// `x` [B, C, pixels] (contiguous) normalised over groups of `C / groups` channels into `out`
/// (same shape); `weight`, `bias` [C].
#[allow(clippy::too_many_arguments)]
pub fn group_norm(
    x: &[f32],
    out: &mut [f32],
    channels: usize,
    pixels: usize,
    groups: usize,
    weight: &[f32],
    bias: &[f32],
    eps: f64,
    silu: bool,
) {
    assert!(
        groups > 0 && channels.is_multiple_of(groups),
        "channels must split into groups"
    );
    assert!(
        weight.len() == channels && bias.len() == channels,
        "one weight and bias per channel"
    );
    assert_eq!(x.len(), out.len());
    let cg = channels / groups;
    let group_len = cg * pixels;
    if group_len == 0 {
        return;
    }
    assert_eq!(x.len() % (channels * pixels), 0, "x is not [B, C, pixels]");
    out.par_chunks_mut(group_len)
        .zip(x.par_chunks(group_len))
        .enumerate()
        .for_each(|(i, (dst, src))| {
            let g = i % groups;
            let range = g * cg..(g + 1) * cg;
            normalize(
                src,
                dst,
                &weight[range.clone()],
                &bias[range],
                pixels,
                eps,
                silu,
            );
        });
}

/// Lanes summed separately, so that the sums vectorise (and round less than one running sum).
const LANES: usize = 16;

for_cpu! {
    /// One group: `src` holds `weight.len()` channels of `hw` values each.
    fn normalize<M>(src: &[f32], dst: &mut [f32], weight: &[f32], bias: &[f32], hw: usize, eps: f64, silu_after: bool) {
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
                    *d = silu::<M>(s * scale + shift);
                }
            } else {
                for (d, &s) in dst.iter_mut().zip(src) {
                    *d = s * scale + shift;
                }
            }
        }
    }
}
