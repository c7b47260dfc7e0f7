//! Times one stage of ours on a diffusers folder (driven by `bench/cpu.py`, which times
//! diffusers/transformers on the same folder and inputs; see bench/README.md).
//!
//! ```text
//! RAYON_NUM_THREADS=2 bench_cpu --stage unet|vae|text --model DIR --inputs inputs.safetensors \
//!     [--expected out.safetensors] [--timestep 421] [--warmup 2] [--iters 5] [--dtype f32]
//! ```
//! - `unet`: `DIR` is a UNet folder; the inputs hold `sample`, `encoder_hidden_states`,
//!   `text_embeds`, `time_ids`; one forward.
//! - `vae`: `DIR` is an AutoencoderKL folder; the inputs hold `latents`; one decode.
//! - `text`: `DIR` holds `text_encoder/` and `text_encoder_2/`; the inputs hold `input_ids`
//!   [B, 77]; both encoders, output = both penultimate states side by side, then bigG's
//!   projected pooled output (flattened, as bench/cpu.py saves diffusers').
//!
//! `--expected` holds the reference output as `out`. Prints one JSON line:
//! `{"times_s": [...], "median_s": .., "max_abs_diff": ..}`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use hyperlora::clip::text::ClipTextConfig;
use hyperlora::device::select_dtype;
use hyperlora::sdxl::model::unet::{self, UNet2DConditionModel};
use hyperlora::sdxl::model::vae::{self, AutoencoderKL};
use hyperlora::sdxl::text::encoders::SdxlTextEncoders;
use hyperlora::weights::{Component, ComponentFiles};

struct Args {
    stage: String,
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
        stage: "unet".into(),
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
            "--stage" => args.stage = value(),
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
        "usage: bench_cpu --stage unet|vae|text --model DIR --inputs FILE [--expected FILE] [--timestep T] [--warmup N] [--iters N] [--dtype f32]"
    );
    args
}

type Stage = Box<dyn Fn(&HashMap<String, Tensor>) -> hyperlora::Result<Tensor>>;

/// The model of `args.stage`, loaded, as a function of the inputs.
fn stage(args: &Args, dtype: DType, device: &Device) -> hyperlora::Result<Stage> {
    let timestep = args.timestep;
    Ok(match args.stage.as_str() {
        "unet" => {
            let files = ComponentFiles::locate(&args.model, Component::Unet, None)?;
            let config = unet::Config::from_json(&files.config)?;
            let unet = UNet2DConditionModel::new(files.var_builder(dtype, device)?, &config)?;
            Box::new(move |x| {
                unet.forward(
                    &x["sample"],
                    timestep,
                    &x["encoder_hidden_states"],
                    &x["text_embeds"],
                    &x["time_ids"],
                )
            })
        }
        "vae" => {
            let files = ComponentFiles::locate(&args.model, Component::Vae, None)?;
            let config = vae::Config::from_json(&files.config)?;
            let vae = AutoencoderKL::new(files.var_builder(dtype, device)?, &config)?;
            Box::new(move |x| vae.decode(&x["latents"]))
        }
        "text" => {
            let load = |component: Component| -> hyperlora::Result<_> {
                let files = ComponentFiles::locate(
                    args.model.join(component.subfolder()),
                    component,
                    None,
                )?;
                let config = ClipTextConfig::from_json_file(&files.config)?;
                Ok((files.var_builder(dtype, device)?, config))
            };
            let (vb_l, config_l) = load(Component::TextEncoder)?;
            let (vb_g, config_g) = load(Component::TextEncoder2)?;
            let encoders = SdxlTextEncoders::load(vb_l, &config_l, vb_g, &config_g)?;
            Box::new(move |x| {
                let ids = &x["input_ids"].to_dtype(DType::U32)?;
                let l = encoders.clip_l.forward(ids)?;
                let g = encoders.clip_g.forward(ids)?;
                let hidden = Tensor::cat(&[l.penultimate(), g.penultimate()], 2)?;
                let pooled = g.text_embeds.expect("projection model sets text_embeds");
                Ok(Tensor::cat(
                    &[hidden.flatten_all()?, pooled.flatten_all()?],
                    0,
                )?)
            })
        }
        other => panic!("unknown stage {other} (unet, vae, text)"),
    })
}

fn main() -> hyperlora::Result<()> {
    let args = parse_args();
    let device = Device::Cpu;
    let dtype = select_dtype(args.dtype.as_deref(), &device)?;
    let x = candle_core::safetensors::load(&args.inputs, &device)?;
    let run = stage(&args, dtype, &device)?;
    let run = || run(&x);
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
