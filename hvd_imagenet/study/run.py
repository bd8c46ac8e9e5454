"""Run a study's grid: one `hvd-imagenet train` job per (setting, seed) under horovodrun, one after another.

Each run writes runs/<key>-seed<s>/ (its config.json, metrics.jsonl, a checkpoint and train.log). A run that
finished is not run again, and one that was cut short resumes from its checkpoint: an interrupted study picks
up where it stopped when the same command is given again.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from ..data import check_data
from ..errors import Diverged, UserError
from ..flags import Command, check, opt
from ..metrics import read_metrics
from .grid import PRESETS, Scale, Setting, resolve, train_args

LOG_NAME = "train.log"


@dataclass(frozen=True)
class Run:
    setting: Setting
    seed: int
    directory: Path

    @property
    def name(self) -> str:
        return self.directory.name


def plan(settings: tuple[Setting, ...], seeds: int, output: Path) -> list[Run]:
    return [Run(s, seed, output / "runs" / f"{s.key}-seed{seed}") for seed in range(seeds) for s in settings]


def finished(run: Run, epochs: int) -> bool:
    return (run.directory / Diverged.RECORD_FILE).exists() or len(read_metrics(run.directory)) >= epochs


def horovodrun() -> str:
    """horovodrun beside this Python (a venv's bin/), else on PATH."""
    beside = Path(sys.executable).parent / "horovodrun"
    found = str(beside) if beside.exists() else shutil.which("horovodrun")
    if not found:
        raise UserError("study: horovodrun not found beside this Python or on PATH (is Horovod installed?)")
    return found


def launch(run: Run, scale: Scale, data: Path) -> int:
    """One training run on scale.ranks local ranks (Gloo); its output goes to train.log. The exit status."""
    run.directory.mkdir(parents=True, exist_ok=True)
    command = [horovodrun(), "-np", str(scale.ranks), "-H", f"localhost:{scale.ranks}", "--gloo",
               sys.executable, "-m", "hvd_imagenet.cli", "train",
               *train_args(run.setting, scale, run.seed, str(data), str(run.directory)), "--resume"]
    with open(run.directory / LOG_NAME, "a") as log:
        log.write(f"$ {' '.join(command)}\n")
        log.flush()
        return subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL).returncode


def log_tail(run: Run, lines: int = 15) -> str:
    text = (run.directory / LOG_NAME).read_text(errors="replace").splitlines()
    return "\n".join(text[-lines:])


def run_all(runs: list[Run], scale: Scale, data: Path) -> None:
    """Every run not yet finished, with a progress bar over runs and one line per run."""
    check_data(data)
    todo = [run for run in runs if not finished(run, scale.epochs)]
    if len(todo) < len(runs):
        print(f"study: {len(runs) - len(todo)} of {len(runs)} runs finished earlier; running the other {len(todo)}")
    bar = tqdm(todo, desc="study", unit="run", file=sys.stdout, dynamic_ncols=True, disable=None)  # None: TTY only
    for run in bar:
        bar.set_postfix_str(run.name)
        start = time.perf_counter()
        status = launch(run, scale, data)
        seconds = time.perf_counter() - start
        if (run.directory / Diverged.RECORD_FILE).exists():  # a result, not a failure: the table shows it
            outcome = "diverged (NaN/inf gradients)"
        elif status != 0:
            raise UserError(f"study: run {run.name} failed (exit {status}) after {seconds:.0f} s; the end of "
                            f"{run.directory / LOG_NAME}:\n{log_tail(run)}\nGive the same command again to "
                            "resume the study")
        else:
            last = read_metrics(run.directory)[-1]
            outcome = f"val top-1 error {100 - last['val_top1']:.2f}% after epoch {last['epoch']}"
        tqdm.write(f"study: {run.name} ({run.setting.label(scale)}): {outcome}, {seconds:.0f} s", file=sys.stdout)
    bar.close()


def write_plan(runs: list[Run], scale: Scale, preset: str, command: str, output: Path) -> None:
    """study.json: what was asked (re-running the same study must not mix grids)."""
    record = {"preset": preset, "scale": scale.__dict__, "seeds": max(r.seed for r in runs) + 1,
              "runs": [r.name for r in runs], "command": command}
    path = output / "study.json"
    if path.exists():
        before = json.loads(path.read_text())
        if (before["preset"], before["scale"]) != (preset, record["scale"]):
            raise UserError(f"{output} holds a study with preset {before['preset']} and scale {before['scale']}; "
                            "choose a new --output")
    output.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n")


@dataclass(frozen=True)
class StudyOptions:
    data: str = opt("ImageNet-layout data set (make-dataset --kind digits)")
    output: str = opt("study directory: study.md, *.png, runs/")
    preset: str = opt("table1: no/constant/gradual warmup at large kn vs the small-kn baseline; table2a: lr scaling "
                      "rules; quick: baseline and gradual warmup, 3 epochs", "table1", choices=tuple(PRESETS))
    seeds: int = opt("runs per setting (seeds 0..N-1)", 3, min=1)
    scale: Scale = field(default_factory=Scale)

    def __post_init__(self):
        check(self)


def run(options: StudyOptions) -> None:
    from . import report

    settings, scale = resolve(options.preset, options.scale)
    output = Path(options.output)
    runs = plan(settings, options.seeds, output)
    command = "hvd-imagenet " + " ".join(sys.argv[1:])
    write_plan(runs, scale, options.preset, command, output)
    run_all(runs, scale, Path(options.data))
    written = report.write_report(runs, settings, scale, options.preset, command, output)
    print(f"study: wrote {', '.join(str(path) for path in written)}")


COMMAND = Command(StudyOptions, run, description=(
    "Runs a grid of `train` jobs under horovodrun (one after another; give the same command again to resume) and "
    "writes OUTPUT/study.md with the top-1 val error of each row, mean ± std over seeds, and PNG plots. Defaults: "
    "scikit-learn's digits (make-dataset --kind digits), cifar_resnet14, small kn = 2 ranks x n=4 = 8, large kn = "
    "32x that by virtual workers; see hvd_imagenet/study/grid.py and the README."))
