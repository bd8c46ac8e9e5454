"""Two optimizer steps of train's own step unit under horovodrun (Horovod's DistributedOptimizer around
--optimizer, the noise probe on), each rank on its own batches. Rank 0 saves to argv[1] what a float64
reference needs: the start weights, every rank's batches, the weights after, and rank 0's probe sums.
Flags after argv[1] are train flags (--optimizer lars ...)."""

import sys

import horovod.torch as hvd
import torch

from hvd_imagenet import comm
from hvd_imagenet.cli import Parser
from hvd_imagenet.config import TrainConfig
from hvd_imagenet.flags import add_flags, from_args
from hvd_imagenet.train import build_step, build_training

parser = Parser()
add_flags(parser, TrainConfig)
config = from_args(TrainConfig, parser.parse_args(["--loader", "synthetic", "--output", "unused", *sys.argv[2:]]))
ctx = comm.init()
torch.set_num_threads(1)
model, optimizer, scaler = build_training(config, 10, ctx.device)
comm.broadcast_state(model, optimizer, resumed=False)
step = build_step(config, model, optimizer, scaler, ctx)
start = {name: p.detach().clone() for name, p in model.named_parameters()}
generator = torch.Generator().manual_seed(100 + ctx.rank)
batches = [
    (
        torch.randn(config.batch_size, 3, 16, 16, generator=generator),
        torch.randint(0, 10, (config.batch_size,), generator=generator),
    )
    for _ in range(2)
]
sums = [step(iter([batch]), lr).sums for batch, lr in zip(batches, (0.5, 0.25))]
every_rank = hvd.allgather_object(batches)
if ctx.rank == 0:
    torch.save(
        {
            "start": start,
            "batches": every_rank,
            "lrs": (0.5, 0.25),
            "sums": sums,
            "after": {name: p.detach().clone() for name, p in model.named_parameters()},
        },
        sys.argv[1],
    )
comm.shutdown()
