"""One optimizer step of the paper's recipe, from micro-batches to updated weights: the unit that `train` runs
and `bench-train` times (NVIDIA DLE's train_step, apart from the loop).

    lr set -> per micro-batch: forward + loss under autocast, backward (Horovod's hooks start each gradient's
    allreduce as it appears) -> synchronize() (wait for the averages) -> unscale (amp-fp16) -> clip
    (--max-grad-norm) -> the finite check -> step, or skip with the BN statistics restored

A step returns what happened; the trainer decides what a skipped step means (skip on, or stop the run).
Host synchronizations, each marked `# host sync` where it is: the finite check's bool() (fp32, amp-bf16) or
GradScaler's get_scale() twice (amp-fp16), and Horovod's synchronize(). Nothing else here waits for a GPU.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from .metrics import EpochSums

# Phases of a step, as `on_phase` names them when it ends (bench-train's columns):
PHASES = ("data", "forward", "backward", "allreduce_wait", "optimizer")


@dataclass
class StepResult:
    applied: bool  # False: NaN/inf in the averaged gradients (or GradScaler's overflow); weights untouched
    sums: torch.Tensor  # [loss_sum, top1, top5, count] of this rank's micro-batches, on the device
    loss: torch.Tensor  # the last micro-batch's loss, on the device (read it only when printing: a host sync)


class TrainStep:
    """Built once per run; `step(batches, lr)` does one optimizer step on the next `micro_batches` of n.

    restore_bn: keep a copy of the BN running statistics before the forward passes, to put back when the
    step is skipped (--skip-nonfinite, and amp-fp16's overflow skips). on_phase: called with a phase's name
    when it ends (bench-train's clock); None costs one `if` per phase."""

    def __init__(self, model: torch.nn.Module, optimizer, scaler: torch.amp.GradScaler, autocast,
                 micro_batches: int, max_grad_norm: float = 0.0, restore_bn: bool = False,
                 on_phase: Callable[[str], None] | None = None):
        self.model, self.optimizer, self.scaler, self.autocast = model, optimizer, scaler, autocast
        self.micro_batches, self.max_grad_norm, self.on_phase = micro_batches, max_grad_norm, on_phase
        self.criterion = torch.nn.CrossEntropyLoss()
        self.bn_stats = running_stats(model) if restore_bn else []

    def __call__(self, batches: Iterator, lr: float) -> StepResult:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad()  # Horovod 0.28 takes no set_to_none; torch 2 defaults to it
        bn_before = [buffer.clone() for buffer in self.bn_stats]
        sums = 0
        for _ in range(self.micro_batches):
            images, target = next(batches)
            self._phase("data")
            with self.autocast:
                output = self.model(images)  # BN statistics over this micro-batch's n images only (Sec. 2.3)
                loss = self.criterion(output, target)
            self._phase("forward")
            # Mean over n here, / micro-batches, averaged over the k ranks by Horovod: the loss normalized by the
            # whole minibatch kn (Sec. 3, Remark 3). amp-fp16 scales it up first.
            self.scaler.scale(loss / self.micro_batches).backward()
            sums = sums + EpochSums.of_batch(output.float(), target, loss.float())
            self._phase("backward")
        self.optimizer.synchronize()  # Horovod: host sync; the gradients averaged over all ranks are in .grad now
        self._phase("allreduce_wait")
        self.scaler.unscale_(self.optimizer)  # amp-fp16: true gradients again, before clipping and the step
        if self.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        applied = self._apply()
        if not applied:  # as if the step had not been: BN statistics as before (the weights were not touched)
            for buffer, before in zip(self.bn_stats, bn_before):
                buffer.copy_(before)
        self._phase("optimizer")
        return StepResult(applied, sums, loss)

    def _apply(self) -> bool:
        """The optimizer step with the averaged gradients if they are finite; whether it was taken. Every rank
        reaches the same verdict: they hold the same averages."""
        with self.optimizer.skip_synchronize():  # Horovod: already synchronized
            if self.scaler.is_enabled():  # GradScaler steps unless unscale_ found NaN/inf, then halves the scale
                scale = self.scaler.get_scale()  # host sync
                self.scaler.step(self.optimizer)
                self.scaler.update()
                return self.scaler.get_scale() >= scale  # host sync
            if not gradients_finite(self.model):  # host sync
                return False
            self.optimizer.step()
            return True

    def _phase(self, name: str) -> None:
        if self.on_phase is not None:
            self.on_phase(name)


def running_stats(model: torch.nn.Module) -> list[torch.Tensor]:
    """The BN buffers that a forward pass in train mode updates, whatever becomes of the step."""
    return [buffer for name, buffer in model.named_buffers()
            if name.endswith(("running_mean", "running_var", "num_batches_tracked"))]


def gradients_finite(model: torch.nn.Module) -> bool:
    """Whether every gradient entry is finite. After the allreduce a NaN or inf from any rank's loss is in
    every rank's averaged gradients, so all ranks reach the same verdict without another collective."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return bool(torch.stack([g.abs().amax() for g in grads]).isfinite().all())  # host sync, as GradScaler's


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
