"""`hvd-imagenet make-dataset`: ImageNet layout, real JPEGs of varied size, classes that can be told apart."""

import colorsys

import numpy as np
import pytest
from conftest import run_cli
from PIL import Image
from torchvision.datasets import ImageFolder

from hvd_imagenet.data.make_dataset import make_dataset


@pytest.mark.cli
def test_layout_and_files(tmp_path):
    out = tmp_path / "data"
    result = run_cli(
        "make-dataset",
        "--output",
        out,
        "--classes",
        "3",
        "--train-per-class",
        "4",
        "--val-per-class",
        "2",
        "--seed",
        "5",
    )
    assert result.returncode == 0, result.stderr
    for split, count in (("train", 4), ("val", 2)):
        folders = sorted((out / split).iterdir())
        assert len(folders) == 3
        for folder in folders:
            assert folder.name.startswith("n") and len(folder.name) == 9 and folder.name[1:].isdigit()
            files = sorted(folder.glob("*.JPEG"))
            assert len(files) == count
            for f in files:
                with Image.open(f) as image:
                    assert image.format == "JPEG" and image.mode == "RGB"
                    assert all(200 <= side <= 500 for side in image.size)
    assert ImageFolder(out / "train").classes == ImageFolder(out / "val").classes
    again = run_cli("make-dataset", "--output", out, "--classes", "3")
    assert again.returncode == 2 and "not empty" in again.stderr


@pytest.mark.unit
def test_deterministic(tmp_path):
    make_dataset(tmp_path / "a", 2, 2, 1, seed=3, workers=1)
    make_dataset(tmp_path / "b", 2, 2, 1, seed=3, workers=1)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.JPEG"))
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)


def dominant_hue(path) -> float:
    rgb = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64) / 255
    hsv = np.array([colorsys.rgb_to_hsv(*px) for px in rgb[::4, ::4].reshape(-1, 3)])
    saturated = hsv[hsv[:, 1] > 0.6]
    angle = 2 * np.pi * saturated[:, 0]
    return (np.arctan2(np.sin(angle).mean(), np.cos(angle).mean()) / (2 * np.pi)) % 1.0


@pytest.mark.unit
def test_classes_are_learnable(tiny_data):
    """A nearest-centroid rule on one feature (the object's hue) beats chance by far: the classes carry
    signal a network can learn (the demo shows ResNet-50 learning them)."""
    train = ImageFolder(tiny_data / "train")
    val = ImageFolder(tiny_data / "val")
    centroids = {}
    for path, label in train.samples:
        centroids.setdefault(label, []).append(dominant_hue(path))
    centroids = {label: np.median(hues) for label, hues in centroids.items()}

    def distance(a, b):
        return min(abs(a - b), 1 - abs(a - b))

    correct = sum(
        min(centroids, key=lambda c: distance(centroids[c], dominant_hue(path))) == label for path, label in val.samples
    )
    assert correct / len(val.samples) >= 0.8  # chance: 0.25


@pytest.mark.cli
def test_digits_are_scikit_learns_in_a_fixed_split(tmp_path):
    """Every one of the 1,797 digits once, as grayscale JPEG in ImageNet layout, its label its folder; the
    split is fixed (two runs write the same files); the shapes-only flags are refused."""
    from sklearn.datasets import load_digits

    out = tmp_path / "digits"
    result = run_cli("make-dataset", "--kind", "digits", "--output", out)
    assert result.returncode == 0, result.stderr
    train, val = ImageFolder(out / "train"), ImageFolder(out / "val")
    assert (len(train), len(val)) == (1438, 359) and train.classes == val.classes and len(train.classes) == 10
    digits = load_digits()
    for path, label in train.samples[::97] + val.samples[::31]:
        index = int(path.rsplit("_", 1)[1].split(".")[0])
        assert label == digits.target[index]
        with Image.open(path) as image:
            assert image.format == "JPEG" and image.mode == "L" and image.size == (20, 20)
            # Downsampled back to 8x8 it is the scikit-learn digit (0..16 scaled to 0..255), up to JPEG loss.
            small = np.asarray(image.crop((2, 2, 18, 18)).resize((8, 8), Image.Resampling.BOX), dtype=float)
            assert np.abs(small - digits.images[index] * 255 / 16).mean() < 20
    again = tmp_path / "again"
    run_cli("make-dataset", "--kind", "digits", "--output", again)
    assert all((again / p.relative_to(out)).read_bytes() == p.read_bytes() for p in out.rglob("*.JPEG"))
    refused = run_cli("make-dataset", "--kind", "digits", "--output", tmp_path / "x", "--classes", "3")
    assert refused.returncode == 2 and "drop --classes" in refused.stderr


@pytest.mark.cli
def test_cluttered_digits_are_copies_of_the_digits_of_their_split(tmp_path):
    """20 distorted, cluttered, noisy copies of each train digit and 6 of each val digit, labelled as their
    digit; deterministic for a seed (the val split written again in-process is byte-equal), another seed
    differs; the flags of generated sets other than --seed are refused."""
    from hvd_imagenet.data.make_dataset import sklearn_digits, split_of, write_cluttered_split

    out = tmp_path / "cluttered"
    result = run_cli("make-dataset", "--kind", "cluttered-digits", "--output", out)
    assert result.returncode == 0, result.stderr
    train, val = ImageFolder(out / "train"), ImageFolder(out / "val")
    assert (len(train), len(val)) == (28_760, 2_154) and train.classes == val.classes and len(train.classes) == 10
    _, labels = sklearn_digits()
    for split, folder, copies in (("train", train, 20), ("val", val, 6)):
        in_split = labels[[i for i in range(len(labels)) if split_of(i) == split]]
        assert np.bincount([label for _, label in folder.samples]).tolist() == (np.bincount(in_split) * copies).tolist()
        for path, label in folder.samples[::997]:
            index = int(path.rsplit("_", 1)[1].split(".")[0])  # copy c of digit d: c x digits + d
            assert label == in_split[index % len(in_split)]
            with Image.open(path) as image:
                assert image.format == "JPEG" and image.mode == "L" and image.size == (20, 20)
                assert np.asarray(image).std() > 20  # noise and clutter, not a clean digit on black
    again, other = tmp_path / "again", tmp_path / "other"
    assert write_cluttered_split((again, "val", 0)) == 2_154 and write_cluttered_split((other, "val", 1)) == 2_154
    written = sorted((out / "val").rglob("*.JPEG"))
    assert all((again / p.relative_to(out)).read_bytes() == p.read_bytes() for p in written)
    assert sum((other / p.relative_to(out)).read_bytes() != p.read_bytes() for p in written) > 2_000
    refused = run_cli("make-dataset", "--kind", "cluttered-digits", "--output", tmp_path / "x", "--classes", "3")
    assert refused.returncode == 2 and "drop --classes" in refused.stderr
