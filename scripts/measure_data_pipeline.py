"""Time each step from the official archives to a staged copy on a rehearsal set, and extrapolate to ImageNet.

    .venv/bin/python scripts/measure_data_pipeline.py WORKDIR [--classes 20 --train-per-class 150
        --val-per-class 25 --workers 2] > benchmarks/results/data-pipeline-cpu-2core.json

Steps, each a real CLI run timed from outside: make-dataset --kind archives (not timed for the table), the md5
check of prepare-imagenet (it then refuses these archives: they are not the published ones), prepare-imagenet
--no-verify, pack, stage. Each step's start-up (the median of 3 `--help` runs of its command: the same imports)
is subtracted for its rates. Reports each step's seconds, images/s, MB/s and the bytes it leaves on disk, and
the time the same rates would take for ILSVRC2012 (1,281,167 + 50,000 images, 147.9 + 6.7 GB of archives): the
larger of the image-rate and the byte-rate estimate, since the rehearsal's JPEGs are smaller than ImageNet's.
The archives were just written, so they are read from the page cache: rates are this machine's CPU and local
disk, not a download's or a shared file system's.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent
IMAGENET = {"images": 1_281_167 + 50_000, "archive_bytes": 147_897_477_120 + 6_744_924_160}


def du(path: Path) -> int:
    return int(subprocess.run(["du", "-sb", str(path)], capture_output=True, text=True, check=True).stdout.split()[0])


def startup(command: str) -> float:
    """Seconds the CLI takes to start `command` and exit (its imports): the median of 3 `--help` runs."""
    return statistics.median(timed(command, "--help") for _ in range(3))


def timed(*args: str, expect: int = 0) -> float:
    start = time.perf_counter()
    result = subprocess.run([str(BIN / "hvd-imagenet"), *args], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != expect:
        sys.exit(f"{' '.join(args)}: exit {result.returncode}\n{result.stderr}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--classes", type=int, default=20)
    parser.add_argument("--train-per-class", type=int, default=150)
    parser.add_argument("--val-per-class", type=int, default=25)
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    options = parser.parse_args()
    work, workers = options.workdir, str(options.workers)
    downloads, tree, shards, staged = (work / name for name in ("downloads", "imagenet", "shards", "staged"))
    timed(
        "make-dataset",
        "--kind",
        "archives",
        "--output",
        str(downloads),
        "--classes",
        str(options.classes),
        "--train-per-class",
        str(options.train_per_class),
        "--val-per-class",
        str(options.val_per_class),
    )
    archives = [
        downloads / "ILSVRC2012_img_train.tar",
        downloads / "ILSVRC2012_img_val.tar",
        downloads / "ILSVRC2012_devkit_t12.tar.gz",
    ]
    sources = ["--train-tar", str(archives[0]), "--val-tar", str(archives[1]), "--devkit", str(archives[2])]
    images = options.classes * (options.train_per_class + options.val_per_class)
    archive_bytes = sum(path.stat().st_size for path in archives)

    seconds = {  # step: (its command, seconds)
        "md5 check (prepare-imagenet's --verify)": (
            "prepare-imagenet",
            timed("prepare-imagenet", *sources, "--output", str(work / "verify"), expect=2),
        ),
        "prepare-imagenet --no-verify": (
            "prepare-imagenet",
            timed("prepare-imagenet", *sources, "--output", str(tree), "--no-verify", "--workers", workers),
        ),
        "pack": ("pack", timed("pack", "--data", str(tree), "--output", str(shards), "--workers", workers)),
        "stage": ("stage", timed("stage", "--shards", str(shards), "--to", str(staged))),
    }
    leaves = {"prepare-imagenet --no-verify": du(tree), "pack": du(shards), "stage": du(staged)}
    reads = {"pack": du(tree), "stage": du(shards)}
    rows = []
    for step, (command, wall) in seconds.items():
        start = startup(command)
        work, read = wall - start, reads.get(step, archive_bytes)
        scale = max(IMAGENET["images"] / images, IMAGENET["archive_bytes"] / archive_bytes)
        rows.append(
            {
                "step": step,
                "seconds": round(wall, 2),
                "startup_seconds": round(start, 2),
                "images_per_sec": round(images / work, 1),
                "read_mb_per_sec": round(read / 1e6 / work, 1),
                "bytes_read": read,
                "bytes_left_on_disk": leaves.get(step, 0),
                "imagenet_estimate_hours": round((start + work * scale) / 3600, 2),
                "imagenet_disk_estimate_gb": round(leaves.get(step, 0) * scale / 1e9, 1),
            }
        )
    print(
        json.dumps(
            {
                "measurement": "data pipeline, rehearsal archives (make-dataset --kind archives)",
                "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
                "machine": f"{platform.machine()}, {os.cpu_count()} cores, no GPU; archives in the page cache",
                "images": images,
                "archive_bytes": archive_bytes,
                "mean_image_kb": round(archive_bytes / images / 1e3, 1),
                "imagenet": IMAGENET,
                "imagenet_mean_image_kb": round(IMAGENET["archive_bytes"] / IMAGENET["images"] / 1e3, 1),
                "extrapolation": "ImageNet time = start-up + (step time - start-up) x the larger of (ImageNet images / "
                "images, ImageNet archive bytes / archive bytes); disk likewise",
                "steps": rows,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
