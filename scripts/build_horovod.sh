#!/usr/bin/env bash
# Build and install Horovod into a virtual environment, for the CPU (PyTorch + Gloo + MPI) by default or with
# NCCL when HOROVOD_GPU_OPERATIONS=NCCL is set (the container image does that).
#
# Why a patch: Horovod 0.28.1 (June 2023, the last release) does not build against PyTorch >= 2.1 as released.
# scripts/horovod-0.28.1-pytorch2.patch makes these changes, each commented in the patched files:
#   1. HOROVOD_WITHOUT_CUDA=1 skips the CUDA probes (a CUDA build of torch plus an nvcc on the PATH otherwise
#      force a CUDA build that fails with "Could NOT find CUDAToolkit");
#   2. the torch extension compiles as C++20 (torch 2.14's ATen/ATen.h requires it; 0.28.1 says C++14);
#   3. it links the C++17 copy of gloo, else "multiple definition of gloo::rendezvous::Store::kDefaultTimeout";
#   4. allreduce, grouped allreduce and broadcast accept tensors that are dense in the channels_last memory
#      format, not only contiguous ones, and give outputs in their input's layout (`train --channels-last`
#      keeps the model's weights in NHWC; the C++ side reduces flat buffers, so equal layouts on every rank
#      reduce correctly; tests/test_channels_last.py checks it under Gloo and MPI);
#   5. newer toolchains: <stdexcept> in common.h and <string> in group_table.h (GCC >= 13, Ubuntu 24.04's,
#      stops without them; horovod#3957), flatbuffers' span without its broken copy assignment (GCC 14 rejects
#      it), <cstdint> in gloo's types.h (GCC 15; pytorch/gloo#452), sysconfig instead of distutils in
#      horovod/torch/CMakeLists.txt (Python >= 3.12 has no distutils);
#   6. the CUDA driver is dlopened by its soname libcuda.so.1 (a container's driver mounts have no libcuda.so);
#   7. gloo's TCP transport says which hostname did not resolve, where it crashed (SIGSEGV in CreateDeviceAttr:
#      it took getaddrinfo's EAI_* error for success; found running the image under buildah).
# Upstream fixed (2) for C++17 only, on master after the release (PR #3998).
#
# With HOROVOD_GPU_OPERATIONS=NCCL and no HOROVOD_NCCL_HOME, it builds against the NCCL that torch depends on
# (pip's nvidia-nccl-cu13), with the CUDA toolkit of CUDA_HOME or of the nvcc on the PATH. Without an mpicc on
# the machine it builds without MPI (Gloo only: horovodrun --gloo).
#
# The compile takes ~5 min on 2 cores, so the built wheel is cached under $HVD_IMAGENET_CACHE (default
# ~/.cache/hvd_imagenet) keyed by everything the binary depends on: the patch, this script's recipe number, the
# torch version, the Python tag, the build flags, CMake, the C++ compiler and the MPI library. pip's own wheel
# cache cannot do this: it would key a patched local sdist by its path and knows nothing of the torch ABI the
# extension is compiled against.
#
# Usage: scripts/build_horovod.sh PYTHON   (PYTHON: the venv's interpreter, torch already installed)
#        HOROVOD_WHEEL_OUT=DIR ...          (also leave a copy of the wheel in DIR)
#        HOROVOD_SDIST=horovod-0.28.1.tar.gz scripts/build_horovod.sh PYTHON   (offline: no download)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/versions.env"
py=${1:?usage: build_horovod.sh PYTHON}
patch_file="$here/horovod-${HOROVOD_VERSION}-pytorch2.patch"

export HOROVOD_WITH_PYTORCH=1 HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 HOROVOD_WITH_GLOO=1
if [ "${HOROVOD_WITHOUT_MPI:-}" != 1 ] && command -v mpicc >/dev/null; then
  export HOROVOD_WITH_MPI=1
else  # HOROVOD_WITHOUT_MPI=1: a wheel for a machine without Open MPI (scripts/gpu_check.sh wheel)
  export HOROVOD_WITHOUT_MPI=1
  echo "build_horovod: building without MPI (Gloo only; horovodrun --gloo): no mpicc, or HOROVOD_WITHOUT_MPI=1"
fi
if [ "${HOROVOD_GPU_OPERATIONS:-}" != "NCCL" ]; then
  export HOROVOD_WITHOUT_CUDA=1   # our patch's switch: a CPU build even with a CUDA torch and nvcc around
else
  # The CUDA toolkit: CUDA_HOME, else /usr/local/cuda, else the one of the nvcc on the PATH (through links);
  # the first that has the runtime's headers.
  nvcc_path=$(command -v nvcc || true)
  for home in "${CUDA_HOME:-}" /usr/local/cuda "${nvcc_path:+$(dirname "$(dirname "$(readlink -f "$nvcc_path")")")}"; do
    if [ -n "$home" ] && [ -f "$home/include/cuda_runtime.h" ]; then export CUDA_HOME="$home"; break; fi
  done
  [ -f "${CUDA_HOME:-}/include/cuda_runtime.h" ] ||
    { echo "build_horovod: HOROVOD_GPU_OPERATIONS=NCCL needs a CUDA toolkit (set CUDA_HOME)" >&2; exit 1; }
  export HOROVOD_CUDA_HOME="${HOROVOD_CUDA_HOME:-$CUDA_HOME}" HOROVOD_NCCL_LINK="${HOROVOD_NCCL_LINK:-SHARED}"
fi
export MAKEFLAGS="-j$(nproc)"    # else Horovod's setup.py runs make -j8 on any machine
# The venv's own tools first: pip's cmake (4.x) rather than whatever the system has, as in the image and on the
# GPU machine. CMake >= 4 refuses the cmake_minimum_required(VERSION 2.8.12) of the gloo and flatbuffers copies
# in Horovod's third_party ("Compatibility with CMake < 3.5 has been removed"); this sets their policy floor
# without editing them (CMake 4's own switch; CMake 3 ignores it).
export PATH="$(dirname "$py"):$PATH" CMAKE_POLICY_VERSION_MINIMUM=3.5
# RelWithDebInfo (Horovod's build type) leaves ~65 MB of debug info in the library; the linker drops it, so
# the wheel stays small enough to carry to a GPU machine (docs/gpu-check.md: 64 MiB a trip).
export LDFLAGS="${LDFLAGS:+$LDFLAGS }-Wl,--strip-debug"

torch_version=$("$py" -c 'import torch; print(torch.__version__)')
py_tag=$("$py" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
mpi_lib=$([ "${HOROVOD_WITHOUT_MPI:-}" != 1 ] && mpicc --showme:version 2>&1 | head -n1 || echo none)
recipe=2  # bump when a change to this script changes what it builds (not for comments)
key=$( { cat "$patch_file"; echo "$recipe $HOROVOD_VERSION $torch_version $py_tag $mpi_lib LDFLAGS=$LDFLAGS";
         cmake --version 2>/dev/null | head -n 1; c++ --version | head -n 1
         env | grep -E '^HOROVOD_' | grep -v -E '^HOROVOD_(SDIST|WHEEL_OUT)=' | sort; } | sha256sum | cut -c1-16)
cache="${HVD_IMAGENET_CACHE:-$HOME/.cache/hvd_imagenet}/horovod-wheels/$key"

leave_copy() {  # HOROVOD_WHEEL_OUT: a copy of the wheel for another machine (scripts/gpu_check.sh wheel)
  [ -z "${HOROVOD_WHEEL_OUT:-}" ] ||
    { mkdir -p "$HOROVOD_WHEEL_OUT" && cp "$cache"/horovod-*.whl "$HOROVOD_WHEEL_OUT/"; }
}

marker="$("$py" -c 'import sys; print(sys.prefix)')/horovod-build-key"
if [ "$(cat "$marker" 2>/dev/null)" = "$key" ] && "$py" -c 'import horovod.torch' 2>/dev/null &&
   { [ -z "${HOROVOD_WHEEL_OUT:-}" ] || ls "$cache"/horovod-*.whl >/dev/null 2>&1; }; then
  echo "build_horovod: Horovod $HOROVOD_VERSION already installed (build $key)"
  leave_copy
  exit 0
fi

if ! ls "$cache"/horovod-*.whl >/dev/null 2>&1; then
  echo "build_horovod: compiling Horovod $HOROVOD_VERSION for torch $torch_version ($py_tag), ~5 min on 2 cores"
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  if [ -n "${HOROVOD_SDIST:-}" ]; then  # a machine without PyPI: the sdist brought along (docs/gpu-check.md)
    cp "$HOROVOD_SDIST" "$work/horovod-$HOROVOD_VERSION.tar.gz"
  else
    "$py" -m pip download --quiet --no-deps --no-binary :all: "horovod==$HOROVOD_VERSION" -d "$work"
  fi
  tar -xzf "$work/horovod-$HOROVOD_VERSION.tar.gz" -C "$work"
  patch -d "$work/horovod-$HOROVOD_VERSION" -p1 --quiet < "$patch_file"
  if [ "${HOROVOD_GPU_OPERATIONS:-}" = "NCCL" ] && [ -z "${HOROVOD_NCCL_HOME:-}" ]; then
    # pip's nvidia-nccl-cu13 is a namespace package: its directory is __path__ (__file__ is None). It ships
    # include/nccl.h and lib/libnccl.so.2 only; Horovod's CMake looks for lib/libnccl.so.
    nccl=$("$py" -c 'import nvidia.nccl; print(list(nvidia.nccl.__path__)[0])')
    if ! ln -sf libnccl.so.2 "$nccl/lib/libnccl.so" 2>/dev/null; then  # a read-only site-packages: link a copy
      mkdir -p "$work/nccl/lib" && ln -s "$nccl/include" "$work/nccl/include"
      ln -s "$nccl/lib/libnccl.so.2" "$work/nccl/lib/libnccl.so" && nccl="$work/nccl"
    fi
    export HOROVOD_NCCL_HOME="$nccl"
    echo "build_horovod: NCCL from $HOROVOD_NCCL_HOME, CUDA from $HOROVOD_CUDA_HOME"
  fi
  mkdir -p "$cache"
  "$py" -m pip wheel --no-deps --no-build-isolation --wheel-dir "$cache" "$work/horovod-$HOROVOD_VERSION"
else
  echo "build_horovod: using cached wheel $key"
fi
"$py" -m pip install --quiet --no-deps --force-reinstall "$cache"/horovod-*.whl
leave_copy
# Horovod's own runtime dependencies (install_requires of 0.28.1), installed normally (or found, offline with
# PIP_NO_INDEX=1).
"$py" -m pip install --quiet cloudpickle psutil pyyaml packaging
echo "$key" > "$marker"
