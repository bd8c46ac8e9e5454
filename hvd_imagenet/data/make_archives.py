"""`hvd-imagenet make-dataset --kind archives`: small archives in the exact formats of the three official
ILSVRC2012 downloads, to rehearse `prepare-imagenet` (and pack, stage, train) before downloading 150 GB, and for
the tests. The images are make-dataset's shapes (200-500 px JPEGs), so the data set is learnable.

- ILSVRC2012_img_train.tar: a tar of per-class tars (n01440764.tar, ...), each holding its class's JPEGs flat
  (n01440764_123.JPEG); among them, as in the real set, a grayscale JPEG, a CMYK JPEG and a PNG named .JPEG.
- ILSVRC2012_img_val.tar: ILSVRC2012_val_%08d.JPEG, flat, no labels, the classes in random order.
- ILSVRC2012_devkit_t12.tar.gz: ILSVRC2012_devkit_t12/data/meta.mat (written by scipy.io.savemat: a struct
  array `synsets` with the official fields; the leaf synsets' ILSVRC2012_IDs not in WNID order, and non-leaf
  synsets beside them) and data/ILSVRC2012_validation_ground_truth.txt (one ID per val image, in file order).
- LOC_val_solution.csv, Kaggle's form of the val labels (rows not in file order, boxes after each WNID).
"""

from __future__ import annotations

import csv
import io
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..errors import UserError
from .drawing import draw, refuse_nonempty

SYNSET_FIELDS = (
    "ILSVRC2012_ID",
    "WNID",
    "words",
    "gloss",
    "num_children",
    "children",
    "wordnet_height",
    "num_train_images",
)
ODD = {"gray": "grayscale", "cmyk": "CMYK", "png": "PNG data in a .JPEG file"}


ODD_FORMS = {"gray": ("L", "JPEG"), "cmyk": ("CMYK", "JPEG"), "png": ("RGB", "PNG")}  # mode, format


@dataclass
class Archives:
    train: Path
    val: Path
    devkit: Path
    kaggle: Path
    wnids: list[str]  # sorted
    val_labels: dict[str, str]  # val file name -> wnid, as written
    train_files: dict[str, list[str]]  # wnid -> file names
    odd: dict[str, str]  # train/<wnid>/<name> -> what check-data calls it


def image_bytes(class_index: int, classes: int, seed: tuple[int, ...], odd: str | None = None) -> bytes:
    image, quality = draw(class_index, classes, seed)
    mode, image_format = ODD_FORMS[odd] if odd else ("RGB", "JPEG")
    out = io.BytesIO()
    image.convert(mode).save(out, image_format, **({"quality": quality} if image_format == "JPEG" else {}))
    return out.getvalue()


def add_file(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


def write_meta_mat(wnids: list[str], ids: dict[str, int]) -> bytes:
    """meta.mat: the leaf synsets (the classes) with the given IDs, then two non-leaf synsets."""
    import scipy.io

    rows = [(ids[wnid], wnid, 0) for wnid in wnids] + [
        (len(wnids) + 1, "n00001740", 2),
        (len(wnids) + 2, "n00002137", 1),
    ]
    synsets = np.zeros((len(rows), 1), dtype=[(name, "O") for name in SYNSET_FIELDS])
    for row, (synset_id, wnid, children) in enumerate(rows):
        synsets[row, 0] = (
            np.array([[synset_id]], np.uint16),
            wnid,
            f"words of {wnid}",
            "a gloss",
            np.array([[children]], np.uint8),
            np.arange(1, children + 1, dtype=np.uint16),
            np.array([[0 if children == 0 else 3]], np.uint8),
            np.array([[1300]], np.uint16),
        )
    out = io.BytesIO()
    scipy.io.savemat(out, {"synsets": synsets})
    return out.getvalue()


def make_archives(
    root: Path, classes: int = 3, train_per_class: int = 5, val_per_class: int = 4, seed: int = 0
) -> Archives:
    """Write the three archives and Kaggle's label file into `root`; returns what they hold."""
    if classes < 2 or train_per_class < 2 or val_per_class < 1:
        raise UserError(
            "make-dataset --kind archives needs --classes >= 2, --train-per-class >= 2 (room for the "
            "odd files) and --val-per-class >= 1"
        )
    refuse_nonempty(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    wnids = sorted(f"n{int(n):08d}" for n in rng.choice(10**7, size=classes, replace=False))
    progress = tqdm(total=classes * (train_per_class + val_per_class), desc="make-dataset", unit="img", disable=None)

    train_files, odd = {}, {}
    with tarfile.open(root / "ILSVRC2012_img_train.tar", "w") as outer:
        for c, wnid in enumerate(wnids):
            inner_bytes, names = io.BytesIO(), []
            with tarfile.open(fileobj=inner_bytes, mode="w") as inner:
                for i in range(train_per_class):
                    kind = {(0, 0): "gray", (0, 1): "cmyk", (1, 0): "png"}.get((c, i))
                    name = f"{wnid}_{1000 + i}.JPEG"
                    add_file(inner, name, image_bytes(c, classes, (seed, 0, c, i), kind))
                    names.append(name)
                    if kind:
                        odd[f"train/{wnid}/{name}"] = ODD[kind]
                    progress.update()
            add_file(outer, f"{wnid}.tar", inner_bytes.getvalue())
            train_files[wnid] = names

    order = rng.permutation(classes * val_per_class)  # val files in no class order
    val_labels = {f"ILSVRC2012_val_{i + 1:08d}.JPEG": wnids[int(k) % classes] for i, k in enumerate(order)}
    with tarfile.open(root / "ILSVRC2012_img_val.tar", "w") as archive:
        for i, (name, wnid) in enumerate(val_labels.items()):
            add_file(archive, name, image_bytes(wnids.index(wnid), classes, (seed, 1, i)))
            progress.update()
    progress.close()

    # IDs not in WNID order: the last class gets ID 1, and so on.
    ids = {wnid: classes - i for i, wnid in enumerate(wnids)}
    truth = "".join(f"{ids[val_labels[name]]}\n" for name in sorted(val_labels))
    with tarfile.open(root / "ILSVRC2012_devkit_t12.tar.gz", "w:gz") as devkit:
        add_file(devkit, "ILSVRC2012_devkit_t12/data/meta.mat", write_meta_mat(wnids, ids))
        add_file(devkit, "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt", truth.encode())
        add_file(devkit, "ILSVRC2012_devkit_t12/COPYING", b"the devkit's license\n")

    kaggle = root / "LOC_val_solution.csv"
    with open(kaggle, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["ImageId", "PredictionString"])
        for name in sorted(val_labels, reverse=True):
            writer.writerow([name[: -len(".JPEG")], f"{val_labels[name]} 1 2 30 40 {val_labels[name]} 5 6 20 21 "])
    return Archives(
        root / "ILSVRC2012_img_train.tar",
        root / "ILSVRC2012_img_val.tar",
        root / "ILSVRC2012_devkit_t12.tar.gz",
        kaggle,
        wnids,
        val_labels,
        train_files,
        odd,
    )
