# The README's two commands: `make demo` and `make test`. Both run `make setup` first (idempotent).
# `make gpu-check`: on a GPU machine, its own set-up, the GPU tests and benchmarks (docs/gpu-check.md).
# `make image`: the container image from docker/Dockerfile (docker/README.md).
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
DEMO ?= demo-run

.PHONY: setup demo test test-fast lint gpu-check gpu-quick image image-check clean
setup: $(VENV)/.setup-done

$(VENV)/.setup-done: setup.py scripts/setup_env.sh scripts/build_horovod.sh scripts/versions.env scripts/*.patch
	VENV=$(abspath $(VENV)) bash scripts/setup_env.sh
	touch $@

# A small generated data set, then ResNet-50 trained with the paper's recipe by 2 Horovod workers (Gloo) on
# the CPU, at 64 px, in a few minutes on 2 cores (epochs of ~25 s here). The recipe at toy scale: eta = 0.025
# for a reference minibatch of 16, linear scaling to kn = 2 x 32 = 64 (lr 0.1), gradual warmup over epoch 1,
# x0.1 after epoch 3.
# Rank 0 prints a status line every 10 s (horovodrun's pipe is no terminal), the per-epoch table at the end;
# the run lands in $(DEMO)/run.
demo: setup
	rm -rf $(DEMO)
	$(BIN)/hvd-imagenet make-dataset --output $(DEMO)/data --classes 10 --train-per-class 100 --val-per-class 20
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/horovodrun -np 2 -H localhost:2 --gloo \
	  hvd-imagenet train --data $(DEMO)/data --output $(DEMO)/run --arch resnet50 \
	  --image-size 64 --val-resize 73 --epochs 4 --warmup-epochs 1 --lr-steps 3 --batch-size 32 \
	  --base-lr 0.025 --ref-batch 16 --status-every 10

test: setup
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/python -m pytest tests

# The unit tier alone (no subprocess, no Horovod, no SLURM; tests/conftest.py sorts the tiers): under 3 minutes here.
test-fast: setup
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/python -m pytest tests -m unit

# ruff's lint and its formatter, as .ci/run checks them (ruff.toml).
lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# On a GPU machine, offline, with what `scripts/gpu_check.sh wheel` (and `bundle`) made in .gpu-check/.
# gpu-quick: the short rental's one command (at most 8 min; docs/gpu-check.md); gpu-check: the long way.
gpu-quick:
	bash scripts/gpu_check.sh quick

gpu-check:
	bash scripts/gpu_check.sh all

# With a Docker engine, `docker build`; without one, buildah (as root). IMAGE_BASE picks the base image (default
# ubuntu:24.04); `bash scripts/image.sh base` makes a Debian one from Debian's archive where no registry is
# reachable: make image IMAGE_BASE=localhost/hvd-imagenet-base:bookworm. image-check runs it (no GPU needed).
image:
	IMAGE_BASE="$(IMAGE_BASE)" bash scripts/image.sh build

image-check:
	bash scripts/image.sh check

clean:
	rm -rf $(DEMO) .pytest_cache
