"""One optimizer step of the paper's recipe, from micro-batches to updated weights: the unit that `train` runs
and `bench-train` times (NVIDIA DLE's train_step, apart from the loop).

    lr set -> per micro-batch: forward + loss under autocast, backward (Horovod's hooks start each gradient's
    allreduce as it appears; on the first, the noise probe takes this rank's gradient norms) -> synchronize()
    (wait for the averages) -> unscale (amp-fp16) -> clip (--max-grad-norm) -> the finite check -> step
    (optimizers/: SGD or LARS), or skip with the BN statistics restored

A step returns what happened; the trainer decides what a skipped step means (skip on, or stop the run).
`evaluate` (the validation pass) sits beside it.
Host synchronizations, each marked `# host sync` where it is: Horovod's synchronize(), and one of our own, the
finite check (whether the step is applied decides what the host does next); under amp-fp16 also GradScaler's
own check in step(), which finds the device idle after ours. host_sync.py counts them (tests/test_host_syncs.py
holds the step to host_sync.SYNC_BUDGET). Everything else stays on the device: the metric sums, the loss, the
BN snapshot (two fused copies a step, one per dtype).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

import torch

from .metrics import EpochSums
from .noise_scale import NoiseProbe

# Phases of a step, as `on_phase` names them when it ends (bench-train's columns):
PHASES = ("data", "forward", "backward", "allreduce_wait", "optimizer")


class Training(NamedTuple):
    """What a step updates and a checkpoint keeps (train.build_training makes it)."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer  # Horovod's DistributedOptimizer around optimizers/'s
    scaler: torch.amp.GradScaler  # amp-fp16's loss scale; disabled otherwise


@dataclass
class StepResult:
    applied: bool  # False: NaN/inf in the averaged gradients (or GradScaler's overflow); weights untouched
    sums: torch.Tensor  # metrics.SUMS of this rank's micro-batches and noise probe, on the device
    loss: torch.Tensor  # the last micro-batch's loss, on the device (read it only when printing: a host sync)


class TrainStep:
    """Built once per run; `step(batches, lr)` does one optimizer step on the next `micro_batches` of n.

    restore_bn: keep a copy of the BN running statistics before the forward passes, to put back when the
    step is skipped (--skip-nonfinite, and amp-fp16's overflow skips). criterion: the training loss, the
    micro-batch's mean (losses.py; default plain cross-entropy; validation's stays plain cross-entropy).
    noise_probe: measure the squared norms of the first pass's gradient and of the averaged one (noise_scale.py).
    on_phase: called with a phase's name when it ends (bench-train's clock); None costs one `if` per phase."""

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer,
        scaler: torch.amp.GradScaler,
        autocast,
        micro_batches: int,
        max_grad_norm: float = 0.0,
        restore_bn: bool = False,
        criterion: torch.nn.Module | None = None,
        noise_probe: bool = False,
        on_phase: Callable[[str], None] | None = None,
    ):
        self.model, self.optimizer, self.scaler, self.autocast = model, optimizer, scaler, autocast
        self.micro_batches, self.max_grad_norm, self.on_phase = micro_batches, max_grad_norm, on_phase
        self.criterion = criterion if criterion is not None else torch.nn.CrossEntropyLoss()
        self.bn = BNSnapshot(model) if restore_bn else None
        self.probe = NoiseProbe(model) if noise_probe else None
        self.no_probe = torch.zeros(3, dtype=torch.float64, device=next(model.parameters()).device)

    def __call__(self, batches: Iterator, lr: float) -> StepResult:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad()  # Horovod 0.28 takes no set_to_none; torch 2 defaults to it
        if self.bn is not None:
            self.bn.take()
        sums = 0
        for index in range(self.micro_batches):
            images, target = next(batches)
            if index == 0 and self.probe is not None:
                self.probe.arm()  # this micro-batch's gradients, as they are accumulated in backward
            self._phase("data")
            with self.autocast:
                output = self.model(images)  # BN statistics over this micro-batch's n images only (Sec. 2.3)
                loss = self.criterion(output, target)
            self._phase("forward")
            # Mean over n here, / micro-batches, averaged over the k ranks by Horovod: the loss normalized by the
            # whole minibatch kn (Sec. 3, Remark 3). amp-fp16 scales it up first.
            self.scaler.scale(loss / self.micro_batches).backward()
            if index == 0 and self.probe is not None:
                self.probe.disarm()
            sums = sums + EpochSums.of_batch(output.float(), target, loss.float())
            self._phase("backward")
        small = self.probe.squared_norm() if self.probe is not None else None  # the first pass's, this rank's
        self.optimizer.synchronize()  # Horovod: host sync; the gradients averaged over all ranks are in .grad now
        self._phase("allreduce_wait")
        self.scaler.unscale_(self.optimizer)  # amp-fp16: true gradients again, before clipping and the step
        norm = None
        if self.max_grad_norm:  # the total L2 norm before clipping, on the device: the finite check reuses it
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        elif small is not None or not self.scaler.is_enabled():
            norm = total_norm(self.model)
        probe = self.no_probe if small is None else self._probe_sums(small, norm)
        applied = self._apply(norm)
        if not applied and self.bn is not None:  # as if the step had not been: BN statistics as before
            self.bn.restore()
        self._phase("optimizer")
        return StepResult(applied, torch.cat([sums, probe]), loss)

    def _probe_sums(self, small: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
        """(|g_small|^2, |g_big|^2, 1) on the device. The first pass's gradient was of its loss / micro-batches
        (and x the loss scale under amp-fp16): undo both."""
        small = small * self.micro_batches**2
        if self.scaler.is_enabled():
            small = small / self.scaler._get_scale_async().double().square().squeeze()
        return torch.stack([small, norm.double().square(), torch.ones_like(small)])

    def _apply(self, norm: torch.Tensor | None) -> bool:
        """The optimizer step with the averaged gradients if they are finite; whether it was taken. Every rank
        reaches the same verdict: they hold the same averages."""
        with self.optimizer.skip_synchronize():  # Horovod: already synchronized
            if self.scaler.is_enabled():
                # unscale_ left one NaN/inf flag per device on the device; GradScaler's step() reads the same
                # flags (its own sync, now on an idle device), steps or skips, and update() halves the scale.
                found = sum(self.scaler._found_inf_per_device(self.optimizer).values())
                applied = not found.item()  # host sync: the step's one
                self.scaler.step(self.optimizer)
                self.scaler.update()
                return applied
            if not bool(norm.isfinite()):  # host sync: the step's one (NaN/inf carry through the norm)
                return False
            self.optimizer.step()
            return True

    def _phase(self, name: str) -> None:
        if self.on_phase is not None:
            self.on_phase(name)


class BNSnapshot:
    """A copy of the BN buffers that a forward pass in train mode updates whatever becomes of the step
    (running mean and var, batches tracked), kept in buffers allocated once: take() and restore() are one
    fused multi-tensor copy per dtype (float statistics, int64 counts), not one kernel per buffer."""

    def __init__(self, model: torch.nn.Module):
        live = [
            buffer
            for name, buffer in model.named_buffers()
            if name.endswith(("running_mean", "running_var", "num_batches_tracked"))
        ]
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for buffer in live:
            by_dtype.setdefault(buffer.dtype, []).append(buffer)
        self.groups = [(buffers, [b.clone() for b in buffers]) for buffers in by_dtype.values()]

    def take(self) -> None:
        for buffers, saved in self.groups:
            torch._foreach_copy_(saved, buffers)

    def restore(self) -> None:
        for buffers, saved in self.groups:
            torch._foreach_copy_(buffers, saved)


def total_norm(model: torch.nn.Module) -> torch.Tensor:
    """The L2 norm of all gradients together, on the device: a few fused kernels (torch's foreach norm), not two
    per tensor. The finite check reads it: NaN and inf carry through the sums of squares, and a norm that
    overflows float32 (entries near 1e19) counts as non-finite too, divergence all the same. After the allreduce
    a NaN or inf from any rank's loss is in every rank's averaged gradients, so all ranks reach the same verdict
    without another collective."""
    return torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None], foreach=True)


class PhaseClock:
    """bench-train's on_phase: seconds per phase of each step, with the device synchronized at each boundary
    (on a GPU; a small cost, the same for every backend). A phase in `absent` does not exist for this backend
    (DDP has no allreduce wait after backward): it reads 0 and its moment counts in the next phase."""

    def __init__(self, device: torch.device, absent: tuple[str, ...] = ()):
        self.device, self.absent = device, absent
        self.start()

    def now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize()  # host sync: the benchmark's clock, never in training
        return time.perf_counter()

    def start(self) -> None:
        """Before a step: zero the phases and start the clock."""
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self.last = self.now()

    def __call__(self, phase: str) -> None:
        if phase in self.absent:
            return
        now = self.now()
        self.seconds[phase] += now - self.last
        self.last = now


@torch.no_grad()
def evaluate(model, batches, device: torch.device, autocast, on_batch) -> dict:
    """This rank's shard of val, with the plain cross-entropy loss (no label smoothing); the sums over all ranks
    count every val image exactly once (a collective: every rank calls it). on_batch() after each batch."""
    model.eval()
    sums = EpochSums(device)
    for images, target in batches:
        with autocast:
            output = model(images)
            loss = torch.nn.functional.cross_entropy(output, target)
        sums.add(EpochSums.of_batch(output.float(), target, loss.float()))
        on_batch()
    return sums.reduce("val_sums")
