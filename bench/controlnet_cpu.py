#!/usr/bin/env python3
"""CPU benchmark: what one ControlNet adds to a denoising step, ours next to diffusers'.

    python3 bench/controlnet_cpu.py --config tiny --latent 8
    python3 bench/controlnet_cpu.py --config mid --latent 32 --threads 2

For each side, random weights of the same configuration (`tiny`: models/tiny/sdxl/unet; `mid`:
bench/cpu.py's SDXL structure at widths 128/256/512), batch 2 (one CFG step), 77 tokens, f32:
1. diffusers: UNet2DConditionModel forward alone, then ControlNetModel.from_unet's forward plus
   the UNet with its residuals (torch.no_grad, torch.set_num_threads(T), warm-up then median);
2. ours: crates/hyperlora/examples/bench_controlnet.rs (cargo's dev profile) with
   RAYON_NUM_THREADS=T, timed the same way.
Prints both sides' medians and the ratio ControlNet step / plain step. This is a benchmark, not a
test: timings depend on the machine and its load.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
from cpu import mid_config  # noqa: E402


def config(name: str, latent: int) -> dict:
    if name == "mid":
        return mid_config(latent)
    text = (ROOT / "models" / "tiny" / "sdxl" / "unet" / "config.json").read_text()
    return {k: v for k, v in json.loads(text).items() if not k.startswith("_")}


def diffusers_side(name: str, latent: int, warmup: int, iters: int) -> dict:
    import torch
    from diffusers import ControlNetModel, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**config(name, latent)).eval()
    net = ControlNetModel.from_unet(unet).eval()
    c = unet.config
    pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
    b, side = 2, float(latent * 8)
    sample = torch.randn(b, 4, latent, latent)
    ehs = torch.randn(b, 77, c.cross_attention_dim)
    added = {"text_embeds": torch.randn(b, pooled), "time_ids": torch.tensor([[side, side, 0.0, 0.0, side, side]] * b)}
    image = torch.rand(b, 3, latent * 8, latent * 8)

    def plain():
        unet(sample, 421.0, encoder_hidden_states=ehs, added_cond_kwargs=added)

    def controlled():
        down, mid = net(sample, 421.0, encoder_hidden_states=ehs, controlnet_cond=image, conditioning_scale=0.7,
                        added_cond_kwargs=added, return_dict=False)
        unet(sample, 421.0, encoder_hidden_states=ehs, added_cond_kwargs=added,
             down_block_additional_residuals=down, mid_block_additional_residual=mid)

    def timed(f) -> float:
        with torch.no_grad():
            for _ in range(warmup):
                f()
            times = []
            for _ in range(iters):
                start = time.perf_counter()
                f()
                times.append(time.perf_counter() - start)
        return statistics.median(times)

    p, c2 = timed(plain), timed(controlled)
    return {"plain_median_s": p, "controlnet_median_s": c2, "ratio": c2 / p}


def our_side(name: str, latent: int, warmup: int, iters: int, threads: int) -> dict:
    env = {**os.environ, "RAYON_NUM_THREADS": str(threads)}
    # --workspace: the features the rest of the workspace builds with, so candle is not rebuilt.
    subprocess.run(["cargo", "build", "-q", "--workspace", "--example", "bench_controlnet"], cwd=ROOT, check=True)
    target = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
    cmd = [str(target / "debug" / "examples" / "bench_controlnet"),
           "--config", name, "--latent", str(latent), "--warmup", str(warmup), "--iters", str(iters)]
    out = subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", choices=["tiny", "mid"], default="tiny")
    ap.add_argument("--latent", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--skip-diffusers", action="store_true")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    result = {"config": args.config, "latent": args.latent, "threads": args.threads}
    if not args.skip_diffusers:
        result["diffusers"] = diffusers_side(args.config, args.latent, args.warmup, args.iters)
    result["hyperlora"] = our_side(args.config, args.latent, args.warmup, args.iters, args.threads)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
