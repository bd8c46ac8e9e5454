"""The Horovod layer: the only module that imports Horovod. Every distributed line is marked `# Horovod:`.

Communication follows the paper (Sec. 4): each layer's gradient is allreduced as soon as backprop produces
it (Horovod's hooks), averaged over all workers, which is the paper's normalization of the summed
per-worker loss by kn (Sec. 3, Remark 3).

Gradient compression (`--compression`, one entry each in compression.COMPRESSIONS): none, fp16 and bf16 are
element-wise Horovod Compressors inside DistributedOptimizer; powersgd (Vogels et al. 2019) replaces the
allreduce of each weight matrix by two small allreduces of its low-rank factors (PowerSGD below). To add an
element-wise compressor, write one subclass of Horovod's `Compressor` (compress(tensor) -> (tensor, ctx);
decompress(tensor, ctx) -> tensor) here and add its entry to compression.COMPRESSIONS.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass

import horovod
import horovod.torch as hvd
import torch
from horovod.common.exceptions import HostsUpdatedInterrupt
from horovod.torch.compression import Compressor
from horovod.torch.mpi_ops import mpi_lib

from .compression import COMPRESSIONS
from .config import HOROVOD_DEFAULTS
from .context import DistContext
from .cpus import cpus_per_rank
from .errors import UserError
from .gpu import rank_device

# Raised on every other rank when one rank dies (an exception, a killed process): Horovod shuts down.
PeerFailure = hvd.HorovodInternalError
# What leaves an elastic job's train(state) for Horovod to re-form the ring: a failed rank, a host change.
ELASTIC_INTERRUPTS = (hvd.HorovodInternalError, HostsUpdatedInterrupt)

# A rank whose main thread hangs (a stuck file system, a deadlocked loader) while its Horovod thread lives:
# Horovod's stall inspector warns after STALL_CHECK seconds, naming the ranks that have not submitted a tensor
# the others wait on. Its shutdown (HOROVOD_STALL_SHUTDOWN_TIME_SECONDS) stays at Horovod's 0 (off): ending
# a hung job is the watchdog's (--hang-timeout, watchdog.py), which also sees a whole process stopped, where
# under MPI the inspector never runs. Set the variables to override.
STALL_TIMEOUTS = {"HOROVOD_STALL_CHECK_TIME_SECONDS": "60"}

log = logging.getLogger("hvd_imagenet")


class BFloat16Compressor(Compressor):
    """Floating-point gradients cast to bfloat16 on the wire (fp32's range, 8 bits of mantissa), back after.
    Horovod 0.28.1 cannot reduce bfloat16 on any path: its DataType enum has no bfloat16, so no Gloo, MPI or
    NCCL operation takes it, and the PyTorch binding registers no BFloat16Tensor allreduce; allreduce_supported()
    probes the build, and --compression bf16 stops at start-up on one that lacks it."""

    @staticmethod
    def compress(tensor):
        return (tensor.to(torch.bfloat16) if tensor.dtype.is_floating_point else tensor), tensor.dtype

    @staticmethod
    def decompress(tensor, ctx):
        return tensor.to(ctx) if ctx.is_floating_point else tensor

    @staticmethod
    def allreduce_supported(device: torch.device) -> bool:
        kind = "torch_cuda_BFloat16Tensor" if device.type == "cuda" else "torch_BFloat16Tensor"
        return hasattr(mpi_lib, f"horovod_torch_allreduce_async_{kind}")


@dataclass(frozen=True)
class PowerSGDSettings:
    """PowerSGD's knobs, with the defaults of PyTorch DDP's powerSGD_hook except the rank (ours: 2)."""

    rank: int = 2  # r: each n x m gradient matrix is sent as P (n x r) and Q (m x r)
    start_step: int = 1000  # plain allreduce for the first steps (DDP's start_powerSGD_iter)
    min_compression_rate: float = 2.0  # compress a matrix only if n*m > rate * (n+m)*r (DDP's default)
    seed: int = 0  # Q's random start, the same on every rank


class PowerSGD:
    """Low-rank gradient compression with error feedback and warm start (Vogels et al., NeurIPS 2019, Alg. 1
    and 2), as PyTorch DDP's powerSGD_hook does it, with Horovod collectives.

    Per step, for each gradient viewed as a matrix M (n x m; a conv weight (out, in, kh, kw) as out x
    in*kh*kw, its columns in memory order: NCHW or, with --channels-last, NHWC), with this rank's error e from
    the last step added (error feedback):
        P = M Q; P = allreduce-mean(P); P = orthogonalize(P); Q = M^T P; Q = allreduce-mean(Q); M' = P Q^T
    and e = M - M' is kept on this rank. Q carries over to the next step (warm start), so one power iteration
    per step tracks the top-r subspace. The P's of all matrices go in one allreduce, the Q's in another.
    Tensors that would not shrink by min_compression_rate, and 1-D ones (BN gamma/beta, biases), are averaged
    uncompressed in a third. Until start_step reductions have run, everything is averaged uncompressed.
    Runs once per step after backprop (no overlap with it, unlike Horovod's hooks).
    """

    def __init__(
        self, shapes: list[torch.Size], settings: PowerSGDSettings, device: torch.device, predivide_factor: float = 1.0
    ):
        self.settings, self.device, self.predivide_factor = settings, device, predivide_factor
        self.matrix_indices = [i for i, shape in enumerate(shapes) if self.compressible(shape)]
        self.vector_indices = sorted(set(range(len(shapes))) - set(self.matrix_indices))
        self.matrix_shapes = {i: (shapes[i][0], shapes[i].numel() // shapes[i][0]) for i in self.matrix_indices}
        self.numels = [shape.numel() for shape in shapes]
        self.errors: dict[int, torch.Tensor] = {}
        generator = torch.Generator().manual_seed(settings.seed)  # the same Q on every rank
        self.qs = {
            i: torch.randn(m, self.rank_of(i), generator=generator).to(device)
            for i, (n, m) in self.matrix_shapes.items()
        }
        self.reductions = 0

    def state_dict(self) -> dict:
        """This rank's state: the error memory differs between ranks; Q and the count are the same on all."""
        return {"reductions": self.reductions, "qs": dict(self.qs), "errors": dict(self.errors)}

    def load_state_dict(self, state: dict) -> None:
        self.reductions = state["reductions"]
        self.qs = {i: q.to(self.device) for i, q in state["qs"].items()}
        self.errors = {i: e.to(self.device) for i, e in state["errors"].items()}

    def compressible(self, shape: torch.Size) -> bool:
        if len(shape) < 2:
            return False
        n, m = shape[0], shape.numel() // shape[0]
        r = min(n, m, self.settings.rank)
        return n * m > self.settings.min_compression_rate * (n + m) * r

    def rank_of(self, index: int) -> int:
        n, m = self.matrix_shapes[index]
        return min(n, m, self.settings.rank)

    def wire_elements(self) -> int:
        """Elements each rank puts into the allreduces of a compressed step: P's, Q's and the uncompressed."""
        factors = sum((n + m) * self.rank_of(i) for i, (n, m) in self.matrix_shapes.items())
        return factors + sum(self.numels[i] for i in self.vector_indices)

    def reduce(self, tensors: list[torch.Tensor]) -> None:
        """Replace each tensor by its compressed average over the ranks (in place)."""
        self.reductions += 1
        if self.reductions <= self.settings.start_step:
            _average_flat(tensors, "powersgd.warmup", self.predivide_factor)
            return
        _average_flat([tensors[i] for i in self.vector_indices], "powersgd.vectors", self.predivide_factor)
        matrices = {}
        for i, (n, m) in self.matrix_shapes.items():
            matrix = in_memory_order(tensors[i]).view(n, m)
            if i in self.errors:
                matrix.add_(self.errors[i])  # error feedback: what earlier steps failed to send
            matrices[i] = matrix
        ps = {i: matrices[i] @ self.qs[i] for i in matrices}
        _average_flat(list(ps.values()), "powersgd.p", self.predivide_factor)
        qs = {}
        for i, p in ps.items():
            ps[i] = torch.linalg.qr(p).Q  # orthonormal columns; the mean's scale goes into Q
            qs[i] = (ps[i].T @ matrices[i]).T  # M^T P, computed as (P^T M)^T: ~8x faster on the CPU
        _average_flat(list(qs.values()), "powersgd.q", self.predivide_factor)
        # After the two allreduces a NaN/inf of any rank is in every rank's factors: then all ranks keep their
        # error memory and Q (and the step is the trainer's to skip or stop on). Decided on the device, without
        # a host sync: the new values where finite, the old ones where not.
        finite = torch.nn.utils.get_total_norm([*ps.values(), *qs.values()], foreach=True).isfinite()
        for i, matrix in matrices.items():
            error = matrix.clone()
            torch.mm(ps[i], qs[i].T, out=matrix)  # the gradient becomes P Q^T, the same on every rank
            error.sub_(matrix)  # what this rank's M lost in the approximation
            self.errors[i] = torch.where(finite, error, self.errors.get(i, 0.0))
            self.qs[i] = torch.where(finite, qs[i], self.qs[i])  # warm start


def in_memory_order(tensor: torch.Tensor) -> torch.Tensor:
    """A 1-D view of a tensor that is dense in some order of its dimensions (contiguous, channels_last, a
    transpose): its elements in memory order, no copy. Dim 0 of a weight is outermost in NCHW and NHWC alike,
    so the view's rows of n x m are the weight's rows. The ranks hold the same layouts, so their views match
    element for element."""
    outermost_first = sorted(range(tensor.dim()), key=tensor.stride, reverse=True)
    ordered = tensor.permute(outermost_first)
    if not ordered.is_contiguous():
        raise ValueError(f"a tensor of shape {tuple(tensor.shape)} and strides {tensor.stride()} is not dense")
    return ordered.view(-1)


def _average_flat(tensors: list[torch.Tensor], name: str, predivide_factor: float) -> None:
    """Average tensors over the ranks in one allreduce of their concatenation, written back in place."""
    if not tensors:
        return
    flat = torch.cat([in_memory_order(t) for t in tensors])
    flat = hvd.allreduce(
        flat,
        name=name,
        op=hvd.Average,  # Horovod
        prescale_factor=1.0 / predivide_factor,
        postscale_factor=predivide_factor,
    )
    offset = 0
    for t in tensors:
        in_memory_order(t).copy_(flat[offset : offset + t.numel()])
        offset += t.numel()


# What sends the gradients for each --compression: a Horovod Compressor class, or PowerSGD (its own reducer).
COMPRESSORS = {name: entry.horovod_object() for name, entry in COMPRESSIONS.items()}


def init(
    fusion_threshold_mb: float = HOROVOD_DEFAULTS[0],
    cycle_time_ms: float = HOROVOD_DEFAULTS[1],
    hierarchical_allreduce: bool = HOROVOD_DEFAULTS[2],
) -> DistContext:
    """Start Horovod with these knobs (docs/communication.md), pick this rank's device and share the CPU
    fairly among the ranks of one machine."""
    for name, seconds in STALL_TIMEOUTS.items():
        os.environ.setdefault(name, seconds)
    defaults = knob_environment(*HOROVOD_DEFAULTS)
    for name, value in knob_environment(fusion_threshold_mb, cycle_time_ms, hierarchical_allreduce).items():
        if value == defaults[name]:
            continue  # Horovod's own default (or what the launcher set): Horovod's autotuning stays free
        if os.environ.get(name, value) != value:
            log.warning("%s=%s from the environment is overridden by the flag: %s", name, os.environ[name], value)
        os.environ[name] = value
    hvd.init()  # Horovod: rank, size and the controller (MPI or Gloo) come from the launcher
    if hierarchical_allreduce and not hvd.nccl_built() and hvd.rank() == 0:
        log.warning("--hierarchical-allreduce has no effect here: Horovod does it with NCCL only (GPU builds)")
    return context()


def knob_environment(fusion_threshold_mb: float, cycle_time_ms: float, hierarchical_allreduce: bool) -> dict:
    """Horovod reads its knobs from the environment at init (horovod/common/operations.cc)."""
    return {
        # Gradients ready within one cycle are packed into buffers of up to this many bytes, one allreduce each.
        "HOROVOD_FUSION_THRESHOLD": str(int(fusion_threshold_mb * 2**20)),
        # How often the background thread gathers ready tensors and negotiates their allreduce among ranks.
        "HOROVOD_CYCLE_TIME": f"{cycle_time_ms:g}",
        # NCCL within a node, then MPI between nodes on 1/local_size of the data, then NCCL allgather.
        "HOROVOD_HIERARCHICAL_ALLREDUCE": "1" if hierarchical_allreduce else "0",
    }


def context() -> DistContext:
    """Who this process is now (again after an elastic job changed size: ranks are renumbered)."""
    device = rank_device(hvd.local_rank())  # one GPU per process, by local rank (or the CPU)
    if device.type == "cpu":
        # horovodrun does not set OMP_NUM_THREADS: k ranks on one machine would each start a thread per core.
        torch.set_num_threads(cpus_per_rank(hvd.local_size()))
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
    optimizer: torch.optim.Optimizer,
    model: torch.nn.Module,
    compression: str,
    backward_passes_per_step: int,
    gradient_predivide_factor: float = 1.0,
    powersgd: PowerSGDSettings = PowerSGDSettings(),
) -> torch.optim.Optimizer:
    """Wrap the optimizer so step() applies gradients averaged over all ranks.

    backward_passes_per_step > 1 gives virtual workers: gradients of that many micro-batches accumulate
    locally (each micro-batch with its own BN statistics, Sec. 2.3) before one allreduce. A predivide factor
    f divides the gradients by f before the sum and by size/f after (fp16 sums of many ranks overflow less).
    """
    if compression not in COMPRESSORS:
        raise ValueError(f"unknown compression {compression!r}; known: {', '.join(COMPRESSORS)}")
    device = next(model.parameters()).device
    if compression == "bf16" and not BFloat16Compressor.allreduce_supported(device):
        raise UserError(
            f"--compression bf16: this Horovod build ({horovod.__version__}) cannot allreduce bfloat16 "
            f"tensors on {device.type} (no bfloat16 type in its Gloo, MPI or NCCL operations); use "
            "fp16, with --gradient-predivide-factor at large world sizes"
        )
    if COMPRESSORS[compression] is PowerSGD:  # a reducer of its own, not an element-wise Compressor
        shapes = [parameter.shape for parameter in model.parameters()]
        reducer = PowerSGD(shapes, powersgd, device, gradient_predivide_factor)
        cls = type(optimizer.__class__.__name__, (optimizer.__class__,), dict(_PowerSGDOptimizer.__dict__))
        return cls(optimizer.param_groups, list(model.parameters()), reducer)
    return hvd.DistributedOptimizer(  # Horovod: allreduce-average of gradients, overlapped with backprop
        optimizer,
        named_parameters=model.named_parameters(),
        compression=COMPRESSORS[compression],
        backward_passes_per_step=backward_passes_per_step,
        op=hvd.Average,
        gradient_predivide_factor=gradient_predivide_factor,
    )


class _PowerSGDOptimizer(torch.optim.Optimizer):
    """Horovod's DistributedOptimizer interface (synchronize, skip_synchronize, step) over PowerSGD. Built the
    way Horovod builds its own: a subclass of the wrapped optimizer's class, made on the fly. Gradients of
    several micro-batches simply accumulate until synchronize()."""

    def __init__(self, param_groups, parameters: list[torch.nn.Parameter], reducer: PowerSGD):
        super(self.__class__, self).__init__(param_groups)
        self._ordered_parameters, self._reducer = parameters, reducer
        self._synchronize_in_step = True

    def synchronize(self) -> None:
        for parameter in self._ordered_parameters:
            if parameter.grad is None:
                parameter.grad = torch.zeros_like(parameter)
        self._reducer.reduce([parameter.grad for parameter in self._ordered_parameters])

    @contextlib.contextmanager
    def skip_synchronize(self):
        self._synchronize_in_step = False
        try:
            yield
        finally:
            self._synchronize_in_step = True

    def step(self, closure=None):
        if self._synchronize_in_step:
            self.synchronize()
        return super(self.__class__, self).step(closure)


def broadcast_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, resumed: bool) -> None:
    """Make every rank start from rank 0's weights, BN buffers and (on resume) optimizer state.

    A fresh SGD has no state and is identical on every rank, so its state is broadcast only on resume:
    Horovod's broadcast_optimizer_state fills an empty state with one step on zero gradients, which with
    weight decay would shrink the weights and seed the momentum. That step runs on the ranks whose state is
    empty (not rank 0, which loaded it) and calls step() of any optimizer class not from Horovod's own module,
    ours included: skip_synchronize() keeps it from posting an allreduce that rank 0 never joins (PowerSGD's
    resume hang).
    """
    if resumed:
        with optimizer.skip_synchronize():
            hvd.broadcast_optimizer_state(optimizer, root_rank=0)  # Horovod: momentum buffers from rank 0
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)  # Horovod: weights and BN running stats


def compressor_state(optimizer: torch.optim.Optimizer) -> dict | None:
    """PowerSGD's state on this rank (error memory, Q, reductions done) for a checkpoint; None for the
    element-wise compressors, which keep none."""
    reducer = getattr(optimizer, "_reducer", None)
    return reducer.state_dict() if reducer is not None else None


def load_compressor_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    optimizer._reducer.load_state_dict(state)


def average_bn_statistics(model: torch.nn.Module) -> None:
    """Average the BN running mean/var over ranks. Training normalizes with each worker's own n images
    (Sec. 2.3) and Horovod syncs only parameters, so each rank's running statistics differ; averaging them
    before evaluation makes every rank evaluate, and rank 0 save, the same model. One grouped allreduce (fused
    into few buffers, negotiated once), not one collective after another per buffer (106 for ResNet-50)."""
    buffers = [buffer for name, buffer in model.named_buffers() if name.endswith(("running_mean", "running_var"))]
    if buffers:
        means = hvd.grouped_allreduce(buffers, op=hvd.Average, name="bn_statistics")  # Horovod
        for buffer, mean in zip(buffers, means):
            buffer.copy_(mean)


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


def barrier() -> None:
    hvd.barrier()  # Horovod


def allreduce_compressed(tensors: list[torch.Tensor], compression: str, name: str) -> list[torch.Tensor]:
    """Average tensors over ranks with an element-wise compressor, as DistributedOptimizer sends gradients:
    one grouped (fused) allreduce. For bench-allreduce."""
    return hvd.grouped_allreduce(tensors, name=name, op=hvd.Average, compression=COMPRESSORS[compression])  # Horovod
