"""The learning-rate schedule of Goyal et al. (2017) as pure functions of the global iteration.

No torch and no Horovod here: the trainer, `hvd-imagenet schedule` and the tests call the same `lr_at`.

    peak lr      = base_lr * kn / ref_batch        linear scaling rule (Sec. 2.1)
                 = base_lr * sqrt(kn / ref_batch)  the sqrt rule the paper compares against (Table 2a)
                 = base_lr                         no scaling
    warmup       gradual: from base_lr, +constant every iteration, reaching the peak after warmup_epochs
                 constant: base_lr for warmup_epochs, then the peak (Sec. 2.2)
    then         the peak x lr_decay at each epoch in lr_steps (x0.1 at 30, 60, 80 in the paper)
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from .errors import UserError

SCALING_RULES = ("linear", "sqrt", "none")
WARMUP_KINDS = ("gradual", "constant", "none")


@dataclass(frozen=True)
class LRPolicy:
    """The lr flags, with the paper's values as defaults (Sec. 2.1, 2.2, 5.1)."""

    base_lr: float = field(default=0.1, metadata={"help": "eta for a minibatch of --ref-batch (Sec. 2.1: 0.1)"})
    ref_batch: int = field(default=256, metadata={"help": "the minibatch --base-lr is meant for (kn=256)"})
    lr_scaling: str = field(default="linear", metadata={"help": "peak lr rule: linear (Sec. 2.1), sqrt, none"})
    warmup: str = field(default="gradual", metadata={"help": "gradual (Sec. 2.2), constant or none"})
    warmup_epochs: float = field(default=5.0, metadata={"help": "warmup length in epochs (Sec. 2.2: 5)"})
    lr_steps: tuple[int, ...] = field(default=(30, 60, 80), metadata={"help": "epochs where lr x --lr-decay"})
    lr_decay: float = field(default=0.1, metadata={"help": "factor at each of --lr-steps (Sec. 5.1: 0.1)"})

    def __post_init__(self):
        if self.lr_scaling not in SCALING_RULES:
            raise UserError(f"--lr-scaling must be one of {', '.join(SCALING_RULES)}, not {self.lr_scaling!r}")
        if self.warmup not in WARMUP_KINDS:
            raise UserError(f"--warmup must be one of {', '.join(WARMUP_KINDS)}, not {self.warmup!r}")
        if not self.base_lr > 0:
            raise UserError(f"--base-lr must be > 0, not {self.base_lr}")
        if self.ref_batch < 1:
            raise UserError(f"--ref-batch must be >= 1, not {self.ref_batch}")
        if self.warmup_epochs < 0:
            raise UserError(f"--warmup-epochs must be >= 0, not {self.warmup_epochs}")
        if not 0 < self.lr_decay <= 1:
            raise UserError(f"--lr-decay must be in (0, 1], not {self.lr_decay}")
        if list(self.lr_steps) != sorted(set(self.lr_steps)) or any(s <= 0 for s in self.lr_steps):
            raise UserError(f"--lr-steps must be increasing positive epochs, not {','.join(map(str, self.lr_steps))}")

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
