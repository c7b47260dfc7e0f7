//! What a ControlNet costs per denoising step: one UNet evaluation alone, then the same with one
//! ControlNet (its forward plus the UNet with residuals), random weights, one CFG step (batch 2).
//! Driven by `bench/controlnet_cpu.py`, which times diffusers the same way (see bench/README.md).
//!
//! ```text
//! RAYON_NUM_THREADS=2 bench_controlnet --config tiny|mid|sdxl [--latent 32] [--warmup 1]
//!     [--iters 3] [--device cpu] [--dtype f32]
//! ```
//! `tiny` is `models/tiny/sdxl/unet`, `mid` SDXL's structure at widths 128/256/512 (as
//! `bench/cpu.py`), `sdxl` SDXL base. Prints one JSON line:
//! `{"plain_median_s": .., "controlnet_median_s": .., "ratio": ..}`.

use std::path::Path;
use std::time::Instant;

use candle_core::{Device, Tensor};
use hyperlora::device::{select_device, select_dtype};
use hyperlora::sdxl::model::controlnet::{self, ControlNetModel};
use hyperlora::sdxl::model::unet::{Config, UNet2DConditionModel};

#[path = "common/random_weights.rs"]
mod random_weights;
use random_weights::random_vb;

struct Args {
    config: String,
    latent: usize,
    warmup: usize,
    iters: usize,
    device: String,
    dtype: Option<String>,
}

fn parse_args() -> Args {
    let mut args = Args {
        config: "tiny".into(),
        latent: 32,
        warmup: 1,
        iters: 3,
        device: "cpu".into(),
        dtype: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--config" => args.config = value(),
            "--latent" => args.latent = value().parse().expect("--latent"),
            "--warmup" => args.warmup = value().parse().expect("--warmup"),
            "--iters" => args.iters = value().parse().expect("--iters"),
            "--device" => args.device = value(),
            "--dtype" => args.dtype = Some(value()),
            other => panic!("unknown argument {other}"),
        }
    }
    args
}

/// SDXL's structure at reduced widths, as `bench/cpu.py`'s `mid_config`.
fn mid_config() -> Config {
    Config {
        block_out_channels: vec![128, 256, 512],
        attention_head_dim: vec![2, 4, 8],
        transformer_layers_per_block: vec![1, 2, 2],
        ..Config::sdxl_base()
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn time(args: &Args, device: &Device, mut f: impl FnMut() -> hyperlora::Result<()>) -> f64 {
    for _ in 0..args.warmup {
        f().unwrap();
    }
    let times = (0..args.iters)
        .map(|_| {
            let start = Instant::now();
            f().unwrap();
            device.synchronize().unwrap();
            start.elapsed().as_secs_f64()
        })
        .collect();
    median(times)
}

fn main() -> hyperlora::Result<()> {
    let args = parse_args();
    let device = select_device(&args.device)?;
    let dtype = select_dtype(args.dtype.as_deref(), &device)?;
    let config = match args.config.as_str() {
        "tiny" => Config::from_json(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/tiny/sdxl/unet/config.json"),
        )?,
        "mid" => mid_config(),
        "sdxl" => Config::sdxl_base(),
        other => panic!("--config tiny|mid|sdxl, got {other}"),
    };
    let unet = UNet2DConditionModel::new(random_vb(dtype, &device), &config)?;
    let net = ControlNetModel::new(
        random_vb(dtype, &device),
        &controlnet::Config::from_unet(config.clone()),
    )?;

    let (b, h) = (2, args.latent);
    let cross = config.cross_attention_dim[0];
    let add_dim = config.addition_time_embed_dim.unwrap_or(0);
    let pooled = config.projection_class_embeddings_input_dim.unwrap_or(0) - 6 * add_dim;
    let sample = Tensor::randn(0f32, 1.0, (b, 4, h, h), &device)?;
    let context = Tensor::randn(0f32, 1.0, (b, 77, cross), &device)?;
    let text_embeds = Tensor::randn(0f32, 1.0, (b, pooled), &device)?;
    let side = (h * 8) as f32;
    let time_ids = Tensor::new(&[side, side, 0.0, 0.0, side, side], &device)?
        .unsqueeze(0)?
        .repeat((b, 1))?;
    let image = Tensor::rand(0f32, 1.0, (b, 3, 8 * h, 8 * h), &device)?;
    let unet_cond = unet.condition(&context, &text_embeds, &time_ids)?;
    let net_cond = net.condition(&context, &text_embeds, &time_ids)?;

    let plain = time(&args, &device, || {
        unet.forward_conditioned(&sample, 421.0, &unet_cond, None)
            .map(drop)
    });
    let controlled = time(&args, &device, || {
        let r = net.forward(&sample, 421.0, &net_cond, &image, 0.7, false)?;
        unet.forward_controlled(&sample, 421.0, &unet_cond, None, Some(&r))
            .map(drop)
    });
    let controlnet_alone = time(&args, &device, || {
        net.forward(&sample, 421.0, &net_cond, &image, 0.7, false)
            .map(drop)
    });
    println!(
        "{}",
        serde_json::json!({
            "config": args.config,
            "latent": h,
            "batch": b,
            "dtype": format!("{dtype:?}"),
            "plain_median_s": plain,
            "controlnet_median_s": controlled,
            "controlnet_alone_median_s": controlnet_alone,
            "ratio": controlled / plain,
        })
    );
    Ok(())
}
