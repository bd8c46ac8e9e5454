"""Rank 0's records of a run: config.json, metrics.jsonl and TensorBoard (metrics.RunWriter), the log lines a
person tails, and the files read after it: stopped.json (a signal stopped the run; launchers requeue on it) and
diverged.json (errors.Diverged.RECORD_FILE). The trainer calls a Journal on every rank; it writes on rank 0
(log lines: other ranks' loggers pass warnings only, world.World.join)."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from . import gpu
from .config import TrainConfig
from .errors import Diverged
from .metrics import RunWriter, format_table, read_metrics, summarize
from .noise_scale import estimate as noise_estimate
from .schedule import lr_at, peak_lr
from .world import World

log = logging.getLogger("hvd_imagenet")
STOPPED_FILE = "stopped.json"  # written by rank 0 when a signal stopped the run; launchers requeue on it


class Journal:
    """One run's records. Every rank calls every method; what is written, rank 0 writes."""

    def __init__(self, config: TrainConfig):
        self.config, self.output = config, Path(config.output)
        self.writer: RunWriter | None = None  # rank 0's

    def open(self, world: World, epochs_done: int, noise_measured: bool) -> None:
        """Rank 0: config.json, metrics.jsonl kept up to `epochs_done` (a resumed run), no stale stop or
        divergence record; every rank: the run's description (logged by rank 0)."""
        if world.ctx.is_primary:
            self.writer = RunWriter(self.output, world.resolved_config(self.config), keep_epochs=epochs_done)
            for stale in (STOPPED_FILE, Diverged.RECORD_FILE):
                (self.output / stale).unlink(missing_ok=True)
        self.describe(world, noise_measured)

    def describe(self, world: World, noise_measured: bool) -> None:
        config, kn = self.config, world.global_batch
        log.info(
            f"hvd-imagenet: {config.arch} on {world.ctx.size} rank(s) ({world.ctx.device.type}), "
            f"n={config.batch_size}, global batch kn={kn}, peak lr {peak_lr(config.lr, kn):.4g}, "
            f"{world.steps_per_epoch} steps/epoch"
        )
        if config.virtual_workers_per_pass > 1:
            log.info(
                f"virtual workers: {config.virtual_workers_per_pass} per pass ({config.pass_batch} images, BN over "
                f"each {config.batch_size}), {config.batches_per_allreduce} pass(es) per step"
            )
        if noise_measured:
            noise = f"from passes of {config.pass_batch} and steps of {kn} images"
        elif config.noise_scale:
            noise = "not measured (--noise-scale needs >= 2 ranks or passes, no PowerSGD)"
        else:
            noise = "off"
        lr = config.lr
        log.info(
            f"recipe {config.recipe}: {config.optimizer}, {lr.warmup} warmup {lr.warmup_epochs:g} epochs, "
            f"{lr.lr_schedule} schedule, label smoothing {config.label_smoothing:g}; noise scale {noise}"
        )
        log.info("input: %s", world.loaders.description)
        if world.ctx.device.type == "cuda":
            log.info("GPU: %s", gpu.describe(world.ctx.device))

    def rejoined(self, old: World, world: World) -> None:
        """The ranks changed (--elastic): say how the recipe follows; a new rank 0 (the old one left) writes
        from now on."""
        lr = self.config.lr
        old_lr, new_lr = peak_lr(lr, old.global_batch), peak_lr(lr, world.global_batch)
        log.info(
            f"elastic: {old.ctx.size} -> {world.ctx.size} ranks; global batch {old.global_batch} -> "
            f"{world.global_batch}, peak lr {old_lr:.4g} -> {new_lr:.4g}"
        )
        if world.ctx.is_primary and not self.writer:
            resolved = world.resolved_config(self.config)
            self.writer = RunWriter(self.output, resolved, keep_epochs=len(read_metrics(self.output)))

    def epoch(self, world: World, state, val: dict | None, digests: list[float], boundary: dict) -> None:
        """Rank 0: the epoch's line of metrics.jsonl (and TensorBoard; val_* are null when the epoch was not
        evaluated), and one log line."""
        if not self.writer:
            return
        config, epoch, steps, kn = self.config, state.epoch, world.steps_per_epoch, world.global_batch
        train = summarize(state.sums)
        noise = noise_estimate(state.sums[4:7], config.pass_batch, kn)
        self.writer.epoch(
            {
                "epoch": epoch + 1,
                "lr": lr_at(config.lr, (epoch + 1) * steps - 1, steps, kn, config.epochs),
                "train_loss": train["loss"],
                "train_top1": train["top1"],
                "train_images": train["images"],
                "evaluated": val is not None,
                **{f"val_{key}": val[key] if val else None for key in ("loss", "top1", "top5", "images", "seconds")},
                "images_per_sec": train["images"] / state.seconds,
                "epoch_seconds": state.seconds,
                "world_size": world.ctx.size,
                "global_batch": kn,
                "steps": (epoch + 1) * steps,
                "skipped_steps": state.skipped,
                "weights_digests": digests,
                "boundary_seconds": boundary,
                **noise,
            }
        )
        evaluated = (
            f"val loss {val['loss']:.4f} top1 {val['top1']:.2f}% top5 {val['top5']:.2f}%"
            if val
            else f"not evaluated (--eval-every {config.eval_every})"
        )
        noise_text = f" | noise scale {noise['noise_scale']:.0f} img" if noise["noise_scale"] is not None else ""
        log.info(
            f"epoch {epoch + 1}/{config.epochs}: train loss {train['loss']:.4f} top1 {train['top1']:.2f}% | "
            f"{evaluated}{noise_text} | {state.seconds:.1f} s"
        )

    def skipped_step(self, state, step: int, scale: float | None) -> None:
        """Every rank: a step whose averaged gradients held NaN/inf was not applied."""
        scale_text = f", loss scale now {scale:g}" if scale is not None else ""
        log.warning(
            f"epoch {state.epoch + 1} step {step + 1}: NaN/inf in the averaged gradients; step skipped "
            f"({state.skipped} so far){scale_text}"
        )

    def diverged(self, world: World, epoch: int, step: int, newest: Path | None) -> str:
        """Rank 0: the divergence record; every rank: the message the run stops with."""
        last_good = f"last good checkpoint {newest}" if newest else "no checkpoint written yet"
        message = (
            f"stopped: NaN/inf in the averaged gradients at step {step + 1}/{world.steps_per_epoch} of "
            f"epoch {epoch + 1} (a rank's loss diverged); nothing was saved after it; {last_good}; lower the "
            "lr or lengthen the warmup, resume with --resume, or pass --skip-nonfinite"
        )
        if world.ctx.is_primary:
            record = {"epoch": epoch + 1, "step": step + 1, "message": message}
            (self.output / Diverged.RECORD_FILE).write_text(json.dumps(record) + "\n")
        return message

    def stopped(self, world: World, received: str, state, path: Path | None) -> None:
        """Rank 0 says where the run stopped and writes stopped.json (what the sbatch script requeues on); the
        checkpoint at `path` is on disk by now."""
        if not world.ctx.is_primary:
            return
        step = state.images_done // world.global_batch
        record = {"signal": received, "epochs_done": state.epoch, "steps_done_in_epoch": step, "checkpoint": str(path)}
        (self.output / STOPPED_FILE).write_text(json.dumps(record) + "\n")
        where = (
            f"after epoch {state.epoch}"
            if step == 0
            else f"at step {step}/{world.steps_per_epoch} of epoch {state.epoch + 1}"
        )
        log.info("%s: stopped %s; checkpoint %s; continue with --resume", received, where, path)

    def finished(self) -> None:
        """Rank 0: the per-epoch table of the whole run."""
        if self.writer:
            log.info("\n%s", format_table(read_metrics(self.output)))

    def close(self) -> None:
        if self.writer:
            self.writer.close()


class Laps:
    """Seconds between laps, by name, on the host clock without a device sync (step.PhaseClock is
    bench-train's, which synchronizes): each part of the epoch boundary ends with a host sync anyway."""

    def __init__(self):
        self.laps: dict[str, float] = {}
        self.last = time.perf_counter()

    def lap(self, name: str) -> float:
        now = time.perf_counter()
        self.laps[name], self.last = now - self.last, now
        return self.laps[name]
