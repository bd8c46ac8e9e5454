"""The host-sync budget of the training step (issue 15): at most host_sync.SYNC_BUDGET of our own per optimizer
step in steady state, beside Horovod's synchronize() and GradScaler's own check. On the CPU the count is of
the torch operations that would synchronize a GPU (host_sync.count_syncs); tests/test_gpu.py counts CUDA's
own report on a GPU. Measured before the fix (2 micro-batches per step): fp32 1, DALI batches 3 (a blocking
label copy per micro-batch), amp-fp16 2 (get_scale() twice) + GradScaler's own, PowerSGD 2."""

import json

import pytest
import torch
from conftest import run_cli

from hvd_imagenet import host_sync
from hvd_imagenet.model import weights_digest


@pytest.mark.unit
def test_the_counter_sees_what_would_sync_a_gpu():
    x = torch.ones(4)
    with host_sync.count_syncs() as log:
        x.sum().item()
        bool(x.sum() > 0)
        x.tolist()
        x.cpu()
        x.nonzero()
        float(x[0])
        torch.tensor([1.0, 2.0], device="cpu")
        f"{x}"
        x.to("cpu")  # a device, blocking: counted when called from this package only, not from a test
    assert [s.what for s in log.syncs] == [
        "item",
        "__bool__",
        "tolist",
        "cpu",
        "nonzero",
        "__float__",
        "torch.tensor(..., device=...)",
        "__format__",
    ]
    assert {s.owner for s in log.syncs} == {"other"}  # no frame of hvd_imagenet on the way
    with host_sync.count_syncs() as log:
        x.to(torch.float64)  # a dtype only: no copy between devices
        x.to("cpu", non_blocking=True)
        torch.zeros(3, device="cpu")  # a fill, no data from the host
        x * 2 + 1
    assert log.syncs == []


@pytest.mark.unit
def test_the_counter_charges_each_sync_to_its_call_site_in_the_package():
    """weights_digest reads its sum on the host once a call (until issue 28, two sums per tensor: 7 tensors
    here, 14 syncs): three calls, three syncs, each charged to model.py, "ours"."""
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    with host_sync.count_syncs() as log:
        for _ in range(3):
            weights_digest(model)
    assert log.count("ours") == 3
    (site,) = log.sites("ours")
    assert site.startswith("hvd_imagenet/model.py:") and "(weights_digest): item" in site


CASES = [
    ("fp32", "synthetic", "none", "sgd"),
    ("amp-bf16", "synthetic", "none", "sgd"),
    ("amp-fp16", "synthetic", "none", "sgd"),
    ("fp32", "dali", "none", "sgd"),
    ("amp-bf16", "dali", "none", "sgd"),
    ("amp-fp16", "dali", "none", "sgd"),
    ("fp32", "synthetic", "powersgd", "sgd"),
    ("fp32", "synthetic", "none", "lars"),
    ("amp-fp16", "synthetic", "none", "lars"),
]


def step_syncs(
    data, precision: str, loader: str, compression: str, np: int, *flags: str, optimizer: str = "sgd"
) -> dict:
    """bench-train --count-syncs 3 as a command: the host syncs of steady-state steps of the real step unit (the
    one `train` runs), 2 micro-batches of n per step (a per-micro-batch sync shows twice), NHWC weights and
    batches. 3 counted steps after 2 others, all within the first epoch of tiny_data (24 images per rank at
    2 ranks, 4 per step: 6 steps). The noise probe is on (train's default), LARS where asked."""
    done = run_cli(
        "bench-train",
        "--backend",
        "horovod",
        "--np",
        str(np),
        "--compression",
        compression,
        "--powersgd-start-step",
        "0",
        "--arch",
        "resnet18",
        "--image-size",
        "32",
        "--batch-size",
        "2",
        "--batches-per-allreduce",
        "2",
        "--loader",
        loader,
        "--data",
        data,
        "--precision",
        precision,
        "--layout",
        "nhwc",
        "--optimizer",
        optimizer,
        "--steps",
        "1",
        "--warmup",
        "1",
        "--repeats",
        "1",
        "--count-syncs",
        "3",
        "--json",
        *flags,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(done.stdout)["rows"][0]["host_syncs"]


@pytest.mark.horovod
@pytest.mark.parametrize("precision, loader, compression, optimizer", CASES)
def test_training_step_stays_within_the_host_sync_budget(tiny_data, precision, loader, compression, optimizer):
    """On 2 Gloo ranks, one core each: at most the budget, and exactly the finite check."""
    syncs = step_syncs(tiny_data, precision, loader, compression, 2, "--threads", "1", optimizer=optimizer)
    assert syncs["steps"] == 3 and syncs["budget_per_step"] == host_sync.SYNC_BUDGET
    assert syncs["per_step"] <= host_sync.SYNC_BUDGET, f"over budget: {syncs['sites']}"
    assert syncs["per_step"] == 1  # the finite check: every step must know whether it was applied
    (site,) = syncs["sites"]
    assert site.startswith("hvd_imagenet/step.py:")
    assert syncs["excluded_per_step"]["GradScaler"] == (1 if precision == "amp-fp16" else 0)
