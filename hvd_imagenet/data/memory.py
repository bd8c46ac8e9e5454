"""`--loader memory`: a small data set decoded once into memory, augmented in batches by torch.

For data sets that fit in RAM (the study's, CIFAR- or downsampled-ImageNet-sized ones), where per-image
decoding and per-image transforms cost more than the step itself on a CPU.

- Decoded once, at start: each training image to a square of --val-resize (shorter side resized to it, then
  the center square: a non-square image loses its edges), each val image to its final center crop (resize to
  --val-resize, crop --image-size, as the other loaders). uint8, HWC.
- Shared by the ranks of a node: one file in /dev/shm that every local rank maps; each decodes every
  local_size-th image into it, then all wait for the others (Horovod's barrier). The file is unlinked once
  all have mapped it, so nothing is left behind however the job ends. One rank alone keeps a private array.
- Augmentation per batch on the rank's device (Sec. 5.1): a random crop of [--min-crop-area, 1] of the area
  and aspect 3/4-4/3 (torchvision's RandomResizedCrop: 10 tries, else the whole image), resized to
  --image-size by roi_align (bilinear, averaging several samples per output pixel when shrinking), a random
  flip, ImageNet's normalization. Not bit-equal to torchvision's PIL crops; the same distribution.
- The same samples, global shuffle and exact resume as the other loaders (shards.py). The random draws of a
  batch come from (seed, epoch, rank, its position in the rank's epoch), so a run resumed mid-epoch crops
  what the uninterrupted run did.
"""

from __future__ import annotations

import math
import mmap
import os
import uuid
from pathlib import Path

import numpy as np
import torch
from torchvision import transforms
from torchvision.ops import roi_align

from .. import comm
from ..config import TrainConfig
from ..context import DistContext
from ..errors import UserError
from .loaders import Loaders, Samples
from .shards import train_shard, val_shard
from .stage import node_path
from .torchvision_loader import MEAN, STD, ImageFiles

SHARED_DIR = Path("/dev/shm")
ASPECT = (3 / 4, 4 / 3)  # RandomResizedCrop's ratio range (Sec. 5.1, after Szegedy et al.)
CROP_TRIES = 10


def crop_boxes(count: int, height: int, width: int, min_area: float, generator: torch.Generator) -> torch.Tensor:
    """[count, 4] boxes (x1, y1, x2, y2) as torchvision's RandomResizedCrop draws them, all at once: up to 10
    tries of (area fraction, log aspect); the first that fits, else the whole image."""
    shape = (count, CROP_TRIES)
    area = torch.empty(shape).uniform_(min_area, 1.0, generator=generator) * (height * width)
    aspect = torch.exp(torch.empty(shape).uniform_(*map(math.log, ASPECT), generator=generator))
    w, h = torch.sqrt(area * aspect), torch.sqrt(area / aspect)
    fits = (w <= width) & (h <= height)
    first = fits.int().argmax(dim=1, keepdim=True)  # index of the first try that fits (0 when none does)
    found = fits.any(dim=1)
    w = torch.where(found, w.gather(1, first).squeeze(1), float(width))
    h = torch.where(found, h.gather(1, first).squeeze(1), float(height))
    x1 = torch.rand(count, generator=generator) * (width - w)
    y1 = torch.rand(count, generator=generator) * (height - h)
    return torch.stack([x1, y1, x1 + w, y1 + h], dim=1)


class DecodedImages:
    """One split as uint8 [count, size, size, 3]: a node-shared /dev/shm file that every local rank maps (its
    name alike on them), or a private array. decode() fills this rank's part (all of it when not shared)."""

    def __init__(self, samples, transform, size: int, shared_name: str | None):
        self.samples, self.transform = samples, transform
        self.labels = torch.tensor([samples.label(i) for i in range(len(samples))], dtype=torch.int64)
        shape = (len(samples), size, size, 3)
        self.path = SHARED_DIR / shared_name if shared_name else None
        if self.path is None:
            self.array = np.empty(shape, dtype=np.uint8)
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.ftruncate(fd, math.prod(shape))  # every local rank: the same size, so the same file
            self.buffer = mmap.mmap(fd, math.prod(shape)) if math.prod(shape) else bytearray()
        finally:
            os.close(fd)
        self.array = np.frombuffer(self.buffer, dtype=np.uint8).reshape(shape)

    def decode(self, local_rank: int, local_size: int) -> None:
        images = ImageFiles(self.samples, self.transform)  # PIL, an unreadable image an error naming it
        for index in range(local_rank, len(self.samples), local_size):
            self.array[index] = images[index][0]

    def batch(self, indices: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 images [len(indices), 3, size, size] (an NHWC view) and labels, on the device: one gather on
        the host, then an asynchronous copy from pinned memory to a GPU (no host wait)."""
        images, labels = torch.from_numpy(self.array[indices.numpy()]), self.labels[indices]
        if device.type == "cuda":
            images, labels = images.pin_memory(), labels.pin_memory()
        return (images.to(device, non_blocking=True).permute(0, 3, 1, 2), labels.to(device, non_blocking=True))


class Normalize:
    """ImageNet's mean/std (Sec. 5.1, as the other loaders), from uint8, into the batch layout the model takes."""

    def __init__(self, device: torch.device, channels_last: bool):
        self.mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(STD, device=device).view(1, 3, 1, 1) * 255
        self.layout = torch.channels_last if channels_last else torch.contiguous_format

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return ((images.float() - self.mean) / self.std).contiguous(memory_format=self.layout)


class MemoryTrain:
    """This rank's training batches of an epoch: the epoch's shard (shards.train_shard), augmented per batch."""

    def __init__(self, images: DecodedImages, config: TrainConfig, ctx: DistContext):
        self.images, self.config, self.ctx = images, config, ctx
        self.normalize = Normalize(ctx.device, config.channels_last)
        self.epoch, self.images_done = 0, 0

    def set_epoch(self, epoch: int, images_done: int = 0) -> None:
        self.epoch, self.images_done = epoch, images_done

    def __iter__(self):
        config, ctx, batch = self.config, self.ctx, self.config.pass_batch
        indices = torch.tensor(
            train_shard(len(self.images.labels), config.seed, self.epoch, ctx.rank, ctx.size, self.images_done),
            dtype=torch.int64,
        )
        first = self.images_done // ctx.size  # this rank's images read before (a resume within the epoch)
        for start in range(0, len(indices) - batch + 1, batch):
            seed = np.random.SeedSequence([config.seed, self.epoch, ctx.rank, first + start]).generate_state(1)[0]
            yield self.augment(indices[start : start + batch], torch.Generator().manual_seed(int(seed)))

    def augment(self, indices: torch.Tensor, generator: torch.Generator):
        config, device = self.config, self.ctx.device
        stored, labels = self.images.batch(indices, device)
        size = stored.shape[-1]
        # The draws on the host (a seeded CPU generator), then a few hundred bytes to the device.
        boxes = crop_boxes(len(indices), size, size, config.min_crop_area, generator)
        flip = torch.rand(len(indices), generator=generator) < 0.5
        rois = torch.cat([torch.arange(len(indices), dtype=torch.float32)[:, None], boxes], dim=1)
        crops = roi_align(stored.float(), rois.to(device), config.image_size, aligned=True)
        crops = torch.where(flip.to(device).view(-1, 1, 1, 1), crops.flip(-1), crops)
        return self.normalize(crops), labels


class MemoryVal:
    """This rank's val shard (shards.val_shard), stored as the final center crops: only normalized."""

    def __init__(self, images: DecodedImages, indices: range, config: TrainConfig, ctx: DistContext):
        self.images, self.indices, self.batch_size, self.device = images, indices, config.pass_batch, ctx.device
        self.normalize = Normalize(ctx.device, config.channels_last)

    def __iter__(self):
        for start in range(0, len(self.indices), self.batch_size):
            indices = torch.tensor(list(self.indices[start : start + self.batch_size]), dtype=torch.int64)
            images, labels = self.images.batch(indices, self.device)
            yield self.normalize(images), labels


def check_fits(samples: Samples, config: TrainConfig, shared: bool) -> None:
    """A clear error before decoding a data set that does not fit where it would go."""
    needed = 3 * (len(samples.train) * config.val_resize**2 + len(samples.val) * config.image_size**2)
    free = os.statvfs(SHARED_DIR) if shared else None
    room = free.f_bavail * free.f_frsize if free else os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if needed > room:
        where = f"{SHARED_DIR} has {room / 2**30:.1f} GiB free" if shared else f"{room / 2**30:.1f} GiB of RAM is free"
        raise UserError(
            f"--loader memory: the decoded data set needs {needed / 2**30:.1f} GiB ("
            f"{len(samples.train)} train images at {config.val_resize} px, {len(samples.val)} val at "
            f"{config.image_size} px) and {where}; use --loader dali or torchvision"
        )


def decode_splits(samples: Samples, config: TrainConfig, ctx: DistContext) -> tuple[DecodedImages, DecodedImages]:
    """Train and val decoded, shared by the node's ranks under Horovod: every local rank maps both files
    (barrier), local rank 0 unlinks them (the mappings stay, so a job that dies leaves nothing in /dev/shm),
    each decodes its part, and all wait for the rest (barrier)."""
    shared = comm.rank_if_started() is not None and ctx.local_size > 1
    check_fits(samples, config, shared)
    name = None
    if shared:  # one name on the node's ranks: rank 0's, with the node's name (emulated nodes share a /dev/shm)
        name = node_path(f"hvd-imagenet-%n-{comm.broadcast_object(uuid.uuid4().hex, name='memory.name')}")
    resize = transforms.Resize(config.val_resize)
    train = DecodedImages(
        samples.train,
        transforms.Compose([resize, transforms.CenterCrop(config.val_resize), np.asarray]),
        config.val_resize,
        name and f"{name}-train",
    )
    val = DecodedImages(
        samples.val,
        transforms.Compose([resize, transforms.CenterCrop(config.image_size), np.asarray]),
        config.image_size,
        name and f"{name}-val",
    )
    if not shared:
        train.decode(0, 1)
        val.decode(0, 1)
        return train, val
    comm.barrier()  # Horovod: every rank has mapped the files
    if ctx.local_rank == 0:
        train.path.unlink()
        val.path.unlink()
    train.decode(ctx.local_rank, ctx.local_size)
    val.decode(ctx.local_rank, ctx.local_size)
    comm.barrier()  # Horovod: every local rank has decoded its part
    return train, val


def memory_loaders(config: TrainConfig, ctx: DistContext, samples: Samples) -> Loaders:
    train, val = decode_splits(samples, config, ctx)
    mebibytes = (train.array.nbytes + val.array.nbytes) / 2**20
    where = f"shared by the node's {ctx.local_size} ranks" if train.path else "in this rank"
    loader = MemoryTrain(train, config, ctx)
    return Loaders(
        train=loader,
        val=MemoryVal(val, val_shard(len(samples.val), ctx.rank, ctx.size), config, ctx),
        train_batches=len(samples.train) // ctx.size // config.pass_batch,
        num_classes=samples.num_classes,
        set_epoch=loader.set_epoch,
        description=f"memory: decoded once, {mebibytes:.1f} MiB of uint8 {where}; augmented in batches on the "
        f"{ctx.device.type}",
    )
