"""`hvd-imagenet prepare-imagenet`: the three official ILSVRC2012 downloads into the tree every loader reads,
DIR/train/<wnid>/*.JPEG and DIR/val/<wnid>/*.JPEG, checked on the way.

- train: ILSVRC2012_img_train.tar holds one tar per class (n01440764.tar, ...). Each worker process reads its
  class's tar in place, at its offset in the outer archive (no temporary copy of the 140 GB), into a directory
  under DIR/.prepare/ that is renamed into train/ once the class is complete: a re-run skips the classes
  that are there and redoes the one it was in.
- val: ILSVRC2012_img_val.tar holds 50,000 flat ILSVRC2012_val_%08d.JPEG. Their labels come from the devkit
  (data/meta.mat: each synset's ILSVRC2012_ID and WNID, the 1,000 leaf synsets being the classes;
  data/ILSVRC2012_validation_ground_truth.txt: one ID per val image, in file order) or from Kaggle's
  LOC_val_solution.csv (ImageId, then the WNID first in PredictionString). A val image without its class
  folder is the classic first failure (~0 % val accuracy; DeepLearningExamples issue 144), so the labels must
  name every image of the archive, and only those, and only classes of the training set.
- every image is decoded once as it is written (check-data's scan, check.inspect_image): odd files are
  reported, unreadable ones left out of DIR/readable-files.txt (for `train --file-list`).
- the archives' md5 sums are checked against the published ones (torchvision.datasets.imagenet.ARCHIVE_META)
  unless --no-verify; a match is remembered in DIR/.prepare/verified.json (path, size, mtime), so a re-run
  does not hash 147 GB again.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
import tarfile
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from ..cpus import available_cpus
from ..errors import UserError
from ..flags import Command, check, opt
from ..progress import WorkProgress
from .check import ImageReport, inspect_image, json_report, summary, write_file_list
from .layout import check_layout

# The published ILSVRC2012 archives (torchvision.datasets.imagenet.ARCHIVE_META) and the set's counts.
OFFICIAL = {
    "train": ("ILSVRC2012_img_train.tar", "1d675b47d978889d74fa0da5fadfb00e"),
    "val": ("ILSVRC2012_img_val.tar", "29b22e2961454d5413ddabcf34fc5622"),
    "devkit": ("ILSVRC2012_devkit_t12.tar.gz", "fa75699e90414af021442c21a62c3abf"),
}
OFFICIAL_COUNTS = {"train": 1_281_167, "val": 50_000, "classes": 1_000}
FLAGS = {"train": "--train-tar", "val": "--val-tar", "devkit": "--devkit"}
STATE = ".prepare"  # DIR/.prepare/: classes being extracted, per-class scan reports, verified sums
FILE_LIST = "readable-files.txt"
REPORT = "check-data.json"
VAL_CHUNK = 500  # val images per extraction job


class Window(io.RawIOBase):
    """Bytes [start, start + size) of a file, as a file: one member of a tar, read in place."""

    def __init__(self, file, start: int, size: int):
        super().__init__()
        self.file, self.start, self.size = file, start, size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        left = self.start + self.size - self.file.tell()
        data = self.file.read(min(len(buffer), max(left, 0)))
        buffer[: len(data)] = data
        return len(data)


def open_tar(path: Path, flag: str) -> tarfile.TarFile:
    try:
        return tarfile.open(path, "r:*")
    except FileNotFoundError:
        raise UserError(f"{flag} {path}: no such file") from None
    except (tarfile.TarError, OSError) as error:
        raise UserError(f"{flag} {path}: not a readable tar archive ({error})") from None


def list_members(path: Path, flag: str) -> list[tarfile.TarInfo]:
    """The regular files of a tar, from its headers (seeking past the data)."""
    with open_tar(path, flag) as archive:
        try:
            return [member for member in archive.getmembers() if member.isfile()]
        except (tarfile.TarError, OSError) as error:  # a truncated archive fails at its end
            raise UserError(f"{flag} {path}: truncated or corrupt ({error}); download it again") from None


def extract_class(train_tar: str, wnid: str, offset: int, size: int, output: str) -> tuple[str, int, int]:
    """One class of the train archive: its inner tar, read in place, into OUTPUT/.prepare/train/<wnid>/, each
    image scanned as it is written, then renamed to OUTPUT/train/<wnid>/. Returns (wnid, images, bytes). Runs in
    a worker process."""
    root = Path(output)
    partial, final = root / STATE / "train" / wnid, root / "train" / wnid
    shutil.rmtree(partial, ignore_errors=True)  # a class an earlier run did not finish
    partial.mkdir(parents=True)
    reports, written = [], 0
    with open(train_tar, "rb") as outer:
        outer.seek(offset)
        try:
            with tarfile.open(fileobj=io.BufferedReader(Window(outer, offset, size)), mode="r|") as inner:
                for member in inner:
                    if not member.isfile():
                        continue
                    name = os.path.basename(member.name)  # never a path the archive chose
                    data = inner.extractfile(member).read()
                    (partial / name).write_bytes(data)
                    reports.append(ImageReport(f"train/{wnid}/{name}", *inspect_image(data)).__dict__)
                    written += len(data)
        except (tarfile.TarError, OSError) as error:
            raise UserError(
                f"--train-tar {train_tar}: the tar of class {wnid} is corrupt ({error}); download the archive again"
            ) from None
    (root / STATE / "train" / f"{wnid}.json").write_text(json.dumps(reports))
    shutil.rmtree(final, ignore_errors=True)
    partial.rename(final)  # the class is complete
    return wnid, len(reports), written


def extract_val(val_tar: str, files: list[tuple[str, int, int, str]], output: str) -> tuple[list[dict], int]:
    """Val images (name, offset, size, wnid) into OUTPUT/.prepare/val/<wnid>/, each scanned as it is written.
    Returns the scan reports and the bytes written. Runs in a worker process."""
    partial, reports, written = Path(output) / STATE / "val", [], 0
    with open(val_tar, "rb") as archive:
        for name, offset, size, wnid in files:
            archive.seek(offset)
            data = archive.read(size)
            if len(data) != size:
                raise UserError(f"--val-tar {val_tar}: truncated at {name}; download it again")
            (partial / wnid / name).write_bytes(data)
            reports.append(ImageReport(f"val/{wnid}/{name}", *inspect_image(data)).__dict__)
            written += size
    return reports, written


def md5_of(path: Path, progress: WorkProgress) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            digest.update(chunk)
            progress.update(0, len(chunk))
    return digest.hexdigest()


def verify(archives: dict[str, Path], state: Path) -> None:
    """Each archive's md5 against the published one (in parallel); matches are remembered by path, size, mtime."""
    record = state / "verified.json"
    known = json.loads(record.read_text()) if record.exists() else {}

    def stamp(path: Path) -> str:
        stat = path.stat()
        return f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"

    todo = {role: path for role, path in archives.items() if known.get(stamp(path)) != OFFICIAL[role][1]}
    if not todo:
        return
    total = sum(path.stat().st_size for path in todo.values())
    with WorkProgress("prepare-imagenet md5", len(todo), "archives") as progress, ThreadPoolExecutor(3) as pool:
        sums = dict(zip(todo, pool.map(lambda path: md5_of(path, progress), todo.values())))
        progress.update(len(todo))
    for role, path in todo.items():
        name, expected = OFFICIAL[role]
        if sums[role] != expected:
            raise UserError(
                f"{FLAGS[role]} {path}: md5 {sums[role]} is not that of the published {name} "
                f"({expected}): a partial or corrupt download, or another archive (then pass --no-verify)"
            )
        known[stamp(path)] = expected
    record.write_text(json.dumps(known, indent=1))
    print(f"prepare-imagenet: md5 of {', '.join(str(p) for p in todo.values())} verified ({total / 1e9:.1f} GB)")


def devkit_labels(devkit: Path) -> dict[str, str]:
    """{val file name: wnid} from the devkit: meta.mat's leaf synsets map ILSVRC2012_ID to WNID, and the
    ground truth holds the ID of val image i (ILSVRC2012_val_%08d.JPEG, from 1) on line i."""
    import scipy.io

    with open_tar(devkit, "--devkit") as archive:
        found = {Path(m.name).name: m for m in archive.getmembers() if m.isfile()}
        wanted = ("meta.mat", "ILSVRC2012_validation_ground_truth.txt")
        missing = [name for name in wanted if name not in found]
        if missing:
            raise UserError(f"--devkit {devkit}: no data/{missing[0]} in it; is it ILSVRC2012_devkit_t12.tar.gz?")
        meta_bytes, truth = (archive.extractfile(found[name]).read() for name in wanted)
    synsets = scipy.io.loadmat(io.BytesIO(meta_bytes), squeeze_me=True)["synsets"]
    classes = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets if int(s["num_children"]) == 0}
    labels = {}
    for line_number, line in enumerate(truth.decode().split(), start=1):
        if int(line) not in classes:
            raise UserError(
                f"--devkit {devkit}: ground truth line {line_number} names ID {line}, which is not a "
                "leaf synset of meta.mat"
            )
        labels[f"ILSVRC2012_val_{line_number:08d}.JPEG"] = classes[int(line)]
    return labels


def kaggle_labels(path: Path) -> dict[str, str]:
    """{val file name: wnid} from Kaggle's LOC_val_solution.csv: ImageId,PredictionString (wnid x y x y ...)."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as error:
        raise UserError(f"--val-labels {path}: {error.strerror}") from None
    if not rows or not {"ImageId", "PredictionString"} <= set(rows[0]):
        raise UserError(f"--val-labels {path}: expected Kaggle's LOC_val_solution.csv (ImageId,PredictionString)")
    return {f"{row['ImageId']}.JPEG": row["PredictionString"].split()[0] for row in rows}


def check_labels(labels: dict[str, str], archive: list[str], classes: list[str], source: str) -> None:
    """The labels name every image of the val archive and only those, each with a class of the training set."""
    unlabelled = sorted(set(archive) - set(labels))
    if unlabelled:
        raise UserError(
            f"{source}: {len(unlabelled)} of the val archive's {len(archive)} images have no label "
            f"(first: {unlabelled[0]}); the labels do not belong to this val archive"
        )
    extra = sorted(set(labels) - set(archive))
    if extra:
        raise UserError(
            f"{source}: labels for {len(extra)} images that are not in the val archive (first: "
            f"{extra[0]}); the labels do not belong to this val archive"
        )
    unknown = sorted(set(labels.values()) - set(classes))
    if unknown:
        raise UserError(
            f"{source}: val labels name {len(unknown)} classes that the train archive does not have "
            f"(first: {unknown[0]})"
        )


def class_names(members: list[tarfile.TarInfo], train_tar: Path) -> dict[str, tarfile.TarInfo]:
    """{wnid: its tar in the train archive}, sorted."""
    classes = {}
    for member in members:
        name = Path(member.name).name
        if not name.endswith(".tar"):
            raise UserError(
                f"--train-tar {train_tar}: {member.name} is not a class's tar (like n01440764.tar); "
                "is this ILSVRC2012_img_train.tar?"
            )
        classes[name[: -len(".tar")]] = member
    if not classes:
        raise UserError(f"--train-tar {train_tar}: no class tars in it")
    return dict(sorted(classes.items()))


def prepare_train(train_tar: Path, classes: dict[str, tarfile.TarInfo], output: Path, workers: int) -> None:
    """Extract and scan every class not already complete, in parallel, largest first."""
    state = output / STATE / "train"
    todo = [wnid for wnid in classes if not ((output / "train" / wnid).is_dir() and (state / f"{wnid}.json").exists())]
    if len(todo) < len(classes):
        print(f"prepare-imagenet: {len(classes) - len(todo)} of {len(classes)} classes already extracted")
    todo.sort(key=lambda wnid: -classes[wnid].size)  # the largest first: the last worker does not finish alone
    with WorkProgress("prepare-imagenet train", len(todo), "classes") as progress, ProcessPoolExecutor(workers) as pool:
        jobs = [
            pool.submit(extract_class, str(train_tar), wnid, classes[wnid].offset_data, classes[wnid].size, str(output))
            for wnid in todo
        ]
        for job in as_completed(jobs):
            _, _, written = job.result()
            progress.update(1, written)


def prepare_val(
    val_tar: Path, members: list[tarfile.TarInfo], labels: dict[str, str], output: Path, workers: int
) -> None:
    """Extract and scan the val images into their classes (all of them, or none: a re-run redoes val)."""
    state = output / STATE
    if (output / "val").is_dir() and (state / "val.json").exists():
        print("prepare-imagenet: val already extracted")
        return
    partial = state / "val"
    shutil.rmtree(partial, ignore_errors=True)
    for wnid in set(labels.values()):
        (partial / wnid).mkdir(parents=True)
    files = [(Path(m.name).name, m.offset_data, m.size, labels[Path(m.name).name]) for m in members]
    chunks = [files[i : i + VAL_CHUNK] for i in range(0, len(files), VAL_CHUNK)]
    reports = []
    with WorkProgress("prepare-imagenet val", len(files), "images") as progress, ProcessPoolExecutor(workers) as pool:
        jobs = {pool.submit(extract_val, str(val_tar), chunk, str(output)): len(chunk) for chunk in chunks}
        for job in as_completed(jobs):
            chunk_reports, written = job.result()
            reports += chunk_reports
            progress.update(jobs[job], written)
    (state / "val.json").write_text(json.dumps(sorted(reports, key=lambda r: r["path"])))
    shutil.rmtree(output / "val", ignore_errors=True)
    partial.rename(output / "val")


def finish(output: Path, classes: list[str], verified: bool) -> int:
    """The tree checked as train reads it, the scan's summary, its file list and report; the counts against
    the official set's. Returns the exit status: 1 when some image cannot be decoded."""
    check_layout(output)
    state = output / STATE
    reports = [ImageReport(**r) for wnid in classes for r in json.loads((state / "train" / f"{wnid}.json").read_text())]
    reports += [ImageReport(**r) for r in json.loads((state / "val.json").read_text())]
    report = json_report(output, reports)
    counts = {split: sum(per_class.values()) for split, per_class in report["per_class"].items()}
    counts["classes"] = len(classes)
    print(summary(reports, limit=10, more=f"{output / REPORT} lists them all"))
    write_file_list(reports, output / FILE_LIST)
    (output / REPORT).write_text(json.dumps(report, indent=1))
    found = f"{counts['train']:,} train and {counts['val']:,} val images in {counts['classes']:,} classes"
    official = "{train:,} / {val:,} / {classes:,}".format(**OFFICIAL_COUNTS)
    if counts == OFFICIAL_COUNTS:
        print(f"prepare-imagenet: {found}: the official ILSVRC2012 counts")
    elif verified:
        raise UserError(
            f"{output}: {found} from the published archives, which hold {official}; the output "
            "directory holds other files, or a disk error lost some"
        )
    else:
        print(f"prepare-imagenet: {found} (the official set: {official}; --no-verify: another set)")
    unreadable = sum(1 for r in reports if r.problem)
    advice = (
        f"train with --file-list {output / FILE_LIST} to leave them out"
        if unreadable
        else f"all readable; {output / FILE_LIST} lists them"
    )
    print(
        f"prepare-imagenet: {output} is ready ({unreadable} unreadable images: {advice}); "
        f"next: hvd-imagenet pack --data {output} --output SHARDS"
    )
    return 1 if unreadable else 0


@dataclass(frozen=True)
class PrepareOptions:
    train_tar: str = opt("ILSVRC2012_img_train.tar (a tar per class inside)")
    val_tar: str = opt("ILSVRC2012_img_val.tar (50,000 JPEGs, flat)")
    output: str = opt("the data set: OUTPUT/train/<wnid>/, OUTPUT/val/<wnid>/; a re-run continues where one stopped")
    devkit: str = opt("ILSVRC2012_devkit_t12.tar.gz: the val labels (data/meta.mat and the ground truth)", "")
    val_labels: str = opt("instead of --devkit: Kaggle's LOC_val_solution.csv", "")
    verify: bool = opt("check each archive's md5 against the published one (--no-verify: other archives)", True)
    workers: int = opt("processes that extract and scan (0: the CPUs this process may use)", 0, min=0)

    def __post_init__(self):
        check(self)
        if bool(self.devkit) == bool(self.val_labels):
            raise UserError(
                "the val labels: give --devkit ILSVRC2012_devkit_t12.tar.gz or --val-labels "
                "LOC_val_solution.csv (one of them)"
            )


def start(options: PrepareOptions) -> dict[str, Path]:
    """The archives, each present; OUTPUT new, empty, or an earlier prepare-imagenet's (never another tree)."""
    archives = {"train": Path(options.train_tar), "val": Path(options.val_tar)}
    if options.devkit:
        archives["devkit"] = Path(options.devkit)
    for role, path in archives.items():
        if not path.is_file():
            raise UserError(f"{FLAGS[role]} {path}: no such file")
    output = Path(options.output)
    if output.is_dir() and any(output.iterdir()) and not (output / STATE).is_dir():
        raise UserError(f"--output {output} holds files that prepare-imagenet did not write; choose a new directory")
    (output / STATE / "train").mkdir(parents=True, exist_ok=True)
    (output / "train").mkdir(exist_ok=True)
    return archives


def run(options: PrepareOptions) -> int:
    archives, output = start(options), Path(options.output)
    if options.verify:
        verify(archives, output / STATE)
    classes = class_names(list_members(archives["train"], "--train-tar"), archives["train"])
    val_members = list_members(archives["val"], "--val-tar")
    if options.devkit:
        labels, source = devkit_labels(archives["devkit"]), f"--devkit {options.devkit}"
    else:
        labels, source = kaggle_labels(Path(options.val_labels)), f"--val-labels {options.val_labels}"
    check_labels(labels, [Path(m.name).name for m in val_members], list(classes), source)  # before an hour's work
    workers = options.workers or available_cpus()
    prepare_train(archives["train"], classes, output, workers)
    prepare_val(archives["val"], val_members, labels, output, workers)
    return finish(output, list(classes), options.verify)


COMMAND = Command(
    PrepareOptions,
    run,
    description="Exit status 1 when some image cannot be decoded (the tree is "
    "complete; DIR/readable-files.txt leaves them out).",
)
