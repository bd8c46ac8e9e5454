"""Synthetic data: one fixed random batch on the device, for measuring training without input cost.

An epoch is ImageNet-1k's 1,281,167 training images split over the global batch (cap it with
--max-steps-per-epoch). There is no validation: the labels are random.
"""

from __future__ import annotations

import itertools

import torch

from ..config import TrainConfig
from ..context import DistContext
from .loaders import Loaders

IMAGENET_TRAIN_IMAGES = 1_281_167
IMAGENET_CLASSES = 1000


def synthetic_loaders(config: TrainConfig, ctx: DistContext) -> Loaders:
    generator = torch.Generator().manual_seed(config.seed + ctx.rank)
    images = torch.randn(config.pass_batch, 3, config.image_size, config.image_size, generator=generator)
    if config.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, IMAGENET_CLASSES, (config.pass_batch,), generator=generator)
    batch = (images.to(ctx.device), labels.to(ctx.device))
    batches = IMAGENET_TRAIN_IMAGES // (ctx.size * config.pass_batch)

    class Repeat:
        def __iter__(self):
            return itertools.repeat(batch, batches)

    return Loaders(
        train=Repeat(),
        val=(),
        train_batches=batches,
        num_classes=IMAGENET_CLASSES,
        set_epoch=lambda epoch, images_done=0: None,
        description="synthetic: one fixed random batch on the device",
    )
