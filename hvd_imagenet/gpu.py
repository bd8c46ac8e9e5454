"""This rank's device, and what the CUDA 13 stack needs of a GPU machine, checked at start-up in one line.

torch 2.14's CUDA 13 build (and the container's CUDA 13.0 base) needs an NVIDIA driver >= 580 (the driver that
speaks CUDA 13.0) and GPUs of compute capability >= 7.5 (Turing and newer; CUDA 13 dropped Maxwell, Pascal and
Volta). On an older driver torch.cuda.is_available() is simply False and a job would train on the CPU without a
word; on an older GPU it would fail at the first kernel. Both stop here with the reason instead.
"""

from __future__ import annotations

import ctypes
import glob
import os

import torch

from .cpus import available_cpus
from .errors import UserError

MIN_DRIVER_CUDA = (13, 0)  # what an NVIDIA driver >= 580 reports
MIN_CAPABILITY = (7, 5)


def gpus_hidden() -> bool:
    """CUDA_VISIBLE_DEVICES set to nothing (or -1): the user asks for the CPU on a GPU machine."""
    return os.environ.get("CUDA_VISIBLE_DEVICES", "x").strip() in ("", "-1")


def driver_cuda() -> tuple[int, int] | None:
    """The CUDA version the installed driver supports (the driver API's cuDriverGetVersion: no GPU context, and
    it answers when torch cannot use the driver), None without NVIDIA's driver library."""
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    version = ctypes.c_int(0)
    if libcuda.cuDriverGetVersion(ctypes.byref(version)) != 0 or not version.value:
        return None
    return version.value // 1000, version.value % 1000 // 10


def stack_problem(
    gpu_present: bool,
    cuda_usable: bool,
    driver: tuple[int, int] | None,
    capability: tuple[int, int] | None,
    name: str = "",
) -> str | None:
    """Why this machine's GPU cannot run this build, or None. Pure: the checks, given what was found."""
    wanted = f"{MIN_DRIVER_CUDA[0]}.{MIN_DRIVER_CUDA[1]}"
    if gpu_present and not cuda_usable:
        found = f"a driver for CUDA {driver[0]}.{driver[1]}" if driver else "no usable NVIDIA driver"
        why = (
            f"its NVIDIA driver is too old ({found}; this torch, CUDA {torch.version.cuda}, needs CUDA {wanted}: "
            "driver >= 580)"
            if driver and driver < MIN_DRIVER_CUDA
            else f"torch.cuda.is_available() is False ({found}; see nvidia-smi)"
        )
        return (
            f"this machine has an NVIDIA GPU but torch cannot use it: {why}; fix the driver, or hide the GPUs "
            "(CUDA_VISIBLE_DEVICES=) to run on the CPU"
        )
    if capability and capability < MIN_CAPABILITY:
        return (
            f"GPU {name} has compute capability {capability[0]}.{capability[1]}; this CUDA 13 build of torch "
            f"runs on {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} (Turing) and newer"
        )
    return None


def device_name(device: torch.device) -> str:
    """What a benchmark record names the device: the GPU's model, or the CPUs this process may use."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({available_cpus()} cores)"


def describe(device: torch.device) -> str:
    """One line on what runs: the GPU, its capability, the driver's CUDA, torch's CUDA, cuDNN and NCCL."""
    major, minor = torch.cuda.get_device_capability(device)
    driver = driver_cuda()
    nccl = torch.cuda.nccl.version()  # (2, 27, 3); an int in older torch
    return (
        f"{torch.cuda.get_device_name(device)} (compute capability {major}.{minor}), driver for CUDA "
        f"{'.'.join(map(str, driver)) if driver else '?'}, torch {torch.__version__} (CUDA "
        f"{torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, NCCL "
        f"{'.'.join(map(str, nccl)) if isinstance(nccl, tuple) else nccl})"
    )


def rank_device(local_rank: int) -> torch.device:
    """cuda:local_rank (one GPU per process) when this machine has GPUs, else the CPU; a GPU that this build
    cannot use is an error, not a silent fallback to the CPU."""
    usable = torch.cuda.is_available()
    # A GPU this torch should see: NVIDIA's device files, not hidden on purpose, and a CUDA build of torch.
    present = bool(glob.glob("/dev/nvidia[0-9]*")) and not gpus_hidden() and torch.version.cuda is not None
    if usable and local_rank >= torch.cuda.device_count():
        raise UserError(
            f"local rank {local_rank}, but this process sees {torch.cuda.device_count()} GPU(s) "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '(unset)')}): start one "
            "process per GPU, each seeing all of the node's GPUs"
        )
    device = torch.device("cuda", local_rank) if usable else torch.device("cpu")
    capability = torch.cuda.get_device_capability(device) if usable else None
    problem = stack_problem(
        present, usable, driver_cuda(), capability, torch.cuda.get_device_name(device) if usable else ""
    )
    if problem:
        raise UserError(problem)
    if usable:
        torch.cuda.set_device(device)
        # Input shapes are fixed: cuDNN times its algorithms for each shape once and keeps the fastest.
        torch.backends.cudnn.benchmark = True
    return device
