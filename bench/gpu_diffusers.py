#!/usr/bin/env python3
"""diffusers' side of the GPU benchmark (see bench/README.md, bench/gpu_run.sh): SDXL base's
configuration with RANDOM weights (no hub access), UNet and text encoders in fp16 with PyTorch's
SDPA attention, VAE decoding in fp32 (the pipeline upcasts its fp16 VAE: force_upcast), timing the same
things as crates/hyperlora/examples/bench_gpu.rs and writing the same JSON keys.

    python3 bench/gpu_diffusers.py --tokenizers models/tiny/sdxl --json diffusers.json
    python3 bench/gpu_diffusers.py --device cpu --dtype float32 --configs models/tiny/sdxl --size 64 --steps 4

--tokenizers: a folder with SDXL's tokenizer/ and tokenizer_2/ (the tiny model's are the real
ones). --configs: read unet/vae/text encoder configs from a diffusers folder instead of SDXL's.
"""
from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from pathlib import Path

import torch

PROMPT = "a photo of an astronaut riding a horse on the moon, highly detailed, 8k"
NEGATIVE = "blurry, low quality, deformed"

SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    mid_block_type="UNetMidBlock2DCrossAttn",
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    block_out_channels=[320, 640, 1280], layers_per_block=2, downsample_padding=1, mid_block_scale_factor=1,
    act_fn="silu", norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=2048,
    transformer_layers_per_block=[1, 2, 10], attention_head_dim=[5, 10, 20], use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
)
SDXL_VAE = dict(
    in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[128, 256, 512, 512], layers_per_block=2, act_fn="silu", latent_channels=4, norm_num_groups=32,
    sample_size=1024, scaling_factor=0.13025, force_upcast=True,
)
CLIP_COMMON = dict(vocab_size=49408, max_position_embeddings=77, layer_norm_eps=1e-5, bos_token_id=0, eos_token_id=2, pad_token_id=1)
SDXL_CLIP_L = dict(CLIP_COMMON, hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                   hidden_act="quick_gelu", projection_dim=768)
SDXL_CLIP_G = dict(CLIP_COMMON, hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
                   hidden_act="gelu", projection_dim=1280)
SDXL_SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", prediction_type="epsilon",
    interpolation_type="linear", steps_offset=1, timestep_spacing="leading", use_karras_sigmas=False,
)


def stats(times: list[float]) -> dict:
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "times_s": times}


class MemoryPoller:
    """Device memory in use (total - free, as cudaMemGetInfo reports it), polled every 5 ms."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.peak = self.current() or 0
        self.stop = False
        if self.cuda:
            threading.Thread(target=self._run, daemon=True).start()

    def current(self):
        if not self.cuda:
            return None
        free, total = torch.cuda.mem_get_info()
        return total - free

    def _run(self):
        while not self.stop:
            self.peak = max(self.peak, self.current())
            time.sleep(0.005)

    def take_peak(self):
        now = self.current()
        if now is None:
            return None
        peak, self.peak = max(self.peak, now), now
        return peak


def gib(b):
    return None if b is None else b / 2**30


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--vae-dtype", default="float32")
    ap.add_argument("--configs", type=Path)
    ap.add_argument("--tokenizers", type=Path, default=Path("models/tiny/sdxl"))
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--gen-iters", type=int, default=3)
    ap.add_argument("--phase-budget", type=float, default=40.0, help="seconds per phase before timing stops early")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    import diffusers
    import transformers
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    dev = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    vae_dtype = getattr(torch, args.vae_dtype)
    poller = MemoryPoller(dev)
    mem_start = poller.current()

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    if args.configs:
        read = lambda sub: {k: v for k, v in json.loads((args.configs / sub / "config.json").read_text()).items() if not k.startswith("_")}  # noqa: E731
        unet_cfg, vae_cfg, l_cfg, g_cfg = read("unet"), read("vae"), read("text_encoder"), read("text_encoder_2")
        for c in (l_cfg, g_cfg):
            for k in ("architectures", "dtype", "torch_dtype", "transformers_version", "model_type"):
                c.pop(k, None)
    else:
        unet_cfg, vae_cfg, l_cfg, g_cfg = SDXL_UNET, SDXL_VAE, SDXL_CLIP_L, SDXL_CLIP_G

    t0 = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(dev):
        unet = UNet2DConditionModel(**unet_cfg).to(dtype).eval()
        # As from_pretrained(torch_dtype=fp16) leaves it: the pipeline upcasts it to fp32 for
        # each decode (force_upcast) and back.
        vae = AutoencoderKL(**vae_cfg).to(dtype).eval()
        te1 = CLIPTextModel(CLIPTextConfig(**l_cfg)).to(dtype).eval()
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**g_cfg)).to(dtype).eval()
    tok1 = CLIPTokenizer.from_pretrained(args.tokenizers / "tokenizer")
    tok2 = CLIPTokenizer.from_pretrained(args.tokenizers / "tokenizer_2")
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok1, tokenizer_2=tok2, unet=unet,
        scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER), force_zeros_for_empty_prompt=True, add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    sync()
    build_s = time.perf_counter() - t0
    mem_weights = poller.take_peak()
    attn = type(unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.processor).__name__
    print(f"device {dev} {torch.cuda.get_device_name() if dev.type == 'cuda' else ''}, {dtype}, vae {vae_dtype}, "
          f"attention processor {attn}, text attn {te1.config._attn_implementation}; built in {build_s:.1f}s", flush=True)

    def timed(fn, warmup=args.warmup, iters=args.iters):
        start = time.perf_counter()
        for _ in range(warmup):
            fn()
            sync()
        out = []
        for _ in range(iters):
            if out and time.perf_counter() - start > args.phase_budget:
                break  # keep a slow phase from eating the run's time limit
            t = time.perf_counter()
            fn()
            sync()
            out.append(time.perf_counter() - t)
        return out

    f = pipe.vae_scale_factor
    lh = lw = args.size // f
    # The report grows phase by phase and is rewritten after each; a failed phase records its error.
    report = {
        "impl": f"diffusers {diffusers.__version__} (torch {torch.__version__}, transformers {transformers.__version__})",
        "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
        "dtype": str(dtype), "vae_dtype": str(vae_dtype), "size": args.size, "steps": args.steps,
        "sampler": "euler", "cfg": 5.0, "attention": attn, "build_s": build_s, "identity_creation": None,
        "memory_gib": {"start": gib(mem_start), "after_weights_peak": gib(mem_weights)},
    }

    def save():
        if args.json:
            args.json.write_text(json.dumps(report, indent=2) + "\n")

    def phase(key, mem_key, run):
        try:
            with torch.no_grad():
                times = run()
            report[key] = stats(times)
            print(f"{key}: {report[key]['median_s']:.4f} s", flush=True)
        except Exception as e:  # noqa: BLE001 - keep the other phases' figures
            report[key] = {"error": repr(e)}
            print(f"{key}: FAILED: {e!r}", flush=True)
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        report["memory_gib"][mem_key] = gib(poller.take_peak())
        save()

    save()
    encode = lambda: pipe.encode_prompt(PROMPT, device=dev, num_images_per_prompt=1,  # noqa: E731
                                        do_classifier_free_guidance=True, negative_prompt=NEGATIVE)
    phase("text_encode", "text_peak", lambda: timed(encode))

    def unet_run():
        pe, ne, pp, npool = encode()
        context, pooled = torch.cat([ne, pe]), torch.cat([npool, pp])
        time_ids = torch.tensor([[args.size, args.size, 0, 0, args.size, args.size]] * 2, device=dev, dtype=dtype)
        sample = torch.randn(2, unet.config.in_channels, lh, lw, device=dev, dtype=dtype)
        t500 = torch.tensor(500.0, device=dev)
        return timed(lambda: unet(sample, t500, encoder_hidden_states=context,
                                  added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample)
    phase("unet_forward_b2", "unet_b2_peak", unet_run)

    def vae_run():
        z = torch.randn(1, vae.config.latent_channels, lh, lw, device=dev, dtype=vae_dtype)
        vae.to(vae_dtype)
        try:
            return timed(lambda: vae.decode(z).sample, warmup=1, iters=min(args.iters, 5))
        finally:
            vae.to(dtype)
    phase("vae_decode", "vae_decode_peak", vae_run)

    def gen(output_type, **kw):
        return pipe(prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=args.steps, guidance_scale=5.0,
                    height=args.size, width=args.size, generator=torch.Generator(dev).manual_seed(0),
                    output_type=output_type, **kw).images
    phase("text_plus_denoise_loop", "loop_peak", lambda: timed(lambda: gen("latent"), warmup=1, iters=args.gen_iters))

    def steps_run():
        ends = []

        def on_step_end(_pipe, _i, _t, kwargs):
            sync()
            ends.append(time.perf_counter())
            return kwargs
        gen("latent", callback_on_step_end=on_step_end)
        return [b - a for a, b in zip(ends, ends[1:])]
    phase("denoise_step", "step_peak", steps_run)

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    phase("generate", "generate_peak", lambda: timed(lambda: gen("np"), warmup=0, iters=args.gen_iters))
    poller.stop = True

    med = lambda key: report.get(key, {}).get("median_s", float("nan"))  # noqa: E731
    report["per_step_s"] = (med("text_plus_denoise_loop") - med("text_encode")) / args.steps
    m = report["memory_gib"]
    if m.get("generate_peak") is not None and m.get("start") is not None:
        m["generate_peak_over_start"] = m["generate_peak"] - m["start"]
    if dev.type == "cuda":
        m["torch_max_allocated_generate"] = gib(torch.cuda.max_memory_allocated())
        m["torch_max_reserved_generate"] = gib(torch.cuda.max_memory_reserved())
    save()
    print(f"\ndiffusers SDXL on {report['device']} ({dtype}, VAE {vae_dtype}), {args.size}x{args.size}, {args.steps} steps, CFG")
    for label, key in [("text encode (+neg)", "text_encode"), ("UNet forward b=2", "unet_forward_b2"),
                       ("VAE decode", "vae_decode"), ("text + denoise loop", "text_plus_denoise_loop"),
                       ("one denoise step", "denoise_step"), ("generate (end to end)", "generate")]:
        print(f"  {label:<24}{med(key):>10.4f} s")
    print(f"  {'per CFG step (loop)':<24}{report['per_step_s']:>10.4f} s")

if __name__ == "__main__":
    main()
