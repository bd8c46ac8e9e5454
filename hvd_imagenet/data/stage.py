"""`hvd-imagenet stage`: copy packed shards to a node-local directory (local NVMe, /dev/shm) before training,
so that the job's reads stay off the shared file system (slurm/train_resnet50.sbatch runs it once per node
when STAGE_DIR is set; MLPerf's ImageNet entries read node-local copies too).

An identical copy is left alone: the copy's index.json (which holds every file's size and sha256) equals the
source's and every file has its size. A copy is written file by file, each to a temporary name, hashed as it
is written, checked against the index's sha256 and then renamed; index.json comes last, so an interrupted
staging is never taken for a complete one, and the next one keeps the files that were already right.

`%n` in --to (and in `train --data`) is replaced by the node's name, as slurm.conf does it: for a directory
on a file system that several nodes share (or emulated nodes on one machine, as in the tests).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from ..flags import Command, check, opt
from ..progress import WorkProgress
from .packed import INDEX, read_index, sha256_of

COPY_THREADS = 4  # parallel copies: a parallel file system serves several streams faster than one
CHUNK = 8 << 20


def node_path(path: str) -> str:
    """`path` with %n replaced by this node's name (SLURM's, else the host's)."""
    return path.replace("%n", os.environ.get("SLURMD_NODENAME") or socket.gethostname().split(".")[0])


def copy_checked(source: Path, target: Path, sha256: str, progress: WorkProgress) -> None:
    """source to target through a temporary file, hashed on the way; a sum other than the index's is an error."""
    temporary = target.with_name(f"{target.name}.tmp.{os.getpid()}")
    digest = hashlib.sha256()
    with open(source, "rb") as src, open(temporary, "wb") as dst:
        while chunk := src.read(CHUNK):
            dst.write(chunk)
            digest.update(chunk)
            progress.update(0, len(chunk))
    if digest.hexdigest() != sha256:
        temporary.unlink()
        raise UserError(
            f"{source}: sha256 {digest.hexdigest()} is not the index's {sha256}: the source is corrupt (pack it again)"
        )
    temporary.rename(target)
    progress.update(1)


def identical(source: Path, target: Path, index: dict) -> bool:
    """Whether target holds a complete copy of source: the same index.json, every file of its size."""
    copied = target / INDEX
    if not copied.is_file() or copied.read_bytes() != (source / INDEX).read_bytes():
        return False
    return all(
        (target / name).is_file() and (target / name).stat().st_size == meta["bytes"]
        for name, meta in index["files"].items()
    )


def already_there(target: Path, name: str, meta: dict) -> bool:
    """A file left by an interrupted staging that is right: its size, then its sha256."""
    path = target / name
    return path.is_file() and path.stat().st_size == meta["bytes"] and sha256_of(path) == meta["sha256"]


def stage(source: Path, target: Path, workers: int) -> str:
    """Make target an identical copy of source; returns what was done, in a line."""
    index = read_index(source, "--shards")
    if identical(source, target, index):
        return f"an identical copy is in {target} (its index and sizes match {source}'s); nothing copied"
    target.mkdir(parents=True, exist_ok=True)
    (target / INDEX).unlink(missing_ok=True)  # incomplete from here until the last file is in
    files = index["files"]
    kept = [name for name in files if already_there(target, name, files[name])]
    todo = [name for name in files if name not in kept]
    need = sum(files[name]["bytes"] for name in todo)
    free = shutil.disk_usage(target).free
    if need > free:
        raise UserError(f"--to {target}: {need / 1e9:.2f} GB to copy, {free / 1e9:.2f} GB free there")
    start = time.perf_counter()
    with WorkProgress(f"stage to {target}", len(todo), "files") as progress, ThreadPoolExecutor(workers) as pool:
        list(pool.map(lambda name: copy_checked(source / name, target / name, files[name]["sha256"], progress), todo))
    shutil.copyfile(source / INDEX, target / INDEX)  # last: the copy is complete
    seconds = time.perf_counter() - start
    return (
        f"copied {len(todo)} files ({need / 1e9:.2f} GB) from {source} to {target} in {seconds:.1f} s "
        f"({need / 1e6 / max(seconds, 1e-9):.1f} MB/s, sha256 checked); kept {len(kept)} already there"
    )


@dataclass(frozen=True)
class StageOptions:
    shards: str = opt("packed shards (hvd-imagenet pack) on the shared file system")
    to: str = opt("the node-local directory to copy them to (%%n: the node's name)")
    workers: int = opt("files copied at once", COPY_THREADS, min=1)

    def __post_init__(self):
        check(self)


def run(options: StageOptions) -> None:
    target = Path(node_path(options.to))
    print(f"stage ({node_path('%n')}): {stage(Path(options.shards), target, options.workers)}", flush=True)


COMMAND = Command(StageOptions, run, description="Then train with --data pointing at the copy.")
