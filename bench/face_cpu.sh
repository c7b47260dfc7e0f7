#!/usr/bin/env bash
# Face analysis of one 1024x1024 photo on CPU: detector, landmarks, ArcFace, preprocessing.
# HYPERLORA_ANTELOPEV2=/path/to/antelopev2 bench/face_cpu.sh   (default: the tiny models)
# tract runs single-threaded; taskset keeps the run on 2 cores as the issue asks.
set -euo pipefail
cd "$(dirname "$0")/.."
exec taskset -c 0,1 cargo test --release -p hyperlora --test parity face::bench_face_cpu -- --ignored --nocapture
