"""The CLI as a user meets it: bad inputs end in one clear line, `schedule` prints the paper's numbers."""

import csv
import io
import shutil

import pytest
from conftest import run_cli

from hvd_imagenet.cli import COMMANDS, main


@pytest.fixture
def data_copy(tiny_data, tmp_path):
    copy = tmp_path / "data"
    shutil.copytree(tiny_data, copy)
    return copy


def bad_cases(data_copy, tmp_path):
    first = sorted((data_copy / "train").iterdir())[0]
    return {
        "missing data dir": (["--data", tmp_path / "nowhere"], "no such directory", None),
        "empty class folder": (["--data", data_copy], "has no images", lambda: [p.unlink() for p in first.iterdir()]),
        "classes differ": (
            ["--data", data_copy],
            "different classes",
            lambda: shutil.rmtree(data_copy / "val" / first.name),
        ),
        "batch size 0": (["--data", data_copy, "--batch-size", "0"], "--batch-size must be >= 1", None),
        "unknown arch": (["--data", data_copy, "--arch", "vgg16"], "is not a known ResNet", None),
        "warmup longer than training": (
            ["--data", data_copy, "--epochs", "3", "--warmup-epochs", "5"],
            "longer than --epochs",
            None,
        ),
        "negative lr": (["--data", data_copy, "--base-lr", "-0.1"], "--base-lr must be > 0", None),
        "crop area 0": (["--data", data_copy, "--min-crop-area", "0"], "--min-crop-area must be in (0, 1]", None),
        "unknown compression": (["--data", data_copy, "--compression", "zip"], "--compression must be", None),
        "not a number": (["--data", data_copy, "--epochs", "many"], "invalid int value", None),
        "missing file list": (
            ["--data", data_copy, "--file-list", tmp_path / "none.txt"],
            "none.txt: No such file or directory",
            None,
        ),
        "file list without val": (
            ["--data", data_copy, "--file-list", tmp_path / "train-only.txt"],
            "no val images in --file-list",
            lambda: (tmp_path / "train-only.txt").write_text(
                "\n".join(f"train/{first.name}/{p.name}" for p in first.iterdir())
            ),
        ),
        "unknown dali device": (["--data", data_copy, "--dali-device", "tpu"], "--dali-device must be one of", None),
        "dali gpu without a GPU": (
            ["--data", data_copy, "--loader", "dali", "--dali-device", "gpu"],
            "--dali-device gpu: this rank has no GPU",
            None,
        ),
    }


CASES = [
    "missing data dir",
    "empty class folder",
    "classes differ",
    "batch size 0",
    "unknown arch",
    "warmup longer than training",
    "negative lr",
    "unknown compression",
    "not a number",
    "missing file list",
    "file list without val",
    "unknown dali device",
    "dali gpu without a GPU",
]


@pytest.mark.cli
@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_clear_line(case, data_copy, tmp_path):
    args, message, damage = bad_cases(data_copy, tmp_path)[case]
    if damage:
        damage()
    result = run_cli("train", "--output", tmp_path / "run", *args)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr


@pytest.mark.cli
@pytest.mark.parametrize("command", ["check-data", "bench-loader"])
def test_data_commands_on_a_missing_directory(command, tmp_path):
    result = run_cli(command, "--data", tmp_path / "nowhere")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"hvd-imagenet {command}: error: --data {tmp_path / 'nowhere'}: no such directory"
    ]


@pytest.mark.cli
def test_schedule_paper_numbers():
    """The issue's check: 256 workers x 32 = 8k, 5005 iterations/epoch, 90 epochs."""
    result = run_cli(
        "schedule", "--world-size", "256", "--batch-size", "32", "--epochs", "90", "--iters-per-epoch", "5005"
    )
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert len(rows) == 90 * 5005
    lr = [float(row["lr"]) for row in rows]
    assert lr[0] == pytest.approx(0.1)
    assert lr[5 * 5005] == pytest.approx(3.2) and lr[5 * 5005 - 1] == pytest.approx(3.2, rel=1e-4)
    assert lr[30 * 5005] == pytest.approx(0.32)
    assert lr[60 * 5005] == pytest.approx(0.032)
    assert lr[80 * 5005] == pytest.approx(0.0032)
    assert float(rows[30 * 5005]["epoch"]) == 30


@pytest.mark.cli
def test_schedule_rejects_warmup_past_the_end():
    result = run_cli("schedule", "--world-size", "8", "--epochs", "2", "--iters-per-epoch", "10")
    assert result.returncode == 2 and "longer than --epochs" in result.stderr


@pytest.mark.unit
@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_command_prints_its_help(command, capsys):
    """--help of every command (argparse %-formats help texts: a stray % in one breaks it)."""
    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0
    assert f"usage: hvd-imagenet {command}" in capsys.readouterr().out
