"""The ImageNet directory layout: DIR/{train,val}/<class>/<image>. Checked before any rank starts training."""

from __future__ import annotations

import os
from pathlib import Path

from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

from ..errors import UserError


def class_folders(split_dir: Path) -> list[str]:
    """Class names sorted as torchvision's ImageFolder sorts them, so label i means the same to every loader."""
    return sorted(entry.name for entry in split_dir.iterdir() if entry.is_dir())


def _has_image(folder: Path) -> bool:
    return any(entry.is_file() and entry.name.lower().endswith(IMG_EXTENSIONS) for entry in folder.iterdir())


def check_layout(data: Path) -> list[str]:
    """The class names of a well-formed data set, or a UserError that says what is wrong."""
    if not data.is_dir():
        raise UserError(f"--data {data}: no such directory")
    classes = {}
    for split in ("train", "val"):
        split_dir = data / split
        if not split_dir.is_dir():
            raise UserError(f"--data {data}: missing {split}/ (expected {data}/{split}/<class>/<image>)")
        classes[split] = class_folders(split_dir)
        if not classes[split]:
            raise UserError(f"--data {data}: {split}/ has no class folders")
        for name in classes[split]:
            if not _has_image(split_dir / name):
                raise UserError(f"--data {data}: class folder {split}/{name} has no images")
    if classes["train"] != classes["val"]:
        only_train = sorted(set(classes["train"]) - set(classes["val"]))
        only_val = sorted(set(classes["val"]) - set(classes["train"]))
        raise UserError(
            f"--data {data}: train/ and val/ have different classes "
            f"(only in train: {only_train[:5] or 'none'}; only in val: {only_val[:5] or 'none'})"
        )
    return classes["train"]


def read_file_list(path: Path) -> frozenset[str]:
    """A `check-data --write-file-list` file: one path relative to the data directory per line."""
    try:
        lines = path.read_text().splitlines()
    except OSError as error:
        raise UserError(f"--file-list {path}: {error.strerror}") from None
    return frozenset(line.strip() for line in lines if line.strip())


def list_samples(data: Path, split: str, classes: list[str], allowed: frozenset[str] | None) -> list[tuple[str, int]]:
    """(path, label) of every image of a split, in ImageFolder's order and with its labels (sorted class
    folders, sorted files), restricted to the paths in `allowed` when a file list is given."""
    if allowed is None:

        def is_valid(path: str) -> bool:
            return path.lower().endswith(IMG_EXTENSIONS)
    else:

        def is_valid(path: str) -> bool:
            return os.path.relpath(path, data) in allowed

    class_to_idx = {name: index for index, name in enumerate(classes)}
    samples = make_dataset(str(data / split), class_to_idx, is_valid_file=is_valid, allow_empty=True)
    if not samples:
        raise UserError(f"--data {data}: no {split} images" + (" in --file-list" if allowed is not None else ""))
    return samples
