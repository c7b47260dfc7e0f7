#!/usr/bin/env python3
"""CPU benchmark: our SDXL UNet forward vs diffusers/PyTorch's, same weights, same threads.

    npm run bench:unet                      # = python3 bench/unet_cpu.py
    python3 bench/unet_cpu.py --threads 2 --latent 32 --iters 5 --json out.json

1. Builds (once) a mid-size UNet2DConditionModel with SDXL's structure (DownBlock2D +
   CrossAttn blocks, text_time conditioning, GEGLU transformers with cross-attention to 2048-d
   text, linear projections) and random weights, saved with diffusers' save_pretrained in a cache
   folder outside the repository (~/.cache/hyperlora/bench/, or $HYPERLORA_BENCH_CACHE), together
   with fixed inputs and diffusers' output.
2. Times diffusers' forward: f32, torch.no_grad, torch.set_num_threads(T), warm-up then median.
3. Builds and runs crates/hyperlora/examples/bench_unet.rs (cargo's dev profile: our crate at
   opt-level 1, every dependency, candle included, at opt-level 3) on the same folder and inputs
   with RAYON_NUM_THREADS=T, which times our forward the same way and checks its output against
   diffusers'.
4. Prints both medians and the ratio.

This is a benchmark, not a test: timings depend on the machine and its load.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def mid_config(latent: int) -> dict:
    """SDXL's UNet structure at reduced width and depth (SDXL: 320/640/1280, depth 1/2/10)."""
    return dict(
        sample_size=latent,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        block_out_channels=(128, 256, 512),
        layers_per_block=2,
        norm_num_groups=32,
        attention_head_dim=(2, 4, 8),  # diffusers' SDXL naming: head COUNT, 64 channels each
        transformer_layers_per_block=(1, 2, 2),
        cross_attention_dim=2048,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=6 * 256 + 1280,
    )


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def prepare(cache: Path, latent: int, batch: int) -> tuple[Path, Path]:
    """The model folder and the inputs file, made once per configuration."""
    import torch
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    model_dir = cache / f"unet-mid-{latent}"
    inputs = cache / f"inputs-mid-{latent}-b{batch}.safetensors"
    if not (model_dir / "config.json").is_file():
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**mid_config(latent)).eval()
        unet.save_pretrained(model_dir, safe_serialization=True)
    if not inputs.is_file():
        g = torch.Generator().manual_seed(1)
        px = latent * 8
        save_file(
            {
                "sample": torch.randn(batch, 4, latent, latent, generator=g),
                "encoder_hidden_states": torch.randn(batch, 77, 2048, generator=g),
                "text_embeds": torch.randn(batch, 1280, generator=g),
                "time_ids": torch.tensor([[px, px, 0, 0, px, px]] * batch, dtype=torch.float32),
            },
            str(inputs),
        )
    return model_dir, inputs


def time_diffusers(model_dir: Path, inputs: Path, threads: int, warmup: int, iters: int, timestep: float):
    import torch
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file, save_file

    torch.set_num_threads(threads)
    unet = UNet2DConditionModel.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    x = load_file(str(inputs))
    params = sum(p.numel() for p in unet.parameters())

    def run():
        return unet(
            x["sample"],
            timestep,
            encoder_hidden_states=x["encoder_hidden_states"],
            added_cond_kwargs={"text_embeds": x["text_embeds"], "time_ids": x["time_ids"]},
        ).sample

    times = []
    with torch.no_grad():
        for _ in range(warmup):
            out = run()
        for _ in range(iters):
            t0 = time.perf_counter()
            out = run()
            times.append(time.perf_counter() - t0)
    expected = inputs.with_name(inputs.stem + f"-out-t{timestep:g}.safetensors")
    save_file({"out": out.contiguous()}, str(expected))
    info = {
        "torch": torch.__version__,
        "diffusers": __import__("diffusers").__version__,
        "sdpa": True,
        "mkldnn": torch.backends.mkldnn.is_available(),
        "params": params,
    }
    return times, expected, info


def build_ours() -> Path:
    cmd = ["cargo", "build", "-p", "hyperlora", "--example", "bench_unet", "--message-format=json-render-diagnostics"]
    print("$ " + " ".join(cmd), file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True, check=True)
    for line in proc.stdout.splitlines():
        msg = json.loads(line)
        if msg.get("reason") == "compiler-artifact" and msg["target"]["name"] == "bench_unet" and msg.get("executable"):
            return Path(msg["executable"])
    raise SystemExit("cargo did not report the bench_unet executable")


def time_ours(exe: Path, model_dir: Path, inputs: Path, expected: Path, threads: int, warmup: int, iters: int, timestep: float):
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
    cmd = [str(exe), "--model", str(model_dir), "--inputs", str(inputs), "--expected", str(expected),
           "--timestep", str(timestep), "--warmup", str(warmup), "--iters", str(iters)]
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--latent", type=int, default=32, help="latent side (image side / 8)")
    ap.add_argument("--batch", type=int, default=2, help="2 = one CFG step")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--timestep", type=float, default=421.0)
    ap.add_argument("--cache", type=Path, default=Path(os.environ.get("HYPERLORA_BENCH_CACHE", Path.home() / ".cache/hyperlora/bench")))
    ap.add_argument("--skip-torch", action="store_true", help="time only ours, against the reference output a previous full run saved")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()

    args.cache.mkdir(parents=True, exist_ok=True)
    model_dir, inputs = prepare(args.cache, args.latent, args.batch)
    exe = build_ours()

    if args.skip_torch:
        torch_times, info = [], {}
        expected = inputs.with_name(inputs.stem + f"-out-t{args.timestep:g}.safetensors")
    else:
        torch_times, expected, info = time_diffusers(model_dir, inputs, args.threads, args.warmup, args.iters, args.timestep)
    ours = time_ours(exe, model_dir, inputs, expected, args.threads, args.warmup, args.iters, args.timestep)

    t_torch = statistics.median(torch_times) if torch_times else float("nan")
    t_ours = statistics.median(ours["times_s"])
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "cpu": cpu_model(),
        "threads": args.threads,
        "config": {"block_out_channels": [128, 256, 512], "transformer_layers_per_block": [1, 2, 2],
                   "cross_attention_dim": 2048, "latent": args.latent, "batch": args.batch, "dtype": "f32"},
        "torch_info": info,
        "diffusers_s": torch_times,
        "ours_s": ours["times_s"],
        "diffusers_median_s": t_torch,
        "ours_median_s": t_ours,
        "ratio_ours_over_diffusers": t_ours / t_torch if torch_times else None,
        "max_abs_diff_vs_diffusers": ours.get("max_abs_diff"),
        "profile": "cargo dev profile (hyperlora opt-level 1, dependencies opt-level 3)",
    }
    print()
    print(f"SDXL-structured UNet forward, {args.batch}x4x{args.latent}x{args.latent} latents, f32, "
          f"{args.threads} threads, {result['cpu']}")
    if info:
        print(f"  params {info['params'] / 1e6:.1f} M; torch {info['torch']}, diffusers {info['diffusers']}")
    print(f"  {'':<22}{'median':>10}{'min':>10}{'max':>10}")
    if torch_times:
        print(f"  {'diffusers (PyTorch)':<22}{t_torch:>9.3f}s{min(torch_times):>9.3f}s{max(torch_times):>9.3f}s")
    print(f"  {'hyperlora (candle)':<22}{t_ours:>9.3f}s{min(ours['times_s']):>9.3f}s{max(ours['times_s']):>9.3f}s")
    if torch_times:
        print(f"  ratio ours/diffusers: {t_ours / t_torch:.2f}x")
    if ours.get("max_abs_diff") is not None:
        print(f"  max |ours - diffusers| = {ours['max_abs_diff']:.2e}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
