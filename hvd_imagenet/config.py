"""Training configuration: one frozen dataclass, the paper's values as defaults, validated on construction.

The CLI builds its flags from these fields (cli.py), so a default is written here and nowhere else. Field
metadata carries the help text; a nested dataclass (the lr policy) contributes its own flags.
"""
from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass, field

from .errors import UserError
from .schedule import LRPolicy

LOADERS = ("dali", "torchvision", "synthetic")
DALI_DEVICES = ("auto", "cpu", "gpu")
COMPRESSIONS = ("none", "fp16", "bf16", "powersgd")  # names of comm.COMPRESSORS; checked there too
# Horovod 0.28.1's own knob defaults (horovod/common/operations.cc): fusion MiB, cycle ms, hierarchical allreduce
HOROVOD_DEFAULTS = (128.0, 1.0, False)
PRECISIONS = {"fp32": None, "amp-fp16": "float16", "amp-bf16": "bfloat16"}  # --precision: autocast dtype


def resnet_names() -> list[str]:
    """Every ResNet constructor torchvision ships (resnet18..152, resnext*, wide_resnet*), and the small-image
    ResNets of model.py."""
    import torchvision.models  # here, not at the top: `hvd-imagenet --help` need not wait for torch

    from .model import SMALL_IMAGE_RESNETS

    return sorted([name for name in torchvision.models.resnet.__all__ if name[0].islower()] + [*SMALL_IMAGE_RESNETS])


def default_loader() -> str:
    """DALI where it is installed (it is a dependency, but a user may have left it out), else torchvision."""
    return "dali" if importlib.util.find_spec("nvidia.dali") else "torchvision"


def _help(text: str) -> dict:
    return {"help": text}


@dataclass(frozen=True)
class TrainConfig:
    data: str = field(default="", metadata=_help("ImageNet-layout data set: DIR/train/<class>/*, DIR/val/<class>/*"))
    output: str = field(default="", metadata=_help("run directory: config.json, metrics.jsonl, checkpoints/"))
    checkpoint_dir: str = field(default="", metadata=_help("where checkpoints go (default: OUTPUT/checkpoints)"))
    arch: str = field(default="resnet50", metadata=_help(
        "any torchvision ResNet, or cifar_resnet8/14/20 (He et al. 2016, for small images; the study's)"))
    epochs: int = field(default=90, metadata=_help("training epochs (Sec. 5.1: 90)"))
    batch_size: int = field(default=32, metadata=_help("images per worker per step, n (Sec. 2.3: 32)"))
    lr: LRPolicy = field(default_factory=LRPolicy)
    momentum: float = field(default=0.9, metadata=_help("SGD momentum (Sec. 5.1)"))
    nesterov: bool = field(default=True, metadata=_help("Nesterov momentum (Sec. 5.1)"))
    weight_decay: float = field(default=1e-4, metadata=_help("L2 weight decay lambda (Sec. 5.1)"))
    bn_weight_decay: bool = field(default=False, metadata=_help("also decay BN gamma/beta and biases"))
    zero_init_residual: bool = field(default=True, metadata=_help("gamma=0 in each block's last BN (Sec. 5.1)"))
    image_size: int = field(default=224, metadata=_help("training crop and val center crop, px"))
    min_crop_area: float = field(default=0.08, metadata=_help(
        "scale augmentation: the smallest crop, as a fraction of the image's area (Sec. 5.1, after Szegedy et "
        "al.: 0.08); small images of whole objects (the study's digits) want more"))
    val_resize: int = field(default=256, metadata=_help("val: shorter side resized to this, then center crop"))
    batches_per_allreduce: int = field(
        default=1, metadata=_help("virtual workers: micro-batches of n per rank per step, each with its own BN stats")
    )
    compression: str = field(default="none", metadata=_help(
        f"gradient compression on the wire: {', '.join(COMPRESSIONS)} (docs/communication.md)"))
    powersgd_rank: int = field(default=2, metadata=_help("--compression powersgd: rank r of the factors P, Q"))
    powersgd_start_step: int = field(default=1000, metadata=_help(
        "--compression powersgd: steps of uncompressed allreduce first (PyTorch DDP's start_powerSGD_iter)"))
    gradient_predivide_factor: float = field(default=1.0, metadata=_help(
        "divide gradients by f before the sum and by ranks/f after: fp16 sums of many ranks overflow less"))
    fusion_threshold_mb: float = field(default=HOROVOD_DEFAULTS[0], metadata=_help(
        "Horovod tensor fusion buffer, MiB (HOROVOD_FUSION_THRESHOLD; 0: no fusion)"))
    cycle_time_ms: float = field(default=HOROVOD_DEFAULTS[1], metadata=_help(
        "Horovod background cycle: how often ready gradients are negotiated and sent (HOROVOD_CYCLE_TIME)"))
    hierarchical_allreduce: bool = field(default=HOROVOD_DEFAULTS[2], metadata=_help(
        "NCCL within a node, MPI across nodes on 1/8 of the data each (HOROVOD_HIERARCHICAL_ALLREDUCE; GPU only)"))
    precision: str = field(default="fp32", metadata=_help(
        f"{', '.join(PRECISIONS)}: autocast for forward and loss; amp-fp16 adds loss scaling (GradScaler)"))
    max_grad_norm: float = field(default=0.0, metadata=_help(
        "clip the averaged gradients to this global L2 norm (0: no clipping; the paper does not clip)"))
    seed: int = field(default=0, metadata=_help("seed for init, shuffling and augmentation"))
    max_steps_per_epoch: int = field(default=0, metadata=_help("cap on optimizer steps per epoch (0: no cap)"))
    channels_last: bool = field(default=False, metadata=_help(
        "NHWC (channels_last) image batches: convolutions follow the input's format. The weights stay "
        "contiguous: Horovod allreduces only contiguous tensors (horovod#3491)"))
    loader: str = field(default_factory=default_loader,
                        metadata=_help(f"input pipeline: {', '.join(LOADERS)} (dali when installed)"))
    file_list: str = field(default="", metadata=_help("only these files (`check-data --write-file-list`)"))
    dali_device: str = field(default="auto", metadata=_help(
        "DALI decode: gpu (nvJPEG, mixed) or cpu; auto: gpu when this rank has one"))
    dali_threads: int = field(default=0, metadata=_help("DALI CPU threads per rank (0: cores / local ranks)"))
    dali_prefetch: int = field(default=2, metadata=_help("DALI batches decoded ahead of the one in use"))
    workers: int = field(default=0, metadata=_help(
        "torchvision DataLoader worker processes per rank (0: cores / local ranks)"))
    resume: bool = field(default=False, metadata=_help(
        "continue from the newest checkpoint (a fresh start when there is none)"))
    allow_resize: bool = field(default=False, metadata=_help(
        "--resume on another world size or global batch: the linear scaling rule re-scales the lr"))
    keep_checkpoints: int = field(default=3, metadata=_help(
        "newest checkpoints kept, the rest deleted (0: keep all; a ResNet-50 one is ~200 MB)"))
    skip_nonfinite: bool = field(default=False, metadata=_help(
        "skip a step whose averaged gradients are NaN/inf (counted in metrics) instead of stopping the run"))
    elastic: bool = field(default=False, metadata=_help(
        "Horovod elastic training (horovodrun --min-np/--max-np/--host-discovery-script): ranks may leave "
        "or join; the lr follows the new world size. Implies --resume"))
    elastic_commit_steps: int = field(default=20, metadata=_help(
        "--elastic: steps between commits of the in-memory state that a failure rolls back to"))

    def __post_init__(self):
        positive = ("epochs", "batch_size", "image_size", "val_resize", "batches_per_allreduce", "dali_prefetch",
                    "elastic_commit_steps")
        for name in positive:
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be >= 1, not {getattr(self, name)}")
        for name in ("max_steps_per_epoch", "workers", "dali_threads", "weight_decay", "momentum", "keep_checkpoints"):
            if getattr(self, name) < 0:
                raise UserError(f"--{name.replace('_', '-')} must be >= 0, not {getattr(self, name)}")
        if self.arch not in resnet_names():
            raise UserError(f"--arch {self.arch!r} is not a known ResNet; choose from {', '.join(resnet_names())}")
        if self.loader not in LOADERS:
            raise UserError(f"--loader must be one of {', '.join(LOADERS)}, not {self.loader!r}")
        if self.dali_device not in DALI_DEVICES:
            raise UserError(f"--dali-device must be one of {', '.join(DALI_DEVICES)}, not {self.dali_device!r}")
        if self.loader == "dali" and not importlib.util.find_spec("nvidia.dali"):
            raise UserError("--loader dali: NVIDIA DALI is not installed (pip install nvidia-dali-cuda130)")
        if self.compression not in COMPRESSIONS:
            raise UserError(f"--compression must be one of {', '.join(COMPRESSIONS)}, not {self.compression!r}")
        if self.precision not in PRECISIONS:
            raise UserError(f"--precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}")
        for name in ("gradient_predivide_factor", "cycle_time_ms", "powersgd_rank"):
            if getattr(self, name) <= 0:
                raise UserError(f"--{name.replace('_', '-')} must be > 0, not {getattr(self, name)}")
        for name in ("fusion_threshold_mb", "max_grad_norm", "powersgd_start_step"):
            if getattr(self, name) < 0:
                raise UserError(f"--{name.replace('_', '-')} must be >= 0, not {getattr(self, name)}")
        if self.compression == "powersgd" and self.precision == "amp-fp16":
            raise UserError("--compression powersgd with --precision amp-fp16: PowerSGD's error memory would hold "
                            "gradients in the loss scaler's changing units; use --precision amp-bf16 (no scaling)")
        if self.compression == "powersgd" and self.elastic:
            raise UserError("--compression powersgd with --elastic: PowerSGD's per-rank error memory and step "
                            "count are not in Horovod's elastic state; a joining rank would disagree")
        knobs = (self.fusion_threshold_mb, self.cycle_time_ms, self.hierarchical_allreduce)
        if self.elastic and knobs != HOROVOD_DEFAULTS:
            raise UserError("--elastic with --fusion-threshold-mb/--cycle-time-ms/--hierarchical-allreduce other "
                            "than Horovod's defaults: set explicitly, they crashed Horovod 0.28.1's elastic "
                            "re-initialization in our tests (docs/communication.md)")
        if not 0 < self.min_crop_area <= 1:
            raise UserError(f"--min-crop-area must be in (0, 1], not {self.min_crop_area}")
        self.lr.check_fits(self.epochs)
        if self.val_resize < self.image_size:
            raise UserError(f"--val-resize {self.val_resize} is smaller than --image-size {self.image_size}")
        if not self.output:
            raise UserError("--output is required")
        if self.loader != "synthetic" and not self.data:
            raise UserError("--data is required (or --loader synthetic)")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        values = dict(values)
        lr = dict(values.pop("lr", {}))
        if "lr_steps" in lr:
            lr["lr_steps"] = tuple(lr["lr_steps"])
        return cls(lr=LRPolicy(**lr), **values)
