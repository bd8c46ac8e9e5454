"""A study's runs as outcomes: one per setting, over its seeds, and what study.md says of them.

The error of a run is the paper's: the median of the top-1 val error of its last epochs, 5 of 90 in the paper
(Sec. 5.1), the same fraction of a study's epochs here (at least 1: the last epoch of a 9-epoch run);
a row is mean ± std over its seeds (sample std, ddof=1), as the paper's tables are over 5 runs.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field

from ..errors import Diverged, UserError
from ..metrics import read_metrics
from .grid import PAPER_EPOCHS, Run, Scale, Setting, global_batch

PAPER_FINAL_EPOCHS = 5  # of PAPER_EPOCHS: the paper's error is the median of these epochs' (Sec. 5.1)
EFFECTIVE_WITHIN = 1.0  # points of val error from the baseline: the maximum effective minibatch's criterion


@dataclass
class Outcome:
    """One setting over its seeds."""

    setting: Setting
    errors: list[float] = field(default_factory=list)  # final top-1 val error %, one per finished seed
    diverged: int = 0  # seeds whose run stopped on NaN/inf gradients
    train_curves: list[list[float]] = field(default_factory=list)  # training error % per epoch, per seed
    train_final: list[float] = field(default_factory=list)
    noise_curves: list[list[float | None]] = field(default_factory=list)  # B_simple per epoch, per seed
    steps_per_epoch: int = 0
    seconds: float = 0.0  # training time of all seeds

    def summary(self) -> str:
        """'1.95 ± 0.21' (or '1.95' for one seed), and how many seeds diverged."""
        text = mean_std(self.errors) if self.errors else "-"
        return text + (f" ({self.diverged} diverged)" if self.diverged else "")

    def steps(self, epochs: int) -> str:
        return str(self.steps_per_epoch * epochs) if self.steps_per_epoch else "-"


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def std(values: list[float]) -> float | None:
    """Sample std (ddof=1), as the paper's ± (None for fewer than 2 values)."""
    return statistics.stdev(values) if len(values) > 1 else None


def mean_curve(curves: list[list[float]]) -> list[float]:
    return [statistics.mean(epoch) for epoch in zip(*curves)]


def final_epochs(epochs: int) -> int:
    """The last epochs whose val errors' median is a run's error: 5 of 90, in proportion, at least 1."""
    return max(1, round(PAPER_FINAL_EPOCHS * epochs / PAPER_EPOCHS))


def final_error(records: list[dict]) -> float:
    evaluated = [r for r in records if r.get("val_top1") is not None]  # every epoch unless --eval-every
    return statistics.median(100 - r["val_top1"] for r in evaluated[-final_epochs(len(records)) :])


def collect(runs: list[Run], settings: tuple[Setting, ...], epochs: int) -> list[Outcome]:
    outcomes = {s.key: Outcome(s) for s in settings}
    for run in runs:
        outcome = outcomes[run.setting.key]
        records = read_metrics(run.directory)
        config_path = run.directory / "config.json"
        if config_path.exists():
            outcome.steps_per_epoch = json.loads(config_path.read_text())["steps_per_epoch"]
        outcome.seconds += sum(r["epoch_seconds"] for r in records)
        if (run.directory / Diverged.RECORD_FILE).exists():
            outcome.diverged += 1
        elif len(records) >= epochs:
            outcome.errors.append(final_error(records[:epochs]))
            outcome.train_curves.append([100 - r["train_top1"] for r in records[:epochs]])
            outcome.train_final.append(outcome.train_curves[-1][-1])
            outcome.noise_curves.append([r.get("noise_scale") for r in records[:epochs]])
    return list(outcomes.values())


def max_effective_kn(outcomes: list[Outcome], scale: Scale) -> int | None:
    """Fig. 1's maximum effective minibatch: the largest kn such that it and every kn below it train to a mean
    val error within EFFECTIVE_WITHIN points of the baseline's (None without a finished baseline)."""
    baseline = outcomes[0]
    if not baseline.errors:
        return None
    best = global_batch(baseline.setting, scale)
    for outcome in sorted(outcomes[1:], key=lambda o: o.setting.factor):
        if not outcome.errors or statistics.mean(outcome.errors) > statistics.mean(baseline.errors) + EFFECTIVE_WITHIN:
            break
        best = global_batch(outcome.setting, scale)
    return best


def pyplot():
    """matplotlib's pyplot on the Agg backend (no display), or a UserError that says how to install it."""
    try:
        import matplotlib
    except ImportError:
        raise UserError("study plots need matplotlib: pip install 'hvd_imagenet[study]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
