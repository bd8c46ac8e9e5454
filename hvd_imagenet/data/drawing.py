"""The `shapes` data set's images (make_dataset's folder tree and make_archives' official-layout archives draw
the same ones) and the output check both share. A leaf module: nothing of the package but errors."""

from __future__ import annotations

import colorsys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..errors import UserError

SHAPES = ("ellipse", "rectangle", "triangle", "ring")


def wnid(class_index: int) -> str:
    return f"n{1_000_000 + 7919 * class_index:08d}"


def rgb(hue: float, saturation: float, value: float) -> tuple[int, int, int]:
    return tuple(int(255 * c) for c in colorsys.hsv_to_rgb(hue % 1.0, saturation, value))


def draw(class_index: int, num_classes: int, seed: tuple[int, ...]) -> tuple[Image.Image, int]:
    """One image of a class, and the JPEG quality to save it at (75-95)."""
    rng = np.random.default_rng(seed)
    width, height = (int(v) for v in rng.integers(200, 501, size=2))
    background = np.array(rgb(rng.random(), 0.25, 0.55), dtype=np.float32)
    pixels = background + rng.normal(0, 28, size=(height, width, 3))
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))

    hue = class_index / num_classes + rng.normal(0, 0.012)
    color = rgb(hue, rng.uniform(0.75, 1.0), rng.uniform(0.7, 1.0))
    size = rng.uniform(0.35, 0.75) * min(width, height)
    cx, cy = rng.uniform(size / 2, width - size / 2), rng.uniform(size / 2, height - size / 2)
    box = (cx - size / 2, cy - size / 2, cx + size / 2, cy + size / 2)
    pen = ImageDraw.Draw(image)
    shape = SHAPES[class_index % len(SHAPES)]
    if shape == "ellipse":
        pen.ellipse(box, fill=color)
    elif shape == "rectangle":
        pen.rectangle(box, fill=color)
    elif shape == "triangle":
        pen.polygon([(cx, box[1]), (box[0], box[3]), (box[2], box[3])], fill=color)
    else:
        pen.ellipse(box, outline=color, width=max(3, int(size / 6)))
    return image, int(rng.integers(75, 96))


def refuse_nonempty(output: Path) -> None:
    if output.exists() and any(output.iterdir()):
        raise UserError(f"--output {output} exists and is not empty")
