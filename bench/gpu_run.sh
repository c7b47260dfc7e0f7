#!/usr/bin/env bash
# One GPU session's checks and benchmarks, on the GPU host: no Rust, no Node, no network needed
# there, only the NVIDIA driver and python3 with torch + transformers (diffusers comes as a
# wheel). Expects beside this script (see bench/README.md, "GPU"; made by bench/gpu_pack.sh):
# bench_gpu.xz, bench_gpu_im2col.xz, cuda_tests.xz, gpu_diffusers.py, gpu_table.py,
# ncu_summary.py, whl/ and tokenizers/; and the repository one level up (fixtures, tiny model).
#
#   bash .gpubench/gpu_run.sh          # results under .gpubench/out; with $OUT set (the device
#                                      # tool's), also $OUT/results.tgz, run.log and table.md
#
# Environment: STAGES (default "tests ours variants profile diffusers table"), OURS_TIMEOUT /
# DIFFUSERS_TIMEOUT (seconds, default 300 / 200), BENCH_ARGS (extra arguments for both programs).
set -uo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
out=$here/out
stages=" ${STAGES:-tests ours variants profile diffusers table} "
mkdir -p "$out"
want() { [[ $stages == *" $1 "* ]]; }

unpack() { # NAME → /tmp/hyperlora-NAME
  python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
    "$here/$1.xz" "/tmp/hyperlora-$1" && chmod +x "/tmp/hyperlora-$1" || echo "!! could not unpack $1.xz"
}

smi_log() { nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 50 >"$1" 2>/dev/null & echo $!; }

main() {
echo "== $(date -u +%FT%TZ) $(hostname)"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$out/gpu.txt"
for b in bench_gpu bench_gpu_im2col cuda_tests; do unpack "$b"; done
bin=/tmp/hyperlora-bench_gpu

# The CUDA libraries the binaries link (cuBLAS, cuBLASLt, cuRAND, NVRTC, cudart, cuDNN; libcuda
# is the driver's): PyTorch's nvidia-* wheels carry them, else a CUDA toolkit's lib64.
libdirs=$(python3 - <<'PY'
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
PY
)
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do
  [ -d "$d" ] && libdirs="${libdirs:+$libdirs:}$d"
done
export LD_LIBRARY_PATH="${libdirs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
ldd "$bin" >"$out/ldd.txt"
if grep "not found" "$out/ldd.txt"; then echo "!! missing libraries above"; fi

if want tests; then
  echo "== CUDA parity tests (cuda::tests)"
  HYPERLORA_REPO=$repo timeout 240 /tmp/hyperlora-cuda_tests cuda::tests --test-threads 1 --nocapture 2>&1 |
    tee "$out/tests.log" | grep -vE "^running|^$"
fi

if want ours; then
  # TF32 for the f32 VAE's convolutions, as PyTorch allows by default (cudnn.allow_tf32).
  echo "== hyperlora (bench_gpu: cuDNN convolutions, fused kernels, HYPERLORA_ALLOW_TF32=1)"
  pid=$(smi_log "$out/smi_ours.csv")
  # shellcheck disable=SC2086
  HYPERLORA_ALLOW_TF32=1 timeout "${OURS_TIMEOUT:-300}" "$bin" --json "$out/ours.json" ${BENCH_ARGS:-}
  echo "bench_gpu exit $?"
  kill "$pid" 2>/dev/null
fi

if want variants; then
  quick="--phases unet_forward_b2,vae_decode --iters 5"
  variant() { # LABEL ENV... -- BINARY ARGS...
    echo "== variant: $1"; shift
    # shellcheck disable=SC2086
    env "$@" 2>&1 | grep -E "UNet forward|VAE decode"
  }
  variant "fused kernels off (HYPERLORA_CUDA_KERNELS=0)" HYPERLORA_CUDA_KERNELS=0 HYPERLORA_ALLOW_TF32=1 \
    timeout 150 "$bin" --json "$out/ours_nokernels.json" $quick
  variant "candle's im2col convolutions (no cuDNN)" HYPERLORA_ALLOW_TF32=1 \
    timeout 150 /tmp/hyperlora-bench_gpu_im2col --json "$out/ours_im2col.json" $quick
  echo "== variant: VAE in f32 with TF32, cuDNN's searches logged to cudnn_find_vae.log"
  HYPERLORA_ALLOW_TF32=1 HYPERLORA_CUDNN_LOG=1 timeout 100 "$bin" --json "$out/ours_vae_tf32.json" \
    --phases vae_decode --iters 5 >"$out/cudnn_find_vae.log" 2>&1
  grep -E "VAE decode" "$out/cudnn_find_vae.log"
  variant "VAE in f32 without TF32" timeout 100 "$bin" --json "$out/ours_vae_f32.json" --phases vae_decode --iters 5
  variant "VAE in bf16" timeout 100 "$bin" --json "$out/ours_vae_bf16.json" --phases vae_decode --iters 5 --vae-dtype bf16
fi

if want profile; then
  for what in unet vae; do
    echo "== ncu: one $what run"
    timeout 240 ncu --profile-from-start off --clock-control none --metrics gpu__time_duration.sum \
      --csv --log-file "$out/ncu_$what.csv" "$bin" --profile "$what" >/dev/null 2>"$out/ncu_$what.err"
    echo "ncu exit $?"
    python3 "$here/ncu_summary.py" "$out/ncu_$what.csv" --top 20 | tee "$out/ncu_$what.md"
  done
fi

if want diffusers; then
  echo "== diffusers"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$here"/whl/*.whl &&
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  pid=$(smi_log "$out/smi_diffusers.csv")
  # shellcheck disable=SC2086
  PYTHONUNBUFFERED=1 timeout "${DIFFUSERS_TIMEOUT:-200}" python3 "$here/gpu_diffusers.py" \
    --tokenizers "$here/tokenizers" --json "$out/diffusers.json" ${BENCH_ARGS:-}
  echo "gpu_diffusers exit $?"
  kill "$pid" 2>/dev/null
fi

if want table; then
  echo "== side by side"
  python3 "$here/gpu_table.py" "$out/ours.json" "$out/diffusers.json" \
    --smi-ours "$out/smi_ours.csv" --smi-diffusers "$out/smi_diffusers.csv" | tee "$out/table.md"
fi
}

main 2>&1 | tee "$out/run.log"
if [ -n "${OUT:-}" ]; then
  tar czf "$OUT/results.tgz" -C "$out" .
  cp "$out/run.log" "$OUT/"
  [ -e "$out/table.md" ] && cp "$out/table.md" "$OUT/"
fi
