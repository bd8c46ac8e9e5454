"""`hvd-imagenet bench-epoch`: what an epoch boundary costs beyond its steps, part by part, as it was (every
part at every epoch, the DALI pipelines rebuilt, the checkpoint written while the steps wait) and as it is
(pipelines reset, evaluation every --eval-every epochs, a checkpoint every --checkpoint-every epochs written in
the background).

One rank in this process, Horovod started in it: the calls are train's own (the loaders' set_epoch and first
batch, step.evaluate, comm.average_bn_statistics, comm.gather_digests of model.weights_digest, the stop
agreement, checkpoint.save and checkpoint.AsyncWriter), the collectives real at size 1. Each repeat measures
every part both ways; the table shows medians. At 256 GPUs the collectives cost their latency: scaling-model
adds it, and projects the whole boundary onto 32 x 8 H100s.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import checkpoint, comm
from ..config import TrainConfig
from ..cpus import available_cpus
from ..data.loaders import build_loaders, check_data
from ..errors import UserError
from ..flags import Command, check, opt
from ..gpu import device_name
from ..model import build_model, weights_digest
from ..precision import autocast
from ..step import evaluate

PARTS = ("train_start", "evaluation", "bn_average", "digests", "stop_agreement", "checkpoint")


@dataclass(frozen=True)
class EpochBenchOptions:
    data: str = opt("a folder tree or packed shards (hvd-imagenet pack): its train and val splits are read", "")
    arch: str = opt("model (its checkpoint's size; ResNet-50's is ~205 MB)", "resnet50")
    batch_size: int = opt("images per batch", 32, min=1)
    image_size: int = opt("training crop and val center crop, px", 64, min=1)
    val_resize: int = opt("val: shorter side resized to this, then center crop", 73, min=1)
    threads: int = opt("DALI threads (default: the CPUs this process may use)", default_factory=available_cpus, min=1)
    eval_every: int = opt("the 'after' column: evaluate every N epochs (MLPerf's ResNet-50: 4)", 4, min=1)
    checkpoint_every: int = opt("the 'after' column: a checkpoint every N epochs", 1, min=1)
    repeats: int = opt("the table shows the median over repeats", 5, min=1)
    json: bool = opt("the report as JSON", False)

    def __post_init__(self):
        check(self)


def timed(action) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def first_batch(loaders, epoch: int) -> float:
    """Seconds from set_epoch (a no-op when the epoch was started earlier) to the epoch's first batch. The pass
    is then left, and drained outside the timing (DaliPass), as training would have read on."""
    started = time.perf_counter()
    loaders.set_epoch(epoch)
    batches = iter(loaders.train)
    next(batches)
    return time.perf_counter() - started


def measure_boundary(loaders, model, optimizer, writer, directory: Path, epoch: int, device) -> dict:
    """Every part once each way, in train's order: {part: (before, after)} in seconds. After: the next
    epoch is started first (train's finish_epoch), so its first batch decodes meanwhile; its wait is
    measured in an epoch without evaluation, where the least time passes before it."""

    def evaluation():
        evaluate(model, loaders.val, device, autocast("fp32", device), lambda: None)
        model.train()

    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "epoch": epoch,
        "step": 0,
        "step_in_epoch": 0,
        "images_done": 0,
        "partial": None,
        "config": {},
    }
    shared = {
        "bn_average": timed(lambda: comm.average_bn_statistics(model)),
        "digests": timed(lambda: comm.gather_digests(weights_digest(model))),
        "stop_agreement": timed(lambda: comm.allreduce_max(0, name="stop_request")),
    }
    loaders.train.pipeline = loaders.val.pipeline = None  # before: a pipeline built for each pass
    before = {
        "evaluation": timed(evaluation),
        "checkpoint": timed(lambda: checkpoint.save(directory / "synchronous", state, keep=1)),
        "train_start": first_batch(loaders, 2 * epoch),
    }
    loaders.set_epoch(2 * epoch + 1)  # after: the next epoch started before the evaluation
    after = {"evaluation": timed(evaluation), "checkpoint": timed(lambda: writer.submit(state))}
    writer.wait()
    loaders.set_epoch(2 * epoch + 2)  # an epoch without evaluation: the checkpoint's stall, then the batch
    writer.submit(state)
    writer.wait()
    after["train_start"] = first_batch(loaders, 2 * epoch + 2)
    return {part: (before.get(part, shared.get(part)), after.get(part, shared.get(part))) for part in PARTS}


def bench_epoch(options: EpochBenchOptions) -> dict:
    if not options.data:
        raise UserError("--data: give a folder tree or packed shards (hvd-imagenet make-dataset makes a small one)")
    check_data(Path(options.data))
    ctx = comm.init()
    config = TrainConfig(
        data=options.data,
        output="(bench-epoch writes nothing)",
        loader="dali",
        arch=options.arch,
        batch_size=options.batch_size,
        image_size=options.image_size,
        val_resize=options.val_resize,
        dali_threads=options.threads,
    )
    loaders = build_loaders(config, ctx)
    model = build_model(options.arch, loaders.num_classes, True).to(ctx.device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    images, labels = next(iter(loaders.train))  # one step: the momentum buffers a checkpoint holds
    torch.nn.functional.cross_entropy(model(images), labels).backward()
    optimizer.step()
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench-epoch-") as directory:
        writer = checkpoint.AsyncWriter(Path(directory) / "background", keep=1)
        for repeat in range(options.repeats):
            runs.append(measure_boundary(loaders, model, optimizer, writer, Path(directory), repeat + 1, ctx.device))
        checkpoint_mb = (Path(directory) / "background" / f"epoch-{options.repeats:04d}.pt").stat().st_size / 1e6
    reused = build_loaders(config, ctx)  # one run's worth of epochs, as train runs them: count the builds
    for epoch in range(3):
        reused.set_epoch(epoch)
        list(reused.train)
        list(reused.val)
    return report(options, ctx, runs, checkpoint_mb, loaders.description, (reused.train.builds, reused.val.builds))


def report(options, ctx, runs: list[dict], checkpoint_mb: float, description: str, builds: tuple) -> dict:
    medians = {part: [statistics.median(run[part][i] for run in runs) for i in (0, 1)] for part in PARTS}
    every = {"evaluation": options.eval_every, "checkpoint": options.checkpoint_every}
    before = sum(b for b, _ in medians.values())
    after = sum(a / every.get(part, 1) for part, (_, a) in medians.items())
    return {
        "benchmark": "bench-epoch",
        "device": device_name(ctx.device),
        "data": options.data,
        "arch": options.arch,
        "batch_size": options.batch_size,
        "image_size": options.image_size,
        "input": description,
        "checkpoint_mb": checkpoint_mb,
        "eval_every": options.eval_every,
        "checkpoint_every": options.checkpoint_every,
        "repeats": options.repeats,
        "seconds": {part: {"before": b, "after": a} for part, (b, a) in medians.items()},
        "boundary_seconds": {"before": before, "after": after},
        "pipeline_builds_over_3_epochs": {"before": [3, 3], "after": list(builds)},
        "runs": runs,
    }


def format_report(r: dict) -> str:
    s = r["seconds"]
    notes = {
        "train_start": ("pipeline built at the epoch", "pipeline reset, started during the boundary"),
        "evaluation": ("every epoch, pipeline built", f"every {r['eval_every']} epochs, pipeline reset"),
        "checkpoint": (
            "file written, steps wait",
            f"host copy, every {r['checkpoint_every']}; file written in the background",
        ),
    }
    lines = [
        f"bench-epoch: {r['device']}, {r['arch']} ({r['checkpoint_mb']:.0f} MB checkpoint), batch "
        f"{r['batch_size']}, {r['image_size']} px, {r['input']}; median of {r['repeats']}",
        f"{'part':<16} {'before ms':>10} {'after ms':>10} {'after/epoch':>12}  how",
    ]
    for part, value in s.items():
        every = {"evaluation": r["eval_every"], "checkpoint": r["checkpoint_every"]}.get(part, 1)
        before, after = notes.get(part, ("every epoch", "every epoch"))
        lines.append(
            f"{part:<16} {1000 * value['before']:>10.1f} {1000 * value['after']:>10.1f} "
            f"{1000 * value['after'] / every:>12.1f}  {before} -> {after}"
        )
    total = r["boundary_seconds"]
    builds = r["pipeline_builds_over_3_epochs"]
    lines.append(
        f"{'boundary':<16} {1000 * total['before']:>10.1f} {'':>10} {1000 * total['after']:>12.1f}  "
        f"per epoch: {total['before'] / total['after']:.1f}x less"
    )
    lines.append(f"DALI pipelines built over 3 epochs (train, val): before {builds['before']}, after {builds['after']}")
    return "\n".join(lines)


def run(options: EpochBenchOptions) -> None:
    result = {**bench_epoch(options), "command": "hvd-imagenet " + " ".join(sys.argv[1:])}
    print(json.dumps(result, indent=1) if options.json else format_report(result))
    comm.shutdown()


COMMAND = Command(
    EpochBenchOptions,
    run,
    description=(
        "What an epoch boundary costs beyond its steps (loader start, evaluation, reductions, checkpoint), before and "
        "after issue 28, on one rank; scaling-model projects it onto 32 x 8 H100s."
    ),
)
