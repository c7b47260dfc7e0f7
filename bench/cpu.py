#!/usr/bin/env python3
"""CPU benchmark: our SDXL stages vs diffusers/transformers on PyTorch, same weights, same threads.

    npm run bench:cpu                       # = python3 bench/cpu.py: all three stages
    npm run bench:unet                      # = python3 bench/cpu.py --stage unet
    python3 bench/cpu.py --stage unet --threads 2 --latent 64 --iters 3 --json out.json
    python3 bench/cpu.py --rounds 3 --iters 3  # PyTorch and ours alternate three times

Stages (--stage, repeatable; default all three):
- unet: a mid-size UNet2DConditionModel with SDXL's structure (DownBlock2D + CrossAttn blocks,
  text_time conditioning, GEGLU transformers with cross-attention to 2048-d text, linear
  projections), one forward of batch 2 (one CFG step) at --latent.
- vae: SDXL's AutoencoderKL in its published configuration, one decode of a --latent latent.
- text: SDXL's two text encoders (CLIP ViT-L and OpenCLIP bigG in their published
  configurations), prompt and negative prompt (batch 2, 77 tokens): both penultimate states and
  bigG's pooled projection.

For each stage:
1. Builds (once) the model with random weights, saved with save_pretrained in a cache folder
   outside the repository (~/.cache/hyperlora/bench/, or $HYPERLORA_BENCH_CACHE), with fixed
   inputs.
2. Times PyTorch's forward: f32, torch.no_grad, torch.set_num_threads(T), warm-up then median,
   and saves its output.
3. Builds and runs crates/hyperlora/examples/bench_cpu.rs (cargo's dev profile: our crate at
   opt-level 1, every dependency, candle included, at opt-level 3) on the same folder and inputs
   with RAYON_NUM_THREADS=T, which times ours the same way and checks its output against
   PyTorch's.
4. Prints both medians and the ratio.

With --rounds R, steps 2 and 3 alternate R times and the medians are taken over every round:
on a shared machine whose load drifts within minutes, this puts the drift on both sides of the
ratio instead of on whichever side ran later.

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

STAGES = {
    "unet": "SDXL-structured UNet forward, batch 2 (one CFG step)",
    "vae": "SDXL VAE decode, batch 1",
    "text": "SDXL text encoders (CLIP-L + bigG), prompt + negative, 77 tokens",
}


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


def vae_config() -> dict:
    """SDXL base's vae/config.json."""
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[128, 256, 512, 512],
        layers_per_block=2,
        act_fn="silu",
        latent_channels=4,
        norm_num_groups=32,
        sample_size=1024,
        scaling_factor=0.13025,
        force_upcast=True,
    )


def text_configs() -> tuple[dict, dict]:
    """SDXL base's text_encoder/ and text_encoder_2/ config.json."""
    common = dict(vocab_size=49408, max_position_embeddings=77, layer_norm_eps=1e-5,
                  bos_token_id=49406, eos_token_id=49407, pad_token_id=1)
    clip_l = dict(common, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                  num_attention_heads=12, hidden_act="quick_gelu", projection_dim=768)
    clip_g = dict(common, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                  num_attention_heads=20, hidden_act="gelu", projection_dim=1280)
    return clip_l, clip_g


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def prepare(stage: str, cache: Path, latent: int, batch: int) -> tuple[Path, Path]:
    """The model folder and the inputs file of `stage`, made once per configuration."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(1)
    if stage == "unet":
        from diffusers import UNet2DConditionModel

        model_dir = cache / f"unet-mid-{latent}"
        inputs = cache / f"inputs-mid-{latent}-b{batch}.safetensors"
        if not (model_dir / "config.json").is_file():
            torch.manual_seed(0)
            UNet2DConditionModel(**mid_config(latent)).eval().save_pretrained(model_dir, safe_serialization=True)
        if not inputs.is_file():
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
    elif stage == "vae":
        from diffusers import AutoencoderKL

        model_dir = cache / "vae-sdxl"
        inputs = cache / f"inputs-vae-{latent}.safetensors"
        if not (model_dir / "config.json").is_file():
            torch.manual_seed(0)
            AutoencoderKL(**vae_config()).eval().save_pretrained(model_dir, safe_serialization=True)
        if not inputs.is_file():
            save_file({"latents": torch.randn(1, 4, latent, latent, generator=g)}, str(inputs))
    else:
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

        model_dir = cache / "text-sdxl"
        inputs = cache / "inputs-text-b2.safetensors"
        clip_l, clip_g = text_configs()
        for sub, cls, cfg in [("text_encoder", CLIPTextModel, clip_l),
                              ("text_encoder_2", CLIPTextModelWithProjection, clip_g)]:
            if not (model_dir / sub / "config.json").is_file():
                torch.manual_seed(0)
                cls(CLIPTextConfig(**cfg)).eval().save_pretrained(model_dir / sub, safe_serialization=True)
        if not inputs.is_file():
            # BOS, 20 prompt tokens, EOS padding; the negative prompt is empty. Both encoders
            # read the same ids (SDXL's second tokenizer pads with "!", which costs the same).
            ids = torch.full((2, 77), 49407, dtype=torch.int64)
            ids[:, 0] = 49406
            ids[0, 1:21] = torch.randint(300, 40000, (20,), generator=g)
            save_file({"input_ids": ids}, str(inputs))
    return model_dir, inputs


def reference(stage: str, model_dir: Path, timestep: float):
    """PyTorch's models of `stage` and a function of the inputs returning their output."""
    import torch

    if stage == "unet":
        from diffusers import UNet2DConditionModel

        unet = UNet2DConditionModel.from_pretrained(model_dir, torch_dtype=torch.float32).eval()

        def run_unet(x):
            return unet(
                x["sample"],
                timestep,
                encoder_hidden_states=x["encoder_hidden_states"],
                added_cond_kwargs={"text_embeds": x["text_embeds"], "time_ids": x["time_ids"]},
            ).sample
        return [unet], run_unet
    if stage == "vae":
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
        return [vae], lambda x: vae.decode(x["latents"]).sample
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    clip_l = CLIPTextModel.from_pretrained(model_dir / "text_encoder", torch_dtype=torch.float32).eval()
    clip_g = CLIPTextModelWithProjection.from_pretrained(model_dir / "text_encoder_2", torch_dtype=torch.float32).eval()

    def run_text(x):
        ids = x["input_ids"]
        l_out = clip_l(ids, output_hidden_states=True)
        g_out = clip_g(ids, output_hidden_states=True)
        hidden = torch.cat([l_out.hidden_states[-2], g_out.hidden_states[-2]], dim=-1)
        return torch.cat([hidden.flatten(), g_out.text_embeds.flatten()])
    return [clip_l, clip_g], run_text


def expected_path(stage: str, inputs: Path, timestep: float) -> Path:
    suffix = f"-out-t{timestep:g}" if stage == "unet" else "-out"
    return inputs.with_name(inputs.stem + suffix + ".safetensors")


def load_reference(stage: str, model_dir: Path, inputs: Path, threads: int, timestep: float):
    """PyTorch's models, their function of the inputs, the inputs, and version information."""
    import torch
    from safetensors.torch import load_file

    torch.set_num_threads(threads)
    models, run = reference(stage, model_dir, timestep)
    info = {
        "torch": torch.__version__,
        "diffusers": __import__("diffusers").__version__,
        "transformers": __import__("transformers").__version__,
        "mkldnn": torch.backends.mkldnn.is_available(),
        "params": sum(p.numel() for m in models for p in m.parameters()),
    }
    return run, load_file(str(inputs)), info


def time_reference(run, x, warmup: int, iters: int):
    """Times PyTorch's forward; returns the times and the last output."""
    import torch

    times = []
    with torch.no_grad():
        for _ in range(warmup):
            out = run(x)
        for _ in range(iters):
            t0 = time.perf_counter()
            out = run(x)
            times.append(time.perf_counter() - t0)
    return times, out


def build_ours() -> Path:
    cmd = ["cargo", "build", "-p", "hyperlora", "--example", "bench_cpu", "--message-format=json-render-diagnostics"]
    # .ci/run's target dir unless the caller chose one: after the gate, no second candle build.
    env = dict(os.environ)
    env.setdefault("CARGO_TARGET_DIR", str(Path.home() / ".cache" / "hyperlora" / "cargo-target"))
    print(f"$ CARGO_TARGET_DIR={env['CARGO_TARGET_DIR']} " + " ".join(cmd), file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True, check=True)
    for line in proc.stdout.splitlines():
        msg = json.loads(line)
        if msg.get("reason") == "compiler-artifact" and msg["target"]["name"] == "bench_cpu" and msg.get("executable"):
            return Path(msg["executable"])
    raise SystemExit("cargo did not report the bench_cpu executable")


def time_ours(stage: str, exe: Path, model_dir: Path, inputs: Path, expected: Path, threads: int, warmup: int, iters: int, timestep: float):
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
    cmd = [str(exe), "--stage", stage, "--model", str(model_dir), "--inputs", str(inputs), "--expected", str(expected),
           "--timestep", str(timestep), "--warmup", str(warmup), "--iters", str(iters)]
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", action="append", choices=list(STAGES), help="repeatable; default: all")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--latent", type=int, default=32, help="latent side (image side / 8)")
    ap.add_argument("--batch", type=int, default=2, help="UNet batch; 2 = one CFG step")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=1, help="alternate PyTorch and ours this many times (iters each)")
    ap.add_argument("--timestep", type=float, default=421.0)
    ap.add_argument("--cache", type=Path, default=Path(os.environ.get("HYPERLORA_BENCH_CACHE", Path.home() / ".cache/hyperlora/bench")))
    ap.add_argument("--skip-torch", action="store_true", help="time only ours, against the reference output a previous full run saved")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()

    args.cache.mkdir(parents=True, exist_ok=True)
    exe = build_ours()
    results = []
    for stage in args.stage or list(STAGES):
        model_dir, inputs = prepare(stage, args.cache, args.latent, args.batch)
        expected = expected_path(stage, inputs, args.timestep)
        run, x, info = (None, None, {}) if args.skip_torch else load_reference(
            stage, model_dir, inputs, args.threads, args.timestep)
        # Rounds alternate PyTorch and ours, so that a change in the host's load between them
        # (common on shared machines) lands on both sides of the ratio.
        torch_times, ours = [], {"times_s": []}
        for r in range(args.rounds):
            if run is not None:
                times, out = time_reference(run, x, args.warmup, args.iters)
                torch_times += times
                if r == 0:
                    from safetensors.torch import save_file

                    save_file({"out": out.contiguous()}, str(expected))
            this = time_ours(stage, exe, model_dir, inputs, expected, args.threads, args.warmup, args.iters, args.timestep)
            ours = dict(this, times_s=ours["times_s"] + this["times_s"])
        del run, x

        t_torch = statistics.median(torch_times) if torch_times else float("nan")
        t_ours = statistics.median(ours["times_s"])
        results.append({
            "stage": stage,
            "what": STAGES[stage],
            "latent": None if stage == "text" else args.latent,
            "torch_info": info,
            "pytorch_s": torch_times,
            "ours_s": ours["times_s"],
            "pytorch_median_s": t_torch,
            "ours_median_s": t_ours,
            "ratio_ours_over_pytorch": t_ours / t_torch if torch_times else None,
            "max_abs_diff_vs_pytorch": ours.get("max_abs_diff"),
        })
        size = "" if stage == "text" else f", {args.latent}x{args.latent} latents"
        print()
        print(f"{STAGES[stage]}{size}, f32, {args.threads} threads, {cpu_model()}")
        if info:
            print(f"  params {info['params'] / 1e6:.1f} M; torch {info['torch']}, diffusers {info['diffusers']}, "
                  f"transformers {info['transformers']}")
        print(f"  {'':<22}{'median':>10}{'min':>10}{'max':>10}")
        if torch_times:
            print(f"  {'PyTorch':<22}{t_torch:>9.3f}s{min(torch_times):>9.3f}s{max(torch_times):>9.3f}s")
        print(f"  {'hyperlora (candle)':<22}{t_ours:>9.3f}s{min(ours['times_s']):>9.3f}s{max(ours['times_s']):>9.3f}s")
        if torch_times:
            print(f"  ratio ours/PyTorch: {t_ours / t_torch:.2f}x")
        if ours.get("max_abs_diff") is not None:
            print(f"  max |ours - PyTorch| = {ours['max_abs_diff']:.2e}")
    if args.json:
        args.json.write_text(json.dumps({
            "date": time.strftime("%Y-%m-%d"),
            "cpu": cpu_model(),
            "threads": args.threads,
            "rounds": args.rounds,
            "profile": "cargo dev profile (hyperlora opt-level 1, dependencies opt-level 3)",
            "stages": results,
        }, indent=2) + "\n")


if __name__ == "__main__":
    main()
