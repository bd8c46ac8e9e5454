"""Checkpoints: one format (`Checkpoint`), written atomically (temp file, fsync, rename), read with
weights_only=True, checked on resume (`check_resize`).

Most are written at the end of an epoch (epoch-NNNN.pt); one written when a job is told to stop (SLURM's
SIGUSR1 before the time limit, stop.StopRequest) also holds how far into the next epoch it got
(epoch-NNNN-step-SSSSSS.pt: NNNN epochs and SSSSSS steps done; `images_done` of the epoch's shuffle) and that
partial epoch's metric sums. Rank 0 writes the file. State that differs between ranks (PowerSGD's error
memory) goes into one file per rank beside it (epoch-NNNN.rankRRRRR.pt), each written by its rank before rank
0 writes the main file, so a main file means a complete checkpoint.
RNG state is not stored: the data order and the augmentation are functions of (seed, epoch, position), so a
resumed run reads exactly the images the uninterrupted one reads.

Rank 0 writes the main file in the background (AsyncWriter): the step loop waits only for a copy of the state
in host memory; the file is written while training goes on, and the next checkpoint waits for it.
"""

from __future__ import annotations

import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import UserError

_NAME = re.compile(r"^epoch-(\d{4})(?:-step-(\d{6}))?\.pt$")


@dataclass
class Progress:
    """How far training is: `epoch` epochs done and the first `images_done` images of the next epoch's
    shuffle read, with that partial epoch's metric sums (all ranks'), seconds and skipped steps. An elastic
    job keeps the same fields in Horovod's state, whose commit() saves a copy to roll back to; here there is
    nothing to roll back to."""

    epoch: int = 0
    images_done: int = 0
    sums: tuple[float, ...] | None = None
    seconds: float = 0.0
    skipped: int = 0

    def commit(self) -> None:
        pass


@dataclass
class Checkpoint:
    """What a checkpoint holds. On disk a dict with these keys (`progress` spread as epoch, images_done and
    partial), so other tools read it with a plain torch.load."""

    progress: Progress
    step: int  # optimizer steps done in the whole run
    step_in_epoch: int  # of them, in the partial epoch (0 at an epoch's end)
    model: dict  # the unwrapped model's state_dict
    optimizer: dict
    scaler: dict  # GradScaler's (amp-fp16), else {}
    config: dict  # the resolved config of the run that wrote it (world.World.resolved_config)
    compressor: dict = field(default_factory=dict)  # {"name": "powersgd", "ranks": k}: per-rank files beside it

    def to_state(self) -> dict:
        p = self.progress
        return {
            "model": self.model,
            "optimizer": self.optimizer,
            "scaler": self.scaler,
            "epoch": p.epoch,
            "step": self.step,
            "step_in_epoch": self.step_in_epoch,
            "images_done": p.images_done,
            "partial": {"sums": p.sums, "seconds": p.seconds, "skipped": p.skipped},
            "config": self.config,
            "compressor": self.compressor,
        }

    @classmethod
    def from_state(cls, state: dict) -> Checkpoint:
        partial = state["partial"] or {"sums": None, "seconds": 0.0, "skipped": 0}
        progress = Progress(
            state["epoch"],
            state["images_done"],
            partial["sums"] and tuple(partial["sums"]),
            partial["seconds"],
            partial["skipped"],
        )
        return cls(
            progress,
            state["step"],
            state["step_in_epoch"],
            state["model"],
            state["optimizer"],
            state.get("scaler") or {},
            state["config"],
            state.get("compressor") or {},
        )


REQUIRED_KEYS = {"model", "optimizer", "epoch", "step", "step_in_epoch", "images_done", "config"}


def path_for(directory: Path, epoch: int, step_in_epoch: int) -> Path:
    return directory / (f"epoch-{epoch:04d}" + (f"-step-{step_in_epoch:06d}" if step_in_epoch else "") + ".pt")


def rank_file(path: Path, rank: int) -> Path:
    """Where one rank's own state of the checkpoint `path` goes."""
    return path.with_name(f"{path.stem}.rank{rank:05d}.pt")


def write_atomic(path: Path, state: dict) -> None:
    """A crash at any moment leaves either the old file or the new one, never a partial one under `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)  # make the rename itself durable
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save(directory: Path, state: dict, keep: int) -> Path:
    """Write the checkpoint of state["epoch"] (+ state["step_in_epoch"]) so that a crash at any moment leaves
    the previous one loadable, then delete all but the newest `keep` (0: keep all), rank files included."""
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob(".epoch-*.pt.tmp"):  # left by a writer killed mid-write
        stale.unlink()
    path = path_for(directory, state["epoch"], state["step_in_epoch"])
    write_atomic(path, state)
    for old in list_checkpoints(directory)[:-keep] if keep else ():
        for rank_state in directory.glob(f"{old.stem}.rank*.pt"):
            rank_state.unlink()
        old.unlink()
    return path


class HostCopy:
    """Copies of a state's tensors (nested dicts, lists, tuples) in host memory, the buffers kept from one
    checkpoint to the next. On a GPU they are pinned, so the copies run without staging and the one wait at
    the end is for all of them. A CPU tensor is copied too: the live one changes with the next step."""

    def __init__(self):
        self.buffers: list[torch.Tensor] = []

    def __call__(self, state):
        self.used = 0
        copied = self._copy(state)
        if any(buffer.is_pinned() for buffer in self.buffers[: self.used]):
            torch.cuda.synchronize()  # host sync, at a checkpoint only: the copies are in host memory
        return copied

    def _copy(self, value):
        if isinstance(value, torch.Tensor):
            return self._buffer(value).copy_(value.detach(), non_blocking=value.is_cuda)
        if isinstance(value, dict):
            return {key: self._copy(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(self._copy(item) for item in value)
        return value

    def _buffer(self, tensor: torch.Tensor) -> torch.Tensor:
        """The next buffer in the order of the state's tensors, made (or remade) when its shape, strides (a
        channels_last weight stays channels_last in the file) or dtype differ."""
        index, self.used = self.used, self.used + 1
        if index < len(self.buffers):
            buffer = self.buffers[index]
            if (buffer.shape, buffer.stride(), buffer.dtype, buffer.is_pinned()) == (
                tensor.shape,
                tensor.stride(),
                tensor.dtype,
                tensor.is_cuda,
            ):
                return buffer
        buffer = torch.empty_strided(tensor.shape, tensor.stride(), dtype=tensor.dtype, pin_memory=tensor.is_cuda)
        self.buffers[index : index + 1] = [buffer]
        return buffer


class AsyncWriter:
    """save() in a background thread. submit() waits for the write in flight, copies the state to host memory
    (HostCopy: what the step loop waits for) and starts writing it; wait() waits for the write, and raises
    its error if it failed. The atomicity is save()'s: a kill at any moment leaves the previous checkpoint
    loadable. A write that hangs is caught by the next submit() or wait(): the trainer's watchdog counts
    them as the checkpoint phase."""

    def __init__(self, directory: Path, keep: int, on_written=None):
        self.directory, self.keep, self.on_written = directory, keep, on_written
        self.copy = HostCopy()
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def submit(self, state: dict) -> Path:
        self.wait()
        snapshot = self.copy(state)
        path = path_for(self.directory, snapshot["epoch"], snapshot["step_in_epoch"])
        self.thread = threading.Thread(target=self._write, args=(snapshot, path), name="checkpoint-writer", daemon=True)
        self.thread.start()
        return path

    def _write(self, snapshot: dict, path: Path) -> None:
        try:
            save(self.directory, snapshot, self.keep)
            if self.on_written:
                self.on_written(path)
        except BaseException as error:  # raised in the trainer's thread by the next wait()
            self.error = error

    def wait(self) -> None:
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        if self.error is not None:
            error, self.error = self.error, None
            raise UserError(f"writing a checkpoint in {self.directory} failed: {error}") from error


def list_checkpoints(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    found = {p: _NAME.match(p.name) for p in directory.iterdir()}
    return sorted(
        (p for p, match in found.items() if match), key=lambda p: tuple(int(n) for n in found[p].groups("0"))
    )  # by (epoch, step)


def load_latest(directory: Path) -> tuple[Path, dict]:
    """The newest checkpoint in `directory`, loaded on the CPU without executing pickled code."""
    found = list_checkpoints(directory)
    if not found:
        raise UserError(f"--resume: no checkpoint in {directory}")
    path = found[-1]
    state = _load(path, f"; move it away to resume from {found[-2].name}" if len(found) > 1 else "")
    missing = REQUIRED_KEYS - set(state)
    if missing:
        raise UserError(
            f"--resume: {path} is not a checkpoint of this version of hvd-imagenet "
            f"(missing {', '.join(sorted(missing))})"
        )
    return path, state


def load(directory: Path) -> tuple[Path, Checkpoint]:
    path, state = load_latest(directory)
    return path, Checkpoint.from_state(state)


def load_rank_file(path: Path, rank: int) -> dict:
    """This rank's own state of checkpoint `path` (every rank reads its own)."""
    own = rank_file(path, rank)
    if not own.exists():
        raise UserError(
            f"--resume: {own} is missing: {path} was written with per-rank state (PowerSGD's error "
            "memory) and each rank's file must sit beside it"
        )
    return _load(own, "")


def _load(path: Path, advice: str) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated, corrupt or foreign file: torch raises several kinds
        raise UserError(f"--resume: cannot load {path} ({load_failure(error)}){advice}") from None


def load_failure(error: Exception) -> str:
    """The line of torch.load's error that says what is wrong with the file."""
    text = str(error).strip()
    if text.startswith("Weights only load failed"):  # a paragraph about torch 2.6 first, then the reason
        lines = [
            line.strip()
            for line in text.splitlines()[1:]
            if line.strip() and not line.startswith(("Please file", "Check the documentation"))
        ]
        return f"torch.load(weights_only=True) refused it, running none of its code: {lines[0] if lines else text}"
    return text.splitlines()[0] if text else type(error).__name__


def check_resize(path: Path, saved: dict, now: dict, allow_resize: bool, log) -> bool:
    """Resuming on another number of ranks or global batch changes the recipe: say how, and go on only if
    asked. `saved` and `now` are resolved configs (world_size, global_batch, peak_lr, steps_per_epoch,
    batch_size). Whether the world changed."""
    if (saved["world_size"], saved["global_batch"]) == (now["world_size"], now["global_batch"]):
        return False
    change = (
        f"{path} was written by {saved['world_size']} ranks at global batch kn={saved['global_batch']} "
        f"(peak lr {saved['peak_lr']:.4g}, {saved['steps_per_epoch']} steps/epoch); this run has "
        f"{now['world_size']} ranks and kn={now['global_batch']}, so by the linear scaling rule (Sec. 2.1) "
        f"its peak lr is {now['peak_lr']:.4g}, and an epoch is {now['steps_per_epoch']} steps (BN "
        f"statistics stay per worker, over n={now['batch_size']})"
    )
    if not allow_resize:
        raise UserError(f"--resume: {change}; pass --allow-resize to continue at this world size and global batch")
    log.warning("--allow-resize: %s", change)
    return True
