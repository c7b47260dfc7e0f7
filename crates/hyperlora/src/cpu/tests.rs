//! Each fast path against candle's generic ops on the same inputs (the parity tests then check
//! the models they make up against diffusers).

use candle_core::{Device, Module, Tensor, D};
use candle_nn::Linear;

use crate::sdxl::sampling::noise::TorchGenerator;
use crate::testing::assert_close;

thread_local! {
    /// Seeded per test (each test runs on its own thread): the same values on every run, so a
    /// tolerance that holds once holds always.
    static GENERATOR: std::cell::RefCell<TorchGenerator> = std::cell::RefCell::new(TorchGenerator::new(0));
}

fn randn(shape: &[usize]) -> Tensor {
    GENERATOR.with_borrow_mut(|g| g.randn(shape).unwrap())
}

#[test]
fn group_norm_matches_candle() {
    for (shape, groups) in [
        (vec![2, 6, 5, 7], 3),
        (vec![1, 32, 4, 4], 32),
        (vec![2, 4, 3], 1),
    ] {
        let c = shape[1];
        let (w, b) = (randn(&[c]), randn(&[c]));
        let x = randn(&shape).affine(3.0, 1.5).unwrap();
        let expected = candle_nn::GroupNorm::new(w.clone(), b.clone(), c, groups, 1e-5)
            .unwrap()
            .forward(&x)
            .unwrap();
        let ours = super::group_norm(&x, &w, &b, groups, 1e-5, false)
            .unwrap()
            .unwrap();
        assert_close("group norm", &ours, &expected, 1e-5);
        let ours = super::group_norm(&x, &w, &b, groups, 1e-5, true)
            .unwrap()
            .unwrap();
        assert_close("group norm + silu", &ours, &expected.silu().unwrap(), 1e-5);
    }
}

#[test]
fn linears_match_candle() {
    let x = randn(&[2, 13, 40]);
    let linear = Linear::new(randn(&[70, 40]), Some(randn(&[70])));
    let expected = linear.forward(&x).unwrap();
    let ours = super::linear(&linear, &x, None).unwrap().unwrap();
    assert_close("linear", &ours, &expected, 1e-5);
    let residual = randn(&[2, 13, 70]);
    let ours = super::linear(&linear, &x, Some(&residual))
        .unwrap()
        .unwrap();
    assert_close(
        "linear + residual",
        &ours,
        &(&expected + &residual).unwrap(),
        1e-5,
    );
    // A strided input is made contiguous first.
    let xt = x
        .transpose(0, 1)
        .unwrap()
        .contiguous()
        .unwrap()
        .transpose(0, 1)
        .unwrap();
    let ours = super::linear(&linear, &xt, None).unwrap().unwrap();
    assert_close("linear, strided input", &ours, &expected, 1e-5);

    let inner = expected.dim(D::Minus1).unwrap() / 2;
    let value = expected.narrow(D::Minus1, 0, inner).unwrap();
    let gate = expected.narrow(D::Minus1, inner, inner).unwrap();
    let geglu = (value * gate.gelu_erf().unwrap()).unwrap();
    let ours = super::linear_geglu(&linear, &x).unwrap().unwrap();
    assert_close("geglu", &ours, &geglu, 1e-5);
}

#[test]
fn projections_between_maps_and_tokens_match_candle() {
    let (b, c, h, w, n) = (2, 12, 3, 5, 20);
    let x = randn(&[b, c, h, w]);
    let proj_in = Linear::new(randn(&[n, c]), Some(randn(&[n])));
    let tokens = x
        .permute((0, 2, 3, 1))
        .unwrap()
        .reshape((b, h * w, c))
        .unwrap();
    let expected = proj_in.forward(&tokens).unwrap();
    let ours = super::linear_from_map(&proj_in, &x).unwrap().unwrap();
    assert_close("proj_in", &ours, &expected, 1e-5);

    let proj_out = Linear::new(randn(&[c, n]), Some(randn(&[c])));
    let map = proj_out
        .forward(&expected)
        .unwrap()
        .reshape((b, h, w, c))
        .unwrap()
        .permute((0, 3, 1, 2))
        .unwrap();
    let ours = super::linear_to_map(&proj_out, &expected, &x)
        .unwrap()
        .unwrap();
    // Outputs reach ~100 here: 1e-4 is float rounding.
    assert_close("proj_out + residual", &ours, &(map + &x).unwrap(), 1e-4);
}

#[test]
fn attention_matches_the_definition() {
    // Heads interleaved in the last dimension; query blocks with a ragged end.
    for (b, sq, sk, heads, d) in [(2, 37, 11, 3, 8), (1, 300, 260, 2, 64), (3, 5, 77, 1, 16)] {
        let q = randn(&[b, sq, heads * d]);
        let k = randn(&[b, sk, heads * d]);
        let v = randn(&[b, sk, heads * d]);
        let split = |t: &Tensor| {
            let s = t.dim(1).unwrap();
            t.reshape((b, s, heads, d))
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .contiguous()
                .unwrap()
        };
        let scores = (split(&q).matmul(&split(&k).t().unwrap()).unwrap() * 0.3).unwrap();
        let probs = candle_nn::ops::softmax_last_dim(&scores).unwrap();
        let expected = probs
            .matmul(&split(&v))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .reshape((b, sq, heads * d))
            .unwrap();
        let ours = super::attention(&q, &k, &v, heads, 0.3).unwrap().unwrap();
        assert_close("attention", &ours, &expected, 1e-5);
    }
}

#[test]
fn only_f32_cpu_tensors_take_the_fast_paths() {
    let x = randn(&[1, 4, 2, 2])
        .to_dtype(candle_core::DType::F16)
        .unwrap();
    let w = Tensor::ones(4, candle_core::DType::F16, &Device::Cpu).unwrap();
    assert!(super::group_norm(&x, &w, &w, 2, 1e-5, false)
        .unwrap()
        .is_none());
}

#[test]
fn upsampling_matches_candle() {
    let x = randn(&[2, 3, 4, 5]);
    let ours = super::upsample_nearest2x(&x).unwrap().unwrap();
    assert_close(
        "upsample",
        &ours,
        &x.upsample_nearest2d(8, 10).unwrap(),
        0.0,
    );
}

#[test]
fn activations_match_candle() {
    let x = randn(&[3, 50]).affine(4.0, 0.0).unwrap();
    let gelu = super::gelu(&x, false).unwrap().unwrap();
    assert_close("gelu", &gelu, &x.gelu_erf().unwrap(), 1e-5);
    let quick = super::gelu(&x, true).unwrap().unwrap();
    let expected = (&x * candle_nn::ops::sigmoid(&(&x * 1.702).unwrap()).unwrap()).unwrap();
    assert_close("quick gelu", &quick, &expected, 1e-5);
}
