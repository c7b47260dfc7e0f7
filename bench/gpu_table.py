#!/usr/bin/env python3
"""Side-by-side table of bench_gpu's and gpu_diffusers.py's JSON reports (markdown, with ratios).

    python3 bench/gpu_table.py ours.json diffusers.json [--smi-ours smi_ours.csv --smi-diffusers smi_diffusers.csv]

--smi-*: `nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 50` logs taken
during each run; their maximum is the same external measure of peak memory for both.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

ROWS = [
    ("UNet forward, batch 2 (one CFG step)", "unet_forward_b2"),
    ("per CFG step in the {steps}-step loop ((loop − text) / steps)", "per_step_s"),
    ("one denoise step, synchronised after each (median)", "denoise_step"),
    ("text encoding (prompt + negative, both encoders)", "text_encode"),
    ("VAE decode {size}²", "vae_decode"),
    ("text + {steps}-step denoise loop", "text_plus_denoise_loop"),
    ("full generate {size}², {steps} steps, CFG (end to end)", "generate"),
]


def seconds(report: dict | None, key: str):
    if not report:
        return None
    v = report.get(key)
    if isinstance(v, dict):
        return v.get("median_s")
    return v


def smi_peak(path: Path | None):
    if not path or not path.is_file():
        return None
    vals = []
    for line in path.read_text().splitlines():
        try:
            vals.append(float(line.strip().split(",")[0]))
        except ValueError:
            pass
    return (max(vals) / 1024, min(vals) / 1024) if vals else None


def load(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("ours", type=Path)
    ap.add_argument("diffusers", type=Path)
    ap.add_argument("--smi-ours", type=Path)
    ap.add_argument("--smi-diffusers", type=Path)
    args = ap.parse_args()
    ours, theirs = load(args.ours), load(args.diffusers)
    head = ours or theirs or {}
    print(f"SDXL base configuration, random weights, {head.get('size', 1024)}², {head.get('steps', 20)} steps "
          f"Euler, CFG 5, batch 1 — device: {head.get('device', '?')}")
    if ours:
        print(f"ours: {ours['impl']}, {ours['dtype']}, VAE {ours['vae_dtype']}")
    if theirs:
        print(f"diffusers: {theirs['impl']}, {theirs['dtype']}, VAE {theirs['vae_dtype']}, attention {theirs.get('attention')}")
    print()
    print("| measure | hyperlora | diffusers | ratio (ours / diffusers) |")
    print("| --- | ---: | ---: | ---: |")

    def fmt(x, unit="s"):
        if x is None:
            return "—"
        return f"{x * 1000:.1f} ms" if unit == "s" and x < 1 else f"{x:.3f} {unit}"

    for label, key in ROWS:
        a, b = seconds(ours, key), seconds(theirs, key)
        ratio = f"{a / b:.2f}x" if a and b else "—"
        label = label.format(size=head.get("size", 1024), steps=head.get("steps", 20))
        print(f"| {label} | {fmt(a)} | {fmt(b)} | {ratio} |")
    print("| identity creation | not implemented yet | — | — |")
    for label, key in [("peak device memory during generate (polled, GiB)", "generate_peak"),
                       ("  of which over the process start (GiB)", "generate_peak_over_start")]:
        a = (ours or {}).get("memory_gib", {}).get(key)
        b = (theirs or {}).get("memory_gib", {}).get(key)
        ratio = f"{a / b:.2f}x" if a and b else "—"
        print(f"| {label} | {fmt(a, 'GiB')} | {fmt(b, 'GiB')} | {ratio} |")
    sa, sb = smi_peak(args.smi_ours), smi_peak(args.smi_diffusers)
    if sa or sb:
        a = sa[0] if sa else None
        b = sb[0] if sb else None
        ratio = f"{a / b:.2f}x" if a and b else "—"
        print(f"| peak memory.used, nvidia-smi, whole run (GiB) | {fmt(a, 'GiB')} | {fmt(b, 'GiB')} | {ratio} |")
    if theirs and theirs.get("memory_gib", {}).get("torch_max_allocated_generate") is not None:
        m = theirs["memory_gib"]
        print(f"\ndiffusers torch allocator during generate: max allocated {m['torch_max_allocated_generate']:.2f} GiB, "
              f"max reserved {m['torch_max_reserved_generate']:.2f} GiB")
    for name, r in (("ours", ours), ("diffusers", theirs)):
        if r is None:
            print(f"\n{name}: no report (see its log)")


if __name__ == "__main__":
    main()
