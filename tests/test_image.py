"""The container image built from docker/Dockerfile and run, with no Docker engine and no registry: buildah builds
the production Dockerfile itself on a Debian 12 base that mmdebstrap makes from Debian's archive (only
BASE_IMAGE differs from a user's build), then, in the image as its own user and with no GPU, `horovodrun
--check-build` must list NCCL, DALI must import, and a 2-rank training epoch must end with its metrics file
(scripts/image.sh). About 15 min on a fresh 2-core machine (Horovod's CUDA compile), ~3 min with the caches."""

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import cli_env

ROOT = Path(__file__).resolve().parent.parent
IMAGE = ROOT / "scripts" / "image.sh"

pytestmark = [
    pytest.mark.horovod,
    pytest.mark.image,
    pytest.mark.skipif(
        os.geteuid() != 0 or not shutil.which("buildah") or not shutil.which("mmdebstrap"),
        reason="builds with buildah as root, on a base made by mmdebstrap (make setup installs both as root)",
    ),
]


def image_step(*args, timeout: int) -> str:
    env = {
        **cli_env(),
        "IMAGE_BASE": "localhost/hvd-imagenet-base:bookworm",
        "IMAGE_TAG": "localhost/hvd-imagenet:test",
    }
    done = subprocess.run(["bash", str(IMAGE), *args], capture_output=True, text=True, env=env, timeout=timeout)
    assert done.returncode == 0, f"scripts/image.sh {' '.join(args)}:\n{done.stdout[-6000:]}\n{done.stderr[-6000:]}"
    return done.stdout + done.stderr


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_the_image_builds_and_trains_as_its_user_without_a_gpu():
    image_step("base", "bookworm", timeout=600)
    output = image_step("build", timeout=3000)
    built = re.search(r"image: built localhost/hvd-imagenet:test \(\d+ s\), [\d.]+ [MG]B", output)
    assert built, output[-2000:]
    print(built.group(0))  # the build's time and the image's size, in the test's log

    checked = image_step("check", timeout=900)
    assert "user: trainer uid=1000" in checked  # the image's USER, not root
    build_lines = {line.strip() for line in checked.splitlines()}
    for listed in ("[X] PyTorch", "[X] MPI", "[X] Gloo", "[X] NCCL"):  # controllers and tensor operations
        assert listed in build_lines, f"horovodrun --check-build in the image lacks {listed}:\n{checked[:3000]}"
    assert re.search(r"^DALI \d+\.\d+\.\d+ torch \d", checked, flags=re.M), checked[-3000:]
    metrics = [json.loads(line) for line in checked.split("metrics.jsonl:", 1)[1].splitlines() if line.startswith("{")]
    assert [m["epoch"] for m in metrics] == [1], metrics
    assert metrics[0]["world_size"] == 2 and 0 <= metrics[0]["val_top1"] <= 100, metrics[0]
