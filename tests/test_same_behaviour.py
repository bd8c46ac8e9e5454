"""scripts/same_behaviour.py, the refactor check: the same 2-rank runs with two revisions' code, compared on
their metrics (timings aside) and their checkpoints' digests."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "same_behaviour.py"


def load_script():
    spec = importlib.util.spec_from_file_location("same_behaviour", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.unit
def test_differences_names_each_field_that_changed():
    same_behaviour = load_script()
    metrics = [{"epoch": 1, "train_loss": 1.25, "val_top1": 50.0}, {"epoch": 2, "train_loss": 0.75, "val_top1": 75.0}]
    before = {"metrics": metrics, "digests": {"checkpoint": "aa", "rank00001.pt": "bb"}}
    assert same_behaviour.differences(before, before) == []

    changed = {
        "metrics": [metrics[0], {**metrics[1], "train_loss": 0.5, "noise_scale": 3.0}],
        "digests": {"checkpoint": "cc"},
    }
    assert same_behaviour.differences(before, changed) == [
        "epoch row 2: noise_scale (absent) -> 3.0",
        "epoch row 2: train_loss 0.75 -> 0.5",
        "checkpoint sha256 aa -> cc",
        "rank00001.pt sha256 bb -> (absent)",
    ]
    assert same_behaviour.differences(before, {**before, "metrics": metrics[:1]}) == ["metrics.jsonl rows: 2 -> 1"]


@pytest.mark.unit
def test_record_leaves_out_timings_and_the_config(tmp_path):
    same_behaviour = load_script()
    (tmp_path / "checkpoints").mkdir()
    row = '{"epoch": 1, "train_loss": 0.5, "epoch_seconds": %s, "images_per_sec": %s}\n'
    records = []
    for seconds, output in ((1.0, "run-a"), (2.0, "run-b")):
        (tmp_path / "metrics.jsonl").write_text(row % (seconds, 10 / seconds))
        weights = {"model": {"w": torch.arange(4.0)}, "epoch": 1, "config": {"output": output}}
        torch.save(weights, tmp_path / "checkpoints" / "epoch-0001.pt")
        torch.save({"qs": [torch.ones(2)]}, tmp_path / "checkpoints" / "epoch-0001.rank00000.pt")
        records.append(same_behaviour.record(tmp_path))
    assert records[0] == records[1]
    assert records[0]["metrics"] == [{"epoch": 1, "train_loss": 0.5}]
    assert set(records[0]["digests"]) == {"checkpoint", "rank00000.pt"}

    torch.save({"model": {"w": torch.arange(4.0) + 1e-6}, "epoch": 1}, tmp_path / "checkpoints" / "epoch-0001.pt")
    changed = same_behaviour.record(tmp_path)
    assert same_behaviour.differences(records[0], changed) == [
        f"checkpoint sha256 {records[0]['digests']['checkpoint']} -> {changed['digests']['checkpoint']}"
    ]


@pytest.mark.horovod
def test_same_revision_twice_trains_the_same_bit_for_bit():
    """HEAD against HEAD: both runs of each kind (PowerSGD; DALI with 2 passes a step) are reproducible to the
    bit, which is what lets the script tell a refactor from a change."""
    done = subprocess.run(
        [sys.executable, SCRIPT, "--before", "HEAD", "--after", "HEAD"], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout + done.stderr[-4000:]
    lines = done.stdout.splitlines()
    for run in ("powersgd", "dali-virtual"):
        (line,) = [line for line in lines if line.startswith(run)]
        epochs, before, after, verdict = line.split()[1:]
        assert (epochs, verdict) == ("3", "same") and before == after and len(before) == 16, line
    assert lines[-1] == "same behaviour: HEAD and HEAD"
