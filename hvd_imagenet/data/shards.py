"""Which samples each rank reads: the one place the data is split among the k workers, for every loader.

Training: one random permutation of the whole training set per epoch, from (seed, epoch) alone so every
rank draws the same one, dealt out to the k ranks (Goyal et al. Sec. 3, Remark 4: "a single random shuffling
of the training data (per epoch) that is divided amongst all k workers"). The tail that does not divide into
k equal shards is dropped, so every rank runs the same number of steps. Dealing is round-robin, so after s
steps of kn images the job has read exactly the first s*kn images of the permutation, whatever k and n are:
an epoch continues from any such count (a resume, on the same or another number of ranks, or an elastic
job after it changed size) without repeating or skipping an image. The permutation is the one
torch's DistributedSampler(shuffle=True, drop_last=True) draws, so a torchvision run and a DALI run read the
same images in the same order.

Validation: rank r reads images r, r + k, r + 2k, ...: disjoint shards that cover the set exactly once
(shard sizes may differ by one; evaluation needs no per-batch collective, so no rank waits on another).
"""

from __future__ import annotations

import torch


def train_shard(num_samples: int, seed: int, epoch: int, rank: int, world_size: int, images_done: int = 0) -> list[int]:
    """Indices rank `rank` trains on in `epoch`: its 1/k of that epoch's global shuffle, after the first
    `images_done` images of it (read before a resume or a resize)."""
    generator = torch.Generator().manual_seed(seed + epoch)
    permutation = torch.randperm(num_samples, generator=generator).tolist()[images_done:]
    per_rank = len(permutation) // world_size
    return permutation[: per_rank * world_size][rank::world_size]


def val_shard(num_samples: int, rank: int, world_size: int) -> range:
    """Indices rank `rank` evaluates: every k-th image, no padding, no image twice."""
    return range(rank, num_samples, world_size)
