"""The learning-rate schedule of Goyal et al. (2017) as pure functions of the global iteration.

No torch and no Horovod here: the trainer, `hvd-imagenet schedule` (below) and the tests call the same `lr_at`.

    peak lr      = base_lr * kn / ref_batch        linear scaling rule (Sec. 2.1)
                 = base_lr * sqrt(kn / ref_batch)  the sqrt rule the paper compares against (Table 2a)
                 = base_lr                         no scaling
    warmup       gradual: from base_lr, +constant every iteration, reaching the peak after warmup_epochs
                 constant: base_lr for warmup_epochs, then the peak (Sec. 2.2)
    then         the peak x lr_decay at each epoch in lr_steps (x0.1 at 30, 60, 80 in the paper)
"""
from __future__ import annotations

import math
import csv
import sys
from dataclasses import dataclass, field

from .errors import UserError
from .flags import Command, check, opt

SCALING_RULES = ("linear", "sqrt", "none")
WARMUP_KINDS = ("gradual", "constant", "none")


@dataclass(frozen=True)
class LRPolicy:
    """The lr flags, with the paper's values as defaults (Sec. 2.1, 2.2, 5.1)."""

    base_lr: float = opt("eta for a minibatch of --ref-batch (Sec. 2.1: 0.1)", 0.1, above=0)
    ref_batch: int = opt("the minibatch --base-lr is meant for (kn=256)", 256, min=1)
    lr_scaling: str = opt("peak lr rule: linear (Sec. 2.1), sqrt, none", "linear", choices=SCALING_RULES)
    warmup: str = opt("gradual (Sec. 2.2), constant or none", "gradual", choices=WARMUP_KINDS)
    warmup_epochs: float = opt("warmup length in epochs (Sec. 2.2: 5)", 5.0, min=0)
    lr_steps: tuple[int, ...] = opt("epochs where lr x --lr-decay", (30, 60, 80))
    lr_decay: float = opt("factor at each of --lr-steps (Sec. 5.1: 0.1)", 0.1, above=0, max=1)

    def __post_init__(self):
        if list(self.lr_steps) != sorted(set(self.lr_steps)) or any(s <= 0 for s in self.lr_steps):
            raise UserError(f"--lr-steps must be increasing positive epochs, not {','.join(map(str, self.lr_steps))}")
        check(self)

    def check_fits(self, epochs: int) -> None:
        """Warmup must end within the run."""
        if self.warmup != "none" and self.warmup_epochs > epochs:
            raise UserError(f"--warmup-epochs {self.warmup_epochs:g} is longer than --epochs {epochs}")


def peak_lr(policy: LRPolicy, global_batch: int) -> float:
    """The lr after warmup for minibatch kn = global_batch (the scaling rule, Sec. 2.1 / Table 2a)."""
    ratio = global_batch / policy.ref_batch
    if policy.lr_scaling == "linear":
        return policy.base_lr * ratio
    if policy.lr_scaling == "sqrt":
        return policy.base_lr * math.sqrt(ratio)
    return policy.base_lr


def lr_at(policy: LRPolicy, iteration: int, iters_per_epoch: int, global_batch: int) -> float:
    """The lr for optimizer step `iteration` (0-based, counted over the whole run).

    Warmup starts at base_lr, the lr of the reference minibatch. When kn <= ref_batch the peak is not above
    base_lr and there is nothing to warm up to, so warmup starts at the peak (a constant lr).
    """
    if iters_per_epoch < 1:
        raise ValueError(f"iters_per_epoch must be >= 1, not {iters_per_epoch}")
    peak = peak_lr(policy, global_batch)
    warmup_iters = round(policy.warmup_epochs * iters_per_epoch)
    if policy.warmup != "none" and iteration < warmup_iters:
        start = min(policy.base_lr, peak)
        if policy.warmup == "constant":
            return start
        return start + (peak - start) * iteration / warmup_iters
    epoch = iteration // iters_per_epoch
    decays = sum(1 for step in policy.lr_steps if epoch >= step)
    return peak * policy.lr_decay**decays


@dataclass(frozen=True)
class ScheduleOptions:
    """`hvd-imagenet schedule`: the lr of every iteration of a run as CSV."""

    world_size: int = opt("number of workers k", min=1)
    iters_per_epoch: int = opt("optimizer steps per epoch", min=1)
    batch_size: int = opt("images per worker n", 32, min=1)
    batches_per_allreduce: int = opt("passes per rank per step (train's)", 1, min=1)
    virtual_workers_per_pass: int = opt("virtual workers per pass (train's)", 1, min=1)
    epochs: int = opt("epochs", 90, min=1)
    lr: LRPolicy = field(default_factory=LRPolicy)

    def __post_init__(self):
        check(self)
        self.lr.check_fits(self.epochs)


def run(options: ScheduleOptions) -> None:
    global_batch = (options.world_size * options.batches_per_allreduce * options.virtual_workers_per_pass
                    * options.batch_size)
    out = csv.writer(sys.stdout, lineterminator="\n")
    out.writerow(["iteration", "epoch", "lr"])
    for iteration in range(options.epochs * options.iters_per_epoch):
        out.writerow([iteration, f"{iteration / options.iters_per_epoch:.6f}",
                      f"{lr_at(options.lr, iteration, options.iters_per_epoch, global_batch):.8g}"])


COMMAND = Command(ScheduleOptions, run)
