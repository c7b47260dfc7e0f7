#!/usr/bin/env bash
# One GPU benchmark run: our bench_gpu binary and diffusers on the same GPU, then a side-by-side
# table with ratios. Needs on the GPU host only the NVIDIA driver and python3 with torch +
# transformers (diffusers comes as a wheel); no Rust, no network. Expects beside this script (see
# bench/README.md, "GPU"): bench_gpu.xz (built with --features cuda, by bench/gpu_pack.sh), gpu_diffusers.py, gpu_table.py,
# whl/ (diffusers and importlib_metadata wheels) and tokenizers/{tokenizer,tokenizer_2}.
#
#   bash .gpubench/gpu_run.sh          # results under $OUT (default: .gpubench/out)
#
# Environment: OURS_TIMEOUT / DIFFUSERS_TIMEOUT (seconds, default 300 / 200), BENCH_ARGS (extra
# arguments for both programs, e.g. "--iters 5").
set -uo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
out=${OUT:-$here/out}
mkdir -p "$out"

main() {
echo "== $(date -u +%FT%TZ) $(hostname)"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$out/gpu.txt"

# The binary travels xz-compressed.
bin=/tmp/hyperlora-bench_gpu
python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
  "$here/bench_gpu.xz" "$bin" && chmod +x "$bin" || echo "!! could not unpack bench_gpu.xz"

# The CUDA libraries bench_gpu links dynamically (cuBLAS, cuBLASLt, cuRAND, NVRTC, cudart; libcuda
# is the driver's): PyTorch's nvidia-* wheels carry them, else a CUDA toolkit's lib64.
libdirs=$(python3 - <<'EOF'
import glob, os
dirs = []
try:
    import nvidia
    for root in nvidia.__path__:
        for so in sorted(glob.glob(os.path.join(root, "**", "lib*.so*"), recursive=True)):
            d = os.path.dirname(so)
            if d not in dirs:
                dirs.append(d)
except Exception:
    pass
print(":".join(dirs))
EOF
)
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do
  [ -d "$d" ] && libdirs="${libdirs:+$libdirs:}$d"
done
export LD_LIBRARY_PATH="${libdirs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
echo "== ldd bench_gpu"
ldd "$bin" | tee "$out/ldd.txt"
if grep -q "not found" "$out/ldd.txt"; then echo "!! missing libraries above"; fi

smi_log() { nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 50 >"$1" 2>/dev/null & echo $!; }

echo "== hyperlora (bench_gpu)"
pid=$(smi_log "$out/smi_ours.csv")
# shellcheck disable=SC2086
timeout "${OURS_TIMEOUT:-300}" "$bin" --json "$out/ours.json" ${BENCH_ARGS:-}
echo "bench_gpu exit $?"
kill "$pid" 2>/dev/null

echo "== diffusers"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$here"/whl/*.whl &&
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
pid=$(smi_log "$out/smi_diffusers.csv")
# shellcheck disable=SC2086
PYTHONUNBUFFERED=1 timeout "${DIFFUSERS_TIMEOUT:-200}" python3 "$here/gpu_diffusers.py" \
  --tokenizers "$here/tokenizers" --json "$out/diffusers.json" ${BENCH_ARGS:-}
echo "gpu_diffusers exit $?"
kill "$pid" 2>/dev/null

echo "== side by side"
python3 "$here/gpu_table.py" "$out/ours.json" "$out/diffusers.json" \
  --smi-ours "$out/smi_ours.csv" --smi-diffusers "$out/smi_diffusers.csv" | tee "$out/table.md"
}

main 2>&1 | tee "$out/run.log"
