"""`hvd-imagenet scaling-model`: step time, img/s, scaling efficiency and 90-epoch time at 1..32 nodes x 8 GPUs,
predicted from one GPU's step time, the model's gradient size and the links (an alpha-beta model). Pure
arithmetic, no Horovod: every number can be checked by hand (tests/test_communication.py does one).

Assumptions (each a flag):
- A step is the single-GPU compute time t_c plus the part of the gradient allreduce that backprop does not
  hide. Backprop is 2/3 of t_c, and Horovod's hooks start allreduces as gradients appear, so up to
  overlap x (2/3) t_c of communication is hidden, and never more than overlap x the allreduce: the first
  layers' gradients come last, and their share is always exposed (--overlap 0.8). PowerSGD as built here
  starts after backprop: nothing of it is hidden.
- Ring allreduce of S bytes over p GPUs: 2(p-1) alpha + 2(p-1)/p x S / B, with B the slowest link of the ring.
  Flat ring over several nodes: B is one GPU's share of the node's NICs (8 x 200 Gb/s for 8 GPUs: 25 GB/s).
- Hierarchical (--hierarchical-allreduce: NCCL within the node, then across nodes on S/8 per GPU, each GPU on
  its own NIC): reduce-scatter and allgather over NVLink, (g-1) alpha_nvl + (g-1)/g S / B_nvl each, between
  them a ring across N nodes of S/g bytes over one NIC.
- What each --compression puts on the wire is its entry's `Wire` in compression.py: fp16 (and bf16) halve S
  and add two passes over the gradients in GPU memory (the casts). PowerSGD sends its factors
  and the 1-D tensors in three allreduces (three latency terms) and costs ~6 small kernels per weight matrix
  plus ~5 passes over the gradients (error feedback, the product P Q^T).
- The epoch boundary (EpochBoundary, one line per setting): what happens once per epoch beyond its steps, for
  an epoch of IMAGENET_TRAIN_IMAGES at --images-per-gpu img/s (MLPerf v4.0's H100s: ~7,200, so 0.7 s at 256
  GPUs). Evaluation of the 50,000 val images split over the GPUs at --eval-speedup x the training img/s
  (forward only), every --eval-every epochs; the checkpoint's copy to pinned host memory every
  --checkpoint-every epochs (written in the background), or before issue 28 its whole write at
  --checkpoint-write-mb-s while the steps wait; --collectives small latency-bound collectives (BN average, the
  weight digests, the val sums, the stop agreement), each a tree of 2 log2(p) alpha between nodes (NCCL's
  choice for small messages); --train-start-ms for the first batch at the epoch's start (bench-epoch: ~0, it
  decodes during the boundary).
Anchors: Goyal et al. (2017) report ~90 % scaling efficiency from 8 to 256 P100 GPUs (kn = 8k in 1 hour);
Horovod's README reports 90 % scaling efficiency at 512 GPUs for ResNet-101 and Inception V3.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..compression import COMPRESSIONS
from ..data.synthetic import IMAGENET_TRAIN_IMAGES
from ..errors import UserError
from ..flags import Command, check, opt


@dataclass(frozen=True)
class Cluster:
    step_time_ms: float = opt(
        "one GPU's step time at n (forward, backward, optimizer; no communication). Default: n=32 at 3,000 "
        "img/s, a goal for one H100 with AMP, not a measurement; give yours, or --from-bench",
        32 / 3000 * 1000,
        above=0,
    )
    batch_size: int = opt("n, images per GPU per step (the paper's 32)", 32, above=0)
    arch: str = opt("model whose gradients are allreduced", "resnet50")
    gpus_per_node: int = opt("GPUs per node", 8, above=0)
    nvlink_gb_s: float = opt(
        "one GPU's NVLink bandwidth per direction, GB/s (H100 SXM: 900 GB/s both ways)", 450.0, above=0
    )
    nvlink_latency_us: float = opt("alpha within a node, per ring step", 3.0, min=0)
    nic_gbit_s: float = opt("one NIC, Gbit/s (InfiniBand NDR200)", 200.0, above=0)
    nics_per_node: int = opt("NICs per node (one per GPU)", 8, above=0)
    nic_latency_us: float = opt("alpha between nodes, per ring step", 6.0, min=0)
    hbm_gb_s: float = opt("GPU memory bandwidth, GB/s (H100 SXM: 3.35 TB/s)", 3350.0, above=0)
    kernel_us: float = opt("one small GPU kernel's cost (PowerSGD's per-matrix ops)", 5.0, min=0)
    overlap: float = opt(
        "fraction of backprop's time that can hide allreduce (Horovod's hooks; 0: none hidden)", 0.8, min=0, max=1
    )
    powersgd_rank: int = opt("PowerSGD's rank r", 2, above=0)
    epochs: int = opt("epochs for the time-to-train column", 90, above=0)

    def __post_init__(self):
        check(self)


IMAGENET_VAL_IMAGES = 50_000


@dataclass(frozen=True)
class EpochBoundary:
    images_per_gpu: float = opt(
        "training img/s per GPU, for the epoch's length (MLPerf v4.0 ResNet-50 on H100: ~7,200)", 7200.0, above=0
    )
    eval_speedup: float = opt("evaluation img/s per GPU over training's (forward only)", 3.0, above=0)
    eval_every: int = opt("evaluate every N epochs (MLPerf: 4)", 4, min=1)
    checkpoint_every: int = opt("a checkpoint every N epochs", 1, min=1)
    checkpoint_mb: float = opt("checkpoint size, MB (ResNet-50 with SGD momentum: ~205)", 205.0, min=0)
    host_copy_gb_s: float = opt("device-to-pinned-host copy, GB/s (PCIe Gen5 x16: ~50 peak)", 20.0, above=0)
    checkpoint_write_mb_s: float = opt(
        "before: the synchronous write, MB/s (a busy shared file system: ~10)", 1000.0, above=0
    )
    collectives: int = opt("small collectives per boundary (BN average, digests, val sums, stop agreement)", 4, min=0)
    train_start_ms: float = opt(
        "wait for the epoch's first batch (bench-epoch: it decodes during the boundary)", 0.0, min=0
    )

    def __post_init__(self):
        check(self)


def boundary(c: Cluster, b: EpochBoundary, nodes: int, before: bool) -> dict:
    """Seconds per epoch at the epoch boundary, by part, and the efficiency they leave: before issue 28 (every
    epoch evaluated, the checkpoint written while the steps wait), or as configured."""
    gpus = nodes * c.gpus_per_node
    steps = IMAGENET_TRAIN_IMAGES / (gpus * b.images_per_gpu)
    eval_every, checkpoint_every = (1, 1) if before else (b.eval_every, b.checkpoint_every)
    latency = 2 * math.log2(gpus) * (c.nic_latency_us if nodes > 1 else c.nvlink_latency_us) * 1e-6 if gpus > 1 else 0
    checkpoint = b.checkpoint_mb / b.checkpoint_write_mb_s if before else b.checkpoint_mb / 1000 / b.host_copy_gb_s
    parts = {
        "evaluation": IMAGENET_VAL_IMAGES / gpus / (b.images_per_gpu * b.eval_speedup) / eval_every,
        "checkpoint": checkpoint / checkpoint_every,
        "collectives": b.collectives * latency,
        "train_start": b.train_start_ms / 1000,
    }
    total = sum(parts.values())
    return {
        "setting": "before" if before else "after",
        "nodes": nodes,
        "gpus": gpus,
        "epoch_steps_s": steps,
        "eval_every": eval_every,
        "checkpoint_every": checkpoint_every,
        "parts_ms": {name: 1000 * value for name, value in parts.items()},
        "boundary_ms": 1000 * total,
        "share": total / (steps + total),
        "efficiency": steps / (steps + total),
    }


@dataclass(frozen=True)
class Gradients:
    elements: int  # float32 gradient elements
    matrices: int  # weight matrices PowerSGD compresses
    powersgd_elements: int  # what PowerSGD sends: factors + uncompressed tensors

    @classmethod
    def of(cls, arch: str, rank: int) -> Gradients:
        import torch

        from ..comm import PowerSGD, PowerSGDSettings
        from ..model import build_model

        with torch.device("meta"):  # shapes only
            shapes = [p.shape for p in build_model(arch, 1000, True).parameters()]
            powersgd = PowerSGD(shapes, PowerSGDSettings(rank=rank), torch.device("meta"))
        return cls(sum(shape.numel() for shape in shapes), len(powersgd.matrix_indices), powersgd.wire_elements())


def ring_seconds(size_bytes: float, ranks: int, bandwidth: float, latency: float, messages: int = 1) -> float:
    """Ring allreduce: 2(p-1) steps of latency per message, 2(p-1)/p of the bytes over the slowest link."""
    if ranks == 1:
        return 0.0
    return messages * 2 * (ranks - 1) * latency + 2 * (ranks - 1) / ranks * size_bytes / bandwidth


def allreduce_seconds(c: Cluster, nodes: int, size_bytes: float, hierarchical: bool, messages: int = 1) -> float:
    g = c.gpus_per_node
    nvlink, nvlink_alpha = c.nvlink_gb_s * 1e9, c.nvlink_latency_us * 1e-6
    nic = c.nic_gbit_s * 1e9 / 8 * c.nics_per_node / g  # one GPU's share of the node's NICs, bytes/s
    nic_alpha = c.nic_latency_us * 1e-6
    if nodes == 1:
        return ring_seconds(size_bytes, g, nvlink, nvlink_alpha, messages)
    if not hierarchical:
        return ring_seconds(size_bytes, nodes * g, min(nvlink, nic), max(nvlink_alpha, nic_alpha), messages)
    within = messages * (g - 1) * nvlink_alpha + (g - 1) / g * size_bytes / nvlink  # reduce-scatter (= allgather)
    return 2 * within + ring_seconds(size_bytes / g, nodes, nic, nic_alpha, messages)


def predict(c: Cluster, grads: Gradients, nodes: int, compression: str, hierarchical: bool) -> dict:
    compute = c.step_time_ms / 1000
    hideable = c.overlap * compute * 2 / 3
    fp32_bytes = grads.elements * 4
    hbm = c.hbm_gb_s * 1e9
    wire = COMPRESSIONS[compression].wire
    if wire.low_rank:  # PowerSGD: three allreduces of the factors and the 1-D tensors, after backprop
        comm = allreduce_seconds(c, nodes, grads.powersgd_elements * 4, hierarchical, messages=3)
        overhead = grads.matrices * 6 * c.kernel_us * 1e-6 + 5 * fp32_bytes / hbm
        exposed = comm  # nothing hidden
    else:
        size = grads.elements * wire.bytes_per_element
        comm = allreduce_seconds(c, nodes, size, hierarchical)
        overhead = 2 * (fp32_bytes + size) / hbm if wire.casts else 0.0  # cast down and up: read + write each
        exposed = max(comm - hideable, (1 - c.overlap) * comm)
    gpus = nodes * c.gpus_per_node
    if gpus == 1:
        exposed = overhead = 0.0
    step = compute + overhead + exposed
    images_per_sec = gpus * c.batch_size / step
    return {
        "nodes": nodes,
        "gpus": gpus,
        "global_batch": gpus * c.batch_size,
        "compression": compression,
        "allreduce": "hierarchical" if hierarchical else "ring",
        "allreduce_ms": 1000 * comm,
        "exposed_ms": 1000 * exposed,
        "overhead_ms": 1000 * overhead,
        "step_ms": 1000 * step,
        "images_per_sec": images_per_sec,
        "efficiency": compute / step,
        "minutes_for_epochs": c.epochs * IMAGENET_TRAIN_IMAGES / images_per_sec / 60,
    }


def scaling_table(
    c: Cluster, node_counts: list[int], compressions: list[str], epoch: EpochBoundary = EpochBoundary()
) -> dict:
    grads = Gradients.of(c.arch, c.powersgd_rank)
    rows = [
        predict(c, grads, nodes, compression, hierarchical)
        for compression in compressions
        for hierarchical in (False, True)
        for nodes in node_counts
    ]
    return {
        "benchmark": "scaling-model",
        "cluster": c.__dict__,
        "gradient_elements": grads.elements,
        "powersgd_matrices": grads.matrices,
        "powersgd_elements": grads.powersgd_elements,
        "rows": rows,
        "epoch_boundary": {
            "assumptions": epoch.__dict__,
            "rows": [boundary(c, epoch, max(node_counts), before) for before in (True, False)],
        },
    }


def format_report(report: dict) -> str:
    c = report["cluster"]
    lines = [
        f"scaling-model: {c['arch']} ({report['gradient_elements'] / 1e6:.1f}M gradient floats), "
        f"n={c['batch_size']}, 1-GPU step {c['step_time_ms']:.2f} ms; {c['gpus_per_node']} GPUs/node, NVLink "
        f"{c['nvlink_gb_s']:g} GB/s, {c['nics_per_node']} x {c['nic_gbit_s']:g} Gb/s NICs/node; "
        f"overlap {c['overlap']:g}",
        f"{'compress':<9} {'allreduce':<12} {'nodes':>5} {'GPUs':>5} {'kn':>6} {'comm ms':>8} {'exposed':>8} "
        f"{'step ms':>8} {'img/s':>9} {'effic.':>7} {str(c['epochs']) + '-ep min':>8}",
    ]
    for r in report["rows"]:
        lines.append(
            f"{r['compression']:<9} {r['allreduce']:<12} {r['nodes']:>5} {r['gpus']:>5} "
            f"{r['global_batch']:>6} {r['allreduce_ms']:>8.2f} {r['exposed_ms']:>8.2f} {r['step_ms']:>8.2f} "
            f"{r['images_per_sec']:>9.0f} {100 * r['efficiency']:>6.1f}% {r['minutes_for_epochs']:>8.1f}"
        )
    lines.append("effic.: 1-GPU step time / step time (per-GPU throughput against one GPU without communication)")
    rows = report["epoch_boundary"]["rows"]
    a = report["epoch_boundary"]["assumptions"]
    lines.append(
        f"epoch boundary at {rows[0]['nodes']} x {c['gpus_per_node']} GPUs, {a['images_per_gpu']:g} img/s per "
        f"GPU: {1000 * rows[0]['epoch_steps_s']:.0f} ms of steps per epoch"
    )
    lines.append(
        f"{'setting':<52} {'eval':>6} {'ckpt':>6} {'coll.':>6} {'start':>6} {'total ms':>9} "
        f"{'of epoch':>9} {'effic.':>7}"
    )
    for r in rows:
        how = f"{r['setting']}: eval every {r['eval_every']}, " + (
            "checkpoint written, steps wait"
            if r["setting"] == "before"
            else f"checkpoint every {r['checkpoint_every']} (host copy)"
        )
        p = r["parts_ms"]
        lines.append(
            f"{how:<52} {p['evaluation']:>6.1f} {p['checkpoint']:>6.1f} {p['collectives']:>6.2f} "
            f"{p['train_start']:>6.1f} {r['boundary_ms']:>9.1f} {100 * r['share']:>8.1f}% "
            f"{100 * r['efficiency']:>6.1f}%"
        )
    return "\n".join(lines)


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    series: dict[tuple, list] = {}
    for r in report["rows"]:
        series.setdefault((r["compression"], r["allreduce"]), []).append((r["gpus"], 100 * r["efficiency"]))
    for (compression, algorithm), points in series.items():
        gpus, efficiency = zip(*points)
        axes.plot(
            gpus,
            efficiency,
            marker="o",
            linestyle="-" if algorithm == "ring" else "--",
            label=f"{compression}, {algorithm}",
        )
    axes.set_xscale("log", base=2)
    axes.set_xlabel("GPUs")
    axes.set_ylabel("scaling efficiency, %")
    axes.axhline(90, color="grey", linewidth=0.8, linestyle=":")
    axes.set_title(f"{report['cluster']['arch']}: predicted efficiency (grey: the paper's ~90 % at 256 GPUs)")
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


@dataclass(frozen=True)
class ScalingOptions:
    cluster: Cluster = field(default_factory=Cluster)
    epoch: EpochBoundary = field(default_factory=EpochBoundary)
    from_bench: str = opt("take n and the 1-GPU step time from a bench-train --json result's 1-rank runs", "")
    nodes: tuple[int, ...] = opt("node counts", (1, 2, 4, 8, 16, 32), min=1)
    compression: tuple[str, ...] = opt(
        "compressors (compression.COMPRESSIONS)", ("none", "fp16", "powersgd"), choices=tuple(COMPRESSIONS)
    )
    plot: str = opt("efficiency vs GPUs as a PNG (needs matplotlib: pip install .[study])", "")
    json: bool = opt("the report as JSON", False)

    def __post_init__(self):
        check(self)


def cluster_from_bench(cluster: Cluster, path: str) -> Cluster:
    """n and the 1-GPU step time of a bench-train --json result: the median over the 1-rank runs of its fastest
    case (precision, layout, ...; the one a job would run)."""
    cases: dict[tuple, list[dict]] = {}
    for run in json.loads(Path(path).read_text())["runs"]:
        if run["ranks"] == 1:
            cases.setdefault(tuple(run.get(k) for k in ("backend", "compression", "precision", "layout")), []).append(
                run
            )
    if not cases:
        raise UserError(f"--from-bench {path}: no 1-rank run in it (bench-train --np 1)")
    runs = min(cases.values(), key=lambda group: statistics.median(r["step_seconds"] for r in group))
    return dataclasses.replace(
        cluster,
        step_time_ms=1000 * statistics.median(r["step_seconds"] for r in runs),
        batch_size=runs[0]["batch_size"],
    )


def run(options: ScalingOptions) -> None:
    cluster = cluster_from_bench(options.cluster, options.from_bench) if options.from_bench else options.cluster
    report = scaling_table(cluster, list(options.nodes), list(options.compression), options.epoch)
    report["command"] = "hvd-imagenet " + " ".join(sys.argv[1:])
    if options.plot:
        plot(report, options.plot)
    print(json.dumps(report, indent=1) if options.json else format_report(report))


COMMAND = Command(
    ScalingOptions,
    run,
    description=(
        "An alpha-beta model of Horovod's allreduce (ring and hierarchical) for each compressor, from one GPU's step "
        "time; its assumptions are in hvd_imagenet/bench/scaling.py and docs/communication.md. Defaults: H100 SXM "
        "nodes, 8 GPUs on NVLink, 8 x 200 Gb/s InfiniBand."
    ),
)
