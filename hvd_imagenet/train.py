"""`hvd-imagenet train`: ResNet on ImageNet with the recipe of Goyal et al. (2017), on every Horovod rank.

Read top to bottom: check the inputs, start Horovod, build data, model and optimizer, resume or broadcast the
start state, then per epoch: train (lr from schedule.lr_at every step), evaluate, write metrics and a checkpoint.
A SIGUSR1 or SIGTERM (SLURM's warning before the time limit, scancel) stops every rank at the same step with a
checkpoint there; `--resume` continues from it as if nothing had happened.
"""
from __future__ import annotations

import json
import logging
import random
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import checkpoint, comm
from .config import TrainConfig
from .context import DistContext
from .data import build_loaders
from .data.layout import check_layout
from .errors import UserError
from .metrics import EpochSums, RunWriter, format_table, read_metrics
from .model import build_model, parameter_groups, weights_digest
from .schedule import lr_at, peak_lr

log = logging.getLogger("hvd_imagenet")
PROGRESS_EVERY = 10  # steps between progress-bar updates on rank 0 (each reads the loss: a host sync)
STOP_CHECK_EVERY = 10  # steps between the ranks' agreement on a stop request (one 1-element allreduce)
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
STOPPED_FILE = "stopped.json"  # written by rank 0 when a signal stopped the run; launchers requeue on it


def main(config: TrainConfig) -> None:
    # 1. Inputs first: every rank fails the same way, at once, before any rank spends time.
    if config.loader != "synthetic":
        check_layout(Path(config.data))
    output = Path(config.output)
    checkpoints = Path(config.checkpoint_dir or output / "checkpoints")
    if not config.resume and checkpoint.list_checkpoints(checkpoints):
        raise UserError(f"{checkpoints} already holds checkpoints of a run; pass --resume to continue it, or "
                        "choose a new --output")

    # 2. Horovod, logging (rank 0 alone prints), signals, data.
    ctx = comm.init()
    stop = StopRequest()
    logging.basicConfig(level=logging.INFO if ctx.is_primary else logging.WARNING, format="%(message)s",
                        stream=sys.stdout)
    loaders = build_loaders(config, ctx)
    global_batch = ctx.size * config.batches_per_allreduce * config.batch_size  # kn (virtual workers included)
    steps_per_epoch = loaders.train_batches // config.batches_per_allreduce
    if config.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, config.max_steps_per_epoch)
    if steps_per_epoch < 1:
        raise UserError(f"the training set gives no full step of global batch {global_batch} "
                        f"({loaders.train_batches} micro-batches per rank); use fewer ranks or a smaller batch")

    # 3. Model and optimizer: zero-init residual gamma, no weight decay on BN/bias (Sec. 5.1), Nesterov SGD.
    torch.manual_seed(config.seed)
    model = build_model(config.arch, loaders.num_classes, config.zero_init_residual).to(ctx.device)
    optimizer = torch.optim.SGD(
        parameter_groups(model, config.weight_decay, config.bn_weight_decay),
        lr=config.lr.base_lr, momentum=config.momentum, nesterov=config.nesterov,
    )
    optimizer = comm.distributed_optimizer(optimizer, model, config.compression, config.batches_per_allreduce)
    criterion = torch.nn.CrossEntropyLoss()

    # 4. Start state: rank 0's checkpoint when resuming, then rank 0's weights everywhere.
    start = resume(config, checkpoints, model, optimizer, ctx) if config.resume else Position()
    comm.broadcast_state(model, optimizer, resumed=start.epoch > 0 or start.step_in_epoch > 0)

    resolved = {**config.to_dict(), "world_size": ctx.size, "controller": comm.controller(),
                "global_batch": global_batch,
                "peak_lr": peak_lr(config.lr, global_batch), "steps_per_epoch": steps_per_epoch,
                "num_classes": loaders.num_classes, "device": str(ctx.device),
                "input": loaders.description}
    writer = RunWriter(output, resolved, keep_epochs=start.epoch) if ctx.is_primary else None
    if writer:
        (output / STOPPED_FILE).unlink(missing_ok=True)
    log.info("hvd-imagenet: %s on %d rank(s) (%s), n=%d, global batch kn=%d, peak lr %.4g, %d steps/epoch",
             config.arch, ctx.size, ctx.device.type, config.batch_size, global_batch, resolved["peak_lr"],
             steps_per_epoch)
    log.info("input: %s", loaders.description)

    def save_checkpoint(epoch: int, step_in_epoch: int = 0, partial: dict | None = None) -> Path:
        return checkpoint.save(checkpoints, {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
            "step": epoch * steps_per_epoch + step_in_epoch, "step_in_epoch": step_in_epoch, "partial": partial,
            "config": resolved,
        })

    # 5. The epochs.
    for epoch in range(start.epoch, config.epochs):
        resumed = start if epoch == start.epoch else Position(epoch)
        seed_epoch(config.seed, epoch, ctx.rank)
        # The epoch's one global shuffle (Sec. 3, Remark 4), from where a resumed run left it.
        loaders.set_epoch(epoch, resumed.step_in_epoch * config.batches_per_allreduce)
        done = train_one_epoch(model, optimizer, criterion, loaders.train, resumed, steps_per_epoch,
                               global_batch, config, ctx, stop)
        if done.step < steps_per_epoch:  # stopped by a signal: a checkpoint here, then exit 0
            # The ranks' BN running statistics differ within an epoch; their mean is what the epoch's end
            # would average, and the running average is linear, so resuming from the mean changes only rounding.
            comm.average_bn_statistics(model)
            partial = {"sums": done.sums.reduced_totals("train_sums"), "seconds": done.seconds}
            path = save_checkpoint(epoch, done.step, partial) if ctx.is_primary else None
            report_stop(done.signal, epoch, done.step, steps_per_epoch, path, output, ctx)
            break
        train, seconds, lr = done.sums.reduce("train_sums"), done.seconds, done.lr
        comm.average_bn_statistics(model)
        val = evaluate(model, criterion, loaders.val, ctx.device)
        digests = comm.gather_digests(weights_digest(model))  # every rank must hold the same model
        if len(set(digests)) > 1:
            log.warning("epoch %d: ranks hold different weights (digests %s)", epoch + 1, digests)
        if writer:
            writer.epoch({
                "epoch": epoch + 1, "lr": lr, "train_loss": train["loss"], "train_top1": train["top1"],
                "val_loss": val["loss"], "val_top1": val["top1"], "val_top5": val["top5"],
                "val_images": val["images"], "images_per_sec": steps_per_epoch * global_batch / seconds,
                "epoch_seconds": seconds, "world_size": ctx.size, "global_batch": global_batch,
                "steps": (epoch + 1) * steps_per_epoch, "weights_digests": digests,
            })
            path = save_checkpoint(epoch + 1)
            log.info("epoch %d/%d: train loss %.4f top1 %.2f%% | val loss %.4f top1 %.2f%% top5 %.2f%% | %.1f s",
                     epoch + 1, config.epochs, train["loss"], train["top1"], val["loss"], val["top1"],
                     val["top5"], seconds)
        received = stop.agreed() if epoch + 1 < config.epochs else None  # a signal during val or the save
        if received:
            report_stop(received, epoch + 1, 0, steps_per_epoch, path if ctx.is_primary else None, output, ctx)
            break
    else:
        if writer:
            log.info("\n%s", format_table(read_metrics(output)))
    if writer:
        writer.close()
    comm.shutdown()


@dataclass(frozen=True)
class Position:
    """Where training starts: `epoch` epochs and `step_in_epoch` steps of the next one done, and the metric
    sums and seconds of that partial epoch (from a checkpoint written on a signal)."""

    epoch: int = 0
    step_in_epoch: int = 0
    partial: dict | None = None


@dataclass
class EpochProgress:
    step: int  # steps of the epoch done: steps_per_epoch, or fewer when a signal stopped it
    sums: EpochSums
    seconds: float
    lr: float
    signal: str | None


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


def report_stop(received: str, epoch: int, step: int, steps: int, path: Path | None, output: Path,
                ctx: DistContext) -> None:
    """Rank 0 says where the run stopped and writes stopped.json (what the sbatch script requeues on)."""
    if not ctx.is_primary:
        return
    record = {"signal": received, "epochs_done": epoch, "steps_done_in_epoch": step, "checkpoint": str(path)}
    (output / STOPPED_FILE).write_text(json.dumps(record) + "\n")
    where = f"after epoch {epoch}" if step == 0 else f"at step {step}/{steps} of epoch {epoch + 1}"
    log.info("%s: stopped %s; checkpoint %s; continue with --resume", received, where, path)


def train_one_epoch(model, optimizer, criterion, batches, start: Position, steps: int, global_batch: int,
                    config: TrainConfig, ctx: DistContext, stop: StopRequest) -> EpochProgress:
    """Steps start.step_in_epoch .. steps - 1 of epoch start.epoch, or up to the step where the ranks agree
    that a signal asks them to stop."""
    model.train()
    epoch, first_step = start.epoch, start.step_in_epoch
    carried = start.partial or {"sums": None, "seconds": 0.0}
    sums = EpochSums(ctx.device, carried["sums"] if ctx.is_primary else None)  # counted once, on rank 0
    micro_batches = iter(batches)
    progress = tqdm(total=steps, initial=first_step, desc=f"epoch {epoch + 1}/{config.epochs}", unit="step",
                    disable=not ctx.is_primary, file=sys.stdout, dynamic_ncols=True, leave=False,
                    mininterval=0.5 if sys.stdout.isatty() else 30)  # a launcher's pipe: fewer redraws
    start_time = time.perf_counter()
    lr, received = 0.0, None
    for step in range(first_step, steps):
        # Gradual warmup, then the step schedule, as a function of the global iteration (Sec. 2.2).
        lr = lr_at(config.lr, epoch * steps + step, steps, global_batch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad()  # Horovod 0.28 takes no set_to_none; torch 2 defaults to it
        for _ in range(config.batches_per_allreduce):
            images, target = next(micro_batches)
            output = model(images)  # BN statistics over this micro-batch's n images only (Sec. 2.3)
            loss = criterion(output, target)
            # Mean over n here, / batches_per_allreduce, averaged over the k ranks by Horovod: the loss
            # normalized by the whole minibatch kn (Sec. 3, Remark 3).
            (loss / config.batches_per_allreduce).backward()
            sums.add(output, target, loss)
        optimizer.step()  # Horovod: waits for the allreduce of every gradient, then the SGD update
        progress.update()
        if ctx.is_primary and (step % PROGRESS_EVERY == 0 or step == steps - 1):
            elapsed = time.perf_counter() - start_time
            progress.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.4g}",  # host sync, rank 0 only
                                 img_s=f"{(step + 1 - first_step) * global_batch / elapsed:.1f}")
        if (step + 1) % STOP_CHECK_EVERY == 0 and step + 1 < steps:  # the last step: checked after the epoch
            received = stop.agreed()
            if received:
                steps = step + 1
                break
    progress.close()
    seconds = carried["seconds"] + time.perf_counter() - start_time
    return EpochProgress(steps, sums, seconds, lr, received)


@torch.no_grad()
def evaluate(model, criterion, batches, device: torch.device) -> dict:
    """This rank's shard of val; the sums over all ranks count every val image exactly once."""
    model.eval()
    sums = EpochSums(device)
    for images, target in batches:
        output = model(images)
        sums.add(output, target, criterion(output, target))
    return sums.reduce("val_sums")


def seed_epoch(seed: int, epoch: int, rank: int) -> None:
    """Augmentation randomness for one epoch: different on every rank, and a function of (seed, epoch, rank)
    alone, so a run resumed at an epoch boundary draws exactly what the uninterrupted run draws."""
    state = int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])
    torch.manual_seed(state)
    random.seed(state)
    np.random.seed(state)


def resume(config: TrainConfig, checkpoints: Path, model, optimizer, ctx: DistContext) -> Position:
    """Rank 0 loads the latest checkpoint; every rank learns the position to start from (or the error)."""
    outcome = {"position": {}, "error": None}
    if ctx.is_primary:
        if not checkpoint.list_checkpoints(checkpoints):
            log.info("--resume: no checkpoint in %s yet, starting from epoch 1", checkpoints)
        else:
            try:
                path, state = checkpoint.load_latest(checkpoints)
                saved = state["config"]
                if saved["global_batch"] != ctx.size * config.batches_per_allreduce * config.batch_size:
                    raise UserError(f"--resume: {path} was trained with global batch {saved['global_batch']} "
                                    f"({saved['world_size']} ranks); this run's differs, which changes the lr "
                                    "schedule (linear scaling rule)")
                model.load_state_dict(state["model"])
                optimizer.load_state_dict(state["optimizer"])
                outcome["position"] = {"epoch": state["epoch"], "step_in_epoch": state["step_in_epoch"],
                                       "partial": state.get("partial")}
                log.info("--resume: continuing from %s (%d epochs and %d steps done)", path, state["epoch"],
                         state["step_in_epoch"])
            except UserError as error:
                outcome["error"] = str(error)
    outcome = comm.broadcast_object(outcome, name="resume")  # Horovod: no rank hangs when rank 0 fails
    if outcome["error"]:
        raise UserError(outcome["error"])
    return Position(**outcome["position"])
