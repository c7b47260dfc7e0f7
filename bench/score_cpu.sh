#!/usr/bin/env bash
# What prompt scores cost on CPU: CLIP text tower load, a prompt, one 1024² picture.
# HYPERLORA_CLIP_DIR=/path/to/clip bench/score_cpu.sh   (default: the tiny model;
# python3 bench/make_clip_sized.py makes a real-size random-weight ViT-L/14 folder)
# Dev profile (dependencies, candle included, at opt-level 3; no second build), 2 cores.
# Likeness costs what face analysis's detector + ArcFace rows in RESULTS.md cost (bench/face_cpu.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
exec taskset -c 0,1 cargo test -p hyperlora --test parity clip_score::bench_clip_score_cpu -- --ignored --nocapture
