"""`hvd-imagenet train` under a real horovodrun: 2 ranks on localhost, Gloo and MPI controllers."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import (
    BIN,
    TINY_TRAIN,
    assert_epoch_2_equal,
    cli_env,
    run_cli,
    run_horovod,
    shared_memory_files,
)
from PIL import Image

from hvd_imagenet.metrics import read_metrics
from hvd_imagenet.model import build_model, weights_digest

pytestmark = pytest.mark.horovod

METRIC_KEYS = {
    "epoch",
    "lr",
    "train_loss",
    "train_top1",
    "val_loss",
    "val_top1",
    "val_top5",
    "images_per_sec",
    "epoch_seconds",
    "val_seconds",
    "world_size",
    "global_batch",
    "val_images",
    "steps",
    "weights_digests",
}


def check_run(output, epochs, global_batch, val_images):
    """What every finished run must leave: resolved config, one metrics record per epoch, checkpoints,
    TensorBoard events, and the same weights on every rank (checked against rank 0's checkpoint)."""
    config = json.loads((output / "config.json").read_text())
    assert config["world_size"] == 2 and config["global_batch"] == global_batch
    assert config["peak_lr"] == pytest.approx(0.1 * global_batch / 256)
    records = read_metrics(output)
    assert [r["epoch"] for r in records] == list(range(1, epochs + 1))
    for record in records:
        assert METRIC_KEYS <= set(record)
        assert record["world_size"] == 2 and record["global_batch"] == global_batch
        assert record["val_images"] == val_images  # every val image counted exactly once across ranks
        assert 0 <= record["val_top1"] <= record["val_top5"] <= 100
        assert record["train_loss"] > 0 and record["images_per_sec"] > 0
        assert len(record["weights_digests"]) == 2
        assert record["weights_digests"][0] == record["weights_digests"][1]
    state = torch.load(output / "checkpoints" / f"epoch-{epochs:04d}.pt", weights_only=True)
    model = build_model(config["arch"], config["num_classes"], zero_init_residual=True)
    model.load_state_dict(state["model"])
    assert weights_digest(model) == records[-1]["weights_digests"][0]
    assert list((output / "tensorboard").glob("events.out.tfevents.*"))
    return records, state


def test_gloo_two_ranks(tiny_data, tmp_path):
    output = tmp_path / "run"
    result = run_horovod(
        "--data", tiny_data, "--output", output, "--epochs", "2", "--loader", "torchvision", *TINY_TRAIN
    )
    records, state = check_run(output, epochs=2, global_batch=8, val_images=20)
    assert "input: torchvision DataLoader, 1 worker processes per rank" in result.stdout
    assert state["step"] == records[-1]["steps"] == 2 * 6  # 24 images per rank / n=4
    assert records[0]["lr"] == pytest.approx(0.1 * 8 / 256)  # kn=8 < 256: no warmup ramp, peak from the start
    assert records[1]["lr"] == pytest.approx(0.1 * 8 / 256 * 0.1)  # x0.1 once 1 epoch is done (--lr-steps 1)
    assert "val top1" in result.stdout  # rank 0's per-epoch table


def test_mpi_fp16_virtual_workers(tiny_data, tmp_path):
    """MPI controller, DALI with channels_last (NHWC) batches, fp16 gradient compression, 2 micro-batches
    per allreduce: kn = 2 x 2 x 4 = 16."""
    output = tmp_path / "run"
    result = run_horovod(
        "--data",
        tiny_data,
        "--output",
        output,
        "--epochs",
        "1",
        "--compression",
        "fp16",
        "--batches-per-allreduce",
        "2",
        "--loader",
        "dali",
        "--channels-last",
        *TINY_TRAIN,
        controller="--mpi",
    )
    assert "input: DALI, decoding on the CPU, 1 threads per rank" in result.stdout
    records, state = check_run(output, epochs=1, global_batch=16, val_images=20)
    assert state["step"] == 3  # 6 micro-batches per rank / 2 per step


def test_virtual_workers_in_one_pass_train_as_passes_one_after_another(tiny_data, tmp_path):
    """kn = 2 ranks x 2 passes x 2 virtual workers per pass x n=4 = 32 trains as 2 ranks x 4 passes of 4: the
    same images in each step (the loader's batch is V x n), BN over each 4, the same lr and steps, so the same
    losses and weights to float tolerance after 2 epochs (torchvision, one worker: the same crops)."""
    sequential, one_pass = tmp_path / "sequential", tmp_path / "one-pass"
    train = ["--data", tiny_data, "--loader", "torchvision", "--epochs", "2", *TINY_TRAIN]
    run_horovod("--output", sequential, "--batches-per-allreduce", "4", *train)
    result = run_horovod(
        "--output", one_pass, "--batches-per-allreduce", "2", "--virtual-workers-per-pass", "2", *train
    )
    assert "virtual workers: 2 per pass (8 images, BN over each 4), 2 pass(es) per step" in result.stdout
    (a, state_a), (b, state_b) = (
        check_run(run, epochs=2, global_batch=32, val_images=20) for run in (sequential, one_pass)
    )
    assert state_a["step"] == state_b["step"] == 2  # 24 images per rank, 16 per rank per step
    for key in ("lr", "train_loss", "train_top1", "val_loss"):
        assert [r[key] for r in a] == pytest.approx([r[key] for r in b], rel=1e-4), key
    for name, tensor in state_a["model"].items():
        torch.testing.assert_close(state_b["model"][name], tensor, rtol=1e-4, atol=1e-5, msg=name)


def test_memory_loader_shares_one_copy_per_node_and_leaves_nothing(tiny_data, tmp_path):
    """--loader memory with 2 ranks on one node: one decoded copy in /dev/shm that both map, each rank
    decoding half; the files are unlinked once mapped, so none is left after the job."""
    before = shared_memory_files()
    result = run_horovod(
        "--data", tiny_data, "--output", tmp_path / "run", "--epochs", "1", "--loader", "memory", *TINY_TRAIN
    )
    assert "input: memory: decoded once, 0.2 MiB of uint8 shared by the node's 2 ranks" in result.stdout
    check_run(tmp_path / "run", epochs=1, global_batch=8, val_images=20)
    assert shared_memory_files() == before


@pytest.mark.parametrize("loader", ["dali", "torchvision", "memory"])
def test_resume_equals_uninterrupted(tiny_data, tmp_path, loader):
    """Stop after epoch 1, resume for epoch 2: the same metrics and weights as one 2-epoch run (CPU). The
    torchvision workers persist across epochs in the uninterrupted run and start fresh in the resumed one."""
    whole, split = tmp_path / "whole", tmp_path / "split"
    train = ["--data", tiny_data, "--loader", loader, *TINY_TRAIN]
    run_horovod("--output", whole, "--epochs", "2", *train)
    run_horovod("--output", split, "--epochs", "1", *train)
    result = run_horovod("--output", split, "--epochs", "2", "--resume", *train)
    assert "continuing from" in result.stdout
    assert_epoch_2_equal(whole, split)


def test_dali_run_with_odd_files_and_a_file_list(tiny_data, tmp_path):
    """Real ImageNet's odd files and one corrupt file. Without a file list the job stops on both ranks, the
    error naming the file; with `check-data --write-file-list` it trains on the readable files."""
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    first, second = sorted((data / "train").iterdir())[:2]
    with Image.open(sorted(first.iterdir())[0]) as image:
        image.convert("L").save(first / "gray.JPEG")
        image.convert("CMYK").save(first / "cmyk.JPEG")
        image.save(second / "png.JPEG", format="PNG")
    broken = second / "broken.JPEG"
    broken.write_bytes((first / "gray.JPEG").read_bytes()[:2000])  # truncated
    train = ["--data", data, "--loader", "dali", "--epochs", "1", *TINY_TRAIN]

    failed = run_horovod("--output", tmp_path / "failed", *train, check=False, timeout=180)
    assert failed.returncode != 0
    assert f"cannot decode {broken}" in failed.stdout + failed.stderr
    assert "another rank failed" in failed.stdout + failed.stderr  # the other rank stopped too, in one line

    file_list = tmp_path / "files.txt"
    assert run_cli("check-data", "--data", data, "--write-file-list", file_list).returncode == 0
    output = tmp_path / "run"
    run_horovod("--output", output, "--file-list", file_list, *train)
    records, _ = check_run(output, epochs=1, global_batch=8, val_images=20)
    assert records[0]["steps"] == 51 // 2 // 4  # 48 + 3 odd readable train files over 2 ranks, n=4


def test_run_local_script(tiny_data, tmp_path):
    """scripts/run_local.sh, the one-machine entry point: N workers under horovodrun, train flags passed on."""
    output = tmp_path / "run"
    script = Path(__file__).resolve().parent.parent / "scripts" / "run_local.sh"
    result = subprocess.run(
        [
            "bash",
            str(script),
            "2",
            "--data",
            str(tiny_data),
            "--output",
            str(output),
            "--epochs",
            "1",
            "--loader",
            "torchvision",
            *TINY_TRAIN,
        ],
        capture_output=True,
        text=True,
        env={**cli_env(), "VENV": str(BIN.parent)},
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "run_local: 2 workers, horovodrun --gloo" in result.stdout
    check_run(output, epochs=1, global_batch=8, val_images=20)


def test_powersgd_resume_equals_uninterrupted(tiny_data, tmp_path):
    """--compression powersgd from step 0, stopped after epoch 1 and resumed: every rank's error memory and Q
    come back from its own file beside the checkpoint, so epoch 2 equals the uninterrupted run's, bit for bit.
    (Before, the resume hung: Horovod's broadcast_optimizer_state stepped the PowerSGD optimizer on rank 1
    only, which posted an allreduce rank 0 never joined.)"""
    whole, split = tmp_path / "whole", tmp_path / "split"
    train = [
        "--data",
        tiny_data,
        "--loader",
        "torchvision",
        "--compression",
        "powersgd",
        "--powersgd-start-step",
        "0",
        *TINY_TRAIN,
    ]
    run_horovod("--output", whole, "--epochs", "2", *train)
    run_horovod("--output", split, "--epochs", "1", *train)
    saved = sorted(p.name for p in (split / "checkpoints").iterdir())
    assert saved == ["epoch-0001.pt", "epoch-0001.rank00000.pt", "epoch-0001.rank00001.pt"]
    errors = [
        torch.load(split / "checkpoints" / f"epoch-0001.rank0000{r}.pt", weights_only=True)["errors"] for r in (0, 1)
    ]
    assert errors[0] and any(not torch.equal(errors[0][i], errors[1][i]) for i in errors[0])  # per rank
    result = run_horovod("--output", split, "--epochs", "2", "--resume", *train, timeout=240)
    assert "continuing from" in result.stdout
    assert_epoch_2_equal(whole, split)


def test_powersgd_resume_on_another_world_size_starts_its_error_memory_empty(tiny_data, tmp_path):
    """2 ranks' error memories do not map onto 1 rank: with --allow-resize the run goes on, says so, and
    PowerSGD starts afresh (its checkpoint then holds the one rank's file)."""
    output = tmp_path / "run"
    train = [
        "--data",
        tiny_data,
        "--output",
        output,
        "--loader",
        "torchvision",
        "--compression",
        "powersgd",
        "--powersgd-start-step",
        "0",
        *TINY_TRAIN,
    ]
    run_horovod("--epochs", "1", *train)
    result = run_horovod("--epochs", "2", "--resume", "--allow-resize", *train, np=1)
    assert "PowerSGD's error memory was kept by 2 ranks; on 1 it starts empty" in result.stdout
    assert [(r["epoch"], r["world_size"]) for r in read_metrics(output)] == [(1, 2), (2, 1)]
    assert (output / "checkpoints" / "epoch-0002.rank00000.pt").exists()
    assert not (output / "checkpoints" / "epoch-0002.rank00001.pt").exists()
