"""The Horovod layer: the only module that imports Horovod. Every distributed line is marked `# Horovod:`.

Communication follows the paper (Sec. 4): each layer's gradient is allreduced as soon as backprop produces
it (Horovod's hooks), averaged over all workers, which is the paper's normalization of the summed
per-worker loss by kn (Sec. 3, Remark 3).
"""
from __future__ import annotations

import os

import horovod.torch as hvd
import torch

from .context import DistContext

# Raised on every other rank when one rank dies (an exception, a killed process): Horovod shuts down.
PeerFailure = hvd.HorovodInternalError

# A rank that hangs (a stuck file system, a deadlocked loader) leaves the others waiting in a collective.
# Horovod's stall inspector warns when some ranks have submitted a tensor and others have not for
# STALL_CHECK seconds, and with STALL_SHUTDOWN > 0 (Horovod's default is 0: wait forever) ends the job. 300 s
# is far above the longest legitimate wait here (rank 0 writing a ResNet-50 checkpoint). A rank that dies
# needs no timeout: its peers' sockets close and they raise at once. Set the variables to override.
STALL_TIMEOUTS = {"HOROVOD_STALL_CHECK_TIME_SECONDS": "60", "HOROVOD_STALL_SHUTDOWN_TIME_SECONDS": "300"}

COMPRESSORS = {
    "none": hvd.Compression.none,
    "fp16": hvd.Compression.fp16,  # gradients cast to float16 on the wire, back to their dtype after
}


def init() -> DistContext:
    """Start Horovod, pick this rank's device and share the CPU fairly among the ranks of one machine."""
    for name, seconds in STALL_TIMEOUTS.items():
        os.environ.setdefault(name, seconds)
    hvd.init()  # Horovod: rank, size and the controller (MPI or Gloo) come from the launcher
    return context()


def context() -> DistContext:
    """Who this process is now (again after an elastic job changed size: ranks are renumbered)."""
    if torch.cuda.is_available():
        device = torch.device("cuda", hvd.local_rank())  # one GPU per process, by local rank
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        # horovodrun does not set OMP_NUM_THREADS: k ranks on one machine would each start a thread per core.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // hvd.local_size()))
    return DistContext(hvd.rank(), hvd.local_rank(), hvd.size(), hvd.local_size(), device)


def launched_elastic() -> bool:
    """Whether horovodrun started this process for an elastic job (--min-np/--max-np/--host-discovery-script)."""
    return os.environ.get("HOROVOD_ELASTIC") == "1"  # set by horovodrun's elastic driver (Gloo only)


def elastic_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, **values):
    """Horovod's elastic state: the model, the optimizer and `values` (immutable: ints, floats, tuples).
    commit() keeps a copy in memory and raises HostsUpdatedInterrupt when workers were added or removed;
    a failed rank makes the others roll back to the last commit. sync() broadcasts rank 0's copy."""
    return hvd.elastic.TorchState(model=model, optimizer=optimizer, **values)  # Horovod


def run_elastic(train, state) -> None:
    """train(state) until it returns; after a rank fails or the host set changes, Horovod re-forms the ring
    (hvd.shutdown + init), the state's reset callbacks run, rank 0's state is broadcast, and train(state)
    is called again from the state's last commit."""
    hvd.elastic.run(train)(state)  # Horovod


def rank_if_started() -> int | None:
    """This process's rank once Horovod has started (error messages name it), else None."""
    return hvd.rank() if hvd.is_initialized() else None


def controller() -> str:
    """Which Horovod controller this job runs on (MPI under srun or mpirun, Gloo under horovodrun --gloo)."""
    return "MPI" if hvd.mpi_enabled() else "Gloo" if hvd.gloo_enabled() else "unknown"  # Horovod


def distributed_optimizer(
    optimizer: torch.optim.Optimizer, model: torch.nn.Module, compression: str, backward_passes_per_step: int
) -> torch.optim.Optimizer:
    """Wrap the optimizer so step() applies gradients averaged over all ranks.

    backward_passes_per_step > 1 gives virtual workers: gradients of that many micro-batches accumulate
    locally (each micro-batch with its own BN statistics, Sec. 2.3) before one allreduce.
    """
    if compression not in COMPRESSORS:
        raise ValueError(f"unknown compression {compression!r}; known: {', '.join(COMPRESSORS)}")
    return hvd.DistributedOptimizer(  # Horovod: allreduce-average of gradients, overlapped with backprop
        optimizer,
        named_parameters=model.named_parameters(),
        compression=COMPRESSORS[compression],
        backward_passes_per_step=backward_passes_per_step,
        op=hvd.Average,
    )


def broadcast_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, resumed: bool) -> None:
    """Make every rank start from rank 0's weights, BN buffers and (on resume) optimizer state.

    A fresh SGD has no state and is identical on every rank, so its state is broadcast only on resume:
    Horovod's broadcast_optimizer_state fills an empty state with one step on zero gradients, which with
    weight decay would shrink the weights and seed the momentum.
    """
    if resumed:
        hvd.broadcast_optimizer_state(optimizer, root_rank=0)  # Horovod: momentum buffers from rank 0
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)  # Horovod: weights and BN running stats


def average_bn_statistics(model: torch.nn.Module) -> None:
    """Average the BN running mean/var over ranks. Training normalizes with each worker's own n images
    (Sec. 2.3) and Horovod syncs only parameters, so each rank's running statistics differ; averaging them
    before evaluation makes every rank evaluate, and rank 0 save, the same model."""
    for name, buffer in model.named_buffers():
        if name.endswith(("running_mean", "running_var")):
            buffer.copy_(hvd.allreduce(buffer, op=hvd.Average, name=f"bn.{name}"))  # Horovod


def gather_digests(digest: float) -> list[float]:
    """Every rank's weight digest (model.weights_digest), in rank order."""
    return hvd.allgather_object(digest, name="weights_digest")  # Horovod


def allreduce_sum(tensor: torch.Tensor, name: str) -> torch.Tensor:
    """Sum a tensor over ranks (for metric sums and counts; one call per epoch, not per step)."""
    return hvd.allreduce(tensor, op=hvd.Sum, name=name)  # Horovod


def allreduce_max(value: int, name: str) -> int:
    """The largest of the ranks' values (the stop check: any rank's signal stops all)."""
    return int(hvd.allreduce(torch.tensor([value]), op=hvd.Max, name=name).item())  # Horovod


def broadcast_object(obj, name: str):
    """Rank 0's Python object on every rank (small things: the resume epoch)."""
    return hvd.broadcast_object(obj, root_rank=0, name=name)  # Horovod


def shutdown() -> None:
    hvd.shutdown()  # Horovod
