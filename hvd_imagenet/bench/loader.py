"""`hvd-imagenet bench-loader`: input pipelines side by side, in one process, on the same files.

Each repeat builds every loader in turn (the order they were named), reads one untimed epoch (start-up:
worker processes, DALI's libraries), then times `epochs` epochs of training batches. Reported per loader, as
the median over repeats: images per second, CPU-seconds per image (this process and its descendants: DALI's
threads live in the process, DataLoader workers are child processes) and the peak resident memory of the
process tree. The ratio divides every loader's img/s by the last one's.
"""
from __future__ import annotations

import gc
import json
import os
import resource
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import TrainConfig
from ..context import DistContext
from ..cpus import available_cpus
from ..data import DALI_DEVICES, FILE_LOADERS, build_loaders
from ..data.layout import check_layout
from ..flags import Command, check, opt
from ..gpu import device_name, rank_device

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parent = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue  # exited while we looked
            children.setdefault(parent, []).append(int(entry))
    found, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def _cpu_seconds(pid: int) -> float:
    """utime + stime of one live process (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    except (OSError, IndexError, ValueError):
        return 0.0


def _rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * PAGE_SIZE
    except (OSError, IndexError, ValueError):
        return 0


def tree_cpu_seconds() -> dict[int, float]:
    """CPU-seconds so far of this process and each live descendant (persistent DataLoader workers live
    through the timed epochs, so the difference of two snapshots is their work)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    seconds = {os.getpid(): usage.ru_utime + usage.ru_stime}
    seconds.update({pid: _cpu_seconds(pid) for pid in _descendants(os.getpid())})
    return seconds


class PeakMemory:
    """Samples the resident memory of the process tree every `interval` seconds, keeps the peak."""

    def __init__(self, interval: float = 0.25):
        self.interval, self.peak = interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(self.interval):
            pids = [os.getpid(), *_descendants(os.getpid())]
            self.peak = max(self.peak, sum(_rss_bytes(pid) for pid in pids))

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


@dataclass
class Measurement:
    loader: str
    description: str
    images: int
    seconds: float
    cpu_seconds: float
    peak_rss_mib: float

    @property
    def images_per_sec(self) -> float:
        return self.images / self.seconds


def measure(config: TrainConfig, ctx: DistContext, epochs: int) -> Measurement:
    with PeakMemory() as memory:
        loaders = build_loaders(config, ctx)
        loaders.set_epoch(0)
        for _ in loaders.train:  # untimed: start-up
            pass
        cpu_before, images = tree_cpu_seconds(), 0
        start = time.perf_counter()
        for epoch in range(1, epochs + 1):
            loaders.set_epoch(epoch)
            for batch_images, _ in loaders.train:
                images += batch_images.shape[0]
        if ctx.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        cpu_after = tree_cpu_seconds()
        cpu = sum(after - cpu_before.get(pid, 0.0) for pid, after in cpu_after.items())
        description = loaders.description
        del loaders
        gc.collect()  # workers and pipelines go before the next loader starts
    return Measurement(config.loader, description, images, seconds, cpu, memory.peak / 2**20)


@dataclass(frozen=True)
class LoaderBenchOptions:
    data: str = opt("DIR/train/<class>/* (the train split is read)")
    loader: tuple[str, ...] = opt("loaders to compare; the last is the baseline of the ratio", FILE_LOADERS,
                                  choices=FILE_LOADERS)
    batch_size: int = opt("images per batch", 32, min=1)
    image_size: int = opt("training crop, px", 224, min=1)
    epochs: int = opt("timed epochs per repeat, after one untimed", 2, min=1)
    repeats: int = opt("the table shows the median over repeats", 3, min=1)
    threads: int = opt("DALI threads and DataLoader workers alike (default: the CPUs this process may use)",
                       default_factory=available_cpus, min=1)
    dali_device: str = opt("DALI decode: gpu (nvJPEG, mixed), cpu, or auto", "auto", choices=DALI_DEVICES)
    dali_prefetch: int = opt("DALI batches decoded ahead of the one in use", 2, min=1)
    json: bool = opt("the report as JSON", False)

    def __post_init__(self):
        check(self)


def bench_loaders(options: LoaderBenchOptions) -> dict:
    data = Path(options.data)
    check_layout(data)
    device = rank_device(0)
    ctx = DistContext(rank=0, local_rank=0, size=1, local_size=1, device=device)
    runs: dict[str, list[Measurement]] = {name: [] for name in options.loader}
    for _ in range(options.repeats):  # interleaved, so a slow moment of the machine hits every loader alike
        for name in options.loader:
            config = TrainConfig(data=str(data), output="(bench-loader writes nothing)", loader=name,
                                 batch_size=options.batch_size, image_size=options.image_size,
                                 val_resize=options.image_size, workers=options.threads,
                                 dali_threads=options.threads, dali_device=options.dali_device,
                                 dali_prefetch=options.dali_prefetch)
            runs[name].append(measure(config, ctx, options.epochs))
    results = [summarize(name, measurements) for name, measurements in runs.items()]
    baseline = results[-1]["images_per_sec"]
    for result in results:
        result["ratio"] = result["images_per_sec"] / baseline
    return {
        "benchmark": "bench-loader", "data": str(data), "device": device_name(device), "batch_size": options.batch_size,
        "image_size": options.image_size, "threads": options.threads, "epochs": options.epochs,
        "repeats": options.repeats, "results": results,
    }


def summarize(name: str, measurements: list[Measurement]) -> dict:
    """One loader's row: medians over the repeats."""
    return {
        "loader": name,
        "description": measurements[0].description,
        "images_per_sec": statistics.median(m.images_per_sec for m in measurements),
        "cpu_seconds_per_image": statistics.median(m.cpu_seconds / m.images for m in measurements),
        "peak_rss_mib": max(m.peak_rss_mib for m in measurements),
        "images_per_repeat": measurements[0].images,
        "runs_images_per_sec": [m.images_per_sec for m in measurements],
    }


def run(options: LoaderBenchOptions) -> None:
    report = {**bench_loaders(options), "command": "hvd-imagenet " + " ".join(sys.argv[1:])}
    print(json.dumps(report, indent=1) if options.json else format_report(report))


def format_report(report: dict) -> str:
    baseline = report["results"][-1]["loader"]
    rows = [f"bench-loader: {report['device']}, batch {report['batch_size']}, {report['image_size']} px, "
            f"{report['threads']} threads/workers, median of {report['repeats']} x {report['epochs']} epochs",
            f"{'loader':<12} {'img/s':>9} {'CPU-s/img':>10} {'peak MiB':>9} {'vs ' + baseline:>15}  what"]
    for r in report["results"]:
        rows.append(f"{r['loader']:<12} {r['images_per_sec']:>9.1f} {r['cpu_seconds_per_image']:>10.4f} "
                    f"{r['peak_rss_mib']:>9.0f} {r['ratio']:>14.2f}x  {r['description']}")
    return "\n".join(rows)


COMMAND = Command(LoaderBenchOptions, run)
