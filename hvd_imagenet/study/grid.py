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
from dataclasses import dataclass, field

from ..config import _help
from ..errors import UserError
from ..schedule import LRPolicy, peak_lr

PAPER_EPOCHS, PAPER_WARMUP, PAPER_LR_STEPS = 90, 5, (30, 60, 80)  # Sec. 2.2, 5.1


@dataclass(frozen=True)
class Scale:
    """The study's stand-ins for the paper's sizes; every field is a `study` flag."""

    ranks: int = field(default=2, metadata=_help("Horovod ranks (real workers) per run"))
    batch_size: int = field(default=4, metadata=_help("n: images per (virtual) worker per step"))
    large_factor: int = field(default=32, metadata=_help(
        "large kn / small kn, made of virtual workers (the paper's 8k / 256 = 32)"))
    eta: float = field(default=0.02, metadata=_help("the small kn's lr (the paper's eta = 0.1 for kn = 256)"))
    epochs: int = field(default=0, metadata=_help(
        "epochs per run (0: the preset's); warmup and lr steps keep the paper's fractions of 90"))
    arch: str = field(default="cifar_resnet14", metadata=_help("model (any `train --arch`)"))
    image_size: int = field(default=16, metadata=_help("training crop and val center crop, px"))
    val_resize: int = field(default=18, metadata=_help("val: shorter side resized to this, then center crop"))
    min_crop_area: float = field(default=0.5, metadata=_help(
        "scale augmentation's smallest crop (a digit needs most of itself to be told)"))

    def __post_init__(self):
        for name in ("ranks", "batch_size", "large_factor", "image_size", "val_resize"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be >= 1, not {getattr(self, name)}")
        if self.epochs < 0 or not self.eta > 0:
            raise UserError("--epochs must be >= 0 and --eta > 0")

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


def train_args(setting: Setting, scale: Scale, seed: int, data: str, output: str) -> list[str]:
    """`hvd-imagenet train` flags for one run (each of scale.ranks ranks gets the same)."""
    policy = lr_policy(setting, scale)
    return [
        "--data", data, "--output", output, "--seed", str(seed), "--epochs", str(scale.epochs),
        "--arch", scale.arch, "--image-size", str(scale.image_size), "--val-resize", str(scale.val_resize),
        "--min-crop-area", str(scale.min_crop_area), "--batch-size", str(scale.batch_size),
        # Virtual workers: the large kn's extra workers are backward passes per step on each rank (Sec. 2.3).
        "--batches-per-allreduce", str(scale.large_factor if setting.large else 1),
        "--base-lr", repr(policy.base_lr), "--ref-batch", str(policy.ref_batch), "--lr-scaling", policy.lr_scaling,
        "--warmup", policy.warmup, "--warmup-epochs", repr(policy.warmup_epochs),
        "--lr-steps", ",".join(map(str, policy.lr_steps)), "--keep-checkpoints", "1",
    ]


def peak(setting: Setting, scale: Scale) -> float:
    """The lr after warmup (the table's eta column)."""
    return peak_lr(lr_policy(setting, scale), global_batch(setting, scale))
