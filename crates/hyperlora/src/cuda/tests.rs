//! On a CUDA device: the fused kernels against candle's generic ops, and the CPU tests' diffusers
//! fixtures through the CUDA backend. Built only with the `cuda` feature; each test passes with a
//! "skipped" line where no device answers. On a GPU host without this checkout, point
//! `HYPERLORA_REPO` at a copy of the repository for the fixtures.

use candle_core::{DType, Device, Tensor};

use crate::sdxl::model::attention::scaled_dot_product_attention;
use crate::sdxl::pipeline::SdxlPipeline;
use crate::testing::{
    all_finite, assert_close, check_pipeline_case, load_fixture, pipeline_case_params,
    run_pipeline, tiny_model, PIPELINE_CASES,
};

fn cuda() -> Option<Device> {
    match Device::new_cuda(0) {
        Ok(d) => Some(d),
        Err(e) => {
            eprintln!("skipped: no CUDA device ({e})");
            None
        }
    }
}

/// ‖a − b‖ / ‖b‖ over all elements, in f64 on the host.
fn relative_error(a: &Tensor, b: &Tensor) -> f64 {
    let flat = |t: &Tensor| -> Vec<f64> {
        t.to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    let (a, b) = (flat(a), flat(b));
    let num: f64 = a.iter().zip(&b).map(|(x, y)| (x - y) * (x - y)).sum();
    let den: f64 = b.iter().map(|y| y * y).sum();
    (num / den).sqrt()
}

/// Attention per head in f32 through candle's matmul/softmax: [B, S, H·D] layout.
fn reference_attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, scale: f64) -> Tensor {
    let split = |t: &Tensor| {
        let (b, s, w) = t.dims3().unwrap();
        t.to_dtype(DType::F32)
            .unwrap()
            .reshape((b, s, heads, w / heads))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .reshape((b * heads, s, w / heads))
            .unwrap()
            .contiguous()
            .unwrap()
    };
    let (b, s, w) = q.dims3().unwrap();
    scaled_dot_product_attention(&split(q), &split(k), &split(v), scale, true)
        .unwrap()
        .reshape((b, heads, s, w / heads))
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .reshape((b, s, w))
        .unwrap()
}

#[test]
fn flash_attention_matches_reference() {
    let Some(dev) = cuda() else { return };
    let heads = 10;
    let w = heads * 64;
    // Self-attention at SDXL's 64² level, cross-attention to 77 tokens, and ragged lengths.
    for (sq, sk) in [(4096, 4096), (1024, 77), (333, 154), (70, 1)] {
        for (dtype, tol) in [(DType::F16, 4e-3), (DType::BF16, 2e-2)] {
            let r = |s| {
                Tensor::randn(0f32, 1.0, (2, s, w), &dev)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap()
            };
            let (q, k, v) = (r(sq), r(sk), r(sk));
            let scale = 1.0 / 8.0;
            let out = super::flash_attention(&q, &k, &v, heads, scale)
                .unwrap()
                .expect("kernel applies");
            assert_eq!(out.dims(), &[2, sq, w]);
            let want = reference_attention(&q, &k, &v, heads, scale);
            let err = relative_error(&out, &want);
            eprintln!("flash attention {dtype:?} sq={sq} sk={sk}: relative error {err:.2e}");
            assert!(err < tol, "{dtype:?} sq={sq} sk={sk}: relative error {err}");
        }
    }
    // Row-strided inputs (a narrow of a wider projection) give the same result.
    let wide = Tensor::randn(0f32, 1.0, (2, 300, 3 * w), &dev)
        .unwrap()
        .to_dtype(DType::F16)
        .unwrap();
    let (q, k, v) = (
        wide.narrow(2, 0, w).unwrap(),
        wide.narrow(2, w, w).unwrap(),
        wide.narrow(2, 2 * w, w).unwrap(),
    );
    let strided = super::flash_attention(&q, &k, &v, heads, 0.125)
        .unwrap()
        .unwrap();
    let packed = super::flash_attention(
        &q.contiguous().unwrap(),
        &k.contiguous().unwrap(),
        &v.contiguous().unwrap(),
        heads,
        0.125,
    )
    .unwrap()
    .unwrap();
    assert_close("strided vs packed", &strided, &packed, 0.0);
}

#[test]
fn group_norm_matches_candle() {
    let Some(dev) = cuda() else { return };
    for (dtype, tol) in [(DType::F32, 1e-5), (DType::F16, 2e-3), (DType::BF16, 1e-2)] {
        for (shape, groups) in [
            ((2, 320, 64, 64), 32),
            ((1, 64, 7, 5), 8),
            ((2, 512, 4096, 1), 32),
        ] {
            // An offset mean, as real activations have, to exercise the shifted sums.
            let x = (Tensor::randn(0f32, 1.0, shape, &dev).unwrap() + 3.0)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let c = shape.1;
            let weight = Tensor::randn(0f32, 1.0, c, &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let bias = Tensor::randn(0f32, 1.0, c, &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let reference = candle_nn::GroupNorm::new(
                weight.to_dtype(DType::F32).unwrap(),
                bias.to_dtype(DType::F32).unwrap(),
                c,
                groups,
                1e-5,
            )
            .unwrap();
            let want =
                candle_core::Module::forward(&reference, &x.to_dtype(DType::F32).unwrap()).unwrap();
            for silu in [false, true] {
                let got = super::group_norm(&x, &weight, &bias, groups, 1e-5, silu)
                    .unwrap()
                    .expect("kernel applies");
                let want = if silu {
                    want.silu().unwrap()
                } else {
                    want.clone()
                };
                let err = relative_error(&got, &want);
                assert!(
                    err < tol,
                    "{dtype:?} {shape:?} silu={silu}: relative error {err}"
                );
            }
        }
    }
}

fn tiny_pipeline(dev: &Device, dtype: DType) -> SdxlPipeline {
    SdxlPipeline::load(&tiny_model("sdxl"), &Default::default(), dev, dtype).unwrap()
}

/// The whole-pipeline fixtures (text encoders, UNet, samplers, VAE) within the CPU tests'
/// tolerances: latents ≤ 1e-3, images within one level.
#[test]
fn pipeline_matches_diffusers_on_cuda() {
    let Some(dev) = cuda() else { return };
    let pipe = tiny_pipeline(&dev, DType::F32);
    for case in PIPELINE_CASES {
        let (latents, images) = run_pipeline(&pipe, &pipeline_case_params(case));
        check_pipeline_case(case, &latents, &images);
    }
}

#[test]
fn unet_and_vae_match_diffusers_on_cuda() {
    let Some(dev) = cuda() else { return };
    let pipe = tiny_pipeline(&dev, DType::F32);
    let f = load_fixture("sdxl_unet", "forward.safetensors");
    let on = |name: &str| f[name].to_device(&dev).unwrap();
    for t in [999.0, 421.0] {
        let out = pipe
            .unet
            .forward(
                &on("sample"),
                t,
                &on("encoder_hidden_states"),
                &on("text_embeds"),
                &on("time_ids"),
            )
            .unwrap();
        assert_close(&format!("unet t={t}"), &out, &f[&format!("out_t{t}")], 1e-3);
    }
    let f = load_fixture("sdxl_vae", "decode.safetensors");
    let image = pipe.vae.decode(&f["z"].to_device(&dev).unwrap()).unwrap();
    assert_close("vae decode", &image, &f["image"], 1e-3);
}

/// Reports how far half precision moves the tiny pipeline's images from f32 (PSNR, dB).
#[test]
fn half_precision_psnr_against_f32() {
    let Some(dev) = cuda() else { return };
    let p = pipeline_case_params("euler_cfg5");
    let (_, full) = run_pipeline(&tiny_pipeline(&dev, DType::F32), &p);
    for dtype in [DType::F16, DType::BF16] {
        let (latents, half) = run_pipeline(&tiny_pipeline(&dev, dtype), &p);
        assert!(all_finite(&latents), "{dtype:?}: non-finite latents");
        let (mut se, mut n) = (0f64, 0usize);
        for (a, b) in full.iter().zip(&half) {
            for (x, y) in a.data.iter().zip(&b.data) {
                se += (*x as f64 - *y as f64).powi(2);
                n += 1;
            }
        }
        let mse = se / n as f64;
        let psnr = if mse == 0.0 {
            f64::INFINITY
        } else {
            10.0 * (255f64.powi(2) / mse).log10()
        };
        eprintln!("PSNR {dtype:?} vs f32 (tiny pipeline, euler_cfg5): {psnr:.1} dB");
        assert!(psnr > 25.0, "{dtype:?}: PSNR {psnr:.1} dB");
    }
}

#[test]
fn geglu_bias_and_convolution_match_candle() {
    let Some(dev) = cuda() else { return };
    for (dtype, tol) in [(DType::F32, 1e-5), (DType::F16, 2e-3), (DType::BF16, 1e-2)] {
        let r = |shape: &[usize]| {
            Tensor::randn(0f32, 1.0, shape, &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap()
        };
        let f32 = |t: &Tensor| t.to_dtype(DType::F32).unwrap();

        let h = r(&[2, 100, 2 * 640]);
        let got = super::geglu(&h).unwrap().expect("kernel applies");
        let (value, gate) = (
            f32(&h.narrow(2, 0, 640).unwrap()),
            f32(&h.narrow(2, 640, 640).unwrap()),
        );
        let want = (value * gate.gelu_erf().unwrap()).unwrap();
        let err = relative_error(&got, &want);
        assert!(err < tol, "geglu {dtype:?}: relative error {err}");

        // The feed-forward's projection with its bias folded into the GEGLU pass.
        let (w, b, x) = (r(&[2 * 48, 64]), r(&[2 * 48]), r(&[2, 50, 64]));
        let got = super::linear_geglu(&candle_nn::Linear::new(w.clone(), Some(b.clone())), &x)
            .unwrap()
            .expect("applies on CUDA");
        let h =
            candle_core::Module::forward(&candle_nn::Linear::new(f32(&w), Some(f32(&b))), &f32(&x))
                .unwrap();
        let want = (h.narrow(2, 0, 48).unwrap() * h.narrow(2, 48, 48).unwrap().gelu_erf().unwrap())
            .unwrap();
        let err = relative_error(&got, &want);
        assert!(err < tol, "linear_geglu {dtype:?}: relative error {err}");

        let (w, b, x) = (r(&[96, 64]), r(&[96]), r(&[2, 50, 64]));
        let got = super::linear(&candle_nn::Linear::new(w.clone(), Some(b.clone())), &x).unwrap();
        let want =
            candle_core::Module::forward(&candle_nn::Linear::new(f32(&w), Some(f32(&b))), &f32(&x))
                .unwrap();
        let err = relative_error(&got, &want);
        assert!(err < tol, "linear {dtype:?}: relative error {err}");

        let residual = r(&[2, 50, 96]);
        let got = super::linear_residual(
            &candle_nn::Linear::new(w.clone(), Some(b.clone())),
            &x,
            &residual,
        )
        .unwrap();
        let err = relative_error(&got, &(want + f32(&residual)).unwrap());
        assert!(
            err < tol,
            "linear + residual {dtype:?}: relative error {err}"
        );

        let (x, temb) = (r(&[2, 32, 5, 7]), r(&[2, 32]));
        let got = super::add_per_channel(&x, &temb).unwrap();
        let want = f32(&x)
            .broadcast_add(&f32(&temb).reshape((2, 32, 1, 1)).unwrap())
            .unwrap();
        let err = relative_error(&got, &want);
        assert!(err < tol, "add_per_channel {dtype:?}: relative error {err}");

        // 3x3 same, 3x3 stride 2 (downsampling), 1x1 shortcut; reference on the CPU in f32.
        for (cin, cout, k, pad, stride, size) in [
            (64, 96, 3, 1, 1, 32),
            (64, 64, 3, 1, 2, 33),
            (96, 32, 1, 0, 1, 16),
        ] {
            let (x, w, b) = (r(&[2, cin, size, size]), r(&[cout, cin, k, k]), r(&[cout]));
            let cfg = candle_nn::Conv2dConfig {
                padding: pad,
                stride,
                ..Default::default()
            };
            let got = super::conv2d(&x, &w, Some(&b), &cfg)
                .unwrap()
                .expect("applies on CUDA");
            let cpu = |t: &Tensor| f32(t).to_device(&Device::Cpu).unwrap();
            let want = cpu(&x)
                .conv2d(&cpu(&w), pad, stride, 1, 1)
                .unwrap()
                .broadcast_add(&cpu(&b).reshape((1, cout, 1, 1)).unwrap())
                .unwrap();
            let err = relative_error(&got, &want);
            eprintln!("conv {dtype:?} {cin}->{cout} k{k} s{stride}: relative error {err:.2e}");
            assert!(
                err < tol,
                "conv {dtype:?} {cin}->{cout} k{k} s{stride}: relative error {err}"
            );
        }
    }
}
