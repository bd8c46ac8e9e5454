"""`hvd-imagenet train`: ResNet on ImageNet with the recipe of Goyal et al. (2017), on every Horovod rank.

Read top to bottom: check the inputs, start Horovod, build data, model and optimizer, resume or broadcast the
start state, then per epoch (Trainer): train (one step.TrainStep per iteration, lr from schedule.lr_at), evaluate
(every --eval-every epochs), write metrics (journal.Journal, rank 0) and (every --checkpoint-every epochs) a
checkpoint (checkpointer.Checkpointer), which rank 0 writes in the background while the next epoch trains.
A SIGUSR1 or SIGTERM (SLURM's warning before the time limit, scancel) stops every rank at the same step with a
checkpoint there (stop.py); `--resume` continues from it as if nothing had happened. Averaged gradients that are
NaN or inf stop the run (or skip the step, --skip-nonfinite). With --elastic, ranks may leave or join mid-epoch
(world.World is rebuilt). A rank that makes no progress for --hang-timeout seconds ends itself, and so the
launcher the job (watchdog.py).
"""

from __future__ import annotations

import dataclasses
import logging
import random
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

from . import checkpoint, comm, recipes, stop
from .checkpoint import Progress
from .checkpointer import Checkpointer, checkpoint_directory
from .config import TrainConfig
from .context import DistContext
from .data import LOADERS
from .data.loaders import check_data
from .data.stage import node_path
from .errors import Diverged, UserError
from .flags import Command, field_defaults
from .journal import Journal, Laps
from .losses import build_loss
from .metrics import EpochSums
from .model import build_model, weights_digest
from .optimizers import build_optimizer
from .precision import autocast
from .progress import EpochProgress
from .schedule import lr_at
from .step import Training, TrainStep, evaluate
from .watchdog import Watchdog
from .world import World

log = logging.getLogger("hvd_imagenet")


def main(config: TrainConfig) -> None:
    # 1. From here to the process's end, a rank without progress for --hang-timeout seconds ends itself.
    watchdog = Watchdog(config.hang_timeout, str(checkpoint_directory(config)), comm.rank_if_started).start()
    check_inputs(config)

    # 2. Horovod, signals, data (rank 0 alone logs).
    ctx = comm.init(config.fusion_threshold_mb, config.cycle_time_ms, config.hierarchical_allreduce)
    stop_request = stop.StopRequest()
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stdout)
    world = World.join(config, ctx)

    # 3. Model, optimizer and loss scaler; where their checkpoints and the run's records go.
    training = build_training(config, world.loaders.num_classes, ctx.device)
    checkpointer, journal = Checkpointer(config, training, watchdog), Journal(config)

    # 4. Start state: rank 0's checkpoint when resuming, then rank 0's weights everywhere; train.
    if config.elastic:
        # Always from the newest checkpoint, loaded by rank 0 alone: a worker that joins a running job runs
        # this too, and must not call a collective that the others are not in (Horovod gives it rank >= 1
        # and the state of rank 0 when it joins).
        path, saved = checkpointer.load_newest(world) if ctx.is_primary else (None, None)
        start = saved.progress if saved else Progress()
    else:
        start, path = checkpointer.resume(world) if config.resume else (Progress(), None)
    watchdog.started_from(path)
    journal.open(world, start.epoch, noise_probe(config, ctx.size))
    trainer = (ElasticTrainer if config.elastic else Trainer)(
        config, training, world, checkpointer, journal, stop_request, watchdog
    )
    if config.elastic:
        state = comm.elastic_state(training.model, training.optimizer, **dataclasses.asdict(start))
        state.register_reset_callbacks([trainer.rejoin])
        comm.run_elastic(trainer.train_elastic, state)  # Horovod: broadcasts rank 0's state first
    else:
        comm.broadcast_state(training.model, training.optimizer, resumed=start.epoch > 0 or start.images_done > 0)
        trainer.train(start)
    watchdog.progress("shutdown")
    checkpointer.wait()
    journal.close()
    comm.shutdown()


def check_inputs(config: TrainConfig) -> None:
    """Before Horovod starts: every rank fails the same way, at once, before any rank spends time."""
    if LOADERS[config.loader].reads_files:
        check_data(Path(config.data))
    checkpoints = checkpoint_directory(config)
    if not (config.resume or config.elastic) and checkpoint.list_checkpoints(checkpoints):
        raise UserError(
            f"{checkpoints} already holds checkpoints of a run; pass --resume to continue it, or choose a new --output"
        )
    if config.elastic and not comm.launched_elastic():
        raise UserError(
            "--elastic: start the job with horovodrun --min-np N --max-np M "
            "--host-discovery-script SCRIPT (Horovod's elastic driver)"
        )


def build_training(config: TrainConfig, num_classes: int, device: torch.device) -> Training:
    """The model (zero-init residual gamma), the optimizer (--optimizer: the paper's Nesterov SGD without weight
    decay on BN/bias, Sec. 5.1, or LARS) wrapped by Horovod for --compression, and the loss scaler (amp-fp16:
    fp16's narrow range needs it)."""
    torch.manual_seed(config.seed)
    model = build_model(config.arch, num_classes, config.zero_init_residual, config.virtual_workers_per_pass).to(device)
    if config.channels_last:  # NHWC weights as well as batches: no layout conversion at any convolution
        model = model.to(memory_format=torch.channels_last)
    optimizer = comm.distributed_optimizer(
        build_optimizer(config, model),
        model,
        config.compression,
        config.batches_per_allreduce,
        config.gradient_predivide_factor,
        comm.PowerSGDSettings(rank=config.powersgd_rank, start_step=config.powersgd_start_step, seed=config.seed),
    )
    scaler = torch.amp.GradScaler(device.type, enabled=config.precision == "amp-fp16")
    return Training(model, optimizer, scaler)


def build_step(config: TrainConfig, model, optimizer, scaler, ctx: DistContext, on_phase=None) -> TrainStep:
    """The optimizer step `train` runs (and bench-train times): config.batches_per_allreduce passes of V x n,
    autocast for --precision, the --loss (with --label-smoothing); the BN statistics kept to restore when a step
    is skipped (--skip-nonfinite, and amp-fp16's overflow skips); the noise probe where it can tell two batch
    sizes."""
    return TrainStep(
        model,
        optimizer,
        scaler,
        autocast(config.precision, ctx.device),
        config.batches_per_allreduce,
        config.max_grad_norm,
        restore_bn=config.skip_nonfinite or scaler.is_enabled(),
        criterion=build_loss(config),
        noise_probe=noise_probe(config, ctx.size),
        on_phase=on_phase,
    )


def noise_probe(config: TrainConfig, ranks: int) -> bool:
    """Whether --noise-scale can be measured: a pass's gradient must be smaller than the step's (>= 2 ranks or
    passes), and the averaged gradient exact (PowerSGD's is a low-rank approximation)."""
    return config.noise_scale and ranks * config.batches_per_allreduce > 1 and config.compression != "powersgd"


class Trainer:
    """The epoch loop of one run: train(state) runs from `state` (a checkpoint.Progress, or Horovod's elastic
    state with the same fields) to the last epoch."""

    def __init__(
        self,
        config: TrainConfig,
        training: Training,
        world: World,
        checkpointer: Checkpointer,
        journal: Journal,
        stop_request: stop.StopRequest,
        watchdog: Watchdog,
    ):
        self.config, self.training, self.world, self.checkpointer = config, training, world, checkpointer
        self.journal, self.stop_request, self.watchdog = journal, stop_request, watchdog
        self.step = build_step(config, *training, world.ctx)

    def train(self, state) -> None:
        scaler = self.training.scaler
        if scaler.is_enabled():  # every rank scales its loss by rank 0's scale (a checkpoint's on resume)
            scaler.load_state_dict(comm.broadcast_object(scaler.state_dict(), name="grad_scaler"))
        while state.epoch < self.config.epochs:
            w, epoch = self.world, state.epoch
            # A resumed or resized epoch goes on from a whole step of the current kn (after a resize, up to
            # kn - 1 images of the last partial step are read again).
            first_step = state.images_done // w.global_batch
            seed_epoch(self.config.seed, epoch, w.ctx.rank)
            # The epoch's one global shuffle (Sec. 3, Remark 4), from where a resumed run left it.
            w.loaders.set_epoch(epoch, first_step * w.global_batch)
            received = self.train_one_epoch(state, first_step)
            if received:  # stopped by a signal within the epoch: a checkpoint here, then exit 0
                # The ranks' BN running statistics differ within an epoch; their mean is what the epoch's end
                # would average, and the running average is linear, so resuming from it changes only rounding.
                comm.average_bn_statistics(self.training.model)
                steps_done = state.images_done // w.global_batch
                return self.stop_at(received, state, self.checkpointer.save(state, w, steps_done))
            path = self.finish_epoch(state)
            state.epoch, state.images_done, state.sums, state.seconds, state.skipped = epoch + 1, 0, None, 0.0, 0
            state.commit()
            self.watchdog.progress("epoch end")  # the ranks agree on signals next: a collective, waits for all
            if state.epoch < self.config.epochs and (received := self.stop_request.agreed()):  # during val or save
                return self.stop_at(received, state, path or self.checkpointer.save(state, w))
        self.checkpointer.wait()
        self.journal.finished()

    def train_one_epoch(self, state, first_step: int) -> str | None:
        """Steps first_step .. steps_per_epoch - 1 of epoch state.epoch, or up to the step where the ranks
        agree that a signal asks them to stop (its name is returned). `state` follows along."""
        config, w, epoch, steps = self.config, self.world, state.epoch, self.world.steps_per_epoch
        self.training.model.train()
        self.watchdog.progress("training")
        sums = EpochSums(w.ctx.device, state.sums)
        micro_batches = iter(w.loaders.train)
        progress = EpochProgress(
            w.ctx.is_primary, epoch, config.epochs, first_step, steps, w.global_batch, config.status_every
        )
        record, received = Recorder(state, sums, w.global_batch), None
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
            if (step + 1) % stop.CHECK_EVERY == 0 and step + 1 < steps:  # the last step: checked after the epoch
                if received := self.stop_request.agreed():
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
        scaler = self.training.scaler
        scale = scaler.get_scale() if scaler.is_enabled() else None  # host sync, on a skipped step only
        if self.config.skip_nonfinite or scale is not None and scale >= 1:
            state.skipped += 1
            return self.journal.skipped_step(state, step, scale)
        raise Diverged(self.journal.diverged(self.world, state.epoch, step, self.checkpointer.newest()))

    def finish_epoch(self, state) -> Path | None:
        """Average BN statistics, evaluate (every --eval-every epochs and after the last), check that every
        rank holds the same weights, (rank 0) write the epoch's metrics, and start writing a checkpoint (every
        --checkpoint-every epochs and after the last; its path, else None). What each part took goes into
        metrics.jsonl as boundary_seconds: at 256 H100s an epoch's steps take ~0.7 s (bench-epoch)."""
        w, epoch, config, model = self.world, state.epoch, self.config, self.training.model
        last, clock, val, path = epoch + 1 == config.epochs, Laps(), None, None
        if not last:  # the next epoch's first batches decode during the evaluation and the checkpoint (DALI)
            w.loaders.set_epoch(epoch + 1)
        self.watchdog.progress("evaluation")
        comm.average_bn_statistics(model)
        clock.lap("bn_average")
        if (epoch + 1) % config.eval_every == 0 or last:
            on_batch = lambda: self.watchdog.progress("evaluation")  # noqa: E731
            val = evaluate(model, w.loaders.val, w.ctx.device, self.step.autocast, on_batch)
            val["seconds"] = clock.lap("evaluation")
        digests = comm.gather_digests(weights_digest(model))  # every rank must hold the same model
        clock.lap("digests")
        if len(set(digests)) > 1:
            log.warning("epoch %d: ranks hold different weights (digests %s)", epoch + 1, digests)
        if (epoch + 1) % config.checkpoint_every == 0 or last:
            path = self.checkpointer.save(Progress(epoch=epoch + 1), w)
            clock.lap("checkpoint_stall")
        self.journal.epoch(w, state, val, digests, clock.laps)
        return path

    def stop_at(self, received: str, state, path: Path) -> None:
        self.checkpointer.wait()  # the checkpoint is on disk before stopped.json says to requeue from it
        self.journal.stopped(self.world, received, state, path)


class ElasticTrainer(Trainer):
    """--elastic: Horovod calls train_elastic(state) again, from the last commit, after the set of ranks
    changed (rejoin)."""

    rejoined = False  # whether the set of ranks has changed since the start

    def rejoin(self) -> None:
        """Elastic reset callback: the ranks changed. New shards, global batch and so lr (linear scaling rule,
        Sec. 2.1) for the new world size; the next train(state) continues the epoch's shuffle where the last
        commit left it."""
        old = self.world
        self.world, self.rejoined = World.join(self.config, comm.context()), True
        self.journal.rejoined(old, self.world)

    def train_elastic(self, state) -> None:
        """train(state) as Horovod's elastic loop calls it: again after the ranks changed. While Horovod
        re-forms the ring the watchdog does not count: horovodrun's --elastic-timeout bounds that wait."""
        self.watchdog.resume()
        if self.rejoined:  # Horovod rolled back to the last commit after a failure, or stopped at one
            where = state.epoch + 1, state.images_done
            log.info("elastic: epoch %d goes on from image %d of the epoch (the last commit)", *where)
        try:
            self.train(state)
        except comm.ELASTIC_INTERRUPTS:
            self.watchdog.pause()
            raise


class Recorder:
    """Brings `state` up to `step_done` steps of its epoch: images read, the metric sums of all ranks so far
    (a collective), seconds (what a checkpoint or an elastic commit keeps of a partial epoch)."""

    def __init__(self, state, sums: EpochSums, global_batch: int):
        self.state, self.sums, self.global_batch = state, sums, global_batch
        self.start_time, self.seconds_before = time.perf_counter(), state.seconds

    def __call__(self, step_done: int) -> None:
        self.state.images_done = step_done * self.global_batch
        self.state.sums = self.sums.fold("train_sums")
        self.state.seconds = self.seconds_before + time.perf_counter() - self.start_time


def seed_epoch(seed: int, epoch: int, rank: int) -> None:
    """Augmentation randomness for one epoch: different on every rank, and a function of (seed, epoch, rank)
    alone, so a run resumed at an epoch boundary draws exactly what the uninterrupted run draws."""
    state = int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])
    torch.manual_seed(state)
    random.seed(state)
    np.random.seed(state)


def command(config: TrainConfig) -> int:
    """Every rank runs this. An error is one line that names the rank; the launcher (horovodrun, mpirun,
    srun) sees the non-zero status and ends the job. The ranks that survive a failed peer say so in one line
    each, not a traceback each from hundreds of ranks."""
    try:
        main(dataclasses.replace(config, data=node_path(config.data)))  # a node-local copy (stage.py)
    except comm.PeerFailure:
        raise UserError(
            f"rank {comm.rank_if_started()}: stopped: another rank failed (or, under Gloo, stopped "
            "responding for HOROVOD_GLOO_TIMEOUT_SECONDS) and Horovod shut down; the launcher's log "
            "names the rank that failed first"
        ) from None
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
        field_defaults(TrainConfig)
    )


COMMAND = Command(TrainConfig, command, epilog=recipes_help)
