"""Input pipelines behind one small interface: `build_loaders(config, ctx) -> Loaders`, the loader that
--loader names (the registry: data/__init__.py's LOADERS), over the samples of --data (`read_samples`)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..cpus import cpus_per_rank
from ..registry import resolve
from . import LOADERS

if TYPE_CHECKING:  # torch and the loaders are imported when a loader is built, not with the config
    import torch

    from ..config import TrainConfig
    from ..context import DistContext
    from .packed import PackedSamples
    from .samples import FileSamples


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
        return Samples(*(read_packed(data, index, split, allowed) for split in ("train", "val")), len(index["classes"]))
    classes = class_folders(data / "train")
    return Samples(
        *(FileSamples(data, list_samples(data, split, classes, allowed)) for split in ("train", "val")), len(classes)
    )


def default_threads(ctx: DistContext) -> int:
    """Decode threads (DALI) or processes (DataLoader) per rank: this rank's share of the CPUs it was given."""
    return cpus_per_rank(ctx.local_size)


def build_loaders(config: TrainConfig, ctx: DistContext) -> Loaders:
    kind = LOADERS[config.loader]
    build = resolve(kind.builder)
    if not kind.reads_files:
        return build(config, ctx)
    return build(config, ctx, read_samples(Path(config.data), config.file_list))
