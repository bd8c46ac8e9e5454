"""`hvd-imagenet bench-allreduce`: the gradient allreduce alone, for each compressor, on the ranks it runs on.

Payloads (--payloads): `resnet50` (the 161 gradient tensors of ResNet-50, 25.6M floats, sent as
DistributedOptimizer sends them: one fused allreduce) and flat float32 tensors of so many elements. Each
(payload, compressor) is timed `repeats` times on rank 0 after a barrier, after `warmup` untimed runs; the
table shows the median.
  algbw = payload bytes (float32) / time; busbw = algbw x 2(p-1)/p, the bytes each rank's link carries in a
  ring allreduce per second (nccl-tests' definitions); wire = bytes each rank puts into allreduces.
PowerSGD compresses matrices, so it runs on the resnet50 payload only; its time includes the matrix products
and orthogonalization, its wire bytes are the P and Q factors and the uncompressed 1-D tensors.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import torch

from .. import comm
from ..compression import COMPRESSIONS
from ..config import train_default
from ..context import DistContext
from ..errors import UserError
from ..flags import Command, check, opt
from ..gpu import device_name
from . import launch
from .launch import LaunchOptions

PAYLOAD_MODEL = "resnet50"


def payload_shapes(payload: str) -> list[torch.Size]:
    if payload == PAYLOAD_MODEL:
        import torchvision

        with torch.device("meta"):  # shapes only, no memory
            return [p.shape for p in torchvision.models.resnet50().parameters()]
    return [torch.Size([int(float(payload))])]


def wire_bytes(shapes: list[torch.Size], compression: str, reducer: comm.PowerSGD | None) -> int:
    if reducer is not None:
        return reducer.wire_elements() * 4
    compressor = comm.COMPRESSORS[compression]
    return sum(
        compressor.compress(torch.empty(shape, device="meta"))[0].element_size() * shape.numel() for shape in shapes
    )


def time_one(
    ctx: DistContext, shapes: list[torch.Size], compression: str, repeats: int, warmup: int, powersgd_rank: int
) -> dict:
    generator = torch.Generator().manual_seed(ctx.rank)
    tensors = [torch.randn(shape, generator=generator).to(ctx.device) for shape in shapes]
    reducer = None
    if compression == "powersgd":
        reducer = comm.PowerSGD(shapes, comm.PowerSGDSettings(rank=powersgd_rank, start_step=0), ctx.device)
    seconds = []
    for repeat in range(warmup + repeats):
        work = [t.clone() for t in tensors] if reducer else tensors  # PowerSGD reduces in place
        comm.barrier()
        start = time.perf_counter()
        if reducer:
            reducer.reduce(work)
        else:
            comm.allreduce_compressed(work, compression, name=f"bench.{compression}")
        if ctx.device.type == "cuda":
            torch.cuda.synchronize()
        if repeat >= warmup:
            seconds.append(time.perf_counter() - start)
    payload_bytes = sum(shape.numel() for shape in shapes) * 4
    median = statistics.median(seconds)
    algbw = payload_bytes / median
    return {
        "compression": compression,
        "seconds": median,
        "runs_seconds": seconds,
        "payload_bytes": payload_bytes,
        "wire_bytes": wire_bytes(shapes, compression, reducer),
        "algbw_gb_s": algbw / 1e9,
        "busbw_gb_s": algbw * 2 * (ctx.size - 1) / ctx.size / 1e9,
    }


@dataclass(frozen=True)
class AllreduceBenchOptions:
    payloads: tuple[str, ...] = opt(
        "resnet50 (its 161 gradient tensors, fused) and/or numbers of float32 elements",
        (PAYLOAD_MODEL, "1e6", "4e6", "25.6e6"),
    )
    compression: tuple[str, ...] = opt(
        "compressors (powersgd: resnet50 payload only)", tuple(COMPRESSIONS), choices=tuple(COMPRESSIONS)
    )
    repeats: int = opt("timed runs; the table shows the median", 10, min=1)
    warmup: int = opt("untimed runs first", 2, min=0)
    powersgd_rank: int = opt("PowerSGD's rank r", train_default("powersgd_rank"), min=1)
    np: int = opt("ranks to start on this machine (as a command)", 2, min=1)
    launch: LaunchOptions = field(default_factory=LaunchOptions)

    def __post_init__(self):
        check(self)
        for item in self.payloads:
            if item != PAYLOAD_MODEL and not _is_count(item):
                raise UserError(f"--payloads: a payload is {PAYLOAD_MODEL} or a number of floats, not {item!r}")


def _is_count(text: str) -> bool:
    try:
        return float(text) >= 1
    except ValueError:
        return False


def bench_allreduce(ctx: DistContext, options: AllreduceBenchOptions) -> dict:
    from tqdm import tqdm

    rows = []
    cases = [
        (payload, c)
        for payload in options.payloads
        for c in options.compression
        if c != "powersgd" or payload == PAYLOAD_MODEL
    ]
    for payload, compression in tqdm(cases, desc="bench-allreduce", disable=not ctx.is_primary, leave=False):
        shapes = payload_shapes(payload)
        row = {"payload": payload, "elements": sum(s.numel() for s in shapes), "tensors": len(shapes)}
        if compression == "bf16" and not comm.BFloat16Compressor.allreduce_supported(ctx.device):
            row.update(compression=compression, error="Horovod 0.28.1 has no bfloat16 allreduce (Gloo, MPI, NCCL)")
        else:
            row.update(time_one(ctx, shapes, compression, options.repeats, options.warmup, options.powersgd_rank))
        rows.append(row)
    for row in rows:
        base = next(r for r in rows if r["payload"] == row["payload"] and r["compression"] == "none")
        if "seconds" in row and "seconds" in base:
            row["speedup_vs_none"] = base["seconds"] / row["seconds"]
            row["wire_fraction_of_none"] = row["wire_bytes"] / base["wire_bytes"]
    return {
        "benchmark": "bench-allreduce",
        "ranks": ctx.size,
        "controller": comm.controller(),
        "device": device_name(ctx.device),
        "repeats": options.repeats,
        "warmup": options.warmup,
        "powersgd_rank": options.powersgd_rank,
        "results": rows,
    }


def run(options: AllreduceBenchOptions) -> None:
    if launch.under_launcher():  # one of the ranks
        if options.launch.link != "loopback":
            raise UserError(
                "--link starts its own ranks in a shaped network namespace; run bench-allreduce "
                "without horovodrun/mpirun/srun"
            )
        ctx = comm.init()
        report = bench_allreduce(ctx, options)
        if ctx.is_primary:
            launch.emit(report, options.launch, format_report)
        comm.shutdown()
        return
    with launch.shaped_namespace(options.launch.link) as prefix:
        link = launch.link_record(options.launch.link, prefix)
        report = launch.run_ranks(
            prefix, options.np, options.launch.controller, launch.forward("bench-allreduce", options)
        )
    launch.emit({**report, "link": link}, options.launch, format_report)


def format_report(report: dict) -> str:
    link = report.get("link", {})
    where = (
        f"lo shaped to {link['name']} (measured {link['measured_gbit_s']:.2f} Gbit/s)"
        if link.get("shaped")
        else "loopback (memory is the link)"
    )
    lines = [
        f"bench-allreduce: {report['ranks']} ranks, {report['controller']}, {report['device']}, {where}, "
        f"median of {report['repeats']}",
        f"{'payload':<10} {'compression':<11} {'wire MB':>8} {'% of none':>9} {'time ms':>9} "
        f"{'algbw GB/s':>10} {'busbw GB/s':>10} {'vs none':>8}",
    ]
    for r in report["results"]:
        payload = "resnet50" if r["payload"] == PAYLOAD_MODEL else f"{r['elements'] / 1e6:g}M"
        if "error" in r:
            lines.append(f"{payload:<10} {r['compression']:<11} {'':>8} {'':>9} {'-':>9}   {r['error']}")
            continue
        lines.append(
            f"{payload:<10} {r['compression']:<11} {r['wire_bytes'] / 1e6:>8.2f} "
            f"{100 * r.get('wire_fraction_of_none', 1):>8.2f}% {1000 * r['seconds']:>9.1f} "
            f"{r['algbw_gb_s']:>10.3f} {r['busbw_gb_s']:>10.3f} {r.get('speedup_vs_none', 1):>7.2f}x"
        )
    return "\n".join(lines)


COMMAND = Command(
    AllreduceBenchOptions,
    run,
    description=(
        "Times the allreduce of ResNet-50's gradients and of flat float32 tensors for each compressor. "
        + launch.AS_COMMAND_OR_RANK
    ),
)
