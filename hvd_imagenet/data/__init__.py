"""--loader: the registry, one entry per input pipeline, one module each. No torch and no other module of the
package at import: config validation and `--help` read it as is; a loader's module is imported when a run builds
it (loaders.build_loaders).

Four loaders: `dali` (NVIDIA DALI: GPU decode on GPU machines, CPU threads elsewhere), `torchvision` (PIL in
DataLoader worker processes), `memory` (a small data set decoded once into memory shared by a node's ranks,
augmented in batches by torch) and `synthetic` (one fixed batch on the device). To add one: its module here with
a function `(config, ctx, samples) -> loaders.Loaders`, and its line in LOADERS (docs/architecture.md).
The real ones read the same samples (ImageFolder's images and labels, minus what a --file-list excludes) and
split them among ranks the same way (shards.py), from a folder tree (samples.FileSamples) or from packed shards
(packed.PackedSamples).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LoaderKind:
    """One --loader choice: the function that builds it, and whether it reads --data."""

    builder: str  # "hvd_imagenet.data.module:function", called as (config, ctx, samples), or (config, ctx)
    reads_files: bool


LOADERS = {
    "dali": LoaderKind("hvd_imagenet.data.dali:dali_loaders", reads_files=True),
    "memory": LoaderKind("hvd_imagenet.data.memory:memory_loaders", reads_files=True),
    "torchvision": LoaderKind("hvd_imagenet.data.torchvision_loader:torchvision_loaders", reads_files=True),
    "synthetic": LoaderKind("hvd_imagenet.data.synthetic:synthetic_loaders", reads_files=False),
}
FILE_LOADERS = tuple(name for name, kind in LOADERS.items() if kind.reads_files)
DALI_DEVICES = ("auto", "cpu", "gpu")
