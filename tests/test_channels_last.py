"""--channels-last: NHWC weights (and batches) under Horovod with our patch, on the CPU under 2 ranks, Gloo and
MPI. Horovod 0.28.1 refuses tensors that are not is_contiguous(); its C++ side reduces flat buffers, so a
tensor dense in the channels_last format reduces correctly when every rank holds the same layout."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import cli_env, horovodrun, run_horovod

from hvd_imagenet.metrics import read_metrics

pytestmark = pytest.mark.horovod

WORKER = Path(__file__).with_name("collectives_worker.py")


def run_collectives(tmp_path: Path, np: int, controller: str) -> dict:
    """tests/collectives_worker.py under horovodrun; what rank 0 found."""
    result = tmp_path / f"collectives{controller}.json"
    command = horovodrun(np, controller, sys.executable, WORKER, result)
    done = subprocess.run(command, capture_output=True, text=True, env=cli_env(), timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(result.read_text())


def check_collectives(found: dict) -> None:
    """Every element-wise collective gives the right values in the input's layout; others still refuse NHWC."""
    assert found["is_nhwc"]
    for check in (
        "allreduce",
        "allreduce_output_nhwc",
        "allreduce_in_place",
        "grouped_allreduce",
        "fp16_output_nhwc",
        "broadcast",
        "weights_nhwc",
        "grads_nhwc",
        "step_digests_equal",
    ):
        assert found[check] is True, check
    assert found["fp16_max_error"] <= 1.0  # half an fp16 ulp at the sums' magnitude (~2000)
    assert found["not_dense"] == "Tensor is required to be contiguous or dense in the channels_last memory format."
    assert found["allgather_nhwc"] == "Tensor is required to be contiguous."  # concatenates along dim 0


@pytest.mark.parametrize("controller", ["--gloo", "--mpi"])
def test_horovod_reduces_and_broadcasts_dense_nhwc_tensors(tmp_path, controller):
    check_collectives(run_collectives(tmp_path, 2, controller))


# cifar_resnet20 at 32 px: convolutions in NHWC and NCHW round differently, and the runs must stay within float
# tolerance (measured: weights 1.7e-7 apart after 6 steps). Not resnet18 at 32 px: its last stage is 1 x 1 px,
# BN normalizes over 4 values there and amplifies the rounding (measured: 1.5e-3 apart).
TRAIN = [
    "--arch",
    "cifar_resnet20",
    "--image-size",
    "32",
    "--val-resize",
    "36",
    "--batch-size",
    "4",
    "--warmup-epochs",
    "1",
    "--lr-steps",
    "1",
    "--workers",
    "1",
    "--loader",
    "torchvision",
    "--epochs",
    "1",
]


@pytest.fixture(scope="module")
def nchw_run(tiny_data, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("nchw") / "run"
    run_horovod("--data", tiny_data, "--output", output, *TRAIN)
    return output


def model_state(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "epoch-0001.pt", weights_only=True)["model"]


@pytest.mark.parametrize("controller", ["--gloo", "--mpi"])
def test_channels_last_training_matches_nchw(tiny_data, tmp_path, nchw_run, controller):
    """2 ranks, one epoch of 6 steps: NHWC weights on both ranks, one digest for both, and the NCHW run's
    losses and weights to float tolerance."""
    output = tmp_path / "run"
    run_horovod("--data", tiny_data, "--output", output, "--channels-last", *TRAIN, controller=controller)
    nhwc, nchw = read_metrics(output)[0], read_metrics(nchw_run)[0]
    assert nhwc["weights_digests"][0] == nhwc["weights_digests"][1]
    for key in ("train_loss", "val_loss"):
        assert nhwc[key] == pytest.approx(nchw[key], rel=1e-5), key
    a, b = model_state(output), model_state(nchw_run)
    assert a["features.0.weight"].is_contiguous(memory_format=torch.channels_last)  # saved as trained
    floats = [k for k in a if a[k].is_floating_point()]
    difference = sum((a[k].double() - b[k].double()).square().sum() for k in floats).sqrt()
    assert difference / sum(b[k].double().square().sum() for k in floats).sqrt() < 1e-5
