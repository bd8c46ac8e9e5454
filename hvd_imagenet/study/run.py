"""Run a study's grid: one `hvd-imagenet train` job per (setting, seed) under horovodrun, several side by side
when the CPUs allow (--parallel), each pinned to its own CPUs with taskset.

Each run writes runs/<key>-seed<s>/ (its config.json, metrics.jsonl, a checkpoint and train.log). A run that
finished is not run again, and one that was cut short resumes from its checkpoint: an interrupted study picks
up where it stopped when the same command is given again.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from ..data.loaders import check_data
from ..errors import Diverged, UserError
from ..flags import Command, check, opt
from ..metrics import read_metrics
from . import report
from .grid import PRESETS, Run, Scale, lr_sweep, plan, resolve, train_args

LOG_NAME = "train.log"


def finished(run: Run, epochs: int) -> bool:
    return (run.directory / Diverged.RECORD_FILE).exists() or len(read_metrics(run.directory)) >= epochs


def horovodrun() -> str:
    """horovodrun beside this Python (a venv's bin/), else on PATH."""
    beside = Path(sys.executable).parent / "horovodrun"
    found = str(beside) if beside.exists() else shutil.which("horovodrun")
    if not found:
        raise UserError("study: horovodrun not found beside this Python or on PATH (is Horovod installed?)")
    return found


def cpu_sets(parallel: int, ranks: int) -> list[list[int]]:
    """The CPUs of each of `parallel` side-by-side runs (0: as many as the CPUs hold runs of `ranks` ranks)."""
    cpus = sorted(os.sched_getaffinity(0))
    count = parallel or max(1, len(cpus) // ranks)
    if count > len(cpus):
        raise UserError(f"study: --parallel {count} is more runs than this process's {len(cpus)} CPUs")
    share = len(cpus) // count
    return [cpus[i * share : (i + 1) * share] for i in range(count)]


def launch(run: Run, scale: Scale, data: Path, cpus: list[int] | None) -> int:
    """One training run on scale.ranks local ranks (Gloo), on `cpus` only when given; its output goes to
    train.log. The exit status."""
    run.directory.mkdir(parents=True, exist_ok=True)
    pin = ["taskset", "--cpu-list", ",".join(map(str, cpus))] if cpus else []
    command = [
        *pin,
        horovodrun(),
        "-np",
        str(scale.ranks),
        "-H",
        f"localhost:{scale.ranks}",
        "--gloo",
        sys.executable,
        "-m",
        "hvd_imagenet.cli",
        "train",
        *train_args(run.setting, scale, run.seed, str(data), str(run.directory)),
        "--resume",
    ]
    with open(run.directory / LOG_NAME, "a") as log:
        log.write(f"$ {' '.join(command)}\n")
        log.flush()
        return subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL).returncode


def why_it_failed(run: Run, lines: int = 15) -> str:
    """Where the run's log says why: train's own one-line messages (`hvd-imagenet train: ...`, each rank's, which
    horovodrun's traceback after them would push out of a tail), else the log's last lines."""
    text = (run.directory / LOG_NAME).read_text(errors="replace").splitlines()
    said = [line for line in text if "hvd-imagenet train: " in line]
    where = f"{run.directory / LOG_NAME} says" if said else f"the end of {run.directory / LOG_NAME}"
    return f"{where}:\n" + "\n".join(said[-lines:] or text[-lines:])


def outcome_line(run: Run, scale: Scale, status: int, seconds: float) -> str:
    """'val top-1 error 12.34% after epoch 18' (or diverged); a failed run raises, with its log's end."""
    if (run.directory / Diverged.RECORD_FILE).exists():  # a result, not a failure: the table shows it
        return "diverged (NaN/inf gradients)"
    if status != 0:
        raise UserError(
            f"study: run {run.name} failed (exit {status}) after {seconds:.0f} s; {why_it_failed(run)}"
            "\nGive the same command again to resume the study"
        )
    last = read_metrics(run.directory)[-1]
    return f"val top-1 error {100 - last['val_top1']:.2f}% after epoch {last['epoch']}"


def run_all(runs: list[Run], scale: Scale, data: Path, parallel: int = 0) -> None:
    """Every run not yet finished, the smallest kn (the longest runs) first, a lr sweep's runs (beyond's x0.5
    and x2) after the rows they check, up to `parallel` side by side on CPUs of their own; a progress bar over
    runs and a line as each starts and ends. A failed run stops the study (no other starts; those under way
    finish) with its log's reason."""
    check_data(data)
    todo = sorted(
        (run for run in runs if not finished(run, scale.epochs)), key=lambda r: (lr_sweep(r.setting), r.setting.factor)
    )
    if len(todo) < len(runs):
        print(f"study: {len(runs) - len(todo)} of {len(runs)} runs finished earlier; running the other {len(todo)}")
    sets = cpu_sets(parallel, scale.ranks)
    free = queue.Queue()
    for cpus in sets:
        free.put(cpus if len(sets) > 1 else None)
    print(
        f"study: {len(sets)} run(s) at a time, {scale.ranks} rank(s) each; each run's log: "
        f"{runs[0].directory.parent}/<run>/{LOG_NAME}",
        flush=True,
    )

    failed = threading.Event()  # a run failed: start no other (the study stops once the runs under way end)

    def one(run: Run) -> None:
        """The run on CPUs of its own, its start and end lines said before the CPUs go to the next run."""
        cpus = free.get()
        try:
            if failed.is_set():
                return
            where = f" on CPU(s) {','.join(map(str, cpus))}" if cpus else ""
            tqdm.write(f"study: {run.name} ({run.setting.label(scale)}) started{where}", file=sys.stdout)
            start = time.perf_counter()
            status = launch(run, scale, data, cpus)
            seconds = time.perf_counter() - start
            tqdm.write(
                f"study: {run.name} ({run.setting.label(scale)}): "
                f"{outcome_line(run, scale, status, seconds)}, {seconds:.0f} s",
                file=sys.stdout,
            )
        except BaseException:
            failed.set()
            raise
        finally:
            free.put(cpus)

    bar = tqdm(total=len(todo), desc="study", unit="run", file=sys.stdout, dynamic_ncols=True, disable=None)
    with ThreadPoolExecutor(max_workers=len(sets)) as pool:
        futures = [pool.submit(one, run) for run in todo]
        try:
            for future in as_completed(futures):
                future.result()  # a failed run's UserError, raised here
                bar.update()
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)  # runs under way finish; a resume skips them
            raise
    bar.close()


def write_plan(runs: list[Run], scale: Scale, preset: str, command: str, output: Path) -> None:
    """study.json: what was asked (re-running the same study must not mix grids)."""
    record = {
        "preset": preset,
        "scale": scale.__dict__,
        "seeds": max(r.seed for r in runs) + 1,
        "runs": [r.name for r in runs],
        "command": command,
    }
    path = output / "study.json"
    if path.exists():
        before = json.loads(path.read_text())
        if (before["preset"], before["scale"]) != (preset, record["scale"]):
            raise UserError(
                f"{output} holds a study with preset {before['preset']} and scale {before['scale']}; "
                "choose a new --output"
            )
    output.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n")


@dataclass(frozen=True)
class StudyOptions:
    data: str = opt("ImageNet-layout data set (make-dataset --kind cluttered-digits)")
    output: str = opt("study directory: study.md, *.png, runs/")
    preset: str = opt(
        "table1: no/constant/gradual warmup at large kn vs the small-kn baseline; table2a: lr scaling "
        "rules; fig1: val error vs kn, up to --max-factor x the small kn, and the largest kn within "
        "1 point of it; beyond: past fig1's limit, SGD vs MLPerf's recipe (LARS) vs that recipe with "
        "SGD at kn = 32x to 256x, with the gradient noise scale; quick: baseline and gradual warmup, "
        "3 epochs",
        "table1",
        choices=tuple(PRESETS),
    )
    seeds: int = opt("runs per setting (seeds 0..N-1)", 3, min=1)
    parallel: int = opt("runs side by side, each pinned to its share of the CPUs (0: CPUs // ranks)", 0, min=0)
    scale: Scale = field(default_factory=Scale)

    def __post_init__(self):
        check(self)


def run(options: StudyOptions) -> None:
    settings, scale = resolve(options.preset, options.scale)
    output = Path(options.output)
    runs = plan(settings, options.seeds, output)
    command = "hvd-imagenet " + " ".join(sys.argv[1:])
    write_plan(runs, scale, options.preset, command, output)
    run_all(runs, scale, Path(options.data), options.parallel)
    written = report.write_report(runs, settings, scale, options.preset, command, output)
    print(f"study: wrote {', '.join(str(path) for path in written)}")


COMMAND = Command(
    StudyOptions,
    run,
    description=(
        "Runs a grid of `train` jobs under horovodrun (side by side on the CPUs; give the same command again to "
        "resume) and writes OUTPUT/study.md with the top-1 val error of each row, mean ± std over seeds, "
        "results.json and PNG plots. Defaults: make-dataset --kind cluttered-digits, cifar_resnet14, small kn = 2 "
        "workers x n=4 = 8, large kn = 32x that, all workers but the ranks virtual ones in one pass; see "
        "hvd_imagenet/study/grid.py and docs/study.md."
    ),
)
