"""Which `hvd-imagenet train` runs reproduce which row of Goyal et al. (2017) Table 1 and Table 2a.

The paper -> here (Scale's defaults, chosen so table1 x 3 seeds takes under an hour on 2 CPU cores):

    k workers x n=32 images          -> `ranks` Horovod ranks x virtual workers (--batches-per-allreduce) x n=4;
                                        each micro-batch of n has its own BN statistics, as each worker does
    baseline kn=256 (k=8)            -> small kn = ranks x n = 8
    large kn=8k (k=256), 32x         -> large kn = ranks x 32 virtual workers x n = 256
    eta = 0.1 for kn=256             -> eta = 0.02 for the small kn (--ref-batch = small kn)
    90 epochs, 5 of warmup,          -> the same fractions of --epochs: 36 epochs, 2 of warmup, /10 at 12, 24, 32
      /10 at 30, 60, 80
    ResNet-50, ImageNet, 224 px      -> cifar_resnet14 (0.18M parameters), scikit-learn's digits, 16 px crops
    ~14k steps at 8k                 -> 5 steps per epoch at large kn (1,438 images): 180 steps
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..config import TrainConfig
from ..errors import UserError
from ..flags import check, opt, to_argv
from ..schedule import LRPolicy, peak_lr

PAPER_EPOCHS, PAPER_WARMUP, PAPER_LR_STEPS = 90, 5, (30, 60, 80)  # Sec. 2.2, 5.1


@dataclass(frozen=True)
class Scale:
    """The study's stand-ins for the paper's sizes; every field is a `study` flag."""

    ranks: int = opt("Horovod ranks (real workers) per run", 2, min=1)
    batch_size: int = opt("n: images per (virtual) worker per step", 4, min=1)
    large_factor: int = opt("large kn / small kn, made of virtual workers (the paper's 8k / 256 = 32)", 32, min=1)
    eta: float = opt("the small kn's lr (the paper's eta = 0.1 for kn = 256)", 0.02, above=0)
    epochs: int = opt("epochs per run (0: the preset's); warmup and lr steps keep the paper's fractions of 90", 0,
                      min=0)
    arch: str = opt("model (any `train --arch`)", "cifar_resnet14")
    image_size: int = opt("training crop and val center crop, px", 16, min=1)
    val_resize: int = opt("val: shorter side resized to this, then center crop", 18, min=1)
    min_crop_area: float = opt("scale augmentation's smallest crop (a digit needs most of itself to be told)", 0.5,
                               above=0, max=1)

    def __post_init__(self):
        check(self)

    @property
    def small_kn(self) -> int:
        return self.ranks * self.batch_size

    @property
    def large_kn(self) -> int:
        return self.small_kn * self.large_factor


@dataclass(frozen=True)
class Setting:
    """One row of the paper's tables: a minibatch size, an lr rule and a warmup."""

    key: str  # the run directories' name: runs/<key>-seed<s>
    large: bool  # kn = large_kn (virtual workers) or small_kn
    warmup: str = "none"
    lr_scaling: str = "linear"
    eta_factor: float = 1.0  # x Scale.eta (Table 2a's 0.05 / 0.1 / 0.2)
    paper: str = ""  # the paper's top-1 val error for this row (ResNet-50 on ImageNet, mean ± std of 5 runs)

    def label(self, scale: Scale) -> str:
        """'kn=256, eta=0.02x32, gradual warmup', as the paper writes its rows."""
        eta = f"{self.eta_factor * scale.eta:g}"
        factor = {"linear": f"x{scale.large_factor}", "sqrt": f"xsqrt({scale.large_factor})", "none": ""}
        lr = f"{eta}{factor[self.lr_scaling]}" if self.large else eta
        warmup = f", {self.warmup} warmup" if self.large and self.warmup != "none" else ""
        return f"kn={scale.large_kn if self.large else scale.small_kn}, eta={lr}{warmup}"


BASELINE = Setting("small", large=False, paper="23.60 ± 0.12")
LARGE_GRADUAL = Setting("large-gradual-warmup", large=True, warmup="gradual", paper="23.74 ± 0.09")
PRESETS: dict[str, tuple[tuple[Setting, ...], int]] = {  # settings (the baseline first) and default epochs
    "table1": ((BASELINE,
                Setting("large-no-warmup", large=True, paper="24.84 ± 0.37"),
                Setting("large-constant-warmup", large=True, warmup="constant", paper="25.88 ± 0.56"),
                LARGE_GRADUAL), 36),
    "table2a": ((BASELINE,
                 Setting("small-eta-x0.5", large=False, eta_factor=0.5, paper="23.92 ± 0.10"),
                 Setting("small-eta-x2", large=False, eta_factor=2.0, paper="23.68 ± 0.09"),
                 Setting("large-linear", large=True, warmup="gradual", paper="23.74 ± 0.09"),
                 Setting("large-unscaled", large=True, warmup="gradual", lr_scaling="none", paper="41.67 ± 0.10"),
                 Setting("large-sqrt", large=True, warmup="gradual", lr_scaling="sqrt", paper="26.22 ± 0.03")), 36),
    "quick": ((BASELINE, LARGE_GRADUAL), 3),
}


def resolve(preset: str, scale: Scale) -> tuple[tuple[Setting, ...], Scale]:
    """The preset's settings, and the scale with its epochs filled in."""
    if preset not in PRESETS:
        raise UserError(f"--preset must be one of {', '.join(PRESETS)}, not {preset!r}")
    settings, epochs = PRESETS[preset]
    return settings, scale if scale.epochs else dataclasses.replace(scale, epochs=epochs)


def lr_policy(setting: Setting, scale: Scale) -> LRPolicy:
    """The lr flags of a run: eta for the small kn, the setting's rule to the large kn, and the paper's warmup
    and step schedule shrunk to scale.epochs (Sec. 2.1, 2.2, 5.1)."""
    fraction = scale.epochs / PAPER_EPOCHS
    steps = tuple(sorted({max(1, round(step * fraction)) for step in PAPER_LR_STEPS}))
    return LRPolicy(base_lr=setting.eta_factor * scale.eta, ref_batch=scale.small_kn, lr_scaling=setting.lr_scaling,
                    warmup=setting.warmup, warmup_epochs=PAPER_WARMUP * fraction, lr_steps=steps)


def global_batch(setting: Setting, scale: Scale) -> int:
    return scale.large_kn if setting.large else scale.small_kn


# The `train` flags a study run sets; the rest keep train's defaults.
RUN_FLAGS = ("data", "output", "seed", "epochs", "arch", "image_size", "val_resize", "min_crop_area", "batch_size",
             "batches_per_allreduce", "base_lr", "ref_batch", "lr_scaling", "warmup", "warmup_epochs", "lr_steps",
             "keep_checkpoints")


def train_config(setting: Setting, scale: Scale, seed: int, data: str, output: str) -> TrainConfig:
    """The `hvd-imagenet train` config of one run (each of scale.ranks ranks gets the same)."""
    return TrainConfig(
        data=data, output=output, seed=seed, epochs=scale.epochs, arch=scale.arch, image_size=scale.image_size,
        val_resize=scale.val_resize, min_crop_area=scale.min_crop_area, batch_size=scale.batch_size,
        # Virtual workers: the large kn's extra workers are backward passes per step on each rank (Sec. 2.3).
        batches_per_allreduce=scale.large_factor if setting.large else 1, lr=lr_policy(setting, scale),
        keep_checkpoints=1)


def train_args(setting: Setting, scale: Scale, seed: int, data: str, output: str) -> list[str]:
    """`hvd-imagenet train` flags for one run."""
    return to_argv(train_config(setting, scale, seed, data, output), names=RUN_FLAGS)


def peak(setting: Setting, scale: Scale) -> float:
    """The lr after warmup (the table's eta column)."""
    return peak_lr(lr_policy(setting, scale), global_batch(setting, scale))
