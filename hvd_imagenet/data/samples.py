"""The images of one split as every loader reads them: a list in ImageFolder's order (sorted class folders,
sorted files), each image's label, a name for messages, and its encoded bytes by index.

Two kinds hold the same list: `FileSamples` (a folder tree, one file per image) and `packed.PackedSamples`
(large shard files and an index, read by offset). The global shuffle (shards.py) picks indices into this list,
so a run reads the same images in the same order from either.
"""

from __future__ import annotations

import os
from pathlib import Path


class FileSamples:
    """Images as files: (path, label) pairs under the data directory `root`."""

    def __init__(self, root: Path, items: list[tuple[str, int]]):
        self.root, self.items = root, items

    def __len__(self) -> int:
        return len(self.items)

    def label(self, index: int) -> int:
        return self.items[index][1]

    def name(self, index: int) -> str:
        """How a message names the image: its path."""
        return self.items[index][0]

    def relative_path(self, index: int) -> str:
        """The image's path relative to the data directory, as a --file-list holds it."""
        return os.path.relpath(self.items[index][0], self.root)

    def read(self, index: int) -> bytes:
        """The encoded image (one open and read of its file)."""
        return Path(self.items[index][0]).read_bytes()

    def subset(self, indices) -> FileSamples:
        return FileSamples(self.root, [self.items[i] for i in indices])
