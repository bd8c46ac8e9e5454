"""Shared fixtures: a tiny generated data set and helpers that run the real CLI, alone or under horovodrun."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hvd_imagenet.data.make_dataset import make_dataset

BIN = Path(sys.executable).parent  # the venv's bin: hvd-imagenet, horovodrun

# Small enough for 2 ranks on 2 CPU cores: resnet18 at 32 px, 4 images per rank per micro-batch.
TINY_TRAIN = ["--arch", "resnet18", "--image-size", "32", "--val-resize", "36", "--batch-size", "4",
              "--warmup-epochs", "1", "--lr-steps", "1", "--workers", "1"]


def cli_env() -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_cli(*args, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "hvd-imagenet"), *map(str, args)], capture_output=True, text=True,
                          env=cli_env(), timeout=timeout)


def run_horovod(*args, np=2, controller="--gloo", timeout=300, check=True) -> subprocess.CompletedProcess:
    """`horovodrun -np 2 -H localhost:2 <controller> hvd-imagenet train ...`, as a user runs it."""
    command = [str(BIN / "horovodrun"), "-np", str(np), "-H", f"localhost:{np}", controller,
               "hvd-imagenet", "train", *map(str, args)]
    result = subprocess.run(command, capture_output=True, text=True, env=cli_env(), timeout=timeout)
    if check:
        assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """4 classes x 12 train / 5 val JPEGs: 48 train (24 per rank), 20 val (10 per rank)."""
    root = tmp_path_factory.mktemp("tiny") / "data"
    make_dataset(root, classes=4, train_per_class=12, val_per_class=5, seed=1, workers=2)
    return root
