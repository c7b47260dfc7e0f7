#!/usr/bin/env bash
# Prints PATH/CUDA_ROOT lines (for `>> $GITHUB_ENV` or `eval`/`export`) that point candle's CUDA
# build at nvcc and the CUDA headers installed from PyPI (nvidia-cuda-nvcc, nvidia-cuda-runtime,
# nvidia-cuda-cccl). Only needed at build time; the GPU machine needs just the driver.
set -euo pipefail
site=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
user_site=$(python3 -m site --user-site 2>/dev/null || true)
nvcc=$(find "$site/nvidia" "$user_site/nvidia" -path '*/bin/nvcc' -type f 2>/dev/null | head -1)
[ -n "$nvcc" ] || { echo "nvcc not found: pip install nvidia-cuda-nvcc nvidia-cuda-runtime nvidia-cuda-cccl" >&2; exit 1; }
root=$(dirname "$(dirname "$nvcc")")
echo "CUDA_ROOT=$root"
echo "CUDA_PATH=$root"
echo "PATH=$root/bin:$PATH"
