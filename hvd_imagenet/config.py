"""Training configuration: one frozen dataclass, the paper's values as defaults, validated on construction.

The `train` flags are built from these fields (flags.py), so a default, a help text and a bound are written
here and nowhere else. A nested dataclass (the lr policy) contributes its own flags.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass

from . import flags
from .compression import COMPRESSIONS
from .data import DALI_DEVICES, LOADERS
from .errors import UserError
from .flags import opt
from .losses import LOSSES
from .optimizers import OPTIMIZERS
from .precision import PRECISIONS
from .recipes import RECIPES
from .schedule import LRPolicy
from .watchdog import DEFAULT_TIMEOUT

# Horovod 0.28.1's own knob defaults (horovod/common/operations.cc): fusion MiB, cycle ms, hierarchical allreduce
HOROVOD_DEFAULTS = (128.0, 1.0, False)


def default_loader() -> str:
    """DALI where it is installed (it is a dependency, but a user may have left it out), else torchvision."""
    return "dali" if importlib.util.find_spec("nvidia.dali") else "torchvision"


def _resnet_names() -> list[str]:
    from .model import resnet_names  # here, not at the top: `hvd-imagenet --help` need not wait for torch

    return resnet_names()


@dataclass(frozen=True)
class TrainConfig:
    data: str = opt(
        "the data set: a folder tree DIR/train/<class>/*, DIR/val/<class>/*, or packed shards "
        "(hvd-imagenet pack); %%n stands for the node's name (a node-local copy: hvd-imagenet stage)",
        "",
    )
    output: str = opt("run directory: config.json, metrics.jsonl, checkpoints/", "")
    checkpoint_dir: str = opt("where checkpoints go (default: OUTPUT/checkpoints)", "")
    recipe: str = opt(
        f"named defaults for the flags below: {', '.join(RECIPES)} (table below; explicit flags win)",
        "goyal2017",
        choices=tuple(RECIPES),
    )
    arch: str = opt(
        "any torchvision ResNet, or cifar_resnet8/14/20 (He et al. 2016, for small images; the study's)", "resnet50"
    )
    epochs: int = opt("training epochs (Sec. 5.1: 90)", 90, min=1)
    batch_size: int = opt("images per worker per step, n (Sec. 2.3: 32)", 32, min=1)
    lr: LRPolicy = dataclasses.field(default_factory=LRPolicy)
    optimizer: str = opt(
        f"{', '.join(OPTIMIZERS)}: " + "; ".join(f"{k}: {v.help}" for k, v in OPTIMIZERS.items()),
        "sgd",
        choices=tuple(OPTIMIZERS),
    )
    momentum: float = opt("momentum (Sec. 5.1)", 0.9, min=0)
    nesterov: bool = opt("Nesterov momentum (Sec. 5.1)", True)
    weight_decay: float = opt("L2 weight decay lambda (Sec. 5.1)", 1e-4, min=0)
    bn_weight_decay: bool = opt("also decay BN gamma/beta and biases (with --optimizer lars: also adapt them)", False)
    lars_eta: float = opt("--optimizer lars: trust coefficient eta (MLPerf's 0.001)", 0.001, above=0)
    lars_epsilon: float = opt("--optimizer lars: epsilon in the trust ratio's denominator (MLPerf's 0)", 0.0, min=0)
    loss: str = opt(
        "training loss: " + "; ".join(f"{k}: {v.help}" for k, v in LOSSES.items()),
        "cross-entropy",
        choices=tuple(LOSSES),
    )
    label_smoothing: float = opt(
        "training loss only: targets (1 - s) one-hot + s uniform (MLPerf's 0.1); val loss and accuracy stay unsmoothed",
        0.0,
        min=0,
        max=1,
    )
    noise_scale: bool = opt(
        "estimate the gradient noise scale B_simple = tr(Sigma)/|G|^2 (McCandlish et al. 2018), the batch past "
        "which steps stop getting better, per epoch in images: from each rank's first pass's gradient and the "
        "step's averaged one (needs >= 2 ranks or --batches-per-allreduce >= 2)",
        True,
    )
    zero_init_residual: bool = opt("gamma=0 in each block's last BN (Sec. 5.1)", True)
    image_size: int = opt("training crop and val center crop, px", 224, min=1)
    min_crop_area: float = opt(
        "scale augmentation: the smallest crop, as a fraction of the image's area (Sec. 5.1, after Szegedy et "
        "al.: 0.08); small images of whole objects (the study's digits) want more",
        0.08,
        above=0,
        max=1,
    )
    val_resize: int = opt("val: shorter side resized to this, then center crop", 256, min=1)
    batches_per_allreduce: int = opt(
        "virtual workers one after another: forward/backward passes per rank per step, gradients accumulated", 1, min=1
    )
    virtual_workers_per_pass: int = opt(
        "virtual workers in one pass: each forward/backward takes V x n images, BN statistics over each n "
        "(ghost BN, Sec. 2.3). kn = ranks x batches-per-allreduce x V x n",
        1,
        min=1,
    )
    compression: str = opt(
        f"gradient compression on the wire: {', '.join(COMPRESSIONS)} (docs/communication.md)",
        "none",
        choices=tuple(COMPRESSIONS),
    )
    powersgd_rank: int = opt("--compression powersgd: rank r of the factors P, Q", 2, above=0)
    powersgd_start_step: int = opt(
        "--compression powersgd: steps of uncompressed allreduce first (PyTorch DDP's start_powerSGD_iter)", 1000, min=0
    )
    gradient_predivide_factor: float = opt(
        "divide gradients by f before the sum and by ranks/f after: fp16 sums of many ranks overflow less", 1.0, above=0
    )
    fusion_threshold_mb: float = opt(
        "Horovod tensor fusion buffer, MiB (HOROVOD_FUSION_THRESHOLD; 0: no fusion)", HOROVOD_DEFAULTS[0], min=0
    )
    cycle_time_ms: float = opt(
        "Horovod background cycle: how often ready gradients are negotiated and sent (HOROVOD_CYCLE_TIME)",
        HOROVOD_DEFAULTS[1],
        above=0,
    )
    hierarchical_allreduce: bool = opt(
        "NCCL within a node, MPI across nodes on 1/8 of the data each (HOROVOD_HIERARCHICAL_ALLREDUCE; GPU only)",
        HOROVOD_DEFAULTS[2],
    )
    precision: str = opt(
        f"{', '.join(PRECISIONS)}: autocast for forward and loss; amp-fp16 adds loss scaling (GradScaler)",
        "fp32",
        choices=tuple(PRECISIONS),
    )
    max_grad_norm: float = opt(
        "clip the averaged gradients to this global L2 norm (0: no clipping; the paper does not clip)", 0.0, min=0
    )
    seed: int = opt("seed for init, shuffling and augmentation", 0)
    max_steps_per_epoch: int = opt("cap on optimizer steps per epoch (0: no cap)", 0, min=0)
    channels_last: bool = opt(
        "NHWC (channels_last) weights and image batches: cuDNN's tensor-core convolutions work in NHWC, so "
        "no layout conversions (our Horovod patch allreduces dense NHWC gradients; docs/communication.md)",
        False,
    )
    loader: str = opt(
        f"input pipeline: {', '.join(LOADERS)} (dali when installed)",
        default_factory=default_loader,
        choices=tuple(LOADERS),
    )
    file_list: str = opt("only these files (`check-data --write-file-list`)", "")
    dali_device: str = opt(
        "DALI decode: gpu (nvJPEG, mixed) or cpu; auto: gpu when this rank has one", "auto", choices=DALI_DEVICES
    )
    dali_threads: int = opt("DALI CPU threads per rank (0: cores / local ranks)", 0, min=0)
    dali_prefetch: int = opt("DALI batches decoded ahead of the one in use", 2, min=1)
    workers: int = opt("torchvision DataLoader worker processes per rank (0: cores / local ranks)", 0, min=0)
    resume: bool = opt("continue from the newest checkpoint (a fresh start when there is none)", False)
    allow_resize: bool = opt(
        "--resume on another world size or global batch: the linear scaling rule re-scales the lr", False
    )
    checkpoint_every: int = opt(
        "write a checkpoint every N epochs, and after the last; a stop signal (SIGUSR1, SIGTERM) always writes "
        "one. Rank 0 writes it in the background: the steps wait only for a copy in host memory",
        1,
        min=1,
    )
    eval_every: int = opt("evaluate every N epochs, and after the last (MLPerf's ResNet-50: 4)", 1, min=1)
    keep_checkpoints: int = opt(
        "newest checkpoints kept, the rest deleted (0: keep all; a ResNet-50 one is ~200 MB)", 3, min=0
    )
    skip_nonfinite: bool = opt(
        "skip a step whose averaged gradients are NaN/inf (counted in metrics) instead of stopping the run", False
    )
    elastic: bool = opt(
        "Horovod elastic training (horovodrun --min-np/--max-np/--host-discovery-script): ranks may leave "
        "or join; the lr follows the new world size. Implies --resume",
        False,
    )
    elastic_commit_steps: int = opt(
        "--elastic: steps between commits of the in-memory state that a failure rolls back to", 20, min=1
    )
    hang_timeout: float = opt(
        "seconds a rank may go without progress (a step, an evaluation batch, a checkpoint written) before it "
        "ends itself, so that the launcher ends a job that one hung rank holds (0: never; docs/reliability.md)",
        DEFAULT_TIMEOUT,
        min=0,
    )
    status_every: float = opt(
        "seconds between rank 0's status lines when stdout is not a terminal (a launcher's log); a terminal "
        "gets a progress bar",
        30.0,
        above=0,
    )

    def __post_init__(self):
        flags.check(self)
        if self.arch not in _resnet_names():
            raise UserError(f"--arch {self.arch!r} is not a known ResNet; choose from {', '.join(_resnet_names())}")
        if self.loader == "dali" and not importlib.util.find_spec("nvidia.dali"):
            raise UserError("--loader dali: NVIDIA DALI is not installed (pip install nvidia-dali-cuda130)")
        if self.compression == "powersgd" and self.precision == "amp-fp16":
            raise UserError(
                "--compression powersgd with --precision amp-fp16: PowerSGD's error memory would hold "
                "gradients in the loss scaler's changing units; use --precision amp-bf16 (no scaling)"
            )
        if self.compression == "powersgd" and self.elastic:
            raise UserError(
                "--compression powersgd with --elastic: PowerSGD's per-rank error memory and step "
                "count are not in Horovod's elastic state; a joining rank would disagree"
            )
        knobs = (self.fusion_threshold_mb, self.cycle_time_ms, self.hierarchical_allreduce)
        if self.elastic and knobs != HOROVOD_DEFAULTS:
            raise UserError(
                "--elastic with --fusion-threshold-mb/--cycle-time-ms/--hierarchical-allreduce other "
                "than Horovod's defaults: set explicitly, they crashed Horovod 0.28.1's elastic "
                "re-initialization in our tests (docs/communication.md)"
            )
        self.lr.check_fits(self.epochs)
        if self.val_resize < self.image_size:
            raise UserError(f"--val-resize {self.val_resize} is smaller than --image-size {self.image_size}")
        if not self.output:
            raise UserError("--output is required")
        if LOADERS[self.loader].reads_files and not self.data:
            raise UserError("--data is required (or --loader synthetic)")

    @property
    def pass_batch(self) -> int:
        """Images per forward/backward pass on a rank, V x n: the loaders' batch."""
        return self.virtual_workers_per_pass * self.batch_size

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def train_default(name: str):
    """A TrainConfig field's default, for the commands whose flags share it (bench-train, bench-allreduce)."""
    found = next(f for f in dataclasses.fields(TrainConfig) if f.name == name)
    return found.default_factory() if found.default is dataclasses.MISSING else found.default
