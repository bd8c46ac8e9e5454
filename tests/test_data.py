"""The input pipelines in this process, without Horovod: real DALI on the CPU and the torchvision DataLoader.

A rank is a DistContext (who am I, of how many); building rank r's loaders needs no other rank.
"""

import json
import shutil
from collections import Counter

import pytest
import torch
from conftest import add_broken, loaders, rank, run_cli
from torchvision.datasets import ImageFolder

from hvd_imagenet.data.layout import class_folders, list_samples
from hvd_imagenet.data.make_dataset import make_dataset
from hvd_imagenet.data.memory import crop_boxes
from hvd_imagenet.data.shards import train_shard, val_shard
from hvd_imagenet.errors import UserError

LOADERS = ["dali", "torchvision", "memory"]


def labels_of(batches) -> list[int]:
    return [label for _, labels in batches for label in labels.tolist()]


@pytest.fixture(scope="module")
def one_per_class(tmp_path_factory):
    """10 classes of 1 train and 1 val image each: a label names its image."""
    root = tmp_path_factory.mktemp("unique") / "data"
    make_dataset(root, classes=10, train_per_class=1, val_per_class=1, seed=3, workers=2)
    return root


@pytest.mark.unit
def test_samples_are_imagefolders(odd_data, tmp_path):
    classes = class_folders(odd_data / "train")
    for split in ("train", "val"):
        assert list_samples(odd_data, split, classes, None) == ImageFolder(odd_data / split).samples
    keep = frozenset(f"train/{name}/odd_gray.JPEG" for name in classes[:1]) | {f"val/{classes[1]}/odd_png.JPEG"}
    assert [p for p, _ in list_samples(odd_data, "train", classes, keep)] == [
        str(odd_data / "train" / classes[0] / "odd_gray.JPEG")
    ]


@pytest.mark.unit
def test_train_shards_partition_one_global_shuffle_per_epoch():
    for size in (1, 2, 3, 8):
        epochs = []
        for epoch in range(3):
            shards = [train_shard(100, 7, epoch, r, size) for r in range(size)]
            assert {len(s) for s in shards} == {100 // size}  # every rank runs the same steps
            union = [i for s in shards for i in s]
            assert len(set(union)) == len(union) == 100 // size * size  # disjoint; only the tail is left out
            epochs.append(shards[0])
        assert epochs[0] != epochs[1] != epochs[2]  # a new shuffle each epoch
    assert train_shard(100, 7, 1, 0, 2) == train_shard(100, 7, 1, 0, 2)  # (seed, epoch) alone decide it
    assert sorted(i for r in range(3) for i in val_shard(10, r, 3)) == list(range(10))


@pytest.mark.unit
@pytest.mark.parametrize("loader", LOADERS)
def test_two_ranks_read_disjoint_shards_reshuffled_each_epoch(one_per_class, loader):
    seen = {}
    for epoch in (0, 1):
        per_rank = []
        for r in (0, 1):
            pipes = loaders(one_per_class, loader, rank(r, 2), batch_size=1)
            pipes.set_epoch(epoch)
            per_rank.append(labels_of(pipes.train))
            assert len(per_rank[-1]) == pipes.train_batches == 5
        assert not set(per_rank[0]) & set(per_rank[1])
        assert sorted(per_rank[0] + per_rank[1]) == list(range(10))
        seen[epoch] = per_rank
    assert seen[0] != seen[1]
    # The order is shards.train_shard's, whichever loader reads it.
    samples = list_samples(one_per_class, "train", class_folders(one_per_class / "train"), None)
    assert seen[1][1] == [samples[i][1] for i in train_shard(10, 0, 1, 1, 2)]


@pytest.mark.unit
@pytest.mark.parametrize("loader", LOADERS)
def test_val_counts_each_image_once_with_uneven_shards(one_per_class, loader):
    counts = Counter()
    for r in range(3):  # 10 images over 3 ranks: shards of 4, 3, 3; batches of 2 leave partial last batches
        pipes = loaders(one_per_class, loader, rank(r, 3))
        sizes = [images.shape[0] for images, _ in pipes.val]
        assert sum(sizes) == len(range(r, 10, 3)) and all(sizes)
        counts.update(labels_of(pipes.val))
    assert counts == Counter(range(10))
    # More ranks than val images: the ranks past the end have an empty shard and evaluate nothing.
    assert list(loaders(one_per_class, loader, rank(11, 12)).val) == []


@pytest.mark.unit
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("loader", LOADERS)
def test_batches_shape_dtype_layout(tiny_data, loader, channels_last):
    pipes = loaders(tiny_data, loader, rank(0, 1), batch_size=4, channels_last=channels_last)
    images, labels = next(iter(pipes.train))
    assert images.shape == (4, 3, 32, 32) and images.dtype == torch.float32
    assert labels.shape == (4,) and labels.dtype == torch.int64
    assert images.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert pipes.num_classes == 4 and pipes.train_batches == 12


@pytest.mark.unit
def test_the_loaders_agree_on_val_images(tiny_data):
    """Val has no randomness: DALI and torchvision must give nearly the same normalized RGB tensors (resize
    implementations differ in detail); a wrong mean/std, channel order or crop would not be near. The memory
    loader decodes val with torchvision's own PIL transforms, so it gives torchvision's up to float rounding."""
    dali, torchvision, memory = (
        next(iter(loaders(tiny_data, name, rank(0, 1), batch_size=5).val)) for name in ("dali", "torchvision", "memory")
    )
    assert torch.equal(dali[1], torchvision[1]) and torch.equal(memory[1], torchvision[1])
    difference = (dali[0] - torchvision[0]).abs()
    assert difference.mean() < 0.05, difference.mean()
    per_channel = torchvision[0].mean(dim=(0, 2, 3))
    assert torch.allclose(dali[0].mean(dim=(0, 2, 3)), per_channel, atol=0.02)
    assert per_channel.abs().max() > 0.1  # the images are not blank
    torch.testing.assert_close(memory[0], torchvision[0], rtol=0, atol=1e-5)


@pytest.mark.unit
@pytest.mark.parametrize("loader", LOADERS)
def test_odd_files_decode_to_rgb(odd_data, loader):
    pipes = loaders(odd_data, loader, rank(0, 1), batch_size=3)
    train = [images for images, _ in pipes.train]
    val = [images for images, _ in pipes.val]
    assert sum(len(b) for b in train) == 9 and sum(len(b) for b in val) == 7  # every file, none skipped
    assert all(b.shape[1:] == (3, 32, 32) and torch.isfinite(b).all() for b in train + val)


@pytest.mark.unit
@pytest.mark.parametrize("how", ["truncated", "not_an_image"])
@pytest.mark.parametrize("loader", LOADERS)
def test_broken_file_is_an_error_that_names_it(tiny_data, tmp_path, loader, how):
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    broken = add_broken(data, how)
    with pytest.raises(UserError, match=f"cannot decode {broken}"):  # memory: at the start, when it decodes
        pipes = loaders(data, loader, rank(0, 1), batch_size=7)
        pipes.set_epoch(0)
        for _ in pipes.train:
            pass


@pytest.mark.cli
def test_check_data_reports_odd_and_unreadable_and_writes_a_file_list(odd_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(odd_data, data)
    broken = add_broken(data, "truncated")
    result = run_cli("check-data", "--data", data, "--workers", "2")
    assert result.returncode == 1, result.stderr
    assert "--write-file-list" in result.stderr
    assert f"{broken.relative_to(data)}: image file is truncated" in result.stdout
    for name, oddity in (("odd_gray", "grayscale"), ("odd_cmyk", "CMYK"), ("odd_png", "PNG data in a .JPEG file")):
        assert sum(f"{name}.JPEG: {oddity}" in line for line in result.stdout.splitlines()) == 2  # train, val

    report = json.loads(run_cli("check-data", "--data", data, "--json").stdout)
    assert report["images"] == 17
    assert report["per_class"]["train"] == dict(zip(class_folders(data / "train"), [6, 4]))
    assert list(report["unreadable"]) == [str(broken.relative_to(data))]
    assert len(report["odd"]) == 6

    file_list = tmp_path / "files.txt"
    result = run_cli("check-data", "--data", data, "--write-file-list", file_list)
    assert result.returncode == 0, result.stderr
    listed = file_list.read_text().splitlines()
    assert len(listed) == 16 and str(broken.relative_to(data)) not in listed
    pipes = loaders(data, "dali", rank(0, 1), batch_size=1, file_list=str(file_list))
    assert pipes.train_batches == 9  # the 9 readable train files; the broken one is left out
    assert len(labels_of(pipes.train)) == 9


@pytest.mark.cli
def test_bench_loader_json(tiny_data):
    result = run_cli(
        "bench-loader",
        "--data",
        tiny_data,
        "--loader",
        "dali",
        "--loader",
        "torchvision",
        "--batch-size",
        "4",
        "--image-size",
        "32",
        "--epochs",
        "2",
        "--repeats",
        "1",
        "--threads",
        "1",
        "--json",
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert [r["loader"] for r in report["results"]] == ["dali", "torchvision"]
    assert [r["pipeline_builds"] for r in report["results"]] == [1, None]  # one for the untimed and timed epochs
    for r in report["results"]:
        assert r["images_per_repeat"] == 96  # two timed epochs of the 48 train images
        assert r["images_per_sec"] > 0 and r["cpu_seconds_per_image"] > 0 and r["peak_rss_mib"] > 0
    assert report["results"][1]["ratio"] == 1.0
    assert report["results"][0]["ratio"] == pytest.approx(
        report["results"][0]["images_per_sec"] / report["results"][1]["images_per_sec"]
    )


@pytest.mark.unit
def test_memory_crops_follow_random_resized_crop():
    """The memory loader's batched crops (data/memory.py: crop_boxes) as torchvision's RandomResizedCrop draws
    them: inside the image, area in [min, 1] of it, aspect in [3/4, 4/3], the whole image when no try fits
    (a minimum area of 1 with aspects != 1 rarely fits), and the same boxes from the same generator seed."""
    boxes = crop_boxes(20000, 36, 36, 0.25, torch.Generator().manual_seed(0))
    width, height = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= 36).all() and (boxes[:, 3] <= 36).all()
    area, aspect = width * height / 36**2, width / height
    assert area.min() >= 0.25 - 1e-6 and area.max() <= 1 + 1e-6
    assert aspect.min() >= 3 / 4 - 1e-6 and aspect.max() <= 4 / 3 + 1e-6
    assert 0.5 < area.mean() < 0.7 and 0.45 < (aspect > 1).float().mean() < 0.55  # spread over the ranges
    whole = crop_boxes(1000, 36, 36, 1.0, torch.Generator().manual_seed(0))
    assert ((whole - torch.tensor([0, 0, 36, 36])).abs().max(dim=1).values < 1e-4).float().mean() > 0.9
    assert torch.equal(boxes, crop_boxes(20000, 36, 36, 0.25, torch.Generator().manual_seed(0)))


@pytest.mark.unit
def test_memory_loader_augments_per_epoch_and_refuses_a_data_set_too_large(tiny_data):
    pipes = loaders(tiny_data, "memory", rank(0, 1), batch_size=4, min_crop_area=0.08)
    epochs = []
    for epoch in (0, 0, 1):
        pipes.set_epoch(epoch)
        epochs.append(torch.cat([images for images, _ in pipes.train]))
    assert torch.equal(epochs[0], epochs[1])  # (seed, epoch, position) decide the crops
    assert not torch.equal(epochs[0], epochs[2])
    assert "memory: decoded once" in pipes.description and "in this rank" in pipes.description
    with pytest.raises(
        UserError,
        match=r"--loader memory: the decoded data set needs [\d.]+ GiB \(48 train images "
        r"at 100000 px, 20 val at 32 px\) and [\d.]+ GiB of RAM is free",
    ):
        loaders(tiny_data, "memory", rank(0, 1), val_resize=100000)
