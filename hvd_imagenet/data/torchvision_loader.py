"""torchvision ImageFolder + DataLoader: PIL decode on CPU worker processes."""
from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

import torch
from torch.utils.data import DataLoader, DistributedSampler, Sampler
from torchvision import datasets, transforms

from ..comm import DistContext
from ..config import TrainConfig
from . import Loaders

# ImageNet's per-channel mean and std, the normalization of the paper's Sec. 5.1 (and of torchvision's models).
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


class ShardSampler(Sampler[int]):
    """Indices rank, rank + k, rank + 2k, ...: disjoint shards covering the set once, no padding."""

    def __init__(self, size: int, rank: int, world_size: int):
        self.indices = range(rank, size, world_size)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class ToDevice:
    """Re-iterable view of a DataLoader that moves each batch to the rank's device."""

    def __init__(self, loader: DataLoader, device: torch.device):
        self.loader, self.device = loader, device

    def __iter__(self):
        for images, labels in self.loader:
            yield images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)


def worker_context() -> multiprocessing.context.BaseContext:
    """Loader workers start from a forkserver, never by fork(): after hvd.init() the process has threads
    (Horovod's background loop, TensorBoard's writer, tqdm's monitor), and a child forked while one of them
    holds a lock deadlocks at start (seen here: a val worker hung forever, its rank waiting on it). Fork is
    also unsafe with InfiniBand verbs on GPU nodes, which is why Horovod's own examples use a forkserver.
    The server preloads torch and torchvision, so workers forked from it need not import them again."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "torchvision", __name__])
    return context


def default_workers(ctx: DistContext) -> int:
    return max(1, (os.cpu_count() or 1) // ctx.local_size)


def torchvision_loaders(config: TrainConfig, ctx: DistContext) -> Loaders:
    data = Path(config.data)
    normalize = transforms.Normalize(MEAN, STD)
    train_set = datasets.ImageFolder(
        data / "train",
        transforms.Compose([
            transforms.RandomResizedCrop(config.image_size),  # scale and aspect-ratio augmentation (Sec. 5.1)
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            normalize,
        ]),
    )
    val_set = datasets.ImageFolder(
        data / "val",
        transforms.Compose([
            transforms.Resize(config.val_resize),  # single center crop of the resized image (Sec. 5.1)
            transforms.CenterCrop(config.image_size),
            transforms.ToTensor(),
            normalize,
        ]),
    )
    # train.main checked the layout (check_layout): both splits hold the same class folders.
    # One permutation of the whole training set per epoch (seed + epoch, the same on every rank), dealt out
    # to the k ranks; the tail that does not divide evenly is dropped so every rank runs the same steps.
    train_sampler = DistributedSampler(
        train_set, num_replicas=ctx.size, rank=ctx.rank, shuffle=True, seed=config.seed, drop_last=True
    )
    workers = config.workers or default_workers(ctx)
    pin = ctx.device.type == "cuda"
    context = worker_context()
    train = DataLoader(
        train_set, batch_size=config.batch_size, sampler=train_sampler, num_workers=workers,
        pin_memory=pin, drop_last=True, multiprocessing_context=context,
    )
    val = DataLoader(
        val_set, batch_size=config.batch_size, sampler=ShardSampler(len(val_set), ctx.rank, ctx.size),
        num_workers=workers, pin_memory=pin, multiprocessing_context=context,
    )
    return Loaders(
        train=ToDevice(train, ctx.device),
        val=ToDevice(val, ctx.device),
        train_batches=len(train),
        num_classes=len(train_set.classes),
        set_epoch=train_sampler.set_epoch,
    )
