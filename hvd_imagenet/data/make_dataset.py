"""`hvd-imagenet make-dataset`: small ImageNet-layout sets of real JPEG files whose classes can be learned.

--kind shapes (the default, generated): each class is a saturated object of one hue (classes spread evenly
around the color wheel, jittered) and one of four shapes, at a random place and scale, on a weakly tinted noisy
background of random hue. Image sizes vary from 200 to 500 px per side, as ImageNet's do, so the loaders'
resize and crop paths do real work. Folder names look like ImageNet's WordNet ids (n + 8 digits), sorted in
class order.

--kind digits (real): the 1,797 handwritten digits that scikit-learn ships (UCI "Optical Recognition of
Handwritten Digits", 8x8 px, 16 gray levels), upsampled to DIGIT_SIZE px and centered on a black canvas of
DIGIT_CANVAS px (room for the scale augmentation's crops), as grayscale JPEG files. The split is fixed: every
DIGITS_VAL_EVERY-th image (in scikit-learn's order) is val, the rest train: 1,438 train, 359 val.

--kind cluttered-digits (made from real data): the study's data set. Each of the digits above, distorted
(rotated up to 25 degrees, scaled 0.75-1.1, sheared, shifted up to 2 px) on the 20 px canvas, with two 7 px
fragments of other digits of its split laid over it and Gaussian noise: CLUTTERED_COPIES[split] images per
digit, 28,760 train and 2,154 val, the val ones made from the val digits alone (no writer's digit is in
both). Hard enough that a small model errs on some of them, large enough that the study's large kn reads
under 1 % of it per step.

--kind archives: shapes in the three official ImageNet downloads' formats (make_archives.py), the input of
`prepare-imagenet`.
"""

from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from ..cpus import available_cpus
from ..errors import UserError
from ..flags import Command, check, opt
from .drawing import draw, refuse_nonempty, wnid
from .make_archives import make_archives

KINDS = ("shapes", "digits", "cluttered-digits", "archives")
DIGIT_SIZE = 16  # px, from 8: x2, bicubic (8 px hold all there is; 16 px give the crops room)
DIGIT_CANVAS = 20  # px; the study trains on 16 px crops and evaluates the center 16 px of the 18 px resize
DIGITS_VAL_EVERY = 5
CLUTTERED_COPIES = {"train": 20, "val": 6}
CLUTTER_FRAGMENTS, CLUTTER_FRAGMENT_SIZE, CLUTTER_NOISE = 2, 7, 30.0  # fragments per image, px, gray levels (std)


@dataclass(frozen=True)
class ImageJob:
    path: Path
    class_index: int
    num_classes: int
    seed: tuple[int, ...]


def render(job: ImageJob) -> None:
    image, quality = draw(job.class_index, job.num_classes, job.seed)
    job.path.parent.mkdir(parents=True, exist_ok=True)
    image.save(job.path, "JPEG", quality=quality)


def make_dataset(
    output: Path, classes: int, train_per_class: int, val_per_class: int, seed: int, workers: int = 0
) -> int:
    """Write the data set; returns the number of images. Deterministic for a given seed."""
    if classes < 2 or train_per_class < 1 or val_per_class < 1:
        raise UserError("make-dataset needs --classes >= 2, --train-per-class >= 1 and --val-per-class >= 1")
    refuse_nonempty(output)
    jobs = [
        ImageJob(output / split / wnid(c) / f"{wnid(c)}_{split}_{i:05d}.JPEG", c, classes, (seed, s, c, i))
        for s, (split, count) in enumerate((("train", train_per_class), ("val", val_per_class)))
        for c in range(classes)
        for i in range(count)
    ]
    with ProcessPoolExecutor(max_workers=workers or available_cpus()) as pool:
        for _ in tqdm(
            pool.map(render, jobs, chunksize=16), total=len(jobs), desc="make-dataset", unit="img", disable=None
        ):  # a bar on a terminal only: in a log its redraws are one endless line
            pass
    return len(jobs)


def sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 digits (8x8, 0..1, ink bright) and their labels, in scikit-learn's order."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise UserError("make-dataset --kind digits needs scikit-learn: pip install 'hvd_imagenet[study]'") from None
    digits = load_digits()  # shipped inside scikit-learn: no download
    return digits.images / 16, digits.target


def split_of(index: int) -> str:
    return "val" if index % DIGITS_VAL_EVERY == DIGITS_VAL_EVERY - 1 else "train"


def digit_image(pixels: np.ndarray) -> Image.Image:
    """An 8x8 digit (0..1) as a DIGIT_SIZE px grayscale image."""
    digit = Image.fromarray((pixels * 255).round().astype(np.uint8))
    return digit.resize((DIGIT_SIZE, DIGIT_SIZE), Image.Resampling.BICUBIC)


def make_digits(output: Path) -> int:
    """Write scikit-learn's handwritten digits; returns the number of images. Deterministic."""
    refuse_nonempty(output)
    images, labels = sklearn_digits()
    margin = (DIGIT_CANVAS - DIGIT_SIZE) // 2
    for index, (pixels, label) in enumerate(
        tqdm(list(zip(images, labels)), desc="make-dataset", unit="img", disable=None)
    ):
        canvas = Image.new("L", (DIGIT_CANVAS, DIGIT_CANVAS))
        canvas.paste(digit_image(pixels), (margin, margin))
        save_digit(canvas, output, split_of(index), int(label), index)
    return len(images)


def save_digit(image: Image.Image, output: Path, split: str, label: int, index: int) -> None:
    path = output / split / wnid(label) / f"{wnid(label)}_{split}_{index:05d}.JPEG"
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, "JPEG", quality=95)


def distorted(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A digit rotated, scaled, sheared and shifted onto the DIGIT_CANVAS px canvas, float gray levels."""
    angle, scale, shear = np.radians(rng.uniform(-25, 25)), rng.uniform(0.75, 1.1), rng.uniform(-0.3, 0.3)
    forward = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]) @ [[1, shear], [0, 1]]
    inverse = np.linalg.inv(forward)  # PIL maps each output pixel back to the input
    center_out = DIGIT_CANVAS / 2 + rng.uniform(-2, 2, size=2)
    offset = DIGIT_SIZE / 2 - inverse @ center_out
    coefficients = (*inverse[0], offset[0], *inverse[1], offset[1])
    image = digit_image(pixels).transform(
        (DIGIT_CANVAS, DIGIT_CANVAS), Image.Transform.AFFINE, coefficients, Image.Resampling.BILINEAR
    )
    return np.asarray(image, dtype=np.float32)


def cluttered(index: int, images: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """Digit `index` distorted, under CLUTTER_FRAGMENTS fragments of other digits, with noise."""
    canvas = distorted(images[index], rng)
    size = CLUTTER_FRAGMENT_SIZE
    for _ in range(CLUTTER_FRAGMENTS):
        other = distorted(images[rng.integers(len(images))], rng)
        (y, x), (from_y, from_x) = rng.integers(0, DIGIT_CANVAS - size + 1, size=(2, 2))
        fragment = other[from_y : from_y + size, from_x : from_x + size] * rng.uniform(0.5, 1.0)
        canvas[y : y + size, x : x + size] = np.maximum(canvas[y : y + size, x : x + size], fragment)
    canvas += rng.normal(0, CLUTTER_NOISE, size=canvas.shape)
    return Image.fromarray(np.clip(canvas, 0, 255).round().astype(np.uint8))


def write_cluttered_split(args: tuple[Path, str, int]) -> int:
    output, split, seed = args
    images, labels = sklearn_digits()
    in_split = [index for index in range(len(images)) if split_of(index) == split]
    images, labels = images[in_split], labels[in_split]  # fragments come from the same split's digits
    rng = np.random.default_rng((seed, tuple(CLUTTERED_COPIES).index(split)))
    index = 0
    for _ in range(CLUTTERED_COPIES[split]):
        for digit, label in enumerate(labels):
            save_digit(cluttered(digit, images, rng), output, split, int(label), index)
            index += 1
    return index


def make_cluttered_digits(output: Path, seed: int) -> int:
    """Write the cluttered digits (both splits side by side); returns the number of images. Deterministic."""
    refuse_nonempty(output)
    print(f"make-dataset: {sum(CLUTTERED_COPIES.values())} cluttered copies of each of 1,797 digits ...")
    with ProcessPoolExecutor(max_workers=2) as pool:
        return sum(pool.map(write_cluttered_split, [(output, split, seed) for split in CLUTTERED_COPIES]))


SHAPES_DEFAULTS = {"classes": 10, "train_per_class": 100, "val_per_class": 20, "seed": 0}


@dataclass(frozen=True)
class MakeDatasetOptions:
    output: str = opt("the data set's directory (new or empty)")
    kind: str = opt(
        "shapes: generated colored shapes, 200-500 px; digits: scikit-learn's 1,797 handwritten digits "
        "(real), 20 px, a fixed train/val split; cluttered-digits: those digits distorted, cluttered and "
        "noisy, 20 copies of each train digit and 6 of each val one (the study's); archives: shapes as "
        "the official ImageNet downloads (train and val tars, devkit, Kaggle's val labels), for "
        "prepare-imagenet",
        "shapes",
        choices=KINDS,
    )
    classes: int | None = opt(f"shapes, archives: classes (default {SHAPES_DEFAULTS['classes']})", None, min=2)
    train_per_class: int | None = opt(
        f"shapes, archives: train images per class (default {SHAPES_DEFAULTS['train_per_class']})", None, min=1
    )
    val_per_class: int | None = opt(
        f"shapes, archives: val images per class (default {SHAPES_DEFAULTS['val_per_class']})", None, min=1
    )
    seed: int | None = opt(f"shapes, archives, cluttered-digits: seed (default {SHAPES_DEFAULTS['seed']})", None)
    workers: int = opt("processes (0: all cores)", 0, min=0)

    def __post_init__(self):
        check(self)


def run(options: MakeDatasetOptions) -> None:
    output = Path(options.output)
    if options.kind in ("digits", "cluttered-digits"):
        fixed = [name for name in SHAPES_DEFAULTS if name != "seed" or options.kind == "digits"]  # cluttered: seeded
        given = [f"--{name.replace('_', '-')}" for name in fixed if getattr(options, name) is not None]
        if given:
            raise UserError(
                f"--kind {options.kind} is a fixed data set (10 classes, a fixed split); drop {' '.join(given)}"
            )
        count = make_digits(output) if options.kind == "digits" else make_cluttered_digits(output, options.seed or 0)
        print(f"make-dataset: wrote {count} JPEG files to {output}")
        return
    values = {
        name: default if getattr(options, name) is None else getattr(options, name)
        for name, default in SHAPES_DEFAULTS.items()
    }
    if options.kind == "archives":
        archives = make_archives(output, **values)
        print(
            f"make-dataset: wrote {len(archives.wnids)} classes as the official ImageNet archives to {output}; next:"
            f"\n  hvd-imagenet prepare-imagenet --train-tar {archives.train} --val-tar {archives.val} --devkit "
            f"{archives.devkit} --output DIR --no-verify"
        )
        return
    count = make_dataset(output, **values, workers=options.workers)
    print(f"make-dataset: wrote {count} JPEG files to {output}")


COMMAND = Command(MakeDatasetOptions, run)
