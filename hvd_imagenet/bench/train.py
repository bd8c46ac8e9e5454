"""`hvd-imagenet bench-train`: training steps timed, under Horovod, PyTorch DDP, or alone (no communication).

The step timed is training's own (step.TrainStep: lr, forward and loss under autocast, backward,
synchronize, unscale, clipping, the finite check, the step). `--backend none` runs it in this process on one
device with training's optimizer and no communication at all (no Horovod needed: a GPU machine's first check).
--optimizer sgd,lars times each optimizer (optimizers/) side by side; "vs sgd" is the step time's ratio.

By default the timed steps run back to back as in training: on a GPU, a CUDA event before the first and after
the last, one device sync at the end; step time = elapsed / steps. With --phases, a clock at each phase
boundary instead (each one synchronizes the device, so the steps run slower than training's):
  data            the next batch from the loader (0 for synthetic data: one fixed batch on the device)
  forward         forward pass and loss (autocast under --precision)
  backward        backprop. Horovod's hooks start each gradient's allreduce here, in the background; DDP's
                  reducer allreduces its buckets here too and waits for the last one before returning
  allreduce_wait  optimizer.synchronize(): Horovod only, the wait for allreduces that backprop did not hide
                  (PowerSGD: all of its compression and its allreduces, which start after backprop)
  optimizer       unscale, the finite check (or GradScaler's) and the optimizer's step (SGD or LARS)
On each rank: `warmup` untimed steps, then `steps` timed ones. Rank 0 reports the step time (with --phases the
median of each phase); img/s per worker (per rank) is V x n x batches-per-allreduce / step time. With
--count-syncs N, N more steps run without the clock and count the step's host synchronizations by call site
(host_sync.py: CUDA's sync debug mode on a GPU, the syncing torch operations elsewhere), against the budget of
one per step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import statistics
import time
from dataclasses import dataclass, field

import torch

from .. import host_sync
from ..compression import COMPRESSIONS
from ..config import HOROVOD_DEFAULTS, TrainConfig, train_default
from ..context import DistContext
from ..cpus import available_cpus, cpus_per_rank
from ..data import LOADERS
from ..data.loaders import build_loaders
from ..errors import UserError
from ..flags import Command, check, opt
from ..gpu import device_name, rank_device
from ..losses import build_loss
from ..model import build_model
from ..optimizers import OPTIMIZERS, build_optimizer
from ..precision import PRECISIONS, autocast
from ..step import PHASES, PhaseClock, TrainStep
from . import launch
from .launch import LaunchOptions, launcher_rank_and_size

BACKENDS = ("horovod", "ddp", "none")  # none: one process, no communication (np 1 only)
LAYOUTS = ("nchw", "nhwc")  # nhwc: train --channels-last (weights and batches in channels_last)
CASE = ("backend", "compression", "precision", "layout", "optimizer")  # what a row is, beside its ranks


@dataclass(frozen=True)
class TrainBenchOptions:
    backend: tuple[str, ...] = opt("backends to time", BACKENDS, choices=BACKENDS)
    np: tuple[int, ...] = opt("ranks to start on this machine, one run each (as a command)", (1, 2), min=1)
    compression: tuple[str, ...] = opt(
        "Horovod: ours; DDP: PyTorch's fp16/bf16/PowerSGD comm hooks", ("none",), choices=tuple(COMPRESSIONS)
    )
    arch: str = opt("model (any `train --arch`)", "resnet50")
    batch_size: int = opt("n, per worker", train_default("batch_size"), min=1)
    batches_per_allreduce: int = opt("passes per step (virtual workers one after another)", 1, min=1)
    virtual_workers_per_pass: int = opt("virtual workers in one pass of V x n images (BN over each n)", 1, min=1)
    image_size: int = opt("px", 224, min=1)
    loader: str = opt("input pipeline", "synthetic", choices=tuple(LOADERS))
    data: str = opt("with --loader dali|torchvision", "")
    precision: tuple[str, ...] = opt("train's --precision, one run each", ("fp32",), choices=tuple(PRECISIONS))
    layout: tuple[str, ...] = opt(
        "memory format of weights and batches, one run each (nhwc: train --channels-last)", ("nchw",), choices=LAYOUTS
    )
    optimizer: tuple[str, ...] = opt("train's --optimizer, one run each", ("sgd",), choices=tuple(OPTIMIZERS))
    powersgd_rank: int = opt("PowerSGD's rank r", train_default("powersgd_rank"), min=1)
    powersgd_start_step: int = opt(
        "0: compressed from the first step (DDP's hook needs 2 plain steps: within --warmup)", 0, min=0
    )
    gradient_predivide_factor: float = opt("as train's", train_default("gradient_predivide_factor"), above=0)
    fusion_threshold_mb: float = opt("as train's", HOROVOD_DEFAULTS[0], min=0)
    cycle_time_ms: float = opt("as train's", HOROVOD_DEFAULTS[1], above=0)
    hierarchical_allreduce: bool = opt("as train's", HOROVOD_DEFAULTS[2])
    steps: int = opt("timed steps per run", 10, min=1)
    warmup: int = opt("untimed steps first (>= 2 for DDP's PowerSGD)", 3, min=0)
    repeats: int = opt("runs per case (as a command); medians shown", 3, min=1)
    phases: bool = opt("time each phase of every step (a device sync at each boundary: slower than training)", False)
    count_syncs: int = opt("after the timed steps, this many more that count the step's host syncs (0: none)", 0, min=0)
    threads: int = opt("CPU threads per worker (0: cores / the largest --np, the same at every --np)", 0, min=0)
    launch: LaunchOptions = field(default_factory=LaunchOptions)

    def __post_init__(self):
        check(self)

    def train_config(self) -> TrainConfig:
        """The training config of one rank's run (its case: the first of each list), from the flags the two
        share."""
        mine = {f.name for f in dataclasses.fields(self)} - {"compression", "precision", "optimizer"}  # one each
        shared = {f.name: getattr(self, f.name) for f in dataclasses.fields(TrainConfig) if f.name in mine}
        return TrainConfig(
            **shared,
            output="(bench-train writes nothing)",
            val_resize=self.image_size,
            compression=self.compression[0],
            precision=self.precision[0],
            optimizer=self.optimizer[0],
            channels_last=self.layout[0] == "nhwc",
            workers=self.threads,
            dali_threads=self.threads,
        )


def start_ranks(backend: str, config: TrainConfig, threads: int) -> DistContext:
    """Horovod (hvd.init) or torch.distributed (gloo on the CPU, NCCL on GPUs; rank and size from the
    launcher, MASTER_ADDR/MASTER_PORT from the environment), or none (this process alone, the first device),
    and this rank's share of the cores."""
    if backend == "none":
        ctx = DistContext(0, 0, 1, 1, rank_device(0))
    elif backend == "horovod":
        from .. import comm

        ctx = comm.init(config.fusion_threshold_mb, config.cycle_time_ms, config.hierarchical_allreduce)
    else:
        if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
            raise UserError(
                "--backend ddp under a launcher: set MASTER_ADDR and MASTER_PORT (rank 0's host, a "
                "free port) for torch.distributed"
            )
        rank, size, local_rank, local_size = launcher_rank_and_size()
        device = rank_device(local_rank)
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=size)
        ctx = DistContext(rank, local_rank, size, local_size, device)
    if ctx.device.type == "cpu":
        torch.set_num_threads(threads or cpus_per_rank(ctx.local_size))
    return ctx


def local_optimizer(config: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """Training's optimizer (build_optimizer) with Horovod's DistributedOptimizer interface, for TrainStep under
    DDP (DDP's reducer averaged the gradients inside backward) and alone (one worker): nothing to synchronize."""
    optimizer = build_optimizer(config, model)
    optimizer.synchronize = lambda: None
    optimizer.skip_synchronize = contextlib.nullcontext
    return optimizer


def build_step(backend: str, config: TrainConfig, ctx: DistContext, num_classes: int) -> TrainStep:
    """The training step under one backend: training's own model, optimizer and scaler (Horovod), or DDP with
    the comm hook that matches --compression (compression.COMPRESSIONS) and training's optimizer, or the model
    alone with training's optimizer (none)."""
    if backend == "horovod":
        from .. import comm
        from ..train import build_step as training_step
        from ..train import build_training

        model, optimizer, scaler = build_training(config, num_classes, ctx.device)
        comm.broadcast_state(model, optimizer, resumed=False)
        return training_step(config, model, optimizer, scaler, ctx)
    model = build_model(config.arch, num_classes, config.zero_init_residual, config.virtual_workers_per_pass)
    model = model.to(ctx.device)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if backend == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[ctx.device] if ctx.device.type == "cuda" else None
        )
        COMPRESSIONS[config.compression].register_ddp_hook(model, config.powersgd_rank)
    optimizer = local_optimizer(config, model)
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=config.precision == "amp-fp16")
    return TrainStep(
        model,
        optimizer,
        scaler,
        autocast(config.precision, ctx.device),
        config.batches_per_allreduce,
        restore_bn=scaler.is_enabled(),
        criterion=build_loss(config),
    )


def endless(loaders):
    epoch = 0
    while True:
        loaders.set_epoch(epoch)
        yield from loaders.train
        epoch += 1


def count_step_syncs(step: TrainStep, batches, steps: int, device: torch.device) -> dict:
    """Host syncs per step over `steps` steps, by call site (host_sync.report). The phase clock, which
    synchronizes the device at each phase boundary, is off meanwhile."""
    step.on_phase = None
    with host_sync.counter(device) as log:
        for _ in range(steps):
            step(batches, lr=0.01)
    return host_sync.report(log, steps)


def time_steps(step: TrainStep, batches, steps: int, device: torch.device) -> float:
    """Seconds of `steps` steps run back to back, as training runs them: on a GPU between two CUDA events, with
    one device sync after the last step; elsewhere by the wall clock."""
    if device.type != "cuda":
        start = time.perf_counter()
        for _ in range(steps):
            step(batches, lr=0.01)
        return time.perf_counter() - start
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(steps):
        step(batches, lr=0.01)
    end.record()
    end.synchronize()  # host sync: the measurement's one, after the last timed step
    return begin.elapsed_time(end) / 1000


def time_phases(step: TrainStep, batches, steps: int, clock: PhaseClock) -> dict[str, list[float]]:
    """Seconds of each phase of each of `steps` steps (--phases)."""
    step.on_phase = clock
    timings = {phase: [] for phase in PHASES}
    for _ in range(steps):
        clock.start()
        step(batches, lr=0.01)
        for phase, seconds in clock.seconds.items():
            timings[phase].append(seconds)
    step.on_phase = None
    return timings


def bench_train(
    backend: str, config: TrainConfig, steps: int, warmup: int, threads: int, count_syncs: int = 0, phases: bool = False
) -> dict | None:
    """Run on every rank; rank 0 returns the report (the others None)."""
    ctx = start_ranks(backend, config, threads)
    loaders = build_loaders(config, ctx)
    step = build_step(backend, config, ctx, loaders.num_classes)
    step.model.train()
    batches = endless(loaders)
    for _ in range(warmup):
        step(batches, lr=0.01)
    if phases:
        clock = PhaseClock(ctx.device, absent=("allreduce_wait",) if backend != "horovod" else ())
        timings = time_phases(step, batches, steps, clock)
        step_times = [sum(parts) for parts in zip(*timings.values())]
    else:
        timings, step_times = None, [time_steps(step, batches, steps, ctx.device) / steps]
    syncs = count_step_syncs(step, batches, count_syncs, ctx.device) if count_syncs else None
    if backend == "horovod":
        from .. import comm

        comm.shutdown()
    elif backend == "ddp":  # no rank closes its connections while another still uses them
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    if not ctx.is_primary:
        return None
    return {
        **report(backend, config, ctx, loaders.description, timings, step_times, steps, warmup),
        "host_syncs": syncs,
    }


def report(
    backend: str,
    config: TrainConfig,
    ctx: DistContext,
    input_description: str,
    timings: dict | None,
    step_times: list[float],
    steps: int,
    warmup: int,
) -> dict:
    """timings: seconds per phase per step (--phases), else None; step_times: one per step (--phases), else
    the mean over the back-to-back steps."""
    step = statistics.median(step_times)
    images = config.pass_batch * config.batches_per_allreduce  # per rank per step
    return {
        "backend": backend,
        "ranks": ctx.size,
        "device": device_name(ctx.device),
        "threads_per_rank": torch.get_num_threads() if ctx.device.type == "cpu" else None,
        "arch": config.arch,
        "batch_size": config.batch_size,
        "batches_per_allreduce": config.batches_per_allreduce,
        "virtual_workers_per_pass": config.virtual_workers_per_pass,
        "image_size": config.image_size,
        "loader": config.loader,
        "input": input_description,
        "precision": config.precision,
        "layout": LAYOUTS[config.channels_last],
        "compression": config.compression,
        "optimizer": config.optimizer,
        "steps": steps,
        "warmup": warmup,
        "step_seconds": step,
        "timing": "phases" if timings else "events" if ctx.device.type == "cuda" else "wall clock",
        "phases": {p: statistics.median(v) for p, v in timings.items()} if timings else None,
        "images_per_sec_per_worker": images / step,
        "images_per_sec": ctx.size * images / step,
        "runs_step_seconds": step_times,
    }


def run(options: TrainBenchOptions) -> None:
    if launch.under_launcher():  # one of the ranks: one case
        if options.backend == ("none",):
            raise UserError("--backend none runs alone, in this process: run it as a command, not under a launcher")
        if any(len(getattr(options, name)) > 1 for name in CASE) or options.launch.link != "loopback":
            raise UserError(
                "under a launcher, bench-train measures one --backend, --compression, --precision, "
                "--layout and --optimizer on the launcher's ranks (no --link); as a command it runs each "
                "combination "
                "itself"
            )
        result = bench_train(
            options.backend[0],
            options.train_config(),
            options.steps,
            options.warmup,
            options.threads,
            options.count_syncs,
            options.phases,
        )
        if result:
            launch.emit({"runs": [result], "rows": summarize([result]), "repeats": 1}, options.launch, format_report)
        return
    launch.emit(drive(options), options.launch, format_report)


def drive(options: TrainBenchOptions) -> dict:
    """As a command: every (np, backend, compression, precision, layout, optimizer) case `repeats` times, interleaved (a
    slow moment of the machine hits every case alike), each on its own horovodrun."""
    from tqdm import tqdm

    threads = options.threads or max(1, available_cpus() // max(options.np))  # the same at every --np
    cases = [
        dict(zip(("np", *CASE), values))
        for values in itertools.product(options.np, *(getattr(options, name) for name in CASE))
    ]
    alone = [c for c in cases if c["backend"] == "none"]
    if alone and (min(options.np) != 1 or any(c["compression"] != "none" for c in alone)):
        raise UserError(
            "--backend none is one worker with nothing to communicate: it runs at --np 1 with "
            "--compression none (other backends take the other values)"
        )
    cases = [c for c in cases if c["backend"] != "none" or c["np"] == 1]
    runs = []
    with launch.shaped_namespace(options.launch.link) as prefix:
        link = launch.link_record(options.launch.link, prefix)
        with tqdm(total=options.repeats * len(cases), desc="bench-train", unit="run", leave=False) as progress:
            for _ in range(options.repeats):
                for values in cases:
                    np = values["np"]
                    case = dataclasses.replace(
                        options, **{k: (v,) for k, v in values.items()}, threads=threads, repeats=1
                    )
                    if values["backend"] == "none":  # in this process: no launcher, no Horovod
                        runs.append(
                            bench_train(
                                "none",
                                case.train_config(),
                                case.steps,
                                case.warmup,
                                threads,
                                case.count_syncs,
                                case.phases,
                            )
                        )
                        progress.update()
                        continue
                    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(launch.free_port())}
                    report = launch.run_ranks(
                        prefix, np, options.launch.controller, launch.forward("bench-train", case), env
                    )
                    runs.extend(report["runs"])
                    progress.update()
    return {"benchmark": "bench-train", "repeats": options.repeats, "rows": summarize(runs), "runs": runs, "link": link}


def summarize(runs: list[dict]) -> list[dict]:
    """One row per case (backend, compression, precision, layout, optimizer) and ranks: medians over the
    repeats; weak-scaling efficiency against the same case at the fewest ranks; step time relative to DDP, to no
    compression and to SGD, with the rest of the case the same."""
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        groups.setdefault((*(run[name] for name in CASE), run["ranks"]), []).append(run)
    rows = []
    for group in groups.values():
        rows.append(
            {
                **{k: group[0][k] for k in (*CASE, "ranks", "threads_per_rank")},
                "step_seconds": statistics.median(r["step_seconds"] for r in group),
                "phases": {p: statistics.median(r["phases"][p] for r in group) for p in PHASES}
                if group[0]["phases"]
                else None,
                "images_per_sec_per_worker": statistics.median(r["images_per_sec_per_worker"] for r in group),
                "repeats_step_seconds": [r["step_seconds"] for r in group],
                "host_syncs": group[0]["host_syncs"],
            }
        )  # a count, the same in every repeat

    def like(row: dict, **changes) -> dict | None:
        """The row of the same case and ranks as `row` but for `changes`, if it was measured."""
        wanted = {**{k: row[k] for k in (*CASE, "ranks")}, **changes}
        return next((r for r in rows if all(r[k] == v for k, v in wanted.items())), None)

    for row in rows:
        fewest = min(r["ranks"] for r in rows if all(r[k] == row[k] for k in CASE))
        row["weak_scaling_efficiency"] = (
            row["images_per_sec_per_worker"] / like(row, ranks=fewest)["images_per_sec_per_worker"]
        )
        row["weak_scaling_from_ranks"] = fewest
        for key, other in (
            ("step_vs_ddp", like(row, backend="ddp")),
            ("step_vs_none", like(row, compression="none")),
            ("step_vs_sgd", like(row, optimizer="sgd")),
        ):
            if other:
                row[key] = row["step_seconds"] / other["step_seconds"]
    return sorted(
        rows,
        key=lambda r: (
            r["backend"] != "horovod",
            r["compression"],
            r["precision"],
            r["layout"],
            r["optimizer"] != "sgd",
            r["optimizer"],
            r["ranks"],
        ),
    )


def format_report(report: dict) -> str:
    first = report["runs"][0]
    link = report.get("link") or {}
    where = (
        f"lo shaped to {link['name']} (measured {link['measured_gbit_s']:.2f} Gbit/s)"
        if link.get("shaped")
        else "loopback"
    )
    passes = f"{first.get('virtual_workers_per_pass', 1)} x n={first['batch_size']} per pass"
    lines = [
        f"bench-train: {first['arch']}, {passes} x {first['batches_per_allreduce']} pass(es), "
        f"{first['image_size']} px, {first['loader']} data, {first['device']}, {where}; median of "
        f"{report['repeats']} repeats x {first['steps']} steps (ms)",
        f"{'backend':<8} {'compress':<9} {'precision':<9} {'layout':<6} {'optim':<5} {'ranks':>5} {'step':>7} "
        + " ".join(f"{p[:9]:>9}" for p in PHASES)
        + f" {'img/s/wkr':>9} {'weak scl':>8} {'vs ddp':>7} "
        f"{'vs none':>7} {'vs sgd':>7}",
    ]
    for r in report["rows"]:
        phases = " ".join(f"{1000 * r['phases'][p]:>9.1f}" if r["phases"] else f"{'-':>9}" for p in PHASES)
        vs_ddp = f"{r['step_vs_ddp']:.2f}x" if "step_vs_ddp" in r else "-"
        vs_none = f"{r['step_vs_none']:.2f}x" if "step_vs_none" in r else "-"
        vs_sgd = f"{r['step_vs_sgd']:.3f}x" if "step_vs_sgd" in r else "-"
        lines.append(
            f"{r['backend']:<8} {r['compression']:<9} {r['precision']:<9} {r['layout']:<6} "
            f"{r['optimizer']:<5} {r['ranks']:>5} {1000 * r['step_seconds']:>7.1f} {phases} "
            f"{r['images_per_sec_per_worker']:>9.1f} {100 * r['weak_scaling_efficiency']:>7.1f}% {vs_ddp:>7} "
            f"{vs_none:>7} {vs_sgd:>7}"
        )
    lines.append(
        "weak scl: img/s per worker vs the same case at the fewest ranks; vs ddp / vs none / vs sgd: step "
        "time ratio (< 1: faster); step: "
        + (
            "per phase, a device sync at each boundary (--phases)"
            if first["phases"]
            else f"{first['timing']}, steps back to back"
        )
    )
    for r in report["rows"]:
        if r["host_syncs"]:
            case = " ".join(str(r[k]) for k in (*CASE, "ranks"))
            lines.append(format_syncs(f"{case} ranks", r["host_syncs"]))
    return "\n".join(lines)


def format_syncs(case: str, syncs: dict) -> str:
    excluded = ", ".join(f"{owner} {n:g}" for owner, n in syncs["excluded_per_step"].items())
    lines = [
        f"{case}: {syncs['per_step']:g} host syncs per step of our own (budget {syncs['budget_per_step']}; "
        f"left aside: {excluded}; over {syncs['steps']} steps)"
    ]
    lines += [f"  {n:g} x {site}" for site, n in syncs["sites"].items()]
    return "\n".join(lines)


COMMAND = Command(
    TrainBenchOptions,
    run,
    description=(
        "Times training steps of the same model and data under Horovod, under PyTorch DDP (gloo on the CPU, NCCL "
        "on GPUs) and alone (--backend none: no communication, no Horovod), at each --np, for each --compression, "
        "--precision and --layout; weak-scaling efficiency is img/s per worker against the fewest ranks. "
        + launch.AS_COMMAND_OR_RANK
    ),
)
