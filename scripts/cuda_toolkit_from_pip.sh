#!/usr/bin/env bash
# A CUDA toolkit to compile against, from NVIDIA's pip wheels: nvcc (with cicc and ptxas), the CUDA runtime's
# headers and libraries, CCCL and the CRT headers, laid out as /usr/local/cuda is (bin/, include/, lib/,
# lib64 -> lib, targets/x86_64-linux/, libcudart.so). Horovod's NCCL build needs this and nothing more; torch
# brings the CUDA libraries it runs with. So the image's build stage needs no NVIDIA base image and no NVIDIA apt
# repository: the same RUN lines build on any Debian or Ubuntu base (docker/README.md).
#
# Usage: scripts/cuda_toolkit_from_pip.sh PREFIX [PYTHON]   (PYTHON's pip downloads; default python3)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/versions.env"
prefix=${1:?usage: cuda_toolkit_from_pip.sh PREFIX [PYTHON]}
py=${2:-python3}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$py" -m pip install --quiet --no-deps --target "$work" "nvidia-cuda-nvcc==$CUDA_NVCC_VERSION" \
  "nvidia-cuda-crt==$CUDA_NVCC_VERSION" "nvidia-nvvm==$CUDA_NVCC_VERSION" \
  "nvidia-cuda-runtime==$CUDA_RUNTIME_VERSION" "nvidia-cuda-cccl==$CUDA_CCCL_VERSION"
mkdir -p "$prefix/targets/x86_64-linux"
cp -a "$work/nvidia/cu13/." "$prefix/"
# What the wheels leave out of a toolkit's layout: nvcc.profile looks in targets/x86_64-linux/{include,lib},
# CMake's FindCUDAToolkit in lib64, and the linker wants the unversioned libcudart.so.
ln -sfn lib "$prefix/lib64"
ln -sfn ../../include "$prefix/targets/x86_64-linux/include"
ln -sfn ../../lib "$prefix/targets/x86_64-linux/lib"
ln -sf libcudart.so.13 "$prefix/lib/libcudart.so"
echo "cuda_toolkit_from_pip: $("$prefix/bin/nvcc" --version | tail -n 1) in $prefix"
