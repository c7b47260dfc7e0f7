#!/usr/bin/env bash
# Bounded fuzzing of the engine's input parsers: each target for SECONDS, one process at
# a time, then a table of cases and outcomes. Crash inputs land in
# crates/hyperlora-fuzz/corpus/<target>/, which `cargo test` (so `npm test`) replays.
#
#   bench/fuzz.sh [SECONDS_PER_TARGET (90)] [SEED (1)] [TARGET... (all)]
#
# Targets: safetensors configs onnx lora hyperlora prompts. Built with the dev profile on
# purpose: overflow checks and debug assertions stay on (release would wrap an overflowing
# size silently), and every dependency is at opt-level 3 there anyway. One thread per worker:
# the build machine's cores are shared.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-90}
seed=${2:-1}
shift $(($# < 2 ? $# : 2))
targets=("${@:-all}")
work=${HYPERLORA_FUZZ_WORK:-${TMPDIR:-/tmp}/hyperlora-fuzz-$seed}
rm -rf "$work"
export RAYON_NUM_THREADS=${RAYON_NUM_THREADS:-1}
cargo build -q -p hyperlora-fuzz
cargo run -q -p hyperlora-fuzz -- "${targets[@]}" \
  --seconds "$seconds" --seed "$seed" --work "$work"
