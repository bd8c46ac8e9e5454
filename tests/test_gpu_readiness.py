"""The parts of the GPU path that a CPU machine can check (issue 15): the start-up check of the CUDA stack, the
CPUs each rank takes, DALI's nvJPEG settings. tests/test_gpu.py holds what needs a GPU."""

import os
import shutil
import subprocess
import sys

import pytest

from hvd_imagenet import cpus, gpu
from hvd_imagenet.data.dali import decoder_options


@pytest.mark.parametrize(
    "found, problem",
    [
        (dict(gpu_present=False, cuda_usable=False, driver=None, capability=None), None),  # a CPU machine
        (dict(gpu_present=True, cuda_usable=True, driver=(13, 0), capability=(9, 0), name="NVIDIA H100"), None),
        (
            dict(gpu_present=True, cuda_usable=False, driver=(12, 4), capability=None),
            "this machine has an NVIDIA GPU but torch cannot use it: its NVIDIA driver is too old (a driver for CUDA "
            "12.4; this torch, CUDA {cuda}, needs CUDA 13.0: driver >= 580); fix the driver, or hide the GPUs "
            "(CUDA_VISIBLE_DEVICES=) to run on the CPU",
        ),
        (
            dict(gpu_present=True, cuda_usable=False, driver=None, capability=None),
            "this machine has an NVIDIA GPU but torch cannot use it: torch.cuda.is_available() is False (no usable "
            "NVIDIA driver; see nvidia-smi); fix the driver, or hide the GPUs (CUDA_VISIBLE_DEVICES=) to run on the "
            "CPU",
        ),
        (
            dict(gpu_present=True, cuda_usable=True, driver=(13, 0), capability=(7, 0), name="Tesla V100-SXM2-32GB"),
            "GPU Tesla V100-SXM2-32GB has compute capability 7.0; this CUDA 13 build of torch runs on 7.5 (Turing) and "
            "newer",
        ),
    ],
)
@pytest.mark.unit
def test_the_cuda_stack_check_says_what_is_wrong_in_one_line(found, problem):
    import torch

    expected = problem.format(cuda=torch.version.cuda) if problem else None
    assert gpu.stack_problem(**found) == expected


@pytest.mark.unit
def test_hidden_gpus_mean_the_cpu_on_purpose(monkeypatch):
    for hidden in ("", "-1"):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", hidden)
        assert gpu.gpus_hidden()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    assert not gpu.gpus_hidden()
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert not gpu.gpus_hidden()


@pytest.mark.parametrize(
    "affinity, machine, local_size, expected",
    [
        (12, 96, 8, 12),  # srun --cpus-per-task=12 with binding: the task's own 12
        (96, 96, 8, 12),  # horovodrun or mpirun --bind-to none: the ranks split the machine
        (64, 96, 8, 8),  # a container limited to 64 CPUs, 8 ranks in it
        (2, 2, 2, 1),  # this machine, 2 local ranks
        (1, 2, 2, 1),  # a task bound to one core
        (16, 16, 1, 16),
    ],
)
@pytest.mark.unit
def test_each_rank_takes_its_share_of_the_cpus_it_was_given(monkeypatch, affinity, machine, local_size, expected):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(affinity)))
    monkeypatch.setattr(os, "cpu_count", lambda: machine)
    assert cpus.cpus_per_rank(local_size) == expected


@pytest.mark.unit
def test_nvjpeg_buffers_are_sized_for_imagenet_on_the_gpu_only():
    mixed = decoder_options("gpu")
    assert mixed["device"] == "mixed" and mixed["device_memory_padding"] == 211_025_920
    assert mixed["host_memory_padding"] == 140_544_512 and mixed["preallocate_width_hint"] == 5980
    assert decoder_options("cpu") == {"device": "cpu"}  # the CPU decoder takes none of them


@pytest.mark.cli
@pytest.mark.skipif(not shutil.which("gcc"), reason="needs gcc to build a stand-in for the driver's library")
def test_the_driver_version_comes_from_the_driver_library(tmp_path):
    """gpu.driver_cuda asks libcuda.so.1 itself (cuDriverGetVersion), which answers even when torch cannot use
    the driver. Here a stand-in library for an old driver (CUDA 12.4): the check names it."""
    source = tmp_path / "libcuda.c"
    source.write_text("int cuDriverGetVersion(int *version) { *version = 12040; return 0; }\n")
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(tmp_path / "libcuda.so.1"), str(source)], check=True)
    code = (
        "from hvd_imagenet import gpu; print(gpu.driver_cuda()); "
        "print(gpu.stack_problem(True, False, gpu.driver_cuda(), None))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "LD_LIBRARY_PATH": str(tmp_path)},
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    version, problem = done.stdout.splitlines()
    assert version == "(12, 4)" and "its NVIDIA driver is too old (a driver for CUDA 12.4" in problem
