"""--recipe: named sets of defaults. A recipe fills the flags' defaults; a flag given explicitly wins over it
(cli.py applies a recipe to the parser before parsing; flags.to_argv writes the flags that differ from it).
No torch, no Horovod: `--help` prints the table below.

    goyal2017   Goyal et al. (2017), "Accurate, Large Minibatch SGD": the flags' own defaults (Sec. 2, 5.1)
    mlperf-v4   MLPerf Training v4.0 ResNet-50, NVIDIA's 8 nodes x 8 H100 x 50 images (global batch 3,200):
                training_results_v4.0 NVIDIA/benchmarks/resnet/implementations/*/config_DGXH100_8x8x50.sh for
                batch, lr, warmup, epochs, weight decay, momentum; the reference (mlcommons/training
                image_classification/tensorflow2: lars_optimizer.py, lars_util.py) for LARS's eta and epsilon,
                linear warmup, poly power and end lr, label smoothing and evaluation every 4 epochs.
                Its 40k-batch config (316 x 8 x 16): peak lr 19.4, 24 warmup epochs, 70 epochs, wd 1e-4,
                momentum 0.95. Quality target 75.9 % top-1.
"""

from __future__ import annotations

RECIPES: dict[str, dict] = {
    "goyal2017": {},
    "mlperf-v4": {
        "optimizer": "lars",
        "batch_size": 50,
        "base_lr": 11.0,
        "ref_batch": 3200,
        "lr_scaling": "linear",
        "warmup": "linear",
        "warmup_epochs": 2.0,
        "epochs": 37,
        "lr_schedule": "poly",
        "poly_power": 2.0,
        "end_lr": 1e-4,
        "weight_decay": 5e-5,
        "momentum": 0.9,
        "nesterov": False,
        "label_smoothing": 0.1,
        "eval_every": 4,
        "lars_eta": 0.001,
        "lars_epsilon": 0.0,
    },
}
TARGETS = {"goyal2017": "76.3 % top-1 (Table 1, kn = 8k: 23.74 % error)", "mlperf-v4": "75.9 % top-1"}
SHOWN = (
    "optimizer",
    "batch_size",
    "base_lr",
    "ref_batch",
    "warmup",
    "warmup_epochs",
    "epochs",
    "lr_schedule",
    "lr_steps",
    "poly_power",
    "end_lr",
    "weight_decay",
    "momentum",
    "nesterov",
    "label_smoothing",
    "eval_every",
    "lars_eta",
)


def defaults(recipe: str, base: dict) -> dict:
    """`base` (the flags' own defaults, by field name) with the recipe's values over them."""
    return {**base, **RECIPES[recipe]}


def table(base: dict) -> str:
    """The recipes side by side, one flag per line, for a command whose flags' defaults are `base` (train
    --help, schedule --help, the README)."""
    values = {recipe: defaults(recipe, base) for recipe in RECIPES}
    rows = [("flag", *RECIPES)] + [
        ("--" + name.replace("_", "-"), *(_cell(name, values[r]) for r in RECIPES)) for name in SHOWN if name in base
    ]
    rows.append(("target", *(TARGETS[r] for r in RECIPES)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows)


def _cell(name: str, values: dict) -> str:
    """A value as the table shows it; "-" where the recipe's other choices make the flag unused."""
    schedule = values["lr_schedule"]
    unused = {
        "lr_steps": schedule != "step",
        "poly_power": schedule != "poly",
        "end_lr": schedule == "step",
        "lars_eta": values.get("optimizer") != "lars",
    }
    return "-" if unused.get(name) else _show(values[name])


def _show(value) -> str:
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return "-" if value is None else f"{value:g}" if isinstance(value, float) else str(value)
