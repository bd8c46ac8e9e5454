"""A run's state saved and restored in the one checkpoint format (checkpoint.py): at an epoch's end and on a
stop (save), and at the start (resume; load_newest under --elastic). Rank 0 writes the main file in the
background (checkpoint.AsyncWriter); each rank writes its own PowerSGD state beside it."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from . import checkpoint, comm
from .checkpoint import Checkpoint, Progress
from .config import TrainConfig
from .errors import UserError
from .step import Training
from .watchdog import Watchdog
from .world import World

log = logging.getLogger("hvd_imagenet")


def checkpoint_directory(config: TrainConfig) -> Path:
    return Path(config.checkpoint_dir or Path(config.output) / "checkpoints")


class Checkpointer:
    """Saves and restores `training` (model, optimizer, loss scaler) and, per rank, the compressor's state."""

    def __init__(self, config: TrainConfig, training: Training, watchdog: Watchdog):
        self.config, self.training, self.watchdog = config, training, watchdog
        self.directory = checkpoint_directory(config)
        self.writer = checkpoint.AsyncWriter(  # used on rank 0; the watchdog learns when a write is done
            self.directory, config.keep_checkpoints, on_written=lambda path: watchdog.checkpoint_saved(str(path), True)
        )

    def save(self, state, world: World, step_in_epoch: int = 0) -> Path:
        """Every rank calls it: each writes its own compressor state (PowerSGD's error memory) if it has one,
        then rank 0 starts writing the checkpoint (checkpoint.AsyncWriter: it waits for the previous write and
        for a copy of the state in host memory). The path of the checkpoint."""
        self.watchdog.progress("checkpoint")
        path = checkpoint.path_for(self.directory, state.epoch, step_in_epoch)
        model, optimizer, scaler = self.training
        rank_state = comm.compressor_state(optimizer)
        if rank_state is not None:
            checkpoint.write_atomic(checkpoint.rank_file(path, world.ctx.rank), rank_state)
            comm.barrier()  # Horovod: every rank's file is complete before rank 0 writes the main one
        if world.ctx.is_primary:
            progress = Progress(state.epoch, state.images_done, state.sums, state.seconds, state.skipped)
            compressor = {"name": self.config.compression, "ranks": world.ctx.size}
            self.writer.submit(
                Checkpoint(
                    progress,
                    state.epoch * world.steps_per_epoch + step_in_epoch,
                    step_in_epoch,
                    model.state_dict(),
                    optimizer.state_dict(),
                    scaler.state_dict(),
                    world.resolved_config(self.config),
                    {**compressor, "channels_last": self.config.channels_last} if rank_state is not None else {},
                ).to_state()
            )
        self.watchdog.checkpoint_saved(str(path), complete=False)  # rank 0's writer marks it complete
        return path

    def wait(self) -> None:
        """Until rank 0's checkpoint in flight is on disk (nothing to wait for on other ranks)."""
        self.writer.wait()

    def newest(self) -> Path | None:
        found = checkpoint.list_checkpoints(self.directory)
        return found[-1] if found else None

    def resume(self, world: World) -> tuple[Progress, str | None]:
        """Rank 0 loads the latest checkpoint; every rank learns the progress to start from (or the error), then
        loads its own compressor state if the checkpoint has one. The progress, and the checkpoint's path (None
        for a fresh start)."""
        outcome = {"progress": None, "path": None, "compressor": {}, "error": None}
        if world.ctx.is_primary:
            try:
                path, saved = self.load_newest(world)
                if saved:
                    progress = dataclasses.asdict(saved.progress)
                    outcome.update(progress=progress, path=str(path), compressor=saved.compressor)
            except UserError as error:
                outcome["error"] = str(error)
        outcome = comm.broadcast_object(outcome, name="resume")  # Horovod: no rank hangs when rank 0 fails
        if outcome["error"]:
            raise UserError(outcome["error"])
        if outcome["compressor"] and comm.compressor_state(self.training.optimizer) is not None:
            self.restore_compressor(Path(outcome["path"]), outcome["compressor"], world)
        return (Progress(**outcome["progress"]), outcome["path"]) if outcome["progress"] else (Progress(), None)

    def load_newest(self, world: World) -> tuple[Path | None, Checkpoint | None]:
        """The newest checkpoint into model, optimizer and loss scaler (on this rank only); (None, None) if there
        is none yet."""
        if not checkpoint.list_checkpoints(self.directory):
            log.info("--resume: no checkpoint in %s yet, starting from epoch 1", self.directory)
            return None, None
        path, saved = checkpoint.load(self.directory)
        checkpoint.check_resize(path, saved.config, world.summary(self.config), self.config.allow_resize, log)
        model, optimizer, scaler = self.training
        model.load_state_dict(saved.model)
        optimizer.load_state_dict(saved.optimizer)
        if saved.scaler and scaler.is_enabled():
            scaler.load_state_dict(saved.scaler)
        done = saved.progress.epoch, saved.step_in_epoch
        log.info("--resume: continuing from %s (%d epochs and %d steps done)", path, *done)
        return path, saved

    def restore_compressor(self, path: Path, saved: dict, world: World) -> None:
        """This rank's PowerSGD state (error memory, Q) from its file beside the checkpoint. After a resize the
        ranks' error memories do not map to the new ranks, nor after a change of --channels-last (its matrices'
        columns are in memory order): they start empty, as at the first step."""
        ctx = world.ctx
        if saved["ranks"] != ctx.size:
            if ctx.is_primary:
                log.warning(
                    "--allow-resize: PowerSGD's error memory was kept by %d ranks; on %d it starts empty",
                    saved["ranks"],
                    ctx.size,
                )
            return
        if saved.get("channels_last", False) != self.config.channels_last:
            if ctx.is_primary:
                log.warning(
                    "PowerSGD's error memory was kept with --channels-last %s; it starts empty",
                    "on" if saved.get("channels_last") else "off",
                )
            return
        comm.load_compressor_state(self.training.optimizer, checkpoint.load_rank_file(path, ctx.rank))
