"""Packed shards (`hvd-imagenet pack`, data/packed.py): tars other tools read, an index that points into them, and
every loader reading from them exactly what it reads from the folder tree, in the same order; training from
them under horovodrun equals training from the tree, and resumes exactly."""

import gc
import hashlib
import json
import os
import shutil
import tarfile
from pathlib import Path

import pytest
import torch
from conftest import (
    TINY_TRAIN,
    add_broken,
    assert_epoch_2_equal,
    assert_same_batches,
    batches,
    loaders,
    pack,
    rank,
    run_cli,
    run_horovod,
)
from torchvision.datasets import ImageFolder

from hvd_imagenet.data import stage
from hvd_imagenet.data.loaders import check_data
from hvd_imagenet.errors import UserError
from hvd_imagenet.metrics import read_metrics

LOADERS = ["dali", "torchvision"]


@pytest.mark.cli
def test_pack_writes_tars_that_tar_reads_and_an_index_that_points_into_them(tiny_data, tiny_shards, tmp_path):
    index = json.loads((tiny_shards / "index.json").read_text())
    classes = ImageFolder(tiny_data / "train").classes
    assert index["classes"] == classes
    assert {split: entry["images"] for split, entry in index["splits"].items()} == {"train": 48, "val": 20}
    assert len(index["splits"]["train"]["shards"]) > 1  # 0.25 MiB shards
    for name, meta in index["files"].items():
        data = (tiny_shards / name).read_bytes()
        assert len(data) == meta["bytes"] and hashlib.sha256(data).hexdigest() == meta["sha256"], name

    for split in ("train", "val"):
        folder = ImageFolder(tiny_data / split)
        rows = [line.split("\t") for line in (tiny_shards / f"{split}.tsv").read_text().splitlines()[1:]]
        assert [r[4] for r in rows] == [
            str(Path(p).relative_to(tiny_data)) for p, _ in folder.samples
        ]  # ImageFolder's order
        shards = index["splits"][split]["shards"]
        for (path, label), (shard, offset, size, tsv_label, _) in zip(folder.samples, rows):
            with open(tiny_shards / shards[int(shard)], "rb") as f:
                f.seek(int(offset))
                assert f.read(int(size)) == open(path, "rb").read()  # the bytes unchanged, where the index says
            assert int(tsv_label) == label

        # What a tar reader sees: per image its file under its tree path, then <name>.cls with the label.
        members = {}
        for shard in shards:
            with tarfile.open(tiny_shards / shard) as archive:
                for member in archive.getmembers():
                    members[member.name] = archive.extractfile(member).read()
                    assert member.mtime == 0 and member.uid == 0  # nothing of the machine that packed it
        assert len(members) == 2 * len(folder.samples)
        for path, label in folder.samples:
            relative = Path(path).relative_to(tiny_data)
            assert members[str(relative)] == open(path, "rb").read()
            assert members[str(relative.with_suffix(".cls"))] == str(label).encode()

    first_shard_labels = {
        int(r.split("\t")[3]) for r in (tiny_shards / "train.tsv").read_text().splitlines()[1:] if r.startswith("0\t")
    }
    assert len(first_shard_labels) > 1  # train images shuffled within the shards, not one class per shard

    again = pack(tiny_data, tmp_path / "again")  # deterministic: the same bytes, the same sums
    assert json.loads((again / "index.json").read_text())["files"] == index["files"]
    refused = run_cli("pack", "--data", tiny_data, "--output", again)
    assert refused.returncode == 2 and "exists and is not empty" in refused.stderr


@pytest.mark.unit
@pytest.mark.parametrize("loader", LOADERS)
def test_loaders_read_the_same_images_in_the_same_order_from_shards(tiny_data, tiny_shards, loader):
    """Train batches of 2 ranks in two epochs and after a resume within an epoch, and val: equal tensors from
    the tree and from the shards (DALI's random crops too: drawn from (seed, epoch, image index))."""
    for r in (0, 1):
        tree, shards = (loaders(data, loader, rank(r, 2), batch_size=4) for data in (tiny_data, tiny_shards))
        for epoch, images_done in ((0, 0), (1, 0), (1, 16)):
            assert_same_batches(batches(tree, epoch, images_done), batches(shards, epoch, images_done))
        assert_same_batches(batches(tree), batches(shards))
        assert shards.train_batches == tree.train_batches == 6 and shards.num_classes == 4


@pytest.mark.cli
def test_odd_files_file_list_and_a_broken_image_in_shards(odd_data, tmp_path):
    """Real ImageNet's odd files decode to RGB from shards; a broken image is an error that names it and its
    shard; check-data reads shards as it reads the tree, and its file list works on them."""
    tree = tmp_path / "data"
    shutil.copytree(odd_data, tree)
    broken = add_broken(tree, "truncated")
    shards = pack(tree, tmp_path / "shards")

    checked = {}
    for data in (tree, shards):
        result = run_cli("check-data", "--data", data, "--json")
        assert result.returncode == 1, result.stderr
        checked[data] = {key: value for key, value in json.loads(result.stdout).items() if key != "data"}
    assert checked[tree] == checked[shards]
    assert list(checked[shards]["unreadable"]) == [str(broken.relative_to(tree))]
    assert len(checked[shards]["odd"]) == 6

    for loader in LOADERS:
        pipes = loaders(shards, loader, rank(0, 1), batch_size=10)
        pipes.set_epoch(0)
        with pytest.raises(UserError, match=rf"cannot decode {broken.relative_to(tree)} in {shards}/train-0000"):
            list(pipes.train)

    file_list = tmp_path / "files.txt"
    assert run_cli("check-data", "--data", shards, "--write-file-list", file_list).returncode == 0
    assert str(broken.relative_to(tree)) not in file_list.read_text()
    for loader in LOADERS:
        pipes = loaders(shards, loader, rank(0, 1), batch_size=1, file_list=str(file_list))
        images = [b for b, _ in batches(pipes, 0)] + [b for b, _ in batches(pipes)]
        assert len(images) == 9 + 7  # every readable file, the broken one left out
        assert all(b.shape[1:] == (3, 32, 32) and torch.isfinite(b).all() for b in images)


@pytest.mark.unit
def test_shard_files_are_opened_once_and_closed_with_the_loaders(tiny_shards):
    """A process opens each shard on its first read and keeps it; the descriptors go with the loaders (an
    elastic job rebuilds them at every resize)."""

    def open_shards() -> int:
        count = 0
        for fd in os.listdir("/proc/self/fd"):
            try:
                count += os.readlink(f"/proc/self/fd/{fd}").startswith(str(tiny_shards))
            except OSError:  # closed meanwhile
                pass
        return count

    gc.collect()  # earlier tests' loaders (reference cycles) go first
    before = open_shards()
    pipes = loaders(tiny_shards, "dali", rank(0, 1), batch_size=4)
    for epoch in (0, 1):
        batches(pipes, epoch)
    shards = len(json.loads((tiny_shards / "index.json").read_text())["splits"]["train"]["shards"])
    assert open_shards() - before == shards  # every train shard, once, over two epochs
    del pipes
    gc.collect()
    assert open_shards() == before


@pytest.mark.cli
def test_an_incomplete_copy_of_the_shards_is_one_clear_error(tiny_shards, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_shards, copy)
    shard = copy / "train-000001.tar"
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(UserError, match=r"train-000001.tar is 1000 bytes, the index says \d+ bytes: an incomplete"):
        check_data(copy)
    result = run_cli("check-data", "--data", copy)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.unit
def test_stage_refuses_a_target_without_the_space_and_copies_nothing(tiny_shards, tmp_path, monkeypatch):
    """`stage` checks the free space before it copies (disk_usage answers as a nearly full disk would)."""
    need = sum(meta["bytes"] for meta in json.loads((tiny_shards / "index.json").read_text())["files"].values())
    monkeypatch.setattr(stage.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 10**12, need - 1))
    with pytest.raises(UserError, match=rf"--to {tmp_path / 'local'}: 0.00 GB to copy, 0.00 GB free there"):
        stage.stage(tiny_shards, tmp_path / "local", workers=2)
    assert list((tmp_path / "local").iterdir()) == []


@pytest.mark.cli
def test_bench_loader_counts_the_files_opened_per_epoch(tiny_data, tiny_shards):
    """bench-loader with a --data for each: a folder tree opens every image each epoch, shards nothing (each
    shard is opened once per process, before the timed epochs)."""
    result = run_cli(
        "bench-loader",
        "--data",
        tiny_data,
        "--data",
        tiny_shards,
        "--loader",
        "dali,torchvision",
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
    rows = {(r["loader"], r["data_kind"]): r for r in json.loads(result.stdout)["results"]}
    assert list(rows) == [("dali", "folder"), ("torchvision", "folder"), ("dali", "packed"), ("torchvision", "packed")]
    assert rows["torchvision", "folder"]["opens_per_epoch"] == 48  # one open per image
    assert rows["dali", "folder"]["opens_per_epoch"] == 48  # the feed reads the epoch's images, nothing past it
    assert rows["dali", "packed"]["opens_per_epoch"] == rows["torchvision", "packed"]["opens_per_epoch"] == 0
    assert all(r["images_per_repeat"] == 96 and r["images_per_sec"] > 0 for r in rows.values())


@pytest.mark.horovod
def test_training_from_shards_equals_training_from_the_tree(tiny_data, tiny_shards, tmp_path):
    """2 ranks, Gloo, the torchvision loader: the same losses, accuracies and weights, bit for bit."""
    runs = {}
    for name, data in (("tree", tiny_data), ("shards", tiny_shards)):
        runs[name] = tmp_path / name
        run_horovod("--data", data, "--output", runs[name], "--epochs", "2", "--loader", "torchvision", *TINY_TRAIN)
    a, b = (read_metrics(runs[name]) for name in ("tree", "shards"))
    assert len(a) == len(b) == 2
    for x, y in zip(a, b):
        for key in (
            "lr",
            "train_loss",
            "train_top1",
            "val_loss",
            "val_top1",
            "val_top5",
            "val_images",
            "weights_digests",
        ):
            assert x[key] == y[key], key
    wa, wb = (
        torch.load(runs[name] / "checkpoints" / "epoch-0002.pt", weights_only=True)["model"]
        for name in ("tree", "shards")
    )
    assert all(torch.equal(wa[name], wb[name]) for name in wa)


@pytest.mark.horovod
@pytest.mark.parametrize("loader", LOADERS)
def test_resume_from_shards_equals_uninterrupted(tiny_shards, tmp_path, loader):
    whole, split = tmp_path / "whole", tmp_path / "split"
    train = ["--data", tiny_shards, "--loader", loader, *TINY_TRAIN]
    result = run_horovod("--output", whole, "--epochs", "2", *train, controller="--mpi")
    if loader == "dali":
        assert "DALI, decoding on the CPU, 1 threads per rank, read from packed shards" in result.stdout
    run_horovod("--output", split, "--epochs", "1", *train, controller="--mpi")
    run_horovod("--output", split, "--epochs", "2", "--resume", *train, controller="--mpi")
    assert_epoch_2_equal(whole, split)
