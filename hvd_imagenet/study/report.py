"""study.md, results.json and the plots of a finished study, from its runs' metrics.jsonl and config.json
(outcomes.py: a run's error, a row's mean ± std; beyond.py: the beyond preset's own section)."""

from __future__ import annotations

import json
import platform
import statistics
from pathlib import Path

from ..cpus import available_cpus
from ..errors import UserError
from ..schedule import lr_at
from .beyond import report_beyond
from .grid import Run, Scale, Setting, global_batch, lr_policy, peak, virtual_workers_per_pass
from .outcomes import (
    EFFECTIVE_WITHIN,
    Outcome,
    collect,
    final_epochs,
    max_effective_kn,
    mean_curve,
    mean_std,
    pyplot,
    std,
)

COLUMNS = (
    "setting",
    "kn",
    "workers",
    "peak lr",
    "lr rule",
    "warmup",
    "steps",
    "seeds",
    "val error %",
    "gap",
    "train err %",
    "curve gap",
    "paper",
)  # study.md's table
PLOTS = ("training_error.png", "lr_schedule.png")
FIG1_PLOT = "val_error_vs_kn.png"
PANELS_PER_LINE = 4  # training_error.png: one panel per row after the baseline


def curve_gap_after_warmup(outcome: Outcome, baseline: Outcome, warmup_epochs: float) -> float | None:
    """How closely a row's training-error curve follows the baseline's once warmup is over (the paper's Fig. 2-4:
    "the training error curves match closely after a short period"): the mean over the epochs after warmup of
    |this row's mean curve - the baseline's|, in points. None for the baseline, or without finished runs."""
    if outcome is baseline or not outcome.train_curves or not baseline.train_curves:
        return None
    after = [
        abs(a - b)
        for epoch, (a, b) in enumerate(
            zip(mean_curve(outcome.train_curves), mean_curve(baseline.train_curves)), start=1
        )
        if epoch > warmup_epochs
    ]
    return statistics.mean(after) if after else None


def write_report(
    runs: list[Run], settings: tuple[Setting, ...], scale: Scale, preset: str, command: str, output: Path
) -> list[Path]:
    """Write study.md, results.json and PLOTS (and fig1's plot) into output; returns their paths."""
    outcomes = collect(runs, settings, scale.epochs)
    if not any(o.errors for o in outcomes):
        raise UserError(f"study: no run in {output / 'runs'} has finished; nothing to report")
    plot_training_error(outcomes, scale, output / PLOTS[0])
    plot_lr_schedules(outcomes, scale, output / PLOTS[1])
    plots = list(PLOTS)
    effective = None
    if preset == "fig1":
        effective = max_effective_kn(outcomes, scale)
        plot_val_error_vs_kn(outcomes, scale, effective, output / FIG1_PLOT)
        plots.append(FIG1_PLOT)
    seeds = max(r.seed for r in runs) + 1
    results = {
        "preset": preset,
        "command": command,
        "scale": scale.__dict__,
        "seeds": seeds,
        "error": f"median top-1 val error % of the last {final_epochs(scale.epochs)} epoch(s) (the paper's 5 of 90 "
        "in proportion), per seed; mean and sample std over the seeds that finished",
        "train_curve_gap": "mean |row - baseline| of the mean training-error curves over the epochs after warmup, "
        "points (Fig. 2-4)",
        "rows": [row(o, outcomes[0], scale) for o in outcomes],
    }
    if preset == "fig1":
        results["max_effective_kn"] = effective
        results["max_effective_kn_rule"] = (
            f"the largest kn with it and every smaller kn within {EFFECTIVE_WITHIN:g} "
            "point of the baseline's mean val error"
        )
    extra = fig1_section(effective)
    if preset == "beyond":
        found, extra, plot = report_beyond(outcomes, scale, output)
        results.update(found)
        plots.append(plot)
    (output / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (output / "study.md").write_text(markdown(outcomes, scale, preset, command, seeds) + extra)
    return [output / "study.md", output / "results.json", *(output / name for name in plots)]


def row(outcome: Outcome, baseline: Outcome, scale: Scale) -> dict:
    """One row of results.json: the setting, its seeds' errors and their mean ± std."""
    s, errors = outcome.setting, outcome.errors
    return {
        "key": s.key,
        "label": s.label(scale),
        "kn": global_batch(s, scale),
        "peak_lr": peak(s, scale),
        "lr_scaling": lr_policy(s, scale).lr_scaling,
        "warmup": s.warmup,
        "seeds": len(errors),
        "diverged": outcome.diverged,
        "steps": outcome.steps_per_epoch * scale.epochs,
        "val_error_mean": statistics.mean(errors) if errors else None,
        "val_error_std": std(errors),
        "train_error_mean": statistics.mean(outcome.train_final) if outcome.train_final else None,
        "train_curve_gap": curve_gap_after_warmup(outcome, baseline, lr_policy(s, scale).warmup_epochs),
        "val_error": errors,
        "train_error": outcome.train_final,
        "paper": s.paper,
        "train_seconds": outcome.seconds,
    }


def markdown(outcomes: list[Outcome], scale: Scale, preset: str, command: str, seeds: int) -> str:
    baseline = outcomes[0]
    rows = []
    for o in outcomes:
        s = o.setting
        gap = (
            f"{statistics.mean(o.errors) - statistics.mean(baseline.errors):+.2f}"
            if o is not baseline and o.errors and baseline.errors
            else ""
        )
        k = f"{scale.ranks} x {virtual_workers_per_pass(s, scale)}"
        policy = lr_policy(s, scale)
        curve = curve_gap_after_warmup(o, baseline, policy.warmup_epochs)
        rows.append(
            f"| {s.label(scale)} | {global_batch(s, scale)} | {k} | {peak(s, scale):.4g} | "
            f"{policy.lr_scaling} | {s.warmup} | {o.steps(scale.epochs)} | {len(o.errors)} | "
            f"**{o.summary()}** | {gap} | {mean_std(o.train_final) if o.train_final else '-'} | "
            f"{'' if curve is None else f'{curve:.2f}'} | {s.paper} |"
        )
    hours = sum(o.seconds for o in outcomes) / 3600
    policy = lr_policy(baseline.setting, scale)
    return f"""# Study `{preset}`: large minibatch vs small, at small scale

Written by `hvd-imagenet study` from the runs in `runs/` (each run's `metrics.jsonl` and `config.json` are there).

    {command}

Top-1 val error (%) is the paper's measure: the median of the val error of a run's last {final_epochs(scale.epochs)}
epoch(s) (the paper's 5 of 90, in proportion); each row is mean ± std (sample std) over its seeds ({seeds} asked;
"seeds" counts those that finished, a diverged run is counted apart). "workers" is Horovod ranks x virtual
workers per rank in one pass (the paper's k). "gap" is the row's mean minus the baseline's (first row), in
points; "train err" is the last epoch's (augmented images, train-mode BN), mean ± std; "curve gap" is how far
the row's mean training-error curve lies from the baseline's after warmup (mean |difference| over those
epochs, points: the paper's Fig. 2-4 have them match).
The last column is the paper's row (ResNet-50 on ImageNet, Goyal et al. 2017, Table 1 / 2a, 5 runs each).

| {" | ".join(COLUMNS)} |
|{"---|" * len(COLUMNS)}
{chr(10).join(rows)}

Scale: {scale.arch}, {scale.image_size} px crops (min area {scale.min_crop_area}), n={scale.batch_size} images per
(virtual) worker with its own BN statistics, {scale.epochs} epochs, warmup {policy.warmup_epochs:g} epochs, lr x0.1 at
epochs {", ".join(map(str, policy.lr_steps))} (the paper's 5 and 30/60/80 of 90, in proportion); SGD with Nesterov
momentum 0.9, weight decay 1e-4 not on BN/bias, zero-init of each block's last BN gamma. Training time
{hours:.2f} h, the runs' epoch times summed (runs side by side overlap: the wall time is shorter), on
{available_cpus()} CPU core(s) ({platform.machine()}).

![training error vs epoch](training_error.png)

Training error per epoch, mean over seeds with ± std shaded; the legend gives each row's top-1 val error, as
the paper's Fig. 2 does.

![lr schedules](lr_schedule.png)

The lr of each row against the epoch (left: the whole run, log scale; right: the first epochs).
"""


def fig1_section(effective: int | None) -> str:
    if effective is None:
        return ""
    return f"""
## Fig. 1: val error vs minibatch size

**Maximum effective minibatch: kn = {effective}**, the largest kn with it and every smaller kn within
{EFFECTIVE_WITHIN:g} point of the baseline's mean val error (the paper's: 8k on ImageNet, flat from 64 to 8k).

![val error vs kn]({FIG1_PLOT})

Top-1 val error, mean ± std over seeds, against kn (log scale; linear scaling rule and gradual warmup at
every kn); the band is the baseline's error + {EFFECTIVE_WITHIN:g} point.
"""


def plot_val_error_vs_kn(outcomes: list[Outcome], scale: Scale, effective: int | None, path: Path) -> None:
    """The paper's Fig. 1: error vs kn, mean ± std over seeds, the baseline's +1 point band, the limit marked."""
    plt = pyplot()
    figure, ax = plt.subplots(figsize=(6.5, 4))
    done = [o for o in outcomes if o.errors]
    kns = [global_batch(o.setting, scale) for o in done]
    means = [statistics.mean(o.errors) for o in done]
    stds = [std(o.errors) or 0.0 for o in done]
    ax.errorbar(kns, means, yerr=stds, marker="o", capsize=3, color="tab:blue", label="mean ± std over seeds")
    if outcomes[0].errors:
        base = statistics.mean(outcomes[0].errors)
        ax.axhspan(
            base, base + EFFECTIVE_WITHIN, color="tab:green", alpha=0.15, label=f"baseline + {EFFECTIVE_WITHIN:g} point"
        )
    if effective:
        ax.axvline(effective, color="tab:red", linestyle="--", label=f"maximum effective kn = {effective}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(kns, [str(kn) for kn in kns])
    ax.set_xlabel("minibatch size kn")
    ax.set_ylabel("top-1 val error %")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def log_axis(ax) -> None:
    """A log-scale y axis labelled 0.1, 0.2, 0.5, 1, 2, 5, 10 ... (not 10^-1, 10^0, 10^1): a curve within one
    decade (training error from 80 to 9 %) still gets several labels."""
    from matplotlib.ticker import FuncFormatter, LogLocator

    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.yaxis.set_minor_locator(LogLocator(subs=(2.0, 5.0)))
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda value, _: f"{value:g}"))


def plot_training_error(outcomes: list[Outcome], scale: Scale, path: Path) -> None:
    """One panel per row after the baseline, each against the baseline (the layout of the paper's Fig. 2)."""
    import numpy as np

    plt = pyplot()
    baseline, others = outcomes[0], outcomes[1:] or outcomes[:1]
    columns = min(len(others), PANELS_PER_LINE)
    lines = -(-len(others) // columns)
    figure, axes = plt.subplots(lines, columns, figsize=(5 * columns, 4 * lines), sharey=True, squeeze=False)

    def draw(ax, outcome: Outcome, color: str) -> None:
        if not outcome.train_curves:
            return
        curves = np.array(outcome.train_curves)
        epochs = np.arange(1, curves.shape[1] + 1)
        mean, std = curves.mean(axis=0), curves.std(axis=0, ddof=1) if len(curves) > 1 else 0 * curves[0]
        ax.plot(epochs, mean, color=color, label=f"{outcome.setting.label(scale)}: {outcome.summary()}%")
        ax.fill_between(epochs, np.maximum(mean - std, 1e-2), mean + std, color=color, alpha=0.2)

    for ax in axes.flat[len(others) :]:
        ax.set_visible(False)
    for ax, outcome in zip(axes.flat, others):
        draw(ax, baseline, "tab:blue")
        if outcome is not baseline:
            draw(ax, outcome, "tab:red")
        ax.set_title(outcome.setting.key, fontsize=10)
        log_axis(ax)
        ax.set_xlabel("epoch")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, loc="best")  # off the curves (an unscaled lr's runs along the top)
    for line in axes:
        line[0].set_ylabel("training error % (log scale)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_lr_schedules(outcomes: list[Outcome], scale: Scale, path: Path) -> None:
    plt = pyplot()
    figure, (whole, start) = plt.subplots(1, 2, figsize=(11, 4))
    warmup_end = lr_policy(outcomes[0].setting, scale).warmup_epochs
    for outcome in outcomes:
        steps = outcome.steps_per_epoch
        if not steps:
            continue
        policy, kn = lr_policy(outcome.setting, scale), global_batch(outcome.setting, scale)
        epochs = [i / steps for i in range(steps * scale.epochs)]
        lrs = [lr_at(policy, i, steps, kn, scale.epochs) for i in range(steps * scale.epochs)]
        label = outcome.setting.label(scale)
        whole.plot(epochs, lrs, label=label, drawstyle="steps-post")
        first = [i for i, e in enumerate(epochs) if e < max(3 * warmup_end, 1.0)]
        start.plot(
            [epochs[i] for i in first],
            [lrs[i] for i in first],
            label=label,
            drawstyle="steps-post",
            marker="." if steps < 20 else None,
        )
    log_axis(whole)
    whole.set_title("the whole run", fontsize=10)
    start.set_title("the first epochs: warmup", fontsize=10)
    for ax in (whole, start):
        ax.set_xlabel("epoch")
        ax.set_ylabel("lr")
        ax.grid(True, which="both", alpha=0.3)
    start.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
