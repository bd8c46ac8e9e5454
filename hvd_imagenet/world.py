"""The ranks of a run and what depends on them: each rank's loaders, the global batch kn and the steps per
epoch. An elastic job makes a new World when its ranks change (train.ElasticTrainer.rejoin)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from . import comm
from .config import TrainConfig
from .context import DistContext
from .data.loaders import Loaders, build_loaders
from .errors import UserError
from .schedule import peak_lr


@dataclass(frozen=True)
class World:
    """Everything that depends on which ranks there are; rebuilt when an elastic job changes size."""

    ctx: DistContext
    loaders: Loaders
    global_batch: int  # kn, virtual workers included
    steps_per_epoch: int

    @classmethod
    def join(cls, config: TrainConfig, ctx: DistContext) -> World:
        loaders = build_loaders(config, ctx)
        global_batch = ctx.size * config.batches_per_allreduce * config.pass_batch
        steps = loaders.train_batches // config.batches_per_allreduce
        if config.max_steps_per_epoch:
            steps = min(steps, config.max_steps_per_epoch)
        if steps < 1:
            raise UserError(
                f"the training set gives no full step of global batch {global_batch} "
                f"({loaders.train_batches} batches of {config.pass_batch} per rank); use fewer ranks "
                f"or a smaller batch"
            )
        logging.getLogger().setLevel(logging.INFO if ctx.is_primary else logging.WARNING)  # rank 0 alone logs
        return cls(ctx, loaders, global_batch, steps)

    def summary(self, config: TrainConfig) -> dict:
        """What the world size changes in the recipe (the resolved config's part that a resize checks)."""
        return {
            "world_size": self.ctx.size,
            "global_batch": self.global_batch,
            "batch_size": config.batch_size,
            "peak_lr": peak_lr(config.lr, self.global_batch),
            "steps_per_epoch": self.steps_per_epoch,
        }

    def resolved_config(self, config: TrainConfig) -> dict:
        """The config as this world runs it: config.json, and every checkpoint's `config`."""
        return {
            **config.to_dict(),
            **self.summary(config),
            "controller": comm.controller(),
            "num_classes": self.loaders.num_classes,
            "device": str(self.ctx.device),
            "input": self.loaders.description,
        }
