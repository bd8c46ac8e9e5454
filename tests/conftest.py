"""Shared fixtures and helpers: one generated data set per kind (tiny, odd files, packed, digits), the real CLI
alone or under horovodrun, `wait_for`; and the test tiers (markers unit, cli, horovod, slurm: one per test)."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from hvd_imagenet.config import TrainConfig
from hvd_imagenet.context import DistContext
from hvd_imagenet.data.loaders import build_loaders
from hvd_imagenet.data.make_dataset import make_dataset, make_digits
from hvd_imagenet.metrics import read_metrics

TIERS = ("unit", "cli", "horovod", "slurm")  # by what a test starts (docs/architecture.md, "Contributing")
BIN = Path(sys.executable).parent  # the venv's bin: hvd-imagenet, horovodrun

# Small enough for 2 ranks on 2 CPU cores: resnet18 at 32 px, 4 images per rank per micro-batch.
TINY_TRAIN = (
    "--arch resnet18 --image-size 32 --val-resize 36 --batch-size 4 --warmup-epochs 1 --lr-steps 1 --workers 1".split()
)


def cli_env() -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_cli(*args, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "hvd-imagenet"), *map(str, args)], capture_output=True, text=True, env=cli_env(), timeout=timeout
    )


def horovodrun(np: int, controller: str, *program) -> list[str]:
    """`horovodrun -np N -H localhost:N <controller> <program...>`: N ranks on this machine."""
    return [str(BIN / "horovodrun"), "-np", str(np), "-H", f"localhost:{np}", controller, *map(str, program)]


def run_horovod(*args, np=2, controller="--gloo", timeout=300, check=True) -> subprocess.CompletedProcess:
    """`horovodrun -np 2 -H localhost:2 <controller> hvd-imagenet train ...`, as a user runs it."""
    command = horovodrun(np, controller, "hvd-imagenet", "train", *args)
    result = subprocess.run(command, capture_output=True, text=True, env=cli_env(), timeout=timeout)
    if check:
        assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result


def rank(r: int, size: int) -> DistContext:
    """Rank r of `size`, on the CPU: building its loaders needs no other rank."""
    return DistContext(rank=r, local_rank=0, size=size, local_size=1, device=torch.device("cpu"))


def loaders(data, loader, ctx, **overrides):
    """One rank's loaders at test scale: 32 px crops, batch 2, one worker or thread."""
    options = dict(
        data=str(data),
        output="unused",
        loader=loader,
        batch_size=2,
        image_size=32,
        val_resize=36,
        workers=1,
        dali_threads=1,
    )
    return build_loaders(TrainConfig(**{**options, **overrides}), ctx)


def batches(pipes, epoch=None, images_done=0) -> list:
    """One rank's batches: of `epoch`'s training pass from images_done on (set_epoch first), or of val."""
    if epoch is not None:
        pipes.set_epoch(epoch, images_done)
    return list(pipes.train if epoch is not None else pipes.val)


def assert_same_batches(a, b) -> None:
    assert len(a) == len(b) > 0
    for (images_a, labels_a), (images_b, labels_b) in zip(a, b):
        assert torch.equal(labels_a, labels_b)
        assert torch.equal(images_a, images_b)


def checkpoint_state(**changes) -> dict:
    """What checkpoint.save takes, at its smallest (epoch 1 after 6 steps, an empty model), with `changes`."""
    state = {"model": {}, "optimizer": {}, "epoch": 1, "step": 6, "step_in_epoch": 0, "images_done": 0}
    return {**state, "partial": None, "config": {}, **changes}


def shared_memory_files() -> set[Path]:
    """The memory loader's decoded data sets in /dev/shm (data/memory.py)."""
    return set(Path("/dev/shm").glob("hvd-imagenet-*"))


def poll(condition, timeout: float, interval: float = 0.2):
    """condition()'s first true value within `timeout` seconds, checked every `interval`; None if none came."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value or time.monotonic() >= deadline:
            return value or None
        time.sleep(interval)


def wait_for(condition, timeout: float, what: str, interval: float = 0.2, detail=lambda: ""):
    """poll(condition), failing the test after `timeout` seconds with what it waited for and detail() (a log's
    tail, a job's state)."""
    value = poll(condition, timeout, interval)
    if value is None:
        raise AssertionError(f"timed out after {timeout:g} s waiting for {what}\n{detail()}".rstrip())
    return value


@pytest.fixture(scope="session")
def digits(tmp_path_factory) -> Path:
    """`make-dataset --kind digits`: scikit-learn's 1,797 digits, 1,438 train / 359 val, 10 classes."""
    root = tmp_path_factory.mktemp("digits") / "data"
    make_digits(root)
    return root


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """4 classes x 12 train / 5 val JPEGs: 48 train (24 per rank), 20 val (10 per rank)."""
    root = tmp_path_factory.mktemp("tiny") / "data"
    make_dataset(root, classes=4, train_per_class=12, val_per_class=5, seed=1, workers=2)
    return root


@pytest.fixture(scope="session")
def odd_data(tmp_path_factory) -> Path:
    """What real ImageNet holds besides RGB JPEGs: grayscale and CMYK JPEGs, a PNG named .JPEG."""
    root = tmp_path_factory.mktemp("odd") / "data"
    make_dataset(root, classes=2, train_per_class=3, val_per_class=2, seed=4, workers=2)
    for split in ("train", "val"):
        first, second = sorted((root / split).iterdir())
        with Image.open(sorted(first.iterdir())[0]) as image:
            rgb = image.copy()
        rgb.convert("L").save(first / "odd_gray.JPEG")
        rgb.convert("CMYK").save(first / "odd_cmyk.JPEG")
        rgb.save(second / "odd_png.JPEG", format="PNG")
    return root


def add_broken(data, how: str):
    """A copy of `data` with one broken train file: truncated JPEG, or bytes that are no image at all."""
    folder = sorted((data / "train").iterdir())[0]
    source = sorted(folder.iterdir())[0].read_bytes()
    path = folder / f"broken_{how}.JPEG"
    path.write_bytes(source[: len(source) // 2] if how == "truncated" else b"this is not an image" * 50)
    return path


def pack(data: Path, output: Path, shard_size_mb: float = 0.25) -> Path:
    """`hvd-imagenet pack`, small shards so that even the tiny sets span several."""
    result = run_cli("pack", "--data", data, "--output", output, "--shard-size-mb", shard_size_mb, "--workers", 2)
    assert result.returncode == 0, result.stderr
    return output


@pytest.fixture(scope="session")
def tiny_shards(tiny_data, tmp_path_factory) -> Path:
    """tiny_data packed."""
    return pack(tiny_data, tmp_path_factory.mktemp("tiny-shards") / "shards")


def assert_epoch_2_equal(whole: Path, split: Path) -> None:
    """A run resumed after epoch 1 (`split`) ends epoch 2 as the uninterrupted run (`whole`): the same metrics
    and the same weights, bit for bit."""
    a, b = read_metrics(whole), read_metrics(split)
    assert len(a) == len(b) == 2
    for key in ("lr", "train_loss", "train_top1", "val_loss", "val_top1", "val_top5", "weights_digests"):
        assert a[1][key] == b[1][key], key
    wa = torch.load(whole / "checkpoints" / "epoch-0002.pt", weights_only=True)["model"]
    wb = torch.load(split / "checkpoints" / "epoch-0002.pt", weights_only=True)["model"]
    assert all(torch.equal(wa[name], wb[name]) for name in wa)


def pytest_collection_modifyitems(config, items):
    """Every test has exactly one tier mark (its own, or its module's pytestmark: not both, since `-m unit` selects
    a test that carries the mark at any level)."""
    wrong = {}
    for item in items:
        tiers = sorted({mark.name for mark in item.iter_markers() if mark.name in TIERS})
        if len(tiers) != 1:
            wrong[item.nodeid] = ", ".join(tiers) or "none"
    if wrong:
        listed = "\n".join(f"{nodeid}: {tiers}" for nodeid, tiers in wrong.items())
        raise pytest.UsageError(f"each test needs exactly one tier mark of {', '.join(TIERS)}:\n{listed}")
