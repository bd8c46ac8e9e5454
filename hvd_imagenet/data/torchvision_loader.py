"""torchvision transforms + DataLoader: PIL decode on CPU worker processes."""

from __future__ import annotations

import functools
import io
import multiprocessing
import multiprocessing.forkserver
import os
import select
import signal
import threading

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import transforms

from ..config import TrainConfig
from ..context import DistContext
from ..errors import UserError
from .loaders import Loaders, Samples, default_threads
from .packed import PackedSamples
from .samples import FileSamples
from .shards import train_shard, val_shard

# ImageNet's per-channel mean and std, the normalization of the paper's Sec. 5.1 (and of torchvision's models).
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


class ImageFiles(Dataset):
    """Images of a sample list (files or packed shards) decoded by PIL to 3-channel RGB: grayscale and CMYK
    JPEGs and a PNG named .JPEG (all in real ImageNet) load like any other; an unreadable image is an error
    that names it."""

    def __init__(self, samples: FileSamples | PackedSamples, transform):
        self.samples, self.transform = samples, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, item: int | tuple[int, int]):
        if isinstance(item, tuple):  # (index, augmentation seed) from EpochShard
            item, seed = item
            torch.manual_seed(seed)
        try:
            with Image.open(io.BytesIO(self.samples.read(item))) as encoded:
                image = encoded.convert("RGB")
        except OSError as error:  # truncated, corrupt, not an image (PIL.UnidentifiedImageError is an OSError)
            raise UserError(unreadable_message(self.samples.name(item), error)) from None
        return self.transform(image), self.samples.label(item)


def unreadable_message(path: str, reason) -> str:
    return (
        f"cannot decode {path} ({reason}); run `hvd-imagenet check-data` and train with --file-list "
        "to exclude unreadable files"
    )


class EpochShard(Sampler[tuple[int, int]]):
    """This rank's share of the epoch's global shuffle (shards.train_shard); set_epoch picks the epoch.

    Each index comes with the seed of its augmentation, a function of (seed, epoch, index): the crops do not
    depend on which worker draws them or on what it drew before, so workers can persist across epochs and a
    resumed run still sees exactly the images of the uninterrupted one."""

    def __init__(self, num_samples: int, seed: int, ctx: DistContext):
        self.num_samples, self.seed, self.ctx = num_samples, seed, ctx
        self.epoch, self.images_done = 0, 0

    def set_epoch(self, epoch: int, images_done: int = 0) -> None:
        self.epoch, self.images_done = epoch, images_done

    def __iter__(self):
        epoch_seed = int(np.random.SeedSequence([self.seed, self.epoch]).generate_state(1)[0])
        for index in train_shard(
            self.num_samples, self.seed, self.epoch, self.ctx.rank, self.ctx.size, self.images_done
        ):
            yield index, epoch_seed * 2**24 + index

    def __len__(self) -> int:
        return self.num_samples // self.ctx.size


class ToDevice:
    """Re-iterable view of a DataLoader that moves each batch to the rank's device. A worker's UserError
    (an unreadable file) comes back with the worker's traceback in its message: keep our one line."""

    def __init__(self, loader: DataLoader, device: torch.device, channels_last: bool):
        self.loader, self.device = loader, device
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def __iter__(self):
        try:
            for images, labels in self.loader:
                yield (
                    images.to(self.device, non_blocking=True, memory_format=self.memory_format),
                    labels.to(self.device, non_blocking=True),
                )
        except UserError as error:
            raise UserError(str(error).rstrip().splitlines()[-1].split(": ", 1)[-1]) from None


def worker_context() -> multiprocessing.context.BaseContext:
    """Loader workers start from a forkserver, never by fork(): after hvd.init() the process has threads
    (Horovod's background loop, TensorBoard's writer, tqdm's monitor), and a child forked while one of them
    holds a lock deadlocks at start (seen here: a val worker hung forever, its rank waiting on it). Fork is
    also unsafe with InfiniBand verbs on GPU nodes, which is why Horovod's own examples use a forkserver.
    The server preloads torch and torchvision, so workers forked from it need not import them again.

    The server starts here with SIGUSR1 and SIGTERM ignored, which it and its workers inherit: SLURM signals
    every process of a job step, and a worker killed by the pre-emption warning would end the run that the
    trainer is stopping cleanly (stop.StopRequest). Workers still exit when their trainer does
    (exit_with_trainer)."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "torchvision", __name__])
    previous = {number: signal.signal(number, signal.SIG_IGN) for number in (signal.SIGUSR1, signal.SIGTERM)}
    try:
        multiprocessing.forkserver.ensure_running()
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
    return context


def exit_with_trainer(trainer_pid: int, worker_id: int) -> None:
    """DataLoader worker_init_fn: the worker exits as soon as its trainer process ends, however it ends.

    torch's own check in a worker is "is my parent alive", and a forkserver worker's parent is the server,
    which waits for its workers to go: a trainer killed with -9 (or by the OOM killer) would leave both
    behind, holding the launcher's stdout pipe open, and horovodrun then waits forever (seen here). A trainer
    killed while its workers start is gone before this runs: then the worker exits at once (seen here too: a
    kill -9 two seconds into the first epoch left a worker polling for indices, and the job hung)."""
    try:
        trainer = os.pidfd_open(trainer_pid)  # readable once the process has ended (Linux >= 5.3)
    except ProcessLookupError:  # the trainer ended before this worker started
        os._exit(0)

    def wait_then_exit():
        select.select([trainer], [], [])
        os._exit(0)

    threading.Thread(target=wait_then_exit, name="exit-with-trainer", daemon=True).start()


def torchvision_loaders(config: TrainConfig, ctx: DistContext, samples: Samples) -> Loaders:
    normalize = transforms.Normalize(MEAN, STD)
    # Scale and aspect-ratio augmentation (Sec. 5.1), and the crop or its flip.
    train_set = ImageFiles(
        samples.train,
        transforms.Compose(
            [
                transforms.RandomResizedCrop(config.image_size, scale=(config.min_crop_area, 1.0)),
                transforms.RandomHorizontalFlip(),
                transforms.ToTensor(),
                normalize,
            ]
        ),
    )
    val_set = ImageFiles(
        samples.val.subset(val_shard(len(samples.val), ctx.rank, ctx.size)),
        transforms.Compose(
            [
                transforms.Resize(config.val_resize),  # single center crop of the resized image
                transforms.CenterCrop(config.image_size),  # (Sec. 5.1)
                transforms.ToTensor(),
                normalize,
            ]
        ),
    )
    sampler = EpochShard(len(train_set), config.seed, ctx)
    # Workers persist across epochs (no start-up per epoch); the sampler runs in this process, so
    # set_epoch still selects each epoch's shuffle.
    options = dict(
        batch_size=config.pass_batch,
        num_workers=config.workers or default_threads(ctx),
        pin_memory=ctx.device.type == "cuda",
        multiprocessing_context=worker_context(),
        persistent_workers=True,
        worker_init_fn=functools.partial(exit_with_trainer, os.getpid()),
    )
    train = DataLoader(train_set, sampler=sampler, drop_last=True, **options)
    val = DataLoader(val_set, **options) if len(val_set) else ()
    return Loaders(
        train=ToDevice(train, ctx.device, config.channels_last),
        val=ToDevice(val, ctx.device, config.channels_last) if val else (),
        train_batches=len(train),
        num_classes=samples.num_classes,
        set_epoch=sampler.set_epoch,
        description=f"torchvision DataLoader, {options['num_workers']} worker processes per rank"
        + (", read from packed shards" if isinstance(samples.train, PackedSamples) else ""),
    )
