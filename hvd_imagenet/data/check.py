"""`hvd-imagenet check-data`: read every image of a data set once, before a long job does.

Real ImageNet is not clean: its training set holds grayscale JPEGs, CMYK JPEGs and a PNG saved as .JPEG. Both
loaders decode those to RGB (they are reported, not excluded). A truncated or corrupt file would stop a job
mid-epoch; check-data lists them and writes a file list without them for `train --file-list`. It reads a
folder tree or packed shards (`hvd-imagenet pack`) alike; a file list holds the images' paths in the tree.
"""

from __future__ import annotations

import io
import json
import sys
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from ..cpus import available_cpus
from ..flags import Command, check, opt
from .loaders import Samples, check_data, read_samples

JPEG_SUFFIXES = (".jpg", ".jpeg")


@dataclass(frozen=True)
class ImageReport:
    path: str  # relative to the data directory, as a file list holds it
    format: str | None  # what the bytes are (PIL's format), whatever the name says
    mode: str | None  # PIL's mode: RGB, L (grayscale), CMYK, ...
    problem: str | None  # why it cannot be decoded; None when it can

    @property
    def oddity(self) -> str | None:
        """Readable but not a plain RGB JPEG: the loaders convert it to RGB; worth knowing."""
        notes = []
        if self.format and self.format != "JPEG" and self.path.lower().endswith(JPEG_SUFFIXES):
            notes.append(f"{self.format} data in a {Path(self.path).suffix} file")
        if self.mode and self.mode != "RGB":
            notes.append({"L": "grayscale", "CMYK": "CMYK"}.get(self.mode, f"mode {self.mode}"))
        return ", ".join(notes) or None


def inspect_image(source: str | bytes) -> tuple[str | None, str | None, str | None]:
    """(format, mode, problem) of one image (a file's path, or its bytes), decoding all of it (a truncated file
    fails only at its end). A JPEG decodes at 1/8 scale (libjpeg's DCT scaling): every byte is still read, at
    a fraction of the cost."""
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
            image_format, mode = image.format, image.mode
            if image_format == "JPEG":
                image.draft(mode, (image.width // 8, image.height // 8))
            image.load()
            return image_format, mode, None
    except (OSError, SyntaxError, ValueError) as error:  # PIL's errors for corrupt data
        return None, None, str(error) or type(error).__name__


def image_problem(source: str | bytes) -> str | None:
    return inspect_image(source)[2]


_samples: Samples | None = None  # in each scan worker process: the data set it reads from


def _load_samples(samples: Samples) -> None:
    global _samples
    _samples = samples


def _inspect(item: tuple[str, int]) -> ImageReport:
    split, index = item
    samples = getattr(_samples, split)
    return ImageReport(samples.relative_path(index), *inspect_image(samples.read(index)))


def scan(data: Path, workers: int = 0, progress: bool = True) -> list[ImageReport]:
    """Every image of train and val (what the loaders would read), inspected in parallel."""
    check_data(data)
    samples = read_samples(data, "")
    items = [(split, index) for split in ("train", "val") for index in range(len(getattr(samples, split)))]
    with ProcessPoolExecutor(
        max_workers=workers or available_cpus(), initializer=_load_samples, initargs=(samples,)
    ) as pool:
        reports = list(
            tqdm(
                pool.map(_inspect, items, chunksize=64),
                total=len(items),
                unit="file",
                desc="check-data",
                disable=None if progress else True,
            )
        )  # None: off when not a TTY
    return reports


def summary(reports: list[ImageReport], limit: int | None = None, more: str = "") -> str:
    """Counts per split and class (smallest and largest classes), then the odd and the unreadable files (every
    one, or the first `limit` of each kind and `more`, where to find the rest)."""
    lines = []
    for split, per_class in per_class_counts(reports).items():
        counts = sorted(per_class.values())
        lines.append(
            f"{split}: {sum(counts)} images in {len(counts)} classes "
            f"(per class: min {counts[0]}, median {counts[len(counts) // 2]}, max {counts[-1]})"
        )
        smallest = sorted(per_class.items(), key=lambda item: (item[1], item[0]))[:3]
        lines.append(f"  smallest classes: {', '.join(f'{name} {count}' for name, count in smallest)}")
    odd = [r for r in reports if r.problem is None and r.oddity]
    bad = [r for r in reports if r.problem]
    for title, found, what in (
        ("odd but readable (decoded to RGB by both loaders)", odd, "oddity"),
        ("unreadable", bad, "problem"),
    ):
        lines.append(f"{title}: {len(found)}")
        lines += [f"  {r.path}: {getattr(r, what)}" for r in found[:limit]]
        if limit is not None and len(found) > limit:
            lines.append(f"  ... {len(found) - limit} more: {more}")
    return "\n".join(lines)


def json_report(data: Path, reports: list[ImageReport]) -> dict:
    """What `check-data --json` prints."""
    return {
        "data": str(data),
        "images": len(reports),
        "per_class": per_class_counts(reports),
        "odd": {r.path: r.oddity for r in reports if r.problem is None and r.oddity},
        "unreadable": {r.path: r.problem for r in reports if r.problem},
    }


def per_class_counts(reports: list[ImageReport]) -> dict[str, dict[str, int]]:
    """{split: {class: images}}."""
    counts: dict[str, Counter] = {"train": Counter(), "val": Counter()}
    for report in reports:
        split, name = Path(report.path).parts[:2]
        counts[split][name] += 1
    return {split: dict(sorted(counter.items())) for split, counter in counts.items()}


def write_file_list(reports: list[ImageReport], path: Path) -> int:
    """The readable files, one relative path per line, for `train --file-list`."""
    good = [r.path for r in reports if r.problem is None]
    path.write_text("".join(f"{name}\n" for name in good))
    return len(good)


@dataclass(frozen=True)
class CheckDataOptions:
    data: str = opt("DIR/train/<class>/*, DIR/val/<class>/*, or packed shards (hvd-imagenet pack)")
    write_file_list: str = opt("write the readable files here, for train --file-list", "")
    workers: int = opt("processes (0: all cores)", 0, min=0)
    json: bool = opt("machine-readable report on stdout", False)

    def __post_init__(self):
        check(self)


def run(options: CheckDataOptions) -> int:
    data = Path(options.data)
    reports = scan(data, options.workers, progress=not options.json)
    unreadable = [r for r in reports if r.problem]
    if options.json:
        print(json.dumps(json_report(data, reports), indent=1))
    else:
        print(summary(reports))
    if options.write_file_list:
        count = write_file_list(reports, Path(options.write_file_list))
        print(
            f"check-data: wrote {count} readable files to {options.write_file_list}; "
            f"train with --file-list {options.write_file_list}",
            file=sys.stderr,
        )
        return 0
    if unreadable:
        print(
            f"check-data: {len(unreadable)} unreadable file(s); write a list without them with "
            "--write-file-list F and train with --file-list F",
            file=sys.stderr,
        )
        return 1
    return 0


COMMAND = Command(
    CheckDataOptions,
    run,
    description="Exit status 1 when a file cannot be decoded (0 with "
    "--write-file-list, whose list leaves such files out).",
)
