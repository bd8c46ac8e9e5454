"""`hvd-imagenet prepare-imagenet` on small archives in the exact official formats (data/make_archives.py):
the ImageFolder tree with every val image in its labelled class, the odd files reported, a re-run that skips
finished classes, the md5 check, and one-line errors for a missing, corrupt or mismatched archive."""

import io
import json
import os
import tarfile

import pytest
from conftest import run_cli
from torchvision.datasets import ImageFolder

from hvd_imagenet.data import prepare
from hvd_imagenet.data.make_archives import add_file, make_archives
from hvd_imagenet.errors import UserError

pytestmark = pytest.mark.cli


@pytest.fixture(scope="module")
def archives(tmp_path_factory):
    return make_archives(tmp_path_factory.mktemp("downloads") / "archives")


def prepare_cli(archives, output, *extra, labels="devkit", verify=False):
    source = ["--devkit", archives.devkit] if labels == "devkit" else ["--val-labels", archives.kaggle]
    return run_cli(
        "prepare-imagenet",
        "--train-tar",
        archives.train,
        "--val-tar",
        archives.val,
        *source,
        "--output",
        output,
        "--workers",
        "2",
        *([] if verify else ["--no-verify"]),
        *extra,
    )


@pytest.mark.parametrize("labels", ["devkit", "kaggle"])
def test_official_archives_become_the_imagefolder_tree(archives, tmp_path, labels):
    output = tmp_path / "imagenet"
    result = prepare_cli(archives, output, labels=labels)
    assert result.returncode == 0, result.stderr
    val = ImageFolder(output / "val")
    assert val.classes == archives.wnids == ImageFolder(output / "train").classes
    placed = {os.path.basename(path): val.classes[label] for path, label in val.samples}
    assert placed == archives.val_labels  # every val image in the class the labels give it, none lost
    for wnid, names in archives.train_files.items():
        assert sorted(p.name for p in (output / "train" / wnid).iterdir()) == sorted(names)
    with tarfile.open(archives.val) as tar:  # the bytes unchanged
        member = tar.getmembers()[3]
        assert tar.extractfile(member).read() == (output / "val" / placed[member.name] / member.name).read_bytes()

    report = json.loads((output / "check-data.json").read_text())
    assert report["odd"] == archives.odd  # grayscale, CMYK, PNG-as-JPEG: found and named
    assert report["unreadable"] == {} and report["images"] == 15 + 12
    assert len((output / "readable-files.txt").read_text().splitlines()) == 27
    for path, oddity in archives.odd.items():
        assert f"{path}: {oddity}" in result.stdout
    assert "15 train and 12 val images in 3 classes (the official set: 1,281,167 / 50,000 / 1,000" in result.stdout
    assert run_cli("check-data", "--data", output).returncode == 0  # what train checks, and reads


def test_a_rerun_skips_finished_classes_and_redoes_an_unfinished_one(archives, tmp_path):
    output = tmp_path / "imagenet"
    assert prepare_cli(archives, output).returncode == 0
    first, second, third = archives.wnids
    kept = {p: p.stat().st_mtime_ns for p in (output / "train" / first).iterdir()}
    # As a run stopped while extracting `second` leaves it: in the state directory, not in train/.
    (output / "train" / second).rename(output / ".prepare" / "train" / second)
    (output / ".prepare" / "train" / f"{second}.json").unlink()
    next((output / ".prepare" / "train" / second).iterdir()).unlink()

    result = prepare_cli(archives, output)
    assert result.returncode == 0, result.stderr
    assert "2 of 3 classes already extracted" in result.stdout and "val already extracted" in result.stdout
    assert {p: p.stat().st_mtime_ns for p in (output / "train" / first).iterdir()} == kept  # not rewritten
    assert sorted(p.name for p in (output / "train" / second).iterdir()) == sorted(archives.train_files[second])
    assert not (output / ".prepare" / "train" / second).exists()
    assert json.loads((output / "check-data.json").read_text())["images"] == 27


def test_the_md5_check_refuses_other_archives_and_remembers_a_match(archives, tmp_path, monkeypatch):
    result = prepare_cli(archives, tmp_path / "out", verify=True)
    assert result.returncode == 2
    assert f"--train-tar {archives.train}: md5 " in result.stderr
    assert "is not that of the published ILSVRC2012_img_train.tar (1d675b47d978889d74fa0da5fadfb00e)" in result.stderr

    # The same check with these archives' sums as the published ones: it passes, a whole run then wants the
    # official counts, and a second check of the same state directory reads nothing.
    sums = {
        role: prepare.md5_of(path, prepare.WorkProgress("md5", 1, "archives", terminal=False))
        for role, path in (("train", archives.train), ("val", archives.val), ("devkit", archives.devkit))
    }
    monkeypatch.setattr(prepare, "OFFICIAL", {role: (name, sums[role]) for role, (name, _) in prepare.OFFICIAL.items()})
    state = tmp_path / "state"
    state.mkdir()
    roles = {"train": archives.train, "val": archives.val, "devkit": archives.devkit}
    prepare.verify(roles, state)
    assert len(json.loads((state / "verified.json").read_text())) == 3
    options = prepare.PrepareOptions(
        train_tar=str(archives.train),
        val_tar=str(archives.val),
        devkit=str(archives.devkit),
        output=str(tmp_path / "verified"),
        workers=2,
    )
    with pytest.raises(
        UserError,
        match="15 train and 12 val images in 3 classes from the published archives, "
        "which hold 1,281,167 / 50,000 / 1,000",
    ):
        prepare.run(options)
    monkeypatch.setattr(prepare, "md5_of", lambda *_: pytest.fail("hashed again"))
    prepare.verify(roles, state)


def test_an_unreadable_image_is_left_out_of_the_file_list_and_exits_1(archives, tmp_path):
    """A truncated JPEG in a class's tar: the tree is complete (the file is there), check-data's report names
    it, readable-files.txt leaves it out, and the exit status is 1."""
    first = archives.wnids[0]
    broken_name = f"{first}_9999.JPEG"
    train = tmp_path / "ILSVRC2012_img_train.tar"
    with tarfile.open(archives.train) as source, tarfile.open(train, "w") as target:
        for member in source.getmembers():
            data = source.extractfile(member).read()
            if member.name == f"{first}.tar":
                inner = io.BytesIO(data)
                with tarfile.open(fileobj=io.BytesIO(data)) as old, tarfile.open(fileobj=inner, mode="w") as new:
                    for image in old.getmembers():
                        new.addfile(image, old.extractfile(image))
                        whole = old.extractfile(image).read()
                    add_file(new, broken_name, whole[: len(whole) // 2])
                data = inner.getvalue()
            add_file(target, member.name, data)
    output = tmp_path / "imagenet"
    result = prepare_cli(type(archives)(**{**archives.__dict__, "train": train}), output)
    assert result.returncode == 1, result.stderr
    broken = f"train/{first}/{broken_name}"
    assert (output / broken).is_file()
    assert list(json.loads((output / "check-data.json").read_text())["unreadable"]) == [broken]
    listed = (output / "readable-files.txt").read_text().splitlines()
    assert len(listed) == 27 and broken not in listed
    assert f"1 unreadable images: train with --file-list {output / 'readable-files.txt'}" in result.stdout


def truncated(path, tmp_path):
    copy = tmp_path / path.name
    copy.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return copy


@pytest.mark.parametrize(
    "case",
    [
        "missing train tar",
        "truncated train tar",
        "devkit of another set",
        "a label missing",
        "devkit without ground truth",
        "foreign output",
    ],
)
def test_archive_problems_are_one_line_errors(archives, tmp_path, case):
    a, extra, output = archives, [], tmp_path / "out"
    if case == "missing train tar":
        a = type(a)(**{**a.__dict__, "train": tmp_path / "nowhere.tar"})
        expected = f"--train-tar {tmp_path / 'nowhere.tar'}: no such file"
    elif case == "truncated train tar":
        a = type(a)(**{**a.__dict__, "train": truncated(a.train, tmp_path)})
        expected = "truncated or corrupt"
    elif case == "devkit of another set":
        other = make_archives(tmp_path / "other", classes=4, val_per_class=5, seed=1)
        a = type(a)(**{**a.__dict__, "devkit": other.devkit})
        expected = (
            "labels for 8 images that are not in the val archive (first: ILSVRC2012_val_00000013.JPEG); "
            "the labels do not belong to this val archive"
        )
    elif case == "a label missing":
        lines = a.kaggle.read_text().splitlines()
        csv = tmp_path / "LOC_val_solution.csv"
        csv.write_text("\n".join(line for line in lines if not line.startswith("ILSVRC2012_val_00000007")) + "\n")
        a = type(a)(**{**a.__dict__, "kaggle": csv})
        extra = ["kaggle"]
        expected = "1 of the val archive's 12 images have no label (first: ILSVRC2012_val_00000007.JPEG)"
    elif case == "devkit without ground truth":
        devkit = tmp_path / "ILSVRC2012_devkit_t12.tar.gz"
        with tarfile.open(a.devkit) as source, tarfile.open(devkit, "w:gz") as target:
            for member in source.getmembers():
                if not member.name.endswith("ground_truth.txt"):
                    target.addfile(member, source.extractfile(member))
        a = type(a)(**{**a.__dict__, "devkit": devkit})
        expected = "no data/ILSVRC2012_validation_ground_truth.txt in it"
    else:
        output.mkdir()
        (output / "notes.txt").write_text("mine")
        expected = "holds files that prepare-imagenet did not write"
    result = prepare_cli(a, output, labels=extra[0] if extra else "devkit")
    assert result.returncode == 2, result.stdout + result.stderr
    assert expected in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (output / "train").exists() or not any((output / "train").iterdir())  # checked before extracting


def test_the_readme_path_from_archives_to_shards(tmp_path):
    """make-dataset --kind archives (a rehearsal), prepare-imagenet with the command it prints, pack, then the
    shards read by check-data: the README's steps, through the CLI."""
    made = run_cli(
        "make-dataset",
        "--kind",
        "archives",
        "--output",
        tmp_path / "downloads",
        "--classes",
        "2",
        "--train-per-class",
        "3",
        "--val-per-class",
        "2",
    )
    assert made.returncode == 0, made.stderr
    command = made.stdout.strip().splitlines()[-1].split()  # hvd-imagenet prepare-imagenet ... --output DIR ...
    command[command.index("DIR")] = str(tmp_path / "imagenet")
    prepared = run_cli(*command[1:])
    assert prepared.returncode == 0, prepared.stderr
    assert "6 train and 4 val images in 2 classes" in prepared.stdout
    assert run_cli("pack", "--data", tmp_path / "imagenet", "--output", tmp_path / "shards").returncode == 0
    checked = run_cli("check-data", "--data", tmp_path / "shards", "--json")
    assert checked.returncode == 0 and json.loads(checked.stdout)["images"] == 10
