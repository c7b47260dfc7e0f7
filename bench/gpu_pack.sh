#!/usr/bin/env bash
# Assembles the folder a GPU host needs for bench/gpu_run.sh (see bench/README.md, "GPU"):
# builds, with the `cuda` feature and in a separate target dir,
#   bench_gpu        --features cudnn (cuDNN convolutions; the default GPU build of the bench)
#   bench_gpu_im2col --features cuda  (candle's im2col convolutions, for comparison)
#   cuda_tests       the engine's unit tests (`cuda::tests` are the GPU parity tests)
# strips and xz-compresses each, and copies the scripts, SDXL's tokenizer folders and the
# diffusers wheels beside them.
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

# cargo ARGS... → the path of the one executable it builds.
executable() {
  cargo "$@" --message-format=json-render-diagnostics | python3 -c 'import json,sys
exes = [m["executable"] for m in map(json.loads, sys.stdin)
        if m.get("reason") == "compiler-artifact" and m.get("executable")]
print(exes[-1] if exes else "")'
}

pack() { # NAME EXECUTABLE
  [ -n "$2" ] || { echo "no executable for $1" >&2; exit 1; }
  # The binaries are mostly candle's PTX text: xz takes ~57 MB to ~7 MB.
  strip --strip-debug -o "$dest/$1" "$2"
  xz -f -6 "$dest/$1"
}

mkdir -p "$dest/whl" "$dest/tokenizers"
pack bench_gpu "$(executable build -p hyperlora --features cudnn --example bench_gpu)"
pack bench_gpu_im2col "$(executable build -p hyperlora --features cuda --example bench_gpu)"
pack cuda_tests "$(executable test -p hyperlora --features cudnn --lib --no-run)"
xz -dc "$dest/bench_gpu.xz" >/tmp/bench_gpu.ldd && chmod +x /tmp/bench_gpu.ldd
ldd /tmp/bench_gpu.ldd | sed 's/^/  /' >"$dest/ldd-here.txt"
cp bench/gpu_run.sh bench/gpu_diffusers.py bench/gpu_table.py bench/ncu_summary.py "$dest/"
cp -r models/tiny/sdxl/tokenizer models/tiny/sdxl/tokenizer_2 "$dest/tokenizers/"
if ! ls "$dest"/whl/diffusers-*.whl >/dev/null 2>&1; then
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    -d "$dest/whl" diffusers==0.42.1 importlib_metadata==8.7.0
fi
echo "dynamic dependencies of bench_gpu:"
cat "$dest/ldd-here.txt"
du -sh "$dest"
