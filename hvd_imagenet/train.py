"""`hvd-imagenet train`: ResNet on ImageNet with the recipe of Goyal et al. (2017), on every Horovod rank.

Read top to bottom: check the inputs, start Horovod, build data, model and optimizer, resume or broadcast the
start state, then per epoch: train (lr from schedule.lr_at every step), evaluate, write metrics and a checkpoint.
A SIGUSR1 or SIGTERM (SLURM's warning before the time limit, scancel) stops every rank at the same step with a
checkpoint there; `--resume` continues from it as if nothing had happened. Averaged gradients that are NaN or
inf stop the run (or skip the step, --skip-nonfinite). With --elastic, ranks may leave or join mid-epoch.
"""
from __future__ import annotations

import dataclasses
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
from .data import Loaders, build_loaders
from .data.layout import check_layout
from .errors import Diverged, UserError
from .metrics import EpochSums, RunWriter, format_table, read_metrics, summarize
from .model import build_model, mixed_precision, parameter_groups, weights_digest
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

    # 3. Model and optimizer: zero-init residual gamma, no weight decay on BN/bias (Sec. 5.1), Nesterov SGD.
    torch.manual_seed(config.seed)
    model = build_model(config.arch, world.loaders.num_classes, config.zero_init_residual).to(ctx.device)
    optimizer = torch.optim.SGD(  # lr 0 until the schedule sets it at the first step
        parameter_groups(model, config.weight_decay, config.bn_weight_decay),
        lr=0.0, momentum=config.momentum, nesterov=config.nesterov,
    )
    optimizer = comm.distributed_optimizer(
        optimizer, model, config.compression, config.batches_per_allreduce, config.gradient_predivide_factor,
        comm.PowerSGDSettings(rank=config.powersgd_rank, start_step=config.powersgd_start_step, seed=config.seed))
    # Mixed precision (--precision): autocast in forward and loss; fp16's narrow range needs loss scaling.
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=config.precision == "amp-fp16")

    # 4. Start state: rank 0's checkpoint when resuming, then rank 0's weights everywhere; train.
    if config.elastic:
        # Always from the newest checkpoint, loaded by rank 0 alone: a worker that joins a running job runs
        # this too, and must not call a collective that the others are not in (Horovod gives it rank >= 1
        # and the state of rank 0 when it joins).
        start = (load_newest(config, checkpoints, model, optimizer, scaler, world) if world.ctx.is_primary
                 else Progress())
        trainer = Trainer(config, model, optimizer, scaler, world, checkpoints, output, stop, start.epoch)
        state = comm.elastic_state(model, optimizer, **dataclasses.asdict(start))
        state.register_reset_callbacks([trainer.rejoin])
        comm.run_elastic(trainer.train, state)  # Horovod: broadcasts rank 0's state first
    else:
        start = resume(config, checkpoints, model, optimizer, scaler, world) if config.resume else Progress()
        trainer = Trainer(config, model, optimizer, scaler, world, checkpoints, output, stop, start.epoch)
        comm.broadcast_state(model, optimizer, resumed=start.epoch > 0 or start.images_done > 0)
        trainer.train(start)
    trainer.close()
    comm.shutdown()


@dataclass
class Progress:
    """How far training is: `epoch` epochs done and the first `images_done` images of the next epoch's
    shuffle read, with that partial epoch's metric sums (all ranks'), seconds and skipped steps. Written
    into a checkpoint when a signal stops the run. An elastic job keeps the same fields in Horovod's state,
    whose commit() saves a copy to roll back to; here there is nothing to roll back to."""

    epoch: int = 0
    images_done: int = 0
    sums: tuple[float, ...] | None = None
    seconds: float = 0.0
    skipped: int = 0

    def commit(self) -> None:
        pass


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
        global_batch = ctx.size * config.batches_per_allreduce * config.batch_size
        steps = loaders.train_batches // config.batches_per_allreduce
        if config.max_steps_per_epoch:
            steps = min(steps, config.max_steps_per_epoch)
        if steps < 1:
            raise UserError(f"the training set gives no full step of global batch {global_batch} "
                            f"({loaders.train_batches} micro-batches per rank); use fewer ranks or a smaller batch")
        logging.getLogger().setLevel(logging.INFO if ctx.is_primary else logging.WARNING)
        return cls(ctx, loaders, global_batch, steps)


class Trainer:
    """The epoch loop of one run. train(state) runs from `state` to the last epoch; under --elastic Horovod
    calls it again, from the last commit, after the set of ranks changed (rejoin)."""

    def __init__(self, config: TrainConfig, model, optimizer, scaler, world: World, checkpoints: Path,
                 output: Path, stop: "StopRequest", epochs_done: int):
        self.config, self.model, self.optimizer, self.scaler, self.world = config, model, optimizer, scaler, world
        self.autocast = mixed_precision(config.precision, world.ctx.device)
        self.checkpoints, self.output, self.stop = checkpoints, output, stop
        self.criterion = torch.nn.CrossEntropyLoss()
        self.writer = self.open_writer(epochs_done)
        self.describe()

    def resolved_config(self) -> dict:
        w = self.world
        return {**self.config.to_dict(), "world_size": w.ctx.size, "controller": comm.controller(),
                "global_batch": w.global_batch, "peak_lr": peak_lr(self.config.lr, w.global_batch),
                "steps_per_epoch": w.steps_per_epoch, "num_classes": w.loaders.num_classes,
                "device": str(w.ctx.device), "input": w.loaders.description}

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
        log.info("input: %s", w.loaders.description)

    def rejoin(self) -> None:
        """Elastic reset callback: the ranks changed. New shards, global batch and so lr (linear scaling rule,
        Sec. 2.1) for the new world size; the next train(state) continues the epoch's shuffle where the last
        commit left it."""
        old = self.world
        self.world = World.join(self.config, comm.context())
        log.info("elastic: %d -> %d ranks; global batch %d -> %d, peak lr %.4g -> %.4g", old.ctx.size,
                 self.world.ctx.size, old.global_batch, self.world.global_batch,
                 peak_lr(self.config.lr, old.global_batch), peak_lr(self.config.lr, self.world.global_batch))
        if self.world.ctx.is_primary and not self.writer:  # rank 0 left: its successor writes from now on
            self.writer = RunWriter(self.output, self.resolved_config(), keep_epochs=len(read_metrics(self.output)))

    def close(self) -> None:
        if self.writer:
            self.writer.close()

    def save_checkpoint(self, state, step_in_epoch: int = 0) -> Path:
        return checkpoint.save(self.checkpoints, {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(), "epoch": state.epoch,
            "step": state.epoch * self.world.steps_per_epoch + step_in_epoch, "step_in_epoch": step_in_epoch,
            "images_done": state.images_done,
            "partial": {"sums": state.sums, "seconds": state.seconds, "skipped": state.skipped},
            "config": self.resolved_config(),
        }, keep=self.config.keep_checkpoints)

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
                path = self.save_checkpoint(state, state.images_done // w.global_batch) if w.ctx.is_primary else None
                self.report_stop(received, state, path)
                return
            path = self.finish_epoch(state)
            state.epoch, state.images_done, state.sums, state.seconds, state.skipped = epoch + 1, 0, None, 0.0, 0
            state.commit()
            received = self.stop.agreed() if state.epoch < config.epochs else None  # a signal during val or save
            if received:
                self.report_stop(received, state, path)
                return
        if self.writer:
            log.info("\n%s", format_table(read_metrics(self.output)))

    def train_one_epoch(self, state, first_step: int) -> str | None:
        """Steps first_step .. steps_per_epoch - 1 of epoch state.epoch, or up to the step where the ranks
        agree that a signal asks them to stop (its name is returned). `state` follows along."""
        config, w, model, optimizer = self.config, self.world, self.model, self.optimizer
        model.train()
        epoch, steps = state.epoch, w.steps_per_epoch
        sums = EpochSums(w.ctx.device, state.sums)
        micro_batches = iter(w.loaders.train)
        progress = tqdm(total=steps, initial=first_step, desc=f"epoch {epoch + 1}/{config.epochs}", unit="step",
                        disable=not w.ctx.is_primary, file=sys.stdout, dynamic_ncols=True, leave=False,
                        mininterval=0.5 if sys.stdout.isatty() else 30)  # a launcher's pipe: fewer redraws
        start_time, seconds_before = time.perf_counter(), state.seconds
        bn_stats = running_stats(model)

        def record(step_done: int) -> None:  # the state as of `step_done` steps of this epoch
            state.images_done = step_done * w.global_batch
            state.sums = sums.fold("train_sums")
            state.seconds = seconds_before + time.perf_counter() - start_time

        received = None
        for step in range(first_step, steps):
            # Gradual warmup, then the step schedule, as a function of the global iteration (Sec. 2.2).
            lr = lr_at(config.lr, epoch * steps + step, steps, w.global_batch)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.zero_grad()  # Horovod 0.28 takes no set_to_none; torch 2 defaults to it
            bn_before = [b.clone() for b in bn_stats] if config.skip_nonfinite or self.scaler.is_enabled() else None
            step_sums = 0
            for _ in range(config.batches_per_allreduce):
                images, target = next(micro_batches)
                with self.autocast:
                    output = model(images)  # BN statistics over this micro-batch's n images only (Sec. 2.3)
                    loss = self.criterion(output, target)
                # Mean over n here, / batches_per_allreduce, averaged over the k ranks by Horovod: the loss
                # normalized by the whole minibatch kn (Sec. 3, Remark 3). amp-fp16 scales it up first.
                self.scaler.scale(loss / config.batches_per_allreduce).backward()
                step_sums = step_sums + EpochSums.of_batch(output.float(), target, loss.float())
            optimizer.synchronize()  # Horovod: the gradients averaged over all ranks are in .grad now
            self.scaler.unscale_(optimizer)  # amp-fp16: true gradients again, before clipping and the step
            if config.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            if self.apply_step():
                sums.add(step_sums)
            elif config.skip_nonfinite or self.scaler.is_enabled() and self.scaler.get_scale() >= 1:
                # As if the step had not been: weights and BN statistics as before. With amp-fp16 this is
                # GradScaler's overflow skip (it halved the scale); a scale below 1 means divergence.
                for buffer, before in zip(bn_stats, bn_before):
                    buffer.copy_(before)
                state.skipped += 1
                log.warning("epoch %d step %d: NaN/inf in the averaged gradients; step skipped (%d so far)%s",
                            epoch + 1, step + 1, state.skipped,
                            f", loss scale now {self.scaler.get_scale():g}" if self.scaler.is_enabled() else "")
            else:
                message = self.divergence_message(epoch, step)
                if w.ctx.is_primary:
                    record = {"epoch": epoch + 1, "step": step + 1, "message": message}
                    (self.output / Diverged.RECORD_FILE).write_text(json.dumps(record) + "\n")
                raise Diverged(message)
            progress.update()
            if w.ctx.is_primary and (step % PROGRESS_EVERY == 0 or step == steps - 1):
                elapsed = time.perf_counter() - start_time
                progress.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.4g}",  # host sync, rank 0 only
                                     img_s=f"{(step + 1 - first_step) * w.global_batch / elapsed:.1f}")
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

    def apply_step(self) -> bool:
        """The optimizer step with the averaged gradients if they are finite; whether it was taken. Every rank
        reaches the same verdict: they hold the same averages."""
        with self.optimizer.skip_synchronize():  # Horovod: already synchronized
            if self.scaler.is_enabled():  # GradScaler steps unless unscale_ found NaN/inf, then halves the scale
                scale = self.scaler.get_scale()
                self.scaler.step(self.optimizer)
                self.scaler.update()
                return self.scaler.get_scale() >= scale
            if not gradients_finite(self.model):
                return False
            self.optimizer.step()
            return True

    def divergence_message(self, epoch: int, step: int) -> str:
        found = checkpoint.list_checkpoints(self.checkpoints)
        last_good = f"last good checkpoint {found[-1]}" if found else "no checkpoint written yet"
        return (f"stopped: NaN/inf in the averaged gradients at step {step + 1}/{self.world.steps_per_epoch} of "
                f"epoch {epoch + 1} (a rank's loss diverged); nothing was saved after it; {last_good}; lower the "
                "lr or lengthen the warmup, resume with --resume, or pass --skip-nonfinite")

    def finish_epoch(self, state) -> Path | None:
        """Average BN statistics, evaluate, check that every rank holds the same weights, and (rank 0) write
        the epoch's metrics and checkpoint."""
        w, epoch = self.world, state.epoch
        train = summarize(state.sums)
        comm.average_bn_statistics(self.model)
        val = evaluate(self.model, self.criterion, w.loaders.val, w.ctx.device, self.autocast)
        digests = comm.gather_digests(weights_digest(self.model))  # every rank must hold the same model
        if len(set(digests)) > 1:
            log.warning("epoch %d: ranks hold different weights (digests %s)", epoch + 1, digests)
        if not self.writer:
            return None
        steps = w.steps_per_epoch
        self.writer.epoch({
            "epoch": epoch + 1, "lr": lr_at(self.config.lr, (epoch + 1) * steps - 1, steps, w.global_batch),
            "train_loss": train["loss"], "train_top1": train["top1"], "train_images": train["images"],
            "val_loss": val["loss"], "val_top1": val["top1"], "val_top5": val["top5"],
            "val_images": val["images"], "images_per_sec": train["images"] / state.seconds,
            "epoch_seconds": state.seconds, "world_size": w.ctx.size, "global_batch": w.global_batch,
            "steps": (epoch + 1) * steps, "skipped_steps": state.skipped, "weights_digests": digests,
        })
        log.info("epoch %d/%d: train loss %.4f top1 %.2f%% | val loss %.4f top1 %.2f%% top5 %.2f%% | %.1f s",
                 epoch + 1, self.config.epochs, train["loss"], train["top1"], val["loss"], val["top1"],
                 val["top5"], state.seconds)
        return self.save_checkpoint(Progress(epoch=epoch + 1))

    def report_stop(self, received: str, state, path: Path | None) -> None:
        """Rank 0 says where the run stopped and writes stopped.json (what the sbatch script requeues on)."""
        if not self.world.ctx.is_primary:
            return
        step = state.images_done // self.world.global_batch
        record = {"signal": received, "epochs_done": state.epoch, "steps_done_in_epoch": step,
                  "checkpoint": str(path)}
        (self.output / STOPPED_FILE).write_text(json.dumps(record) + "\n")
        where = (f"after epoch {state.epoch}" if step == 0
                 else f"at step {step}/{self.world.steps_per_epoch} of epoch {state.epoch + 1}")
        log.info("%s: stopped %s; checkpoint %s; continue with --resume", received, where, path)


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


def running_stats(model: torch.nn.Module) -> list[torch.Tensor]:
    """The BN buffers that a forward pass in train mode updates, whatever becomes of the step."""
    return [buffer for name, buffer in model.named_buffers()
            if name.endswith(("running_mean", "running_var", "num_batches_tracked"))]


def gradients_finite(model: torch.nn.Module) -> bool:
    """Whether every gradient entry is finite. After the allreduce a NaN or inf from any rank's loss is in
    every rank's averaged gradients, so all ranks reach the same verdict without another collective."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return bool(torch.stack([g.abs().amax() for g in grads]).isfinite().all())  # host sync, as GradScaler's


@torch.no_grad()
def evaluate(model, criterion, batches, device: torch.device, autocast) -> dict:
    """This rank's shard of val; the sums over all ranks count every val image exactly once."""
    model.eval()
    sums = EpochSums(device)
    for images, target in batches:
        with autocast:
            output = model(images)
            loss = criterion(output, target)
        sums.add(EpochSums.of_batch(output.float(), target, loss.float()))
    return sums.reduce("val_sums")


def seed_epoch(seed: int, epoch: int, rank: int) -> None:
    """Augmentation randomness for one epoch: different on every rank, and a function of (seed, epoch, rank)
    alone, so a run resumed at an epoch boundary draws exactly what the uninterrupted run draws."""
    state = int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])
    torch.manual_seed(state)
    random.seed(state)
    np.random.seed(state)


def resume(config: TrainConfig, checkpoints: Path, model, optimizer, scaler, world: World) -> Progress:
    """Rank 0 loads the latest checkpoint; every rank learns the progress to start from (or the error)."""
    outcome = {"progress": {}, "error": None}
    if world.ctx.is_primary:
        try:
            outcome["progress"] = dataclasses.asdict(load_newest(config, checkpoints, model, optimizer, scaler,
                                                                 world))
        except UserError as error:
            outcome["error"] = str(error)
    outcome = comm.broadcast_object(outcome, name="resume")  # Horovod: no rank hangs when rank 0 fails
    if outcome["error"]:
        raise UserError(outcome["error"])
    return Progress(**outcome["progress"])


def load_newest(config: TrainConfig, checkpoints: Path, model, optimizer, scaler, world: World) -> Progress:
    """The newest checkpoint into model, optimizer and loss scaler (on this rank only), and the progress it
    records."""
    if not checkpoint.list_checkpoints(checkpoints):
        log.info("--resume: no checkpoint in %s yet, starting from epoch 1", checkpoints)
        return Progress()
    path, state = checkpoint.load_latest(checkpoints)
    check_resize(config, state["config"], world, path)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if state.get("scaler") and scaler.is_enabled():
        scaler.load_state_dict(state["scaler"])
    log.info("--resume: continuing from %s (%d epochs and %d steps done)", path, state["epoch"],
             state["step_in_epoch"])
    partial = state["partial"]
    return Progress(state["epoch"], state["images_done"], partial["sums"] and tuple(partial["sums"]),
                    partial["seconds"], partial["skipped"])


def check_resize(config: TrainConfig, saved: dict, world: World, path: Path) -> None:
    """Resuming on another number of ranks or global batch changes the recipe: say how; go on only if asked."""
    if (saved["world_size"], saved["global_batch"]) == (world.ctx.size, world.global_batch):
        return
    change = (f"{path} was written by {saved['world_size']} ranks at global batch kn={saved['global_batch']} "
              f"(peak lr {saved['peak_lr']:.4g}, {saved['steps_per_epoch']} steps/epoch); this run has "
              f"{world.ctx.size} ranks and kn={world.global_batch}, so by the linear scaling rule (Sec. 2.1) its "
              f"peak lr is {peak_lr(config.lr, world.global_batch):.4g}, and an epoch is {world.steps_per_epoch} "
              f"steps (BN statistics stay per worker, over n={config.batch_size})")
    if not config.allow_resize:
        raise UserError(f"--resume: {change}; pass --allow-resize to continue on this world size")
    log.warning("--allow-resize: %s", change)
