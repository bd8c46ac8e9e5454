"""Input pipelines behind one small interface: `build_loaders(config, ctx) -> Loaders`.

Four loaders (--loader; LOADERS has one entry each): `dali` (NVIDIA DALI: GPU decode on GPU machines, CPU
threads elsewhere), `torchvision` (PIL in DataLoader worker processes), `memory` (a small data set decoded once
into memory shared by a node's ranks, augmented in batches by torch) and `synthetic` (one fixed batch on the
device). To add one, write its builder module here and add its entry to LOADERS. The real ones read the same
samples (ImageFolder's images and labels, minus what a --file-list excludes) and split them among ranks the
same way (shards.py), from a folder tree (samples.FileSamples) or from packed shards (packed.PackedSamples).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable

from ..cpus import cpus_per_rank

if TYPE_CHECKING:  # torch and the loaders are imported when a loader is built, not with the config
    import torch

    from ..config import TrainConfig
    from ..context import DistContext
    from .packed import PackedSamples
    from .samples import FileSamples


@dataclass(frozen=True)
class LoaderKind:
    """One --loader choice: the function in this package that builds it, and whether it reads --data."""

    builder: str  # "module:function", called as (config, ctx, samples), or (config, ctx) without files
    reads_files: bool


LOADERS = {
    "dali": LoaderKind("dali:dali_loaders", reads_files=True),
    "memory": LoaderKind("memory:memory_loaders", reads_files=True),
    "torchvision": LoaderKind("torchvision_loader:torchvision_loaders", reads_files=True),
    "synthetic": LoaderKind("synthetic:synthetic_loaders", reads_files=False),
}
FILE_LOADERS = tuple(name for name, kind in LOADERS.items() if kind.reads_files)
DALI_DEVICES = ("auto", "cpu", "gpu")


@dataclass
class Loaders:
    train: Iterable[tuple[torch.Tensor, torch.Tensor]]  # an epoch of batches of V x n (config.pass_batch), on device
    val: Iterable[tuple[torch.Tensor, torch.Tensor]]  # this rank's shard of the val set; may be empty
    train_batches: int  # batches of V x n per rank per epoch (equal on every rank)
    num_classes: int
    # set_epoch(epoch, images_done=0), before each epoch: that epoch's global shuffle, after the first
    # images_done images of it (a run resumed within an epoch reads exactly the rest; shards.py). train calls
    # it for the next epoch before evaluating (DALI starts decoding it then), and again at the epoch
    set_epoch: Callable[..., None]
    description: str  # what decodes, where, with how many threads: logged at start


@dataclass(frozen=True)
class Samples:
    train: FileSamples | PackedSamples  # ImageFolder's order
    val: FileSamples | PackedSamples
    num_classes: int


def check_data(data: Path) -> list[str]:
    """The class names of --data (a folder tree or packed shards), or a UserError that says what is wrong."""
    from .layout import check_layout
    from .packed import is_packed, read_index

    return read_index(data)["classes"] if is_packed(data) else check_layout(data)


def read_samples(data: Path, file_list: str) -> Samples:
    from .layout import class_folders, list_samples, read_file_list
    from .packed import is_packed, read_index, read_packed
    from .samples import FileSamples

    allowed = read_file_list(Path(file_list)) if file_list else None
    if is_packed(data):
        index = read_index(data)
        return Samples(*(read_packed(data, index, split, allowed) for split in ("train", "val")),
                       len(index["classes"]))
    classes = class_folders(data / "train")
    return Samples(*(FileSamples(data, list_samples(data, split, classes, allowed)) for split in ("train", "val")),
                   len(classes))


def default_threads(ctx: DistContext) -> int:
    """Decode threads (DALI) or processes (DataLoader) per rank: this rank's share of the CPUs it was given."""
    return cpus_per_rank(ctx.local_size)


def build_loaders(config: TrainConfig, ctx: DistContext) -> Loaders:
    kind = LOADERS[config.loader]
    module, function = kind.builder.split(":")
    build = getattr(importlib.import_module(f"{__name__}.{module}"), function)
    if not kind.reads_files:
        return build(config, ctx)
    return build(config, ctx, read_samples(Path(config.data), config.file_list))
