#!/usr/bin/env bash
# Does a GPU machine run hvd_imagenet, and how fast? Offline, for a short rental (docs/gpu-check.md).
#
# The machine: NVIDIA GPUs, Python 3.12 with a CUDA 13 build of torch and torchvision, nvcc, pip's NCCL and
# CMake, no Open MPI, no Horovod, no DALI, no internet (scripts/gpu-machine.env). What it lacks is made here, on
# a machine with PyPI, and carried in: a Horovod wheel compiled for its torch (a few MiB), optionally DALI.
#
# Here (with PyPI):
#   scripts/gpu_check.sh replica [DIR]  a copy of the GPU machine's Python software (default $cache/gpu-replica):
#                                       Python 3.12, torch 2.11.0, torchvision 0.26.0, ...; to build and rehearse
#   scripts/gpu_check.sh wheel          Horovod 0.28.1 with NCCL, without MPI, for that torch and compute
#                                       capability 9.0, into $GPU_CHECK_BUNDLE (.gpu-check/) with its record
#   scripts/gpu_check.sh bundle [DIR]   DALI and its wheels (~270 MB in pieces of 60 MiB) and Horovod's sdist
# There:
#   scripts/gpu_check.sh quick          the rental's one command, at most $GPU_CHECK_SECONDS (480): probe, the
#                                       package in a venv, ResNet-50 img/s without Horovod, Horovod from the wheel,
#                                       the same through Horovod, DALI if carried, pytest -m gpu. Each step under
#                                       its own timeout, each result in $GPU_CHECK_RESULTS the moment it exists
#   scripts/gpu_check.sh setup|test|bench|all   the long way, for a machine with time (`make gpu-check`: all)
#
# Results (GPU_CHECK_RESULTS, default benchmarks/results/gpu-check-<gpu>/): steps.tsv (each step: status,
# seconds, note), probe.txt, bench.jsonl (one bench-train report a line), horovod.txt, pytest-gpu.log,
# gpu-check.log (everything printed). Settings: GPU_CHECK_PYTHON (python3: the machine's, with torch),
# GPU_CHECK_BUNDLE (.gpu-check), GPU_CHECK_VENV (.gpu-venv), GPU_CHECK_BATCH (256 images), GPU_CHECK_SECONDS.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
source "$root/scripts/versions.env"
source "$root/scripts/gpu-machine.env"
bundle=${GPU_CHECK_BUNDLE:-$root/.gpu-check}
venv=${GPU_CHECK_VENV:-$root/.gpu-venv}
py=${GPU_CHECK_PYTHON:-python3}
batch=${GPU_CHECK_BATCH:-256}
cache=${HVD_IMAGENET_CACHE:-$HOME/.cache/hvd_imagenet}
piece=60M  # a file of the bundle at most this large: a transfer of 64 MiB carries one and a checkout
SKIPPED=77  # a step's exit status when it does not apply here; its last line says why

say() { echo "gpu-check: $*"; }
fail() { echo "gpu-check: $*" >&2; exit 1; }
skip() { echo "$*"; exit "$SKIPPED"; }

has_cuda() { "$venv/bin/python" -c 'import torch, sys; sys.exit(not torch.cuda.is_available())' 2>/dev/null; }

gpu_slug() {  # "NVIDIA H100 80GB HBM3" -> h100-80gb-hbm3; "cpu" without a GPU
  { nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null || echo cpu; } | head -n 1 |
    tr '[:upper:]' '[:lower:]' | sed -e 's/nvidia//' -e 's/[^a-z0-9]\+/-/g' -e 's/^-//' -e 's/-$//'
}
results=${GPU_CHECK_RESULTS:-$root/benchmarks/results/gpu-check-$(gpu_slug)}

venv_over() {  # venv_over PYTHON DIR: a venv that sees every package of PYTHON; what is installed in it comes first
  [ -x "$2/bin/python" ] && return 0
  # --system-site-packages alone reaches only the base Python's packages, not those of a venv PYTHON may be
  # (the GPU machine's python3 is /opt/torch/.venv's): a .pth file adds PYTHON's site-packages, .pth files included.
  "$1" -m venv --system-site-packages "$2"
  "$1" -c 'import sysconfig; print("import site; site.addsitedir(%r)" % sysconfig.get_paths()["purelib"])' > \
    "$("$2/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/gpu-check-base.pth"
}

# ---- here, with PyPI ---------------------------------------------------------------------------------------------

make_replica() {  # the GPU machine's Python packages (no Horovod, DALI or Open MPI), to build for it and rehearse
  local dir=${1:-$cache/gpu-replica} python
  python=$(ls "$HOME"/.pyenv/versions/"$GPU_MACHINE_PYTHON".*/bin/python3 2>/dev/null | tail -n 1 ||
           command -v "python$GPU_MACHINE_PYTHON" || true)
  [ -x "$python" ] ||
    fail "no Python $GPU_MACHINE_PYTHON here (pyenv install $GPU_MACHINE_PYTHON; or python$GPU_MACHINE_PYTHON on PATH)"
  if cmp -s "$root/scripts/gpu-machine.env" "$dir/gpu-machine.env"; then
    say "replica $dir already there"; return 0
  fi
  say "replica of the GPU machine's software in $dir: Python $GPU_MACHINE_PYTHON, torch $GPU_MACHINE_TORCH (~3 GB)"
  [ -x "$dir/bin/python" ] || "$python" -m venv "$dir"
  # shellcheck disable=SC2086  # the package list is words
  "$dir/bin/python" -m pip install --quiet --disable-pip-version-check "torch==$GPU_MACHINE_TORCH" \
    "torchvision==$GPU_MACHINE_TORCHVISION" $GPU_MACHINE_PACKAGES
  cp "$root/scripts/gpu-machine.env" "$dir/gpu-machine.env"  # what it was made from
  say "replica ready: $("$dir/bin/python" -c 'import sys, torch; print("Python", sys.version.split()[0], "torch",
                                                                   torch.__version__)')"
}

build_wheel() {  # Horovod for the GPU machine: its torch and Python, NCCL, compute capability 9.0, no MPI
  local base=${GPU_CHECK_BUILD_PYTHON:-$cache/gpu-replica/bin/python} build=$cache/gpu-wheel-build cuda record
  [ -x "$base" ] ||
    fail "no $base: make the replica first (scripts/gpu_check.sh replica), or set GPU_CHECK_BUILD_PYTHON"
  venv_over "$base" "$build"  # Horovod gets installed there, not into the replica, which stays as the machine is
  cuda="$cache/cuda-$CUDA_NVCC_VERSION"
  [ -x "$cuda/bin/nvcc" ] || bash "$root/scripts/cuda_toolkit_from_pip.sh" "$cuda" "$base"
  rm -f "$bundle"/horovod-"$HOROVOD_VERSION"-*.whl
  HOROVOD_WITHOUT_MPI=1 HOROVOD_GPU_OPERATIONS=NCCL CUDA_HOME="$cuda" HOROVOD_BUILD_CUDA_CC_LIST="$GPU_MACHINE_CC" \
    HOROVOD_WHEEL_OUT="$bundle" HVD_IMAGENET_CACHE="$cache" bash "$root/scripts/build_horovod.sh" "$build/bin/python"
  record="$bundle/horovod-wheel.env"
  "$build/bin/python" - > "$record" <<EOF
import sys, torch
print(f"TORCH={torch.__version__}\nPY_TAG=cp{sys.version_info[0]}{sys.version_info[1]}")
print("CUDA_CC=$GPU_MACHINE_CC\nNCCL=%s" % ".".join(map(str, torch.cuda.nccl.version())))
EOF
  say "wheel for the GPU machine in $bundle:"
  (cd "$bundle" && stat -c '%s %n' -- horovod-*.whl horovod-wheel.env |
                     awk '{ printf "%8.2f MiB  %s\n", $1 / 1048576, $2 }')
  sed 's/^/  /' "$record"
}

make_bundle() {  # DALI with its wheels, and Horovod's sdist (for a machine whose torch the wheel does not fit)
  local dir=${1:-$bundle} version=$GPU_MACHINE_PYTHON
  mkdir -p "$dir"
  say "DALI $DALI_VERSION and its wheels for CPython $version, Horovod $HOROVOD_VERSION's sdist, into $dir"
  python3 -m pip download --quiet --only-binary=:all: --python-version "$version" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$dir" "$DALI_PACKAGE==$DALI_VERSION"
  python3 -m pip download --quiet --no-deps --no-binary :all: -d "$dir" "horovod==$HOROVOD_VERSION"
  (cd "$dir" && sha256sum -- *.whl *.tar.gz > SHA256SUMS)
  for file in "$dir"/*.whl "$dir"/*.tar.gz; do  # large ones in pieces; `dali` joins them and checks SHA256SUMS
    if [ "$(stat -c %s "$file")" -gt $((60 * 1024 * 1024)) ]; then
      split -b "$piece" -d -a 2 "$file" "$file.part-" && rm "$file"
    fi
  done
  say "bring these files into $bundle on the GPU machine (MiB; each at most 60, any number per trip):"
  (cd "$dir" && stat -c '%s %n' -- * | awk '{ printf "%8.1f  %s\n", $1 / 1048576, $2 }')
}

# ---- there: the steps (each also a subcommand) ------------------------------------------------------------------

probe() {  # what the machine has, in ~10 s
  {
    echo "date: $(date -u +%FT%TZ)  host: $(uname -srm)  cores: $(nproc)"
    nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv,noheader 2>&1 ||
      echo "no nvidia-smi"
    "$py" - <<'EOF'
import importlib, sys, sysconfig, os
print("python:", sys.executable, sys.version.split()[0], "headers:",
      os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))
import torch
cuda = torch.cuda.is_available()
print("torch:", torch.__version__, "cuda:", torch.version.cuda, "cudnn:", torch.backends.cudnn.version(),
      "nccl:", ".".join(map(str, torch.cuda.nccl.version())) if torch.version.cuda else None, "gpu:",
      torch.cuda.get_device_name(0) if cuda else f"none (torch.cuda.is_available() is False)")
for name in ("torchvision", "numpy", "PIL", "scipy", "tensorboard", "tqdm", "yaml", "psutil", "cloudpickle",
             "pytest", "mpi4py", "nvidia.nccl", "horovod", "nvidia.dali"):
    try:
        module = importlib.import_module(name)
        print(f"  import {name}: {getattr(module, '__version__', 'ok')}")
    except Exception as error:
        print(f"  import {name}: no ({type(error).__name__})")
EOF
    for tool in cmake gcc g++ nvcc mpicc; do
      printf '%s: %s\n' "$tool" "$({ command -v "$tool" >/dev/null &&
                                     "$tool" --version 2>&1 | grep -m1 -iE 'version|release|[0-9]+\.[0-9]+'; } ||
                                   echo none)"
    done
    echo "disk free: $(df -h --output=avail "$root" | tail -n 1 | tr -d ' ')"
  } | tee "$results/probe.txt"
}

package_venv() {  # the package in .gpu-venv over the machine's packages, offline
  venv_over "$py" "$venv"
  # Not editable: setuptools' `develop` (what -e runs without a pyproject.toml) installs build dependencies
  # with pip in an isolated environment, which needs an index (seen in the rehearsal: "No matching distribution
  # found for setuptools>=40.8.0").
  PIP_NO_INDEX=1 "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps \
    --no-build-isolation --force-reinstall "$root"
  "$venv/bin/hvd-imagenet" --help >/dev/null
  echo "hvd_imagenet installed in $venv over $("$py" -c 'import sys; print(sys.prefix)')"
}

bench_cases() {  # bench_cases BACKEND: ResNet-50 on synthetic data, one GPU, fp32 NCHW / amp-bf16 / amp-fp16 NHWC
  has_cuda || skip "no CUDA device here (torch.cuda.is_available() is False): nothing to time"
  local case precision layout failed=0
  for case in fp32:nchw amp-bf16:nhwc amp-fp16:nhwc; do  # each case's report appended as soon as it is measured
    precision=${case%:*} layout=${case#*:}
    PATH="$venv/bin:$PATH" "$venv/bin/hvd-imagenet" bench-train --backend "$1" --np 1 --arch resnet50 \
      --batch-size "$batch" --precision "$precision" --layout "$layout" --steps 40 --warmup 15 --repeats 1 \
      --count-syncs 3 --json | "$venv/bin/python" -c 'import json, sys
report = json.load(sys.stdin)
row, run = report["rows"][0], report["runs"][0]
print(json.dumps(report), file=open(sys.argv[1], "a"))
print("%s %s %s: %.0f img/s (%.1f ms per step of %d images)" % (row["backend"], row["precision"], row["layout"],
      row["images_per_sec_per_worker"], 1000 * row["step_seconds"], run["batch_size"]))' \
      "$results/bench.jsonl" || { echo "$1 $precision $layout: failed (above)"; failed=1; }
  done
  return "$failed"
}

install_horovod() {  # the prebuilt wheel if it was built for this torch and Python, else from the sdist
  local record="$bundle/horovod-wheel.env" torch_here tag built
  torch_here=$("$venv/bin/python" -c 'import torch; print(torch.__version__)')
  tag=$("$venv/bin/python" -c 'import sys; print("cp%d%d" % sys.version_info[:2])')
  if [ -f "$record" ] && grep -qx "TORCH=$torch_here" "$record" && grep -qx "PY_TAG=$tag" "$record"; then
    echo "Horovod from the prebuilt wheel ($(tr '\n' ' ' < "$record"))"
    PIP_NO_INDEX=1 "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps \
      --force-reinstall "$bundle"/horovod-"$HOROVOD_VERSION"-"$tag"-*.whl
  else
    [ -f "$bundle/horovod-$HOROVOD_VERSION.tar.gz" ] ||
      fail "no Horovod wheel for torch $torch_here ($tag) in $bundle ($(tr '\n' ' ' < "$record" 2>/dev/null ||
             echo none)), and no sdist to compile: scripts/gpu_check.sh wheel (or bundle) on a machine with PyPI"
    echo "no wheel for torch $torch_here ($tag): compiling Horovod from the sdist (3-6 min on 16 cores)"
    local arch
    arch=$("$venv/bin/python" -c 'import torch; print(",".join(sorted({"%d%d" % torch.cuda.get_device_capability(i)
                                   for i in range(torch.cuda.device_count())})) or "'"$GPU_MACHINE_CC"'")')
    PIP_NO_INDEX=1 HOROVOD_SDIST="$bundle/horovod-$HOROVOD_VERSION.tar.gz" HOROVOD_GPU_OPERATIONS=NCCL \
      HOROVOD_BUILD_CUDA_CC_LIST="$arch" bash "$root/scripts/build_horovod.sh" "$venv/bin/python"
  fi
  built=$("$venv/bin/horovodrun" --check-build)
  echo "$built"
  grep -q "\[X\] NCCL" <<< "$built" || fail "Horovod has no NCCL operations"
}

dali() {  # DALI from the bundle's wheels, if they were carried (its pieces joined and checked)
  local first whole name
  ls "$bundle"/nvidia_dali_*.whl* >/dev/null 2>&1 ||
    skip "DALI's wheels were not carried (scripts/gpu_check.sh bundle: ~270 MB, 5 trips): its tests skip"
  for first in "$bundle"/*.part-00; do
    [ -e "$first" ] || continue
    whole=${first%.part-00} name=${first##*/} name=${name%.part-00}
    cat "$whole".part-* > "$whole"
    if ! (cd "$bundle" && grep -F "  $name" SHA256SUMS | sha256sum --check --quiet >/dev/null 2>&1); then
      rm "$whole"
      skip "$name: not all of its pieces are here ($(ls "$whole".part-* | wc -l)): DALI left out"
    fi
  done
  PIP_NO_INDEX=1 PIP_FIND_LINKS="$bundle" "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
    "$DALI_PACKAGE==$DALI_VERSION" || skip "DALI needs wheels that were not carried (above): left out"
  "$venv/bin/python" -c 'import nvidia.dali; print("DALI", nvidia.dali.__version__)'
}

gpu_tests() {  # pytest -m gpu, its log kept
  (cd "$root" && PATH="$venv/bin:$PATH" "$venv/bin/python" -m pytest -m gpu -v -rs -p no:cacheprovider \
     tests/test_gpu.py) 2>&1 | tee "$results/pytest-gpu.log"
}

quick() {  # the rental's one command: every step under its own timeout, within GPU_CHECK_SECONDS in all
  local total=${GPU_CHECK_SECONDS:-480} start
  start=$(date +%s)
  mkdir -p "$results"
  printf 'step\tstatus\tseconds\tnote\n' > "$results/steps.tsv"
  say "quick check, at most ${total}s; results in $results"
  run_step probe 30 probe
  run_step venv 60 venv
  run_step bench-torch 150 bench-torch
  run_step horovod 60 horovod
  run_step bench-horovod 150 bench-horovod
  run_step dali 60 dali
  run_step pytest-gpu 150 pytest-gpu
  say "done in $(( $(date +%s) - start ))s:"
  column -t -s $'\t' "$results/steps.tsv" 2>/dev/null || cat "$results/steps.tsv"
  ! grep -qP '\t(failed|timeout)\t' "$results/steps.tsv"
}

run_step() {  # run_step NAME CAP SUBCOMMAND: this script's SUBCOMMAND under `timeout`, recorded in steps.tsv
  local name=$1 cap=$2 left begin status output note
  left=$(( start + total - $(date +%s) - 5 ))
  if (( left < 10 )); then
    printf '%s\tskipped\t0\tno time left of the %ss\n' "$name" "$total" >> "$results/steps.tsv"; return 0
  fi
  (( cap < left )) || cap=$left
  say "step $name (at most ${cap}s)"
  output=$(mktemp)
  begin=$(date +%s)
  set +e
  GPU_CHECK_RESULTS="$results" timeout --kill-after=10 "$cap" bash "$0" "$3" 2>&1 |
    tee -a "$results/gpu-check.log" "$output"
  status=${PIPESTATUS[0]}
  set -e
  note=$(grep -v '^\s*$' "$output" | tail -n 1 | tr '\t' ' ' | cut -c1-200)
  case $status in
    0) status=ok ;; "$SKIPPED") status=skipped ;; 124|137) status=timeout note="after ${cap}s" ;; *) status=failed ;;
  esac
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$(( $(date +%s) - begin ))" "$note" >> "$results/steps.tsv"
  rm -f "$output"
}

# ---- the long way: setup, test, bench -------------------------------------------------------------------------

bench() {  # every precision x layout, the scaling model from the fastest, DALI against torchvision, the boundary
  local slug data cli=("$venv/bin/hvd-imagenet")
  slug=$(gpu_slug)
  mkdir -p "$results"
  export PATH="$venv/bin:$PATH"
  "${cli[@]}" bench-train --backend horovod --np 1 --arch resnet50 --batch-size "$batch" \
    --precision fp32,amp-bf16,amp-fp16 --layout nchw,nhwc --steps 30 --warmup 10 --repeats 1 --count-syncs 5 \
    --json > "$results/bench-train-$slug.json"
  "$venv/bin/python" -c 'import json, sys; from hvd_imagenet.bench.train import format_report
print(format_report(json.load(open(sys.argv[1]))))' "$results/bench-train-$slug.json"
  "${cli[@]}" scaling-model --from-bench "$results/bench-train-$slug.json" --nodes 1,2,4,8,16,32 --json \
    > "$results/scaling-model-32x8-$slug.json"
  if "$venv/bin/python" -c 'import nvidia.dali' 2>/dev/null; then
    data=$(mktemp -d)
    "${cli[@]}" make-dataset --output "$data/images" --classes 50 --train-per-class 100 --val-per-class 2
    "${cli[@]}" pack --data "$data/images" --output "$data/shards"
    "${cli[@]}" bench-loader --data "$data/images" --data "$data/shards" --loader dali,torchvision \
      --dali-device gpu --batch-size 128 --epochs 3 --repeats 3 --json > "$results/bench-loader-$slug.json"
    "$venv/bin/python" -c 'import json, sys; from hvd_imagenet.bench.loader import format_report
print(format_report(json.load(open(sys.argv[1]))))' "$results/bench-loader-$slug.json"
    "${cli[@]}" bench-epoch --data "$data/images" --batch-size 128 --image-size 224 --val-resize 256 --repeats 3 \
      --json > "$results/bench-epoch-$slug.json"  # the epoch boundary: pipeline start, host copy of a checkpoint
    "$venv/bin/python" -c 'import json, sys; from hvd_imagenet.bench.epoch import format_report
print(format_report(json.load(open(sys.argv[1]))))' "$results/bench-epoch-$slug.json"
    rm -rf "$data"
  fi
  say "results in $results"
}

setup() {
  command -v nvidia-smi >/dev/null || fail "no nvidia-smi: this is not a GPU machine with NVIDIA's driver"
  "$py" -c 'import torch; assert torch.cuda.is_available(), "torch sees no GPU"' || fail "$py: torch sees no GPU"
  mkdir -p "$results"
  package_venv
  (dali) || true  # a subshell: its skip ends only itself
  install_horovod
  say "ready: $("$venv/bin/python" -c 'from hvd_imagenet import gpu; print(gpu.describe(gpu.rank_device(0)))')"
}

case "${1:-quick}" in  # the steps of quick write into $results
  probe|venv|bench-torch|horovod|bench-horovod|dali|pytest-gpu|test) mkdir -p "$results" ;;
esac
case "${1:-quick}" in
  replica) make_replica "${2:-}" ;;
  wheel) build_wheel ;;
  bundle) make_bundle "${2:-}" ;;
  quick) quick ;;
  probe) probe ;;
  venv) package_venv ;;
  bench-torch) bench_cases none ;;
  horovod) install_horovod | tee "$results/horovod.txt" ;;
  bench-horovod)
    "$venv/bin/python" -c 'import horovod.torch' 2>/dev/null || skip "Horovod is not installed (step horovod)"
    bench_cases horovod ;;
  dali) dali ;;
  pytest-gpu) gpu_tests ;;
  setup) setup ;;
  test) gpu_tests ;;
  bench) bench ;;
  all) setup; gpu_tests || true; bench ;;  # a failing GPU test still leaves the benchmarks
  *) fail "usage: scripts/gpu_check.sh [replica [DIR]|wheel|bundle [DIR]|quick|setup|test|bench|all]" ;;
esac
