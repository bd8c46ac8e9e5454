"""`hvd-imagenet train`: ResNet on ImageNet with the recipe of Goyal et al. (2017), on every Horovod rank.

Read top to bottom: check the inputs, start Horovod, build data, model and optimizer, resume or broadcast the
start state, then per epoch: train (one step.TrainStep per iteration, lr from schedule.lr_at), evaluate (every
--eval-every epochs), write metrics and (every --checkpoint-every epochs) a checkpoint, which rank 0 writes in
the background while the next epoch trains.
A SIGUSR1 or SIGTERM (SLURM's warning before the time limit, scancel) stops every rank at the same step with a
checkpoint there; `--resume` continues from it as if nothing had happened. Averaged gradients that are NaN or
inf stop the run (or skip the step, --skip-nonfinite). With --elastic, ranks may leave or join mid-epoch. A
rank that makes no progress for --hang-timeout seconds ends itself, and so the launcher the job (watchdog.py).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import random
import signal
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import checkpoint, comm, gpu, recipes
from .checkpoint import Checkpoint, Progress
from .config import TrainConfig
from .context import DistContext
from .data import LOADERS, Loaders, build_loaders, check_data
from .data.stage import node_path
from .errors import Diverged, UserError
from .flags import Command, field_defaults
from .metrics import EpochSums, RunWriter, format_table, read_metrics, summarize
from .model import build_model, weights_digest
from .noise_scale import estimate as noise_estimate
from .optimizers import build_optimizer
from .precision import autocast
from .progress import EpochProgress
from .schedule import lr_at, peak_lr
from .step import TrainStep
from .watchdog import Watchdog

log = logging.getLogger("hvd_imagenet")
STOP_CHECK_EVERY = 10  # steps between the ranks' agreement on a stop request (one 1-element allreduce)
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
STOPPED_FILE = "stopped.json"  # written by rank 0 when a signal stopped the run; launchers requeue on it


def main(config: TrainConfig) -> None:
    output = Path(config.output)
    checkpoints = Path(config.checkpoint_dir or output / "checkpoints")
    # 1. From here to the process's end, a rank without progress for --hang-timeout seconds ends itself.
    watchdog = Watchdog(config.hang_timeout, str(checkpoints), comm.rank_if_started).start()
    # Inputs first: every rank fails the same way, at once, before any rank spends time.
    if LOADERS[config.loader].reads_files:
        check_data(Path(config.data))
    if not (config.resume or config.elastic) and checkpoint.list_checkpoints(checkpoints):
        raise UserError(f"{checkpoints} already holds checkpoints of a run; pass --resume to continue it, or "
                        "choose a new --output")
    if config.elastic and not comm.launched_elastic():
        raise UserError("--elastic: start the job with horovodrun --min-np N --max-np M "
                        "--host-discovery-script SCRIPT (Horovod's elastic driver)")

    # 2. Horovod, signals, data (rank 0 alone logs).
    ctx = comm.init(config.fusion_threshold_mb, config.cycle_time_ms, config.hierarchical_allreduce)
    stop = StopRequest()
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stdout)
    world = World.join(config, ctx)

    # 3. Model, optimizer and loss scaler.
    model, optimizer, scaler = build_training(config, world.loaders.num_classes, ctx.device)

    # 4. Start state: rank 0's checkpoint when resuming, then rank 0's weights everywhere; train.
    if config.elastic:
        # Always from the newest checkpoint, loaded by rank 0 alone: a worker that joins a running job runs
        # this too, and must not call a collective that the others are not in (Horovod gives it rank >= 1
        # and the state of rank 0 when it joins).
        path, saved = load_newest(config, checkpoints, model, optimizer, scaler, world) if ctx.is_primary \
            else (None, None)
        watchdog.started_from(path)
        start = saved.progress if saved else Progress()
        trainer = Trainer(config, model, optimizer, scaler, world, checkpoints, output, stop, watchdog, start.epoch)
        state = comm.elastic_state(model, optimizer, **dataclasses.asdict(start))
        state.register_reset_callbacks([trainer.rejoin])
        comm.run_elastic(trainer.train_elastic, state)  # Horovod: broadcasts rank 0's state first
    else:
        start, path = resume(config, checkpoints, model, optimizer, scaler, world) if config.resume \
            else (Progress(), None)
        watchdog.started_from(path)
        trainer = Trainer(config, model, optimizer, scaler, world, checkpoints, output, stop, watchdog, start.epoch)
        comm.broadcast_state(model, optimizer, resumed=start.epoch > 0 or start.images_done > 0)
        trainer.train(start)
    watchdog.progress("shutdown")
    trainer.close()
    comm.shutdown()


def build_training(config: TrainConfig, num_classes: int, device: torch.device):
    """The model (zero-init residual gamma), the optimizer (--optimizer: the paper's Nesterov SGD without weight
    decay on BN/bias, Sec. 5.1, or LARS) wrapped by Horovod for --compression, and the loss scaler (amp-fp16:
    fp16's narrow range needs it)."""
    torch.manual_seed(config.seed)
    model = build_model(config.arch, num_classes, config.zero_init_residual, config.virtual_workers_per_pass).to(device)
    if config.channels_last:  # NHWC weights as well as batches: no layout conversion at any convolution
        model = model.to(memory_format=torch.channels_last)
    optimizer = comm.distributed_optimizer(
        build_optimizer(config, model), model, config.compression, config.batches_per_allreduce,
        config.gradient_predivide_factor,
        comm.PowerSGDSettings(rank=config.powersgd_rank, start_step=config.powersgd_start_step, seed=config.seed))
    scaler = torch.amp.GradScaler(device.type, enabled=config.precision == "amp-fp16")
    return model, optimizer, scaler


def build_step(config: TrainConfig, model, optimizer, scaler, ctx: DistContext, on_phase=None) -> TrainStep:
    """The optimizer step `train` runs (and bench-train times): config.batches_per_allreduce passes of V x n,
    autocast for --precision, --label-smoothing; the BN statistics kept to restore when a step is skipped
    (--skip-nonfinite, and amp-fp16's overflow skips); the noise probe where it can tell two batch sizes."""
    return TrainStep(model, optimizer, scaler, autocast(config.precision, ctx.device), config.batches_per_allreduce,
                     config.max_grad_norm, restore_bn=config.skip_nonfinite or scaler.is_enabled(),
                     label_smoothing=config.label_smoothing, noise_probe=noise_probe(config, ctx.size),
                     on_phase=on_phase)


def noise_probe(config: TrainConfig, ranks: int) -> bool:
    """Whether --noise-scale can be measured: a pass's gradient must be smaller than the step's (>= 2 ranks or
    passes), and the averaged gradient exact (PowerSGD's is a low-rank approximation)."""
    return (config.noise_scale and ranks * config.batches_per_allreduce > 1
            and config.compression != "powersgd")


@dataclass(frozen=True)
class World:
    """Everything that depends on which ranks there are; rebuilt when an elastic job changes size."""

    ctx: DistContext
    loaders: Loaders
    global_batch: int  # kn, virtual workers included
    steps_per_epoch: int

    @classmethod
    def join(cls, config: TrainConfig, ctx: DistContext) -> "World":
        loaders = build_loaders(config, ctx)
        global_batch = ctx.size * config.batches_per_allreduce * config.pass_batch
        steps = loaders.train_batches // config.batches_per_allreduce
        if config.max_steps_per_epoch:
            steps = min(steps, config.max_steps_per_epoch)
        if steps < 1:
            raise UserError(f"the training set gives no full step of global batch {global_batch} "
                            f"({loaders.train_batches} batches of {config.pass_batch} per rank); use fewer ranks "
                            f"or a smaller batch")
        logging.getLogger().setLevel(logging.INFO if ctx.is_primary else logging.WARNING)
        return cls(ctx, loaders, global_batch, steps)

    def summary(self, config: TrainConfig) -> dict:
        """What the world size changes in the recipe (the resolved config's part that a resize checks)."""
        return {"world_size": self.ctx.size, "global_batch": self.global_batch, "batch_size": config.batch_size,
                "peak_lr": peak_lr(config.lr, self.global_batch), "steps_per_epoch": self.steps_per_epoch}


class Trainer:
    """The epoch loop of one run. train(state) runs from `state` to the last epoch; under --elastic Horovod
    calls it again, from the last commit, after the set of ranks changed (rejoin)."""

    def __init__(self, config: TrainConfig, model, optimizer, scaler, world: World, checkpoints: Path,
                 output: Path, stop: "StopRequest", watchdog: Watchdog, epochs_done: int):
        self.config, self.model, self.optimizer, self.scaler, self.world = config, model, optimizer, scaler, world
        self.step = build_step(config, model, optimizer, scaler, world.ctx)
        self.checkpoints, self.output, self.stop, self.watchdog = checkpoints, output, stop, watchdog
        self.checkpoint_writer = checkpoint.AsyncWriter(  # used on rank 0; the watchdog learns when a write is done
            checkpoints, config.keep_checkpoints, on_written=lambda path: watchdog.checkpoint_saved(str(path), True))
        self.rejoined = False  # whether the set of ranks has changed since the start (--elastic)
        self.writer = self.open_writer(epochs_done)
        self.describe()

    def resolved_config(self) -> dict:
        w = self.world
        return {**self.config.to_dict(), **w.summary(self.config), "controller": comm.controller(),
                "num_classes": w.loaders.num_classes, "device": str(w.ctx.device), "input": w.loaders.description}

    def open_writer(self, epochs_done: int) -> RunWriter | None:
        if not self.world.ctx.is_primary:
            return None
        writer = RunWriter(self.output, self.resolved_config(), keep_epochs=epochs_done)
        for stale in (STOPPED_FILE, Diverged.RECORD_FILE):
            (self.output / stale).unlink(missing_ok=True)
        return writer

    def describe(self) -> None:
        w, config = self.world, self.config
        log.info("hvd-imagenet: %s on %d rank(s) (%s), n=%d, global batch kn=%d, peak lr %.4g, %d steps/epoch",
                 config.arch, w.ctx.size, w.ctx.device.type, config.batch_size, w.global_batch,
                 peak_lr(config.lr, w.global_batch), w.steps_per_epoch)
        if config.virtual_workers_per_pass > 1:
            log.info("virtual workers: %d per pass (%d images, BN over each %d), %d pass(es) per step",
                     config.virtual_workers_per_pass, config.pass_batch, config.batch_size,
                     config.batches_per_allreduce)
        lr = config.lr
        log.info("recipe %s: %s, %s warmup %g epochs, %s schedule, label smoothing %g; noise scale %s",
                 config.recipe, config.optimizer, lr.warmup, lr.warmup_epochs, lr.lr_schedule, config.label_smoothing,
                 f"from passes of {config.pass_batch} and steps of {w.global_batch} images"
                 if self.step.probe is not None else "not measured (--noise-scale needs >= 2 ranks or passes, no "
                 "PowerSGD)" if config.noise_scale else "off")
        log.info("input: %s", w.loaders.description)
        if w.ctx.device.type == "cuda":
            log.info("GPU: %s", gpu.describe(w.ctx.device))

    def rejoin(self) -> None:
        """Elastic reset callback: the ranks changed. New shards, global batch and so lr (linear scaling rule,
        Sec. 2.1) for the new world size; the next train(state) continues the epoch's shuffle where the last
        commit left it."""
        old = self.world
        self.world, self.rejoined = World.join(self.config, comm.context()), True
        log.info("elastic: %d -> %d ranks; global batch %d -> %d, peak lr %.4g -> %.4g", old.ctx.size,
                 self.world.ctx.size, old.global_batch, self.world.global_batch,
                 peak_lr(self.config.lr, old.global_batch), peak_lr(self.config.lr, self.world.global_batch))
        if self.world.ctx.is_primary and not self.writer:  # rank 0 left: its successor writes from now on
            self.writer = RunWriter(self.output, self.resolved_config(), keep_epochs=len(read_metrics(self.output)))

    def close(self) -> None:
        self.checkpoint_writer.wait()
        if self.writer:
            self.writer.close()

    def save_checkpoint(self, state, step_in_epoch: int = 0) -> Path:
        """Every rank calls it: each writes its own compressor state (PowerSGD's error memory) if it has one,
        then rank 0 starts writing the checkpoint (checkpoint.AsyncWriter: it waits for the previous write and
        for a copy of the state in host memory). The path of the checkpoint."""
        self.watchdog.progress("checkpoint")
        path = checkpoint.path_for(self.checkpoints, state.epoch, step_in_epoch)
        rank_state = comm.compressor_state(self.optimizer)
        if rank_state is not None:
            checkpoint.write_atomic(checkpoint.rank_file(path, self.world.ctx.rank), rank_state)
            comm.barrier()  # Horovod: every rank's file is complete before rank 0 writes the main one
        if self.world.ctx.is_primary:
            progress = Progress(state.epoch, state.images_done, state.sums, state.seconds, state.skipped)
            self.checkpoint_writer.submit(Checkpoint(
                progress, state.epoch * self.world.steps_per_epoch + step_in_epoch, step_in_epoch,
                self.model.state_dict(), self.optimizer.state_dict(), self.scaler.state_dict(),
                self.resolved_config(),
                {"name": self.config.compression, "ranks": self.world.ctx.size,
                 "channels_last": self.config.channels_last} if rank_state is not None else {},
            ).to_state())
        self.watchdog.checkpoint_saved(str(path), complete=False)  # rank 0's writer marks it complete
        return path

    def train_elastic(self, state) -> None:
        """train(state) as Horovod's elastic loop calls it: again after the ranks changed. While Horovod
        re-forms the ring the watchdog does not count: horovodrun's --elastic-timeout bounds that wait."""
        self.watchdog.resume()
        if self.rejoined:  # Horovod rolled back to the last commit after a failure, or stopped at one
            log.info("elastic: epoch %d goes on from image %d of the epoch (the last commit)", state.epoch + 1,
                     state.images_done)
        try:
            self.train(state)
        except comm.ELASTIC_INTERRUPTS:
            self.watchdog.pause()
            raise

    def train(self, state) -> None:
        config = self.config
        if self.scaler.is_enabled():  # every rank scales its loss by rank 0's scale (a checkpoint's on resume)
            self.scaler.load_state_dict(comm.broadcast_object(self.scaler.state_dict(), name="grad_scaler"))
        while state.epoch < config.epochs:
            w = self.world
            epoch = state.epoch
            # A resumed or resized epoch goes on from a whole step of the current kn (after a resize, up to
            # kn - 1 images of the last partial step are read again).
            first_step = state.images_done // w.global_batch
            seed_epoch(config.seed, epoch, w.ctx.rank)
            # The epoch's one global shuffle (Sec. 3, Remark 4), from where a resumed run left it.
            w.loaders.set_epoch(epoch, first_step * w.global_batch)
            received = self.train_one_epoch(state, first_step)
            if received:  # stopped by a signal within the epoch: a checkpoint here, then exit 0
                # The ranks' BN running statistics differ within an epoch; their mean is what the epoch's end
                # would average, and the running average is linear, so resuming from it changes only rounding.
                comm.average_bn_statistics(self.model)
                path = self.save_checkpoint(state, state.images_done // w.global_batch)
                self.report_stop(received, state, path)
                return
            path = self.finish_epoch(state)
            state.epoch, state.images_done, state.sums, state.seconds, state.skipped = epoch + 1, 0, None, 0.0, 0
            state.commit()
            self.watchdog.progress("epoch end")  # the ranks agree on signals next: a collective, waits for all
            received = self.stop.agreed() if state.epoch < config.epochs else None  # a signal during val or save
            if received:
                self.report_stop(received, state, path or self.save_checkpoint(state))
                return
        self.checkpoint_writer.wait()
        if self.writer:
            log.info("\n%s", format_table(read_metrics(self.output)))

    def train_one_epoch(self, state, first_step: int) -> str | None:
        """Steps first_step .. steps_per_epoch - 1 of epoch state.epoch, or up to the step where the ranks
        agree that a signal asks them to stop (its name is returned). `state` follows along."""
        config, w = self.config, self.world
        self.model.train()
        self.watchdog.progress("training")
        epoch, steps = state.epoch, w.steps_per_epoch
        sums = EpochSums(w.ctx.device, state.sums)
        micro_batches = iter(w.loaders.train)
        progress = EpochProgress(w.ctx.is_primary, epoch, config.epochs, first_step, steps, w.global_batch,
                                 config.status_every)
        start_time, seconds_before = time.perf_counter(), state.seconds

        def record(step_done: int) -> None:  # the state as of `step_done` steps of this epoch
            state.images_done = step_done * w.global_batch
            state.sums = sums.fold("train_sums")
            state.seconds = seconds_before + time.perf_counter() - start_time

        received = None
        for step in range(first_step, steps):
            # Gradual warmup, then the step schedule, as a function of the global iteration (Sec. 2.2).
            lr = lr_at(config.lr, epoch * steps + step, steps, w.global_batch, config.epochs)
            result = self.step(micro_batches, lr)
            self.watchdog.step_done(epoch, step, steps)  # attribute stores: no sync
            if result.applied:
                sums.add(result.sums)
            else:
                self.skip_or_stop(state, step)
            progress.update(step, result.loss, lr)
            if config.elastic and (step + 1) % config.elastic_commit_steps == 0 and step + 1 < steps:
                record(step + 1)
                state.commit()  # Horovod: a copy to roll back to; raises here when hosts were added/removed
            if (step + 1) % STOP_CHECK_EVERY == 0 and step + 1 < steps:  # the last step: checked after the epoch
                received = self.stop.agreed()
                if received:
                    record(step + 1)
                    break
        progress.close()
        if not received:
            record(steps)
        return received

    def skip_or_stop(self, state, step: int) -> None:
        """A step whose averaged gradients held NaN/inf was not applied: count it and go on (--skip-nonfinite,
        or GradScaler's overflow skip under amp-fp16, which halved the scale), or stop the run: Diverged.
        A loss scale below 1 means divergence too."""
        scaling = self.scaler.is_enabled()
        scale = self.scaler.get_scale() if scaling else None  # host sync, on a skipped step only
        if self.config.skip_nonfinite or scaling and scale >= 1:
            state.skipped += 1
            log.warning("epoch %d step %d: NaN/inf in the averaged gradients; step skipped (%d so far)%s",
                        state.epoch + 1, step + 1, state.skipped, f", loss scale now {scale:g}" if scaling else "")
            return
        message = self.divergence_message(state.epoch, step)
        if self.world.ctx.is_primary:
            record = {"epoch": state.epoch + 1, "step": step + 1, "message": message}
            (self.output / Diverged.RECORD_FILE).write_text(json.dumps(record) + "\n")
        raise Diverged(message)

    def divergence_message(self, epoch: int, step: int) -> str:
        found = checkpoint.list_checkpoints(self.checkpoints)
        last_good = f"last good checkpoint {found[-1]}" if found else "no checkpoint written yet"
        return (f"stopped: NaN/inf in the averaged gradients at step {step + 1}/{self.world.steps_per_epoch} of "
                f"epoch {epoch + 1} (a rank's loss diverged); nothing was saved after it; {last_good}; lower the "
                "lr or lengthen the warmup, resume with --resume, or pass --skip-nonfinite")

    def finish_epoch(self, state) -> Path | None:
        """Average BN statistics, evaluate (every --eval-every epochs and after the last), check that every
        rank holds the same weights, (rank 0) write the epoch's metrics, and start writing a checkpoint (every
        --checkpoint-every epochs and after the last; its path, else None). What each part took goes into
        metrics.jsonl as boundary_seconds: at 256 H100s an epoch's steps take ~0.7 s (bench-epoch)."""
        w, epoch, config = self.world, state.epoch, self.config
        last = epoch + 1 == config.epochs
        clock = Laps()
        if not last:  # the next epoch's first batches decode during the evaluation and the checkpoint (DALI)
            w.loaders.set_epoch(epoch + 1)
        self.watchdog.progress("evaluation")
        comm.average_bn_statistics(self.model)
        clock.lap("bn_average")
        val = None
        if (epoch + 1) % config.eval_every == 0 or last:
            val = evaluate(self.model, w.loaders.val, w.ctx.device, self.step.autocast,
                           on_batch=lambda: self.watchdog.progress("evaluation"))
            val["seconds"] = clock.lap("evaluation")
        digests = comm.gather_digests(weights_digest(self.model))  # every rank must hold the same model
        clock.lap("digests")
        if len(set(digests)) > 1:
            log.warning("epoch %d: ranks hold different weights (digests %s)", epoch + 1, digests)
        path = None
        if (epoch + 1) % config.checkpoint_every == 0 or last:
            path = self.save_checkpoint(Progress(epoch=epoch + 1))
            clock.lap("checkpoint_stall")
        if self.writer:
            self.write_epoch(state, summarize(state.sums), val, digests, clock.laps)
        return path

    def write_epoch(self, state, train: dict, val: dict | None, digests: list[float], boundary: dict) -> None:
        """Rank 0: the epoch's line of metrics.jsonl (and TensorBoard; val_* are null when the epoch was not
        evaluated), and one log line."""
        w, epoch, steps = self.world, state.epoch, self.world.steps_per_epoch
        noise = noise_estimate(state.sums[4:7], self.config.pass_batch, w.global_batch)
        self.writer.epoch({
            "epoch": epoch + 1,
            "lr": lr_at(self.config.lr, (epoch + 1) * steps - 1, steps, w.global_batch, self.config.epochs),
            "train_loss": train["loss"], "train_top1": train["top1"], "train_images": train["images"],
            "evaluated": val is not None,
            **{f"val_{key}": val[key] if val else None for key in ("loss", "top1", "top5", "images", "seconds")},
            "images_per_sec": train["images"] / state.seconds, "epoch_seconds": state.seconds,
            "world_size": w.ctx.size, "global_batch": w.global_batch, "steps": (epoch + 1) * steps,
            "skipped_steps": state.skipped, "weights_digests": digests, "boundary_seconds": boundary, **noise,
        })
        evaluated = (f"val loss {val['loss']:.4f} top1 {val['top1']:.2f}% top5 {val['top5']:.2f}%" if val
                     else f"not evaluated (--eval-every {self.config.eval_every})")
        noise_text = f" | noise scale {noise['noise_scale']:.0f} img" if noise["noise_scale"] is not None else ""
        log.info("epoch %d/%d: train loss %.4f top1 %.2f%% | %s%s | %.1f s", epoch + 1, self.config.epochs,
                 train["loss"], train["top1"], evaluated, noise_text, state.seconds)

    def report_stop(self, received: str, state, path: Path | None) -> None:
        """Rank 0 says where the run stopped and writes stopped.json (what the sbatch script requeues on)."""
        if not self.world.ctx.is_primary:
            return
        self.checkpoint_writer.wait()  # the checkpoint is on disk before stopped.json says to requeue from it
        step = state.images_done // self.world.global_batch
        record = {"signal": received, "epochs_done": state.epoch, "steps_done_in_epoch": step,
                  "checkpoint": str(path)}
        (self.output / STOPPED_FILE).write_text(json.dumps(record) + "\n")
        where = (f"after epoch {state.epoch}" if step == 0
                 else f"at step {step}/{self.world.steps_per_epoch} of epoch {state.epoch + 1}")
        log.info("%s: stopped %s; checkpoint %s; continue with --resume", received, where, path)


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


class StopRequest:
    """SIGUSR1 (SLURM's warning before the time limit, `#SBATCH --signal=USR1@120`) or SIGTERM (scancel, the
    limit itself; horovodrun on a failure) asks the job to stop. A signal reaches the ranks at different
    moments, so they agree at fixed steps (every STOP_CHECK_EVERY steps and after each epoch) whether any rank
    got one; then all stop at that step, rank 0 writes a checkpoint, and every rank exits 0."""

    def __init__(self):
        self.received = 0
        for number in STOP_SIGNALS:
            signal.signal(number, self._receive)

    def _receive(self, number, frame) -> None:
        self.received = max(self.received, number)

    def agreed(self) -> str | None:
        """The signal's name if any rank has received one (a collective: every rank calls it at the same step)."""
        number = comm.allreduce_max(self.received, name="stop_request")
        return signal.Signals(number).name if number else None


@torch.no_grad()
def evaluate(model, batches, device: torch.device, autocast, on_batch) -> dict:
    """This rank's shard of val, with the plain cross-entropy loss (no label smoothing); the sums over all ranks
    count every val image exactly once. on_batch() after each batch."""
    model.eval()
    sums = EpochSums(device)
    for images, target in batches:
        with autocast:
            output = model(images)
            loss = torch.nn.functional.cross_entropy(output, target)
        sums.add(EpochSums.of_batch(output.float(), target, loss.float()))
        on_batch()
    return sums.reduce("val_sums")


def seed_epoch(seed: int, epoch: int, rank: int) -> None:
    """Augmentation randomness for one epoch: different on every rank, and a function of (seed, epoch, rank)
    alone, so a run resumed at an epoch boundary draws exactly what the uninterrupted run draws."""
    state = int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])
    torch.manual_seed(state)
    random.seed(state)
    np.random.seed(state)


def resume(config: TrainConfig, checkpoints: Path, model, optimizer, scaler,
           world: World) -> tuple[Progress, str | None]:
    """Rank 0 loads the latest checkpoint; every rank learns the progress to start from (or the error), then
    loads its own compressor state if the checkpoint has one. The progress, and the checkpoint's path (None
    for a fresh start)."""
    outcome = {"progress": None, "path": None, "compressor": {}, "error": None}
    if world.ctx.is_primary:
        try:
            path, saved = load_newest(config, checkpoints, model, optimizer, scaler, world)
            if saved:
                outcome.update(progress=dataclasses.asdict(saved.progress), path=str(path),
                               compressor=saved.compressor)
        except UserError as error:
            outcome["error"] = str(error)
    outcome = comm.broadcast_object(outcome, name="resume")  # Horovod: no rank hangs when rank 0 fails
    if outcome["error"]:
        raise UserError(outcome["error"])
    if outcome["compressor"] and comm.compressor_state(optimizer) is not None:
        restore_compressor(optimizer, Path(outcome["path"]), outcome["compressor"], world.ctx, config.channels_last)
    return (Progress(**outcome["progress"]), outcome["path"]) if outcome["progress"] else (Progress(), None)


def load_newest(config: TrainConfig, checkpoints: Path, model, optimizer, scaler,
                world: World) -> tuple[Path | None, Checkpoint | None]:
    """The newest checkpoint into model, optimizer and loss scaler (on this rank only); (None, None) if there
    is none yet."""
    if not checkpoint.list_checkpoints(checkpoints):
        log.info("--resume: no checkpoint in %s yet, starting from epoch 1", checkpoints)
        return None, None
    path, saved = checkpoint.load(checkpoints)
    checkpoint.check_resize(path, saved.config, world.summary(config), config.allow_resize, log)
    model.load_state_dict(saved.model)
    optimizer.load_state_dict(saved.optimizer)
    if saved.scaler and scaler.is_enabled():
        scaler.load_state_dict(saved.scaler)
    log.info("--resume: continuing from %s (%d epochs and %d steps done)", path, saved.progress.epoch,
             saved.step_in_epoch)
    return path, saved


def restore_compressor(optimizer, path: Path, saved: dict, ctx: DistContext, channels_last: bool) -> None:
    """This rank's PowerSGD state (error memory, Q) from its file beside the checkpoint. After a resize the
    ranks' error memories do not map to the new ranks, nor after a change of --channels-last (its matrices'
    columns are in memory order): they start empty, as at the first step."""
    if saved["ranks"] != ctx.size:
        if ctx.is_primary:
            log.warning("--allow-resize: PowerSGD's error memory was kept by %d ranks; on %d it starts empty",
                        saved["ranks"], ctx.size)
        return
    if saved.get("channels_last", False) != channels_last:
        if ctx.is_primary:
            log.warning("PowerSGD's error memory was kept with --channels-last %s; it starts empty",
                        "on" if saved.get("channels_last") else "off")
        return
    comm.load_compressor_state(optimizer, checkpoint.load_rank_file(path, ctx.rank))


def command(config: TrainConfig) -> int:
    """Every rank runs this. An error is one line that names the rank; the launcher (horovodrun, mpirun,
    srun) sees the non-zero status and ends the job. The ranks that survive a failed peer say so in one line
    each, not a traceback each from hundreds of ranks."""
    try:
        main(dataclasses.replace(config, data=node_path(config.data)))  # a node-local copy (stage.py)
    except comm.PeerFailure:
        raise UserError(f"rank {comm.rank_if_started()}: stopped: another rank failed (or, under Gloo, stopped "
                        "responding for HOROVOD_GLOO_TIMEOUT_SECONDS) and Horovod shut down; the launcher's log "
                        "names the rank that failed first") from None
    except Diverged as error:  # every rank stops at the same step; rank 0 says so for all
        if comm.rank_if_started() == 0:
            print(f"hvd-imagenet train: {error}", file=sys.stderr)
        return Diverged.EXIT_STATUS
    except UserError as error:
        rank = comm.rank_if_started()
        raise UserError(f"rank {rank}: {error}" if rank is not None else str(error)) from None
    except Exception:  # a bug or a fault we did not foresee: the whole traceback, with the rank on every line
        rank = comm.rank_if_started()
        for line in traceback.format_exc().splitlines():
            print(f"rank {rank}: {line}", file=sys.stderr)
        return 1
    return 0


def recipes_help() -> str:
    return "recipes (--recipe fills these defaults; a flag given explicitly wins):\n" + recipes.table(
        field_defaults(TrainConfig))


COMMAND = Command(TrainConfig, command, epilog=recipes_help)
