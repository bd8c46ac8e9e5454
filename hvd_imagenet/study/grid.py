"""Which `hvd-imagenet train` runs reproduce which row of Goyal et al. (2017) Table 1, Table 2a and Fig. 1.

The paper -> here (Scale's defaults; make-dataset --kind cluttered-digits):

    k workers x n=32 images          -> k = ranks x virtual workers in one pass, n=4 each: each group of n has
                                        its own BN statistics, as each worker does (Sec. 2.3; ghost BN)
    baseline kn=256 (k=8)            -> small kn = k x n = 2 x 4 = 8 (1 rank x 2 virtual workers)
    large kn=8k (k=256), 32x         -> large kn = 32x the small: 64 virtual workers, one pass of 256 images
    Fig. 1: kn from 64 to 64k        -> fig1: kn from 8 doubling to 128x it (1,024)
    eta = 0.1 for kn=256             -> eta = 0.02 for the small kn (--ref-batch = small kn)
    90 epochs, 5 of warmup,          -> the same fractions of --epochs: 9 epochs, 0.5 of warmup, /10 at 3, 6, 8
      /10 at 30, 60, 80
    ResNet-50, ImageNet, 224 px      -> cifar_resnet14 (0.18M parameters), 28,760 cluttered digits, 16 px crops
    1.28M images, kn=8k reads 0.64%  -> the large kn reads 0.89% of the training set per step
    ~14k steps at 8k                 -> 112 steps per epoch at the large kn: 1,008 steps

Past the paper's limit (--preset beyond; fig1 found kn = 256, 32x, the last kn within 1 point), three recipes at
kn = 256 to 2,048 (RECIPES below): the paper's SGD; MLPerf's ResNet-50 recipe (LARS, label smoothing 0.1, linear
warmup, poly decay), its lr mapped to the study as eta is (x0.2, for a kn 1/32 of the paper's); and the same
recipe with SGD at the paper's lr, which separates the optimizer from the rest. Each recipe's peak lr x0.5 and x2
at the largest kn, where a recipe that fails anywhere fails, so that a failure is not a bad lr. Every run
measures the gradient noise scale (two passes per step: B_small = kn / 2).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..config import TrainConfig
from ..errors import UserError
from ..flags import check, opt, to_argv
from ..schedule import LRPolicy, peak_lr

PAPER_EPOCHS, PAPER_WARMUP, PAPER_LR_STEPS = 90, 5, (30, 60, 80)  # Sec. 2.2, 5.1


@dataclass(frozen=True)
class Scale:
    """The study's stand-ins for the paper's sizes; every field is a `study` flag."""

    ranks: int = opt("Horovod ranks (real workers) per run; the rest of k are virtual workers", 1, min=1)
    small_workers: int = opt("k of the small kn (the paper's 8): ranks x virtual workers per pass", 2, min=1)
    batch_size: int = opt("n: images per (virtual) worker per step, each with its own BN statistics", 4, min=1)
    large_factor: int = opt("table1, table2a: large kn / small kn (the paper's 8k / 256 = 32)", 32, min=1)
    max_factor: int = opt("fig1: the sweep's largest kn / small kn; kn doubles from the small kn up to it", 128, min=2)
    eta: float = opt("the small kn's lr (the paper's eta = 0.1 for kn = 256)", 0.02, above=0)
    epochs: int = opt(
        "epochs per run (0: the preset's); warmup and lr steps keep the paper's fractions of 90", 0, min=0
    )
    arch: str = opt("model (any `train --arch`)", "cifar_resnet14")
    image_size: int = opt("training crop and val center crop, px", 16, min=1)
    val_resize: int = opt("val: shorter side resized to this, then center crop", 18, min=1)
    min_crop_area: float = opt(
        "scale augmentation's smallest crop (a digit needs most of itself to be told)", 0.5, above=0, max=1
    )

    def __post_init__(self):
        check(self)
        if self.small_workers % self.ranks:
            raise UserError(
                f"--small-workers {self.small_workers} must be a multiple of --ranks {self.ranks}: "
                "each rank runs the same number of virtual workers"
            )

    @property
    def small_kn(self) -> int:
        return self.small_workers * self.batch_size


@dataclass(frozen=True)
class Recipe:
    """What a beyond row trains with besides kn: the optimizer, the loss and the schedule, and where its lr
    comes from (`lr`: the paper's eta, or MLPerf's peak lr at its batch, both mapped to the study)."""

    name: str
    optimizer: str = "sgd"
    label_smoothing: float = 0.0
    lr_schedule: str = "step"
    warmup: str = "gradual"
    lr: str = "paper"  # "paper": eta at the small kn, linear rule; "mlperf": 11.0 at 3,200, x0.2 and kn / 32
    weight_decay: float = 1e-4
    nesterov: bool = True


MLPERF_LR, MLPERF_BATCH, MLPERF_END_LR = 11.0, 3200, 1e-4  # NVIDIA's v4.0 8x8x50 (recipes.py)
PAPER_ETA = 0.1  # for kn = 256 (Sec. 2.1)
RECIPES = {
    "sgd": Recipe("SGD, linear rule, gradual warmup, steps (the paper's)"),
    "lars": Recipe(
        "LARS, label smoothing 0.1, linear warmup, poly 2 (MLPerf's)",
        optimizer="lars",
        label_smoothing=0.1,
        lr_schedule="poly",
        warmup="linear",
        lr="mlperf",
        weight_decay=5e-5,
        nesterov=False,
    ),
    "sgd-poly": Recipe(
        "SGD, label smoothing 0.1, linear warmup, poly 2 (MLPerf's, SGD at the paper's lr)",
        label_smoothing=0.1,
        lr_schedule="poly",
        warmup="linear",
        weight_decay=5e-5,
        nesterov=False,
    ),
}


@dataclass(frozen=True)
class Setting:
    """One row of the paper's tables or one point of its Fig. 1: a minibatch size, an lr rule and a warmup
    (and for --preset beyond, a recipe)."""

    key: str  # the run directories' name: runs/<key>-seed<s>
    factor: int = 1  # kn / the small kn, by more virtual workers
    warmup: str = "none"
    lr_scaling: str = "linear"
    eta_factor: float = 1.0  # x Scale.eta (Table 2a's 0.05 / 0.1 / 0.2), x the recipe's lr (beyond's sweep)
    paper: str = ""  # the paper's top-1 val error for this row (ResNet-50 on ImageNet, mean ± std of 5 runs)
    recipe: str = "sgd"  # a key of RECIPES

    def label(self, scale: Scale) -> str:
        """'kn=256, eta=0.02x32, gradual warmup', as the paper writes its rows (beyond: the recipe's key)."""
        if beyond_run(self):
            times = f", lr x{self.eta_factor:g}" if self.eta_factor != 1 else ""
            return f"kn={global_batch(self, scale)}, {self.recipe}{times}"
        eta = f"{self.eta_factor * scale.eta:g}"
        factor = {"linear": f"x{self.factor}", "sqrt": f"xsqrt({self.factor})", "none": ""}
        lr = f"{eta}{factor[self.lr_scaling]}" if self.factor > 1 else eta
        warmup = f", {self.warmup} warmup" if self.factor > 1 and self.warmup != "none" else ""
        return f"kn={global_batch(self, scale)}, eta={lr}{warmup}"


BASELINE = Setting("small", paper="23.60 ± 0.12")


def table1(scale: Scale) -> tuple[Setting, ...]:
    large = scale.large_factor
    return (
        BASELINE,
        Setting("large-no-warmup", large, paper="24.84 ± 0.37"),
        Setting("large-constant-warmup", large, warmup="constant", paper="25.88 ± 0.56"),
        Setting("large-gradual-warmup", large, warmup="gradual", paper="23.74 ± 0.09"),
    )


def table2a(scale: Scale) -> tuple[Setting, ...]:
    large = scale.large_factor
    return (
        BASELINE,
        Setting("small-eta-x0.5", eta_factor=0.5, paper="23.92 ± 0.10"),
        Setting("small-eta-x2", eta_factor=2.0, paper="23.68 ± 0.09"),
        Setting("large-linear", large, warmup="gradual", paper="23.74 ± 0.09"),
        Setting("large-unscaled", large, warmup="gradual", lr_scaling="none", paper="41.67 ± 0.10"),
        Setting("large-sqrt", large, warmup="gradual", lr_scaling="sqrt", paper="26.22 ± 0.03"),
    )


def fig1(scale: Scale) -> tuple[Setting, ...]:
    """kn doubling from the small kn, linear rule and gradual warmup (the paper: 64 to 64k; flat up to 8k)."""
    factors = [2**i for i in range(1, scale.max_factor.bit_length()) if 2**i <= scale.max_factor]
    return (BASELINE, *(Setting(f"x{f}", f, warmup="gradual") for f in factors))


def quick(scale: Scale) -> tuple[Setting, ...]:
    return BASELINE, table1(scale)[-1]


BEYOND_FACTORS = (1, 2, 4, 8)  # x the large kn (fig1's limit here): kn 256 to 2,048 at the default scale


def beyond(scale: Scale) -> tuple[Setting, ...]:
    """The baseline, each recipe at kn = large kn x BEYOND_FACTORS, then each recipe's lr x0.5 and x2 at the
    largest kn."""
    factors = [scale.large_factor * f for f in BEYOND_FACTORS]
    grid = [Setting(f"beyond-{r}-x{f}", f, warmup=RECIPES[r].warmup, recipe=r) for r in RECIPES for f in factors]
    sweep = [
        Setting(f"beyond-{r}-x{factors[-1]}-lr{m:g}", factors[-1], warmup=RECIPES[r].warmup, recipe=r, eta_factor=m)
        for r in RECIPES
        for m in (0.5, 2.0)
    ]
    return (Setting("beyond-sgd-x1", paper="23.60 ± 0.12"), *grid, *sweep)


# name -> (its settings, the baseline first; its default epochs)
PRESETS: dict[str, tuple[Callable[[Scale], tuple[Setting, ...]], int]] = {
    "table1": (table1, 9),
    "table2a": (table2a, 9),
    "fig1": (fig1, 9),
    "quick": (quick, 3),
    "beyond": (beyond, 9),
}


def resolve(preset: str, scale: Scale) -> tuple[tuple[Setting, ...], Scale]:
    """The preset's settings, and the scale with its epochs filled in."""
    if preset not in PRESETS:
        raise UserError(f"--preset must be one of {', '.join(PRESETS)}, not {preset!r}")
    settings, epochs = PRESETS[preset]
    scale = scale if scale.epochs else dataclasses.replace(scale, epochs=epochs)
    return settings(scale), scale


def lr_policy(setting: Setting, scale: Scale) -> LRPolicy:
    """The lr flags of a run: eta for the small kn, the setting's rule to its kn, and the paper's warmup and
    step schedule shrunk to scale.epochs (Sec. 2.1, 2.2, 5.1); a beyond recipe's schedule.

    MLPerf's lr (LARS) maps to the study as eta does: x scale.eta / 0.1, at a batch kn / 32 of its 3,200 (the
    study's small kn stands for the paper's 256). It then scales by the square root of kn, not linearly: MLPerf's
    own LARS configs raise the lr far less than kn (reference: 10 below 16k, 25 below 32k; NVIDIA: 11.0 at 3.2k,
    19.4 at 40k)."""
    fraction = scale.epochs / PAPER_EPOCHS
    steps = tuple(sorted({max(1, round(step * fraction)) for step in PAPER_LR_STEPS}))
    recipe = RECIPES[setting.recipe]
    base_lr, ref_batch, rule = scale.eta, scale.small_kn, setting.lr_scaling
    if recipe.lr == "mlperf":
        base_lr, ref_batch, rule = MLPERF_LR * scale.eta / PAPER_ETA, MLPERF_BATCH * scale.small_kn / 256, "sqrt"
    return LRPolicy(
        base_lr=setting.eta_factor * base_lr,
        ref_batch=round(ref_batch),
        lr_scaling=rule,
        warmup=setting.warmup,
        warmup_epochs=PAPER_WARMUP * fraction,
        lr_schedule=recipe.lr_schedule,
        lr_steps=steps,
        end_lr=MLPERF_END_LR * scale.eta / PAPER_ETA,
    )


def global_batch(setting: Setting, scale: Scale) -> int:
    return scale.small_kn * setting.factor


def workers(setting: Setting, scale: Scale) -> int:
    """k: the setting's workers, ranks x virtual workers per pass."""
    return scale.small_workers * setting.factor


def virtual_workers_per_pass(setting: Setting, scale: Scale) -> int:
    """Each rank's share of the k workers, run in one forward/backward."""
    return workers(setting, scale) // scale.ranks


# The `train` flags a study run sets; the rest keep train's defaults.
RUN_FLAGS = (
    "data",
    "output",
    "seed",
    "epochs",
    "arch",
    "image_size",
    "val_resize",
    "min_crop_area",
    "batch_size",
    "virtual_workers_per_pass",
    "loader",
    "base_lr",
    "ref_batch",
    "lr_scaling",
    "warmup",
    "warmup_epochs",
    "lr_steps",
    "keep_checkpoints",
)
BEYOND_FLAGS = (
    "batches_per_allreduce",
    "optimizer",
    "label_smoothing",
    "lr_schedule",
    "end_lr",
    "weight_decay",
    "nesterov",
)


def train_config(setting: Setting, scale: Scale, seed: int, data: str, output: str) -> TrainConfig:
    """The `hvd-imagenet train` config of one run (each of scale.ranks ranks gets the same)."""
    recipe = RECIPES[setting.recipe]
    # beyond's runs: the k workers in 2 passes of k/2 (BN over each n as before), so one rank has two batch
    # sizes for the noise scale's estimate (noise_scale.py)
    passes = 2 if beyond_run(setting) and virtual_workers_per_pass(setting, scale) % 2 == 0 else 1
    return TrainConfig(
        data=data,
        output=output,
        seed=seed,
        epochs=scale.epochs,
        arch=scale.arch,
        image_size=scale.image_size,
        val_resize=scale.val_resize,
        min_crop_area=scale.min_crop_area,
        batch_size=scale.batch_size,
        # The k workers: each rank runs k / ranks of them in one forward/backward, BN over each n (Sec. 2.3).
        virtual_workers_per_pass=virtual_workers_per_pass(setting, scale) // passes,
        batches_per_allreduce=passes,
        lr=lr_policy(setting, scale),
        optimizer=recipe.optimizer,
        label_smoothing=recipe.label_smoothing,
        weight_decay=recipe.weight_decay,
        nesterov=recipe.nesterov,
        # A small data set decoded once into RAM: on a CPU, per-image decoding would cost more than the step.
        loader="memory",
        keep_checkpoints=1,
    )


def beyond_run(setting: Setting) -> bool:
    return setting.key.startswith("beyond-")


def lr_sweep(setting: Setting) -> bool:
    """beyond's lr x0.5 / x2 rows (a check of another row's lr)."""
    return beyond_run(setting) and setting.eta_factor != 1


def train_args(setting: Setting, scale: Scale, seed: int, data: str, output: str) -> list[str]:
    """`hvd-imagenet train` flags for one run (beyond's also set the recipe's)."""
    names = RUN_FLAGS + (BEYOND_FLAGS if beyond_run(setting) else ())
    return to_argv(train_config(setting, scale, seed, data, output), names=names)


def peak(setting: Setting, scale: Scale) -> float:
    """The lr after warmup (the table's eta column)."""
    return peak_lr(lr_policy(setting, scale), global_batch(setting, scale))


@dataclass(frozen=True)
class Run:
    """One `train` job of a study: a setting and a seed, in its own directory under OUTPUT/runs."""

    setting: Setting
    seed: int
    directory: Path

    @property
    def name(self) -> str:
        return self.directory.name


def plan(settings: tuple[Setting, ...], seeds: int, output: Path) -> list[Run]:
    return [Run(s, seed, output / "runs" / f"{s.key}-seed{seed}") for seed in range(seeds) for s in settings]
