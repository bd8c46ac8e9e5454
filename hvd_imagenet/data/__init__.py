"""Input pipelines behind one small interface: `build_loaders(config, ctx) -> Loaders`.

Every loader shards by global rank (Horovod rank r of size k), reshuffles the whole training set once per
epoch with a seed every rank shares and splits it among the k ranks (Goyal et al. Sec. 3, Remark 4), and
gives each rank a disjoint 1/k of the val set so that every val image is counted exactly once.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from ..comm import DistContext
from ..config import TrainConfig


@dataclass
class Loaders:
    train: Iterable[tuple[torch.Tensor, torch.Tensor]]  # one pass = one epoch of micro-batches of n, on device
    val: Iterable[tuple[torch.Tensor, torch.Tensor]]  # this rank's shard of the val set; may be empty
    train_batches: int  # micro-batches per rank per epoch (equal on every rank)
    num_classes: int
    set_epoch: Callable[[int], None]  # call before each epoch: selects that epoch's global shuffle


def build_loaders(config: TrainConfig, ctx: DistContext) -> Loaders:
    if config.loader == "synthetic":
        from .synthetic import synthetic_loaders

        return synthetic_loaders(config, ctx)
    from .torchvision_loader import torchvision_loaders

    return torchvision_loaders(config, ctx)
