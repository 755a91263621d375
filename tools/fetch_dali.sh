#!/usr/bin/env bash
# Download NVIDIA DALI, and the wheels it needs that a stock PyTorch image lacks, for an offline
# x86-64 Linux machine (the GPU machine: its own Python, torch built for CUDA 13, no network),
# into a folder that `make gpu-check` (tools/gpu_check.py) installs from by itself:
#
#   tools/fetch_dali.sh [PYTHON_VERSION [DIR [CUDA_MAJOR]]]     # defaults: 3.12 .whl 13
#
# Copy DIR (the repository's .whl/, git-ignored) to the GPU machine with the repository; there
# tools/gpu_check.py runs `pip install --no-index --no-deps --target .dali-site DIR/*.whl` once and
# puts .dali-site/ on PYTHONPATH. CUDA_MAJOR 12 fetches the DALI build for CUDA 12 drivers instead.
set -euo pipefail

py=${1:-3.12}; dir=${2:-.whl}; cuda=${3:-13}
case "$cuda" in
13) wheels=(nvidia-dali-cuda130==2.4.0 nvidia-nvimgcodec-cu13==0.9.0.20 nvidia-libnvcomp-cu13==5.3.0.16
            nvidia-nvjpeg nvidia-nvjpeg2k-cu13 nvidia-nvtiff-cu13) ;;
12) wheels=(nvidia-dali-cuda120==2.4.0 nvidia-nvimgcodec-cu12 nvidia-libnvcomp-cu12 nvidia-nvjpeg2k-cu12
            nvidia-nvtiff-cu12) ;;
*) echo "fetch_dali.sh: error: CUDA_MAJOR $cuda: expected 12 or 13" >&2; exit 2 ;;
esac
wheels+=(nvtx makefun libcst gast astunparse optree)  # DALI's pure-Python and small dependencies
tags=(--python-version "$py" --implementation cp --only-binary=:all: --platform manylinux_2_28_x86_64
      --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
      --platform manylinux1_x86_64)

mkdir -p "$dir"
part=$(mktemp -d "$dir/.part.XXXXXX")  # the wheels reach DIR only when every one of them came
trap 'rm -rf "$part"' EXIT
for w in "${wheels[@]}"; do
  python3 -m pip download -q --no-deps "${tags[@]}" -d "$part" "$w"
done
mv "$part"/*.whl "$dir"/
du -ch "$dir"/*.whl
