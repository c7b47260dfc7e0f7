//! Images per second for N requests with different identities: one UNet batch
//! ([`SdxlPipeline::generate_many`], per-sample low-rank updates) against one request after the
//! other (merge the request's identity with `set_loras`, then `generate`), and, for reference,
//! the same batch when every request shares one merged identity (no side path).
//!
//! ```text
//! cargo run --release -p hyperlora --example bench_batch -- [--size 256] [--steps 8]
//!     [--requests 4] [--rank 8] [--sampler euler] [--iters 3] [--full-unet]
//! ```
//! The three ways run in turn `iters` times and each reports its best wall time and its best CPU
//! time (this process's user + system time, Linux only): on a machine shared with other work
//! the CPU time is the steadier measure of the work each way does.
//! The models have RANDOM weights (no files needed): by default a mid-size UNet with SDXL's
//! structure (bench/cpu.py's: blocks of 128/256/512 channels, transformer depths 1/2/2,
//! 2/4/8 heads of 64, cross-attention to 2048-d text, `text_time`), SDXL's text-encoder widths
//! (768 and 1280, 2 layers each) and the tiny model's VAE; `--full-unet` takes SDXL base's UNet.
//! Identities are rank-`rank` LoRAs (alpha rank/2, as HyperLoRA's) on every attention
//! projection (`attn1`/`attn2` `to_q|to_k|to_v|to_out.0`), the layers HyperLoRA targets.
//! Each request has its own prompt and seed, batch size 1, CFG 5.

use std::path::PathBuf;
use std::time::Instant;

use candle_core::{DType, Device};
use hyperlora::clip::text::ClipTextConfig;
use hyperlora::lora::{LoraComponent, LoraLayer};
use hyperlora::sdxl::batch::BatchRequest;
use hyperlora::sdxl::model::{unet, vae};
use hyperlora::sdxl::pipeline::{GenerateParams, SdxlPipeline};
use hyperlora::sdxl::sampling::noise::TorchGenerator;
use hyperlora::sdxl::sampling::sampler::{Sampler, SchedulerConfig, SigmaSchedule};
use hyperlora::sdxl::text::encoders::SdxlTextEncoders;
use hyperlora::sdxl::text::tokenizer::{ClipTokenizer, SDXL_PAD_TOKEN, SDXL_PAD_TOKEN_2};
use hyperlora::CancelToken;

#[path = "common/random_weights.rs"]
mod random_weights;
use random_weights::random_vb;

struct Args {
    size: usize,
    steps: usize,
    requests: usize,
    rank: usize,
    sampler: Sampler,
    iters: usize,
    full_unet: bool,
}

fn parse_args() -> Args {
    let mut a = Args {
        size: 256,
        steps: 8,
        requests: 4,
        rank: 8,
        sampler: Sampler::Euler,
        iters: 3,
        full_unet: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut v = || it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--size" => a.size = v().parse().expect("--size"),
            "--steps" => a.steps = v().parse().expect("--steps"),
            "--requests" => a.requests = v().parse().expect("--requests"),
            "--rank" => a.rank = v().parse().expect("--rank"),
            "--sampler" => a.sampler = Sampler::parse(&v()).expect("--sampler"),
            "--iters" => a.iters = v().parse().expect("--iters"),
            "--full-unet" => a.full_unet = true,
            other => panic!("unknown argument {other} (see the header of bench_batch.rs)"),
        }
    }
    a
}

/// bench/cpu.py's mid-size UNet: SDXL's structure at a third of its widths.
fn mid_unet_config() -> unet::Config {
    unet::Config {
        block_out_channels: vec![128, 256, 512],
        transformer_layers_per_block: vec![1, 2, 2],
        attention_head_dim: vec![2, 4, 8],
        ..unet::Config::sdxl_base()
    }
}

fn identity(pipe: &SdxlPipeline, rank: usize, seed: u64) -> hyperlora::Result<Vec<LoraLayer>> {
    let mut g = TorchGenerator::new(seed);
    pipe.unet
        .linears()
        .into_iter()
        .filter(|(name, _)| name.contains(".attn"))
        .map(|(module, linear)| {
            let (out_f, in_f) = linear.weight().dims2()?;
            Ok(LoraLayer::low_rank(
                LoraComponent::Unet,
                module.clone(),
                (g.randn((rank, in_f))? * 0.02)?,
                (g.randn((out_f, rank))? * 0.02)?,
                Some(rank as f32 / 2.0),
                module,
            ))
        })
        .collect()
}

/// This process's user + system CPU seconds so far (Linux `/proc/self/stat`, 100 ticks per
/// second); NaN elsewhere.
fn cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return f64::NAN;
    };
    // Fields after the parenthesised command name; utime and stime are the 14th and 15th.
    let rest = stat.rsplit(')').next().unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok());
    match (ticks(11), ticks(12)) {
        (Some(u), Some(s)) => (u + s) / 100.0,
        _ => f64::NAN,
    }
}

/// Best wall and CPU seconds over the runs of one way.
#[derive(Clone, Copy)]
struct Best {
    wall: f64,
    cpu: f64,
}

impl Best {
    fn new() -> Self {
        Self {
            wall: f64::INFINITY,
            cpu: f64::INFINITY,
        }
    }

    fn time(&mut self, f: impl FnOnce() -> hyperlora::Result<()>) -> hyperlora::Result<()> {
        let (t0, c0) = (Instant::now(), cpu_seconds());
        f()?;
        self.wall = self.wall.min(t0.elapsed().as_secs_f64());
        self.cpu = self.cpu.min(cpu_seconds() - c0);
        Ok(())
    }
}

fn main() -> hyperlora::Result<()> {
    let args = parse_args();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let unet_config = if args.full_unet {
        unet::Config::sdxl_base()
    } else {
        mid_unet_config()
    };
    let shallow = |c: ClipTextConfig| ClipTextConfig {
        num_hidden_layers: 2,
        ..c
    };
    let t0 = Instant::now();
    let unet = unet::UNet2DConditionModel::new(random_vb(DType::F32, &Device::Cpu), &unet_config)?;
    let vae_config = vae::Config::from_json(root.join("models/tiny/sdxl/vae/config.json"))?;
    let vae = vae::AutoencoderKL::new(random_vb(DType::F32, &Device::Cpu), &vae_config)?;
    let text = SdxlTextEncoders::load(
        random_vb(DType::F32, &Device::Cpu),
        &shallow(ClipTextConfig::sdxl_clip_l()),
        random_vb(DType::F32, &Device::Cpu),
        &shallow(ClipTextConfig::sdxl_clip_g()),
    )?;
    let merges = root.join("models/clip-tokenizer/merges.txt");
    let tokenizers = [
        ClipTokenizer::from_merges_file(&merges, SDXL_PAD_TOKEN)?,
        ClipTokenizer::from_merges_file(&merges, SDXL_PAD_TOKEN_2)?,
    ];
    let mut pipe = SdxlPipeline::from_parts(
        unet,
        vae,
        text,
        tokenizers,
        SchedulerConfig::sdxl_base(),
        &Device::Cpu,
    );
    let unet_params: usize = pipe
        .unet
        .linears()
        .iter()
        .map(|(_, l)| l.weight().elem_count())
        .sum();
    let identities = (0..args.requests)
        .map(|i| identity(&pipe, args.rank, i as u64 + 1))
        .collect::<hyperlora::Result<Vec<_>>>()?;
    println!(
        "models built in {:.1} s; UNet transformer Linears {:.0} M params; {} identities of {} layers, rank {}; {} threads",
        t0.elapsed().as_secs_f64(),
        unet_params as f64 / 1e6,
        identities.len(),
        identities[0].len(),
        args.rank,
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );

    let params = |i: usize, steps: usize| GenerateParams {
        prompt: format!("a portrait photo of person {i}, studio light"),
        negative_prompt: "blurry, low quality".into(),
        width: args.size,
        height: args.size,
        steps,
        guidance_scale: 5.0,
        sampler: args.sampler,
        schedule: SigmaSchedule::Karras,
        seed: 1000 + i as u64,
        batch_size: 1,
        init_image: None,
        controlnets: Vec::new(),
    };
    let cancel = CancelToken::new();
    let quiet = &mut |_| {};
    let n = args.requests as f64;

    // Warm-up: one step of each path.
    pipe.generate(&params(0, 1), &cancel, quiet)?;
    let warm: Vec<BatchRequest> = (0..args.requests)
        .map(|i| BatchRequest {
            params: params(i, 1),
            loras: vec![(identities[i].as_slice(), 1.0)],
        })
        .collect();
    pipe.generate_many(&warm, &cancel, quiet)?;

    let mixed_requests: Vec<BatchRequest> = (0..args.requests)
        .map(|i| BatchRequest {
            params: params(i, args.steps),
            loras: vec![(identities[i].as_slice(), 1.0)],
        })
        .collect();
    let shared_requests: Vec<BatchRequest> = (0..args.requests)
        .map(|i| BatchRequest {
            params: params(i, args.steps),
            loras: Vec::new(),
        })
        .collect();
    let (mut sequential, mut mixed, mut merged_batch) = (Best::new(), Best::new(), Best::new());
    let mut merging = f64::INFINITY;
    for _ in 0..args.iters {
        // One by one: merge the request's identity, then generate.
        let mut merge_s = 0.0;
        sequential.time(|| {
            for (i, id) in identities.iter().enumerate() {
                let m0 = Instant::now();
                pipe.set_loras(&[(id, 1.0)])?;
                merge_s += m0.elapsed().as_secs_f64();
                pipe.generate(&params(i, args.steps), &cancel, quiet)?;
            }
            Ok(())
        })?;
        merging = merging.min(merge_s);

        // One batch, each request with its own identity (per-sample updates, base weights).
        pipe.set_loras(&[])?;
        mixed.time(|| {
            pipe.generate_many(&mixed_requests, &cancel, quiet)
                .map(drop)
        })?;

        // Reference: one batch whose requests share one merged identity (no side path).
        pipe.set_loras(&[(&identities[0], 1.0)])?;
        merged_batch.time(|| {
            pipe.generate_many(&shared_requests, &cancel, quiet)
                .map(drop)
        })?;
    }

    println!(
        "{} requests, {}², {} {} steps, CFG 5, batch 1 each, f32 CPU, best of {}:",
        args.requests,
        args.size,
        args.steps,
        args.sampler.as_str(),
        args.iters
    );
    let line = |what: &str, b: Best, extra: String| {
        println!(
            "  {what:<31} {:.1} s wall, {:.3} images/s; {:.1} CPU-s, {:.3} images per CPU-s{extra}",
            b.wall,
            n / b.wall,
            b.cpu,
            n / b.cpu
        )
    };
    line(
        "one by one (merge + generate):",
        sequential,
        format!(" (merging {merging:.1} s wall)"),
    );
    line(
        "batched, mixed identities:",
        mixed,
        format!(
            " ({:.2}x one by one by wall, {:.2}x by CPU)",
            sequential.wall / mixed.wall,
            sequential.cpu / mixed.cpu
        ),
    );
    line(
        "batched, one merged identity:",
        merged_batch,
        " (reference: no side path)".into(),
    );
    Ok(())
}
