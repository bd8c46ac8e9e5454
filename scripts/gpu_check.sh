#!/usr/bin/env bash
# `make gpu-check`: does this GPU machine run hvd_imagenet, and how fast? Offline, step by step.
#
# For a bare machine with NVIDIA GPUs, Python 3.12 (or 3.11), a CUDA 13 build of torch with torchvision, nvcc,
# pip's NCCL (nvidia-nccl-cu13, which torch pulls in), CMake and no internet: a rented H100 box, say. What it
# cannot download comes as a bundle made on a machine with PyPI (`bundle`: DALI and its wheels, Horovod's sdist;
# ~270 MB in files of at most 60 MiB). docs/gpu-check.md says how to bring it in. Each step takes a few minutes
# on an H100-class machine, none more than 10:
#
#   scripts/gpu_check.sh bundle [DIR]  on a machine with PyPI: the bundle into DIR (default .gpu-check/)
#   scripts/gpu_check.sh setup         .gpu-venv over the system's packages: DALI from the bundle, Horovod 0.28.1
#                                      built with NCCL and our patch (scripts/build_horovod.sh), this package
#   scripts/gpu_check.sh test          pytest -m gpu (tests/test_gpu.py), its log kept with the results
#   scripts/gpu_check.sh bench         bench-train (synthetic ResNet-50: fp32, amp-bf16, amp-fp16 x NCHW, NHWC),
#                                      bench-loader --dali-device gpu, scaling-model from the measured step
#   scripts/gpu_check.sh all           setup, test, bench (what `make gpu-check` runs)
#
# Results: benchmarks/results/{bench-train,bench-loader,scaling-model-32x8}-<gpu>.json and gpu-check-<gpu>.log
# (GPU_CHECK_RESULTS elsewhere). Settings: GPU_CHECK_BUNDLE (.gpu-check), GPU_CHECK_VENV (.gpu-venv),
# GPU_CHECK_PYTHON (python3), GPU_CHECK_PY_VERSION (3.12, for `bundle`), GPU_CHECK_BATCH (256 images per GPU).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
source "$root/scripts/versions.env"
bundle=${GPU_CHECK_BUNDLE:-$root/.gpu-check}
venv=${GPU_CHECK_VENV:-$root/.gpu-venv}
results=${GPU_CHECK_RESULTS:-$root/benchmarks/results}
batch=${GPU_CHECK_BATCH:-256}
piece=60M  # a file of the bundle at most this large: a transfer of 64 MiB carries one and a checkout

say() { echo "gpu-check: $*"; }
fail() { echo "gpu-check: $*" >&2; exit 1; }

make_bundle() {  # on a machine with PyPI
  local dir=${1:-$bundle} version=${GPU_CHECK_PY_VERSION:-3.12}
  mkdir -p "$dir"
  say "DALI $DALI_VERSION and its wheels for CPython $version, Horovod $HOROVOD_VERSION's sdist, into $dir"
  python3 -m pip download --quiet --only-binary=:all: --python-version "$version" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$dir" "$DALI_PACKAGE==$DALI_VERSION"
  python3 -m pip download --quiet --no-deps --no-binary :all: -d "$dir" "horovod==$HOROVOD_VERSION"
  (cd "$dir" && sha256sum -- *.whl *.tar.gz > SHA256SUMS)
  for file in "$dir"/*.whl "$dir"/*.tar.gz; do  # large ones in pieces; setup joins them and checks SHA256SUMS
    if [ "$(stat -c %s "$file")" -gt $((60 * 1024 * 1024)) ]; then
      split -b "$piece" -d -a 2 "$file" "$file.part-" && rm "$file"
    fi
  done
  say "bring these files into $bundle on the GPU machine (MiB; each at most 60, any number per trip):"
  (cd "$dir" && stat -c '%s %n' -- * | awk '{ printf "%8.1f  %s\n", $1 / 1048576, $2 }')
}

gpu_slug() {  # "NVIDIA H100 80GB HBM3" -> h100-80gb-hbm3
  nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1 | tr '[:upper:]' '[:lower:]' |
    sed -e 's/nvidia//' -e 's/[^a-z0-9]\+/-/g' -e 's/^-//' -e 's/-$//'
}

setup() {
  command -v nvidia-smi >/dev/null || fail "no nvidia-smi: this is not a GPU machine with NVIDIA's driver"
  command -v cmake >/dev/null || fail "no cmake on the PATH (Horovod's build needs it; pip install cmake)"
  local py=${GPU_CHECK_PYTHON:-python3}
  "$py" -c 'import torch, torchvision; assert torch.cuda.is_available(), "torch sees no GPU"' ||
    fail "$py needs a CUDA build of torch and torchvision that sees the GPU"
  if [ ! -x "$venv/bin/python" ]; then
    # A venv of its own that sees every package of $py (torch, torchvision, ...): a .pth file adds $py's
    # site-packages, its own .pth files included (--system-site-packages alone reaches only the base Python's,
    # not those of a venv $py may be). What is installed here comes first.
    "$py" -m venv --system-site-packages "$venv"
    "$py" -c 'import sysconfig; print("import site; site.addsitedir(%r)" % sysconfig.get_paths()["purelib"])' > \
      "$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/gpu-check-base.pth"
  fi
  export PIP_NO_INDEX=1 PIP_FIND_LINKS="$bundle" PIP_DISABLE_PIP_VERSION_CHECK=1  # offline
  local whole name
  for first in "$bundle"/*.part-00; do  # each time again: more pieces may have come since
    [ -e "$first" ] || continue
    whole=${first%.part-00} name=${first##*/} name=${name%.part-00}
    cat "$whole".part-* > "$whole"
    if [ -f "$bundle/SHA256SUMS" ] && ! (cd "$bundle" && grep -F "  $name" SHA256SUMS |
                                                         sha256sum --check --quiet >/dev/null 2>&1); then
      say "$name: not all of its pieces are here yet ($(ls "$whole".part-* | wc -l)); left out for now"
      rm "$whole"
    fi
  done
  if [ -f "$bundle/SHA256SUMS" ]; then (cd "$bundle" && sha256sum --check --quiet --ignore-missing SHA256SUMS) ||
    fail "a file of $bundle does not match SHA256SUMS (cut short on the way?)"; fi
  if ! ls "$bundle"/nvidia_dali_*.whl >/dev/null 2>&1; then
    say "no DALI wheel in $bundle: its GPU tests will skip and bench-loader will not run"
  elif ! "$venv/bin/python" -m pip install --quiet "$DALI_PACKAGE==$DALI_VERSION"; then
    say "DALI needs wheels that are not in $bundle yet (above): left out for now, as if it had none"
  fi
  [ -f "$bundle/horovod-$HOROVOD_VERSION.tar.gz" ] || fail "no horovod-$HOROVOD_VERSION.tar.gz in $bundle (bundle)"
  local arch
  arch=$("$venv/bin/python" -c 'import torch; print(",".join(sorted({"%d%d" % torch.cuda.get_device_capability(i)
                                   for i in range(torch.cuda.device_count())})))')
  HOROVOD_SDIST="$bundle/horovod-$HOROVOD_VERSION.tar.gz" HOROVOD_GPU_OPERATIONS=NCCL \
    HOROVOD_BUILD_CUDA_CC_LIST="$arch" bash "$root/scripts/build_horovod.sh" "$venv/bin/python"
  local built
  built=$("$venv/bin/horovodrun" --check-build)
  grep -q "\[X\] NCCL" <<< "$built" || fail "Horovod was built without NCCL: $built"
  "$venv/bin/python" -m pip install --quiet --no-deps --no-build-isolation -e "$root"
  say "ready: $("$venv/bin/python" -c 'from hvd_imagenet import gpu; print(gpu.describe(gpu.rank_device(0)))')"
}

run_tests() {
  local log
  log="$results/gpu-check-$(gpu_slug).log"
  mkdir -p "$results"
  (cd "$root" && PATH="$venv/bin:$PATH" "$venv/bin/python" -m pytest -m gpu -v -s tests/test_gpu.py) 2>&1 |
    tee "$log"
}

bench() {
  local slug data cli=("$venv/bin/hvd-imagenet")
  slug=$(gpu_slug)
  mkdir -p "$results"
  export PATH="$venv/bin:$PATH"
  say "bench-train: ResNet-50, synthetic, n=$batch, 1 GPU, fp32 / amp-bf16 / amp-fp16 x NCHW / NHWC"
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
    say "bench-loader: 5,000 JPEGs of 200-500 px as files and as packed shards, DALI on the GPU against" \
        "torchvision DataLoader workers"
    "${cli[@]}" bench-loader --data "$data/images" --data "$data/shards" --loader dali,torchvision \
      --dali-device gpu --batch-size 128 --epochs 3 --repeats 3 --json > "$results/bench-loader-$slug.json"
    "$venv/bin/python" -c 'import json, sys; from hvd_imagenet.bench.loader import format_report
print(format_report(json.load(open(sys.argv[1]))))' "$results/bench-loader-$slug.json"
    rm -rf "$data"
  fi
  say "results in $results: $(cd "$results" && ls -- *"$slug"*)"
}

case "${1:-all}" in
  bundle) make_bundle "${2:-}" ;;
  setup) setup ;;
  test) run_tests ;;
  bench) bench ;;
  all) setup && run_tests && bench ;;
  *) fail "usage: scripts/gpu_check.sh [bundle [DIR]|setup|test|bench|all]" ;;
esac
