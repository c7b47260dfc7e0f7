//! Times our UNet forward on a diffusers UNet folder (driven by `bench/unet_cpu.py`, which
//! times diffusers on the same folder and inputs; see bench/README.md).
//!
//! ```text
//! RAYON_NUM_THREADS=2 bench_unet --model DIR --inputs inputs.safetensors \
//!     [--expected out.safetensors] [--timestep 421] [--warmup 2] [--iters 5] [--dtype f32]
//! ```
//! `inputs.safetensors` holds `sample`, `encoder_hidden_states`, `text_embeds`, `time_ids`;
//! `--expected` holds diffusers' output as `out`. Prints one JSON line:
//! `{"times_s": [...], "median_s": .., "max_abs_diff": ..}`.

use std::path::PathBuf;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use hyperlora::device::select_dtype;
use hyperlora::sdxl::model::unet::{Config, UNet2DConditionModel};
use hyperlora::weights::{Component, ComponentFiles};

struct Args {
    model: PathBuf,
    inputs: PathBuf,
    expected: Option<PathBuf>,
    timestep: f64,
    warmup: usize,
    iters: usize,
    dtype: Option<String>,
}

fn parse_args() -> Args {
    let mut args = Args {
        model: PathBuf::new(),
        inputs: PathBuf::new(),
        expected: None,
        timestep: 421.0,
        warmup: 2,
        iters: 5,
        dtype: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--model" => args.model = value().into(),
            "--inputs" => args.inputs = value().into(),
            "--expected" => args.expected = Some(value().into()),
            "--timestep" => args.timestep = value().parse().expect("--timestep"),
            "--warmup" => args.warmup = value().parse().expect("--warmup"),
            "--iters" => args.iters = value().parse().expect("--iters"),
            "--dtype" => args.dtype = Some(value()),
            other => panic!("unknown argument {other}"),
        }
    }
    assert!(
        !args.model.as_os_str().is_empty() && !args.inputs.as_os_str().is_empty(),
        "usage: bench_unet --model DIR --inputs FILE [--expected FILE] [--timestep T] [--warmup N] [--iters N] [--dtype f32]"
    );
    args
}

fn main() -> hyperlora::Result<()> {
    let args = parse_args();
    let device = Device::Cpu;
    let dtype = select_dtype(args.dtype.as_deref(), &device)?;
    let files = ComponentFiles::locate(&args.model, Component::Unet, None)?;
    let config = Config::from_json(&files.config)?;
    let unet = UNet2DConditionModel::new(files.var_builder(dtype, &device)?, &config)?;
    let x = candle_core::safetensors::load(&args.inputs, &device)?;
    let run = || -> hyperlora::Result<Tensor> {
        unet.forward(
            &x["sample"],
            args.timestep,
            &x["encoder_hidden_states"],
            &x["text_embeds"],
            &x["time_ids"],
        )
    };
    let mut out = None;
    for _ in 0..args.warmup {
        out = Some(run()?);
    }
    let mut times = Vec::with_capacity(args.iters);
    for _ in 0..args.iters {
        let t0 = Instant::now();
        out = Some(run()?);
        times.push(t0.elapsed().as_secs_f64());
    }
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    let median = if sorted.is_empty() {
        f64::NAN
    } else if sorted.len() % 2 == 1 {
        sorted[sorted.len() / 2]
    } else {
        (sorted[sorted.len() / 2 - 1] + sorted[sorted.len() / 2]) / 2.0
    };
    let max_abs_diff = match (&args.expected, out) {
        (Some(path), Some(out)) if path.is_file() => {
            let expected = candle_core::safetensors::load(path, &device)?;
            let diff = (out.to_dtype(DType::F32)? - &expected["out"])?
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f32>()?;
            serde_json::json!(diff)
        }
        _ => serde_json::Value::Null,
    };
    println!(
        "{}",
        serde_json::json!({
            "times_s": times,
            "median_s": median,
            "max_abs_diff": max_abs_diff,
            "threads": candle_core::utils::get_num_threads(),
            "dtype": format!("{dtype:?}"),
        })
    );
    Ok(())
}
