"""Checkpoints: written by rank 0 atomically (temp file, fsync, rename), read with weights_only=True.

A checkpoint holds the unwrapped model, the optimizer state, the number of finished epochs, the global step
and the resolved config. RNG state is not stored because the trainer reseeds from (seed, epoch, rank) at the
start of every epoch (train.seed_epoch), which replays a resumed epoch exactly.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from .errors import UserError

KEEP_LAST = 3  # older checkpoints are deleted; a ResNet-50 checkpoint with momentum is ~200 MB
_NAME = re.compile(r"^epoch-(\d{4})\.pt$")


def checkpoint_dir(output: Path) -> Path:
    return output / "checkpoints"


def save(output: Path, epoch: int, state: dict) -> Path:
    """Write checkpoints/epoch-NNNN.pt so that a crash at any moment leaves the previous one loadable."""
    directory = checkpoint_dir(output)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"epoch-{epoch:04d}.pt"
    tmp = directory / f".{path.name}.tmp"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(directory, os.O_RDONLY)  # make the rename itself durable
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    for old in list_checkpoints(output)[:-KEEP_LAST]:
        old.unlink()
    return path


def list_checkpoints(output: Path) -> list[Path]:
    directory = checkpoint_dir(output)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if _NAME.match(p.name))


def load_latest(output: Path) -> tuple[Path, dict]:
    """The newest checkpoint in output/checkpoints, loaded on the CPU without executing pickled code."""
    found = list_checkpoints(output)
    if not found:
        raise UserError(f"--resume: no checkpoint in {checkpoint_dir(output)}")
    path = found[-1]
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated, corrupt or foreign file: torch raises several kinds
        raise UserError(f"--resume: cannot load {path}: {type(error).__name__}: {error}") from None
    missing = {"model", "optimizer", "epoch", "step", "config"} - set(state)
    if missing:
        raise UserError(f"--resume: {path} is not an hvd-imagenet checkpoint (missing {', '.join(sorted(missing))})")
    return path, state
