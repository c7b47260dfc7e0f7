//! 2-D convolution for the SDXL UNet and VAE: candle's `Conv2d` weights and configuration, with a
//! faster CPU path.
//!
//! candle 0.11's CPU convolution transposes the input to NHWC, gathers each tile's patches
//! element by element and scatters the result back to NCHW, all of it around the GEMM. Here f32
//! on the CPU starts the output as the biases (and a residual) and adds the product in place:
//! `hyperlora_cpu::conv` where the CPU has AVX2+FMA (an implicit matrix product, or Winograd's
//! F(2×2, 3×3) for 3×3 stride-1 layers), else a patch matrix laid out the way an NCHW weight
//! `[Cout, Cin, kh, kw]` already is — row `(ci, i, j)` of an image is input plane `ci` shifted by
//! `(i, j)`, built from contiguous row copies — and one GEMM `W[Cout, Cin·kh·kw] ·
//! cols[Cin·kh·kw, Ho·Wo]` per image landing directly in NCHW (a 1x1 stride-1 convolution needs
//! no patch matrix; large inputs go in bands of output rows). Other dtypes on the CPU take the
//! patch matrix through candle's matmul. See docs/cpu.md.
//!
//! The same function as candle's, rounded differently: the direct routes sum each output's
//! `Cin·kh·kw` products in another order; Winograd's rounds its transforms too (docs/cpu.md,
//! accuracy). GPUs and unusual configurations (groups, dilation, bf16
//! on the CPU) use candle's own convolution; CUDA uses [`crate::cuda::conv2d`].

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Module, Shape, Tensor, WithDType};
use candle_nn::{Conv2dConfig, VarBuilder};
use rayon::prelude::*;

use crate::Result;
use hyperlora_cpu::conv::ConvShape;
use hyperlora_cpu::gemm::{sgemm, Epilogue, MatRef};

/// Patch matrices above this many elements are built and multiplied in bands of output rows
/// (f32: 128 MiB).
const MAX_COLS_ELEMENTS: usize = 1 << 25;

/// A `Conv2d` with candle's weights (`[Cout, Cin, kh, kw]`), bias and configuration.
#[derive(Debug, Clone)]
pub struct Conv2d {
    inner: candle_nn::Conv2d,
}

impl Conv2d {
    pub fn new(inner: candle_nn::Conv2d) -> Self {
        Self { inner }
    }

    pub fn weight(&self) -> &Tensor {
        self.inner.weight()
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.inner.bias()
    }

    pub fn config(&self) -> &Conv2dConfig {
        self.inner.config()
    }

    /// The same convolution with other weights (e.g. LoRA-merged ones).
    pub fn with_weights(&self, weight: Tensor, bias: Option<Tensor>) -> Self {
        Self::new(candle_nn::Conv2d::new(weight, bias, *self.config()))
    }

    /// Whether [`forward`](Module::forward) takes the patch-matrix path for `x`.
    fn fast_path(&self, x: &Tensor) -> bool {
        let c = self.config();
        x.device().is_cpu()
            && c.groups == 1
            && c.dilation == 1
            && matches!(x.dtype(), DType::F32 | DType::F16 | DType::F64)
            && x.dtype() == self.weight().dtype()
    }

    /// The shapes of convolving `x` [B, Cin, H, W], checked against the weight.
    fn geometry(&self, x: &Tensor) -> candle_core::Result<Geometry> {
        let c = self.config();
        let (b, cin, h, w) = x.dims4()?;
        let (cout, wcin, kh, kw) = self.weight().dims4()?;
        if wcin != cin {
            candle_core::bail!("conv2d: input has {cin} channels, the weight expects {wcin}");
        }
        let (stride, padding) = (c.stride, c.padding);
        if h + 2 * padding < kh || w + 2 * padding < kw {
            candle_core::bail!("conv2d: input {h}x{w} smaller than the kernel {kh}x{kw}");
        }
        Ok(Geometry {
            b,
            shape: ConvShape {
                cin,
                h,
                w,
                cout,
                kh,
                kw,
                stride,
                padding,
            },
        })
    }

    /// `self.forward(x)` + `per_image_bias` [B, Cout] broadcast over the pixels (a resnet's time
    /// embedding) + `residual` (the output's shape): on the CPU inside the product's epilogue.
    pub fn forward_fused(
        &self,
        x: &Tensor,
        per_image_bias: Option<&Tensor>,
        residual: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        if crate::cpu::applies(x) && self.fast_path(x) {
            return self.forward_f32(x, per_image_bias, residual);
        }
        let mut y = self.forward(x)?;
        if let Some(bias) = per_image_bias {
            y = crate::cuda::add_per_channel(&y, bias)?;
        }
        match residual {
            Some(r) => r + y,
            None => Ok(y),
        }
    }

    /// The f32 CPU path: the output starts as the biases (and the residual), and the product is
    /// added in place — by `hyperlora_cpu::conv` where this CPU has its micro-kernel, else by
    /// [`Self::add_product_by_patches`].
    fn forward_f32(
        &self,
        x: &Tensor,
        per_image_bias: Option<&Tensor>,
        residual: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        let g = self.geometry(x)?;
        let (b, cout) = (g.b, g.shape.cout);
        let mut out = match residual {
            Some(r) if r.dims() == [b, cout, g.shape.ho(), g.shape.wo()] => {
                r.flatten_all()?.to_vec1::<f32>()?
            }
            Some(r) => {
                candle_core::bail!("conv2d: residual {:?} does not match the output", r.shape())
            }
            None => vec![0f32; b * cout * g.shape.ho() * g.shape.wo()],
        };
        // [B, Cout]: the bias, plus the per-image one.
        let mut biases = match self.bias() {
            Some(bias) => bias.to_vec1::<f32>()?.repeat(b),
            None => vec![0.0; b * cout],
        };
        if let Some(e) = per_image_bias {
            let e = e.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            if e.len() != biases.len() {
                candle_core::bail!(
                    "conv2d: per-image bias has {} values, not {b}x{cout}",
                    e.len()
                );
            }
            biases.iter_mut().zip(e).for_each(|(v, e)| *v += e);
        }
        let threads = crate::cpu::threads();
        let accumulate = residual.is_some();
        let done = crate::cpu::with_f32(self.weight(), |weight| {
            crate::cpu::with_f32(x, |x| {
                hyperlora_cpu::conv::conv2d(
                    threads, g.shape, b, x, weight, &biases, accumulate, &mut out,
                )
            })
        })??;
        if !done {
            self.add_product_by_patches(&g, x, &biases, accumulate, &mut out)?;
        }
        crate::cpu::tensor(out, (b, cout, g.shape.ho(), g.shape.wo()))
    }

    /// `out = biases + W·patches(x) (+ out when accumulate)` as one [`sgemm`] per image
    /// `W[Cout, K] · cols[K, pixels]` written into the NCHW output, the patch matrix built in
    /// bands of output rows: the path for CPUs without the micro-kernel of `hyperlora_cpu::conv`.
    fn add_product_by_patches(
        &self,
        g: &Geometry,
        x: &Tensor,
        biases: &[f32],
        accumulate: bool,
        out: &mut [f32],
    ) -> candle_core::Result<()> {
        let (cout, wo, k) = (g.shape.cout, g.shape.wo(), g.k());
        let pixels = g.shape.ho() * wo;
        let threads = crate::cpu::threads();
        let image_len = g.shape.cin * g.shape.h * g.shape.w;
        crate::cpu::with_f32(self.weight(), |weight| {
            crate::cpu::with_f32(x, |x| {
                let weight = MatRef::rows(weight, cout, k);
                for (i, out) in out.chunks_mut(cout * pixels).enumerate() {
                    let epi = Epilogue {
                        accumulate,
                        row_bias: Some(&biases[i * cout..(i + 1) * cout]),
                        col_bias: None,
                    };
                    let image = &x[i * image_len..(i + 1) * image_len];
                    if g.pointwise() {
                        let cols = MatRef::rows(image, k, pixels);
                        sgemm(threads, cout, pixels, k, weight, cols, out, pixels, epi);
                        continue;
                    }
                    for op in g.bands(1) {
                        let (start, n) = (op.out_rows.start, op.out_rows.len() * wo);
                        COLS.with_borrow_mut(|cols| {
                            if cols.len() < k * n {
                                cols.resize(k * n, 0.0);
                            }
                            let cols = &mut cols[..k * n];
                            op.fill_into(image, g.shape.h, g.shape.w, cols);
                            let cols = MatRef::rows(cols, k, n);
                            let band = &mut out[start * wo..];
                            sgemm(threads, cout, n, k, weight, cols, band, pixels, epi);
                        });
                    }
                }
            })
        })?
    }

    fn forward_cpu(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let g = self.geometry(x)?;
        let (b, cout, k) = (g.b, g.shape.cout, g.k());
        let weight = self
            .weight()
            .reshape((1, cout, k))?
            .broadcast_as((b, cout, k))?;
        let x = x.contiguous()?;
        let out = if g.pointwise() {
            weight.matmul(&x.reshape((b, g.shape.cin, g.shape.h * g.shape.w))?)?
        } else {
            let mut bands = Vec::new();
            for op in g.bands(b) {
                let cols = x.apply_op1_no_bwd(&op)?;
                bands.push(weight.matmul(&cols)?);
            }
            if bands.len() == 1 {
                bands.pop().expect("one band")
            } else {
                Tensor::cat(&bands, 2)?
            }
        };
        let out = out.reshape((b, cout, g.shape.ho(), g.shape.wo()))?;
        match self.bias() {
            Some(bias) => out.broadcast_add(&bias.reshape((1, cout, 1, 1))?),
            None => Ok(out),
        }
    }
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if crate::cpu::applies(x) && self.fast_path(x) {
            self.forward_f32(x, None, None)
        } else if self.fast_path(x) {
            self.forward_cpu(x)
        } else if let Some(y) = crate::cuda::conv2d(x, self.weight(), self.bias(), self.config())? {
            Ok(y)
        } else {
            self.inner.forward(x)
        }
    }
}

/// The images and sizes of one convolution call.
struct Geometry {
    /// Images in the batch.
    b: usize,
    shape: ConvShape,
}

impl Geometry {
    /// Rows of the patch matrix: `Cin·kh·kw`.
    fn k(&self) -> usize {
        self.shape.k()
    }

    /// A 1x1 stride-1 unpadded convolution: the input already is its patch matrix.
    fn pointwise(&self) -> bool {
        let s = &self.shape;
        s.kh == 1 && s.kw == 1 && s.stride == 1 && s.padding == 0
    }

    /// The patch matrices of `images` images in bands of output rows, each at most
    /// `MAX_COLS_ELEMENTS` elements (at least one row).
    fn bands(&self, images: usize) -> impl Iterator<Item = Im2Col> + '_ {
        let (s, ho, wo) = (&self.shape, self.shape.ho(), self.shape.wo());
        let rows = (MAX_COLS_ELEMENTS / (images * self.k() * wo).max(1)).clamp(1, ho);
        (0..ho).step_by(rows).map(move |start| Im2Col {
            kh: s.kh,
            kw: s.kw,
            stride: s.stride,
            padding: s.padding,
            out_rows: start..(start + rows).min(ho),
            wo,
        })
    }
}

/// `candle_nn::conv2d`: weight and bias under `vb`, as diffusers names them.
pub fn conv2d(
    in_channels: usize,
    out_channels: usize,
    kernel_size: usize,
    cfg: Conv2dConfig,
    vb: VarBuilder,
) -> Result<Conv2d> {
    Ok(Conv2d::new(candle_nn::conv2d(
        in_channels,
        out_channels,
        kernel_size,
        cfg,
        vb,
    )?))
}

/// The patch matrix of a contiguous `[B, C, H, W]` input for output rows `out_rows`:
/// `[B, C·kh·kw, rows·Wo]`, row `(c, i, j)` holding input `(c, y·stride + i - pad, x·stride + j - pad)`
/// for every output pixel `(y, x)` of the band, zero outside the input.
struct Im2Col {
    kh: usize,
    kw: usize,
    stride: usize,
    padding: usize,
    out_rows: std::ops::Range<usize>,
    wo: usize,
}

impl Im2Col {
    fn fill<T: WithDType>(&self, src: &[T], b: usize, c: usize, h: usize, w: usize) -> Vec<T> {
        let n = self.out_rows.len() * self.wo;
        let mut dst = vec![T::from_f64(0.0); b * c * self.kh * self.kw * n];
        self.fill_into(src, h, w, &mut dst);
        dst
    }

    /// Writes every element of `dst` (`[B, C·kh·kw, rows·Wo]`), so it may hold anything before.
    fn fill_into<T: WithDType>(&self, src: &[T], h: usize, w: usize, dst: &mut [T]) {
        let (kh, kw, s, p, wo) = (self.kh, self.kw, self.stride, self.padding, self.wo);
        let n = self.out_rows.len() * wo;
        let zero = T::from_f64(0.0);
        dst.par_chunks_mut(n).enumerate().for_each(|(row, out)| {
            let plane = row / (kh * kw);
            let (i, j) = ((row % (kh * kw)) / kw, row % kw);
            let plane = &src[plane * h * w..(plane + 1) * h * w];
            // Output columns whose input column x·s + j - p lies inside [0, w).
            let x_lo = p.saturating_sub(j).div_ceil(s).min(wo);
            let x_hi = if w + p > j {
                ((w + p - j - 1) / s + 1).min(wo)
            } else {
                0
            };
            for (r, y) in self.out_rows.clone().enumerate() {
                let iy = y * s + i;
                let out_row = &mut out[r * wo..(r + 1) * wo];
                if iy < p || iy - p >= h || x_lo >= x_hi {
                    out_row.fill(zero);
                    continue;
                }
                out_row[..x_lo].fill(zero);
                out_row[x_hi..].fill(zero);
                let in_row = &plane[(iy - p) * w..(iy - p + 1) * w];
                if s == 1 {
                    let first = x_lo + j - p;
                    out_row[x_lo..x_hi].copy_from_slice(&in_row[first..first + (x_hi - x_lo)]);
                } else {
                    for x in x_lo..x_hi {
                        out_row[x] = in_row[x * s + j - p];
                    }
                }
            }
        });
    }
}

thread_local! {
    /// The f32 path's patch matrix, kept between convolutions: a fresh buffer of up to
    /// `MAX_COLS_ELEMENTS` per call cost more in page faults than the copies themselves.
    static COLS: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl CustomOp1 for Im2Col {
    fn name(&self) -> &'static str {
        "hyperlora-im2col"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, c, h, w) = layout.shape().dims4()?;
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("im2col: input must be contiguous");
        };
        let shape = Shape::from((b, c * self.kh * self.kw, self.out_rows.len() * self.wo));
        let out = match storage {
            CpuStorage::F32(v) => CpuStorage::F32(self.fill(&v[start..end], b, c, h, w)),
            CpuStorage::F16(v) => CpuStorage::F16(self.fill(&v[start..end], b, c, h, w)),
            CpuStorage::F64(v) => CpuStorage::F64(self.fill(&v[start..end], b, c, h, w)),
            CpuStorage::BF16(v) => CpuStorage::BF16(self.fill(&v[start..end], b, c, h, w)),
            _ => candle_core::bail!("im2col: unsupported dtype"),
        };
        Ok((out, shape))
    }
}

impl crate::lora::MergeTarget for Conv2d {
    fn weight(&self) -> &Tensor {
        Conv2d::weight(self)
    }

    fn bias(&self) -> Option<&Tensor> {
        Conv2d::bias(self)
    }

    fn replace(&mut self, weight: Tensor, bias: Option<Tensor>) {
        *self = self.with_weights(weight, bias);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sdxl::sampling::noise::TorchGenerator;
    use crate::testing::assert_close;
    use candle_core::Device;

    /// Our convolution against candle's on shapes that exercise padding, stride 2, the VAE's
    /// unpadded downsampler, odd sizes, 1x1 kernels and the banded path.
    #[test]
    fn matches_candles_convolution() {
        let dev = Device::Cpu;
        let cases = [
            // (b, cin, cout, h, w, k, stride, pad)
            (2, 5, 7, 9, 11, 3, 1, 1),
            (1, 4, 6, 10, 6, 3, 2, 1),
            (2, 3, 4, 9, 8, 3, 2, 0),
            (1, 6, 5, 7, 5, 1, 1, 0),
            (2, 3, 3, 5, 4, 3, 1, 0),
            (1, 2, 3, 6, 6, 5, 1, 2),
        ];
        // Seeded: with fresh random values a rare output near ±20 put f32 rounding (a few ulps)
        // past the 1e-5 tolerance.
        let mut g = TorchGenerator::new(0);
        let mut randn = |shape: &[usize]| g.randn(shape).unwrap();
        for (i, &(b, cin, cout, h, w, k, stride, padding)) in cases.iter().enumerate() {
            let weight = randn(&[cout, cin, k, k]);
            let bias = randn(&[cout]);
            let cfg = Conv2dConfig {
                padding,
                stride,
                ..Default::default()
            };
            let theirs = candle_nn::Conv2d::new(weight, Some(bias), cfg);
            let ours = Conv2d::new(theirs.clone());
            let x = randn(&[b, cin, h, w]);
            let expected = theirs.forward(&x).unwrap();
            assert_close(
                &format!("case {i}"),
                &ours.forward(&x).unwrap(),
                &expected,
                1e-5,
            );
            // A strided (non-contiguous) input gives the same result.
            let xt = x
                .transpose(2, 3)
                .unwrap()
                .contiguous()
                .unwrap()
                .transpose(2, 3)
                .unwrap();
            assert_close(
                &format!("case {i} strided"),
                &ours.forward(&xt).unwrap(),
                &expected,
                1e-5,
            );
            // In bands of one output row.
            let (ho, wo) = expected.dims4().map(|d| (d.2, d.3)).unwrap();
            let mut bands = Vec::new();
            for y in 0..ho {
                let op = Im2Col {
                    kh: k,
                    kw: k,
                    stride,
                    padding,
                    out_rows: y..y + 1,
                    wo,
                };
                let cols = x.apply_op1_no_bwd(&op).unwrap();
                let w = ours.weight().reshape((1, cout, cin * k * k)).unwrap();
                let w = w.broadcast_as((b, cout, cin * k * k)).unwrap();
                bands.push(w.matmul(&cols).unwrap());
            }
            let banded = Tensor::cat(&bands, 2)
                .unwrap()
                .reshape((b, cout, ho, wo))
                .unwrap()
                .broadcast_add(&ours.bias().unwrap().reshape((1, cout, 1, 1)).unwrap())
                .unwrap();
            assert_close(&format!("case {i} banded"), &banded, &expected, 1e-5);
            // The fused epilogue: a bias per image and a residual.
            let extra = randn(&[b, cout]);
            let residual = randn(expected.dims());
            let want = check_fused(
                &format!("case {i}"),
                &ours,
                &x,
                &expected,
                &extra,
                &residual,
            );
            // The patch-matrix path of CPUs without the implicit convolution's micro-kernel.
            let g = ours.geometry(&x).unwrap();
            let mut by_patches = residual.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let biases = extra
                .broadcast_add(&ours.bias().unwrap().reshape((1, cout)).unwrap())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            ours.add_product_by_patches(&g, &x, &biases, true, &mut by_patches)
                .unwrap();
            let by_patches = Tensor::from_vec(by_patches, want.shape(), &dev).unwrap();
            assert_close(&format!("case {i} by patches"), &by_patches, &want, 1e-5);
        }
    }

    /// A UNet-like layer that `hyperlora_cpu` computes by Winograd's F(2×2, 3×3) where the CPU
    /// has AVX2+FMA (≥ 32 channels, ≥ 64 output tiles per call): the same outputs as candle's
    /// convolution, plain and with the fused bias per image and residual. Weights are scaled
    /// like a trained layer's (outputs of order 1), so that 1e-5 is a few roundings.
    #[test]
    fn winograd_route_matches_candles_convolution() {
        let mut g = TorchGenerator::new(1);
        let mut randn = |shape: &[usize]| g.randn(shape).unwrap();
        // (b, cin, cout, h, w): odd sizes and rows of tiles that straddle, then 64 tiles in rows
        // of 16 (the vector path).
        for (b, cin, cout, h, w) in [(2, 32, 33, 15, 17), (1, 40, 32, 8, 32)] {
            let weight = (randn(&[cout, cin, 3, 3]) * (1.0 / (9.0 * cin as f64).sqrt())).unwrap();
            let bias = randn(&[cout]);
            let cfg = Conv2dConfig {
                padding: 1,
                ..Default::default()
            };
            let theirs = candle_nn::Conv2d::new(weight, Some(bias), cfg);
            let ours = Conv2d::new(theirs.clone());
            let x = randn(&[b, cin, h, w]);
            let expected = theirs.forward(&x).unwrap();
            let what = format!("{b}x{cin}->{cout} at {h}x{w}");
            assert_close(&what, &ours.forward(&x).unwrap(), &expected, 1e-5);
            let (extra, residual) = (randn(&[b, cout]), randn(expected.dims()));
            check_fused(&what, &ours, &x, &expected, &extra, &residual);
        }
    }

    /// `forward_fused(x, extra, residual)` against `expected` (the plain output) plus `extra`
    /// [B, Cout] per image plus `residual`; returns that sum.
    #[track_caller]
    fn check_fused(
        what: &str,
        ours: &Conv2d,
        x: &Tensor,
        expected: &Tensor,
        extra: &Tensor,
        residual: &Tensor,
    ) -> Tensor {
        let fused = ours.forward_fused(x, Some(extra), Some(residual)).unwrap();
        let (b, cout) = extra.dims2().unwrap();
        let want = (expected
            .broadcast_add(&extra.reshape((b, cout, 1, 1)).unwrap())
            .unwrap()
            + residual)
            .unwrap();
        assert_close(&format!("{what} fused"), &fused, &want, 1e-5);
        want
    }
}
