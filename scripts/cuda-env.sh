#!/usr/bin/env bash
# Prints KEY=VALUE lines (for `>> $GITHUB_ENV`, or `eval "$(bash scripts/cuda-env.sh | sed 's/^/export /')"`)
# that let `cargo build --features cuda` run on a machine WITHOUT a GPU or a CUDA install, from
# PyPI's CUDA wheels. Only needed at build time; the GPU machine needs the driver plus the
# cuBLAS/cuRAND/NVRTC/cudart shared libraries (PyTorch's wheels carry them).
#
#   pip install "nvidia-cuda-nvcc==13.0.*" "nvidia-cuda-crt==13.0.*" "nvidia-nvvm==13.0.*" \
#     "nvidia-cuda-runtime==13.0.*" "nvidia-cuda-cccl==13.0.*" "nvidia-cuda-nvrtc==13.0.*" \
#     "nvidia-cublas==13.0.*" "nvidia-curand==10.4.0.*"
#
# Keep the toolkit no newer than the oldest driver you target: candle JIT-loads its kernels as PTX,
# and a driver refuses PTX from a newer toolkit (driver 580 = CUDA 13.0).
#
# The CUDA 13 wheels install everything under site-packages/nvidia/cu13/{bin,include,lib}, but
# their libraries are only versioned (libcublas.so.13) and there is no libcuda at all (it comes with
# the driver). cudarc, as candle enables it, links libcuda/libcublas/libcublasLt/libcurand/libnvrtc
# at build time, so this script assembles a CUDA root in $HYPERLORA_CUDA_ROOT (default
# ~/.cache/hyperlora/cuda) with bin/ and include/ pointing at the wheel, lib/ holding unversioned
# links, and lib/stubs/libcuda.so: a stub with the driver API's symbols (soname libcuda.so.1), which
# the real driver replaces at run time.
#
# Also sets CUDA_COMPUTE_CAP (default 90: H100/H200; override by exporting it first).
set -euo pipefail

site=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
user_site=$(python3 -m site --user-site 2>/dev/null || true)
nvcc=$(find "$site/nvidia" "$user_site/nvidia" -path '*/bin/nvcc' -type f 2>/dev/null | head -1 || true)
[ -n "$nvcc" ] || {
  echo "nvcc not found: pip install nvidia-cuda-nvcc nvidia-cuda-runtime nvidia-cuda-cccl (see this script's header)" >&2
  exit 1
}
wheel=$(dirname "$(dirname "$nvcc")")
prefix=${HYPERLORA_CUDA_ROOT:-$HOME/.cache/hyperlora/cuda}
mkdir -p "$prefix/lib/stubs"
ln -sfn "$wheel/bin" "$prefix/bin"
ln -sfn "$wheel/include" "$prefix/include"
[ -d "$wheel/nvvm" ] && ln -sfn "$wheel/nvvm" "$prefix/nvvm"

# lib/libX.so -> the wheel's libX.so.N (whatever the wheels provide).
for so in "$wheel"/lib/lib*.so.*; do
  [ -e "$so" ] || continue
  base=$(basename "$so")
  name=${base%%.so.*}
  case "$base" in *.alt.so.*) continue ;; esac
  ln -sfn "$so" "$prefix/lib/$name.so"
done
for lib in cublas cublasLt curand nvrtc cudart; do
  [ -e "$prefix/lib/lib$lib.so" ] || echo "warning: lib$lib.so.* not found in $wheel/lib (pip install the matching nvidia-* wheel)" >&2
done

# Link-time stubs: every function cudarc declares for the library, as an empty symbol, under the
# real library's soname. libcuda comes with the driver; libcudnn (feature `cudnn` only) with cuDNN 9
# on the GPU host (PyTorch's nvidia-cudnn wheel carries it).
stub() { # NAME SONAME CUDARC_SYS_FILE PREFIX
  local out="$prefix/lib/stubs/lib$1.so" sys src
  [ -e "$out" ] && return
  sys=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-*/src/"$3" 2>/dev/null | sort -V | tail -1)
  [ -n "$sys" ] || { echo "cudarc sources not found: run 'cargo fetch' first" >&2; exit 1; }
  src=$(mktemp --suffix=.c)
  grep -oE "^\s*(pub )?fn $4[A-Za-z0-9_]+\(" "$sys" | grep -oE "$4[A-Za-z0-9_]+" | sort -u |
    sed 's/.*/void &(void) {}/' >"$src"
  cc -shared -fPIC -Wl,-soname,"$2" -o "$out" "$src"
  rm -f "$src"
}
stub cuda libcuda.so.1 driver/sys/mod.rs cu
stub cudnn libcudnn.so.9 cudnn/sys/mod.rs cudnn

echo "CUDA_ROOT=$prefix"
echo "CUDA_HOME=$prefix"
echo "CUDA_PATH=$prefix"
echo "CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}"
echo "PATH=$prefix/bin:$PATH"
