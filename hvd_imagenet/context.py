"""Who this process is among the workers. Plain data: the loaders and benchmarks use it without Horovod,
which only comm.init() imports and starts."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DistContext:
    """Built once after hvd.init() (comm.init) and passed down; a benchmark or a test builds one by hand."""

    rank: int
    local_rank: int
    size: int
    local_size: int
    device: torch.device

    @property
    def is_primary(self) -> bool:
        return self.rank == 0
