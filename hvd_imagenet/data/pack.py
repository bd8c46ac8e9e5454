"""`hvd-imagenet pack`: a folder tree into packed shards (packed.py says what they hold and why).

The images are copied byte for byte, so that a run from the shards decodes exactly what a run from the tree
does. Within the shards the training images follow one fixed shuffle (PACK_ORDER_SEED), so that tools that
stream a tar in order (webdataset, DALI's readers.webdataset) do not read one class at a time; our loaders read
by index and never depend on that order. Shards are deterministic: packing the same tree again gives the same
bytes (the tar headers carry no time or owner), hence the same sha256 sums.
"""

from __future__ import annotations

import hashlib
import json
import sys
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..cpus import available_cpus
from ..errors import UserError
from ..flags import Command, check, opt
from ..progress import WorkProgress
from .drawing import refuse_nonempty
from .layout import check_layout, list_samples
from .packed import FORMAT, INDEX, SPLITS, TSV_HEADER, VERSION, sha256_of

PACK_ORDER_SEED = 0
BLOCK = tarfile.BLOCKSIZE  # 512


@dataclass(frozen=True)
class Member:
    """One image to pack: its place in ImageFolder's order, its path, label and size."""

    index: int
    path: Path
    relative: str  # the path in the tree: the tar member's name, the TSV's path, a --file-list line
    label: int
    size: int


def tar_header(name: str, size: int) -> bytes:
    """A regular file's header, with no time, owner or mode that depends on the machine (pax for long names)."""
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, 0o444, 0
    return info.tobuf(format=tarfile.PAX_FORMAT)


def padded(size: int) -> int:
    return -(-size // BLOCK) * BLOCK


def footprint(member: Member) -> int:
    """Bytes the image and its .cls take in a shard (headers of names up to 100 characters)."""
    return BLOCK + padded(member.size) + 2 * BLOCK


def plan_shards(members: list[Member], order: list[int], shard_bytes: int) -> list[list[Member]]:
    """Members in `order`, cut into shards of at most shard_bytes each (or one image, if it is larger)."""
    shards, current, size = [], [], 0
    for position in order:
        member = members[position]
        if current and size + footprint(member) > shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(member)
        size += footprint(member)
    if current:
        shards.append(current)
    return shards


def write_shard(path: Path, members: list[Member], progress: WorkProgress) -> tuple[dict, list[tuple]]:
    """One tar shard (written to a temporary name, renamed when complete). Returns its file record (size,
    sha256) and, per image, (index, offset, size) of its bytes in the shard."""
    digest, offset, entries = hashlib.sha256(), 0, []
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "wb") as out:

        def write(chunk: bytes) -> None:
            nonlocal offset
            out.write(chunk)
            digest.update(chunk)
            offset += len(chunk)

        for member in members:
            data = member.path.read_bytes()
            if len(data) != member.size:
                raise UserError(f"{member.path} changed while packing ({member.size} bytes, now {len(data)})")
            write(tar_header(member.relative, len(data)))
            entries.append((member.index, offset, len(data)))
            write(data + bytes(padded(len(data)) - len(data)))
            label = str(member.label).encode()
            write(tar_header(str(Path(member.relative).with_suffix(".cls")), len(label)))
            write(label + bytes(padded(len(label)) - len(label)))
            progress.update(1, len(data))
        write(bytes(2 * BLOCK))  # the end-of-archive marker
    temporary.rename(path)
    return {"bytes": offset, "sha256": digest.hexdigest()}, entries


def list_members(data: Path, split: str, classes: list[str], pool: ThreadPoolExecutor) -> list[Member]:
    samples = list_samples(data, split, classes, None)
    sizes = pool.map(lambda item: Path(item[0]).stat().st_size, samples)  # a stat each, in parallel
    members = []
    for index, ((path, label), size) in enumerate(zip(samples, sizes)):
        relative = str(Path(path).relative_to(data))
        if "\t" in relative or "\n" in relative:
            raise UserError(f"{path}: a tab or a newline in a file name; rename it before packing")
        members.append(Member(index, Path(path), relative, label, size))
    return members


def pack_split(
    data: Path, output: Path, split: str, classes: list[str], shard_bytes: int, pool: ThreadPoolExecutor
) -> dict:
    """Write one split's shards and its TSV index; returns the split's entry of index.json plus its files."""
    members = list_members(data, split, classes, pool)
    order = (
        np.random.default_rng(PACK_ORDER_SEED).permutation(len(members)).tolist()
        if split == "train"
        else list(range(len(members)))
    )
    shards = plan_shards(members, order, shard_bytes)
    names = [f"{split}-{number:06d}.tar" for number in range(len(shards))]
    rows: list[tuple | None] = [None] * len(members)
    files = {}
    with WorkProgress(f"pack {split}", len(members), "images") as progress:
        written = pool.map(lambda job: write_shard(output / job[0], job[1], progress), zip(names, shards))
        for number, (name, (record, entries)) in enumerate(zip(names, written)):
            files[name] = record
            for index, offset, size in entries:
                rows[index] = (number, offset, size)
    tsv = output / f"{split}.tsv"
    with open(tsv, "w") as out:
        out.write(TSV_HEADER)
        for member, (shard, offset, size) in zip(members, rows):
            out.write(f"{shard}\t{offset}\t{size}\t{member.label}\t{member.relative}\n")
    files[tsv.name] = {"bytes": tsv.stat().st_size, "sha256": sha256_of(tsv)}
    return {"index": tsv.name, "images": len(members), "shards": names, "files": files}


@dataclass(frozen=True)
class PackOptions:
    data: str = opt("the folder tree: DIR/train/<class>/*, DIR/val/<class>/*")
    output: str = opt("the shards' directory (new or empty): index.json, train.tsv, val.tsv, *.tar")
    shard_size_mb: float = opt("the largest shard, MiB (the last shard of a split is smaller)", 256.0, above=0)
    workers: int = opt("threads that read images and write shards (0: the CPUs this process may use)", 0, min=0)

    def __post_init__(self):
        check(self)


def run(options: PackOptions) -> None:
    data, output = Path(options.data), Path(options.output)
    classes = check_layout(data)
    refuse_nonempty(output)
    output.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    index = {
        "format": FORMAT,
        "version": VERSION,
        "classes": classes,
        "splits": {},
        "files": {},
        "packed_from": str(data.resolve()),
        "made_by": "hvd-imagenet " + " ".join(sys.argv[1:]),
    }
    with ThreadPoolExecutor(options.workers or available_cpus(), thread_name_prefix="pack") as pool:
        for split in SPLITS:
            entry = pack_split(data, output, split, classes, int(options.shard_size_mb * 2**20), pool)
            index["files"].update(entry.pop("files"))
            index["splits"][split] = entry
    (output / INDEX).write_text(json.dumps(index, indent=1) + "\n")  # last: its presence marks a complete pack
    total = sum(meta["bytes"] for meta in index["files"].values())
    seconds = time.perf_counter() - start
    images = sum(entry["images"] for entry in index["splits"].values())
    shards = sum(len(entry["shards"]) for entry in index["splits"].values())
    print(
        f"pack: {images} images of {len(classes)} classes into {shards} shards, {total / 1e9:.2f} GB, in "
        f"{seconds:.1f} s ({total / 1e6 / seconds:.1f} MB/s); train with --data {output}"
    )


COMMAND = Command(
    PackOptions,
    run,
    description="Train from the shards with `train --data SHARDS`; "
    "the shards are read by offset, with the same global shuffle.",
)
