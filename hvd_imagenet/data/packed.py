"""Packed shards: a data set as a few large tar files plus an index, read by offset (`hvd-imagenet pack` writes
them; every loader reads them).

At 256 GPUs an epoch of the folder tree is 1.28M opens of small files on a shared file system, more than
Lustre's or NFS's metadata servers serve at training speed. Here a rank opens each shard file once per process
and reads an image with one pread at the offset the index gives, so the exact global shuffle of shards.py
still holds: sample i is the i-th image of the folder tree's ImageFolder order, whichever shard holds it.

SHARDS/ holds:
    index.json            format, classes, each split's index and shards, and every file's size and sha256
    train.tsv, val.tsv    one line per image in ImageFolder's order: shard  offset  size  label  path
    train-000000.tar ...  POSIX tars in webdataset's layout: per image its file, bytes unchanged, named by its
                          path in the folder tree (train/<class>/<name>.JPEG), then <name>.cls (the label as
                          text). `tar tf` lists them; webdataset's and DALI's readers read them in sequence.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

import numpy as np

from ..errors import UserError

INDEX = "index.json"
FORMAT = "hvd-imagenet packed shards"
VERSION = 1
SPLITS = ("train", "val")
TSV_HEADER = "shard\toffset\tsize\tlabel\tpath\n"


def sha256_of(path: Path) -> str:
    """The sha256 of a file, as index.json holds it for each file of a pack."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def is_packed(data: Path) -> bool:
    return (data / INDEX).is_file()


def read_index(root: Path, flag: str = "--data") -> dict:
    """index.json, checked: the format, and every file it lists present with its size (a stat each, no read;
    `hvd-imagenet stage` checks the sha256 sums)."""
    try:
        index = json.loads((root / INDEX).read_text())
    except (OSError, ValueError) as error:
        raise UserError(f"{flag} {root}: cannot read {INDEX} ({error})") from None
    if index.get("format") != FORMAT or index.get("version") != VERSION:
        raise UserError(f"{flag} {root}: {INDEX} is not a version-{VERSION} index of `hvd-imagenet pack`")
    for name, meta in index["files"].items():
        path = root / name
        size = path.stat().st_size if path.is_file() else None
        if size != meta["bytes"]:
            found = "missing" if size is None else f"{size} bytes"
            raise UserError(
                f"{flag} {root}: {name} is {found}, the index says {meta['bytes']} bytes: an incomplete "
                "copy; copy or stage it again (hvd-imagenet stage), or pack again"
            )
    return index


class ShardFiles:
    """A split's shard files, each opened on its first read in a process and kept open: a pass over the data
    opens no file. Pickled (to DataLoader workers) without its descriptors."""

    def __init__(self, paths: list[str]):
        self.paths = paths
        self._fds: dict[int, int] = {}
        self._lock = threading.Lock()

    def __getstate__(self):
        return {"paths": self.paths}

    def __setstate__(self, state):
        self.__init__(state["paths"])

    def __del__(self):  # when the loaders go (an elastic job rebuilds them at each resize)
        for fd in self._fds.values():
            os.close(fd)

    def pread(self, shard: int, offset: int, size: int) -> bytes:
        fd = self._fds.get(shard)
        if fd is None:
            with self._lock:
                fd = self._fds.get(shard)
                if fd is None:
                    fd = self._fds[shard] = os.open(self.paths[shard], os.O_RDONLY)
        data = os.pread(fd, size, offset)  # thread-safe: no shared file position
        if len(data) != size:
            raise UserError(
                f"{self.paths[shard]} ends at byte {offset + len(data)}, the index has an image up to "
                f"{offset + size}: a truncated shard; copy or pack it again"
            )
        return data


class PackedSamples:
    """The images of one split in packed shards (the interface of samples.FileSamples)."""

    def __init__(
        self,
        files: ShardFiles,
        shard: np.ndarray,
        offset: np.ndarray,
        size: np.ndarray,
        labels: np.ndarray,
        names: list[str],
    ):
        self.files, self.shard, self.offset, self.size = files, shard, offset, size
        self._labels, self.names = labels, names

    def __len__(self) -> int:
        return len(self.names)

    def label(self, index: int) -> int:
        return int(self._labels[index])

    def name(self, index: int) -> str:
        """How a message names the image: its path in the folder tree and the shard that holds it."""
        return f"{self.names[index]} in {self.files.paths[self.shard[index]]}"

    def relative_path(self, index: int) -> str:
        """The image's path in the folder tree it was packed from, as a --file-list holds it."""
        return self.names[index]

    def read(self, index: int) -> bytes:
        return self.files.pread(int(self.shard[index]), int(self.offset[index]), int(self.size[index]))

    def subset(self, indices) -> PackedSamples:
        """The images at `indices`, sharing this split's open shard files."""
        picked = np.asarray(indices, dtype=np.int64)
        return PackedSamples(
            self.files,
            self.shard[picked],
            self.offset[picked],
            self.size[picked],
            self._labels[picked],
            [self.names[i] for i in picked.tolist()],
        )


def read_packed(root: Path, index: dict, split: str, allowed: frozenset[str] | None) -> PackedSamples:
    """A split's images from its TSV index, restricted to the paths in `allowed` when a file list is given."""
    meta = index["splits"][split]
    columns: tuple[list, ...] = ([], [], [], [], [])  # shard, offset, size, label, path
    with open(root / meta["index"]) as tsv:
        if tsv.readline() != TSV_HEADER:
            raise UserError(f"--data {root}: {meta['index']} does not start with the header of `hvd-imagenet pack`")
        for line in tsv:  # ImageNet's train.tsv: 1.28M lines, 80 MB: ~1.3 s here, 157 MB held
            row = line.rstrip("\n").split("\t", 4)
            if allowed is None or row[4] in allowed:
                for column, value in zip(columns, row):
                    column.append(value)
    if not columns[4]:
        raise UserError(f"--data {root}: no {split} images" + (" in --file-list" if allowed is not None else ""))
    shard, offset, size, labels = (np.array(column, dtype=np.int64) for column in columns[:4])
    files = ShardFiles([str(root / name) for name in meta["shards"]])
    return PackedSamples(files, shard.astype(np.int32), offset, size, labels, columns[4])
