"""`hvd-imagenet bench-loader`: input pipelines side by side, in one process, on the same data.

Each repeat builds every loader on every --data in turn (a folder tree and its packed shards, say), reads one
untimed epoch (start-up: worker processes, DALI's libraries and pipeline, shard files opened), then times
`epochs` epochs of training batches, through the same workers and pipeline (`pipeline_builds` counts DALI's).
Reported per (loader, data), as the median over repeats: images per second, CPU-seconds per
image (this process and its descendants: DALI's threads live in the process, DataLoader workers are child
processes), the peak resident memory of the process tree, and the files opened per timed epoch under --data
by any process (inotify: what a shared file system's metadata server would serve). The ratio divides every
row's img/s by the last one's.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import resource
import select
import statistics
import struct
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import TrainConfig
from ..context import DistContext
from ..cpus import available_cpus
from ..data import DALI_DEVICES, FILE_LOADERS
from ..data.loaders import build_loaders, check_data
from ..data.packed import is_packed
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


class OpenCounter:
    """Counts the opens of files in a directory tree, by this process and any other (inotify's IN_OPEN on every
    directory of the tree). The kernel queues an event as a file is opened, so count() drains the queue and is
    exact; a thread drains it in between, so that it cannot overflow during a long epoch. Identical events in
    a row that were not read yet count once (inotify merges them): a loader opens each image file once per
    epoch and a shard file once per process, so that merge does not change what is measured here."""

    IN_OPEN, IN_ISDIR, IN_Q_OVERFLOW = 0x20, 0x40000000, 0x4000
    EVENT = struct.Struct("iIII")  # wd, mask, cookie, len (then len bytes of name)

    def __init__(self, root: Path):
        libc = ctypes.CDLL(None, use_errno=True)
        self.fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        for directory, _, _ in os.walk(root):
            if libc.inotify_add_watch(self.fd, os.fsencode(directory), self.IN_OPEN) < 0:
                raise OSError(ctypes.get_errno(), f"inotify_add_watch {directory}")
        self.opens, self.overflowed = 0, False
        self._lock, self._stop = threading.Lock(), threading.Event()
        self._thread = threading.Thread(target=self._drain_until_stopped, daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        with self._lock:
            while True:
                try:
                    buffer = os.read(self.fd, 1 << 16)
                except BlockingIOError:  # the queue is empty
                    return
                offset = 0
                while offset < len(buffer):
                    _, mask, _, length = self.EVENT.unpack_from(buffer, offset)
                    offset += self.EVENT.size + length
                    self.overflowed |= bool(mask & self.IN_Q_OVERFLOW)
                    self.opens += bool(mask & self.IN_OPEN) and not mask & self.IN_ISDIR

    def _drain_until_stopped(self) -> None:
        while not self._stop.is_set():
            select.select([self.fd], [], [], 0.1)
            self._drain()

    def count(self) -> int:
        """The opens so far."""
        self._drain()
        if self.overflowed:
            raise RuntimeError("inotify's queue overflowed: the open count is incomplete")
        return self.opens

    def close(self) -> None:
        self._stop.set()
        self._thread.join()  # before the descriptor goes: a later counter may get its number
        os.close(self.fd)


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
    data: str
    description: str
    images: int
    seconds: float
    cpu_seconds: float
    peak_rss_mib: float
    epochs: int  # timed
    opens: int  # files opened under --data during the timed epochs
    builds: int | None  # DALI pipelines built for the train batches over all epochs (one per run); None: no DALI

    @property
    def images_per_sec(self) -> float:
        return self.images / self.seconds


def measure(config: TrainConfig, ctx: DistContext, epochs: int) -> Measurement:
    opens = OpenCounter(Path(config.data))
    with PeakMemory() as memory:
        loaders = build_loaders(config, ctx)
        loaders.set_epoch(0)
        for _ in loaders.train:  # untimed: start-up
            pass
        cpu_before, opens_before, images = tree_cpu_seconds(), opens.count(), 0
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
        opened = opens.count() - opens_before
        description, builds = loaders.description, getattr(loaders.train, "builds", None)
        del loaders
        gc.collect()  # workers and pipelines go before the next loader starts
    opens.close()
    return Measurement(
        config.loader, config.data, description, images, seconds, cpu, memory.peak / 2**20, epochs, opened, builds
    )


@dataclass(frozen=True)
class LoaderBenchOptions:
    data: tuple[str, ...] = opt(
        "data sets to compare, each a folder tree or packed shards (hvd-imagenet pack); the train split is read"
    )
    loader: tuple[str, ...] = opt(
        "loaders to compare; the last (on the last --data) is the baseline of the ratio",
        FILE_LOADERS,
        choices=FILE_LOADERS,
    )
    batch_size: int = opt("images per batch", 32, min=1)
    image_size: int = opt("training crop, px", 224, min=1)
    epochs: int = opt("timed epochs per repeat, after one untimed", 2, min=1)
    repeats: int = opt("the table shows the median over repeats", 3, min=1)
    threads: int = opt(
        "DALI threads and DataLoader workers alike (default: the CPUs this process may use)",
        default_factory=available_cpus,
        min=1,
    )
    dali_device: str = opt("DALI decode: gpu (nvJPEG, mixed), cpu, or auto", "auto", choices=DALI_DEVICES)
    dali_prefetch: int = opt("DALI batches decoded ahead of the one in use", 2, min=1)
    json: bool = opt("the report as JSON", False)

    def __post_init__(self):
        check(self)


def bench_loaders(options: LoaderBenchOptions) -> dict:
    for data in options.data:
        check_data(Path(data))
    device = rank_device(0)
    ctx = DistContext(rank=0, local_rank=0, size=1, local_size=1, device=device)
    cases = [(loader, data) for data in options.data for loader in options.loader]
    runs: dict[tuple[str, str], list[Measurement]] = {case: [] for case in cases}
    for _ in range(options.repeats):  # interleaved, so a slow moment of the machine hits every case alike
        for loader, data in cases:
            config = TrainConfig(
                data=data,
                output="(bench-loader writes nothing)",
                loader=loader,
                batch_size=options.batch_size,
                image_size=options.image_size,
                val_resize=options.image_size,
                workers=options.threads,
                dali_threads=options.threads,
                dali_device=options.dali_device,
                dali_prefetch=options.dali_prefetch,
            )
            runs[loader, data].append(measure(config, ctx, options.epochs))
    results = [summarize(measurements) for measurements in runs.values()]
    baseline = results[-1]["images_per_sec"]
    for result in results:
        result["ratio"] = result["images_per_sec"] / baseline
    return {
        "benchmark": "bench-loader",
        "data": list(options.data),
        "device": device_name(device),
        "batch_size": options.batch_size,
        "image_size": options.image_size,
        "threads": options.threads,
        "epochs": options.epochs,
        "repeats": options.repeats,
        "results": results,
    }


def summarize(measurements: list[Measurement]) -> dict:
    """One (loader, data) row: medians over the repeats."""
    first = measurements[0]
    return {
        "loader": first.loader,
        "data": first.data,
        "data_kind": "packed" if is_packed(Path(first.data)) else "folder",
        "description": first.description,
        "images_per_sec": statistics.median(m.images_per_sec for m in measurements),
        "cpu_seconds_per_image": statistics.median(m.cpu_seconds / m.images for m in measurements),
        "peak_rss_mib": max(m.peak_rss_mib for m in measurements),
        "opens_per_epoch": statistics.median(m.opens / m.epochs for m in measurements),
        "images_per_repeat": first.images,
        "pipeline_builds": first.builds,
        "runs_images_per_sec": [m.images_per_sec for m in measurements],
    }


def run(options: LoaderBenchOptions) -> None:
    report = {**bench_loaders(options), "command": "hvd-imagenet " + " ".join(sys.argv[1:])}
    print(json.dumps(report, indent=1) if options.json else format_report(report))


def format_report(report: dict) -> str:
    last = report["results"][-1]
    baseline = f"{last['loader']} {last['data_kind']}"
    rows = [
        f"bench-loader: {report['device']}, batch {report['batch_size']}, {report['image_size']} px, "
        f"{report['threads']} threads/workers, median of {report['repeats']} x {report['epochs']} epochs",
        f"{'loader':<12} {'data':<7} {'img/s':>9} {'CPU-s/img':>10} {'peak MiB':>9} {'opens/epoch':>12} "
        f"{'vs ' + baseline:>22}  what",
    ]
    for r in report["results"]:
        rows.append(
            f"{r['loader']:<12} {r['data_kind']:<7} {r['images_per_sec']:>9.1f} "
            f"{r['cpu_seconds_per_image']:>10.4f} {r['peak_rss_mib']:>9.0f} {r['opens_per_epoch']:>12.0f} "
            f"{r['ratio']:>21.2f}x  {r['description']} ({r['data']})"
        )
    return "\n".join(rows)


COMMAND = Command(LoaderBenchOptions, run)
