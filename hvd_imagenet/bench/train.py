"""`hvd-imagenet bench-train`: training steps timed phase by phase, under Horovod or PyTorch DDP.

On each rank: `warmup` untimed steps, then `steps` timed ones, each split into
  data            the next batch from the loader (0 for synthetic data: one fixed batch on the device)
  forward         forward pass and loss (autocast under --precision)
  backward        backprop. Horovod's hooks start each gradient's allreduce here, in the background; DDP's
                  reducer allreduces its buckets here too and waits for the last one before returning
  allreduce_wait  optimizer.synchronize(): Horovod only, the wait for allreduces that backprop did not hide
                  (PowerSGD: all of its compression and its allreduces, which start after backprop)
  optimizer       SGD step (and GradScaler's unscale and update under amp-fp16)
On a GPU each boundary synchronizes the device (a small cost, the same for both backends). Rank 0 reports the
median of each phase; img/s per worker is n / median step time.
"""
from __future__ import annotations

import os
import statistics
import time

import torch

from ..config import TrainConfig
from ..context import DistContext
from ..data import build_loaders
from ..model import build_model, mixed_precision, parameter_groups
from .launch import launcher_rank_and_size

PHASES = ("data", "forward", "backward", "allreduce_wait", "optimizer")


def start_ranks(backend: str, threads: int, knobs: dict) -> DistContext:
    """Horovod (hvd.init) or torch.distributed (gloo on the CPU, NCCL on GPUs; rank and size from the
    launcher, MASTER_ADDR/MASTER_PORT from the environment), and this rank's share of the cores."""
    if backend == "horovod":
        from .. import comm

        ctx = comm.init(**knobs)
    else:
        if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
            from ..errors import UserError

            raise UserError("--backend ddp under a launcher: set MASTER_ADDR and MASTER_PORT (rank 0's host, a "
                            "free port) for torch.distributed")
        rank, size, local_rank, local_size = launcher_rank_and_size()
        cuda = torch.cuda.is_available()
        device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=size)
        ctx = DistContext(rank, local_rank, size, local_size, device)
    if ctx.device.type == "cpu":
        torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // ctx.local_size))
    return ctx


def ddp_wrap(model: torch.nn.Module, ctx: DistContext, compression: str, powersgd_rank: int):
    """DDP with the comm hook that matches --compression (PyTorch's own fp16, bf16 and PowerSGD hooks)."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

    model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[ctx.device] if ctx.device.type == "cuda"
                                                      else None)
    if compression == "fp16":
        model.register_comm_hook(None, default_hooks.fp16_compress_hook)
    elif compression == "bf16":
        model.register_comm_hook(None, default_hooks.bf16_compress_hook)
    elif compression == "powersgd":
        state = powerSGD_hook.PowerSGDState(None, matrix_approximation_rank=powersgd_rank, start_powerSGD_iter=2)
        model.register_comm_hook(state, powerSGD_hook.powerSGD_hook)  # DDP allows no PowerSGD from step 0
    return model


def endless(loaders):
    epoch = 0
    while True:
        loaders.set_epoch(epoch)
        yield from loaders.train
        epoch += 1


def bench_train(backend: str, config: TrainConfig, steps: int, warmup: int, threads: int) -> dict | None:
    """Run on every rank; rank 0 returns the report (the others None)."""
    ctx = start_ranks(backend, threads, {"fusion_threshold_mb": config.fusion_threshold_mb,
                                         "cycle_time_ms": config.cycle_time_ms,
                                         "hierarchical_allreduce": config.hierarchical_allreduce})
    loaders = build_loaders(config, ctx)
    model = build_model(config.arch, loaders.num_classes, config.zero_init_residual).to(ctx.device)
    optimizer = torch.optim.SGD(parameter_groups(model, config.weight_decay, config.bn_weight_decay), lr=0.01,
                                momentum=config.momentum, nesterov=config.nesterov)
    if backend == "horovod":
        from .. import comm

        optimizer = comm.distributed_optimizer(
            optimizer, model, config.compression, 1, config.gradient_predivide_factor,
            comm.PowerSGDSettings(rank=config.powersgd_rank, start_step=config.powersgd_start_step))
        comm.broadcast_state(model, optimizer, resumed=False)
    else:
        model = ddp_wrap(model, ctx, config.compression, config.powersgd_rank)
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=config.precision == "amp-fp16")
    autocast = mixed_precision(config.precision, ctx.device)
    criterion = torch.nn.CrossEntropyLoss()
    batches = endless(loaders)
    model.train()
    timings = {phase: [] for phase in PHASES}

    def now() -> float:
        if ctx.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    for step in range(warmup + steps):
        t0 = now()
        images, target = next(batches)
        t1 = now()
        optimizer.zero_grad()
        with autocast:
            loss = criterion(model(images), target)
        t2 = now()
        scaler.scale(loss).backward()
        t3 = now()
        if backend == "horovod":
            optimizer.synchronize()
            t4 = now()
        else:
            t4 = t3  # DDP's backward returned after its last allreduce
        scaler.unscale_(optimizer)
        if backend == "horovod":
            with optimizer.skip_synchronize():
                scaler.step(optimizer)
        else:
            scaler.step(optimizer)
        scaler.update()
        t5 = now()
        if step >= warmup:
            for phase, seconds in zip(PHASES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
                timings[phase].append(seconds)
    if backend == "horovod":
        comm.shutdown()
    else:  # no rank closes its connections while another still uses them
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    if not ctx.is_primary:
        return None
    step_times = [sum(parts) for parts in zip(*timings.values())]
    step = statistics.median(step_times)
    from .allreduce import device_name

    return {
        "backend": backend, "ranks": ctx.size, "device": device_name(ctx.device),
        "threads_per_rank": torch.get_num_threads() if ctx.device.type == "cpu" else None,
        "arch": config.arch, "batch_size": config.batch_size, "image_size": config.image_size,
        "loader": config.loader, "input": loaders.description, "precision": config.precision,
        "channels_last": config.channels_last, "compression": config.compression, "steps": steps,
        "warmup": warmup, "step_seconds": step, "phases": {p: statistics.median(v) for p, v in timings.items()},
        "images_per_sec_per_worker": config.batch_size / step, "images_per_sec": ctx.size * config.batch_size / step,
        "runs_step_seconds": step_times,
    }


def summarize(runs: list[dict]) -> list[dict]:
    """One row per (backend, compression, ranks): medians over the repeats; weak-scaling efficiency against
    the same backend and compression at the fewest ranks; step time relative to DDP at the same point."""
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        groups.setdefault((run["backend"], run["compression"], run["ranks"]), []).append(run)
    rows = []
    for (backend, compression, ranks), group in groups.items():
        rows.append({**{k: group[0][k] for k in ("backend", "compression", "ranks", "threads_per_rank")},
                     "step_seconds": statistics.median(r["step_seconds"] for r in group),
                     "phases": {p: statistics.median(r["phases"][p] for r in group) for p in PHASES},
                     "images_per_sec_per_worker": statistics.median(r["images_per_sec_per_worker"] for r in group),
                     "repeats_step_seconds": [r["step_seconds"] for r in group]})
    for row in rows:
        fewest = min(r["ranks"] for r in rows if (r["backend"], r["compression"]) == (row["backend"],
                                                                                          row["compression"]))
        base = next(r for r in rows if (r["backend"], r["compression"], r["ranks"]) ==
                    (row["backend"], row["compression"], fewest))
        row["weak_scaling_efficiency"] = row["images_per_sec_per_worker"] / base["images_per_sec_per_worker"]
        row["weak_scaling_from_ranks"] = fewest
        ddp = [r for r in rows if (r["backend"], r["compression"], r["ranks"]) == ("ddp", row["compression"],
                                                                                   row["ranks"])]
        if ddp:
            row["step_vs_ddp"] = row["step_seconds"] / ddp[0]["step_seconds"]
        none = [r for r in rows if (r["backend"], r["compression"], r["ranks"]) == (row["backend"], "none",
                                                                                    row["ranks"])]
        if none:
            row["step_vs_none"] = row["step_seconds"] / none[0]["step_seconds"]
    return sorted(rows, key=lambda r: (r["backend"] != "horovod", r["compression"], r["ranks"]))


def format_report(report: dict) -> str:
    first = report["runs"][0]
    link = report.get("link") or {}
    where = (f"lo shaped to {link['name']} (measured {link['measured_gbit_s']:.2f} Gbit/s)" if link.get("shaped")
             else "loopback")
    lines = [f"bench-train: {first['arch']}, n={first['batch_size']}, {first['image_size']} px, {first['loader']} "
             f"data, {first['precision']}, {first['device']}, {where}; median of {report['repeats']} repeats x "
             f"{first['steps']} steps (ms)",
             f"{'backend':<8} {'compress':<9} {'ranks':>5} {'step':>7} " + " ".join(f"{p[:9]:>9}" for p in PHASES)
             + f" {'img/s/wkr':>9} {'weak scl':>8} {'vs ddp':>7} {'vs none':>7}"]
    for r in report["rows"]:
        phases = " ".join(f"{1000 * r['phases'][p]:>9.1f}" for p in PHASES)
        vs_ddp = f"{r['step_vs_ddp']:.2f}x" if "step_vs_ddp" in r else "-"
        vs_none = f"{r['step_vs_none']:.2f}x" if "step_vs_none" in r else "-"
        lines.append(f"{r['backend']:<8} {r['compression']:<9} {r['ranks']:>5} {1000 * r['step_seconds']:>7.1f} "
                     f"{phases} {r['images_per_sec_per_worker']:>9.1f} {100 * r['weak_scaling_efficiency']:>7.1f}% "
                     f"{vs_ddp:>7} {vs_none:>7}")
    lines.append("weak scl: img/s per worker vs the same backend at the fewest ranks; vs ddp / vs none: step time "
                 "ratio (< 1: faster)")
    return "\n".join(lines)
