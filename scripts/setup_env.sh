#!/usr/bin/env bash
# `make setup`: everything the package needs, on a fresh Debian/Ubuntu machine or again (idempotent).
# OpenMPI (and, as root, SLURM + munge for the tests) from apt when missing, a venv (.venv) with the pinned
# torch/torchvision, mpi4py, DALI, Horovod built for this machine (scripts/build_horovod.sh) and this package
# (editable, with test deps).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
source "$root/scripts/versions.env"
venv="${VENV:-$root/.venv}"
py="$venv/bin/python"

if ! command -v mpirun >/dev/null || ! command -v mpicc >/dev/null; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "setup: OpenMPI is missing; install openmpi-bin and libopenmpi-dev (needs root), then run make setup again" >&2
    exit 1
  fi
  echo "setup: installing OpenMPI (apt-get)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends openmpi-bin libopenmpi-dev >/dev/null
fi

# A real SLURM for the tests (tests/test_slurm.py starts its daemons itself; they skip without root).
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
  if [ "$(id -u)" -eq 0 ]; then
    echo "setup: installing SLURM and munge for the tests (apt-get)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client \
      munge >/dev/null
  else
    echo "setup: SLURM is not installed and this is not root: tests/test_slurm.py will skip" >&2
  fi
fi

# ip and tc (iproute2) for the shaped links of bench-allreduce/bench-train --link (their test skips without).
if { ! command -v ip >/dev/null || ! command -v tc >/dev/null; } && [ "$(id -u)" -eq 0 ]; then
  echo "setup: installing iproute2 for --link (apt-get)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends iproute2 >/dev/null
fi

# buildah and mmdebstrap to build the container image without a Docker engine (tests/test_image.py, make image).
if { ! command -v buildah >/dev/null || ! command -v mmdebstrap >/dev/null; } && [ "$(id -u)" -eq 0 ]; then
  echo "setup: installing buildah and mmdebstrap for the image test (apt-get)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends buildah mmdebstrap >/dev/null
fi

[ -x "$py" ] || { echo "setup: creating $venv"; python3 -m venv "$venv"; }
pip() { "$py" -m pip --disable-pip-version-check "$@"; }
pip install --quiet --upgrade pip setuptools wheel
echo "setup: torch $TORCH_VERSION, torchvision $TORCHVISION_VERSION, mpi4py, DALI (already installed ones are kept)"
pip install --quiet "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION" \
  "mpi4py==$MPI4PY_VERSION" "$DALI_PACKAGE==$DALI_VERSION" "cmake==$CMAKE_VERSION"
bash "$root/scripts/build_horovod.sh" "$py"
pip install --quiet -e "$root[dev]"
"$venv/bin/horovodrun" --check-build
echo "setup: done ($venv)"
