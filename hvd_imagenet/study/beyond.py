"""--preset beyond's part of study.md: each recipe's maximum effective minibatch (fig1's rule), the gradient noise
scale of the baseline run beside fig1's measured limit, and val error vs kn per recipe (beyond.png)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from .grid import RECIPES, Scale, global_batch
from .outcomes import EFFECTIVE_WITHIN, Outcome, max_effective_kn, pyplot, std

PLOT = "beyond.png"
COLORS = ("tab:blue", "tab:red", "tab:green")  # one per recipe


def recipe_rows(outcomes: list[Outcome], recipe: str) -> list[Outcome]:
    """The recipe's rows at its own lr (not the x0.5 / x2 sweep), by kn."""
    rows = [o for o in outcomes[1:] if o.setting.recipe == recipe and o.setting.eta_factor == 1]
    return sorted(rows, key=lambda o: o.setting.factor)


def fig1_limit(output: Path) -> int | None:
    """fig1's maximum effective kn, when its study sits beside this one (docs/study/fig1)."""
    path = output.parent / "fig1" / "results.json"
    return json.loads(path.read_text()).get("max_effective_kn") if path.exists() else None


def noise_per_epoch(outcome: Outcome) -> list[float | None]:
    """A row's B_simple per epoch, mean over the seeds that resolved it (None: no seed did; |G|^2 came out <= 0,
    noise swamping the signal at the run's two batch sizes)."""
    found = []
    for values in zip(*outcome.noise_curves):
        resolved = [value for value in values if value is not None]
        found.append(statistics.mean(resolved) if resolved else None)
    return found


def report_beyond(outcomes: list[Outcome], scale: Scale, output: Path) -> tuple[dict, str, str]:
    """results.json's additions, study.md's section and the plot's name."""
    baseline = outcomes[0]
    smallest = global_batch(baseline.setting, scale)
    effective = {r: max_effective_kn([baseline, *recipe_rows(outcomes, r)], scale) for r in RECIPES}
    effective = {r: None if kn == smallest else kn for r, kn in effective.items()}  # none of the recipe's kn
    noise, limit = noise_per_epoch(baseline), fig1_limit(output)
    plot_beyond(outcomes, scale, effective, limit, output / PLOT)
    found = {
        "max_effective_kn": effective,
        "baseline_noise_scale_per_epoch": noise,
        "fig1_max_effective_kn": limit,
        "noise_scale_per_epoch": {o.setting.key: noise_per_epoch(o) for o in outcomes},
        "max_effective_kn_rule": f"per recipe, the largest kn run with it and every smaller kn run within "
        f"{EFFECTIVE_WITHIN:g} point of the baseline's mean val error (null: none)",
    }
    low = min(global_batch(o.setting, scale) for o in outcomes[1:])
    lines = "\n".join(
        f"| {r} | {RECIPES[r].name} | {effective[r] or f'below {low} (none of its kn)'} |" for r in RECIPES
    )
    small = global_batch(baseline.setting, scale)
    epochs = ", ".join("-" if value is None else f"{value:.0f}" for value in noise)
    noise_text = (
        f"The baseline run's gradient noise scale B_simple (McCandlish et al. 2018), per epoch, mean over "
        f'its seeds: {epochs} images (from B_small = {small // 2}, B_big = {small}; "-": |G|^2 came out '
        f"<= 0 in every seed, the signal lost in the noise at these sizes). fig1 measured the maximum "
        f"effective minibatch at kn = {limit if limit else '(fig1 not beside this study)'}. Each row's "
        "estimate per epoch is in results.json (`noise_scale_per_epoch`)."
    )
    return (
        found,
        f"""
## Past the limit: each recipe's maximum effective minibatch

| recipe | what | maximum effective kn |
|---|---|---|
{lines}

The maximum effective kn of a recipe is the largest kn run with it and every smaller kn run within
{EFFECTIVE_WITHIN:g} point of the baseline's mean val error (fig1's rule; kn between the baseline and the large kn
was not run again: fig1 found them within the point with the paper's SGD).

{noise_text}

![val error vs kn per recipe]({PLOT})
""",
        PLOT,
    )


def plot_beyond(outcomes: list[Outcome], scale: Scale, effective: dict, limit: int | None, path: Path) -> None:
    """Left: val error vs kn per recipe, mean ± std over seeds, the baseline's +1 point band. Right: the noise
    scale per epoch of the baseline and of each recipe's smallest kn, against fig1's limit."""
    plt = pyplot()
    from matplotlib.ticker import FuncFormatter

    figure, (errors, scales) = plt.subplots(1, 2, figsize=(12, 4.2))
    base = statistics.mean(outcomes[0].errors) if outcomes[0].errors else None
    for recipe, color in zip(RECIPES, COLORS):
        rows = [o for o in recipe_rows(outcomes, recipe) if o.errors]
        if rows:
            errors.errorbar(
                [global_batch(o.setting, scale) for o in rows],
                [statistics.mean(o.errors) for o in rows],
                yerr=[std(o.errors) or 0.0 for o in rows],
                marker="o",
                capsize=3,
                color=color,
                label=f"{recipe} (max effective kn {effective[recipe] or '-'})",
            )
    if base is not None:
        errors.axhspan(
            base,
            base + EFFECTIVE_WITHIN,
            color="tab:gray",
            alpha=0.2,
            label=f"baseline (kn={global_batch(outcomes[0].setting, scale)}) + {EFFECTIVE_WITHIN:g} point",
        )
    errors.set_xscale("log", base=2)
    kns = sorted({global_batch(o.setting, scale) for o in outcomes[1:]})
    errors.set_xticks(kns, [str(kn) for kn in kns])
    errors.set_xlabel("minibatch size kn")
    errors.set_ylabel("top-1 val error %")
    errors.grid(True, alpha=0.3)
    errors.legend(fontsize=8)
    series = [(outcomes[0], "tab:gray")] + [
        (rows[0], color) for rows, color in ((recipe_rows(outcomes, r), c) for r, c in zip(RECIPES, COLORS)) if rows
    ]
    for outcome, color in series:
        shown = [(epoch, value) for epoch, value in enumerate(noise_per_epoch(outcome), start=1) if value]
        if shown:
            scales.plot(*zip(*shown), marker="o", color=color, label=f"{outcome.setting.label(scale)}")
    if limit:
        scales.axhline(limit, color="tab:red", linestyle="--", label=f"fig1's maximum effective kn = {limit}")
    scales.set_title("gradient noise scale B_simple per epoch (epochs resolved)", fontsize=10)
    scales.set_xlabel("epoch")
    scales.set_ylabel("B_simple, images (log scale)")
    scales.set_yscale("log")
    scales.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    scales.grid(True, alpha=0.3)
    scales.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
