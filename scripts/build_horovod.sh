#!/usr/bin/env bash
# Build and install Horovod into a virtual environment, for the CPU (PyTorch + Gloo + MPI) by default or with
# NCCL when HOROVOD_GPU_OPERATIONS=NCCL is set (the container image does that).
#
# Why a patch: Horovod 0.28.1 (June 2023, the last release) does not build against PyTorch >= 2.1 as released.
# scripts/horovod-0.28.1-pytorch2.patch makes three changes, each commented in the patched files:
#   1. HOROVOD_WITHOUT_CUDA=1 skips the CUDA probes (a CUDA build of torch plus an nvcc on the PATH otherwise
#      force a CUDA build that fails with "Could NOT find CUDAToolkit");
#   2. the torch extension compiles as C++20 (torch 2.14's ATen/ATen.h requires it; 0.28.1 says C++14);
#   3. it links the C++17 copy of gloo, else "multiple definition of gloo::rendezvous::Store::kDefaultTimeout".
# Upstream fixed (2) for C++17 only, on master after the release (PR #3998).
#
# The compile takes ~5 min on 2 cores, so the built wheel is cached under $HVD_IMAGENET_CACHE (default
# ~/.cache/hvd_imagenet) keyed by everything the binary depends on: the patch, the torch version, the Python
# tag, the build flags and the MPI library. pip's own wheel cache cannot do this: it would key a patched
# local sdist by its path and knows nothing of the torch ABI the extension is compiled against.
#
# Usage: scripts/build_horovod.sh PYTHON   (PYTHON: the venv's interpreter, torch already installed)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/versions.env"
py=${1:?usage: build_horovod.sh PYTHON}
patch_file="$here/horovod-${HOROVOD_VERSION}-pytorch2.patch"

export HOROVOD_WITH_PYTORCH=1 HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1
export HOROVOD_WITH_GLOO=1 HOROVOD_WITH_MPI=1
if [ "${HOROVOD_GPU_OPERATIONS:-}" != "NCCL" ]; then
  export HOROVOD_WITHOUT_CUDA=1   # our patch's switch: a CPU build even with a CUDA torch and nvcc around
fi
export MAKEFLAGS="-j$(nproc)"    # else Horovod's setup.py runs make -j8 on any machine

torch_version=$("$py" -c 'import torch; print(torch.__version__)')
py_tag=$("$py" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
mpi_lib=$(command -v mpicc >/dev/null && mpicc --showme:version 2>&1 | head -n1 || echo none)
key=$( { cat "$patch_file"; echo "$HOROVOD_VERSION $torch_version $py_tag $mpi_lib";
         env | grep -E '^HOROVOD_' | sort; } | sha256sum | cut -c1-16)
cache="${HVD_IMAGENET_CACHE:-$HOME/.cache/hvd_imagenet}/horovod-wheels/$key"

marker="$("$py" -c 'import sys; print(sys.prefix)')/horovod-build-key"
if [ "$(cat "$marker" 2>/dev/null)" = "$key" ] && "$py" -c 'import horovod.torch' 2>/dev/null; then
  echo "build_horovod: Horovod $HOROVOD_VERSION already installed (build $key)"
  exit 0
fi

if ! ls "$cache"/horovod-*.whl >/dev/null 2>&1; then
  echo "build_horovod: compiling Horovod $HOROVOD_VERSION for torch $torch_version ($py_tag), ~5 min on 2 cores"
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  "$py" -m pip download --quiet --no-deps --no-binary :all: "horovod==$HOROVOD_VERSION" -d "$work"
  tar -xzf "$work/horovod-$HOROVOD_VERSION.tar.gz" -C "$work"
  patch -d "$work/horovod-$HOROVOD_VERSION" -p1 --quiet < "$patch_file"
  mkdir -p "$cache"
  "$py" -m pip wheel --no-deps --no-build-isolation --wheel-dir "$cache" "$work/horovod-$HOROVOD_VERSION"
else
  echo "build_horovod: using cached wheel $key"
fi
"$py" -m pip install --quiet --no-deps --force-reinstall "$cache"/horovod-*.whl
# Horovod's own runtime dependencies (install_requires of 0.28.1), installed normally.
"$py" -m pip install --quiet cloudpickle psutil pyyaml packaging cffi
echo "$key" > "$marker"
