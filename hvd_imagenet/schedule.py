"""The learning-rate schedule as pure functions of the global iteration: Goyal et al. (2017)'s, and the
polynomial (MLPerf's ResNet-50) and cosine decays that recipes past its 8k use.

No torch and no Horovod here: the trainer, `hvd-imagenet schedule` (below) and the tests call the same `lr_at`.

    peak lr      = base_lr * kn / ref_batch        linear scaling rule (Sec. 2.1)
                 = base_lr * sqrt(kn / ref_batch)  the sqrt rule the paper compares against (Table 2a)
                 = base_lr                         no scaling
    warmup       gradual: from base_lr, +constant every iteration, reaching the peak after warmup_epochs
                 constant: base_lr for warmup_epochs, then the peak (Sec. 2.2)
                 linear: from 0 to the peak (MLPerf's: lr = peak x iteration / warmup iterations)
    then, with t the iterations since warmup and T those left after it:
      step       the peak x lr_decay at each epoch in lr_steps (x0.1 at 30, 60, 80 in the paper)
      poly       end_lr + (peak - end_lr) (1 - t/T)^poly_power (MLPerf's: power 2, end_lr 1e-4)
      cosine     end_lr + (peak - end_lr) (1 + cos(pi t/T)) / 2
"""

from __future__ import annotations

import csv
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

from .errors import UserError
from .flags import Command, check, field_defaults, opt
from .recipes import RECIPES, table

SCALING_RULES = ("linear", "sqrt", "none")
WARMUP_KINDS = ("gradual", "constant", "linear", "none")


@dataclass(frozen=True)
class After:
    """Where an iteration after warmup is: whole epochs done, and the fraction of the decay still to go (1 -> 0;
    None for a schedule that does not need the run's length)."""

    epoch: int
    left: float | None


def step_decay(policy: LRPolicy, peak: float, at: After) -> float:
    """The peak x lr_decay at each epoch of lr_steps (Sec. 5.1: x0.1 at 30, 60, 80)."""
    return peak * policy.lr_decay ** sum(1 for step in policy.lr_steps if at.epoch >= step)


def poly_decay(policy: LRPolicy, peak: float, at: After) -> float:
    """MLPerf's ResNet-50: end_lr + (peak - end_lr) (1 - t/T)^poly_power."""
    return policy.end_lr + (peak - policy.end_lr) * at.left**policy.poly_power


def cosine_decay(policy: LRPolicy, peak: float, at: After) -> float:
    return policy.end_lr + (peak - policy.end_lr) * ((1 - math.cos(math.pi * at.left)) / 2)


@dataclass(frozen=True)
class Schedule:
    decay: Callable[[LRPolicy, float, After], float]  # the lr after warmup
    needs_length: bool  # whether it needs the run's epochs (at.left)


# --lr-schedule: to add one, its function above and a line here (docs/architecture.md).
SCHEDULES: dict[str, Schedule] = {
    "step": Schedule(step_decay, needs_length=False),
    "poly": Schedule(poly_decay, needs_length=True),
    "cosine": Schedule(cosine_decay, needs_length=True),
}


@dataclass(frozen=True)
class LRPolicy:
    """The lr flags, with the paper's values as defaults (Sec. 2.1, 2.2, 5.1)."""

    base_lr: float = opt("eta for a minibatch of --ref-batch (Sec. 2.1: 0.1)", 0.1, above=0)
    ref_batch: int = opt("the minibatch --base-lr is meant for (kn=256)", 256, min=1)
    lr_scaling: str = opt("peak lr rule: linear (Sec. 2.1), sqrt, none", "linear", choices=SCALING_RULES)
    warmup: str = opt(
        "gradual (Sec. 2.2: from --base-lr), constant, linear (from 0: MLPerf's) or none",
        "gradual",
        choices=WARMUP_KINDS,
    )
    warmup_epochs: float = opt("warmup length in epochs (Sec. 2.2: 5)", 5.0, min=0)
    lr_schedule: str = opt(
        "after warmup: step (Sec. 5.1), poly (MLPerf's ResNet-50) or cosine", "step", choices=tuple(SCHEDULES)
    )
    lr_steps: tuple[int, ...] = opt("--lr-schedule step: epochs where lr x --lr-decay", (30, 60, 80))
    lr_decay: float = opt("--lr-schedule step: factor at each of --lr-steps (Sec. 5.1: 0.1)", 0.1, above=0, max=1)
    poly_power: float = opt("--lr-schedule poly: the power (MLPerf's: 2)", 2.0, above=0)
    end_lr: float = opt("--lr-schedule poly, cosine: the lr at the last iteration (MLPerf's: 1e-4)", 1e-4, min=0)

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


def lr_at(policy: LRPolicy, iteration: int, iters_per_epoch: int, global_batch: int, epochs: int = 0) -> float:
    """The lr for optimizer step `iteration` (0-based, counted over the whole run of `epochs` epochs, which
    --lr-schedule poly and cosine need).

    Gradual warmup starts at base_lr, the lr of the reference minibatch. When kn <= ref_batch the peak is not
    above base_lr and there is nothing to warm up to, so it starts at the peak (a constant lr).
    """
    if iters_per_epoch < 1:
        raise ValueError(f"iters_per_epoch must be >= 1, not {iters_per_epoch}")
    peak = peak_lr(policy, global_batch)
    warmup_iters = round(policy.warmup_epochs * iters_per_epoch) if policy.warmup != "none" else 0
    if iteration < warmup_iters:
        begin = 0.0 if policy.warmup == "linear" else min(policy.base_lr, peak)
        if policy.warmup == "constant":
            return begin
        return begin + (peak - begin) * iteration / warmup_iters
    schedule, left = SCHEDULES[policy.lr_schedule], None
    if schedule.needs_length:
        if epochs < 1:
            raise ValueError(f"--lr-schedule {policy.lr_schedule} needs the run's epochs")
        decay_iters = max(1, epochs * iters_per_epoch - 1 - warmup_iters)  # the last iteration ends at end_lr
        left = 1 - min(1.0, (iteration - warmup_iters) / decay_iters)
    return schedule.decay(policy, peak, After(iteration // iters_per_epoch, left))


@dataclass(frozen=True)
class ScheduleOptions:
    """`hvd-imagenet schedule`: the lr of every iteration of a run as CSV."""

    world_size: int = opt("number of workers k", min=1)
    iters_per_epoch: int = opt("optimizer steps per epoch", min=1)
    recipe: str = opt(
        f"named defaults: {', '.join(RECIPES)} (table below; explicit flags win)", "goyal2017", choices=tuple(RECIPES)
    )
    batch_size: int = opt("images per worker n", 32, min=1)
    batches_per_allreduce: int = opt("passes per rank per step (train's)", 1, min=1)
    virtual_workers_per_pass: int = opt("virtual workers per pass (train's)", 1, min=1)
    epochs: int = opt("epochs", 90, min=1)
    lr: LRPolicy = field(default_factory=LRPolicy)

    def __post_init__(self):
        check(self)
        self.lr.check_fits(self.epochs)


def run(options: ScheduleOptions) -> None:
    global_batch = (
        options.world_size * options.batches_per_allreduce * options.virtual_workers_per_pass * options.batch_size
    )
    out = csv.writer(sys.stdout, lineterminator="\n")
    out.writerow(["iteration", "epoch", "lr"])
    for iteration in range(options.epochs * options.iters_per_epoch):
        out.writerow(
            [
                iteration,
                f"{iteration / options.iters_per_epoch:.6f}",
                f"{lr_at(options.lr, iteration, options.iters_per_epoch, global_batch, options.epochs):.8g}",
            ]
        )


def recipes_help() -> str:
    return "recipes (--recipe fills these defaults; a flag given explicitly wins):\n" + table(
        field_defaults(ScheduleOptions)
    )


COMMAND = Command(ScheduleOptions, run, epilog=recipes_help)
