#!/usr/bin/env bash
# Train on one machine: N Horovod workers under horovodrun, one per GPU, or N CPU workers without a GPU.
#
#   scripts/run_local.sh 8 --data /datasets/imagenet --output runs/r50-1x8        # 8 GPUs
#   NP=2 scripts/run_local.sh --data demo-run/data --output runs/cpu --epochs 1    # N from NP
#   CONTROLLER=--mpi scripts/run_local.sh 2 --data ... --output ...              # MPI instead of Gloo
#
# Arguments after N are `hvd-imagenet train` flags (see `hvd-imagenet train --help`). The workers share the
# machine's cores: the trainer gives each cores / N threads. kn = N x --batch-size, and the lr follows it
# (linear scaling rule); pass --resume to continue a run in the same --output.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
if [[ "${1:-}" =~ ^[0-9]+$ ]]; then np=$1; shift; else np=${NP:-}; fi
if [ -z "$np" ]; then
  if command -v nvidia-smi >/dev/null; then np=$(nvidia-smi -L | wc -l); else np=2; fi
fi
venv="${VENV:-$root/.venv}"
[ -x "$venv/bin/horovodrun" ] || { echo "run_local: no Horovod in $venv; run make setup first" >&2; exit 2; }
export PATH="$venv/bin:$PATH"
echo "run_local: $np workers, horovodrun ${CONTROLLER:---gloo}"
exec horovodrun -np "$np" -H "localhost:$np" "${CONTROLLER:---gloo}" hvd-imagenet train "$@"
