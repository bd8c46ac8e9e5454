"""DALI's train batches before and after issue 28, side by side in one process: `data/dali.py` as of a
commit (a pipeline built per pass) against the working tree's (one pipeline per run, reset per pass).

    .venv/bin/python benchmarks/scripts/dali_before_after.py --before 5e69fae --data DIR [--json]

Each repeat builds both loaders in turn (interleaved, so a slow moment of the machine hits both), reads one
untimed epoch, then times --epochs epochs of training batches; the medians over --repeats are printed. The
same measurement as `hvd-imagenet bench-loader`, with the old module loaded from git for the comparison.
"""

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from hvd_imagenet.config import TrainConfig
from hvd_imagenet.context import DistContext
from hvd_imagenet.data import dali
from hvd_imagenet.data.loaders import read_samples


def module_at(commit: str):
    """hvd_imagenet/data/dali.py as of `commit`, imported as a module of the package (its relative imports)."""
    source = subprocess.run(
        ["git", "show", f"{commit}:hvd_imagenet/data/dali.py"], capture_output=True, text=True, check=True
    ).stdout
    # Loaders, Samples and default_threads moved from data/__init__.py to data/loaders.py (issue 27).
    source = source.replace("from . import Loaders", "from .loaders import Loaders")
    path = Path(tempfile.mkdtemp()) / "dali_before.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("hvd_imagenet.data.dali_before", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def images_per_second(module, config, ctx, samples, epochs: int) -> float:
    loaders = module.dali_loaders(config, ctx, samples)
    loaders.set_epoch(0)
    for _ in loaders.train:  # untimed: start-up
        pass
    images, started = 0, time.perf_counter()
    for epoch in range(1, epochs + 1):
        loaders.set_epoch(epoch)
        for batch, _ in loaders.train:
            images += batch.shape[0]
    return images / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    ctx = DistContext(rank=0, local_rank=0, size=1, local_size=1, device=torch.device("cpu"))
    config = TrainConfig(
        data=args.data,
        output="(writes nothing)",
        loader="dali",
        batch_size=args.batch_size,
        image_size=args.image_size,
        val_resize=args.image_size,
        dali_threads=args.threads,
    )
    samples = read_samples(Path(args.data), "")
    modules = {f"before ({args.before})": module_at(args.before), "after (working tree)": dali}
    runs = {name: [] for name in modules}
    for _ in range(args.repeats):
        for name, module in modules.items():
            runs[name].append(images_per_second(module, config, ctx, samples, args.epochs))
    medians = {name: statistics.median(values) for name, values in runs.items()}
    report = {
        "command": " ".join(sys.argv),
        "data": args.data,
        "train_images": len(samples.train),
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "epochs": args.epochs,
        "repeats": args.repeats,
        "images_per_sec": medians,
        "runs": runs,
        "after_over_before": medians["after (working tree)"] / medians[f"before ({args.before})"],
    }
    if args.json:
        print(json.dumps(report, indent=1))
        return
    for name, value in medians.items():
        print(f"{name:<24} {value:>8.1f} img/s  runs {', '.join(f'{v:.0f}' for v in runs[name])}")
    print(
        f"after / before: {report['after_over_before']:.2f}x ({len(samples.train)} train images, "
        f"{args.image_size} px, batch {args.batch_size}, {args.threads} threads, median of {args.repeats} x "
        f"{args.epochs} epochs)"
    )


if __name__ == "__main__":
    main()
