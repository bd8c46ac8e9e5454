"""`hvd-imagenet train`: ResNet on ImageNet with the recipe of Goyal et al. (2017), on every Horovod rank.

Read top to bottom: check the inputs, start Horovod, build data, model and optimizer, resume or broadcast the
start state, then per epoch: train (lr from schedule.lr_at every step), evaluate, write metrics and a checkpoint.
"""
from __future__ import annotations

import logging
import random
import sys
import time
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


def main(config: TrainConfig) -> None:
    # 1. Inputs first: every rank fails the same way, at once, before any rank spends time.
    if config.loader != "synthetic":
        check_layout(Path(config.data))
    output = Path(config.output)
    if not config.resume and checkpoint.list_checkpoints(output):
        raise UserError(f"--output {output} already holds a run; pass --resume to continue it, or a new directory")

    # 2. Horovod, logging (rank 0 alone prints), data.
    ctx = comm.init()
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
    start_epoch = resume(config, output, model, optimizer, ctx) if config.resume else 0
    comm.broadcast_state(model, optimizer, resumed=start_epoch > 0)

    resolved = {**config.to_dict(), "world_size": ctx.size, "global_batch": global_batch,
                "peak_lr": peak_lr(config.lr, global_batch), "steps_per_epoch": steps_per_epoch,
                "num_classes": loaders.num_classes, "device": str(ctx.device),
                "input": loaders.description}
    writer = RunWriter(output, resolved, keep_epochs=start_epoch) if ctx.is_primary else None
    log.info("hvd-imagenet: %s on %d rank(s) (%s), n=%d, global batch kn=%d, peak lr %.4g, %d steps/epoch",
             config.arch, ctx.size, ctx.device.type, config.batch_size, global_batch, resolved["peak_lr"],
             steps_per_epoch)
    log.info("input: %s", loaders.description)

    # 5. The epochs.
    for epoch in range(start_epoch, config.epochs):
        seed_epoch(config.seed, epoch, ctx.rank)
        loaders.set_epoch(epoch)  # the epoch's one global shuffle (Sec. 3, Remark 4)
        train, seconds, lr = train_one_epoch(model, optimizer, criterion, loaders.train, epoch, steps_per_epoch,
                                             global_batch, config, ctx)
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
            checkpoint.save(output, epoch + 1, {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch + 1,
                "step": (epoch + 1) * steps_per_epoch, "config": resolved,
            })
            log.info("epoch %d/%d: train loss %.4f top1 %.2f%% | val loss %.4f top1 %.2f%% top5 %.2f%% | %.1f s",
                     epoch + 1, config.epochs, train["loss"], train["top1"], val["loss"], val["top1"],
                     val["top5"], seconds)
    if writer:
        writer.close()
        log.info("\n%s", format_table(read_metrics(output)))
    comm.shutdown()


def train_one_epoch(model, optimizer, criterion, batches, epoch: int, steps: int, global_batch: int,
                    config: TrainConfig, ctx: DistContext) -> tuple[dict, float, float]:
    model.train()
    sums = EpochSums(ctx.device)
    micro_batches = iter(batches)
    progress = tqdm(total=steps, desc=f"epoch {epoch + 1}/{config.epochs}", unit="step", disable=not ctx.is_primary,
                    file=sys.stdout, dynamic_ncols=True, leave=False,
                    mininterval=0.5 if sys.stdout.isatty() else 30)  # a launcher's pipe: fewer redraws
    start = time.perf_counter()
    for step in range(steps):
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
            elapsed = time.perf_counter() - start
            progress.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.4g}",  # host sync, rank 0 only
                                 img_s=f"{(step + 1) * global_batch / elapsed:.1f}")
    progress.close()
    seconds = time.perf_counter() - start
    return sums.reduce("train_sums"), seconds, lr


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


def resume(config: TrainConfig, output: Path, model, optimizer, ctx: DistContext) -> int:
    """Rank 0 loads the latest checkpoint; every rank learns the epoch to start from (or the error)."""
    outcome = {"epoch": 0, "error": None}
    if ctx.is_primary:
        if not checkpoint.list_checkpoints(output):
            log.info("--resume: no checkpoint in %s yet, starting from epoch 1", checkpoint.checkpoint_dir(output))
        else:
            try:
                path, state = checkpoint.load_latest(output)
                saved = state["config"]
                if saved["global_batch"] != ctx.size * config.batches_per_allreduce * config.batch_size:
                    raise UserError(f"--resume: {path} was trained with global batch {saved['global_batch']} "
                                    f"({saved['world_size']} ranks); this run's differs, which changes the lr "
                                    "schedule (linear scaling rule)")
                model.load_state_dict(state["model"])
                optimizer.load_state_dict(state["optimizer"])
                outcome["epoch"] = state["epoch"]
                log.info("--resume: continuing from %s (epoch %d done)", path, state["epoch"])
            except UserError as error:
                outcome["error"] = str(error)
    outcome = comm.broadcast_object(outcome, name="resume")  # Horovod: no rank hangs when rank 0 fails
    if outcome["error"]:
        raise UserError(outcome["error"])
    return outcome["epoch"]
