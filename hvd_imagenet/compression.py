"""--compression: the registry, one entry per compressor. No Horovod and no torch at import: `--help`, config
validation and `scaling-model` read it as is; the objects behind an entry are imported when used.

An entry says three things:
  horovod   what sends the gradients under Horovod: an element-wise Horovod `Compressor` class, which
            DistributedOptimizer applies to each gradient, or comm.PowerSGD (a reducer of its own)
  ddp_hook  the PyTorch DDP comm hook that does the same, for bench-train's Horovod-vs-DDP comparison
  wire      what scaling-model puts on the wire and what the compression costs (Wire below)
To add a compressor: write its Horovod `Compressor` subclass in comm.py (compress(tensor) -> (tensor, ctx);
decompress(tensor, ctx) -> tensor) and add one entry here. docs/communication.md says more.
"""

from __future__ import annotations

from dataclasses import dataclass

from .registry import resolve


@dataclass(frozen=True)
class Wire:
    """What one compressed allreduce costs, for scaling-model's alpha-beta model (bench/scaling.py)."""

    bytes_per_element: float  # on the wire, per float32 gradient element (PowerSGD: see low_rank)
    casts: bool = False  # a pass down and one back up over the gradients in GPU memory
    low_rank: bool = False  # PowerSGD: P and Q factors plus the 1-D tensors, in 3 allreduces, after backprop


@dataclass(frozen=True)
class Compression:
    horovod: str  # "module:attribute"
    ddp_hook: str | None  # "module:attribute" of a DDP comm hook; None: DDP's own allreduce
    wire: Wire
    help: str
    ddp_state: str | None = None  # "module:attribute" of a factory of the hook's state, given PowerSGD's rank

    def horovod_object(self):
        return resolve(self.horovod)

    def register_ddp_hook(self, model, powersgd_rank: int) -> None:
        """On a DistributedDataParallel model: the hook that does what this compressor does under Horovod."""
        if self.ddp_hook:
            state = resolve(self.ddp_state)(powersgd_rank) if self.ddp_state else None
            model.register_comm_hook(state, resolve(self.ddp_hook))


_HOOKS = "torch.distributed.algorithms.ddp_comm_hooks"
COMPRESSIONS: dict[str, Compression] = {
    "none": Compression("horovod.torch.compression:NoneCompressor", None, Wire(4), "float32 as computed"),
    "fp16": Compression(
        "horovod.torch.compression:FP16Compressor",
        f"{_HOOKS}.default_hooks:fp16_compress_hook",
        Wire(2, casts=True),
        "gradients cast to float16 on the wire, back after",
    ),
    "bf16": Compression(
        "hvd_imagenet.comm:BFloat16Compressor",
        f"{_HOOKS}.default_hooks:bf16_compress_hook",
        Wire(2, casts=True),
        "bfloat16 on the wire (not in Horovod 0.28.1: refused at start-up)",
    ),
    "powersgd": Compression(
        "hvd_imagenet.comm:PowerSGD",
        f"{_HOOKS}.powerSGD_hook:powerSGD_hook",
        Wire(4, low_rank=True),
        "low-rank factors with error feedback (Vogels et al. 2019)",
        ddp_state="hvd_imagenet.compression:ddp_powersgd_state",
    ),
}


def ddp_powersgd_state(rank: int):
    """DDP's PowerSGD state at rank r. DDP allows no PowerSGD from step 0: it compresses from step 2 on."""
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook

    return powerSGD_hook.PowerSGDState(None, matrix_approximation_rank=rank, start_powerSGD_iter=2)
