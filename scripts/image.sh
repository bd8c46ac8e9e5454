#!/usr/bin/env bash
# The container image: build docker/Dockerfile and check what it holds, with Docker where an engine runs, else
# with buildah (no daemon; as root). `make image` runs `build`; tests/test_image.py runs all three steps.
#
#   scripts/image.sh base [SUITE]  a Debian base image made here with mmdebstrap (bookworm by default), for a
#                                  machine that reaches Debian's archive but no container registry; the tarball is
#                                  cached, the image named localhost/hvd-imagenet-base:SUITE
#   scripts/image.sh build         docker/Dockerfile with BASE_IMAGE=$IMAGE_BASE (default: the Dockerfile's own,
#                                  ubuntu:24.04), tagged $IMAGE_TAG (hvd-imagenet:0.1.0)
#   scripts/image.sh check         in the image, as its own (non-root) user and with no GPU: horovodrun
#                                  --check-build lists NCCL, MPI and Gloo; DALI imports; a 2-rank training epoch
#                                  on a generated data set (horovodrun --gloo) ends with its metrics file
#
# Builds with buildah mount $IMAGE_CACHE (~/.cache/hvd_imagenet/image) as the build's /root/.cache, so pip's
# downloads and the compiled Horovod wheel are reused across builds, and this machine's pip configuration
# (/etc/pip.conf, /etc/xdg/pip, ~/.config/pip) with the local indexes it names, read-only: the RUN lines are the
# Dockerfile's own, only where pip finds its files differs.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
tag=${IMAGE_TAG:-hvd-imagenet:0.1.0}
cache=${IMAGE_CACHE:-${HVD_IMAGENET_CACHE:-$HOME/.cache/hvd_imagenet}/image}

say() { echo "image: $*"; }
fail() { echo "image: $*" >&2; exit 1; }
elapsed() { echo "$(( $(date +%s) - $1 )) s"; }

engine() {  # docker with a running daemon, else buildah
  if command -v docker >/dev/null && docker info >/dev/null 2>&1; then echo docker; return; fi
  command -v buildah >/dev/null ||
    fail "no Docker engine and no buildah: install one (Debian: apt-get install buildah mmdebstrap)"
  [ "$(id -u)" -eq 0 ] || fail "buildah builds as root here (--isolation chroot); run as root or use Docker"
  echo buildah
}

buildah() { command buildah --storage-driver "${BUILDAH_STORAGE_DRIVER:-overlay}" "$@"; }

make_base() {  # a Debian base from its archive, for a machine that reaches no registry
  local suite=${1:-bookworm} start
  start=$(date +%s)
  command -v mmdebstrap >/dev/null || fail "no mmdebstrap (Debian: apt-get install mmdebstrap)"
  mkdir -p "$cache"
  if [ ! -s "$cache/debian-$suite.tar" ]; then
    say "making a Debian $suite base with mmdebstrap (minbase)"
    # This machine's own certificate authorities go in (/usr/local/share/ca-certificates, as a site's base
    # image carries its proxy's CA): the image's ca-certificates then trusts what this machine trusts.
    mmdebstrap --quiet --variant=minbase \
      --customize-hook='copy-in /usr/local/share/ca-certificates /usr/local/share' \
      "$suite" "$cache/debian-$suite.partial.tar"
    mv "$cache/debian-$suite.partial.tar" "$cache/debian-$suite.tar"
  fi
  local ctr
  ctr=$(buildah from scratch)
  buildah add --quiet "$ctr" "$cache/debian-$suite.tar" / >/dev/null
  buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --cmd /bin/bash "$ctr"
  buildah commit --quiet --rm "$ctr" "localhost/hvd-imagenet-base:$suite" >/dev/null
  say "base localhost/hvd-imagenet-base:$suite ($(elapsed "$start"))"
}

pip_setup_mounts() {  # this machine's pip configuration files and the local directories they name, read-only
  local conf dir
  for conf in /etc/pip.conf /etc/xdg/pip "$HOME/.config/pip"; do
    [ -e "$conf" ] && echo "-v=$conf:${conf/#$HOME//root}:ro"
  done
  for dir in $(cat /etc/pip.conf /etc/xdg/pip/*.conf "$HOME"/.config/pip/*.conf 2>/dev/null |
               grep -oE '(file://)?/[^ ]+' | sed 's#^file://##'); do
    case $dir in /etc/*) continue ;; */simple) dir=${dir%/simple} ;; esac  # an index: its files lie beside
    if [ -d "$dir" ]; then echo "-v=$dir:$dir:ro"; fi
  done
}

build() {
  local base=${IMAGE_BASE:-} start
  start=$(date +%s)
  local args=(-f "$root/docker/Dockerfile" -t "$tag")
  [ -n "$base" ] && args+=(--build-arg "BASE_IMAGE=$base")
  say "building $tag from docker/Dockerfile, base ${base:-ubuntu:24.04, the Dockerfile default}"
  if [ "$(engine)" = docker ]; then
    docker build "${args[@]}" "$root"
  else
    mkdir -p "$cache/root-cache"
    # shellcheck disable=SC2046  # one word per mount
    # --format docker: the Dockerfile's SHELL (bash with pipefail) holds as under Docker; OCI images drop it.
    buildah bud --format docker --isolation chroot --layers=false -v "$cache/root-cache:/root/.cache" \
      $(pip_setup_mounts) "${args[@]}" "$root"
    buildah rmi --prune >/dev/null 2>&1 || true  # the image this tag named before, now untagged (7 GB)
  fi
  say "built $tag ($(elapsed "$start")), $(size)"
}

size() {  # as the engine lists it, e.g. "7.14 GB"
  if [ "$(engine)" = docker ]; then docker image ls --format '{{.Size}}' "$tag" | head -n 1
  else buildah images --format '{{.Size}}' "$tag" | head -n 1; fi
}

in_image() {  # a command in a fresh container of the image, as the image's user, no GPU
  if [ "$(engine)" = docker ]; then docker run --rm --entrypoint bash "$tag" -c "$1"; return; fi
  local ctr status=0
  ctr=$(buildah from --quiet "$tag")
  # A hostname that resolves: Docker and podman add the container's own to its /etc/hosts, buildah run does not,
  # and Gloo's rendezvous looks it up (before our patch to gloo, it crashed there instead of saying so).
  buildah run --isolation chroot --hostname localhost "$ctr" -- bash -c "$1" || status=$?
  buildah rm "$ctr" >/dev/null
  return "$status"
}

check() {
  local start
  start=$(date +%s)
  say "checking $tag: the user, horovodrun --check-build, DALI, a 2-rank CPU epoch"
  in_image '
    set -euo pipefail
    echo "user: $(id -un) uid=$(id -u)"
    horovodrun --check-build
    python -c "import nvidia.dali, torch; print(\"DALI\", nvidia.dali.__version__, \"torch\", torch.__version__)"
    cd "$(mktemp -d)"
    hvd-imagenet make-dataset --output data --classes 4 --train-per-class 16 --val-per-class 4
    horovodrun -np 2 -H localhost:2 --gloo hvd-imagenet train --data data --output run --arch resnet18 \
      --image-size 32 --val-resize 36 --batch-size 8 --epochs 1 --warmup-epochs 1 --lr-steps 1 --workers 1
    echo "metrics.jsonl:"; cat run/metrics.jsonl'
  say "checked $tag ($(elapsed "$start"))"
}

case "${1:-build}" in
  base) make_base "${2:-bookworm}" ;;
  build) build ;;
  check) check ;;
  *) fail "usage: scripts/image.sh [base [SUITE]|build|check]" ;;
esac
