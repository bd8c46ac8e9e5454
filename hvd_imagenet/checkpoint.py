"""Checkpoints: written by rank 0 atomically (temp file, fsync, rename), read with weights_only=True.

A checkpoint holds the unwrapped model, the optimizer state, the number of finished epochs, the global step
and the resolved config. Most are written at the end of an epoch (epoch-NNNN.pt); one written when a job is
told to stop (SLURM's SIGUSR1 before the time limit, train.StopRequest) also holds how far into the next epoch
it got (epoch-NNNN-step-SSSSSS.pt: NNNN epochs and SSSSSS steps done; `images_done` of the epoch's shuffle)
and that partial epoch's metric sums.
RNG state is not stored: the data order and the augmentation are functions of (seed, epoch, position), so a
resumed run reads exactly the images the uninterrupted one reads.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from .errors import UserError

_NAME = re.compile(r"^epoch-(\d{4})(?:-step-(\d{6}))?\.pt$")


def save(directory: Path, state: dict, keep: int) -> Path:
    """Write the checkpoint of state["epoch"] (+ state["step_in_epoch"]) so that a crash at any moment leaves
    the previous one loadable, then delete all but the newest `keep` (0: keep all)."""
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob(".epoch-*.pt.tmp"):  # left by a writer killed mid-write
        stale.unlink()
    step = state["step_in_epoch"]
    path = directory / (f"epoch-{state['epoch']:04d}" + (f"-step-{step:06d}" if step else "") + ".pt")
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
    for old in list_checkpoints(directory)[:-keep] if keep else ():
        old.unlink()
    return path


def list_checkpoints(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    found = {p: _NAME.match(p.name) for p in directory.iterdir()}
    return sorted((p for p, match in found.items() if match),
                  key=lambda p: tuple(int(n) for n in found[p].groups("0")))  # by (epoch, step)


def load_latest(directory: Path) -> tuple[Path, dict]:
    """The newest checkpoint in `directory`, loaded on the CPU without executing pickled code."""
    found = list_checkpoints(directory)
    if not found:
        raise UserError(f"--resume: no checkpoint in {directory}")
    path = found[-1]
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated, corrupt or foreign file: torch raises several kinds
        reason = load_failure(error)
        previous = f"; move it away to resume from {found[-2].name}" if len(found) > 1 else ""
        raise UserError(f"--resume: cannot load {path} ({reason}){previous}") from None
    missing = {"model", "optimizer", "epoch", "step", "step_in_epoch", "images_done", "config"} - set(state)
    if missing:
        raise UserError(f"--resume: {path} is not a checkpoint of this version of hvd-imagenet "
                        f"(missing {', '.join(sorted(missing))})")
    return path, state


def load_failure(error: Exception) -> str:
    """The line of torch.load's error that says what is wrong with the file."""
    text = str(error).strip()
    if text.startswith("Weights only load failed"):  # a paragraph about torch 2.6 first, then the reason
        lines = [line.strip() for line in text.splitlines()[1:]
                 if line.strip() and not line.startswith(("Please file", "Check the documentation"))]
        return f"torch.load(weights_only=True) refused it, running none of its code: {lines[0] if lines else text}"
    return text.splitlines()[0] if text else type(error).__name__
