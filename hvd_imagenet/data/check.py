"""`hvd-imagenet check-data`: read every image of a data set once, before a long job does.

Real ImageNet is not clean: its training set holds grayscale JPEGs, CMYK JPEGs and a PNG saved as .JPEG. Both
loaders decode those to RGB (they are reported, not excluded). A truncated or corrupt file would stop a job
mid-epoch; check-data lists them and writes a file list without them for `train --file-list`.
"""
from __future__ import annotations

import json
import os
import sys
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from ..cpus import available_cpus
from ..flags import Command, check, opt
from .layout import check_layout, list_samples

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


def inspect_image(path: str) -> tuple[str | None, str | None, str | None]:
    """(format, mode, problem) of one file, decoding all of it (a truncated file fails only at its end).
    A JPEG decodes at 1/8 scale (libjpeg's DCT scaling): every byte is still read, at a fraction of the cost."""
    try:
        with Image.open(path) as image:
            image_format, mode = image.format, image.mode
            if image_format == "JPEG":
                image.draft(mode, (image.width // 8, image.height // 8))
            image.load()
            return image_format, mode, None
    except (OSError, SyntaxError, ValueError) as error:  # PIL's errors for corrupt data
        return None, None, str(error) or type(error).__name__


def image_problem(path: str) -> str | None:
    return inspect_image(path)[2]


def _inspect(item: tuple[str, str]) -> ImageReport:
    absolute, relative = item
    return ImageReport(relative, *inspect_image(absolute))


def scan(data: Path, workers: int = 0, progress: bool = True) -> list[ImageReport]:
    """Every image file of train/ and val/ (the files the loaders would read), inspected in parallel."""
    classes = check_layout(data)
    paths = [path for split in ("train", "val") for path, _ in list_samples(data, split, classes, None)]
    items = [(path, os.path.relpath(path, data)) for path in paths]
    with ProcessPoolExecutor(max_workers=workers or available_cpus()) as pool:
        reports = list(tqdm(pool.map(_inspect, items, chunksize=64), total=len(items), unit="file",
                            desc="check-data", disable=None if progress else True))  # None: off when not a TTY
    return reports


def summary(reports: list[ImageReport]) -> str:
    """Counts per split and class (smallest and largest classes), then every odd and every unreadable file."""
    lines = []
    for split, per_class in per_class_counts(reports).items():
        counts = sorted(per_class.values())
        lines.append(f"{split}: {sum(counts)} images in {len(counts)} classes "
                     f"(per class: min {counts[0]}, median {counts[len(counts) // 2]}, max {counts[-1]})")
        smallest = sorted(per_class.items(), key=lambda item: (item[1], item[0]))[:3]
        lines.append(f"  smallest classes: {', '.join(f'{name} {count}' for name, count in smallest)}")
    odd = [r for r in reports if r.problem is None and r.oddity]
    bad = [r for r in reports if r.problem]
    lines.append(f"odd but readable (decoded to RGB by both loaders): {len(odd)}")
    lines += [f"  {r.path}: {r.oddity}" for r in odd]
    lines.append(f"unreadable: {len(bad)}")
    lines += [f"  {r.path}: {r.problem}" for r in bad]
    return "\n".join(lines)


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
    data: str = opt("DIR/train/<class>/*, DIR/val/<class>/*")
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
        print(json.dumps({
            "data": str(data), "images": len(reports), "per_class": per_class_counts(reports),
            "odd": {r.path: r.oddity for r in reports if r.problem is None and r.oddity},
            "unreadable": {r.path: r.problem for r in unreadable},
        }, indent=1))
    else:
        print(summary(reports))
    if options.write_file_list:
        count = write_file_list(reports, Path(options.write_file_list))
        print(f"check-data: wrote {count} readable files to {options.write_file_list}; "
              f"train with --file-list {options.write_file_list}", file=sys.stderr)
        return 0
    if unreadable:
        print(f"check-data: {len(unreadable)} unreadable file(s); write a list without them with "
              "--write-file-list F and train with --file-list F", file=sys.stderr)
        return 1
    return 0


COMMAND = Command(CheckDataOptions, run, description="Exit status 1 when a file cannot be decoded (0 with "
                                                     "--write-file-list, whose list leaves such files out).")
