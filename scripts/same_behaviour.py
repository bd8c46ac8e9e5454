"""Does a change keep behaviour? The same small 2-rank Horovod (Gloo) runs with the code of a git revision and with
another revision's (or the working tree's), compared on what they record: every metrics.jsonl field but the
timings, a sha256 of the final checkpoint (weights, optimizer and scaler state, progress; not the config, which
names its output) and of each rank's own checkpoint file (PowerSGD's state). A refactor must print "same" on
every line; a difference is listed field by field and the exit status is 1.

    .venv/bin/python scripts/same_behaviour.py --before main              # main against the working tree
    .venv/bin/python scripts/same_behaviour.py --before e8b6068 --after HEAD

Two runs of each side, ~15 s each on 2 cores: `powersgd` (torchvision loader, PowerSGD from the first step)
and `dali-virtual` (DALI, 2 passes per step, label smoothing; the noise scale is measured). Each side's code is
`git archive`d into a temporary folder and put first on PYTHONPATH (both sides run from the temporary folder,
so the checkout's own package is not on the path); the venv (Horovod, DALI, torch) is the
current one, so a change of dependencies is not what this compares.
"""

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from hvd_imagenet.checkpoint import list_checkpoints, rank_file
from hvd_imagenet.metrics import read_metrics

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
WORKTREE = "worktree"
TRAIN = (
    "--arch cifar_resnet8 --image-size 32 --val-resize 36 --epochs 3 --warmup-epochs 1 --lr-steps 2 "
    "--batch-size 8 --base-lr 0.025 --ref-batch 16 --workers 1 --seed 3"
).split()
RUNS = {
    "powersgd": "--loader torchvision --compression powersgd --powersgd-start-step 0".split(),
    "dali-virtual": "--loader dali --batches-per-allreduce 2 --label-smoothing 0.1".split(),
}
RANKS = 2
TIMINGS = {"images_per_sec", "epoch_seconds", "val_seconds", "boundary_seconds"}


def environment(code: Path) -> dict:
    return {**os.environ, "PYTHONPATH": str(code), "PATH": f"{BIN}:{os.environ['PATH']}"}


def code_of(revision: str, folder: Path) -> Path:
    """The package as `revision` has it (the working tree for WORKTREE), checked to be what PYTHONPATH imports
    from `folder`'s parent, where the runs start."""
    code = ROOT
    if revision != WORKTREE:
        code = folder
        folder.mkdir(parents=True)
        archive = subprocess.run(
            ["git", "archive", revision, "hvd_imagenet"], cwd=ROOT, capture_output=True, check=True
        )
        subprocess.run(["tar", "-x", "-C", str(folder)], input=archive.stdout, check=True)
    where = subprocess.run(
        [sys.executable, "-c", "import hvd_imagenet; print(hvd_imagenet.__file__)"],
        env=environment(code),
        cwd=folder.parent,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    if not Path(where).is_relative_to(code):
        sys.exit(f"PYTHONPATH={code} imports hvd_imagenet from {where}, not from there")
    return code


def train(code: Path, data: Path, output: Path, flags: list[str]) -> None:
    command = [BIN / "horovodrun", "-np", str(RANKS), "-H", f"localhost:{RANKS}", "--gloo", "hvd-imagenet", "train"]
    command += ["--data", str(data), "--output", str(output), *TRAIN, *flags]
    done = subprocess.run(command, env=environment(code), cwd=output.parent, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(
            f"{' '.join(map(str, command))} failed ({done.returncode}):\n{done.stdout[-4000:]}{done.stderr[-4000:]}"
        )


def digest(value, hasher) -> None:
    """Feed a checkpoint's nested dicts, lists, tensors and numbers to `hasher`, keys in order."""
    if isinstance(value, dict):
        for key in sorted(value, key=str):
            hasher.update(repr(key).encode())
            digest(value[key], hasher)
    elif isinstance(value, (list, tuple)):
        for item in value:
            digest(item, hasher)
    elif isinstance(value, torch.Tensor):
        hasher.update(f"{value.dtype}{tuple(value.shape)}".encode())
        hasher.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    else:
        hasher.update(repr(value).encode())


def record(output: Path) -> dict:
    """What a run leaves that must not change: metrics without timings, the final checkpoints' digests."""
    digests = {}
    for newest in list_checkpoints(output / "checkpoints")[-1:]:
        for path in (newest, *(rank_file(newest, rank) for rank in range(RANKS))):
            if not path.exists():  # a rank file: only a compressor with state (PowerSGD) writes one
                continue
            state = torch.load(path, map_location="cpu", weights_only=True)
            state.pop("config", None)
            hasher = hashlib.sha256()
            digest(state, hasher)
            name = "checkpoint" if path == newest else path.name.removeprefix(f"{newest.stem}.")
            digests[name] = hasher.hexdigest()[:16]
    metrics = [{k: v for k, v in row.items() if k not in TIMINGS} for row in read_metrics(output)]
    return {"metrics": metrics, "digests": digests}


def differences(before: dict, after: dict) -> list[str]:
    """Every field in which two records differ, one line each; [] when they are the same."""
    found = []
    if len(before["metrics"]) != len(after["metrics"]):
        found.append(f"metrics.jsonl rows: {len(before['metrics'])} -> {len(after['metrics'])}")
    for row, (old, new) in enumerate(zip(before["metrics"], after["metrics"]), 1):
        for key in sorted(set(old) | set(new)):
            if old.get(key, "(absent)") != new.get(key, "(absent)"):
                found.append(f"epoch row {row}: {key} {old.get(key, '(absent)')} -> {new.get(key, '(absent)')}")
    for name in sorted(set(before["digests"]) | set(after["digests"])):
        old, new = before["digests"].get(name, "(absent)"), after["digests"].get(name, "(absent)")
        if old != new:
            found.append(f"{name} sha256 {old} -> {new}")
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", required=True, help="a git revision (main, HEAD~3, a commit)")
    parser.add_argument("--after", default=WORKTREE, help=f"a git revision, or {WORKTREE} (default)")
    parser.add_argument(
        "--keep", type=Path, help="a new folder to leave the data, the code and the runs in (default: deleted)"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="same-behaviour-") as temporary:
        work = args.keep or Path(temporary)
        data = work / "data"
        classes = "--classes 4 --train-per-class 32 --val-per-class 8 --seed 0".split()
        subprocess.run(
            [BIN / "hvd-imagenet", "make-dataset", "--output", data, *classes], check=True, capture_output=True
        )
        codes = {
            side: code_of(rev, work / f"code-{side}") for side, rev in (("before", args.before), ("after", args.after))
        }
        print(f"{'run':<14} {'epochs':>6}  {'checkpoint sha256 (before)':<26} {'after':<18} verdict")
        all_differences = []
        for name, flags in RUNS.items():
            records = {}
            for side, code in codes.items():
                train(code, data, work / f"{name}-{side}", flags)
                records[side] = record(work / f"{name}-{side}")
            found = differences(records["before"], records["after"])
            all_differences += [f"{name}: {line}" for line in found]
            epochs, digest_before = (
                len(records["after"]["metrics"]),
                records["before"]["digests"].get("checkpoint", "-"),
            )
            digest_after = records["after"]["digests"].get("checkpoint", "-")
            verdict = "same" if not found else f"DIFFERENT ({len(found)})"
            print(f"{name:<14} {epochs:>6}  {digest_before:<26} {digest_after:<18} {verdict}", flush=True)
    print("\n".join(all_differences) or f"same behaviour: {args.before} and {args.after}")
    return 1 if all_differences else 0


if __name__ == "__main__":
    sys.exit(main())
