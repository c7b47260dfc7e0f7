//! GPU benchmark of our SDXL, self-contained: the models get RANDOM weights of the real
//! configuration (same compute as real weights), made on the device, so the binary needs no
//! weight files, no network, no Rust toolchain: only the NVIDIA driver and the CUDA libraries
//! candle links (cuBLAS, cuRAND, NVRTC, cudart; cuDNN with `cudnn`). See bench/README.md.
//!
//! ```text
//! bash bench/gpu_pack.sh    # builds it with --features cudnn (and the variants) into .gpubench/
//! bench_gpu [--device cuda|cpu] [--configs DIR] [--dtype f16] [--vae-dtype f32] [--size 1024]
//!           [--steps 20] [--warmup 2] [--iters 10] [--gen-iters 3] [--json out.json] [--build-only]
//!           [--phase-budget 40] [--phases text_encode,unet_forward_b2,...] [--profile unet|vae]
//! ```
//! `--profile unet|vae` runs that model twice as warm-up, then once between
//! `cuProfilerStart`/`cuProfilerStop` and exits: for `ncu --profile-from-start off`, which then
//! measures the kernels of exactly one UNet forward (batch 2) or one VAE decode.
//! Times: UNet forward (batch 2 = one CFG step), text encoding (prompt + negative prompt through
//! both encoders, tokenizer included), VAE decode, the 20-step denoising loop, the full
//! `generate()` (text, loop, decode, RGB8 on the host), and the device memory in use (polled).
//! `--configs` takes the configs of a diffusers folder instead of SDXL base's (e.g. the tiny
//! model, for a quick run on the CPU).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use candle_core::{Device, Tensor};
use hyperlora::clip::text::ClipTextConfig;
use hyperlora::device::{select_device, select_dtype};
use hyperlora::sdxl::model::{unet, vae};
use hyperlora::sdxl::pipeline::{GenerateParams, SdxlPipeline};
use hyperlora::sdxl::sampling::sampler::{Sampler, SchedulerConfig, SigmaSchedule};
use hyperlora::sdxl::text::encoders::SdxlTextEncoders;
use hyperlora::sdxl::text::tokenizer::{ClipTokenizer, SDXL_PAD_TOKEN, SDXL_PAD_TOKEN_2};
use hyperlora::CancelToken;
use hyperlora::Stage;
use serde_json::{json, Value};

/// CLIP's BPE merges, so the binary needs no files beside it.
const MERGES: &str = include_str!("../../../models/clip-tokenizer/merges.txt");

const PROMPT: &str = "a photo of an astronaut riding a horse on the moon, highly detailed, 8k";
const NEGATIVE: &str = "blurry, low quality, deformed";

#[path = "common/random_weights.rs"]
mod random_weights;
use random_weights::random_vb;

struct Args {
    device: String,
    configs: Option<PathBuf>,
    dtype: Option<String>,
    vae_dtype: String,
    size: usize,
    steps: usize,
    warmup: usize,
    iters: usize,
    gen_iters: usize,
    json: Option<PathBuf>,
    build_only: bool,
    phase_budget: f64,
    profile: Option<String>,
    phases: Option<Vec<String>>,
}

fn parse_args() -> Args {
    let mut a = Args {
        device: "cuda".into(),
        configs: None,
        dtype: None,
        vae_dtype: "f32".into(),
        size: 1024,
        steps: 20,
        warmup: 2,
        iters: 10,
        gen_iters: 3,
        json: None,
        build_only: false,
        phase_budget: 40.0,
        profile: None,
        phases: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut v = || it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--device" => a.device = v(),
            "--configs" => a.configs = Some(v().into()),
            "--dtype" => a.dtype = Some(v()),
            "--vae-dtype" => a.vae_dtype = v(),
            "--size" => a.size = v().parse().expect("--size"),
            "--steps" => a.steps = v().parse().expect("--steps"),
            "--warmup" => a.warmup = v().parse().expect("--warmup"),
            "--iters" => a.iters = v().parse().expect("--iters"),
            "--gen-iters" => a.gen_iters = v().parse().expect("--gen-iters"),
            "--json" => a.json = Some(v().into()),
            "--build-only" => a.build_only = true,
            "--profile" => a.profile = Some(v()),
            "--phases" => a.phases = Some(v().split(',').map(str::to_string).collect()),
            "--phase-budget" => a.phase_budget = v().parse().expect("--phase-budget"),
            "-h" | "--help" => {
                println!("see the header of crates/hyperlora/examples/bench_gpu.rs");
                std::process::exit(0);
            }
            other => panic!("unknown argument {other}"),
        }
    }
    a
}

/// Device memory in use (total - free), polled in the background; CUDA only.
struct MemoryPoller {
    peak: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    current: Arc<dyn Fn() -> Option<usize> + Send + Sync>,
}

impl MemoryPoller {
    fn new(device: &Device) -> Self {
        let current: Arc<dyn Fn() -> Option<usize> + Send + Sync> = memory_probe(device);
        let peak = Arc::new(AtomicUsize::new(current().unwrap_or(0)));
        let stop = Arc::new(AtomicBool::new(false));
        {
            let (peak, stop, current) = (peak.clone(), stop.clone(), current.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if let Some(used) = current() {
                        peak.fetch_max(used, Ordering::Relaxed);
                    } else {
                        return;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(2));
                }
            });
        }
        Self {
            peak,
            stop,
            current,
        }
    }

    fn current(&self) -> Option<usize> {
        (self.current)()
    }

    /// Peak since the last reset, then restart from the current use.
    fn take_peak(&self) -> Option<usize> {
        let now = self.current()?;
        Some(self.peak.swap(now, Ordering::Relaxed).max(now))
    }
}

impl Drop for MemoryPoller {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

#[cfg(feature = "cuda")]
fn memory_probe(device: &Device) -> Arc<dyn Fn() -> Option<usize> + Send + Sync> {
    match device {
        Device::Cuda(d) => {
            let ctx = d.cuda_stream().context().clone();
            Arc::new(move || ctx.mem_get_info().ok().map(|(free, total)| total - free))
        }
        _ => Arc::new(|| None),
    }
}

#[cfg(not(feature = "cuda"))]
fn memory_probe(_: &Device) -> Arc<dyn Fn() -> Option<usize> + Send + Sync> {
    Arc::new(|| None)
}

#[cfg(feature = "cuda")]
fn device_name(device: &Device) -> String {
    match device {
        Device::Cuda(d) => d
            .cuda_stream()
            .context()
            .name()
            .unwrap_or_else(|_| "cuda".into()),
        _ => "cpu".into(),
    }
}

#[cfg(not(feature = "cuda"))]
fn device_name(_: &Device) -> String {
    "cpu".into()
}

/// Brackets the region `ncu --profile-from-start off` measures.
#[cfg(feature = "cuda")]
fn profiler(start: bool) {
    use candle_core::cuda_backend::cudarc::driver::sys;
    // SAFETY: plain driver calls on the current context, which candle has made.
    let r = unsafe {
        if start {
            sys::cuProfilerStart()
        } else {
            sys::cuProfilerStop()
        }
    };
    if r != sys::CUresult::CUDA_SUCCESS {
        eprintln!("cuProfiler{}: {r:?}", if start { "Start" } else { "Stop" });
    }
}

#[cfg(not(feature = "cuda"))]
fn profiler(_: bool) {}

fn stats(times: &[f64]) -> Value {
    let mut s = times.to_vec();
    s.sort_by(f64::total_cmp);
    let median = if s.is_empty() {
        f64::NAN
    } else if s.len() % 2 == 1 {
        s[s.len() / 2]
    } else {
        (s[s.len() / 2 - 1] + s[s.len() / 2]) / 2.0
    };
    json!({"median_s": median, "min_s": s.first(), "max_s": s.last(), "times_s": times})
}

fn median(v: &Value) -> f64 {
    v["median_s"].as_f64().unwrap_or(f64::NAN)
}

/// Seconds one phase may spend on timed iterations beyond the first (`--phase-budget`), so a
/// slow phase cannot eat the run's time limit.
static PHASE_BUDGET_S: std::sync::OnceLock<f64> = std::sync::OnceLock::new();

/// Runs `f` `warmup` + `iters` times, synchronising the device after each, and returns the timed
/// iterations' wall times; stops early (keeping at least one) once the phase's budget is spent.
fn time(
    device: &Device,
    warmup: usize,
    iters: usize,
    mut f: impl FnMut() -> hyperlora::Result<()>,
) -> hyperlora::Result<Vec<f64>> {
    let budget = *PHASE_BUDGET_S.get().unwrap_or(&f64::INFINITY);
    let start = Instant::now();
    for _ in 0..warmup {
        f()?;
        device.synchronize()?;
    }
    let mut times = Vec::with_capacity(iters);
    for _ in 0..iters {
        if !times.is_empty() && start.elapsed().as_secs_f64() > budget {
            break;
        }
        let t0 = Instant::now();
        f()?;
        device.synchronize()?;
        times.push(t0.elapsed().as_secs_f64());
    }
    Ok(times)
}

fn gib(bytes: Option<usize>) -> Value {
    bytes.map_or(Value::Null, |b| json!(b as f64 / (1u64 << 30) as f64))
}

fn main() -> hyperlora::Result<()> {
    let args = parse_args();
    PHASE_BUDGET_S.set(args.phase_budget).expect("set once");
    let device = select_device(&args.device)?;
    let dtype = select_dtype(args.dtype.as_deref(), &device)?;
    let vae_dtype = select_dtype(Some(&args.vae_dtype), &device)?;
    let poller = MemoryPoller::new(&device);
    let mem_start = poller.current();
    let name = device_name(&device);
    eprintln!("device {name}, dtype {dtype:?}, vae {vae_dtype:?}");

    let (unet_config, vae_config, clip_l, clip_g) = match &args.configs {
        Some(dir) => (
            unet::Config::from_json(dir.join("unet/config.json"))?,
            vae::Config::from_json(dir.join("vae/config.json"))?,
            ClipTextConfig::from_json_file(dir.join("text_encoder/config.json"))?,
            ClipTextConfig::from_json_file(dir.join("text_encoder_2/config.json"))?,
        ),
        None => (
            unet::Config::sdxl_base(),
            vae::Config::sdxl_base(),
            ClipTextConfig::sdxl_clip_l(),
            ClipTextConfig::sdxl_clip_g(),
        ),
    };

    // Models with random weights, made on the device.
    let t0 = Instant::now();
    let unet = unet::UNet2DConditionModel::new(random_vb(dtype, &device), &unet_config)?;
    let vae = vae::AutoencoderKL::new(random_vb(vae_dtype, &device), &vae_config)?;
    let text = SdxlTextEncoders::load(
        random_vb(dtype, &device),
        &clip_l,
        random_vb(dtype, &device),
        &clip_g,
    )?;
    let merges = std::env::temp_dir().join(format!("hyperlora-merges-{}.txt", std::process::id()));
    std::fs::write(&merges, MERGES)?;
    let tokenizers = [
        ClipTokenizer::from_merges_file(&merges, SDXL_PAD_TOKEN)?,
        ClipTokenizer::from_merges_file(&merges, SDXL_PAD_TOKEN_2)?,
    ];
    let _ = std::fs::remove_file(&merges);
    let pipe = SdxlPipeline::from_parts(
        unet,
        vae,
        text,
        tokenizers,
        SchedulerConfig::sdxl_base(),
        &device,
    );
    device.synchronize()?;
    let build_s = t0.elapsed().as_secs_f64();
    let mem_weights = poller.take_peak();
    eprintln!("models built in {build_s:.1}s");
    if args.build_only {
        return Ok(());
    }

    let f = pipe.vae_scale_factor();
    let (lh, lw) = (args.size / f, args.size / f);
    let in_ch = pipe.unet.config().in_channels;

    if let Some(what) = &args.profile {
        let run: Box<dyn Fn() -> hyperlora::Result<()>> = match what.as_str() {
            "unet" => {
                let cond = pipe.condition(PROMPT, NEGATIVE, args.size, args.size, 1, true)?;
                let cond = pipe
                    .unet
                    .condition(&cond.context, &cond.pooled, &cond.time_ids)?;
                let sample =
                    Tensor::randn(0f32, 1.0, (2, in_ch, lh, lw), &device)?.to_dtype(dtype)?;
                let pipe = &pipe;
                Box::new(move || {
                    pipe.unet
                        .forward_conditioned(&sample, 500.0, &cond, None)
                        .map(|_| ())
                })
            }
            "vae" => {
                let lc = pipe.vae.config().latent_channels;
                let z = Tensor::randn(0f32, 1.0, (1, lc, lh, lw), &device)?;
                let pipe = &pipe;
                Box::new(move || pipe.vae.decode(&z).map(|_| ()))
            }
            other => panic!("--profile takes unet or vae, not {other}"),
        };
        for _ in 0..2 {
            run()?;
        }
        device.synchronize()?;
        profiler(true);
        run()?;
        device.synchronize()?;
        profiler(false);
        eprintln!("profiled one {what} run");
        return Ok(());
    }

    // The report grows phase by phase and is rewritten after each, so a phase that fails (or a
    // run cut short) still leaves the others' figures; a failed phase records its error.
    let mut report = json!({
        "impl": "hyperlora (candle 0.11.1)",
        "device": name,
        "dtype": format!("{dtype:?}"),
        "vae_dtype": format!("{vae_dtype:?}"),
        "size": args.size,
        "steps": args.steps,
        "sampler": "euler",
        "cfg": 5.0,
        "build_s": build_s,
        "identity_creation": Value::Null,
        "memory_gib": {"start": gib(mem_start), "after_weights_peak": gib(mem_weights)},
    });
    let save = |report: &Value| {
        if let Some(path) = &args.json {
            let text = serde_json::to_string_pretty(report).expect("json") + "\n";
            if let Err(e) = std::fs::write(path, text) {
                eprintln!("cannot write {}: {e}", path.display());
            }
        }
    };
    save(&report);
    let phase = |report: &mut Value,
                 key: &str,
                 mem_key: &str,
                 run: &mut dyn FnMut() -> hyperlora::Result<Vec<f64>>| {
        if args
            .phases
            .as_ref()
            .is_some_and(|p| !p.iter().any(|p| p == key))
        {
            return;
        }
        match run() {
            Ok(times) => {
                let s = stats(&times);
                eprintln!("{key}: {:.4} s", median(&s));
                report[key] = s;
            }
            Err(e) => {
                eprintln!("{key}: FAILED: {e}");
                report[key] = json!({"error": e.to_string()});
            }
        }
        report["memory_gib"][mem_key] = gib(poller.take_peak());
        save(report);
    };

    // Text encoding: prompt and negative prompt through both tokenizers and encoders.
    phase(&mut report, "text_encode", "text_peak", &mut || {
        time(&device, args.warmup, args.iters, || {
            pipe.condition(PROMPT, NEGATIVE, args.size, args.size, 1, true)
                .map(|_| ())
        })
    });

    // UNet forward, batch 2 (one classifier-free-guidance step).
    phase(&mut report, "unet_forward_b2", "unet_b2_peak", &mut || {
        let cond = pipe.condition(PROMPT, NEGATIVE, args.size, args.size, 1, true)?;
        let cond = pipe
            .unet
            .condition(&cond.context, &cond.pooled, &cond.time_ids)?;
        let sample = Tensor::randn(0f32, 1.0, (2, in_ch, lh, lw), &device)?.to_dtype(dtype)?;
        time(&device, args.warmup, args.iters, || {
            pipe.unet
                .forward_conditioned(&sample, 500.0, &cond, None)
                .map(|_| ())
        })
    });

    // VAE decode of one latent.
    phase(&mut report, "vae_decode", "vae_decode_peak", &mut || {
        let lc = pipe.vae.config().latent_channels;
        let z = Tensor::randn(0f32, 1.0, (1, lc, lh, lw), &device)?;
        time(&device, 1, args.iters.min(5), || {
            pipe.vae.decode(&z).map(|_| ())
        })
    });

    // The denoising loop (text + steps, latents out), its steps one by one, and the whole
    // generate() (text, loop, decode, RGB8 on the host).
    let params = GenerateParams {
        prompt: PROMPT.into(),
        negative_prompt: NEGATIVE.into(),
        width: args.size,
        height: args.size,
        steps: args.steps,
        guidance_scale: 5.0,
        sampler: Sampler::Euler,
        schedule: SigmaSchedule::Normal,
        seed: 0,
        batch_size: 1,
        init_image: None,
        controlnets: Vec::new(),
    };
    let cancel = CancelToken::new();
    phase(
        &mut report,
        "text_plus_denoise_loop",
        "loop_peak",
        &mut || {
            time(&device, 1, args.gen_iters, || {
                pipe.generate_latents(&params, &cancel, &mut |_| {})
                    .map(|_| ())
            })
        },
    );
    // One more loop, synchronising after each step, for the spread of step times.
    phase(&mut report, "denoise_step", "step_peak", &mut || {
        let mut steps = Vec::new();
        let mut last = None;
        pipe.generate_latents(&params, &cancel, &mut |p| {
            if p.stage == Stage::Denoise || p.stage == Stage::Text && p.step == 1 {
                let _ = device.synchronize();
                let now = Instant::now();
                if let Some(prev) = last.replace(now) {
                    steps.push(now.duration_since(prev).as_secs_f64());
                }
            }
        })?;
        Ok(steps)
    });
    phase(&mut report, "generate", "generate_peak", &mut || {
        time(&device, 0, args.gen_iters, || {
            pipe.generate(&params, &cancel, &mut |_| {}).map(|_| ())
        })
    });

    let m = |report: &Value, key: &str| report[key]["median_s"].as_f64().unwrap_or(f64::NAN);
    let per_step =
        (m(&report, "text_plus_denoise_loop") - m(&report, "text_encode")) / args.steps as f64;
    report["per_step_s"] = json!(per_step);
    let start = report["memory_gib"]["start"].as_f64();
    if let (Some(peak), Some(start)) = (report["memory_gib"]["generate_peak"].as_f64(), start) {
        report["memory_gib"]["generate_peak_over_start"] = json!(peak - start);
    }
    save(&report);

    println!();
    println!(
        "hyperlora SDXL on {name} ({dtype:?}, VAE {vae_dtype:?}), {0}x{0}, {1} steps, CFG",
        args.size, args.steps
    );
    for (label, key) in [
        ("text encode (+neg)", "text_encode"),
        ("UNet forward b=2", "unet_forward_b2"),
        ("VAE decode", "vae_decode"),
        ("text + denoise loop", "text_plus_denoise_loop"),
        ("one denoise step", "denoise_step"),
        ("generate (end to end)", "generate"),
    ] {
        println!("  {label:<24}{:>10.4} s", m(&report, key));
    }
    println!("  {:<24}{:>10.4} s", "per CFG step (loop)", per_step);
    if let Some(peak) = report["memory_gib"]["generate_peak"].as_f64() {
        println!(
            "  {:<24}{:>10.2} GiB (in use on the device, polled; {:.2} GiB at start)",
            "peak memory (generate)",
            peak,
            start.unwrap_or(0.0)
        );
    }
    Ok(())
}
