"""Horovod's element-wise collectives on tensors dense in the channels_last (NHWC) memory format, as our
Horovod patch allows, on this rank's device. Run under horovodrun by tests/test_channels_last.py (CPU, 2
ranks, Gloo and MPI) and tests/test_gpu.py (NCCL, 1 rank); rank 0 writes what it found to argv[1] as JSON.
Every rank's tensor holds different values, so a reduction over flat buffers of mismatched layouts, or an
output in another layout than its input, gives wrong numbers, not just other strides."""

import json
import sys

import horovod.torch as hvd
import torch

from hvd_imagenet import comm

ctx = comm.init()
found = {"device": str(ctx.device), "nccl_built": bool(hvd.nccl_built())}


def logical(rank: int) -> torch.Tensor:
    """Rank `rank`'s values, (N, C, H, W) = (2, 3, 4, 5), contiguous."""
    return torch.arange(120, dtype=torch.float32, device=ctx.device).view(2, 3, 4, 5) + 1000 * rank


def nhwc(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous(memory_format=torch.channels_last)


mine = nhwc(logical(ctx.rank))
mean = sum(logical(r) for r in range(ctx.size)) / ctx.size
found["is_nhwc"] = mine.is_contiguous(memory_format=torch.channels_last) and not mine.is_contiguous()

average = hvd.allreduce(mine, op=hvd.Average, name="out_of_place")
found["allreduce"] = torch.equal(average, mean)
found["allreduce_output_nhwc"] = average.is_contiguous(memory_format=torch.channels_last)

in_place = mine.clone()
hvd.allreduce_(in_place, op=hvd.Average, name="in_place")
found["allreduce_in_place"] = torch.equal(in_place, mean) and in_place.is_contiguous(memory_format=torch.channels_last)

grouped = hvd.grouped_allreduce([mine, logical(ctx.rank)], op=hvd.Average, name="grouped")
found["grouped_allreduce"] = torch.equal(grouped[0], mean) and torch.equal(grouped[1], mean)

half = hvd.allreduce(mine, op=hvd.Average, name="fp16", compression=hvd.Compression.fp16)
found["fp16_max_error"] = (half - mean).abs().max().item()
found["fp16_output_nhwc"] = half.is_contiguous(memory_format=torch.channels_last)

root = mine.clone()
hvd.broadcast_(root, root_rank=0, name="broadcast_in_place")
broadcast = hvd.broadcast(mine, root_rank=0, name="broadcast")
found["broadcast"] = torch.equal(root, logical(0)) and torch.equal(broadcast, logical(0))

# A model in channels_last: Horovod broadcasts its weights from rank 0, and after a step the ranks agree.
torch.manual_seed(ctx.rank)  # different weights on every rank until the broadcast
model = torch.nn.Sequential(
    torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3)
).to(ctx.device, memory_format=torch.channels_last)
optimizer = hvd.DistributedOptimizer(
    torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), named_parameters=model.named_parameters(), op=hvd.Average
)
hvd.broadcast_parameters(model.state_dict(), root_rank=0)
model(nhwc(torch.randn(2, 3, 9, 9, device=ctx.device) + ctx.rank)).square().mean().backward()
optimizer.step()
found["weights_nhwc"] = all(
    p.is_contiguous(memory_format=torch.channels_last) for p in model.parameters() if p.dim() == 4
)
found["grads_nhwc"] = all(
    p.grad.is_contiguous(memory_format=torch.channels_last) for p in model.parameters() if p.dim() == 4
)
digest = sum(float(p.detach().double().sum()) * (i + 1) for i, p in enumerate(model.parameters()))
found["step_digests_equal"] = len(set(hvd.allgather_object(digest))) == 1

for name, call in [
    ("not_dense", lambda: hvd.allreduce(mine[:, :, :2])),
    ("allgather_nhwc", lambda: hvd.allgather(mine)),
]:
    try:
        call()
        found[name] = "accepted"
    except ValueError as error:
        found[name] = str(error)

if ctx.rank == 0:
    with open(sys.argv[1], "w") as f:
        json.dump(found, f)
comm.shutdown()
