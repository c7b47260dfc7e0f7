#!/usr/bin/env bash
# Assembles the folder a GPU host needs for bench/gpu_run.sh (see bench/README.md, "GPU"):
# builds bench_gpu with --features cuda (dev profile, separate target dir), strips its debug info
# and compresses it (bench_gpu.xz), and copies the scripts, SDXL's tokenizer folders and the diffusers wheels beside it.
#
#   bash bench/gpu_pack.sh [DEST]        # DEST default: .gpubench (add it to .git/info/exclude)
#
# Environment: CARGO_TARGET_DIR (default /work/target-cuda), CUDA_COMPUTE_CAP (default 90).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
dest=${1:-$root/.gpubench}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/work/target-cuda}
eval "$(bash "$root/scripts/cuda-env.sh" | sed 's/^/export /')"

cd "$root"
exe=$(cargo build -p hyperlora --features cuda --example bench_gpu --message-format=json-render-diagnostics |
  python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "bench_gpu" and m.get("executable"):
        print(m["executable"])')
[ -n "$exe" ] || { echo "no bench_gpu executable" >&2; exit 1; }

mkdir -p "$dest/whl" "$dest/tokenizers"
# The binary is mostly candle's PTX text: xz takes it from ~57 MB to ~7 MB.
strip --strip-debug -o "$dest/bench_gpu" "$exe"
ldd "$dest/bench_gpu" | sed 's/^/  /' >"$dest/ldd-here.txt"
xz -f -6 "$dest/bench_gpu"
cp bench/gpu_run.sh bench/gpu_diffusers.py bench/gpu_table.py "$dest/"
cp -r models/tiny/sdxl/tokenizer models/tiny/sdxl/tokenizer_2 "$dest/tokenizers/"
if ! ls "$dest"/whl/diffusers-*.whl >/dev/null 2>&1; then
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    -d "$dest/whl" diffusers==0.42.1 importlib_metadata==8.7.0
fi
echo "dynamic dependencies of bench_gpu:"
cat "$dest/ldd-here.txt"
du -sh "$dest"
