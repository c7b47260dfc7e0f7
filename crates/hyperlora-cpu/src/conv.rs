//! 2-D convolution of NCHW f32 images as an implicit matrix product on the `gemm` crate's AVX2+FMA
//! micro-kernel.
//!
//! The patch-matrix route (im2col, then a matrix product) writes `Cin·kh·kw × pixels` elements to
//! memory, and the product then packs them again, together with the weights, on every call:
//! 14% of a VAE decode went to those copies (docs/cpu.md). Here the patches are gathered straight
//! from the image into the micro-kernel's panel layout, a block of pixels at a time (the block
//! stays in L2), and the kernel reads the weights where they lie: its six broadcasts come from
//! six rows of `[Cout, Cin·kh·kw]`, each contiguous along the patch rows (packing them into one
//! stream on every call cost a pass over the weights and was up to 15% slower at 512 channels).
//!
//! 3×3 stride-1 convolutions with enough channels go to [`crate::winograd`] instead (2.25× fewer
//! multiply-adds).
//!
//! Work is split by blocks of output pixels, each one writing its own pixels of every output
//! channel: no barrier between threads until the end, and rayon balances the blocks when the
//! host takes a core away.

use rayon::prelude::*;

/// The sizes of one convolution: input `[cin, h, w]`, weight `[cout, cin, kh, kw]`, output
/// `[cout, ho, wo]`.
#[derive(Clone, Copy, Debug)]
pub struct ConvShape {
    pub cin: usize,
    pub h: usize,
    pub w: usize,
    pub cout: usize,
    pub kh: usize,
    pub kw: usize,
    pub stride: usize,
    pub padding: usize,
}

impl ConvShape {
    /// Output rows.
    pub fn ho(&self) -> usize {
        (self.h + 2 * self.padding - self.kh) / self.stride + 1
    }

    /// Output columns.
    pub fn wo(&self) -> usize {
        (self.w + 2 * self.padding - self.kw) / self.stride + 1
    }

    /// Rows of the implicit patch matrix: `cin·kh·kw`.
    pub fn k(&self) -> usize {
        self.cin * self.kh * self.kw
    }
}

// The micro-kernel tile: rows are output pixels, columns output channels.
#[cfg(target_arch = "x86_64")]
use crate::{TILE_COLS as NR, TILE_ROWS as MR};
/// Output pixels per work item (a multiple of `MR`) and patch rows per packed block: the packed
/// block (`MC·KC` floats, 128 KiB) stays in L2 while every output channel is computed from it.
const MC: usize = 128;
const KC: usize = 256;

/// `out[i] = bias[i] + weight · patches(x[i]) (+ out[i] when accumulate)` for `images` images
/// laid one after another in `x` (`[cin, h, w]` each) and `out` (`[cout, ho·wo]` each), with
/// `weight` `[cout, cin·kh·kw]` and `bias` `[images, cout]` (per image: a resnet adds its time
/// embedding there).
///
/// Returns false, touching nothing, when this CPU lacks the micro-kernel (not x86-64, or no
/// AVX2+FMA): the caller then takes its patch-matrix path.
#[allow(clippy::too_many_arguments)]
pub fn conv2d(
    threads: usize,
    shape: ConvShape,
    images: usize,
    x: &[f32],
    weight: &[f32],
    bias: &[f32],
    accumulate: bool,
    out: &mut [f32],
) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        if !crate::has_avx2_fma() {
            return false;
        }
        assert!(
            shape.stride > 0
                && shape.h + 2 * shape.padding >= shape.kh
                && shape.w + 2 * shape.padding >= shape.kw,
            "conv2d: {shape:?} has no output"
        );
        let (ho, wo, k) = (shape.ho(), shape.wo(), shape.k());
        let pixels = ho * wo;
        assert!(
            x.len() >= images * shape.cin * shape.h * shape.w,
            "conv2d: input too short"
        );
        assert!(weight.len() >= shape.cout * k, "conv2d: weight too short");
        assert!(
            out.len() >= images * shape.cout * pixels,
            "conv2d: output too short"
        );
        assert!(bias.len() >= images * shape.cout, "conv2d: bias too short");
        if images == 0 || pixels == 0 || shape.cout == 0 || k == 0 {
            return true;
        }
        if crate::winograd::applies(&shape, images) {
            // SAFETY: AVX2+FMA checked above, the slices' lengths too.
            unsafe {
                crate::winograd::conv3x3(threads, shape, images, x, weight, bias, accumulate, out)
            };
            return true;
        }
        let blocks = pixels.div_ceil(MC);
        let out = crate::SendPtr(out.as_mut_ptr());
        let run = |(item, panels): (usize, &mut Vec<f32>)| {
            let (image, block) = (item / blocks, item % blocks);
            let start = block * MC;
            let len = MC.min(pixels - start);
            let x = &x[image * shape.cin * shape.h * shape.w..];
            // SAFETY: the item writes only pixels start..start+len of each channel of its
            // image, inside `out` (checked above); no other item writes them.
            unsafe {
                block_product(
                    shape,
                    x,
                    weight,
                    &bias[image * shape.cout..(image + 1) * shape.cout],
                    accumulate,
                    out.get().add(image * shape.cout * pixels),
                    start,
                    len,
                    panels,
                )
            };
        };
        let items = images * blocks;
        if threads <= 1 || items == 1 {
            let mut panels = Vec::new();
            (0..items).for_each(|item| run((item, &mut panels)));
        } else {
            (0..items)
                .into_par_iter()
                .for_each_init(Vec::new, |panels, item| run((item, panels)));
        }
        true
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (threads, shape, images, x, weight, bias, accumulate, out);
        false
    }
}

/// Output pixels `start..start+len` of one image, every channel: `out` is the image's
/// `[cout, pixels]` output, which starts as the bias (plus what it held, when `accumulate`).
///
/// # Safety
/// `out` must be valid for `cout·ho·wo` elements and only this call may touch those pixels.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
unsafe fn block_product(
    shape: ConvShape,
    x: &[f32],
    weight: &[f32],
    bias: &[f32],
    accumulate: bool,
    out: *mut f32,
    start: usize,
    len: usize,
    panels: &mut Vec<f32>,
) {
    let k = shape.k();
    let pixels = shape.ho() * shape.wo();
    let count = len.div_ceil(MR);
    for (co, &b) in bias.iter().enumerate() {
        // SAFETY: these pixels of channel co lie inside the image's output and are this call's.
        let row = unsafe { std::slice::from_raw_parts_mut(out.add(co * pixels + start), len) };
        if accumulate {
            row.iter_mut().for_each(|v| *v += b);
        } else {
            row.fill(b);
        }
    }
    let mut k0 = 0;
    while k0 < k {
        let kb = KC.min(k - k0);
        panels.resize(count * kb * MR, 0.0);
        pack_patches(shape, x, start, len, k0, kb, panels);
        let mut co = 0;
        while co < shape.cout {
            let nr = NR.min(shape.cout - co);
            let rhs = weight[co * k + k0..].as_ptr();
            for p in 0..count {
                let mr = MR.min(len - p * MR);
                // SAFETY: the panel holds kb·MR packed values (zeros past mr), the weights of
                // channels co..co+nr hold kb values from k0 each; the tile lies inside the
                // image's output.
                unsafe {
                    crate::micro_kernel(
                        mr,
                        nr,
                        kb,
                        out.add(co * pixels + start + p * MR),
                        pixels,
                        panels.as_ptr().add(p * kb * MR),
                        rhs,
                        1,
                        k,
                        true,
                    )
                };
            }
            co += nr;
        }
        k0 += kb;
    }
}

/// `dst.len()` consecutive values of padded input row `iy` of one plane from padded column `ix`
/// (zeros in the padding): at stride 1, one output row's part of a panel for one patch row.
fn row_part(s: ConvShape, plane: &[f32], iy: usize, ix: usize, dst: &mut [f32]) {
    let n = dst.len();
    if iy < s.padding || iy - s.padding >= s.h {
        dst.fill(0.0);
        return;
    }
    let input = &plane[(iy - s.padding) * s.w..(iy - s.padding + 1) * s.w];
    // Value l reads input column ix + l - padding.
    let lo = s.padding.saturating_sub(ix).min(n);
    let hi = (s.w + s.padding).saturating_sub(ix).min(n);
    if lo >= hi {
        dst.fill(0.0);
        return;
    }
    dst[..lo].fill(0.0);
    let first = ix + lo - s.padding;
    dst[lo..hi].copy_from_slice(&input[first..first + (hi - lo)]);
    dst[hi..].fill(0.0);
}

/// Packs patch rows `k0..k0+kb` of output pixels `start..start+len` as the micro-kernel's left
/// operand: panel `p` holds, for each patch row, the values of its `MR` pixels side by side
/// (zeros past `len` and outside the image).
#[cfg(target_arch = "x86_64")]
fn pack_patches(
    s: ConvShape,
    x: &[f32],
    start: usize,
    len: usize,
    k0: usize,
    kb: usize,
    panels: &mut [f32],
) {
    let (wo, taps) = (s.wo(), s.kh * s.kw);
    let plane = s.h * s.w;
    // Each panel's first pixel (row, column) and its number of pixels, worked out once: the
    // divisions cost more than the 16-value copies they would precede.
    let mut geometry = [(0, 0, 0); MC / MR];
    for (p, g) in geometry.iter_mut().enumerate().take(len.div_ceil(MR)) {
        let first = start + p * MR;
        *g = (first / wo, first % wo, MR.min(start + len - first));
    }
    for r in 0..kb {
        let row = k0 + r;
        let (ci, ky, kx) = (row / taps, (row % taps) / s.kw, row % s.kw);
        let src = &x[ci * plane..(ci + 1) * plane];
        for (panel, &(oy, ox, n)) in panels.chunks_exact_mut(kb * MR).zip(&geometry) {
            let dst = &mut panel[r * MR..(r + 1) * MR];
            let first = oy * wo + ox;
            let iy = oy * s.stride + ky;
            if s.stride == 1 {
                // Inside the image, each output row's part of the panel is one slice of an input
                // row, zeros to either side (padding) and past n.
                if n == MR
                    && ox + MR <= wo
                    && ox + kx >= s.padding
                    && ox + MR + kx <= s.w + s.padding
                    && iy >= s.padding
                    && iy - s.padding < s.h
                {
                    // The whole panel in one row, inside the image: one 16-value copy.
                    let first = (iy - s.padding) * s.w + ox + kx - s.padding;
                    let whole: &[f32; MR] = src[first..first + MR].try_into().expect("MR");
                    dst.copy_from_slice(whole);
                    continue;
                }
                let (mut oy, mut ox, mut l) = (oy, ox, 0);
                while l < n {
                    let part = (wo - ox).min(n - l);
                    row_part(s, src, oy + ky, ox + kx, &mut dst[l..l + part]);
                    (oy, ox, l) = (oy + 1, 0, l + part);
                }
                dst[n..].fill(0.0);
                continue;
            }
            if ox + n <= wo {
                // One output row at a larger stride (downsampling): every stride-th value of
                // the input row.
                if iy < s.padding || iy - s.padding >= s.h {
                    dst.fill(0.0);
                    continue;
                }
                let input = &src[(iy - s.padding) * s.w..(iy - s.padding + 1) * s.w];
                for (l, d) in dst.iter_mut().enumerate() {
                    // Input column (+ padding) of output column ox + l.
                    let ix = (ox + l) * s.stride + kx;
                    *d = if l < n && ix >= s.padding && ix - s.padding < s.w {
                        input[ix - s.padding]
                    } else {
                        0.0
                    };
                }
                continue;
            }
            for (l, d) in dst.iter_mut().enumerate() {
                let pixel = first + l;
                *d = if l >= n {
                    0.0
                } else {
                    let (oy, ox) = (pixel / wo, pixel % wo);
                    let (iy, ix) = (oy * s.stride + ky, ox * s.stride + kx);
                    if iy < s.padding || ix < s.padding {
                        0.0
                    } else {
                        let (iy, ix) = (iy - s.padding, ix - s.padding);
                        if iy < s.h && ix < s.w {
                            src[iy * s.w + ix]
                        } else {
                            0.0
                        }
                    }
                };
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::test_values as values;

    /// The convolution by its definition, in f64, added to `out`.
    pub(crate) fn reference(s: ConvShape, images: usize, x: &[f32], w: &[f32], out: &mut [f64]) {
        let (ho, wo) = (s.ho(), s.wo());
        for i in 0..images {
            for co in 0..s.cout {
                for oy in 0..ho {
                    for ox in 0..wo {
                        let mut acc = 0f64;
                        for ci in 0..s.cin {
                            for ky in 0..s.kh {
                                for kx in 0..s.kw {
                                    let iy = (oy * s.stride + ky) as isize - s.padding as isize;
                                    let ix = (ox * s.stride + kx) as isize - s.padding as isize;
                                    if iy < 0 || ix < 0 || iy >= s.h as isize || ix >= s.w as isize
                                    {
                                        continue;
                                    }
                                    let xv = x[((i * s.cin + ci) * s.h + iy as usize) * s.w
                                        + ix as usize];
                                    let wv = w[((co * s.cin + ci) * s.kh + ky) * s.kw + kx];
                                    acc += xv as f64 * wv as f64;
                                }
                            }
                        }
                        out[((i * s.cout + co) * ho + oy) * wo + ox] += acc;
                    }
                }
            }
        }
    }

    /// Odd sizes, padding, stride 2 (panels within and across output rows), 1x1, more patch
    /// rows than one packed block, partial panels of pixels and channels, two images, biases per
    /// image, with and without accumulating, one and two threads.
    #[test]
    fn matches_the_definition() {
        let cases = [
            (3, 5, 7, 4, 3, 3, 1, 1),
            (8, 16, 16, 6, 3, 3, 1, 1),
            (40, 9, 13, 13, 3, 3, 1, 1),
            (5, 11, 12, 7, 3, 3, 2, 1),
            (33, 8, 24, 17, 1, 1, 1, 0),
            (2, 4, 4, 3, 3, 3, 2, 0),
            (3, 6, 40, 5, 3, 3, 2, 1),
            (4, 8, 64, 6, 3, 3, 2, 1),
            (5, 4, 31, 7, 3, 3, 1, 1),
        ];
        for (cin, h, w, cout, kh, kw, stride, padding) in cases {
            let s = ConvShape {
                cin,
                h,
                w,
                cout,
                kh,
                kw,
                stride,
                padding,
            };
            let images = 2;
            let x = values(images * cin * h * w, 1);
            let weight = values(cout * cin * kh * kw, 2);
            let bias = values(images * cout, 4);
            let pixels = s.ho() * s.wo();
            let start = values(images * cout * pixels, 3);
            for accumulate in [false, true] {
                let mut want: Vec<f64> = (0..start.len())
                    .map(|i| {
                        bias[i / pixels] as f64 + if accumulate { start[i] as f64 } else { 0.0 }
                    })
                    .collect();
                reference(s, images, &x, &weight, &mut want);
                for threads in [1, 2] {
                    let mut out = start.clone();
                    if !conv2d(threads, s, images, &x, &weight, &bias, accumulate, &mut out) {
                        return; // no AVX2+FMA here: the caller's path is tested instead
                    }
                    for (i, (&got, &want)) in out.iter().zip(&want).enumerate() {
                        assert!(
                            (got as f64 - want).abs()
                                < 1e-4 * (1.0 + (cin * kh * kw) as f64).sqrt(),
                            "{s:?} element {i}: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }
}
